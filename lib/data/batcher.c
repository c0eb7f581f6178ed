/* batcher.c - turns a kfac_dataset into shuffled, augmented, normalised
 * NHWC float batches.
 *
 * Every random choice is a pure function of (seed, epoch, position in the
 * epoch): the epoch's permutation comes from a generator seeded by
 * (seed, epoch), and each sample's crop and flip from its own generator
 * seeded by (seed, epoch, position).  A batch is therefore the same whatever
 * the thread count or scheduling, and a resumed run can start at any epoch.
 * The images of a batch are decoded in parallel with OpenMP, each thread
 * with its own buffers (source image, crop, sample, resampling scratch),
 * all allocated at init.  Crops and resizes follow torchvision's PIL path
 * (crop, then Pillow's antialiased bilinear resize, resize.h), so samples
 * match what a PyTorch pipeline would feed the same model.
 */
#include "kfac/kfac_dataset.h"
#include "kfac/kfac_rng.h"

#include "data/resize.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define DEFAULT_SCALE_MIN 0.08f
#define DEFAULT_RATIO_MIN (3.0f / 4.0f)
#define DEFAULT_RATIO_MAX (4.0f / 3.0f)

enum {
    MAX_CHANNELS = 4,     /* size of the config's mean/std arrays */
    MAX_PAD = 4096,       /* keeps 2 * pad + 1 and the offsets far from overflow */
    MAX_SIDE = 1 << 15,   /* output and resize sides */
    RRC_TRIES = 10,       /* torchvision's attempts before the central fallback */
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
    size_t source_size;   /* bytes of the largest stored image */
    size_t image_size;    /* out_height * out_width * channels: one sample */
    size_t batches;       /* per epoch */
    size_t next_batch;    /* index in the epoch of the batch next() returns */
    size_t *perm;         /* this epoch's order of the ds->count images */
    uint64_t augment_key; /* this epoch's seed of the per-sample generators */
    uint8_t *raw;         /* one stored image per thread */
    uint8_t *crop;        /* one random-resized crop box per thread */
    uint8_t *sample;      /* one uint8 sample per thread */
    kfac__resize_work *resize; /* resampling scratch per thread */
    float lut[MAX_CHANNELS][256]; /* normalised value of each pixel value */
    batch_failure failure;
};

/* The configuration with its zeros replaced by the documented defaults. */
static kfac_batcher_config with_defaults(const kfac_dataset *ds, const kfac_batcher_config *in)
{
    kfac_batcher_config c = *in;
    if (!c.out_height) c.out_height = ds->height;
    if (!c.out_width) c.out_width = ds->width;
    if (!c.scale_min) c.scale_min = DEFAULT_SCALE_MIN;
    if (!c.ratio_min) c.ratio_min = DEFAULT_RATIO_MIN;
    if (!c.ratio_max) c.ratio_max = DEFAULT_RATIO_MAX;
    return c;
}

/* `cfg` as given (a zero output size is only allowed for fixed-size data)
 * and `full`, its defaults filled in. */
