/* test_dataset.c - the IDX reader on the real Fashion-MNIST files and on
 * corrupt copies of them, and the batcher: order, normalisation,
 * augmentation, drop_last and independence from the thread count.
 *
 * Batcher tests mostly run on a synthetic dataset whose label is the image
 * index, so a batch's labels reveal the permutation and every output image
 * can be compared with its exact source. */
#include "kfac/kfac_dataset.h"
#include "kfac/kfac_rng.h"
#include "testutil.h"

#include <dirent.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#define FMNIST KFAC_FMNIST_DIR
#define FMNIST_MEAN 0.2860f
#define FMNIST_STD 0.3530f

/* Image sizes reported by read_image where the test does not look at them. */
static int h_, w_;

/* ---- files ---- */

static void put_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24), p[1] = (uint8_t)(v >> 16), p[2] = (uint8_t)(v >> 8), p[3] = (uint8_t)v;
}

static void write_file(const char *path, const void *head, size_t head_len, const void *body,
                       size_t body_len)
{
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL, "cannot create %s", path);
    if (!f) return;
    CHECK(fwrite(head, 1, head_len, f) == head_len && fwrite(body, 1, body_len, f) == body_len &&
              fclose(f) == 0,
          "cannot write %s", path);
}

/* An IDX image file whose header says count x rows x cols; `pixels` holds
 * `pixel_bytes`, which may disagree with the header on purpose. */
static void write_idx_images(const char *path, uint32_t count, uint32_t rows, uint32_t cols,
                             const uint8_t *pixels, size_t pixel_bytes)
{
    uint8_t header[16];
    put_be32(header, 0x803), put_be32(header + 4, count);
    put_be32(header + 8, rows), put_be32(header + 12, cols);
    write_file(path, header, sizeof header, pixels, pixel_bytes);
}

static void write_idx_labels(const char *path, uint32_t count, const uint8_t *labels, size_t n)
{
    uint8_t header[8];
    put_be32(header, 0x801), put_be32(header + 4, count);
    write_file(path, header, sizeof header, labels, n);
}

static void join(char *out, size_t size, const char *dir, const char *name)
{
    snprintf(out, size, "%s/%s", dir, name);
}

static void make_dir(char *out, size_t size, const char *parent, const char *name)
{
    join(out, size, parent, name);
    CHECK(mkdir(out, 0700) == 0, "mkdir %s", out);
}

/* Removes a temp tree of plain files and folders. */
static void remove_tree(const char *path)
{
    DIR *d = opendir(path);
    if (d) {
        struct dirent *e;
        while ((e = readdir(d)))
            if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) {
                char child[4096];
                join(child, sizeof child, path, e->d_name);
                remove_tree(child);
            }
        closedir(d);
    }
    remove(path);
}

/* ---- rng ---- */

static void test_rng(void)
{
    kfac_rng a, b;
    kfac_rng_seed(&a, 123);
    kfac_rng_seed(&b, 123);
    int same = 1;
    for (int i = 0; i < 100; i++) same &= kfac_rng_next_u64(&a) == kfac_rng_next_u64(&b);
    CHECK(same, "the same seed must give the same stream");
    CHECK(kfac_mix64(1, 2) != kfac_mix64(2, 1) && kfac_mix64(7, 0) != kfac_mix64(7, 1),
          "mix64 must separate its inputs");

    enum { N = 70000, K = 7 };
    int counts[K] = {0};
    double sum = 0, sum_sq = 0, umin = 1, umax = 0;
    for (int i = 0; i < N; i++) {
        uint64_t r = kfac_rng_below(&a, K);
        if (r < K) counts[r]++;
        double u = kfac_rng_uniform(&a);
        umin = u < umin ? u : umin, umax = u > umax ? u : umax;
        double g = kfac_rng_normal(&a);
        sum += g, sum_sq += g * g;
    }
    for (int k = 0; k < K; k++)
        CHECK(abs(counts[k] - N / K) < N / K / 20, "below(7): value %d drawn %d times", k, counts[k]);
    CHECK(umin >= 0 && umax < 1 && umin < 0.001 && umax > 0.999, "uniform range [%g, %g]", umin, umax);
    double mean = sum / N, var = sum_sq / N - mean * mean;
    CHECK(fabs(mean) < 0.02 && fabs(var - 1) < 0.03, "normal: mean %g variance %g", mean, var);
    CHECK(kfac_rng_below(&a, 0) == 0, "below(0) is 0");
}

