/* idx.c - MNIST-style IDX files (MNIST, Fashion-MNIST) as a kfac_dataset.
 *
 * An IDX file is a big-endian header followed by uint8 data: magic
 * 0x00000803, count, rows, cols for images; magic 0x00000801, count for
 * labels.  Both files of a split are loaded whole into memory (47 MB for the
 * Fashion-MNIST training set), so read_image is a memcpy and trivially
 * thread-safe.  zlib's gzread reads gzipped and plain files alike.
 */
#include "kfac/kfac_dataset.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <zlib.h>

enum {
    IDX_IMAGES_MAGIC = 0x00000803, /* uint8 elements, 3 dimensions */
    IDX_LABELS_MAGIC = 0x00000801, /* uint8 elements, 1 dimension */
    IDX_NUM_CLASSES = 10,          /* MNIST and Fashion-MNIST; IDX does not record it */
    IDX_MAX_SIDE = 1 << 16,        /* rows/cols sanity bound, checked before allocating */
    IDX_PATH_MAX = 4096,
    IDX_READ_CHUNK = 1 << 30,      /* gzread takes an unsigned length and returns an int */
    IDX_GZ_BUFFER = 1 << 17        /* zlib's 8 KiB default makes big reads slower */
};

typedef struct idx_dataset {
    kfac_dataset base;
    uint8_t *pixels; /* count * height * width bytes */
    uint8_t *labels; /* count bytes */
} idx_dataset;

static uint32_t read_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* ---- the kfac_dataset table ---- */

static kfac_status idx_read_image(const kfac_dataset *ds, size_t index, uint8_t *hwc,
                                  int *image_height, int *image_width, int32_t *label)
{
    const idx_dataset *idx = ds->impl;
    if (index >= ds->count)
        return KFAC_ERR(KFAC_EINVAL, "image index %zu out of range (%zu images)", index,
                        ds->count);
    size_t bytes = (size_t)ds->height * (size_t)ds->width * (size_t)ds->channels;
    memcpy(hwc, idx->pixels + index * bytes, bytes);
    *image_height = ds->height;
    *image_width = ds->width;
    *label = idx->labels[index];
    return KFAC_OK;
}

static void idx_destroy(kfac_dataset *ds)
{
    idx_dataset *idx = ds->impl;
    free(idx->pixels);
    free(idx->labels);
    free(idx);
}

/* ---- reading ---- */

/* gzerror's text is "<path>: <reason>"; keep the reason only, since our
 * messages add the path themselves. */
static const char *gz_reason(gzFile f, const char *path, int *errnum)
{
    const char *msg = gzerror(f, errnum);
    size_t len = strlen(path);
    if (strncmp(msg, path, len) == 0 && strncmp(msg + len, ": ", 2) == 0) return msg + len + 2;
    return msg;
}

/* Reads exactly n bytes.  A short file or a cut-off gzip stream is
 * KFAC_EFORMAT "truncated" (`what` names the unit of n), corrupt gzip data
 * is KFAC_EFORMAT, an operating-system read error is KFAC_EIO. */
static kfac_status read_exact(gzFile f, const char *path, void *buf, size_t n,
                              const char *what)
{
    size_t done = 0;
    while (done < n) {
        size_t left = n - done;
        unsigned chunk = left > IDX_READ_CHUNK ? IDX_READ_CHUNK : (unsigned)left;
        int got = gzread(f, (char *)buf + done, chunk);
        if (got <= 0) break;
        done += (size_t)got;
    }
    if (done == n) return KFAC_OK;
    int errnum = Z_OK;
    const char *reason = gz_reason(f, path, &errnum);
    if (errnum == Z_ERRNO) return KFAC_ERR(KFAC_EIO, "%s: read error: %s", path, reason);
    if (errnum == Z_MEM_ERROR) return KFAC_ERR(KFAC_ENOMEM, "%s: %s", path, reason);
    /* Z_BUF_ERROR is zlib's "unexpected end of file": a truncated .gz */
    if (errnum != Z_OK && errnum != Z_BUF_ERROR)
        return KFAC_ERR(KFAC_EFORMAT, "%s: corrupt gzip data: %s", path, reason);
    return KFAC_ERR(KFAC_EFORMAT, "%s: truncated: expected %zu %s, got %zu", path, n, what, done);
}

/* The header's count must describe the whole file: data past it means the
 * header and the content disagree. */
static kfac_status expect_end(gzFile f, const char *path, size_t count, const char *what)
{
    char extra;
    if (gzread(f, &extra, 1) == 1)
        return KFAC_ERR(KFAC_EFORMAT, "%s: unexpected data after the %zu %s its header declares",
                        path, count, what);
    return KFAC_OK;
}

static kfac_status read_images(gzFile f, const char *path, idx_dataset *idx)
{
    uint8_t header[16];
    KFAC_TRY(read_exact(f, path, header, sizeof header, "header bytes"));
    uint32_t magic = read_be32(header);
    if (magic != IDX_IMAGES_MAGIC)
        return KFAC_ERR(KFAC_EFORMAT, "%s: not an IDX image file (magic 0x%08" PRIx32
                        ", expected 0x%08x)", path, magic, IDX_IMAGES_MAGIC);
    uint32_t count = read_be32(header + 4), rows = read_be32(header + 8),
             cols = read_be32(header + 12);
    if (rows == 0 || cols == 0 || rows > IDX_MAX_SIDE || cols > IDX_MAX_SIDE)
        return KFAC_ERR(KFAC_EFORMAT, "%s: implausible image size %" PRIu32 "x%" PRIu32, path,
                        rows, cols);
    size_t bytes;
    if (__builtin_mul_overflow((size_t)count, (size_t)rows * cols, &bytes))
        return KFAC_ERR(KFAC_EFORMAT, "%s: %" PRIu32 " images of %" PRIu32 "x%" PRIu32
                        " do not fit in memory", path, count, rows, cols);
    idx->pixels = malloc(bytes ? bytes : 1);
    if (!idx->pixels)
        return KFAC_ERR(KFAC_ENOMEM, "%s: cannot allocate %zu bytes for %" PRIu32 " images", path,
                        bytes, count);
    KFAC_TRY(read_exact(f, path, idx->pixels, bytes, "image bytes"));
    KFAC_TRY(expect_end(f, path, count, "images"));
    idx->base.count = count;
    idx->base.height = (int)rows;
    idx->base.width = (int)cols;
    idx->base.channels = 1;
    idx->base.fixed_size = 1;
    return KFAC_OK;
}

