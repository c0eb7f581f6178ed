/* test_layers.c - every CPU layer against independent double-precision
 * references: forward against a naive direct implementation, backward
 * against central finite differences of that double implementation
 * (L = sum(y * R) for a fixed random R, so dL/dy = R).
 *
 * Tolerances (relative to the largest reference magnitude):
 *   forward 1e-5; backward of linear ops (conv, fc, pool, add, relu) 1e-4;
 *   batch norm and softmax cross-entropy backward 1e-3 (float rounding
 *   through the batch statistics). */
#include <float.h>
#include <string.h>

#include "kfac/kfac_backend.h"
#include "testutil.h"

#define TOL_FWD 1e-5
#define TOL_LIN 1e-4
#define TOL_NONLIN 1e-3
#define FD_STEP 1e-5

static unsigned long long seed = 42;
static kfac_backend *be;

static double *rand_d(size_t n, double scale)
{
    double *v = malloc(n * sizeof *v);
    for (size_t i = 0; i < n; i++) v[i] = scale * test_uniform(&seed);
    return v;
}

static float *to_f(const double *v, size_t n)
{
    float *f = malloc(n * sizeof *f);
    for (size_t i = 0; i < n; i++) f[i] = (float)v[i];
    return f;
}

/* Rounds the double inputs to float so both sides see identical values. */
static void round_to_float(double *v, size_t n)
{
    for (size_t i = 0; i < n; i++) v[i] = (float)v[i];
}

/* ---- generic finite differences ---- */

typedef void (*ref_fn)(void *ctx, double *y); /* forward of the reference into y */

/* dL/dv[i] for L = sum(ref(v) * r), central differences in double. */
static void fd_grad(ref_fn f, void *ctx, double *v, size_t nv, const double *r, size_t ny,
                    double *grad)
{
    double *y = malloc(ny * sizeof *y);
    for (size_t i = 0; i < nv; i++) {
        double keep = v[i], lp = 0, lm = 0;
        v[i] = keep + FD_STEP;
        f(ctx, y);
        for (size_t j = 0; j < ny; j++) lp += y[j] * r[j];
        v[i] = keep - FD_STEP;
        f(ctx, y);
        for (size_t j = 0; j < ny; j++) lm += y[j] * r[j];
        v[i] = keep;
        grad[i] = (lp - lm) / (2 * FD_STEP);
    }
    free(y);
}

/* ---- convolution ---- */

typedef struct conv_case {
    kfac_conv_desc d;
    double *x, *w, *b; /* b may be NULL */
} conv_case;

static void conv_ref(void *ctx, double *y)
{
    conv_case *cc = ctx;
    const kfac_conv_desc *d = &cc->d;
    for (int n = 0; n < d->n; n++)
        for (int oh = 0; oh < d->ho; oh++)
            for (int ow = 0; ow < d->wo; ow++)
                for (int k = 0; k < d->k; k++) {
                    double s = cc->b ? cc->b[k] : 0;
                    for (int r = 0; r < d->kh; r++)
                        for (int q = 0; q < d->kw; q++) {
                            int ih = oh * d->stride - d->pad + r, iw = ow * d->stride - d->pad + q;
                            if (ih < 0 || ih >= d->h || iw < 0 || iw >= d->w) continue;
                            for (int c = 0; c < d->c; c++)
                                s += cc->w[((k * d->kh + r) * d->kw + q) * d->c + c] *
                                     cc->x[((n * d->h + ih) * d->w + iw) * d->c + c];
                        }
                    y[((n * d->ho + oh) * d->wo + ow) * d->k + k] = s;
                }
}

