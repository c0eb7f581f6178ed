/* kfac_stage.h - copies a dataset's shards (kfac_shards.h) to node-local
 * storage once per node, so training reads local disks instead of the
 * shared file system.
 *
 * Where: LOCAL/<base>-<hash>, LOCAL = opt->local_dir, else $SLURM_TMPDIR,
 * else $TMPDIR, else /tmp; <base> is the basename of the dataset folder and
 * <hash> the first 12 hex digits of the XXH64 of its manifest.yaml, so two
 * datasets (or two versions of one) never share a folder.
 *
 * Who: the node's local rank 0 (the "stager") does the work; the node's
 * other ranks wait and receive its report.  Every rank of the job learns
 * whether any node failed (a failure on one node fails kfac_stage_run on
 * every rank, the others with a message naming that node), so callers never
 * hang in a later collective.
 *
 * How (per shard, in the folder LOCAL/<base>-<hash>):
 *   - a FILE whose size and XXH64 match the manifest is kept.  The hash
 *     pass is skipped when the stamp file .kfac-stage.stamp, written at the
 *     end of every successful run, records the file with the same size,
 *     device, inode, mtime and ctime (any write or touch changes ctime);
 *     opt->verify_existing forces the hash pass;
 *   - otherwise it is copied to FILE.part, hashed as it is written, and
 *     renamed to FILE when the hash matches the manifest.  Copy mode
 *     resumes a FILE.part shorter than the shard from its end (its bytes
 *     are hashed first).  A mismatch is copied once more from scratch; a
 *     second mismatch means the source does not match its manifest, an
 *     error naming the source file;
 *   - manifest.yaml is written last, atomically, after a syncfs: a local
 *     folder with a manifest holds every shard it lists.  It lists the
 *     splits whose shards are all present (the source manifest verbatim
 *     when that is all of them).
 * A second process staging the same folder on the same node waits for the
 * first (flock on .kfac-stage.lock; in broadcast mode it does not wait but
 * falls back, since waiting inside a collective could deadlock).
 *
 * Modes:
 *   COPY       every stager reads the shared copy itself;
 *   BROADCAST  the first node's stager reads each shard once and sends it
 *              to the other stagers over the inter-node communicator, in
 *              chunks (kfac_comm_bcast per chunk; a helper thread reads and
 *              writes the neighbouring chunks while the main thread sends,
 *              since only the main thread may call MPI).  The stagers first
 *              sum "have it" flags per shard, so a shard every node holds
 *              moves no bytes.  No resume of FILE.part in this mode.  With
 *              one node it is COPY.
 *
 * Space and fallback: before copying, the stager compares the bytes still
 * to write plus opt->reserve_bytes with the free space of the local folder
 * (statvfs).  When short, or when the local side fails otherwise (folder
 * not creatable, ENOSPC while writing, lock held in broadcast mode), the
 * node falls back to the shared copy when opt->fallback is set: the report
 * says fell_back with the reason and data_dir = the source folder.  Without
 * opt->fallback that is an error.  Problems of the source (missing, size or
 * checksum not as in its manifest, unreadable) are always errors.
 *
 * The library prints nothing; opt->progress reports progress on stagers.
 */
#ifndef KFAC_STAGE_H
#define KFAC_STAGE_H

#include <stddef.h>
#include <stdint.h>

#include "kfac/kfac_status.h"
#include "kfac/kfac_topo.h"

