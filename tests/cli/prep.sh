# prep.sh - `kfac prep` end to end on a small ImageNet-shaped tree made from
# real Fashion-MNIST images (JPEGs by cjpeg, PNGs and odd files by Pillow):
#   - counts in the manifest, the skipped/warnings lists and their reasons,
#     the summary lines;
#   - pixels read back from the shards (tests/test_prep --dump, plain HDF5)
#     against Pillow: Image.open -> convert("RGB") (alpha composited onto
#     white) -> resize(BILINEAR) -> crop.  Tolerance: max |diff| <= 1 level
#     (the same libjpeg-turbo decodes both; the resize is Pillow's algorithm
#     in the same fixed point; only alpha compositing rounds differently);
#     JPEG storage: mean |diff| <= 3 against the same reference;
#   - 1 vs 4 threads and 1 vs 2 MPI ranks: every output file identical;
#   - IDX input: shard pixels and labels equal the IDX files;
#   - bad options and inputs: one line on stderr naming what is wrong.
. "$(dirname "$0")/testlib.bash"
py=/usr/bin/python3 # Debian's, with python3-pil
dump="$(dirname "$kfac")/../tests/test_prep"
[ -x "$dump" ] || { echo "prep.sh: $dump not built" >&2; exit 1; }
S=20
export OMP_NUM_THREADS=2

# ---- the tree ----
$py - "$fmnist" "$tmp/tree" "$tmp/expect" "$S" <<'PY' || exit 1
import gzip, io, os, random, subprocess, sys
from PIL import Image
fm, root, expect, S = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
imgs = gzip.open(f"{fm}/train-images-idx3-ubyte.gz").read()[16:]
labs = gzip.open(f"{fm}/train-labels-idx1-ubyte.gz").read()[8:]
def fm_image(k):
    return Image.frombytes("L", (28, 28), imgs[784 * k:784 * (k + 1)])
by_class = {c: [k for k in range(3000) if labs[k] == c] for c in range(3)}
classes = ["n01_tshirt", "n02_trouser", "n03_pullover"]