static void test_conv_case(int n, int h, int w, int c, int k, int ks, int stride, int pad,
                           int bias, int want_dx, int finite_diff)
{
    conv_case cc;
    kfac_conv_desc_init(&cc.d, n, h, w, c, k, ks, ks, stride, pad);
    const kfac_conv_desc *d = &cc.d;
    size_t nx = (size_t)n * h * w * c, nw = (size_t)k * ks * ks * c;
    size_t ny = (size_t)n * d->ho * d->wo * k;
    cc.x = rand_d(nx, 1.0);
    cc.w = rand_d(nw, 0.5);
    cc.b = bias ? rand_d(k, 0.5) : NULL;
    round_to_float(cc.x, nx);
    round_to_float(cc.w, nw);
    if (bias) round_to_float(cc.b, k);
    double *r = rand_d(ny, 1.0), *yref = malloc(ny * sizeof *yref);
    round_to_float(r, ny);
    conv_ref(&cc, yref);

    float *xf = to_f(cc.x, nx), *wf = to_f(cc.w, nw), *bf = bias ? to_f(cc.b, k) : NULL;
    float *yf = malloc(ny * sizeof *yf), *rf = to_f(r, ny);
    float *dx = malloc(nx * sizeof *dx), *dw = malloc(nw * sizeof *dw), *db = malloc(k * sizeof *db);
    void *ws = malloc(be->conv_workspace(be, d));
    CHECK_OK(be->conv_forward(be, d, xf, wf, bf, yf, ws));
    double err = test_max_rel_err(yf, yref, ny, 1e-3);
    char what[160];
    snprintf(what, sizeof what, "conv n%d %dx%dx%d k%d %dx%d s%d p%d%s", n, h, w, c, k, ks, ks,
             stride, pad, bias ? " +bias" : "");
    CHECK(err < TOL_FWD, "%s forward rel err %.2e", what, err);

    for (size_t i = 0; i < nx; i++) dx[i] = 7.0f; /* garbage the op must overwrite */
    CHECK_OK(be->conv_backward(be, d, xf, wf, rf, want_dx ? dx : NULL, 0, dw, bias ? db : NULL, ws));
    double *gx = malloc(nx * sizeof *gx), *gw = malloc(nw * sizeof *gw), *gb = malloc(k * sizeof *gb);
    if (finite_diff) {
        fd_grad(conv_ref, &cc, cc.w, nw, r, ny, gw);
        if (want_dx) fd_grad(conv_ref, &cc, cc.x, nx, r, ny, gx);
        if (bias) fd_grad(conv_ref, &cc, cc.b, k, r, ny, gb);
    } else {
        /* Large case: dense double-precision gradients, summed directly. */
        memset(gx, 0, nx * sizeof *gx);
        memset(gw, 0, nw * sizeof *gw);
        memset(gb, 0, k * sizeof *gb);
        for (int in = 0; in < n; in++)
            for (int oh = 0; oh < d->ho; oh++)
                for (int ow = 0; ow < d->wo; ow++)
                    for (int kk = 0; kk < k; kk++) {
                        double g = r[((in * d->ho + oh) * d->wo + ow) * k + kk];
                        gb[kk] += g;
                        for (int rr = 0; rr < ks; rr++)
                            for (int q = 0; q < ks; q++) {
                                int ih = oh * stride - pad + rr, iw = ow * stride - pad + q;
                                if (ih < 0 || ih >= h || iw < 0 || iw >= w) continue;
                                for (int cc2 = 0; cc2 < c; cc2++) {
                                    size_t xi = ((size_t)(in * h + ih) * w + iw) * c + cc2;
                                    size_t wi = ((size_t)(kk * ks + rr) * ks + q) * c + cc2;
                                    gw[wi] += g * cc.x[xi];
                                    gx[xi] += g * cc.w[wi];
                                }
                            }
                    }
    }
    err = test_max_rel_err(dw, gw, nw, 1e-3);
    CHECK(err < TOL_LIN, "%s dW rel err %.2e", what, err);
    if (want_dx) {
        err = test_max_rel_err(dx, gx, nx, 1e-3);
        CHECK(err < TOL_LIN, "%s dX rel err %.2e", what, err);
        /* accumulate = 1 adds onto what is there */
        float *dx2 = malloc(nx * sizeof *dx2);
        for (size_t i = 0; i < nx; i++) dx2[i] = 1.0f;
        CHECK_OK(be->conv_backward(be, d, xf, wf, rf, dx2, 1, dw, NULL, ws));
        double *expect = malloc(nx * sizeof *expect);
        for (size_t i = 0; i < nx; i++) expect[i] = gx[i] + 1.0;
        err = test_max_rel_err(dx2, expect, nx, 1e-3);
        CHECK(err < TOL_LIN, "%s dX accumulate rel err %.2e", what, err);
        free(dx2);
        free(expect);
    }
    if (bias) {
        err = test_max_rel_err(db, gb, k, 1e-3);
        CHECK(err < TOL_LIN, "%s db rel err %.2e", what, err);
    }
    free(cc.x); free(cc.w); free(cc.b); free(r); free(yref); free(xf); free(wf); free(bf);
    free(yf); free(rf); free(dx); free(dw); free(db); free(ws); free(gx); free(gw); free(gb);
}

