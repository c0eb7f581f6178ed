/* test_stage.c - kfac_stage_run in one process, on real files: a dataset of
 * real HDF5 shards (kfac_shard_writer) staged into temporary folders.
 * Checks: identical copies and the manifest; a rerun skips everything
 * (stamp, then --verify hashing); a flipped byte (even with mtime put
 * back) is recopied; a truncated FILE.part is resumed (only the rest is
 * copied) and a corrupt one recopied; a source that does not match its
 * manifest is an error naming it; a missing folder, an unknown split and a
 * reserved shard name are errors; a split subset gets a manifest of that
 * split; broadcast mode alone is copy mode; and on a 1 MiB tmpfs, the
 * space check refuses or falls back.  The tmpfs part needs mount (root): if
 * it cannot mount, that part is skipped and the test exits 77 (saying
 * why) unless something else failed. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kfac/kfac_dataset.h"
#include "kfac/kfac_shards.h"
#include "kfac/kfac_stage.h"
#include "testutil.h"

enum { SIDE = 48, CH = 3, PER_SHARD = 90 }; /* ~620 kB per shard */

static char root[PATH_MAX], src[PATH_MAX];
static kfac_manifest *manifest; /* of src, as written */

static void path_join(char *out, const char *a, const char *b)
{
    int n = snprintf(out, PATH_MAX, "%s/%s", a, b);
    if (n < 0 || n >= PATH_MAX) {
        fprintf(stderr, "test_stage: path too long: %s/%s\n", a, b);
        exit(1);
    }
}

/* path + suffix */
static void path_add(char *out, const char *path, const char *suffix)
{
    int n = snprintf(out, PATH_MAX, "%s%s", path, suffix);
    if (n < 0 || n >= PATH_MAX) {
        fprintf(stderr, "test_stage: path too long: %s%s\n", path, suffix);
        exit(1);
    }
}

static int write_shard(const char *dir, const char *split, int index, size_t first,
                       unsigned long long *rng, kfac_shard_entry *entry)
{
    kfac_prep_settings s = {KFAC_STORAGE_RAW, CH, SIDE, 1, 0, "folder"};
    static const char classes[3][KFAC_CLASS_NAME_MAX] = {"n01", "n02", "n03"};
    char path[PATH_MAX], name[64];
    snprintf(name, sizeof name, "%s-%05d.h5", split, index);
    path_join(path, dir, name);
    kfac_shard_writer *w;
    if (kfac_shard_writer_open(&w, path, split, first, &s, classes, 3) != KFAC_OK) return -1;
    unsigned char img[SIDE * SIDE * CH];
    int n = PER_SHARD + 7 * index; /* sizes differ, none a multiple of the chunk */
    for (int i = 0; i < n; i++) {
        for (size_t j = 0; j < sizeof img; j++)
            img[j] = (unsigned char)(test_uniform(rng) * 127 + 128);
        if (kfac_shard_writer_add(w, img, sizeof img, SIDE, SIDE, i % 3) != KFAC_OK) {
            kfac_shard_writer_abort(w);
            return -1;
        }
    }
    return kfac_shard_writer_close(w, entry) == KFAC_OK ? 0 : -1;
}

/* src: train-00000..00002 and val-00000, real shards, and the manifest. */
static int make_dataset(void)
{
    static kfac_shard_entry train[3], val[1];
    static char classes[3][KFAC_CLASS_NAME_MAX] = {"n01", "n02", "n03"};
    unsigned long long rng = 42;
    size_t first = 0;
    for (int i = 0; i < 3; i++) {
        if (write_shard(src, "train", i, first, &rng, &train[i])) return -1;
        first += train[i].count;
    }
    if (write_shard(src, "val", 0, 0, &rng, &val[0])) return -1;
    kfac_manifest m;
    memset(&m, 0, sizeof m);
    m.settings = (kfac_prep_settings){KFAC_STORAGE_RAW, CH, SIDE, 1, 0, "folder"};
    m.num_classes = 3;
    m.classes = classes;
    m.num_splits = 2;
    snprintf(m.splits[0].name, sizeof m.splits[0].name, "train");
    m.splits[0].count = first;
    m.splits[0].num_shards = 3;
    m.splits[0].shards = train;
    snprintf(m.splits[1].name, sizeof m.splits[1].name, "val");
    m.splits[1].count = val[0].count;
    m.splits[1].num_shards = 1;
    m.splits[1].shards = val;
    if (kfac_manifest_write(src, &m) != KFAC_OK) return -1;
    return kfac_manifest_read(src, &manifest) == KFAC_OK ? 0 : -1;
}



