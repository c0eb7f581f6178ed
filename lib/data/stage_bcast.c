/* stage_bcast.c - broadcast mode: the first node's stager reads each shard
 * from the shared file system once and broadcasts it, chunk by chunk, to
 * the stagers of the other nodes (one per node, the inter-node
 * communicator of local rank 0s), which write it locally.
 *
 * Every stager makes the same sequence of collectives whatever happens to
 * it, so nobody waits forever:
 *   1. bcast from the root: its status, shard count and manifest hash;
 *   2. each stager checks its folder; allreduce of [failed, have(shard)...]:
 *      a shard every node has (or does not want: fell back) is not sent;
 *   3. per shard sent: the chunks (kfac__stage_stream), then allreduce of
 *      [failed, retry]: a copy whose hash differs (or a source that reads
 *      wrong) is sent once more, to those that need it;
 *   4. each stager finishes its folder (stamp, manifest).
 * A failure anywhere stops every stager at the next allreduce; the world
 * agreement in stage.c then reports the first real failure everywhere.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "data/stage_internal.h"

typedef struct failure {
    kfac_status st; /* KFAC_OK: none yet */
    char msg[STAGE_MSG];
} failure;

/* Keeps the first failure of this stager (later errors overwrite
 * kfac_last_error, so the message is copied). */
static void fail(failure *f, kfac_status st)
{
    if (f->st != KFAC_OK || st == KFAC_OK) return;
    f->st = st;
    snprintf(f->msg, sizeof f->msg, "%s", kfac_last_error());
}

/* A local-side failure: fall back, or fail when fallback is off. */
static void local_failed(stage_ctx *c, failure *f, kfac_status st)
{
    fail(f, kfac__stage_local_failed(c, st));
}

static kfac_status finish(const failure *f, int *severity, int others_failed)
{
    if (f->st != KFAC_OK) {
        *severity = 2;
        return KFAC_ERR(f->st, "%s", f->msg);
    }
    if (others_failed) {
        *severity = 1;
        return KFAC_ERR(KFAC_ECOMM, "stage: stopped because another node failed");
    }
    *severity = 0;
    return KFAC_OK;
}

typedef struct header {
    int32_t status;
    int32_t num_shards;
    uint64_t manifest_hash;
} header;
_Static_assert(sizeof(header) % 4 == 0, "header travels as float32 words");

