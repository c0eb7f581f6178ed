/* shard_write.c - writes one HDF5 shard (layout in kfac_shards.h).
 *
 * Images are collected in memory and written at close in one go, as
 * PATH.tmp renamed to PATH, so a shard under its real name is always whole.
 * The bytes depend only on the images and settings: the format version is
 * pinned (libver bounds v18..v18), object timestamps are off and every
 * dataset is written whole, so writing the same images twice gives the same
 * file and the same checksum.  An empty shard (0 images) is valid: its
 * datasets have size 0 and /offsets is [0].
 */
#include "kfac/kfac_shards.h"

#include <hdf5.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <turbojpeg.h>
#include <unistd.h>

#include "data/shards_internal.h"

enum { MAX_SIDE = 65535 /* /shapes is uint16 */ };

struct kfac_shard_writer {
    char *path;
    char split[16];
    uint64_t first;
    kfac_prep_settings settings;
    char (*classes)[KFAC_CLASS_NAME_MAX];
    size_t num_classes;
    uint8_t *data; /* data_len bytes used of data_cap */
    uint64_t data_len;
    size_t data_cap;
    uint64_t *offsets;     /* count + 1 */
    uint16_t (*shapes)[2]; /* count: height, width */
    int32_t *labels;       /* count */
    size_t count, cap;     /* images, room in the per-image arrays */
    tjhandle tj;           /* jpeg storage: reads headers to check sizes */
};

/* ---- HDF5 errors ---- */

typedef struct h5_reason {
    char text[256];
} h5_reason;

/* The first frame walking upward is the innermost: where HDF5 found the
 * problem, usually the most specific description. */
static herr_t innermost(unsigned n, const H5E_error2_t *err, void *data)
{
    h5_reason *r = data;
    if (n == 0 && err->desc) snprintf(r->text, sizeof r->text, "%s", err->desc);
    return 0;
}

kfac_status kfac__h5_error(kfac_status status, const char *file, int line, const char *path,
                           const char *what)
{
    h5_reason r = {"unknown HDF5 error"};
    H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, innermost, &r);
    return kfac__set_error(status, file, line, "%s: %s: %s", path, what, r.text);
}

/* ---- collecting images ---- */

static kfac_status check_settings(const kfac_prep_settings *s, const char *path)
{
    if (s->storage != KFAC_STORAGE_RAW && s->storage != KFAC_STORAGE_JPEG)
        return KFAC_ERR(KFAC_EINVAL, "%s: unknown storage %d", path, (int)s->storage);
    if (s->channels != 1 && s->channels != 3)
        return KFAC_ERR(KFAC_EINVAL, "%s: channels %d, expected 1 or 3", path, s->channels);
    if (s->resize < 0 || s->resize > MAX_SIDE)
        return KFAC_ERR(KFAC_EINVAL, "%s: resize %d outside [0, %d]", path, s->resize, MAX_SIDE);
    if (s->center_crop != 0 && s->center_crop != 1)
        return KFAC_ERR(KFAC_EINVAL, "%s: center_crop %d, expected 0 or 1", path, s->center_crop);
    int lo = s->storage == KFAC_STORAGE_JPEG ? 1 : 0;
    if (s->jpeg_quality < lo || s->jpeg_quality > 100)
        return KFAC_ERR(KFAC_EINVAL, "%s: jpeg_quality %d outside [%d, 100]", path,
                        s->jpeg_quality, lo);
    return KFAC_OK;
}

