/* precond.c - the K-FAC optimizer: per-layer factor state, the refresh
 * schedule, and the sequencing of capture, inversion, preconditioning and
 * KL clipping around one training step (see kfac_precond.h). */
#include <fnmatch.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kfac/kfac_factors.h"
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
    float *qa, *da, *qg, *dg;    /* eigendecompositions (eig path) */
    int channels;                /* bn */
    float *fisher, *fisher_batch;/* bn: 3 per channel */
    int has_factors, has_inverse, stale;
    int factor_due, inverse_due;
    int interval;                /* current factor refresh interval (adaptive) */
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
    void *gram_ws;
    float *sg, *sb;              /* bn per-sample sums: max_batch x max channels */
    float *gmat, *pmat, *tmp;    /* k x d gradient scratch, largest layer */
    float *chol_ws;              /* largest order squared */
    kfac_precond_stats stats;
};

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

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
    KFAC_TRY(alloc_floats(p, pa, &L->a));
    KFAC_TRY(alloc_floats(p, pa, &L->a_batch));
    KFAC_TRY(alloc_floats(p, pg, &L->g));
    KFAC_TRY(alloc_floats(p, pg, &L->g_batch));
    if (p->cfg.inverse == KFAC_INVERSE_EIG) {
        KFAC_TRY(alloc_floats(p, (size_t)L->d * L->d, &L->qa));
        KFAC_TRY(alloc_floats(p, (size_t)L->d, &L->da));
        KFAC_TRY(alloc_floats(p, (size_t)L->k * L->k, &L->qg));
        KFAC_TRY(alloc_floats(p, (size_t)L->k, &L->dg));
    }
    if (!(p->cfg.inverse == KFAC_INVERSE_EIG && p->cfg.exact_kronecker)) {
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
    size_t max_kd = 1, max_order = 1, max_ws = 0, max_c = 1;
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
                size_t ws = kfac_gram_patches_workspace(p->be, &v.conv);
                max_ws = ws > max_ws ? ws : max_ws;
                max_kd = (size_t)L->k * L->d > max_kd ? (size_t)L->k * L->d : max_kd;
                size_t order = (size_t)(L->d > L->k ? L->d : L->k);
                max_order = order > max_order ? order : max_order;
                p->stats.layers++;
            } else {
                L->channels = v.channels;
                KFAC_TRY(alloc_floats(p, 3 * (size_t)L->channels, &L->fisher));
                KFAC_TRY(alloc_floats(p, 3 * (size_t)L->channels, &L->fisher_batch));
                max_c = (size_t)v.channels > max_c ? (size_t)v.channels : max_c;
                p->stats.bn_layers++;
            }
        }
    KFAC_TRY(p->be->alloc(p->be, max_ws ? max_ws : 64, &p->gram_ws));
    KFAC_TRY(alloc_floats(p, (size_t)max_batch * max_c, &p->sg));
    KFAC_TRY(alloc_floats(p, (size_t)max_batch * max_c, &p->sb));
    KFAC_TRY(alloc_floats(p, max_kd, &p->gmat));
    KFAC_TRY(alloc_floats(p, max_kd, &p->pmat));
    KFAC_TRY(alloc_floats(p, max_kd, &p->tmp));
    return alloc_floats(p, max_order * max_order, &p->chol_ws);
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
    kfac_precond *p = calloc(1, sizeof *p);
    if (!p) return KFAC_ERR(KFAC_ENOMEM, "kfac: out of memory");
    p->model = m;
    p->be = kfac_model_backend(m);
    p->cfg = *cfg;
    snprintf(p->exclude, sizeof p->exclude, "%s", cfg->exclude ? cfg->exclude : "");
    p->cfg.exclude = p->exclude;
    kfac_status st = init_layers(p);
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
    }
    RELEASE(p->gram_ws); RELEASE(p->sg); RELEASE(p->sb); RELEASE(p->gmat);
    RELEASE(p->pmat); RELEASE(p->tmp); RELEASE(p->chol_ws);
