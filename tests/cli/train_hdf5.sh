# train_hdf5.sh - the HDF5 data path end to end on the real Fashion-MNIST
# files: `kfac prep` turns the IDX files into shards, and `kfac train` on
# them (with and without read-ahead) gives exactly the losses and accuracy of
# training on the IDX files: same pixels, same permutation, same crops.
# Then an ImageNet-style run: variable-size RGB JPEG shards, random-resized
# crops, per-channel normalisation, a few steps.
. "$(dirname "$0")/testlib.bash"
common=(--set train.max_steps=12 --set train.epochs=1 --set train.batch_size=64
        --set train.eval_batch_size=500 --set train.seed=3 -q)
check "kfac prep of the IDX files" "$kfac" prep --out "$tmp/fm" "$fmnist" >"$tmp/prep.log" 2>&1
cat "$tmp/prep.log"
check "train from idx" "$kfac" train "$src/jobs/fmnist_resnet8_sgd.yaml" "${common[@]}" \
  --set data.path="$fmnist" --set output.dir="$tmp/idx" >"$tmp/idx.log" 2>&1
for depth in 0 3; do
  check "train from hdf5 (prefetch $depth)" "$kfac" train "$src/jobs/fmnist_resnet8_sgd.yaml" \
    "${common[@]}" --set data.format=hdf5 --set data.path="$tmp/fm" --set data.prefetch=$depth \
    --set output.dir="$tmp/h5_$depth" >"$tmp/h5.log" 2>&1 || cat "$tmp/h5.log"
  metrics() { grep -o '"train_loss": [0-9.]*, "train_acc": [0-9.]*, "test_loss": [0-9.]*, "test_acc": [0-9.]*' "$1/metrics.jsonl"; }
  check "hdf5 (prefetch $depth) trains exactly as idx: $(metrics "$tmp/h5_$depth") vs $(metrics "$tmp/idx")" \
    test -n "$(metrics "$tmp/idx")" -a "$(metrics "$tmp/h5_$depth")" = "$(metrics "$tmp/idx")"
done
check "staged (data.stage copy): same training" "$kfac" train "$src/jobs/fmnist_resnet8_sgd.yaml" \
  "${common[@]}" --set data.format=hdf5 --set data.path="$tmp/fm" --set data.stage=copy \
  --set data.local_dir="$tmp/local" --set output.dir="$tmp/staged" >"$tmp/staged.log" 2>&1
cat "$tmp/staged.log" | head -3
check "staging reported" grep -Eq '^kfac train: staging: node 0 .* copied 2 shards' "$tmp/staged.log"
check "staged run trains exactly as idx" test "$(metrics "$tmp/staged")" = "$(metrics "$tmp/idx")"
check "job.yaml records the local folder" grep -q "path: \"$tmp/local/fm-" "$tmp/staged/job.yaml"
expect_error "staging needs hdf5" "data.stage copy needs data.format hdf5" train \
  "$src/jobs/fmnist_resnet8_sgd.yaml" --set data.stage=copy --set output.dir="$tmp/x"

# A tiny ImageNet-style tree: RGB JPEGs of varying size in 3 classes.
/usr/bin/python3 - "$tmp/tree" <<'PY'
import os, sys, random
from PIL import Image
random.seed(1)
root = sys.argv[1]
for split, n in (("train", 24), ("val", 6)):
    for c in ("n001", "n002", "n003"):
        os.makedirs(f"{root}/{split}/{c}", exist_ok=True)
        for i in range(n):
            w, h = random.randint(60, 120), random.randint(60, 120)
            img = Image.new("RGB", (w, h), tuple(random.randrange(256) for _ in range(3)))
            img.save(f"{root}/{split}/{c}/{i:03d}.JPEG", quality=90)
PY
check "kfac prep of a JPEG tree (jpeg storage, aspect kept)" "$kfac" prep --storage jpeg \
  --resize 64 --crop none --out "$tmp/inet" "$tmp/tree" >"$tmp/prep2.log" 2>&1 || cat "$tmp/prep2.log"
check "random-resized-crop training on it" "$kfac" train "$src/jobs/fmnist_resnet8_sgd.yaml" \
  --set data.format=hdf5 --set data.path="$tmp/inet" --set data.transform=random_resized_crop \
  --set data.crop=48 --set data.val_resize=56 --set "data.mean=[0.485,0.456,0.406]" \
  --set "data.std=[0.229,0.224,0.225]" --set train.batch_size=24 --set train.eval_batch_size=18 \
  --set train.max_steps=3 --set train.epochs=1 --set output.dir="$tmp/inet_run" -q >"$tmp/inet.log" 2>&1
cat "$tmp/inet.log"
check "its epoch line" grep -Eq '^epoch +1 .*test_acc [0-9.]+%' "$tmp/inet.log"
expect_error "varying sizes need data.crop" "differ in size: set data.crop" train \
  "$src/jobs/fmnist_resnet8_sgd.yaml" --set data.format=hdf5 --set data.path="$tmp/inet" \
  --set output.dir="$tmp/x"
expect_error "three means for one channel" "data.mean/data.std: 3 and 1 values for 1-channel images" \
  train "$src/jobs/fmnist_resnet8_sgd.yaml" --set data.format=hdf5 --set data.path="$tmp/fm" \
  --set "data.mean=[0.1,0.2,0.3]" --set output.dir="$tmp/x"
expect_error "missing manifest" "no-such/manifest.yaml" train "$src/jobs/fmnist_resnet8_sgd.yaml" \
  --set data.format=hdf5 --set data.path="$tmp/no-such" --set output.dir="$tmp/x"
summary