/* ---- the real Fashion-MNIST files ---- */

/* Checks shape, first label and the per-class counts of a split. */
static void check_split(const kfac_dataset *ds, size_t count, size_t per_class)
{
    CHECK(ds->count == count, "count %zu, expected %zu", ds->count, count);
    CHECK(ds->height == 28 && ds->width == 28 && ds->channels == 1, "shape %dx%dx%d", ds->height,
          ds->width, ds->channels);
    CHECK(ds->num_classes == 10, "num_classes %d", ds->num_classes);
    uint8_t image[28 * 28];
    int32_t label = -1;
    size_t per_label[10] = {0};
    int bad = 0;
    for (size_t i = 0; i < ds->count; i++) {
        if (ds->read_image(ds, i, image, &h_, &w_, &label) != KFAC_OK || label < 0 || label > 9) {
            bad++;
            continue;
        }
        per_label[label]++;
    }
    CHECK(bad == 0, "%d images unreadable or with a bad label", bad);
    for (int c = 0; c < 10; c++)
        CHECK(per_label[c] == per_class, "class %d has %zu images", c, per_label[c]);
    CHECK_OK(ds->read_image(ds, 0, image, &h_, &w_, &label));
    CHECK(label == 9, "first label %d, expected 9", label);
    CHECK(ds->read_image(ds, ds->count, image, &h_, &w_, &label) == KFAC_EINVAL, "index past the end");
}

/* Parses the first two training images straight from the .gz, not through
 * the library, and compares. */
static void check_against_raw_gzip(const kfac_dataset *ds)
{
    uint8_t raw[16 + 2 * 784];
    gzFile f = gzopen(FMNIST "/train-images-idx3-ubyte.gz", "rb");
    CHECK(f != NULL, "cannot open the reference file");
    if (!f) return;
    int got = gzread(f, raw, sizeof raw);
    gzclose(f);
    CHECK(got == (int)sizeof raw, "reference read %d bytes", got);
    static const uint8_t header[16] = {0, 0, 8, 3, 0, 0, 0xea, 0x60, 0, 0, 0, 28, 0, 0, 0, 28};
    CHECK(memcmp(raw, header, 16) == 0, "unexpected header in the reference file");

    long reference_sum = 0, sum = 0;
    for (int i = 0; i < 784; i++) reference_sum += raw[16 + i];
    uint8_t image[2][784];
    int32_t label;
    CHECK_OK(ds->read_image(ds, 0, image[0], &h_, &w_, &label));
    CHECK_OK(ds->read_image(ds, 1, image[1], &h_, &w_, &label));
    for (int i = 0; i < 784; i++) sum += image[0][i];
    CHECK(sum == reference_sum && reference_sum > 0, "image 0 pixel sum %ld, reference %ld", sum,
          reference_sum);
    CHECK(memcmp(image, raw + 16, sizeof image) == 0, "images 0 and 1 differ from the reference");
}

static void test_real_files(kfac_dataset *train)
{
    check_split(train, 60000, 6000);
    check_against_raw_gzip(train);
    kfac_dataset *test = NULL;
    CHECK_OK(kfac_dataset_open_idx(FMNIST, KFAC_SPLIT_TEST, &test));
    if (test) check_split(test, 10000, 1000);
    kfac_dataset_free(test);
    kfac_dataset_free(NULL);
}

/* ---- corrupt and unusual files ---- */

/* Opens the train split of dir, expecting `status` and a message that
 * contains every non-NULL needle. */
