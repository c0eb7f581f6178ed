/* stage.c - `kfac stage [options] DATASET_DIR`: copies a dataset's shards
 * to node-local storage once per node (kfac_stage_run), prints the folder
 * every node can read on stdout (for scripts) and, from rank 0, one line
 * per node and a total on stderr. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "commands.h"
#include "kfac/kfac_stage.h"
#include "kfac/kfac_topo.h"

#define MAX_SPLITS 8

static void usage(FILE *out)
{
    fprintf(out,
            "usage: kfac stage [--to LOCAL_DIR] [--split train,val] [--mode copy|broadcast]\n"
            "                  [--no-fallback] [--reserve-gb X] [--verify] [-q] DATASET_DIR\n"
            "       srun --mpi=pmix -N nodes [--ntasks-per-node n] kfac stage ... DATASET_DIR\n"
            "\n"
            "Copies the shards of DATASET_DIR (a `kfac prep` folder) to node-local storage,\n"
            "LOCAL_DIR/<name of DATASET_DIR>-<hash of its manifest>, once per node: each node's\n"
            "local rank 0 copies, its other ranks wait.  Shards already there with the size and\n"
            "checksum of the manifest are kept, a partial copy (FILE.part) is resumed, copies are\n"
            "checked against the manifest's checksums, and manifest.yaml is written last, so a\n"
            "local folder with a manifest is complete.  When the local disk is too small (or\n"
            "unusable) a node falls back to reading DATASET_DIR, with a warning.\n"
            "\n"
            "stdout: the folder every node can read (the local copy, or DATASET_DIR when a node\n"
            "fell back), e.g.  DATA=$(kfac stage /shared/imagenet).  stderr: one line per node\n"
            "(rank that copied, bytes, seconds, GB/s) and a total.\n"
            "\n"
            "options:\n"
            "  --to LOCAL_DIR   where to stage (default: $SLURM_TMPDIR, else $TMPDIR, else /tmp)\n"
            "  --split LIST     splits to stage, comma-separated (default: all)\n"
            "  --mode MODE      copy: every node reads DATASET_DIR (default);\n"
            "                   broadcast: the first node reads it once and sends the bytes\n"
            "                   to the other nodes over MPI\n"
            "  --no-fallback    fail (exit 1) instead of falling back to DATASET_DIR\n"
            "  --reserve-gb X   free space to leave on the local disk, GB (default 1)\n"
            "  --verify         hash every existing local shard (default: trust the stamp of\n"
            "                   an earlier run for files whose inode, size, mtime and ctime\n"
            "                   are unchanged)\n"
            "  --chunk-mb N     copy/broadcast chunk, MiB (default 8)\n"
            "  -q, --quiet      only the folder on stdout, warnings and errors\n"
            "  -h, --help       this text\n"
            "\n"
            "Exit status: 0 staged (or fell back), 1 failed, 2 bad usage.\n");
}

static int bad_usage(const char *fmt, const char *arg)
{
    fprintf(stderr, "kfac stage: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, " (see kfac stage --help)\n");
    return 2;
}

/* "--name VALUE" or "--name=VALUE"; NULL when `a` is another option. */
static const char *option_value(const char *a, const char *name, int *i, int argc, char **argv,
                                int *missing)
{
    size_t n = strlen(name);
    if (strncmp(a, name, n) != 0) return NULL;
    if (a[n] == '=') return a + n + 1;
    if (a[n] != '\0') return NULL;
    if (*i + 1 >= argc) {
        *missing = 1;
        return NULL;
    }
    return argv[++*i];
}

/* On a terminal only: one line redrawn at most four times a second. */
static void on_progress(const kfac_stage_progress *p, void *user)
{
    double *last = user;
    if (p->seconds - *last < 0.25 && p->bytes_done < p->bytes_total) return;
    *last = p->seconds;
    char done[32], total[32];
    fprintf(stderr, "\r\033[Kstaging: shard %d/%d  %s of %s  %.2f GB/s  %s",
            p->shards_done + (p->bytes_done < p->bytes_total), p->shards_total,
            kfac_stage_format_bytes(p->bytes_done, done),
            kfac_stage_format_bytes(p->bytes_total, total),
            p->seconds > 0 ? (double)p->bytes_done / p->seconds / 1e9 : 0.0,
            p->file ? p->file : "");
    fflush(stderr);
}

