/* test_loader.c - the input pipeline after the dataset: the batcher's
 * random-resized and center crops (read back from images whose pixels
 * encode their own coordinates; the resize itself is tested against Pillow
 * and a double-precision reference in test_prep), and the loader: the same
 * pieces whatever the prefetch depth, ranks' shares disjoint and covering
 * the epoch, a cursor that resumes exactly, read errors and wait time;
 * and the trainer's feed into a model (pieces bound in order with their own
 * labels through two alternating input buffers). */
#include "core/feed.h"
#include "kfac/kfac_dataset.h"
#include "kfac/kfac_loader.h"
#include "testutil.h"

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

/* ---- a dataset whose pixels encode their coordinates ---- */

/* Image i is the dataset's height x width, or smaller by steps of a tenth
 * and a sixteenth when sizes vary; channel 0 holds the column, channel 1
 * the row (both < 256), channel 2 the index. */
enum { COORD_CHANNELS = 3 };

typedef struct coord_dataset {
    kfac_dataset base;
    int variable;         /* sizes vary with the index */
    size_t fail_index;    /* read_image fails here */
    int sleep_us;         /* per read, to make the loader slow */
} coord_dataset;

static void coord_size(const coord_dataset *d, size_t index, int *h, int *w)
{
    *h = d->base.height - (d->variable ? (int)(index % 7) * (d->base.height / 10) : 0);
    *w = d->base.width - (d->variable ? (int)(index % 11) * (d->base.width / 16) : 0);
}

static kfac_status coord_read(const kfac_dataset *ds, size_t index, uint8_t *hwc, int *height,
                              int *width, int32_t *label)
{
    const coord_dataset *d = (const coord_dataset *)ds;
    if (index == d->fail_index) return KFAC_ERR(KFAC_EIO, "shard-3.h5: image %zu: corrupt", index);
    if (d->sleep_us) nanosleep(&(struct timespec){0, d->sleep_us * 1000L}, NULL);
    coord_size(d, index, height, width);
    for (int y = 0; y < *height; y++)
        for (int x = 0; x < *width; x++) {
            uint8_t *p = hwc + ((size_t)y * *width + x) * COORD_CHANNELS;
            p[0] = (uint8_t)x, p[1] = (uint8_t)y, p[2] = (uint8_t)(index & 255);
        }
    *label = (int32_t)index;
    return KFAC_OK;
}

static coord_dataset coord_make(size_t count, int height, int width, int variable)
{
    coord_dataset d = {.variable = variable, .fail_index = SIZE_MAX};
    d.base = (kfac_dataset){.count = count, .height = height, .width = width,
                            .channels = COORD_CHANNELS, .fixed_size = !variable,
                            .num_classes = 10, .read_image = coord_read};
    return d;
}

/* mean 0, std 1/255 per channel: a sample's floats are its uint8 values. */
static kfac_batcher_config raw_config(int batch, kfac_augment augment, int side)
{
    kfac_batcher_config c = {.batch_size = batch, .augment = augment, .out_height = side,
                             .out_width = side, .seed = 5, .shuffle = 1, .threads = 2};
    for (int i = 0; i < 4; i++) c.std[i] = 1.0f / 255.0f;
    return c;
}

/* The uint8 value of a sample's pixel (undoing the 1/255 scalings). */
static float at(const float *img, int side, int y, int x, int c)
{
    return roundf(img[((size_t)y * side + x) * COORD_CHANNELS + c] * 1000.0f) / 1000.0f;
}