static int exists(const char *dir, const char *name)
{
    char p[PATH_MAX];
    struct stat st;
    path_join(p, dir, name);
    return stat(p, &st) == 0;
}

/* Number of *.part files left in dir. */
static int count_parts(const char *dir)
{
    DIR *d = opendir(dir);
    int n = 0;
    if (!d) return 0;
    for (struct dirent *e; (e = readdir(d));) {
        size_t l = strlen(e->d_name);
        n += l > 5 && strcmp(e->d_name + l - 5, ".part") == 0;
    }
    closedir(d);
    return n;
}

static uint64_t total_bytes(void)
{
    uint64_t t = 0;
    for (int s = 0; s < manifest->num_splits; s++)
        for (size_t i = 0; i < manifest->splits[s].num_shards; i++)
            t += manifest->splits[s].shards[i].bytes;
    return t;
}

static const kfac_shard_entry *shard(const char *split, size_t i)
{
    return &kfac_manifest_split(manifest, split)->shards[i];
}

static void options(kfac_stage_options *o, const char *local)
{
    kfac_stage_options_init(o);
    o->src_dir = src;
    o->local_dir = local;
    o->reserve_bytes = 0;
    o->chunk_bytes = 64 << 10; /* many chunks per shard: the double buffering runs */
}

/* Every shard of the chosen splits verifies in dir, matches src byte for
 * byte, and no .part is left. */
static void check_copy(const char *dir, const char *only_split)
{
    for (int s = 0; s < manifest->num_splits; s++) {
        const kfac_split_entry *sp = &manifest->splits[s];
        if (only_split && strcmp(sp->name, only_split) != 0) continue;
        for (size_t i = 0; i < sp->num_shards; i++) {
            char a[PATH_MAX], b[PATH_MAX];
            CHECK_OK(kfac_shard_verify(dir, &sp->shards[i]));
            path_join(a, src, sp->shards[i].file);
            path_join(b, dir, sp->shards[i].file);
            CHECK(test_same_file(a, b), "%s differs from %s", b, a);
        }
    }
    CHECK(count_parts(dir) == 0, "%d .part files left in %s", count_parts(dir), dir);
}

static void flip_byte(const char *path, off_t at)
{
    int fd = open(path, O_RDWR);
    unsigned char b = 0;
    CHECK(fd >= 0 && pread(fd, &b, 1, at) == 1, "read %s", path);
    b ^= 0x5a;
    CHECK(fd >= 0 && pwrite(fd, &b, 1, at) == 1, "write %s", path);
    if (fd >= 0) close(fd);
}

typedef struct progress_log {
    int calls;
    uint64_t last_done, last_total;
    int monotonic;
} progress_log;

static void on_progress(const kfac_stage_progress *p, void *user)
{
    progress_log *l = user;
    if (p->bytes_done < l->last_done) l->monotonic = 0;
    l->calls++;
    l->last_done = p->bytes_done;
    l->last_total = p->bytes_total;
}

