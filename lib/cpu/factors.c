/* factors.c - K-FAC's numerical stages on host arrays (kfac_factors.h):
 * Kronecker factors by symmetric rank-k updates (OpenBLAS ssyrk), damped
 * inverses by Cholesky or eigendecomposition (LAPACKE), preconditioning by
 * GEMMs, and the small scalar rules (averaging, pi, KL clip, BN 2x2).
 *
 * Symmetric full matrices are row-major and only their LOWER triangle is
 * produced by BLAS/LAPACK here: the lower triangle's row j is exactly packed
 * column j, and a row-major lower triangle is LAPACK's column-major upper
 * one, so LAPACK works in place without LAPACKE's row-major transpose
 * copies.  kfac_gram_patches follows conv.c: threads own contiguous output
 * rows, gather them in chunks with im2col into private Gram partials, and
 * the partials are summed in thread order (bitwise reproducible for a fixed
 * thread count). */
#include <assert.h>
#include <limits.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>
#include <lapacke.h>

#include "cpu/cpu.h"
#include "kfac/kfac_factors.h"

/* ---- packed storage ---- */

/* Column j of packed storage starts after the order-j triangle. */
static inline size_t packed_col(int j) { return kfac_packed_len(j); }

/* Copies the lower triangle of a row-major n x n matrix onto the upper one. */
static void mirror_lower(int n, float *a)
{
    for (int i = 0; i < n; i++)
        for (int j = i + 1; j < n; j++) a[(size_t)i * n + j] = a[(size_t)j * n + i];
}

/* Reads the lower triangle only (row j = packed column j, both contiguous). */
void kfac_pack_upper(int n, const float *full, float *packed)
{
    for (int j = 0; j < n; j++)
        memcpy(packed + packed_col(j), full + (size_t)j * n, (size_t)(j + 1) * sizeof(float));
}

void kfac_unpack_upper(int n, const float *packed, float *full)
{
    for (int j = 0; j < n; j++)
        memcpy(full + (size_t)j * n, packed + packed_col(j), (size_t)(j + 1) * sizeof(float));
    mirror_lower(n, full);
}

double kfac_packed_trace(int n, const float *packed)
{
    double t = 0;
    for (int j = 0; j < n; j++) t += packed[packed_col(j) + j];
    return t;
}

/* ---- Gram matrices ---- */

/* sums[i] += sum over the m rows of a (m x n) of a[r][i]. */
static void add_column_sums(size_t m, size_t n, const float *a, double *sums)
{
    for (size_t r = 0; r < m; r++)
        for (size_t i = 0; i < n; i++) sums[i] += a[r * n + i];
}

/* The appended ones column of an order-(n+1) factor: (i, n) = scale *
 * sum_i, (n, n) = scale * rows.  Packed order n+1 is packed order n
 * followed by this column. */
static void set_ones_column(int n, const double *sums, size_t rows, float scale, float *packed)
{
    float *col = packed + packed_col(n);
    for (int i = 0; i < n; i++) col[i] = (float)(scale * sums[i]);
    col[n] = (float)(scale * (double)rows);
}

kfac_status kfac_gram_rows(kfac_backend *be, size_t m, int n, const float *rows, int append_one,
                           float scale, float *packed)
{
    if (n < 1) return KFAC_ERR(KFAC_EINVAL, "Gram matrix of order %d", n);
    if (m > INT_MAX) return KFAC_ERR(KFAC_EINVAL, "%zu rows exceed one BLAS call", m);
    /* ssyrk needs a full n x n destination and the contract gives no
     * scratch, so it is allocated here (once per factor refresh). */
    float *full = malloc((size_t)n * n * sizeof *full);
    double *sums = append_one ? calloc((size_t)n, sizeof *sums) : NULL;
    if (!full || (append_one && !sums)) {
        free(full);
        free(sums);
        return KFAC_ERR(KFAC_ENOMEM, "cannot allocate a %d x %d Gram matrix", n, n);
    }
    /* Outside any parallel region: OpenBLAS threads the update itself. */
    cblas_ssyrk(CblasRowMajor, CblasLower, CblasTrans, n, (int)m, scale, rows, n, 0.0f, full, n);
    kfac_pack_upper(n, full, packed);
    if (append_one) {
        add_column_sums(m, (size_t)n, rows, sums);
        set_ones_column(n, sums, m, scale, packed);
    }
    free(full);
    free(sums);
    return KFAC_OK;
}

