/* model.c - the model graph: building, memory planning, forward, backward.
 *
 * A model is a list of nodes in execution order over a table of values
 * (tensors).  Each value has an activation buffer and a gradient buffer in
 * one arena (shared where lifetimes allow: see "memory plan"); parameters,
 * their gradients and BN running statistics live in a second single
 * allocation.  Backward walks the nodes in reverse; a value
 * read by two nodes (a residual block's input) has its gradient written by
 * the first and accumulated into by the second.
 *
 * Activations and their gradients are stored in the backend's act_dtype;
 * with a 16-bit type the caller still fills a float32 input buffer, which
 * each forward converts into value 0. */
#include <math.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kfac/kfac_model.h"
#include "kfac/kfac_rng.h"

/* Eval-mode forward runs all layers on groups of images whose largest
 * activation fits in this many bytes, so they stay in cache. */
#define EVAL_CHUNK_BYTES (256 * 1024)
#define BN_MOMENTUM 0.1f /* as PyTorch: running = 0.9 running + 0.1 batch */
#define BN_EPS 1e-5f

typedef struct value {
    int h, w, c;         /* per-image shape */
    float *data, *grad;  /* max_batch images each, in the backend's act_dtype */
    int grad_written;    /* during backward: has a consumer written grad yet */
} value;

typedef struct node {
    kfac_node_kind kind;
    char name[64];
    int in[2], out;
    int param[2];        /* conv/fc: weight, bias; bn: gamma, beta (-1: none) */
    int relu;            /* bn/add: fused ReLU */
    kfac_conv_desc conv; /* conv/fc geometry at max_batch */
    kfac_pool_desc pool;
    size_t stats_offset; /* bn: running mean at +0, var at +c in buffers */
    float *save_mean, *save_invstd;
    int zero_gamma;
} node;

struct kfac_model {
    kfac_backend *be;
    int max_batch;
    size_t act_size;     /* bytes of one activation element (be->act_dtype) */
    float *input32;      /* float32 input the caller fills when act_dtype is 16-bit */
    float *own_input;    /* the input buffer in the arena (kfac_model_bind_input may
                            point the model at another) */
    float loss_scale;    /* multiplies the logits' gradient (fp16 loss scaling) */
    value *values;
    node *nodes;
    kfac_param *params;
    int num_values, num_nodes, num_params;
    size_t param_count, buffer_count;
    float *params_data, *grads_data, *buffers_data; /* one allocation */
    void *arena;
    kfac_model_memory mem;
    void *workspace;
    size_t workspace_bytes;
    kfac_status build_status; /* first failure while building */
    kfac_backward_hook hook;
    void *hook_user;
    float bn_momentum;
    int32_t *sampled_labels;  /* max_batch labels for kfac_model_loss_sampled */
    int32_t *labels;          /* backend memory: max_batch labels the loss reads */
    float *host_logits;       /* max_batch x classes, its host copy of the logits */
    uint16_t *host_logits16;  /* the same as stored, with 16-bit activations */
    int finalized;
    int inference_only;       /* forwards only: see kfac_model_set_inference_only */
    int keep_activations;     /* see kfac_model_set_keep_activations */
    double macs;
};

static size_t value_floats(const value *v) { return (size_t)v->h * v->w * v->c; }

/* ---- building ---- */

static int fail(kfac_model *m, kfac_status st)
{
    if (m->build_status == KFAC_OK) m->build_status = st;
    return -1;
}

static int add_value(kfac_model *m, int h, int w, int c)
{
    value *grown = realloc(m->values, (size_t)(m->num_values + 1) * sizeof *grown);
    if (!grown) return fail(m, KFAC_ERR(KFAC_ENOMEM, "model: out of memory"));
    m->values = grown;
    m->values[m->num_values] = (value){.h = h, .w = w, .c = c};
    return m->num_values++;
}

static int add_param(kfac_model *m, const char *node_name, const char *suffix,
                     kfac_param_kind kind, size_t count)
{
    kfac_param *grown = realloc(m->params, (size_t)(m->num_params + 1) * sizeof *grown);
    if (!grown) return fail(m, KFAC_ERR(KFAC_ENOMEM, "model: out of memory"));
    m->params = grown;
    kfac_param *p = &m->params[m->num_params];
    snprintf(p->name, sizeof p->name, "%s.%s", node_name, suffix);
    p->kind = kind;
    p->offset = m->param_count;
    p->count = count;
    m->param_count += count;
    return m->num_params++;
}

/* Appends a node reading a (and b) and producing a new value of the given
 * shape; returns the node or NULL after recording a failure. */
static node *add_node(kfac_model *m, kfac_node_kind kind, const char *name, int a, int b, int h,
                      int w, int c)
{
    if (m->build_status != KFAC_OK) return NULL;
    if (m->finalized) {
        fail(m, KFAC_ERR(KFAC_EINVAL, "model: layer added after finalize"));
        return NULL;
    }
    if (a < 0 || a >= m->num_values || b >= m->num_values) {
        fail(m, KFAC_ERR(KFAC_EINVAL, "model: layer '%s' reads an unknown value", name));
        return NULL;
    }
    if (h < 1 || w < 1 || c < 1) {
        fail(m, KFAC_ERR(KFAC_EINVAL, "model: layer '%s' would output %dx%dx%d", name, h, w, c));
        return NULL;
    }
    int out = add_value(m, h, w, c);
    if (out < 0) return NULL;
    node *grown = realloc(m->nodes, (size_t)(m->num_nodes + 1) * sizeof *grown);
    if (!grown) {
        fail(m, KFAC_ERR(KFAC_ENOMEM, "model: out of memory"));
        return NULL;
    }
    m->nodes = grown;
    node *nd = &m->nodes[m->num_nodes++];
    memset(nd, 0, sizeof *nd);
    nd->kind = kind;
    snprintf(nd->name, sizeof nd->name, "%s", name);
    nd->in[0] = a;
    nd->in[1] = b;
    nd->out = out;
    nd->param[0] = nd->param[1] = -1;
    return nd;
}