static kfac_status check_config(const kfac_dataset *ds, const kfac_batcher_config *cfg,
                                const kfac_batcher_config *full)
{
    if (cfg->batch_size < 1) return KFAC_ERR(KFAC_EINVAL, "batch_size %d < 1", cfg->batch_size);
    if (ds->count == 0) return KFAC_ERR(KFAC_EINVAL, "the dataset has no images");
    if (cfg->drop_last && ds->count < (size_t)cfg->batch_size)
        return KFAC_ERR(KFAC_EINVAL, "drop_last with batch_size %d > %zu images leaves no batch",
                        cfg->batch_size, ds->count);
    if (ds->height < 1 || ds->width < 1 || ds->channels < 1 || ds->channels > MAX_CHANNELS)
        return KFAC_ERR(KFAC_EINVAL, "unsupported image shape %dx%dx%d (1 to %d channels)",
                        ds->height, ds->width, ds->channels, MAX_CHANNELS);
    if (cfg->augment != KFAC_AUGMENT_NONE && cfg->augment != KFAC_AUGMENT_PAD_CROP_FLIP &&
        cfg->augment != KFAC_AUGMENT_RANDOM_RESIZED_CROP)
        return KFAC_ERR(KFAC_EINVAL, "unknown augmentation %d", (int)cfg->augment);
    int out_height = full->out_height, out_width = full->out_width;
    if (!ds->fixed_size && (!cfg->out_height || !cfg->out_width))
        return KFAC_ERR(KFAC_EINVAL, "the images differ in size: the batcher needs an output "
                        "size (crop)");
    if (out_height < 1 || out_width < 1 || out_height > MAX_SIDE || out_width > MAX_SIDE)
        return KFAC_ERR(KFAC_EINVAL, "output size %dx%d outside [1, %d]", out_height, out_width,
                        MAX_SIDE);
    if (cfg->resize < 0 || cfg->resize > MAX_SIDE)
        return KFAC_ERR(KFAC_EINVAL, "resize %d outside [0, %d]", cfg->resize, MAX_SIDE);
    if (cfg->augment == KFAC_AUGMENT_PAD_CROP_FLIP) {
        if (cfg->pad < 0 || cfg->pad > MAX_PAD)
            return KFAC_ERR(KFAC_EINVAL, "pad %d outside [0, %d]", cfg->pad, MAX_PAD);
        if (!ds->fixed_size || out_height != ds->height || out_width != ds->width)
            return KFAC_ERR(KFAC_EINVAL, "pad-crop keeps the image size: it needs images all "
                            "of the output size %dx%d", out_height, out_width);
    }
    if (cfg->augment == KFAC_AUGMENT_RANDOM_RESIZED_CROP) {
        float scale_min = full->scale_min, ratio_min = full->ratio_min, ratio_max = full->ratio_max;
        if (!(scale_min > 0 && scale_min <= 1))
            return KFAC_ERR(KFAC_EINVAL, "random-resized crop: scale_min %g outside (0, 1]",
                            scale_min);
        if (!(ratio_min > 0 && ratio_min <= ratio_max && isfinite(ratio_max)))
            return KFAC_ERR(KFAC_EINVAL, "random-resized crop: ratio range [%g, %g] is empty",
                            ratio_min, ratio_max);
    }
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
    kfac_batcher_config full = with_defaults(ds, cfg);
    KFAC_TRY(check_config(ds, cfg, &full));
    kfac_batcher *b = calloc(1, sizeof *b);
    if (!b) return KFAC_ERR(KFAC_ENOMEM, "cannot allocate the batcher");
    b->ds = ds;
    b->cfg = full;
    b->threads = cfg->threads > 0 ? cfg->threads : 1;
    int oh = b->cfg.out_height, ow = b->cfg.out_width;
    b->source_size = (size_t)ds->height * (size_t)ds->width * (size_t)ds->channels;
    b->image_size = (size_t)oh * (size_t)ow * (size_t)ds->channels;
    size_t batch = (size_t)cfg->batch_size;
    b->batches = cfg->drop_last ? ds->count / batch : (ds->count + batch - 1) / batch;
    b->perm = malloc(ds->count * sizeof *b->perm);
    b->raw = malloc((size_t)b->threads * b->source_size);
    b->crop = malloc((size_t)b->threads * b->source_size);
    b->sample = malloc((size_t)b->threads * b->image_size);
    b->resize = calloc((size_t)b->threads, sizeof *b->resize);
    /* The largest reduction: a crop of the whole largest image, or its
     * shorter side scaled down to `resize`. */
    double max_scale = fmax((double)ds->height / oh, (double)ds->width / ow) + 1;
    if (cfg->resize) max_scale = fmax(max_scale, fmax(ds->height, ds->width) / cfg->resize + 1);
    int reserved = b->resize != NULL;
    for (int i = 0; reserved && i < b->threads; i++)
        reserved = kfac__resize_reserve(&b->resize[i], ds->height, ds->channels, oh, ow,
                                        max_scale) == KFAC_OK;
    if (!b->perm || !b->raw || !b->crop || !b->sample || !reserved) {
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
    free(b->crop);
    free(b->sample);
    if (b->resize)
        for (int i = 0; i < b->threads; i++) kfac__resize_work_free(&b->resize[i]);
    free(b->resize);
    free(b);
}

size_t kfac_batcher_batches_per_epoch(const kfac_batcher *b) { return b->batches; }

int kfac_batcher_batch_size(const kfac_batcher *b) { return b->cfg.batch_size; }

size_t kfac_batcher_image_floats(const kfac_batcher *b) { return b->image_size; }

void kfac_batcher_sample_shape(const kfac_batcher *b, int *height, int *width, int *channels)
{
    *height = b->cfg.out_height;
    *width = b->cfg.out_width;
    *channels = b->ds->channels;
}

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

/* A sample-sized uint8 image into floats, mirrored when `flip`. */
static void normalise(const kfac_batcher *b, const uint8_t *src, int flip, float *out)
{
    int channels = b->ds->channels, width = b->cfg.out_width;
    if (!flip) {
        for (size_t i = 0; i < b->image_size; i++) out[i] = b->lut[i % channels][src[i]];
        return;
    }
    for (int y = 0; y < b->cfg.out_height; y++)
        for (int x = 0; x < width; x++) {
            const uint8_t *s = src + ((size_t)y * width + (width - 1 - x)) * channels;
            float *o = out + ((size_t)y * width + x) * channels;
            for (int c = 0; c < channels; c++) o[c] = b->lut[c][s[c]];
        }
}

/* A crop of an image: rows [y, y + h), columns [x, x + w). */
typedef struct crop_box {
    int x, y, w, h;
} crop_box;

/* torchvision's RandomResizedCrop.get_params: the crop box of an image of
 * height x width. */
static crop_box random_resized_box(const kfac_batcher *b, kfac_rng *rng, int height, int width)
{
    double area = (double)height * width;
    double log_lo = log(b->cfg.ratio_min), log_hi = log(b->cfg.ratio_max);
    for (int attempt = 0; attempt < RRC_TRIES; attempt++) {
        double target = area * (b->cfg.scale_min + (1 - b->cfg.scale_min) * kfac_rng_uniform(rng));
        double ratio = exp(log_lo + (log_hi - log_lo) * kfac_rng_uniform(rng));
        int w = (int)lround(sqrt(target * ratio)), h = (int)lround(sqrt(target / ratio));
        if (w > 0 && w <= width && h > 0 && h <= height) {
            int y = (int)kfac_rng_below(rng, (uint64_t)(height - h) + 1);
            int x = (int)kfac_rng_below(rng, (uint64_t)(width - w) + 1);
            return (crop_box){x, y, w, h};
        }
    }
    double in_ratio = (double)width / height;
    int w = width, h = height;
    if (in_ratio < b->cfg.ratio_min)
        h = (int)lround(w / b->cfg.ratio_min);
    else if (in_ratio > b->cfg.ratio_max)
        w = (int)lround(h * b->cfg.ratio_max);
    return (crop_box){(width - w) / 2, (height - h) / 2, w, h};
}

/* Copies a box of src (width x channels per row) to dst, tightly packed. */
static void copy_box(const uint8_t *src, int width, int channels, crop_box box, uint8_t *dst)
{
    size_t row = (size_t)box.w * channels;
    for (int y = 0; y < box.h; y++)
        memcpy(dst + (size_t)y * row,
               src + ((size_t)(box.y + y) * width + (size_t)box.x) * channels, row);
}

/* torchvision's Resize(resize) then CenterCrop: the shorter side scaled to
 * cfg.resize (or, without it, up to the output size when the image is
 * smaller), then the central out_height x out_width window. */
static kfac_status center_crop(kfac_batcher *b, const uint8_t *src, int height, int width,
                               kfac__resize_work *work, uint8_t *dst)
{
    int oh = b->cfg.out_height, ow = b->cfg.out_width, channels = b->ds->channels;
    int side = b->cfg.resize;
    if (!side && (height < oh || width < ow)) {
        int shorter = height < width ? height : width;
        side = (int)ceil(shorter * fmax((double)oh / height, (double)ow / width));
    }
    int rh = height, rw = width;
    for (; side; side++) { /* the long side is rounded down: never below the crop */
        kfac__resize_shape(height, width, side, &rh, &rw);
        if (rh >= oh && rw >= ow) break;
    }
    int top = (int)lround((rh - oh) / 2.0), left = (int)lround((rw - ow) / 2.0);
    if (rh == height && rw == width) {
        copy_box(src, width, channels, (crop_box){left, top, ow, oh}, dst);
        return KFAC_OK;
    }
    /* the scratch was reserved at init: this does not allocate */
    return kfac__resize(src, height, width, channels, rh, rw, top, left, oh, ow, dst, work);
}

/* Zero-pads by `pad`, crops a random HxW window back and flips it
 * horizontally with probability 1/2 (torchvision's RandomCrop(padding) then
 * RandomHorizontalFlip), normalising on the way.  Padding pixels are value 0
 * before normalisation, as with pad-then-normalise. */
static void pad_crop_flip(const kfac_batcher *b, const uint8_t *src, float *out, size_t position)
{
    int height = b->cfg.out_height, width = b->cfg.out_width, channels = b->ds->channels;
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
    int thread = thread_index();
    uint8_t *raw = b->raw + (size_t)thread * b->source_size;
    uint8_t *sample = b->sample + (size_t)thread * b->image_size;
    kfac__resize_work *work = &b->resize[thread];
    int height, width, channels = b->ds->channels;
    int oh = b->cfg.out_height, ow = b->cfg.out_width;
    kfac_status status = b->ds->read_image(b->ds, b->perm[position], raw, &height, &width, label);
    if (status != KFAC_OK) {
        record_failure(b, position, status);
        return;
    }
    if (b->cfg.augment == KFAC_AUGMENT_PAD_CROP_FLIP) {
        pad_crop_flip(b, raw, out, position);
        return;
    }
    if (b->cfg.augment == KFAC_AUGMENT_NONE) {
        if (height == oh && width == ow && !b->cfg.resize) {
            normalise(b, raw, 0, out);
            return;
        }
        status = center_crop(b, raw, height, width, work, sample);
        if (status != KFAC_OK) {
            record_failure(b, position, status);
            return;
        }
        normalise(b, sample, 0, out);
        return;
    }
    /* torchvision's PIL path: crop the box, resize it, then flip. */
    kfac_rng rng;
    kfac_rng_seed(&rng, kfac_mix64(b->augment_key, position));
    crop_box box = random_resized_box(b, &rng, height, width);
    int flip = (int)(kfac_rng_next_u64(&rng) >> 63);
    uint8_t *crop = b->crop + (size_t)thread * b->source_size;
    copy_box(raw, width, channels, box, crop);
    status = kfac__resize(crop, box.h, box.w, channels, oh, ow, 0, 0, oh, ow, sample, work);
    if (status != KFAC_OK) {
        record_failure(b, position, status);
        return;
    }
    normalise(b, sample, flip, out);
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
