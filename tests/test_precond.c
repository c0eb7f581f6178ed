/* test_precond.c - the K-FAC optimizer around real model steps:
 *  - the refresh schedule: factors and inverses are recomputed exactly at
 *    the scheduled steps (counted per layer), with and without SP-NGD's
 *    adaptive interval;
 *  - the FC layer's preconditioned gradient after one step equals
 *    G^-1 dW A^-1 built in double from the definitions (A from the pooled
 *    features with an appended 1, G from the softmax gradient), for both
 *    inverse paths;
 *  - the sampled Fisher (an extra backward at sampled labels) refreshes
 *    every layer at every warm-up step, and needs a model that keeps its
 *    activations through backward;
 *  - dynamic loss scaling (fp16's, here in float32, where scaling by a
 *    power of 2 is exact): K-FAC training through the step (kfac_step_run)
 *    with a loss scale of 2^10 gives the parameters of training without
 *    one bit for bit, for the empirical and the sampled Fisher, so the
 *    captured factors hold the unscaled loss's statistics; and a step whose
 *    gradients are not finite (a NaN in its input) is skipped without a
 *    trace, in a step that refreshes factors and in one that does not. */
#include <math.h>
#include <string.h>

#include "kfac/kfac_precond.h"
#include "kfac/kfac_resnet.h"
#include "kfac/kfac_step.h"
#include "testutil.h"

#define N 8
#define S 8

static kfac_backend *be;
static int32_t labels[N];

/* keep: the model keeps its activations through backward (a sampled
 * Fisher's second backward needs them). */
static kfac_model *tiny_model(int keep)
{
    kfac_model *m = NULL;
    kfac_resnet_options opt = {.image_size = S, .in_channels = 1, .num_classes = 5,
                               .keep_activations = keep};
    CHECK_OK(kfac_resnet_build("resnet8-fmnist", &opt, be, N, 3, &m));
    unsigned long long seed = 21;
    float *x = kfac_model_input(m);
    for (int i = 0; i < N * S * S; i++) x[i] = (float)test_uniform(&seed);
    for (int i = 0; i < N; i++) labels[i] = i % 5;
    return m;
}

static void run_steps(kfac_precond *p, long steps)
{
    for (long s = 0; s < steps; s++) {
        double loss;
        int correct;
        CHECK_OK(kfac_precond_step(p, s, 0.0, 0.1f, N, labels, 0.0f, &loss, &correct));
    }
}

/* Without SGD updates the input and weights stay fixed, so every batch
 * estimate equals the running factor and the adaptive interval doubles. */
static void check_schedule(int adaptive)
{
    kfac_model *m = tiny_model(0);
    kfac_precond_config cfg;
    kfac_precond_config_defaults(&cfg);
    cfg.warmup_steps = adaptive ? 1 : 3;
    cfg.factor_interval = adaptive ? 2 : 4;
    cfg.inverse_interval = adaptive ? 1 : 8;
    cfg.adaptive_threshold = adaptive ? 1e-3f : 0.0f;
    cfg.max_interval = 8;
    kfac_precond *p;
    CHECK_OK(kfac_precond_init(&p, m, &cfg));
    run_steps(p, 24);
    /* fixed:    factors at 0,1,2 then every 4: 6,10,14,18,22 -> 8;
     *           inverses at 0,1,2 then every 8 once stale: 10,18 -> 5
     * adaptive: factors at 0, then intervals 2,4,8,8: 2,6,14,22 -> 5;
     *           inverses follow each refresh -> 5 */
    long want_f = adaptive ? 5 : 8, want_i = 5;
    kfac_precond_stats st;
    kfac_precond_get_stats(p, &st);
    CHECK(st.layers == 10, "resnet8 has 9 convs + 1 fc as K-FAC layers, got %d", st.layers);
    CHECK(st.bn_layers == 9, "resnet8 has 9 BN layers, got %d", st.bn_layers);
    for (int i = 0; i < st.layers; i++) {
        long f, inv;
        kfac_precond_layer_counts(p, i, &f, &inv);
        CHECK(f == want_f && inv == want_i, "adaptive=%d %s: %ld factor and %ld inverse refreshes, "
              "expected %ld and %ld", adaptive, kfac_precond_layer_name(p, i), f, inv, want_f, want_i);
    }
    /* BN Fishers refresh on the base interval */
    long f, inv, want_bn = adaptive ? 12 : 8;
    kfac_precond_layer_counts(p, st.layers, &f, &inv);
    CHECK(f == want_bn, "bn refreshes %ld, expected %ld", f, want_bn);
    kfac_precond_free(p);
    kfac_model_free(m);
}

