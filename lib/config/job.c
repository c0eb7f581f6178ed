/* job.c - the job schema, kept in ONE table (KEYS), and everything driven
 * by it: defaults, loading a YAML job file, --set overrides, validation,
 * writing the resolved job back as YAML and describing the keys.
 *
 * Adding a key is one KEY(...) line below plus its member in kfac_job.
 *
 * A key's path is "section.key" where the section may itself be nested,
 * "optimizer.kfac.damping": the section is everything before the last dot,
 * and in YAML each dot is one level of mapping.  Sections are not listed
 * anywhere; they exist because keys name them.
 *
 * Every message about a key starts with where its value came from:
 * "FILE:LINE:COL: section.key", "--set section.key", or just "section.key"
 * for a struct handed to kfac_job_validate. */
#include "kfac/kfac_job.h"

#include <assert.h>
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "config/yaml_tree.h"
#include "core/strbuf.h"

/* ---- the schema ---- */

typedef enum key_type { T_STR, T_INT, T_BOOL, T_FLOAT, T_U64, T_FLIST } key_type;

static const struct {
    const char *name;   /* shown by kfac_job_describe */
    const char *expect; /* "expected ..., got ..." */
} TYPES[] = {
    [T_STR] = {"string", "a string"},
    [T_INT] = {"int", "an integer"},
    [T_BOOL] = {"bool", "true or false"},
    [T_FLOAT] = {"float", "a number"},
    [T_U64] = {"uint64", "a non-negative integer"},
    [T_FLIST] = {"float list", "a number or a list of numbers like [30, 60]"},
};

/* Size of the kfac_job member that holds a value of type `t`. */
#define TYPE_SIZE(t)                                                        \
    ((t) == T_STR     ? (size_t)KFAC_JOB_STR                                \
     : (t) == T_FLOAT ? sizeof(float)                                       \
     : (t) == T_U64   ? sizeof(uint64_t)                                    \
     : (t) == T_FLIST ? sizeof(float[KFAC_JOB_MAX_MILESTONES])              \
                      : sizeof(int))

/* offsetof(kfac_job, m), refusing to compile (negative array size) when
 * the member's size does not match `type`: a wrong type in KEYS would
 * otherwise silently overwrite neighbouring fields. */
#define MEMBER(m, type)                                                     \
    (offsetof(kfac_job, m) +                                                \
     0 * sizeof(char[sizeof(((kfac_job *)0)->m) == TYPE_SIZE(type) ? 1 : -1]))

/* Allowed values.  Numbers (and each list item) must lie between lo and hi;
 * strings must be non-empty (unless empty_ok) and, with one_of, one of its
 * '|'-separated words. */
typedef struct limits {
    double lo, hi;
    unsigned char lo_open, hi_open; /* bound itself excluded */
    const char *one_of;
    unsigned char empty_ok; /* strings: "" allowed */
} limits;

#define ANY {-INFINITY, INFINITY, 0, 0, NULL, 0}
#define AT_LEAST(a) {(a), INFINITY, 0, 0, NULL, 0}
#define ABOVE(a) {(a), INFINITY, 1, 0, NULL, 0}
#define UNIT {0, 1, 0, 1, NULL, 0}     /* [0, 1) */
#define FRACTION {0, 1, 1, 0, NULL, 0} /* (0, 1] */
#define EMPTY_OK {-INFINITY, INFINITY, 0, 0, NULL, 1} /* any string, "" too */
#define ONE_OF(words) {-INFINITY, INFINITY, 0, 0, (words), 0}

typedef struct key_spec {
    const char *path;    /* "section.key", the section perhaps nested: "optimizer.kfac.damping" */
    key_type type;
    size_t offset;       /* of the value in kfac_job */
    size_t count_offset; /* float lists: of the int item count */
    const char *def;     /* default, written as a --set value */
    limits check;
    const char *help;
} key_spec;

