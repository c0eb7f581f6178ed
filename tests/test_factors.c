/* test_factors.c - kfac_factors.h against independent double-precision
 * references: naive sums for the factors (conv patches gathered by plain
 * loops, not im2col), Gauss-Jordan elimination for inverses and for the
 * dense damped Kronecker systems, and the exact Fisher of a softmax
 * regression for the natural-gradient step.
 *
 * Tolerances are relative to the largest reference magnitude (testutil's
 * test_max_rel_err) unless stated, and written beside each check with the
 * reason.  Float inputs are generated first and the references read the
 * same float values, so only the library's arithmetic is under test.
 *
 * vec ordering used throughout: dW is K x D row-major and vec(dW) stacks
 * its rows, index i*D + j.  For symmetric A (D x D), G (K x K):
 *   G dW A  has row-stacked vec  (G (x) A) vec(dW)
 * since (G X A)_ij = sum_pq G_ip X_pq A_qj = sum_pq (G_ip A_jq) X_pq.
 * So the header's F ~= A (x) G (column-stacking convention) is the matrix
 * G (x) A in this ordering, element [(i*D+j), (p*D+q)] = G_ip A_jq. */
#include <string.h>

#include "kfac/kfac_factors.h"
#include "testutil.h"

static unsigned long long seed = 2024;
static kfac_backend *be;

static float *rand_f(size_t n, double scale)
{
    float *v = malloc(n * sizeof *v);
    for (size_t i = 0; i < n; i++) v[i] = (float)(scale * test_uniform(&seed));
    return v;
}

/* Element (i, j) of a packed factor by the header's index formula. */
static double packed_at(const float *p, int i, int j)
{
    if (i > j) {
        int t = i;
        i = j;
        j = t;
    }
    return p[i + (size_t)j * (j + 1) / 2];
}

/* Largest relative error of a packed factor against a full double matrix. */
static double packed_err(int n, const float *packed, const double *ref, double floor_)
{
    size_t len = kfac_packed_len(n);
    double *refp = malloc(len * sizeof *refp);
    for (int j = 0; j < n; j++)
        for (int i = 0; i <= j; i++) refp[i + (size_t)j * (j + 1) / 2] = ref[(size_t)i * n + j];
    double err = test_max_rel_err(packed, refp, len, floor_);
    free(refp);
    return err;
}

/* Solves A X = B (A n x n, B n x nrhs, row-major) by Gauss-Jordan elimination
 * with partial pivoting: B becomes X, A is destroyed.  0 if singular. */
static int gauss_jordan(int n, double *a, int nrhs, double *b)
{
    for (int c = 0; c < n; c++) {
        int piv = c;
        for (int r = c + 1; r < n; r++)
            if (fabs(a[(size_t)r * n + c]) > fabs(a[(size_t)piv * n + c])) piv = r;
        if (a[(size_t)piv * n + c] == 0) return 0;
        for (int j = 0; j < n; j++) {
            double t = a[(size_t)c * n + j];
            a[(size_t)c * n + j] = a[(size_t)piv * n + j];
            a[(size_t)piv * n + j] = t;
        }
        for (int j = 0; j < nrhs; j++) {
            double t = b[(size_t)c * nrhs + j];
            b[(size_t)c * nrhs + j] = b[(size_t)piv * nrhs + j];
            b[(size_t)piv * nrhs + j] = t;
        }
        double inv = 1.0 / a[(size_t)c * n + c];
        for (int j = 0; j < n; j++) a[(size_t)c * n + j] *= inv;
        for (int j = 0; j < nrhs; j++) b[(size_t)c * nrhs + j] *= inv;
        for (int r = 0; r < n; r++) {
            double f = a[(size_t)r * n + c];
            if (r == c || f == 0) continue;
            for (int j = 0; j < n; j++) a[(size_t)r * n + j] -= f * a[(size_t)c * n + j];
            for (int j = 0; j < nrhs; j++) b[(size_t)r * nrhs + j] -= f * b[(size_t)c * nrhs + j];
        }
    }
    return 1;
}

/* inv = (F + shift I)^-1 in double, F full n x n. */
static double *dense_damped_inverse(int n, const double *f, double shift)
{
    double *a = malloc((size_t)n * n * sizeof *a), *inv = calloc((size_t)n * n, sizeof *inv);
    memcpy(a, f, (size_t)n * n * sizeof *a);
    for (int i = 0; i < n; i++) {
        a[(size_t)i * n + i] += shift;
        inv[(size_t)i * n + i] = 1;
    }
    int ok = gauss_jordan(n, a, n, inv);
    CHECK(ok, "reference matrix of order %d singular", n);
    free(a);
    return inv;
}

