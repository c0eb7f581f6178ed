#!/usr/bin/env bash
# shellcheck disable=SC2016  # single-quoted $VARs are expanded by the tasks, not here
# test_stage.sh - `kfac stage` on the local Slurm cluster: srun --mpi=pmix
# -N 4 --ntasks-per-node=2 stages a dataset from the shared folder into
# each node's private /tmp, in copy mode and in broadcast mode (local
# copies cleared in between).  Checks, from a second srun on every node,
# that each node holds exactly one identical copy; that the log names one
# copying rank per node (its local rank 0); that broadcast reads the source
# once; that a rerun copies and reads nothing; and that a copy damaged on
# one node is all a broadcast rerun sends.  Assumes the cluster is started.
# usage: tests/slurm/test_stage.sh BUILD_DIR
set -uo pipefail
case ${1:-} in
  -h|--help|'') sed -n '3,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac
src=$(cd "$(dirname "$0")/../.." && pwd)
build=$(cd "$1" && pwd)
. "$src/site/local/env"
. "$src/tests/cli/stage_dataset.bash"
export OMP_NUM_THREADS=1

passed=0 failed=0
t0=$SECONDS
check() { # check DESCRIPTION COMMAND...
  local what=$1; shift
  if "$@"; then passed=$((passed + 1)); echo "ok: $what"
  else failed=$((failed + 1)); echo "FAIL: $what" >&2; fi
}
"$src/site/local/status" >/dev/null || { echo "test_stage: cluster not up (run site/local/start)" >&2; exit 1; }

# Binaries and dataset in the folder every node sees; local copies under a
# name of our own in each node's private /tmp.
work=$(mktemp -d "$KFAC_CLUSTER_SHARED/test_stage.XXXXXX")
chmod 755 "$work"
local_dir=/tmp/kfac-stage-test.$$
cp "$build/bin/kfac" "$src/tests/cli/stage_dataset.bash" "$work/"
cd "$work" || exit 1
each_node() { timeout 60 srun -N 4 --ntasks-per-node=1 --time=5 "$@"; }
cleanup() {
  each_node rm -rf "$local_dir" >/dev/null 2>&1
  cd / && rm -rf "$work"
}
trap cleanup EXIT

ds=$work/imagenet-mini
stage_make_dataset "$ds" 4 1 3000000 || { echo "test_stage: cannot make the dataset" >&2; exit 1; }
ds_bytes=$(stage_shard_files "$ds" | (cd "$ds" && xargs cat) | wc -c)
# bytes as kfac stage prints them (decimal units, three digits), for MB sizes
human_mb() { awk -v b="$1" 'BEGIN { v = b / 1e6; printf (v < 10 ? "%.2f MB" : v < 100 ? "%.1f MB" : "%.0f MB"), v }'; }

# On every node: exactly one folder in the local dir, identical to the source.
cat >"$work/check_node.sh" <<'SH'
#!/usr/bin/env bash
. "$(dirname "$0")/stage_dataset.bash"
local_dir=$1 ds=$2 node=${SLURMD_NODENAME:-?}
n=$(ls "$local_dir" 2>/dev/null | wc -l)
if [ "$n" -ne 1 ]; then echo "$node: $n folders in $local_dir"; exit 0; fi
if out=$(stage_same_copy "$ds" "$local_dir"/*); then echo "$node: ok"; else echo "$node: $out"; fi
SH
nodes_ok() {
  local got
  got=$(each_node bash "$work/check_node.sh" "$local_dir" "$ds" | sort | xargs)
  [ "$got" = "node1: ok node2: ok node3: ok node4: ok" ] || { echo "  got: $got" >&2; return 1; }
}
stage() { # stage OUT LOG ARGS...: 8 ranks on 4 nodes
  local out=$1 log=$2; shift 2
  # srun_retry: relaunched (3 launches at most) after a SIGSEGV (Open MPI 4.1.4's MPI_Init race)
  timeout 240 "$src/tests/slurm/srun_retry" --mpi=pmix -N 4 --ntasks-per-node=2 --time=10 \
    "$work/kfac" stage \
    --to "$local_dir" --reserve-gb 0 "$@" "$ds" >"$out" 2>"$log"
}
# The copying rank of each node is its first: 0, 2, 4, 6 under srun's block layout.
one_rank_per_node() {
  local got
  got=$(grep -o 'node [0-9] (node[1-4]): rank [0-9]* copied' "$1" | awk '{print $3 $5}' | sort | xargs)
  [ "$got" = "(node1):0 (node2):2 (node3):4 (node4):6" ] || { echo "  got: $got" >&2; cat "$1" >&2; return 1; }
}

for mode in copy broadcast; do
  echo "== $mode"
  each_node rm -rf "$local_dir"
  stage "$work/out" "$work/log" --mode $mode
  rc=$?
  sed 's/^/  /' "$work/log"
  check "$mode: 8 ranks exit 0" test $rc -eq 0
  check "$mode: stdout is the local folder" \
    grep -Eqx "$local_dir/imagenet-mini-[0-9a-f]{12}" "$work/out"
  check "$mode: one copying rank per node, each its node's first" one_rank_per_node "$work/log"
  check "$mode: each node holds exactly one identical copy" nodes_ok
  if [ $mode = broadcast ]; then reads=$ds_bytes; else reads=$((4 * ds_bytes)); fi
  check "$mode: source read $( [ $mode = broadcast ] && echo once || echo 'once per node')" \
    grep -q "$(human_mb $((4 * ds_bytes))) copied, 0 B kept, $(human_mb $reads) read from" "$work/log"
  stage "$work/out" "$work/log2" --mode $mode
  rc=$?
  sed 's/^/  /' "$work/log2"
  check "$mode: rerun exits 0" test $rc -eq 0
  check "$mode: rerun copies and reads nothing" \
    grep -q "total: 4 nodes, 0 B copied, $(human_mb $((4 * ds_bytes))) kept, 0 B read" "$work/log2"
  check "$mode: still one identical copy per node" nodes_ok
done

echo "== broadcast after damage on node3"
timeout 60 srun -N 1 -w node3 --time=5 bash -c \
  '. "$1/stage_dataset.bash" && stage_damage "$(ls -d "$2"/imagenet-mini-*)/train-00002.h5" 99' \
  damage "$work" "$local_dir"
stage "$work/out" "$work/log3" --mode broadcast
rc=$?
sed 's/^/  /' "$work/log3"
shard_bytes=$(stat -c %s "$ds/train-00002.h5")
check "damaged: exit 0" test $rc -eq 0
check "damaged: only node3 copies (one shard)" \
  test "$(grep -c ' copied [0-9]* shards' "$work/log3")-$(grep -c '(node3): rank 4 copied 1 shards' "$work/log3")" = 1-1
check "damaged: one shard read and sent" \
  grep -q "total: 4 nodes, $(human_mb "$shard_bytes") copied, .* $(human_mb "$shard_bytes") read" "$work/log3"
check "damaged: each node holds one identical copy again" nodes_ok

echo "test_stage: $passed passed, $failed failed ($((SECONDS - t0))s)"
if [ $failed -ne 0 ]; then "$src/site/local/logs" >&2 || true; exit 1; fi
