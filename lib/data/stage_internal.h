/* stage_internal.h - the pieces of kfac_stage shared by stage.c (API,
 * agreement between ranks, copy mode), stage_local.c (the local folder:
 * lock, inventory, space, stamp, manifest), stage_io.c (the chunked,
 * hashed, double-buffered byte stream) and stage_bcast.c (broadcast mode).
 */
#ifndef KFAC_STAGE_INTERNAL_H
#define KFAC_STAGE_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include <xxhash.h>

#include "kfac/kfac_comm.h"
#include "kfac/kfac_shards.h"
#include "kfac/kfac_stage.h"

enum { STAGE_MSG = 1024 };

/* One shard of the chosen splits and the state of its local copy. */
typedef struct stage_shard {
    const kfac_shard_entry *e; /* in the manifest */
    int valid;                 /* LOCAL/FILE is whole and matches */
    uint64_t part_len;         /* copy mode: bytes of FILE.part to resume from */
} stage_shard;

/* One stager's work on its node. */
typedef struct stage_ctx {
    const kfac_stage_options *opt;
    kfac_stage_report *rep;
    char src[KFAC_STAGE_PATH];   /* the dataset folder, absolute */
    char local[KFAC_STAGE_PATH]; /* LOCAL */
    char dir[KFAC_STAGE_PATH];   /* LOCAL/<base>-<hash> */
    char *manifest_bytes;        /* the source manifest.yaml as read */
    size_t manifest_len;
    uint64_t manifest_hash;
    kfac_manifest *m;
    int chosen[2];               /* manifest split i is staged */
    stage_shard *shards;         /* the chosen splits' shards, in manifest order */
    int num_shards;
    int lock_fd;                 /* -1: not held */
    int wrote;                   /* something was written: syncfs before the manifest */
    size_t chunk;
    void *buf[2];                /* chunk bytes each (rounded up to 4) */
    XXH64_state_t *hash;
    double t0;
    kfac_stage_progress prog;
} stage_ctx;

/* ---- stage.c ---- */

/* The local side failed with the message of `st` (already recorded): with
 * fallback, the node reads the source instead (report updated, KFAC_OK);
 * without, the error is returned with a hint. */
kfac_status kfac__stage_local_failed(stage_ctx *c, kfac_status st);
/* Reports progress after `bytes` more (opt->progress, when set). */
void kfac__stage_progress(stage_ctx *c, uint64_t bytes);

/* ---- stage_local.c ---- */

/* LOCAL and LOCAL/<name> created, the lock taken (wait: block; else fail
 * at once when held).  Errors here are local-side failures. */
kfac_status kfac__stage_open_dir(stage_ctx *c, int wait);
void kfac__stage_close_dir(stage_ctx *c);
/* Sets valid and part_len of every shard (resume: keep FILE.part, else
 * delete it); deletes local copies that do not match.  Hashes through the
 * stream below.  Errors are local-side failures. */
kfac_status kfac__stage_inventory(stage_ctx *c, int resume);
/* Bytes still to write (shards not valid, less resumable parts). */
uint64_t kfac__stage_bytes_needed(const stage_ctx *c, int resume);
/* KFAC_EIO with the numbers when `need` plus the reserve do not fit. */
kfac_status kfac__stage_check_space(stage_ctx *c, uint64_t need);
/* After all shards are valid: syncfs when something was written, the
 * stamp, then manifest.yaml (atomically). */
kfac_status kfac__stage_finish_dir(stage_ctx *c);
/* "DIR/NAME" and "DIR/NAME.part" into out (KFAC_STAGE_PATH bytes). */
kfac_status kfac__stage_path(char *out, const char *dir, const char *name, const char *suffix);

/* ---- stage_io.c ---- */

/* Moves bytes [offset, end) of one file in chunks.  Roles:
 *   src_fd >= 0   this process reads them (copy mode, or the broadcast root)
 *   comm != NULL  they are broadcast from rank 0 of comm (every rank calls)
 *   dst_fd >= 0   this process writes them at the same offsets, else drops
 * The bytes are hashed into c->hash as they pass.  A helper thread reads
 * the next chunk and writes the previous one while the main thread
 * broadcasts (or hashes and writes, without comm) the current one.  A read
 * or write failure stops reading or writing (zeros are sent in place of
 * unread bytes) but, with comm, not the broadcasts, so every rank makes the
 * same calls.  Returns KFAC_ECOMM when a broadcast fails, else KFAC_OK with
 * the failures in *io. */
typedef struct stage_io {
    int read_errno;      /* first read failure: errno, or -1 for an early end of file */
    int write_errno;     /* first write failure */
    uint64_t bytes_read, bytes_written;
} stage_io;
kfac_status kfac__stage_stream(stage_ctx *c, int src_fd, int dst_fd, kfac_comm *comm,
                               uint64_t offset, uint64_t end, int report_progress,
                               stage_io *io);
/* Adds bytes [offset, end) of fd to c->hash (one thread, no writes); *io
 * as above. */
void kfac__stage_hash_range(stage_ctx *c, int fd, uint64_t offset, uint64_t end, stage_io *io);
/* XXH64 of bytes [0, len) of fd; *io as above. */
kfac_status kfac__stage_hash_fd(stage_ctx *c, int fd, uint64_t len, uint64_t *hash,
                                stage_io *io);

/* ---- stage_bcast.c ---- */

/* Broadcast mode on one stager, after setup() returned setup_st; `inter`
 * holds the stagers of every node, rank 0 reads.  *severity: 0 ok, 1
 * stopped because another stager failed, 2 failed here (the returned
 * status and kfac_last_error say how). */
kfac_status kfac__stage_bcast(stage_ctx *c, kfac_status setup_st, kfac_comm *inter,
                              int *severity);

#endif