/* Dense double inverse of a small SPD matrix (Gauss-Jordan). */
static void invert_dense(int n, double *a, double *inv)
{
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) inv[i * n + j] = i == j;
    for (int c = 0; c < n; c++) {
        double piv = a[c * n + c];
        for (int j = 0; j < n; j++) {
            a[c * n + j] /= piv;
            inv[c * n + j] /= piv;
        }
        for (int r = 0; r < n; r++) {
            if (r == c) continue;
            double f = a[r * n + c];
            for (int j = 0; j < n; j++) {
                a[r * n + j] -= f * a[c * n + j];
                inv[r * n + j] -= f * inv[c * n + j];
            }
        }
    }
}

static void check_fc_preconditioning(kfac_inverse method)
{
    kfac_model *m = tiny_model(0);
    kfac_precond_config cfg;
    kfac_precond_config_defaults(&cfg);
    cfg.inverse = method;
    cfg.kl_clip = 0; /* compare the raw preconditioned gradient */
    cfg.damping = 1e-2f;
    kfac_precond *p;
    CHECK_OK(kfac_precond_init(&p, m, &cfg));
    /* the FC layer: last node; its input is the pooled feature (N x 64).
     * Backward's gradients reuse its memory, so it is read from a forward
     * before the step: the step's forward repeats it bit for bit. */
    int fc = kfac_model_num_nodes(m) - 1;
    kfac_layer_view v;
    kfac_model_layer(m, fc, N, &v);
    const int c = v.conv.c, k = v.conv.k, d = c + 1;
    CHECK_OK(kfac_model_forward(m, N, KFAC_MODE_TRAIN));
    float *features = malloc((size_t)N * c * sizeof *features);
    memcpy(features, v.x, (size_t)N * c * sizeof *features);
    double loss;
    int correct;
    CHECK_OK(kfac_precond_step(p, 0, 0.0, 0.1f, N, labels, 0.0f, &loss, &correct));
    const float *logits = kfac_model_logits(m);
    double *A = calloc((size_t)d * d, sizeof(double)), *G = calloc((size_t)k * k, sizeof(double));
    double *dW = calloc((size_t)k * d, sizeof(double)), *dy = malloc((size_t)N * k * sizeof(double));
    for (int i = 0; i < N; i++) {
        double zmax = -1e30, sum = 0;
        for (int j = 0; j < k; j++) zmax = fmax(zmax, logits[i * k + j]);
        for (int j = 0; j < k; j++) sum += exp(logits[i * k + j] - zmax);
        for (int j = 0; j < k; j++)
            dy[i * k + j] = (exp(logits[i * k + j] - zmax) / sum - (j == labels[i])) / N;
    }
    for (int i = 0; i < N; i++) {
        double a[65];
        for (int j = 0; j < c; j++) a[j] = features[i * c + j];
        a[c] = 1.0;
        for (int r = 0; r < d; r++)
            for (int s = 0; s < d; s++) A[r * d + s] += a[r] * a[s] / N;
        for (int r = 0; r < k; r++) {
            for (int s = 0; s < k; s++) G[r * k + s] += (double)N * dy[i * k + r] * dy[i * k + s];
            for (int s = 0; s < d; s++) dW[r * d + s] += dy[i * k + r] * a[s];
        }
    }
    double ta = 0, tg = 0;
    for (int i = 0; i < d; i++) ta += A[i * d + i];
    for (int i = 0; i < k; i++) tg += G[i * k + i];
    double gamma = sqrt(1e-2), pi = sqrt((ta / d) / (tg / k));
    for (int i = 0; i < d; i++) A[i * d + i] += pi * gamma;
    for (int i = 0; i < k; i++) G[i * k + i] += gamma / pi;
    double *Ai = malloc((size_t)d * d * sizeof(double)), *Gi = malloc((size_t)k * k * sizeof(double));
    invert_dense(d, A, Ai);
    invert_dense(k, G, Gi);
    double *want = calloc((size_t)k * d, sizeof(double));
    for (int r = 0; r < k; r++)
        for (int s = 0; s < d; s++) {
            double acc = 0;
            for (int u = 0; u < k; u++)
                for (int w = 0; w < d; w++) acc += Gi[r * k + u] * dW[u * d + w] * Ai[w * d + s];
            want[r * d + s] = acc;
        }
    const float *grads = kfac_model_grads(m);
    const float *pw = grads + kfac_model_param_tensor(m, v.param[0])->offset;
    const float *pb = grads + kfac_model_param_tensor(m, v.param[1])->offset;
    float *got = malloc((size_t)k * d * sizeof(float));
    for (int r = 0; r < k; r++) {
        for (int s = 0; s < c; s++) got[r * d + s] = pw[r * c + s];
        got[r * d + c] = pb[r];
    }
    double err = test_max_rel_err(got, want, (size_t)k * d, 1e-6);
    /* float factors and float inverses of matrices with condition ~1e3 */
    CHECK(err < 2e-3, "fc preconditioned gradient (%s) rel err %.2e",
          method == KFAC_INVERSE_EIG ? "eig" : "cholesky", err);
    free(A); free(G); free(dW); free(dy); free(Ai); free(Gi); free(want); free(got);
    free(features);
    kfac_precond_free(p);
    kfac_model_free(m);
}