kfac_status kfac_model_init(kfac_model **out, kfac_backend *be, int max_batch, int h, int w,
                            int c)
{
    *out = NULL;
    if (max_batch < 1 || h < 1 || w < 1 || c < 1)
        return KFAC_ERR(KFAC_EINVAL, "model: bad input batch %d x %dx%dx%d", max_batch, h, w, c);
    kfac_model *m = calloc(1, sizeof *m);
    if (!m) return KFAC_ERR(KFAC_ENOMEM, "model: out of memory");
    m->be = be;
    m->max_batch = max_batch;
    m->act_size = kfac_dtype_size(be->act_dtype);
    m->loss_scale = 1.0f;
    m->bn_momentum = BN_MOMENTUM;
    if (add_value(m, h, w, c) != 0) {
        free(m);
        return KFAC_ERR(KFAC_ENOMEM, "model: out of memory");
    }
    *out = m;
    return KFAC_OK;
}

int kfac_model_conv(kfac_model *m, int x, int out_channels, int ksize, int stride, int pad,
                    const char *name)
{
    if (x < 0 || x >= m->num_values) return fail(m, KFAC_ERR(KFAC_EINVAL, "conv '%s': bad input", name));
    const value in = m->values[x]; /* a copy: add_node may move the table */
    kfac_conv_desc d;
    kfac_conv_desc_init(&d, m->max_batch, in.h, in.w, in.c, out_channels, ksize, ksize, stride,
                        pad);
    node *nd = add_node(m, KFAC_NODE_CONV, name, x, -1, d.ho, d.wo, out_channels);
    if (!nd) return -1;
    nd->conv = d;
    nd->param[0] = add_param(m, name, "weight", KFAC_PARAM_WEIGHT,
                             (size_t)out_channels * ksize * ksize * in.c);
    m->macs += (double)d.ho * d.wo * out_channels * ksize * ksize * in.c;
    return nd->out;
}

int kfac_model_fc(kfac_model *m, int x, int out_features, const char *name)
{
    if (x < 0 || x >= m->num_values) return fail(m, KFAC_ERR(KFAC_EINVAL, "fc '%s': bad input", name));
    const value in = m->values[x]; /* a copy: add_node may move the table */
    if (in.h != 1 || in.w != 1)
        return fail(m, KFAC_ERR(KFAC_EINVAL, "fc '%s': input is %dx%dx%d, expected 1x1xC (pool first)",
                                name, in.h, in.w, in.c));
    int c = in.c;
    node *nd = add_node(m, KFAC_NODE_FC, name, x, -1, 1, 1, out_features);
    if (!nd) return -1;
    kfac_conv_desc_init(&nd->conv, m->max_batch, 1, 1, c, out_features, 1, 1, 1, 0);
    nd->param[0] = add_param(m, name, "weight", KFAC_PARAM_WEIGHT, (size_t)out_features * c);
    nd->param[1] = add_param(m, name, "bias", KFAC_PARAM_BIAS, (size_t)out_features);
    m->macs += (double)out_features * c;
    return nd->out;
}

int kfac_model_bn(kfac_model *m, int x, int relu, const char *name)
{
    if (x < 0 || x >= m->num_values) return fail(m, KFAC_ERR(KFAC_EINVAL, "bn '%s': bad input", name));
    const value in = m->values[x]; /* a copy: add_node may move the table */
    node *nd = add_node(m, KFAC_NODE_BN, name, x, -1, in.h, in.w, in.c);
    if (!nd) return -1;
    int c = m->values[x].c;
    nd->relu = relu;
    nd->param[0] = add_param(m, name, "weight", KFAC_PARAM_BN, (size_t)c);
    nd->param[1] = add_param(m, name, "bias", KFAC_PARAM_BN, (size_t)c);
    nd->stats_offset = m->buffer_count;
    m->buffer_count += 2 * (size_t)c;
    return nd->out;
}

int kfac_model_relu(kfac_model *m, int x)
{
    if (x < 0 || x >= m->num_values) return fail(m, KFAC_ERR(KFAC_EINVAL, "relu: bad input"));
    const value in = m->values[x]; /* a copy: add_node may move the table */
    node *nd = add_node(m, KFAC_NODE_RELU, "relu", x, -1, in.h, in.w, in.c);
    return nd ? nd->out : -1;
}

int kfac_model_maxpool(kfac_model *m, int x, int ksize, int stride, int pad)
{
    if (x < 0 || x >= m->num_values) return fail(m, KFAC_ERR(KFAC_EINVAL, "maxpool: bad input"));
    const value in = m->values[x]; /* a copy: add_node may move the table */
    kfac_pool_desc d;
    kfac_pool_desc_init(&d, m->max_batch, in.h, in.w, in.c, ksize, stride, pad);
    if (pad >= ksize) return fail(m, KFAC_ERR(KFAC_EINVAL, "maxpool: padding %d >= kernel %d", pad, ksize));
    node *nd = add_node(m, KFAC_NODE_MAXPOOL, "maxpool", x, -1, d.ho, d.wo, in.c);
    if (!nd) return -1;
    nd->pool = d;
    return nd->out;
}

