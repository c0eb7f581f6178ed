/* bn.c - CPU batch normalisation over NHWC rows (m rows of c channels),
 * with an optional fused ReLU on the output.
 *
 * Per-channel sums run in float over blocks of BLOCK_ROWS rows (vectorised
 * across channels), each block's sum is added in double, and threads'
 * partials are combined in thread order: statistics stay exact to float
 * precision at any batch size and are reproducible for a thread count. */
#include <math.h>
#include <omp.h>
#include <string.h>

#include "cpu/cpu.h"

#define BLOCK_ROWS 64

static void row_range(size_t m, int t, int nt, size_t *first, size_t *end)
{
    *first = m * (size_t)t / (size_t)nt;
    *end = m * (size_t)(t + 1) / (size_t)nt;
}

/* out = x * scale + shift, then max(0, .) when relu. */
static inline void normalize_row(const float *restrict x, const float *restrict scale,
                                 const float *restrict shift, float *restrict out, int c, int relu)
{
    if (relu) {
        for (int j = 0; j < c; j++) {
            float v = x[j] * scale[j] + shift[j];
            out[j] = v > 0.0f ? v : 0.0f;
        }
    } else {
        for (int j = 0; j < c; j++) out[j] = x[j] * scale[j] + shift[j];
    }
}

/* Combines nt per-thread rows of 2*c doubles (s0 | s1) into the first. */
static void combine_partials(double *scratch, int nt, int c)
{
    for (int u = 1; u < nt; u++)
        for (int j = 0; j < 2 * c; j++) scratch[j] += scratch[(size_t)u * 2 * KFAC_CPU_MAX_CH + j];
}

kfac_status kfac__cpu_bn_forward_train(kfac_backend *be, size_t m, int c, const float *x,
                                       const float *gamma, const float *beta, float *y,
                                       float *save_mean, float *save_invstd, float *run_mean,
                                       float *run_var, float momentum, float eps, int relu)
{
    if (c > KFAC_CPU_MAX_CH)
        return KFAC_ERR(KFAC_ENOTSUP, "batch norm: %d channels > %d", c, KFAC_CPU_MAX_CH);
    double *scratch = kfac__cpu(be)->reduce_scratch;
    float scale[KFAC_CPU_MAX_CH], shift[KFAC_CPU_MAX_CH];
#pragma omp parallel num_threads(be->threads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        double *sum = scratch + (size_t)t * 2 * KFAC_CPU_MAX_CH, *sumsq = sum + c;
        size_t first, end;
        row_range(m, t, nt, &first, &end);
        /* Shifted sums (by the first row) avoid cancellation in E[x^2]-E[x]^2. */
        memset(sum, 0, 2 * (size_t)c * sizeof(double));
        float bs[KFAC_CPU_MAX_CH], bq[KFAC_CPU_MAX_CH];
        for (size_t b = first; b < end; b += BLOCK_ROWS) {
            size_t b_end = end - b < BLOCK_ROWS ? end : b + BLOCK_ROWS;
            memset(bs, 0, c * sizeof(float));
            memset(bq, 0, c * sizeof(float));
            for (size_t i = b; i < b_end; i++) {
                const float *row = x + i * c;
                for (int j = 0; j < c; j++) {
                    float v = row[j] - x[j];
                    bs[j] += v;
                    bq[j] += v * v;
                }
            }
            for (int j = 0; j < c; j++) {
                sum[j] += bs[j];
                sumsq[j] += bq[j];
            }
        }
#pragma omp barrier
#pragma omp single
        {
            combine_partials(scratch, nt, c);
            for (int j = 0; j < c; j++) {
                double mean_shifted = scratch[j] / (double)m;
                double var = scratch[c + j] / (double)m - mean_shifted * mean_shifted;
                if (var < 0) var = 0;
                double mean = mean_shifted + (double)x[j];
                double invstd = 1.0 / sqrt(var + (double)eps);
                save_mean[j] = (float)mean;
                save_invstd[j] = (float)invstd;
                scale[j] = (float)(gamma[j] * invstd);
                shift[j] = (float)(beta[j] - mean * gamma[j] * invstd);
                double unbiased = m > 1 ? var * (double)m / (double)(m - 1) : var;
                run_mean[j] = (1.0f - momentum) * run_mean[j] + momentum * (float)mean;
                run_var[j] = (1.0f - momentum) * run_var[j] + momentum * (float)unbiased;
            }
        }
        for (size_t i = first; i < end; i++) {
            const float *row = x + i * c;
            float *out = y + i * c;
            normalize_row(row, scale, shift, out, c, relu);
        }
    }
    return KFAC_OK;
}