#undef RELEASE
    free(p->layers);
    free(p->layer_of_node);
    free(p);
}

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
    return any;
}

/* After a refresh: SP-NGD's adaptive interval doubles while the running
 * factor moved less than the threshold, and resets when it moved more. */
static void schedule_next_factor(kfac_precond *p, layer *L, double change)
{
    if (p->cfg.adaptive_threshold > 0 && p->step >= p->cfg.warmup_steps) {
        if (change < p->cfg.adaptive_threshold)
            L->interval = 2 * L->interval < p->cfg.max_interval ? 2 * L->interval : p->cfg.max_interval;
        else
            L->interval = p->cfg.factor_interval;
    }
    L->next_factor = p->step + L->interval;
}

/* ---- capture (backward hook) ---- */

/* Folds a batch estimate into a running factor; returns the running
 * factor's relative change. */
static double fold(const kfac_precond *p, int order, float *running, const float *batch,
                   size_t len, int first)
{
    if (first) {
        memcpy(running, batch, len * sizeof(float));
        return INFINITY;
    }
    double change = (1.0 - p->cfg.factor_decay) * kfac_factor_change(order, running, batch);
    kfac_factor_average(len, running, batch, p->cfg.factor_decay);
    return change;
}

static kfac_status capture_kron(kfac_precond *p, layer *L, const kfac_layer_view *v, int n, int ns)
{
    kfac_conv_desc d = v->conv;
    d.n = ns;
    size_t rows = (size_t)ns * d.ho * d.wo;
    /* A = mean over patch rows; G = (1/ns) sum (n dy)(n dy)^T. */
    KFAC_TRY(kfac_gram_patches(p->be, &d, v->x, L->bias >= 0, 1.0f / (float)rows, L->a_batch,
                               p->gram_ws));
    KFAC_TRY(kfac_gram_rows(p->be, rows, L->k, v->dy, 0, (float)n * (float)n / (float)ns,
                            L->g_batch));
    double ca = fold(p, L->d, L->a, L->a_batch, kfac_packed_len(L->d), !L->has_factors);
    double cg = fold(p, L->k, L->g, L->g_batch, kfac_packed_len(L->k), !L->has_factors);
    schedule_next_factor(p, L, ca > cg ? ca : cg);
    return KFAC_OK;
}

/* Per-sample BN gradients (sums over locations of n * dy * xhat and of
 * n * dy) of the first ns images, then their 2x2 Fisher per channel. */
static void capture_bn(kfac_precond *p, layer *L, const kfac_layer_view *v, int n, int ns)
{
    int c = L->channels;
    size_t per_image = v->rows / (size_t)n;
    for (int i = 0; i < ns; i++) {
        float *sg = p->sg + (size_t)i * c, *sb = p->sb + (size_t)i * c;
        memset(sg, 0, c * sizeof(float));
        memset(sb, 0, c * sizeof(float));
        for (size_t t = (size_t)i * per_image; t < (size_t)(i + 1) * per_image; t++) {
            const float *x = v->x + t * c, *y = v->y + t * c, *dy = v->dy + t * c;
            for (int j = 0; j < c; j++) {
                float g = v->relu && y[j] <= 0.0f ? 0.0f : (float)n * dy[j];
                sg[j] += g * (x[j] - v->save_mean[j]) * v->save_invstd[j];
                sb[j] += g;
            }
        }
    }
    kfac_bn_unit_fisher(ns, c, p->sg, p->sb, L->fisher_batch);
    fold(p, 3, L->fisher, L->fisher_batch, 3 * (size_t)c, !L->has_factors);
    /* The 2x2 blocks are cheap: BN refreshes on the base interval. */
    L->next_factor = p->step + p->cfg.factor_interval;
}