int kfac_model_gap(kfac_model *m, int x)
{
    if (x < 0 || x >= m->num_values) return fail(m, KFAC_ERR(KFAC_EINVAL, "gap: bad input"));
    node *nd = add_node(m, KFAC_NODE_GAP, "gap", x, -1, 1, 1, m->values[x].c);
    return nd ? nd->out : -1;
}

int kfac_model_add(kfac_model *m, int a, int b, int relu)
{
    if (a < 0 || b < 0 || a >= m->num_values || b >= m->num_values)
        return fail(m, KFAC_ERR(KFAC_EINVAL, "add: bad input"));
    const value *va = &m->values[a], *vb = &m->values[b];
    if (va->h != vb->h || va->w != vb->w || va->c != vb->c)
        return fail(m, KFAC_ERR(KFAC_EINVAL, "add: shapes %dx%dx%d and %dx%dx%d differ", va->h,
                                va->w, va->c, vb->h, vb->w, vb->c));
    node *nd = add_node(m, KFAC_NODE_ADD, "add", a, b, va->h, va->w, va->c);
    if (!nd) return -1;
    nd->relu = relu;
    return nd->out;
}

kfac_status kfac_model_zero_init_gamma(kfac_model *m, int bn_out)
{
    for (int i = 0; i < m->num_nodes; i++)
        if (m->nodes[i].out == bn_out && m->nodes[i].kind == KFAC_NODE_BN) {
            m->nodes[i].zero_gamma = 1;
            return KFAC_OK;
        }
    return KFAC_ERR(KFAC_EINVAL, "model: value %d is not the output of a batch norm", bn_out);
}

/* ---- finalize: memory plan and initialisation ---- */

/* Initialises parameters and BN statistics into host arrays `params` and
 * `buffers` (the backend's memory may be a device's). */
static void init_params(const kfac_model *m, uint64_t seed, float *params, float *buffers)
{
    kfac_rng rng;
    kfac_rng_seed(&rng, seed);
    for (int i = 0; i < m->num_nodes; i++) {
        const node *nd = &m->nodes[i];
        if (nd->param[0] < 0) continue;
        const kfac_param *w = &m->params[nd->param[0]];
        float *pw = params + w->offset;
        if (nd->kind == KFAC_NODE_CONV) {
            /* Kaiming normal, fan_out mode: std = sqrt(2 / (k*kh*kw)). */
            double sd = sqrt(2.0 / ((double)nd->conv.k * nd->conv.kh * nd->conv.kw));
            for (size_t j = 0; j < w->count; j++) pw[j] = (float)(sd * kfac_rng_normal(&rng));
        } else if (nd->kind == KFAC_NODE_FC) {
            double bound = 1.0 / sqrt((double)nd->conv.c);
            const kfac_param *b = &m->params[nd->param[1]];
            for (size_t j = 0; j < w->count; j++)
                pw[j] = (float)(bound * (2.0 * kfac_rng_uniform(&rng) - 1.0));
            for (size_t j = 0; j < b->count; j++)
                params[b->offset + j] = (float)(bound * (2.0 * kfac_rng_uniform(&rng) - 1.0));
        } else if (nd->kind == KFAC_NODE_BN) {
            const kfac_param *b = &m->params[nd->param[1]];
            for (size_t j = 0; j < w->count; j++) pw[j] = nd->zero_gamma ? 0.0f : 1.0f;
            for (size_t j = 0; j < b->count; j++) params[b->offset + j] = 0.0f;
            float *stats = buffers + nd->stats_offset;
            for (size_t j = 0; j < w->count; j++) {
                stats[j] = 0.0f;            /* running mean */
                stats[w->count + j] = 1.0f; /* running var */
            }
        }
    }
}

static size_t round_bytes(size_t bytes) { return (bytes + 63) / 64 * 64; }

/* ---- memory plan ----
 *
 * One timeline covers a training step: forward of node i at step i, the
 * loss at step N (N nodes), backward of node i at step 2N - i.  Every
 * buffer of the arena but a few fixed ones lives over an interval of it,
 * and buffers whose intervals do not overlap share memory:
 *  - an activation lives from its producer to its last reader.  Backward
 *    (and so K-FAC's capture, which reads what backward reads) reads the
 *    input of a conv, fc, bn or max pool, and the output of a relu or max
 *    pool, or of a bn or add with a fused ReLU (its mask); an activation
 *    no backward reads -- in a ResNet each branch's last bn, read only by
 *    its add -- is dead once its last forward reader has run;
 *  - a value's gradient lives from its last consumer's backward (the
 *    logits': the loss) to its producer's backward.
 * So gradients reuse the memory of activations whose backward readers are
 * done, as an autograd engine frees them.  A model set to keep its
 * activations (kfac_model_set_keep_activations: a second backward over
 * the same forward) holds every activation backward reads to the end of
 * the step.  Fixed for the whole step: the input (callers fill it, and may
 * bind another), the logits (read after the step), the float32 input and
 * the BN save buffers.  An eval forward outside a step only meets
 * activations, which never share memory while both can be live.
 *
 * Arena: [ input | logits | float32 input | BN saves | shared slots ] */

/* Whether a node's backward reads its input's (in[0]'s) and its output's
 * activation; an add's backward reads neither input. */
static int backward_reads_input(const node *nd)
{
    return nd->kind == KFAC_NODE_CONV || nd->kind == KFAC_NODE_FC || nd->kind == KFAC_NODE_BN ||
           nd->kind == KFAC_NODE_MAXPOOL;
}

