/* test_cuda_ops.c - every CUDA backend operation against the CPU backend
 * (the reference) on the same random inputs: upload, run both, download,
 * compare.  Errors are max|gpu - cpu| / max(max|cpu|, 1e-6) per output.
 *
 * Tolerances (stated again beside each check):
 *   TOL_ELT  1e-5  fill, ReLU, add, SGD, pooling: the same float operations,
 *                  only fused multiply-adds may round differently;
 *   TOL_BN   1e-4  batch norm: double partial sums in another order, then
 *                  float coefficients (dx cancels between its terms);
 *   TOL_XENT 1e-4  softmax cross-entropy gradient and summed loss (double
 *                  log-sum-exp in another order); hit counts must be equal.
 *   TOL_CONV 1e-4  convolutions (cuDNN vs im2col + sgemm): fp32 sums of up
 *                  to a few hundred products in another order, ~1e-6
 *                  expected; TF32 inputs (rounded to 2^-11) would normally
 *                  exceed it, so it also guards TF32 being off by default.
 *   bf16 conversion must be bit-exact round-to-nearest-even; fp16 within
 *   half an ulp (2^-11 relative) for normal values.
 *
 * Without CUDA in the build, or without a GPU, prints "skipped: no GPU" and
 * returns 77 (ctest SKIP_RETURN_CODE). */
#include <string.h>

#include "kfac/kfac_backend.h"
#include "testutil.h"
#ifdef KFAC_HAVE_CUDA
#include "cuda/conv_cudnn.h"
#include "cuda/cuda_backend.h"
#endif

#define TOL_ELT 1e-5
#define TOL_BN 1e-4
#define TOL_XENT 1e-4
#define TOL_CONV 1e-4
#define ERR_FLOOR 1e-6

static unsigned long long seed = 7;
static kfac_backend *cpu, *gpu;

/* Device buffers, released at the end. */
static void *dev_ptrs[512];
static int dev_count;

/* Stops the test: later checks would only repeat the failure. */
#define REQUIRE_OK(expr)                                                                     \
    do {                                                                                     \
        kfac_status st__ = (expr);                                                           \
        if (st__ != KFAC_OK) {                                                               \
            fprintf(stderr, "FATAL %s:%d: %s -> %s: %s (%s)\n", __FILE__, __LINE__, #expr,   \
                    kfac_status_str(st__), kfac_last_error(), kfac_last_error_where());      \
            exit(1);                                                                         \
        }                                                                                    \
    } while (0)

static float *rnd(size_t n, double scale, double offset)
{
    float *v = malloc(n * sizeof *v);
    for (size_t i = 0; i < n; i++) v[i] = (float)(offset + scale * test_uniform(&seed));
    return v;
}

/* A device copy of n floats (or other bytes) of host memory. */
static void *dev_bytes(const void *h, size_t bytes)
{
    void *d;
    REQUIRE_OK(gpu->alloc(gpu, bytes, &d));
    if (h) REQUIRE_OK(gpu->upload(gpu, d, h, bytes));
    if (dev_count < (int)(sizeof dev_ptrs / sizeof *dev_ptrs)) dev_ptrs[dev_count++] = d;
    return d;
}

static float *dev(const float *h, size_t n) { return dev_bytes(h, n * sizeof(float)); }

/* Downloads n floats of d and compares them with the CPU's ref. */
static void compare(const char *what, const float *d, const float *ref, size_t n, double tol)
{
    float *got = malloc(n * sizeof *got);
    double *refd = malloc(n * sizeof *refd);
    REQUIRE_OK(gpu->download(gpu, got, d, n * sizeof *got));
    for (size_t i = 0; i < n; i++) refd[i] = ref[i];
    double err = test_max_rel_err(got, refd, n, ERR_FLOOR);
    printf("  %-50s max rel err %.2e (tol %.0e)\n", what, err, tol);
    CHECK(err <= tol, "%s: error %.3e > %.0e", what, err, tol);
    free(got);
    free(refd);
}