static void test_conv(void)
{
    /*               n  h  w  c  k ks s p bias dx fd */
    test_conv_case(2, 5, 5, 3, 4, 3, 1, 1, 0, 1, 1);  /* 3x3 same */
    test_conv_case(2, 7, 6, 2, 3, 3, 2, 1, 0, 1, 1);  /* strided, non-square */
    test_conv_case(2, 4, 4, 5, 6, 1, 1, 0, 0, 1, 1);  /* 1x1 fast path */
    test_conv_case(2, 5, 5, 4, 3, 1, 2, 0, 0, 1, 1);  /* 1x1 stride 2 (shortcut) */
    test_conv_case(1, 7, 7, 2, 3, 5, 1, 2, 0, 1, 1);  /* 5x5 odd size */
    test_conv_case(3, 9, 9, 2, 2, 3, 3, 0, 0, 1, 1);  /* stride = kernel */
    test_conv_case(3, 9, 9, 1, 4, 7, 2, 3, 0, 0, 1);  /* stem-like, no dX (input layer) */
    test_conv_case(5, 1, 1, 7, 5, 1, 1, 0, 1, 1, 1);  /* fully connected + bias */
    test_conv_case(3, 20, 20, 16, 8, 3, 1, 1, 1, 1, 0); /* many chunks over 2 threads */
    test_conv_case(1, 11, 13, 8, 8, 3, 2, 1, 0, 1, 0);  /* one image: uneven thread split */
    /* Multiples of 16 output channels take the direct kernels (conv_direct.c):
     * forward and dW always, dX by the flipped kernel at stride 1 with
     * 16k input channels, else by GEMM + col2im. */
    test_conv_case(2, 6, 5, 16, 16, 3, 1, 1, 1, 1, 1);  /* direct everything, + bias */
    test_conv_case(3, 7, 6, 16, 32, 3, 2, 1, 0, 1, 1);  /* strided: dX by GEMM */
    test_conv_case(2, 5, 5, 3, 16, 3, 1, 1, 0, 1, 1);   /* KW*C = 9: a 6-tile and a tail */
    test_conv_case(1, 6, 6, 1, 16, 3, 1, 1, 0, 0, 1);   /* stem-like, C = 1 */
    test_conv_case(2, 5, 5, 32, 16, 5, 1, 2, 0, 1, 0);  /* 5x5: flipped padding 2 */
    test_conv_case(2, 5, 4, 16, 16, 3, 1, 0, 0, 1, 1);  /* unpadded: flipped padding 2 */
    test_conv_case(2, 6, 6, 16, 16, 1, 2, 0, 0, 1, 1);  /* 1x1 stride 2 shortcut */
    test_conv_case(5, 9, 7, 16, 48, 3, 1, 1, 0, 1, 0);  /* odd images over 2 threads */
}

/* ---- batch norm ---- */

typedef struct bn_case {
    size_t m;
    int c, relu;
    double *x, *gamma, *beta;
} bn_case;