static void test_first_and_rerun(const char *local, char *data_dir)
{
    kfac_stage_options o;
    options(&o, local);
    progress_log log = {0, 0, 0, 1};
    o.progress = on_progress;
    o.progress_user = &log;
    kfac_stage_report r;
    CHECK_OK(kfac_stage_run(&o, NULL, &r));
    CHECK(r.shards_total == 4 && r.shards_copied == 4 && r.shards_skipped == 0,
          "first run: %d total, %d copied, %d skipped", r.shards_total, r.shards_copied,
          r.shards_skipped);
    CHECK(r.bytes_copied == total_bytes() && r.bytes_total == total_bytes(),
          "copied %llu of %llu", (unsigned long long)r.bytes_copied,
          (unsigned long long)total_bytes());
    CHECK(r.bytes_from_src == total_bytes(), "read %llu", (unsigned long long)r.bytes_from_src);
    CHECK(!r.fell_back && r.reason[0] == '\0', "fell back: %s", r.reason);
    CHECK(r.seconds > 0 && r.gbps > 0, "%.3f s %.3f GB/s", r.seconds, r.gbps);
    CHECK(log.calls > 4 && log.monotonic && log.last_done == total_bytes() &&
              log.last_total == total_bytes(),
          "progress: %d calls, last %llu of %llu", log.calls, (unsigned long long)log.last_done,
          (unsigned long long)log.last_total);
    /* the folder: LOCAL/<basename>-<hash of the manifest> */
    char mpath[PATH_MAX], name[512], want[PATH_MAX];
    size_t mlen;
    path_join(mpath, src, "manifest.yaml");
    char *mbytes = test_read_file(mpath, &mlen);
    CHECK_OK(kfac_stage_dir_name(src, mbytes, mlen, name, sizeof name));
    free(mbytes);
    CHECK(strncmp(name, "dataset-", 8) == 0 && strlen(name) == 8 + 12, "name %s", name);
    path_join(want, local, name);
    CHECK(strcmp(r.data_dir, want) == 0, "data_dir %s, expected %s", r.data_dir, want);
    snprintf(data_dir, PATH_MAX, "%s", r.data_dir);
    check_copy(data_dir, NULL);
    char lpath[PATH_MAX];
    path_join(lpath, data_dir, "manifest.yaml");
    CHECK(test_same_file(mpath, lpath), "local manifest differs from the source's");
    kfac_dataset *ds = NULL;
    CHECK_OK(kfac_dataset_open_hdf5(data_dir, "train", &ds));
    kfac_dataset_free(ds);

    /* rerun: nothing copied, nothing even hashed (the stamp vouches) */
    CHECK_OK(kfac_stage_run(&o, NULL, &r));
    CHECK(r.shards_copied == 0 && r.shards_skipped == 4 && r.bytes_copied == 0 &&
              r.bytes_skipped == total_bytes() && r.bytes_verified == 0 && r.bytes_from_src == 0,
          "rerun: %d copied, %d skipped, %llu bytes copied, %llu hashed", r.shards_copied,
          r.shards_skipped, (unsigned long long)r.bytes_copied,
          (unsigned long long)r.bytes_verified);
    CHECK(r.gbps == 0, "gbps %f with nothing copied", r.gbps);
    /* --verify: every shard hashed, still nothing copied */
    o.verify_existing = 1;
    CHECK_OK(kfac_stage_run(&o, NULL, &r));
    CHECK(r.shards_copied == 0 && r.shards_skipped == 4 && r.bytes_verified == total_bytes(),
          "verify: %d copied, %llu hashed", r.shards_copied,
          (unsigned long long)r.bytes_verified);
    o.verify_existing = 0;
    /* without the stamp: hashed once, then trusted again */
    char stamp[PATH_MAX];
    path_join(stamp, data_dir, ".kfac-stage.stamp");
    CHECK(unlink(stamp) == 0, "remove %s", stamp);
    CHECK_OK(kfac_stage_run(&o, NULL, &r));
    CHECK(r.shards_copied == 0 && r.bytes_verified == total_bytes(), "no stamp: %llu hashed",
          (unsigned long long)r.bytes_verified);
    CHECK(exists(data_dir, ".kfac-stage.stamp"), "stamp rewritten");
}

