# stage.sh - `kfac stage`: --help; bad arguments and a missing or broken
# dataset folder give one clear line and a non-zero exit; a real staging
# prints the local folder on stdout and a rerun copies nothing; a reserve
# larger than the disk falls back (or, with --no-fallback, fails); and
# under mpirun, two emulated nodes (KFAC_TOPO_NO_PMIX + SLURM_NODEID) get
# one copy each, in copy and in broadcast mode (the source read once).
. "$(dirname "$0")/testlib.bash"
. "$(dirname "$0")/stage_dataset.bash"

check "stage --help exits 0" sh -c "'$kfac' stage --help >/dev/null"
for opt in --to --split --mode --no-fallback --reserve-gb --verify DATASET_DIR; do
  check "stage --help shows $opt" sh -c "'$kfac' stage --help | grep -q -- '$opt'"
done

ds=$tmp/imagenet-mini
stage_make_dataset "$ds" 3 1 300000
expect_error "no dataset" "no DATASET_DIR given" stage
expect_error "unknown option" "unknown option '--frobnicate'" stage --frobnicate "$ds"
expect_error "bad mode" "--mode 'scatter': expected copy or broadcast" stage --mode scatter "$ds"
expect_error "mode without value" "--mode needs a value" stage "$ds" --mode
expect_error "bad reserve" "--reserve-gb '-1'" stage --reserve-gb -1 "$ds"
expect_error "bad split list" "--split 'train,' has an empty name" stage --split train, "$ds"
expect_error "two datasets" "one dataset folder only" stage "$ds" "$ds"
expect_error "missing dataset" "$tmp/nope: No such file or directory" stage --to "$tmp/l" "$tmp/nope"
mkdir "$tmp/empty"
expect_error "not a dataset" "$tmp/empty/manifest.yaml: cannot open: No such file" \
  stage --to "$tmp/l" "$tmp/empty"
expect_error "unknown split" "no split 'test' \(it has train, val\)" \
  stage --to "$tmp/l" --split train,test "$ds"
cp -r "$ds" "$tmp/bad"
stage_damage "$tmp/bad/train-00001.h5" 7
expect_error "source not matching its manifest" \
  "$tmp/bad/train-00001.h5: checksum mismatch .* does not match $tmp/bad/manifest.yaml" \
  stage --to "$tmp/l" --reserve-gb 0 "$tmp/bad"
touch "$tmp/file"
expect_error "local folder not creatable, --no-fallback" \
  "$tmp/file/imagenet-mini-[0-9a-f]{12}: cannot create folder: Not a directory \(no fallback" \
  stage --to "$tmp/file" --no-fallback "$ds"

# a real staging: the folder on stdout, identical files, a rerun copies nothing
out=$("$kfac" stage --to "$tmp/local" --reserve-gb 0 "$ds" 2>"$tmp/log")
check "stage exits 0: $(cat "$tmp/log")" test $? -eq 0
check "stdout is the local folder: $out" sh -c "echo '$out' | grep -Eq '^$tmp/local/imagenet-mini-[0-9a-f]{12}\$'"
check "one line on stdout" test "$(printf '%s\n' "$out" | wc -l)" -eq 1
check "the copy is identical" stage_same_copy "$ds" "$out"
check "log names the copying rank" grep -q "rank 0 copied 4 shards" "$tmp/log"
out2=$("$kfac" stage --to "$tmp/local" --reserve-gb 0 "$ds" 2>"$tmp/log2")
check "rerun: same folder" test "$out2" = "$out"
check "rerun: nothing copied: $(cat "$tmp/log2")" grep -q "total: 1 node, 0 B copied" "$tmp/log2"
out3=$("$kfac" stage -q --to "$tmp/local" "$ds" 2>"$tmp/log3")
check "-q: only the folder" test "$out3" = "$out" -a ! -s "$tmp/log3"