/* Chunks hold ~128 KiB of patches like conv.c's, but at least 256 rows:
 * each ssyrk reads and rewrites the whole KD x KD partial, so a chunk must
 * be deep enough to amortise that traffic for wide patches. */
#define GRAM_CHUNK_FLOATS (32 * 1024)
#define GRAM_MIN_ROWS 256
#define ALIGN_FLOATS 16

static size_t round_up(size_t n) { return (n + ALIGN_FLOATS - 1) / ALIGN_FLOATS * ALIGN_FLOATS; }

static size_t gram_chunk_rows(size_t kd)
{
    size_t rows = GRAM_CHUNK_FLOATS / kd;
    return rows < GRAM_MIN_ROWS ? GRAM_MIN_ROWS : rows;
}

/* Per-thread workspace: a chunk of patch rows, a private KD x KD Gram
 * partial (lower triangle used) and KD double column sums. */
typedef struct gram_ws {
    float *cols, *gram;
    double *sums;
} gram_ws;

static size_t gram_ws_floats(size_t kd)
{
    return round_up(gram_chunk_rows(kd) * kd) + round_up(kd * kd) + round_up(2 * kd);
}

static gram_ws gram_ws_at(size_t kd, void *ws, int t)
{
    float *base = (float *)ws + (size_t)t * gram_ws_floats(kd);
    gram_ws tw;
    tw.cols = base;
    tw.gram = base + round_up(gram_chunk_rows(kd) * kd);
    tw.sums = (double *)(tw.gram + round_up(kd * kd));
    return tw;
}

static size_t patch_len(const kfac_conv_desc *d) { return (size_t)d->kh * d->kw * d->c; }

size_t kfac_gram_patches_workspace(const kfac_backend *be, const kfac_conv_desc *d)
{
    return (size_t)be->threads * gram_ws_floats(patch_len(d)) * sizeof(float);
}

/* The [first, end) share of `total` items for thread t of nt. */
static void split_range(size_t total, int t, int nt, size_t *first, size_t *end)
{
    *first = total * (size_t)t / (size_t)nt;
    *end = total * (size_t)(t + 1) / (size_t)nt;
}

/* One thread's partial Gram matrix (and column sums) of patch rows [first, end). */
static void gram_patch_rows(const kfac_conv_desc *d, const float *x, int append_one, gram_ws tw,
                            size_t first, size_t end)
{
    const size_t kd = patch_len(d), cr = gram_chunk_rows(kd);
    memset(tw.gram, 0, kd * kd * sizeof(float));
    if (append_one) memset(tw.sums, 0, kd * sizeof(double));
    for (size_t r = first; r < end; r += cr) {
        size_t rows = end - r < cr ? end - r : cr;
        const float *a = kfac__cpu_patch_rows(d, x, r, rows, tw.cols);
        cblas_ssyrk(CblasRowMajor, CblasLower, CblasTrans, (int)kd, (int)rows, 1.0f, a, (int)kd,
                    1.0f, tw.gram, (int)kd);
        if (append_one) add_column_sums(rows, kd, a, tw.sums);
    }
}

