/* bench_loader.c - loader throughput: images/s that the batcher delivers
 * (read + decode + random-resized crop to 224 + flip + normalise) from
 * ImageNet-style HDF5 shards, in both storages:
 *   jpeg: 341x256 JPEGs, quality 90 (kfac prep --storage jpeg --resize 256 --crop none)
 *   raw:  256x256 uint8 (kfac prep --storage raw --resize 256 --crop center)
 * with 1 thread and with THREADS threads.  The images are synthetic
 * photographs (smooth gradients, shapes and sensor noise) so the JPEGs have
 * a realistic size.  The same images are also left as plain files for the
 * peer (tests/bench/pil_loader.py): DIR/jpeg/files/NNNNN.jpg and
 * DIR/raw/pixels.u8 (N x 256 x 256 x 3).  Prints one JSON line per
 * figure; tests/bench/loader adds the peers.
 *   bench_loader --dir TMPDIR [--images N] [--threads T] [--seconds S]
 */
#include "kfac/kfac_dataset.h"
#include "kfac/kfac_rng.h"
#include "kfac/kfac_shards.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <turbojpeg.h>

#include "bench_common.h"

enum { JPEG_W = 341, JPEG_H = 256, RAW_SIDE = 256, CROP = 224, BATCH = 64, CLASSES = 10 };

static void die(const char *what)
{
    fprintf(stderr, "bench_loader: %s: %s\n", what, kfac_last_error());
    exit(1);
}