static int backward_reads_output(const node *nd)
{
    return nd->kind == KFAC_NODE_RELU || nd->kind == KFAC_NODE_MAXPOOL ||
           ((nd->kind == KFAC_NODE_BN || nd->kind == KFAC_NODE_ADD) && nd->relu);
}

static size_t act_bytes(const kfac_model *m, int v)
{
    return round_bytes((size_t)m->max_batch * value_floats(&m->values[v]) * m->act_size);
}

/* Extends buffer b's interval to step t. */
static void live_until(int *last, int b, int t)
{
    if (t > last[b]) last[b] = t;
}

/* The intervals of the shared buffers: buffer v < nv is value v's
 * activation, nv + v its gradient; need 0: not shared (fixed, or none).
 * reads[v]: does a backward read value v's activation? */
static void lifetimes(const kfac_model *m, unsigned char *reads, size_t *need, int *first,
                      int *last)
{
    const int nv = m->num_values, n = m->num_nodes, end = 2 * n;
    const int training = !m->inference_only;
    for (int b = 0; b < 2 * nv; b++) {
        need[b] = 0;
        first[b] = b < nv ? -1 : end + 1;
        last[b] = -1;
    }
    memset(reads, 0, (size_t)nv);
    for (int i = 0; i < n; i++) {
        const node *nd = &m->nodes[i];
        const int bwd = end - i, held = m->keep_activations ? end : bwd;
        need[nd->out] = act_bytes(m, nd->out);
        first[nd->out] = last[nd->out] = i;
        if (training && backward_reads_output(nd)) {
            reads[nd->out] = 1;
            live_until(last, nd->out, held);
        }
        if (training) last[nv + nd->out] = bwd; /* read by its producer's backward */
        for (int k = 0; k < 2; k++) {
            int v = nd->in[k];
            if (v < 0) continue;
            live_until(last, v, i);
            if (training && k == 0 && backward_reads_input(nd)) {
                reads[v] = 1;
                live_until(last, v, held);
            }
            if (training && bwd < first[nv + v]) first[nv + v] = bwd; /* the last consumer's */
        }
    }
    if (training) first[2 * nv - 1] = n; /* the logits' gradient: written by the loss */
    for (int v = 1; v < nv; v++) /* a gradient someone writes */
        if (first[nv + v] <= last[nv + v]) need[nv + v] = act_bytes(m, v);
    need[0] = need[nv - 1] = 0; /* fixed: the input and the logits */
}

/* Offsets for buffers with intervals of steps (need[b] bytes over steps
 * first[b]..last[b]; need 0: none), greedy by size as in Pisarchyk and Lee,
 * "Efficient Memory Management for Deep Neural Net Inference" (2020):
 * largest first, each at the smallest gap that fits among the buffers
 * already placed whose intervals overlap its own, else above them all.
 * off[b]: its offset; *bytes: the region's size; *peak: the most bytes
 * live at one step (what any placement needs). */
typedef struct sized {
    size_t need;
    int first, b;
} sized;

static int by_size_desc(const void *pa, const void *pb)
{
    const sized *a = pa, *b = pb;
    if (a->need != b->need) return a->need > b->need ? -1 : 1;
    if (a->first != b->first) return a->first < b->first ? -1 : 1;
    return a->b < b->b ? -1 : 1;
}

typedef struct span {
    size_t lo, hi;
} span;

static int by_lo(const void *pa, const void *pb)
{
    const span *a = pa, *b = pb;
    return a->lo < b->lo ? -1 : a->lo > b->lo;
}

static kfac_status place_buffers(int count, const size_t *need, const int *first,
                                 const int *last, int steps, size_t *off, size_t *bytes,
                                 size_t *peak)
{
    sized *order = malloc((size_t)(count + 1) * sizeof *order);
    span *busy = malloc((size_t)(count + 1) * sizeof *busy);
    if (!order || !busy) {
        free(order);
        free(busy);
        return KFAC_ERR(KFAC_ENOMEM, "model: out of memory");
    }
    int placed = 0;
    for (int b = 0; b < count; b++)
        if (need[b]) order[placed++] = (sized){need[b], first[b], b};
    qsort(order, (size_t)placed, sizeof *order, by_size_desc);
    size_t total = 0;
    for (int k = 0; k < placed; k++) {
        const int b = order[k].b;
        int nbusy = 0;
        for (int j = 0; j < k; j++) { /* placed earlier and live at the same time */
            const int o = order[j].b;
            if (first[o] <= last[b] && first[b] <= last[o])
                busy[nbusy++] = (span){off[o], off[o] + need[o]};
        }
        qsort(busy, (size_t)nbusy, sizeof *busy, by_lo);
        size_t at = 0, best = SIZE_MAX, best_gap = SIZE_MAX;
        for (int j = 0; j < nbusy; j++) {
            if (busy[j].lo > at && busy[j].lo - at >= need[b] && busy[j].lo - at < best_gap) {
                best = at;
                best_gap = busy[j].lo - at;
            }
            if (busy[j].hi > at) at = busy[j].hi;
        }
        off[b] = best != SIZE_MAX ? best : at;
        if (off[b] + need[b] > total) total = off[b] + need[b];
    }
    *peak = 0;
    for (int t = 0; t <= steps; t++) {
        size_t live = 0;
        for (int b = 0; b < count; b++)
            if (need[b] && first[b] <= t && t <= last[b]) live += need[b];
        *peak = live > *peak ? live : *peak;
    }
    free(order);
    free(busy);
    *bytes = total;
    return KFAC_OK;
}

