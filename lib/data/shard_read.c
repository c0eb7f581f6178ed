/* shard_read.c - one split of an HDF5 shard folder as a kfac_dataset.
 *
 * Opening reads the manifest, then each shard's attributes, /offsets,
 * /shapes and /labels with HDF5 and checks them against the manifest and
 * each other; it records where /data starts in the file (H5Dget_offset) and
 * closes HDF5 again.  From then on an image is one pread() from a plain file
 * descriptor: no HDF5 call, so no HDF5 global lock, and any number of
 * threads can read at once.  JPEG images are decoded with libturbojpeg
 * (default flags: accurate integer DCT, smooth upsampling), one decoder and
 * read buffer per thread, freed when the thread exits.
 */
#include "kfac/kfac_shards.h"

#include <errno.h>
#include <fcntl.h>
#include <hdf5.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <turbojpeg.h>
#include <unistd.h>

#include "data/shards_internal.h"

enum { PATH_CAP = 4096, WORD_CAP = 64 };

/* One image: where its bytes are and what they decode to. */
typedef struct image_ref {
    uint64_t pos, len; /* byte range in its shard file */
    uint32_t shard;    /* index into the shard tables */
    uint16_t height, width;
    int32_t label;
} image_ref;

typedef struct hdf5_dataset {
    kfac_dataset base;
    kfac_storage storage;
    image_ref *images; /* base.count */
    size_t num_shards;
    int *fds;          /* num_shards, -1 when not open */
    char **paths;      /* num_shards, for messages */
    size_t *firsts;    /* num_shards: split index of each shard's first image */
} hdf5_dataset;

/* ---- per-thread JPEG decoders ---- */

typedef struct jpeg_thread {
    tjhandle tj;
    uint8_t *buf; /* compressed bytes of the image being decoded */
    size_t cap;
} jpeg_thread;

static pthread_once_t jpeg_once = PTHREAD_ONCE_INIT;
static pthread_key_t jpeg_key;
static int jpeg_key_ok;

static void jpeg_thread_free(void *p)
{
    jpeg_thread *t = p;
    if (t->tj) tjDestroy(t->tj);
    free(t->buf);
    free(t);
}

static void jpeg_key_create(void)
{
    jpeg_key_ok = pthread_key_create(&jpeg_key, jpeg_thread_free) == 0;
}

static kfac_status jpeg_thread_get(jpeg_thread **out, size_t need)
{
    pthread_once(&jpeg_once, jpeg_key_create);
    if (!jpeg_key_ok) return KFAC_ERR(KFAC_ENOMEM, "cannot create the JPEG decoder key");
    jpeg_thread *t = pthread_getspecific(jpeg_key);
    if (!t) {
        if (!(t = calloc(1, sizeof *t))) return KFAC_ERR(KFAC_ENOMEM, "cannot allocate a decoder");
        if (pthread_setspecific(jpeg_key, t) != 0) {
            jpeg_thread_free(t);
            return KFAC_ERR(KFAC_ENOMEM, "cannot register the JPEG decoder");
        }
    }
    if (!t->tj && !(t->tj = tjInitDecompress()))
        return KFAC_ERR(KFAC_EBACKEND, "tjInitDecompress: %s", tjGetErrorStr2(NULL));
    if (t->cap < need) {
        uint8_t *buf = realloc(t->buf, need);
        if (!buf) return KFAC_ERR(KFAC_ENOMEM, "cannot allocate %zu bytes to read a JPEG", need);
        t->buf = buf;
        t->cap = need;
    }
    *out = t;
    return KFAC_OK;
}

/* ---- reading images ---- */

