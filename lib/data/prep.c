/* prep.c - the `kfac prep` pipeline (kfac_prep.h): settings and shard
 * plan, then each thread converts whole shards (read, decode, resize,
 * encode in memory, one kfac_shard_writer per shard), ranks take shards
 * round-robin, and rank 0 gathers the shard entries and issue lists and
 * writes manifest.yaml, skipped.txt and warnings.txt.  Which inputs a
 * shard holds follows from the settings alone, so the output bytes do not
 * depend on threads, ranks or timing. */
#define _GNU_SOURCE /* strdup */
#include "kfac/kfac_prep.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/clock.h"
#include "core/fsutil.h"
#include "data/decode.h"
#include "data/prep_internal.h"
#include "data/resize.h"
#include "data/shards_internal.h"

enum {
    JPEG_RATIO = 8,     /* jpeg storage: an image estimated at 1/8 of its raw bytes */
    PREP_PATH_CAP = 4096,
    WARNING_MAX = 200
};

/* What one shard produced (gathered on rank 0). */
typedef struct shard_result {
    kfac_shard_entry entry;
    kfac__issues skipped, warnings; /* paths relative to the input folder */
} shard_result;

struct kfac_prep {
    kfac_prep_options opt;
    char *input, *out_dir, *val_labels; /* copies */
    kfac_prep_info info;
    kfac__prep_input in;
    kfac__prep_mpi mpi;
    size_t num_shards;      /* train shards, then val shards */
    size_t first_shard[2];  /* index of each split's shard 0 */
    shard_result *results;  /* num_shards */
    /* run state */
    double t0;              /* kfac__now_seconds() at the start */
    size_t done;            /* inputs handled by this rank (atomic) */
    int64_t next_progress;  /* ns since t0 (atomic) */
    int stop;               /* a worker failed (atomic) */
    kfac_status failure;
    char failure_message[1024];
    /* rank 0's outcome */
    kfac__issues skipped, warnings;
    kfac_prep_report report;
};

/* One worker thread's reusable state. */
typedef struct worker {
    kfac__codec *codec;
    kfac__buf file, pixels, resized, jpeg;
    kfac__resize_work resize;
    char path[PREP_PATH_CAP];
} worker;

/* ---- plan ---- */

static kfac_status resolve_settings(kfac_prep_settings *s, int is_idx)
{
    if (s->storage != KFAC_STORAGE_RAW && s->storage != KFAC_STORAGE_JPEG)
        return KFAC_ERR(KFAC_EINVAL, "--storage: unknown storage %d", (int)s->storage);
    if (s->channels == KFAC_PREP_DEFAULT) s->channels = is_idx ? 1 : 3;
    if (s->channels != 1 && s->channels != 3)
        return KFAC_ERR(KFAC_EINVAL, "--channels: %d, expected 1 or 3", s->channels);
    if (s->resize == KFAC_PREP_DEFAULT) s->resize = is_idx ? 0 : KFAC_PREP_FOLDER_RESIZE;
    if (s->resize < 0 || s->resize > 65535)
        return KFAC_ERR(KFAC_EINVAL, "--resize: %d outside 0..65535", s->resize);
    if (s->center_crop == KFAC_PREP_DEFAULT) s->center_crop = s->resize > 0;
    if (s->center_crop != 0 && s->center_crop != 1)
        return KFAC_ERR(KFAC_EINVAL, "--crop: %d, expected 0 (none) or 1 (center)",
                        s->center_crop);
    if (s->center_crop && s->resize == 0)
        return KFAC_ERR(KFAC_EINVAL,
                        "--crop center needs --resize > 0 (the crop is resize x resize)");
    if (s->jpeg_quality == KFAC_PREP_DEFAULT) s->jpeg_quality = KFAC_PREP_JPEG_QUALITY;
    if (s->jpeg_quality < 1 || s->jpeg_quality > 100)
        return KFAC_ERR(KFAC_EINVAL, "--quality: %d outside 1..100", s->jpeg_quality);
    /* raw shards have no quality: record 0 rather than an unused number */
    if (s->storage == KFAC_STORAGE_RAW) s->jpeg_quality = 0;
    snprintf(s->source, sizeof s->source, "%s", is_idx ? "idx" : "folder");
    return KFAC_OK;
}

