/* stage_local.c - the node-local side of staging: the folder and its lock,
 * what of it is already valid, free space, and the closing writes (stamp,
 * then manifest) that make a finished folder recognisable.
 *
 * The stamp (.kfac-stage.stamp) lets a rerun skip hashing shards nobody
 * touched: one line per shard verified by a finished run, with its size,
 * device, inode, mtime and ctime.  ctime cannot be set from user space and
 * changes on every write, rename or touch, so a matching line means the
 * file is the one we hashed.  A damaged or missing stamp only costs a hash
 * pass.
 */
#define _GNU_SOURCE /* syncfs */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "core/fsutil.h"
#include "data/shards_internal.h"
#include "data/stage_internal.h"

static const char LOCK_NAME[] = ".kfac-stage.lock";
static const char STAMP_NAME[] = ".kfac-stage.stamp";
static const char STAMP_MAGIC[] = "kfac-stage-stamp 1";
static const char MANIFEST_NAME[] = "manifest.yaml";

kfac_status kfac__stage_path(char *out, const char *dir, const char *name, const char *suffix)
{
    int n = snprintf(out, KFAC_STAGE_PATH, "%s/%s%s", dir, name, suffix ? suffix : "");
    if (n < 0 || n >= KFAC_STAGE_PATH)
        return KFAC_ERR(KFAC_EINVAL, "%s/%s: path too long", dir, name);
    return KFAC_OK;
}


kfac_status kfac__stage_open_dir(stage_ctx *c, int wait)
{
    char path[KFAC_STAGE_PATH];
    KFAC_TRY(kfac__make_dirs(c->dir));
    KFAC_TRY(kfac__stage_path(path, c->dir, LOCK_NAME, NULL));
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return KFAC_ERR(KFAC_EIO, "%s: cannot create lock file: %s", path, strerror(errno));
    int rc;
    while ((rc = flock(fd, LOCK_EX | (wait ? 0 : LOCK_NB))) != 0 && errno == EINTR) {
    }
    if (rc != 0) {
        int err = errno;
        close(fd);
        if (err == EWOULDBLOCK)
            return KFAC_ERR(KFAC_EIO,
                            "%s: another process is staging this folder (broadcast mode "
                            "cannot wait for it)",
                            c->dir);
        return KFAC_ERR(KFAC_EIO, "%s: cannot lock: %s", path, strerror(err));
    }
    c->lock_fd = fd;
    return KFAC_OK;
}

void kfac__stage_close_dir(stage_ctx *c)
{
    if (c->lock_fd >= 0) close(c->lock_fd); /* releases the flock */
    c->lock_fd = -1;
}

/* ---- the stamp ---- */

typedef struct stamp_rec {
    uint64_t hash, size, dev, ino;
    int64_t mt_s, mt_ns, ct_s, ct_ns;
    char file[KFAC_SHARD_FILE_MAX];
} stamp_rec;

typedef struct stamp {
    stamp_rec *recs;
    int n;
} stamp;

/* Best effort: any problem leaves an empty stamp (everything is hashed). */
static stamp load_stamp(const stage_ctx *c)
{
    stamp s = {NULL, 0};
    char path[KFAC_STAGE_PATH], line[KFAC_SHARD_FILE_MAX + 256];
    if (kfac__stage_path(path, c->dir, STAMP_NAME, NULL) != KFAC_OK) return s;
    FILE *f = fopen(path, "r");
    if (!f) return s;
    int cap = 0;
    if (!fgets(line, sizeof line, f) || strncmp(line, STAMP_MAGIC, strlen(STAMP_MAGIC)) != 0) {
        fclose(f);
        return s;
    }
    while (fgets(line, sizeof line, f)) {
        stamp_rec r;
        int off = -1;
        size_t len = strlen(line);
        if (len == 0 || line[len - 1] != '\n') break; /* truncated: stop trusting */
        line[len - 1] = '\0';
        if (sscanf(line,
                   "%16" SCNx64 " %" SCNu64 " %" SCNu64 " %" SCNu64 " %" SCNd64 ".%" SCNd64
                   " %" SCNd64 ".%" SCNd64 " %n",
                   &r.hash, &r.size, &r.dev, &r.ino, &r.mt_s, &r.mt_ns, &r.ct_s, &r.ct_ns,
                   &off) != 8 ||
            off < 0 || strlen(line + off) >= sizeof r.file)
            break;
        snprintf(r.file, sizeof r.file, "%s", line + off);
        if (s.n == cap) {
            int ncap = cap ? 2 * cap : 64;
            stamp_rec *p = realloc(s.recs, (size_t)ncap * sizeof *p);
            if (!p) break;
            s.recs = p;
            cap = ncap;
        }
        s.recs[s.n++] = r;
    }
    fclose(f);
    return s;
}