/* Places every buffer of the arena (at `base`, or nowhere to measure) and
 * fills m->mem. */
static kfac_status plan_arena(kfac_model *m, char *base)
{
    const int nv = m->num_values;
    unsigned char *reads = malloc((size_t)nv);
    int *first = calloc(4 * (size_t)nv, sizeof(int));
    size_t *need = calloc(4 * (size_t)nv, sizeof(size_t));
    if (!reads || !first || !need) {
        free(reads);
        free(first);
        free(need);
        return KFAC_ERR(KFAC_ENOMEM, "model: out of memory");
    }
    int *last = first + 2 * nv;
    size_t *off = need + 2 * nv, fixed = 0, slots = 0;
    kfac_model_memory *mem = &m->mem;
    memset(mem, 0, sizeof *mem);
#define CARVE(ptr, bytes)                                       \
    do {                                                        \
        (ptr) = base ? (float *)(base + fixed) : NULL;          \
        fixed += round_bytes(bytes);                            \
    } while (0)
    CARVE(m->values[0].data, act_bytes(m, 0));
    CARVE(m->values[nv - 1].data, act_bytes(m, nv - 1));
    if (m->act_size != sizeof(float))
        CARVE(m->input32, (size_t)m->max_batch * value_floats(&m->values[0]) * sizeof(float));
    for (int i = 0; i < m->num_nodes; i++) {
        node *nd = &m->nodes[i];
        if (nd->kind != KFAC_NODE_BN) continue;
        CARVE(nd->save_mean, (size_t)m->values[nd->out].c * sizeof(float));
        CARVE(nd->save_invstd, (size_t)m->values[nd->out].c * sizeof(float));
    }
#undef CARVE
    lifetimes(m, reads, need, first, last);
    kfac_status st = place_buffers(2 * nv, need, first, last, 2 * m->num_nodes, off, &slots,
                                   &mem->peak_live);
    char *shared = base ? base + fixed : NULL;
    for (int v = 0; v < nv && st == KFAC_OK; v++) {
        value *val = &m->values[v];
        size_t bytes = act_bytes(m, v);
        if (v == 0 || v == nv - 1 || reads[v])
            mem->backward_activations += bytes;
        else
            mem->forward_only_activations += bytes;
        mem->value_gradients += need[nv + v];
        if (need[v]) val->data = shared ? (float *)(shared + off[v]) : NULL;
        val->grad = shared && need[nv + v] ? (float *)(shared + off[nv + v]) : NULL;
    }
    free(reads);
    free(first);
    free(need);
    KFAC_TRY(st);
    mem->fixed = fixed;
    mem->shared_slots = slots;
    mem->arena = fixed + slots;
    return KFAC_OK;
}

kfac_status kfac_model_set_inference_only(kfac_model *m)
{
    if (m->finalized) return KFAC_ERR(KFAC_EINVAL, "model: inference-only set after finalize");
    m->inference_only = 1;
    return KFAC_OK;
}

kfac_status kfac_model_set_keep_activations(kfac_model *m)
{
    if (m->finalized) return KFAC_ERR(KFAC_EINVAL, "model: keep-activations set after finalize");
    m->keep_activations = 1;
    return KFAC_OK;
}

int kfac_model_keeps_activations(const kfac_model *m) { return m->keep_activations; }

kfac_status kfac_model_finalize(kfac_model *m, uint64_t seed)
{
    if (m->build_status != KFAC_OK) return m->build_status;
    if (m->finalized) return KFAC_ERR(KFAC_EINVAL, "model: finalized twice");
    if (m->num_nodes == 0) return KFAC_ERR(KFAC_EINVAL, "model: no layers");
    kfac_backend *be = m->be;
    if (kfac_dtype_size(be->act_dtype) != m->act_size)
        return KFAC_ERR(KFAC_EINVAL, "model: the backend's precision changed after the model was "
                        "started (set it before kfac_model_init)");
    if (m->act_size != sizeof(float) && !be->convert)
        return KFAC_ERR(KFAC_ENOTSUP, "model: backend '%s' stores %s activations but cannot "
                        "convert its input", be->name, kfac_dtype_name(be->act_dtype));
    KFAC_TRY(plan_arena(m, NULL));
    for (int i = 0; i < m->num_nodes; i++) {
        const node *nd = &m->nodes[i];
        if (nd->kind == KFAC_NODE_CONV || nd->kind == KFAC_NODE_FC) {
            size_t ws = be->conv_workspace(be, &nd->conv);
            if (ws > m->workspace_bytes) m->workspace_bytes = ws;
        }
    }
    /* [parameters | their gradients (none for inference) | BN statistics] */
    const size_t grads = m->inference_only ? 0 : m->param_count;
    size_t flat = m->param_count + grads + m->buffer_count;
    void *flat_mem = NULL;
    KFAC_TRY(be->alloc(be, m->mem.arena, &m->arena));
    KFAC_TRY(be->alloc(be, m->workspace_bytes ? m->workspace_bytes : 64, &m->workspace));
    KFAC_TRY(be->alloc(be, flat * sizeof(float), &flat_mem));
    KFAC_TRY(be->alloc(be, (size_t)m->max_batch * sizeof(int32_t), (void **)&m->labels));
    KFAC_TRY(plan_arena(m, m->arena));
    m->own_input = kfac_model_input(m);
    m->params_data = flat_mem;
    m->grads_data = grads ? m->params_data + m->param_count : NULL;
    m->buffers_data = m->params_data + m->param_count + grads;
    /* Parameters, zero gradients and statistics are made on the host in
     * the flat layout, then uploaded in one copy. */
    float *host = calloc(flat ? flat : 1, sizeof(float));
    if (!host) return KFAC_ERR(KFAC_ENOMEM, "model: cannot allocate %zu parameters", flat);
    init_params(m, seed, host, host + m->param_count + grads);
    m->sampled_labels = malloc((size_t)m->max_batch * sizeof(int32_t));
    const size_t logit_count = (size_t)m->max_batch * m->values[m->num_values - 1].c;
    m->host_logits = malloc(logit_count * sizeof(float));
    if (m->act_size == sizeof(uint16_t)) m->host_logits16 = malloc(logit_count * sizeof(uint16_t));
    if (!m->sampled_labels || !m->host_logits ||
        (m->act_size == sizeof(uint16_t) && !m->host_logits16)) {
        free(host);
        return KFAC_ERR(KFAC_ENOMEM, "model: out of memory");
    }
    kfac_status st = be->upload(be, flat_mem, host, flat * sizeof(float));
    free(host);
    KFAC_TRY(st);
    m->finalized = 1;
    return KFAC_OK;
}