static kfac_status read_bytes(const hdf5_dataset *ds, const image_ref *im, size_t index,
                              uint8_t *dst)
{
    const char *path = ds->paths[im->shard];
    size_t local = index - ds->firsts[im->shard], done = 0;
    while (done < im->len) {
        ssize_t got = pread(ds->fds[im->shard], dst + done, im->len - done,
                            (off_t)(im->pos + done));
        if (got < 0 && errno == EINTR) continue;
        if (got < 0)
            return KFAC_ERR(KFAC_EIO, "%s: image %zu: read error: %s", path, local,
                            strerror(errno));
        if (got == 0)
            return KFAC_ERR(KFAC_EFORMAT, "%s: image %zu: file truncated", path, local);
        done += (size_t)got;
    }
    return KFAC_OK;
}

/* turbojpeg 2.1 can report success with a 0x0 image on the call after a
 * failure on the same handle: a failed handle is dropped, not reused. */
static kfac_status drop_handle(jpeg_thread *t, kfac_status st)
{
    tjDestroy(t->tj);
    t->tj = NULL;
    return st;
}

static kfac_status decode_jpeg(const hdf5_dataset *ds, const image_ref *im, size_t index,
                               uint8_t *hwc)
{
    jpeg_thread *t = NULL;
    KFAC_TRY(jpeg_thread_get(&t, im->len));
    KFAC_TRY(read_bytes(ds, im, index, t->buf));
    const char *path = ds->paths[im->shard];
    size_t local = index - ds->firsts[im->shard];
    int w, h, subsamp, colorspace;
    if (tjDecompressHeader3(t->tj, t->buf, (unsigned long)im->len, &w, &h, &subsamp,
                            &colorspace) != 0)
        return drop_handle(t, KFAC_ERR(KFAC_EFORMAT, "%s: image %zu: bad JPEG: %s", path, local,
                                       tjGetErrorStr2(t->tj)));
    if (h != im->height || w != im->width)
        return KFAC_ERR(KFAC_EFORMAT, "%s: image %zu: JPEG is %dx%d, /shapes says %dx%d", path,
                        local, h, w, im->height, im->width);
    int format = ds->base.channels == 1 ? TJPF_GRAY : TJPF_RGB;
    /* a warning (recovered corrupt data) fails too: shards are written clean */
    if (tjDecompress2(t->tj, t->buf, (unsigned long)im->len, hwc, w, 0, h, format, 0) != 0)
        return drop_handle(t, KFAC_ERR(KFAC_EFORMAT, "%s: image %zu: JPEG decode failed: %s",
                                       path, local, tjGetErrorStr2(t->tj)));
    return KFAC_OK;
}

static kfac_status hdf5_read_image(const kfac_dataset *base, size_t index, uint8_t *hwc,
                                   int *image_height, int *image_width, int32_t *label)
{
    const hdf5_dataset *ds = base->impl;
    if (index >= base->count)
        return KFAC_ERR(KFAC_EINVAL, "image index %zu out of range (%zu images)", index,
                        base->count);
    const image_ref *im = &ds->images[index];
    if (ds->storage == KFAC_STORAGE_RAW)
        KFAC_TRY(read_bytes(ds, im, index, hwc));
    else
        KFAC_TRY(decode_jpeg(ds, im, index, hwc));
    *image_height = im->height;
    *image_width = im->width;
    *label = im->label;
    return KFAC_OK;
}

static void hdf5_destroy(kfac_dataset *base)
{
    hdf5_dataset *ds = base->impl;
    for (size_t i = 0; i < ds->num_shards; i++) {
        if (ds->fds && ds->fds[i] >= 0) close(ds->fds[i]);
        if (ds->paths) free(ds->paths[i]);
    }
    free(ds->fds);
    free(ds->paths);
    free(ds->firsts);
    free(ds->images);
    free(ds);
}

/* ---- reading one shard's tables with HDF5 ---- */

