/* precond.c - the K-FAC optimizer: per-layer factor state, the refresh
 * schedule, and the sequencing of capture, inversion, preconditioning and
 * KL clipping around one training step (see kfac_precond.h).
 *
 * Factors, inverses and gradient blocks live in backend memory and every
 * numerical stage is a backend operation (kfac_backend.h), so the same
 * sequence runs on the CPU and on a GPU.  Only traffic between ranks is
 * staged through host buffers (fsend/frecv, gstage/grecv); one rank with
 * float32 traffic skips it, since its reductions are copies. */
#include <fnmatch.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/clock.h"
#include "kfac/kfac_factors.h"
#include "kfac/kfac_placement.h"
#include "kfac/kfac_precond.h"
#include "kfac/kfac_rng.h"

typedef struct layer {
    int node;
    kfac_node_kind kind;
    char name[64];
    int weight, bias;            /* parameter tensors (bias -1 if none); bn: gamma, beta */
    int k, d, dw;                /* G order, A order (dw weight columns + 1 for a bias) */
    float *a, *g;                /* running factors, packed */
    float *a_batch, *g_batch;    /* this batch's estimate, packed */
    float *ainv, *ginv;          /* damped inverses, full (factored form) */
    float *qa, *da, *qg, *dg;    /* eigendecompositions (exact_kronecker only) */
    int channels;                /* bn */
    float *fisher, *fisher_batch;/* bn: 3 per channel */
    float *fisher_inv;           /* bn: the Fisher as of the last inversion (preconditions) */
    int has_factors, has_inverse, stale;
    int factor_due, inverse_due;
    int interval;                /* current factor refresh interval (adaptive) */
    int owner;                   /* rank that reduces, inverts and preconditions */
    size_t factor_len;           /* packed A + packed G, or 3 per BN channel */
    size_t grad_len, grad_off;   /* gradient floats, offset in the by-owner buffer */
    long next_factor, next_inverse;
    long factor_count, inverse_count;
} layer;

struct kfac_precond {
    kfac_model *model;
    kfac_backend *be;
    kfac_precond_config cfg;
    char exclude[256];
    layer *layers;
    int num_layers;              /* Kronecker layers first, then BN layers */
    int *layer_of_node;          /* node -> layer index, -1 */
    long step;                   /* the step being run (capture reads it) */
    int micro_batches, micro;    /* this step's micro-batches, the one running */
    int any_factor_due;
    kfac_comm *comm, *self_comm; /* self_comm: the default, single process */
    int rank, size;
    int *order;                  /* layer indices by (owner, index) */
    size_t *counts;              /* per-rank factor block sizes (scratch) */
    size_t *grad_counts;         /* per-rank gradient block sizes (fixed by the plan) */
    float *gbuf;                 /* K-FAC gradients by owner (backend memory) */
    float *gstage, *grecv;       /* host: gbuf's traffic; this rank's block */
    float *fsend, *frecv;        /* host: factor traffic */
    uint16_t *fsend16, *frecv16; /* the same in f16/bf16 */
    float *micro_tmp;            /* one micro-batch's factor estimate */
    double *changes;             /* per-layer factor change (adaptive interval) */
    double *pg, *pg_host;        /* per-layer <P, g> (backend memory), its host copy */
    unsigned char *tensor_owned; /* parameter tensors of K-FAC layers */
    void *gram_ws;
    float *sg, *sb;              /* bn per-sample sums: max_batch x max channels */
    float *pmat, *tmp;           /* k x d scratch, largest layer (pmat: or 2 x BN channels) */
    float *eig_q, *eig_d;        /* one factor's eigenpairs on the way to its inverse (eig
                                    path without exact_kronecker), largest order */
    void *inv_ws;                /* inverse_workspace of the largest order */
    kfac_precond_stats stats;
};

void kfac_precond_config_defaults(kfac_precond_config *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->fisher = KFAC_FISHER_EMPIRICAL;
    cfg->inverse = KFAC_INVERSE_EIG;
    cfg->factor_decay = 0.95f;
    cfg->factor_interval = 10;
    cfg->inverse_interval = 10;
    cfg->warmup_steps = 20;
    cfg->max_interval = 100;
    cfg->damping = 1e-3f;
    cfg->damping_decay = 1.0f;
    cfg->kl_clip = 1e-3f;
    cfg->subsample = 1.0f;
    cfg->bn = KFAC_BN_UNITWISE;
    cfg->seed = 1;
}

/* ---- set-up ---- */

static int excluded(const kfac_precond *p, const char *name)
{
    char list[256];
    snprintf(list, sizeof list, "%s", p->exclude);
    for (char *save = NULL, *pat = strtok_r(list, ",", &save); pat; pat = strtok_r(NULL, ",", &save)) {
        while (*pat == ' ') pat++;
        if (*pat && fnmatch(pat, name, 0) == 0) return 1;
    }
    return 0;
}

static kfac_status alloc_floats(kfac_precond *p, size_t n, float **out)
{
    return p->be->alloc(p->be, (n ? n : 1) * sizeof(float), (void **)out);
}

