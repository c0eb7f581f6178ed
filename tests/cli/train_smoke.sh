# train_smoke.sh - `kfac train` on the real Fashion-MNIST files for a few
# steps with --set overrides: prints an epoch line, writes the resolved job
# (with the overrides) and a metrics line with the documented keys.
. "$(dirname "$0")/testlib.bash"
out="$tmp/run"
check "kfac train runs" "$kfac" train "$src/jobs/fmnist_resnet8_sgd.yaml" \
  --set train.max_steps=20 --set train.batch_size=32 --set data.path="$fmnist" \
  --set output.dir="$out" --set train.seed=7 -q >"$tmp/log" 2>&1
cat "$tmp/log"
check "epoch line printed" grep -Eq '^epoch +1 .*test_acc [0-9.]+%' "$tmp/log"
check "resolved job keeps the override" grep -Eq 'batch_size: 32' "$out/job.yaml"
check "resolved job keeps the seed" grep -Eq 'seed: 7' "$out/job.yaml"
for key in epoch train_loss test_acc images_per_s seconds; do
  check "metrics has $key" grep -q "\"$key\": " "$out/metrics.jsonl"
done
check "one metrics line for one epoch" test "$(wc -l <"$out/metrics.jsonl")" -eq 1
summary
