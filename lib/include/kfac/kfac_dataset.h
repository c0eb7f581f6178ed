/* kfac_dataset.h - the dataset interface every data source implements, and
 * the batcher that turns a dataset into normalised float batches.
 *
 * A dataset is a random-access collection of uint8 HWC images with integer
 * labels.  Sources: Fashion-MNIST/MNIST IDX files now (kfac_dataset_open_idx);
 * the HDF5 shards made by `kfac prep` implement the same table later.
 *
 * Lifecycle: open -> read_image any number of times (thread-safe) -> free.
 */
#ifndef KFAC_DATASET_H
#define KFAC_DATASET_H

#include <stddef.h>
#include <stdint.h>

#include "kfac/kfac_status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kfac_dataset kfac_dataset;

struct kfac_dataset {
    size_t count;     /* number of images */
    int height, width, channels;
    int num_classes;
    /* Copies image `index` (< count) as uint8 HWC into `hwc` (height*width*
     * channels bytes) and its label into *label.  Must be safe to call from
     * several threads at once. */
    kfac_status (*read_image)(const kfac_dataset *ds, size_t index, uint8_t *hwc,
                              int32_t *label);
    void (*destroy)(kfac_dataset *ds);
    void *impl; /* source-specific state */
};

/* Which split of a dataset folder to open. */
typedef enum kfac_split { KFAC_SPLIT_TRAIN = 0, KFAC_SPLIT_TEST = 1 } kfac_split;

/* Opens the IDX files of an MNIST-style folder: train-images-idx3-ubyte(.gz),
 * train-labels-idx1-ubyte(.gz), t10k-... for the test split.  Gzipped and
 * plain files are both accepted (the plain one wins if both exist).  Both
 * files are loaded whole into memory; channels is 1 and num_classes 10.
 * Errors name the path and the reason, e.g.
 *   DIR/train-images-idx3-ubyte.gz: truncated: expected 47040000 image bytes, got 1000
 * (KFAC_EIO: missing or unreadable; KFAC_EFORMAT: malformed content).
 * *out is NULL on failure. */
kfac_status kfac_dataset_open_idx(const char *dir, kfac_split split, kfac_dataset **out);

/* Frees a dataset from any source (NULL is allowed). */
void kfac_dataset_free(kfac_dataset *ds);

/* Augmentation applied by the batcher. */
typedef enum kfac_augment {
    KFAC_AUGMENT_NONE = 0,
    KFAC_AUGMENT_PAD_CROP_FLIP = 1 /* zero-pad by `pad`, random crop back, random h-flip */
} kfac_augment;

typedef struct kfac_batcher_config {
    int batch_size;       /* images per batch */
    kfac_augment augment;
    int pad;              /* padding for PAD_CROP_FLIP (Fashion-MNIST: 2) */
    float mean[4], std[4];/* per-channel normalisation: (x/255 - mean) / std */
    uint64_t seed;        /* permutation and augmentation seed */
    int shuffle;          /* nonzero: new permutation each epoch from (seed, epoch) */
    int drop_last;        /* nonzero: the epoch's last partial batch is dropped */
    int threads;          /* threads used to decode/augment one batch */
} kfac_batcher_config;

typedef struct kfac_batcher kfac_batcher;

/* Creates a batcher over `ds` (not owned, must outlive the batcher).  All
 * buffers are allocated here; kfac_batcher_next never allocates.  Epoch 0 is
 * started, so kfac_batcher_next can be called at once.  KFAC_EINVAL for a
 * bad configuration (batch_size < 1, std <= 0, pad out of range, drop_last
 * with fewer images than one batch, more than 4 channels). */
kfac_status kfac_batcher_init(kfac_batcher **out, const kfac_dataset *ds,
                              const kfac_batcher_config *cfg);
void kfac_batcher_free(kfac_batcher *b);

/* Number of batches in one epoch. */
size_t kfac_batcher_batches_per_epoch(const kfac_batcher *b);

/* Starts epoch `epoch` (0-based): fixes its permutation. */
void kfac_batcher_start_epoch(kfac_batcher *b, int epoch);

/* Fills the next batch of the current epoch: `images` (room for
 * batch_size*H*W*C floats) receives n*H*W*C normalised floats in NHWC order,
 * `labels` n int32 labels; *n is the number of images in this batch (0 once
 * the epoch is over).  The result depends only on (seed, epoch, batch index),
 * never on the thread count.  If a read_image fails, its status and message
 * are returned, *n is 0 and the batch is not consumed. */
kfac_status kfac_batcher_next(kfac_batcher *b, float *images, int32_t *labels, int *n);

/* Random access within the current epoch, for ranks and micro-batches that
 * each take a slice of a batch: images offset..offset+count-1 of batch
 * `batch` (0-based), clipped to the batch and the epoch; *n = 0 past the
 * end.  The same images, bit for bit, as kfac_batcher_next would put at
 * those places.  Does not move kfac_batcher_next's position. */
kfac_status kfac_batcher_read(kfac_batcher *b, size_t batch, int offset, int count,
                              float *images, int32_t *labels, int *n);

#ifdef __cplusplus
}
#endif
#endif