static kfac_status init_kron_layer(kfac_precond *p, layer *L, const kfac_layer_view *v)
{
    L->k = v->conv.k;
    L->dw = v->conv.kh * v->conv.kw * v->conv.c;
    L->d = L->dw + (L->bias >= 0);
    size_t pa = kfac_packed_len(L->d), pg = kfac_packed_len(L->k);
    L->factor_len = pa + pg;
    L->grad_len = (size_t)L->k * L->d;
    KFAC_TRY(alloc_floats(p, pa, &L->a));
    KFAC_TRY(alloc_floats(p, pa, &L->a_batch));
    KFAC_TRY(alloc_floats(p, pg, &L->g));
    KFAC_TRY(alloc_floats(p, pg, &L->g_batch));
    if (p->cfg.inverse == KFAC_INVERSE_EIG && p->cfg.exact_kronecker) {
        KFAC_TRY(alloc_floats(p, (size_t)L->d * L->d, &L->qa));
        KFAC_TRY(alloc_floats(p, (size_t)L->d, &L->da));
        KFAC_TRY(alloc_floats(p, (size_t)L->k * L->k, &L->qg));
        KFAC_TRY(alloc_floats(p, (size_t)L->k, &L->dg));
    }
    if (!(p->cfg.inverse == KFAC_INVERSE_EIG && p->cfg.exact_kronecker)) { /* factored form */
        KFAC_TRY(alloc_floats(p, (size_t)L->d * L->d, &L->ainv));
        KFAC_TRY(alloc_floats(p, (size_t)L->k * L->k, &L->ginv));
    }
    return KFAC_OK;
}

/* Finds the K-FAC layers of the model and sizes every buffer the step
 * needs, so that steps never allocate. */
static kfac_status init_layers(kfac_precond *p)
{
    kfac_model *m = p->model;
    int nodes = kfac_model_num_nodes(m), max_batch = kfac_model_max_batch(m);
    p->layer_of_node = malloc((size_t)nodes * sizeof(int));
    p->layers = calloc((size_t)nodes, sizeof(layer));
    if (!p->layer_of_node || !p->layers) return KFAC_ERR(KFAC_ENOMEM, "kfac: out of memory");
    kfac_backend *be = p->be;
    size_t max_kd = 1, max_ws = 0, max_inv_ws = 0, max_c = 1, max_order = 1;
    for (int pass = 0; pass < 2; pass++) /* Kronecker layers first, then BN */
        for (int i = 0; i < nodes; i++) {
            kfac_layer_view v;
            kfac_model_layer(m, i, max_batch, &v);
            int kron = v.kind == KFAC_NODE_CONV || v.kind == KFAC_NODE_FC;
            int bn = v.kind == KFAC_NODE_BN && p->cfg.bn != KFAC_BN_SGD;
            if (pass == 0) p->layer_of_node[i] = -1;
            if ((pass == 0 && !kron) || (pass == 1 && !bn) || excluded(p, v.name)) continue;
            layer *L = &p->layers[p->num_layers];
            p->layer_of_node[i] = p->num_layers++;
            L->node = i;
            L->kind = v.kind;
            snprintf(L->name, sizeof L->name, "%s", v.name);
            L->weight = v.param[0];
            L->bias = v.param[1];
            L->interval = p->cfg.factor_interval;
            if (kron) {
                KFAC_TRY(init_kron_layer(p, L, &v));
                size_t rows = (size_t)max_batch * v.conv.ho * v.conv.wo;
                size_t ws = be->gram_patches_workspace(be, &v.conv);
                size_t ws_rows = be->gram_rows_workspace(be, rows, L->k);
                ws = ws > ws_rows ? ws : ws_rows;
                max_ws = ws > max_ws ? ws : max_ws;
                max_kd = (size_t)L->k * L->d > max_kd ? (size_t)L->k * L->d : max_kd;
                size_t order = (size_t)(L->d > L->k ? L->d : L->k);
                max_order = order > max_order ? order : max_order;
                size_t inv_ws = be->inverse_workspace(be, (int)order);
                max_inv_ws = inv_ws > max_inv_ws ? inv_ws : max_inv_ws;
                p->stats.layers++;
            } else {
                L->channels = v.channels;
                L->factor_len = 3 * (size_t)L->channels;
                L->grad_len = 2 * (size_t)L->channels;
                KFAC_TRY(alloc_floats(p, 3 * (size_t)L->channels, &L->fisher));
                KFAC_TRY(alloc_floats(p, 3 * (size_t)L->channels, &L->fisher_batch));
                KFAC_TRY(alloc_floats(p, 3 * (size_t)L->channels, &L->fisher_inv));
                max_c = (size_t)v.channels > max_c ? (size_t)v.channels : max_c;
                p->stats.bn_layers++;
            }
        }
    KFAC_TRY(be->alloc(be, max_ws ? max_ws : 64, &p->gram_ws));
    KFAC_TRY(be->alloc(be, max_inv_ws ? max_inv_ws : 64, &p->inv_ws));
    KFAC_TRY(alloc_floats(p, (size_t)max_batch * max_c, &p->sg));
    KFAC_TRY(alloc_floats(p, (size_t)max_batch * max_c, &p->sb));
    KFAC_TRY(alloc_floats(p, max_kd > 2 * max_c ? max_kd : 2 * max_c, &p->pmat));
    KFAC_TRY(alloc_floats(p, max_kd, &p->tmp));
    if (p->cfg.inverse == KFAC_INVERSE_EIG && !p->cfg.exact_kronecker) {
        KFAC_TRY(alloc_floats(p, max_order * max_order, &p->eig_q));
        KFAC_TRY(alloc_floats(p, max_order, &p->eig_d));
    }
    KFAC_TRY(be->alloc(be, ((size_t)p->num_layers + 1) * sizeof(double), (void **)&p->pg));
    size_t max_factor = 1, factors = 0, grads = 0;
    for (int i = 0; i < p->num_layers; i++) {
        layer *L = &p->layers[i];
        max_factor = L->factor_len > max_factor ? L->factor_len : max_factor;
        factors += L->factor_len;
        grads += L->grad_len;
    }
    KFAC_TRY(alloc_floats(p, max_factor, &p->micro_tmp));
    KFAC_TRY(alloc_floats(p, grads, &p->gbuf));
    p->fsend = malloc((factors + 1) * sizeof(float));
    p->frecv = malloc((factors + 1) * sizeof(float));
    p->gstage = malloc((grads + 1) * sizeof(float));
    p->grecv = malloc((grads + 1) * sizeof(float));
    p->changes = malloc(((size_t)p->num_layers + 1) * sizeof(double));
    p->pg_host = malloc(((size_t)p->num_layers + 1) * sizeof(double));
    p->order = malloc(((size_t)p->num_layers + 1) * sizeof(int));
    p->tensor_owned = calloc((size_t)kfac_model_num_param_tensors(m) + 1, 1);
    if (!p->fsend || !p->frecv || !p->gstage || !p->grecv || !p->changes || !p->pg_host ||
        !p->order || !p->tensor_owned)
        return KFAC_ERR(KFAC_ENOMEM, "kfac: out of memory");
    for (int i = 0; i < p->num_layers; i++) {
        p->tensor_owned[p->layers[i].weight] = 1;
        if (p->layers[i].bias >= 0) p->tensor_owned[p->layers[i].bias] = 1;
    }
    if (p->cfg.factor_dtype != KFAC_F32) {
        p->fsend16 = malloc(factors * sizeof(uint16_t) + 2);
        p->frecv16 = malloc(factors * sizeof(uint16_t) + 2);
        if (!p->fsend16 || !p->frecv16) return KFAC_ERR(KFAC_ENOMEM, "kfac: out of memory");
    }
    return KFAC_OK;
}