/* N, from the settings only.  Raw fixed-size images: exactly what fits in
 * shard_bytes.  Otherwise an estimate: 4:3 images when the aspect is kept,
 * 500x375 (ImageNet's typical size) when not resized, 1/8 of the raw bytes
 * when stored as JPEG. */
static size_t images_per_shard(const kfac_prep *p)
{
    const kfac_prep_settings *s = &p->info.settings;
    if (p->opt.shard_images) return p->opt.shard_images;
    uint64_t bytes = p->opt.shard_bytes ? p->opt.shard_bytes
                                        : (uint64_t)KFAC_PREP_SHARD_MIB << 20;
    int h = 375, w = 500;
    if (p->in.is_idx) {
        kfac__resize_shape(p->in.splits[0].idx->height, p->in.splits[0].idx->width, s->resize,
                           &h, &w);
    } else if (s->resize > 0) {
        h = s->resize;
        w = s->resize + s->resize / 3;
    }
    if (s->center_crop) h = w = s->resize;
    uint64_t per = (uint64_t)h * (uint64_t)w * (uint64_t)s->channels;
    if (s->storage == KFAC_STORAGE_JPEG) per = per / JPEG_RATIO ? per / JPEG_RATIO : 1;
    uint64_t n = bytes / per;
    return n ? (size_t)n : 1;
}

/* Files a run writes, so that earlier ones never mix with ours. */
static int ours(const char *name)
{
    if (!strcmp(name, "manifest.yaml") || !strcmp(name, "skipped.txt") ||
        !strcmp(name, "warnings.txt"))
        return 1;
    const char *rest = !strncmp(name, "train-", 6) ? name + 6
                       : !strncmp(name, "val-", 4) ? name + 4
                                                   : NULL;
    if (!rest || !*rest) return 0;
    while (*rest >= '0' && *rest <= '9') rest++;
    return !strcmp(rest, ".h5") || !strcmp(rest, ".h5.tmp");
}

/* Creates out_dir, refuses to replace a dataset unless forced, removes
 * what an earlier run left (manifest first), and checks we can write. */
static kfac_status prepare_output(const char *dir, int force)
{
    KFAC_TRY(kfac__make_dirs(dir));
    char path[PREP_PATH_CAP];
    snprintf(path, sizeof path, "%s/manifest.yaml", dir);
    if (access(path, F_OK) == 0) {
        if (!force)
            return KFAC_ERR(KFAC_EIO, "%s: already holds a dataset (manifest.yaml); use --force "
                            "to replace it", dir);
        if (unlink(path) != 0)
            return KFAC_ERR(KFAC_EIO, "%s: cannot remove: %s", path, strerror(errno));
    }
    DIR *d = opendir(dir);
    if (!d) return KFAC_ERR(KFAC_EIO, "%s: cannot open folder: %s", dir, strerror(errno));
    struct dirent *e;
    kfac_status st = KFAC_OK;
    while (st == KFAC_OK && (e = readdir(d))) {
        if (!ours(e->d_name)) continue;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        if (unlink(path) != 0)
            st = KFAC_ERR(KFAC_EIO, "%s: cannot remove: %s", path, strerror(errno));
    }
    closedir(d);
    KFAC_TRY(st);
    snprintf(path, sizeof path, "%s/.kfac-prep-probe-%ld", dir, (long)getpid());
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return KFAC_ERR(KFAC_EIO, "%s: not writable: %s", dir, strerror(errno));
    close(fd);
    unlink(path);
    return KFAC_OK;
}

