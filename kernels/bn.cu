/* bn.cu - batch normalisation over NHWC rows (m rows of c channels) with an
 * optional fused ReLU; same math as lib/cpu/bn.c.
 *
 * Statistics use a two-level reduction with double accumulators: level 1
 * gives each (32-channel tile, block of rows) a block of 32x8 threads whose
 * warps read 32 consecutive channels of a row (coalesced) and write one
 * partial sum per channel; level 2 adds the partials of each channel in a
 * fixed order, so results are deterministic.  A third kernel applies the
 * per-channel affine map.  Scratch: the partials (doubles), then 3*c floats
 * of per-channel coefficients. */
#include "common.cuh"
#include "kernels.h"

#define BN_TX 32
#define BN_TY 8
#define BN_ROWS_PER_BLOCK 64   /* rows per level-1 block before capping */
#define BN_MAX_ROW_BLOCKS 256

static unsigned bn_row_blocks(size_t m)
{
    size_t r = (m + BN_ROWS_PER_BLOCK - 1) / BN_ROWS_PER_BLOCK;
    if (r < 1) r = 1;
    return (unsigned)(r < BN_MAX_ROW_BLOCKS ? r : BN_MAX_ROW_BLOCKS);
}

static size_t bn_partial_bytes(size_t m, int c)
{
    return (size_t)bn_row_blocks(m) * 2 * (size_t)c * sizeof(double);
}

extern "C" size_t kfac_k_bn_scratch_bytes(size_t m, int c)
{
    return bn_partial_bytes(m, c) + 3 * (size_t)c * sizeof(float);
}

/* Adds the 8 row-threads' sums of each channel in order and writes them to
 * partial[blockIdx.y][0 | 1][j]. */
static __device__ void bn_block_sum(double a0, double a1, int c, int j, double *partial)
{
    __shared__ double s0[BN_TY][BN_TX], s1[BN_TY][BN_TX];
    s0[threadIdx.y][threadIdx.x] = a0;
    s1[threadIdx.y][threadIdx.x] = a1;
    __syncthreads();
    if (threadIdx.y == 0 && j < c) {
        double t0 = 0.0, t1 = 0.0;
        for (int t = 0; t < BN_TY; t++) {
            t0 += s0[t][threadIdx.x];
            t1 += s1[t][threadIdx.x];
        }
        double *p = partial + (size_t)blockIdx.y * 2 * (size_t)c;
        p[j] = t0;
        p[c + j] = t1;
    }
}

/* Level 1, forward: sums of v and v^2 with v = x - x[row 0] (the shift
 * avoids cancellation in E[v^2] - E[v]^2, as on the CPU). */
static __global__ void bn_fwd_partial_kernel(size_t m, int c, size_t chunk, const float *x,
                                             double *partial)
{
    int j = blockIdx.x * BN_TX + threadIdx.x;
    double a0 = 0.0, a1 = 0.0;
    if (j < c) {
        size_t first = (size_t)blockIdx.y * chunk, end = first + chunk < m ? first + chunk : m;
        double shift = x[j];
        for (size_t i = first + threadIdx.y; i < end; i += BN_TY) {
            double v = (double)x[i * c + j] - shift;
            a0 += v;
            a1 += v * v;
        }
    }
    bn_block_sum(a0, a1, c, j, partial);
}

/* Level 2, forward: statistics, saved mean/invstd, running statistics and
 * the affine coefficients coef = (scale | shift). */