static void expect_open_error(const char *dir, kfac_split split, kfac_status status,
                              const char *needle1, const char *needle2)
{
    kfac_dataset *ds = (kfac_dataset *)1;
    kfac_status st = kfac_dataset_open_idx(dir, split, &ds);
    const char *msg = kfac_last_error();
    CHECK(st == status, "%s: status %s, expected %s (%s)", dir, kfac_status_str(st),
          kfac_status_str(status), msg);
    CHECK(ds == NULL, "%s: *out must be NULL on failure", dir);
    CHECK(!needle1 || strstr(msg, needle1), "message '%s' lacks '%s'", msg, needle1);
    CHECK(!needle2 || strstr(msg, needle2), "message '%s' lacks '%s'", msg, needle2);
    if (st == KFAC_OK) kfac_dataset_free(ds);
}

static void test_truncated(const char *tmp, const uint8_t *labels)
{
    char dir[4096], path[4096 + 64], expected[8192];
    /* plain file: header says 60000 images, 1000 bytes follow */
    make_dir(dir, sizeof dir, tmp, "truncated");
    uint8_t pixels[1000] = {0};
    join(path, sizeof path, dir, "train-labels-idx1-ubyte");
    write_idx_labels(path, 60000, labels, 60000);
    join(path, sizeof path, dir, "train-images-idx3-ubyte");
    write_idx_images(path, 60000, 28, 28, pixels, sizeof pixels);
    snprintf(expected, sizeof expected, "%s: truncated: expected 47040000 image bytes, got 1000", path);
    expect_open_error(dir, KFAC_SPLIT_TRAIN, KFAC_EFORMAT, expected, NULL);

    /* gzip file cut after 100 kB of the real one */
    make_dir(dir, sizeof dir, tmp, "truncated_gz");
    static uint8_t gz_head[100000];
    FILE *f = fopen(FMNIST "/train-images-idx3-ubyte.gz", "rb");
    CHECK(f && fread(gz_head, 1, sizeof gz_head, f) == sizeof gz_head, "reading the real .gz");
    if (f) fclose(f);
    join(path, sizeof path, dir, "train-labels-idx1-ubyte");
    write_idx_labels(path, 60000, labels, 60000);
    join(path, sizeof path, dir, "train-images-idx3-ubyte.gz");
    write_file(path, gz_head, sizeof gz_head, "", 0);
    snprintf(expected, sizeof expected, "%s: truncated: expected 47040000 image bytes, got ", path);
    expect_open_error(dir, KFAC_SPLIT_TRAIN, KFAC_EFORMAT, expected, NULL);
    /* the decompressed part of a 100 kB prefix is a few hundred kB */
    const char *got = strstr(kfac_last_error(), "got ");
    long n = got ? atol(got + 4) : -1;
    CHECK(n > 100000 && n < 47040000, "got %ld bytes from the truncated .gz", n);
}

static void test_wrong_magic_and_missing(const char *tmp, const uint8_t *labels)
{
    char dir[4096], path[4096 + 64], expected[8192];
    /* a label file where the image file should be */
    make_dir(dir, sizeof dir, tmp, "magic");
    join(path, sizeof path, dir, "train-labels-idx1-ubyte");
    write_idx_labels(path, 60000, labels, 60000);
    join(path, sizeof path, dir, "train-images-idx3-ubyte");
    write_idx_labels(path, 60000, labels, 60000);
    snprintf(expected, sizeof expected,
             "%s: not an IDX image file (magic 0x00000801, expected 0x00000803)", path);
    expect_open_error(dir, KFAC_SPLIT_TRAIN, KFAC_EFORMAT, expected, NULL);

    join(path, sizeof path, tmp, "no-such-folder");
    expect_open_error(path, KFAC_SPLIT_TRAIN, KFAC_EIO, path, NULL);

    make_dir(dir, sizeof dir, tmp, "empty");
    snprintf(expected, sizeof expected,
             "%s: no t10k-images-idx3-ubyte or t10k-images-idx3-ubyte.gz", dir);
    expect_open_error(dir, KFAC_SPLIT_TEST, KFAC_EIO, expected, NULL);
    /* images alone: the missing label file is reported before any reading */
    join(path, sizeof path, dir, "t10k-images-idx3-ubyte");
    write_idx_images(path, 1, 1, 1, (const uint8_t *)"x", 1);
    expect_open_error(dir, KFAC_SPLIT_TEST, KFAC_EIO, dir, "no t10k-labels-idx1-ubyte or");
}