static void print_node(const char *who, const kfac_stage_report *r, int quiet)
{
    char a[32], b[32], c[32];
    if (r->fell_back) {
        fprintf(stderr,
                "%s: WARNING: node %d (%s): reading the shared copy %s, not a local "
                "one: %s\n",
                who, r->node, r->host, r->data_dir, r->reason);
        return;
    }
    if (quiet) return;
    if (r->shards_copied == 0) {
        fprintf(stderr,
                "%s: node %d (%s): rank %d kept all %d shards (%s, %s hashed), nothing "
                "to copy, %.2f s -> %s\n",
                who, r->node, r->host, r->stager_rank, r->shards_skipped,
                kfac_stage_format_bytes(r->bytes_skipped, b),
                kfac_stage_format_bytes(r->bytes_verified, c), r->seconds, r->data_dir);
        return;
    }
    fprintf(stderr,
            "%s: node %d (%s): rank %d copied %d shards (%s%s) in %.2f s, %.2f GB/s; "
            "kept %d (%s, %s hashed) -> %s\n",
            who, r->node, r->host, r->stager_rank, r->shards_copied,
            kfac_stage_format_bytes(r->bytes_copied, a), r->shards_resumed ? ", resumed" : "",
            r->seconds, r->gbps, r->shards_skipped, kfac_stage_format_bytes(r->bytes_skipped, b),
            kfac_stage_format_bytes(r->bytes_verified, c), r->data_dir);
}

static void print_total(const char *who, const kfac_stage_report *all, int nodes, const char *src)
{
    uint64_t copied = 0, kept = 0, read = 0;
    double seconds = 0;
    int fell = 0;
    for (int i = 0; i < nodes; i++) {
        copied += all[i].bytes_copied;
        kept += all[i].bytes_skipped;
        read += all[i].bytes_from_src;
        fell += all[i].fell_back;
        if (all[i].seconds > seconds) seconds = all[i].seconds;
    }
    char a[32], b[32], c[32];
    fprintf(stderr,
            "%s: total: %d node%s, %s copied, %s kept, %s read from %s, %.2f s, "
            "%.2f GB/s%s\n",
            who, nodes, nodes == 1 ? "" : "s", kfac_stage_format_bytes(copied, a),
            kfac_stage_format_bytes(kept, b), kfac_stage_format_bytes(read, c), src, seconds,
            seconds > 0 ? (double)copied / seconds / 1e9 : 0.0,
            fell ? ", some nodes fell back" : "");
}

typedef struct args {
    kfac_stage_options opt;
    const char *splits[MAX_SPLITS + 1];
    char split_buf[256];
    int quiet;
} args;

static int parse_splits(args *a, const char *list)
{
    if (strlen(list) >= sizeof a->split_buf) return bad_usage("--split '%s' is too long", list);
    snprintf(a->split_buf, sizeof a->split_buf, "%s", list);
    int n = 0;
    for (char *s = a->split_buf, *next; s; s = next) {
        next = strchr(s, ',');
        if (next) *next++ = '\0';
        if (!*s) return bad_usage("--split '%s' has an empty name", list);
        if (n == MAX_SPLITS) return bad_usage("--split '%s' names too many splits", list);
        a->splits[n++] = s;
    }
    a->splits[n] = NULL;
    a->opt.splits = a->splits;
    return 0;
}

/* Returns -1 to go on, else the exit status. */
static int parse(args *a, int argc, char **argv)
{
    kfac_stage_options_init(&a->opt);
    for (int i = 1; i < argc; i++) {
        const char *s = argv[i], *v;
        int missing = 0, rc;
        if (!strcmp(s, "-h") || !strcmp(s, "--help")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(s, "-q") || !strcmp(s, "--quiet")) {
            a->quiet = 1;
        } else if (!strcmp(s, "--no-fallback")) {
            a->opt.fallback = 0;
        } else if (!strcmp(s, "--verify")) {
            a->opt.verify_existing = 1;
        } else if ((v = option_value(s, "--to", &i, argc, argv, &missing))) {
            if (!*v) return bad_usage("--to needs a folder%s", "");
            a->opt.local_dir = v;
        } else if ((v = option_value(s, "--split", &i, argc, argv, &missing))) {
            if ((rc = parse_splits(a, v))) return rc;
        } else if ((v = option_value(s, "--mode", &i, argc, argv, &missing))) {
            if (kfac_stage_mode_parse(v, &a->opt.mode) != KFAC_OK)
                return bad_usage("--mode '%s': expected copy or broadcast", v);
        } else if ((v = option_value(s, "--reserve-gb", &i, argc, argv, &missing))) {
            char *end;
            double gb = strtod(v, &end);
            if (end == v || *end || !isfinite(gb) || gb < 0 || gb > 1e6)
                return bad_usage("--reserve-gb '%s': expected a number of GB in [0, 1e6]", v);
            a->opt.reserve_bytes = (uint64_t)(gb * 1e9);
        } else if ((v = option_value(s, "--chunk-mb", &i, argc, argv, &missing))) {
            char *end;
            long mb = strtol(v, &end, 10);
            if (end == v || *end || mb < 1 || mb > 1024)
                return bad_usage("--chunk-mb '%s': expected an integer in [1, 1024]", v);
            a->opt.chunk_bytes = (size_t)mb << 20;
        } else if (missing) {
            return bad_usage("%s needs a value", s);
        } else if (s[0] == '-') {
            return bad_usage("unknown option '%s'", s);
        } else if (a->opt.src_dir) {
            fprintf(stderr, "kfac stage: one dataset folder only ('%s' and '%s')\n",
                    a->opt.src_dir, s);
            return 2;
        } else {
            a->opt.src_dir = s;
        }
    }
    if (!a->opt.src_dir) return bad_usage("no DATASET_DIR given%s", "");
    return -1;
}

