/* test_cuda_ops.c - every CUDA backend operation against the CPU backend
 * (the reference) on the same random inputs: upload, run both, download,
 * compare.  Errors are max|gpu - cpu| / max(max|cpu|, 1e-6) per output.
 *
 * Each test runs three times, on a CUDA backend whose activations are
 * float32, then bf16, then fp16 (kfac_backend_set_precision); the
 * convolutions run a fourth time, float32 with TF32 tensor cores allowed
 * (kfac_backend_set_tf32, train.precision tf32).  In the
 * 16-bit passes the float32 random inputs are uploaded, converted on the
 * device (be->convert) into 16-bit activations, and rounded on the host to
 * the same values (round to nearest even, checked bit for bit by
 * test_conversions); the CPU computes in float32 on those rounded values,
 * so the difference left is the GPU's rounding of its outputs.  Outputs
 * are converted back to float32 on the device and downloaded.  Parameters,
 * parameter gradients and statistics are float32 in every pass.
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
 *   16-bit activations: u = the unit roundoff of the type (half an ulp
 *   relative: bf16 2^-8 = 3.9e-3, fp16 2^-11 = 4.9e-4).  An output rounded
 *   once from a float result differs from the CPU's by at most u of the
 *   largest value plus the float32 tolerance:
 *   TOL_ELT_BF16 4e-3, TOL_ELT_F16 5e-4    u + float slack;
 *   TOL_BN_BF16 4.5e-3, TOL_BN_F16 7e-4    u + TOL_BN for y and dx; the
 *                  statistics, dgamma and dbeta are float (TOL_BN);
 *   TOL_XENT_BF16 4.5e-3, TOL_XENT_F16 7e-4  u + TOL_XENT for dlogits; the
 *                  loss is double from the same logits (TOL_XENT);
 *   TOL_CONV_BF16 1.6e-2, TOL_CONV_F16 2e-3  4u for y, dx and dw: cuDNN
 *                  rounds its output (and dw, widened afterwards); the bias
 *                  is added to the rounded y (a second rounding, on a
 *                  value that can exceed the biased output); Winograd and
 *                  FFT algorithms may keep transformed tiles in 16 bits.
 *                  Products and sums are float, so the length of the
 *                  reduction hardly matters.  db is float from the same
 *                  16-bit dy (TOL_CONV).
 *   TOL_CONV_TF32 2e-3  TF32 convolutions: cuDNN rounds x, w and dy to a
 *                  10-bit mantissa (u = 2^-11) for the products, so each
 *                  product is off by up to 2u and a sum of them by ~2u of
 *                  its terms' scale; 4u, as fp16's (an H100 gave 3.7e-4
 *                  at most).  db is float (TOL_CONV).
 *   Conversions must be bit-exact round-to-nearest-even (subnormal fp16
 *   included), scale_grads bit-exact float products.
 *   K-FAC's stages (Gram matrices, BN Fisher, reductions, inverses,
 *   preconditioning): TOL_GRAM ... TOL_GEMM, stated in their section.
 *
 * Without CUDA in the build, or without a GPU, prints "skipped: no GPU" and
 * returns 77 (ctest SKIP_RETURN_CODE). */
#include <string.h>

#include "kfac/kfac_backend.h"
#include "kfac/kfac_factors.h"
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

/* 16-bit activations (u: bf16 2^-8, fp16 2^-11; derivation above). */
#define TOL_ELT_BF16 4.0e-3  /* one rounding of a float result: u + float slack */
#define TOL_ELT_F16 5.0e-4
#define TOL_BN_BF16 4.5e-3   /* y, dx rounded once: u + TOL_BN */
#define TOL_BN_F16 7.0e-4
#define TOL_XENT_BF16 4.5e-3 /* dlogits rounded once: u + TOL_XENT */
#define TOL_XENT_F16 7.0e-4
#define TOL_CONV_BF16 1.6e-2 /* 4u: cuDNN output, bias on the rounded output, 16-bit tiles */
#define TOL_CONV_F16 2.0e-3
#define TOL_CONV_TF32 2.0e-3 /* 4u of TF32's 2^-11 (derivation above) */

static unsigned long long seed = 7;
/* gpu: the CUDA backend under test; its act_dtype is the pass's precision. */
static kfac_backend *cpu, *gpu;

/* Device buffers of gpu, released at the end of each pass. */
static void *dev_ptrs[2048];
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

/* ---- 16-bit values on the host ---- */

static kfac_dtype prec(void) { return gpu->act_dtype; }
/* The pass: float32 activations with TF32 convolutions; its largest error. */
static int tf32_pass;
static double tf32_max_err;
static const char *pass_name(void) { return tf32_pass ? "tf32" : kfac_dtype_name(prec()); }

/* The tolerance of the pass's precision. */
static double tol3(double f32, double bf16, double f16)
{
    return prec() == KFAC_BF16 ? bf16 : prec() == KFAC_F16 ? f16 : f32;
}
#define TOL(op) tol3(TOL_##op, TOL_##op##_BF16, TOL_##op##_F16)
/* Convolution outputs: TOL_CONV* or, in the TF32 pass, TOL_CONV_TF32. */
#define CONV_TOL() (tf32_pass ? TOL_CONV_TF32 : TOL(CONV))