static kfac_status capture(kfac_model *m, int node, int n, void *user)
{
    kfac_precond *p = user;
    int li = p->layer_of_node[node];
    if (li < 0 || !p->layers[li].factor_due) return KFAC_OK;
    layer *L = &p->layers[li];
    double t0 = now_seconds();
    kfac_layer_view v;
    kfac_model_layer(m, node, n, &v);
    int ns = (int)ceil(p->cfg.subsample * n);
    ns = ns < 1 ? 1 : ns > n ? n : ns;
    if (L->kind == KFAC_NODE_BN)
        capture_bn(p, L, &v, n, ns);
    else
        KFAC_TRY(capture_kron(p, L, &v, n, ns));
    L->has_factors = 1;
    L->stale = 1;
    L->factor_count++;
    p->stats.factor_refreshes++;
    p->stats.seconds_capture += now_seconds() - t0;
    return KFAC_OK;
}

/* ---- inversion and preconditioning ---- */

static double damping_at(const kfac_precond *p, double epoch)
{
    double lambda = p->cfg.damping * pow(p->cfg.damping_decay, epoch);
    return lambda > p->cfg.damping_min ? lambda : p->cfg.damping_min;
}

static kfac_status invert_layer(kfac_precond *p, layer *L, double lambda)
{
    double gamma = sqrt(lambda);
    double pi = kfac_pi_correction(L->d, L->a, L->k, L->g);
    float shift_a = (float)(pi * gamma), shift_g = (float)(gamma / pi);
    if (p->cfg.inverse == KFAC_INVERSE_CHOLESKY) {
        KFAC_TRY(kfac_inverse_cholesky(L->d, L->a, shift_a, L->ainv, p->chol_ws));
        return kfac_inverse_cholesky(L->k, L->g, shift_g, L->ginv, p->chol_ws);
    }
    KFAC_TRY(kfac_eigh(L->d, L->a, L->da, L->qa));
    KFAC_TRY(kfac_eigh(L->k, L->g, L->dg, L->qg));
    if (p->cfg.exact_kronecker) return KFAC_OK; /* damping applies at preconditioning */
    kfac_inverse_from_eig(L->d, L->da, L->qa, shift_a, L->ainv);
    kfac_inverse_from_eig(L->k, L->dg, L->qg, shift_g, L->ginv);
    return KFAC_OK;
}

kfac_status kfac_precond_invert_due(kfac_precond *p, double epoch)
{
    double t0 = now_seconds(), lambda = damping_at(p, epoch);
    for (int i = 0; i < p->num_layers; i++) {
        layer *L = &p->layers[i];
        if (!L->inverse_due || !L->has_factors) continue;
        if (L->kind != KFAC_NODE_BN) KFAC_TRY(invert_layer(p, L, lambda));
        L->has_inverse = 1;
        L->stale = 0;
        L->next_inverse = p->step + p->cfg.inverse_interval;
        L->inverse_count++;
        p->stats.inverse_refreshes++;
    }
    p->stats.seconds_invert += now_seconds() - t0;
    return KFAC_OK;
}

/* [dW | db] (k x d) from the model's gradients, and back. */
static void gather_grad(const kfac_precond *p, const layer *L, float *grads, float *gmat)
{
    const float *w = grads + kfac_model_param_tensor(p->model, L->weight)->offset;
    const float *b = L->bias >= 0 ? grads + kfac_model_param_tensor(p->model, L->bias)->offset : NULL;
    for (int r = 0; r < L->k; r++) {
        memcpy(gmat + (size_t)r * L->d, w + (size_t)r * L->dw, L->dw * sizeof(float));
        if (b) gmat[(size_t)r * L->d + L->dw] = b[r];
    }
}

static void scatter_grad(const kfac_precond *p, const layer *L, const float *pmat, float *grads)
{
    float *w = grads + kfac_model_param_tensor(p->model, L->weight)->offset;
    float *b = L->bias >= 0 ? grads + kfac_model_param_tensor(p->model, L->bias)->offset : NULL;
    for (int r = 0; r < L->k; r++) {
        memcpy(w + (size_t)r * L->dw, pmat + (size_t)r * L->d, L->dw * sizeof(float));
        if (b) b[r] = pmat[(size_t)r * L->d + L->dw];
    }
}

static double dot(const float *a, const float *b, size_t n)
{
    double s = 0;
    for (size_t i = 0; i < n; i++) s += (double)a[i] * b[i];
    return s;
}