/* A tiny plain-file test split (3 images of 2x3) and variants of it. */
static void test_small_files(const char *tmp)
{
    char dir[4096], images[4096 + 64], labels_path[4096 + 64];
    make_dir(dir, sizeof dir, tmp, "small");
    join(images, sizeof images, dir, "t10k-images-idx3-ubyte");
    join(labels_path, sizeof labels_path, dir, "t10k-labels-idx1-ubyte");
    uint8_t pixels[19];
    for (int i = 0; i < 19; i++) pixels[i] = (uint8_t)(i * 13);
    write_idx_images(images, 3, 2, 3, pixels, 18);
    write_idx_labels(labels_path, 3, (const uint8_t *)"\1\0\11", 3);

    kfac_dataset *ds = NULL;
    CHECK_OK(kfac_dataset_open_idx(dir, KFAC_SPLIT_TEST, &ds));
    if (ds) {
        CHECK(ds->count == 3 && ds->height == 2 && ds->width == 3 && ds->channels == 1,
              "small: %zu images of %dx%dx%d", ds->count, ds->height, ds->width, ds->channels);
        uint8_t image[6];
        int32_t label;
        CHECK_OK(ds->read_image(ds, 2, image, &h_, &w_, &label));
        CHECK(label == 9 && memcmp(image, pixels + 12, 6) == 0, "small image 2, label %d", label);
    }
    kfac_dataset_free(ds);

    write_idx_labels(labels_path, 2, (const uint8_t *)"\1\0", 2);
    expect_open_error(dir, KFAC_SPLIT_TEST, KFAC_EFORMAT, labels_path, "2 labels for 3 images");
    write_idx_labels(labels_path, 3, (const uint8_t *)"\1\12\2", 3);
    expect_open_error(dir, KFAC_SPLIT_TEST, KFAC_EFORMAT, labels_path, "label 10 of image 1");
    write_idx_images(labels_path, 3, 2, 3, pixels, 18);
    expect_open_error(dir, KFAC_SPLIT_TEST, KFAC_EFORMAT, labels_path, "not an IDX label file");
    write_idx_labels(labels_path, 3, (const uint8_t *)"\1\0\11", 3);
    write_idx_images(images, 3, 2, 3, pixels, 19);
    expect_open_error(dir, KFAC_SPLIT_TEST, KFAC_EFORMAT, images, "unexpected data after the 3 images");
    write_idx_images(images, 3, 0, 3, pixels, 0);
    expect_open_error(dir, KFAC_SPLIT_TEST, KFAC_EFORMAT, images, "implausible image size 0x3");
}

static void test_corrupt_files(const kfac_dataset *train)
{
    char tmp[] = "/tmp/kfac_test_dataset_XXXXXX";
    CHECK(mkdtemp(tmp) != NULL, "mkdtemp");
    static uint8_t labels[60000];
    uint8_t image[784];
    for (size_t i = 0; i < 60000; i++) {
        int32_t label = 0;
        train->read_image(train, i, image, &h_, &w_, &label);
        labels[i] = (uint8_t)label;
    }
    test_truncated(tmp, labels);
    test_wrong_magic_and_missing(tmp, labels);
    test_small_files(tmp);
    remove_tree(tmp);
}

/* ---- the batcher on a synthetic dataset: label = image index ---- */

