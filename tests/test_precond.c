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
 *    activations through backward. */
#include <string.h>

#include "kfac/kfac_precond.h"
#include "kfac/kfac_resnet.h"
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

int main(void)
{
    CHECK_OK(kfac_backend_get("cpu", 2, &be));
    check_schedule(0);
    check_schedule(1);
    check_fc_preconditioning(KFAC_INVERSE_EIG);
    check_fc_preconditioning(KFAC_INVERSE_CHOLESKY);
    check_sampled();
    check_exclude();
    kfac_backend_free(be);
    return test_summary("test_precond");
}
