/* stage_io.c - the byte stream of staging: one file range in chunks,
 * hashed as it passes, double-buffered so that reading the next chunk and
 * writing the previous one (helper thread) overlap the current chunk's
 * broadcast, or its hashing and writing in copy mode (main thread, the only
 * one that may call MPI).  Two buffers suffice: the helper finishes with a
 * buffer (write) before refilling it (read). */
#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <unistd.h>

#include "data/stage_internal.h"

enum { PIECE = 256 << 10 }; /* fits the L2 cache of current CPUs */

typedef struct io_job {
    int src_fd, dst_fd;
    const void *wbuf; /* write wlen bytes at woff first (NULL: none) */
    uint64_t woff;
    size_t wlen;
    void *rbuf; /* then read rlen bytes at roff (NULL: none) */
    uint64_t roff;
    size_t rlen;
    stage_io *io;
} io_job;

/* Reads len bytes at off; after a failure (or an early end of file) the
 * rest is zeros, so a broadcast still has something defined to send. */
static void read_chunk(int fd, void *buf, uint64_t off, size_t len, stage_io *io)
{
    size_t done = 0;
    while (!io->read_errno && done < len) {
        ssize_t n = pread(fd, (char *)buf + done, len - done, (off_t)(off + done));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) io->read_errno = errno;
        else if (n == 0) io->read_errno = -1;
        else done += (size_t)n;
    }
    io->bytes_read += done;
    if (done < len) memset((char *)buf + done, 0, len - done);
}

static void write_chunk(int fd, const void *buf, uint64_t off, size_t len, stage_io *io)
{
    size_t done = 0;
    if (fd < 0) return;
    while (!io->write_errno && done < len) {
        ssize_t n = pwrite(fd, (const char *)buf + done, len - done, (off_t)(off + done));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) io->write_errno = errno;
        else if (n == 0) io->write_errno = EIO;
        else done += (size_t)n;
    }
    io->bytes_written += done;
}

static void *run_job(void *arg)
{
    io_job *j = arg;
    if (j->wbuf) write_chunk(j->dst_fd, j->wbuf, j->woff, j->wlen, j->io);
    if (j->rbuf) read_chunk(j->src_fd, j->rbuf, j->roff, j->rlen, j->io);
    return NULL;
}

kfac_status kfac__stage_stream(stage_ctx *c, int src_fd, int dst_fd, kfac_comm *comm,
                               uint64_t offset, uint64_t end, int report_progress,
                               stage_io *io)
{
    memset(io, 0, sizeof *io);
    if (end <= offset) return KFAC_OK;
    const uint64_t total = end - offset, chunk = c->chunk;
    const uint64_t n = (total + chunk - 1) / chunk;
    /* Without a broadcast the main thread has time to write; with one, the
     * helper writes so that the next broadcast starts at once. */
    const int write_on_main = comm == NULL;
#define CHUNK_LEN(k) ((size_t)((k) + 1 == n ? total - (k)*chunk : chunk))
#define CHUNK_OFF(k) (offset + (k)*chunk)
    if (src_fd >= 0) read_chunk(src_fd, c->buf[0], CHUNK_OFF(0), CHUNK_LEN(0), io);
    for (uint64_t k = 0; k < n; k++) {
        void *cur = c->buf[k & 1], *other = c->buf[(k + 1) & 1];
        size_t len = CHUNK_LEN(k);
        io_job job = {src_fd, dst_fd, NULL, 0, 0, NULL, 0, 0, io};
        if (!write_on_main && k > 0 && dst_fd >= 0) {
            job.wbuf = other;
            job.woff = CHUNK_OFF(k - 1);
            job.wlen = CHUNK_LEN(k - 1);
        }
        if (src_fd >= 0 && k + 1 < n) {
            job.rbuf = other;
            job.roff = CHUNK_OFF(k + 1);
            job.rlen = CHUNK_LEN(k + 1);
        }
        pthread_t helper;
        int threaded = 0;
        if (job.wbuf || job.rbuf) {
            threaded = pthread_create(&helper, NULL, run_job, &job) == 0;
            if (!threaded) run_job(&job); /* no thread: the same work, without overlap */
        }
        kfac_status st = KFAC_OK;
        if (comm) st = kfac_comm_bcast(comm, cur, (len + 3) / 4, KFAC_F32, 0, KFAC_STAGE_OTHER);
        /* hash and write in cache-sized pieces: each piece is read from
         * memory once, not once for the hash and again for the write */
        for (size_t at = 0; st == KFAC_OK && at < len; at += PIECE) {
            size_t piece = len - at < PIECE ? len - at : PIECE;
            XXH64_update(c->hash, (const char *)cur + at, piece);
            if (write_on_main)
                write_chunk(dst_fd, (const char *)cur + at, CHUNK_OFF(k) + at, piece, io);
        }
        if (threaded) pthread_join(helper, NULL);
        if (st != KFAC_OK) return st;
        if (report_progress) kfac__stage_progress(c, len);
        if (!comm && (io->read_errno || io->write_errno)) return KFAC_OK;
    }
    if (!write_on_main)
        write_chunk(dst_fd, c->buf[(n - 1) & 1], CHUNK_OFF(n - 1), CHUNK_LEN(n - 1), io);
#undef CHUNK_LEN
#undef CHUNK_OFF
    return KFAC_OK;
}

/* Hashing alone: one thread, small reads that stay in the CPU caches (a
 * big buffer would make every byte go to memory and back; the kernel's
 * read-ahead already overlaps the disk). */
void kfac__stage_hash_range(stage_ctx *c, int fd, uint64_t offset, uint64_t end, stage_io *io)
{
    memset(io, 0, sizeof *io);
    size_t block = c->chunk < PIECE ? c->chunk : PIECE;
    for (uint64_t off = offset; off < end && !io->read_errno; off += block) {
        size_t len = end - off < block ? (size_t)(end - off) : block;
        read_chunk(fd, c->buf[0], off, len, io);
        XXH64_update(c->hash, c->buf[0], len);
    }
}

kfac_status kfac__stage_hash_fd(stage_ctx *c, int fd, uint64_t len, uint64_t *hash, stage_io *io)
{
    XXH64_reset(c->hash, 0);
    kfac__stage_hash_range(c, fd, 0, len, io);
    *hash = XXH64_digest(c->hash);
    return KFAC_OK;
}