static void test_corrupt_local(const char *local, const char *data_dir)
{
    kfac_stage_options o;
    options(&o, local);
    kfac_stage_report r;
    char p[PATH_MAX];
    const kfac_shard_entry *e = shard("train", 1);
    path_join(p, data_dir, e->file);
    /* put mtime back after the flip: ctime still tells */
    struct stat before;
    CHECK(stat(p, &before) == 0, "stat %s", p);
    flip_byte(p, (off_t)(e->bytes / 2));
    struct timespec times[2] = {before.st_atim, before.st_mtim};
    CHECK(utimensat(AT_FDCWD, p, times, 0) == 0, "utimensat: %s", strerror(errno));
    CHECK(kfac_shard_verify(data_dir, e) != KFAC_OK, "the flip did not break %s", p);
    CHECK_OK(kfac_stage_run(&o, NULL, &r));
    CHECK(r.shards_copied == 1 && r.shards_skipped == 3 && r.bytes_copied == e->bytes &&
              r.bytes_verified == e->bytes,
          "corrupt: %d copied, %d skipped, %llu bytes, %llu hashed", r.shards_copied,
          r.shards_skipped, (unsigned long long)r.bytes_copied,
          (unsigned long long)r.bytes_verified);
    check_copy(data_dir, NULL);
    /* a local file of the wrong size is replaced without hashing */
    CHECK(truncate(p, 1000) == 0, "truncate %s", p);
    CHECK_OK(kfac_stage_run(&o, NULL, &r));
    CHECK(r.shards_copied == 1 && r.bytes_verified == 0, "short file: %d copied, %llu hashed",
          r.shards_copied, (unsigned long long)r.bytes_verified);
    check_copy(data_dir, NULL);
}

static void test_resume(const char *local, const char *data_dir)
{
    kfac_stage_options o;
    options(&o, local);
    kfac_stage_report r;
    const kfac_shard_entry *e = shard("train", 2);
    char p[PATH_MAX], part[PATH_MAX];
    path_join(p, data_dir, e->file);
    path_add(part, p, ".part");
    const uint64_t keep = e->bytes / 3 + 123; /* not on a chunk boundary */
    CHECK(rename(p, part) == 0 && truncate(part, (off_t)keep) == 0, "make %s", part);
    CHECK_OK(kfac_stage_run(&o, NULL, &r));
    CHECK(r.shards_copied == 1 && r.shards_resumed == 1 && r.bytes_copied == e->bytes - keep &&
              r.bytes_from_src == e->bytes - keep,
          "resume: %d copied, %d resumed, %llu bytes copied, expected %llu", r.shards_copied,
          r.shards_resumed, (unsigned long long)r.bytes_copied,
          (unsigned long long)(e->bytes - keep));
    check_copy(data_dir, NULL);
    /* a .part whose kept bytes are wrong: the final check fails, recopied */
    CHECK(rename(p, part) == 0 && truncate(part, (off_t)keep) == 0, "make %s", part);
    flip_byte(part, 10);
    CHECK_OK(kfac_stage_run(&o, NULL, &r));
    CHECK(r.shards_copied == 1 && r.shards_resumed == 0 &&
              r.bytes_copied == (e->bytes - keep) + e->bytes,
          "bad part: %d copied, %d resumed, %llu bytes", r.shards_copied, r.shards_resumed,
          (unsigned long long)r.bytes_copied);
    check_copy(data_dir, NULL);
    /* a .part longer than the shard is not resumed */
    CHECK(rename(p, part) == 0 && truncate(part, (off_t)e->bytes + 5) == 0, "make %s", part);
    CHECK_OK(kfac_stage_run(&o, NULL, &r));
    CHECK(r.shards_copied == 1 && r.shards_resumed == 0 && r.bytes_copied == e->bytes,
          "long part: %d copied, %llu bytes", r.shards_copied, (unsigned long long)r.bytes_copied);
    check_copy(data_dir, NULL);
}