#ifdef __cplusplus
extern "C" {
#endif

enum { KFAC_STAGE_PATH = 4096 };

typedef enum kfac_stage_mode {
    KFAC_STAGE_MODE_COPY = 0,     /* each node reads the shared copy */
    KFAC_STAGE_MODE_BROADCAST = 1 /* one read, sent over MPI to every node */
} kfac_stage_mode;
/* "copy", "broadcast"; parse returns KFAC_EINVAL for anything else. */
const char *kfac_stage_mode_name(kfac_stage_mode m);
kfac_status kfac_stage_mode_parse(const char *name, kfac_stage_mode *out);

/* Progress of one stager, reported after every chunk. */
typedef struct kfac_stage_progress {
    uint64_t bytes_done, bytes_total; /* bytes moved this run / to move */
    int shards_done, shards_total;    /* shards to move */
    const char *file;                 /* the shard in flight */
    double seconds;                   /* since the start */
} kfac_stage_progress;
typedef void (*kfac_stage_progress_fn)(const kfac_stage_progress *p, void *user);

typedef struct kfac_stage_options {
    const char *src_dir;       /* the dataset folder (shared file system) */
    const char *local_dir;     /* NULL: $SLURM_TMPDIR, $TMPDIR, /tmp */
    const char *const *splits; /* NULL-terminated split names; NULL: all */
    kfac_stage_mode mode;
    int fallback;              /* 1: read the shared copy when local staging fails */
    int verify_existing;       /* 1: hash every existing shard (ignore the stamp) */
    uint64_t reserve_bytes;    /* free space to leave beyond the copy */
    size_t chunk_bytes;        /* copy/broadcast chunk (0: 8 MiB) */
    kfac_stage_progress_fn progress; /* NULL: none; called on stagers only */
    void *progress_user;
} kfac_stage_options;

/* Defaults: mode COPY, fallback 1, verify_existing 0, reserve 1 GB (1e9),
 * chunk 8 MiB, everything else NULL/0. */
void kfac_stage_options_init(kfac_stage_options *opt);

/* What happened on one node (identical on every rank of that node). */
typedef struct kfac_stage_report {
    char data_dir[KFAC_STAGE_PATH]; /* where to read: the local copy, or src on fallback */
    int fell_back;                  /* 1: data_dir is the source folder */
    char reason[512];               /* why it fell back ("" otherwise) */
    int node;                       /* topology node id */
    int stager_rank;                /* world rank that did the copying */
    char host[64];
    int shards_total;   /* shards of the chosen splits */
    int shards_copied;  /* written this run (resumed ones included) */
    int shards_skipped; /* already valid */
    int shards_resumed; /* finished from a FILE.part */
    uint64_t bytes_total, bytes_copied, bytes_skipped;
    uint64_t bytes_verified; /* existing bytes hashed to check them */
    uint64_t bytes_from_src; /* bytes this node read from the source folder */
    double seconds;          /* wall time of the stager, checks included */
    double gbps;             /* bytes_copied / seconds / 1e9 (0 when nothing copied) */
} kfac_stage_report;

/* Stages opt->src_dir for this node.  Collective over every rank of `topo`
 * (NULL, or a single-process topology: this process alone).  Fills *report
 * on every rank with its node's outcome.  Errors: KFAC_EINVAL (options),
 * KFAC_EIO / KFAC_EFORMAT (source missing, unreadable or not matching its
 * manifest; local staging failed without fallback), KFAC_ECOMM; all name
 * the path and the reason, and in a multi-node job the node. */
kfac_status kfac_stage_run(const kfac_stage_options *opt, kfac_topo *topo,
                           kfac_stage_report *report);

/* Collective over every rank of `topo` (NULL: copies *mine): every node's
 * report, indexed by node id, into all[num_nodes], on every rank. */
kfac_status kfac_stage_gather(kfac_topo *topo, const kfac_stage_report *mine,
                              kfac_stage_report *all);

/* "12.3 GB", "512 kB", "17 B": decimal units, three digits (for reports
 * of staging). */
const char *kfac_stage_format_bytes(uint64_t bytes, char buf[32]);

/* The folder name for a dataset: "<basename>-<12 hex digits>" from the
 * folder path and its manifest's bytes (exposed for tests and scripts). */
kfac_status kfac_stage_dir_name(const char *src_dir, const void *manifest_bytes, size_t n,
                                char *out, size_t cap);

#ifdef __cplusplus
}
#endif
#endif