/* The split of global shard g (train shards first) and its index there. */
static int shard_split(const kfac_prep *p, size_t g, size_t *k)
{
    int s = p->info.num_splits == 2 && g >= p->first_shard[1];
    *k = g - p->first_shard[s];
    return s;
}

/* Inputs [*first, *end) of global shard g. */
static void shard_range(const kfac_prep *p, size_t g, int *split, size_t *k, size_t *first,
                        size_t *end)
{
    *split = shard_split(p, g, k);
    size_t n = p->info.images_per_shard, count = p->in.splits[*split].count;
    *first = *k * n;
    *end = *first + n < count ? *first + n : count;
}

/* Splits, shard counts, and this rank's share of the inputs. */
static void plan_shards(kfac_prep *p)
{
    kfac_prep_info *info = &p->info;
    size_t n = info->images_per_shard;
    info->num_splits = p->in.num_splits;
    for (int s = 0; s < p->in.num_splits; s++) {
        snprintf(info->splits[s].name, sizeof info->splits[s].name, "%s", p->in.splits[s].name);
        info->splits[s].inputs = p->in.splits[s].count;
        info->splits[s].shards = (p->in.splits[s].count + n - 1) / n;
        p->first_shard[s] = p->num_shards;
        p->num_shards += info->splits[s].shards;
    }
    for (size_t g = (size_t)p->mpi.rank; g < p->num_shards; g += (size_t)p->mpi.size) {
        int s;
        size_t k, first, end;
        shard_range(p, g, &s, &k, &first, &end);
        info->local_inputs += end - first;
    }
}

static char *dup_or_null(const char *s, int *oom)
{
    if (!s) return NULL;
    char *d = strdup(s);
    if (!d) *oom = 1;
    return d;
}

kfac_status kfac_prep_plan(kfac_prep **out, const kfac_prep_options *opt)
{
    *out = NULL;
    if (!opt->input || !opt->out_dir)
        return KFAC_ERR(KFAC_EINVAL, "prep: an input folder and an output folder are needed");
    if (opt->threads < 0) return KFAC_ERR(KFAC_EINVAL, "--threads: %d < 0", opt->threads);
    kfac_prep *p = calloc(1, sizeof *p);
    if (!p) return KFAC_ERR(KFAC_ENOMEM, "prep: out of memory");
    int oom = 0;
    p->opt = *opt;
    p->input = dup_or_null(opt->input, &oom);
    p->out_dir = dup_or_null(opt->out_dir, &oom);
    p->val_labels = dup_or_null(opt->val_labels, &oom);
    p->info.settings = opt->settings;
    p->info.threads = opt->threads ? opt->threads : omp_get_max_threads();
    /* Settings first: wrong values fail before MPI or a slow listing. */
    int is_idx = 0;
    kfac_status st = oom ? KFAC_ERR(KFAC_ENOMEM, "prep: out of memory") : KFAC_OK;
    if (st == KFAC_OK) st = kfac__prep_input_kind(p->input, &is_idx);
    if (st == KFAC_OK) st = resolve_settings(&p->info.settings, is_idx);
    if (st == KFAC_OK) st = kfac__prep_mpi_init(&p->mpi);
    if (st == KFAC_OK) {
        p->info.rank = p->mpi.rank;
        p->info.ranks = p->mpi.size;
        st = kfac__prep_mpi_agree(&p->mpi, kfac__prep_input_open(&p->in, p->input, p->val_labels));
    }
    if (st == KFAC_OK) {
        p->info.num_classes = p->in.num_classes;
        p->info.images_per_shard = images_per_shard(p);
        plan_shards(p);
        p->results = calloc(p->num_shards ? p->num_shards : 1, sizeof *p->results);
        kfac_status mine = p->results ? KFAC_OK : KFAC_ERR(KFAC_ENOMEM, "prep: out of memory");
        if (mine == KFAC_OK && p->mpi.rank == 0) mine = prepare_output(p->out_dir, opt->force);
        st = kfac__prep_mpi_agree(&p->mpi, mine);
    }
    if (st != KFAC_OK) {
        kfac_prep_free(p);
        return st;
    }
    *out = p;
    return KFAC_OK;
}