/* ---- element-wise ---- */

static void test_eltwise(void)
{
    const size_t n = 1000003; /* odd, several grid-stride rounds on small GPUs */
    char what[96];

    float *hx = rnd(n, 1.0, 0.0);
    float *dx_ = dev(NULL, n);
    REQUIRE_OK(cpu->fill(cpu, hx, 0.375f, n));
    REQUIRE_OK(gpu->fill(gpu, dx_, 0.375f, n));
    compare("fill", dx_, hx, n, TOL_ELT); /* TOL_ELT: exact expected */
    free(hx);

    float *x = rnd(n, 1.0, 0.0), *dy = rnd(n, 1.0, 0.0), *y = malloc(n * sizeof *y);
    float *d_x = dev(x, n), *d_dy = dev(dy, n), *d_y = dev(NULL, n);
    REQUIRE_OK(cpu->relu_forward(cpu, n, x, y));
    REQUIRE_OK(gpu->relu_forward(gpu, n, d_x, d_y));
    compare("relu_forward", d_y, y, n, TOL_ELT); /* TOL_ELT */
    for (int acc = 0; acc <= 1; acc++) {
        float *g = rnd(n, 1.0, 0.0), *d_g = dev(g, n);
        REQUIRE_OK(cpu->relu_backward(cpu, n, y, dy, g, acc));
        REQUIRE_OK(gpu->relu_backward(gpu, n, d_y, d_dy, d_g, acc));
        snprintf(what, sizeof what, "relu_backward acc=%d", acc);
        compare(what, d_g, g, n, TOL_ELT); /* TOL_ELT */
        free(g);
    }

    float *b = rnd(n, 1.0, 0.0), *d_b = dev(b, n);
    for (int relu = 0; relu <= 1; relu++) {
        REQUIRE_OK(cpu->add_forward(cpu, n, x, b, y, relu));
        REQUIRE_OK(gpu->add_forward(gpu, n, d_x, d_b, d_y, relu));
        snprintf(what, sizeof what, "add_forward relu=%d", relu);
        compare(what, d_y, y, n, TOL_ELT); /* TOL_ELT */
        REQUIRE_OK(gpu->upload(gpu, d_y, y, n * sizeof *y)); /* same mask on both */
        for (int acc = 0; acc <= 1; acc++) {
            float *ga = rnd(n, 1.0, 0.0), *gb = rnd(n, 1.0, 0.0);
            float *d_ga = dev(ga, n), *d_gb = dev(gb, n);
            REQUIRE_OK(cpu->add_backward(cpu, n, y, dy, ga, acc, gb, !acc, relu));
            REQUIRE_OK(gpu->add_backward(gpu, n, d_y, d_dy, d_ga, acc, d_gb, !acc, relu));
            snprintf(what, sizeof what, "add_backward relu=%d da (acc=%d)", relu, acc);
            compare(what, d_ga, ga, n, TOL_ELT); /* TOL_ELT */
            snprintf(what, sizeof what, "add_backward relu=%d db (acc=%d)", relu, !acc);
            compare(what, d_gb, gb, n, TOL_ELT); /* TOL_ELT */
            free(ga);
            free(gb);
        }
    }

    for (int nesterov = 0; nesterov <= 1; nesterov++) {
        float *p = rnd(n, 1.0, 0.0), *v = rnd(n, 0.1, 0.0);
        float *d_p = dev(p, n), *d_v = dev(v, n);
        for (int step = 0; step < 3; step++) {
            REQUIRE_OK(cpu->sgd_update(cpu, n, p, dy, v, 0.1f, 0.9f, 5e-4f, nesterov));
            REQUIRE_OK(gpu->sgd_update(gpu, n, d_p, d_dy, d_v, 0.1f, 0.9f, 5e-4f, nesterov));
        }
        snprintf(what, sizeof what, "sgd_update nesterov=%d p (3 steps)", nesterov);
        compare(what, d_p, p, n, TOL_ELT); /* TOL_ELT */
        snprintf(what, sizeof what, "sgd_update nesterov=%d v (3 steps)", nesterov);
        compare(what, d_v, v, n, TOL_ELT); /* TOL_ELT */
        free(p);
        free(v);
    }
    free(x);
    free(dy);
    free(y);
    free(b);
}