kfac_status kfac_shard_writer_open(kfac_shard_writer **out, const char *path, const char *split,
                                   size_t first, const kfac_prep_settings *settings,
                                   const char (*classes)[KFAC_CLASS_NAME_MAX], int num_classes)
{
    *out = NULL;
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    if (!*base || strlen(base) >= KFAC_SHARD_FILE_MAX)
        return KFAC_ERR(KFAC_EINVAL, "%s: shard file name empty or longer than %d bytes", path,
                        KFAC_SHARD_FILE_MAX - 1);
    if (strcmp(split, "train") != 0 && strcmp(split, "val") != 0)
        return KFAC_ERR(KFAC_EINVAL, "%s: split '%s', expected train or val", path, split);
    KFAC_TRY(check_settings(settings, path));
    if (num_classes < 1) return KFAC_ERR(KFAC_EINVAL, "%s: %d classes", path, num_classes);
    for (int i = 0; i < num_classes; i++) {
        size_t len = strnlen(classes[i], KFAC_CLASS_NAME_MAX);
        if (len == 0 || len == KFAC_CLASS_NAME_MAX)
            return KFAC_ERR(KFAC_EINVAL, "%s: class %d: name empty or not NUL-terminated", path,
                            i);
    }

    kfac_shard_writer *w = calloc(1, sizeof *w);
    if (!w) return KFAC_ERR(KFAC_ENOMEM, "%s: cannot allocate the shard writer", path);
    w->path = strdup(path);
    w->classes = malloc((size_t)num_classes * sizeof *w->classes);
    w->offsets = calloc(1, sizeof *w->offsets);
    if (!w->path || !w->classes || !w->offsets) {
        kfac_shard_writer_abort(w);
        return KFAC_ERR(KFAC_ENOMEM, "%s: cannot allocate the shard writer", path);
    }
    memcpy(w->classes, classes, (size_t)num_classes * sizeof *w->classes);
    w->num_classes = (size_t)num_classes;
    snprintf(w->split, sizeof w->split, "%s", split);
    w->first = first;
    w->settings = *settings;
    *out = w;
    return KFAC_OK;
}

static kfac_status grow(kfac_shard_writer *w, size_t n)
{
    if (w->count == w->cap) {
        size_t cap = w->cap ? 2 * w->cap : 256;
        uint64_t *offsets = realloc(w->offsets, (cap + 1) * sizeof *offsets);
        if (offsets) w->offsets = offsets;
        uint16_t(*shapes)[2] = offsets ? realloc(w->shapes, cap * sizeof *shapes) : NULL;
        if (shapes) w->shapes = shapes;
        int32_t *labels = shapes ? realloc(w->labels, cap * sizeof *labels) : NULL;
        if (!labels) return KFAC_ERR(KFAC_ENOMEM, "%s: cannot grow to %zu images", w->path, cap);
        w->labels = labels;
        w->cap = cap;
    }
    if (w->data_len + n > w->data_cap) {
        size_t cap = w->data_cap ? w->data_cap : 1 << 20;
        while (cap < w->data_len + n) cap *= 2;
        uint8_t *data = realloc(w->data, cap);
        if (!data)
            return KFAC_ERR(KFAC_ENOMEM, "%s: cannot grow the image buffer to %zu bytes", w->path,
                            cap);
        w->data = data;
        w->data_cap = cap;
    }
    return KFAC_OK;
}

/* JPEG storage: the header must be readable and agree with the stated size,
 * so a wrong shape is caught when written, not when training. */
static kfac_status check_jpeg(kfac_shard_writer *w, const void *bytes, size_t n, int height,
                              int width)
{
    if (!w->tj && !(w->tj = tjInitDecompress()))
        return KFAC_ERR(KFAC_EBACKEND, "%s: tjInitDecompress: %s", w->path,
                        tjGetErrorStr2(NULL));
    int jw, jh, subsamp, colorspace;
    if (n > (unsigned long)-1 ||
        tjDecompressHeader3(w->tj, bytes, (unsigned long)n, &jw, &jh, &subsamp, &colorspace) != 0) {
        kfac_status st = KFAC_ERR(KFAC_EINVAL, "%s: image %zu: not a JPEG file: %s", w->path,
                                  w->count, tjGetErrorStr2(w->tj));
        /* turbojpeg 2.1 can misreport the next header after a failure on one handle */
        tjDestroy(w->tj);
        w->tj = NULL;
        return st;
    }
    if (jh != height || jw != width)
        return KFAC_ERR(KFAC_EINVAL, "%s: image %zu: JPEG is %dx%d, stated %dx%d", w->path,
                        w->count, jh, jw, height, width);
    return KFAC_OK;
}