static kfac_status attr_int(hid_t file, const char *path, const char *name, long long *value)
{
    if (H5Aexists(file, name) <= 0)
        return KFAC_ERR(KFAC_EFORMAT, "%s: no attribute '%s' (not a kfac shard?)", path, name);
    hid_t attr = H5Aopen(file, name, H5P_DEFAULT), type = -1;
    kfac_status st = KFAC_OK;
    if (attr < 0 || (type = H5Aget_type(attr)) < 0) {
        st = KFAC_H5_ERR(KFAC_EFORMAT, path, name);
    } else if (H5Tget_class(type) != H5T_INTEGER) {
        st = KFAC_ERR(KFAC_EFORMAT, "%s: attribute '%s' is not an integer", path, name);
    } else if (H5Aread(attr, H5T_NATIVE_LLONG, value) < 0) {
        st = KFAC_H5_ERR(KFAC_EFORMAT, path, name);
    }
    if (type >= 0) H5Tclose(type);
    if (attr >= 0) H5Aclose(attr);
    return st;
}

static kfac_status attr_str(hid_t file, const char *path, const char *name, char buf[WORD_CAP])
{
    if (H5Aexists(file, name) <= 0)
        return KFAC_ERR(KFAC_EFORMAT, "%s: no attribute '%s' (not a kfac shard?)", path, name);
    hid_t attr = H5Aopen(file, name, H5P_DEFAULT), type = -1;
    kfac_status st = KFAC_OK;
    memset(buf, 0, WORD_CAP);
    if (attr < 0 || (type = H5Aget_type(attr)) < 0) {
        st = KFAC_H5_ERR(KFAC_EFORMAT, path, name);
    } else if (H5Tget_class(type) != H5T_STRING || H5Tis_variable_str(type) != 0 ||
               H5Tget_size(type) >= WORD_CAP) {
        st = KFAC_ERR(KFAC_EFORMAT, "%s: attribute '%s' is not a short fixed-length string",
                      path, name);
    } else if (H5Aread(attr, type, buf) < 0) {
        st = KFAC_H5_ERR(KFAC_EFORMAT, path, name);
    }
    if (type >= 0) H5Tclose(type);
    if (attr >= 0) H5Aclose(attr);
    return st;
}

/* Opens integer dataset `name` and checks it has `rank` dims equal to
 * `dims` (its element size must be `elem_size` when nonzero). */
static kfac_status open_ints(hid_t file, const char *path, const char *name, int rank,
                             const hsize_t *dims, size_t elem_size, hid_t *out)
{
    *out = -1;
    if (H5Lexists(file, name, H5P_DEFAULT) <= 0)
        return KFAC_ERR(KFAC_EFORMAT, "%s: no dataset %s", path, name);
    hid_t d = H5Dopen2(file, name, H5P_DEFAULT), space = -1, type = -1;
    if (d < 0) return KFAC_H5_ERR(KFAC_EFORMAT, path, name);
    kfac_status st = KFAC_OK;
    hsize_t got[2] = {0, 0};
    if ((space = H5Dget_space(d)) < 0 || (type = H5Dget_type(d)) < 0) {
        st = KFAC_H5_ERR(KFAC_EFORMAT, path, name);
    } else if (H5Tget_class(type) != H5T_INTEGER || (elem_size && H5Tget_size(type) != elem_size)) {
        st = KFAC_ERR(KFAC_EFORMAT, "%s: %s has the wrong element type", path, name);
    } else if (H5Sget_simple_extent_ndims(space) != rank ||
               H5Sget_simple_extent_dims(space, got, NULL) != rank || got[0] != dims[0] ||
               (rank == 2 && got[1] != dims[1])) {
        char shape[48] = "", want[48] = "";
        for (int i = 0; i < rank; i++) {
            const char *sep = i ? ", " : "";
            size_t at = strlen(shape), wat = strlen(want);
            snprintf(shape + at, sizeof shape - at, "%s%llu", sep, (unsigned long long)got[i]);
            snprintf(want + wat, sizeof want - wat, "%s%llu", sep, (unsigned long long)dims[i]);
        }
        st = KFAC_ERR(KFAC_EFORMAT, "%s: %s has shape [%s], expected [%s]", path, name, shape,
                      want);
    }
    if (type >= 0) H5Tclose(type);
    if (space >= 0) H5Sclose(space);
    if (st != KFAC_OK) {
        H5Dclose(d);
        return st;
    }
    *out = d;
    return KFAC_OK;
}