int kfac_precond_needs_kept_activations(const kfac_precond_config *cfg)
{
    return cfg->fisher == KFAC_FISHER_SAMPLED;
}

kfac_status kfac_precond_init(kfac_precond **out, kfac_model *m, const kfac_precond_config *cfg)
{
    *out = NULL;
    if (cfg->factor_decay < 0 || cfg->factor_decay >= 1)
        return KFAC_ERR(KFAC_EINVAL, "kfac: factor_decay %g outside [0, 1)", cfg->factor_decay);
    if (cfg->factor_interval < 1 || cfg->inverse_interval < 1 || cfg->max_interval < 1)
        return KFAC_ERR(KFAC_EINVAL, "kfac: refresh intervals must be >= 1");
    if (!(cfg->damping > 0)) return KFAC_ERR(KFAC_EINVAL, "kfac: damping must be > 0");
    if (!(cfg->subsample > 0 && cfg->subsample <= 1))
        return KFAC_ERR(KFAC_EINVAL, "kfac: subsample %g outside (0, 1]", cfg->subsample);
    if (cfg->exact_kronecker && cfg->inverse != KFAC_INVERSE_EIG)
        return KFAC_ERR(KFAC_EINVAL, "kfac: exact_kronecker needs the eig inverse");
    if (cfg->factor_dtype != KFAC_F32 && cfg->factor_dtype != KFAC_F16 &&
        cfg->factor_dtype != KFAC_BF16)
        return KFAC_ERR(KFAC_EINVAL, "kfac: factor traffic must be f32, f16 or bf16");
    kfac_backend *be = kfac_model_backend(m);
    if (!kfac_model_grads(m))
        return KFAC_ERR(KFAC_EINVAL, "kfac: the model was built for inference only (no gradients)");
    if (kfac_precond_needs_kept_activations(cfg) && !kfac_model_keeps_activations(m))
        return KFAC_ERR(KFAC_EINVAL, "kfac: a sampled Fisher runs a second backward over each "
                        "forward, so the model must keep its activations through backward "
                        "(kfac_model_set_keep_activations, or kfac_resnet_options.keep_activations)");
    if (!be->gram_patches)
        return KFAC_ERR(KFAC_ENOTSUP, "kfac: the %s backend has no K-FAC stages", be->name);
    kfac_precond *p = calloc(1, sizeof *p);
    if (!p) return KFAC_ERR(KFAC_ENOMEM, "kfac: out of memory");
    p->model = m;
    p->be = be;
    p->cfg = *cfg;
    snprintf(p->exclude, sizeof p->exclude, "%s", cfg->exclude ? cfg->exclude : "");
    p->cfg.exclude = p->exclude;
    kfac_status st = init_layers(p);
    if (st == KFAC_OK) st = kfac_comm_self(&p->self_comm);
    if (st == KFAC_OK) st = kfac_precond_set_comm(p, p->self_comm);
    if (st != KFAC_OK) {
        kfac_precond_free(p);
        return st;
    }
    *out = p;
    return KFAC_OK;
}

void kfac_precond_free(kfac_precond *p)
{
    if (!p) return;
    kfac_backend *be = p->be;
#define RELEASE(ptr) \
    if (ptr) be->release(be, ptr)
    for (int i = 0; i < p->num_layers; i++) {
        layer *L = &p->layers[i];
        RELEASE(L->a); RELEASE(L->g); RELEASE(L->a_batch); RELEASE(L->g_batch);
        RELEASE(L->ainv); RELEASE(L->ginv); RELEASE(L->qa); RELEASE(L->da);
        RELEASE(L->qg); RELEASE(L->dg); RELEASE(L->fisher); RELEASE(L->fisher_batch);
        RELEASE(L->fisher_inv);
    }
    RELEASE(p->gram_ws); RELEASE(p->inv_ws); RELEASE(p->sg); RELEASE(p->sb);
    RELEASE(p->pmat); RELEASE(p->tmp); RELEASE(p->micro_tmp); RELEASE(p->gbuf);
    RELEASE(p->pg); RELEASE(p->eig_q); RELEASE(p->eig_d);
#undef RELEASE
    kfac_comm_free(p->self_comm);
    free(p->fsend);
    free(p->frecv);
    free(p->gstage);
    free(p->grecv);
    free(p->fsend16);
    free(p->frecv16);
    free(p->changes);
    free(p->pg_host);
    free(p->counts); /* grad_counts shares it */
    free(p->order);
    free(p->tensor_owned);
    free(p->layers);
    free(p->layer_of_node);
    free(p);
}

/* ---- distribution ---- */

static int by_owner(const kfac_precond *p, int a, int b)
{
    int oa = p->layers[a].owner, ob = p->layers[b].owner;
    return oa != ob ? oa - ob : a - b;
}

