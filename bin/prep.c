/* prep.c - `kfac prep [options] --out DIR INPUT`: converts an image folder
 * tree or IDX files into HDF5 shards (kfac_prep.h), drawing progress on a
 * terminal and printing a summary (rank 0 only under mpirun/srun). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "commands.h"
#include "kfac/kfac_prep.h"

static void usage(FILE *out)
{
    fprintf(out,
            "usage: kfac prep [options] --out DIR INPUT\n"
            "       mpirun -n RANKS kfac prep ...   (or srun --mpi=pmix ...)\n"
            "\n"
            "Converts INPUT into HDF5 shards plus manifest.yaml in DIR, the dataset\n"
            "format `kfac train` reads (data.format: hdf5).  INPUT is either\n"
            "  - an IDX folder (MNIST, Fashion-MNIST): train-images-idx3-ubyte[.gz],\n"
            "    train-labels-idx1-ubyte[.gz] and optionally the t10k files, which\n"
            "    become the val split; classes are named 0..9;\n"
            "  - an image tree: INPUT/train/<class>/<file> and optionally\n"
            "    INPUT/val/<class>/<file> (ImageNet after the usual valprep), or a flat\n"
            "    INPUT/val/<file> with --val-labels.  The classes are the sorted names\n"
            "    of the folders in train/ (ImageNet: the wnids); val's class folders are\n"
            "    matched by name.  Files are JPEG or PNG, told by their first bytes, not\n"
            "    their names; names starting with '.' are ignored.\n"
            "\n"
            "Each split is ordered by file path (byte order, relative to the split\n"
            "folder; IDX: file order) and shard k holds inputs k*N .. k*N+N-1, N fixed by\n"
            "the settings: the same input and options give the same bytes whatever\n"
            "--threads or the number of ranks.  Each process holds up to --threads\n"
            "shards in memory.\n"
            "\n"
            "options:\n"
            "  --out DIR            output folder (created).  An existing dataset there\n"
            "                       (manifest.yaml) is replaced only with --force; earlier\n"
            "                       train-*.h5, val-*.h5 and lists are removed\n"
            "  --storage raw|jpeg   raw: uint8 HWC pixels, read without decoding (fast);\n"
            "                       jpeg: re-encoded JPEG bytes (compact).  Default raw\n"
            "  --resize S           resize the shorter side to S pixels (antialiased\n"
            "                       bilinear, as Pillow's Image.resize(BILINEAR); the longer\n"
            "                       side becomes floor(long*S/short)); 0 keeps the size.\n"
            "                       Default 256 for image trees, 0 for IDX\n"
            "  --crop center|none   center: then crop the middle SxS (offsets floor((h-S)/2),\n"
            "                       floor((w-S)/2)): every image the same size; none: keep\n"
            "                       the aspect ratio.  Default center when resizing\n"
            "  --quality Q          JPEG quality 1..100 for --storage jpeg (default 90)\n"
            "  --channels 1|3       gray or RGB (default 3 for image trees, 1 for IDX)\n"
            "  --shard-mb MB        target shard size in MiB (default 1024): raw fixed-size\n"
            "                       images: N = floor(MB MiB / image bytes); otherwise\n"
            "                       estimated from 4:3 images (500x375 when not resized),\n"
            "                       JPEG as 1/8 of raw\n"
            "  --shard-images N     exactly N inputs per shard instead\n"
            "  --val-labels FILE    labels of a flat INPUT/val: one per non-blank line, in\n"
            "                       sorted file-name order, each a 1-based index into the\n"
            "                       sorted train/ folder names or a class name.  Note: the\n"
            "                       ILSVRC2012 devkit's ground truth uses the devkit's own\n"
            "                       class ids (meta.mat order), not sorted wnids: map them\n"
            "                       to wnids first (or use val/<wnid>/ folders)\n"
            "  --threads N          worker threads per process (default: OMP_NUM_THREADS or\n"
            "                       all cores)\n"
            "  --force              replace a dataset already in DIR\n"
            "  -q, --quiet          no progress display\n"
            "  -h, --help           this text\n"
            "\n"
            "Conversions: CMYK JPEGs become RGB (Adobe/inverted CMYK, as Photoshop and\n"
            "Pillow write it); gray is replicated to RGB, RGB to gray is ITU-R 601 luma;\n"
            "PNG palettes, 1-16 bit depths and transparency are expanded; alpha is\n"
            "composited onto white.  Bad inputs are skipped, never fatal, and listed in\n"
            "DIR/skipped.txt (path<TAB>reason, sorted): not a JPEG or PNG file, empty\n"
            "file, truncated JPEG (a libjpeg warning and no end-of-image marker after\n"
            "the last scan), corrupt JPEG/PNG, image too large (over %d pixels),\n"
            "empty class folder, class folder not in train/, files outside class\n"
            "folders.  A complete JPEG that decodes with a libjpeg warning (e.g.\n"
            "extraneous bytes) is converted and listed in DIR/warnings.txt.\n"
            "\n"
            "Progress (rank 0's share) is drawn on a terminal, a line every 30 s\n"
            "otherwise; the summary gives images per split, skips by reason, bytes,\n"
            "seconds and images/s.  Started by mpirun or srun with several ranks, rank r\n"
            "converts shards r, r+P, ... and rank 0 writes the manifest.\n"
            "\n"
            "examples:\n"
            "  kfac prep --out /data/fmnist-h5 /usr/share/datasets/fashion-mnist\n"
            "  kfac prep --out /data/imagenet-h5 --resize 256 --crop center --storage raw \\\n"
            "      /datasets/imagenet                # ILSVRC2012 train/ and val/<wnid>/\n"
            "  kfac prep --out /data/imagenet-jpeg --storage jpeg --crop none --quality 90 \\\n"
            "      --val-labels val_wnids.txt /datasets/imagenet   # flat val/\n"
            "  srun --mpi=pmix -N 4 -n 16 kfac prep --threads 4 --out /data/imagenet-h5 \\\n"
            "      /datasets/imagenet\n",
            KFAC_PREP_MAX_PIXELS);
}

/* ---- options ---- */

