/* kfac_ops.c - the CPU backend's K-FAC stages: the table entries of
 * kfac_backend.h over factors.c's host functions, which stay callable on
 * their own (and are the reference the CUDA backend is tested against). */
#include <string.h>

#include "cpu/cpu.h"
#include "kfac/kfac_factors.h"

static size_t cpu_gram_rows_workspace(const kfac_backend *be, size_t m, int n)
{
    (void)be, (void)m, (void)n;
    return 0; /* kfac_gram_rows allocates its own n x n scratch */
}

static kfac_status cpu_gram_rows(kfac_backend *be, size_t m, int n, const float *rows,
                                 int append_one, float scale, float *packed, void *ws)
{
    (void)ws;
    return kfac_gram_rows(be, m, n, rows, append_one, scale, packed);
}

static kfac_status cpu_bn_fisher(kfac_backend *be, int n, size_t per_image, int c, const float *x,
                                 const float *y, const float *dy, const float *save_mean,
                                 const float *save_invstd, int relu, float grad_scale, float *sg,
                                 float *sb, float *fisher)
{
    (void)be;
    kfac_bn_sample_grads(n, per_image, c, x, y, dy, save_mean, save_invstd, relu, grad_scale, sg,
                         sb);
    kfac_bn_unit_fisher(n, c, sg, sb, fisher);
    return KFAC_OK;
}

static kfac_status cpu_axpby(kfac_backend *be, size_t n, float alpha, const float *x, float beta,
                             float *y)
{
    (void)be;
    if (alpha == 0.0f && beta == 0.0f)
        for (size_t i = 0; i < n; i++) y[i] = 0.0f;
    else if (beta == 0.0f)
        for (size_t i = 0; i < n; i++) y[i] = alpha * x[i];
    else if (alpha == 0.0f)
        for (size_t i = 0; i < n; i++) y[i] = beta * y[i];
    else
        /* in kfac_factor_average's order: with FMA contraction the order
         * decides the rounding, and K-FAC runs then match earlier ones */
        for (size_t i = 0; i < n; i++) y[i] = beta * y[i] + alpha * x[i];
    return KFAC_OK;
}

static kfac_status cpu_copy2d(kfac_backend *be, size_t rows, size_t row_bytes, void *dst,
                              size_t dst_pitch, const void *src, size_t src_pitch)
{
    (void)be;
    for (size_t r = 0; r < rows; r++)
        memcpy((char *)dst + r * dst_pitch, (const char *)src + r * src_pitch, row_bytes);
    return KFAC_OK;
}

static kfac_status cpu_dot(kfac_backend *be, size_t n, const float *a, const float *b, double *out)
{
    (void)be;
    double s = 0;
    for (size_t i = 0; i < n; i++) s += (double)a[i] * b[i];
    *out = s;
    return KFAC_OK;
}

static kfac_status cpu_packed_trace(kfac_backend *be, int n, const float *packed, double *out)
{
    (void)be;
    *out = kfac_packed_trace(n, packed);
    return KFAC_OK;
}

static kfac_status cpu_factor_change(kfac_backend *be, int n, const float *old_packed,
                                     const float *new_packed, double *out)
{
    (void)be;
    *out = kfac_factor_change(n, old_packed, new_packed);
    return KFAC_OK;
}

static size_t cpu_inverse_workspace(const kfac_backend *be, int n)
{
    (void)be, (void)n;
    return 0; /* LAPACK works in place; ssyevd allocates its own */
}

static kfac_status cpu_inverse_cholesky(kfac_backend *be, int n, const float *packed, float shift,
                                        float *inv, void *ws)
{
    (void)be;
    return kfac_inverse_cholesky(n, packed, shift, inv, ws);
}

static kfac_status cpu_eigh(kfac_backend *be, int n, const float *packed, float *evals,
                            float *evecs, void *ws)
{
    (void)be, (void)ws;
    return kfac_eigh(n, packed, evals, evecs);
}

static kfac_status cpu_inverse_from_eig(kfac_backend *be, int n, const float *evals,
                                        const float *evecs, float shift, float *inv, void *ws)
{
    (void)be, (void)ws;
    kfac_inverse_from_eig(n, evals, evecs, shift, inv);
    return KFAC_OK;
}

static kfac_status cpu_precondition(kfac_backend *be, int k, int d, const float *ginv,
                                    const float *ainv, const float *grad, float *out, float *tmp)
{
    (void)be;
    kfac_precondition(k, d, ginv, ainv, grad, out, tmp);
    return KFAC_OK;
}

static kfac_status cpu_precondition_eig_exact(kfac_backend *be, int k, int d, const float *qg,
                                              const float *dg, const float *qa, const float *da,
                                              float lambda, const float *grad, float *out,
                                              float *tmp)
{
    (void)be;
    kfac_precondition_eig_exact(k, d, qg, dg, qa, da, lambda, grad, out, tmp);
    return KFAC_OK;
}

static kfac_status cpu_bn_precondition(kfac_backend *be, int c, const float *fisher, float lambda,
                                       int diagonal_only, const float *dgamma, const float *dbeta,
                                       float *pgamma, float *pbeta)
{
    (void)be;
    kfac_bn_precondition(c, fisher, lambda, diagonal_only, dgamma, dbeta, pgamma, pbeta);
    return KFAC_OK;
}

void kfac__cpu_set_kfac_ops(kfac_backend *be)
{
    be->gram_patches_workspace = kfac_gram_patches_workspace;
    be->gram_patches = kfac_gram_patches;
    be->gram_rows_workspace = cpu_gram_rows_workspace;
    be->gram_rows = cpu_gram_rows;
    be->bn_fisher = cpu_bn_fisher;
    be->axpby = cpu_axpby;
    be->copy2d = cpu_copy2d;
    be->dot = cpu_dot;
    be->packed_trace = cpu_packed_trace;
    be->factor_change = cpu_factor_change;
    be->inverse_workspace = cpu_inverse_workspace;
    be->inverse_cholesky = cpu_inverse_cholesky;
    be->eigh = cpu_eigh;
    be->inverse_from_eig = cpu_inverse_from_eig;
    be->precondition = cpu_precondition;
    be->precondition_eig_exact = cpu_precondition_eig_exact;
    be->bn_precondition = cpu_bn_precondition;
}