/* ---- batch norm ---- */

static void test_bn_shape(size_t m, int c, int relu)
{
    char what[96];
    const size_t n = m * c;
    const float momentum = 0.1f, eps = 1e-5f;
    /* An offset mean tests the shifted sums. */
    float *x = rnd(n, 2.0, 3.0), *gamma = rnd(c, 0.5, 1.0), *beta = rnd(c, 0.5, 0.0);
    float *rmean = rnd(c, 0.1, 0.0), *rvar = rnd(c, 0.2, 1.0);
    float *y = malloc(n * sizeof *y), *smean = malloc(c * sizeof *smean),
          *sinv = malloc(c * sizeof *sinv);
    float *d_x = dev(x, n), *d_gamma = dev(gamma, c), *d_beta = dev(beta, c);
    float *d_rmean = dev(rmean, c), *d_rvar = dev(rvar, c);
    float *d_y = dev(NULL, n), *d_smean = dev(NULL, c), *d_sinv = dev(NULL, c);

    REQUIRE_OK(cpu->bn_forward_train(cpu, m, c, x, gamma, beta, y, smean, sinv, rmean, rvar,
                                     momentum, eps, relu));
    REQUIRE_OK(gpu->bn_forward_train(gpu, m, c, d_x, d_gamma, d_beta, d_y, d_smean, d_sinv,
                                     d_rmean, d_rvar, momentum, eps, relu));
#define BN_CMP(name, d, h, len)                                                             \
    do {                                                                                    \
        snprintf(what, sizeof what, "bn %s m=%zu c=%d relu=%d", name, m, c, relu);          \
        compare(what, d, h, len, TOL_BN); /* TOL_BN */                                      \
    } while (0)
    BN_CMP("train y", d_y, y, n);
    BN_CMP("train save_mean", d_smean, smean, (size_t)c);
    BN_CMP("train save_invstd", d_sinv, sinv, (size_t)c);
    BN_CMP("train run_mean", d_rmean, rmean, (size_t)c);
    BN_CMP("train run_var", d_rvar, rvar, (size_t)c);

    float *ye = malloc(n * sizeof *ye);
    REQUIRE_OK(cpu->bn_forward_eval(cpu, m, c, x, gamma, beta, ye, rmean, rvar, eps, relu));
    REQUIRE_OK(gpu->upload(gpu, d_rmean, rmean, c * sizeof(float)));
    REQUIRE_OK(gpu->upload(gpu, d_rvar, rvar, c * sizeof(float)));
    REQUIRE_OK(gpu->bn_forward_eval(gpu, m, c, d_x, d_gamma, d_beta, d_y, d_rmean, d_rvar, eps,
                                    relu));
    BN_CMP("eval y", d_y, ye, n);

    /* Backward from the CPU's forward outputs on both sides (same ReLU mask). */
    REQUIRE_OK(gpu->upload(gpu, d_y, y, n * sizeof *y));
    REQUIRE_OK(gpu->upload(gpu, d_smean, smean, c * sizeof(float)));
    REQUIRE_OK(gpu->upload(gpu, d_sinv, sinv, c * sizeof(float)));
    float *dy = rnd(n, 1.0, 0.0), *d_dy = dev(dy, n);
    float *dg = malloc(c * sizeof *dg), *db = malloc(c * sizeof *db);
    float *d_dg = dev(NULL, c), *d_db = dev(NULL, c);
    for (int acc = 0; acc <= 1; acc++) {
        float *dx = rnd(n, 1.0, 0.0), *d_dx = dev(dx, n);
        REQUIRE_OK(cpu->bn_backward(cpu, m, c, x, y, dy, gamma, smean, sinv, dx, acc, dg, db,
                                    relu));
        REQUIRE_OK(gpu->bn_backward(gpu, m, c, d_x, d_y, d_dy, d_gamma, d_smean, d_sinv, d_dx,
                                    acc, d_dg, d_db, relu));
        BN_CMP(acc ? "backward dx (acc)" : "backward dx", d_dx, dx, n);
        BN_CMP("backward dgamma", d_dg, dg, (size_t)c);
        BN_CMP("backward dbeta", d_db, db, (size_t)c);
        free(dx);
    }
#undef BN_CMP
    free(x); free(gamma); free(beta); free(rmean); free(rvar); free(y); free(smean);
    free(sinv); free(ye); free(dy); free(dg); free(db);
}

