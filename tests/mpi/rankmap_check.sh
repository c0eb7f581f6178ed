#!/usr/bin/env bash
# rankmap_check.sh - runs test_rankmap under a launcher and checks what
# kfac_topo found against what the launcher allocated.
#
# usage: rankmap_check.sh --bin PATH [expectations] -- [LAUNCHER PREFIX...]
#
#   --bin PATH       the test_rankmap program (or $TEST_RANKMAP)
#   --ranks N        expected world size
#   --nodes N        expected number of nodes
#   --ppn N          expected ranks on every node
#   --source S       expected discovery: pmix | mpi | single
#   --gpus MODE      none      no rank has a GPU
#                    per-node  every rank of a node sees the same list, at
#                              least one entry per local rank (--gpus-per-node)
#                    per-task  every rank sees one GPU of its own (--gpus-per-task=1)
#                    shared    every rank shares its GPU with another local rank
#                    any       (default) only the rules of kfac_topo.h
#   --launcher L     slurm | mpirun | none (default: guessed from the prefix)
#   --timeout S      seconds before the run is killed (default 120)
#   --args "A B"     arguments for test_rankmap (e.g. --force-mpi)
#
# Always checked: test_rankmap exits 0 and says OK; one line per rank, ranks
# 0..size-1; the node map has one line per node whose host, rank list and
# GPU and NIC lists match the rank lines; each rank's gpu/device follow kfac_topo.h's
# rules applied to CUDA_VISIBLE_DEVICES as the launcher set it for that rank.
# Under Slurm each rank's host is the SLURMD_NODENAME of its task and there
# are as many hosts as nodes; under mpirun all ranks are on this one host.
#
# examples:
#   rankmap_check.sh --bin build/tests/mpi/test_rankmap --ranks 4 --nodes 1 \
#       --source pmix -- mpirun --oversubscribe -n 4
#   rankmap_check.sh --bin /work/main/build/tests/mpi/test_rankmap --ranks 8 \
#       --nodes 4 --ppn 2 --source pmix --gpus per-node -- \
#       srun --mpi=pmix -N 4 --ntasks-per-node=2 --gpus-per-node=2
# Exit status: 0 all checks pass, 1 a check failed, 2 usage.
set -u

bin=${TEST_RANKMAP:-}
ranks='' nodes='' ppn='' source='' gpus=any launcher='' timeout_s=120 args=''
usage() { sed -n '2,/^# Exit status/p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
    case $1 in
    --bin) bin=$2; shift 2 ;;
    --ranks) ranks=$2; shift 2 ;;
    --nodes) nodes=$2; shift 2 ;;
    --ppn) ppn=$2; shift 2 ;;
    --source) source=$2; shift 2 ;;
    --gpus) gpus=$2; shift 2 ;;
    --launcher) launcher=$2; shift 2 ;;
    --timeout) timeout_s=$2; shift 2 ;;
    --args) args=$2; shift 2 ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "rankmap_check: unknown option $1" >&2; usage ;;
    esac
done
if [ -z "$bin" ] || [ ! -x "$bin" ]; then
    echo "rankmap_check: --bin: no program '$bin'" >&2
    exit 2
fi
case $gpus in none|per-node|per-task|shared|any) ;; *) echo "rankmap_check: --gpus $gpus?" >&2; exit 2 ;; esac
if [ -z "$launcher" ]; then
    case ${1:-} in
    '') launcher=none ;;
    *srun) launcher=slurm ;;
    *mpirun|*mpiexec|*orterun) launcher=mpirun ;;
    *) launcher=unknown ;;
    esac
fi
if [ "$launcher" = mpirun ]; then
    export OMPI_ALLOW_RUN_AS_ROOT=${OMPI_ALLOW_RUN_AS_ROOT:-1}
    export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=${OMPI_ALLOW_RUN_AS_ROOT_CONFIRM:-1}
fi

out=$(mktemp "${TMPDIR:-/tmp}/rankmap.XXXXXX")
trap 'rm -f "$out"' EXIT
echo "rankmap_check: $* $bin $args" >&2
# shellcheck disable=SC2086  # args is a word list on purpose
timeout "$timeout_s" "$@" "$bin" $args >"$out" 2>&1
rc=$?
cat "$out"
if [ $rc -ne 0 ]; then
    echo "rankmap_check: FAIL: test_rankmap exited with $rc" >&2
    exit 1
fi

awk -v want_ranks="$ranks" -v want_nodes="$nodes" -v want_ppn="$ppn" -v want_source="$source" \
    -v gpus="$gpus" -v launcher="$launcher" -v this_host="$(hostname)" \
    -v this_short="$(hostname -s 2>/dev/null || hostname)" '