/* A random SPD factor F = R^T R / m (R m x n uniform * scale), rounded to
 * float: packed for the library, full double (same values) for references. */
static void random_factor(int n, int m, double scale, float *packed, double *full)
{
    float *r = rand_f((size_t)m * n, scale);
    for (int i = 0; i < n; i++)
        for (int j = 0; j <= i; j++) {
            double s = 0;
            for (int t = 0; t < m; t++) s += (double)r[(size_t)t * n + i] * r[(size_t)t * n + j];
            float v = (float)(s / m);
            full[(size_t)i * n + j] = full[(size_t)j * n + i] = v;
            packed[j + (size_t)i * (i + 1) / 2] = v;
        }
    free(r);
}

static double *packed_to_full(int n, const float *packed)
{
    double *f = malloc((size_t)n * n * sizeof *f);
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) f[(size_t)i * n + j] = packed_at(packed, i, j);
    return f;
}

/* ---- packed storage ---- */

static void test_packing(void)
{
    const int n = 7;
    float *full = rand_f(n * n, 1.0), packed[28], back[49];
    for (int i = 0; i < n; i++)
        for (int j = 0; j < i; j++) full[i * n + j] = full[j * n + i]; /* symmetric */
    CHECK(kfac_packed_len(n) == 28, "packed length %zu", kfac_packed_len(n));
    kfac_pack_upper(n, full, packed);
    int bad = 0;
    for (int j = 0; j < n; j++)
        for (int i = 0; i <= j; i++) bad += packed[i + j * (j + 1) / 2] != full[i * n + j];
    CHECK(bad == 0, "%d packed elements off the index formula (exact copy)", bad);
    kfac_unpack_upper(n, packed, back);
    CHECK(memcmp(back, full, sizeof back) == 0, "unpack(pack(F)) == F exactly");
    double tr = 0;
    for (int i = 0; i < n; i++) tr += full[i * n + i];
    double got = kfac_packed_trace(n, packed);
    CHECK(fabs(got - tr) <= 1e-12 * fabs(tr), "trace %.17g vs %.17g (double sum of 7 floats)",
          got, tr);
    free(full);
}

/* ---- Gram matrices ---- */

static void test_gram_rows_case(size_t m, int n, int append_one, float scale)
{
    int order = n + append_one;
    float *rows = rand_f(m * n, 1.0), *packed = malloc(kfac_packed_len(order) * sizeof *packed);
    double *ref = calloc((size_t)order * order, sizeof *ref);
    for (size_t r = 0; r < m; r++)
        for (int i = 0; i < order; i++)
            for (int j = 0; j < order; j++) {
                double ai = i < n ? rows[r * n + i] : 1, aj = j < n ? rows[r * n + j] : 1;
                ref[(size_t)i * order + j] += scale * ai * aj;
            }
    CHECK_OK(kfac_gram_rows(be, m, n, rows, append_one, scale, packed));
    double err = packed_err(order, packed, ref, 1e-30);
    /* float ssyrk over <= 3000 rows, relative to the largest (diagonal)
     * entry: observed ~1e-7 */
    CHECK(err < 1e-6, "gram_rows m%zu n%d one%d: rel err %.3g", m, n, append_one, err);
    free(rows);
    free(packed);
    free(ref);
}

/* scale * sum over patches p p^T with the patches gathered by plain loops. */
static double *ref_patch_gram(const kfac_conv_desc *d, const float *x, int append_one,
                              double scale)
{
    int kd = d->kh * d->kw * d->c, order = kd + append_one;
    double *g = calloc((size_t)order * order, sizeof *g), *a = malloc(order * sizeof *a);
    for (int n = 0; n < d->n; n++)
        for (int oh = 0; oh < d->ho; oh++)
            for (int ow = 0; ow < d->wo; ow++) {
                for (int r = 0; r < d->kh; r++)
                    for (int s = 0; s < d->kw; s++)
                        for (int c = 0; c < d->c; c++) {
                            int ih = oh * d->stride - d->pad + r, iw = ow * d->stride - d->pad + s;
                            int in = ih >= 0 && ih < d->h && iw >= 0 && iw < d->w;
                            a[(r * d->kw + s) * d->c + c] =
                                in ? x[(((size_t)n * d->h + ih) * d->w + iw) * d->c + c] : 0;
                        }
                if (append_one) a[kd] = 1;
                for (int i = 0; i < order; i++)
                    for (int j = 0; j < order; j++) g[(size_t)i * order + j] += scale * a[i] * a[j];
            }
    free(a);
    return g;
}