static void check_sampled(void)
{
    kfac_model *m = tiny_model(0);
    kfac_precond_config cfg;
    kfac_precond_config_defaults(&cfg);
    cfg.fisher = KFAC_FISHER_SAMPLED;
    kfac_precond *p = NULL;
    CHECK(kfac_precond_init(&p, m, &cfg) == KFAC_EINVAL && !p,
          "a sampled Fisher on a model that frees activations in backward: %s",
          kfac_last_error());
    kfac_model_free(m);
    m = tiny_model(1);
    CHECK_OK(kfac_precond_init(&p, m, &cfg));
    run_steps(p, 3);
    kfac_precond_stats st;
    kfac_precond_get_stats(p, &st);
    CHECK(st.factor_refreshes == 3 * (st.layers + st.bn_layers), "sampled Fisher refreshed %ld",
          st.factor_refreshes);
    kfac_precond_free(p);
    kfac_model_free(m);
}

/* Layers whose names match an exclude pattern stay on plain SGD. */
static void check_exclude(void)
{
    kfac_model *m = tiny_model(0);
    kfac_precond_config cfg;
    kfac_precond_config_defaults(&cfg);
    cfg.exclude = "fc, layer1.*";
    kfac_precond *p;
    CHECK_OK(kfac_precond_init(&p, m, &cfg));
    kfac_precond_stats st;
    kfac_precond_get_stats(p, &st);
    /* layer1.0 holds conv1, conv2, bn1, bn2 */
    CHECK(st.layers == 10 - 1 - 2 && st.bn_layers == 9 - 2, "excluded: %d kron, %d bn layers left",
          st.layers, st.bn_layers);
    for (int i = 0; i < st.layers + st.bn_layers; i++) {
        const char *name = kfac_precond_layer_name(p, i);
        CHECK(strcmp(name, "fc") != 0 && strncmp(name, "layer1.", 7) != 0, "%s not excluded", name);
    }
    kfac_precond_free(p);
    kfac_model_free(m);
}

/* ---- loss scaling ---- */

/* The micro-batch loader: the fixed batch, except that call `poison`
 * (0-based; -1: none) puts a NaN in the input (a step whose gradients are
 * not finite), which the next call takes out again. */
typedef struct batch_source {
    kfac_model *m;
    long calls, poison;
    float saved;
} batch_source;

static kfac_status load_batch(void *user, int micro, int *n, const int32_t **out)
{
    batch_source *src = user;
    float *x = kfac_model_input(src->m);
    (void)micro;
    if (src->calls == src->poison) {
        src->saved = x[0];
        x[0] = NAN;
    } else if (src->poison >= 0 && src->calls == src->poison + 1) {
        x[0] = src->saved;
    }
    src->calls++;
    *n = N;
    *out = labels;
    return KFAC_OK;
}

/* Trains a fresh tiny model for `steps` steps with K-FAC through
 * kfac_step_run, with dynamic loss scaling from `scale` (0: none); step
 * `poison`'s input holds a NaN, and step `leave_out` is not run (-1:
 * neither).  Returns a copy of the parameters (*count floats, the caller
 * frees it); the loss scaler's end state to *ls. */
