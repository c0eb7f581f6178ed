#!/usr/bin/env bash
# shellcheck disable=SC2016  # single-quoted $VARs are expanded by the tasks, not here
# test_restart.sh - start -> stop -> start -> stop of the local Slurm cluster
# (site/local), twice: start is idempotent, job ids restarting at 1 do not
# trip over stale PMIx files (pitfall 5), a crashed slurmd and a running job
# are cleaned up, stop is idempotent.  Needs the cluster STOPPED (it refuses
# to disturb a running one; use KFAC_CLUSTER_ROOT / KFAC_CLUSTER_PORT_BASE
# for a second cluster) and leaves it stopped.  Usage: tests/slurm/test_restart.sh
set -euo pipefail
src=$(cd "$(dirname "$0")/../.." && pwd)
case ${1:-} in
  -h|--help) sed -n '3,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac
. "$src/site/local/env"
local_=$src/site/local
root=$KFAC_CLUSTER_ROOT
base=${KFAC_CLUSTER_PORT_BASE:-17000}

passed=0 failed=0
t0=$SECONDS
fail() { failed=$((failed + 1)); echo "FAIL: $*" >&2; }
pass() { passed=$((passed + 1)); echo "ok: $*"; }
check() { local what=$1; shift; if "$@"; then pass "$what"; else fail "$what"; fi; }
finish() {
  local rc=$?
  cd /
  "$local_/stop" >/dev/null 2>&1 || true
  echo "test_restart: $passed passed, $failed failed ($((SECONDS - t0))s)"
  if [ $rc -ne 0 ] || [ $failed -ne 0 ]; then
    [ $rc -ne 0 ] && echo "test_restart: aborted (exit $rc)" >&2
    "$local_/logs" >&2 || true
    exit 1
  fi
}

# Refuse to stop a cluster someone may be using.
for f in "$root"/run/*.pid; do
  [ -e "$f" ] || continue
  if [ -d "/proc/$(tr -dc 0-9 <"$f")" ]; then
    echo "test_restart: the cluster at $root is running; stop it first (site/local/stop)" >&2
    exit 2
  fi
done
trap finish EXIT

listeners() { ss -Hltn "( sport >= :$base and sport <= :$((base + 4)) )" | wc -l; }
pids() { cat "$root"/run/*.pid 2>/dev/null | sort | xargs; }
# alive PID...: succeeds when any of the pids still exists.
alive() {
  local p st
  for p in "$@"; do
    st=$(cat "/proc/$p/stat" 2>/dev/null) || continue
    st=${st##*) }
    case ${st%% *} in Z|X) ;; *) return 0 ;; esac
  done
  return 1
}
# wait_running: until the sleep job runs (10 s at most).
wait_running() {
  local i
  for ((i = 0; i < 100; i++)); do
    [ -n "$(squeue -h -n kfac-restart-sleep -t R -o %i 2>/dev/null)" ] && return 0
    sleep 0.1
  done
}
dead() { ! alive "$@"; }
status_down() { ! "$local_/status" >/dev/null; }
# ns_members NS: pids in mount namespace NS (e.g. "mnt:[4026532177]").
ns_members() {
  local p
  for p in /proc/[0-9]*; do
    [ "$(readlink "$p/ns/mnt" 2>/dev/null)" = "$1" ] && alive "${p#/proc/}" && echo "${p#/proc/}"
  done
  return 0
}

out=$("$local_/stop")
check "stop with nothing running says so: $out" grep -q "nothing running" <<<"$out"

for cycle in 1 2; do
  echo "--- cycle $cycle"
  # Leftovers of a crashed run: a step's PMIx socket and client dir for job 1.
  mkdir -p "$root/spool/slurmd-node1" "$root/nodetmp/node1/spmix_appdir_0_1.0"
  : >"$root/spool/slurmd-node1/stepd.slurm.pmix.1.0"

  s=$SECONDS
  check "start (cycle $cycle)" "$local_/start"
  echo "  start took $((SECONDS - s))s"
  before=$(pids)
  out=$("$local_/start")
  check "second start: already up ($out)" grep -q "already up and healthy" <<<"$out"
  check "second start: same daemons" test "$before" = "$(pids)"
  check "one slurmctld + four slurmd listening ($(listeners))" test "$(listeners)" -eq 5
  check "status exits 0" "$local_/status" >/dev/null

  # Job ids restarted at 1; PMIx must still work on every node.
  cd "$KFAC_CLUSTER_SHARED"
  got=$(timeout 60 srun --mpi=pmix -N 4 --ntasks-per-node=1 sh -c 'echo $SLURM_JOB_ID:$PMIX_RANK' | sort | xargs || true)
  check "srun --mpi=pmix after restart, job 1 despite stale files: $got" test "$got" = "1:0 1:1 1:2 1:3"

  if [ "$cycle" -eq 2 ]; then
    # A job running while slurmd node1 crashes: start must notice, clean up
    # (no process left in node1's namespace) and bring up a healthy cluster.
    timeout 120 srun -J kfac-restart-sleep -N 4 sleep 300 >/dev/null 2>&1 &
    srun_pid=$!
    wait_running
    ns=$(cat "$root/run/slurmd-node1.mntns")
    sleep 0.5
    # Its slurmstepd and task (the kernel may reuse the namespace id for the
    # restarted node1, so check these pids rather than the namespace later).
    victim=$(cat "$root/run/slurmd-node1.pid")
    step=$(ns_members "$ns" | grep -vx "$victim" | xargs)
    check "node1 runs the job's step ($step)" test -n "$step"
    kill -KILL "$victim"
    for ((i = 0; i < 50; i++)); do alive "$victim" || break; sleep 0.1; done
    out=$("$local_/start" 2>&1) || true
    check "start after a slurmd crash restarts the cluster" grep -q "partially up" <<<"$out"
    check "cluster healthy again" "$local_/status" >/dev/null
    # shellcheck disable=SC2086
    check "the crashed node's step and task are gone" dead $step
    wait "$srun_pid" 2>/dev/null || true

    # stop with a job running: the job is cancelled and its processes end.
    timeout 120 srun -J kfac-restart-sleep -N 4 sleep 300 >/dev/null 2>&1 &
    srun_pid=$!
    wait_running
    nss=$(cat "$root"/run/slurmd-node*.mntns)
  fi
  cd /

  daemons=$(pids)
  s=$SECONDS
  check "stop (cycle $cycle)" "$local_/stop"
  echo "  stop took $((SECONDS - s))s"
  # shellcheck disable=SC2086
  check "daemons gone" dead $daemons
  check "no listener on ports $base-$((base + 4))" test "$(listeners)" -eq 0
  check "status exits 1" status_down
  if [ "$cycle" -eq 2 ]; then
    left=
    for ns in $nss; do left+=$(ns_members "$ns"); done
    check "stop with a running job: no process left in the nodes' namespaces" test -z "$left"
    wait "$srun_pid" 2>/dev/null || true
  fi
done
out=$("$local_/stop")
check "stop again: nothing running" grep -q "nothing running" <<<"$out"