/* packed[lo, hi) = scale * the sum, in thread order, of the nt partials. */
static void sum_gram_partials(size_t kd, void *ws, int nt, float scale, size_t lo, size_t hi,
                              float *packed)
{
    const float *g0 = gram_ws_at(kd, ws, 0).gram;
    const size_t stride = gram_ws_floats(kd);
    for (size_t j = 0; j < kd; j++) {
        size_t base = packed_col((int)j);
        if (base >= hi) break;
        if (base + j + 1 <= lo) continue;
        size_t i0 = lo > base ? lo - base : 0, i1 = hi - base < j + 1 ? hi - base : j + 1;
        for (size_t i = i0; i < i1; i++) {
            float s = 0.0f;
            for (int u = 0; u < nt; u++) s += g0[u * stride + j * kd + i];
            packed[base + i] = scale * s;
        }
    }
}

kfac_status kfac_gram_patches(kfac_backend *be, const kfac_conv_desc *d, const float *x,
                              int append_one, float scale, float *packed, void *ws)
{
    assert(ws && packed && x);
    const size_t total = (size_t)d->n * d->ho * d->wo, kd = patch_len(d);
    if (kd > INT_MAX / 2) return KFAC_ERR(KFAC_EINVAL, "patch length %zu too large", kd);
#pragma omp parallel num_threads(be->threads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        size_t first, end;
        split_range(total, t, nt, &first, &end);
        gram_patch_rows(d, x, append_one, gram_ws_at(kd, ws, t), first, end);
#pragma omp barrier
        split_range(kfac_packed_len((int)kd), t, nt, &first, &end);
        sum_gram_partials(kd, ws, nt, scale, first, end, packed);
        if (append_one && t == 0) {
            double *sums = gram_ws_at(kd, ws, 0).sums;
            for (int u = 1; u < nt; u++) {
                const double *su = gram_ws_at(kd, ws, u).sums;
                for (size_t i = 0; i < kd; i++) sums[i] += su[i];
            }
            set_ones_column((int)kd, sums, total, scale, packed);
        }
    }
    return KFAC_OK;
}

/* ---- running averages and scalar rules ---- */

void kfac_factor_average(size_t len, float *running, const float *batch, float decay)
{
    for (size_t i = 0; i < len; i++) running[i] = decay * running[i] + (1.0f - decay) * batch[i];
}

double kfac_factor_change(int n, const float *old_packed, const float *new_packed)
{
    double diff = 0, ref = 0;
    for (int j = 0; j < n; j++) {
        const float *o = old_packed + packed_col(j), *w = new_packed + packed_col(j);
        for (int i = 0; i <= j; i++) {
            double weight = i == j ? 1.0 : 2.0, dv = (double)w[i] - o[i];
            diff += weight * dv * dv;
            ref += weight * (double)o[i] * o[i];
        }
    }
    if (ref == 0) return diff == 0 ? 0.0 : INFINITY; /* from nothing: always "changed" */
    return sqrt(diff / ref);
}

double kfac_pi_from_traces(int na, double ta, int ng, double tg)
{
    if (!(ta > 0) || !(tg > 0)) return 1.0;
    return sqrt((ta / na) / (tg / ng));
}

double kfac_pi_correction(int na, const float *a_packed, int ng, const float *g_packed)
{
    return kfac_pi_from_traces(na, kfac_packed_trace(na, a_packed), ng,
                               kfac_packed_trace(ng, g_packed));
}

double kfac_kl_clip_scale(double kl_clip, double lr, double sum_pg)
{
    double denom = lr * lr * sum_pg;
    if (!(kl_clip > 0) || !(denom > 0)) return 1.0;
    double s = sqrt(kl_clip / denom);
    return s < 1.0 ? s : 1.0;
}

/* ---- inverses ---- */

static kfac_status lapack_error(const char *routine, int n, lapack_int info)
{
    if (info == LAPACK_WORK_MEMORY_ERROR || info == LAPACK_TRANSPOSE_MEMORY_ERROR)
        return KFAC_ERR(KFAC_ENOMEM, "%s (order %d): cannot allocate its workspace", routine, n);
    if (info < 0)
        return KFAC_ERR(KFAC_EBACKEND, "%s (order %d): illegal argument %d (NaN in the matrix?)",
                        routine, n, (int)-info);
    return KFAC_ERR(KFAC_EBACKEND, "%s (order %d) failed with info %d", routine, n, (int)info);
}