function fail(msg) { print "rankmap_check: FAIL: " msg > "/dev/stderr"; bad++ }
function isint(s) { return s ~ /^[0-9]+$/ }
# Expands a range list "0-3,8" into "0,1,2,3,8".
function expand(list,   n, parts, i, ab, k, s) {
    s = ""; n = split(list, parts, ",")
    for (i = 1; i <= n; i++) {
        if (split(parts[i], ab, "-") == 2) { for (k = ab[1] + 0; k <= ab[2] + 0; k++) s = s (s == "" ? "" : ",") k }
        else s = s (s == "" ? "" : ",") parts[i]
    }
    return s
}
# The rules of kfac_topo.h: sets G (gpu) and D (device) from a
# CUDA_VISIBLE_DEVICES value for local rank lr of ls.
function pick(cvd, lr, ls,   raw, n, e, i, m, x) {
    G = -1; D = -1
    if (cvd == "-" || cvd == "") return
    m = split(cvd, raw, ",")
    n = 0
    for (i = 1; i <= m; i++) { x = raw[i]; gsub(/^[ \t]+|[ \t]+$/, "", x); if (x != "") e[n++] = x }
    if (n == 0 || e[0] == "NoDevFiles" || e[0] ~ /^-/) return
    if (n == 1) D = 0; else if (n >= ls) D = lr; else D = lr % n
    G = isint(e[D]) ? e[D] + 0 : D
}
/^node [0-9]+ / {
    id = $2 + 0; h = $3; sub(/:$/, "", h)
    map_host[id] = h; map_ranks[id] = expand($5); map_gpus[id] = $7; map_nics[id] = $11; map_lines++
    next
}
/^rank=/ {
    delete f
    for (i = 1; i <= NF; i++) { p = index($i, "="); f[substr($i, 1, p - 1)] = substr($i, p + 1) }
    r = f["rank"] + 0
    if (r in seen) fail("rank " r " reported twice")
    seen[r] = 1; lines++
    size[r] = f["size"]; lr[r] = f["local_rank"] + 0; ls[r] = f["local_size"] + 0
    node[r] = f["node"] + 0; nn[r] = f["num_nodes"] + 0; host[r] = f["host"]
    gpu[r] = f["gpu"] + 0; dev[r] = f["device"] + 0; shared[r] = f["shared"] + 0
    src[r] = f["source"]; snode[r] = f["slurm_node"]; cvd[r] = f["cvd"]; nic[r] = f["nic"]
    next
}
/^test_rankmap: OK/ { ok = 1 }
END {
    if (!ok) fail("test_rankmap did not say OK")
    if (lines == 0) { fail("no rank lines"); exit 1 }
    S = size[0] + 0; N = nn[0]
    if (lines != S) fail(lines " rank lines for size " S)
    for (r = 0; r < S; r++) if (!(r in seen)) fail("rank " r " missing")
    if (want_ranks != "" && S != want_ranks + 0) fail("size " S ", expected " want_ranks)
    if (want_nodes != "" && N != want_nodes + 0) fail("num_nodes " N ", expected " want_nodes)
    if (map_lines != N) fail("node map has " map_lines " lines for " N " nodes")
    for (r = 0; r < S; r++) {
        if (want_source != "" && src[r] != want_source) fail("rank " r ": source " src[r] ", expected " want_source)
        if (want_ppn != "" && ls[r] != want_ppn + 0) fail("rank " r ": local_size " ls[r] ", expected " want_ppn)
        pick(cvd[r], lr[r], ls[r])
        if (gpu[r] != G || dev[r] != D)
            fail("rank " r ": gpu " gpu[r] " device " dev[r] " from CUDA_VISIBLE_DEVICES=" cvd[r] ", expected gpu " G " device " D)
        if (gpus == "none" && gpu[r] != -1) fail("rank " r ": gpu " gpu[r] ", expected none")
        if (gpus == "shared" && !shared[r]) fail("rank " r ": GPU not marked shared")
        if ((gpus == "per-node" || gpus == "per-task") && (gpu[r] < 0 || shared[r]))
            fail("rank " r ": gpu " gpu[r] " shared " shared[r] ", expected a GPU of its own")
        if (gpus == "per-task" && cvd[r] ~ /,/) fail("rank " r ": CUDA_VISIBLE_DEVICES=" cvd[r] ", expected one GPU")
        if (launcher == "slurm" && host[r] != snode[r])
            fail("rank " r ": host " host[r] ", but its task ran on SLURMD_NODENAME=" snode[r])
        if (launcher == "mpirun" && host[r] != this_host && host[r] != this_short)
            fail("rank " r ": host " host[r] ", but mpirun ran it on " this_host)
        if (launcher == "none" && (S != 1 || src[r] != "single")) fail("no launcher, but rank " r " of " S " from " src[r])
        # The node map agrees with the rank lines.
        n = node[r]; mine[n] = mine[n] (mine[n] == "" ? "" : ",") r; gl[n, lr[r]] = gpu[r] < 0 ? "-" : gpu[r]
        nl[n, lr[r]] = nic[r]
        if (map_host[n] != host[r]) fail("node map: node " n " on " map_host[n] ", rank " r " says " host[r])
        if (!(host[r] in hosts)) { hosts[host[r]] = 1; nhosts++ }
    }
    for (r = 0; r < S; r++)
        for (q = r + 1; q < S; q++)
            if (node[q] == node[r] && gpus == "per-node" && cvd[q] != cvd[r])
                fail("ranks " r " and " q " on node " node[r] " see different GPU lists")
    for (n = 0; n < N; n++) {
        if (map_ranks[n] != mine[n]) fail("node map: node " n " ranks " map_ranks[n] ", rank lines say " mine[n])
        want = ""
        for (l = 0; (n, l) in gl; l++) want = want (l ? "," : "") gl[n, l]
        if (map_gpus[n] != want) fail("node map: node " n " gpus " map_gpus[n] ", rank lines say " want)
        want = ""
        for (l = 0; (n, l) in nl; l++) want = want (l ? "|" : "") nl[n, l]
        if (map_nics[n] != want) fail("node map: node " n " nics " map_nics[n] ", rank lines say " want)
    }
    if (launcher == "slurm" && nhosts != N) fail(nhosts " distinct hosts for " N " nodes")
    if (launcher == "mpirun" && N != 1) fail("mpirun on one host, but " N " nodes")
    if (bad) exit 1
    print "rankmap_check: OK (" S " ranks, " N " nodes, " launcher ")"
}' "$out"