static kfac_status read_ints(hid_t file, const char *path, const char *name, int rank,
                             const hsize_t *dims, hid_t mtype, void *buf)
{
    hid_t d;
    KFAC_TRY(open_ints(file, path, name, rank, dims, 0, &d));
    kfac_status st = KFAC_OK;
    if (dims[0] > 0 && H5Dread(d, mtype, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf) < 0)
        st = KFAC_H5_ERR(KFAC_EFORMAT, path, name);
    H5Dclose(d);
    return st;
}

/* File offset of /data, which must be a contiguous uint8 array of `bytes`. */
static kfac_status data_offset(hid_t file, const char *path, uint64_t bytes, uint64_t *offset)
{
    hid_t d, dcpl = -1;
    hsize_t dims[1] = {bytes};
    KFAC_TRY(open_ints(file, path, "/data", 1, dims, 1, &d));
    kfac_status st = KFAC_OK;
    if ((dcpl = H5Dget_create_plist(d)) < 0) {
        st = KFAC_H5_ERR(KFAC_EFORMAT, path, "/data");
    } else if (H5Pget_layout(dcpl) != H5D_CONTIGUOUS) {
        st = KFAC_ERR(KFAC_EFORMAT, "%s: /data is not contiguous", path);
    } else {
        haddr_t at = H5Dget_offset(d);
        if (at == HADDR_UNDEF && bytes > 0)
            st = KFAC_ERR(KFAC_EFORMAT, "%s: /data has no storage in the file", path);
        *offset = at == HADDR_UNDEF ? 0 : (uint64_t)at;
    }
    if (dcpl >= 0) H5Pclose(dcpl);
    H5Dclose(d);
    return st;
}

/* What one shard holds, loaded whole before being checked. */
typedef struct shard_tables {
    size_t n;
    uint64_t *offsets;     /* n + 1 */
    uint16_t (*shapes)[2]; /* n */
    int32_t *labels;       /* n */
    uint64_t data_pos;     /* file offset of /data */
} shard_tables;

static kfac_status check_attrs(hid_t file, const char *path, const kfac_manifest *m,
                               const char *split, size_t first)
{
    long long format, channels, at;
    char storage[WORD_CAP], split_attr[WORD_CAP];
    KFAC_TRY(attr_int(file, path, "kfac_format", &format));
    if (format != KFAC_SHARD_FORMAT)
        return KFAC_ERR(KFAC_EFORMAT, "%s: shard format %lld, this build reads %d", path, format,
                        KFAC_SHARD_FORMAT);
    KFAC_TRY(attr_str(file, path, "storage", storage));
    const char *want = m->settings.storage == KFAC_STORAGE_JPEG ? "jpeg" : "raw";
    if (strcmp(storage, want) != 0)
        return KFAC_ERR(KFAC_EFORMAT, "%s: storage '%s', the manifest says '%s'", path, storage,
                        want);
    KFAC_TRY(attr_int(file, path, "channels", &channels));
    if (channels != m->settings.channels)
        return KFAC_ERR(KFAC_EFORMAT, "%s: %lld channels, the manifest says %d", path, channels,
                        m->settings.channels);
    KFAC_TRY(attr_str(file, path, "split", split_attr));
    if (strcmp(split_attr, split) != 0)
        return KFAC_ERR(KFAC_EFORMAT, "%s: a shard of split '%s', listed under '%s'", path,
                        split_attr, split);
    /* `first` counts inputs, skipped ones included: never below the images before. */
    KFAC_TRY(attr_int(file, path, "first", &at));
    if (at < 0 || (unsigned long long)at < first)
        return KFAC_ERR(KFAC_EFORMAT, "%s: first input is number %lld of the split, but %zu "
                        "images come before it (shards out of order?)", path, at, first);
    return KFAC_OK;
}