static float *gram_patches_with(kfac_backend *b, const kfac_conv_desc *d, const float *x,
                                int append_one, float scale)
{
    int order = d->kh * d->kw * d->c + append_one;
    float *packed = malloc(kfac_packed_len(order) * sizeof *packed);
    void *ws = malloc(kfac_gram_patches_workspace(b, d));
    CHECK_OK(kfac_gram_patches(b, d, x, append_one, scale, packed, ws));
    free(ws);
    return packed;
}

static void test_gram_patches_case(int n, int h, int w, int c, int ks, int stride, int pad,
                                   int append_one)
{
    kfac_conv_desc d;
    kfac_conv_desc_init(&d, n, h, w, c, 4, ks, ks, stride, pad);
    size_t rows = (size_t)n * d.ho * d.wo;
    int order = ks * ks * c + append_one;
    float *x = rand_f((size_t)n * h * w * c, 1.0), scale = 1.0f / (float)rows;
    double *ref = ref_patch_gram(&d, x, append_one, scale);
    float *packed = gram_patches_with(be, &d, x, append_one, scale);
    double err = packed_err(order, packed, ref, 1e-30);
    /* float ssyrk chunks, partials summed: as gram_rows, 1e-6 */
    CHECK(err < 1e-6, "gram_patches %dx%dx%dx%d k%d s%d p%d one%d: rel err %.3g", n, h, w, c, ks,
          stride, pad, append_one, err);
    free(x);
    free(ref);
    free(packed);
}

/* 8 x 16x16x8 images, 3x3 s1 p1: KD = 72, 455-row chunks, 2048 rows -> 1024
 * per thread of 2 = 3 chunks each (the last partial).  3 threads split the
 * rows unevenly; results must not depend on run (fixed thread count). */
static void test_gram_patches_threads(void)
{
    kfac_conv_desc d;
    kfac_conv_desc_init(&d, 8, 16, 16, 8, 4, 3, 3, 1, 1);
    float *x = rand_f((size_t)8 * 16 * 16 * 8, 1.0), scale = 1.0f / 2048;
    double *ref = ref_patch_gram(&d, x, 1, scale);
    kfac_backend *be3;
    CHECK_OK(kfac_backend_get("cpu", 3, &be3));
    float *p2 = gram_patches_with(be, &d, x, 1, scale);
    float *p2b = gram_patches_with(be, &d, x, 1, scale);
    float *p3 = gram_patches_with(be3, &d, x, 1, scale);
    double e2 = packed_err(73, p2, ref, 1e-30), e3 = packed_err(73, p3, ref, 1e-30);
    CHECK(e2 < 1e-6, "gram_patches 2 threads, multi-chunk: rel err %.3g (as above)", e2);
    CHECK(e3 < 1e-6, "gram_patches 3 threads, multi-chunk: rel err %.3g (as above)", e3);
    CHECK(memcmp(p2, p2b, kfac_packed_len(73) * sizeof *p2) == 0,
          "gram_patches bitwise reproducible for a fixed thread count");
    kfac_backend_free(be3);
    free(x);
    free(ref);
    free(p2);
    free(p2b);
    free(p3);
}

static void test_gram(void)
{
    test_gram_rows_case(37, 6, 0, 0.25f);
    test_gram_rows_case(37, 6, 1, 1.0f / 37);
    test_gram_rows_case(3000, 33, 1, 1.0f / 3000);
    test_gram_patches_case(2, 5, 5, 3, 3, 1, 1, 1);
    test_gram_patches_case(2, 5, 5, 3, 3, 2, 1, 1);
    test_gram_patches_case(2, 5, 5, 3, 3, 2, 0, 0);
    test_gram_patches_case(2, 5, 5, 3, 1, 1, 0, 1); /* pointwise: rows are x itself */
    test_gram_patches_case(2, 5, 5, 3, 1, 2, 0, 0); /* 1x1 strided: im2col path */
    test_gram_patches_threads();
}

/* ---- inverses and eigendecomposition ---- */

