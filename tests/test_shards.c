/* test_shards.c - the HDF5 dataset format (kfac_shards.h): shards read back
 * with plain HDF5 calls, reproducible bytes, the manifest round trip and its
 * error messages, checksums against XXH64 of the whole file and the
 * xxh64sum tool, and kfac_dataset_open_hdf5 against the IDX source and
 * against the test's own libturbojpeg decode. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <hdf5.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <turbojpeg.h>
#include <unistd.h>
#include <xxhash.h>

#include "kfac/kfac_dataset.h"
#include "kfac/kfac_shards.h"
#include "kfac/kfac_status.h"
#include "testutil.h"

static char tmpdir[256];

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st, (void)flag, (void)ftw;
    return remove(path);
}

static const char *in_tmp(char *buf, size_t cap, const char *name)
{
    snprintf(buf, cap, "%s/%s", tmpdir, name);
    return buf;
}

static int make_dir(const char *name, char *out, size_t cap)
{
    in_tmp(out, cap, name);
    return mkdir(out, 0755);
}


static int write_text(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    if (!f) return -1;
    fputs(text, f);
    return fclose(f);
}

static kfac_prep_settings settings_of(kfac_storage storage, int channels)
{
    kfac_prep_settings s = {.storage = storage, .channels = channels, .resize = 0,
                            .center_crop = 0, .jpeg_quality = storage == KFAC_STORAGE_JPEG ? 95 : 0};
    snprintf(s.source, sizeof s.source, "folder");
    return s;
}

static char classes10[10][KFAC_CLASS_NAME_MAX] = {"0", "1", "2", "3", "4", "5", "6", "7", "8", "9"};

/* ---- synthetic images ---- */

typedef struct synth {
    int n, channels;
    int h[8], w[8];
    int32_t label[8];
    uint8_t *pix[8]; /* HWC */
} synth;

/* Smooth gradients plus a little noise: JPEG-friendly but not trivial. */
static void synth_init(synth *s, int n, int channels, int variable)
{
    unsigned long long rng = 12345;
    s->n = n;
    s->channels = channels;
    for (int i = 0; i < n; i++) {
        s->h[i] = variable ? 17 + 13 * i : 24;
        s->w[i] = variable ? 40 - 3 * i : 32;
        s->label[i] = i % 10;
        size_t bytes = (size_t)s->h[i] * s->w[i] * channels;
        s->pix[i] = malloc(bytes);
        for (int y = 0; y < s->h[i]; y++)
            for (int x = 0; x < s->w[i]; x++)
                for (int c = 0; c < channels; c++) {
                    double v = 60 + 120.0 * (x + y * (c + 1)) / (s->h[i] + s->w[i] * 2) +
                               4 * test_uniform(&rng);
                    s->pix[i][((size_t)y * s->w[i] + x) * channels + c] = (uint8_t)v;
                }
    }
}

static void synth_free(synth *s)
{
    for (int i = 0; i < s->n; i++) free(s->pix[i]);
}

static kfac_status write_synth(const synth *s, const char *path, const char *split, size_t first,
                               kfac_shard_entry *entry)
{
    kfac_prep_settings set = settings_of(KFAC_STORAGE_RAW, s->channels);
    kfac_shard_writer *w;
    KFAC_TRY(kfac_shard_writer_open(&w, path, split, first, &set, classes10, 10));
    for (int i = 0; i < s->n; i++) {
        kfac_status st = kfac_shard_writer_add(w, s->pix[i], (size_t)s->h[i] * s->w[i] * s->channels,
                                               s->h[i], s->w[i], s->label[i]);
        if (st != KFAC_OK) {
            kfac_shard_writer_abort(w);
            return st;
        }
    }
    return kfac_shard_writer_close(w, entry);
}

/* ---- reading a shard with plain HDF5 calls ---- */

static long long attr_int(hid_t file, const char *name)
{
    long long v = -1;
    hid_t a = H5Aopen(file, name, H5P_DEFAULT);
    if (a >= 0) H5Aread(a, H5T_NATIVE_LLONG, &v);
    if (a >= 0) H5Aclose(a);
    return v;
}

static void attr_str(hid_t file, const char *name, char *buf, size_t cap)
{
    buf[0] = '\0';
    hid_t a = H5Aopen(file, name, H5P_DEFAULT);
    if (a < 0) return;
    hid_t t = H5Aget_type(a);
    size_t size = H5Tget_size(t);
    if (size < cap) {
        memset(buf, 0, cap);
        H5Aread(a, t, buf);
    }
    H5Tclose(t);
    H5Aclose(a);
}

static hsize_t dataset_read(hid_t file, const char *name, hid_t mtype, void **out)
{
    hid_t d = H5Dopen2(file, name, H5P_DEFAULT);
    if (d < 0) return 0;
    hid_t sp = H5Dget_space(d);
    hsize_t n = (hsize_t)H5Sget_simple_extent_npoints(sp);
    *out = malloc(n * H5Tget_size(mtype) + 1);
    if (n) H5Dread(d, mtype, H5S_ALL, H5S_ALL, H5P_DEFAULT, *out);
    H5Sclose(sp);
    H5Dclose(d);
    return n;
}