static void test_bn(void)
{
    test_bn_shape(3, 5, 0);
    test_bn_shape(256, 64, 1);        /* 4x8x8 images, 64 channels */
    test_bn_shape(20000, 19, 0);      /* many row blocks, a partial channel tile */
    test_bn_shape(8 * 14 * 14, 130, 1);
}

/* ---- pooling ---- */

static void test_maxpool(int n, int h, int w, int c, int k, int stride, int pad)
{
    char what[96];
    kfac_pool_desc d;
    kfac_pool_desc_init(&d, n, h, w, c, k, stride, pad);
    size_t nx = (size_t)n * h * w * c, ny = (size_t)n * d.ho * d.wo * c;
    /* Values on a 1/4 grid: ties, so the first-max rule is exercised. */
    float *x = rnd(nx, 1.0, 0.0);
    for (size_t i = 0; i < nx; i++) x[i] = (float)(int)(x[i] * 4.0f) / 4.0f;
    float *y = malloc(ny * sizeof *y), *dy = rnd(ny, 1.0, 0.0);
    float *d_x = dev(x, nx), *d_y = dev(NULL, ny), *d_dy = dev(dy, ny);
    REQUIRE_OK(cpu->maxpool_forward(cpu, &d, x, y));
    REQUIRE_OK(gpu->maxpool_forward(gpu, &d, d_x, d_y));
    snprintf(what, sizeof what, "maxpool_forward %dx%dx%d k%d s%d p%d", h, w, c, k, stride, pad);
    compare(what, d_y, y, ny, TOL_ELT); /* TOL_ELT: exact expected */
    for (int acc = 0; acc <= 1; acc++) {
        float *dx = rnd(nx, 1.0, 0.0), *d_dx = dev(dx, nx);
        REQUIRE_OK(cpu->maxpool_backward(cpu, &d, x, y, dy, dx, acc));
        REQUIRE_OK(gpu->maxpool_backward(gpu, &d, d_x, d_y, d_dy, d_dx, acc));
        snprintf(what, sizeof what, "maxpool_backward %dx%dx%d k%d s%d p%d acc=%d", h, w, c, k,
                 stride, pad, acc);
        compare(what, d_dx, dx, nx, TOL_ELT); /* TOL_ELT */
        free(dx);
    }
    free(x);
    free(y);
    free(dy);
}