typedef struct synth_dataset {
    kfac_dataset base;
    size_t fail_index; /* read_image fails here (SIZE_MAX: never) */
} synth_dataset;

static uint8_t synth_pixel(size_t index, size_t offset)
{
    uint64_t h = (index + 1) * 0x9e3779b97f4a7c15ULL ^ (offset + 1) * 0xc2b2ae3d27d4eb4fULL;
    h ^= h >> 29, h *= 0xbf58476d1ce4e5b9ULL, h ^= h >> 32;
    return (uint8_t)h;
}

static kfac_status synth_read(const kfac_dataset *ds, size_t index, uint8_t *hwc,
                              int *image_height, int *image_width, int32_t *label)
{
    const synth_dataset *s = (const synth_dataset *)ds;
    if (index == s->fail_index) return KFAC_ERR(KFAC_EIO, "synthetic failure at image %zu", index);
    size_t n = (size_t)ds->height * ds->width * ds->channels;
    for (size_t i = 0; i < n; i++) hwc[i] = synth_pixel(index, i);
    *image_height = ds->height;
    *image_width = ds->width;
    *label = (int32_t)index;
    return KFAC_OK;
}

static synth_dataset synth_make(size_t count, int height, int width, int channels)
{
    synth_dataset s = {.fail_index = SIZE_MAX};
    s.base = (kfac_dataset){.count = count, .height = height, .width = width,
                            .channels = channels, .fixed_size = 1,
                            .num_classes = (int)count, .read_image = synth_read};
    return s;
}

static kfac_batcher_config base_config(int batch_size)
{
    return (kfac_batcher_config){.batch_size = batch_size, .pad = 2, .seed = 42, .shuffle = 1,
                                 .threads = 2, .mean = {0.1f, 0.5f, 0.9f},
                                 .std = {0.25f, 0.5f, 2.0f}};
}

static float normalised(uint8_t v, const kfac_batcher_config *cfg, int c)
{
    return ((float)v / 255.0f - cfg->mean[c]) / cfg->std[c];
}

static int close_enough(float a, float b) { return fabsf(a - b) <= 1e-5f * (1 + fabsf(b)); }

/* Runs a whole epoch; returns the number of images and fills order[] with
 * the labels and sizes[] with the batch sizes. */
static size_t run_epoch(kfac_batcher *b, const kfac_dataset *ds, float *images, int32_t *order,
                        int *sizes, int *batches)
{
    size_t total = 0, image_size = (size_t)ds->height * ds->width * ds->channels;
    int n;
    *batches = 0;
    while (kfac_batcher_next(b, images + total * image_size, order + total, &n) == KFAC_OK && n > 0) {
        sizes[(*batches)++] = n;
        total += (size_t)n;
        if (*batches > 1000) break;
    }
    return total;
}

/* Every index exactly once; each image is the normalised source image. */
static void check_epoch_content(const kfac_dataset *ds, const kfac_batcher_config *cfg,
                                const float *images, const int32_t *order, size_t total)
{
    size_t image_size = (size_t)ds->height * ds->width * ds->channels;
    int *seen = calloc(ds->count, sizeof *seen);
    size_t wrong_value = 0, bad_index = 0;
    for (size_t p = 0; p < total; p++) {
        if (order[p] < 0 || (size_t)order[p] >= ds->count || seen[order[p]]++) {
            bad_index++;
            continue;
        }
        for (size_t i = 0; i < image_size; i++) {
            float expected = normalised(synth_pixel((size_t)order[p], i), cfg, (int)(i % ds->channels));
            wrong_value += !close_enough(images[p * image_size + i], expected);
        }
    }
    CHECK(bad_index == 0, "%zu repeated or invalid indices", bad_index);
    CHECK(wrong_value == 0, "%zu values differ from (pixel/255 - mean)/std", wrong_value);
    free(seen);
}

