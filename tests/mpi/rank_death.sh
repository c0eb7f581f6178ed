#!/usr/bin/env bash
# rank_death.sh - a rank that dies ends the whole job: non-zero exit within a
# bounded time, with a message that names the rank and its host; no rank is
# left waiting in a collective.
#
# usage: rank_death.sh KFAC_BINARY SOURCE_DIR FMNIST_DIR -- LAUNCHER PREFIX...
#   e.g. ... -- mpirun --oversubscribe -n 4
#        ... -- srun --mpi=pmix -K -N 4 --ntasks-per-node=2
# Two failures are injected (KFAC_FAULT, see lib/core/train.c): rank 1
# returns an error at step 3 (kfac aborts the job and names rank and host),
# and rank 1 is killed by SIGKILL at step 3 (the launcher must notice).
set -u
case ${1:-} in -h|--help|'') sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
kfac=$1 src=$2 fmnist=$3
shift 3
[[ ${1:-} == -- ]] && shift
launcher=("$@")
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
limit=90
out=$(mktemp -d /tmp/kfac_rank_death.XXXXXX)
trap 'rm -rf "$out"' EXIT
failed=0

run_fault() {
    local how=$1 log=$out/$1.log start rc elapsed
    start=$(date +%s)
    # the launcher passes KFAC_FAULT on: srun exports the environment,
    # mpirun needs -x
    local prefix=("${launcher[@]}")
    [[ ${launcher[0]##*/} == mpirun ]] && prefix+=(-x KFAC_FAULT -x OMP_NUM_THREADS)
    KFAC_FAULT="1:3:$how" OMP_NUM_THREADS=1 timeout -k 5 $limit "${prefix[@]}" "$kfac" train \
        "$src/jobs/fmnist_resnet8_sgd.yaml" -q --set data.path="$fmnist" \
        --set train.batch_size=64 --set train.max_steps=50 --set train.threads=1 \
        --set output.dir="$out/run_$how" >"$log" 2>&1
    rc=$?
    elapsed=$(( $(date +%s) - start ))
    if (( elapsed >= limit )); then
        echo "FAIL $how: the job hung (killed after ${limit}s)"; failed=1
    elif (( rc == 0 )); then
        echo "FAIL $how: the job exited 0 although rank 1 failed"; failed=1
    elif [[ $how == exit ]] && ! grep -Eq "rank 1 on [^:]+: .*injected failure" "$log"; then
        echo "FAIL $how: no message naming rank 1 and its host"; failed=1
    elif [[ $how == kill ]] && ! grep -Eiq "(rank 1 .*on node [^ ]+|task 1: Killed|: task 1:)" "$log"; then
        echo "FAIL $how: the launcher's message does not name rank 1 and its host"; failed=1
    else
        echo "ok $how: exit $rc after ${elapsed}s"
    fi
    (( failed )) && sed 's/^/    | /' "$log" | tail -20
}

run_fault exit
run_fault kill
exit $failed