static void test_inverses_case(int n)
{
    const float shift = 0.1f;
    size_t nn = (size_t)n * n;
    float *packed = malloc(kfac_packed_len(n) * sizeof *packed);
    double *f = malloc(nn * sizeof *f);
    random_factor(n, 3 * n, 1.0, packed, f);
    double *ref = dense_damped_inverse(n, f, shift);
    float *chol = malloc(nn * sizeof *chol), *eig = malloc(nn * sizeof *eig);
    float *ws = malloc(nn * sizeof *ws), *evals = malloc(n * sizeof *evals);
    float *evecs = malloc(nn * sizeof *evecs);
    CHECK_OK(kfac_inverse_cholesky(n, packed, shift, chol, ws));
    CHECK_OK(kfac_eigh(n, packed, evals, evecs));
    kfac_inverse_from_eig(n, evals, evecs, shift, eig);
    /* F + 0.1 I has condition ~10: float LAPACK of order <= 150, observed
     * <= 5e-7, within 1e-5 */
    double ec = test_max_rel_err(chol, ref, nn, 1e-30), ee = test_max_rel_err(eig, ref, nn, 1e-30);
    CHECK(ec < 1e-5, "Cholesky inverse n%d vs Gauss-Jordan: rel err %.3g", n, ec);
    CHECK(ee < 1e-5, "eig inverse n%d vs Gauss-Jordan: rel err %.3g", n, ee);
    double *chol_d = malloc(nn * sizeof *chol_d);
    for (size_t i = 0; i < nn; i++) chol_d[i] = chol[i];
    double ece = test_max_rel_err(eig, chol_d, nn, 1e-30);
    CHECK(ece < 1e-5, "eig vs Cholesky inverse n%d: rel err %.3g", n, ece);
    int asym = 0;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++)
            asym += chol[i * n + j] != chol[j * n + i] || eig[i * n + j] != eig[j * n + i];
    CHECK(asym == 0, "inverses exactly symmetric (%d mismatches)", asym);

    /* F q_j = d_j q_j with q_j column j; Q^T Q = I; ascending.  Residuals
     * relative to ||F||_max ~ 0.3..1, float eigensolver: 1e-5. */
    double fnorm = 0, res = 0, orth = 0;
    for (size_t i = 0; i < nn; i++) fnorm = fmax(fnorm, fabs(f[i]));
    int sorted = 1;
    for (int j = 0; j < n; j++) {
        if (j && evals[j] < evals[j - 1]) sorted = 0;
        for (int i = 0; i < n; i++) {
            double fq = 0;
            for (int t = 0; t < n; t++) fq += f[(size_t)i * n + t] * evecs[(size_t)t * n + j];
            res = fmax(res, fabs(fq - evals[j] * (double)evecs[(size_t)i * n + j]) / fnorm);
        }
        for (int l = 0; l < n; l++) {
            double dot = 0;
            for (int t = 0; t < n; t++)
                dot += (double)evecs[(size_t)t * n + j] * evecs[(size_t)t * n + l];
            orth = fmax(orth, fabs(dot - (j == l)));
        }
    }
    CHECK(res < 1e-5, "eigh n%d: max |F q_j - d_j q_j| / |F| = %.3g", n, res);
    CHECK(orth < 1e-5, "eigh n%d: max |Q^T Q - I| = %.3g", n, orth);
    CHECK(sorted, "eigh n%d: eigenvalues ascending", n);
    free(packed); free(f); free(ref); free(chol); free(eig); free(ws); free(evals); free(evecs);
    free(chol_d);
}

static void test_inverses(void)
{
    test_inverses_case(37);
    test_inverses_case(150); /* 64-row strips and 128-deep blocks, both ragged */

    /* [[1,2],[2,1]] has eigenvalues -1, 3: no Cholesky without a shift... */
    float indef[3] = {1, 2, 1}, inv[4], ws[4], evals[2], evecs[4];
    kfac_clear_error();
    CHECK(kfac_inverse_cholesky(2, indef, 0.0f, inv, ws) == KFAC_EBACKEND, "non-PD -> EBACKEND");
    CHECK(strstr(kfac_last_error(), "order 2") != NULL, "message names the order: '%s'",
          kfac_last_error());
    /* ...but + 1.5 I gives [[2.5,2],[2,2.5]], inverse [[2.5,-2],[-2,2.5]] / 2.25 (exact in
     * double; float LAPACK within 1e-6 relative) */
    CHECK_OK(kfac_inverse_cholesky(2, indef, 1.5f, inv, ws));
    double expect[4] = {2.5 / 2.25, -2 / 2.25, -2 / 2.25, 2.5 / 2.25};
    double err = test_max_rel_err(inv, expect, 4, 1e-30);
    CHECK(err < 1e-6, "shifted 2x2 inverse rel err %.3g", err);
    /* negative eigenvalues are clamped to exactly 0, the others kept (1e-6) */
    CHECK_OK(kfac_eigh(2, indef, evals, evecs));
    CHECK(evals[0] == 0.0f && fabs(evals[1] - 3) < 1e-6, "clamped evals %g %g", evals[0], evals[1]);
}