kfac_status kfac_precond_set_comm(kfac_precond *p, kfac_comm *comm)
{
    double *cost = malloc(((size_t)p->num_layers + 1) * sizeof(double));
    size_t *counts = calloc(2 * (size_t)kfac_comm_size(comm), sizeof(size_t));
    if (!cost || !counts) {
        free(cost);
        free(counts);
        return KFAC_ERR(KFAC_ENOMEM, "kfac: out of memory");
    }
    for (int i = 0; i < p->num_layers; i++) {
        const layer *L = &p->layers[i];
        cost[i] = L->kind == KFAC_NODE_BN ? kfac_placement_cost_bn(L->channels)
                                          : kfac_placement_cost(L->d, L->k);
    }
    kfac_placement plan;
    kfac_status st = kfac_placement_greedy(p->num_layers, cost, kfac_comm_size(comm), &plan);
    free(cost);
    if (st != KFAC_OK) {
        free(counts);
        return st;
    }
    p->comm = comm;
    p->rank = kfac_comm_rank(comm);
    p->size = kfac_comm_size(comm);
    free(p->counts);
    p->counts = counts;
    p->grad_counts = counts + p->size;
    /* Layers sorted by owner (insertion sort: tens of layers), so each
     * owner's layers form one block of every by-owner buffer. */
    for (int i = 0; i < p->num_layers; i++) {
        p->layers[i].owner = plan.owner[i];
        int j = i;
        while (j > 0 && by_owner(p, p->order[j - 1], i) > 0) {
            p->order[j] = p->order[j - 1];
            j--;
        }
        p->order[j] = i;
    }
    kfac_placement_free(&plan);
    size_t off = 0;
    for (int k = 0; k < p->num_layers; k++) {
        layer *L = &p->layers[p->order[k]];
        L->grad_off = off;
        off += L->grad_len;
        p->grad_counts[L->owner] += L->grad_len;
    }
    return KFAC_OK;
}

int kfac_precond_owns_tensor(const kfac_precond *p, int tensor) { return p->tensor_owned[tensor]; }

static int mine(const kfac_precond *p, const layer *L) { return L->owner == p->rank; }

/* ---- schedule ---- */

int kfac_precond_plan(kfac_precond *p, long step)
{
    int any = 0;
    int warm = step < p->cfg.warmup_steps;
    for (int i = 0; i < p->num_layers; i++) {
        layer *L = &p->layers[i];
        L->factor_due = warm || step >= L->next_factor;
        L->inverse_due = (warm || step >= L->next_inverse) && (L->stale || L->factor_due);
        any |= L->factor_due;
    }
    p->step = step;
    p->any_factor_due = any;
    return any;
}

/* After a refresh: SP-NGD's adaptive interval doubles while the running
 * factor moved less than the threshold, and resets when it moved more. */
static void schedule_next_factor(kfac_precond *p, layer *L, double change)
{
    /* The 2x2 BN blocks are cheap: BN stays on the base interval. */
    if (L->kind != KFAC_NODE_BN && p->cfg.adaptive_threshold > 0 && p->step >= p->cfg.warmup_steps) {
        if (change < p->cfg.adaptive_threshold)
            L->interval = 2 * L->interval < p->cfg.max_interval ? 2 * L->interval : p->cfg.max_interval;
        else
            L->interval = p->cfg.factor_interval;
    }
    L->next_factor = p->step + L->interval;
}

/* ---- capture (backward hook) ---- */

/* The first micro-batch writes the batch estimate, later ones add to it. */
static float *micro_target(kfac_precond *p, float *batch) { return p->micro ? p->micro_tmp : batch; }

static kfac_status micro_add(const kfac_precond *p, float *batch, size_t len)
{
    if (!p->micro) return KFAC_OK;
    return p->be->axpby(p->be, len, 1.0f, p->micro_tmp, 1.0f, batch);
}

/* The backward's gradients are the loss scale S times the loss's (fp16
 * loss scaling, kfac_model_set_loss_scale); capture divides S out, so the
 * factors are those of the unscaled loss (exactly, for S a power of 2). */
static float unscaled(const kfac_precond *p, float factor, int power_of_s)
{
    double s = kfac_model_loss_scale(p->model);
    if (power_of_s == 2) s *= s;
    return s == 1.0 ? factor : (float)(factor / s);
}

static kfac_status capture_kron(kfac_precond *p, layer *L, const kfac_layer_view *v, int n, int ns)
{
    kfac_backend *be = p->be;
    kfac_conv_desc d = v->conv;
    d.n = ns;
    size_t rows = (size_t)ns * d.ho * d.wo;
    /* A = mean over patch rows; G = (1/ns) sum (n dy)(n dy)^T. */
    KFAC_TRY(be->gram_patches(be, &d, v->x, L->bias >= 0, 1.0f / (float)rows,
                              micro_target(p, L->a_batch), p->gram_ws));
    KFAC_TRY(micro_add(p, L->a_batch, kfac_packed_len(L->d)));
    KFAC_TRY(be->gram_rows(be, rows, L->k, v->dy, 0,
                           unscaled(p, (float)n * (float)n / (float)ns, 2),
                           micro_target(p, L->g_batch), p->gram_ws));
    return micro_add(p, L->g_batch, kfac_packed_len(L->k));
}

/* Per-sample BN gradients (sums over locations of n * dy * xhat and of
 * n * dy) of the first ns images, then their 2x2 Fisher per channel. */
static kfac_status capture_bn(kfac_precond *p, layer *L, const kfac_layer_view *v, int n, int ns)
{
    KFAC_TRY(p->be->bn_fisher(p->be, ns, v->rows / (size_t)n, L->channels, v->x, v->y, v->dy,
                              v->save_mean, v->save_invstd, v->relu, unscaled(p, (float)n, 1),
                              p->sg, p->sb, micro_target(p, L->fisher_batch)));
    return micro_add(p, L->fisher_batch, L->factor_len);
}