static void test_random_resized_crop(void)
{
    enum { N = 400, SIDE = 32 };
    coord_dataset d = coord_make(N, 200, 240, 1);
    kfac_batcher_config cfg = raw_config(N, KFAC_AUGMENT_RANDOM_RESIZED_CROP, SIDE);
    kfac_batcher *b = NULL;
    CHECK_OK(kfac_batcher_init(&b, &d.base, &cfg));
    if (!b) return;
    float *img = malloc((size_t)N * SIDE * SIDE * COORD_CHANNELS * sizeof(float));
    int32_t labels[N];
    int n = 0;
    CHECK_OK(kfac_batcher_next(b, img, labels, &n));
    int flips = 0, bad_area = 0, bad_ratio = 0, bad_inside = 0;
    double min_area = 1, max_area = 0;
    for (int i = 0; i < n; i++) {
        const float *s = img + (size_t)i * SIDE * SIDE * COORD_CHANNELS;
        int h, w;
        coord_size(&d, (size_t)labels[i], &h, &w);
        /* Pixel centres sample the box at (k + 0.5) / SIDE of its width. */
        double x_first = at(s, SIDE, SIDE / 2, 0, 0), x_last = at(s, SIDE, SIDE / 2, SIDE - 1, 0);
        double y_first = at(s, SIDE, 0, SIDE / 2, 1), y_last = at(s, SIDE, SIDE - 1, SIDE / 2, 1);
        int flipped = x_last < x_first;
        flips += flipped;
        double bw = fabs(x_last - x_first) * SIDE / (SIDE - 1);
        double bh = (y_last - y_first) * SIDE / (SIDE - 1);
        double area = bw * bh / ((double)h * w), ratio = bw / bh;
        if (area < min_area) min_area = area;
        if (area > max_area) max_area = area;
        /* Slack: the box is estimated from filtered pixel centres. */
        bad_area += area < 0.08 * 0.8 || area > 1.05;
        bad_ratio += ratio < 0.75 * 0.85 || ratio > 4.0 / 3 * 1.15;
        /* Box edges: half an output pixel before the first centre. */
        double left = fmin(x_first, x_last) - bw / (2 * SIDE), top = y_first - bh / (2 * SIDE);
        /* At an image edge the filter's clipped support pulls the first
         * centre outward by under a pixel. */
        bad_inside += left < -1 || left + bw > w + 1 || top < -1 || top + bh > h + 1;
        if (at(s, SIDE, 3, 3, 2) != (float)(labels[i] & 255)) bad_inside++;
    }
    CHECK(n == N, "%d samples", n);
    CHECK(bad_area == 0, "%d crops with area fraction outside [0.08, 1] (seen %.3f..%.3f)",
          bad_area, min_area, max_area);
    CHECK(min_area < 0.2 && max_area > 0.8, "area fractions span the range: %.3f..%.3f",
          min_area, max_area);
    CHECK(bad_ratio == 0, "%d crops with aspect ratio outside [3/4, 4/3]", bad_ratio);
    CHECK(bad_inside == 0, "%d crops outside their image", bad_inside);
    CHECK(flips > N / 2 - 60 && flips < N / 2 + 60, "%d of %d flipped", flips, N);

    /* Same (seed, epoch): same samples, whatever the thread count. */
    float *again = malloc((size_t)N * SIDE * SIDE * COORD_CHANNELS * sizeof(float));
    kfac_batcher *one = NULL;
    cfg.threads = 1;
    CHECK_OK(kfac_batcher_init(&one, &d.base, &cfg));
    int32_t labels1[N];
    CHECK_OK(kfac_batcher_next(one, again, labels1, &n));
    CHECK(!memcmp(img, again, (size_t)N * SIDE * SIDE * COORD_CHANNELS * sizeof(float)) &&
              !memcmp(labels, labels1, sizeof labels),
          "1 and 2 threads give the same crops");
    kfac_batcher_free(one);
    kfac_batcher_free(b);
    free(img), free(again);
}