/* Matches --name VALUE and --name=VALUE: 1 with *value set, 0 when argv[*i]
 * is another option, -1 when the value is missing (message printed). */
static int option(int argc, char **argv, int *i, const char *name, const char **value)
{
    const char *a = argv[*i];
    size_t n = strlen(name);
    if (strncmp(a, name, n) != 0 || (a[n] != '\0' && a[n] != '=')) return 0;
    if (a[n] == '=') {
        *value = a + n + 1;
        return 1;
    }
    if (*i + 1 >= argc) {
        fprintf(stderr, "kfac prep: %s needs a value (see kfac prep --help)\n", name);
        return -1;
    }
    *value = argv[++*i];
    return 1;
}

static int parse_long(const char *name, const char *v, long lo, long hi, long *out)
{
    char *end;
    long x = strtol(v, &end, 10);
    if (!*v || *end || x < lo || x > hi) {
        fprintf(stderr, "kfac prep: %s: '%s' is not an integer in %ld..%ld\n", name, v, lo, hi);
        return 0;
    }
    *out = x;
    return 1;
}

static int parse_choice(const char *name, const char *v, const char *a, const char *b, int *out)
{
    if (!strcmp(v, a) || !strcmp(v, b)) {
        *out = strcmp(v, a) == 0 ? 0 : 1;
        return 1;
    }
    fprintf(stderr, "kfac prep: %s: '%s', expected %s or %s\n", name, v, a, b);
    return 0;
}

/* 2 on a usage error (printed), 1 to go on, 0 after --help. */
static int parse_args(int argc, char **argv, kfac_prep_options *o, int *quiet)
{
    long shard_mb = 0, shard_images = 0, x;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = NULL;
        int m, c;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "-q") || !strcmp(a, "--quiet")) {
            *quiet = 1;
        } else if (!strcmp(a, "--force")) {
            o->force = 1;
        } else if ((m = option(argc, argv, &i, "--out", &v))) {
            if (m < 0) return 2;
            o->out_dir = v;
        } else if ((m = option(argc, argv, &i, "--storage", &v))) {
            if (m < 0 || !parse_choice("--storage", v, "raw", "jpeg", &c)) return 2;
            o->settings.storage = c ? KFAC_STORAGE_JPEG : KFAC_STORAGE_RAW;
        } else if ((m = option(argc, argv, &i, "--resize", &v))) {
            if (m < 0 || !parse_long("--resize", v, 0, 65535, &x)) return 2;
            o->settings.resize = (int)x;
        } else if ((m = option(argc, argv, &i, "--crop", &v))) {
            if (m < 0 || !parse_choice("--crop", v, "none", "center", &c)) return 2;
            o->settings.center_crop = c;
        } else if ((m = option(argc, argv, &i, "--quality", &v))) {
            if (m < 0 || !parse_long("--quality", v, 1, 100, &x)) return 2;
            o->settings.jpeg_quality = (int)x;
        } else if ((m = option(argc, argv, &i, "--channels", &v))) {
            if (m < 0 || !parse_choice("--channels", v, "1", "3", &c)) return 2;
            o->settings.channels = c ? 3 : 1;
        } else if ((m = option(argc, argv, &i, "--shard-mb", &v))) {
            if (m < 0 || !parse_long("--shard-mb", v, 1, 1L << 30, &shard_mb)) return 2;
        } else if ((m = option(argc, argv, &i, "--shard-images", &v))) {
            if (m < 0 || !parse_long("--shard-images", v, 1, 1L << 40, &shard_images)) return 2;
        } else if ((m = option(argc, argv, &i, "--val-labels", &v))) {
            if (m < 0) return 2;
            o->val_labels = v;
        } else if ((m = option(argc, argv, &i, "--threads", &v))) {
            if (m < 0 || !parse_long("--threads", v, 1, 4096, &x)) return 2;
            o->threads = (int)x;
        } else if (a[0] == '-' && a[1]) {
            fprintf(stderr, "kfac prep: unknown option '%s' (see kfac prep --help)\n", a);
            return 2;
        } else if (o->input) {
            fprintf(stderr, "kfac prep: one input folder only ('%s' and '%s')\n", o->input, a);
            return 2;
        } else {
            o->input = a;
        }
    }
    if (shard_mb && shard_images) {
        fprintf(stderr, "kfac prep: --shard-mb and --shard-images: give one of them\n");
        return 2;
    }
    o->shard_bytes = (uint64_t)shard_mb << 20;
    o->shard_images = (size_t)shard_images;
    if (!o->input || !o->out_dir) {
        fprintf(stderr, "kfac prep: %s (see kfac prep --help)\n",
                !o->input ? "no INPUT folder given" : "no --out DIR given");
        return 2;
    }
    return 1;
}