static void test_bad_source(const char *local_base)
{
    char local[PATH_MAX];
    path_join(local, local_base, "bad-source");
    kfac_stage_options o;
    options(&o, local);
    kfac_stage_report r;
    const kfac_shard_entry *e = shard("train", 1);
    char p[PATH_MAX];
    path_join(p, src, e->file);
    flip_byte(p, (off_t)(e->bytes - 7));
    kfac_status st = kfac_stage_run(&o, NULL, &r);
    CHECK(st == KFAC_EFORMAT, "bad source: status %s", kfac_status_str(st));
    CHECK(strstr(kfac_last_error(), p) && strstr(kfac_last_error(), "checksum mismatch") &&
              strstr(kfac_last_error(), "does not match"),
          "message: %s", kfac_last_error());
    flip_byte(p, (off_t)(e->bytes - 7)); /* restore */
    /* the failed run left no manifest and no .part */
    char name[512], mpath[PATH_MAX], dir[PATH_MAX];
    size_t mlen;
    path_join(mpath, src, "manifest.yaml");
    char *mb = test_read_file(mpath, &mlen);
    CHECK_OK(kfac_stage_dir_name(src, mb, mlen, name, sizeof name));
    free(mb);
    path_join(dir, local, name);
    CHECK(!exists(dir, "manifest.yaml"), "manifest after a failed run");
    CHECK(count_parts(dir) == 0, ".part left after a failed run");
    /* a source of the wrong size: named, with both sizes */
    char saved[PATH_MAX];
    path_add(saved, p, ".saved");
    CHECK(link(p, saved) == 0, "link");
    char copy[PATH_MAX];
    path_add(copy, p, ".short");
    {
        size_t n;
        char *b = test_read_file(p, &n);
        FILE *f = fopen(copy, "wb");
        CHECK(b && f && fwrite(b, 1, n - 100, f) == n - 100, "write %s", copy);
        if (f) fclose(f);
        free(b);
    }
    CHECK(rename(copy, p) == 0, "rename");
    st = kfac_stage_run(&o, NULL, &r);
    CHECK(st == KFAC_EFORMAT && strstr(kfac_last_error(), p) && strstr(kfac_last_error(), "size"),
          "short source: %s: %s", kfac_status_str(st), kfac_last_error());
    CHECK(rename(saved, p) == 0, "restore %s", p);
}

static void test_bad_arguments(const char *local)
{
    kfac_stage_options o;
    kfac_stage_report r;
    char missing[PATH_MAX];
    path_join(missing, root, "no-such-dataset");
    options(&o, local);
    o.src_dir = missing;
    kfac_status st = kfac_stage_run(&o, NULL, &r);
    CHECK(st == KFAC_EIO && strstr(kfac_last_error(), missing) &&
              strstr(kfac_last_error(), "No such file"),
          "missing: %s", kfac_last_error());
    options(&o, local);
    const char *splits[] = {"train", "test", NULL};
    o.splits = splits;
    st = kfac_stage_run(&o, NULL, &r);
    CHECK(st == KFAC_EINVAL && strstr(kfac_last_error(), "no split 'test'") &&
              strstr(kfac_last_error(), "train, val"),
          "split: %s", kfac_last_error());
    options(&o, local);
    o.chunk_bytes = 100;
    CHECK(kfac_stage_run(&o, NULL, &r) == KFAC_EINVAL, "chunk 100 accepted");
    options(&o, local);
    o.src_dir = NULL;
    CHECK(kfac_stage_run(&o, NULL, &r) == KFAC_EINVAL, "no source accepted");
    kfac_stage_mode m;
    CHECK(kfac_stage_mode_parse("broadcast", &m) == KFAC_OK && m == KFAC_STAGE_MODE_BROADCAST,
          "parse broadcast");
    CHECK(kfac_stage_mode_parse("scatter", &m) == KFAC_EINVAL, "parse scatter");
    /* a manifest naming a shard like staging's own files */
    char odd[PATH_MAX];
    path_join(odd, root, "odd");
    mkdir(odd, 0755);
    kfac_manifest m2 = *manifest;
    kfac_shard_entry e = *shard("val", 0);
    snprintf(e.file, sizeof e.file, "val.h5.part");
    m2.num_splits = 1;
    m2.splits[0] = *kfac_manifest_split(manifest, "val");
    m2.splits[0].shards = &e;
    CHECK_OK(kfac_manifest_write(odd, &m2));
    options(&o, local);
    o.src_dir = odd;
    st = kfac_stage_run(&o, NULL, &r);
    CHECK(st == KFAC_EFORMAT && strstr(kfac_last_error(), "val.h5.part"), "reserved: %s",
          kfac_last_error());
}