static void test_writer_layout(void)
{
    synth s;
    synth_init(&s, 5, 3, 1);
    char path[512];
    in_tmp(path, sizeof path, "layout.h5");
    kfac_shard_entry e;
    CHECK_OK(write_synth(&s, path, "train", 700, &e));
    CHECK(strcmp(e.file, "layout.h5") == 0, "entry file %s", e.file);
    CHECK(e.count == 5, "entry count %zu", e.count);
    struct stat st;
    CHECK(stat(path, &st) == 0 && (uint64_t)st.st_size == e.bytes, "entry bytes %" PRIu64, e.bytes);
    char tmp[600];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    CHECK(access(tmp, F_OK) != 0, "temporary file left behind");

    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    CHECK(f >= 0, "H5Fopen %s", path);
    if (f < 0) return;
    char str[64];
    CHECK(attr_int(f, "kfac_format") == 1, "kfac_format");
    CHECK(attr_int(f, "channels") == 3, "channels");
    CHECK(attr_int(f, "first") == 700, "first");
    CHECK(attr_int(f, "resize") == 0 && attr_int(f, "jpeg_quality") == 0, "resize/quality");
    attr_str(f, "storage", str, sizeof str);
    CHECK(strcmp(str, "raw") == 0, "storage '%s'", str);
    attr_str(f, "split", str, sizeof str);
    CHECK(strcmp(str, "train") == 0, "split '%s'", str);
    attr_str(f, "crop", str, sizeof str);
    CHECK(strcmp(str, "none") == 0, "crop '%s'", str);

    uint64_t *offsets;
    uint16_t *shapes;
    int32_t *labels;
    uint8_t *data;
    CHECK(dataset_read(f, "/offsets", H5T_NATIVE_UINT64, (void **)&offsets) == 6, "offsets");
    CHECK(dataset_read(f, "/shapes", H5T_NATIVE_UINT16, (void **)&shapes) == 10, "shapes");
    CHECK(dataset_read(f, "/labels", H5T_NATIVE_INT32, (void **)&labels) == 5, "labels");
    hsize_t nbytes = dataset_read(f, "/data", H5T_NATIVE_UINT8, (void **)&data);
    CHECK(offsets[0] == 0 && offsets[5] == nbytes, "offsets end %" PRIu64, offsets[5]);
    for (int i = 0; i < 5; i++) {
        size_t bytes = (size_t)s.h[i] * s.w[i] * 3;
        CHECK(shapes[2 * i] == s.h[i] && shapes[2 * i + 1] == s.w[i], "shape %d", i);
        CHECK(labels[i] == s.label[i], "label %d", i);
        CHECK(offsets[i + 1] - offsets[i] == bytes, "length %d", i);
        CHECK(memcmp(data + offsets[i], s.pix[i], bytes) == 0, "pixels %d", i);
    }
    /* contiguous: /data can be read straight from the file */
    hid_t d = H5Dopen2(f, "/data", H5P_DEFAULT);
    hid_t dcpl = H5Dget_create_plist(d);
    CHECK(H5Pget_layout(dcpl) == H5D_CONTIGUOUS, "layout");
    haddr_t at = H5Dget_offset(d);
    H5Pclose(dcpl);
    H5Dclose(d);
    char *names;
    hid_t cd = H5Dopen2(f, "/classes", H5P_DEFAULT);
    hid_t ct = H5Dget_type(cd);
    size_t csize = H5Tget_size(ct);
    H5Tclose(ct);
    H5Dclose(cd);
    hid_t mt = H5Tcopy(H5T_C_S1);
    H5Tset_size(mt, csize);
    H5Tset_strpad(mt, H5T_STR_NULLPAD);
    CHECK(dataset_read(f, "/classes", mt, (void **)&names) == 10, "classes");
    CHECK(strncmp(names + 3 * csize, "3", csize) == 0, "class 3");
    H5Tclose(mt);
    free(names);
    H5Fclose(f);
    int fd = open(path, O_RDONLY);
    uint8_t *direct = malloc(nbytes);
    CHECK(at != HADDR_UNDEF && pread(fd, direct, nbytes, (off_t)at) == (ssize_t)nbytes &&
              memcmp(direct, data, nbytes) == 0,
          "pread of /data at %" PRIu64, (uint64_t)at);
    close(fd);
    free(direct);
    free(offsets);
    free(shapes);
    free(labels);
    free(data);
    synth_free(&s);
}


static void test_reproducible(void)
{
    synth s;
    synth_init(&s, 6, 3, 1);
    char a[512], b[512];
    kfac_shard_entry ea, eb;
    CHECK_OK(write_synth(&s, in_tmp(a, sizeof a, "rep-a.h5"), "val", 0, &ea));
    sleep(1); /* object timestamps, were they on, would now differ */
    CHECK_OK(write_synth(&s, in_tmp(b, sizeof b, "rep-b.h5"), "val", 0, &eb));
    CHECK(test_same_file(a, b), "two writes of the same images differ");
    CHECK(ea.xxh64 == eb.xxh64 && ea.bytes == eb.bytes, "entries differ");
    /* a different label must change the bytes */
    s.label[2] = 7;
    CHECK_OK(write_synth(&s, b, "val", 0, &eb));
    CHECK(ea.xxh64 != eb.xxh64, "label change not in the checksum");
    synth_free(&s);
}