/* ---- preconditioning vs dense Kronecker solves ---- */

/* x = (Gd (x) Ad)^-1 vec(grad) (row-stacked, see top), Gd = G + sg I,
 * Ad = A + sa I; with kron_plus = lambda instead: (G (x) A + lambda I)^-1. */
static double *dense_kron_solve(int k, int d, const double *g, double sg, const double *a,
                                double sa, double kron_plus, const float *grad)
{
    int n = k * d;
    double *m = malloc((size_t)n * n * sizeof *m), *x = malloc(n * sizeof *x);
    for (int i = 0; i < k; i++)
        for (int j = 0; j < d; j++)
            for (int p = 0; p < k; p++)
                for (int q = 0; q < d; q++)
                    m[(size_t)(i * d + j) * n + p * d + q] =
                        (g[i * k + p] + (i == p) * sg) * (a[j * d + q] + (j == q) * sa) +
                        (i == p && j == q) * kron_plus;
    for (int i = 0; i < n; i++) x[i] = grad[i];
    int ok = gauss_jordan(n, m, 1, x);
    CHECK(ok, "dense Kronecker system singular");
    free(m);
    return x;
}

static void test_precondition(void)
{
    const int k = 5, d = 7;
    const double lambda = 0.01, gamma = sqrt(lambda);
    float pa[28], pg[15];
    double a[49], g[25];
    random_factor(d, 3 * d, 1.0, pa, a);
    random_factor(k, 3 * k, 0.2, pg, g); /* smaller G so pi is far from 1 */
    double pi = kfac_pi_correction(d, pa, k, pg);
    float sa = (float)(pi * gamma), sg = (float)(gamma / pi);
    float *grad = rand_f(k * d, 1.0), out[35], tmp[35], alias[35];
    float ainv[49], ginv[25], ws[49], da[7], qa[49], dg[5], qg[25];
    double *ref = dense_kron_solve(k, d, g, sg, a, sa, 0, grad);

    CHECK_OK(kfac_inverse_cholesky(d, pa, sa, ainv, ws));
    CHECK_OK(kfac_inverse_cholesky(k, pg, sg, ginv, ws));
    kfac_precondition(k, d, ginv, ainv, grad, out, tmp);
    /* damped factors have condition <~ 10 each: float, observed <= 5e-7, within 1e-5 */
    double err = test_max_rel_err(out, ref, k * d, 1e-30);
    CHECK(err < 1e-5, "Cholesky K-FAC step vs dense Kronecker solve: rel err %.3g", err);
    memcpy(alias, grad, sizeof alias);
    kfac_precondition(k, d, ginv, ainv, alias, alias, tmp);
    CHECK(memcmp(alias, out, sizeof out) == 0, "precondition with out == grad");

    CHECK_OK(kfac_eigh(d, pa, da, qa));
    CHECK_OK(kfac_eigh(k, pg, dg, qg));
    kfac_inverse_from_eig(d, da, qa, sa, ainv);
    kfac_inverse_from_eig(k, dg, qg, sg, ginv);
    kfac_precondition(k, d, ginv, ainv, grad, out, tmp);
    err = test_max_rel_err(out, ref, k * d, 1e-30);
    CHECK(err < 1e-5, "eig K-FAC step vs dense Kronecker solve: rel err %.3g", err);

    free(ref);
    ref = dense_kron_solve(k, d, g, 0, a, 0, lambda, grad);
    kfac_precondition_eig_exact(k, d, qg, dg, qa, da, (float)lambda, grad, out, tmp);
    /* A (x) G + 0.01 I has condition up to ~50: observed ~7e-7, within 1e-5 */
    err = test_max_rel_err(out, ref, k * d, 1e-30);
    CHECK(err < 1e-5, "eig_exact step vs dense (A(x)G + lambda I) solve: rel err %.3g", err);
    memcpy(alias, grad, sizeof alias);
    kfac_precondition_eig_exact(k, d, qg, dg, qa, da, (float)lambda, alias, alias, tmp);
    CHECK(memcmp(alias, out, sizeof out) == 0, "eig_exact with out == grad");
    free(ref);
    free(grad);
}