static void fill_rec(stamp_rec *r, const kfac_shard_entry *e, const struct stat *st)
{
    r->hash = e->xxh64;
    r->size = (uint64_t)st->st_size;
    r->dev = (uint64_t)st->st_dev;
    r->ino = (uint64_t)st->st_ino;
    r->mt_s = st->st_mtim.tv_sec;
    r->mt_ns = st->st_mtim.tv_nsec;
    r->ct_s = st->st_ctim.tv_sec;
    r->ct_ns = st->st_ctim.tv_nsec;
    snprintf(r->file, sizeof r->file, "%s", e->file);
}

/* The file as it is now is the one a finished run verified for entry e. */
static int stamp_vouches(const stamp *s, const kfac_shard_entry *e, const struct stat *st)
{
    stamp_rec now;
    fill_rec(&now, e, st);
    if (now.size != e->bytes) return 0;
    for (int i = 0; i < s->n; i++) {
        const stamp_rec *r = &s->recs[i];
        if (strcmp(r->file, e->file) != 0) continue;
        return r->hash == now.hash && r->size == now.size && r->dev == now.dev &&
               r->ino == now.ino && r->mt_s == now.mt_s && r->mt_ns == now.mt_ns &&
               r->ct_s == now.ct_s && r->ct_ns == now.ct_ns;
    }
    return 0;
}

/* ---- what is already there ---- */

static kfac_status remove_file(const char *path)
{
    if (unlink(path) != 0 && errno != ENOENT)
        return KFAC_ERR(KFAC_EIO, "%s: cannot remove: %s", path, strerror(errno));
    return KFAC_OK;
}

/* Whether the local copy at `path` (size already equal) hashes right. */
static kfac_status hash_matches(stage_ctx *c, const char *path, const kfac_shard_entry *e, int *ok)
{
    *ok = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return KFAC_OK; /* unreadable: copy it again */
    uint64_t h = 0;
    stage_io io;
    kfac_status st = kfac__stage_hash_fd(c, fd, e->bytes, &h, &io);
    close(fd);
    c->rep->bytes_verified += io.bytes_read;
    *ok = st == KFAC_OK && io.read_errno == 0 && h == e->xxh64;
    return st;
}

static kfac_status inspect(stage_ctx *c, const stamp *s, stage_shard *sh, int resume)
{
    char path[KFAC_STAGE_PATH], part[KFAC_STAGE_PATH];
    KFAC_TRY(kfac__stage_path(path, c->dir, sh->e->file, NULL));
    KFAC_TRY(kfac__stage_path(part, c->dir, sh->e->file, ".part"));
    struct stat st;
    sh->valid = 0;
    sh->part_len = 0;
    if (stat(path, &st) == 0) {
        if (S_ISREG(st.st_mode) && (uint64_t)st.st_size == sh->e->bytes) {
            if (!c->opt->verify_existing && stamp_vouches(s, sh->e, &st)) sh->valid = 1;
            else KFAC_TRY(hash_matches(c, path, sh->e, &sh->valid));
        }
        if (!sh->valid) KFAC_TRY(remove_file(path));
    }
    if (sh->valid) {
        c->rep->shards_skipped++;
        c->rep->bytes_skipped += sh->e->bytes;
        return remove_file(part);
    }
    if (resume && stat(part, &st) == 0 && S_ISREG(st.st_mode) &&
        (uint64_t)st.st_size <= sh->e->bytes) {
        sh->part_len = (uint64_t)st.st_size;
        return KFAC_OK;
    }
    return remove_file(part);
}

kfac_status kfac__stage_inventory(stage_ctx *c, int resume)
{
    stamp s = load_stamp(c);
    kfac_status st = KFAC_OK;
    for (int i = 0; i < c->num_shards && st == KFAC_OK; i++)
        st = inspect(c, &s, &c->shards[i], resume);
    free(s.recs);
    return st;
}

uint64_t kfac__stage_bytes_needed(const stage_ctx *c, int resume)
{
    uint64_t need = 0;
    for (int i = 0; i < c->num_shards; i++)
        if (!c->shards[i].valid)
            need += c->shards[i].e->bytes - (resume ? c->shards[i].part_len : 0);
    return need;
}

const char *kfac_stage_format_bytes(uint64_t b, char buf[32])
{
    static const char *const units[] = {"B", "kB", "MB", "GB", "TB", "PB"};
    double v = (double)b;
    int u = 0;
    while (v >= 1000 && u < 5) v /= 1000, u++;
    if (u == 0) snprintf(buf, 32, "%" PRIu64 " B", b);
    else snprintf(buf, 32, v < 10 ? "%.2f %s" : v < 100 ? "%.1f %s" : "%.0f %s", v, units[u]);
    return buf;
}

kfac_status kfac__stage_check_space(stage_ctx *c, uint64_t need)
{
    if (need == 0) return KFAC_OK;
    struct statvfs vfs;
    if (statvfs(c->dir, &vfs) != 0)
        return KFAC_ERR(KFAC_EIO, "%s: statvfs: %s", c->dir, strerror(errno));
    uint64_t avail = (uint64_t)vfs.f_bavail * (uint64_t)vfs.f_frsize;
    uint64_t reserve = c->opt->reserve_bytes;
    if (need <= avail && reserve <= avail - need) return KFAC_OK;
    char a[32], n[32], r[32];
    return KFAC_ERR(KFAC_EIO,
                    "%s: not enough space: %s free, staging needs %s more plus a %s reserve",
                    c->dir, kfac_stage_format_bytes(avail, a), kfac_stage_format_bytes(need, n),
                    kfac_stage_format_bytes(reserve, r));
}