/* Reads the labels of the images already loaded into idx. */
static kfac_status read_labels(gzFile f, const char *path, idx_dataset *idx)
{
    uint8_t header[8];
    KFAC_TRY(read_exact(f, path, header, sizeof header, "header bytes"));
    uint32_t magic = read_be32(header), count = read_be32(header + 4);
    if (magic != IDX_LABELS_MAGIC)
        return KFAC_ERR(KFAC_EFORMAT, "%s: not an IDX label file (magic 0x%08" PRIx32
                        ", expected 0x%08x)", path, magic, IDX_LABELS_MAGIC);
    if (count != idx->base.count)
        return KFAC_ERR(KFAC_EFORMAT, "%s: %" PRIu32 " labels for %zu images", path, count,
                        idx->base.count);
    idx->labels = malloc(count ? count : 1);
    if (!idx->labels)
        return KFAC_ERR(KFAC_ENOMEM, "%s: cannot allocate %" PRIu32 " labels", path, count);
    KFAC_TRY(read_exact(f, path, idx->labels, count, "label bytes"));
    KFAC_TRY(expect_end(f, path, count, "labels"));
    for (size_t i = 0; i < count; i++)
        if (idx->labels[i] >= IDX_NUM_CLASSES)
            return KFAC_ERR(KFAC_EFORMAT, "%s: label %d of image %zu is outside [0, %d)", path,
                            idx->labels[i], i, IDX_NUM_CLASSES);
    return KFAC_OK;
}

typedef kfac_status (*idx_reader)(gzFile f, const char *path, idx_dataset *idx);

static kfac_status load_file(const char *path, idx_reader read, idx_dataset *idx)
{
    gzFile f = gzopen(path, "rb");
    if (!f)
        return KFAC_ERR(errno == ENOMEM ? KFAC_ENOMEM : KFAC_EIO, "%s: cannot open: %s", path,
                        strerror(errno));
    gzbuffer(f, IDX_GZ_BUFFER);
    kfac_status status = read(f, path, idx);
    gzclose(f);
    return status;
}

/* ---- locating the files ---- */

static kfac_status check_folder(const char *dir)
{
    struct stat st;
    if (stat(dir, &st) != 0) return KFAC_ERR(KFAC_EIO, "%s: %s", dir, strerror(errno));
    if (!S_ISDIR(st.st_mode)) return KFAC_ERR(KFAC_EIO, "%s: not a folder", dir);
    return KFAC_OK;
}

/* Sets path to dir/<split>-<kind> if that exists, else to its .gz. */
static kfac_status find_file(const char *dir, const char *split, const char *kind,
                             char path[IDX_PATH_MAX])
{
    static const char *const suffixes[] = {"", ".gz"};
    for (int i = 0; i < 2; i++) {
        int len = snprintf(path, IDX_PATH_MAX, "%s/%s-%s%s", dir, split, kind, suffixes[i]);
        if (len < 0 || len >= IDX_PATH_MAX)
            return KFAC_ERR(KFAC_EINVAL, "%s: folder path too long", dir);
        struct stat st;
        if (stat(path, &st) == 0) return KFAC_OK;
    }
    return KFAC_ERR(KFAC_EIO, "%s: no %s-%s or %s-%s.gz", dir, split, kind, split, kind);
}

kfac_status kfac_dataset_open_idx(const char *dir, kfac_split split, kfac_dataset **out)
{
    *out = NULL;
    if (split != KFAC_SPLIT_TRAIN && split != KFAC_SPLIT_TEST)
        return KFAC_ERR(KFAC_EINVAL, "unknown dataset split %d", (int)split);
    const char *prefix = split == KFAC_SPLIT_TRAIN ? "train" : "t10k";
    char images_path[IDX_PATH_MAX], labels_path[IDX_PATH_MAX];
    /* Locate both files before the slow decompression, to fail fast. */
    KFAC_TRY(check_folder(dir));
    KFAC_TRY(find_file(dir, prefix, "images-idx3-ubyte", images_path));
    KFAC_TRY(find_file(dir, prefix, "labels-idx1-ubyte", labels_path));

    idx_dataset *idx = calloc(1, sizeof *idx);
    if (!idx) return KFAC_ERR(KFAC_ENOMEM, "%s: cannot allocate the dataset", dir);
    idx->base.num_classes = IDX_NUM_CLASSES;
    idx->base.read_image = idx_read_image;
    idx->base.destroy = idx_destroy;
    idx->base.impl = idx;

    kfac_status status = load_file(images_path, read_images, idx);
    if (status == KFAC_OK) status = load_file(labels_path, read_labels, idx);
    if (status != KFAC_OK) {
        idx_destroy(&idx->base);
        return status;
    }
    *out = &idx->base;
    return KFAC_OK;
}