/* ---- softmax regression: K-FAC with the exact Fisher ----
 *
 * Logits z = W [x; 1], W: K x (D+1), p = softmax(z).  The per-sample gradient
 * of -log p_y is (p - e_y) [x;1]^T, row-stacked (p - e_y) (x) [x;1], so the
 * Fisher E_{y~p}[g g^T] = (diag p - p p^T) (x) [x;1][x;1]^T = G (x) A in
 * row-stacked order: for one input (or a batch of identical ones) K-FAC's
 * Kronecker factorisation is exact, and the eig_exact step must be the
 * natural-gradient step (F + lambda I)^-1 g.  The factors are built as the
 * optimizer builds them: A = (1/N) sum [x;1][x;1]^T by gram_rows with
 * append_one and G = N sum dy dy^T over mean-loss output gradients dy, here
 * dy = sqrt(p_y) (p - e_y) / N for every label y of every sample, so the
 * sum over y is the exact expectation rather than a sampled label. */

enum { SM_K = 3, SM_D = 4, SM_DA = SM_D + 1, SM_P = SM_K * SM_DA };

static void softmax_probs(const float *w, const float *x, double *p)
{
    double z[SM_K], zmax = -1e300, sum = 0;
    for (int i = 0; i < SM_K; i++) {
        z[i] = w[i * SM_DA + SM_D];
        for (int j = 0; j < SM_D; j++) z[i] += (double)w[i * SM_DA + j] * x[j];
        zmax = fmax(zmax, z[i]);
    }
    for (int i = 0; i < SM_K; i++) sum += p[i] = exp(z[i] - zmax);
    for (int i = 0; i < SM_K; i++) p[i] /= sum;
}

/* Element r of the row-stacked per-sample gradient (p - e_y) (x) [x;1]. */
static double sm_grad(const double *p, const double *xa, int y, int r)
{
    int i = r / SM_DA, j = r % SM_DA;
    return (p[i] - (i == y)) * xa[j];
}

/* K-FAC factors of a batch xs (n x D) by the library; the definitions
 * A = (1/N) sum [x;1][x;1]^T and G = (1/N) sum_n (diag p_n - p_n p_n^T) in double. */
static void softmax_factors(int n, const float *w, const float *xs, float *pa, float *pg,
                            double *a_def, double *g_def)
{
    float *dy = malloc((size_t)n * SM_K * SM_K * sizeof *dy);
    memset(a_def, 0, SM_DA * SM_DA * sizeof *a_def);
    memset(g_def, 0, SM_K * SM_K * sizeof *g_def);
    for (int s = 0; s < n; s++) {
        double p[SM_K], xa[SM_DA];
        softmax_probs(w, xs + s * SM_D, p);
        for (int j = 0; j < SM_DA; j++) xa[j] = j < SM_D ? xs[s * SM_D + j] : 1;
        for (int i = 0; i < SM_DA; i++)
            for (int j = 0; j < SM_DA; j++) a_def[i * SM_DA + j] += xa[i] * xa[j] / n;
        for (int i = 0; i < SM_K; i++)
            for (int j = 0; j < SM_K; j++)
                g_def[i * SM_K + j] += ((i == j) * p[i] - p[i] * p[j]) / n;
        for (int y = 0; y < SM_K; y++)
            for (int i = 0; i < SM_K; i++)
                dy[((size_t)s * SM_K + y) * SM_K + i] =
                    (float)(sqrt(p[y]) * (p[i] - (i == y)) / n);
    }
    CHECK_OK(kfac_gram_rows(be, (size_t)n, SM_D, xs, 1, 1.0f / (float)n, pa));
    CHECK_OK(kfac_gram_rows(be, (size_t)n * SM_K, SM_K, dy, 0, (float)n, pg));
    /* float Gram matrices of a few rows: 1e-6 */
    double ea = packed_err(SM_DA, pa, a_def, 1e-30), eg = packed_err(SM_K, pg, g_def, 1e-30);
    CHECK(ea < 1e-6, "softmax A (n=%d) vs definition: rel err %.3g", n, ea);
    CHECK(eg < 1e-6, "softmax G (n=%d) vs definition: rel err %.3g", n, eg);
    free(dy);
}