static void test_empty_shard(void)
{
    char path[512];
    kfac_prep_settings set = settings_of(KFAC_STORAGE_RAW, 1);
    kfac_shard_writer *w;
    kfac_shard_entry e;
    CHECK_OK(kfac_shard_writer_open(&w, in_tmp(path, sizeof path, "empty.h5"), "train", 0, &set,
                                    classes10, 10));
    CHECK(kfac_shard_writer_bytes(w) == 0, "bytes");
    CHECK_OK(kfac_shard_writer_close(w, &e));
    CHECK(e.count == 0 && e.bytes > 0, "empty entry %zu %" PRIu64, e.count, e.bytes);
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    uint64_t *offsets = NULL;
    CHECK(f >= 0 && dataset_read(f, "/offsets", H5T_NATIVE_UINT64, (void **)&offsets) == 1 &&
              offsets[0] == 0, "empty /offsets");
    free(offsets);
    if (f >= 0) H5Fclose(f);
}

static void test_writer_errors(void)
{
    char path[512];
    kfac_prep_settings set = settings_of(KFAC_STORAGE_RAW, 3);
    kfac_shard_writer *w;
    uint8_t px[12] = {0};
    in_tmp(path, sizeof path, "errors.h5");
    CHECK(kfac_shard_writer_open(&w, path, "test", 0, &set, classes10, 10) == KFAC_EINVAL, "split");
    CHECK_OK(kfac_shard_writer_open(&w, path, "train", 0, &set, classes10, 10));
    CHECK(kfac_shard_writer_add(w, px, 11, 2, 2, 0) == KFAC_EINVAL, "raw size");
    CHECK(strstr(kfac_last_error(), "errors.h5: image 0") != NULL, "%s", kfac_last_error());
    CHECK(kfac_shard_writer_add(w, px, 12, 2, 2, 10) == KFAC_EINVAL, "label");
    CHECK_OK(kfac_shard_writer_add(w, px, 12, 2, 2, 9));
    CHECK(kfac_shard_writer_bytes(w) == 12, "bytes");
    kfac_shard_writer_abort(w);
    CHECK(access(path, F_OK) != 0, "abort wrote a file");
    set = settings_of(KFAC_STORAGE_JPEG, 3);
    CHECK_OK(kfac_shard_writer_open(&w, path, "train", 0, &set, classes10, 10));
    CHECK(kfac_shard_writer_add(w, px, 12, 2, 2, 0) == KFAC_EINVAL, "not a jpeg");
    kfac_shard_writer_abort(w);
    /* an unwritable place fails with the path, and leaves nothing */
    kfac_shard_entry e;
    set = settings_of(KFAC_STORAGE_RAW, 3);
    CHECK_OK(kfac_shard_writer_open(&w, "/nonexistent-dir/x.h5", "train", 0, &set, classes10, 10));
    CHECK(kfac_shard_writer_close(w, &e) == KFAC_EIO, "unwritable");
    CHECK(strstr(kfac_last_error(), "/nonexistent-dir/x.h5.tmp") != NULL, "%s", kfac_last_error());
}

/* ---- checksums ---- */

static void test_checksums(void)
{
    synth s;
    synth_init(&s, 4, 3, 0);
    char dir[512], path[600], copy[600];
    CHECK(make_dir("sums", dir, sizeof dir) == 0, "mkdir");
    snprintf(path, sizeof path, "%s/a.h5", dir);
    kfac_shard_entry e;
    CHECK_OK(write_synth(&s, path, "train", 0, &e));
    size_t n;
    uint8_t *bytes = (uint8_t *)test_read_file(path, &n);
    CHECK(n == e.bytes && XXH64(bytes, n, 0) == e.xxh64, "entry hash vs one-shot XXH64");
    uint64_t h, len;
    CHECK_OK(kfac_file_xxh64(path, &h, &len));
    CHECK(h == e.xxh64 && len == e.bytes, "kfac_file_xxh64");
    CHECK_OK(kfac_shard_verify(dir, &e));

    /* the xxh64sum tool (package xxhash), when installed, agrees */
    char cmd[700], out[64] = "";
    snprintf(cmd, sizeof cmd, "xxh64sum '%s' 2>/dev/null", path);
    FILE *p = system("command -v xxh64sum >/dev/null 2>&1") == 0 ? popen(cmd, "r") : NULL;
    if (p) {
        if (!fgets(out, sizeof out, p)) out[0] = '\0';
        pclose(p);
        char want[17];
        snprintf(want, sizeof want, "%016" PRIx64, e.xxh64);
        CHECK(strncmp(out, want, 16) == 0, "xxh64sum says %.16s, we say %s", out, want);
    }

    /* a 64 MiB + 3 bytes file crosses the streaming buffer boundaries */
    snprintf(copy, sizeof copy, "%s/big.bin", dir);
    size_t big = (64u << 20) + 3;
    uint8_t *blob = malloc(big);
    for (size_t i = 0; i < big; i++) blob[i] = (uint8_t)(i * 2654435761u >> 13);
    FILE *f = fopen(copy, "wb");
    fwrite(blob, 1, big, f);
    fclose(f);
    CHECK_OK(kfac_file_xxh64(copy, &h, &len));
    CHECK(h == XXH64(blob, big, 0) && len == big, "streamed vs one-shot on 64 MiB");
    free(blob);
    unlink(copy);

    /* one flipped byte */
    kfac_shard_entry c = e;
    snprintf(c.file, sizeof c.file, "flip.h5");
    snprintf(copy, sizeof copy, "%s/flip.h5", dir);
    bytes[n / 2] ^= 0x40;
    f = fopen(copy, "wb");
    fwrite(bytes, 1, n, f);
    fclose(f);
    CHECK(kfac_shard_verify(dir, &c) == KFAC_EFORMAT, "flipped byte passes");
    CHECK(strstr(kfac_last_error(), "flip.h5: checksum mismatch (expected ") != NULL, "%s",
          kfac_last_error());
    /* truncated */
    CHECK(truncate(copy, (off_t)n - 1) == 0, "truncate");
    CHECK(kfac_shard_verify(dir, &c) == KFAC_EFORMAT, "truncated passes");
    char want[128];
    snprintf(want, sizeof want, "flip.h5: size %zu, expected %zu", n - 1, n);
    CHECK(strstr(kfac_last_error(), want) != NULL, "%s", kfac_last_error());
    /* missing */
    unlink(copy);
    CHECK(kfac_shard_verify(dir, &c) == KFAC_EIO, "missing file");
    CHECK(strstr(kfac_last_error(), "flip.h5") != NULL, "%s", kfac_last_error());
    CHECK(kfac_file_xxh64(copy, &h, &len) == KFAC_EIO, "missing file hash");
    free(bytes);
    synth_free(&s);
}

