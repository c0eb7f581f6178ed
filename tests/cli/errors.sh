# errors.sh - bad job files and overrides fail with one clear line naming
# file:line:column (or the path, or the --set key) and a non-zero exit.
. "$(dirname "$0")/testlib.bash"
printf 'model:\n  name: resnet8-fmnist\noptimizer:\n  momentun: 0.9\n' >"$tmp/unknown.yaml"
expect_error "unknown key" "unknown.yaml:4:3: unknown key 'momentun'" train "$tmp/unknown.yaml"

printf 'train:\n  epochs: 3\n  batch_size: [1\n' >"$tmp/syntax.yaml"
expect_error "bad YAML" "syntax.yaml:[0-9]+:[0-9]+: bad YAML" train "$tmp/syntax.yaml"

printf 'train:\n  epochs: many\n' >"$tmp/type.yaml"
expect_error "wrong type" "type.yaml:2:11: train.epochs" train "$tmp/type.yaml"

expect_error "missing job file" "$tmp/nope.yaml: cannot open: No such file" train "$tmp/nope.yaml"

printf 'model: {name: resnet8-fmnist}\n' >"$tmp/ok.yaml"
expect_error "unknown --set key" "--set train.epoch" train "$tmp/ok.yaml" --set train.epoch=1
expect_error "bad --set value" "--set train.epochs: must be >= 1" train "$tmp/ok.yaml" --set train.epochs=0

expect_error "missing data folder" "$tmp/none: (No such file or directory|no train-images-idx3-ubyte)" \
  train "$tmp/ok.yaml" --set data.path="$tmp/none" --set output.dir="$tmp/run"

printf 'x' | gzip >"$tmp/train-images-idx3-ubyte.gz"
cp "$fmnist/train-labels-idx1-ubyte.gz" "$tmp/"
expect_error "corrupt data file" "train-images-idx3-ubyte.gz: " \
  train "$tmp/ok.yaml" --set data.path="$tmp" --set output.dir="$tmp/run"
expect_error "ImageNet job without its dataset" "staging: /datasets/imagenet-hdf5: No such file" \
  train "$src/jobs/resnet50_1024gpu.yaml" --set output.dir="$tmp/imagenet"
check "a job that cannot run leaves no output" test ! -e "$tmp/imagenet"
expect_error "16-bit precision on the cpu" "train.precision bf16 needs train.device cuda" \
  train "$tmp/ok.yaml" --set train.precision=bf16 --set output.dir="$tmp/bf16"
expect_error "tf32 on the cpu" "train.precision tf32 needs train.device cuda" \
  train "$tmp/ok.yaml" --set train.precision=tf32 --set output.dir="$tmp/tf32"
expect_error "unknown precision" "--set train.precision: .*f32\|bf16\|f16" \
  train "$tmp/ok.yaml" --set train.precision=fp8
summary
