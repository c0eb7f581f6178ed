#!/usr/bin/env bash
# run_distributed.sh - the distributed tests on the local Slurm cluster, with
# srun --mpi=pmix -N 4 --ntasks-per-node=2 (8 ranks on node1..node4):
#   rank map (PMIx) against Slurm's allocation, with --gpus-per-node=2 and
#   --gpus-per-task=1; weights equal to one process's and bytes equal to the
#   formula (test_distributed); a dying rank ends the job (srun -K).
# Assumes the cluster is started (site/local/start) and BUILD holds the
# ctest build (its tests/mpi/reference, from ctest, is made here if missing).
# usage: tests/slurm/run_distributed.sh BUILD_DIR [FMNIST_DIR]
set -uo pipefail
case ${1:-} in
  -h|--help|'') sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac
src=$(cd "$(dirname "$0")/../.." && pwd)
build=$(cd "$1" && pwd)
fmnist=${2:-/usr/share/datasets/fashion-mnist}
. "$src/site/local/env"
export OMP_NUM_THREADS=1
# Nodes have a private /tmp: run copies from the shared folder every node
# sees, wherever the checkout and build are.
stage=$KFAC_CLUSTER_SHARED/run_distributed.$$
mkdir -p "$stage/bin" "$stage/src/jobs"
trap 'rm -rf "$stage"' EXIT
cp "$build/tests/mpi/test_rankmap" "$build/tests/mpi/test_distributed" "$build/bin/kfac" "$stage/bin/"
cp "$src/jobs/"*.yaml "$stage/src/jobs/"
if [ -d "$build/tests/mpi/reference" ]; then cp -r "$build/tests/mpi/reference" "$stage/"; fi
cd "$stage" # tasks start in the submit folder: one every node sees
# srun_retry: srun, relaunched (3 launches at most) after a SIGSEGV (Open MPI 4.1.4's
# MPI_Init race, explained there); a dying rank's own exit is not 139.
srun_8=("$src/tests/slurm/srun_retry" --mpi=pmix -N 4 --ntasks-per-node=2 --time=10)
failed=0
t0=$SECONDS
step() {
    local name=$1
    shift
    echo "== $name"
    if "$@"; then echo "ok: $name"; else echo "FAIL: $name"; failed=1; fi
}

step "rank map, --gpus-per-node=2" bash "$src/tests/mpi/rankmap_check.sh" \
    --bin "$stage/bin/test_rankmap" --ranks 8 --nodes 4 --ppn 2 --source pmix \
    --gpus per-node --launcher slurm -- "${srun_8[@]}" --gpus-per-node=2
step "rank map, --gpus-per-task=1" bash "$src/tests/mpi/rankmap_check.sh" \
    --bin "$stage/bin/test_rankmap" --ranks 8 --nodes 4 --ppn 2 --source pmix \
    --gpus per-task --launcher slurm -- "${srun_8[@]}" --gpus-per-task=1

ref=$stage/reference
if [ ! -s "$ref/kfac_every_step.f32" ]; then
    mkdir -p "$ref"
    step "one-process reference" "$stage/bin/test_distributed" --reference "$ref" "$fmnist"
fi
step "8 ranks = one process (weights, bytes)" \
    "${srun_8[@]}" "$stage/bin/test_distributed" --compare "$ref" "$fmnist"
step "a dying rank ends the job" bash "$src/tests/mpi/rank_death.sh" "$stage/bin/kfac" \
    "$stage/src" "$fmnist" -- "${srun_8[@]}" -K

echo "run_distributed: $((SECONDS - t0))s, $([ $failed = 0 ] && echo passed || echo FAILED)"
if [ $failed != 0 ]; then "$src/site/local/logs" >&2 || true; fi
exit $failed