/* ---- the manifest ---- */

static kfac_manifest *sample_manifest(void)
{
    static const char *const names[] = {"n01440764", "T-shirt/top", "a b", "x: y", "0", "no",
                                        "quote\"back\\slash", "caf\xc3\xa9", "-dash", "#hash"};
    kfac_manifest *m = calloc(1, sizeof *m);
    m->settings = settings_of(KFAC_STORAGE_JPEG, 3);
    m->settings.resize = 256;
    m->settings.center_crop = 1;
    m->num_classes = 10;
    m->classes = calloc(10, sizeof *m->classes);
    for (int i = 0; i < 10; i++) snprintf(m->classes[i], KFAC_CLASS_NAME_MAX, "%s", names[i]);
    m->num_splits = 2;
    static const uint64_t hashes[] = {0x0123456789abcdefull, 0x0123456789012345ull,
                                      0x1234567e12345678ull};
    for (int s = 0; s < 2; s++) {
        kfac_split_entry *sp = &m->splits[s];
        snprintf(sp->name, sizeof sp->name, "%s", s ? "val" : "train");
        sp->num_shards = s ? 1 : 3;
        sp->shards = calloc(sp->num_shards, sizeof *sp->shards);
        for (size_t i = 0; i < sp->num_shards; i++) {
            kfac_shard_entry *e = &sp->shards[i];
            snprintf(e->file, sizeof e->file, "%s-%05zu.h5", sp->name, i);
            e->count = 5000 - i;
            e->bytes = 752936212ull + i;
            e->xxh64 = hashes[(i + (size_t)s) % 3];
            sp->count += e->count;
        }
    }
    return m;
}

static int manifests_equal(const kfac_manifest *a, const kfac_manifest *b)
{
    if (memcmp(&a->settings, &b->settings, sizeof a->settings) != 0) return 0;
    if (a->num_classes != b->num_classes || a->num_splits != b->num_splits) return 0;
    for (int i = 0; i < a->num_classes; i++)
        if (strcmp(a->classes[i], b->classes[i]) != 0) return 0;
    for (int s = 0; s < a->num_splits; s++) {
        const kfac_split_entry *x = &a->splits[s], *y = &b->splits[s];
        if (strcmp(x->name, y->name) || x->count != y->count || x->num_shards != y->num_shards)
            return 0;
        for (size_t i = 0; i < x->num_shards; i++)
            if (strcmp(x->shards[i].file, y->shards[i].file) ||
                x->shards[i].count != y->shards[i].count ||
                x->shards[i].bytes != y->shards[i].bytes ||
                x->shards[i].xxh64 != y->shards[i].xxh64)
                return 0;
    }
    return 1;
}

static void test_manifest_round_trip(void)
{
    char dir[512], path[600];
    CHECK(make_dir("manifest", dir, sizeof dir) == 0, "mkdir");
    kfac_manifest *m = sample_manifest(), *back = NULL;
    CHECK_OK(kfac_manifest_write(dir, m));
    CHECK_OK(kfac_manifest_read(dir, &back));
    CHECK(back && manifests_equal(m, back), "manifest changed in the round trip");
    CHECK(back && kfac_manifest_split(back, "val") == &back->splits[1], "split val");
    CHECK(back && kfac_manifest_split(back, "test") == NULL, "split test");
    size_t n;
    snprintf(path, sizeof path, "%s/manifest.yaml", dir);
    char *text = test_read_file(path, &n);
    text = realloc(text, n + 1);
    text[n] = '\0';
    /* plain where plain is safe, quoted where a YAML reader would guess */
    CHECK(strstr(text, "classes: [n01440764, T-shirt/top, \"a b\", \"x: y\", \"0\", \"no\"") != NULL,
          "%s", text);
    CHECK(strstr(text, "xxh64: 0123456789abcdef}") != NULL, "%s", text);
    CHECK(strstr(text, "xxh64: \"0123456789012345\"}") != NULL, "%s", text);
    CHECK(strstr(text, "xxh64: \"1234567e12345678\"}") != NULL, "%s", text);
    CHECK(strstr(text, "storage: jpeg\n") && strstr(text, "crop: center\n"), "%s", text);
    snprintf(path, sizeof path, "%s/manifest.yaml.tmp", dir);
    CHECK(access(path, F_OK) != 0, "temporary manifest left behind");
    free(text);
    kfac_manifest_free(back);
    /* the writer refuses counts that do not add up */
    m->splits[0].count++;
    CHECK(kfac_manifest_write(dir, m) == KFAC_EINVAL, "count mismatch written");
    kfac_manifest_free(m);
}