/* ---- progress ---- */

static int live_terminal;

static void format_duration(double s, char *buf, size_t cap)
{
    long t = (long)(s + 0.5);
    if (t >= 3600)
        snprintf(buf, cap, "%ld:%02ld:%02ld", t / 3600, t / 60 % 60, t % 60);
    else
        snprintf(buf, cap, "%ld:%02ld", t / 60, t % 60);
}

static void on_progress(size_t done, size_t total, double seconds, void *user)
{
    double rate = seconds > 0 ? (double)done / seconds : 0;
    char eta[32] = "?";
    if (rate > 0) format_duration((double)(total - done) / rate, eta, sizeof eta);
    double frac = total ? (double)done / (double)total : 1;
    if (live_terminal) {
        enum { WIDTH = 30 };
        char bar[WIDTH + 1];
        int fill = (int)(frac * WIDTH);
        for (int i = 0; i < WIDTH; i++) bar[i] = i < fill ? '#' : '.';
        bar[WIDTH] = '\0';
        fprintf(stderr, "\r\033[K[%s] %3.0f%%  %zu/%zu  %.0f img/s  ETA %s", bar, 100 * frac,
                done, total, rate, eta);
        if (done == total) fputc('\n', stderr);
    } else if (done < total) {
        fprintf(stderr, "kfac prep: %zu/%zu inputs (%.0f%%), %.0f img/s, ETA %s\n", done, total,
                100 * frac, rate, eta);
    }
    fflush(stderr);
}

/* ---- summary ---- */

static void print_plan(const kfac_prep_options *o, const kfac_prep_info *in)
{
    const kfac_prep_settings *s = &in->settings;
    printf("kfac prep: %s (%s, %d class%s) -> %s\n", o->input, s->source, in->num_classes,
           in->num_classes == 1 ? "" : "es", o->out_dir);
    printf("  %s, %d channel%s, ", s->storage == KFAC_STORAGE_JPEG ? "jpeg" : "raw", s->channels,
           s->channels > 1 ? "s" : "");
    if (s->resize == 0)
        printf("original size");
    else if (s->center_crop)
        printf("shorter side %d, center crop %dx%d", s->resize, s->resize, s->resize);
    else
        printf("shorter side %d, aspect kept", s->resize);
    if (s->storage == KFAC_STORAGE_JPEG) printf(", quality %d", s->jpeg_quality);
    printf("; %zu inputs per shard\n", in->images_per_shard);
    for (int i = 0; i < in->num_splits; i++)
        printf("  %s: %zu inputs -> %zu shard%s\n", in->splits[i].name, in->splits[i].inputs,
               in->splits[i].shards, in->splits[i].shards == 1 ? "" : "s");
    printf("  %d thread%s x %d rank%s\n", in->threads, in->threads == 1 ? "" : "s", in->ranks,
           in->ranks == 1 ? "" : "s");
    fflush(stdout);
}