/* The folder every node can read: the common local path, else the source. */
static const char *common_dir(const kfac_stage_report *all, int nodes, const char *fallback)
{
    for (int i = 0; i < nodes; i++)
        if (all[i].fell_back || strcmp(all[i].data_dir, all[0].data_dir) != 0) return fallback;
    return all[0].data_dir;
}

int kfac_stage_and_report(kfac_stage_options *opt, kfac_topo *topo, const char *who, int quiet,
                          char *data_dir, size_t cap, char *shared_dir, size_t shared_cap)
{
    const kfac_rank_info *me = kfac_topo_self(topo);
    double last = -1;
    if (me->rank == 0 && !quiet && isatty(STDERR_FILENO)) {
        opt->progress = on_progress;
        opt->progress_user = &last;
    }
    kfac_stage_report mine;
    kfac_status st = kfac_stage_run(opt, topo, &mine);
    if (opt->progress && last >= 0) fprintf(stderr, "\r\033[K");
    if (st != KFAC_OK) {
        /* every rank has the same message (it names the node): say it once */
        if (me->rank == 0) fprintf(stderr, "%s: %s\n", who, kfac_last_error());
        if (getenv("KFAC_DEBUG")) fprintf(stderr, "  (raised at %s)\n", kfac_last_error_where());
        return 1;
    }
    kfac_stage_report *all = calloc((size_t)me->num_nodes, sizeof *all);
    if (!all || kfac_stage_gather(topo, &mine, all) != KFAC_OK) {
        if (me->rank == 0)
            fprintf(stderr, "%s: %s\n", who, all ? kfac_last_error() : "out of memory");
        free(all);
        return 1;
    }
    /* the source as the library resolved it (absolute) */
    const char *src = opt->src_dir;
    for (int i = 0; i < me->num_nodes; i++)
        if (all[i].fell_back) src = all[i].data_dir;
    if (me->rank == 0) {
        for (int i = 0; i < me->num_nodes; i++) print_node(who, &all[i], quiet);
        if (!quiet) print_total(who, all, me->num_nodes, src);
        fflush(stderr);
    }
    int fits = snprintf(data_dir, cap, "%s", mine.data_dir) < (int)cap;
    if (shared_dir) {
        const char *common = common_dir(all, me->num_nodes, src);
        fits &= snprintf(shared_dir, shared_cap, "%s", common) < (int)shared_cap;
    }
    free(all);
    if (!fits) {
        fprintf(stderr, "%s: rank %d: the staged folder %s is too long a path\n", who, me->rank,
                mine.data_dir);
        return 1;
    }
    return 0;
}

int kfac_cmd_stage(int argc, char **argv)
{
    static args a;
    int rc = parse(&a, argc, argv);
    if (rc >= 0) return rc;
    kfac_topo *topo;
    if (kfac_topo_init(&topo, 0) != KFAC_OK) {
        fprintf(stderr, "kfac stage: %s\n", kfac_last_error());
        return 1;
    }
    char mine[KFAC_STAGE_PATH], shared[KFAC_STAGE_PATH];
    rc = kfac_stage_and_report(&a.opt, topo, "kfac stage", a.quiet, mine, sizeof mine, shared,
                               sizeof shared);
    if (rc == 0 && kfac_topo_self(topo)->rank == 0) {
        printf("%s\n", shared);
        fflush(stdout);
    }
    kfac_topo_free(topo);
    return rc;
}