static const char GOOD[] =
    "kfac_dataset: 1\n"
    "storage: raw\n"
    "channels: 1\n"
    "resize: 0\n"
    "crop: none\n"
    "jpeg_quality: 0\n"
    "source: idx\n"
    "classes: [a, b]\n"
    "splits:\n"
    "  val:\n"
    "    count: 3\n"
    "    shards:\n"
    "      - {file: val-00000.h5, count: 2, bytes: 10, xxh64: 00000000000000ff}\n"
    "      - {file: val-00001.h5, count: 1, bytes: 10, xxh64: abcdef0123456789}\n";

/* GOOD with `from` replaced by `to`, read back: must fail with `want`. */
static void expect_bad(const char *dir, const char *from, const char *to, kfac_status status,
                       const char *want)
{
    char text[2048], path[600];
    const char *at = strstr(GOOD, from);
    CHECK(at != NULL, "test bug: '%s' not in GOOD", from);
    if (!at) return;
    snprintf(text, sizeof text, "%.*s%s%s", (int)(at - GOOD), GOOD, to, at + strlen(from));
    snprintf(path, sizeof path, "%s/manifest.yaml", dir);
    write_text(path, text);
    kfac_manifest *m = NULL;
    kfac_status st = kfac_manifest_read(dir, &m);
    CHECK(st == status && m == NULL, "'%s' -> '%s': status %d", from, to, (int)st);
    CHECK(strstr(kfac_last_error(), want) != NULL, "'%s' -> '%s': message '%s', expected '%s'",
          from, to, kfac_last_error(), want);
}

static void test_manifest_errors(void)
{
    char dir[512], path[600];
    CHECK(make_dir("bad", dir, sizeof dir) == 0, "mkdir");
    snprintf(path, sizeof path, "%s/manifest.yaml", dir);
    kfac_manifest *m = NULL;
    CHECK(kfac_manifest_read(dir, &m) == KFAC_EIO, "missing manifest");
    write_text(path, GOOD);
    CHECK_OK(kfac_manifest_read(dir, &m));
    CHECK(m && m->num_classes == 2 && m->splits[0].count == 3 &&
              m->splits[0].shards[0].xxh64 == 0xff, "GOOD parsed");
    kfac_manifest_free(m);
    expect_bad(dir, "channels: 1", "channels: [1]", KFAC_EFORMAT,
               "manifest.yaml:3:11: manifest: channels: expected an integer in [1, 3], got a list");
    expect_bad(dir, "channels: 1", "channels: one", KFAC_EFORMAT,
               "manifest.yaml:3:11: manifest: channels: expected an integer");
    expect_bad(dir, "channels: 1", "channels: 2", KFAC_EFORMAT, "manifest.yaml:3:11:");
    expect_bad(dir, "storage: raw", "storage: png", KFAC_EFORMAT,
               "manifest.yaml:2:10: manifest: storage: unknown value 'png' (expected raw|jpeg)");
    expect_bad(dir, "    shards:\n", "    shardz:\n", KFAC_EFORMAT,
               "manifest.yaml:12:5: splits.val: unknown key 'shardz'");
    expect_bad(dir, "    count: 3\n    shards:\n      - {file: val-00000.h5, count: 2, bytes: 10, "
                    "xxh64: 00000000000000ff}\n      - {file: val-00001.h5, count: 1, bytes: 10, "
                    "xxh64: abcdef0123456789}\n",
               "    count: 3\n", KFAC_EFORMAT, "manifest.yaml:11:5: splits.val: missing key 'shards'");
    expect_bad(dir, "count: 3", "count: 4", KFAC_EFORMAT,
               "manifest.yaml:11:12: splits.val: count 4, but its shards hold 3 images");
    expect_bad(dir, "xxh64: abcdef0123456789", "xxh64: abcdef012345678", KFAC_EFORMAT,
               "manifest.yaml:14:58: splits.val.shards[1]: xxh64: expected 16 hex digits");
    expect_bad(dir, "file: val-00001.h5", "file: ../x.h5", KFAC_EFORMAT,
               "manifest.yaml:14:16: splits.val.shards[1]: file '../x.h5' is not a plain file name");
    expect_bad(dir, "file: val-00001.h5", "file: val-00000.h5", KFAC_EFORMAT,
               "shard file 'val-00000.h5' listed twice");
    expect_bad(dir, "  val:", "  test:", KFAC_EFORMAT,
               "manifest.yaml:10:3: splits: unknown split 'test'");
    expect_bad(dir, "kfac_dataset: 1", "kfac_dataset: 2", KFAC_EFORMAT,
               "manifest.yaml:1:15: kfac_dataset: format version 2, this build reads 1");
    expect_bad(dir, "source: idx\n", "", KFAC_EFORMAT, "manifest.yaml:1:1: manifest: missing key 'source'");
    expect_bad(dir, "classes: [a, b]", "classes: [a, [b]]", KFAC_EFORMAT,
               "manifest.yaml:8:14: classes[1]: expected a scalar, got a list");
    expect_bad(dir, "splits:", "splits: [", KFAC_EFORMAT, "manifest.yaml:");
}

/* ---- kfac_dataset_open_hdf5 ---- */