static uint16_t bf16_rne(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static float bf16_value(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* The fp16 value nearest f (ties to even), as a float: with |f| in
 * [2^(e-1), 2^e) the spacing is 2^(e-11), and 2^-24 for subnormals
 * (|f| < 2^-14); past 65504 + half a spacing, inf. */
static float f16_round(float f)
{
    if (f == 0.0f || !isfinite(f)) return f;
    int e;
    frexp(f, &e);
    if (e < -13) e = -13;
    double spacing = ldexp(1.0, e - 11);
    double r = nearbyint((double)f / spacing) * spacing; /* exact; ties to even */
    return fabs(r) > 65504.0 ? copysignf(INFINITY, f) : (float)r;
}

static float round_to(kfac_dtype t, float f)
{
    return t == KFAC_BF16 ? bf16_value(bf16_rne(f)) : t == KFAC_F16 ? f16_round(f) : f;
}

/* ---- device buffers ---- */

/* A device copy of `bytes` bytes of host memory (h NULL: uninitialised). */
static void *dev_bytes(const void *h, size_t bytes)
{
    void *d;
    REQUIRE_OK(gpu->alloc(gpu, bytes, &d));
    if (h) REQUIRE_OK(gpu->upload(gpu, d, h, bytes));
    if (dev_count < (int)(sizeof dev_ptrs / sizeof *dev_ptrs)) dev_ptrs[dev_count++] = d;
    return d;
}

/* n floats (parameters, gradients, statistics: float32 in every pass). */
static float *dev(const float *h, size_t n) { return dev_bytes(h, n * sizeof(float)); }

/* Sets the n activations at d to h's values rounded to the pass's type
 * (uploaded as float32, converted on the device), and rounds h in place to
 * the same values for the CPU. */
static void act_set(float *d, float *h, size_t n)
{
    if (prec() == KFAC_F32) {
        REQUIRE_OK(gpu->upload(gpu, d, h, n * sizeof *h));
        return;
    }
    REQUIRE_OK(gpu->convert(gpu, n, dev(h, n), KFAC_F32, d, prec()));
    for (size_t i = 0; i < n; i++) h[i] = round_to(prec(), h[i]);
}

/* n activations in the pass's type, set from h as act_set (h NULL:
 * uninitialised). */
static float *act(float *h, size_t n)
{
    float *d = dev_bytes(NULL, n * kfac_dtype_size(prec()));
    if (h) act_set(d, h, n);
    return d;
}

/* The same with the n activations starting `off` values into a buffer of
 * n + off: off = 1 misaligns them (for the kernels' scalar paths). */
static float *act_off(float *h, size_t n, size_t off)
{
    float *d = (float *)((char *)act(NULL, n + off) + off * kfac_dtype_size(prec()));
    if (h) act_set(d, h, n);
    return d;
}

/* Compares n downloaded floats with the CPU's ref. */
static void compare_host(const char *what, const float *got, const float *ref, size_t n,
                         double tol)
{
    double *refd = malloc(n * sizeof *refd);
    for (size_t i = 0; i < n; i++) refd[i] = ref[i];
    double err = test_max_rel_err(got, refd, n, ERR_FLOOR);
    printf("  %s %-50s max rel err %.2e (tol %.1e)\n", pass_name(), what, err, tol);
    if (tf32_pass && !(err <= tf32_max_err)) tf32_max_err = err;
    CHECK(err <= tol, "%s %s: error %.3e > %.1e", pass_name(), what, err, tol);
    free(refd);
}

/* Downloads n floats of d and compares them with the CPU's ref. */
static void compare(const char *what, const float *d, const float *ref, size_t n, double tol)
{
    float *got = malloc(n * sizeof *got);
    REQUIRE_OK(gpu->download(gpu, got, d, n * sizeof *got));
    compare_host(what, got, ref, n, tol);
    free(got);
}

/* The same for n activations of the pass's type (widened on the device). */
static void compare_act(const char *what, const float *d, const float *ref, size_t n, double tol)
{
    if (prec() == KFAC_F32) {
        compare(what, d, ref, n, tol);
        return;
    }
    float *wide = dev(NULL, n);
    REQUIRE_OK(gpu->convert(gpu, n, d, prec(), wide, KFAC_F32));
    compare(what, wide, ref, n, tol);
}

/* ---- element-wise ---- */

/* n values; the activations start `off` values into their buffers.  The
 * activation kernels take 16 bytes per thread when n is a multiple of 8
 * (of 4 for float32) and every pointer is 16-byte aligned, else one value
 * per thread: test_eltwises runs both. */
static void test_eltwise(size_t n, size_t off)
{
    char what[96], tag[48];
    if (off)
        snprintf(tag, sizeof tag, "n=%zu off=%zu", n, off);
    else
        snprintf(tag, sizeof tag, "n=%zu", n);

    float *hx = rnd(n, 1.0, 0.0);
    float *dx_ = dev(NULL, n);
    REQUIRE_OK(cpu->fill(cpu, hx, 0.375f, n));
    REQUIRE_OK(gpu->fill(gpu, dx_, 0.375f, n));
    snprintf(what, sizeof what, "fill %s", tag);
    compare(what, dx_, hx, n, TOL_ELT); /* TOL_ELT: exact expected (float32 op) */
    free(hx);

    float *x = rnd(n, 1.0, 0.0), *dy = rnd(n, 1.0, 0.0), *y = malloc(n * sizeof *y);
    float *d_x = act_off(x, n, off), *d_dy = act_off(dy, n, off), *d_y = act_off(NULL, n, off);
    REQUIRE_OK(cpu->relu_forward(cpu, n, x, y));
    REQUIRE_OK(gpu->relu_forward(gpu, n, d_x, d_y));
    snprintf(what, sizeof what, "relu_forward %s", tag);
    compare_act(what, d_y, y, n, TOL(ELT)); /* TOL_ELT*: exact expected */
    for (int acc = 0; acc <= 1; acc++) {
        float *g = rnd(n, 1.0, 0.0), *d_g = act_off(g, n, off);
        REQUIRE_OK(cpu->relu_backward(cpu, n, y, dy, g, acc));
        REQUIRE_OK(gpu->relu_backward(gpu, n, d_y, d_dy, d_g, acc));
        snprintf(what, sizeof what, "relu_backward acc=%d %s", acc, tag);
        compare_act(what, d_g, g, n, TOL(ELT)); /* TOL_ELT* */
        free(g);
    }

    float *b = rnd(n, 1.0, 0.0), *d_b = act_off(b, n, off);
    for (int relu = 0; relu <= 1; relu++) {
        REQUIRE_OK(cpu->add_forward(cpu, n, x, b, y, relu));
        REQUIRE_OK(gpu->add_forward(gpu, n, d_x, d_b, d_y, relu));
        snprintf(what, sizeof what, "add_forward relu=%d %s", relu, tag);
        compare_act(what, d_y, y, n, TOL(ELT)); /* TOL_ELT* */
        act_set(d_y, y, n); /* same mask on both */
        for (int acc = 0; acc <= 1; acc++) {
            float *ga = rnd(n, 1.0, 0.0), *gb = rnd(n, 1.0, 0.0);
            float *d_ga = act_off(ga, n, off), *d_gb = act_off(gb, n, off);
            REQUIRE_OK(cpu->add_backward(cpu, n, y, dy, ga, acc, gb, !acc, relu));
            REQUIRE_OK(gpu->add_backward(gpu, n, d_y, d_dy, d_ga, acc, d_gb, !acc, relu));
            snprintf(what, sizeof what, "add_backward relu=%d da (acc=%d) %s", relu, acc, tag);
            compare_act(what, d_ga, ga, n, TOL(ELT)); /* TOL_ELT* */
            snprintf(what, sizeof what, "add_backward relu=%d db (acc=%d) %s", relu, !acc, tag);
            compare_act(what, d_gb, gb, n, TOL(ELT)); /* TOL_ELT* */
            free(ga);
            free(gb);
        }
    }

    float *d_g32 = dev(dy, n); /* SGD's gradient is float32 */
    for (int nesterov = 0; nesterov <= 1; nesterov++) {
        float *p = rnd(n, 1.0, 0.0), *v = rnd(n, 0.1, 0.0);
        float *d_p = dev(p, n), *d_v = dev(v, n);
        for (int step = 0; step < 3; step++) {
            REQUIRE_OK(cpu->sgd_update(cpu, n, p, dy, v, 0.1f, 0.9f, 5e-4f, nesterov));
            REQUIRE_OK(gpu->sgd_update(gpu, n, d_p, d_g32, d_v, 0.1f, 0.9f, 5e-4f, nesterov));
        }
        snprintf(what, sizeof what, "sgd_update nesterov=%d p (3 steps) %s", nesterov, tag);
        compare(what, d_p, p, n, TOL_ELT); /* TOL_ELT (float32 op) */
        snprintf(what, sizeof what, "sgd_update nesterov=%d v (3 steps) %s", nesterov, tag);
        compare(what, d_v, v, n, TOL_ELT); /* TOL_ELT (float32 op) */
        free(p);
        free(v);
    }
    free(x);
    free(dy);
    free(y);
    free(b);
}

static void test_eltwises(void)
{
    test_eltwise(1000003, 0); /* odd: scalar path; several grid-stride rounds on small GPUs */
    test_eltwise((size_t)1 << 20, 0); /* vector path */
    test_eltwise((size_t)1 << 20, 1); /* misaligned by one value: scalar path */
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
    float *d_x = act(x, n), *d_gamma = dev(gamma, c), *d_beta = dev(beta, c);
    float *d_rmean = dev(rmean, c), *d_rvar = dev(rvar, c);
    float *d_y = act(NULL, n), *d_smean = dev(NULL, c), *d_sinv = dev(NULL, c);

    REQUIRE_OK(cpu->bn_forward_train(cpu, m, c, x, gamma, beta, y, smean, sinv, rmean, rvar,
                                     momentum, eps, relu));
    REQUIRE_OK(gpu->bn_forward_train(gpu, m, c, d_x, d_gamma, d_beta, d_y, d_smean, d_sinv,
                                     d_rmean, d_rvar, momentum, eps, relu));
    /* BN_CMP: float outputs (TOL_BN); BN_CMP_ACT: activations (TOL_BN*). */
#define BN_CMP(name, d, h, len)                                                             \
    do {                                                                                    \
        snprintf(what, sizeof what, "bn %s m=%zu c=%d relu=%d", name, m, c, relu);          \
        compare(what, d, h, len, TOL_BN); /* TOL_BN */                                      \
    } while (0)
#define BN_CMP_ACT(name, d, h, len)                                                         \
    do {                                                                                    \
        snprintf(what, sizeof what, "bn %s m=%zu c=%d relu=%d", name, m, c, relu);          \
        compare_act(what, d, h, len, TOL(BN)); /* TOL_BN* */                                \
    } while (0)
    BN_CMP_ACT("train y", d_y, y, n);
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
    BN_CMP_ACT("eval y", d_y, ye, n);

    /* Backward from the CPU's forward outputs on both sides (same ReLU mask). */
    act_set(d_y, y, n);
    REQUIRE_OK(gpu->upload(gpu, d_smean, smean, c * sizeof(float)));
    REQUIRE_OK(gpu->upload(gpu, d_sinv, sinv, c * sizeof(float)));
    float *dy = rnd(n, 1.0, 0.0), *d_dy = act(dy, n);
    float *dg = malloc(c * sizeof *dg), *db = malloc(c * sizeof *db);
    float *d_dg = dev(NULL, c), *d_db = dev(NULL, c);
    for (int acc = 0; acc <= 1; acc++) {
        float *dx = rnd(n, 1.0, 0.0), *d_dx = act(dx, n);
        REQUIRE_OK(cpu->bn_backward(cpu, m, c, x, y, dy, gamma, smean, sinv, dx, acc, dg, db,
                                    relu));
        REQUIRE_OK(gpu->bn_backward(gpu, m, c, d_x, d_y, d_dy, d_gamma, d_smean, d_sinv, d_dx,
                                    acc, d_dg, d_db, relu));
        BN_CMP_ACT(acc ? "backward dx (acc)" : "backward dx", d_dx, dx, n);
        BN_CMP("backward dgamma", d_dg, dg, (size_t)c);
        BN_CMP("backward dbeta", d_db, db, (size_t)c);
        free(dx);
    }
#undef BN_CMP
#undef BN_CMP_ACT
    free(x); free(gamma); free(beta); free(rmean); free(rvar); free(y); free(smean);
    free(sinv); free(ye); free(dy); free(dg); free(db);
}

/* The per-element kernels take 16 bytes per thread when c is a multiple of
 * 8 (of 4 for float32), else one value: 64, 24 and 256 channels take the
 * vector path in every pass, 12 in the float32 pass only, 5, 19 and 130
 * never. */
static void test_bn(void)
{
    test_bn_shape(3, 5, 0);
    test_bn_shape(256, 64, 1);        /* 4x8x8 images, 64 channels */
    test_bn_shape(20000, 19, 0);      /* many row blocks, a partial channel tile */
    test_bn_shape(8 * 14 * 14, 130, 1);
    test_bn_shape(1000, 24, 0);
    test_bn_shape(999, 12, 1);
    test_bn_shape(16 * 28 * 28, 256, 1); /* a ResNet-50 stage-2 shape, several grid rounds */
}

/* ---- pooling ---- */

static void test_maxpool(int n, int h, int w, int c, int k, int stride, int pad)
{
    char what[96];
    kfac_pool_desc d;
    kfac_pool_desc_init(&d, n, h, w, c, k, stride, pad);
    size_t nx = (size_t)n * h * w * c, ny = (size_t)n * d.ho * d.wo * c;
    /* Values on a 1/4 grid (exact in 16 bits): ties, so the first-max rule
     * is exercised. */
    float *x = rnd(nx, 1.0, 0.0);
    for (size_t i = 0; i < nx; i++) x[i] = (float)(int)(x[i] * 4.0f) / 4.0f;
    float *y = malloc(ny * sizeof *y), *dy = rnd(ny, 1.0, 0.0);
    float *d_x = act(x, nx), *d_y = act(NULL, ny), *d_dy = act(dy, ny);
    REQUIRE_OK(cpu->maxpool_forward(cpu, &d, x, y));
    REQUIRE_OK(gpu->maxpool_forward(gpu, &d, d_x, d_y));
    snprintf(what, sizeof what, "maxpool_forward %dx%dx%d k%d s%d p%d", h, w, c, k, stride, pad);
    compare_act(what, d_y, y, ny, TOL(ELT)); /* TOL_ELT*: exact expected */
    for (int acc = 0; acc <= 1; acc++) {
        float *dx = rnd(nx, 1.0, 0.0), *d_dx = act(dx, nx);
        REQUIRE_OK(cpu->maxpool_backward(cpu, &d, x, y, dy, dx, acc));
        REQUIRE_OK(gpu->maxpool_backward(gpu, &d, d_x, d_y, d_dy, d_dx, acc));
        snprintf(what, sizeof what, "maxpool_backward %dx%dx%d k%d s%d p%d acc=%d", h, w, c, k,
                 stride, pad, acc);
        compare_act(what, d_dx, dx, nx, TOL(ELT)); /* TOL_ELT* */
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
    float *d_x = act(x, nx), *d_y = act(NULL, ny), *d_dy = act(dy, ny);
    REQUIRE_OK(cpu->gap_forward(cpu, n, hw, c, x, y));
    REQUIRE_OK(gpu->gap_forward(gpu, n, hw, c, d_x, d_y));
    snprintf(what, sizeof what, "gap_forward n=%d hw=%d c=%d", n, hw, c);
    compare_act(what, d_y, y, ny, TOL(ELT)); /* TOL_ELT* */
    for (int acc = 0; acc <= 1; acc++) {
        float *dx = rnd(nx, 1.0, 0.0), *d_dx = act(dx, nx);
        REQUIRE_OK(cpu->gap_backward(cpu, n, hw, c, dy, dx, acc));
        REQUIRE_OK(gpu->gap_backward(gpu, n, hw, c, d_dy, d_dx, acc));
        snprintf(what, sizeof what, "gap_backward n=%d hw=%d c=%d acc=%d", n, hw, c, acc);
        compare_act(what, d_dx, dx, nx, TOL(ELT)); /* TOL_ELT* */
        free(dx);
    }
    free(x);
    free(y);
    free(dy);
}

/* ---- loss ---- */

static void test_xent(int n, int classes, float smoothing, int with_grad, float grad_scale)
{
    char what[96];
    size_t nz = (size_t)n * classes;
    float *z = rnd(nz, 5.0, 0.0), *g = malloc(nz * sizeof *g);
    int32_t *labels = malloc(n * sizeof *labels);
    for (int i = 0; i < n; i++) labels[i] = (int32_t)((test_uniform(&seed) + 1.0) / 2.0 * classes);
    float *d_z = act(z, nz), *d_g = act(NULL, nz);
    int32_t *d_labels = dev_bytes(labels, n * sizeof *labels);
    double loss_c = 0, loss_g = 0;
    int hits_c = -1, hits_g = -2;
    REQUIRE_OK(cpu->softmax_xent(cpu, n, classes, z, labels, smoothing, grad_scale,
                                 with_grad ? g : NULL, &loss_c, &hits_c));
    REQUIRE_OK(gpu->softmax_xent(gpu, n, classes, d_z, d_labels, smoothing, grad_scale,
                                 with_grad ? d_g : NULL, &loss_g, &hits_g));
    double err = fabs(loss_g - loss_c) / fmax(fabs(loss_c), ERR_FLOOR);
    snprintf(what, sizeof what, "softmax_xent loss_sum n=%d classes=%d", n, classes);
    printf("  %s %-50s max rel err %.2e (tol %.1e)\n", kfac_dtype_name(prec()), what, err,
           TOL_XENT);
    CHECK(err <= TOL_XENT, "loss %.9g vs cpu %.9g", loss_g, loss_c); /* TOL_XENT */
    CHECK(hits_g == hits_c, "correct %d vs cpu %d", hits_g, hits_c);  /* exact */
    if (with_grad) {
        snprintf(what, sizeof what, "softmax_xent dlogits n=%d classes=%d eps=%.1f scale=%g", n,
                 classes, smoothing, grad_scale);
        compare_act(what, d_g, g, nz, TOL(XENT)); /* TOL_XENT* */
    }
    /* A label out of range is EINVAL on both. */
    labels[n / 2] = classes;
    REQUIRE_OK(gpu->upload(gpu, d_labels, labels, n * sizeof *labels));
    kfac_status sc = cpu->softmax_xent(cpu, n, classes, z, labels, smoothing, 1.0f, NULL,
                                       &loss_c, &hits_c);
    kfac_status sg = gpu->softmax_xent(gpu, n, classes, d_z, d_labels, smoothing, 1.0f, NULL,
                                       &loss_g, &hits_g);
    CHECK(sc == KFAC_EINVAL && sg == KFAC_EINVAL, "bad label: cpu %d, gpu %d (%s)", sc, sg,
          kfac_last_error());
    free(z);
    free(g);
    free(labels);
}

/* ---- convolution (cuDNN) ---- */

/* One geometry's host inputs (x, w, bias, dy), the CPU's workspace and the
 * device copies; the GPU workspace is sized by conv_workspace for the full
 * batch and reused for a partial one, as the model does.  d_w holds the
 * float32 weights as drawn (the GPU rounds them itself in 16-bit passes),
 * w their rounded values for the CPU. */
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
    float *y = malloc(ny * sizeof *y), *d_y = act(NULL, ny);
    for (int with_bias = 0; with_bias <= 1; with_bias++) {
        const float *b = with_bias ? t->bias : NULL, *d_b = with_bias ? t->d_bias : NULL;
        REQUIRE_OK(cpu->conv_forward(cpu, d, t->x, t->w, b, y, t->cpu_ws));
        REQUIRE_OK(gpu->conv_forward(gpu, d, t->d_x, t->d_w, d_b, d_y, t->gpu_ws));
        snprintf(what, sizeof what, "conv fwd %s%s", tag, with_bias ? " +bias" : "");
        compare_act(what, d_y, y, ny, CONV_TOL()); /* TOL_CONV* */
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
        float *dx = rnd(nx, 1.0, 0.0), *d_dx = act(dx, nx);
        REQUIRE_OK(cpu->conv_backward(cpu, d, t->x, t->w, t->dy, dx, acc, dw, db, t->cpu_ws));
        REQUIRE_OK(gpu->conv_backward(gpu, d, t->d_x, t->d_w, t->d_dy, d_dx, acc, d_dw, d_db,
                                       t->gpu_ws));
        snprintf(what, sizeof what, "conv bwd %s dx%s", tag, acc ? " (acc)" : "");
        compare_act(what, d_dx, dx, nx, CONV_TOL()); /* TOL_CONV* */
        snprintf(what, sizeof what, "conv bwd %s dw", tag);
        compare(what, d_dw, dw, t->nw, CONV_TOL()); /* TOL_CONV*: float, rounded by cuDNN */
        snprintf(what, sizeof what, "conv bwd %s db", tag);
        compare(what, d_db, db, k, TOL_CONV); /* TOL_CONV: float sums of the same dy */
        REQUIRE_OK(gpu->upload(gpu, d_dw, junk_w, t->nw * sizeof *junk_w));
        REQUIRE_OK(gpu->upload(gpu, d_db, junk_b, k * sizeof *junk_b));
        free(dx);
    }
    /* Weight gradient alone: no dx, no db. */
    REQUIRE_OK(cpu->conv_backward(cpu, d, t->x, t->w, t->dy, NULL, 0, dw, NULL, t->cpu_ws));
    REQUIRE_OK(gpu->conv_backward(gpu, d, t->d_x, t->d_w, t->d_dy, NULL, 0, d_dw, NULL,
                                  t->gpu_ws));
    snprintf(what, sizeof what, "conv bwd %s dw only", tag);
    compare(what, d_dw, dw, t->nw, CONV_TOL()); /* TOL_CONV* */
    free(dw); free(db); free(junk_w); free(junk_b);
}

/* An empty batch: no output, zero weight and bias gradients. */
static void conv_check_empty(const conv_case *t, const char *tag)
{
    char what[96];
    kfac_conv_desc none = t->d;
    none.n = 0;
    size_t k = (size_t)t->d.k;
    float *zeros = calloc(t->nw, sizeof *zeros);
    float *junk_w = rnd(t->nw, 100.0, 0.0), *junk_b = rnd(k, 100.0, 0.0);
    float *d_dw = dev(junk_w, t->nw), *d_db = dev(junk_b, k);
    REQUIRE_OK(gpu->conv_backward(gpu, &none, t->d_x, t->d_w, t->d_dy, NULL, 0, d_dw, d_db,
                                  t->gpu_ws));
    snprintf(what, sizeof what, "conv bwd %s n=0 dw", tag);
    compare(what, d_dw, zeros, t->nw, 0.0); /* exact zeros */
    snprintf(what, sizeof what, "conv bwd %s n=0 db", tag);
    compare(what, d_db, zeros, k, 0.0); /* exact zeros (k <= nw) */
    free(zeros); free(junk_w); free(junk_b);
}

static void test_conv(int n, int h, int w, int c, int k, int kh, int stride, int pad)
{
    conv_case t;
    char tag[64], algos[192];
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
    t.d_x = act(t.x, t.nx);
    t.d_w = dev(t.w, t.nw); /* float32 masters, as drawn */
    for (size_t i = 0; i < t.nw; i++) t.w[i] = round_to(prec(), t.w[i]); /* as the GPU uses them */
    t.d_bias = dev(t.bias, (size_t)k);
    t.d_dy = act(t.dy, t.ny);
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
    conv_check_empty(&t, tag);
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
    test_conv(2, 32, 32, 3, 64, 7, 2, 3); /* the stem on a small image (3 channels) */
    test_conv(8, 1, 1, 64, 10, 1, 1, 0);  /* the fully connected layer (with bias) */
    test_conv(8, 1, 1, 2048, 1000, 1, 1, 0); /* ResNet-50's classifier (cuBLAS GEMMs) */
    test_conv(3, 1, 1, 17, 5, 1, 1, 0);   /* a fully connected layer with odd sizes */
    test_conv(3, 5, 6, 3, 5, 3, 1, 1);    /* odd channels, non-square image */
}

/* ---- conversions and gradient scaling (float32 / any type) ---- */

/* Every type to every type, through device buffers: f32 -> s -> t -> f32
 * must give round_to(t, round_to(s, x)) exactly (one rounding per
 * narrowing; widening is exact), and f32 -> bf16 the host's RNE bits. */
static void test_conversions(size_t n)
{
    static const kfac_dtype types[3] = {KFAC_F32, KFAC_BF16, KFAC_F16};
    char what[96];
    /* |x| from 1e-6 to 1e4: fp16 subnormals (below 6.1e-5) to large fp16
     * normals (the largest is 65504); random signs. */
    float *x = rnd(n, 1.0, 0.0), *sign = rnd(n, 1.0, 0.0), *back = malloc(n * sizeof *back);
    for (size_t i = 0; i < n; i++) x[i] = copysignf(powf(10.0f, -1.0f + 5.0f * x[i]), sign[i]);
    float *d_x = dev(x, n), *d_back = dev(NULL, n);
    for (int a = 0; a < 3; a++) {
        kfac_dtype s = types[a];
        void *d_s = dev_bytes(NULL, n * kfac_dtype_size(s));
        REQUIRE_OK(gpu->convert(gpu, n, d_x, KFAC_F32, d_s, s));
        for (int b = 0; b < 3; b++) {
            kfac_dtype t = types[b];
            void *d_t = dev_bytes(NULL, n * kfac_dtype_size(t));
            REQUIRE_OK(gpu->convert(gpu, n, d_s, s, d_t, t));
            REQUIRE_OK(gpu->convert(gpu, n, d_t, t, d_back, KFAC_F32));
            REQUIRE_OK(gpu->download(gpu, back, d_back, n * sizeof *back));
            size_t wrong = 0;
            for (size_t i = 0; i < n; i++) {
                float want = round_to(t, round_to(s, x[i]));
                wrong += memcmp(&back[i], &want, sizeof want) != 0;
            }
            snprintf(what, sizeof what, "convert fp32 -> %s -> %s -> fp32", kfac_dtype_name(s),
                     kfac_dtype_name(t));
            printf("  %-50s %zu of %zu differ from host RNE\n", what, wrong, n);
            CHECK(wrong == 0, "%s: %zu wrong", what, wrong); /* bit-exact */
        }
    }
    uint16_t *h16 = malloc(n * sizeof *h16);
    void *d_16 = dev_bytes(NULL, n * sizeof *h16);
    REQUIRE_OK(gpu->convert(gpu, n, d_x, KFAC_F32, d_16, KFAC_BF16));
    REQUIRE_OK(gpu->download(gpu, h16, d_16, n * sizeof *h16));
    size_t wrong = 0;
    for (size_t i = 0; i < n; i++) wrong += h16[i] != bf16_rne(x[i]);
    CHECK(wrong == 0, "f32 -> bf16 bits: %zu wrong", wrong); /* bit-exact */
    REQUIRE_OK(gpu->convert(gpu, 0, d_x, KFAC_F32, d_16, KFAC_F16)); /* nothing to do */
    kfac_status st = gpu->convert(gpu, n, d_x, KFAC_F32, d_16, (kfac_dtype)7);
    CHECK(st == KFAC_EINVAL, "convert to an unknown type: %d", st);
    free(x);
    free(sign);
    free(back);
    free(h16);
}

/* g *= scale must be the float product bit for bit, and finite == 0 exactly
 * when a product is inf or nan (planted inf, nan, and an overflow). */
static void test_scale_grads(void)
{
    const size_t n = 1000003;
    const float scale = 0.37f;
    float *g = rnd(n, 1.0, 0.0), *got = malloc(n * sizeof *got), *want = malloc(n * sizeof *want);
    for (size_t i = 0; i < n; i++) want[i] = g[i] * scale;
    float *d_g = dev(g, n);
    int finite = -1;
    REQUIRE_OK(gpu->scale_grads(gpu, n, d_g, scale, &finite));
    REQUIRE_OK(gpu->download(gpu, got, d_g, n * sizeof *got));
    size_t wrong = 0;
    for (size_t i = 0; i < n; i++) wrong += memcmp(&got[i], &want[i], sizeof *got) != 0;
    printf("  %s %-50s %zu of %zu differ, finite %d\n", kfac_dtype_name(prec()), "scale_grads",
           wrong, n, finite);
    CHECK(wrong == 0 && finite == 1, "scale_grads: %zu wrong, finite %d", wrong, finite);

    const float bad[3] = {INFINITY, NAN, 3e38f}; /* 3e38 * 4 overflows */
    const size_t at[3] = {0, n / 2, n - 1};
    for (int b = 0; b < 3; b++) {
        REQUIRE_OK(gpu->upload(gpu, d_g, g, n * sizeof *g));
        REQUIRE_OK(gpu->upload(gpu, d_g + at[b], &bad[b], sizeof *bad));
        finite = -1;
        REQUIRE_OK(gpu->scale_grads(gpu, n, d_g, 4.0f, &finite));
        CHECK(finite == 0, "scale_grads with %g at %zu: finite %d", bad[b], at[b], finite);
    }
    REQUIRE_OK(gpu->upload(gpu, d_g, g, n * sizeof *g)); /* the flag starts clear again */
    finite = -1;
    REQUIRE_OK(gpu->scale_grads(gpu, n, d_g, 4.0f, &finite));
    CHECK(finite == 1, "scale_grads after a non-finite call: finite %d", finite);
    finite = -1;
    REQUIRE_OK(gpu->scale_grads(gpu, 0, d_g, 4.0f, &finite));
    CHECK(finite == 1, "scale_grads of nothing: finite %d", finite);
    free(g);
    free(got);
    free(want);
}

/* ---- asynchronous uploads ---- */

/* upload_async into a buffer that queued work still reads: that work sees
 * the old values (the copy waits for it), work queued after upload_join
 * the new ones; upload_wait then lets the host reuse the source.  Pinned
 * source, as the trainer's loader gives.  In the float32 pass only (ReLU
 * reads the buffers as activations). */
static void test_upload_async(void)
{
    const size_t n = (size_t)8 << 20; /* 32 MiB: the copy takes a while */
    float *h_old = rnd(n, 2.0, -1.0), *h_new = gpu->host_alloc(gpu, n * sizeof(float));
    float *got = malloc(n * sizeof *got), *want_old = malloc(n * sizeof *want_old);
    REQUIRE_OK(h_new ? KFAC_OK : KFAC_ERR(KFAC_ENOMEM, "host_alloc"));
    for (size_t i = 0; i < n; i++) {
        h_new[i] = -h_old[i];
        want_old[i] = fmaxf(h_old[i], 0.0f);
    }
    float *d_x = dev(h_old, n), *d_before = dev(NULL, n), *d_after = dev(NULL, n);
    for (int rep = 0; rep < 8; rep++) REQUIRE_OK(gpu->relu_forward(gpu, n, d_x, d_before));
    REQUIRE_OK(gpu->upload_async(gpu, d_x, h_new, n * sizeof(float)));
    REQUIRE_OK(gpu->upload_join(gpu));
    REQUIRE_OK(gpu->relu_forward(gpu, n, d_x, d_after));
    REQUIRE_OK(gpu->upload_wait(gpu));
    REQUIRE_OK(gpu->download(gpu, got, d_before, n * sizeof *got));
    size_t wrong_before = 0, wrong_after = 0;
    for (size_t i = 0; i < n; i++) wrong_before += got[i] != want_old[i];
    REQUIRE_OK(gpu->download(gpu, got, d_after, n * sizeof *got));
    for (size_t i = 0; i < n; i++) wrong_after += got[i] != fmaxf(h_new[i], 0.0f);
    printf("  %s %-50s %zu / %zu wrong before / after the copy\n", kfac_dtype_name(prec()),
           "upload_async ordering", wrong_before, wrong_after);
    CHECK(wrong_before == 0, "work queued before upload_async saw %zu new values", wrong_before);
    CHECK(wrong_after == 0, "work queued after upload_join saw %zu old values", wrong_after);
    gpu->host_release(gpu, h_new);
    free(h_old);
    free(got);
    free(want_old);
}

/* ---- K-FAC's stages ---- */

/* Tolerances of K-FAC's stages (relative to the CPU's largest value, as above):
 * Gram matrices are float32 sums in every pass: 16-bit inputs are the same
 * rounded values on both sides and their products are exact in float32. */
#define TOL_GRAM 1e-4      /* float sums of up to 2.5e5 products in another (blocked) order */
#define TOL_GRAM_TF32 3e-3 /* TF32 inputs (10-bit mantissas; if truncated, a bias of up to
                            * 2^-10 per product that the positive diagonal sums keep) */
#define TOL_FISHER 1e-4    /* the CPU sums per-sample BN gradients in float, the GPU in double */
#define TOL_RED 1e-10      /* dot, trace, factor change: exact products, double sums reordered */
#define TOL_INV 1e-3       /* float32 inverses, condition <= ~30: ~cond * sqrt(n) * u apart */
#define TOL_EIG 1e-4       /* eigenvalues and Q diag Q^T: well conditioned, ~n u of ||F|| */
#define TOL_GEMM 1e-4      /* float32 GEMMs of up to 2049 products in another order */

/* Whether this pass's float32 Gram matrices run on TF32 tensor cores. */
static int gram_tf32(void)
{
#ifdef KFAC_HAVE_CUDA
    return prec() == KFAC_F32 && kfac__cuda(gpu)->allow_tf32;
#else
    return 0;
#endif
}

static double gram_tol(void) { return gram_tf32() ? TOL_GRAM_TF32 : TOL_GRAM; }

/* n floats of device memory, downloaded into a new host array. */
static float *fetch(const float *d, size_t n)
{
    float *h = malloc(n * sizeof *h);
    REQUIRE_OK(gpu->download(gpu, h, d, n * sizeof *h));
    return h;
}

/* Relative error of a double result against the CPU's. */
static void compare_scalar(const char *what, double got, double ref, double tol)
{
    double err = got == ref ? 0.0 : fabs(got - ref) / fmax(fabs(ref), 1e-300);
    printf("  %s %-50s rel err %.2e (tol %.0e)\n", pass_name(), what, err, tol);
    CHECK(err <= tol, "%s %s: %.17g vs cpu %.17g", pass_name(), what, got, ref);
}

/* Packed order KD (+1) of the patches of x, n images (and n/2 in the same
 * workspace, as the optimizer's subsampled batches). */
static void test_gram_patches(int n, int h, int w, int c, int kh, int stride, int pad)
{
    char what[128];
    kfac_conv_desc d;
    kfac_conv_desc_init(&d, n, h, w, c, 1, kh, kh, stride, pad);
    size_t nx = (size_t)n * h * w * c, kd = (size_t)kh * kh * c;
    float *x = rnd(nx, 1.0, 0.25), *d_x = act(x, nx); /* a mean: the ones column matters */
    void *cws = malloc(cpu->gram_patches_workspace(cpu, &d) + 1);
    void *gws = dev_bytes(NULL, gpu->gram_patches_workspace(gpu, &d));
    float *ref = malloc(kfac_packed_len((int)kd + 1) * sizeof *ref);
    float *d_p = dev(NULL, kfac_packed_len((int)kd + 1));
    for (int part = 0; part <= (n > 1); part++) {
        kfac_conv_desc e = d;
        e.n = part ? n / 2 : n;
        size_t rows = (size_t)e.n * e.ho * e.wo;
        for (int one = 0; one <= 1; one++) {
            size_t len = kfac_packed_len((int)kd + one);
            float scale = 1.0f / (float)rows;
            REQUIRE_OK(cpu->gram_patches(cpu, &e, x, one, scale, ref, cws));
            REQUIRE_OK(gpu->gram_patches(gpu, &e, d_x, one, scale, d_p, gws));
            snprintf(what, sizeof what, "gram_patches n%d/%d %dx%dx%d %dx%d s%d p%d%s", e.n, n,
                     h, w, c, kh, kh, stride, pad, one ? " +1" : "");
            compare(what, d_p, ref, len, gram_tol()); /* TOL_GRAM (_TF32) */
        }
    }
    free(x);
    free(cws);
    free(ref);
}

/* packed = scale * R^T R of m rows (the G factor's form: scale N^2 / n). */
static void test_gram_rows(size_t m, int n, int append_one)
{
    char what[128];
    size_t len = kfac_packed_len(n + append_one);
    float *r = rnd(m * n, 1.0, 0.25), *d_r = act(r, m * n);
    float *ref = malloc(len * sizeof *ref), *d_p = dev(NULL, len);
    void *gws = dev_bytes(NULL, gpu->gram_rows_workspace(gpu, m, n) + 1);
    REQUIRE_OK(cpu->gram_rows(cpu, m, n, r, append_one, 16.0f, ref, NULL));
    REQUIRE_OK(gpu->gram_rows(gpu, m, n, d_r, append_one, 16.0f, d_p, gws));
    snprintf(what, sizeof what, "gram_rows m=%zu n=%d%s", m, n, append_one ? " +1" : "");
    compare(what, d_p, ref, len, gram_tol()); /* TOL_GRAM (_TF32) */
    free(r);
    free(ref);
}

static void test_grams(void)
{
    test_gram_patches(2, 8, 8, 16, 3, 1, 1);   /* 3x3 stride 1 pad 1 */
    test_gram_patches(3, 9, 9, 5, 3, 2, 1);    /* 3x3 stride 2, odd sizes */
    test_gram_patches(2, 8, 8, 32, 1, 2, 0);   /* 1x1 stride 2: projection shortcut */
    test_gram_patches(3, 7, 7, 24, 1, 1, 0);   /* 1x1 stride 1: the rows are x itself */
    test_gram_patches(2, 32, 32, 3, 7, 2, 3);  /* the stem, 3 channels */
    /* The stem at 224x224: 250880 rows, over one 64 MiB chunk in every type. */
    test_gram_patches(20, 224, 224, 3, 7, 2, 3);
    test_gram_rows(1000, 64, 0);
    test_gram_rows(777, 10, 1);
    test_gram_rows(20000, 33, 1);
}

/* Per-sample BN gradients and their Fisher: n images of hw rows. */
static void test_bn_fisher(int n, int hw, int c, int relu)
{
    char what[128];
    size_t m = (size_t)n * hw * c, nc = (size_t)n * c;
    float *x = rnd(m, 2.0, 3.0), *y = rnd(m, 1.0, 0.0), *dy = rnd(m, 1.0, 0.0);
    float *mean = rnd(c, 0.5, 3.0), *invstd = rnd(c, 0.2, 1.0);
    float *d_x = act(x, m), *d_y = act(y, m), *d_dy = act(dy, m);
    float *d_mean = dev(mean, c), *d_invstd = dev(invstd, c);
    float *sg = malloc(nc * sizeof *sg), *sb = malloc(nc * sizeof *sb);
    float *fisher = malloc(3 * (size_t)c * sizeof *fisher);
    float *d_sg = dev(NULL, nc), *d_sb = dev(NULL, nc), *d_f = dev(NULL, 3 * (size_t)c);
    REQUIRE_OK(cpu->bn_fisher(cpu, n, hw, c, x, y, dy, mean, invstd, relu, (float)n, sg, sb,
                              fisher));
    REQUIRE_OK(gpu->bn_fisher(gpu, n, hw, c, d_x, d_y, d_dy, d_mean, d_invstd, relu, (float)n,
                              d_sg, d_sb, d_f));
    snprintf(what, sizeof what, "bn_fisher n=%d hw=%d c=%d relu=%d sg", n, hw, c, relu);
    compare(what, d_sg, sg, nc, TOL_FISHER); /* TOL_FISHER */
    snprintf(what, sizeof what, "bn_fisher n=%d hw=%d c=%d relu=%d sb", n, hw, c, relu);
    compare(what, d_sb, sb, nc, TOL_FISHER); /* TOL_FISHER */
    snprintf(what, sizeof what, "bn_fisher n=%d hw=%d c=%d relu=%d fisher", n, hw, c, relu);
    compare(what, d_f, fisher, 3 * (size_t)c, TOL_FISHER); /* TOL_FISHER */
    free(x); free(y); free(dy); free(mean); free(invstd); free(sg); free(sb); free(fisher);
}

/* axpby: both terms, beta 0 (y full of NaN: not read), alpha 0 (x NULL). */
static void test_axpby(size_t n)
{
    float *x = rnd(n, 1.0, 0.0), *y0 = rnd(n, 1.0, 0.0), *y = malloc(n * sizeof *y);
    float *d_x = dev(x, n), *d_y = dev(NULL, n);
    const float cases[3][2] = {{0.3f, 0.7f}, {-1.5f, 0.0f}, {0.0f, 0.9f}};
    for (int k = 0; k < 3; k++) {
        float alpha = cases[k][0], beta = cases[k][1];
        char what[96];
        for (size_t i = 0; i < n; i++) y[i] = beta == 0.0f ? NAN : y0[i];
        REQUIRE_OK(gpu->upload(gpu, d_y, y, n * sizeof *y));
        REQUIRE_OK(cpu->axpby(cpu, n, alpha, alpha == 0.0f ? NULL : x, beta, y));
        REQUIRE_OK(gpu->axpby(gpu, n, alpha, alpha == 0.0f ? NULL : d_x, beta, d_y));
        snprintf(what, sizeof what, "axpby n=%zu alpha=%g beta=%g%s", n, alpha, beta,
                 beta == 0.0f ? " (y NaN)" : alpha == 0.0f ? " (x NULL)" : "");
        compare(what, d_y, y, n, TOL_ELT); /* TOL_ELT: the same float operations */
    }
    free(x); free(y0); free(y);
}

/* copy2d between pitched runs, contiguous runs and one run; bytes between
 * the destination's runs keep their values (exact comparison). */
static void test_copy2d(void)
{
    const size_t cases[3][4] = {/* rows, row_bytes, dst_pitch, src_pitch */
                                {37, 52, 64, 80}, {9, 40, 40, 40}, {1, 44, 48, 96}};
    for (int k = 0; k < 3; k++) {
        size_t rows = cases[k][0], rb = cases[k][1], dp = cases[k][2], sp = cases[k][3];
        size_t nd = rows * dp / sizeof(float), ns = rows * sp / sizeof(float);
        float *src = rnd(ns, 1.0, 0.0), *dst = rnd(nd, 1.0, 5.0);
        float *d_src = dev(src, ns), *d_dst = dev(dst, nd);
        char what[96];
        REQUIRE_OK(cpu->copy2d(cpu, rows, rb, dst, dp, src, sp));
        REQUIRE_OK(gpu->copy2d(gpu, rows, rb, d_dst, dp, d_src, sp));
        snprintf(what, sizeof what, "copy2d rows=%zu bytes=%zu pitches %zu/%zu", rows, rb, dp, sp);
        compare(what, d_dst, dst, nd, 0.0); /* exact */
        free(src);
        free(dst);
    }
}

/* Packed order n of a symmetric matrix with entries ~ U(-1, 1) + offset. */
static float *rnd_packed(int n, double offset) { return rnd(kfac_packed_len(n), 1.0, offset); }

static void test_reductions(void)
{
    char what[96];
    double g = 0, c = 0;
    const size_t n = 1000003;
    float *a = rnd(n, 1.0, 0.5), *b = rnd(n, 1.0, 0.25), *d_a = dev(a, n), *d_b = dev(b, n);
    /* dot's result is backend memory, queued: two dots back to back into
     * two slots (they share the reduction's scratch), then one download. */
    double *d_dots = NULL, dots[2] = {-1, -1};
    REQUIRE_OK(gpu->alloc(gpu, 2 * sizeof(double), (void **)&d_dots));
    REQUIRE_OK(cpu->dot(cpu, n, a, b, &c));
    REQUIRE_OK(gpu->dot(gpu, n, d_a, d_b, &d_dots[0]));
    REQUIRE_OK(gpu->dot(gpu, 0, d_a, d_b, &d_dots[1]));
    REQUIRE_OK(gpu->download(gpu, dots, d_dots, sizeof dots));
    snprintf(what, sizeof what, "dot n=%zu", n);
    compare_scalar(what, dots[0], c, TOL_RED); /* TOL_RED */
    CHECK(dots[1] == 0.0, "dot of nothing: %g", dots[1]);
    gpu->release(gpu, d_dots);

    const int orders[3] = {1, 300, 2049};
    for (int k = 0; k < 3; k++) {
        int m = orders[k];
        size_t len = kfac_packed_len(m);
        float *p = rnd_packed(m, 0.5), *q = malloc(len * sizeof *q);
        for (size_t i = 0; i < len; i++) q[i] = p[i] * (1.0f + 0.01f * (float)((i * 7) % 13));
        float *d_p = dev(p, len), *d_q = dev(q, len);
        REQUIRE_OK(cpu->packed_trace(cpu, m, p, &c));
        REQUIRE_OK(gpu->packed_trace(gpu, m, d_p, &g));
        snprintf(what, sizeof what, "packed_trace n=%d", m);
        compare_scalar(what, g, c, TOL_RED); /* TOL_RED */
        REQUIRE_OK(cpu->factor_change(cpu, m, p, q, &c));
        REQUIRE_OK(gpu->factor_change(gpu, m, d_p, d_q, &g));
        snprintf(what, sizeof what, "factor_change n=%d", m);
        compare_scalar(what, g, c, TOL_RED); /* TOL_RED */
        free(p);
        free(q);
    }
    /* From a zero factor: 0 to zero, INFINITY to anything else. */
    float *zeros = calloc(kfac_packed_len(300), sizeof *zeros);
    float *d_z = dev(zeros, kfac_packed_len(300)), *d_p = dev(a, kfac_packed_len(300));
    REQUIRE_OK(gpu->factor_change(gpu, 300, d_z, d_z, &g));
    CHECK(g == 0.0, "factor_change from zero to zero: %g", g);
    REQUIRE_OK(gpu->factor_change(gpu, 300, d_z, d_p, &g));
    CHECK(isinf(g), "factor_change from zero: %g", g);
    free(zeros);
    free(a);
    free(b);
}

/* The largest |a - b| over n x n over the largest |b|. */
static double mat_rel_err(int n, const double *a, const double *b)
{
    double diff = 0, ref = 1e-300;
    for (size_t i = 0; i < (size_t)n * n; i++) {
        double e = fabs(a[i] - b[i]);
        if (!(e <= diff)) diff = e;
        if (fabs(b[i]) > ref) ref = fabs(b[i]);
    }
    return diff / ref;
}

/* Q diag(d) Q^T in double (Q row-major, column j the eigenvector of d[j]). */
static double *reconstruct(int n, const float *q, const float *d)
{
    double *r = calloc((size_t)n * n, sizeof *r);
    for (int i = 0; i < n; i++)
        for (int j = 0; j <= i; j++) {
            double s = 0;
            for (int k = 0; k < n; k++)
                s += (double)q[(size_t)i * n + k] * d[k] * q[(size_t)j * n + k];
            r[(size_t)i * n + j] = r[(size_t)j * n + i] = s;
        }
    return r;
}

/* Whether a downloaded n x n matrix is exactly symmetric. */
static int is_symmetric(int n, const float *a)
{
    for (int i = 0; i < n; i++)
        for (int j = 0; j < i; j++)
            if (memcmp(&a[(size_t)i * n + j], &a[(size_t)j * n + i], sizeof *a) != 0) return 0;
    return 1;
}

/* A Gram factor of order n, F = R^T R / m (m = 2n + 8, so its spectrum is
 * in ~[0.03, 1.0]), through the CPU. */
static float *spd_factor(int n)
{
    size_t m = 2 * (size_t)n + 8;
    float *r = rnd(m * n, 1.0, 0.0), *p = malloc(kfac_packed_len(n) * sizeof *p);
    REQUIRE_OK(cpu->gram_rows(cpu, m, n, r, 0, 1.0f / (float)m, p, NULL));
    free(r);
    return p;
}

/* Cholesky and eigen inverses of order n in a workspace `ws` sized for a
 * larger order, as the optimizer sizes it for its largest factor. */
static void test_inverse(int n, void *ws)
{
    char what[96];
    const size_t nn = (size_t)n * n, len = kfac_packed_len(n);
    const float shift = 0.05f;
    float *p = spd_factor(n), *d_p = dev(p, len), *d_inv = dev(NULL, nn);
    float *inv = malloc(nn * sizeof *inv);
    REQUIRE_OK(cpu->inverse_cholesky(cpu, n, p, shift, inv, NULL));
    REQUIRE_OK(gpu->inverse_cholesky(gpu, n, d_p, shift, d_inv, ws));
    snprintf(what, sizeof what, "inverse_cholesky n=%d", n);
    compare(what, d_inv, inv, nn, TOL_INV); /* TOL_INV */
    float *got = fetch(d_inv, nn);
    CHECK(is_symmetric(n, got), "inverse_cholesky n=%d: not exactly symmetric", n);
    free(got);

    /* Shifted down so some eigenvalues are negative (clamped to 0). */
    for (int j = 0; j < n; j++) p[kfac_packed_len(j) + j] -= 0.1f;
    REQUIRE_OK(gpu->upload(gpu, d_p, p, len * sizeof *p));
    float *ev = malloc(n * sizeof *ev), *q = malloc(nn * sizeof *q);
    float *d_ev = dev(NULL, n), *d_q = dev(NULL, nn);
    REQUIRE_OK(cpu->eigh(cpu, n, p, ev, q, NULL));
    REQUIRE_OK(gpu->eigh(gpu, n, d_p, d_ev, d_q, ws));
    snprintf(what, sizeof what, "eigh n=%d eigenvalues", n);
    compare(what, d_ev, ev, (size_t)n, TOL_EIG); /* TOL_EIG */
    float *gev = fetch(d_ev, (size_t)n), *gq = fetch(d_q, nn), *ones = malloc(n * sizeof *ones);
    int clamped = 0, ordered = 1;
    for (int j = 0; j < n; j++) {
        clamped += gev[j] == 0.0f;
        ordered &= gev[j] >= 0.0f && (j == 0 || gev[j] >= gev[j - 1]);
        ones[j] = 1.0f;
    }
    CHECK(ordered, "eigh n=%d: eigenvalues not ascending and >= 0", n);
    CHECK(n < 64 || clamped > 0, "eigh n=%d: no negative eigenvalue clamped", n);
    /* Eigenvectors' signs (and bases of close eigenvalues) may differ: compare
     * Q diag Q^T, and Q Q^T with I. */
    double *rg = reconstruct(n, gq, gev), *rc = reconstruct(n, q, ev);
    double *qq = reconstruct(n, gq, ones), *eye = calloc(nn, sizeof *eye);
    for (int j = 0; j < n; j++) eye[(size_t)j * n + j] = 1.0;
    double err = mat_rel_err(n, rg, rc), orth = mat_rel_err(n, qq, eye);
    snprintf(what, sizeof what, "eigh n=%d Q diag Q^T", n);
    printf("  %s %-50s max rel err %.2e, |QQ^T - I| %.2e (tol %.0e)\n", pass_name(), what, err,
           orth, TOL_EIG);
    CHECK(err <= TOL_EIG, "eigh n=%d: Q diag Q^T off by %.3e", n, err);  /* TOL_EIG */
    CHECK(orth <= TOL_EIG, "eigh n=%d: Q Q^T - I off by %.3e", n, orth); /* TOL_EIG */

    /* From the CPU's decomposition on both sides (d + shift >= shift > 0). */
    REQUIRE_OK(gpu->upload(gpu, d_ev, ev, n * sizeof *ev));
    REQUIRE_OK(gpu->upload(gpu, d_q, q, nn * sizeof *q));
    REQUIRE_OK(cpu->inverse_from_eig(cpu, n, ev, q, shift, inv, NULL));
    REQUIRE_OK(gpu->inverse_from_eig(gpu, n, d_ev, d_q, shift, d_inv, ws));
    snprintf(what, sizeof what, "inverse_from_eig n=%d", n);
    compare(what, d_inv, inv, nn, TOL_INV); /* TOL_INV */
    got = fetch(d_inv, nn);
    CHECK(is_symmetric(n, got), "inverse_from_eig n=%d: not exactly symmetric", n);
    free(got); free(p); free(inv); free(ev); free(q); free(gev); free(gq); free(ones);
    free(rg); free(rc); free(qq); free(eye);
}

static void test_inverses(void)
{
    const int orders[5] = {1, 7, 64, 300, 577};
    void *ws = dev_bytes(NULL, gpu->inverse_workspace(gpu, 577));
    for (int k = 0; k < 5; k++) test_inverse(orders[k], ws);
    /* F - 10 I is negative definite: both fail, naming the factor. */
    float *p = spd_factor(40), *d_p = dev(p, kfac_packed_len(40)), *inv = malloc(1600 * sizeof *inv);
    float *d_inv = dev(NULL, 1600);
    kfac_status sc = cpu->inverse_cholesky(cpu, 40, p, -10.0f, inv, NULL);
    kfac_status sg = gpu->inverse_cholesky(gpu, 40, d_p, -10.0f, d_inv, ws);
    const char *msg = kfac_last_error();
    printf("  %s %-50s cpu %d, gpu %d: %s\n", pass_name(), "inverse_cholesky of F - 10 I", sc, sg,
           msg);
    CHECK(sc == KFAC_EBACKEND && sg == KFAC_EBACKEND, "not positive definite: cpu %d, gpu %d", sc,
          sg);
    CHECK(strstr(msg, "not positive definite") != NULL, "message: %s", msg);
    free(p);
    free(inv);
}

/* out = Ginv grad Ainv and the exact eigenbasis form, into a separate
 * buffer and in place (out == grad). */
static void test_precondition(int k, int d)
{
    char what[96];
    const size_t kd = (size_t)k * d;
    float *ginv = rnd((size_t)k * k, 1.0 / sqrt(k), 0.0), *ainv = rnd((size_t)d * d, 1.0 / sqrt(d), 0.0);
    float *grad = rnd(kd, 1.0, 0.0), *out = malloc(kd * sizeof *out), *tmp = malloc(kd * sizeof *tmp);
    float *dg = rnd(k, 0.5, 0.5), *da = rnd(d, 0.5, 0.5); /* eigenvalues in [0, 1] */
    float *d_g = dev(ginv, (size_t)k * k), *d_a = dev(ainv, (size_t)d * d), *d_grad = dev(grad, kd);
    float *d_out = dev(NULL, kd), *d_tmp = dev(NULL, kd), *d_dg = dev(dg, k), *d_da = dev(da, d);
    for (int exact = 0; exact <= 1; exact++)
        for (int in_place = 0; in_place <= 1; in_place++) {
            float *o = in_place ? d_grad : d_out;
            REQUIRE_OK(gpu->upload(gpu, d_grad, grad, kd * sizeof *grad));
            if (exact) {
                REQUIRE_OK(cpu->precondition_eig_exact(cpu, k, d, ginv, dg, ainv, da, 0.01f, grad,
                                                       out, tmp));
                REQUIRE_OK(gpu->precondition_eig_exact(gpu, k, d, d_g, d_dg, d_a, d_da, 0.01f,
                                                       d_grad, o, d_tmp));
            } else {
                REQUIRE_OK(cpu->precondition(cpu, k, d, ginv, ainv, grad, out, tmp));
                REQUIRE_OK(gpu->precondition(gpu, k, d, d_g, d_a, d_grad, o, d_tmp));
            }
            snprintf(what, sizeof what, "precondition%s k=%d d=%d%s", exact ? "_eig_exact" : "", k,
                     d, in_place ? " (in place)" : "");
            compare(what, o, out, kd, TOL_GEMM); /* TOL_GEMM */
        }
    free(ginv); free(ainv); free(grad); free(out); free(tmp); free(dg); free(da);
}

/* Per channel 2x2 solves of PSD blocks, full and diagonal, in place too. */
static void test_bn_precondition(int c)
{
    char what[96];
    float *a = rnd(c, 1.0, 0.0), *b = rnd(c, 1.0, 0.0), *f = malloc(3 * (size_t)c * sizeof *f);
    for (int j = 0; j < c; j++) { /* [a b]^T [a b] with the correlation shrunk: PSD */
        f[3 * j] = a[j] * a[j];
        f[3 * j + 1] = 0.9f * a[j] * b[j];
        f[3 * j + 2] = b[j] * b[j];
    }
    float *dg = rnd(c, 1.0, 0.0), *db = rnd(c, 1.0, 0.0);
    float *pg = malloc(c * sizeof *pg), *pb = malloc(c * sizeof *pb);
    float *d_f = dev(f, 3 * (size_t)c), *d_dg = dev(NULL, c), *d_db = dev(NULL, c);
    float *d_pg = dev(NULL, c), *d_pb = dev(NULL, c);
    for (int diag = 0; diag <= 1; diag++)
        for (int in_place = 0; in_place <= 1; in_place++) {
            REQUIRE_OK(gpu->upload(gpu, d_dg, dg, c * sizeof *dg));
            REQUIRE_OK(gpu->upload(gpu, d_db, db, c * sizeof *db));
            REQUIRE_OK(cpu->bn_precondition(cpu, c, f, 1e-3f, diag, dg, db, pg, pb));
            REQUIRE_OK(gpu->bn_precondition(gpu, c, d_f, 1e-3f, diag, d_dg, d_db,
                                            in_place ? d_dg : d_pg, in_place ? d_db : d_pb));
            snprintf(what, sizeof what, "bn_precondition c=%d diag=%d%s gamma", c, diag,
                     in_place ? " (in place)" : "");
            compare(what, in_place ? d_dg : d_pg, pg, c, TOL_ELT); /* TOL_ELT: same double math */
            snprintf(what, sizeof what, "bn_precondition c=%d diag=%d%s beta", c, diag,
                     in_place ? " (in place)" : "");
            compare(what, in_place ? d_db : d_pb, pb, c, TOL_ELT); /* TOL_ELT */
        }
    free(a); free(b); free(f); free(dg); free(db); free(pg); free(pb);
}

/* The stages on activations run in every pass, the float32 ones once. */
static void test_kfac_stages(void)
{
    if (!cpu->gram_patches || !gpu->gram_patches) {
        CHECK(0, "K-FAC stages missing: cpu %p, gpu %p", (void *)cpu->gram_patches,
              (void *)gpu->gram_patches);
        return;
    }
    test_grams();
    test_bn_fisher(4, 64, 64, 1);
    test_bn_fisher(3, 49, 19, 0);   /* a partial channel tile */
    test_bn_fisher(70, 9, 40, 1);   /* many images */
    if (prec() != KFAC_F32) return;
    test_axpby(100003);
    test_copy2d();
    test_reductions();
    test_inverses();
    test_precondition(64, 577);
    test_precondition(1000, 2049); /* ResNet-50's classifier with its bias column */
    test_precondition(3, 5);
    test_bn_precondition(1000);
}

/* ---- one pass per precision ---- */

static void run_pass(void)
{
    test_eltwises();
    test_bn();
    test_maxpool(2, 9, 9, 5, 3, 2, 1);   /* ResNet stem pooling: overlapping windows */
    test_maxpool(3, 8, 8, 16, 2, 2, 0);
    test_maxpool(2, 7, 6, 3, 3, 1, 1);
    test_gap(4, 49, 64);
    test_gap(3, 1, 10);
    test_xent(300, 10, 0.1f, 1, 1.0f);
    test_xent(64, 1000, 0.0f, 1, 128.0f); /* a loss scale, as fp16 training uses */
    test_xent(5, 37, 0.2f, 0, 1.0f);
    test_convs();
    test_kfac_stages();
    test_scale_grads();
    if (prec() == KFAC_F32) {
        test_conversions(100003);          /* odd: one value per thread */
        test_conversions((size_t)1 << 17); /* 16 bytes of the narrower type per thread */
        test_upload_async();
    }
    /* Convolutions are planned: the precision is fixed now. */
    kfac_dtype other = prec() == KFAC_F16 ? KFAC_BF16 : KFAC_F16;
    CHECK(kfac_backend_set_precision(gpu, other) == KFAC_EINVAL,
          "set_precision(%s) after planning a %s convolution", kfac_dtype_name(other),
          kfac_dtype_name(prec()));
    CHECK_OK(kfac_backend_set_precision(gpu, prec()));
}

int main(void)
{
    static const kfac_dtype precs[3] = {KFAC_F32, KFAC_BF16, KFAC_F16};
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
    for (int p = 0; p < 3; p++) {
        if (p > 0) { /* a fresh backend: the precision is set before any convolution */
            REQUIRE_OK(kfac_backend_get("cuda", 0, &gpu));
            REQUIRE_OK(kfac_backend_set_precision(gpu, precs[p]));
        }
        printf("test_cuda_ops: activations %s\n", kfac_dtype_name(precs[p]));
        run_pass();
        for (int i = 0; i < dev_count; i++) gpu->release(gpu, dev_ptrs[i]);
        dev_count = 0;
        kfac_backend_free(gpu);
        gpu = NULL;
    }
    /* TF32: a fresh float32 backend with TF32 allowed, convolutions and
     * Gram matrices only (the other operations have no tensor-core path). */
    REQUIRE_OK(kfac_backend_get("cuda", 0, &gpu));
    REQUIRE_OK(kfac_backend_set_tf32(gpu, 1));
    tf32_pass = 1;
    printf("test_cuda_ops: activations f32, TF32 convolutions and Gram matrices\n");
    test_convs();
    test_grams();
    /* TF32 took effect: some output is further from the CPU's than fp32
     * allows (an H100 with cuDNN 9.19: 37 of 140 checks, at most 3.7e-4). */
    CHECK(tf32_max_err > TOL_CONV, "tf32: largest convolution error %.2e, not above fp32's %.0e",
          tf32_max_err, TOL_CONV);
    CHECK(kfac_backend_set_tf32(gpu, 0) == KFAC_EINVAL, "set_tf32(0) after planning");
    CHECK_OK(kfac_backend_set_tf32(gpu, 1));
    for (int i = 0; i < dev_count; i++) gpu->release(gpu, dev_ptrs[i]);
    dev_count = 0;
    kfac_backend_free(gpu);
    gpu = NULL;
    kfac_backend_free(cpu);
    return test_summary("test_cuda_ops");
}