static void test_softmax_natural_gradient(void)
{
    const int n = 3, y0 = 1;
    const double lambda = 0.01;
    float *w = rand_f(SM_P, 1.0), *x = rand_f(SM_D, 1.0), xs[3 * SM_D];
    for (int s = 0; s < n; s++) memcpy(xs + s * SM_D, x, sizeof(float) * SM_D);
    double p[SM_K], xa[SM_DA], a_def[SM_DA * SM_DA], g_def[SM_K * SM_K];
    softmax_probs(w, x, p);
    for (int j = 0; j < SM_DA; j++) xa[j] = j < SM_D ? x[j] : 1;

    /* The Fisher by its definition, E_y[g_y g_y^T], and the mean-loss
     * gradient for label y0 (all samples identical: = one sample's). */
    double fisher[SM_P * SM_P] = {0}, gv[SM_P];
    for (int y = 0; y < SM_K; y++)
        for (int r = 0; r < SM_P; r++)
            for (int c = 0; c < SM_P; c++)
                fisher[r * SM_P + c] += p[y] * sm_grad(p, xa, y, r) * sm_grad(p, xa, y, c);
    float grad[SM_P], out[SM_P], tmp[SM_P];
    for (int r = 0; r < SM_P; r++) gv[r] = grad[r] = (float)sm_grad(p, xa, y0, r);

    float pa[SM_DA * (SM_DA + 1) / 2], pg[SM_K * (SM_K + 1) / 2];
    softmax_factors(n, w, xs, pa, pg, a_def, g_def);
    /* the identity F = G (x) A itself (double arithmetic: 1e-12) */
    double kerr = 0;
    for (int r = 0; r < SM_P; r++)
        for (int c = 0; c < SM_P; c++) {
            double kron = g_def[(r / SM_DA) * SM_K + c / SM_DA] *
                          a_def[(r % SM_DA) * SM_DA + c % SM_DA];
            kerr = fmax(kerr, fabs(fisher[r * SM_P + c] - kron));
        }
    CHECK(kerr < 1e-12, "softmax Fisher == G (x) A: max diff %.3g", kerr);

    for (int i = 0; i < SM_P; i++) fisher[i * SM_P + i] += lambda;
    int ok = gauss_jordan(SM_P, fisher, 1, gv);
    CHECK(ok, "dense natural-gradient system singular");
    float da[SM_DA], qa[SM_DA * SM_DA], dg[SM_K], qg[SM_K * SM_K];
    CHECK_OK(kfac_eigh(SM_DA, pa, da, qa));
    CHECK_OK(kfac_eigh(SM_K, pg, dg, qg));
    kfac_precondition_eig_exact(SM_K, SM_DA, qg, dg, qa, da, (float)lambda, grad, out, tmp);
    /* F is rank-deficient (rank K-1): float eigenvector rounding leaks
     * into its null space amplified by |F| / lambda ~ 100: observed ~6e-6,
     * within 1e-4 */
    double err = test_max_rel_err(out, gv, SM_P, 1e-30);
    CHECK(err < 1e-4, "K-FAC (exact Fisher factors) vs dense natural gradient: rel err %.3g", err);

    /* Distinct samples: the factors still match their definitions, but
     * (mean G) (x) (mean A) only approximates (1/N) sum G_n (x) A_n, so no
     * step comparison is claimed here. */
    float *xs5 = rand_f(5 * SM_D, 1.0);
    softmax_factors(5, w, xs5, pa, pg, a_def, g_def);
    free(xs5);
    free(w);
    free(x);
}

/* ---- running averages and scalar rules ---- */