/* Writes a manifest of one split whose shards are `entries`. */
static void write_manifest(const char *dir, const char *split, kfac_prep_settings set,
                           const kfac_shard_entry *entries, size_t n)
{
    kfac_manifest m = {.settings = set, .num_classes = 10, .classes = classes10, .num_splits = 1};
    snprintf(m.splits[0].name, sizeof m.splits[0].name, "%s", split);
    m.splits[0].shards = (kfac_shard_entry *)entries;
    m.splits[0].num_shards = n;
    for (size_t i = 0; i < n; i++) m.splits[0].count += entries[i].count;
    CHECK_OK(kfac_manifest_write(dir, &m));
}

/* Every image of `ds` read from 2 threads at once equals a serial read. */
static void check_threads(const kfac_dataset *ds)
{
    size_t max = (size_t)ds->height * ds->width * ds->channels;
    uint8_t *serial = malloc(ds->count * max), *parallel = calloc(ds->count, max);
    memset(serial, 0, ds->count * max);
    for (size_t i = 0; i < ds->count; i++) {
        int h, w;
        int32_t label;
        CHECK_OK(ds->read_image(ds, i, serial + i * max, &h, &w, &label));
    }
    int failures = 0;
#pragma omp parallel for num_threads(2) schedule(dynamic, 7) reduction(+ : failures)
    for (long i = 0; i < (long)ds->count; i++) {
        int h, w;
        int32_t label;
        failures += ds->read_image(ds, (size_t)i, parallel + (size_t)i * max, &h, &w, &label) != KFAC_OK;
    }
    CHECK(failures == 0, "%d parallel reads failed", failures);
    CHECK(memcmp(serial, parallel, ds->count * max) == 0, "parallel reads differ");
    free(serial);
    free(parallel);
}

static void test_fmnist_round_trip(void)
{
    kfac_dataset *idx;
    if (kfac_dataset_open_idx(KFAC_FMNIST_DIR, KFAC_SPLIT_TEST, &idx) != KFAC_OK) {
        printf("skipped the Fashion-MNIST round trip: %s\n", kfac_last_error());
        return;
    }
    char dir[512], path[600];
    CHECK(make_dir("fmnist", dir, sizeof dir) == 0, "mkdir");
    kfac_prep_settings set = settings_of(KFAC_STORAGE_RAW, 1);
    snprintf(set.source, sizeof set.source, "idx");
    static const size_t sizes[3] = {4000, 4000, 2000};
    kfac_shard_entry entries[3];
    size_t next = 0, px = (size_t)idx->height * idx->width;
    uint8_t *img = malloc(px);
    for (int s = 0; s < 3; s++) {
        kfac_shard_writer *w;
        snprintf(path, sizeof path, "%s/val-%05d.h5", dir, s);
        CHECK_OK(kfac_shard_writer_open(&w, path, "val", next, &set, classes10, 10));
        for (size_t i = 0; i < sizes[s]; i++, next++) {
            int h, wd;
            int32_t label;
            CHECK_OK(idx->read_image(idx, next, img, &h, &wd, &label));
            CHECK_OK(kfac_shard_writer_add(w, img, px, h, wd, label));
        }
        CHECK_OK(kfac_shard_writer_close(w, &entries[s]));
        CHECK_OK(kfac_shard_verify(dir, &entries[s]));
    }
    CHECK(next == idx->count, "wrote %zu of %zu", next, idx->count);
    write_manifest(dir, "val", set, entries, 3);

    kfac_dataset *ds = NULL;
    CHECK_OK(kfac_dataset_open_hdf5(dir, "val", &ds));
    if (!ds) goto out;
    CHECK(ds->count == 10000 && ds->height == 28 && ds->width == 28 && ds->channels == 1 &&
              ds->fixed_size == 1 && ds->num_classes == 10,
          "count %zu %dx%dx%d fixed %d classes %d", ds->count, ds->height, ds->width,
          ds->channels, ds->fixed_size, ds->num_classes);
    uint8_t *got = malloc(px);
    size_t wrong = 0;
    for (size_t i = 0; i < ds->count && ds->count == idx->count; i++) {
        int h, w, h2, w2;
        int32_t label, label2;
        CHECK_OK(idx->read_image(idx, i, img, &h, &w, &label));
        CHECK_OK(ds->read_image(ds, i, got, &h2, &w2, &label2));
        wrong += h != h2 || w != w2 || label != label2 || memcmp(img, got, px) != 0;
    }
    CHECK(wrong == 0, "%zu images differ from the IDX source", wrong);
    int h, w;
    int32_t label;
    CHECK(ds->read_image(ds, 10000, got, &h, &w, &label) == KFAC_EINVAL, "index out of range");
    check_threads(ds);
    free(got);
    kfac_dataset_free(ds);
    CHECK(kfac_dataset_open_hdf5(dir, "train", &ds) == KFAC_EINVAL && !ds, "missing split");
    CHECK(strstr(kfac_last_error(), "no split 'train'") != NULL, "%s", kfac_last_error());
out:
    free(img);
    kfac_dataset_free(idx);
}

static uint8_t *encode_jpeg(tjhandle tj, const uint8_t *pix, int h, int w, int channels,
                            unsigned long *size)
{
    uint8_t *jpeg = NULL;
    *size = 0;
    int rc = tjCompress2(tj, pix, w, 0, h, channels == 1 ? TJPF_GRAY : TJPF_RGB, &jpeg, size,
                         channels == 1 ? TJSAMP_GRAY : TJSAMP_444, 95, 0);
    CHECK(rc == 0, "tjCompress2: %s", tjGetErrorStr2(tj));
    return jpeg;
}