#define KEY(sec, key, type, def, check, help) \
    {#sec "." #key, type, MEMBER(sec.key, type), 0, def, check, help}
#define LIST(sec, key, count, def, check, help) \
    {#sec "." #key, T_FLIST, MEMBER(sec.key, T_FLIST), MEMBER(sec.count, T_INT), def, check, help}

/* The keys of a section, its nested sections' included, must be adjacent:
 * write_yaml opens each section once, where its first key is. */
static const key_spec KEYS[] = {
    KEY(model, name, T_STR, "resnet8-fmnist",
        ONE_OF("resnet8-fmnist|resnet20|resnet32|resnet18|resnet34|resnet50"), "network architecture"),
    KEY(model, zero_init_residual, T_BOOL, "false", ANY,
        "start the last batch-norm scale of each residual block at zero"),

    KEY(data, format, T_STR, "idx", ONE_OF("idx|hdf5"), "dataset file format: idx (MNIST-style files) or hdf5 (shards made by kfac prep)"),
    KEY(data, path, T_STR, "/usr/share/datasets/fashion-mnist", ANY, "folder holding the dataset files"),
    KEY(data, augment, T_BOOL, "true", ANY, "augment training images (data.transform)"),
    KEY(data, transform, T_STR, "pad_crop", ONE_OF("pad_crop|random_resized_crop"),
        "training augmentation: pad_crop (random pad-crop + flip) or random_resized_crop (ImageNet)"),
    KEY(data, pad, T_INT, "2", AT_LEAST(0), "pad-crop padding in pixels"),
    KEY(data, scale_min, T_FLOAT, "0.08", FRACTION, "random_resized_crop: smallest crop area fraction"),
    KEY(data, crop, T_INT, "0", AT_LEAST(0), "side of the square sample the model sees (0: the stored size)"),
    KEY(data, val_resize, T_INT, "0", AT_LEAST(0),
        "evaluation: shorter side scaled to this before the center crop (0: crop only)"),
    LIST(data, mean, num_mean, "[0.2860]", ANY, "normalisation mean of pixel values scaled to [0, 1]: one per channel, or one for all"),
    LIST(data, std, num_std, "[0.3530]", ABOVE(0), "normalisation standard deviation: one per channel, or one for all"),
    KEY(data, loader_threads, T_INT, "0", AT_LEAST(0), "threads decoding and augmenting a batch (0: train.threads on cpu, every core on cuda)"),
    KEY(data, prefetch, T_INT, "2", AT_LEAST(0), "micro-batches prepared ahead on a loader thread (0: read in the step)"),
    KEY(data, stage, T_STR, "none", ONE_OF("none|copy|broadcast"),
        "hdf5: copy the shards to node-local storage first, once per node (broadcast: read once, sent over MPI)"),
    KEY(data, local_dir, T_STR, "", EMPTY_OK, "staging folder (\"\": $SLURM_TMPDIR, else $TMPDIR, else /tmp)"),

    KEY(optimizer, name, T_STR, "sgd", ONE_OF("sgd|kfac"),
        "optimizer (kfac: K-FAC preconditioning, configured by optimizer.kfac, then this SGD)"),
    KEY(optimizer, momentum, T_FLOAT, "0.9", UNIT, "momentum coefficient"),
    KEY(optimizer, nesterov, T_BOOL, "true", ANY, "use Nesterov momentum"),
    KEY(optimizer, weight_decay, T_FLOAT, "5e-4", AT_LEAST(0), "L2 weight decay coefficient"),
    KEY(optimizer, decay_bn_and_bias, T_BOOL, "false", ANY,
        "apply weight decay to batch-norm parameters and biases too"),
    KEY(optimizer.kfac, fisher, T_STR, "empirical", ONE_OF("empirical|sampled"),
        "Fisher estimate: gradients of the real loss (empirical) or of labels sampled from the model "
        "(sampled; one extra backward)"),
    KEY(optimizer.kfac, inverse, T_STR, "eig", ONE_OF("cholesky|eig"),
        "how the damped factors are inverted: Cholesky or eigendecomposition"),
    KEY(optimizer.kfac, exact_kronecker, T_BOOL, "false", ANY,
        "eig only: exact damped Kronecker inverse 1/(d_G d_A + damping) instead of the factored pi-corrected one"),
    KEY(optimizer.kfac, factor_decay, T_FLOAT, "0.95", UNIT,
        "running average of the factors: new = decay * old + (1 - decay) * batch"),
    KEY(optimizer.kfac, factor_interval, T_INT, "10", AT_LEAST(1), "steps between factor refreshes after warm-up"),
    KEY(optimizer.kfac, inverse_interval, T_INT, "10", AT_LEAST(1), "steps between inversions after warm-up"),
    KEY(optimizer.kfac, warmup_steps, T_INT, "20", AT_LEAST(0), "factors and inverses refresh every step before this step"),
    KEY(optimizer.kfac, adaptive_threshold, T_FLOAT, "0", AT_LEAST(0),
        "SP-NGD: >0 doubles a layer's refresh interval while its factors change by less than this "
        "(relative Frobenius) between refreshes"),
    KEY(optimizer.kfac, max_interval, T_INT, "100", AT_LEAST(1), "cap of the adaptive refresh interval"),
    KEY(optimizer.kfac, damping, T_FLOAT, "1e-3", ABOVE(0),
        "Tikhonov damping lambda; damped factors A + pi*sqrt(lambda) I and G + sqrt(lambda)/pi I"),
    KEY(optimizer.kfac, damping_decay, T_FLOAT, "1", FRACTION,
        "lambda(epoch) = max(damping_min, damping * damping_decay^epoch)"),
    KEY(optimizer.kfac, damping_min, T_FLOAT, "0", AT_LEAST(0), "lower bound of the decayed damping"),
    KEY(optimizer.kfac, kl_clip, T_FLOAT, "1e-3", AT_LEAST(0),
        "KL clipping: bound on the size of the preconditioned step (0: off)"),
    KEY(optimizer.kfac, subsample, T_FLOAT, "1", FRACTION, "fraction of each batch used to estimate the factors"),
    KEY(optimizer.kfac, bn, T_STR, "unitwise", ONE_OF("unitwise|diagonal|sgd"),
        "batch-norm layers: unit-wise Fisher (a 2x2 block per channel), a diagonal Fisher, or plain SGD"),
    KEY(optimizer.kfac, exclude, T_STR, "", EMPTY_OK,
        "comma-separated shell patterns of layer names kept on plain SGD, e.g. 'fc,layer1.*'"),

    KEY(schedule, lr, T_FLOAT, "0.1", ABOVE(0), "peak learning rate, reached at the end of warm-up"),
    KEY(schedule, warmup_epochs, T_FLOAT, "1", AT_LEAST(0), "epochs of linear warm-up from warmup_start_lr to lr"),
    KEY(schedule, warmup_start_lr, T_FLOAT, "0", AT_LEAST(0), "learning rate at the start of warm-up"),
    KEY(schedule, decay, T_STR, "cosine", ONE_OF("cosine|poly|step|constant"), "learning-rate decay after warm-up"),
    KEY(schedule, final_lr, T_FLOAT, "0", AT_LEAST(0), "cosine/poly: learning rate at decay_end_epoch"),
    KEY(schedule, poly_power, T_FLOAT, "2", ABOVE(0), "poly: exponent of the decay"),
    KEY(schedule, decay_start_epoch, T_FLOAT, "-1", AT_LEAST(-1), "poly: epoch the decay starts (-1: end of warm-up)"),
    KEY(schedule, decay_end_epoch, T_FLOAT, "-1", AT_LEAST(-1),
        "cosine/poly: epoch the learning rate reaches final_lr (-1: train.epochs)"),
    LIST(schedule, milestones, num_milestones, "[]", AT_LEAST(0),
         "step: increasing epochs at which the learning rate is multiplied by gamma"),
    KEY(schedule, gamma, T_FLOAT, "0.1", ABOVE(0), "step: factor applied at each milestone"),

    KEY(train, epochs, T_INT, "15", AT_LEAST(1), "number of training epochs"),
    KEY(train, batch_size, T_INT, "128", AT_LEAST(1), "training mini-batch size"),
    KEY(train, eval_batch_size, T_INT, "1000", AT_LEAST(1),
        "evaluation batch size (read at once; evaluated in pieces of the training micro-batch)"),
    KEY(train, seed, T_U64, "1", ANY, "random seed (initialisation, shuffling, augmentation)"),
    KEY(train, threads, T_INT, "0", AT_LEAST(0), "compute threads (0: all cores)"),
    KEY(train, device, T_STR, "cpu", ONE_OF("cpu|cuda"),
        "compute backend: cpu, or cuda (the first GPU CUDA_VISIBLE_DEVICES shows; one rank for now; sgd or kfac)"),
    KEY(train, precision, T_STR, "f32", ONE_OF("f32|tf32|bf16|f16"),
        "activation storage: f32, or on cuda tf32 (f32 with TF32 tensor-core convolutions, "
        "PyTorch's default) or bf16 / f16 (float32 weights and arithmetic; f16 with dynamic "
        "loss scaling)"),
    KEY(train, loss_scale, T_FLOAT, "65536", ABOVE(0),
        "f16: the initial loss scale (halved, and the step skipped, when a gradient overflows; "
        "doubled after train.loss_scale_growth good steps)"),
    KEY(train, loss_scale_growth, T_INT, "2000", AT_LEAST(1),
        "f16: good steps in a row after which the loss scale doubles (PyTorch's growth_interval)"),
    KEY(train, label_smoothing, T_FLOAT, "0", UNIT, "label smoothing of the cross-entropy loss"),
    KEY(train, max_steps, T_INT, "0", AT_LEAST(0), "stop after this many steps in total (0: no limit)"),
    KEY(train, precise_bn_images, T_INT, "0", AT_LEAST(0),
        "before each evaluation, recompute BN running statistics over this many training images (0: off)"),
    KEY(train, micro_batches, T_INT, "1", AT_LEAST(1),
        "each rank's share of a batch runs as this many micro-batches whose gradients are summed "
        "(BN statistics are per micro-batch)"),
    KEY(train, cuda_graphs, T_BOOL, "true", ANY,
        "cuda: replay each step's forward, loss and backward from a CUDA graph (one GPU; K-FAC "
        "steps that estimate factors launch every operation; false: always launch every "
        "operation)"),

    KEY(distributed, bucket_mb, T_FLOAT, "25", ABOVE(0), "gradient all-reduce bucket size in MiB"),
    KEY(distributed, overlap, T_BOOL, "true", ANY,
        "start each gradient bucket's all-reduce during backward, as soon as the bucket is final"),
    KEY(distributed, factor_dtype, T_STR, "f32", ONE_OF("f32|f16|bf16"),
        "element type of K-FAC factor traffic between ranks"),
    KEY(distributed, factor_reduce, T_STR, "refresh", ONE_OF("refresh|inverse"),
        "when K-FAC factors are reduced to their owners: at every factor refresh, or only when an "
        "inversion needs them (ranks keep local running averages in between)"),

    KEY(output, dir, T_STR, "runs/job", ANY, "output folder, created if missing"),
    KEY(output, metrics, T_STR, "metrics.jsonl", ANY, "JSON-lines metrics file inside output.dir"),
};
enum { NKEYS = sizeof KEYS / sizeof KEYS[0] };

/* The value of a key inside a job, as a T pointer. */
#define AT(job, offset, T) ((T *)((char *)(job) + (offset)))

/* ---- small helpers ---- */

static char *trim(char *s)
{
    while (isspace((unsigned char)*s)) s++;
    size_t n = strlen(s);
    while (n && isspace((unsigned char)s[n - 1])) s[--n] = '\0';
    return s;
}

/* The section of a key path, "optimizer.kfac" in "optimizer.kfac.damping":
 * its length, and the key's name after it. */
static size_t section_len(const char *path) { return (size_t)(strrchr(path, '.') - path); }
static const char *key_name(const char *path) { return strrchr(path, '.') + 1; }

static int same_section(const char *a, const char *b)
{
    return section_len(a) == section_len(b) && strncmp(a, b, section_len(a)) == 0;
}

/* Whether key `k` lies in section `sec` (`len` bytes; 0: the top level) or
 * in a section nested in it; if so *child is what follows "sec.", and
 * *child_len the length of its first component (a key or a section name). */
static int under(const key_spec *k, const char *sec, size_t len, const char **child, size_t *child_len)
{
    if (len && (strncmp(k->path, sec, len) != 0 || k->path[len] != '.')) return 0;
    *child = k->path + (len ? len + 1 : 0);
    *child_len = strcspn(*child, ".");
    return 1;
}

/* The entry `name` directly inside section `sec` (`len` bytes; 0: the top
 * level): the index of the key, or of the first key of the nested section
 * (*is_section set), or -1 when there is none. */
static int find_child(const char *sec, size_t len, const char *name, int *is_section)
{
    size_t n = strlen(name);
    for (int i = 0; i < NKEYS; i++) {
        const char *child;
        size_t clen;
        if (under(&KEYS[i], sec, len, &child, &clen) && clen == n && strncmp(child, name, n) == 0) {
            *is_section = child[n] == '.';
            return i;
        }
    }
    return -1;
}

static int find_path(const char *path)
{
    for (int i = 0; i < NKEYS; i++)
        if (strcmp(KEYS[i].path, path) == 0) return i;
    assert(!"path is in KEYS");
    return -1;
}

/* "name, momentum, ..., kfac": the keys and nested sections directly inside
 * section `sec` (`len` bytes; 0: the top-level sections), in schema order. */
static void known_names(char *buf, size_t cap, const char *sec, size_t len)
{
    kfac_strbuf sb = kfac__strbuf_init(buf, cap);
    for (int i = 0; i < NKEYS; i++) {
        const char *child, *prev;
        size_t clen, plen;
        if (!under(&KEYS[i], sec, len, &child, &clen)) continue;
        int seen = 0; /* a section's name once, not once per key in it */
        for (int j = 0; j < i && !seen; j++)
            seen = under(&KEYS[j], sec, len, &prev, &plen) && plen == clen && strncmp(prev, child, clen) == 0;
        if (!seen) kfac__strbuf_add(&sb, "%s%.*s", sb.len ? ", " : "", (int)clen, child);
    }
}

/* `name` is not in section `sec` (`len` bytes; 0: not a top-level section). */
static kfac_status unknown_name(const char *prefix, const char *sec, size_t len, const char *name)
{
    char known[1024];
    known_names(known, sizeof known, sec, len);
    if (!len) return KFAC_ERR(KFAC_EINVAL, "%s: unknown section '%s' (known: %s)", prefix, name, known);
    return KFAC_ERR(KFAC_EINVAL, "%s: unknown key '%s' in section '%.*s' (known: %s)", prefix, name, (int)len,
                    sec, known);
}

/* ---- where values come from ---- */

#define WHERE_CAP 1024
#define FROM_SET (-1) /* origin.line of a value given by --set */

/* line > 0: a file position; FROM_SET; 0: the built-in default. */
typedef struct origin {
    int line, col;
} origin;

/* The file being loaded and where each key's current value came from. */
typedef struct source {
    const char *file;
    origin at[NKEYS];
} source;

static const char *format_where(char *buf, const char *file, origin o, const char *path)
{
    if (o.line > 0)
        snprintf(buf, WHERE_CAP, "%s:%d:%d: %s", file, o.line, o.col, path);
    else
        snprintf(buf, WHERE_CAP, "%s%s", o.line == FROM_SET ? "--set " : "", path);
    return buf;
}

/* Message prefix for key `i`; `src` may be NULL (no locations known). */
static const char *key_where(char *buf, const source *src, int i)
{
    return format_where(buf, src ? src->file : NULL, src ? src->at[i] : (origin){0, 0}, KEYS[i].path);
}

/* ---- parsing values ---- */

/* 1 or 0 for the YAML 1.1 boolean words, -1 for anything else. */
static int parse_bool(const char *s)
{
    static const char *const words[] = {"false", "true", "no", "yes", "off", "on", "0", "1"};
    for (size_t i = 0; i < sizeof words / sizeof words[0]; i++)
        if (strcasecmp(s, words[i]) == 0) return (int)(i % 2);
    return -1;
}

/* Parses the whole of `text` as a `type` scalar into `dst`. */
static kfac_status parse_scalar(key_type type, const char *text, void *dst, const char *where)
{
    char *end = NULL;
    errno = 0;
    switch (type) {
    case T_STR:
        if (strlen(text) >= KFAC_JOB_STR)
            return KFAC_ERR(KFAC_EINVAL, "%s: longer than %d characters", where, KFAC_JOB_STR - 1);
        strncpy(dst, text, KFAC_JOB_STR); /* zero-fills the rest: equal jobs are equal bytes */
        return KFAC_OK;
    case T_BOOL: {
        int v = parse_bool(text);
        if (v < 0) break;
        *(int *)dst = v;
        return KFAC_OK;
    }
    case T_INT: {
        long long v = strtoll(text, &end, 10);
        if (end == text || *end || errno || v < INT_MIN || v > INT_MAX) break;
        *(int *)dst = (int)v;
        return KFAC_OK;
    }
    case T_U64: {
        unsigned long long v = strtoull(text, &end, 10);
        if (!isdigit((unsigned char)text[0]) || *end || errno) break; /* strtoull takes "-1" */
        *(uint64_t *)dst = v;
        return KFAC_OK;
    }
    case T_FLOAT: {
        float v = strtof(text, &end); /* strtof, not strtod: the value write_yaml prints reads back */
        if (end == text || *end || errno || !isfinite(v)) break;
        *(float *)dst = v;
        return KFAC_OK;
    }
    case T_FLIST:
        assert(!"lists are parsed item by item");
        break;
    }
    return KFAC_ERR(KFAC_EINVAL, "%s: expected %s, got '%s'", where, TYPES[type].expect, text);
}

static void list_clear(kfac_job *job, const key_spec *k)
{
    memset(AT(job, k->offset, float), 0, TYPE_SIZE(T_FLIST));
    *AT(job, k->count_offset, int) = 0;
}

static kfac_status list_push(kfac_job *job, const key_spec *k, const char *text, const char *where)
{
    int *count = AT(job, k->count_offset, int);
    float v = 0;
    if (*count == KFAC_JOB_MAX_MILESTONES)
        return KFAC_ERR(KFAC_EINVAL, "%s: more than %d items", where, KFAC_JOB_MAX_MILESTONES);
    KFAC_TRY(parse_scalar(T_FLOAT, text, &v, where));
    AT(job, k->offset, float)[(*count)++] = v;
    return KFAC_OK;
}

/* Sets key `k` from a --set value (also the syntax of the defaults): a
 * scalar, or for lists "[30, 60]", "30,60", "[]" or "". */
static kfac_status set_from_text(kfac_job *job, const key_spec *k, const char *text, const char *where)
{
    char buf[1024];
    if (strlen(text) >= sizeof buf)
        return KFAC_ERR(KFAC_EINVAL, "%s: value longer than %zu characters", where, sizeof buf - 1);
    char *s = trim(strcpy(buf, text));
    if (k->type != T_FLIST) return parse_scalar(k->type, s, AT(job, k->offset, void), where);

    size_t n = strlen(s);
    if (n >= 2 && s[0] == '[' && s[n - 1] == ']') {
        s[n - 1] = '\0';
        s = trim(s + 1);
    }
    list_clear(job, k);
    if (!*s) return KFAC_OK;
    for (char *item = s, *comma; item; item = comma ? comma + 1 : NULL) {
        if ((comma = strchr(item, ','))) *comma = '\0';
        KFAC_TRY(list_push(job, k, trim(item), where));
    }
    return KFAC_OK;
}

static kfac_status expect_kind(const ytree *node, ytree_kind want, key_type type, const char *where)
{
    if (node->kind == want) return KFAC_OK;
    return KFAC_ERR(KFAC_EINVAL, "%s: expected %s, got %s", where, TYPES[type].expect,
                    ytree_kind_name(node->kind));
}

/* Sets key `k` from its value node in `file`. */
static kfac_status set_from_node(kfac_job *job, const key_spec *k, const ytree *value, const char *file)
{
    char w[WHERE_CAP];
    format_where(w, file, (origin){value->line, value->col}, k->path);
    if (k->type != T_FLIST) {
        KFAC_TRY(expect_kind(value, YTREE_SCALAR, k->type, w));
        return parse_scalar(k->type, value->text, AT(job, k->offset, void), w);
    }
    list_clear(job, k);
    if (value->kind == YTREE_SCALAR) /* one number is a list of one */
        return list_push(job, k, value->text, w);
    KFAC_TRY(expect_kind(value, YTREE_LIST, k->type, w));
    for (int j = 0; j < value->n; j++) {
        const ytree *item = value->kids[j];
        format_where(w, file, (origin){item->line, item->col}, k->path);
        KFAC_TRY(expect_kind(item, YTREE_SCALAR, T_FLOAT, w));
        KFAC_TRY(list_push(job, k, item->text, w));
    }
    return KFAC_OK;
}

/* ---- applying a file and overrides ---- */

/* Section names and keys must be plain strings, not lists or mappings. */
static kfac_status expect_name(const ytree *key, const char *file)
{
    if (key->kind == YTREE_SCALAR) return KFAC_OK;
    return KFAC_ERR(KFAC_EINVAL, "%s:%d:%d: expected a key name, got %s", file, key->line, key->col,
                    ytree_kind_name(key->kind));
}

static kfac_status apply_section(kfac_job *job, const char *sec, const ytree *body, source *src);

/* Applies mapping `body`, the contents of section `sec` (`len` bytes; 0: the
 * whole file), whose entries are keys or nested sections. */
static kfac_status apply_map(kfac_job *job, const char *sec, size_t len, const ytree *body, source *src)
{
    for (int j = 0; j < body->n; j++) {
        const ytree *key = body->kids[2 * j], *value = body->kids[2 * j + 1];
        KFAC_TRY(expect_name(key, src->file));
        int is_section = 0, i = find_child(sec, len, key->text, &is_section);
        if (i < 0) {
            char prefix[WHERE_CAP];
            snprintf(prefix, sizeof prefix, "%s:%d:%d", src->file, key->line, key->col);
            return unknown_name(prefix, sec, len, key->text);
        }
        if (is_section) {
            /* fits: the name matched part of a key path, and those are short */
            char nested[KFAC_JOB_STR];
            snprintf(nested, sizeof nested, "%.*s%s%s", (int)len, sec, len ? "." : "", key->text);
            KFAC_TRY(apply_section(job, nested, value, src));
            continue;
        }
        src->at[i] = (origin){value->line, value->col};
        KFAC_TRY(set_from_node(job, &KEYS[i], value, src->file));
    }
    return KFAC_OK;
}

/* Applies `body`, the value of section `sec` ("optimizer", "optimizer.kfac"). */
static kfac_status apply_section(kfac_job *job, const char *sec, const ytree *body, source *src)
{
    if (ytree_is_null(body)) return KFAC_OK; /* "optimizer:" with every key commented out */
    if (body->kind != YTREE_MAP)
        return KFAC_ERR(KFAC_EINVAL, "%s:%d:%d: section '%s' must be a mapping of keys, got %s", src->file,
                        body->line, body->col, sec, ytree_kind_name(body->kind));
    return apply_map(job, sec, strlen(sec), body, src);
}

static kfac_status apply_tree(kfac_job *job, const ytree *root, source *src)
{
    if (!root || ytree_is_null(root)) return KFAC_OK; /* empty file: all defaults */
    if (root->kind != YTREE_MAP) {
        char known[512];
        known_names(known, sizeof known, "", 0);
        return KFAC_ERR(KFAC_EINVAL, "%s:%d:%d: expected a mapping of sections (%s), got %s", src->file,
                        root->line, root->col, known, ytree_kind_name(root->kind));
    }
    return apply_map(job, "", 0, root, src);
}

/* Why `path` names no key: walks it from the top level to the first part
 * that is unknown, a key with more after it, or a section at the end. */
static kfac_status bad_path(const char *prefix, const char *path)
{
    char name[256], known[1024];
    for (size_t len = 0;;) { /* path[0, len) is a known section */
        const char *part = path + (len ? len + 1 : 0);
        size_t n = strcspn(part, ".");
        snprintf(name, sizeof name, "%.*s", (int)n, part);
        int is_section = 0;
        if (find_child(path, len, name, &is_section) < 0) return unknown_name(prefix, path, len, name);
        size_t end = (size_t)(part - path) + n;
        if (!is_section)
            return KFAC_ERR(KFAC_EINVAL, "%s: '%.*s' is a key, not a section", prefix, (int)end, path);
        if (!part[n]) {
            known_names(known, sizeof known, path, end);
            return KFAC_ERR(KFAC_EINVAL, "%s: '%s' is a section, not a key (its keys: %s)", prefix, path, known);
        }
        len = end;
    }
}

/* Applies one "section.key=value" override. */
static kfac_status apply_set(kfac_job *job, const char *set, source *src)
{
    char path[256], prefix[WHERE_CAP];
    const char *eq = strchr(set, '=');
    size_t n = eq ? (size_t)(eq - set) : 0;
    if (n >= sizeof path) n = sizeof path - 1; /* too long for any key: reported as unknown */
    memcpy(path, set, n);
    path[n] = '\0';
    char *p = trim(path);
    if (!eq || !strchr(p, '.')) return KFAC_ERR(KFAC_EINVAL, "--set '%s': expected section.key=value", set);

    snprintf(prefix, sizeof prefix, "--set %s", p);
    int i = 0;
    while (i < NKEYS && strcmp(KEYS[i].path, p) != 0) i++;
    if (i == NKEYS) return bad_path(prefix, p);
    src->at[i] = (origin){FROM_SET, 0};
    return set_from_text(job, &KEYS[i], eq + 1, prefix);
}

/* ---- validation ---- */

/* "in [0, 1)", ">= 1", "one of a|b", or "" when anything goes. */
static const char *limits_text(char *buf, size_t cap, const limits *l)
{
    if (l->one_of)
        snprintf(buf, cap, "one of %s", l->one_of);
    else if (isinf(l->lo) && isinf(l->hi))
        buf[0] = '\0';
    else if (isinf(l->hi))
        snprintf(buf, cap, "%s %g", l->lo_open ? ">" : ">=", l->lo);
    else
        snprintf(buf, cap, "in %c%g, %g%c", l->lo_open ? '(' : '[', l->lo, l->hi, l->hi_open ? ')' : ']');
    return buf;
}

static kfac_status check_number(double v, const limits *l, const char *where)
{
    char range[64];
    if (!isfinite(v)) return KFAC_ERR(KFAC_EINVAL, "%s: must be a finite number, got %g", where, v);
    if ((v > l->lo || (v == l->lo && !l->lo_open)) && (v < l->hi || (v == l->hi && !l->hi_open)))
        return KFAC_OK;
    return KFAC_ERR(KFAC_EINVAL, "%s: must be %s, got %g", where, limits_text(range, sizeof range, l), v);
}

static int is_one_of(const char *s, const char *words)
{
    size_t n = strlen(s);
    for (const char *w = words; w; w = strchr(w, '|') ? strchr(w, '|') + 1 : NULL)
        if (strncmp(w, s, n) == 0 && (w[n] == '|' || w[n] == '\0')) return 1;
    return 0;
}

static kfac_status check_string(const char *s, const limits *l, const char *where)
{
    if (!s[0] && !l->empty_ok) return KFAC_ERR(KFAC_EINVAL, "%s: must not be empty", where);
    if (l->one_of && !is_one_of(s, l->one_of))
        return KFAC_ERR(KFAC_EINVAL, "%s: must be one of %s, got '%s'", where, l->one_of, s);
    return KFAC_OK;
}

/* Checks key `i` of `job` against its limits. */
static kfac_status check_key(const kfac_job *job, int i, const source *src)
{
    const key_spec *k = &KEYS[i];
    char w[WHERE_CAP];
    key_where(w, src, i);
    switch (k->type) {
    case T_STR: return check_string(AT(job, k->offset, const char), &k->check, w);
    case T_INT: return check_number(*AT(job, k->offset, const int), &k->check, w);
    case T_FLOAT: return check_number(*AT(job, k->offset, const float), &k->check, w);
    case T_BOOL:
    case T_U64: return KFAC_OK;
    case T_FLIST: {
        int count = *AT(job, k->count_offset, const int);
        if (count < 0 || count > KFAC_JOB_MAX_MILESTONES)
            return KFAC_ERR(KFAC_EINVAL, "%s: item count %d is not in [0, %d]", w, count,
                            KFAC_JOB_MAX_MILESTONES);
        for (int j = 0; j < count; j++)
            KFAC_TRY(check_number(AT(job, k->offset, const float)[j], &k->check, w));
        return KFAC_OK;
    }
    }
    return KFAC_OK;
}

/* Constraints between keys, checked after every key passed its own. */
static kfac_status check_data(const kfac_job *job, const source *src)
{
    char w[WHERE_CAP];
    /* The channel count is the dataset's, so only emptiness is known here. */
    if (job->data.num_mean < 1)
        return KFAC_ERR(KFAC_EINVAL, "%s: needs one value, or one per channel",
                        key_where(w, src, find_path("data.mean")));
    if (job->data.num_std < 1)
        return KFAC_ERR(KFAC_EINVAL, "%s: needs one value, or one per channel",
                        key_where(w, src, find_path("data.std")));
    return KFAC_OK;
}

static kfac_status check_schedule(const kfac_job *job, const source *src)
{
    const float *m = job->schedule.milestones;
    float start = job->schedule.decay_start_epoch, end = job->schedule.decay_end_epoch;
    char w[WHERE_CAP];
    for (int j = 1; j < job->schedule.num_milestones; j++)
        if (!(m[j] > m[j - 1]))
            return KFAC_ERR(KFAC_EINVAL, "%s: must be increasing, got %g after %g",
                            key_where(w, src, find_path("schedule.milestones")), m[j], m[j - 1]);
    /* only explicit epochs: -1 stands for warm-up end / train.epochs, resolved by the schedule */
    if (start >= 0 && end >= 0 && end <= start)
        return KFAC_ERR(KFAC_EINVAL, "%s: must be after decay_start_epoch (%g), got %g",
                        key_where(w, src, find_path("schedule.decay_end_epoch")), start, end);
    return KFAC_OK;
}

static kfac_status validate(const kfac_job *job, const source *src)
{
    for (int i = 0; i < NKEYS; i++) KFAC_TRY(check_key(job, i, src));
    KFAC_TRY(check_data(job, src));
    return check_schedule(job, src);
}

/* ---- public API ---- */

void kfac_job_defaults(kfac_job *job)
{
    memset(job, 0, sizeof *job);
    for (int i = 0; i < NKEYS; i++) {
        kfac_status st = set_from_text(job, &KEYS[i], KEYS[i].def, KEYS[i].path);
        assert(st == KFAC_OK && "every default in KEYS parses (tests/test_job.c checks)");
        (void)st;
    }
}

kfac_status kfac_job_load(kfac_job *job, const char *path, int nset, const char *const *sets)
{
    kfac_job loaded; /* `job` is written only on success */
    source src = {.file = path};
    kfac_job_defaults(&loaded);
    if (path) {
        ytree *root;
        KFAC_TRY(ytree_load(path, &root));
        kfac_status st = apply_tree(&loaded, root, &src);
        ytree_free(root);
        KFAC_TRY(st);
    }
    for (int i = 0; i < nset; i++) KFAC_TRY(apply_set(&loaded, sets[i], &src));
    /* validated last, so a --set can repair a bad file value */
    KFAC_TRY(validate(&loaded, &src));
    *job = loaded;
    return KFAC_OK;
}

kfac_status kfac_job_validate(const kfac_job *job) { return validate(job, NULL); }

/* The shortest %g text that reads back (strtof) as the same float, so
 * 0.1f prints as "0.1" rather than "0.100000001". */
static void add_float(kfac_strbuf *sb, float v)
{
    char buf[32];
    for (int digits = 6; digits <= 9; digits++) {
        snprintf(buf, sizeof buf, "%.*g", digits, v);
        if (strtof(buf, NULL) == v) break;
    }
    kfac__strbuf_add(sb, "%s", buf);
}

/* Double-quoted so that any string (':', '#', leading spaces) round-trips. */
static void add_quoted(kfac_strbuf *sb, const char *s)
{
    kfac__strbuf_add(sb, "\"");
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            kfac__strbuf_add(sb, "\\%c", c);
        else if (c < 0x20 || c == 0x7f)
            kfac__strbuf_add(sb, "\\x%02x", c);
        else
            kfac__strbuf_add(sb, "%c", c);
    }
    kfac__strbuf_add(sb, "\"");
}

/* Key `k`'s value in `job` as YAML. */
static void add_value(kfac_strbuf *sb, const kfac_job *job, const key_spec *k)
{
    switch (k->type) {
    case T_STR: add_quoted(sb, AT(job, k->offset, const char)); break;
    case T_INT: kfac__strbuf_add(sb, "%d", *AT(job, k->offset, const int)); break;
    case T_BOOL: kfac__strbuf_add(sb, "%s", *AT(job, k->offset, const int) ? "true" : "false"); break;
    case T_FLOAT: add_float(sb, *AT(job, k->offset, const float)); break;
    case T_U64: kfac__strbuf_add(sb, "%" PRIu64, *AT(job, k->offset, const uint64_t)); break;
    case T_FLIST:
        kfac__strbuf_add(sb, "[");
        for (int j = 0; j < *AT(job, k->count_offset, const int); j++) {
            kfac__strbuf_add(sb, "%s", j ? ", " : "");
            add_float(sb, AT(job, k->offset, const float)[j]);
        }
        kfac__strbuf_add(sb, "]");
        break;
    }
}

kfac_status kfac_job_write_yaml(const kfac_job *job, const char *path)
{
    FILE *f = fopen(path, "w");
    if (!f) return KFAC_ERR(KFAC_EIO, "%s: cannot open for writing: %s", path, strerror(errno));
    fprintf(f, "# kfac job, resolved: built-in defaults < job file < --set\n");
    for (int i = 0; i < NKEYS; i++) {
        char value[4 * KFAC_JOB_STR + 16]; /* the longest string, every byte escaped */
        kfac_strbuf sb = kfac__strbuf_init(value, sizeof value);
        add_value(&sb, job, &KEYS[i]);
        /* open the parts of this key's section that the previous key's did not share */
        const char *kpath = KEYS[i].path, *prev = i ? KEYS[i - 1].path : "";
        size_t len = section_len(kpath), prev_len = i ? section_len(prev) : 0;
        int depth = 0, shared = 1;
        for (size_t at = 0; at < len; at += strcspn(kpath + at, ".") + 1, depth++) {
            size_t n = strcspn(kpath + at, ".");
            shared = shared && at + n <= prev_len && strncmp(prev + at, kpath + at, n) == 0 &&
                     (at + n == prev_len || prev[at + n] == '.');
            if (shared) continue;
            fprintf(f, "%s%*s%.*s:\n", i && !depth ? "\n" : "", 2 * depth, "", (int)n, kpath + at);
        }
        fprintf(f, "%*s%s: %s\n", 2 * depth, "", key_name(kpath), value);
    }
    int failed = ferror(f);
    failed |= fclose(f) != 0;
    if (failed) return KFAC_ERR(KFAC_EIO, "%s: write failed: %s", path, strerror(errno));
    return KFAC_OK;
}

int kfac_job_describe(char *out, int cap)
{
    kfac_strbuf sb = kfac__strbuf_init(out, cap > 0 ? (size_t)cap : 0);
    for (int i = 0; i < NKEYS; i++) {
        const key_spec *k = &KEYS[i];
        char range[128];
        limits_text(range, sizeof range, &k->check);
        kfac__strbuf_add(&sb, "%s%s (%s, default %s%s%s)\n    %s\n", i && !same_section(KEYS[i - 1].path, k->path) ? "\n" : "",
               k->path, TYPES[k->type].name, k->def[0] ? k->def : "\"\"", range[0] ? ", " : "", range, k->help);
    }
    return (int)sb.len;
}