kfac_status kfac_shard_writer_add(kfac_shard_writer *w, const void *bytes, size_t n, int height,
                                  int width, int32_t label)
{
    if (height < 1 || width < 1 || height > MAX_SIDE || width > MAX_SIDE)
        return KFAC_ERR(KFAC_EINVAL, "%s: image %zu: size %dx%d outside 1..%d", w->path, w->count,
                        height, width, MAX_SIDE);
    if (label < 0 || (size_t)label >= w->num_classes)
        return KFAC_ERR(KFAC_EINVAL, "%s: image %zu: label %d outside [0, %zu)", w->path,
                        w->count, (int)label, w->num_classes);
    if (w->settings.storage == KFAC_STORAGE_RAW) {
        size_t want = (size_t)height * (size_t)width * (size_t)w->settings.channels;
        if (n != want)
            return KFAC_ERR(KFAC_EINVAL, "%s: image %zu: %zu bytes for %dx%dx%d raw pixels",
                            w->path, w->count, n, height, width, w->settings.channels);
    } else {
        KFAC_TRY(check_jpeg(w, bytes, n, height, width));
    }
    KFAC_TRY(grow(w, n));
    memcpy(w->data + w->data_len, bytes, n);
    w->data_len += n;
    w->offsets[w->count + 1] = w->data_len;
    w->shapes[w->count][0] = (uint16_t)height;
    w->shapes[w->count][1] = (uint16_t)width;
    w->labels[w->count] = label;
    w->count++;
    return KFAC_OK;
}

uint64_t kfac_shard_writer_bytes(const kfac_shard_writer *w)
{
    return w->data_len;
}

void kfac_shard_writer_abort(kfac_shard_writer *w)
{
    if (!w) return;
    if (w->tj) tjDestroy(w->tj);
    free(w->path);
    free(w->classes);
    free(w->data);
    free(w->offsets);
    free(w->shapes);
    free(w->labels);
    free(w);
}

/* ---- the HDF5 file ---- */

/* Creates dataset `name` of `rank` dims with file type `ftype` and writes
 * `buf` (memory type `mtype`) into it whole.  Size-0 datasets stay
 * unallocated. */
