/* stage.c - kfac_stage_run: who stages (local rank 0 of each node), copy
 * mode, and the agreement that gives every rank its node's report and
 * every rank of the job the first failure, so no rank is left waiting in a
 * collective.  The folder logic is in stage_local.c, the byte stream in
 * stage_io.c, broadcast mode in stage_bcast.c. */
#define _GNU_SOURCE /* realpath, posix_fadvise */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/clock.h"
#include "data/stage_internal.h"

enum {
    DEFAULT_CHUNK = 8 << 20,
    MIN_CHUNK = 4096,
    MAX_CHUNK = 1 << 30,
    MAX_MANIFEST = 256 << 20 /* bytes: far above any real manifest */
};

/* ---- small public helpers ---- */

void kfac_stage_options_init(kfac_stage_options *opt)
{
    memset(opt, 0, sizeof *opt);
    opt->mode = KFAC_STAGE_MODE_COPY;
    opt->fallback = 1;
    opt->reserve_bytes = 1000000000; /* 1 GB */
    opt->chunk_bytes = DEFAULT_CHUNK;
}

const char *kfac_stage_mode_name(kfac_stage_mode m)
{
    return m == KFAC_STAGE_MODE_BROADCAST ? "broadcast" : m == KFAC_STAGE_MODE_COPY ? "copy" : "?";
}

kfac_status kfac_stage_mode_parse(const char *name, kfac_stage_mode *out)
{
    if (name && strcmp(name, "copy") == 0) *out = KFAC_STAGE_MODE_COPY;
    else if (name && strcmp(name, "broadcast") == 0) *out = KFAC_STAGE_MODE_BROADCAST;
    else
        return KFAC_ERR(KFAC_EINVAL, "stage: unknown mode '%s' (expected copy or broadcast)",
                        name ? name : "(null)");
    return KFAC_OK;
}

kfac_status kfac_stage_dir_name(const char *src_dir, const void *manifest_bytes, size_t n,
                                char *out, size_t cap)
{
    size_t len = strlen(src_dir);
    while (len > 1 && src_dir[len - 1] == '/') len--;
    size_t start = len;
    while (start > 0 && src_dir[start - 1] != '/') start--;
    const char *base = src_dir + start;
    size_t blen = len - start;
    if (blen == 0 || (blen == 1 && base[0] == '.') || (blen == 2 && !strncmp(base, "..", 2)))
        base = "dataset", blen = 7; /* "/", ".", "..": no useful name */
    uint64_t h = XXH64(manifest_bytes, n, 0);
    int w = snprintf(out, cap, "%.*s-%012" PRIx64, (int)blen, base, h >> 16);
    if (w < 0 || (size_t)w >= cap)
        return KFAC_ERR(KFAC_EINVAL, "stage: folder name for %s does not fit %zu bytes", src_dir,
                        cap);
    return KFAC_OK;
}

void kfac__stage_progress(stage_ctx *c, uint64_t bytes)
{
    c->prog.bytes_done += bytes;
    c->prog.seconds = kfac__now_seconds() - c->t0;
    if (c->opt->progress) c->opt->progress(&c->prog, c->opt->progress_user);
}

kfac_status kfac__stage_local_failed(stage_ctx *c, kfac_status st)
{
    char msg[STAGE_MSG];
    snprintf(msg, sizeof msg, "%s", kfac_last_error());
    if (!c->opt->fallback)
        return KFAC_ERR(st, "%s (no fallback to the shared copy was allowed)", msg);
    c->rep->fell_back = 1;
    snprintf(c->rep->reason, sizeof c->rep->reason, "%.*s", (int)sizeof c->rep->reason - 1, msg);
    snprintf(c->rep->data_dir, sizeof c->rep->data_dir, "%s", c->src);
    kfac_clear_error();
    return KFAC_OK;
}

/* ---- setting up one stager ---- */