# short space (a reserve no disk has): fallback by default, error without
out=$("$kfac" stage --to "$tmp/local2" --reserve-gb 999999 "$ds" 2>"$tmp/log")
check "fallback exits 0" test $? -eq 0
check "fallback prints the dataset folder: $out" test "$out" = "$ds"
check "fallback warns: $(cat "$tmp/log")" grep -q "WARNING: node 0 .*reading the shared copy $ds.*not enough space" "$tmp/log"
expect_error "short space, --no-fallback" \
  "not enough space: .* free, staging needs 1.2. MB more plus a 1000 TB reserve \(no fallback" \
  stage --to "$tmp/local2" --reserve-gb 999999 --no-fallback "$ds"

# two emulated nodes under mpirun: one copy per node, rank 0 and rank 2 copy
mpirun=$(command -v mpirun || true)
if [ -n "$mpirun" ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
  cat >"$tmp/node.sh" <<'SH'
#!/bin/sh
# two ranks per emulated node, each node with its own "local" folder
export SLURM_NODEID=$((OMPI_COMM_WORLD_RANK / 2)) SLURM_NNODES=2 KFAC_TOPO_NO_PMIX=1
kfac=$1 base=$2; shift 2
exec "$kfac" stage --to "$base/node$SLURM_NODEID" --reserve-gb 0 "$@"
SH
  for mode in copy broadcast; do
    base=$tmp/mpi-$mode
    "$mpirun" --oversubscribe -x OMP_NUM_THREADS -n 4 sh "$tmp/node.sh" "$kfac" "$base" \
      --mode $mode "$ds" >"$tmp/out" 2>"$tmp/log"
    check "$mode: 4 ranks exit 0: $(cat "$tmp/log")" test $? -eq 0
    check "$mode: node 0 copied by rank 0" grep -q "node 0 (.*): rank 0 copied 4 shards" "$tmp/log"
    check "$mode: node 1 copied by rank 2" grep -q "node 1 (.*): rank 2 copied 4 shards" "$tmp/log"
    check "$mode: one line per node" test "$(grep -c ': rank [0-9]* copied' "$tmp/log")" -eq 2
    for n in 0 1; do
      check "$mode: node $n holds one identical copy" \
        stage_same_copy "$ds" "$(ls -d "$base/node$n"/imagenet-mini-*)"
      check "$mode: node $n holds one folder" test "$(ls "$base/node$n" | wc -l)" -eq 1
    done
    if [ $mode = broadcast ]; then
      check "broadcast: the source read once" grep -q "2.4. MB copied, 0 B kept, 1.2. MB read from" "$tmp/log"
    else
      check "copy: the source read by each node" grep -q "2.4. MB copied, 0 B kept, 2.4. MB read from" "$tmp/log"
    fi
    "$mpirun" --oversubscribe -x OMP_NUM_THREADS -n 4 sh "$tmp/node.sh" "$kfac" "$base" \
      --mode $mode "$ds" >"$tmp/out" 2>"$tmp/log"
    check "$mode: rerun copies and reads nothing: $(cat "$tmp/log")" \
      grep -q "total: 2 nodes, 0 B copied, 2.4. MB kept, 0 B read" "$tmp/log"
  done
  # a node that cannot stage, --no-fallback: every rank fails, the message names the node
  base=$tmp/mpi-fail
  mkdir -p "$base" && touch "$base/node1"
  rc=0
  "$mpirun" --oversubscribe -x OMP_NUM_THREADS -n 4 sh "$tmp/node.sh" "$kfac" "$base" \
    --mode broadcast --no-fallback "$ds" >"$tmp/out" 2>"$tmp/log" || rc=$?
  check "node 1 failing: exit non-zero" test $rc -ne 0
  check "node 1 failing: named once: $(cat "$tmp/log")" \
    test "$(grep -c '^kfac stage: node 1 (.*): .*node1/imagenet-mini-.*: cannot create folder' "$tmp/log")" -eq 1
else
  echo "stage.sh: mpirun not found, skipping the two-node part"
fi
summary
