/* prep_internal.h - internal: the pieces of `kfac prep` (kfac_prep.h):
 * the input listing (prep_input.c), issue lists, and the MPI layer
 * (prep_mpi.c) that the pipeline (prep.c) calls. */
#ifndef KFAC_DATA_PREP_INTERNAL_H
#define KFAC_DATA_PREP_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "kfac/kfac_dataset.h"
#include "kfac/kfac_prep.h"
#include "kfac/kfac_shards.h"

/* ---- issue lists (skipped inputs, warnings) ---- */

typedef struct kfac__issues {
    kfac_prep_issue *v;
    size_t n, cap;
} kfac__issues;

/* Appends copies of path and reason. */
kfac_status kfac__issues_add(kfac__issues *l, const char *path, const char *reason);
/* Moves every entry of src to the end of dst (src is left empty). */
kfac_status kfac__issues_take(kfac__issues *dst, kfac__issues *src);
void kfac__issues_sort(kfac__issues *l); /* by strcmp of path */
void kfac__issues_free(kfac__issues *l);

/* ---- the input ---- */

/* One input file: its path relative to the split folder and its label. */
typedef struct kfac__prep_item {
    char *path;
    int32_t label;
} kfac__prep_item;

typedef struct kfac__prep_split {
    char name[16];        /* "train" or "val" */
    char *dir;            /* INPUT/<name> (folder input) */
    size_t count;         /* inputs */
    kfac__prep_item *items; /* count, sorted by path (folder input) */
    kfac_dataset *idx;    /* IDX input: the images, in file order */
} kfac__prep_split;

typedef struct kfac__prep_input {
    int is_idx;
    int num_classes;
    char (*classes)[KFAC_CLASS_NAME_MAX];
    int num_splits;
    kfac__prep_split splits[2];
    kfac__issues skipped; /* found while listing: empty class folders, strays */
} kfac__prep_input;

/* Whether `root` holds IDX files (train-images-idx3-ubyte[.gz]); KFAC_EIO
 * when root is missing or not a folder. */
kfac_status kfac__prep_input_kind(const char *root, int *is_idx);

/* Lists (folder) or loads (IDX) the input; val_labels as in kfac_prep.h. */
kfac_status kfac__prep_input_open(kfac__prep_input *in, const char *root, const char *val_labels);
void kfac__prep_input_free(kfac__prep_input *in);

/* ---- MPI: a single process when no launcher started us ---- */

typedef struct kfac__prep_mpi {
    int rank, size;
    int started;  /* we called MPI_Init_thread, so we finalize */
    void *comm;   /* MPI_Comm * (a duplicate of MPI_COMM_WORLD), NULL without MPI */
} kfac__prep_mpi;

/* Starts MPI when a launcher's variables are set. */
kfac_status kfac__prep_mpi_init(kfac__prep_mpi *m);
void kfac__prep_mpi_finish(kfac__prep_mpi *m);

/* Every rank passes its status; if any failed, every rank returns that
 * status with the failing rank's message ("rank R: ..." for R > 0). */
kfac_status kfac__prep_mpi_agree(kfac__prep_mpi *m, kfac_status st);

/* Concatenates every rank's bytes, in rank order, on rank 0 (*all is
 * malloc'ed there; NULL elsewhere). */
kfac_status kfac__prep_mpi_gather(kfac__prep_mpi *m, const void *mine, size_t n, uint8_t **all,
                                  size_t *all_n);

#endif