static kfac_status read_tables(hid_t file, const char *path, shard_tables *t)
{
    hsize_t n = t->n, offset_dims[1] = {n + 1}, shape_dims[2] = {n, 2}, label_dims[1] = {n};
    t->offsets = malloc((n + 1) * sizeof *t->offsets);
    t->shapes = malloc((n ? n : 1) * sizeof *t->shapes);
    t->labels = malloc((n ? n : 1) * sizeof *t->labels);
    if (!t->offsets || !t->shapes || !t->labels)
        return KFAC_ERR(KFAC_ENOMEM, "%s: cannot allocate the tables of %zu images", path, t->n);
    KFAC_TRY(read_ints(file, path, "/offsets", 1, offset_dims, H5T_NATIVE_UINT64, t->offsets));
    KFAC_TRY(read_ints(file, path, "/shapes", 2, shape_dims, H5T_NATIVE_UINT16, t->shapes));
    KFAC_TRY(read_ints(file, path, "/labels", 1, label_dims, H5T_NATIVE_INT32, t->labels));
    return data_offset(file, path, t->offsets[n], &t->data_pos);
}

/* Attributes and tables of one shard, under H5E_BEGIN_TRY by the caller. */
static kfac_status read_shard(const char *path, const kfac_manifest *m, const char *split,
                              size_t first, shard_tables *t)
{
    hid_t file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (file < 0) return KFAC_H5_ERR(KFAC_EFORMAT, path, "cannot open as HDF5");
    kfac_status st = check_attrs(file, path, m, split, first);
    if (st == KFAC_OK) st = read_tables(file, path, t);
    H5Fclose(file);
    return st;
}

/* Checks the tables of shard `s` and fills its images' entries. */
static kfac_status add_images(hdf5_dataset *ds, uint32_t s, const shard_tables *t,
                              uint64_t file_size, size_t first)
{
    const char *path = ds->paths[s];
    int channels = ds->base.channels;
    if (t->offsets[0] != 0)
        return KFAC_ERR(KFAC_EFORMAT, "%s: /offsets starts at %" PRIu64, path, t->offsets[0]);
    if (t->data_pos + t->offsets[t->n] > file_size)
        return KFAC_ERR(KFAC_EFORMAT, "%s: /data ends at byte %" PRIu64 " of a %" PRIu64
                        "-byte file (truncated?)", path, t->data_pos + t->offsets[t->n], file_size);
    for (size_t i = 0; i < t->n; i++) {
        image_ref *im = &ds->images[first + i];
        int h = t->shapes[i][0], w = t->shapes[i][1];
        if (t->offsets[i + 1] <= t->offsets[i])
            return KFAC_ERR(KFAC_EFORMAT, "%s: image %zu: /offsets not increasing", path, i);
        if (h < 1 || w < 1)
            return KFAC_ERR(KFAC_EFORMAT, "%s: image %zu: size %dx%d", path, i, h, w);
        if (t->labels[i] < 0 || t->labels[i] >= ds->base.num_classes)
            return KFAC_ERR(KFAC_EFORMAT, "%s: image %zu: label %d outside [0, %d)", path, i,
                            (int)t->labels[i], ds->base.num_classes);
        im->pos = t->data_pos + t->offsets[i];
        im->len = t->offsets[i + 1] - t->offsets[i];
        if (ds->storage == KFAC_STORAGE_RAW && im->len != (uint64_t)h * w * channels)
            return KFAC_ERR(KFAC_EFORMAT, "%s: image %zu: %" PRIu64 " bytes for %dx%dx%d pixels",
                            path, i, im->len, h, w, channels);
        im->shard = s;
        im->height = (uint16_t)h;
        im->width = (uint16_t)w;
        im->label = t->labels[i];
    }
    return KFAC_OK;
}