static void test_center_crop(void)
{
    enum { SIDE = 24 };
    float img[SIDE * SIDE * COORD_CHANNELS];
    int32_t label;
    int n;

    /* No resize: the central SIDE x SIDE pixels, exactly (torchvision offsets). */
    coord_dataset d = coord_make(1, 51, 40, 0);
    kfac_batcher_config cfg = raw_config(1, KFAC_AUGMENT_NONE, SIDE);
    cfg.shuffle = 0;
    kfac_batcher *b = NULL;
    CHECK_OK(kfac_batcher_init(&b, &d.base, &cfg));
    if (!b) return;
    CHECK_OK(kfac_batcher_next(b, img, &label, &n));
    int top = (int)lround((51 - SIDE) / 2.0), left = (int)lround((40 - SIDE) / 2.0);
    CHECK(at(img, SIDE, 0, 0, 0) == left && at(img, SIDE, 0, 0, 1) == top &&
              at(img, SIDE, SIDE - 1, SIDE - 1, 0) == left + SIDE - 1 &&
              at(img, SIDE, SIDE - 1, SIDE - 1, 1) == top + SIDE - 1,
          "center crop starts at (%g, %g)", at(img, SIDE, 0, 0, 0), at(img, SIDE, 0, 0, 1));
    kfac_batcher_free(b);

    /* resize 32 on a 64 x 80 image: 32 x 40, whose central 24 x 24 starts
     * at (8, 4), i.e. source pixels from (16, 8); resized pixel k samples
     * source 2k + 0.5. */
    d = coord_make(1, 64, 80, 0);
    cfg.resize = 32;
    CHECK_OK(kfac_batcher_init(&b, &d.base, &cfg));
    if (!b) return;
    CHECK_OK(kfac_batcher_next(b, img, &label, &n));
    double x0 = 40 - 24, y0 = 32 - 24; /* box origin; pixel k samples origin + 2k + 1 - 0.5 */
    double worst = 0;
    for (int k = 1; k < SIDE - 1; k++) { /* edges are clipped by the filter: skip them */
        worst = fmax(worst, fabs(at(img, SIDE, k, k, 0) - (x0 + 2 * k + 0.5)));
        worst = fmax(worst, fabs(at(img, SIDE, k, k, 1) - (y0 + 2 * k + 0.5)));
    }
    CHECK(worst <= 0.51, "resized center crop is off by %.2f pixels", worst);
    kfac_batcher_free(b);
}

/* ---- the loader ---- */

enum { LN = 240, LBATCH = 48, LPIECE = 8 };

/* Reads a whole epoch through a loader of this rank's share; returns the
 * pieces' images in `out` (room for the share of every batch). */
static int read_share(kfac_batcher *b, int rank, int ranks, int depth, int epoch, float *out,
                      int32_t *labels, size_t image_floats)
{
    kfac_loader *l = NULL;
    int count = LBATCH / ranks;
    kfac_loader_config lc = {.first = rank * count, .count = count, .piece = LPIECE, .depth = depth};
    CHECK_OK(kfac_loader_init(&l, b, &lc));
    if (!l) return 0;
    CHECK_OK(kfac_loader_start(l, (kfac_loader_cursor){epoch, 0}));
    int total = 0, pieces = 0, bad_order = 0;
    kfac_loader_piece p;
    while (kfac_loader_next(l, &p) == KFAC_OK && p.n > 0) {
        bad_order += p.batch != (size_t)(pieces / (count / LPIECE)) || p.index != pieces % (count / LPIECE);
        memcpy(out + (size_t)total * image_floats, p.images, (size_t)p.n * image_floats * sizeof(float));
        memcpy(labels + total, p.labels, (size_t)p.n * sizeof(int32_t));
        total += p.n;
        pieces++;
    }
    CHECK(bad_order == 0, "rank %d depth %d: %d pieces out of order", rank, depth, bad_order);
    kfac_loader_free(l);
    return total;
}

static void test_loader_depth_and_shares(void)
{
    coord_dataset d = coord_make(LN, 20, 16, 1);
    kfac_batcher_config cfg = raw_config(LBATCH, KFAC_AUGMENT_RANDOM_RESIZED_CROP, 12);
    cfg.drop_last = 1;
    kfac_batcher *b = NULL;
    CHECK_OK(kfac_batcher_init(&b, &d.base, &cfg));
    if (!b) return;
    size_t f = kfac_batcher_image_floats(b);
    float *a = malloc(LN * f * sizeof(float)), *c = malloc(LN * f * sizeof(float));
    int32_t la[LN], lc[LN];
    int na = read_share(b, 0, 1, 0, 3, a, la, f);
    int nc = read_share(b, 0, 1, 3, 3, c, lc, f);
    CHECK(na == LN && nc == LN, "one rank reads the epoch: %d and %d images", na, nc);
    CHECK(!memcmp(a, c, LN * f * sizeof(float)) && !memcmp(la, lc, sizeof la),
          "prefetch depth 3 gives the bits of depth 0");

    /* 3 ranks: disjoint shares that together are the one-rank epoch. */
    int seen[LN] = {0}, total = 0, mismatch = 0;
    for (int r = 0; r < 3; r++) {
        int n = read_share(b, r, 3, 2, 3, c, lc, f);
        total += n;
        for (int i = 0; i < n; i++) {
            seen[lc[i]]++;
            /* image i of rank r in batch k is image r*16 + i%16 of batch k */
            int k = i / 16, pos = k * LBATCH + r * 16 + i % 16;
            mismatch += la[pos] != lc[i] || memcmp(a + (size_t)pos * f, c + (size_t)i * f, f * sizeof(float));
        }
    }
    int once = 0;
    for (int i = 0; i < LN; i++) once += seen[i] == 1;
    CHECK(total == LN && once == LN, "3 ranks: %d images, %d seen exactly once", total, once);
    CHECK(mismatch == 0, "%d images differ from the one-rank epoch at their place", mismatch);
    free(a), free(c);
    kfac_batcher_free(b);
}

