/* kfac_prep.h - converting image folders and IDX files into the HDF5
 * shards of kfac_shards.h (what `kfac prep` runs).
 *
 * Inputs (detected from what INPUT holds):
 *   IDX     INPUT/train-images-idx3-ubyte[.gz] and -labels-idx1-ubyte[.gz]
 *           (MNIST, Fashion-MNIST); the t10k files, if present, become "val".
 *           Classes are named "0".."9".
 *   folder  INPUT/train/<class>/<image> and optionally INPUT/val/<class>/<image>
 *           (ImageNet style), or INPUT/val/<image> flat plus a label file.
 *           Classes are the sorted names of the subfolders of train/; val's
 *           class folders map to that list by name.  Images are JPEG or PNG,
 *           recognised by their first bytes, never by their extension.
 *           Names starting with '.' are ignored.
 * Within a split, inputs are ordered by strcmp of their path relative to
 * the split folder (IDX: file order).
 *
 * Determinism: shard k of a split holds inputs [k*N, (k+1)*N) of that
 * order, N being fixed by the settings alone (kfac_prep_info's
 * images_per_shard), and an input that cannot be converted is left out of
 * its shard.  So the shards, the manifest and the lists are the same bytes
 * whatever the thread count or the number of MPI ranks.
 *
 * Parallelism: threads (OpenMP) each convert whole shards; started by
 * mpirun/srun with more than one rank, rank r converts shards r, r+P, ...
 * of the run's shard list (train then val) and rank 0 gathers the results
 * and writes manifest.yaml, skipped.txt and warnings.txt.  MPI is started
 * only when a launcher's variables are set (OMPI_COMM_WORLD_SIZE,
 * PMIX_RANK, PMI_SIZE), so a plain process needs none.
 *
 * Lifecycle: kfac_prep_plan (reads the input, resolves the settings, starts
 * MPI when launched) -> kfac_prep_info -> kfac_prep_run -> kfac_prep_free
 * (finalizes MPI if plan started it).  Errors under MPI are agreed: every
 * rank returns the same status and message (the failing rank's).
 */
#ifndef KFAC_PREP_H
#define KFAC_PREP_H

#include <stddef.h>
#include <stdint.h>

#include "kfac/kfac_shards.h"
#include "kfac/kfac_status.h"

#ifdef __cplusplus
extern "C" {
#endif

enum {
    KFAC_PREP_DEFAULT = -1,          /* settings field: the source's default */
    KFAC_PREP_FOLDER_RESIZE = 256,   /* folder default shorter side (then a center crop) */
    KFAC_PREP_JPEG_QUALITY = 90,     /* default encoder quality (jpeg storage) */
    KFAC_PREP_SHARD_MIB = 1024,      /* default shard size */
    KFAC_PREP_MAX_PIXELS = 1 << 26   /* larger images are skipped ("image too large") */
};

/* What the caller asks for.  In `settings`, channels, resize, center_crop
 * and jpeg_quality may be KFAC_PREP_DEFAULT: channels 3 for folders and 1
 * for IDX; resize 256 for folders and 0 (kept) for IDX; center crop when
 * resizing, none otherwise; quality 90 (recorded as 0 with raw storage,
 * which has none).  source is filled by plan. */
typedef struct kfac_prep_options {
    const char *input;           /* IDX folder or folder tree */
    const char *out_dir;         /* created if missing */
    const char *val_labels;      /* label file for a flat INPUT/val, or NULL */
    kfac_prep_settings settings;
    uint64_t shard_bytes;        /* target shard size (used when shard_images is 0) */
    size_t shard_images;         /* images per shard; 0: from shard_bytes */
    int threads;                 /* worker threads per process; 0: omp_get_max_threads() */
    int force;                   /* replace a dataset already in out_dir */
    /* Called on rank 0 from one worker at a time, at most every
     * progress_every seconds and once at the end; done counts the inputs of
     * rank 0's shards handled so far (converted or skipped). */
    void (*on_progress)(size_t done, size_t total, double seconds, void *user);
    double progress_every;
    void *user;
} kfac_prep_options;

/* The resolved plan, the same on every rank. */
typedef struct kfac_prep_info {
    kfac_prep_settings settings; /* defaults resolved; source "folder" or "idx" */
    size_t images_per_shard;     /* N */
    int num_classes;
    int num_splits;              /* 1 (train) or 2 (train, val) */
    struct {
        char name[16];
        size_t inputs;           /* files (IDX: images) in sorted order */
        size_t shards;
    } splits[2];
    size_t local_inputs;         /* inputs of this rank's shards */
    int threads;                 /* worker threads of this process */
    int rank, ranks;             /* MPI rank and size (0, 1 without a launcher) */
} kfac_prep_info;

/* An input left out (skipped.txt) or converted despite a decoder warning
 * (warnings.txt).  path is relative to INPUT, e.g. "train/n01/x.JPEG";
 * reason is "<kind>: <detail>" or "<kind>", e.g. "truncated JPEG: Premature
 * end of JPEG file", "not a JPEG or PNG file". */
typedef struct kfac_prep_issue {
    char *path;
    char *reason;
} kfac_prep_issue;

/* The outcome, on rank 0 (zeros on the other ranks). */
typedef struct kfac_prep_report {
    size_t written[2];           /* images written per split (info's order) */
    size_t skipped_inputs;       /* inputs left out (folder-level entries excluded) */
    size_t num_skipped;          /* entries of skipped.txt, sorted by path */
    const kfac_prep_issue *skipped;
    size_t num_warnings;         /* entries of warnings.txt, sorted by path */
    const kfac_prep_issue *warnings;
    uint64_t bytes;              /* bytes of all shard files */
    double seconds;              /* plan excluded, manifest included */
} kfac_prep_report;

typedef struct kfac_prep kfac_prep;

/* Reads the input (folder listing or IDX files), resolves the settings and
 * checks they are consistent, creates out_dir.  Errors: KFAC_EINVAL (bad
 * settings: "--resize ..." style messages name the setting), KFAC_EIO
 * (missing input, out_dir not writable or holding a dataset without force:
 * the message names the path and the reason), KFAC_EFORMAT (label file or
 * IDX file malformed: path and line), KFAC_ECOMM. */
kfac_status kfac_prep_plan(kfac_prep **out, const kfac_prep_options *opt);

const kfac_prep_info *kfac_prep_info_get(const kfac_prep *p);

/* Converts and writes everything.  A bad input is skipped and listed, never
 * an error; errors are the run's own (an unwritable shard, no memory).
 * *report stays valid until kfac_prep_free. */
kfac_status kfac_prep_run(kfac_prep *p, kfac_prep_report *report);

void kfac_prep_free(kfac_prep *p);

#ifdef __cplusplus
}
#endif
#endif