static void test_batcher_order(void)
{
    synth_dataset s = synth_make(1000, 5, 7, 3);
    const kfac_dataset *ds = &s.base;
    kfac_batcher_config cfg = base_config(64);
    float *images = malloc(1000 * 5 * 7 * 3 * sizeof *images);
    int32_t order[1000], order1[1000], again[1000];
    int sizes[1100], batches;
    kfac_batcher *b = NULL;
    CHECK_OK(kfac_batcher_init(&b, ds, &cfg));
    if (!b) return;
    size_t per_epoch = kfac_batcher_batches_per_epoch(b);
    CHECK(per_epoch == 16, "batches per epoch %zu", per_epoch);

    size_t total = run_epoch(b, ds, images, order, sizes, &batches);
    CHECK(total == 1000 && batches == 16 && sizes[0] == 64 && sizes[15] == 40,
          "epoch: %zu images in %d batches, last %d", total, batches, sizes[batches - 1]);
    check_epoch_content(ds, &cfg, images, order, total);
    int fixed = 0;
    for (int i = 0; i < 1000; i++) fixed += order[i] == i;
    CHECK(fixed < 20, "shuffled epoch leaves %d images in place", fixed);
    int n = -1;
    CHECK_OK(kfac_batcher_next(b, images, order1, &n));
    CHECK(n == 0, "after the epoch next gives n=%d", n);

    kfac_batcher_start_epoch(b, 1);
    run_epoch(b, ds, images, order1, sizes, &batches);
    kfac_batcher_start_epoch(b, 0);
    run_epoch(b, ds, images, again, sizes, &batches);
    CHECK(memcmp(order, again, sizeof order) == 0, "restarting epoch 0 must repeat its order");
    int same = 0;
    for (int i = 0; i < 1000; i++) same += order[i] == order1[i];
    CHECK(same < 20, "epochs 0 and 1 agree at %d positions", same);
    kfac_batcher_free(b);

    cfg.drop_last = 1;
    CHECK_OK(kfac_batcher_init(&b, ds, &cfg));
    per_epoch = kfac_batcher_batches_per_epoch(b);
    CHECK(per_epoch == 15, "drop_last: %zu batches", per_epoch);
    total = run_epoch(b, ds, images, order1, sizes, &batches);
    CHECK(total == 960 && batches == 15 && sizes[14] == 64, "drop_last: %zu images in %d batches",
          total, batches);
    CHECK(memcmp(order, order1, 960 * sizeof *order) == 0, "drop_last must not change the order");
    kfac_batcher_free(b);

    cfg.drop_last = 0, cfg.shuffle = 0;
    CHECK_OK(kfac_batcher_init(&b, ds, &cfg));
    total = run_epoch(b, ds, images, order, sizes, &batches);
    fixed = 0;
    for (int i = 0; i < 1000; i++) fixed += order[i] == i;
    CHECK(total == 1000 && fixed == 1000, "shuffle=0 must keep the file order");
    check_epoch_content(ds, &cfg, images, order, total);
    kfac_batcher_free(b);

    cfg.shuffle = 1, cfg.seed = 43;
    CHECK_OK(kfac_batcher_init(&b, ds, &cfg));
    run_epoch(b, ds, images, order1, sizes, &batches);
    CHECK(memcmp(order, order1, sizeof order) != 0, "seeds 42 and 43 give the same order");
    kfac_batcher_free(b);
    free(images);
}

/* Does `out` equal the source image padded by pad, cropped at (dy, dx)
 * relative to the original, and flipped if `flip`? */
static int matches_crop(const float *out, size_t index, const kfac_dataset *ds,
                        const kfac_batcher_config *cfg, int dy, int dx, int flip)
{
    int h = ds->height, w = ds->width, ch = ds->channels;
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++)
            for (int c = 0; c < ch; c++) {
                int sy = y + dy, sx = (flip ? w - 1 - x : x) + dx;
                int inside = sy >= 0 && sy < h && sx >= 0 && sx < w;
                uint8_t v = inside ? synth_pixel(index, ((size_t)sy * w + sx) * ch + c) : 0;
                if (!close_enough(out[((size_t)y * w + x) * ch + c], normalised(v, cfg, c)))
                    return 0;
            }
    return 1;
}