static void test_gap(int n, int hw, int c)
{
    char what[96];
    size_t nx = (size_t)n * hw * c, ny = (size_t)n * c;
    float *x = rnd(nx, 1.0, 0.0), *y = malloc(ny * sizeof *y), *dy = rnd(ny, 1.0, 0.0);
    float *d_x = dev(x, nx), *d_y = dev(NULL, ny), *d_dy = dev(dy, ny);
    REQUIRE_OK(cpu->gap_forward(cpu, n, hw, c, x, y));
    REQUIRE_OK(gpu->gap_forward(gpu, n, hw, c, d_x, d_y));
    snprintf(what, sizeof what, "gap_forward n=%d hw=%d c=%d", n, hw, c);
    compare(what, d_y, y, ny, TOL_ELT); /* TOL_ELT */
    for (int acc = 0; acc <= 1; acc++) {
        float *dx = rnd(nx, 1.0, 0.0), *d_dx = dev(dx, nx);
        REQUIRE_OK(cpu->gap_backward(cpu, n, hw, c, dy, dx, acc));
        REQUIRE_OK(gpu->gap_backward(gpu, n, hw, c, d_dy, d_dx, acc));
        snprintf(what, sizeof what, "gap_backward n=%d hw=%d c=%d acc=%d", n, hw, c, acc);
        compare(what, d_dx, dx, nx, TOL_ELT); /* TOL_ELT */
        free(dx);
    }
    free(x);
    free(y);
    free(dy);
}

/* ---- loss ---- */

static void test_xent(int n, int classes, float smoothing, int with_grad)
{
    char what[96];
    size_t nz = (size_t)n * classes;
    float *z = rnd(nz, 5.0, 0.0), *g = malloc(nz * sizeof *g);
    int32_t *labels = malloc(n * sizeof *labels);
    for (int i = 0; i < n; i++) labels[i] = (int32_t)((test_uniform(&seed) + 1.0) / 2.0 * classes);
    float *d_z = dev(z, nz), *d_g = dev(NULL, nz);
    int32_t *d_labels = dev_bytes(labels, n * sizeof *labels);
    double loss_c = 0, loss_g = 0;
    int hits_c = -1, hits_g = -2;
    REQUIRE_OK(cpu->softmax_xent(cpu, n, classes, z, labels, smoothing, with_grad ? g : NULL,
                                 &loss_c, &hits_c));
    REQUIRE_OK(gpu->softmax_xent(gpu, n, classes, d_z, d_labels, smoothing,
                                 with_grad ? d_g : NULL, &loss_g, &hits_g));
    double err = fabs(loss_g - loss_c) / fmax(fabs(loss_c), ERR_FLOOR);
    snprintf(what, sizeof what, "softmax_xent loss_sum n=%d classes=%d", n, classes);
    printf("  %-50s max rel err %.2e (tol %.0e)\n", what, err, TOL_XENT);
    CHECK(err <= TOL_XENT, "loss %.9g vs cpu %.9g", loss_g, loss_c); /* TOL_XENT */
    CHECK(hits_g == hits_c, "correct %d vs cpu %d", hits_g, hits_c);  /* exact */
    if (with_grad) {
        snprintf(what, sizeof what, "softmax_xent dlogits n=%d classes=%d eps=%.1f", n, classes,
                 smoothing);
        compare(what, d_g, g, nz, TOL_XENT); /* TOL_XENT */
    }
    /* A label out of range is EINVAL on both. */
    labels[n / 2] = classes;
    REQUIRE_OK(gpu->upload(gpu, d_labels, labels, n * sizeof *labels));
    kfac_status sc = cpu->softmax_xent(cpu, n, classes, z, labels, smoothing, NULL, &loss_c,
                                       &hits_c);
    kfac_status sg = gpu->softmax_xent(gpu, n, classes, d_z, d_labels, smoothing, NULL, &loss_g,
                                       &hits_g);
    CHECK(sc == KFAC_EINVAL && sg == KFAC_EINVAL, "bad label: cpu %d, gpu %d (%s)", sc, sg,
          kfac_last_error());
    free(z);
    free(g);
    free(labels);
}

/* ---- convolution (cuDNN) ---- */

/* One geometry's host inputs (x, w, bias, dy), the CPU's workspace and the
 * device copies; the GPU workspace is sized by conv_workspace for the full
 * batch and reused for a partial one, as the model does. */
