# stage_dataset.bash - helpers for the `kfac stage` tests and benchmark
# (sourced, not a test): a dataset folder of random-byte shards with a
# real manifest (staging treats shards as files with a size and a
# checksum), and a check that a staged folder holds exactly its files.

# stage_make_dataset DIR NTRAIN NVAL BYTES: shards of about BYTES each
# (shard i is BYTES + 4099*i, so sizes differ and miss chunk boundaries).
stage_make_dataset() {
  local dir=$1 ntrain=$2 nval=$3 bytes=$4 split n i f h size
  mkdir -p "$dir" || return 1
  {
    printf 'kfac_dataset: 1\nstorage: raw\nchannels: 3\nresize: 256\ncrop: center\n'
    printf 'jpeg_quality: 90\nsource: folder\nclasses: [a, b]\nsplits:\n'
    for split in train val; do
      n=$ntrain; [ $split = val ] && n=$nval
      [ "$n" -gt 0 ] || continue
      printf '  %s:\n    count: %d\n    shards:\n' $split "$n"
      for ((i = 0; i < n; i++)); do
        f=$(printf '%s-%05d.h5' $split $i)
        size=$((bytes + 4099 * i))
        head -c "$size" /dev/urandom >"$dir/$f" || return 1
        h=$(xxh64sum "$dir/$f" | cut -d' ' -f1)
        printf '      - {file: %s, count: 1, bytes: %d, xxh64: "%s"}\n' "$f" "$size" "$h"
      done
    done
  } >"$dir/manifest.yaml.tmp" && mv "$dir/manifest.yaml.tmp" "$dir/manifest.yaml"
}

# stage_shard_files DIR: the shard file names its manifest lists.
stage_shard_files() {
  grep -o 'file: [^,]*' "$1/manifest.yaml" | cut -c7-
}

# stage_same_copy SRC DST: DST has SRC's manifest and every shard,
# byte-identical, and nothing else but staging's hidden files.
stage_same_copy() {
  local src=$1 dst=$2 f n=0
  cmp -s "$src/manifest.yaml" "$dst/manifest.yaml" || { echo "manifest differs in $dst"; return 1; }
  for f in $(stage_shard_files "$src"); do
    cmp -s "$src/$f" "$dst/$f" || { echo "$dst/$f differs from $src/$f"; return 1; }
    n=$((n + 1))
  done
  [ "$(ls "$dst" | wc -l)" -eq $((n + 1)) ] || { echo "unexpected files in $dst: $(ls "$dst")"; return 1; }
}

# stage_damage FILE OFFSET: complement the byte at OFFSET in place, so the
# file always changes (writing a fixed byte into random shards would leave
# one in 256 intact).
stage_damage() {
  local b
  b=$(od -An -tu1 -j"$2" -N1 "$1") && [ -n "$b" ] || return 1
  printf "\\$(printf %o $((b ^ 255)))" | dd of="$1" bs=1 seek="$2" conv=notrunc 2>/dev/null
}