static kfac_status open_shard(hdf5_dataset *ds, const kfac_manifest *m, const char *dir,
                              const char *split, uint32_t s, const kfac_shard_entry *e)
{
    char path[PATH_CAP];
    int len = snprintf(path, sizeof path, "%s/%s", dir, e->file);
    if (len < 0 || (size_t)len >= sizeof path)
        return KFAC_ERR(KFAC_EINVAL, "%s/%s: path too long", dir, e->file);
    if (!(ds->paths[s] = strdup(path)))
        return KFAC_ERR(KFAC_ENOMEM, "%s: cannot allocate the path", path);
    /* a plain open first: a missing file is KFAC_EIO with the system's reason */
    ds->fds[s] = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st_;
    if (ds->fds[s] < 0 || fstat(ds->fds[s], &st_) != 0)
        return KFAC_ERR(KFAC_EIO, "%s: cannot open: %s", path, strerror(errno));

    size_t first = ds->firsts[s];
    shard_tables t = {.n = e->count};
    kfac_status st;
    H5E_BEGIN_TRY { /* no error stacks printed: messages go to kfac_last_error */
        st = read_shard(path, m, split, first, &t);
    } H5E_END_TRY;
    if (st == KFAC_OK) st = add_images(ds, s, &t, (uint64_t)st_.st_size, first);
    free(t.offsets);
    free(t.shapes);
    free(t.labels);
    return st;
}

static kfac_status open_split(hdf5_dataset *ds, const kfac_manifest *m, const char *dir,
                              const char *split)
{
    const kfac_split_entry *sp = kfac_manifest_split(m, split);
    if (!sp) return KFAC_ERR(KFAC_EINVAL, "%s/manifest.yaml: no split '%s'", dir, split);
    if (sp->count == 0) return KFAC_ERR(KFAC_EFORMAT, "%s: split '%s' has no images", dir, split);
    ds->storage = m->settings.storage;
    ds->base.count = sp->count;
    ds->base.channels = m->settings.channels;
    ds->base.num_classes = m->num_classes;
    ds->images = malloc(sp->count * sizeof *ds->images);
    ds->fds = malloc((sp->num_shards ? sp->num_shards : 1) * sizeof *ds->fds);
    ds->paths = calloc(sp->num_shards ? sp->num_shards : 1, sizeof *ds->paths);
    ds->firsts = malloc((sp->num_shards ? sp->num_shards : 1) * sizeof *ds->firsts);
    if (!ds->images || !ds->fds || !ds->paths || !ds->firsts)
        return KFAC_ERR(KFAC_ENOMEM, "%s: cannot allocate the tables of %zu images", dir,
                        sp->count);
    for (size_t s = 0; s < sp->num_shards; s++) ds->fds[s] = -1;
    ds->num_shards = sp->num_shards;
    size_t first = 0;
    for (size_t s = 0; s < sp->num_shards; s++) {
        ds->firsts[s] = first;
        KFAC_TRY(open_shard(ds, m, dir, split, (uint32_t)s, &sp->shards[s]));
        first += sp->shards[s].count;
    }
    int h = ds->images[0].height, w = ds->images[0].width;
    ds->base.fixed_size = 1;
    for (size_t i = 0; i < ds->base.count; i++) {
        const image_ref *im = &ds->images[i];
        if (im->height != h || im->width != w) ds->base.fixed_size = 0;
        if (im->height > ds->base.height) ds->base.height = im->height;
        if (im->width > ds->base.width) ds->base.width = im->width;
    }
    return KFAC_OK;
}

kfac_status kfac_dataset_open_hdf5(const char *dir, const char *split, kfac_dataset **out)
{
    *out = NULL;
    kfac_manifest *m;
    KFAC_TRY(kfac_manifest_read(dir, &m));
    hdf5_dataset *ds = calloc(1, sizeof *ds);
    if (!ds) {
        kfac_manifest_free(m);
        return KFAC_ERR(KFAC_ENOMEM, "%s: cannot allocate the dataset", dir);
    }
    ds->base.read_image = hdf5_read_image;
    ds->base.destroy = hdf5_destroy;
    ds->base.impl = ds;
    kfac_status st = open_split(ds, m, dir, split);
    kfac_manifest_free(m);
    if (st != KFAC_OK) {
        hdf5_destroy(&ds->base);
        return st;
    }
    *out = &ds->base;
    return KFAC_OK;
}