static __global__ void bn_fwd_finalize_kernel(size_t m, int c, unsigned row_blocks,
                                              const double *partial, const float *x,
                                              const float *gamma, const float *beta,
                                              float *save_mean, float *save_invstd,
                                              float *run_mean, float *run_var, float momentum,
                                              float eps, float *coef)
{
    KFAC_K_GRID_LOOP(jj, (size_t)c)
    {
        int j = (int)jj;
        double s0 = 0.0, s1 = 0.0;
        for (unsigned r = 0; r < row_blocks; r++) {
            s0 += partial[(size_t)r * 2 * c + j];
            s1 += partial[(size_t)r * 2 * c + c + j];
        }
        double mean_shifted = s0 / (double)m;
        double var = s1 / (double)m - mean_shifted * mean_shifted;
        if (var < 0) var = 0;
        double mean = mean_shifted + (double)x[j];
        double invstd = 1.0 / sqrt(var + (double)eps);
        save_mean[j] = (float)mean;
        save_invstd[j] = (float)invstd;
        coef[j] = (float)(gamma[j] * invstd);
        coef[c + j] = (float)(beta[j] - mean * gamma[j] * invstd);
        double unbiased = m > 1 ? var * (double)m / (double)(m - 1) : var;
        run_mean[j] = (1.0f - momentum) * run_mean[j] + momentum * (float)mean;
        run_var[j] = (1.0f - momentum) * run_var[j] + momentum * (float)unbiased;
    }
}

static __global__ void bn_apply_kernel(size_t total, int c, const float *x, const float *coef,
                                       float *y, int relu)
{
    KFAC_K_GRID_LOOP(i, total)
    {
        int j = (int)(i % (size_t)c);
        float v = x[i] * coef[j] + coef[c + j];
        y[i] = relu ? fmaxf(v, 0.0f) : v;
    }
}

static __global__ void bn_eval_kernel(size_t total, int c, const float *x, const float *gamma,
                                      const float *beta, const float *run_mean,
                                      const float *run_var, float eps, float *y, int relu)
{
    KFAC_K_GRID_LOOP(i, total)
    {
        int j = (int)(i % (size_t)c);
        float scale = gamma[j] / sqrtf(run_var[j] + eps);
        float shift = beta[j] - run_mean[j] * scale;
        float v = x[i] * scale + shift;
        y[i] = relu ? fmaxf(v, 0.0f) : v;
    }
}

/* Level 1, backward: sums of g and g*(x - mean), g = dy masked by y > 0
 * under the fused ReLU. */
static __global__ void bn_bwd_partial_kernel(size_t m, int c, size_t chunk, const float *x,
                                             const float *y, const float *dy,
                                             const float *save_mean, int relu, double *partial)
{
    int j = blockIdx.x * BN_TX + threadIdx.x;
    double a0 = 0.0, a1 = 0.0;
    if (j < c) {
        size_t first = (size_t)blockIdx.y * chunk, end = first + chunk < m ? first + chunk : m;
        float mu = save_mean[j];
        for (size_t i = first + threadIdx.y; i < end; i += BN_TY) {
            size_t k = i * c + j;
            float g = (relu && y[k] <= 0.0f) ? 0.0f : dy[k];
            a0 += g;
            a1 += (double)g * (x[k] - mu);
        }
    }
    bn_block_sum(a0, a1, c, j, partial);
}

/* Level 2, backward: dbeta, dgamma and dx = k1*g + k2 + k3*x with
 * coef = (k1 | k2 | k3). */
static __global__ void bn_bwd_finalize_kernel(size_t m, int c, unsigned row_blocks,
                                              const double *partial, const float *gamma,
                                              const float *save_mean, const float *save_invstd,
                                              float *dgamma, float *dbeta, float *coef)
{
    KFAC_K_GRID_LOOP(jj, (size_t)c)
    {
        int j = (int)jj;
        double s0 = 0.0, s1 = 0.0;
        for (unsigned r = 0; r < row_blocks; r++) {
            s0 += partial[(size_t)r * 2 * c + j];
            s1 += partial[(size_t)r * 2 * c + c + j];
        }
        double db = s0, dg = s1 * save_invstd[j];
        dbeta[j] = (float)db;
        dgamma[j] = (float)dg;
        double a = (double)gamma[j] * save_invstd[j];
        double b = dg * save_invstd[j] / (double)m;
        coef[j] = (float)a;
        coef[c + j] = (float)(-a * db / (double)m + a * b * save_mean[j]);
        coef[2 * c + j] = (float)(-a * b);
    }
}