def tiled(c, i):  # 28x28, 84x56 or 56x84 from consecutive images of class c
    cols, rows = [(1, 1), (3, 2), (2, 3)][i % 3]
    im = Image.new("L", (28 * cols, 28 * rows))
    for t in range(cols * rows):
        im.paste(fm_image(by_class[c][(i * 6 + t) % len(by_class[c])]), (28 * (t % cols), 28 * (t // cols)))
    return im

def tint(im):  # an RGB version whose channels differ
    g = im
    return Image.merge("RGB", (g, g.point(lambda v: min(255, v * 3 // 4 + 40)), g.point(lambda v: 255 - v)))

def cjpeg(im, path, extra=()):
    src = path + (".pgm" if im.mode == "L" else ".ppm")
    im.save(src)
    subprocess.run(["cjpeg", "-quality", "90", *extra, "-outfile", path, src], check=True)
    os.remove(src)

refs = {}  # path relative to root -> (image Pillow should see, label)
def mk(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path

for split, count, offset in (("train", 20, 0), ("val", 5, 100)):
    for c, name in enumerate(classes):
        for i in range(count):
            im = tiled(c, offset + i)
            if i % 2: im = tint(im)
            rel = f"{split}/{name}/img{i:02d}." + ("png" if i % 4 == 3 else "JPEG")
            p = mk(f"{root}/{rel}")
            im.save(p) if i % 4 == 3 else cjpeg(im, p)
            refs[rel] = (None, c)

t = f"{root}/train"
base = tint(tiled(0, 1))  # 84x56 RGB
base.convert("CMYK").save(f"{t}/n01_tshirt/zz_cmyk.jpg", quality=95)
refs["train/n01_tshirt/zz_cmyk.jpg"] = (None, 0)
a = base.convert("RGBA")
a.putalpha(Image.linear_gradient("L").resize(base.size))
a.save(f"{t}/n01_tshirt/zz_alpha.png")
refs["train/n01_tshirt/zz_alpha.png"] = (None, 0)
g8 = tiled(1, 2)  # 56x84 gray, stored as 16-bit v*257
g16 = Image.new("I;16", g8.size)
g16.putdata([v * 257 for v in g8.getdata()])
g16.save(f"{t}/n02_trouser/zz_deep16.png")
refs["train/n02_trouser/zz_deep16.png"] = (g8, 1)
tint(tiled(1, 4)).convert("P", palette=Image.ADAPTIVE, colors=32).save(f"{t}/n02_trouser/zz_palette.png")
refs["train/n02_trouser/zz_palette.png"] = (None, 1)
cjpeg(tiled(2, 5), f"{t}/n03_pullover/zz_truncated.JPEG")
data = open(f"{t}/n03_pullover/zz_truncated.JPEG", "rb").read()
cut = len(data) * 3 // 4
assert data.rfind(b"\xff\xda") < cut, "the cut must fall in the scan data"
open(f"{t}/n03_pullover/zz_truncated.JPEG", "wb").write(data[:cut])
cjpeg(tint(tiled(2, 7)), f"{t}/n03_pullover/zz_extra.JPEG")
data = open(f"{t}/n03_pullover/zz_extra.JPEG", "rb").read()
assert data.endswith(b"\xff\xd9")
open(f"{t}/n03_pullover/zz_extra.JPEG", "wb").write(data[:-2] + bytes(10) + b"\xff\xd9")
refs["train/n03_pullover/zz_extra.JPEG"] = (None, 2)
open(f"{t}/n03_pullover/x.JPEG", "wb").write(random.Random(1).randbytes(3000))
open(f"{t}/n03_pullover/README.txt", "w").write("not an image\n")
open(f"{t}/LICENSE", "w").write("stray file\n")
open(f"{t}/.DS_Store", "wb").write(b"\0\0\0\1Bud1")
os.makedirs(f"{t}/n04_empty")
cjpeg(tiled(0, 3), mk(f"{root}/val/n99_unknown/a.JPEG"))

# Pillow's view of each written image, in shard order (sorted path per split)
def pillow(rel):
    im, label = refs[rel]
    if im is None:
        im = Image.open(f"{root}/{rel}")
        if im.mode == "P": im = im.convert("RGBA")
        if im.mode == "RGBA":
            im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
        im = im.convert("RGB")
    else:
        im = im.convert("RGB")
    w, h = im.size
    nw, nh = (w * S // h, S) if h <= w else (S, h * S // w)
    return im.resize((nw, nh), Image.BILINEAR), label
for split in ("train", "val"):
    rels = sorted(r for r in refs if r.startswith(split + "/"))
    with open(f"{expect}-{split}-crop.bin", "wb") as crop, open(f"{expect}-{split}-jpeg.bin", "wb") as jpeg, \
         open(f"{expect}-{split}.txt", "w") as txt:
        for rel in rels:
            im, label = pillow(rel)
            nw, nh = im.size
            l, t_ = (nw - S) // 2, (nh - S) // 2
            crop.write(im.crop((l, t_, l + S, t_ + S)).tobytes())
            # jpeg storage: Pillow's own JPEG (quality 95, 4:2:0) decoded again
            b = io.BytesIO()
            im.save(b, "JPEG", quality=95, subsampling="4:2:0")
            jpeg.write(Image.open(b).convert("RGB").tobytes())
            txt.write(f"{nh} {nw} {label} {rel}\n")
PY

# compare DUMP_PREFIX EXPECT_BIN EXPECT_TXT CROP MAX_TOL MEAN_TOL: shapes,
# labels and pixels of the dumped split against Pillow's
compare() {
  $py - "$@" <<'PY'
import sys
dump, expect_bin, expect_txt, crop, max_tol, mean_tol = sys.argv[1:7]
S = 20
got = open(dump + ".bin", "rb").read()
want = open(expect_bin, "rb").read()
got_rows = [l.split() for l in open(dump + ".txt")]
want_rows = [l.split() for l in open(expect_txt)]
ok = len(got_rows) == len(want_rows)
if not ok: print(f"{len(got_rows)} images, expected {len(want_rows)}")
pos, worst, total, n, worst_at = 0, 0, 0, 0, ""
for g, w in zip(got_rows, want_rows):
    h, wd = (S, S) if crop == "1" else (int(w[0]), int(w[1]))
    if [int(g[0]), int(g[1]), int(g[2])] != [h, wd, int(w[2])]:
        print(f"{w[3]}: shape/label {g} expected {h} {wd} {w[2]}"); ok = False; break
    size = h * wd * 3
    a, b = got[pos:pos + size], want[pos:pos + size]
    pos += size
    d = max(abs(x - y) for x, y in zip(a, b))
    total += sum(abs(x - y) for x, y in zip(a, b)); n += size
    if d > worst: worst, worst_at = d, w[3]
mean = total / max(n, 1)
print(f"{dump}: {len(got_rows)} images, max |diff| {worst} ({worst_at}), mean {mean:.3f}")
ok = ok and pos == len(got) == len(want) and worst <= float(max_tol) and mean <= float(mean_tol)
sys.exit(0 if ok else 1)
PY
}

# ---- raw, 1 thread ----
rc=0; "$kfac" prep --out "$tmp/one" --resize $S --shard-images 7 --threads 1 "$tmp/tree" \
  >"$tmp/one.out" 2>"$tmp/one.err" || rc=$?
check "prep exits 0: $(cat "$tmp/one.err")" test $rc -eq 0
check "manifest: counts" $py - "$tmp/one/manifest.yaml" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
counts = re.findall(r"^    count: (\d+)", t, re.M)
shards = re.findall(r"file: (\S+),", t)
ok = counts == ["65", "15"] and len(shards) == 10 + 3 and shards[0] == "train-00000.h5"
ok = ok and "classes: [n01_tshirt, n02_trouser, n03_pullover, n04_empty]" in t
ok = ok and "storage: raw" in t and "resize: 20" in t and "crop: center" in t
print(counts, len(shards)) if not ok else None
sys.exit(0 if ok else 1)
PY
cut -f1 "$tmp/one/skipped.txt" >"$tmp/skipped.paths"
printf '%s\n' train/LICENSE train/n03_pullover/README.txt train/n03_pullover/x.JPEG \
  train/n03_pullover/zz_truncated.JPEG train/n04_empty/ val/n99_unknown/ >"$tmp/skipped.want"
check "skipped.txt lists the bad entries, sorted: $(cat "$tmp/one/skipped.txt")" \
  cmp -s "$tmp/skipped.paths" "$tmp/skipped.want"
check "reason: random bytes" grep -qP '^train/n03_pullover/x.JPEG\tnot a JPEG or PNG file$' "$tmp/one/skipped.txt"
check "reason: text file" grep -qP '^train/n03_pullover/README.txt\tnot a JPEG or PNG file$' "$tmp/one/skipped.txt"
check "reason: truncated" grep -qP '^train/n03_pullover/zz_truncated.JPEG\ttruncated JPEG: Premature end of JPEG file$' "$tmp/one/skipped.txt"
check "reason: empty class" grep -qP '^train/n04_empty/\tempty class folder$' "$tmp/one/skipped.txt"
check "reason: unknown val class" grep -qP '^val/n99_unknown/\tclass folder not in train/$' "$tmp/one/skipped.txt"
check "reason: stray file" grep -qP '^train/LICENSE\tnot in a class folder$' "$tmp/one/skipped.txt"
check "warnings.txt: the complete JPEG with extraneous bytes, converted: $(cat "$tmp/one/warnings.txt")" \
  grep -qP '^train/n03_pullover/zz_extra.JPEG\tCorrupt JPEG data: \d+ extraneous bytes before marker 0xd9$' "$tmp/one/warnings.txt"
check "summary: images and skips" grep -q '^done: 80 images, 3 skipped, ' "$tmp/one.out"
check "summary: per split" grep -q '^train: 65 images in 10 shards (68 inputs)$' "$tmp/one.out"
check "stderr: skips by reason" grep -q 'skipped 3 inputs (6 entries: .*2 not a JPEG or PNG file.*1 truncated JPEG' "$tmp/one.err"
check "stderr: warnings" grep -q 'converted 1 input despite decoder warnings' "$tmp/one.err"

# ---- pixels against Pillow ----
rc=0; "$dump" --dump "$tmp/one" train "$tmp/one-train" && "$dump" --dump "$tmp/one" val "$tmp/one-val" || rc=$?
check "dump" test $rc -eq 0
check "train pixels = Pillow (max 1 level)" compare "$tmp/one-train" "$tmp/expect-train-crop.bin" "$tmp/expect-train.txt" 1 1 0.05
check "val pixels = Pillow (max 1 level)" compare "$tmp/one-val" "$tmp/expect-val-crop.bin" "$tmp/expect-val.txt" 1 1 0.05

# ---- JPEG storage, aspect kept ----
rc=0; "$kfac" prep --out "$tmp/jpeg" --resize $S --crop none --storage jpeg --quality 95 -q "$tmp/tree" \
  >/dev/null 2>&1 || rc=$?
check "jpeg storage exits 0" test $rc -eq 0
"$dump" --dump "$tmp/jpeg" train "$tmp/jpeg-train"
check "jpeg storage: shapes, labels, pixels = Pillow's JPEG q95 of its resize (max 1 level)" \
  compare "$tmp/jpeg-train" "$tmp/expect-train-jpeg.bin" "$tmp/expect-train.txt" 0 1 0.05

# ---- parallel runs give the same bytes ----
same_dirs() { # same_dirs A B: the same file names and contents
  [ "$(ls "$1")" = "$(ls "$2")" ] || return 1
  for f in "$1"/*; do cmp -s "$f" "$2/$(basename "$f")" || { echo "differs: $f" >&2; return 1; }; done
}
rc=0; "$kfac" prep --out "$tmp/four" --resize $S --shard-images 7 --threads 4 -q "$tmp/tree" >/dev/null 2>&1 || rc=$?
check "4 threads exits 0" test $rc -eq 0
check "1 vs 4 threads: identical files" same_dirs "$tmp/one" "$tmp/four"
rc=0; OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 \
  mpirun --oversubscribe -x OMP_NUM_THREADS -n 2 \
  "$kfac" prep --out "$tmp/mpi" --resize $S --shard-images 7 -q "$tmp/tree" >"$tmp/mpi.out" 2>"$tmp/mpi.err" || rc=$?
check "2 MPI ranks exit 0: $(tail -3 "$tmp/mpi.err")" test $rc -eq 0
check "1 process vs 2 MPI ranks: identical files" same_dirs "$tmp/one" "$tmp/mpi"
check "2 MPI ranks: one summary (rank 0)" test "$(grep -c '^done:' "$tmp/mpi.out")" -eq 1
check "2 MPI ranks: the plan says so" grep -q '1 thread x 2 ranks' "$tmp/mpi.out"

# ---- IDX: shards hold the IDX bytes ----
rc=0; "$kfac" prep --out "$tmp/idx" --shard-images 25000 "$fmnist" >"$tmp/idx.out" 2>&1 || rc=$?
check "IDX exits 0: $(tail -2 "$tmp/idx.out")" test $rc -eq 0
check "IDX summary" grep -q '^done: 70000 images, 0 skipped' "$tmp/idx.out"
"$dump" --dump "$tmp/idx" train "$tmp/idx-train" && "$dump" --dump "$tmp/idx" val "$tmp/idx-val"
check "IDX pixels and labels equal the files" $py - "$fmnist" "$tmp/idx" <<'PY'
import gzip, re, sys
fm, out = sys.argv[1:3]
ok = True
for split, prefix in (("train", "train"), ("val", "t10k")):
    px = gzip.open(f"{fm}/{prefix}-images-idx3-ubyte.gz").read()[16:]
    lb = gzip.open(f"{fm}/{prefix}-labels-idx1-ubyte.gz").read()[8:]
    got = open(f"{out}-{split}.bin", "rb").read()
    rows = [l.split() for l in open(f"{out}-{split}.txt")]
    ok &= got == px and [int(r[2]) for r in rows] == list(lb) and all(r[:2] == ["28", "28"] for r in rows)
m = open(f"{out}/manifest.yaml").read()
ok &= "source: idx" in m and "channels: 1" in m and len(re.findall(r"file: train-", m)) == 3
sys.exit(0 if ok else 1)
PY

# ---- flat val with a label file ----
mkdir -p "$tmp/flat/train/cat" "$tmp/flat/train/dog" "$tmp/flat/val"
for f in a b; do cp "$tmp/tree/train/n01_tshirt/img00.JPEG" "$tmp/flat/train/cat/$f.JPEG"; done
cp "$tmp/tree/train/n01_tshirt/img03.png" "$tmp/flat/train/dog/c.png"
for f in v1 v2 v3; do cp "$tmp/tree/train/n01_tshirt/img00.JPEG" "$tmp/flat/val/$f.JPEG"; done
printf '2\n1\ndog\n' >"$tmp/flat/labels.txt"   # 1-based sorted-folder index or a name
rc=0; "$kfac" prep --out "$tmp/flat-out" --resize 8 --val-labels "$tmp/flat/labels.txt" -q "$tmp/flat" >/dev/null 2>&1 || rc=$?
check "flat val exits 0" test $rc -eq 0
"$dump" --dump "$tmp/flat-out" val "$tmp/flat-val"
check "flat val labels follow the file: dog cat dog" test "$(cut -d' ' -f3 "$tmp/flat-val.txt" | tr '\n' ' ')" = "1 0 1 "

# ---- errors: one line, path and reason ----
expect_error "missing input" "$tmp/nope: No such file or directory" prep --out "$tmp/o" "$tmp/nope"
mkdir -p "$tmp/empty"
expect_error "not a dataset" "$tmp/empty: neither IDX files .* nor a train/ folder" prep --out "$tmp/o" "$tmp/empty"
touch "$tmp/file"
expect_error "unwritable output" "$tmp/file/out: cannot create folder: Not a directory" prep --out "$tmp/file/out" "$tmp/tree"
expect_error "dataset already there" "$tmp/one: already holds a dataset .*--force" prep --out "$tmp/one" "$tmp/tree"
expect_error "bad --resize" "--resize: 'abc' is not an integer" prep --resize abc --out "$tmp/o" "$tmp/tree"
expect_error "bad --crop" "--crop: 'diagonal', expected none or center" prep --crop diagonal --out "$tmp/o" "$tmp/tree"
expect_error "bad --channels" "--channels: '2', expected 1 or 3" prep --channels 2 --out "$tmp/o" "$tmp/tree"
expect_error "bad --storage" "--storage: 'png', expected raw or jpeg" prep --storage png --out "$tmp/o" "$tmp/tree"
expect_error "bad --quality" "--quality: '0' is not an integer in 1..100" prep --quality 0 --out "$tmp/o" "$tmp/tree"
expect_error "bad --threads" "--threads: '0' is not an integer" prep --threads 0 --out "$tmp/o" "$tmp/tree"
expect_error "two shard sizes" "--shard-mb and --shard-images" prep --shard-mb 10 --shard-images 5 --out "$tmp/o" "$tmp/tree"
expect_error "unknown option" "unknown option '--sise'" prep --sise 3 --out "$tmp/o" "$tmp/tree"
expect_error "no --out" "no --out DIR given" prep "$tmp/tree"
expect_error "crop without resize" "--crop center needs --resize > 0" prep --resize 0 --crop center --out "$tmp/o" "$tmp/tree"
expect_error "flat val without labels" "$tmp/flat/val: 3 files and no class folders: give their labels with --val-labels" \
  prep --out "$tmp/o" "$tmp/flat"
printf '1\n2\n' >"$tmp/short.txt"
expect_error "label count" "$tmp/short.txt: 2 labels for 3 files in $tmp/flat/val" \
  prep --val-labels "$tmp/short.txt" --out "$tmp/o" "$tmp/flat"
printf '1\n3\n1\n' >"$tmp/range.txt"
expect_error "label out of range" "$tmp/range.txt:2: class index 3 outside 1..2" \
  prep --val-labels "$tmp/range.txt" --out "$tmp/o" "$tmp/flat"
check "failed runs leave no manifest" test ! -e "$tmp/o/manifest.yaml"
check "--help has both examples" sh -c "'$kfac' prep --help | grep -q 'kfac prep --out /data/fmnist-h5 /usr/share/datasets/fashion-mnist' && '$kfac' prep --help | grep -q imagenet"
summary