static float *train_scaled(kfac_fisher fisher, float scale, int steps, long poison,
                           long leave_out, size_t *count, kfac_loss_scale *ls)
{
    kfac_model *m = tiny_model(fisher == KFAC_FISHER_SAMPLED);
    kfac_precond_config cfg;
    kfac_precond_config_defaults(&cfg);
    cfg.fisher = fisher;
    cfg.warmup_steps = 2;
    cfg.factor_interval = 2;
    cfg.inverse_interval = 2;
    cfg.kl_clip = 1e-2f;
    kfac_precond *p = NULL;
    kfac_sgd *sgd = NULL;
    kfac_comm *self = NULL;
    kfac_gradsync *sync = NULL;
    kfac_sgd_config sc = {.momentum = 0.9f, .weight_decay = 5e-4f};
    kfac_gradsync_config gc = {.overlap = 1, .max_micro_batches = 1};
    CHECK_OK(kfac_precond_init(&p, m, &cfg));
    CHECK_OK(kfac_sgd_init(&sgd, m, &sc));
    CHECK_OK(kfac_comm_self(&self));
    CHECK_OK(kfac_step_gradsync(m, p, self, &gc, &sync));
    kfac_loss_scale_init(ls, scale, 1000);
    kfac_step st = {.model = m, .sgd = sgd, .kfac = p, .sync = sync,
                    .loss_scale = scale > 0 ? ls : NULL, .ranks = 1, .micro_batches = 1};
    batch_source src = {.m = m, .poison = poison};
    for (long s = 0; s < steps; s++) {
        double loss = 0;
        long correct = 0, seen = 0;
        if (s != leave_out)
            CHECK_OK(kfac_step_run(&st, s, 0.0, 0.05f, load_batch, &src, &loss, &correct, &seen));
    }
    *count = kfac_model_param_count(m);
    float *params = malloc(*count * sizeof(float));
    memcpy(params, kfac_model_params(m), *count * sizeof(float));
    kfac_gradsync_free(sync);
    kfac_comm_free(self);
    kfac_sgd_free(sgd);
    kfac_precond_free(p);
    kfac_model_free(m);
    return params;
}

static int count_differ(const float *a, const float *b, size_t n)
{
    int d = 0;
    for (size_t i = 0; i < n; i++) d += memcmp(&a[i], &b[i], sizeof(float)) != 0;
    return d;
}

static void check_loss_scale(kfac_fisher fisher)
{
    enum { STEPS = 8, POISON = 3 }; /* step 3: no refresh due (warm-up 2, interval 2) */
    const char *name = fisher == KFAC_FISHER_SAMPLED ? "sampled" : "empirical";
    size_t count;
    kfac_loss_scale ls;
    float *plain = train_scaled(fisher, 0, STEPS, -1, -1, &count, &ls);
    float *scaled = train_scaled(fisher, 1024.0f, STEPS, -1, -1, &count, &ls);
    CHECK(ls.skipped_steps == 0, "%s: %ld steps skipped at scale 1024", name, ls.skipped_steps);
    int d = count_differ(plain, scaled, count);
    CHECK(d == 0, "%s Fisher: loss scale 1024 changed %d of %zu parameters", name, d, count);
    free(plain);
    free(scaled);
    /* A step whose gradients are not finite is skipped and halves the
     * scale; it must leave no trace, whether K-FAC refreshes in it or not:
     * the run equals one without loss scaling that never ran that step. */
    for (long poison = POISON - 1; poison <= POISON; poison++) {
        scaled = train_scaled(fisher, 1024.0f, STEPS, poison, -1, &count, &ls);
        CHECK(ls.skipped_steps == 1 && ls.scale == 512.0f,
              "%s: NaN input at step %ld: %ld steps skipped, scale %g (want 1, 512)", name, poison,
              ls.skipped_steps, ls.scale);
        plain = train_scaled(fisher, 0, STEPS, -1, poison, &count, &ls);
        d = count_differ(plain, scaled, count);
        CHECK(d == 0, "%s: the skipped step %ld left a trace in %d of %zu parameters", name,
              poison, d, count);
        free(plain);
        free(scaled);
    }
}

int main(void)
{
    CHECK_OK(kfac_backend_get("cpu", 2, &be));
    check_schedule(0);
    check_schedule(1);
    check_fc_preconditioning(KFAC_INVERSE_EIG);
    check_fc_preconditioning(KFAC_INVERSE_CHOLESKY);
    check_sampled();
    check_exclude();
    check_loss_scale(KFAC_FISHER_EMPIRICAL);
    check_loss_scale(KFAC_FISHER_SAMPLED);
    kfac_backend_free(be);
    return test_summary("test_precond");
}