static void bn_ref(void *ctx, double *y)
{
    bn_case *b = ctx;
    for (int j = 0; j < b->c; j++) {
        double mean = 0, var = 0;
        for (size_t i = 0; i < b->m; i++) mean += b->x[i * b->c + j];
        mean /= b->m;
        for (size_t i = 0; i < b->m; i++) var += pow(b->x[i * b->c + j] - mean, 2);
        var /= b->m;
        for (size_t i = 0; i < b->m; i++) {
            double v = (b->x[i * b->c + j] - mean) / sqrt(var + 1e-5) * b->gamma[j] + b->beta[j];
            y[i * b->c + j] = b->relu && v < 0 ? 0 : v;
        }
    }
}

static void test_bn_case(size_t m, int c, int relu)
{
    bn_case b = {.m = m, .c = c, .relu = relu};
    size_t n = m * c;
    b.x = rand_d(n, 2.0);
    for (size_t i = 0; i < n; i++) b.x[i] += 3.0; /* a mean far from 0 */
    b.gamma = rand_d(c, 1.0);
    b.beta = rand_d(c, 0.5);
    round_to_float(b.x, n);
    round_to_float(b.gamma, c);
    round_to_float(b.beta, c);
    double *r = rand_d(n, 1.0), *yref = malloc(n * sizeof *yref);
    round_to_float(r, n);
    bn_ref(&b, yref);
    float *xf = to_f(b.x, n), *gf = to_f(b.gamma, c), *bf = to_f(b.beta, c), *rf = to_f(r, n);
    float *y = malloc(n * sizeof *y), *dx = malloc(n * sizeof *dx);
    float *mean = malloc(c * sizeof *mean), *invstd = malloc(c * sizeof *invstd);
    float *rmean = malloc(c * sizeof *rmean), *rvar = malloc(c * sizeof *rvar);
    float *dg = malloc(c * sizeof *dg), *dbeta = malloc(c * sizeof *dbeta);
    for (int j = 0; j < c; j++) {
        rmean[j] = 0.5f;
        rvar[j] = 2.0f;
    }
    CHECK_OK(be->bn_forward_train(be, m, c, xf, gf, bf, y, mean, invstd, rmean, rvar, 0.1f, 1e-5f,
                                  relu));
    double err = test_max_rel_err(y, yref, n, 1e-3);
    CHECK(err < TOL_FWD * 10, "bn m%zu c%d relu%d forward rel err %.2e", m, c, relu, err);
    /* running statistics: momentum 0.1 towards batch mean and unbiased var */
    for (int j = 0; j < c; j++) {
        double mu = 0, var = 0;
        for (size_t i = 0; i < m; i++) mu += b.x[i * c + j];
        mu /= m;
        for (size_t i = 0; i < m; i++) var += pow(b.x[i * c + j] - mu, 2);
        double want_mean = 0.9 * 0.5 + 0.1 * mu, want_var = 0.9 * 2.0 + 0.1 * var / (m - 1);
        CHECK(fabs(rmean[j] - want_mean) < 1e-5 * (1 + fabs(want_mean)), "running mean %g vs %g",
              rmean[j], want_mean);
        CHECK(fabs(rvar[j] - want_var) < 1e-5 * (1 + want_var), "running var %g vs %g", rvar[j],
              want_var);
    }
    CHECK_OK(be->bn_backward(be, m, c, xf, y, rf, gf, mean, invstd, dx, 0, dg, dbeta, relu));
    double *gx = malloc(n * sizeof *gx), *gg = malloc(c * sizeof *gg), *gb = malloc(c * sizeof *gb);
    fd_grad(bn_ref, &b, b.x, n, r, n, gx);
    fd_grad(bn_ref, &b, b.gamma, c, r, n, gg);
    fd_grad(bn_ref, &b, b.beta, c, r, n, gb);
    err = test_max_rel_err(dx, gx, n, 1e-3);
    CHECK(err < TOL_NONLIN, "bn m%zu c%d relu%d dX rel err %.2e", m, c, relu, err);
    err = test_max_rel_err(dg, gg, c, 1e-3);
    CHECK(err < TOL_NONLIN, "bn dgamma rel err %.2e", err);
    err = test_max_rel_err(dbeta, gb, c, 1e-3);
    CHECK(err < TOL_NONLIN, "bn dbeta rel err %.2e", err);

    /* eval: normalise with the running statistics, not the batch's */
    CHECK_OK(be->bn_forward_eval(be, m, c, xf, gf, bf, y, rmean, rvar, 1e-5f, relu));
    for (size_t i = 0; i < n; i++) {
        int j = (int)(i % c);
        double v = (b.x[i] - rmean[j]) / sqrt(rvar[j] + 1e-5) * b.gamma[j] + b.beta[j];
        yref[i] = relu && v < 0 ? 0 : v;
    }
    err = test_max_rel_err(y, yref, n, 1e-3);
    CHECK(err < TOL_FWD * 10, "bn eval rel err %.2e", err);
    free(b.x); free(b.gamma); free(b.beta); free(r); free(yref); free(xf); free(gf); free(bf);
    free(rf); free(y); free(dx); free(mean); free(invstd); free(rmean); free(rvar); free(dg);
    free(dbeta); free(gx); free(gg); free(gb);
}