const kfac_prep_info *kfac_prep_info_get(const kfac_prep *p)
{
    return &p->info;
}

/* ---- converting one input ---- */

static kfac_status read_file(const char *path, kfac__buf *b)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return KFAC_ERR(KFAC_EIO, "unreadable: %s", strerror(errno));
    struct stat sb;
    kfac_status st = KFAC_OK;
    if (fstat(fd, &sb) != 0) st = KFAC_ERR(KFAC_EIO, "unreadable: %s", strerror(errno));
    size_t n = st == KFAC_OK ? (size_t)sb.st_size : 0, got = 0;
    if (st == KFAC_OK && !kfac__buf_reserve(b, n ? n : 1))
        st = KFAC_ERR(KFAC_ENOMEM, "out of memory reading %zu bytes", n);
    while (st == KFAC_OK && got < n) {
        ssize_t r = read(fd, b->p + got, n - got);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) st = KFAC_ERR(KFAC_EIO, "unreadable: %s", strerror(errno));
        else if (r == 0) st = KFAC_ERR(KFAC_EIO, "unreadable: file shrank while being read");
        else got += (size_t)r;
    }
    close(fd);
    b->len = got;
    return st;
}

/* Resizes/crops the decoded image in w->pixels as the settings say;
 * *out points at the result (w->pixels itself when nothing changes). */
static kfac_status transform(const kfac_prep_settings *s, worker *w, int h, int wd,
                             const uint8_t **out, int *oh, int *ow)
{
    int rh, rw;
    kfac__resize_shape(h, wd, s->resize, &rh, &rw);
    int top = 0, left = 0, win_h = rh, win_w = rw;
    if (s->center_crop) {
        win_h = win_w = s->resize;
        top = (rh - win_h) / 2;
        left = (rw - win_w) / 2;
    }
    *oh = win_h;
    *ow = win_w;
    /* /shapes holds uint16 sides; extreme aspect ratios end here, not in the writer */
    if (win_h > 65535 || win_w > 65535 || (size_t)win_h * (size_t)win_w > KFAC_PREP_MAX_PIXELS)
        return KFAC_ERR(KFAC_EFORMAT, "image too large: %dx%d would become %dx%d", wd, h, win_w,
                        win_h);
    if (rh == h && rw == wd && win_h == h && win_w == wd) {
        *out = w->pixels.p;
        return KFAC_OK;
    }
    size_t bytes = (size_t)win_h * (size_t)win_w * (size_t)s->channels;
    if (!kfac__buf_reserve(&w->resized, bytes))
        return KFAC_ERR(KFAC_ENOMEM, "out of memory for a %dx%d image", win_w, win_h);
    KFAC_TRY(kfac__resize(w->pixels.p, h, wd, s->channels, rh, rw, top, left, win_h, win_w,
                          w->resized.p, &w->resize));
    *out = w->resized.p;
    return KFAC_OK;
}

/* Input i of split s into shard writer sw.  KFAC_EFORMAT/KFAC_EIO: the
 * input is bad (skip it; the message is the reason); other failures end
 * the run.  warning[0] != 0: converted, with that decoder warning. */
