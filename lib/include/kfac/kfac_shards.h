/* kfac_shards.h - the dataset format written by `kfac prep` and read by the
 * trainer: HDF5 shards plus one manifest per dataset folder.
 *
 * A dataset folder holds
 *   manifest.yaml            what the folder holds (below); written last, atomically
 *   train-00000.h5 ...       shards of the train split, in image order
 *   val-00000.h5 ...         shards of the val split (IDX t10k files become val)
 *
 * One shard (HDF5, format version 1) holds N images of one split:
 *   /data     uint8[total bytes], contiguous, uncompressed: the images back to
 *             back; raw storage: HWC pixels; jpeg storage: JPEG files
 *   /offsets  uint64[N + 1]: image i is data[offsets[i], offsets[i+1])
 *   /shapes   uint16[N][2]: decoded height, width of image i
 *   /labels   int32[N]: class index of image i
 *   /classes  fixed-length strings: the class names (wnids) of the dataset
 *   attributes on "/": kfac_format (int 1), storage ("raw"|"jpeg"), channels,
 *             resize, crop ("center"|"none"), jpeg_quality, split, first
 *             (index of the shard's first input in the split's sorted input
 *             list: shard k of N inputs each has first = k * N; skipped
 *             inputs make a shard shorter, never move the next one)
 * /data is contiguous so readers can pread() images straight from the file
 * (H5Dget_offset) from many threads, without HDF5's global lock.  Object
 * timestamps are off, so the same images give the same bytes: shards are
 * reproducible and checksummed per file.  A shard of 0 images is valid: its
 * datasets have size 0 and /offsets is [0].
 *
 * manifest.yaml (a YAML subset written by kfac_manifest_write):
 *   kfac_dataset: 1
 *   storage: raw            # or jpeg
 *   channels: 3
 *   resize: 256             # shorter side; 0 = original size
 *   crop: center            # or none (aspect kept)
 *   jpeg_quality: 90
 *   source: folder          # or idx
 *   classes: [n01440764, n01443537, ...]
 *   splits:
 *     train:
 *       count: 1281167
 *       shards:
 *         - {file: train-00000.h5, count: 5000, bytes: 752936212, xxh64: 0123456789abcdef}
 *     val:
 *       ...
 * Strings that a YAML reader could take for something else (spaces,
 * colons, "0", "no", ...) are double-quoted; so is a hash made of digits
 * only.  Split names are train and val; shard files are plain names in the
 * folder, each listed once; a split's count is the sum of its shards'.
 */
#ifndef KFAC_SHARDS_H
#define KFAC_SHARDS_H

#include <stddef.h>
#include <stdint.h>

#include "kfac/kfac_dataset.h"
#include "kfac/kfac_status.h"