static __global__ void bn_bwd_apply_kernel(size_t total, int c, const float *x, const float *y,
                                           const float *dy, const float *coef, float *dx,
                                           int accumulate, int relu)
{
    KFAC_K_GRID_LOOP(i, total)
    {
        int j = (int)(i % (size_t)c);
        float g = (relu && y[i] <= 0.0f) ? 0.0f : dy[i];
        float v = coef[j] * g + coef[c + j] + coef[2 * c + j] * x[i];
        dx[i] = accumulate ? dx[i] + v : v;
    }
}

extern "C" cudaError_t kfac_k_bn_forward_train(size_t m, int c, const float *x,
                                               const float *gamma, const float *beta, float *y,
                                               float *save_mean, float *save_invstd,
                                               float *run_mean, float *run_var, float momentum,
                                               float eps, int relu, void *scratch,
                                               cudaStream_t stream)
{
    if (m == 0 || c <= 0) return cudaSuccess;
    unsigned rb = bn_row_blocks(m);
    size_t chunk = (m + rb - 1) / rb;
    double *partial = (double *)scratch;
    float *coef = (float *)((char *)scratch + bn_partial_bytes(m, c));
    dim3 grid((unsigned)((c + BN_TX - 1) / BN_TX), rb), block(BN_TX, BN_TY);
    bn_fwd_partial_kernel<<<grid, block, 0, stream>>>(m, c, chunk, x, partial);
    bn_fwd_finalize_kernel<<<kfac_k_blocks((size_t)c), KFAC_K_THREADS, 0, stream>>>(
        m, c, rb, partial, x, gamma, beta, save_mean, save_invstd, run_mean, run_var, momentum,
        eps, coef);
    size_t total = m * (size_t)c;
    bn_apply_kernel<<<kfac_k_blocks(total), KFAC_K_THREADS, 0, stream>>>(total, c, x, coef, y,
                                                                          relu);
    return cudaGetLastError();
}

extern "C" cudaError_t kfac_k_bn_forward_eval(size_t m, int c, const float *x,
                                              const float *gamma, const float *beta, float *y,
                                              const float *run_mean, const float *run_var,
                                              float eps, int relu, cudaStream_t stream)
{
    size_t total = m * (size_t)(c > 0 ? c : 0);
    if (total == 0) return cudaSuccess;
    bn_eval_kernel<<<kfac_k_blocks(total), KFAC_K_THREADS, 0, stream>>>(
        total, c, x, gamma, beta, run_mean, run_var, eps, y, relu);
    return cudaGetLastError();
}

extern "C" cudaError_t kfac_k_bn_backward(size_t m, int c, const float *x, const float *y,
                                          const float *dy, const float *gamma,
                                          const float *save_mean, const float *save_invstd,
                                          float *dx, int accumulate, float *dgamma,
                                          float *dbeta, int relu, void *scratch,
                                          cudaStream_t stream)
{
    if (m == 0 || c <= 0) return cudaSuccess;
    unsigned rb = bn_row_blocks(m);
    size_t chunk = (m + rb - 1) / rb;
    double *partial = (double *)scratch;
    float *coef = (float *)((char *)scratch + bn_partial_bytes(m, c));
    dim3 grid((unsigned)((c + BN_TX - 1) / BN_TX), rb), block(BN_TX, BN_TY);
    bn_bwd_partial_kernel<<<grid, block, 0, stream>>>(m, c, chunk, x, y, dy, save_mean, relu,
                                                      partial);
    bn_bwd_finalize_kernel<<<kfac_k_blocks((size_t)c), KFAC_K_THREADS, 0, stream>>>(
        m, c, rb, partial, gamma, save_mean, save_invstd, dgamma, dbeta, coef);
    size_t total = m * (size_t)c;
    bn_bwd_apply_kernel<<<kfac_k_blocks(total), KFAC_K_THREADS, 0, stream>>>(
        total, c, x, y, dy, coef, dx, accumulate, relu);
    return cudaGetLastError();
}