kfac_status kfac_precond_capture(kfac_precond *p, int node, int n)
{
    int li = p->layer_of_node[node];
    if (li < 0 || !p->layers[li].factor_due) return KFAC_OK;
    layer *L = &p->layers[li];
    double t0 = kfac__now_seconds();
    kfac_layer_view v;
    kfac_model_layer(p->model, node, n, &v);
    int ns = (int)ceil(p->cfg.subsample * n);
    ns = ns < 1 ? 1 : ns > n ? n : ns;
    if (L->kind == KFAC_NODE_BN)
        KFAC_TRY(capture_bn(p, L, &v, n, ns));
    else
        KFAC_TRY(capture_kron(p, L, &v, n, ns));
    p->stats.seconds_capture += kfac__now_seconds() - t0;
    return KFAC_OK;
}

static kfac_status capture_hook(kfac_model *m, int node, int n, void *user)
{
    return kfac_precond_capture(user, node, n);
}

/* ---- factor reduction and folding ---- */

static int adaptive(const kfac_precond *p) { return p->cfg.adaptive_threshold > 0; }

static kfac_status copy_floats(kfac_backend *be, float *dst, const float *src, size_t n)
{
    return be->copy2d(be, 1, n * sizeof(float), dst, 0, src, 0);
}

/* Folds a batch estimate into a running factor; *change: the running
 * factor's relative change (order > 0, and only for the adaptive
 * schedule, which is its one reader: on a GPU it costs a wait). */
static kfac_status fold(const kfac_precond *p, int order, float *running, const float *batch,
                        size_t len, int first, double *change)
{
    kfac_backend *be = p->be;
    *change = first ? INFINITY : 0;
    if (first) return copy_floats(be, running, batch, len);
    if (order > 0 && adaptive(p)) {
        KFAC_TRY(be->factor_change(be, order, running, batch, change));
        *change *= 1.0 - p->cfg.factor_decay;
    }
    /* running = decay * running + (1 - decay) * batch (kfac_factor_average) */
    return be->axpby(be, len, 1.0f - p->cfg.factor_decay, batch, p->cfg.factor_decay, running);
}

static kfac_status fold_layer(kfac_precond *p, layer *L, double *change)
{
    if (L->kind == KFAC_NODE_BN) {
        KFAC_TRY(fold(p, 0, L->fisher, L->fisher_batch, L->factor_len, !L->has_factors, change));
        *change = 0;
        return KFAC_OK;
    }
    double ca, cg;
    KFAC_TRY(fold(p, L->d, L->a, L->a_batch, kfac_packed_len(L->d), !L->has_factors, &ca));
    KFAC_TRY(fold(p, L->k, L->g, L->g_batch, kfac_packed_len(L->k), !L->has_factors, &cg));
    *change = ca > cg ? ca : cg;
    return KFAC_OK;
}

/* A layer's factor storage as one list of runs: (A, G) or the BN Fisher. */
static int factor_parts(layer *L, int running, float *part[2], size_t len[2])
{
    if (L->kind == KFAC_NODE_BN) {
        part[0] = running ? L->fisher : L->fisher_batch;
        len[0] = L->factor_len;
        return 1;
    }
    part[0] = running ? L->a : L->a_batch;
    len[0] = kfac_packed_len(L->d);
    part[1] = running ? L->g : L->g_batch;
    len[1] = kfac_packed_len(L->k);
    return 2;
}

static int selected(const layer *L, int which) { return which ? L->inverse_due : L->factor_due; }

/* One rank with float32 traffic: the reduce-scatter is a copy, so the
 * owner's batch buffers become scale times the sources in place. */
static kfac_status scale_factors_locally(kfac_precond *p, int which, float scale)
{
    kfac_backend *be = p->be;
    for (int i = 0; i < p->num_layers; i++) {
        layer *L = &p->layers[i];
        if (!selected(L, which)) continue;
        float *src[2], *dst[2];
        size_t len[2];
        int parts = factor_parts(L, which, src, len);
        factor_parts(L, 0, dst, len);
        for (int j = 0; j < parts; j++)
            if (src[j] != dst[j])
                KFAC_TRY(be->axpby(be, len[j], scale, src[j], 0.0f, dst[j]));
            else if (scale != 1.0f)
                KFAC_TRY(be->axpby(be, len[j], 0.0f, NULL, scale, dst[j]));
    }
    return KFAC_OK;
}

/* Reduce-scatters the factors of the selected layers (which = 0: layers
 * whose factors are due, batch estimates; 1: layers whose inverse is due,
 * running averages) to their owners, scaled by `scale`, into the owners'
 * batch buffers, staged through host memory. */
static kfac_status reduce_factors(kfac_precond *p, int which, float scale)
{
    kfac_backend *be = p->be;
    kfac_dtype t = p->cfg.factor_dtype;
    int half = t != KFAC_F32;
    if (p->size == 1 && !half) return scale_factors_locally(p, which, scale);
    size_t off = 0;
    memset(p->counts, 0, (size_t)p->size * sizeof(size_t));
    for (int k = 0; k < p->num_layers; k++) {
        layer *L = &p->layers[p->order[k]];
        if (!selected(L, which)) continue;
        float *part[2];
        size_t len[2];
        int parts = factor_parts(L, which, part, len);
        for (int j = 0; j < parts; j++) {
            KFAC_TRY(be->download(be, p->fsend + off, part[j], len[j] * sizeof(float)));
            if (half)
                for (size_t i = 0; i < len[j]; i++) /* 16-bit traffic: one rounding */
                    p->fsend16[off + i] = kfac_f32_to_16(t, p->fsend[off + i]);
            off += len[j];
            p->counts[L->owner] += len[j];
        }
    }
    double t0 = kfac__now_seconds();
    KFAC_TRY(kfac_comm_reduce_scatterv(p->comm, half ? (void *)p->fsend16 : (void *)p->fsend,
                                       half ? (void *)p->frecv16 : (void *)p->frecv, p->counts, t,
                                       KFAC_STAGE_FACTOR_REDUCE));
    p->stats.seconds_comm += kfac__now_seconds() - t0;
    off = 0;
    for (int k = 0; k < p->num_layers; k++) {
        layer *L = &p->layers[p->order[k]];
        if (!mine(p, L) || !selected(L, which)) continue;
        float *part[2];
        size_t len[2];
        int parts = factor_parts(L, 0, part, len);
        for (int j = 0; j < parts; j++) {
            float *recv = p->frecv + off;
            for (size_t i = 0; i < len[j]; i++)
                recv[i] = scale * (half ? kfac_16_to_f32(t, p->frecv16[off + i]) : recv[i]);
            KFAC_TRY(be->upload(be, part[j], recv, len[j] * sizeof(float)));
            off += len[j];
        }
    }
    return KFAC_OK;
}