static kfac_status check_options(const kfac_stage_options *o)
{
    if (!o || !o->src_dir || !o->src_dir[0])
        return KFAC_ERR(KFAC_EINVAL, "stage: no dataset folder given");
    if (o->mode != KFAC_STAGE_MODE_COPY && o->mode != KFAC_STAGE_MODE_BROADCAST)
        return KFAC_ERR(KFAC_EINVAL, "stage: unknown mode %d", (int)o->mode);
    if (o->chunk_bytes && (o->chunk_bytes < MIN_CHUNK || o->chunk_bytes > MAX_CHUNK))
        return KFAC_ERR(KFAC_EINVAL, "stage: chunk of %zu bytes outside [%d, %d]", o->chunk_bytes,
                        MIN_CHUNK, MAX_CHUNK);
    if (o->local_dir && !o->local_dir[0])
        return KFAC_ERR(KFAC_EINVAL, "stage: empty local folder name");
    for (const char *const *s = o->splits; s && *s; s++)
        if (!**s) return KFAC_ERR(KFAC_EINVAL, "stage: empty split name");
    return KFAC_OK;
}

static kfac_status read_manifest_bytes(const char *src, char **out, size_t *len)
{
    char path[KFAC_STAGE_PATH];
    KFAC_TRY(kfac__stage_path(path, src, "manifest.yaml", NULL));
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return KFAC_ERR(KFAC_EIO, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || st.st_size > MAX_MANIFEST) {
        close(fd);
        return KFAC_ERR(KFAC_EFORMAT, "%s: not a manifest (too large or unreadable)", path);
    }
    size_t cap = (size_t)st.st_size + 1, n = 0;
    char *buf = malloc(cap);
    if (!buf) {
        close(fd);
        return KFAC_ERR(KFAC_ENOMEM, "%s: cannot allocate %zu bytes", path, cap);
    }
    ssize_t r = 0;
    while (n < cap && ((r = read(fd, buf + n, cap - n)) > 0 || (r < 0 && errno == EINTR)))
        if (r > 0) n += (size_t)r;
    int err = errno;
    close(fd);
    if (r < 0 || n == cap) { /* read error, or it grew while we read */
        free(buf);
        return KFAC_ERR(KFAC_EIO, "%s: cannot read: %s", path,
                        r < 0 ? strerror(err) : "changed while being read");
    }
    *out = buf;
    *len = n;
    return KFAC_OK;
}

/* The manifest's bytes (hashed for the folder name) and its parse must be
 * of one version of the file: read, parse, read again, compare. */
static kfac_status load_manifest(stage_ctx *c)
{
    KFAC_TRY(read_manifest_bytes(c->src, &c->manifest_bytes, &c->manifest_len));
    c->manifest_hash = XXH64(c->manifest_bytes, c->manifest_len, 0);
    KFAC_TRY(kfac_manifest_read(c->src, &c->m));
    char *again;
    size_t n;
    KFAC_TRY(read_manifest_bytes(c->src, &again, &n));
    int same = n == c->manifest_len && XXH64(again, n, 0) == c->manifest_hash;
    free(again);
    if (!same)
        return KFAC_ERR(KFAC_EIO, "%s/manifest.yaml: changed while staging started; retry",
                        c->src);
    return KFAC_OK;
}

static int reserved_name(const char *f)
{
    size_t n = strlen(f);
    return f[0] == '.' || strcmp(f, "manifest.yaml") == 0 || strcmp(f, "manifest.yaml.tmp") == 0 ||
           (n >= 5 && strcmp(f + n - 5, ".part") == 0);
}

static kfac_status choose_shards(stage_ctx *c)
{
    const kfac_manifest *m = c->m;
    if (!c->opt->splits) c->chosen[0] = c->chosen[1] = 1;
    for (const char *const *s = c->opt->splits; s && *s; s++) {
        int found = -1;
        for (int i = 0; i < m->num_splits; i++)
            if (strcmp(m->splits[i].name, *s) == 0) found = i;
        if (found < 0)
            return KFAC_ERR(KFAC_EINVAL, "%s/manifest.yaml: no split '%s' (it has%s%s%s%s)",
                            c->src, *s, m->num_splits > 0 ? " " : " none",
                            m->num_splits > 0 ? m->splits[0].name : "",
                            m->num_splits > 1 ? ", " : "",
                            m->num_splits > 1 ? m->splits[1].name : "");
        c->chosen[found] = 1;
    }
    size_t total = 0;
    for (int i = 0; i < m->num_splits; i++)
        if (c->chosen[i]) total += m->splits[i].num_shards;
    c->shards = calloc(total ? total : 1, sizeof *c->shards);
    if (!c->shards) return KFAC_ERR(KFAC_ENOMEM, "stage: out of memory for %zu shards", total);
    for (int i = 0; i < m->num_splits; i++) {
        if (!c->chosen[i]) continue;
        for (size_t j = 0; j < m->splits[i].num_shards; j++) {
            const kfac_shard_entry *e = &m->splits[i].shards[j];
            if (reserved_name(e->file))
                return KFAC_ERR(KFAC_EFORMAT,
                                "%s/manifest.yaml: shard file '%s' clashes with the names staging "
                                "uses (manifest.yaml, .*, *.part)",
                                c->src, e->file);
            c->shards[c->num_shards++].e = e;
            c->rep->bytes_total += e->bytes;
        }
    }
    c->rep->shards_total = c->num_shards;
    return KFAC_OK;
}

