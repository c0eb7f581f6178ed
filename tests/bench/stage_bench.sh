#!/usr/bin/env bash
# stage_bench.sh - `kfac stage` throughput beside the plain tools on the
# same files, same disk, same run: a dataset of random-byte shards
# (KFAC_BENCH_STAGE_MB, default 1536 MB, in 128 MB shards) staged into a
# fresh folder, against `cp` (no flush) and `cp` + `sync` (staging flushes
# with syncfs before it writes the manifest); and the hash pass of a rerun
# with --verify against `xxh64sum` of the same files.  Each figure is the
# best of KFAC_BENCH_REPS (default 3) runs, ours and the peer alternating,
# after one untimed round; `sync` before each timed command.  Timings are
# of whole commands (ours includes start-up, topology discovery and the
# manifest, about 50 ms).
# Nothing is dropped from the page cache (that needs privileges a test
# machine may not give): the source is read from memory by both sides, so
# this measures the copy, hash and write path, not the source disk.
# Prints JSON lines {"name","value","unit","peer","peer_value","ratio"}.
#   tests/bench/stage_bench.sh [BUILD_DIR] [WORK_DIR]   (default: build, /var/tmp)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${1:-$root/build}
kfac=$build/bin/kfac
[ -x "$kfac" ] || { echo "stage_bench: $kfac not built" >&2; exit 1; }
. "$root/tests/cli/stage_dataset.bash"
mb=${KFAC_BENCH_STAGE_MB:-1536}
reps=${KFAC_BENCH_REPS:-3}
work=$(mktemp -d "${2:-/var/tmp}/kfac-stage-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT
ds=$work/bench-ds
shard=$((128 * 1000 * 1000))
stage_make_dataset "$ds" $(((mb * 1000 * 1000 + shard - 1) / shard)) 0 $shard
bytes=$(stage_shard_files "$ds" | (cd "$ds" && xargs stat -c %s) | awk '{s += $1} END {print s}')
files=$(stage_shard_files "$ds" | sed "s|^|$ds/|")
echo "stage_bench: $(awk -v b="$bytes" 'BEGIN {printf "%.2f GB", b / 1e9}') in $(echo "$files" | wc -w) shards, $work ($(df --output=fstype "$work" | tail -1)), $(nproc) cores" >&2

now() { date +%s.%N; }
gbps() { awk -v b="$bytes" -v t="$1" 'BEGIN {printf "%.3f", b / t / 1e9}'; }
best() { sort -g | tail -1; }   # highest GB/s
timed() { # timed COMMAND...: prints GB/s of the command on the dataset's bytes
  local t0 t1
  sync
  t0=$(now)
  "$@" >/dev/null
  t1=$(now)
  gbps "$(awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}')"
}
cp_plain() { mkdir "$1" && cp $files "$1/"; }
cp_sync() { mkdir "$1" && cp $files "$1/" && sync; }
stage_fresh() { "$kfac" stage -q --to "$1" --reserve-gb 0 "$ds"; }
hash_peer() { xxh64sum $files; }
stage_verify() { "$kfac" stage -q --verify --to "$work/staged" --reserve-gb 0 "$ds"; }

# one untimed round first: the first write after making the dataset pays
# for its writeback and block allocation
stage_fresh "$work/w1" >/dev/null && cp_plain "$work/w2" && sync && rm -rf "$work/w1" "$work/w2"
ours=() cp1=() cp2=() ver=() xx=()
for ((i = 0; i < reps; i++)); do
  ours+=("$(timed stage_fresh "$work/s$i")"); rm -rf "$work/s$i"
  cp1+=("$(timed cp_plain "$work/c$i")"); rm -rf "$work/c$i"
  cp2+=("$(timed cp_sync "$work/d$i")"); rm -rf "$work/d$i"
done
stage_fresh "$work/staged" >/dev/null
for ((i = 0; i < reps; i++)); do
  ver+=("$(timed stage_verify)")
  xx+=("$(timed hash_peer)")
done
line() { # line NAME VALUE PEER PEER_VALUE
  awk -v n="$1" -v v="$2" -v p="$3" -v pv="$4" 'BEGIN {
    printf "{\"name\": \"%s\", \"value\": %s, \"unit\": \"GB/s\", \"peer\": \"%s\", \"peer_value\": %s, \"ratio\": %.3f}\n",
      n, v, p, pv, v / pv }'
}
o=$(printf '%s\n' "${ours[@]}" | best)
line stage_copy "$o" cp "$(printf '%s\n' "${cp1[@]}" | best)"
line stage_copy "$o" "cp+sync" "$(printf '%s\n' "${cp2[@]}" | best)"
line stage_verify_rerun "$(printf '%s\n' "${ver[@]}" | best)" xxh64sum "$(printf '%s\n' "${xx[@]}" | best)"
echo "stage_bench: runs (GB/s) stage ${ours[*]} | cp ${cp1[*]} | cp+sync ${cp2[*]} | verify ${ver[*]} | xxh64sum ${xx[*]}" >&2