static void test_loader_cursor(void)
{
    coord_dataset d = coord_make(LN, 20, 16, 0);
    kfac_batcher_config cfg = raw_config(LBATCH, KFAC_AUGMENT_RANDOM_RESIZED_CROP, 12);
    cfg.drop_last = 1;
    kfac_batcher *b = NULL;
    CHECK_OK(kfac_batcher_init(&b, &d.base, &cfg));
    if (!b) return;
    size_t f = kfac_batcher_image_floats(b);
    kfac_loader_config lc = {.first = 16, .count = 16, .piece = LPIECE, .depth = 2};
    kfac_loader *l = NULL;
    CHECK_OK(kfac_loader_init(&l, b, &lc));
    if (!l) return;
    CHECK_OK(kfac_loader_start(l, (kfac_loader_cursor){1, 0}));
    kfac_loader_piece p;
    for (int i = 0; i < 4; i++) CHECK_OK(kfac_loader_next(l, &p)); /* batches 0 and 1 */
    kfac_loader_cursor at_step = kfac_loader_position(l);
    CHECK(at_step.epoch == 1 && at_step.batch == 2, "cursor (%d, %zu) after two batches",
          at_step.epoch, at_step.batch);
    float *cont = malloc(6 * LPIECE * f * sizeof(float));
    int32_t cont_labels[6 * LPIECE];
    for (int i = 0; i < 6; i++) {
        CHECK_OK(kfac_loader_next(l, &p));
        memcpy(cont + (size_t)i * LPIECE * f, p.images, LPIECE * f * sizeof(float));
        memcpy(cont_labels + i * LPIECE, p.labels, LPIECE * sizeof(int32_t));
    }
    CHECK_OK(kfac_loader_next(l, &p));
    CHECK(p.n == 0, "epoch over after 5 batches (%d images left)", p.n);
    kfac_loader_free(l);

    /* A fresh loader (a restarted job) at the saved cursor, after another
     * epoch was read: the same pieces. */
    CHECK_OK(kfac_loader_init(&l, b, &lc));
    CHECK_OK(kfac_loader_start(l, (kfac_loader_cursor){4, 0}));
    CHECK_OK(kfac_loader_next(l, &p));
    CHECK_OK(kfac_loader_start(l, at_step));
    int same = 1;
    for (int i = 0; i < 6; i++) {
        CHECK_OK(kfac_loader_next(l, &p));
        same &= p.n == LPIECE &&
                !memcmp(cont + (size_t)i * LPIECE * f, p.images, LPIECE * f * sizeof(float)) &&
                !memcmp(cont_labels + i * LPIECE, p.labels, LPIECE * sizeof(int32_t));
    }
    CHECK(same, "resumed at the cursor: the pieces an uninterrupted run read");
    kfac_loader_free(l);
    free(cont);
    kfac_batcher_free(b);
}

