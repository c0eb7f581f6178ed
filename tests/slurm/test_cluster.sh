#!/usr/bin/env bash
# shellcheck disable=SC2016  # single-quoted $VARs are expanded by the tasks, not here
# test_cluster.sh - checks that the local Slurm cluster of site/local/start
# works the way the distributed tests need: tasks spread over node1..node4,
# PMIx + Open MPI across nodes, emulated GPUs, private node-local /tmp, and
# sbatch.  Assumes the cluster is started; exits non-zero on any failure and
# then prints the daemon logs.  Usage: tests/slurm/test_cluster.sh
set -euo pipefail
src=$(cd "$(dirname "$0")/../.." && pwd)
case ${1:-} in
  -h|--help) sed -n '3,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac
. "$src/site/local/env"

passed=0 failed=0
t0=$SECONDS
fail() { failed=$((failed + 1)); echo "FAIL: $*" >&2; }
pass() { passed=$((passed + 1)); echo "ok: $*"; }
# expect DESCRIPTION EXPECTED ACTUAL
expect() {
  if [ "$2" = "$3" ]; then pass "$1"
  else fail "$1"; printf '  expected: %s\n  got:      %s\n' "$2" "$3" >&2; fi
}
finish() {
  local rc=$?
  cd /
  [ -n "${work:-}" ] && rm -rf "$work"
  echo "test_cluster: $passed passed, $failed failed ($((SECONDS - t0))s)"
  if [ $rc -ne 0 ] || [ $failed -ne 0 ]; then
    [ $rc -ne 0 ] && echo "test_cluster: aborted (exit $rc)" >&2
    "$src/site/local/logs" >&2 || true
    exit 1
  fi
}
trap finish EXIT

"$src/site/local/status" >/dev/null || { echo "test_cluster: cluster not up (run site/local/start)" >&2; exit 1; }

# Work in a directory every node sees: /tmp is private to each node, and
# tasks start in the submitting directory.
work=$(mktemp -d "$KFAC_CLUSTER_SHARED/test_cluster.XXXXXX")
chmod 755 "$work"
cd "$work"
# Bound every step: a wedged cluster fails the test instead of hanging it.
run() { timeout 60 srun "$@"; }

# 1. 8 tasks, two on each of node1..node4.
got=$(run -N 4 --ntasks-per-node=2 sh -c 'echo $SLURMD_NODENAME' | sort | uniq -c | awk '{print $2 "=" $1}' | xargs)
expect "srun -N 4 --ntasks-per-node=2: two tasks per node" "node1=2 node2=2 node3=2 node4=2" "$got"

# 2. Open MPI over PMIx across two nodes: Allreduce of rank+1 over 4 ranks = 10.
cat >allreduce.c <<'EOF'
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
int main(int argc, char **argv) {
  int rank, size, sum = 0;
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  int mine = rank + 1;
  MPI_Allreduce(&mine, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  const char *node = getenv("SLURMD_NODENAME");
  printf("rank %d/%d on %s sum %d\n", rank, size, node ? node : "?", sum);
  MPI_Finalize();
  return 0;
}
EOF
if mpicc -O0 -o allreduce allreduce.c; then
  out=$(run --mpi=pmix -N 2 -n 4 --ntasks-per-node=2 ./allreduce || true)
  while IFS= read -r line; do echo "  $line"; done <<<"$out"
  expect "MPI_Allreduce over 4 ranks: every rank has sum 10" \
    "rank 0/4 sum 10,rank 1/4 sum 10,rank 2/4 sum 10,rank 3/4 sum 10" \
    "$(echo "$out" | awk '/^rank/ {print $1, $2, $5, $6}' | sort | paste -sd,)"
  expect "MPI ranks on node1 and node2, two each" "node1=2 node2=2" \
    "$(echo "$out" | awk '/^rank/ {print $4}' | sort | uniq -c | awk '{print $2 "=" $1}' | xargs)"
else
  fail "mpicc could not build the MPI test program"
fi

# 3. Emulated GPUs: --gpus-per-node=2 exposes 0,1; --gpus-per-task=1 gives
# each task one index, different from its node-mates'.
got=$(run -N 1 --gpus-per-node=2 sh -c 'echo $CUDA_VISIBLE_DEVICES')
expect "--gpus-per-node=2: CUDA_VISIBLE_DEVICES=0,1" "0,1" "$got"
out=$(run -N 2 --ntasks-per-node=2 --gpus-per-task=1 sh -c 'echo $SLURMD_NODENAME ${CUDA_VISIBLE_DEVICES:-none}' | sort)
expect "--gpus-per-task=1: one single-digit index per task" "4" "$(grep -cE '^node[12] [0-3]$' <<<"$out")"
expect "--gpus-per-task=1: distinct indices on each node" "4" "$(sort -u <<<"$out" | wc -l)"

# 4. Node-local /tmp: a file node1 writes there is invisible on node2 and on
# the host, and lies in node1's nodetmp directory.
token=kfac-tmp-test.$$.$RANDOM
run -N 1 -w node1 sh -c "echo hello >/tmp/$token" || true
expect "node1 sees its own /tmp file" "yes" "$(run -N 1 -w node1 sh -c "test -e /tmp/$token && echo yes || echo no")"
expect "node2 does not see node1's /tmp file" "no" "$(run -N 1 -w node2 sh -c "test -e /tmp/$token && echo yes || echo no")"
expect "the host's /tmp does not have it" "no" "$(test -e "/tmp/$token" && echo yes || echo no)"
expect "node1's /tmp is \$KFAC_CLUSTER_ROOT/nodetmp/node1" "hello" "$(cat "$KFAC_CLUSTER_ROOT/nodetmp/node1/$token" 2>/dev/null || true)"
rm -f "$KFAC_CLUSTER_ROOT/nodetmp/node1/$token"

# 5. sbatch: a batch script with #SBATCH lines runs and writes its output file.
cat >job.sh <<'EOF'
#!/bin/bash
#SBATCH --job-name=kfac-cluster-test
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --output=job-%j.out
#SBATCH --time=2
echo "batch on $SLURMD_NODENAME nodes $SLURM_JOB_NODELIST"
srun sh -c 'echo "step on $SLURMD_NODENAME"' | sort
EOF
jobid=$(sbatch --parsable job.sh) || jobid=
if [ -n "$jobid" ]; then
  for ((i = 0; i < 300; i++)); do
    [ -z "$(squeue -h -j "$jobid" 2>/dev/null)" ] && break
    sleep 0.1
  done
  state=$(scontrol show job "$jobid" 2>/dev/null | grep -o 'JobState=[A-Z]*' || true)
  expect "sbatch job $jobid finished" "JobState=COMPLETED" "$state"
  expect "sbatch output file" "batch on node1 nodes node[1-2]|step on node1|step on node2" \
    "$(paste -sd'|' "job-$jobid.out" 2>/dev/null || echo "(no job-$jobid.out)")"
else
  fail "sbatch did not return a job id"
fi