typedef struct conv_case {
    kfac_conv_desc d;
    size_t nx, ny, nw;
    float *x, *w, *bias, *dy, *d_x, *d_w, *d_bias, *d_dy;
    void *cpu_ws, *gpu_ws;
} conv_case;

static void conv_check_forward(const conv_case *t, const kfac_conv_desc *d, const char *tag)
{
    char what[96];
    size_t ny = (size_t)d->n * d->ho * d->wo * d->k;
    float *y = malloc(ny * sizeof *y), *d_y = dev(NULL, ny);
    for (int with_bias = 0; with_bias <= 1; with_bias++) {
        const float *b = with_bias ? t->bias : NULL, *d_b = with_bias ? t->d_bias : NULL;
        REQUIRE_OK(cpu->conv_forward(cpu, d, t->x, t->w, b, y, t->cpu_ws));
        REQUIRE_OK(gpu->conv_forward(gpu, d, t->d_x, t->d_w, d_b, d_y, t->gpu_ws));
        snprintf(what, sizeof what, "conv fwd %s%s", tag, with_bias ? " +bias" : "");
        compare(what, d_y, y, ny, TOL_CONV); /* TOL_CONV */
    }
    free(y);
}

/* dx (overwrite, then accumulate onto random values), dw and db; dw and db
 * start as garbage on the GPU to check they are overwritten. */
static void conv_check_backward(const conv_case *t, const kfac_conv_desc *d, const char *tag)
{
    char what[96];
    size_t nx = (size_t)d->n * d->h * d->w * d->c, k = (size_t)d->k;
    float *dw = malloc(t->nw * sizeof *dw), *db = malloc(k * sizeof *db);
    float *junk_w = rnd(t->nw, 100.0, 0.0), *junk_b = rnd(k, 100.0, 0.0);
    float *d_dw = dev(junk_w, t->nw), *d_db = dev(junk_b, k);
    for (int acc = 0; acc <= 1; acc++) {
        float *dx = rnd(nx, 1.0, 0.0), *d_dx = dev(dx, nx);
        REQUIRE_OK(cpu->conv_backward(cpu, d, t->x, t->w, t->dy, dx, acc, dw, db, t->cpu_ws));
        REQUIRE_OK(gpu->conv_backward(gpu, d, t->d_x, t->d_w, t->d_dy, d_dx, acc, d_dw, d_db,
                                       t->gpu_ws));
        snprintf(what, sizeof what, "conv bwd %s dx%s", tag, acc ? " (acc)" : "");
        compare(what, d_dx, dx, nx, TOL_CONV); /* TOL_CONV */
        snprintf(what, sizeof what, "conv bwd %s dw", tag);
        compare(what, d_dw, dw, t->nw, TOL_CONV); /* TOL_CONV */
        snprintf(what, sizeof what, "conv bwd %s db", tag);
        compare(what, d_db, db, k, TOL_CONV); /* TOL_CONV */
        REQUIRE_OK(gpu->upload(gpu, d_dw, junk_w, t->nw * sizeof *junk_w));
        REQUIRE_OK(gpu->upload(gpu, d_db, junk_b, k * sizeof *junk_b));
        free(dx);
    }
    /* Weight gradient alone: no dx, no db. */
    REQUIRE_OK(cpu->conv_backward(cpu, d, t->x, t->w, t->dy, NULL, 0, dw, NULL, t->cpu_ws));
    REQUIRE_OK(gpu->conv_backward(gpu, d, t->d_x, t->d_w, t->d_dy, NULL, 0, d_dw, NULL,
                                  t->gpu_ws));
    snprintf(what, sizeof what, "conv bwd %s dw only", tag);
    compare(what, d_dw, dw, t->nw, TOL_CONV); /* TOL_CONV */
    free(dw); free(db); free(junk_w); free(junk_b);
}