static kfac_status convert(kfac_prep *p, worker *w, int s, size_t i, kfac_shard_writer *sw,
                           char *warning)
{
    const kfac_prep_settings *set = &p->info.settings;
    const kfac__prep_split *sp = &p->in.splits[s];
    int h, wd;
    int32_t label;
    warning[0] = '\0';
    if (sp->idx) {
        size_t n = (size_t)sp->idx->height * sp->idx->width * 3;
        if (!kfac__buf_reserve(&w->pixels, n))
            return KFAC_ERR(KFAC_ENOMEM, "out of memory for an IDX image");
        KFAC_TRY(sp->idx->read_image(sp->idx, i, w->pixels.p, &h, &wd, &label));
        if (set->channels == 3) kfac__gray_to_rgb(w->pixels.p, (size_t)h * wd);
    } else {
        if (snprintf(w->path, sizeof w->path, "%s/%s", sp->dir, sp->items[i].path) >=
            (int)sizeof w->path)
            return KFAC_ERR(KFAC_EIO, "unreadable: path too long");
        label = sp->items[i].label;
        KFAC_TRY(read_file(w->path, &w->file));
        KFAC_TRY(kfac__image_decode(w->codec, w->file.p, w->file.len, set->channels,
                                    KFAC_PREP_MAX_PIXELS, &w->pixels, &h, &wd, warning,
                                    WARNING_MAX));
    }
    const uint8_t *px = NULL;
    int oh, ow;
    KFAC_TRY(transform(set, w, h, wd, &px, &oh, &ow));
    size_t n = (size_t)oh * (size_t)ow * (size_t)set->channels;
    if (set->storage == KFAC_STORAGE_JPEG) {
        KFAC_TRY(kfac__jpeg_encode(w->codec, px, oh, ow, set->channels, set->jpeg_quality,
                                   &w->jpeg));
        px = w->jpeg.p;
        n = w->jpeg.len;
    }
    kfac_status st = kfac_shard_writer_add(sw, px, n, oh, ow, label);
    /* a writer refusal is the run's failure, not the input's */
    return st == KFAC_EFORMAT || st == KFAC_EIO ? KFAC_EINVAL : st;
}

/* ---- converting shards ---- */

static void progress_tick(kfac_prep *p)
{
    size_t done = __atomic_add_fetch(&p->done, 1, __ATOMIC_RELAXED);
    if (!p->opt.on_progress || p->mpi.rank != 0) return;
    double now = kfac__now_seconds() - p->t0;
    int64_t now_ns = (int64_t)(now * 1e9);
    int64_t next = __atomic_load_n(&p->next_progress, __ATOMIC_RELAXED);
    if (now_ns < next) return;
    int64_t step = (int64_t)((p->opt.progress_every > 0 ? p->opt.progress_every : 0.5) * 1e9);
    /* one thread wins the slot; the callback runs outside any lock order */
    if (!__atomic_compare_exchange_n(&p->next_progress, &next, now_ns + step, 0, __ATOMIC_RELAXED,
                                     __ATOMIC_RELAXED))
        return;
#pragma omp critical(kfac_prep_progress)
    p->opt.on_progress(done, p->info.local_inputs, now, p->opt.user);
}

static void fail(kfac_prep *p, kfac_status st)
{
#pragma omp critical(kfac_prep_failure)
    {
        if (p->failure == KFAC_OK) {
            p->failure = st;
            snprintf(p->failure_message, sizeof p->failure_message, "%s", kfac_last_error());
        }
    }
    __atomic_store_n(&p->stop, 1, __ATOMIC_RELAXED);
}