/* ---- element-wise, pooling ---- */

typedef struct unary_case {
    kfac_pool_desc pd;
    double *x, *b;
    size_t n;
    int op; /* 0 relu, 1 add, 2 add+relu, 3 maxpool, 4 gap */
} unary_case;

static void unary_ref(void *ctx, double *y)
{
    unary_case *u = ctx;
    const kfac_pool_desc *d = &u->pd;
    switch (u->op) {
    case 0: for (size_t i = 0; i < u->n; i++) y[i] = u->x[i] > 0 ? u->x[i] : 0; break;
    case 1: for (size_t i = 0; i < u->n; i++) y[i] = u->x[i] + u->b[i]; break;
    case 2: for (size_t i = 0; i < u->n; i++) y[i] = fmax(u->x[i] + u->b[i], 0); break;
    case 3:
        for (int n = 0; n < d->n; n++)
            for (int oh = 0; oh < d->ho; oh++)
                for (int ow = 0; ow < d->wo; ow++)
                    for (int c = 0; c < d->c; c++) {
                        double best = -DBL_MAX;
                        for (int r = 0; r < d->kh; r++)
                            for (int q = 0; q < d->kw; q++) {
                                int ih = oh * d->stride - d->pad + r, iw = ow * d->stride - d->pad + q;
                                if (ih < 0 || ih >= d->h || iw < 0 || iw >= d->w) continue;
                                best = fmax(best, u->x[((n * d->h + ih) * d->w + iw) * d->c + c]);
                            }
                        y[((n * d->ho + oh) * d->wo + ow) * d->c + c] = best;
                    }
        break;
    case 4:
        for (int n = 0; n < d->n; n++)
            for (int c = 0; c < d->c; c++) {
                double s = 0;
                for (int p = 0; p < d->h * d->w; p++) s += u->x[((size_t)n * d->h * d->w + p) * d->c + c];
                y[n * d->c + c] = s / (d->h * d->w);
            }
        break;
    }
}

/* Inputs spaced at least 1e-3 apart and away from 0 so kinks and ties of
 * ReLU and max never fall within a finite-difference step. */
static double *spaced_values(size_t n)
{
    double *v = malloc(n * sizeof *v);
    for (size_t i = 0; i < n; i++) v[i] = ((double)i + 0.5) / n * 2 - 1 + 1e-3 * (i % 2 ? 1 : -1) * 0.3;
    for (size_t i = n - 1; i > 0; i--) { /* shuffle */
        size_t j = (size_t)((test_uniform(&seed) + 1) / 2 * (i + 1)) % (i + 1);
        double t = v[i]; v[i] = v[j]; v[j] = t;
    }
    round_to_float(v, n);
    return v;
}