static void test_conv(int n, int h, int w, int c, int k, int kh, int stride, int pad)
{
    conv_case t;
    char tag[64], algos[160];
    kfac_conv_desc_init(&t.d, n, h, w, c, k, kh, kh, stride, pad);
    const kfac_conv_desc *d = &t.d;
    t.nx = (size_t)n * h * w * c;
    t.ny = (size_t)n * d->ho * d->wo * k;
    t.nw = (size_t)k * kh * kh * c;
    /* Weights ~ 1/sqrt(fan-in), as initialised, so outputs stay O(1). */
    t.x = rnd(t.nx, 1.0, 0.0);
    t.w = rnd(t.nw, 1.0 / sqrt((double)kh * kh * c), 0.0);
    t.bias = rnd((size_t)k, 1.0, 0.0);
    t.dy = rnd(t.ny, 1.0, 0.0);
    t.d_x = dev(t.x, t.nx); t.d_w = dev(t.w, t.nw);
    t.d_bias = dev(t.bias, (size_t)k); t.d_dy = dev(t.dy, t.ny);
    t.cpu_ws = malloc(cpu->conv_workspace(cpu, d) + 1);
    size_t ws = gpu->conv_workspace(gpu, d);
    t.gpu_ws = dev_bytes(NULL, ws);
#ifdef KFAC_HAVE_CUDA
    REQUIRE_OK(kfac__cudnn_conv_describe(kfac__cuda(gpu), d, algos, sizeof algos));
#else
    snprintf(algos, sizeof algos, "-");
#endif
    snprintf(tag, sizeof tag, "n%d %dx%dx%d k%d %dx%d s%d p%d", n, h, w, c, k, kh, kh, stride,
             pad);
    printf("  conv %s: %s\n", tag, algos);

    conv_check_forward(&t, d, tag);
    conv_check_backward(&t, d, tag);
    if (n > 1) { /* a partial batch in the full batch's workspace */
        kfac_conv_desc part = *d;
        part.n = n / 2;
        snprintf(tag, sizeof tag, "n%d/%d %dx%dx%d k%d %dx%d s%d p%d", part.n, n, h, w, c, k, kh,
                 kh, stride, pad);
        conv_check_forward(&t, &part, tag);
        conv_check_backward(&t, &part, tag);
    }
    free(t.x); free(t.w); free(t.bias); free(t.dy); free(t.cpu_ws);
}

static void test_convs(void)
{
    test_conv(2, 8, 8, 16, 32, 3, 1, 1);  /* 3x3 stride 1: the bottleneck middle */
    test_conv(2, 9, 9, 16, 24, 3, 2, 1);  /* 3x3 stride 2, odd size: downsampling */
    test_conv(3, 7, 7, 32, 64, 1, 1, 0);  /* 1x1 expand/reduce */
    test_conv(2, 8, 8, 32, 16, 1, 2, 0);  /* 1x1 stride 2: projection shortcut */
    test_conv(2, 32, 32, 3, 64, 7, 2, 3); /* the stem on a small image */
    test_conv(8, 1, 1, 64, 10, 1, 1, 0);  /* the fully connected layer */
    test_conv(3, 5, 6, 3, 5, 3, 1, 1);    /* odd channels, non-square image */
}

/* ---- mixed-precision conversions (kernels.h, not in the op table) ---- */

