# common.bash - shared by start, stop, status and logs (sourced, not run).
# Derives every path from the state root so the scripts work whether or not
# the caller sourced site/local/env.
# shellcheck disable=SC2034  # settings used by the scripts that source this

KFAC_CLUSTER_ROOT=${KFAC_CLUSTER_ROOT:-/var/lib/kfac-local-cluster}
ROOT=$KFAC_CLUSTER_ROOT
NODES=(node1 node2 node3 node4)
# slurmctld listens on PORT_BASE, slurmd nodeN on PORT_BASE+N.
PORT_BASE=${KFAC_CLUSTER_PORT_BASE:-17000}
GPUS_PER_NODE=4
CPUS_PER_NODE=4
TIMEOUT=${KFAC_CLUSTER_TIMEOUT:-60}
CRED_EXPIRE=${KFAC_CLUSTER_CRED_EXPIRE:-30}
me=$(basename "$0")

say() { echo "$me: $*"; }
die() { echo "$me: error: $*" >&2; exit 1; }

case $ROOT in
  /*) ;;
  *) die "KFAC_CLUSTER_ROOT must be an absolute path (got '$ROOT')" ;;
esac
# The per-node mount namespaces replace /tmp, so state there would be
# invisible to the nodes (and node-local /tmp is bound from this root).
case ${ROOT%/}/ in
  /tmp/*) die "KFAC_CLUSTER_ROOT must not be under /tmp (the nodes' /tmp is private)" ;;
esac

for v in PORT_BASE TIMEOUT CRED_EXPIRE; do
  case ${!v} in ''|*[!0-9]*) die "KFAC_CLUSTER_$v must be a number (got '${!v}')" ;; esac
done

# Clients started from here must talk to this cluster, whatever the caller set.
export KFAC_CLUSTER_ROOT SLURM_CONF=$ROOT/etc/slurm.conf
RUN=$ROOT/run LOG=$ROOT/log
# Our own munged socket (named in slurm.conf's AuthInfo): the cluster neither
# depends on nor disturbs a system munged, and two roots can run side by side.
MUNGE_SOCKET=$ROOT/munge/munge.socket

# pidfile NAME: where daemon NAME (munged, slurmctld, slurmd-nodeN) keeps its pid.
pidfile() { echo "$RUN/$1.pid"; }

# pid_alive PID: the process exists and is not a zombie awaiting its reaper
# (a daemon killed a moment ago still has a /proc entry until reaped).
pid_alive() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  case ${stat%% *} in Z|X) return 1 ;; esac
}

# daemon_pid NAME: prints the pid of daemon NAME and succeeds when its pid
# file names a live process whose command is the expected daemon (guards
# against a stale pid file whose pid was reused by something else).
daemon_pid() {
  local f pid comm
  f=$(pidfile "$1")
  [ -r "$f" ] || return 1
  pid=$(tr -dc 0-9 <"$f")
  [ -n "$pid" ] && pid_alive "$pid" || return 1
  comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  [ "$comm" = "${1%%-*}" ] || return 1
  echo "$pid"
}

munge_ok() { munge -S "$MUNGE_SOCKET" -n 2>/dev/null | unmunge -S "$MUNGE_SOCKET" 2>/dev/null | grep -q 'STATUS: *Success'; }
ctld_ok() { timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP'; }

# node_states: "nodeN state" lines from the controller, e.g. "node1 idle".
node_states() { timeout 10 sinfo -h -N -o '%N %T' 2>/dev/null | sort -u; }

# healthy: every daemon runs, munge answers and all four nodes are usable
# (idle, or busy with jobs; not down, drained, unknown or not responding).
healthy() {
  local n states
  daemon_pid munged >/dev/null && munge_ok && daemon_pid slurmctld >/dev/null || return 1
  for n in "${NODES[@]}"; do daemon_pid "slurmd-$n" >/dev/null || return 1; done
  ctld_ok || return 1
  states=$(node_states) || return 1
  # %T may carry a flag suffix; '*' (not responding) is the one that matters.
  [ "$(grep -cE '^node[1-4] (idle|allocated|mixed|completing)[^*]*$' <<<"$states")" -eq 4 ]
}

# show_logs [LINES]: tails of every daemon log (what a failing test prints).
show_logs() {
  local lines=${1:-25} f
  for f in "$LOG"/munged.log "$LOG"/slurmctld.log "$LOG"/slurmd-node*.log; do
    [ -e "$f" ] || continue
    echo "===== $f (last $lines lines) ====="
    tail -n "$lines" "$f"
  done
}

# signal_and_wait SECONDS PID...: SIGTERM the pids, wait for them to exit,
# SIGKILL whatever is left when the time is up.  Returns 1 if SIGKILL was needed.
signal_and_wait() {
  local secs=$1 pid left i; shift
  [ $# -gt 0 ] || return 0
  STOPPED=$((${STOPPED:-0} + $#))
  kill -TERM "$@" 2>/dev/null || true
  for ((i = 0; i < secs * 10; i++)); do
    left=()
    for pid in "$@"; do pid_alive "$pid" && left+=("$pid"); done
    [ ${#left[@]} -eq 0 ] && return 0
    sleep 0.1
  done
  say "still running after ${secs}s, sending SIGKILL: ${left[*]}"
  kill -KILL "${left[@]}" 2>/dev/null || true
  return 1
}

# ns_pids NODE: pids of the processes left in NODE's mount namespace
# (recorded when its slurmd started): slurmstepd and job tasks.  A process
# counts only if its /tmp is NODE's nodetmp directory too, so a namespace id
# reused by the kernel for something else after ours died never matches.
ns_pids() {
  local ns p
  [ -r "$RUN/slurmd-$1.mntns" ] || return 0
  ns=$(cat "$RUN/slurmd-$1.mntns")
  [ -n "$ns" ] || return 0
  for p in /proc/[0-9]*; do
    [ "$(readlink "$p/ns/mnt" 2>/dev/null)" = "$ns" ] || continue
    pid_alive "${p#/proc/}" || continue
    awk -v n="/nodetmp/$1" '$5 == "/tmp" && substr($4, length($4) - length(n) + 1) == n {f = 1} END {exit !f}' \
      "$p/mountinfo" 2>/dev/null && echo "${p#/proc/}"
  done
  return 0
}

# sweep_ns NODE: end every process left in NODE's namespace.  Several
# rounds, since a dying slurmstepd may still fork (epilog, cleanup).
sweep_ns() {
  local _ pids
  for _ in 1 2 3 4 5; do
    # shellcheck disable=SC2207
    pids=($(ns_pids "$1"))
    [ ${#pids[@]} -gt 0 ] || return 0
    say "$1: stopping leftover processes in its namespace (pids ${pids[*]})"
    signal_and_wait 5 "${pids[@]}" || true
  done
}

# stop_all: cancel jobs, stop the slurmds (and anything left in their
# namespaces), slurmctld, then munged if we started it.  Only pids from
# our own pid files / namespaces are signalled, never processes by name.
stop_all() {
  local n pid pids=() jobs i
  STOPPED=0  # how many processes were signalled (0: nothing was running)
  if daemon_pid slurmctld >/dev/null && ctld_ok; then
    jobs=$(timeout 10 squeue -h -o %A 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      say "cancelling jobs: ${jobs//$'\n'/ }"
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      # Give the slurmds a moment to end the steps themselves; a dead
      # node's steps are left to the namespace sweep below.
      for ((i = 0; i < 50; i++)); do
        [ -z "$(timeout 10 squeue -h -o %A 2>/dev/null)" ] && break
        sleep 0.1
      done
    fi
  fi
  for n in "${NODES[@]}"; do
    pid=$(daemon_pid "slurmd-$n") && pids+=("$pid")
  done
  if [ ${#pids[@]} -gt 0 ]; then
    say "stopping slurmd (pids ${pids[*]})"
    signal_and_wait 15 "${pids[@]}" || true
  fi
  for n in "${NODES[@]}"; do
    sweep_ns "$n"
    rm -f "$(pidfile "slurmd-$n")" "$RUN/slurmd-$n.mntns"
  done
  if pid=$(daemon_pid slurmctld); then
    say "stopping slurmctld (pid $pid)"
    signal_and_wait 15 "$pid" || true
  fi
  rm -f "$(pidfile slurmctld)"
  if pid=$(daemon_pid munged); then
    say "stopping munged (pid $pid)"
    signal_and_wait 10 "$pid" || true
  fi
  rm -f "$(pidfile munged)"
}

# lock: serialise start/stop (a second start waits for the first).
lock() {
  mkdir -p "$RUN"
  exec 9>"$RUN/lock"
  if ! flock -n 9; then
    say "waiting for another start/stop to finish ($RUN/lock)"
    flock -w 120 9 || die "another start/stop still holds $RUN/lock after 120s"
  fi
}

need_root() { [ "$(id -u)" -eq 0 ] || die "must run as root (slurmd runs as root and mounts per-node /tmp)"; }