void kfac_model_free(kfac_model *m)
{
    if (!m) return;
    if (m->be) {
        if (m->arena) m->be->release(m->be, m->arena);
        if (m->workspace) m->be->release(m->be, m->workspace);
        if (m->params_data) m->be->release(m->be, m->params_data);
        if (m->labels) m->be->release(m->be, m->labels);
    }
    free(m->sampled_labels);
    free(m->host_logits);
    free(m->host_logits16);
    free(m->values);
    free(m->nodes);
    free(m->params);
    free(m);
}

/* ---- execution ---- */

static const float *param_ptr(const kfac_model *m, int p)
{
    return p < 0 ? NULL : m->params_data + m->params[p].offset;
}

static float *grad_ptr(const kfac_model *m, int p)
{
    return p < 0 ? NULL : m->grads_data + m->params[p].offset;
}

/* Activation of value v starting at image n0. */
static float *act(const kfac_model *m, int v, int n0)
{
    return m->values[v].data + (size_t)n0 * value_floats(&m->values[v]);
}

static kfac_status node_forward(kfac_model *m, node *nd, int n0, int n, kfac_mode mode)
{
    kfac_backend *be = m->be;
    const value *vin = &m->values[nd->in[0]], *vout = &m->values[nd->out];
    const float *x = act(m, nd->in[0], n0);
    float *y = act(m, nd->out, n0);
    size_t rows = (size_t)n * vin->h * vin->w;
    switch (nd->kind) {
    case KFAC_NODE_CONV:
    case KFAC_NODE_FC: {
        kfac_conv_desc d = nd->conv;
        d.n = n;
        return be->conv_forward(be, &d, x, param_ptr(m, nd->param[0]), param_ptr(m, nd->param[1]),
                                y, m->workspace);
    }
    case KFAC_NODE_BN: {
        float *stats = m->buffers_data + nd->stats_offset;
        const float *gamma = param_ptr(m, nd->param[0]), *beta = param_ptr(m, nd->param[1]);
        if (mode == KFAC_MODE_TRAIN)
            return be->bn_forward_train(be, rows, vin->c, x, gamma, beta, y, nd->save_mean,
                                        nd->save_invstd, stats, stats + vin->c, m->bn_momentum,
                                        BN_EPS, nd->relu);
        return be->bn_forward_eval(be, rows, vin->c, x, gamma, beta, y, stats, stats + vin->c,
                                   BN_EPS, nd->relu);
    }
    case KFAC_NODE_RELU:
        return be->relu_forward(be, rows * vin->c, x, y);
    case KFAC_NODE_MAXPOOL: {
        kfac_pool_desc d = nd->pool;
        d.n = n;
        return be->maxpool_forward(be, &d, x, y);
    }
    case KFAC_NODE_GAP:
        return be->gap_forward(be, n, vin->h * vin->w, vin->c, x, y);
    case KFAC_NODE_ADD:
        return be->add_forward(be, (size_t)n * value_floats(vout), x, act(m, nd->in[1], n0), y,
                               nd->relu);
    }
    return KFAC_ERR(KFAC_EINVAL, "model: unknown node kind %d", (int)nd->kind);
}

static kfac_status forward_range(kfac_model *m, int n0, int n, kfac_mode mode)
{
    for (int i = 0; i < m->num_nodes; i++) KFAC_TRY(node_forward(m, &m->nodes[i], n0, n, mode));
    return KFAC_OK;
}

/* Images per eval chunk: the largest per-image activation times the chunk
 * stays within EVAL_CHUNK_BYTES, but chunks are at least 4 images. */
static int eval_chunk(const kfac_model *m)
{
    size_t largest = 1;
    for (int i = 0; i < m->num_values; i++)
        if (value_floats(&m->values[i]) > largest) largest = value_floats(&m->values[i]);
    size_t chunk = EVAL_CHUNK_BYTES / (largest * m->act_size);
    if (chunk < 4) chunk = 4;
    return (int)chunk;
}