static kfac_status scale_batch(kfac_precond *p, layer *L, float s)
{
    float *part[2];
    size_t len[2];
    int parts = factor_parts(L, 0, part, len);
    for (int j = 0; j < parts; j++) KFAC_TRY(p->be->axpby(p->be, len[j], 0.0f, NULL, s, part[j]));
    return KFAC_OK;
}

/* Shares each refreshed layer's factor change (known to its folder) so the
 * adaptive schedule advances identically on every rank. */
static kfac_status share_changes(kfac_precond *p)
{
    if (p->cfg.adaptive_threshold <= 0 || p->size == 1 || p->cfg.reduce_at_inverse) return KFAC_OK;
    double t0 = kfac__now_seconds();
    kfac_status st = kfac_comm_allreduce(p->comm, p->changes, (size_t)p->num_layers, KFAC_F64,
                                         KFAC_STAGE_OTHER);
    p->stats.seconds_comm += kfac__now_seconds() - t0;
    return st;
}

/* The step's factor refresh: batch estimates (summed over micro-batches)
 * become running averages, on the owners, or locally with reduce_at_inverse. */
static kfac_status refresh_factors(kfac_precond *p)
{
    float mean = 1.0f / (float)p->micro_batches;
    int local = p->cfg.reduce_at_inverse;
    if (!local) KFAC_TRY(reduce_factors(p, 0, mean / (float)p->size));
    for (int i = 0; i < p->num_layers; i++) {
        layer *L = &p->layers[i];
        p->changes[i] = 0;
        if (!L->factor_due || !(local || mine(p, L))) continue;
        if (local) KFAC_TRY(scale_batch(p, L, mean));
        KFAC_TRY(fold_layer(p, L, &p->changes[i]));
    }
    KFAC_TRY(share_changes(p));
    for (int i = 0; i < p->num_layers; i++) {
        layer *L = &p->layers[i];
        if (!L->factor_due) continue;
        schedule_next_factor(p, L, p->changes[i]);
        L->has_factors = 1;
        L->stale = 1;
        L->factor_count++;
        p->stats.factor_refreshes++;
    }
    return KFAC_OK;
}

/* ---- inversion and preconditioning ---- */

static double damping_at(const kfac_precond *p, double epoch)
{
    double lambda = p->cfg.damping * pow(p->cfg.damping_decay, epoch);
    return lambda > p->cfg.damping_min ? lambda : p->cfg.damping_min;
}

/* Inverts damped factors a (order d) and g (order k) into the layer. */
static kfac_status invert_layer(kfac_precond *p, layer *L, const float *a, const float *g,
                                double lambda)
{
    kfac_backend *be = p->be;
    double gamma = sqrt(lambda), ta, tg;
    KFAC_TRY(be->packed_trace(be, L->d, a, &ta));
    KFAC_TRY(be->packed_trace(be, L->k, g, &tg));
    double pi = kfac_pi_from_traces(L->d, ta, L->k, tg);
    float shift_a = (float)(pi * gamma), shift_g = (float)(gamma / pi);
    if (p->cfg.inverse == KFAC_INVERSE_CHOLESKY) {
        KFAC_TRY(be->inverse_cholesky(be, L->d, a, shift_a, L->ainv, p->inv_ws));
        return be->inverse_cholesky(be, L->k, g, shift_g, L->ginv, p->inv_ws);
    }
    if (p->cfg.exact_kronecker) { /* the eigenpairs stay: damping applies at preconditioning */
        KFAC_TRY(be->eigh(be, L->d, a, L->da, L->qa, p->inv_ws));
        return be->eigh(be, L->k, g, L->dg, L->qg, p->inv_ws);
    }
    /* each factor's eigenpairs pass through shared scratch into its inverse */
    KFAC_TRY(be->eigh(be, L->d, a, p->eig_d, p->eig_q, p->inv_ws));
    KFAC_TRY(be->inverse_from_eig(be, L->d, p->eig_d, p->eig_q, shift_a, L->ainv, p->inv_ws));
    KFAC_TRY(be->eigh(be, L->k, g, p->eig_d, p->eig_q, p->inv_ws));
    return be->inverse_from_eig(be, L->k, p->eig_d, p->eig_q, shift_g, L->ginv, p->inv_ws);
}

/* Inverts this rank's due layers; every rank advances the schedule.  With
 * reduce_at_inverse the owners first receive the mean of the ranks' running
 * factors (in their batch buffers), and invert and precondition from it. */