static void test_batcher_augment(void)
{
    synth_dataset s = synth_make(300, 6, 9, 2);
    const kfac_dataset *ds = &s.base;
    kfac_batcher_config cfg = base_config(50);
    cfg.augment = KFAC_AUGMENT_PAD_CROP_FLIP;
    size_t image_size = 6 * 9 * 2;
    float *images = malloc(300 * image_size * sizeof *images);
    int32_t order[300];
    int sizes[10], batches, used[5][5][2] = {{{0}}};
    kfac_batcher *b = NULL;
    CHECK_OK(kfac_batcher_init(&b, ds, &cfg));
    if (!b) return;
    size_t total = run_epoch(b, ds, images, order, sizes, &batches);
    CHECK(total == 300, "augmented epoch has %zu images", total);
    int unmatched = 0;
    for (size_t p = 0; p < total; p++) {
        int found = 0;
        for (int dy = -2; dy <= 2 && !found; dy++)
            for (int dx = -2; dx <= 2 && !found; dx++)
                for (int flip = 0; flip < 2 && !found; flip++)
                    if (matches_crop(images + p * image_size, (size_t)order[p], ds, &cfg, dy, dx,
                                     flip)) {
                        found = 1;
                        used[dy + 2][dx + 2][flip]++;
                    }
        unmatched += !found;
    }
    CHECK(unmatched == 0, "%d augmented images are no crop/flip of their padded source", unmatched);
    int distinct = 0, flipped = 0;
    for (int i = 0; i < 50; i++) {
        distinct += ((int *)used)[i] > 0;
        flipped += ((int *)used)[i] * (i % 2);
    }
    CHECK(distinct >= 40, "only %d of 50 crop/flip choices seen in 300 samples", distinct);
    CHECK(flipped > 100 && flipped < 200, "%d of 300 images flipped", flipped);
    kfac_batcher_free(b);
    free(images);
}

/* Same batches for 1 and 2 threads, on the real data with augmentation. */
static void test_batcher_threads(const kfac_dataset *train)
{
    kfac_batcher_config cfg = base_config(128);
    cfg.augment = KFAC_AUGMENT_PAD_CROP_FLIP;
    cfg.mean[0] = FMNIST_MEAN, cfg.std[0] = FMNIST_STD;
    kfac_batcher *b[2] = {NULL, NULL};
    for (int t = 0; t < 2; t++) {
        cfg.threads = t + 1;
        CHECK_OK(kfac_batcher_init(&b[t], train, &cfg));
        if (!b[t]) return;
        kfac_batcher_start_epoch(b[t], 3);
    }
    size_t per_epoch = kfac_batcher_batches_per_epoch(b[0]);
    CHECK(per_epoch == 469, "%zu batches per epoch", per_epoch);
    size_t floats = 128 * 784;
    float *images[2] = {malloc(floats * sizeof(float)), malloc(floats * sizeof(float))};
    int32_t labels[2][128];
    int n[2], differ = 0;
    for (int batch = 0; batch < 3; batch++) {
        for (int t = 0; t < 2; t++) CHECK_OK(kfac_batcher_next(b[t], images[t], labels[t], &n[t]));
        differ += n[0] != 128 || n[1] != 128 || memcmp(images[0], images[1], floats * sizeof(float)) ||
                  memcmp(labels[0], labels[1], sizeof labels[0]);
    }
    CHECK(differ == 0, "%d of 3 batches differ between 1 and 2 threads", differ);
    kfac_batcher_start_epoch(b[1], 4);
    CHECK_OK(kfac_batcher_next(b[1], images[1], labels[1], &n[1]));
    CHECK(memcmp(images[0], images[1], floats * sizeof(float)) != 0, "epochs 3 and 4 gave one batch");
    for (int t = 0; t < 2; t++) kfac_batcher_free(b[t]), free(images[t]);
}

