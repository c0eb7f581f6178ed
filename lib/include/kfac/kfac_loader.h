/* kfac_loader.h - one rank's training input, prepared ahead on a loader
 * thread while the step computes.
 *
 * Every global batch of an epoch (the batcher's permutation from (seed,
 * epoch)) is split among ranks: this rank takes images first ..
 * first+count-1 of each batch, delivered as pieces of `piece` images (its
 * micro-batches).  A loader thread fills a bounded ring of depth + 1 piece
 * buffers, all allocated at init (through the caller's allocator, so a GPU
 * backend can hand out pinned memory); kfac_loader_next hands them out in
 * order and counts the time it had to wait, which is the loader-bound time
 * the trainer reports per epoch.  The pieces are the same bits, in the same
 * order, whatever the depth, thread count or timing: depth only moves the
 * work to another thread.
 *
 * The cursor (epoch, batch) is all a checkpoint needs to resume the input
 * exactly: kfac_loader_start(l, cursor) continues with the same pieces an
 * uninterrupted run would have read next.
 */
#ifndef KFAC_LOADER_H
#define KFAC_LOADER_H

#include <stddef.h>
#include <stdint.h>

#include "kfac/kfac_dataset.h"
#include "kfac/kfac_status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kfac_loader_config {
    int first;  /* this rank's first image in every global batch */
    int count;  /* images this rank takes from every batch */
    int piece;  /* images per delivered piece; count must be a multiple */
    int depth;  /* pieces prepared ahead of the one in use, on the loader thread;
                   0: each piece is read in kfac_loader_next */
    /* Allocator of the piece buffers (NULL: malloc/free), e.g. pinned host memory. */
    void *(*alloc)(size_t bytes, void *user);
    void (*release)(void *ptr, void *user);
    void *alloc_user;
} kfac_loader_config;

/* Where the input stands: the next piece is the first of batch `batch`
 * (0-based) of epoch `epoch`. */
typedef struct kfac_loader_cursor {
    int epoch;
    size_t batch;
} kfac_loader_cursor;

/* One delivered piece: valid until the next kfac_loader_next/start/free. */
typedef struct kfac_loader_piece {
    const float *images;   /* n normalised NHWC images */
    const int32_t *labels; /* n labels */
    int n;                 /* images; 0 once the epoch is over */
    size_t batch;          /* global batch it belongs to */
    int index;             /* piece number within this rank's share of the batch */
} kfac_loader_piece;

typedef struct kfac_loader kfac_loader;

/* Creates a loader over `batcher` (not owned; nobody else may use it while
 * the loader lives).  Nothing is read until kfac_loader_start.  KFAC_EINVAL
 * for a share outside the batch or a count not a multiple of piece. */
kfac_status kfac_loader_init(kfac_loader **out, kfac_batcher *batcher,
                             const kfac_loader_config *cfg);

/* Stops work in flight and starts reading at `cursor`. */
kfac_status kfac_loader_start(kfac_loader *l, kfac_loader_cursor cursor);

/* The next piece, waiting for the loader thread if it is behind.  A read
 * failure is returned here with the dataset's message (path and image); the
 * loader then stays failed until the next kfac_loader_start. */
kfac_status kfac_loader_next(kfac_loader *l, kfac_loader_piece *piece);

/* The position of the next piece not yet handed out, rounded back to the
 * start of its batch (a checkpoint taken between steps is exact). */
kfac_loader_cursor kfac_loader_position(const kfac_loader *l);

/* Seconds kfac_loader_next spent waiting since the last call (then reset). */
double kfac_loader_take_wait(kfac_loader *l);

void kfac_loader_free(kfac_loader *l);

#ifdef __cplusplus
}
#endif
#endif