static kfac_status write_dataset(hid_t file, hid_t dcpl, const char *path, const char *name,
                                 hid_t ftype, hid_t mtype, int rank, const hsize_t *dims,
                                 const void *buf)
{
    kfac_status st = KFAC_OK;
    hid_t dset = -1, space = H5Screate_simple(rank, dims, NULL);
    if (space < 0) {
        st = KFAC_H5_ERR(KFAC_EIO, path, name);
        goto done;
    }
    dset = H5Dcreate2(file, name, ftype, space, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    if (dset < 0) {
        st = KFAC_H5_ERR(KFAC_EIO, path, name);
        goto done;
    }
    hssize_t elements = H5Sget_simple_extent_npoints(space);
    if (elements > 0 && H5Dwrite(dset, mtype, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf) < 0)
        st = KFAC_H5_ERR(KFAC_EIO, path, name);
done:
    if (dset >= 0) H5Dclose(dset);
    if (space >= 0) H5Sclose(space);
    return st;
}

/* A scalar attribute on "/"; `value` is in `mtype`. */
static kfac_status write_attr(hid_t file, const char *path, const char *name, hid_t ftype,
                              hid_t mtype, const void *value)
{
    kfac_status st = KFAC_OK;
    hid_t attr = -1, space = H5Screate(H5S_SCALAR);
    if (space < 0 || (attr = H5Acreate2(file, name, ftype, space, H5P_DEFAULT, H5P_DEFAULT)) < 0 ||
        H5Awrite(attr, mtype, value) < 0)
        st = KFAC_H5_ERR(KFAC_EIO, path, name);
    if (attr >= 0) H5Aclose(attr);
    if (space >= 0) H5Sclose(space);
    return st;
}

/* A fixed-length, NUL-padded string type of `size` bytes. */
static hid_t string_type(size_t size)
{
    hid_t t = H5Tcopy(H5T_C_S1);
    if (t >= 0 && (H5Tset_size(t, size) < 0 || H5Tset_strpad(t, H5T_STR_NULLPAD) < 0)) {
        H5Tclose(t);
        return -1;
    }
    return t;
}

static kfac_status write_attr_str(hid_t file, const char *path, const char *name,
                                  const char *value)
{
    hid_t t = string_type(strlen(value) ? strlen(value) : 1);
    if (t < 0) return KFAC_H5_ERR(KFAC_EIO, path, name);
    kfac_status st = write_attr(file, path, name, t, t, value);
    H5Tclose(t);
    return st;
}

static kfac_status write_attrs(const kfac_shard_writer *w, hid_t file, const char *path)
{
    const kfac_prep_settings *s = &w->settings;
    int format = KFAC_SHARD_FORMAT;
    KFAC_TRY(write_attr(file, path, "kfac_format", H5T_STD_I32LE, H5T_NATIVE_INT, &format));
    const char *storage = s->storage == KFAC_STORAGE_JPEG ? "jpeg" : "raw";
    KFAC_TRY(write_attr_str(file, path, "storage", storage));
    KFAC_TRY(write_attr(file, path, "channels", H5T_STD_I32LE, H5T_NATIVE_INT, &s->channels));
    KFAC_TRY(write_attr(file, path, "resize", H5T_STD_I32LE, H5T_NATIVE_INT, &s->resize));
    KFAC_TRY(write_attr_str(file, path, "crop", s->center_crop ? "center" : "none"));
    KFAC_TRY(write_attr(file, path, "jpeg_quality", H5T_STD_I32LE, H5T_NATIVE_INT,
                        &s->jpeg_quality));
    KFAC_TRY(write_attr_str(file, path, "split", w->split));
    KFAC_TRY(write_attr(file, path, "first", H5T_STD_U64LE, H5T_NATIVE_UINT64, &w->first));
    return KFAC_OK;
}

static kfac_status write_classes(const kfac_shard_writer *w, hid_t file, hid_t dcpl,
                                 const char *path)
{
    size_t longest = 1;
    for (size_t i = 0; i < w->num_classes; i++)
        if (strlen(w->classes[i]) > longest) longest = strlen(w->classes[i]);
    /* Repacked to the longest name, zero-padded: no stray bytes in the file. */
    char *names = calloc(w->num_classes, longest);
    if (!names) return KFAC_ERR(KFAC_ENOMEM, "%s: cannot allocate the class names", path);
    for (size_t i = 0; i < w->num_classes; i++)
        memcpy(names + i * longest, w->classes[i], strlen(w->classes[i]));
    kfac_status st;
    hid_t t = string_type(longest);
    if (t < 0) {
        st = KFAC_H5_ERR(KFAC_EIO, path, "/classes");
    } else {
        hsize_t dims[1] = {(hsize_t)w->num_classes};
        st = write_dataset(file, dcpl, path, "/classes", t, t, 1, dims, names);
        H5Tclose(t);
    }
    free(names);
    return st;
}

static kfac_status write_contents(const kfac_shard_writer *w, hid_t file, hid_t dcpl,
                                  const char *path)
{
    hsize_t n = w->count, data_dims[1] = {w->data_len}, offset_dims[1] = {n + 1},
            shape_dims[2] = {n, 2}, label_dims[1] = {n};
    KFAC_TRY(write_attrs(w, file, path));
    KFAC_TRY(write_classes(w, file, dcpl, path));
    KFAC_TRY(write_dataset(file, dcpl, path, "/labels", H5T_STD_I32LE, H5T_NATIVE_INT32, 1,
                           label_dims, w->labels));
    KFAC_TRY(write_dataset(file, dcpl, path, "/shapes", H5T_STD_U16LE, H5T_NATIVE_UINT16, 2,
                           shape_dims, w->shapes));
    KFAC_TRY(write_dataset(file, dcpl, path, "/offsets", H5T_STD_U64LE, H5T_NATIVE_UINT64, 1,
                           offset_dims, w->offsets));
    /* last, so the small metadata sits together at the front of the file */
    KFAC_TRY(write_dataset(file, dcpl, path, "/data", H5T_STD_U8LE, H5T_NATIVE_UINT8, 1,
                           data_dims, w->data));
    return KFAC_OK;
}

static kfac_status write_file(const kfac_shard_writer *w, const char *path)
{
    kfac_status st = KFAC_OK;
    hid_t fcpl = H5Pcreate(H5P_FILE_CREATE), fapl = H5Pcreate(H5P_FILE_ACCESS),
          dcpl = H5Pcreate(H5P_DATASET_CREATE), file = -1;
    /* the fcpl's setting covers the root group */
    if (fcpl < 0 || fapl < 0 || dcpl < 0 || H5Pset_obj_track_times(fcpl, 0) < 0 ||
        H5Pset_obj_track_times(dcpl, 0) < 0 || H5Pset_layout(dcpl, H5D_CONTIGUOUS) < 0 ||
        H5Pset_fill_time(dcpl, H5D_FILL_TIME_NEVER) < 0 ||
        H5Pset_libver_bounds(fapl, H5F_LIBVER_V18, H5F_LIBVER_V18) < 0) {
        st = KFAC_H5_ERR(KFAC_EIO, path, "cannot set up the file properties");
        goto done;
    }
    file = H5Fcreate(path, H5F_ACC_TRUNC, fcpl, fapl);
    if (file < 0) {
        st = KFAC_H5_ERR(KFAC_EIO, path, "cannot create");
        goto done;
    }
    st = write_contents(w, file, dcpl, path);
done:
    if (file >= 0 && H5Fclose(file) < 0 && st == KFAC_OK)
        st = KFAC_H5_ERR(KFAC_EIO, path, "cannot close");
    if (dcpl >= 0) H5Pclose(dcpl);
    if (fapl >= 0) H5Pclose(fapl);
    if (fcpl >= 0) H5Pclose(fcpl);
    return st;
}

kfac_status kfac_shard_writer_close(kfac_shard_writer *w, kfac_shard_entry *entry)
{
    memset(entry, 0, sizeof *entry);
    size_t len = strlen(w->path);
    char *tmp = malloc(len + sizeof ".tmp");
    if (!tmp) {
        kfac_shard_writer_abort(w);
        return KFAC_ERR(KFAC_ENOMEM, "%s: cannot allocate a path", w->path);
    }
    memcpy(tmp, w->path, len);
    memcpy(tmp + len, ".tmp", sizeof ".tmp");

    kfac_status st;
    H5E_BEGIN_TRY { /* no error stacks printed: messages go to kfac_last_error */
        st = write_file(w, tmp);
    } H5E_END_TRY;
    if (st != KFAC_OK)
        unlink(tmp);
    else
        st = kfac__publish_file(tmp, w->path);
    if (st == KFAC_OK) st = kfac_file_xxh64(w->path, &entry->xxh64, &entry->bytes);
    if (st == KFAC_OK) {
        const char *base = strrchr(w->path, '/');
        snprintf(entry->file, sizeof entry->file, "%s", base ? base + 1 : w->path);
        entry->count = w->count;
    }
    free(tmp);
    kfac_shard_writer_abort(w);
    return st;
}