#ifdef __cplusplus
extern "C" {
#endif

enum {
    KFAC_SHARD_FORMAT = 1,
    KFAC_CLASS_NAME_MAX = 64, /* bytes of a class name, NUL included */
    KFAC_SHARD_FILE_MAX = 256 /* bytes of a shard file name, NUL included */
};

typedef enum kfac_storage {
    KFAC_STORAGE_RAW = 0, /* uint8 HWC pixels: no decode when training (fast path) */
    KFAC_STORAGE_JPEG = 1 /* re-encoded JPEG bytes, decoded when read (compact path) */
} kfac_storage;

/* How the images were preprocessed; recorded in every shard and the manifest. */
typedef struct kfac_prep_settings {
    kfac_storage storage;
    int channels;     /* 1 (gray) or 3 (RGB) */
    int resize;       /* shorter side resized to this (antialiased); 0 = kept */
    int center_crop;  /* 1: then center-cropped to resize x resize; 0: aspect kept */
    int jpeg_quality; /* JPEG storage: encoder quality 1..100 */
    char source[16];  /* "folder" or "idx" */
} kfac_prep_settings;

/* One shard as the manifest lists it. */
typedef struct kfac_shard_entry {
    char file[KFAC_SHARD_FILE_MAX]; /* name relative to the dataset folder */
    size_t count;                   /* images */
    uint64_t bytes;                 /* file size */
    uint64_t xxh64;                 /* XXH64 (seed 0) of the whole file */
} kfac_shard_entry;

typedef struct kfac_split_entry {
    char name[16]; /* "train" or "val" */
    size_t count;  /* images over all shards */
    size_t num_shards;
    kfac_shard_entry *shards;
} kfac_split_entry;

typedef struct kfac_manifest {
    kfac_prep_settings settings;
    int num_classes;
    char (*classes)[KFAC_CLASS_NAME_MAX];
    int num_splits;
    kfac_split_entry splits[2];
} kfac_manifest;

/* ---- writing shards ---- */

typedef struct kfac_shard_writer kfac_shard_writer;

/* Starts shard `path` of split `split` whose first input is number `first`
 * of the split's inputs (see the `first` attribute above).  Images are kept in memory until close, so a shard is
 * written in one go and a crash leaves no half-written file under `path`
 * (it is written as PATH.tmp and renamed). */
kfac_status kfac_shard_writer_open(kfac_shard_writer **out, const char *path, const char *split,
                                   size_t first, const kfac_prep_settings *settings,
                                   const char (*classes)[KFAC_CLASS_NAME_MAX], int num_classes);

/* Appends one image: `bytes` are its HWC pixels (raw storage, n ==
 * height*width*channels) or its JPEG file (jpeg storage, whose header must
 * say height x width).  KFAC_EINVAL for a wrong size, a side outside
 * 1..65535 or a label outside [0, num_classes). */
kfac_status kfac_shard_writer_add(kfac_shard_writer *w, const void *bytes, size_t n, int height,
                                  int width, int32_t label);

/* Bytes added so far (for shard-size limits). */
uint64_t kfac_shard_writer_bytes(const kfac_shard_writer *w);

/* Writes the file, fills *entry (file name without folder, count, bytes,
 * xxh64) and frees the writer, also on failure. */
kfac_status kfac_shard_writer_close(kfac_shard_writer *w, kfac_shard_entry *entry);

/* Frees a writer without writing anything (NULL allowed). */
void kfac_shard_writer_abort(kfac_shard_writer *w);

/* ---- the manifest ---- */

/* Reads DIR/manifest.yaml.  Errors name the file and line:column
 * (KFAC_EFORMAT) or the path and reason (KFAC_EIO). */
kfac_status kfac_manifest_read(const char *dir, kfac_manifest **out);

/* Writes DIR/manifest.yaml atomically (temporary file, fsync, rename). */
kfac_status kfac_manifest_write(const char *dir, const kfac_manifest *m);

void kfac_manifest_free(kfac_manifest *m);

/* The split called `name`, or NULL. */
const kfac_split_entry *kfac_manifest_split(const kfac_manifest *m, const char *name);

/* ---- checksums ---- */

/* XXH64 (seed 0) and size of a whole file, streamed. */
kfac_status kfac_file_xxh64(const char *path, uint64_t *hash, uint64_t *bytes);

/* Checks DIR/entry->file against the entry's size and checksum: KFAC_OK,
 * or KFAC_EFORMAT "PATH: checksum mismatch (expected X, got Y)" / "PATH:
 * size N, expected M", or KFAC_EIO when missing. */
kfac_status kfac_shard_verify(const char *dir, const kfac_shard_entry *entry);

/* ---- reading: the dataset interface ---- */

/* Opens split `split` ("train" or "val") of the dataset folder `dir` as a
 * kfac_dataset.  Labels, offsets and shapes of every shard are loaded;
 * pixels are read on demand with pread (JPEG storage: decoded with
 * libturbojpeg's default flags, one handle per thread).  height/width are
 * the largest of the split; fixed_size is set when all images share one
 * size.  Shards are checked against the manifest (storage, channels,
 * split, first image, count) but not checksummed: kfac_shard_verify does
 * that.  KFAC_EINVAL: no such split; KFAC_EIO: a shard missing;
 * KFAC_EFORMAT: a shard malformed or the split empty. */
kfac_status kfac_dataset_open_hdf5(const char *dir, const char *split, kfac_dataset **out);

#ifdef __cplusplus
}
#endif
#endif