kfac_status kfac_inverse_cholesky(int n, const float *packed, float shift, float *inv, float *ws)
{
    kfac_unpack_upper(n, packed, inv);
    for (int i = 0; i < n; i++) inv[(size_t)i * n + i] += shift;
    /* Column-major 'U' = our row-major lower triangle, in place. */
    lapack_int info = LAPACKE_spotrf(LAPACK_COL_MAJOR, 'U', n, inv, n);
    if (info > 0)
        return KFAC_ERR(KFAC_EBACKEND,
                        "Cholesky: factor of order %d with shift %g is not positive definite "
                        "(leading minor %d)",
                        n, (double)shift, (int)info);
    if (info < 0) return lapack_error("spotrf", n, info);
    info = LAPACKE_spotri(LAPACK_COL_MAJOR, 'U', n, inv, n);
    if (info != 0) return lapack_error("spotri", n, info);
    mirror_lower(n, inv);
    return KFAC_OK;
}

kfac_status kfac_eigh(int n, const float *packed, float *evals, float *evecs)
{
    kfac_unpack_upper(n, packed, evecs);
    /* Work sizes from ssyevd's documented formula, not its workspace query:
     * the query answers in a float, which rounds 1 + 6n + 2n^2 down once it
     * passes 2^24 (n > ~2900, e.g. ResNet-50's 3x3x512 factors) and ssyevd
     * then rejects its own answer. */
    size_t lwork = 1 + 6 * (size_t)n + 2 * (size_t)n * n, liwork = 3 + 5 * (size_t)n;
    float *work = malloc(lwork * sizeof(float));
    lapack_int *iwork = malloc(liwork * sizeof(lapack_int));
    lapack_int info = work && iwork ? LAPACKE_ssyevd_work(LAPACK_COL_MAJOR, 'V', 'U', n, evecs, n,
                                                          evals, work, (lapack_int)lwork, iwork,
                                                          (lapack_int)liwork)
                                    : LAPACK_WORK_MEMORY_ERROR;
    free(work);
    free(iwork);
    if (info == LAPACK_WORK_MEMORY_ERROR)
        return KFAC_ERR(KFAC_ENOMEM, "ssyevd (order %d): out of memory for its workspace", n);
    if (info != 0) return lapack_error("ssyevd", n, info);
    /* Column-major eigenvectors are our rows: transpose so column j is eigenvector j. */
    for (int i = 0; i < n; i++)
        for (int j = i + 1; j < n; j++) {
            float t = evecs[(size_t)i * n + j];
            evecs[(size_t)i * n + j] = evecs[(size_t)j * n + i];
            evecs[(size_t)j * n + i] = t;
        }
    /* A PSD factor's rounding can give tiny negative eigenvalues. */
    for (int i = 0; i < n; i++)
        if (evals[i] < 0.0f) evals[i] = 0.0f;
    return KFAC_OK;
}

/* inv = Q W Q^T with W = diag(1/(d+shift)), lower triangle by strips of
 * STRIP rows, the scaled strip (STRIP x DEPTH) in a stack tile: no scratch
 * of order n is needed. */
#define EIG_STRIP 64
#define EIG_DEPTH 128

void kfac_inverse_from_eig(int n, const float *evals, const float *evecs, float shift, float *inv)
{
    float tile[EIG_STRIP * EIG_DEPTH];
    for (int i0 = 0; i0 < n; i0 += EIG_STRIP) {
        int rows = n - i0 < EIG_STRIP ? n - i0 : EIG_STRIP, cols = i0 + rows;
        for (int k0 = 0; k0 < n; k0 += EIG_DEPTH) {
            int depth = n - k0 < EIG_DEPTH ? n - k0 : EIG_DEPTH;
            for (int r = 0; r < rows; r++)
                for (int q = 0; q < depth; q++)
                    tile[r * depth + q] =
                        evecs[(size_t)(i0 + r) * n + k0 + q] / (evals[k0 + q] + shift);
            /* inv[i0.., 0..cols) (+)= tile * Q[0..cols, k0..]^T */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, cols, depth, 1.0f, tile,
                        depth, evecs + k0, n, k0 ? 1.0f : 0.0f, inv + (size_t)i0 * n, n);
        }
    }
    mirror_lower(n, inv);
}