/* JPEG storage, variable sizes, 2 shards: every image equals the test's
 * own decode of the same bytes exactly and the original within the JPEG
 * error of quality 95: mean |error| <= 3 levels (the images carry +-4 levels of
 * noise, which the encoder keeps only in part; a wrong decode is off by tens). */
static void check_jpeg(int channels)
{
    synth s;
    synth_init(&s, 8, channels, 1);
    char dir[512], path[600];
    snprintf(path, sizeof path, "jpeg%d", channels);
    CHECK(make_dir(path, dir, sizeof dir) == 0, "mkdir");
    kfac_prep_settings set = settings_of(KFAC_STORAGE_JPEG, channels);
    tjhandle enc = tjInitCompress(), dec = tjInitDecompress();
    uint8_t *jpegs[8];
    unsigned long sizes[8];
    kfac_shard_entry entries[2];
    for (int sh = 0; sh < 2; sh++) {
        kfac_shard_writer *w;
        snprintf(path, sizeof path, "%s/train-%05d.h5", dir, sh);
        CHECK_OK(kfac_shard_writer_open(&w, path, "train", (size_t)sh * 5, &set, classes10, 10));
        for (int i = sh * 5; i < (sh ? 8 : 5); i++) {
            jpegs[i] = encode_jpeg(enc, s.pix[i], s.h[i], s.w[i], channels, &sizes[i]);
            CHECK_OK(kfac_shard_writer_add(w, jpegs[i], sizes[i], s.h[i], s.w[i], s.label[i]));
        }
        CHECK_OK(kfac_shard_writer_close(w, &entries[sh]));
    }
    write_manifest(dir, "train", set, entries, 2);
    kfac_dataset *ds = NULL;
    CHECK_OK(kfac_dataset_open_hdf5(dir, "train", &ds));
    int max_h = 0, max_w = 0;
    for (int i = 0; i < 8; i++) {
        if (s.h[i] > max_h) max_h = s.h[i];
        if (s.w[i] > max_w) max_w = s.w[i];
    }
    if (ds) {
        CHECK(ds->count == 8 && ds->fixed_size == 0 && ds->height == max_h &&
                  ds->width == max_w && ds->channels == channels,
              "count %zu fixed %d %dx%dx%d", ds->count, ds->fixed_size, ds->height, ds->width,
              ds->channels);
        size_t max = (size_t)max_h * max_w * channels;
        uint8_t *got = malloc(max), *want = malloc(max);
        for (int i = 0; i < 8; i++) {
            int h, w;
            int32_t label;
            CHECK_OK(ds->read_image(ds, (size_t)i, got, &h, &w, &label));
            CHECK(h == s.h[i] && w == s.w[i] && label == s.label[i], "image %d: %dx%d label %d", i,
                  h, w, (int)label);
            CHECK(tjDecompress2(dec, jpegs[i], sizes[i], want, s.w[i], 0, s.h[i],
                                channels == 1 ? TJPF_GRAY : TJPF_RGB, 0) == 0, "decode");
            size_t n = (size_t)s.h[i] * s.w[i] * channels;
            CHECK(memcmp(got, want, n) == 0, "image %d differs from tjDecompress2", i);
            double err = 0;
            for (size_t k = 0; k < n; k++) err += abs((int)got[k] - (int)s.pix[i][k]);
            CHECK(err / n <= 3.0, "image %d: mean |error| %.3f vs the original", i, err / n);
        }
        check_threads(ds);
        free(got);
        free(want);
        kfac_dataset_free(ds);
    }
    for (int i = 0; i < 8; i++) tjFree(jpegs[i]);
    tjDestroy(enc);
    tjDestroy(dec);
    synth_free(&s);
}

static void test_jpeg(void)
{
    check_jpeg(3);
    check_jpeg(1);
}

/* Raw storage with images of different sizes. */
static void test_variable_raw(void)
{
    synth s;
    synth_init(&s, 7, 3, 1);
    char dir[512], path[600];
    CHECK(make_dir("variable", dir, sizeof dir) == 0, "mkdir");
    kfac_shard_entry e;
    snprintf(path, sizeof path, "%s/val-00000.h5", dir);
    CHECK_OK(write_synth(&s, path, "val", 0, &e));
    write_manifest(dir, "val", settings_of(KFAC_STORAGE_RAW, 3), &e, 1);
    kfac_dataset *ds = NULL;
    CHECK_OK(kfac_dataset_open_hdf5(dir, "val", &ds));
    if (!ds) return;
    CHECK(ds->fixed_size == 0 && ds->height == s.h[6] && ds->width == s.w[0], "%dx%d fixed %d",
          ds->height, ds->width, ds->fixed_size);
    uint8_t *got = malloc((size_t)ds->height * ds->width * 3);
    for (int i = 0; i < 7; i++) {
        int h, w;
        int32_t label;
        CHECK_OK(ds->read_image(ds, (size_t)i, got, &h, &w, &label));
        CHECK(h == s.h[i] && w == s.w[i] && label == s.label[i] &&
                  memcmp(got, s.pix[i], (size_t)h * w * 3) == 0, "image %d", i);
    }
    free(got);
    kfac_dataset_free(ds);
    synth_free(&s);
}

/* `first` counts inputs: shards of 5 inputs with 2 and 1 skipped hold 3
 * and 4 images at firsts 0 and 5; the reader accepts that and refuses
 * shards listed out of order. */