/* ---- closing writes ---- */

static kfac_status write_stamp(stage_ctx *c, int complete[2])
{
    char path[KFAC_STAGE_PATH], tmp[KFAC_STAGE_PATH];
    KFAC_TRY(kfac__stage_path(path, c->dir, STAMP_NAME, NULL));
    KFAC_TRY(kfac__stage_path(tmp, c->dir, STAMP_NAME, ".tmp"));
    stamp old = load_stamp(c);
    FILE *f = fopen(tmp, "w");
    if (!f) {
        free(old.recs);
        return KFAC_ERR(KFAC_EIO, "%s: cannot create: %s", tmp, strerror(errno));
    }
    fprintf(f, "%s\n", STAMP_MAGIC);
    for (int s = 0; s < c->m->num_splits; s++) {
        const kfac_split_entry *sp = &c->m->splits[s];
        complete[s] = 1;
        for (size_t i = 0; i < sp->num_shards; i++) {
            const kfac_shard_entry *e = &sp->shards[i];
            char file[KFAC_STAGE_PATH];
            struct stat st;
            int ok = kfac__stage_path(file, c->dir, e->file, NULL) == KFAC_OK &&
                     stat(file, &st) == 0 && S_ISREG(st.st_mode);
            /* chosen splits were just verified; others only if still vouched for */
            if (ok && !c->chosen[s]) ok = stamp_vouches(&old, e, &st);
            if (!ok) {
                complete[s] = 0;
                continue;
            }
            if (strchr(e->file, '\n')) continue; /* cannot be a line: hashed next time */
            stamp_rec r;
            fill_rec(&r, e, &st);
            fprintf(f, "%016" PRIx64 " %" PRIu64 " %" PRIu64 " %" PRIu64 " %" PRId64 ".%09" PRId64
                       " %" PRId64 ".%09" PRId64 " %s\n",
                    r.hash, r.size, r.dev, r.ino, r.mt_s, r.mt_ns, r.ct_s, r.ct_ns, r.file);
        }
    }
    free(old.recs);
    int failed = ferror(f) || fflush(f) != 0;
    int err = errno;
    if (fclose(f) != 0 && !failed) failed = 1, err = errno;
    if (failed) {
        unlink(tmp);
        return KFAC_ERR(KFAC_EIO, "%s: cannot write: %s", tmp, strerror(err));
    }
    return kfac__publish_file(tmp, path);
}

static kfac_status write_verbatim(stage_ctx *c, const char *path)
{
    char tmp[KFAC_STAGE_PATH];
    KFAC_TRY(kfac__stage_path(tmp, c->dir, MANIFEST_NAME, ".tmp"));
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return KFAC_ERR(KFAC_EIO, "%s: cannot create: %s", tmp, strerror(errno));
    size_t done = 0;
    while (done < c->manifest_len) {
        ssize_t n = write(fd, c->manifest_bytes + done, c->manifest_len - done);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            int err = n < 0 ? errno : EIO;
            close(fd);
            unlink(tmp);
            return KFAC_ERR(KFAC_EIO, "%s: cannot write: %s", tmp, strerror(err));
        }
        done += (size_t)n;
    }
    if (close(fd) != 0) {
        int err = errno;
        unlink(tmp);
        return KFAC_ERR(KFAC_EIO, "%s: cannot write: %s", tmp, strerror(err));
    }
    return kfac__publish_file(tmp, path);
}

kfac_status kfac__stage_finish_dir(stage_ctx *c)
{
    /* Shards durable before the stamp vouches for them and the manifest
     * declares the folder complete (a crash must not leave a manifest over
     * files whose data never reached the disk). */
    if (c->wrote) {
        int fd = open(c->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fd < 0 || syncfs(fd) != 0) {
            int err = errno;
            if (fd >= 0) close(fd);
            return KFAC_ERR(KFAC_EIO, "%s: syncfs: %s", c->dir, strerror(err));
        }
        close(fd);
    }
    int complete[2] = {0, 0};
    KFAC_TRY(write_stamp(c, complete));
    char path[KFAC_STAGE_PATH];
    KFAC_TRY(kfac__stage_path(path, c->dir, MANIFEST_NAME, NULL));
    kfac_manifest sub = *c->m; /* shallow: the complete splits only */
    sub.num_splits = 0;
    for (int s = 0; s < c->m->num_splits; s++)
        if (complete[s]) sub.splits[sub.num_splits++] = c->m->splits[s];
    if (sub.num_splits == c->m->num_splits) return write_verbatim(c, path);
    return kfac_manifest_write(c->dir, &sub);
}