static void test_loader_failure_and_wait(void)
{
    coord_dataset d = coord_make(LN, 20, 16, 0);
    kfac_batcher_config cfg = raw_config(LBATCH, KFAC_AUGMENT_NONE, 0);
    cfg.shuffle = 0;
    kfac_batcher *b = NULL;
    CHECK_OK(kfac_batcher_init(&b, &d.base, &cfg));
    if (!b) return;
    kfac_loader_config lc = {.first = 0, .count = LBATCH, .piece = LPIECE, .depth = 3};
    kfac_loader *l = NULL;
    CHECK_OK(kfac_loader_init(&l, b, &lc));
    if (!l) return;

    /* Image 30 (batch 0, piece 3) fails: pieces 0-2 arrive, then its error. */
    d.fail_index = 30;
    CHECK_OK(kfac_loader_start(l, (kfac_loader_cursor){0, 0}));
    kfac_loader_piece p;
    for (int i = 0; i < 3; i++) CHECK_OK(kfac_loader_next(l, &p));
    kfac_status st = kfac_loader_next(l, &p);
    CHECK(st == KFAC_EIO && strstr(kfac_last_error(), "shard-3.h5: image 30: corrupt"),
          "read error reaches the caller: %s", kfac_last_error());
    CHECK(kfac_loader_next(l, &p) != KFAC_OK, "the loader stays failed");

    /* A slow dataset (2 ms per image) and a consumer that does nothing:
     * the wait is most of the time. */
    d.fail_index = SIZE_MAX;
    d.sleep_us = 2000;
    CHECK_OK(kfac_loader_start(l, (kfac_loader_cursor){0, 0}));
    kfac_loader_take_wait(l);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int images = 0;
    for (int i = 0; i < 6; i++) {
        CHECK_OK(kfac_loader_next(l, &p));
        images += p.n;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double elapsed = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    double wait = kfac_loader_take_wait(l);
    CHECK(images == 48 && wait > 0.5 * elapsed && wait <= elapsed + 1e-3,
          "loader-bound: waited %.3fs of %.3fs", wait, elapsed);
    CHECK(kfac_loader_take_wait(l) == 0, "take_wait resets");
    kfac_loader_free(l);
    kfac_batcher_free(b);
}

/* The feed: every piece of an epoch bound to the model's input in order,
 * images matching their labels (channel 2 holds the index), the two input
 * buffers alternating, the epoch's end reported, and a restart at the next
 * epoch giving a fresh loader's first piece. */
static void test_feed(void)
{
    enum { H = 20, W = 16, PIECES = LN / LBATCH * (LBATCH / LPIECE) };
    coord_dataset d = coord_make(LN, H, W, 0);
    kfac_batcher_config cfg = raw_config(LBATCH, KFAC_AUGMENT_NONE, 0);
    kfac_batcher *b = NULL;
    kfac_backend *be = NULL;
    kfac_model *m = NULL;
    kfac_loader *l = NULL;
    kfac_feed *f = NULL;
    CHECK_OK(kfac_batcher_init(&b, &d.base, &cfg));
    CHECK_OK(kfac_backend_get("cpu", 2, &be));
    if (!b || !be) return;
    CHECK_OK(kfac_model_init(&m, be, LPIECE, H, W, COORD_CHANNELS));
    kfac_model_fc(m, kfac_model_gap(m, 0), 10, "fc");
    CHECK_OK(kfac_model_finalize(m, 1));
    kfac_loader_config lc = {.first = 0, .count = LBATCH, .piece = LPIECE, .depth = 2};
    CHECK_OK(kfac_loader_init(&l, b, &lc));
    CHECK_OK(kfac__feed_init(&f, m, l, LPIECE));
    if (!f) return;
    CHECK_OK(kfac__feed_start(f, (kfac_loader_cursor){0, 0}));
    int seen[LN] = {0}, bad_order = 0, bad_image = 0, same_buffer = 0;
    const float *prev_input = NULL;
    kfac_loader_piece p;
    for (int k = 0; k < PIECES; k++) {
        CHECK_OK(kfac__feed_take(f, k == PIECES - 1, &p));
        bad_order += p.n != LPIECE || p.batch != (size_t)(k / (LBATCH / LPIECE)) ||
                     p.index != k % (LBATCH / LPIECE);
        const float *x = kfac_model_input(m);
        same_buffer += x == prev_input;
        for (int i = 0; i < p.n; i++) {
            bad_image += at(x + (size_t)i * H * W * COORD_CHANNELS, W, 0, 0, 2) !=
                         (float)(p.labels[i] & 255);
            if (p.labels[i] >= 0 && p.labels[i] < LN) seen[p.labels[i]]++;
        }
        prev_input = x;
    }
    int once = 0;
    for (int i = 0; i < LN; i++) once += seen[i] == 1;
    CHECK(bad_order == 0 && bad_image == 0 && once == LN,
          "feed: %d pieces out of order, %d images not their label's, %d of %d images once",
          bad_order, bad_image, once, LN);
    CHECK(same_buffer == 0, "feed: %d pieces in the buffer of the one before", same_buffer);
    CHECK_OK(kfac__feed_take(f, 0, &p));
    CHECK(p.n == 0, "feed: the epoch is over after %d pieces (got %d more images)", PIECES, p.n);

    /* epoch 1 from a restart against a fresh loader's first piece (made
     * after the feed's loader is gone: two loaders may not share a batcher) */
    CHECK_OK(kfac__feed_start(f, (kfac_loader_cursor){1, 0}));
    CHECK_OK(kfac__feed_take(f, 0, &p));
    size_t bytes = (size_t)LPIECE * H * W * COORD_CHANNELS * sizeof(float);
    float *images = malloc(bytes);
    int32_t labels[LPIECE];
    memcpy(images, kfac_model_input(m), bytes);
    memcpy(labels, p.labels, sizeof labels);
    CHECK_OK(kfac__feed_stop(f));
    CHECK(kfac_model_input(m) == kfac_model_own_input(m), "feed: the model gets its input back");
    kfac__feed_free(f);
    kfac_loader_free(l);
    kfac_loader *fresh = NULL;
    kfac_loader_piece q;
    CHECK_OK(kfac_loader_init(&fresh, b, &lc));
    CHECK_OK(kfac_loader_start(fresh, (kfac_loader_cursor){1, 0}));
    CHECK_OK(kfac_loader_next(fresh, &q));
    CHECK(p.n == q.n && p.batch == 0 && p.index == 0 &&
              !memcmp(labels, q.labels, (size_t)q.n * sizeof(int32_t)) &&
              !memcmp(images, q.images, bytes),
          "feed: epoch 1 starts with the fresh loader's first piece");
    kfac_loader_free(fresh);
    free(images);
    kfac_model_free(m);
    kfac_backend_free(be);
    kfac_batcher_free(b);
}

static void test_config_errors(void)
{
    coord_dataset d = coord_make(10, 20, 16, 1);
    kfac_batcher *b = NULL;
    kfac_batcher_config cfg = raw_config(4, KFAC_AUGMENT_NONE, 0);
    CHECK(kfac_batcher_init(&b, &d.base, &cfg) == KFAC_EINVAL &&
              strstr(kfac_last_error(), "differ in size"),
          "varying sizes need an output size: %s", kfac_last_error());
    cfg = raw_config(4, KFAC_AUGMENT_PAD_CROP_FLIP, 8);
    CHECK(kfac_batcher_init(&b, &d.base, &cfg) == KFAC_EINVAL && strstr(kfac_last_error(), "pad-crop"),
          "pad-crop to another size: %s", kfac_last_error());
    cfg = raw_config(4, KFAC_AUGMENT_RANDOM_RESIZED_CROP, 8);
    cfg.ratio_min = 2, cfg.ratio_max = 1;
    CHECK(kfac_batcher_init(&b, &d.base, &cfg) == KFAC_EINVAL, "empty ratio range");
    cfg = raw_config(8, KFAC_AUGMENT_RANDOM_RESIZED_CROP, 8);
    CHECK_OK(kfac_batcher_init(&b, &d.base, &cfg));
    kfac_loader *l = NULL;
    kfac_loader_config lc = {.first = 4, .count = 6, .piece = 4};
    CHECK(kfac_loader_init(&l, b, &lc) == KFAC_EINVAL, "share not a multiple of the piece");
    lc = (kfac_loader_config){.first = 4, .count = 8, .piece = 4};
    CHECK(kfac_loader_init(&l, b, &lc) == KFAC_EINVAL, "share outside the batch");
    kfac_batcher_free(b);
}

int main(void)
{
    test_random_resized_crop();
    test_center_crop();
    test_loader_depth_and_shares();
    test_loader_cursor();
    test_loader_failure_and_wait();
    test_feed();
    test_config_errors();
    return test_summary("test_loader");
}