static void test_split_subset(const char *local_base)
{
    char local[PATH_MAX];
    path_join(local, local_base, "subset");
    kfac_stage_options o;
    options(&o, local);
    const char *only_val[] = {"val", NULL};
    o.splits = only_val;
    kfac_stage_report r;
    CHECK_OK(kfac_stage_run(&o, NULL, &r));
    CHECK(r.shards_total == 1 && r.shards_copied == 1, "val: %d of %d", r.shards_copied,
          r.shards_total);
    check_copy(r.data_dir, "val");
    CHECK(!exists(r.data_dir, shard("train", 0)->file), "train staged too");
    kfac_manifest *lm = NULL;
    CHECK_OK(kfac_manifest_read(r.data_dir, &lm));
    CHECK(lm && lm->num_splits == 1 && strcmp(lm->splits[0].name, "val") == 0,
          "local manifest lists %d splits", lm ? lm->num_splits : -1);
    kfac_manifest_free(lm);
    /* then all: val is kept (the stamp vouches), train copied, the
     * manifest is the source's */
    o.splits = NULL;
    CHECK_OK(kfac_stage_run(&o, NULL, &r));
    CHECK(r.shards_copied == 3 && r.shards_skipped == 1 && r.bytes_verified == 0,
          "all: %d copied, %d skipped, %llu hashed", r.shards_copied, r.shards_skipped,
          (unsigned long long)r.bytes_verified);
    check_copy(r.data_dir, NULL);
    char a[PATH_MAX], b[PATH_MAX];
    path_join(a, src, "manifest.yaml");
    path_join(b, r.data_dir, "manifest.yaml");
    CHECK(test_same_file(a, b), "manifest after all splits");
    /* only train now: the manifest still lists both (val still vouched for) */
    const char *only_train[] = {"train", NULL};
    o.splits = only_train;
    CHECK_OK(kfac_stage_run(&o, NULL, &r));
    CHECK(test_same_file(a, b), "manifest after train only");
}

static void test_broadcast_alone(const char *local_base)
{
    char local[PATH_MAX];
    path_join(local, local_base, "bcast");
    kfac_stage_options o;
    options(&o, local);
    o.mode = KFAC_STAGE_MODE_BROADCAST;
    o.chunk_bytes = 0; /* the default chunk */
    kfac_stage_report r;
    CHECK_OK(kfac_stage_run(&o, NULL, &r));
    CHECK(r.shards_copied == 4 && r.bytes_copied == total_bytes(), "broadcast alone: %d copied",
          r.shards_copied);
    check_copy(r.data_dir, NULL);
    kfac_stage_report all[1];
    CHECK_OK(kfac_stage_gather(NULL, &r, all));
    CHECK(memcmp(&all[0], &r, sizeof r) == 0, "gather of one");
}

