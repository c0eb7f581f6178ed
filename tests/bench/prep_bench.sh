#!/usr/bin/env bash
# tests/bench/prep_bench.sh - images/s of `kfac prep` beside Pillow doing the
# same work on the same files, in the same run.  Prints one JSON line per
# figure: {"name", "value", "unit", "peer", "peer_value", "ratio"}.
#   - Fashion-MNIST train (IDX, raw, no resize, --shard-mb 8: 6 shards): no
#     peer;
#   - 2000 synthetic 500x375 RGB JPEGs (noise + gradients, quality 90, made
#     here with Pillow), --resize 256 --crop center, raw and jpeg (q90)
#     storage, 1 and 2 threads, --shard-mb 32 (12 shards: threads convert
#     whole shards, so a one-shard run uses one thread).  Peer: Pillow's Image.open -> resize
#     (BILINEAR) -> crop (-> JPEG q90) in 1 or 2 processes, output kept in
#     memory (kfac prep also writes and checksums its shards).
# kfac's figure is its own summary's images/s (conversion, shard writing,
# checksums and manifest; not the folder listing).  Each figure is the best
# of two runs.
#   tests/bench/prep_bench.sh [BUILD_DIR]   (default: build)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${1:-$root/build}
kfac=$build/bin/kfac
fmnist=${KFAC_FMNIST_DIR:-/usr/share/datasets/fashion-mnist}
images=${KFAC_BENCH_IMAGES:-2000}
py=/usr/bin/python3
[ -x "$kfac" ] || { echo "prep_bench: $kfac not built (bin/build first)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

mkdir -p "$tmp/idx"
ln -s "$fmnist"/train-*-ubyte.gz "$tmp/idx/"
$py - "$tmp/jpegs" "$images" <<'PY'
import os, sys
from PIL import Image
root, n = sys.argv[1], int(sys.argv[2])
for c in range(10):
    os.makedirs(f"{root}/train/class{c}", exist_ok=True)
grad = Image.linear_gradient("L").resize((500, 375))
radial = Image.radial_gradient("L").resize((500, 375))
for i in range(n):
    noise = [Image.effect_noise((500, 375), 40 + i % 30) for _ in range(3)]
    bands = [Image.blend(b, n_, 0.35) for b, n_ in zip((grad, radial, grad.rotate(180)), noise)]
    Image.merge("RGB", bands).save(f"{root}/train/class{i % 10}/img{i:05d}.JPEG", quality=90)
PY

# kfac NAME ARGS...: best images/s of two runs
kfac_rate() {
  local best=0 r
  for rep in 1 2; do
    r=$("$kfac" prep -q --force --out "$tmp/out" "$@" | sed -n 's/^done: .*(\([0-9.]*\) images\/s)$/\1/p')
    best=$($py -c "print(max($best, $r))")
  done
  echo "$best"
}

# pillow STORAGE PROCS: best images/s of two runs
pillow_rate() {
  $py - "$tmp/jpegs" "$1" "$2" <<'PY'
import glob, io, sys, time
from multiprocessing import Pool
from PIL import Image
root, storage, procs = sys.argv[1], sys.argv[2], int(sys.argv[3])
files = sorted(glob.glob(f"{root}/train/*/*"))
S = 256
def convert(path):
    im = Image.open(path).convert("RGB")
    w, h = im.size
    nw, nh = (w * S // h, S) if h <= w else (S, h * S // w)
    im = im.resize((nw, nh), Image.BILINEAR)
    l, t = (nw - S) // 2, (nh - S) // 2
    im = im.crop((l, t, l + S, t + S))
    if storage == "jpeg":
        b = io.BytesIO()
        im.save(b, "JPEG", quality=90)
        return len(b.getvalue())
    return len(im.tobytes())
best = 0
for rep in range(2):
    t0 = time.perf_counter()
    if procs == 1:
        for f in files: convert(f)
    else:
        with Pool(procs) as p: p.map(convert, files, chunksize=16)
    best = max(best, len(files) / (time.perf_counter() - t0))
print(f"{best:.1f}")
PY
}

pil=$($py -c 'import PIL; print(PIL.__version__)')
r=$(kfac_rate --threads 1 --shard-mb 8 "$tmp/idx")
echo "{\"name\": \"prep_fmnist_train_idx_raw_t1\", \"value\": $r, \"unit\": \"images/s\"}"
r=$(kfac_rate --threads 2 --shard-mb 8 "$tmp/idx")
echo "{\"name\": \"prep_fmnist_train_idx_raw_t2\", \"value\": $r, \"unit\": \"images/s\"}"
for storage in raw jpeg; do
  for t in 1 2; do
    ours=$(kfac_rate --threads $t --storage $storage --resize 256 --crop center --quality 90 \
      --shard-mb 32 "$tmp/jpegs")
    peer=$(pillow_rate $storage $t)
    $py -c "import json; print(json.dumps({'name': 'prep_jpeg500x375_resize256_center_${storage}_t$t', \
      'value': $ours, 'unit': 'images/s', 'peer': 'Pillow $pil, $t process(es), decode+resize+crop' + \
      ('+encode q90' if '$storage' == 'jpeg' else ''), 'peer_value': $peer, 'ratio': round($ours / $peer, 3)}))"
  done
done