kfac_status kfac_model_forward(kfac_model *m, int n, kfac_mode mode)
{
    if (!m->finalized) return KFAC_ERR(KFAC_EINVAL, "model: forward before finalize");
    if (n < 1 || n > m->max_batch)
        return KFAC_ERR(KFAC_EINVAL, "model: batch %d outside [1, %d]", n, m->max_batch);
    if (m->input32)
        KFAC_TRY(m->be->convert(m->be, (size_t)n * value_floats(&m->values[0]), m->input32,
                                KFAC_F32, m->values[0].data, m->be->act_dtype));
    if (mode == KFAC_MODE_TRAIN) return forward_range(m, 0, n, mode);
    /* Each chunk must keep every thread busy, so scale it with threads;
     * a GPU wants the whole batch at once. */
    int chunk = m->be->cache_chunks ? eval_chunk(m) * m->be->threads : n;
    for (int n0 = 0; n0 < n; n0 += chunk)
        KFAC_TRY(forward_range(m, n0, n - n0 < chunk ? n - n0 : chunk, mode));
    return KFAC_OK;
}

kfac_status kfac_model_set_labels(kfac_model *m, int n, const int32_t *labels)
{
    value *logits = &m->values[m->num_values - 1];
    if (logits->h != 1 || logits->w != 1)
        return KFAC_ERR(KFAC_EINVAL, "model: last layer is not a classifier (%dx%dx%d)", logits->h,
                        logits->w, logits->c);
    if (n < 1 || n > m->max_batch)
        return KFAC_ERR(KFAC_EINVAL, "model: batch %d outside [1, %d]", n, m->max_batch);
    return m->be->upload(m->be, m->labels, labels, (size_t)n * sizeof *labels);
}

/* The loss against the labels set last; host results, or none (NULL). */
static kfac_status loss(kfac_model *m, int n, float smoothing, double *loss_sum, int *correct)
{
    value *logits = &m->values[m->num_values - 1];
    return m->be->softmax_xent(m->be, n, logits->c, logits->data, m->labels, smoothing,
                               m->loss_scale, logits->grad, loss_sum, correct);
}

kfac_status kfac_model_loss(kfac_model *m, int n, const int32_t *labels, float smoothing,
                            double *loss_sum, int *correct)
{
    KFAC_TRY(kfac_model_set_labels(m, n, labels));
    return loss(m, n, smoothing, loss_sum, correct);
}

kfac_status kfac_model_loss_queue(kfac_model *m, int n, float smoothing)
{
    return loss(m, n, smoothing, NULL, NULL);
}

kfac_status kfac_model_loss_result(kfac_model *m, int n, double *loss_sum, int *correct)
{
    return m->be->xent_result(m->be, n, kfac_model_classes(m), m->labels, loss_sum, correct);
}

static kfac_status node_backward(kfac_model *m, node *nd, int n)
{
    kfac_backend *be = m->be;
    value *vin = &m->values[nd->in[0]], *vout = &m->values[nd->out];
    const float *dy = vout->grad;
    float *dx = nd->in[0] == 0 ? NULL : vin->grad; /* the input needs no gradient */
    int acc = vin->grad_written;
    size_t rows = (size_t)n * vin->h * vin->w;
    kfac_status st = KFAC_OK;
    switch (nd->kind) {
    case KFAC_NODE_CONV:
    case KFAC_NODE_FC: {
        kfac_conv_desc d = nd->conv;
        d.n = n;
        st = be->conv_backward(be, &d, vin->data, param_ptr(m, nd->param[0]), dy, dx, acc,
                               grad_ptr(m, nd->param[0]), grad_ptr(m, nd->param[1]), m->workspace);
        break;
    }
    case KFAC_NODE_BN:
        if (!dx) return KFAC_ERR(KFAC_ENOTSUP, "model: batch norm directly on the input");
        st = be->bn_backward(be, rows, vin->c, vin->data, vout->data, dy, param_ptr(m, nd->param[0]),
                             nd->save_mean, nd->save_invstd, dx, acc, grad_ptr(m, nd->param[0]),
                             grad_ptr(m, nd->param[1]), nd->relu);
        break;
    case KFAC_NODE_RELU:
        if (dx) st = be->relu_backward(be, rows * vin->c, vout->data, dy, dx, acc);
        break;
    case KFAC_NODE_MAXPOOL: {
        kfac_pool_desc d = nd->pool;
        d.n = n;
        if (dx) st = be->maxpool_backward(be, &d, vin->data, vout->data, dy, dx, acc);
        break;
    }
    case KFAC_NODE_GAP:
        if (dx) st = be->gap_backward(be, n, vin->h * vin->w, vin->c, dy, dx, acc);
        break;
    case KFAC_NODE_ADD: {
        value *vb = &m->values[nd->in[1]];
        if (!dx || nd->in[1] == 0)
            return KFAC_ERR(KFAC_ENOTSUP, "model: residual add directly on the input");
        st = be->add_backward(be, (size_t)n * value_floats(vout), vout->data, dy, dx, acc,
                              vb->grad, vb->grad_written, nd->relu);
        vb->grad_written = 1;
        break;
    }
    }
    if (dx) vin->grad_written = 1;
    return st;
}

kfac_status kfac_model_backward(kfac_model *m, int n)
{
    if (m->inference_only)
        return KFAC_ERR(KFAC_EINVAL, "model: backward of a model built for inference only");
    if (n < 1 || n > m->max_batch)
        return KFAC_ERR(KFAC_EINVAL, "model: batch %d outside [1, %d]", n, m->max_batch);
    for (int i = 0; i < m->num_values; i++) m->values[i].grad_written = 0;
    m->values[m->num_values - 1].grad_written = 1; /* written by kfac_model_loss */
    for (int i = m->num_nodes - 1; i >= 0; i--) {
        KFAC_TRY(node_backward(m, &m->nodes[i], n));
        if (m->hook) KFAC_TRY(m->hook(m, i, n, m->hook_user));
    }
    return KFAC_OK;
}