static void test_skipped_inputs(void)
{
    synth a, b;
    synth_init(&a, 3, 1, 0);
    synth_init(&b, 4, 1, 0);
    char dir[512], pa[600], pb[600];
    CHECK(make_dir("skips", dir, sizeof dir) == 0, "mkdir");
    kfac_shard_entry e[2];
    snprintf(pa, sizeof pa, "%s/train-00000.h5", dir);
    snprintf(pb, sizeof pb, "%s/train-00001.h5", dir);
    CHECK_OK(write_synth(&a, pa, "train", 0, &e[0]));
    CHECK_OK(write_synth(&b, pb, "train", 5, &e[1]));
    write_manifest(dir, "train", settings_of(KFAC_STORAGE_RAW, 1), e, 2);
    kfac_dataset *ds = NULL;
    CHECK_OK(kfac_dataset_open_hdf5(dir, "train", &ds));
    if (ds) {
        uint8_t got[24 * 32];
        int h, w;
        int32_t label;
        CHECK(ds->count == 7, "7 images, got %zu", ds->count);
        CHECK_OK(ds->read_image(ds, 3, got, &h, &w, &label));
        CHECK(memcmp(got, b.pix[0], sizeof got) == 0 && label == b.label[0],
              "image 3 is the second shard's first");
        kfac_dataset_free(ds);
    }
    kfac_shard_entry swapped[2] = {e[1], e[0]};
    write_manifest(dir, "train", settings_of(KFAC_STORAGE_RAW, 1), swapped, 2);
    CHECK(kfac_dataset_open_hdf5(dir, "train", &ds) == KFAC_EFORMAT, "shards out of order");
    CHECK(strstr(kfac_last_error(), "train-00000.h5: first input is number 0 of the split, but 4 "
                                    "images come before it"),
          "%s", kfac_last_error());
    synth_free(&a);
    synth_free(&b);
}

/* Shards that disagree with the manifest, or are damaged, fail to open
 * with the shard's path in the message. */
static void test_reader_errors(void)
{
    synth s;
    synth_init(&s, 3, 3, 0);
    char dir[512], path[600];
    CHECK(make_dir("broken", dir, sizeof dir) == 0, "mkdir");
    kfac_shard_entry e;
    snprintf(path, sizeof path, "%s/val-00000.h5", dir);
    CHECK_OK(write_synth(&s, path, "val", 0, &e));
    kfac_dataset *ds = NULL;
    kfac_prep_settings set = settings_of(KFAC_STORAGE_RAW, 3);

    kfac_shard_entry wrong = e;
    wrong.count = 2;
    write_manifest(dir, "val", set, &wrong, 1);
    CHECK(kfac_dataset_open_hdf5(dir, "val", &ds) == KFAC_EFORMAT && !ds, "count mismatch");
    CHECK(strstr(kfac_last_error(), "val-00000.h5: /offsets has shape [4], expected [3]"), "%s",
          kfac_last_error());

    write_manifest(dir, "val", settings_of(KFAC_STORAGE_JPEG, 3), &e, 1);
    CHECK(kfac_dataset_open_hdf5(dir, "val", &ds) == KFAC_EFORMAT, "storage mismatch");
    CHECK(strstr(kfac_last_error(), "val-00000.h5: storage 'raw', the manifest says 'jpeg'"),
          "%s", kfac_last_error());

    write_manifest(dir, "val", settings_of(KFAC_STORAGE_RAW, 1), &e, 1);
    CHECK(kfac_dataset_open_hdf5(dir, "val", &ds) == KFAC_EFORMAT, "channel mismatch");
    CHECK(strstr(kfac_last_error(), "3 channels, the manifest says 1"), "%s", kfac_last_error());

    write_manifest(dir, "train", set, &e, 1);
    CHECK(kfac_dataset_open_hdf5(dir, "train", &ds) == KFAC_EFORMAT, "split mismatch");
    CHECK(strstr(kfac_last_error(), "a shard of split 'val', listed under 'train'"), "%s",
          kfac_last_error());

    /* cut inside /data: HDF5 may still open it, the reader must not */
    write_manifest(dir, "val", set, &e, 1);
    CHECK(truncate(path, (off_t)e.bytes - 5) == 0, "truncate");
    CHECK(kfac_dataset_open_hdf5(dir, "val", &ds) == KFAC_EFORMAT && !ds, "truncated shard");
    CHECK(strstr(kfac_last_error(), "val-00000.h5"), "%s", kfac_last_error());

    write_text(path, "not hdf5");
    CHECK(kfac_dataset_open_hdf5(dir, "val", &ds) == KFAC_EFORMAT, "not HDF5");
    CHECK(strstr(kfac_last_error(), "val-00000.h5: cannot open as HDF5"), "%s", kfac_last_error());

    unlink(path);
    CHECK(kfac_dataset_open_hdf5(dir, "val", &ds) == KFAC_EIO, "missing shard");
    CHECK(strstr(kfac_last_error(), "val-00000.h5: cannot open: No such file"), "%s",
          kfac_last_error());
    synth_free(&s);
}

int main(void)
{
    snprintf(tmpdir, sizeof tmpdir, "/tmp/kfac-test-shards-XXXXXX");
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    test_writer_layout();
    test_reproducible();
    test_empty_shard();
    test_writer_errors();
    test_checksums();
    test_manifest_round_trip();
    test_manifest_errors();
    test_fmnist_round_trip();
    test_jpeg();
    test_variable_raw();
    test_skipped_inputs();
    test_reader_errors();
    nftw(tmpdir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
    return test_summary("test_shards");
}