static void test_unary(int op, const char *what, int n, int h, int w, int c, int k, int s, int p)
{
    unary_case u = {.op = op};
    kfac_pool_desc_init(&u.pd, n, h, w, c, k, s, p);
    u.n = (size_t)n * h * w * c;
    size_t ny = op == 3 ? (size_t)n * u.pd.ho * u.pd.wo * c : op == 4 ? (size_t)n * c : u.n;
    u.x = spaced_values(u.n);
    u.b = spaced_values(u.n);
    /* Sums near 0 sit on add+relu's kink, where central differences fail. */
    for (size_t i = 0; i < u.n; i++)
        if (fabs(u.x[i] + u.b[i]) < 1e-2) u.b[i] += u.x[i] + u.b[i] < 0 ? -2e-2 : 2e-2;
    round_to_float(u.b, u.n);
    double *r = rand_d(ny, 1.0), *yref = malloc(ny * sizeof *yref);
    round_to_float(r, ny);
    unary_ref(&u, yref);
    float *xf = to_f(u.x, u.n), *bf = to_f(u.b, u.n), *rf = to_f(r, ny);
    float *y = malloc(ny * sizeof *y), *dx = malloc(u.n * sizeof *dx), *db = malloc(u.n * sizeof *db);
    switch (op) {
    case 0: CHECK_OK(be->relu_forward(be, u.n, xf, y)); break;
    case 1: case 2: CHECK_OK(be->add_forward(be, u.n, xf, bf, y, op == 2)); break;
    case 3: CHECK_OK(be->maxpool_forward(be, &u.pd, xf, y)); break;
    case 4: CHECK_OK(be->gap_forward(be, n, h * w, c, xf, y)); break;
    }
    double err = test_max_rel_err(y, yref, ny, 1e-3);
    CHECK(err < TOL_FWD, "%s forward rel err %.2e", what, err);
    for (size_t i = 0; i < u.n; i++) dx[i] = db[i] = 3.0f;
    switch (op) {
    case 0: CHECK_OK(be->relu_backward(be, u.n, y, rf, dx, 0)); break;
    case 1: case 2: CHECK_OK(be->add_backward(be, u.n, y, rf, dx, 0, db, 0, op == 2)); break;
    case 3: CHECK_OK(be->maxpool_backward(be, &u.pd, xf, y, rf, dx, 0)); break;
    case 4: CHECK_OK(be->gap_backward(be, n, h * w, c, rf, dx, 0)); break;
    }
    double *gx = malloc(u.n * sizeof *gx);
    fd_grad(unary_ref, &u, u.x, u.n, r, ny, gx);
    err = test_max_rel_err(dx, gx, u.n, 1e-3);
    CHECK(err < TOL_LIN, "%s dX rel err %.2e", what, err);
    if (op == 1 || op == 2) {
        fd_grad(unary_ref, &u, u.b, u.n, r, ny, gx);
        err = test_max_rel_err(db, gx, u.n, 1e-3);
        CHECK(err < TOL_LIN, "%s dB rel err %.2e", what, err);
    }
    free(u.x); free(u.b); free(r); free(yref); free(xf); free(bf); free(rf); free(y); free(dx);
    free(db); free(gx);
}

/* ---- softmax cross-entropy ---- */