/* shuffle=0, no augmentation: batch 0 is images 0..99 of the file. */
static void test_batcher_real_order(const kfac_dataset *train)
{
    kfac_batcher_config cfg = base_config(100);
    cfg.shuffle = 0, cfg.mean[0] = FMNIST_MEAN, cfg.std[0] = FMNIST_STD;
    kfac_batcher *b = NULL;
    CHECK_OK(kfac_batcher_init(&b, train, &cfg));
    if (!b) return;
    float *images = malloc(100 * 784 * sizeof *images);
    int32_t labels[100], label;
    int n = 0, wrong = 0;
    uint8_t image[784];
    CHECK_OK(kfac_batcher_next(b, images, labels, &n));
    for (int i = 0; i < n; i++) {
        train->read_image(train, (size_t)i, image, &h_, &w_, &label);
        wrong += label != labels[i];
        for (int j = 0; j < 784; j++)
            wrong += !close_enough(images[i * 784 + j], normalised(image[j], &cfg, 0));
    }
    CHECK(n == 100 && wrong == 0, "n=%d, %d wrong values or labels", n, wrong);
    kfac_batcher_free(b);
    free(images);
}

static void expect_init_error(const kfac_dataset *ds, kfac_batcher_config cfg, const char *needle)
{
    kfac_batcher *b = (kfac_batcher *)1;
    kfac_status st = kfac_batcher_init(&b, ds, &cfg);
    CHECK(st == KFAC_EINVAL && b == NULL, "%s: status %s", needle, kfac_status_str(st));
    CHECK(strstr(kfac_last_error(), needle), "message '%s' lacks '%s'", kfac_last_error(), needle);
}

static void test_batcher_errors(void)
{
    synth_dataset s = synth_make(100, 4, 4, 1);
    kfac_batcher_config cfg = base_config(32);
    cfg.batch_size = 0;
    expect_init_error(&s.base, cfg, "batch_size 0");
    cfg = base_config(101), cfg.drop_last = 1;
    expect_init_error(&s.base, cfg, "drop_last");
    cfg = base_config(32), cfg.std[0] = 0;
    expect_init_error(&s.base, cfg, "std > 0");
    cfg = base_config(32), cfg.augment = KFAC_AUGMENT_PAD_CROP_FLIP, cfg.pad = -1;
    expect_init_error(&s.base, cfg, "pad -1");

    /* A worker thread's read failure reaches the caller with its message,
     * and the failed batch is not consumed. */
    s.fail_index = 37;
    cfg = base_config(64), cfg.shuffle = 0;
    kfac_batcher *b = NULL;
    CHECK_OK(kfac_batcher_init(&b, &s.base, &cfg));
    if (!b) return;
    float images[64 * 16];
    int32_t labels[64];
    int n = -1;
    for (int attempt = 0; attempt < 2; attempt++) {
        kfac_clear_error();
        CHECK(kfac_batcher_next(b, images, labels, &n) == KFAC_EIO && n == 0, "read failure -> EIO");
        CHECK(strcmp(kfac_last_error(), "synthetic failure at image 37") == 0, "message '%s'",
              kfac_last_error());
    }
    s.fail_index = SIZE_MAX;
    CHECK_OK(kfac_batcher_next(b, images, labels, &n));
    CHECK(n == 64 && labels[0] == 0, "after a failure the same batch comes again (n=%d)", n);
    kfac_batcher_free(b);
}

int main(void)
{
    test_rng();
    kfac_dataset *train = NULL;
    CHECK_OK(kfac_dataset_open_idx(FMNIST, KFAC_SPLIT_TRAIN, &train));
    if (train) {
        test_real_files(train);
        test_corrupt_files(train);
        test_batcher_threads(train);
        test_batcher_real_order(train);
    }
    kfac_dataset_free(train);
    test_batcher_order();
    test_batcher_augment();
    test_batcher_errors();
    return test_summary("test_dataset");
}