static kfac_status local_root(const kfac_stage_options *o, char out[KFAC_STAGE_PATH])
{
    const char *d = o->local_dir;
    if (!d) d = getenv("SLURM_TMPDIR");
    if (!d || !*d) d = getenv("TMPDIR");
    if (!d || !*d) d = "/tmp";
    char cwd[KFAC_STAGE_PATH] = "";
    if (d[0] != '/' && !getcwd(cwd, sizeof cwd))
        return KFAC_ERR(KFAC_EIO, "stage: cannot resolve %s: getcwd: %s", d, strerror(errno));
    int n = snprintf(out, KFAC_STAGE_PATH, "%s%s%s", cwd, cwd[0] ? "/" : "", d);
    if (n < 0 || n >= KFAC_STAGE_PATH) return KFAC_ERR(KFAC_EINVAL, "%s: path too long", d);
    while (n > 1 && out[n - 1] == '/') out[--n] = '\0';
    return KFAC_OK;
}

static kfac_status setup(stage_ctx *c)
{
    const char *src = c->opt->src_dir;
    struct stat st;
    if (stat(src, &st) != 0) return KFAC_ERR(KFAC_EIO, "%s: %s", src, strerror(errno));
    if (!S_ISDIR(st.st_mode)) return KFAC_ERR(KFAC_EIO, "%s: not a folder", src);
    char real[PATH_MAX];
    if (!realpath(src, real)) return KFAC_ERR(KFAC_EIO, "%s: %s", src, strerror(errno));
    if (strlen(real) >= sizeof c->src) return KFAC_ERR(KFAC_EINVAL, "%s: path too long", src);
    snprintf(c->src, sizeof c->src, "%s", real);
    KFAC_TRY(load_manifest(c));
    KFAC_TRY(choose_shards(c));
    KFAC_TRY(local_root(c->opt, c->local));
    char name[512];
    KFAC_TRY(kfac_stage_dir_name(c->src, c->manifest_bytes, c->manifest_len, name, sizeof name));
    KFAC_TRY(kfac__stage_path(c->dir, c->local, name, NULL));
    c->chunk = c->opt->chunk_bytes ? c->opt->chunk_bytes : DEFAULT_CHUNK;
    for (int i = 0; i < 2; i++)
        if (!(c->buf[i] = malloc((c->chunk + 3) & ~(size_t)3)))
            return KFAC_ERR(KFAC_ENOMEM, "stage: cannot allocate a %zu-byte buffer", c->chunk);
    if (!(c->hash = XXH64_createState()))
        return KFAC_ERR(KFAC_ENOMEM, "stage: cannot allocate a hash state");
    return KFAC_OK;
}

static void ctx_free(stage_ctx *c)
{
    kfac__stage_close_dir(c);
    free(c->manifest_bytes);
    kfac_manifest_free(c->m);
    free(c->shards);
    free(c->buf[0]);
    free(c->buf[1]);
    if (c->hash) XXH64_freeState(c->hash);
}

/* ---- copy mode ---- */

typedef struct shard_files {
    char src[KFAC_STAGE_PATH], dst[KFAC_STAGE_PATH], part[KFAC_STAGE_PATH];
    int sfd, pfd;
} shard_files;