static kfac_status invert_due(kfac_precond *p, double epoch)
{
    double lambda = damping_at(p, epoch);
    int any = 0;
    for (int i = 0; i < p->num_layers; i++) any |= p->layers[i].inverse_due && p->layers[i].has_factors;
    if (any && p->cfg.reduce_at_inverse) KFAC_TRY(reduce_factors(p, 1, 1.0f / (float)p->size));
    double t0 = kfac__now_seconds();
    for (int i = 0; i < p->num_layers; i++) {
        layer *L = &p->layers[i];
        if (!L->inverse_due || !L->has_factors) continue;
        if (mine(p, L)) {
            int shared = p->cfg.reduce_at_inverse;
            if (L->kind != KFAC_NODE_BN)
                KFAC_TRY(invert_layer(p, L, shared ? L->a_batch : L->a, shared ? L->g_batch : L->g,
                                      lambda));
            else /* BN's "inverse" is its Fisher as of now, on the inverse schedule */
                KFAC_TRY(copy_floats(p->be, L->fisher_inv, shared ? L->fisher_batch : L->fisher,
                                     L->factor_len));
            L->inverse_count++;
            p->stats.inverse_refreshes++;
        }
        L->has_inverse = 1;
        L->stale = 0;
        L->next_inverse = p->step + p->cfg.inverse_interval;
    }
    p->stats.seconds_invert += kfac__now_seconds() - t0;
    return KFAC_OK;
}

/* A layer's gbuf block is the matrix K-FAC works on: [dW | db] (k x d)
 * for conv/FC, [dgamma | dbeta] for BN.  From the model's gradients
 * (to_block), and back. */
static kfac_status move_grad(const kfac_precond *p, const layer *L, float *grads, float *block,
                             int to_block)
{
    kfac_backend *be = p->be;
    float *w = grads + kfac_model_param_tensor(p->model, L->weight)->offset;
    float *b = L->bias >= 0 ? grads + kfac_model_param_tensor(p->model, L->bias)->offset : NULL;
    const size_t f = sizeof(float);
    if (L->kind == KFAC_NODE_BN) {
        size_t c = (size_t)L->channels;
        KFAC_TRY(to_block ? copy_floats(be, block, w, c) : copy_floats(be, w, block, c));
        return to_block ? copy_floats(be, block + c, b, c) : copy_floats(be, b, block + c, c);
    }
    /* k rows of dw weights, d floats apart in the block; the bias is column dw */
    size_t k = (size_t)L->k, dw = (size_t)L->dw, d = (size_t)L->d;
    if (to_block) {
        KFAC_TRY(be->copy2d(be, k, dw * f, block, d * f, w, dw * f));
        return b ? be->copy2d(be, k, f, block + dw, d * f, b, f) : KFAC_OK;
    }
    KFAC_TRY(be->copy2d(be, k, dw * f, w, dw * f, block, d * f));
    return b ? be->copy2d(be, k, f, b, f, block + dw, d * f) : KFAC_OK;
}

static size_t my_grad_offset(const kfac_precond *p)
{
    size_t off = 0;
    for (int r = 0; r < p->rank; r++) off += p->grad_counts[r];
    return off;
}

static size_t all_grads(const kfac_precond *p)
{
    size_t total = 0;
    for (int r = 0; r < p->size; r++) total += p->grad_counts[r];
    return total;
}

/* Reduce-scatters every K-FAC layer's gradient to its owner; the owner's
 * block lands at its place in gbuf, scaled to a mean. */
static kfac_status reduce_grads(kfac_precond *p, float scale)
{
    kfac_backend *be = p->be;
    float *grads = kfac_model_grads(p->model);
    for (int k = 0; k < p->num_layers; k++) {
        layer *L = &p->layers[p->order[k]];
        KFAC_TRY(move_grad(p, L, grads, p->gbuf + L->grad_off, 1));
    }
    if (p->size == 1) /* the reduce-scatter is a copy */
        return scale == 1.0f ? KFAC_OK : be->axpby(be, all_grads(p), 0.0f, NULL, scale, p->gbuf);
    size_t my_off = my_grad_offset(p), mine_len = p->grad_counts[p->rank];
    KFAC_TRY(be->download(be, p->gstage, p->gbuf, all_grads(p) * sizeof(float)));
    double t0 = kfac__now_seconds();
    KFAC_TRY(kfac_comm_reduce_scatterv(p->comm, p->gstage, p->grecv, p->grad_counts, KFAC_F32,
                                       KFAC_STAGE_GRAD_REDUCE));
    p->stats.seconds_comm += kfac__now_seconds() - t0;
    for (size_t i = 0; i < mine_len; i++) p->grecv[i] *= scale;
    return be->upload(be, p->gbuf + my_off, p->grecv, mine_len * sizeof(float));
}

/* Preconditions one owned layer's gradient block in place; *pg (backend
 * memory) = <P, g>. */
static kfac_status precondition_layer(kfac_precond *p, layer *L, float *block, double lambda,
                                      double *pg)
{
    kfac_backend *be = p->be;
    size_t c = (size_t)L->channels;
    if (L->kind == KFAC_NODE_BN)
        KFAC_TRY(be->bn_precondition(be, L->channels, L->fisher_inv, (float)lambda,
                                     p->cfg.bn == KFAC_BN_DIAGONAL, block, block + c, p->pmat,
                                     p->pmat + c));
    else if (p->cfg.exact_kronecker)
        KFAC_TRY(be->precondition_eig_exact(be, L->k, L->d, L->qg, L->dg, L->qa, L->da,
                                            (float)lambda, block, p->pmat, p->tmp));
    else
        KFAC_TRY(be->precondition(be, L->k, L->d, L->ginv, L->ainv, block, p->pmat, p->tmp));
    KFAC_TRY(be->dot(be, L->grad_len, p->pmat, block, pg));
    return copy_floats(be, block, p->pmat, L->grad_len);
}

/* Owners precondition their blocks; the KL clip scale comes from <P, g>
 * summed over all layers (an f64 all-reduce of the owners' partial sums).
 * The per-layer dots stay in backend memory until all are queued: one
 * download (one wait on a device) reads them, summed in layer order. */