#ifdef KFAC_HAVE_CUDA
static uint16_t bf16_rne(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static void test_conversions(void)
{
    const size_t n = 100003;
    cudaStream_t s = kfac__cuda(gpu)->stream;
    float *x = rnd(n, 1.0, 0.0), *back = malloc(n * sizeof *back);
    /* Normal fp16 range: |x| in [1e-3, 1e3]. */
    for (size_t i = 0; i < n; i++) x[i] = copysignf(powf(10.0f, 3.0f * x[i]), x[i]);
    uint16_t *h16 = malloc(n * sizeof *h16);
    float *d_x = dev(x, n), *d_back = dev(NULL, n);
    uint16_t *d_16 = dev_bytes(NULL, n * sizeof(uint16_t));

    REQUIRE_OK(kfac_k_f32_to_bf16(n, d_x, d_16, s) == cudaSuccess ? KFAC_OK : KFAC_EBACKEND);
    REQUIRE_OK(gpu->download(gpu, h16, d_16, n * sizeof *h16));
    size_t wrong = 0;
    for (size_t i = 0; i < n; i++) wrong += h16[i] != bf16_rne(x[i]);
    printf("  %-50s %zu of %zu differ from host RNE\n", "f32_to_bf16", wrong, n);
    CHECK(wrong == 0, "bf16 rounding"); /* bit-exact */
    REQUIRE_OK(kfac_k_bf16_to_f32(n, d_16, d_back, s) == cudaSuccess ? KFAC_OK : KFAC_EBACKEND);
    REQUIRE_OK(gpu->download(gpu, back, d_back, n * sizeof *back));
    wrong = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t u = (uint32_t)h16[i] << 16;
        float f;
        memcpy(&f, &u, sizeof f);
        wrong += back[i] != f;
    }
    CHECK(wrong == 0, "bf16_to_f32: %zu wrong", wrong); /* bit-exact */

    REQUIRE_OK(kfac_k_f32_to_f16(n, d_x, d_16, s) == cudaSuccess ? KFAC_OK : KFAC_EBACKEND);
    REQUIRE_OK(kfac_k_f16_to_f32(n, d_16, d_back, s) == cudaSuccess ? KFAC_OK : KFAC_EBACKEND);
    REQUIRE_OK(gpu->download(gpu, back, d_back, n * sizeof *back));
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)back[i] - x[i]) / fabs(x[i]);
        if (!(e <= worst)) worst = e;
    }
    printf("  %-50s max rel err %.2e (tol %.2e)\n", "f32 -> f16 -> f32", worst, ldexp(1.0, -11));
    CHECK(worst <= ldexp(1.0, -11), "fp16 round trip %.3e", worst); /* half an ulp */
    free(x);
    free(back);
    free(h16);
}
#endif

int main(void)
{
    kfac_status st = kfac_backend_get("cuda", 0, &gpu);
    if (st == KFAC_ENOTSUP || st == KFAC_ENODEV) {
        printf("test_cuda_ops: skipped: no GPU (%s)\n", kfac_last_error());
        return 77;
    }
    REQUIRE_OK(st);
    REQUIRE_OK(kfac_backend_get("cpu", 2, &cpu));
#ifdef KFAC_HAVE_CUDA
    printf("test_cuda_ops: GPU %d: %s, cuDNN %zu (built with %d.%d.%d), TF32 %s\n",
           kfac__cuda(gpu)->device, kfac__cuda(gpu)->device_name, cudnnGetVersion(), CUDNN_MAJOR,
           CUDNN_MINOR, CUDNN_PATCHLEVEL, kfac__cuda(gpu)->allow_tf32 ? "on" : "off");
#endif

    test_eltwise();
    test_bn();
    test_maxpool(2, 9, 9, 5, 3, 2, 1);   /* ResNet stem pooling: overlapping windows */
    test_maxpool(3, 8, 8, 16, 2, 2, 0);
    test_maxpool(2, 7, 6, 3, 3, 1, 1);
    test_gap(4, 49, 64);
    test_gap(3, 1, 10);
    test_xent(300, 10, 0.1f, 1);
    test_xent(64, 1000, 0.0f, 1);
    test_xent(5, 37, 0.2f, 0);
    test_convs();
#ifdef KFAC_HAVE_CUDA
    test_conversions();
#endif

    for (int i = 0; i < dev_count; i++) gpu->release(gpu, dev_ptrs[i]);
    kfac_backend_free(gpu);
    kfac_backend_free(cpu);
    return test_summary("test_cuda_ops");
}