static void test_scalar_rules(void)
{
    const size_t len = 50;
    const float decay = 0.95f;
    float *run = rand_f(len, 1.0), *batch = rand_f(len, 1.0);
    double ref[50];
    for (size_t i = 0; i < len; i++)
        ref[i] = decay * (double)run[i] + (1 - (double)decay) * batch[i];
    kfac_factor_average(len, run, batch, decay);
    double err = test_max_rel_err(run, ref, len, 1e-30);
    CHECK(err < 1e-6, "factor_average rel err %.3g (float: ~2^-24)", err);

    /* change: Frobenius norms of the full symmetric matrices (double: 1e-12) */
    const int n = 6;
    float *po = rand_f(kfac_packed_len(n), 1.0), *pn = rand_f(kfac_packed_len(n), 1.0);
    double *fo = packed_to_full(n, po), *fn = packed_to_full(n, pn), num = 0, den = 0;
    for (int i = 0; i < n * n; i++) {
        num += (fn[i] - fo[i]) * (fn[i] - fo[i]);
        den += fo[i] * fo[i];
    }
    double change = kfac_factor_change(n, po, pn), expect = sqrt(num / den);
    CHECK(fabs(change - expect) < 1e-12 * expect, "factor_change %.17g vs %.17g", change, expect);
    float zero[21] = {0};
    CHECK(kfac_factor_change(n, zero, zero) == 0, "no change from zero to zero");
    CHECK(isinf(kfac_factor_change(n, zero, pn)), "change from zero is infinite");

    /* pi = sqrt((tr A / na) / (tr G / ng)) (double: 1e-12) */
    float pg[6] = {0.3f, -0.2f, 0.1f, 0.5f, 0.05f, 0.25f}; /* order 3, diagonal 0.3 0.1 0.25 */
    double tra = 0, trg = (double)pg[0] + pg[2] + pg[5];
    for (int i = 0; i < n; i++) tra += fabs(packed_at(pn, i, i));
    for (int i = 0; i < n; i++) pn[i + i * (i + 1) / 2] = fabsf(pn[i + i * (i + 1) / 2]);
    double pi = kfac_pi_correction(n, pn, 3, pg), pref = sqrt((tra / n) / (trg / 3));
    CHECK(fabs(pi - pref) < 1e-12 * pref, "pi %.17g vs %.17g", pi, pref);
    CHECK(kfac_pi_correction(n, pn, n, zero) == 1.0, "pi is 1 for a zero trace");

    /* KL clip: min(1, sqrt(c / (lr^2 sum))) (double: 1e-12) */
    double s = kfac_kl_clip_scale(1e-3, 0.1, 10);
    CHECK(fabs(s - 0.1) < 1e-12, "KL clip active: %.17g vs 0.1", s);
    CHECK(kfac_kl_clip_scale(1e-3, 0.1, 0.05) == 1.0, "KL clip inactive (sqrt 2 > 1)");
    CHECK(kfac_kl_clip_scale(0, 0.1, 10) == 1.0, "KL clip off");
    CHECK(kfac_kl_clip_scale(1e-3, 0.1, -1) == 1.0, "KL clip with sum_pg <= 0");
    free(run); free(batch); free(po); free(pn); free(fo); free(fn);
}

/* ---- batch norm, unit-wise Fisher ---- */

static void test_bn(void)
{
    const int n = 9, c = 4;
    const float lambda = 0.01f;
    float *sg = rand_f(n * c, 1.0), *sb = rand_f(n * c, 1.0), fisher[12];
    float *dg = rand_f(c, 1.0), *db = rand_f(c, 1.0), pgm[4], pbt[4];
    double ref[12] = {0};
    for (int i = 0; i < n; i++)
        for (int j = 0; j < c; j++) {
            double g = sg[i * c + j], b = sb[i * c + j];
            ref[3 * j] += g * g / n;
            ref[3 * j + 1] += g * b / n;
            ref[3 * j + 2] += b * b / n;
        }
    kfac_bn_unit_fisher(n, c, sg, sb, fisher);
    double err = test_max_rel_err(fisher, ref, 12, 1e-30);
    CHECK(err < 1e-6, "BN unit Fisher rel err %.3g (double sums, float store)", err);

    for (int diag = 0; diag <= 1; diag++) {
        double want[8];
        for (int j = 0; j < c; j++) {
            double a = fisher[3 * j] + (double)lambda, b = diag ? 0 : fisher[3 * j + 1];
            double e = fisher[3 * j + 2] + (double)lambda, r[2] = {dg[j], db[j]};
            double m[4] = {a, b, b, e};
            int ok = gauss_jordan(2, m, 1, r);
            CHECK(ok, "2x2 singular");
            want[j] = r[0];
            want[4 + j] = r[1];
        }
        kfac_bn_precondition(c, fisher, lambda, diag, dg, db, pgm, pbt);
        double eg = test_max_rel_err(pgm, want, 4, 1e-30);
        double eb = test_max_rel_err(pbt, want + 4, 4, 1e-30);
        /* a 2x2 solve in double, stored in float: 1e-6 */
        CHECK(eg < 1e-6 && eb < 1e-6, "BN precondition diag%d: rel err %.3g %.3g", diag, eg, eb);
        float ag[4], ab[4];
        memcpy(ag, dg, sizeof ag);
        memcpy(ab, db, sizeof ab);
        kfac_bn_precondition(c, fisher, lambda, diag, ag, ab, ag, ab);
        CHECK(memcmp(ag, pgm, sizeof ag) == 0 && memcmp(ab, pbt, sizeof ab) == 0,
              "BN precondition in place (diag%d)", diag);
    }
    free(sg); free(sb); free(dg); free(db);
}

int main(void)
{
    CHECK_OK(kfac_backend_get("cpu", 2, &be));
    test_packing();
    test_gram();
    test_inverses();
    test_precondition();
    test_softmax_natural_gradient();
    test_scalar_rules();
    test_bn();
    kfac_backend_free(be);
    return test_summary("test_factors");
}