/* Returns 0 when run, 77 when mount is not possible here. */
static int test_short_space(void)
{
    char mnt[PATH_MAX];
    path_join(mnt, root, "tiny");
    mkdir(mnt, 0755);
    if (mount("tmpfs", mnt, "tmpfs", 0, "size=1m") != 0) {
        printf("test_stage: skipping the short-space part: mount -t tmpfs -o size=1m %s: %s\n",
               mnt, strerror(errno));
        return 77;
    }
    kfac_stage_options o;
    options(&o, mnt);
    kfac_stage_report r;
    /* val (~620 kB) fits */
    const char *only_val[] = {"val", NULL};
    o.splits = only_val;
    CHECK_OK(kfac_stage_run(&o, NULL, &r));
    CHECK(!r.fell_back && r.shards_copied == 1, "val on 1 MiB: fell back %d: %s", r.fell_back,
          r.reason);
    /* all does not: fallback (default) */
    o.splits = NULL;
    CHECK_OK(kfac_stage_run(&o, NULL, &r));
    char real[PATH_MAX];
    CHECK(realpath(src, real) != NULL, "realpath");
    CHECK(r.fell_back && strstr(r.reason, "not enough space") && strstr(r.reason, mnt) &&
              strcmp(r.data_dir, real) == 0 && r.shards_copied == 0 && r.bytes_copied == 0,
          "fallback: fell_back %d, reason '%s', data_dir %s", r.fell_back, r.reason, r.data_dir);
    /* without fallback: a clear refusal */
    o.fallback = 0;
    kfac_status st = kfac_stage_run(&o, NULL, &r);
    CHECK(st == KFAC_EIO && strstr(kfac_last_error(), "not enough space") &&
              strstr(kfac_last_error(), "free") && strstr(kfac_last_error(), "no fallback"),
          "refusal: %s: %s", kfac_status_str(st), kfac_last_error());
    /* nothing to copy needs no space, whatever the reserve */
    o.fallback = 1;
    o.reserve_bytes = 2000000;
    o.splits = only_val;
    CHECK_OK(kfac_stage_run(&o, NULL, &r));
    CHECK(!r.fell_back && r.shards_skipped == 1, "nothing to copy fell back: %s", r.reason);
    /* the reserve counts: val (~620 kB) plus 600 kB does not fit in 1 MiB */
    char p[PATH_MAX], dir[PATH_MAX];
    path_add(dir, r.data_dir, "");
    path_join(p, dir, shard("val", 0)->file);
    CHECK(unlink(p) == 0, "remove %s", p);
    o.reserve_bytes = 600000;
    CHECK_OK(kfac_stage_run(&o, NULL, &r));
    CHECK(r.fell_back && strstr(r.reason, "600 kB reserve"), "reserve: %s", r.reason);
    o.reserve_bytes = 0;
    CHECK_OK(kfac_stage_run(&o, NULL, &r));
    CHECK(!r.fell_back && r.shards_copied == 1, "no reserve: %s", r.reason);
    check_copy(r.data_dir, "val");
    if (umount(mnt) != 0) {
        fprintf(stderr, "test_stage: umount %s: %s\n", mnt, strerror(errno));
        test_failed_count++;
    }
    return 0;
}

static void remove_tree(const char *path)
{
    char cmd[PATH_MAX + 32];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", path);
    if (system(cmd) != 0) fprintf(stderr, "test_stage: could not remove %s\n", path);
}

int main(void)
{
    snprintf(root, sizeof root, "/tmp/kfac-test-stage.XXXXXX");
    if (!mkdtemp(root)) {
        perror("mkdtemp");
        return 1;
    }
    path_join(src, root, "dataset");
    mkdir(src, 0755);
    char local[PATH_MAX], data_dir[PATH_MAX];
    path_join(local, root, "local/nested"); /* created by staging */
    if (make_dataset() != 0) {
        fprintf(stderr, "test_stage: cannot make the dataset: %s\n", kfac_last_error());
        remove_tree(root);
        return 1;
    }
    test_first_and_rerun(local, data_dir);
    test_corrupt_local(local, data_dir);
    test_resume(local, data_dir);
    test_bad_source(root);
    test_bad_arguments(local);
    test_split_subset(root);
    test_broadcast_alone(root);
    int skipped = test_short_space();
    kfac_manifest_free(manifest);
    remove_tree(root);
    int rc = test_summary("test_stage");
    return rc ? rc : skipped;
}