static void test_softmax_xent(void)
{
    /* Hand-computed: logits (1, 2, 3), label 2:
     * loss = log(e + e^2 + e^3) - 3 = 0.40760596444;  argmax correct.
     * With smoothing 0.1 over 3 classes: targets (1/30, 1/30, 28/30):
     * loss = lse - (1/30*1 + 1/30*2 + 28/30*3) = 3.40760596444 - 2.9 = 0.50760596444. */
    float logits[6] = {1, 2, 3, 3, 1, 2};
    int32_t labels[2] = {2, 1};
    float g[6];
    double loss;
    int correct;
    CHECK_OK(be->softmax_xent(be, 1, 3, logits, labels, 0.0f, 1.0f, g, &loss, &correct));
    CHECK(fabs(loss - 0.40760596444) < 1e-6, "loss %.10f", loss);
    CHECK(correct == 1, "correct %d", correct);
    double p2 = exp(3) / (exp(1) + exp(2) + exp(3));
    CHECK(fabs(g[2] - (p2 - 1)) < 1e-6, "dlogit %g vs %g", g[2], p2 - 1);
    CHECK_OK(be->softmax_xent(be, 1, 3, logits, labels, 0.1f, 1.0f, g, &loss, &correct));
    CHECK(fabs(loss - 0.50760596444) < 1e-6, "smoothed loss %.10f", loss);
    /* two rows: mean gradient, one correct of two */
    CHECK_OK(be->softmax_xent(be, 2, 3, logits, labels, 0.0f, 1.0f, g, &loss, &correct));
    CHECK(correct == 1, "correct %d of 2", correct);
    double lse2 = log(exp(3) + exp(1) + exp(2));
    CHECK(fabs(loss - (0.40760596444 + lse2 - 1)) < 1e-6, "sum loss %.10f", loss);
    CHECK(fabs(g[4] - (exp(1 - lse2) - 1) / 2) < 1e-6, "mean gradient %g", g[4]);
    /* a loss scale multiplies the gradient only (fp16 training) */
    CHECK_OK(be->softmax_xent(be, 2, 3, logits, labels, 0.0f, 1024.0f, g, &loss, &correct));
    CHECK(fabs(loss - (0.40760596444 + lse2 - 1)) < 1e-6, "scaled: sum loss %.10f", loss);
    CHECK(fabs(g[4] - 512 * (exp(1 - lse2) - 1)) < 1e-3, "scaled gradient %g", g[4]);
    int32_t bad[1] = {3};
    CHECK(be->softmax_xent(be, 1, 3, logits, bad, 0.0f, 1.0f, g, &loss, &correct) == KFAC_EINVAL,
          "label out of range rejected");
}

/* ---- gradient unscaling (dynamic loss scaling) ---- */

static void test_scale_grads(void)
{
    float g[5] = {1, -2, 3, 4096, 0.5f};
    int finite = -1;
    CHECK_OK(be->scale_grads(be, 5, g, 0.25f, &finite));
    CHECK(finite == 1 && g[0] == 0.25f && g[1] == -0.5f && g[3] == 1024 && g[4] == 0.125f,
          "scaled: finite %d, %g %g %g %g", finite, g[0], g[1], g[3], g[4]);
    g[2] = INFINITY;
    CHECK_OK(be->scale_grads(be, 5, g, 1.0f, &finite));
    CHECK(finite == 0, "inf found: finite %d", finite);
    g[2] = NAN;
    CHECK_OK(be->scale_grads(be, 5, g, 1.0f, &finite));
    CHECK(finite == 0, "nan found: finite %d", finite);
    g[2] = 3e38f; /* finite, but not after scaling */
    CHECK_OK(be->scale_grads(be, 5, g, 4.0f, &finite));
    CHECK(finite == 0, "overflow by scaling found: finite %d", finite);
}

int main(void)
{
    CHECK_OK(kfac_backend_get("cpu", 2, &be));
    test_conv();
    test_bn_case(24, 3, 0);
    test_bn_case(50, 4, 1);
    test_bn_case(7, 5, 0); /* odd row count over 2 threads */
    test_unary(0, "relu", 2, 3, 3, 4, 1, 1, 0);
    test_unary(1, "add", 2, 3, 3, 4, 1, 1, 0);
    test_unary(2, "add+relu", 2, 3, 3, 4, 1, 1, 0);
    test_unary(3, "maxpool 3x3/2 p1", 2, 7, 7, 3, 3, 2, 1);
    test_unary(3, "maxpool 2x2/2", 2, 6, 4, 2, 2, 2, 0);
    test_unary(4, "global avg pool", 3, 4, 5, 3, 1, 1, 0);
    test_softmax_xent();
    test_scale_grads();
    kfac_backend_free(be);
    return test_summary("test_layers");
}