/* "N reason-kind, ..." over the list: the kind is the reason up to ':'. */
static void print_kinds(FILE *out, const kfac_prep_issue *v, size_t n)
{
    enum { MAX_KINDS = 32 };
    struct kind_count {
        const char *kind;
        size_t len, count;
    } kinds[MAX_KINDS];
    int nk = 0;
    for (size_t i = 0; i < n; i++) {
        const char *colon = strchr(v[i].reason, ':');
        size_t len = colon ? (size_t)(colon - v[i].reason) : strlen(v[i].reason);
        int k = 0;
        while (k < nk && (kinds[k].len != len || strncmp(kinds[k].kind, v[i].reason, len))) k++;
        if (k == nk && nk == MAX_KINDS) k = nk - 1; /* lumped into the last: never in practice */
        if (k == nk) kinds[nk++] = (struct kind_count){v[i].reason, len, 0};
        kinds[k].count++;
    }
    for (int k = 0; k < nk; k++)
        fprintf(out, "%s%zu %.*s", k ? ", " : "", kinds[k].count, (int)kinds[k].len,
                kinds[k].kind);
}

static void print_summary(const kfac_prep_options *o, const kfac_prep_info *in,
                          const kfac_prep_report *r)
{
    size_t total = 0;
    for (int i = 0; i < in->num_splits; i++) {
        total += r->written[i];
        printf("%s: %zu image%s in %zu shard%s (%zu inputs)\n", in->splits[i].name,
               r->written[i], r->written[i] == 1 ? "" : "s", in->splits[i].shards,
               in->splits[i].shards == 1 ? "" : "s", in->splits[i].inputs);
    }
    if (r->num_skipped) {
        fprintf(stderr, "kfac prep: skipped %zu input%s (%zu entries: ", r->skipped_inputs,
                r->skipped_inputs == 1 ? "" : "s", r->num_skipped);
        print_kinds(stderr, r->skipped, r->num_skipped);
        fprintf(stderr, "); see %s/skipped.txt\n", o->out_dir);
    }
    if (r->num_warnings) {
        fprintf(stderr, "kfac prep: converted %zu input%s despite decoder warnings (", r->num_warnings,
                r->num_warnings == 1 ? "" : "s");
        print_kinds(stderr, r->warnings, r->num_warnings);
        fprintf(stderr, "); see %s/warnings.txt\n", o->out_dir);
    }
    fflush(stderr);
    printf("done: %zu images, %zu skipped, %.1f MB in %.2f s (%.1f images/s)\n", total,
           r->skipped_inputs, (double)r->bytes / 1e6, r->seconds,
           r->seconds > 0 ? (double)total / r->seconds : 0.0);
    fflush(stdout);
}

/* Before MPI starts, the launcher's rank says who prints errors. */
static int launcher_rank(void)
{
    static const char *const vars[] = {"OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK"};
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++) {
        const char *v = getenv(vars[i]);
        if (v && *v) return atoi(v);
    }
    return 0;
}

int kfac_cmd_prep(int argc, char **argv)
{
    int quiet = 0;
    kfac_prep_options o = {
        .settings = {.storage = KFAC_STORAGE_RAW,
                     .channels = KFAC_PREP_DEFAULT,
                     .resize = KFAC_PREP_DEFAULT,
                     .center_crop = KFAC_PREP_DEFAULT,
                     .jpeg_quality = KFAC_PREP_DEFAULT},
    };
    int rc = parse_args(argc, argv, &o, &quiet);
    if (rc != 1) return rc;
    int speaker = launcher_rank() == 0;
    live_terminal = isatty(STDERR_FILENO) && !getenv("OMPI_COMM_WORLD_SIZE") &&
                    !getenv("PMIX_RANK");
    if (!quiet) {
        o.on_progress = on_progress;
        o.progress_every = live_terminal ? 0.2 : 30;
    }
    kfac_prep *p;
    if (kfac_prep_plan(&p, &o) != KFAC_OK) {
        if (speaker) fprintf(stderr, "kfac prep: %s\n", kfac_last_error());
        return 1;
    }
    const kfac_prep_info *info = kfac_prep_info_get(p);
    speaker = info->rank == 0;
    if (speaker) print_plan(&o, info);
    kfac_prep_report report;
    if (kfac_prep_run(p, &report) != KFAC_OK) {
        if (speaker) {
            if (live_terminal && !quiet) fputc('\n', stderr);
            fprintf(stderr, "kfac prep: %s\n", kfac_last_error());
            if (getenv("KFAC_DEBUG")) fprintf(stderr, "  (raised at %s)\n", kfac_last_error_where());
        }
        kfac_prep_free(p);
        return 1;
    }
    if (speaker) print_summary(&o, info, &report);
    kfac_prep_free(p);
    return 0;
}