static kfac_status open_source(stage_ctx *c, const kfac_shard_entry *e, shard_files *f)
{
    f->sfd = open(f->src, O_RDONLY | O_CLOEXEC);
    if (f->sfd < 0) return KFAC_ERR(KFAC_EIO, "%s: cannot open: %s", f->src, strerror(errno));
    struct stat st;
    if (fstat(f->sfd, &st) != 0)
        return KFAC_ERR(KFAC_EIO, "%s: cannot stat: %s", f->src, strerror(errno));
    if ((uint64_t)st.st_size != e->bytes)
        return KFAC_ERR(KFAC_EFORMAT, "%s: size %" PRIu64 ", but %s/manifest.yaml says %" PRIu64,
                        f->src, (uint64_t)st.st_size, c->src, e->bytes);
    posix_fadvise(f->sfd, 0, 0, POSIX_FADV_SEQUENTIAL);
    return KFAC_OK;
}

/* One attempt from `start` (bytes of FILE.part kept); *hash is the whole
 * file's.  Sets *local when a failure is on the local side. */
static kfac_status copy_attempt(stage_ctx *c, const kfac_shard_entry *e, shard_files *f,
                                uint64_t start, uint64_t *hash, int *local)
{
    stage_io io;
    XXH64_reset(c->hash, 0);
    if (start > 0) { /* the kept prefix counts: hash it as it is on disk */
        kfac__stage_hash_range(c, f->pfd, 0, start, &io);
        if (io.read_errno) start = 0, XXH64_reset(c->hash, 0);
    }
    /* No truncation: FILE.part is never longer than the shard (inventory
     * removes longer ones) and every byte up to its end is rewritten.
     * (Truncating to 0 would also make ext4 flush the file at close.) */
    KFAC_TRY(kfac__stage_stream(c, f->sfd, f->pfd, NULL, start, e->bytes, 1, &io));
    c->wrote |= io.bytes_written > 0;
    c->rep->bytes_copied += io.bytes_written;
    c->rep->bytes_from_src += io.bytes_read;
    if (io.write_errno) {
        *local = 1;
        return KFAC_ERR(KFAC_EIO, "%s: cannot write: %s", f->part, strerror(io.write_errno));
    }
    if (io.read_errno == -1)
        return KFAC_ERR(KFAC_EFORMAT, "%s: ended early while copying (expected %" PRIu64 " bytes)",
                        f->src, e->bytes);
    if (io.read_errno)
        return KFAC_ERR(KFAC_EIO, "%s: cannot read: %s", f->src, strerror(io.read_errno));
    *hash = XXH64_digest(c->hash);
    return KFAC_OK;
}