static kfac_status convert_shard(kfac_prep *p, worker *w, size_t g)
{
    int s;
    size_t k, first, end;
    shard_range(p, g, &s, &k, &first, &end);
    const char *split = p->in.splits[s].name;
    shard_result *r = &p->results[g];
    char path[PREP_PATH_CAP], where[PREP_PATH_CAP], warning[WARNING_MAX];
    if (snprintf(path, sizeof path, "%s/%s-%05zu.h5", p->out_dir, split, k) >= (int)sizeof path)
        return KFAC_ERR(KFAC_EINVAL, "%s: output path too long", p->out_dir);
    kfac_shard_writer *sw;
    KFAC_TRY(kfac_shard_writer_open(&sw, path, split, first, &p->info.settings,
                                    (const char(*)[KFAC_CLASS_NAME_MAX])p->in.classes,
                                    p->in.num_classes));
    kfac_status st = KFAC_OK;
    for (size_t i = first; st == KFAC_OK && i < end; i++) {
        if (__atomic_load_n(&p->stop, __ATOMIC_RELAXED)) break;
        kfac_status c = convert(p, w, s, i, sw, warning);
        const char *rel = p->in.splits[s].items ? p->in.splits[s].items[i].path : "";
        snprintf(where, sizeof where, "%s/%s", split, rel);
        if (c == KFAC_EFORMAT || c == KFAC_EIO)
            st = kfac__issues_add(&r->skipped, where, kfac_last_error());
        else if (c != KFAC_OK)
            st = c;
        else if (warning[0])
            st = kfac__issues_add(&r->warnings, where, warning);
        progress_tick(p);
    }
    if (st != KFAC_OK || __atomic_load_n(&p->stop, __ATOMIC_RELAXED)) {
        kfac_shard_writer_abort(sw);
        return st;
    }
    return kfac_shard_writer_close(sw, &r->entry);
}

static void worker_free(worker *w)
{
    kfac__codec_free(w->codec);
    kfac__buf_free(&w->file);
    kfac__buf_free(&w->pixels);
    kfac__buf_free(&w->resized);
    kfac__buf_free(&w->jpeg);
    kfac__resize_work_free(&w->resize);
}

/* This rank's shards g = rank, rank + P, ..., whole shards per thread. */
static void convert_all(kfac_prep *p)
{
    size_t mine = p->num_shards > (size_t)p->mpi.rank
                      ? (p->num_shards - (size_t)p->mpi.rank + (size_t)p->mpi.size - 1) /
                            (size_t)p->mpi.size
                      : 0;
    int threads = p->info.threads;
    if ((size_t)threads > mine) threads = mine ? (int)mine : 1;
#pragma omp parallel num_threads(threads)
    {
        worker w = {0};
        kfac_status st = kfac__codec_init(&w.codec);
        if (st != KFAC_OK) fail(p, st);
#pragma omp for schedule(dynamic, 1)
        for (size_t j = 0; j < mine; j++) {
            if (__atomic_load_n(&p->stop, __ATOMIC_RELAXED)) continue;
            st = convert_shard(p, &w, (size_t)p->mpi.rank + j * (size_t)p->mpi.size);
            if (st != KFAC_OK) fail(p, st);
        }
        worker_free(&w);
    }
}

/* ---- gathering on rank 0 ---- */

typedef struct bytes_out {
    uint8_t *p;
    size_t len, cap;
    int oom;
} bytes_out;

static void put(bytes_out *b, const void *v, size_t n)
{
    if (b->oom) return;
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n) cap *= 2;
        uint8_t *q = realloc(b->p, cap);
        if (!q) {
            b->oom = 1;
            return;
        }
        b->p = q;
        b->cap = cap;
    }
    memcpy(b->p + b->len, v, n);
    b->len += n;
}

static void put_issues(bytes_out *b, const kfac__issues *l)
{
    uint64_t n = l->n;
    put(b, &n, sizeof n);
    for (size_t i = 0; i < l->n; i++) {
        put(b, l->v[i].path, strlen(l->v[i].path) + 1);
        put(b, l->v[i].reason, strlen(l->v[i].reason) + 1);
    }
}

/* Record per shard of this rank: u64 g, the entry, skipped, warnings. */
static kfac_status pack_results(const kfac_prep *p, bytes_out *b)
{
    for (size_t g = (size_t)p->mpi.rank; g < p->num_shards; g += (size_t)p->mpi.size) {
        uint64_t g64 = g;
        put(b, &g64, sizeof g64);
        put(b, &p->results[g].entry, sizeof p->results[g].entry);
        put_issues(b, &p->results[g].skipped);
        put_issues(b, &p->results[g].warnings);
    }
    return b->oom ? KFAC_ERR(KFAC_ENOMEM, "prep: out of memory packing results") : KFAC_OK;
}