kfac_status kfac__cpu_bn_forward_eval(kfac_backend *be, size_t m, int c, const float *x,
                                      const float *gamma, const float *beta, float *y,
                                      const float *run_mean, const float *run_var, float eps,
                                      int relu)
{
    if (c > KFAC_CPU_MAX_CH)
        return KFAC_ERR(KFAC_ENOTSUP, "batch norm: %d channels > %d", c, KFAC_CPU_MAX_CH);
    float scale[KFAC_CPU_MAX_CH], shift[KFAC_CPU_MAX_CH];
    for (int j = 0; j < c; j++) {
        scale[j] = gamma[j] / sqrtf(run_var[j] + eps);
        shift[j] = beta[j] - run_mean[j] * scale[j];
    }
#pragma omp parallel for num_threads(be->threads) schedule(static)
    for (size_t i = 0; i < m; i++) {
        normalize_row(x + i * c, scale, shift, y + i * c, c, relu);
    }
    return KFAC_OK;
}

/* With xhat = (x - mean) * invstd and g = dy (masked by y > 0 under ReLU):
 *   dbeta = sum g,  dgamma = sum g*xhat,
 *   dx = gamma*invstd * (g - dbeta/m - xhat*dgamma/m). */
kfac_status kfac__cpu_bn_backward(kfac_backend *be, size_t m, int c, const float *x,
                                  const float *y, const float *dy, const float *gamma,
                                  const float *save_mean, const float *save_invstd, float *dx,
                                  int accumulate, float *dgamma, float *dbeta, int relu)
{
    if (c > KFAC_CPU_MAX_CH)
        return KFAC_ERR(KFAC_ENOTSUP, "batch norm: %d channels > %d", c, KFAC_CPU_MAX_CH);
    double *scratch = kfac__cpu(be)->reduce_scratch;
    float k1[KFAC_CPU_MAX_CH], k2[KFAC_CPU_MAX_CH], k3[KFAC_CPU_MAX_CH];
#pragma omp parallel num_threads(be->threads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        double *sg = scratch + (size_t)t * 2 * KFAC_CPU_MAX_CH, *sgx = sg + c;
        size_t first, end;
        row_range(m, t, nt, &first, &end);
        memset(sg, 0, 2 * (size_t)c * sizeof(double));
        float bg[KFAC_CPU_MAX_CH], bgx[KFAC_CPU_MAX_CH];
        for (size_t b = first; b < end; b += BLOCK_ROWS) {
            size_t b_end = end - b < BLOCK_ROWS ? end : b + BLOCK_ROWS;
            memset(bg, 0, c * sizeof(float));
            memset(bgx, 0, c * sizeof(float));
            for (size_t i = b; i < b_end; i++) {
                const float *xr = x + i * c, *yr = y + i * c, *gr = dy + i * c;
                for (int j = 0; j < c; j++) {
                    float g = relu && yr[j] <= 0.0f ? 0.0f : gr[j];
                    bg[j] += g;
                    bgx[j] += g * (xr[j] - save_mean[j]);
                }
            }
            for (int j = 0; j < c; j++) {
                sg[j] += bg[j];
                sgx[j] += bgx[j];
            }
        }
#pragma omp barrier
#pragma omp single
        {
            combine_partials(scratch, nt, c);
            for (int j = 0; j < c; j++) {
                double db = scratch[j], dg = scratch[c + j] * save_invstd[j];
                dbeta[j] = (float)db;
                dgamma[j] = (float)dg;
                /* dx = k1*g + k2 + k3*x */
                double a = (double)gamma[j] * save_invstd[j];
                double b = dg * save_invstd[j] / (double)m;
                k1[j] = (float)a;
                k3[j] = (float)(-a * b);
                k2[j] = (float)(-a * db / (double)m + a * b * save_mean[j]);
            }
        }
        for (size_t i = first; i < end; i++) {
            const float *xr = x + i * c, *yr = y + i * c, *gr = dy + i * c;
            float *out = dx + i * c;
            if (accumulate)
                for (int j = 0; j < c; j++) {
                    float g = relu && yr[j] <= 0.0f ? 0.0f : gr[j];
                    out[j] += k1[j] * g + k2[j] + k3[j] * xr[j];
                }
            else
                for (int j = 0; j < c; j++) {
                    float g = relu && yr[j] <= 0.0f ? 0.0f : gr[j];
                    out[j] = k1[j] * g + k2[j] + k3[j] * xr[j];
                }
        }
    }
    return KFAC_OK;
}