static kfac_status copy_files(stage_ctx *c, stage_shard *sh, shard_files *f, int *local)
{
    const kfac_shard_entry *e = sh->e;
    KFAC_TRY(open_source(c, e, f));
    f->pfd = open(f->part, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (f->pfd < 0) {
        *local = 1;
        return KFAC_ERR(KFAC_EIO, "%s: cannot create: %s", f->part, strerror(errno));
    }
    uint64_t start = sh->part_len, h = 0;
    for (int attempt = 0; attempt < 2; attempt++) {
        KFAC_TRY(copy_attempt(c, e, f, start, &h, local));
        if (h == e->xxh64) {
            if (rename(f->part, f->dst) != 0) {
                *local = 1;
                return KFAC_ERR(KFAC_EIO, "%s: cannot rename to %s: %s", f->part, f->dst,
                                strerror(errno));
            }
            c->rep->shards_copied++;
            c->rep->shards_resumed += start > 0;
            return KFAC_OK;
        }
        c->prog.bytes_total += e->bytes; /* copied again from scratch */
        start = 0;
    }
    return KFAC_ERR(KFAC_EFORMAT,
                    "%s: checksum mismatch (expected %016" PRIx64 ", got %016" PRIx64
                    ", copied twice): the source shard does not match %s/manifest.yaml",
                    f->src, e->xxh64, h, c->src);
}

static kfac_status copy_shard(stage_ctx *c, stage_shard *sh, int *local)
{
    shard_files f;
    f.sfd = f.pfd = -1;
    *local = 0;
    KFAC_TRY(kfac__stage_path(f.src, c->src, sh->e->file, NULL));
    KFAC_TRY(kfac__stage_path(f.dst, c->dir, sh->e->file, NULL));
    KFAC_TRY(kfac__stage_path(f.part, c->dir, sh->e->file, ".part"));
    c->prog.file = sh->e->file;
    kfac_status st = copy_files(c, sh, &f, local);
    if (f.sfd >= 0) close(f.sfd);
    if (f.pfd >= 0) close(f.pfd);
    /* A part that will not be resumed (full disk, bad source) only takes space. */
    if (st != KFAC_OK) unlink(f.part);
    c->prog.shards_done++;
    return st;
}

static kfac_status copy_mode(stage_ctx *c)
{
    kfac_status st = kfac__stage_open_dir(c, 1);
    if (st == KFAC_OK) st = kfac__stage_inventory(c, 1);
    if (st == KFAC_OK) st = kfac__stage_check_space(c, kfac__stage_bytes_needed(c, 1));
    if (st != KFAC_OK) return kfac__stage_local_failed(c, st);
    c->prog.bytes_total = kfac__stage_bytes_needed(c, 1);
    for (int i = 0; i < c->num_shards; i++) c->prog.shards_total += !c->shards[i].valid;
    if (c->prog.shards_total > 0) { /* the folder is incomplete until the end */
        char path[KFAC_STAGE_PATH];
        KFAC_TRY(kfac__stage_path(path, c->dir, "manifest.yaml", NULL));
        if (unlink(path) != 0 && errno != ENOENT)
            return kfac__stage_local_failed(
                c, KFAC_ERR(KFAC_EIO, "%s: cannot remove: %s", path, strerror(errno)));
    }
    for (int i = 0; i < c->num_shards; i++) {
        if (c->shards[i].valid) continue;
        int local = 0;
        st = copy_shard(c, &c->shards[i], &local);
        if (st != KFAC_OK) return local ? kfac__stage_local_failed(c, st) : st;
    }
    st = kfac__stage_finish_dir(c);
    return st == KFAC_OK ? st : kfac__stage_local_failed(c, st);
}

/* ---- one node's outcome, and the agreement between ranks ---- */

/* What a stager sends to its node's ranks. */
typedef struct node_result {
    int32_t status;   /* KFAC_OK or the failure */
    int32_t severity; /* 0 ok, 1 stopped because another node failed, 2 failed here */
    char msg[STAGE_MSG];
    kfac_stage_report report;
} node_result;
_Static_assert(sizeof(node_result) % 4 == 0, "node_result travels as float32 words");
_Static_assert(sizeof(kfac_stage_report) % 4 == 0, "reports travel as float32 words");

static void run_stager(const kfac_stage_options *opt, kfac_topo *topo, node_result *res)
{
    stage_ctx c;
    memset(&c, 0, sizeof c);
    c.opt = opt;
    c.rep = &res->report;
    c.lock_fd = -1;
    c.t0 = kfac__now_seconds();
    const kfac_rank_info *me = topo ? kfac_topo_self(topo) : NULL;
    res->report.node = me ? me->node : 0;
    res->report.stager_rank = me ? me->rank : 0;
    snprintf(res->report.host, sizeof res->report.host, "%s", me ? me->host : "");
    kfac_status st = setup(&c);
    int severity = st == KFAC_OK ? 0 : 2;
    if (opt->mode == KFAC_STAGE_MODE_BROADCAST && me && me->num_nodes > 1) {
        st = kfac__stage_bcast(&c, st, kfac_topo_inter(topo), &severity);
    } else if (st == KFAC_OK) {
        st = copy_mode(&c);
        severity = st == KFAC_OK ? 0 : 2;
    }
    if (st == KFAC_OK && !res->report.fell_back)
        snprintf(res->report.data_dir, sizeof res->report.data_dir, "%s", c.dir);
    kfac__stage_close_dir(&c);
    res->report.seconds = kfac__now_seconds() - c.t0;
    if (res->report.bytes_copied > 0 && res->report.seconds > 0)
        res->report.gbps = (double)res->report.bytes_copied / res->report.seconds / 1e9;
    res->status = st;
    res->severity = st == KFAC_OK ? 0 : severity ? severity : 2;
    if (st != KFAC_OK) snprintf(res->msg, sizeof res->msg, "%s", kfac_last_error());
    ctx_free(&c);
}

/* Rank within the node's communicator of the node's local rank 0. */
static int stager_in_node(kfac_topo *topo)
{
    const kfac_rank_info *me = kfac_topo_self(topo);
    int pos = 0;
    for (int r = 0; r < me->size; r++) {
        const kfac_rank_info *o = kfac_topo_rank(topo, r);
        if (o->node != me->node) continue;
        if (o->local_rank == 0) break;
        pos++;
    }
    return pos;
}

/* Every rank learns the first failure (a node's own failures before
 * "stopped because another failed"); all return the same message. */
static kfac_status agree_world(kfac_topo *topo, node_result *res)
{
    kfac_comm *w = kfac_topo_world(topo);
    int size = kfac_comm_size(w), rank = kfac_comm_rank(w);
    float *sev = calloc((size_t)size, sizeof *sev);
    if (!sev) return KFAC_ERR(KFAC_ENOMEM, "stage: out of memory for %d ranks", size);
    sev[rank] = (float)res->severity;
    kfac_status st = kfac_comm_allreduce(w, sev, (size_t)size, KFAC_F32, KFAC_STAGE_OTHER);
    int first = -1;
    for (int want = 2; want >= 1 && st == KFAC_OK && first < 0; want--)
        for (int r = 0; r < size && first < 0; r++)
            if (sev[r] > (float)want - 0.5f) first = r;
    free(sev);
    if (st != KFAC_OK || first < 0) return st;
    struct {
        int32_t status;
        char msg[STAGE_MSG];
    } wire;
    memset(&wire, 0, sizeof wire);
    if (rank == first) {
        wire.status = res->status;
        snprintf(wire.msg, sizeof wire.msg, "node %d (%.64s): %.900s", res->report.node,
                 res->report.host, res->msg);
    }
    KFAC_TRY(kfac_comm_bcast(w, &wire, sizeof wire / 4, KFAC_F32, first, KFAC_STAGE_OTHER));
    wire.msg[sizeof wire.msg - 1] = '\0';
    return KFAC_ERR((kfac_status)wire.status, "%s", wire.msg);
}

kfac_status kfac_stage_run(const kfac_stage_options *opt, kfac_topo *topo,
                           kfac_stage_report *report)
{
    memset(report, 0, sizeof *report);
    KFAC_TRY(check_options(opt)); /* same arguments everywhere: same answer */
    const kfac_rank_info *me = topo ? kfac_topo_self(topo) : NULL;
    node_result *res = calloc(1, sizeof *res);
    if (!res) return KFAC_ERR(KFAC_ENOMEM, "stage: out of memory");
    if (!me || me->local_rank == 0) run_stager(opt, topo, res);
    kfac_status st = KFAC_OK;
    if (me && me->size > 1) {
        st = kfac_comm_bcast(kfac_topo_intra(topo), res, sizeof *res / 4, KFAC_F32,
                             stager_in_node(topo), KFAC_STAGE_OTHER);
        if (st == KFAC_OK) st = agree_world(topo, res);
    } else if (res->status != KFAC_OK) {
        st = KFAC_ERR((kfac_status)res->status, "%s", res->msg);
    }
    *report = res->report;
    free(res);
    return st;
}

kfac_status kfac_stage_gather(kfac_topo *topo, const kfac_stage_report *mine,
                              kfac_stage_report *all)
{
    const kfac_rank_info *me = topo ? kfac_topo_self(topo) : NULL;
    if (!me || me->size == 1) {
        all[0] = *mine;
        return KFAC_OK;
    }
    const size_t words = sizeof *mine / 4;
    int size = me->size, nodes = me->num_nodes, before = 0;
    size_t *counts = calloc((size_t)size, sizeof *counts);
    kfac_stage_report *blocks = calloc((size_t)nodes, sizeof *blocks);
    if (!counts || !blocks) {
        free(counts);
        free(blocks);
        return KFAC_ERR(KFAC_ENOMEM, "stage: out of memory for %d reports", nodes);
    }
    for (int r = 0; r < size; r++) {
        int stager = kfac_topo_rank(topo, r)->local_rank == 0;
        counts[r] = stager ? words : 0;
        before += stager && r < me->rank;
    }
    if (me->local_rank == 0) blocks[before] = *mine;
    kfac_status st =
        kfac_comm_allgatherv(kfac_topo_world(topo), blocks, counts, KFAC_F32, KFAC_STAGE_OTHER);
    for (int i = 0; i < nodes && st == KFAC_OK; i++) {
        int n = blocks[i].node;
        if (n < 0 || n >= nodes)
            st = KFAC_ERR(KFAC_ECOMM, "stage: report %d names node %d of %d", i, n, nodes);
        else all[n] = blocks[i];
    }
    free(counts);
    free(blocks);
    return st;
}