static kfac_status precondition_owned(kfac_precond *p, double epoch, float lr)
{
    double t0 = kfac__now_seconds(), lambda = damping_at(p, epoch), sum_pg = 0;
    for (int i = 0; i < p->num_layers; i++) {
        layer *L = &p->layers[i];
        if (!mine(p, L) || !L->has_inverse) continue;
        KFAC_TRY(precondition_layer(p, L, p->gbuf + L->grad_off, lambda, &p->pg[i]));
    }
    KFAC_TRY(p->be->download(p->be, p->pg_host, p->pg, (size_t)p->num_layers * sizeof(double)));
    for (int i = 0; i < p->num_layers; i++)
        if (mine(p, &p->layers[i]) && p->layers[i].has_inverse) sum_pg += p->pg_host[i];
    double t1 = kfac__now_seconds();
    KFAC_TRY(kfac_comm_allreduce(p->comm, &sum_pg, 1, KFAC_F64, KFAC_STAGE_OTHER));
    double t2 = kfac__now_seconds();
    double scale = kfac_kl_clip_scale(p->cfg.kl_clip, lr, sum_pg);
    if (scale < 1.0)
        for (int i = 0; i < p->num_layers; i++) {
            layer *L = &p->layers[i];
            if (!mine(p, L) || !L->has_inverse) continue;
            KFAC_TRY(p->be->axpby(p->be, L->grad_len, 0.0f, NULL, (float)scale,
                                  p->gbuf + L->grad_off));
        }
    p->stats.last_kl_scale = scale;
    p->stats.kl_scale_sum += scale;
    p->stats.kl_steps++;
    p->stats.kl_clipped += scale < 1.0;
    p->stats.seconds_comm += t2 - t1;
    p->stats.seconds_precondition += (t1 - t0) + (kfac__now_seconds() - t2);
    return KFAC_OK;
}

/* Every owner's preconditioned blocks to everyone, then into the model. */
static kfac_status gather_grads(kfac_precond *p)
{
    kfac_backend *be = p->be;
    if (p->size > 1) {
        size_t my_off = my_grad_offset(p), mine_len = p->grad_counts[p->rank];
        KFAC_TRY(be->download(be, p->gstage + my_off, p->gbuf + my_off, mine_len * sizeof(float)));
        double t0 = kfac__now_seconds();
        KFAC_TRY(kfac_comm_allgatherv(p->comm, p->gstage, p->grad_counts, KFAC_F32,
                                      KFAC_STAGE_PRECOND_GATHER));
        p->stats.seconds_comm += kfac__now_seconds() - t0;
        KFAC_TRY(be->upload(be, p->gbuf, p->gstage, all_grads(p) * sizeof(float)));
    }
    float *grads = kfac_model_grads(p->model);
    for (int i = 0; i < p->num_layers; i++)
        KFAC_TRY(move_grad(p, &p->layers[i], grads, p->gbuf + p->layers[i].grad_off, 0));
    return KFAC_OK;
}

/* ---- the step ---- */

int kfac_precond_begin(kfac_precond *p, long step, int micro_batches)
{
    p->micro_batches = micro_batches < 1 ? 1 : micro_batches;
    p->micro = 0;
    return kfac_precond_plan(p, step);
}

int kfac_precond_capture_in_backward(const kfac_precond *p)
{
    return p->any_factor_due && p->cfg.fisher != KFAC_FISHER_SAMPLED;
}

static kfac_status backward(kfac_precond *p, int n, int with_capture)
{
    if (with_capture) kfac_model_set_backward_hook(p->model, capture_hook, p);
    kfac_status st = kfac_model_backward(p->model, n);
    kfac_model_set_backward_hook(p->model, NULL, NULL);
    return st;
}

kfac_status kfac_precond_sampled_pass(kfac_precond *p, int n, long micro_index)
{
    if (!p->any_factor_due || p->cfg.fisher != KFAC_FISHER_SAMPLED) return KFAC_OK;
    uint64_t seed = kfac_mix64(kfac_mix64(p->cfg.seed, (uint64_t)p->step), (uint64_t)micro_index);
    KFAC_TRY(kfac_model_loss_sampled(p->model, n, seed));
    return backward(p, n, 1);
}

void kfac_precond_end_micro(kfac_precond *p) { p->micro++; }

kfac_status kfac_precond_finish(kfac_precond *p, double epoch, float lr, float grad_scale)
{
    if (p->any_factor_due) KFAC_TRY(refresh_factors(p));
    KFAC_TRY(reduce_grads(p, grad_scale));
    KFAC_TRY(invert_due(p, epoch));
    KFAC_TRY(precondition_owned(p, epoch, lr));
    return gather_grads(p);
}

kfac_status kfac_precond_step(kfac_precond *p, long step, double epoch, float lr, int n,
                              const int32_t *labels, float smoothing, double *loss_sum,
                              int *correct)
{
    kfac_model *m = p->model;
    kfac_precond_begin(p, step, 1);
    KFAC_TRY(kfac_model_forward(m, n, KFAC_MODE_TRAIN));
    KFAC_TRY(kfac_precond_sampled_pass(p, n, 0));
    KFAC_TRY(kfac_model_loss(m, n, labels, smoothing, loss_sum, correct));
    KFAC_TRY(backward(p, n, kfac_precond_capture_in_backward(p)));
    kfac_precond_end_micro(p);
    return kfac_precond_finish(p, epoch, lr, 1.0f);
}

/* ---- introspection ---- */

void kfac_precond_get_stats(const kfac_precond *p, kfac_precond_stats *out) { *out = p->stats; }

const char *kfac_precond_layer_name(const kfac_precond *p, int index)
{
    return p->layers[index].name;
}

void kfac_precond_layer_counts(const kfac_precond *p, int index, long *factors, long *inverses)
{
    *factors = p->layers[index].factor_count;
    *inverses = p->layers[index].inverse_count;
}
