/* batcher.c - turns a kfac_dataset into shuffled, augmented, normalised
 * NHWC float batches.
 *
 * Every random choice is a pure function of (seed, epoch, position in the
 * epoch): the epoch's permutation comes from a generator seeded by
 * (seed, epoch), and each sample's crop and flip from its own generator
 * seeded by (seed, epoch, position).  A batch is therefore the same whatever
 * the thread count or scheduling, and a resumed run can start at any epoch.
 * The images of a batch are decoded in parallel with OpenMP.
 */
#include "kfac/kfac_dataset.h"
#include "kfac/kfac_rng.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

enum {
    MAX_CHANNELS = 4,     /* size of the config's mean/std arrays */
    MAX_PAD = 4096,       /* keeps 2 * pad + 1 and the offsets far from overflow */
    /* Tags that keep an epoch's permutation and augmentation streams apart. */
    STREAM_PERMUTATION = 1,
    STREAM_AUGMENT = 2
};

/* The first read_image failure of a batch.  Workers' error messages are
 * thread-local, so the failing worker copies its message here and the
 * calling thread re-raises it. */
typedef struct batch_failure {
    kfac_status status;
    size_t position; /* lowest failing position wins: deterministic report */
    char message[512];
} batch_failure;

struct kfac_batcher {
    const kfac_dataset *ds;
    kfac_batcher_config cfg;
    int threads;
    size_t image_size;    /* height * width * channels */
    size_t batches;       /* per epoch */
    size_t next_batch;    /* index in the epoch of the batch next() returns */
    size_t *perm;         /* this epoch's order of the ds->count images */
    uint64_t augment_key; /* this epoch's seed of the per-sample generators */
    uint8_t *raw;         /* one uint8 image per thread */
    float lut[MAX_CHANNELS][256]; /* normalised value of each pixel value */
    batch_failure failure;
};

static kfac_status check_config(const kfac_dataset *ds, const kfac_batcher_config *cfg)
{
    if (cfg->batch_size < 1) return KFAC_ERR(KFAC_EINVAL, "batch_size %d < 1", cfg->batch_size);
    if (ds->count == 0) return KFAC_ERR(KFAC_EINVAL, "the dataset has no images");
    if (cfg->drop_last && ds->count < (size_t)cfg->batch_size)
        return KFAC_ERR(KFAC_EINVAL, "drop_last with batch_size %d > %zu images leaves no batch",
                        cfg->batch_size, ds->count);
    if (ds->height < 1 || ds->width < 1 || ds->channels < 1 || ds->channels > MAX_CHANNELS)
        return KFAC_ERR(KFAC_EINVAL, "unsupported image shape %dx%dx%d (1 to %d channels)",
                        ds->height, ds->width, ds->channels, MAX_CHANNELS);
    if (cfg->augment != KFAC_AUGMENT_NONE && cfg->augment != KFAC_AUGMENT_PAD_CROP_FLIP)
        return KFAC_ERR(KFAC_EINVAL, "unknown augmentation %d", (int)cfg->augment);
    if (cfg->augment == KFAC_AUGMENT_PAD_CROP_FLIP && (cfg->pad < 0 || cfg->pad > MAX_PAD))
        return KFAC_ERR(KFAC_EINVAL, "pad %d outside [0, %d]", cfg->pad, MAX_PAD);
    for (int c = 0; c < ds->channels; c++)
        if (!isfinite(cfg->mean[c]) || !(cfg->std[c] > 0) || !isfinite(cfg->std[c]))
            return KFAC_ERR(KFAC_EINVAL, "channel %d: normalisation needs a finite mean and "
                            "std > 0 (mean %g, std %g)", c, cfg->mean[c], cfg->std[c]);
    return KFAC_OK;
}

/* A pixel takes only 256 values, so normalisation is a table look-up. */
static void fill_lut(kfac_batcher *b)
{
    for (int c = 0; c < b->ds->channels; c++)
        for (int v = 0; v < 256; v++)
            b->lut[c][v] = (float)((v / 255.0 - b->cfg.mean[c]) / b->cfg.std[c]);
}

kfac_status kfac_batcher_init(kfac_batcher **out, const kfac_dataset *ds,
                              const kfac_batcher_config *cfg)
{
    *out = NULL;
    KFAC_TRY(check_config(ds, cfg));
    kfac_batcher *b = calloc(1, sizeof *b);
    if (!b) return KFAC_ERR(KFAC_ENOMEM, "cannot allocate the batcher");
    b->ds = ds;
    b->cfg = *cfg;
    b->threads = cfg->threads > 0 ? cfg->threads : 1;
    b->image_size = (size_t)ds->height * (size_t)ds->width * (size_t)ds->channels;
    size_t batch = (size_t)cfg->batch_size;
    b->batches = cfg->drop_last ? ds->count / batch : (ds->count + batch - 1) / batch;
    b->perm = malloc(ds->count * sizeof *b->perm);
    b->raw = malloc((size_t)b->threads * b->image_size);
    if (!b->perm || !b->raw) {
        kfac_batcher_free(b);
        return KFAC_ERR(KFAC_ENOMEM, "cannot allocate the batcher buffers (%zu images)",
                        ds->count);
    }
    fill_lut(b);
    kfac_batcher_start_epoch(b, 0);
    *out = b;
    return KFAC_OK;
}

void kfac_batcher_free(kfac_batcher *b)
{
    if (!b) return;
    free(b->perm);
    free(b->raw);
    free(b);
}

size_t kfac_batcher_batches_per_epoch(const kfac_batcher *b) { return b->batches; }