typedef struct bytes_in {
    const uint8_t *p;
    size_t len, pos;
} bytes_in;

static int get(bytes_in *b, void *v, size_t n)
{
    if (b->len - b->pos < n) return 0;
    memcpy(v, b->p + b->pos, n);
    b->pos += n;
    return 1;
}

static const char *get_str(bytes_in *b)
{
    const char *s = (const char *)b->p + b->pos;
    const void *nul = memchr(s, '\0', b->len - b->pos);
    if (!nul) return NULL;
    b->pos += (size_t)((const char *)nul - s) + 1;
    return s;
}

static kfac_status get_issues(bytes_in *b, kfac__issues *l)
{
    uint64_t n;
    if (!get(b, &n, sizeof n)) return KFAC_ERR(KFAC_ECOMM, "prep: gathered results are cut short");
    for (uint64_t i = 0; i < n; i++) {
        const char *path = get_str(b), *reason = path ? get_str(b) : NULL;
        if (!reason) return KFAC_ERR(KFAC_ECOMM, "prep: gathered results are cut short");
        KFAC_TRY(kfac__issues_add(l, path, reason));
    }
    return KFAC_OK;
}

/* Rank 0: every shard's entry in place, issue lists merged and sorted. */
static kfac_status unpack_results(kfac_prep *p, const uint8_t *all, size_t n)
{
    bytes_in b = {all, n, 0};
    kfac__issues skipped = {0}, warnings = {0};
    kfac_status st = KFAC_OK;
    while (st == KFAC_OK && b.pos < b.len) {
        uint64_t g;
        kfac_shard_entry e;
        if (!get(&b, &g, sizeof g) || g >= p->num_shards || !get(&b, &e, sizeof e)) {
            st = KFAC_ERR(KFAC_ECOMM, "prep: gathered results are malformed");
            break;
        }
        p->results[g].entry = e;
        st = get_issues(&b, &skipped);
        if (st == KFAC_OK) {
            p->report.skipped_inputs += skipped.n;
            st = kfac__issues_take(&p->skipped, &skipped);
        }
        if (st == KFAC_OK) st = get_issues(&b, &warnings);
        if (st == KFAC_OK) st = kfac__issues_take(&p->warnings, &warnings);
    }
    kfac__issues_free(&skipped);
    kfac__issues_free(&warnings);
    KFAC_TRY(st);
    KFAC_TRY(kfac__issues_take(&p->skipped, &p->in.skipped));
    kfac__issues_sort(&p->skipped);
    kfac__issues_sort(&p->warnings);
    return KFAC_OK;
}

/* ---- rank 0's files ---- */

/* "path<TAB>reason" lines; control characters in either become '?' so
 * every entry stays one line. */
static kfac_status write_list(const kfac_prep *p, const char *name, const kfac__issues *l)
{
    char path[PREP_PATH_CAP], tmp[PREP_PATH_CAP + 8];
    snprintf(path, sizeof path, "%s/%s", p->out_dir, name);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f) return KFAC_ERR(KFAC_EIO, "%s: cannot create: %s", tmp, strerror(errno));
    for (size_t i = 0; i < l->n; i++) {
        for (int field = 0; field < 2; field++) {
            for (const char *c = field ? l->v[i].reason : l->v[i].path; *c; c++)
                fputc((unsigned char)*c < 0x20 ? '?' : *c, f);
            fputc(field ? '\n' : '\t', f);
        }
    }
    if (fflush(f) != 0 || ferror(f)) {
        int e = errno;
        fclose(f);
        unlink(tmp);
        return KFAC_ERR(KFAC_EIO, "%s: cannot write: %s", tmp, strerror(e));
    }
    if (fclose(f) != 0) {
        unlink(tmp);
        return KFAC_ERR(KFAC_EIO, "%s: cannot write: %s", tmp, strerror(errno));
    }
    return kfac__publish_file(tmp, path);
}