/* Labels drawn from softmax(logits) row by row (inverse CDF). */
kfac_status kfac_model_loss_sampled(kfac_model *m, int n, uint64_t seed)
{
    value *logits = &m->values[m->num_values - 1];
    int classes = logits->c;
    float *host = m->host_logits;
    if (n < 1 || n > m->max_batch)
        return KFAC_ERR(KFAC_EINVAL, "model: batch %d outside [1, %d]", n, m->max_batch);
    const size_t count = (size_t)n * classes;
    kfac_status st;
    if (m->act_size == sizeof(float)) {
        st = m->be->download(m->be, host, logits->data, count * sizeof *host);
    } else { /* 16-bit logits, widened exactly */
        st = m->be->download(m->be, m->host_logits16, logits->data, count * sizeof(uint16_t));
        for (size_t i = 0; st == KFAC_OK && i < count; i++)
            host[i] = kfac_16_to_f32(m->be->act_dtype, m->host_logits16[i]);
    }
    kfac_rng rng;
    kfac_rng_seed(&rng, seed);
    for (int i = 0; i < n && st == KFAC_OK; i++) {
        const float *z = host + (size_t)i * classes;
        double zmax = z[0], total = 0, u, acc = 0;
        for (int j = 1; j < classes; j++) zmax = z[j] > zmax ? z[j] : zmax;
        for (int j = 0; j < classes; j++) total += exp(z[j] - zmax);
        u = kfac_rng_uniform(&rng) * total;
        int label = classes - 1;
        for (int j = 0; j < classes; j++)
            if ((acc += exp(z[j] - zmax)) > u) {
                label = j;
                break;
            }
        m->sampled_labels[i] = label;
    }
    KFAC_TRY(st);
    double loss;
    int correct;
    KFAC_TRY(m->be->upload(m->be, m->labels, m->sampled_labels, (size_t)n * sizeof(int32_t)));
    return m->be->softmax_xent(m->be, n, classes, logits->data, m->labels, 0.0f, m->loss_scale,
                               logits->grad, &loss, &correct);
}

/* ---- what K-FAC sees ---- */

int kfac_model_num_nodes(const kfac_model *m) { return m->num_nodes; }

void kfac_model_set_bn_momentum(kfac_model *m, float momentum)
{
    m->bn_momentum = momentum < 0 ? BN_MOMENTUM : momentum;
}

void kfac_model_layer(const kfac_model *m, int index, int n, kfac_layer_view *out)
{
    const node *nd = &m->nodes[index];
    const value *vin = &m->values[nd->in[0]], *vout = &m->values[nd->out];
    memset(out, 0, sizeof *out);
    out->kind = nd->kind;
    out->name = nd->name;
    out->conv = nd->conv;
    out->conv.n = n;
    out->rows = (size_t)n * vout->h * vout->w;
    out->channels = vout->c;
    out->x = vin->data;
    out->y = vout->data;
    out->dy = vout->grad;
    out->param[0] = nd->param[0];
    out->param[1] = nd->param[1];
    out->save_mean = nd->save_mean;
    out->save_invstd = nd->save_invstd;
    out->relu = nd->relu;
}

void kfac_model_set_backward_hook(kfac_model *m, kfac_backward_hook hook, void *user)
{
    m->hook = hook;
    m->hook_user = user;
}

/* ---- accessors ---- */

float *kfac_model_input(kfac_model *m) { return m->input32 ? m->input32 : m->values[0].data; }

float *kfac_model_own_input(kfac_model *m) { return m->own_input; }

void kfac_model_bind_input(kfac_model *m, float *input)
{
    if (m->input32)
        m->input32 = input;
    else
        m->values[0].data = input;
}
const float *kfac_model_logits(const kfac_model *m) { return m->values[m->num_values - 1].data; }
int kfac_model_classes(const kfac_model *m) { return m->values[m->num_values - 1].c; }
int kfac_model_max_batch(const kfac_model *m) { return m->max_batch; }
void kfac_model_input_shape(const kfac_model *m, int *h, int *w, int *c)
{
    *h = m->values[0].h;
    *w = m->values[0].w;
    *c = m->values[0].c;
}
float *kfac_model_params(kfac_model *m) { return m->params_data; }
float *kfac_model_grads(kfac_model *m) { return m->grads_data; }
size_t kfac_model_param_count(const kfac_model *m) { return m->param_count; }
int kfac_model_num_param_tensors(const kfac_model *m) { return m->num_params; }
const kfac_param *kfac_model_param_tensor(const kfac_model *m, int i) { return &m->params[i]; }
float *kfac_model_buffers(kfac_model *m) { return m->buffers_data; }
size_t kfac_model_buffer_count(const kfac_model *m) { return m->buffer_count; }
double kfac_model_macs_per_image(const kfac_model *m) { return m->macs; }
size_t kfac_model_arena_bytes(const kfac_model *m) { return m->mem.arena + m->workspace_bytes; }
void kfac_model_get_memory(const kfac_model *m, kfac_model_memory *out)
{
    *out = m->mem;
    out->workspace = m->workspace_bytes;
}
kfac_backend *kfac_model_backend(kfac_model *m) { return m->be; }

void kfac_model_set_loss_scale(kfac_model *m, float scale) { m->loss_scale = scale; }

float kfac_model_loss_scale(const kfac_model *m) { return m->loss_scale; }