/* A synthetic photograph: two-colour gradient, a few discs, noise. */
static void make_photo(uint8_t *rgb, int height, int width, uint64_t seed)
{
    kfac_rng rng;
    kfac_rng_seed(&rng, seed);
    double c0[3], c1[3], disc[4][5];
    for (int c = 0; c < 3; c++) c0[c] = 255 * kfac_rng_uniform(&rng), c1[c] = 255 * kfac_rng_uniform(&rng);
    for (int d = 0; d < 4; d++) {
        disc[d][0] = width * kfac_rng_uniform(&rng), disc[d][1] = height * kfac_rng_uniform(&rng);
        disc[d][2] = 10 + 60 * kfac_rng_uniform(&rng);
        disc[d][3] = 255 * kfac_rng_uniform(&rng), disc[d][4] = 255 * kfac_rng_uniform(&rng);
    }
    for (int y = 0; y < height; y++)
        for (int x = 0; x < width; x++) {
            double t = (double)(x + y) / (width + height);
            for (int c = 0; c < 3; c++) {
                double v = c0[c] * (1 - t) + c1[c] * t;
                for (int d = 0; d < 4; d++)
                    if (hypot(x - disc[d][0], y - disc[d][1]) < disc[d][2]) v = disc[d][3 + c % 2];
                v += 12 * (kfac_rng_uniform(&rng) - 0.5);
                rgb[((size_t)y * width + x) * 3 + c] = (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
            }
        }
}

static void write_dataset(const char *dir, kfac_storage storage, int images)
{
    kfac_prep_settings settings = {.storage = storage, .channels = 3, .resize = 256,
                                   .center_crop = storage == KFAC_STORAGE_RAW, .jpeg_quality = 90};
    snprintf(settings.source, sizeof settings.source, "folder");
    char classes[CLASSES][KFAC_CLASS_NAME_MAX];
    for (int c = 0; c < CLASSES; c++) snprintf(classes[c], sizeof classes[c], "n%08d", c);
    int h = storage == KFAC_STORAGE_RAW ? RAW_SIDE : JPEG_H;
    int w = storage == KFAC_STORAGE_RAW ? RAW_SIDE : JPEG_W;
    uint8_t *rgb = malloc((size_t)h * w * 3);
    tjhandle tj = tjInitCompress();
    char peer_path[4200];
    FILE *peer_raw = NULL;
    if (storage == KFAC_STORAGE_RAW) {
        mkdir(dir, 0755);
        snprintf(peer_path, sizeof peer_path, "%s/pixels.u8", dir);
        peer_raw = fopen(peer_path, "wb");
    } else {
        mkdir(dir, 0755);
        snprintf(peer_path, sizeof peer_path, "%s/files", dir);
        mkdir(peer_path, 0755);
    }
    kfac_shard_entry entry;
    kfac_shard_writer *wr;
    char path[4200];
    snprintf(path, sizeof path, "%s/train-00000.h5", dir);
    if (kfac_shard_writer_open(&wr, path, "train", 0, &settings,
                               (const char(*)[KFAC_CLASS_NAME_MAX])classes, CLASSES) != KFAC_OK)
        die(path);
    for (int i = 0; i < images; i++) {
        make_photo(rgb, h, w, (uint64_t)i + 1);
        kfac_status st;
        if (storage == KFAC_STORAGE_RAW) {
            st = kfac_shard_writer_add(wr, rgb, (size_t)h * w * 3, h, w, i % CLASSES);
            if (!peer_raw || fwrite(rgb, (size_t)h * w * 3, 1, peer_raw) != 1) die("peer pixels");
        } else {
            unsigned char *jpeg = NULL;
            unsigned long size = 0;
            if (tjCompress2(tj, rgb, w, 0, h, TJPF_RGB, &jpeg, &size, TJSAMP_420, 90, 0) != 0) {
                fprintf(stderr, "bench_loader: tjCompress2: %s\n", tjGetErrorStr2(tj));
                exit(1);
            }
            st = kfac_shard_writer_add(wr, jpeg, size, h, w, i % CLASSES);
            snprintf(peer_path, sizeof peer_path, "%s/files/%05d.jpg", dir, i);
            FILE *f = fopen(peer_path, "wb");
            if (!f || fwrite(jpeg, size, 1, f) != 1 || fclose(f) != 0) die(peer_path);
            tjFree(jpeg);
        }
        if (st != KFAC_OK) die("add");
    }
    if (kfac_shard_writer_close(wr, &entry) != KFAC_OK) die("close");
    if (peer_raw && fclose(peer_raw) != 0) die("peer pixels");
    kfac_manifest m = {.settings = settings, .num_classes = CLASSES,
                       .classes = classes, .num_splits = 1};
    snprintf(m.splits[0].name, sizeof m.splits[0].name, "train");
    m.splits[0].count = (size_t)images;
    m.splits[0].num_shards = 1;
    m.splits[0].shards = &entry;
    if (kfac_manifest_write(dir, &m) != KFAC_OK) die("manifest");
    tjDestroy(tj);
    free(rgb);
}

/* Images/s of random-resized crops from `dir` with `threads` threads. */
static double measure(const char *dir, int threads, double seconds)
{
    kfac_dataset *ds;
    if (kfac_dataset_open_hdf5(dir, "train", &ds) != KFAC_OK) die(dir);
    kfac_batcher_config cfg = {.batch_size = BATCH, .augment = KFAC_AUGMENT_RANDOM_RESIZED_CROP,
                               .out_height = CROP, .out_width = CROP, .seed = 1, .shuffle = 1,
                               .drop_last = 1, .threads = threads,
                               .mean = {0.485f, 0.456f, 0.406f}, .std = {0.229f, 0.224f, 0.225f}};
    kfac_batcher *b;
    if (kfac_batcher_init(&b, ds, &cfg) != KFAC_OK) die("batcher");
    float *images = malloc((size_t)BATCH * CROP * CROP * 3 * sizeof(float));
    int32_t labels[BATCH];
    int n, epoch = 0;
    long count = 0;
    kfac_batcher_next(b, images, labels, &n); /* warm the page cache and the decoders */
    double t0 = bench_now();
    while (bench_now() - t0 < seconds) {
        if (kfac_batcher_next(b, images, labels, &n) != KFAC_OK) die("next");
        if (n == 0) kfac_batcher_start_epoch(b, ++epoch);
        count += n;
    }
    double rate = count / (bench_now() - t0);
    free(images);
    kfac_batcher_free(b);
    kfac_dataset_free(ds);
    return rate;
}

int main(int argc, char **argv)
{
    const char *dir = NULL;
    int images = 512, threads = 2;
    double seconds = 4;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--dir")) dir = argv[i + 1];
        else if (!strcmp(argv[i], "--images")) images = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--threads")) threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--seconds")) seconds = atof(argv[i + 1]);
    }
    if (!dir || images < BATCH * 2 || threads < 1) {
        fprintf(stderr, "usage: bench_loader --dir DIR [--images N>=%d] [--threads T] [--seconds S]\n",
                BATCH * 2);
        return 2;
    }
    const char *names[] = {"raw", "jpeg"};
    for (int s = 0; s < 2; s++) {
        char sub[4096];
        snprintf(sub, sizeof sub, "%s/%s", dir, names[s]);
        write_dataset(sub, s == 0 ? KFAC_STORAGE_RAW : KFAC_STORAGE_JPEG, images);
        int counts[2] = {1, threads};
        for (int k = 0; k < (threads > 1 ? 2 : 1); k++)
            printf("{\"name\": \"loader_%s_rrc224\", \"value\": %.1f, \"unit\": \"images/s\", "
                   "\"threads\": %d, \"dir\": \"%s\"}\n",
                   names[s], measure(sub, counts[k], seconds), counts[k], sub);
        fflush(stdout);
    }
    return 0;
}