static kfac_status write_outputs(kfac_prep *p)
{
    kfac_manifest m = {
        .settings = p->info.settings,
        .num_classes = p->in.num_classes,
        .classes = p->in.classes,
        .num_splits = p->info.num_splits,
    };
    for (int s = 0; s < p->info.num_splits; s++) {
        kfac_split_entry *e = &m.splits[s];
        snprintf(e->name, sizeof e->name, "%s", p->info.splits[s].name);
        e->num_shards = p->info.splits[s].shards;
        e->shards = calloc(e->num_shards ? e->num_shards : 1, sizeof *e->shards);
        if (!e->shards) {
            for (int t = 0; t < s; t++) free(m.splits[t].shards);
            return KFAC_ERR(KFAC_ENOMEM, "prep: out of memory for the manifest");
        }
        for (size_t k = 0; k < e->num_shards; k++) {
            e->shards[k] = p->results[p->first_shard[s] + k].entry;
            e->count += e->shards[k].count;
            p->report.bytes += e->shards[k].bytes;
        }
        p->report.written[s] = e->count;
    }
    kfac_status st = write_list(p, "skipped.txt", &p->skipped);
    if (st == KFAC_OK) st = write_list(p, "warnings.txt", &p->warnings);
    /* last: a dataset folder with a manifest is complete */
    if (st == KFAC_OK) st = kfac_manifest_write(p->out_dir, &m);
    for (int s = 0; s < p->info.num_splits; s++) free(m.splits[s].shards);
    return st;
}

kfac_status kfac_prep_run(kfac_prep *p, kfac_prep_report *report)
{
    memset(report, 0, sizeof *report);
    p->t0 = kfac__now_seconds();
    /* the first report after one interval: short runs print none */
    p->next_progress = (int64_t)((p->opt.progress_every > 0 ? p->opt.progress_every : 0.5) * 1e9);
    convert_all(p);
    kfac_status st = p->failure;
    if (st != KFAC_OK) kfac__set_error(st, __FILE__, __LINE__, "%s", p->failure_message);
    KFAC_TRY(kfac__prep_mpi_agree(&p->mpi, st));
    if (p->opt.on_progress && p->mpi.rank == 0)
        p->opt.on_progress(p->done, p->info.local_inputs, kfac__now_seconds() - p->t0, p->opt.user);

    bytes_out mine = {0};
    uint8_t *all = NULL;
    size_t all_n = 0;
    st = pack_results(p, &mine);
    st = kfac__prep_mpi_agree(&p->mpi, st);
    if (st == KFAC_OK) st = kfac__prep_mpi_gather(&p->mpi, mine.p, mine.len, &all, &all_n);
    free(mine.p);
    kfac_status local = KFAC_OK;
    if (st == KFAC_OK && p->mpi.rank == 0) {
        local = unpack_results(p, all, all_n);
        if (local == KFAC_OK) local = write_outputs(p);
    }
    free(all);
    if (st == KFAC_OK) st = kfac__prep_mpi_agree(&p->mpi, local);
    KFAC_TRY(st);
    p->report.num_skipped = p->skipped.n;
    p->report.skipped = p->skipped.v;
    p->report.num_warnings = p->warnings.n;
    p->report.warnings = p->warnings.v;
    p->report.seconds = kfac__now_seconds() - p->t0;
    *report = p->report;
    return KFAC_OK;
}

void kfac_prep_free(kfac_prep *p)
{
    if (!p) return;
    for (size_t g = 0; p->results && g < p->num_shards; g++) {
        kfac__issues_free(&p->results[g].skipped);
        kfac__issues_free(&p->results[g].warnings);
    }
    free(p->results);
    kfac__issues_free(&p->skipped);
    kfac__issues_free(&p->warnings);
    kfac__prep_input_free(&p->in);
    kfac__prep_mpi_finish(&p->mpi);
    free(p->input);
    free(p->out_dir);
    free(p->val_labels);
    free(p);
}
