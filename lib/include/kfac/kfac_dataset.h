/* kfac_dataset.h - the dataset interface every data source implements, and
 * the batcher that turns a dataset into normalised float batches.
 *
 * A dataset is a random-access collection of uint8 HWC images with integer
 * labels.  Sources: Fashion-MNIST/MNIST IDX files (kfac_dataset_open_idx)
 * and the HDF5 shards made by `kfac prep` (kfac_dataset_open_hdf5, in
 * kfac_shards.h).  Images of one dataset may differ in size (shards that
 * keep the aspect ratio); the batcher crops or resizes them to one size.
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
    int height, width, channels; /* every image's size if fixed_size, else the largest */
    int fixed_size;   /* nonzero: all images are height x width */
    int num_classes;
    /* Copies image `index` (< count) as uint8 HWC into `hwc` (room for
     * height*width*channels bytes of the dataset), its size into
     * *image_height, *image_width and its label into *label.  Must be safe
     * to call from several threads at once. */
    kfac_status (*read_image)(const kfac_dataset *ds, size_t index, uint8_t *hwc,
                              int *image_height, int *image_width, int32_t *label);
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

/* How the batcher turns a stored image into a training or test sample. */
typedef enum kfac_augment {
    /* Center crop to the output size; with `resize`, the shorter side is
     * first scaled to `resize` (validation: resize 256, output 224).  A
     * fixed-size dataset at the output size passes through unchanged. */
    KFAC_AUGMENT_NONE = 0,
    /* Zero-pad by `pad`, random crop back, random h-flip (Fashion-MNIST). */
    KFAC_AUGMENT_PAD_CROP_FLIP = 1,
    /* ImageNet's random-resized crop: a box of area fraction U(scale_min, 1)
     * and log-uniform aspect ratio in [ratio_min, ratio_max] (10 tries, then
     * the central crop clamped to those ratios, as torchvision), resampled
     * to the output size with an antialiasing filter, then a random h-flip. */
    KFAC_AUGMENT_RANDOM_RESIZED_CROP = 2
} kfac_augment;

typedef struct kfac_batcher_config {
    int batch_size;       /* images per batch */
    kfac_augment augment;
    int out_height, out_width; /* sample size; 0: the dataset's (fixed-size datasets) */
    int pad;              /* padding for PAD_CROP_FLIP (Fashion-MNIST: 2) */
    int resize;           /* NONE: shorter side scaled to this first; 0: no scaling */
    float scale_min;      /* RANDOM_RESIZED_CROP: smallest area fraction (0: 0.08) */
    float ratio_min, ratio_max; /* its aspect-ratio range (0: 3/4 and 4/3) */
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
 * with fewer images than one batch, more than 4 channels, no output size
 * for a dataset of varying sizes, PAD_CROP_FLIP to another size). */
kfac_status kfac_batcher_init(kfac_batcher **out, const kfac_dataset *ds,
                              const kfac_batcher_config *cfg);
void kfac_batcher_free(kfac_batcher *b);

/* Number of batches in one epoch. */
size_t kfac_batcher_batches_per_epoch(const kfac_batcher *b);

/* Images per batch, and floats per sample (out_height*out_width*channels). */
int kfac_batcher_batch_size(const kfac_batcher *b);
size_t kfac_batcher_image_floats(const kfac_batcher *b);

/* The sample size (the model's input). */
void kfac_batcher_sample_shape(const kfac_batcher *b, int *height, int *width, int *channels);

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