/* ---- preconditioning ---- */

void kfac_precondition(int k, int d, const float *ginv, const float *ainv, const float *grad,
                       float *out, float *tmp)
{
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, k, d, k, 1.0f, ginv, k, grad, d, 0.0f,
                tmp, d);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, k, d, d, 1.0f, tmp, d, ainv, d, 0.0f,
                out, d);
}

void kfac_precondition_eig_exact(int k, int d, const float *qg, const float *dg,
                                 const float *qa, const float *da, float lambda,
                                 const float *grad, float *out, float *tmp)
{
    /* to the eigenbases: out = QG^T grad QA */
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, k, d, k, 1.0f, qg, k, grad, d, 0.0f,
                tmp, d);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, k, d, d, 1.0f, tmp, d, qa, d, 0.0f,
                out, d);
    for (int i = 0; i < k; i++)
        for (int j = 0; j < d; j++) out[(size_t)i * d + j] /= dg[i] * da[j] + lambda;
    /* and back: out = QG out QA^T */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, k, d, k, 1.0f, qg, k, out, d, 0.0f,
                tmp, d);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, k, d, d, 1.0f, tmp, d, qa, d, 0.0f, out,
                d);
}

/* ---- batch norm, unit-wise ---- */

void kfac_bn_sample_grads(int n, size_t per_image, int c, const float *x, const float *y,
                          const float *dy, const float *save_mean, const float *save_invstd,
                          int relu, float grad_scale, float *sg, float *sb)
{
    for (int i = 0; i < n; i++) {
        float *sgi = sg + (size_t)i * c, *sbi = sb + (size_t)i * c;
        memset(sgi, 0, (size_t)c * sizeof(float));
        memset(sbi, 0, (size_t)c * sizeof(float));
        for (size_t t = (size_t)i * per_image; t < (size_t)(i + 1) * per_image; t++) {
            const float *xt = x + t * c, *yt = y + t * c, *dyt = dy + t * c;
            for (int j = 0; j < c; j++) {
                float g = relu && yt[j] <= 0.0f ? 0.0f : grad_scale * dyt[j];
                sgi[j] += g * (xt[j] - save_mean[j]) * save_invstd[j];
                sbi[j] += g;
            }
        }
    }
}

void kfac_bn_unit_fisher(int n, int c, const float *sg, const float *sb, float *fisher)
{
    for (int j = 0; j < c; j++) {
        double gg = 0, gb = 0, bb = 0;
        for (int i = 0; i < n; i++) {
            double g = sg[(size_t)i * c + j], b = sb[(size_t)i * c + j];
            gg += g * g;
            gb += g * b;
            bb += b * b;
        }
        fisher[3 * j + 0] = (float)(gg / n);
        fisher[3 * j + 1] = (float)(gb / n);
        fisher[3 * j + 2] = (float)(bb / n);
    }
}

void kfac_bn_precondition(int c, const float *fisher, float lambda, int diagonal_only,
                          const float *dgamma, const float *dbeta, float *pgamma, float *pbeta)
{
    for (int j = 0; j < c; j++) {
        double a = (double)fisher[3 * j] + lambda, b = diagonal_only ? 0.0 : fisher[3 * j + 1];
        double e = (double)fisher[3 * j + 2] + lambda, g = dgamma[j], bt = dbeta[j];
        double det = a * e - b * b; /* > 0: F_j is PSD and lambda > 0 */
        pgamma[j] = (float)((e * g - b * bt) / det);
        pbeta[j] = (float)((a * bt - b * g) / det);
    }
}