static kfac_status open_source(stage_ctx *c, const kfac_shard_entry *e, const char *path, int *fd)
{
    *fd = open(path, O_RDONLY | O_CLOEXEC);
    if (*fd < 0) return KFAC_ERR(KFAC_EIO, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    kfac_status s = KFAC_OK;
    if (fstat(*fd, &st) != 0) s = KFAC_ERR(KFAC_EIO, "%s: cannot stat: %s", path, strerror(errno));
    else if ((uint64_t)st.st_size != e->bytes)
        s = KFAC_ERR(KFAC_EFORMAT, "%s: size %" PRIu64 ", but %s/manifest.yaml says %" PRIu64,
                     path, (uint64_t)st.st_size, c->src, e->bytes);
    if (s != KFAC_OK) {
        close(*fd);
        *fd = -1;
    }
    return s;
}

typedef struct shard_paths {
    char src[KFAC_STAGE_PATH], dst[KFAC_STAGE_PATH], part[KFAC_STAGE_PATH];
} shard_paths;

/* After one attempt: keeps a good copy, drops a bad one.  Returns whether
 * this stager wants the shard sent again. */
static int settle_copy(stage_ctx *c, stage_shard *sh, const shard_paths *p, int pfd,
                       const stage_io *io, uint64_t hash, int attempt, int *writer, failure *f)
{
    close(pfd);
    c->wrote |= io->bytes_written > 0;
    c->rep->bytes_copied += io->bytes_written;
    if (io->write_errno) {
        unlink(p->part);
        *writer = 0;
        local_failed(c, f, KFAC_ERR(KFAC_EIO, "%s: cannot write: %s", p->part,
                                    strerror(io->write_errno)));
        return 0;
    }
    if (hash == sh->e->xxh64) {
        *writer = 0;
        if (rename(p->part, p->dst) != 0) {
            local_failed(c, f, KFAC_ERR(KFAC_EIO, "%s: cannot rename to %s: %s", p->part, p->dst,
                                        strerror(errno)));
            return 0;
        }
        sh->valid = 1;
        c->rep->shards_copied++;
        return 0;
    }
    if (attempt == 0) return 1;
    unlink(p->part);
    *writer = 0;
    local_failed(c, f, KFAC_ERR(KFAC_EFORMAT,
                                "%s: received bytes hash to %016" PRIx64 ", not %016" PRIx64
                                " as in the manifest, twice",
                                p->part, hash, sh->e->xxh64));
    return 0;
}

/* Sends shard i (every stager calls it for the same shards).  Returns 0 to
 * go on, 1 when a stager failed (stop), -1 when a collective failed. */
static int send_shard(stage_ctx *c, kfac_comm *inter, int root, stage_shard *sh, failure *f)
{
    const kfac_shard_entry *e = sh->e;
    shard_paths p;
    kfac_status st = kfac__stage_path(p.src, c->src, e->file, NULL);
    if (st == KFAC_OK) st = kfac__stage_path(p.dst, c->dir, e->file, NULL);
    if (st == KFAC_OK) st = kfac__stage_path(p.part, c->dir, e->file, ".part");
    fail(f, st);
    int writer = f->st == KFAC_OK && !c->rep->fell_back && !sh->valid;
    c->prog.file = e->file;
    for (int attempt = 0; attempt < 2; attempt++) {
        int sfd = -1, pfd = -1;
        if (root && f->st == KFAC_OK) fail(f, open_source(c, e, p.src, &sfd));
        if (writer) {
            /* no O_TRUNC: inventory removed old parts, and a resend rewrites
             * every byte (truncating makes ext4 flush at close) */
            pfd = open(p.part, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
            if (pfd < 0) {
                writer = 0;
                local_failed(c, f, KFAC_ERR(KFAC_EIO, "%s: cannot create: %s", p.part,
                                            strerror(errno)));
            }
        }
        XXH64_reset(c->hash, 0);
        stage_io io;
        st = kfac__stage_stream(c, sfd, pfd, inter, 0, e->bytes, 1, &io);
        if (sfd >= 0) close(sfd);
        if (st != KFAC_OK) {
            if (pfd >= 0) close(pfd), unlink(p.part);
            fail(f, st);
            return -1;
        }
        uint64_t hash = XXH64_digest(c->hash);
        int src_bad = 0, retry = 0;
        if (root && f->st == KFAC_OK) {
            c->rep->bytes_from_src += io.bytes_read;
            if (io.read_errno == -1)
                fail(f, KFAC_ERR(KFAC_EFORMAT, "%s: ended early while reading", p.src));
            else if (io.read_errno)
                fail(f, KFAC_ERR(KFAC_EIO, "%s: cannot read: %s", p.src, strerror(io.read_errno)));
            else src_bad = hash != e->xxh64;
        }
        /* first, so that the root's own copy is not blamed for its source */
        if (src_bad && attempt == 1)
            fail(f, KFAC_ERR(KFAC_EFORMAT,
                             "%s: checksum mismatch (expected %016" PRIx64 ", got %016" PRIx64
                             ", read twice): the source shard does not match %s/manifest.yaml",
                             p.src, e->xxh64, hash, c->src));
        if (pfd >= 0) retry = settle_copy(c, sh, &p, pfd, &io, hash, attempt, &writer, f);
        float flags[2] = {f->st != KFAC_OK ? 1.0f : 0.0f, attempt == 0 && (src_bad || retry)};
        st = kfac_comm_allreduce(inter, flags, 2, KFAC_F32, KFAC_STAGE_OTHER);
        if (st != KFAC_OK) {
            fail(f, st);
            return -1;
        }
        if (flags[0] > 0.5f) return 1;
        if (flags[1] < 0.5f) break;
        c->prog.bytes_total += e->bytes; /* sent again */
    }
    c->prog.shards_done++;
    return 0;
}

/* Step 2 on this stager: folder, lock (no waiting inside a collective),
 * what is valid, space.  Local problems fall back (or fail). */
static void prepare(stage_ctx *c, failure *f)
{
    kfac_status st = kfac__stage_open_dir(c, 0);
    if (st == KFAC_OK) st = kfac__stage_inventory(c, 0);
    if (st == KFAC_OK) st = kfac__stage_check_space(c, kfac__stage_bytes_needed(c, 0));
    if (st != KFAC_OK) local_failed(c, f, st);
}

kfac_status kfac__stage_bcast(stage_ctx *c, kfac_status setup_st, kfac_comm *inter,
                              int *severity)
{
    failure f = {KFAC_OK, ""};
    fail(&f, setup_st);
    const int root = kfac_comm_rank(inter) == 0, stagers = kfac_comm_size(inter);
    header h = {f.st, f.st == KFAC_OK ? c->num_shards : 0, c->manifest_hash};
    kfac_status st = kfac_comm_bcast(inter, &h, sizeof h / 4, KFAC_F32, 0, KFAC_STAGE_OTHER);
    if (st != KFAC_OK) fail(&f, st);
    if (st != KFAC_OK || h.status != KFAC_OK) return finish(&f, severity, 1);
    if (f.st == KFAC_OK && (h.manifest_hash != c->manifest_hash || h.num_shards != c->num_shards))
        fail(&f, KFAC_ERR(KFAC_EIO,
                          "%s/manifest.yaml: differs from the one the first node read "
                          "(changed while staging?)",
                          c->src));
    const int n = h.num_shards;
    float *have = calloc((size_t)n + 1, sizeof *have);
    if (!have) {
        fail(&f, KFAC_ERR(KFAC_ENOMEM, "stage: out of memory for %d shards", n));
        return finish(&f, severity, 0);
    }
    if (f.st == KFAC_OK) prepare(c, &f);
    have[0] = f.st != KFAC_OK;
    for (int i = 0; i < n; i++)
        have[1 + i] = f.st != KFAC_OK || c->rep->fell_back || c->shards[i].valid;
    st = kfac_comm_allreduce(inter, have, (size_t)n + 1, KFAC_F32, KFAC_STAGE_OTHER);
    if (st != KFAC_OK || have[0] > 0.5f) {
        fail(&f, st);
        free(have);
        return finish(&f, severity, 1);
    }
    for (int i = 0; i < n; i++) {
        if (have[1 + i] > (float)stagers - 0.5f) continue;
        c->prog.shards_total++;
        c->prog.bytes_total += c->shards[i].e->bytes;
    }
    int writes = 0;
    for (int i = 0; i < n; i++) writes |= !c->shards[i].valid;
    if (writes && !c->rep->fell_back) { /* the folder is incomplete until the end */
        char path[KFAC_STAGE_PATH];
        st = kfac__stage_path(path, c->dir, "manifest.yaml", NULL);
        if (st == KFAC_OK && unlink(path) != 0 && errno != ENOENT)
            st = KFAC_ERR(KFAC_EIO, "%s: cannot remove: %s", path, strerror(errno));
        if (st != KFAC_OK) local_failed(c, &f, st);
    }
    int stop = 0;
    for (int i = 0; i < n && !stop; i++)
        if (have[1 + i] < (float)stagers - 0.5f)
            stop = send_shard(c, inter, root, &c->shards[i], &f);
    free(have);
    if (stop) return finish(&f, severity, 1);
    if (f.st == KFAC_OK && !c->rep->fell_back) {
        st = kfac__stage_finish_dir(c);
        if (st != KFAC_OK) local_failed(c, &f, st);
    }
    return finish(&f, severity, 0);
}