/* Preconditions one layer's gradient in place; returns <P, g>. */
static double precondition_layer(kfac_precond *p, layer *L, float *grads, double lambda)
{
    if (L->kind == KFAC_NODE_BN) {
        float *dg = grads + kfac_model_param_tensor(p->model, L->weight)->offset;
        float *db = grads + kfac_model_param_tensor(p->model, L->bias)->offset;
        size_t c = (size_t)L->channels;
        memcpy(p->gmat, dg, c * sizeof(float));
        memcpy(p->gmat + c, db, c * sizeof(float));
        kfac_bn_precondition(L->channels, L->fisher, (float)lambda, p->cfg.bn == KFAC_BN_DIAGONAL,
                             dg, db, dg, db);
        return dot(p->gmat, dg, c) + dot(p->gmat + c, db, c);
    }
    size_t kd = (size_t)L->k * L->d;
    gather_grad(p, L, grads, p->gmat);
    if (p->cfg.exact_kronecker)
        kfac_precondition_eig_exact(L->k, L->d, L->qg, L->dg, L->qa, L->da, (float)lambda, p->gmat,
                                    p->pmat, p->tmp);
    else
        kfac_precondition(L->k, L->d, L->ginv, L->ainv, p->gmat, p->pmat, p->tmp);
    scatter_grad(p, L, p->pmat, grads);
    return dot(p->pmat, p->gmat, kd);
}

static void scale_layer(kfac_precond *p, const layer *L, float *grads, float s)
{
    for (int t = 0; t < 2; t++) {
        int idx = t == 0 ? L->weight : L->bias;
        if (idx < 0) continue;
        const kfac_param *pt = kfac_model_param_tensor(p->model, idx);
        for (size_t i = 0; i < pt->count; i++) grads[pt->offset + i] *= s;
    }
}

kfac_status kfac_precond_apply(kfac_precond *p, double epoch, float lr)
{
    double t0 = now_seconds(), lambda = damping_at(p, epoch), sum_pg = 0;
    float *grads = kfac_model_grads(p->model);
    for (int i = 0; i < p->num_layers; i++) {
        layer *L = &p->layers[i];
        if (L->has_inverse) sum_pg += precondition_layer(p, L, grads, lambda);
    }
    double scale = kfac_kl_clip_scale(p->cfg.kl_clip, lr, sum_pg);
    if (scale < 1.0)
        for (int i = 0; i < p->num_layers; i++)
            if (p->layers[i].has_inverse) scale_layer(p, &p->layers[i], grads, (float)scale);
    p->stats.last_kl_scale = scale;
    p->stats.seconds_precondition += now_seconds() - t0;
    return KFAC_OK;
}

/* ---- the step ---- */

static kfac_status backward(kfac_precond *p, int n, int with_capture)
{
    if (with_capture) kfac_model_set_backward_hook(p->model, capture, p);
    kfac_status st = kfac_model_backward(p->model, n);
    kfac_model_set_backward_hook(p->model, NULL, NULL);
    return st;
}

kfac_status kfac_precond_step(kfac_precond *p, long step, double epoch, float lr, int n,
                              const int32_t *labels, float smoothing, double *loss_sum,
                              int *correct)
{
    kfac_model *m = p->model;
    int capture_now = kfac_precond_plan(p, step);
    KFAC_TRY(kfac_model_forward(m, n, KFAC_MODE_TRAIN));
    int sampled = capture_now && p->cfg.fisher == KFAC_FISHER_SAMPLED;
    if (sampled) {
        KFAC_TRY(kfac_model_loss_sampled(m, n, kfac_mix64(p->cfg.seed, (uint64_t)step)));
        KFAC_TRY(backward(p, n, 1));
    }
    KFAC_TRY(kfac_model_loss(m, n, labels, smoothing, loss_sum, correct));
    KFAC_TRY(backward(p, n, capture_now && !sampled));
    KFAC_TRY(kfac_precond_invert_due(p, epoch));
    return kfac_precond_apply(p, epoch, lr);
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