/* Fisher-Yates: position i-1 takes a uniform pick among the first i. */
static void shuffle(size_t *perm, size_t n, uint64_t seed)
{
    kfac_rng rng;
    kfac_rng_seed(&rng, seed);
    for (size_t i = n; i > 1; i--) {
        size_t j = (size_t)kfac_rng_below(&rng, i);
        size_t t = perm[i - 1];
        perm[i - 1] = perm[j];
        perm[j] = t;
    }
}

void kfac_batcher_start_epoch(kfac_batcher *b, int epoch)
{
    uint64_t epoch_key = kfac_mix64(b->cfg.seed, (uint64_t)(int64_t)epoch);
    b->augment_key = kfac_mix64(epoch_key, STREAM_AUGMENT);
    for (size_t i = 0; i < b->ds->count; i++) b->perm[i] = i;
    if (b->cfg.shuffle) shuffle(b->perm, b->ds->count, kfac_mix64(epoch_key, STREAM_PERMUTATION));
    b->next_batch = 0;
}

static void normalise(const kfac_batcher *b, const uint8_t *src, float *out)
{
    int channels = b->ds->channels;
    for (size_t i = 0; i < b->image_size; i++) out[i] = b->lut[i % channels][src[i]];
}

/* Zero-pads by `pad`, crops a random HxW window back and flips it
 * horizontally with probability 1/2 (torchvision's RandomCrop(padding) then
 * RandomHorizontalFlip), normalising on the way.  Padding pixels are value 0
 * before normalisation, as with pad-then-normalise. */
static void pad_crop_flip(const kfac_batcher *b, const uint8_t *src, float *out, size_t position)
{
    int height = b->ds->height, width = b->ds->width, channels = b->ds->channels;
    int pad = b->cfg.pad;
    kfac_rng rng;
    kfac_rng_seed(&rng, kfac_mix64(b->augment_key, position));
    /* Crop offsets relative to the unpadded image, in [-pad, pad]. */
    int dy = (int)kfac_rng_below(&rng, 2 * (uint64_t)pad + 1) - pad;
    int dx = (int)kfac_rng_below(&rng, 2 * (uint64_t)pad + 1) - pad;
    int flip = (int)(kfac_rng_next_u64(&rng) >> 63);
    for (int y = 0; y < height; y++) {
        int sy = y + dy;
        for (int x = 0; x < width; x++) {
            int sx = (flip ? width - 1 - x : x) + dx;
            float *o = out + ((size_t)y * width + x) * channels;
            if (sy >= 0 && sy < height && sx >= 0 && sx < width) {
                const uint8_t *s = src + ((size_t)sy * width + sx) * channels;
                for (int c = 0; c < channels; c++) o[c] = b->lut[c][s[c]];
            } else {
                for (int c = 0; c < channels; c++) o[c] = b->lut[c][0];
            }
        }
    }
}

static void record_failure(kfac_batcher *b, size_t position, kfac_status status)
{
#pragma omp critical(kfac_batcher_failure)
    if (b->failure.status == KFAC_OK || position < b->failure.position) {
        b->failure.status = status;
        b->failure.position = position;
        snprintf(b->failure.message, sizeof b->failure.message, "%s", kfac_last_error());
    }
}

static int thread_index(void)
{
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* Produces the sample at `position` of the epoch into out / label. */
static void make_sample(kfac_batcher *b, size_t position, float *out, int32_t *label)
{
    uint8_t *raw = b->raw + (size_t)thread_index() * b->image_size;
    kfac_status status = b->ds->read_image(b->ds, b->perm[position], raw, label);
    if (status != KFAC_OK) {
        record_failure(b, position, status);
        return;
    }
    if (b->cfg.augment == KFAC_AUGMENT_PAD_CROP_FLIP)
        pad_crop_flip(b, raw, out, position);
    else
        normalise(b, raw, out);
}

/* Positions [first, first + count) of the epoch's order into the buffers. */
static kfac_status read_positions(kfac_batcher *b, size_t first, int count, float *images,
                                  int32_t *labels)
{
    b->failure.status = KFAC_OK;
#pragma omp parallel for num_threads(b->threads) schedule(static)
    for (int i = 0; i < count; i++)
        make_sample(b, first + (size_t)i, images + (size_t)i * b->image_size, labels + i);
    if (b->failure.status != KFAC_OK)
        return KFAC_ERR(b->failure.status, "%s", b->failure.message);
    return KFAC_OK;
}

kfac_status kfac_batcher_next(kfac_batcher *b, float *images, int32_t *labels, int *n)
{
    *n = 0;
    if (b->next_batch >= b->batches) return KFAC_OK;
    size_t first = b->next_batch * (size_t)b->cfg.batch_size;
    size_t left = b->ds->count - first;
    int count = left < (size_t)b->cfg.batch_size ? (int)left : b->cfg.batch_size;
    /* On failure the batch is not consumed: a retry reads the same batch. */
    KFAC_TRY(read_positions(b, first, count, images, labels));
    b->next_batch++;
    *n = count;
    return KFAC_OK;
}

kfac_status kfac_batcher_read(kfac_batcher *b, size_t batch, int offset, int count,
                              float *images, int32_t *labels, int *n)
{
    *n = 0;
    if (batch >= b->batches || offset < 0 || offset >= b->cfg.batch_size || count < 1)
        return KFAC_OK;
    if (count > b->cfg.batch_size - offset) count = b->cfg.batch_size - offset;
    size_t first = batch * (size_t)b->cfg.batch_size + (size_t)offset;
    if (first >= b->ds->count) return KFAC_OK;
    if ((size_t)count > b->ds->count - first) count = (int)(b->ds->count - first);
    KFAC_TRY(read_positions(b, first, count, images, labels));
    *n = count;
    return KFAC_OK;
}
