/* bn.cu - batch normalisation over NHWC rows (m rows of c channels) with an
 * optional fused ReLU; same math as lib/cpu/bn.c.
 *
 * Statistics use a two-level reduction with double accumulators: level 1
 * gives each (32-channel tile, block of rows) a block of 32x8 threads whose
 * warps read 32 consecutive channels of a row (coalesced) and write one
 * partial sum per channel; level 2 adds the partials of each channel in a
 * fixed order, so results are deterministic.  A third kernel applies the
 * per-channel affine map; it is bandwidth-bound, so it avoids per-element
 * divisions and takes 16 bytes per thread where shapes and alignment allow.
 * Scratch: the partials (doubles), then 3*c floats of per-channel
 * coefficients (16-byte aligned as the scratch: the partials take a
 * multiple of 16 bytes).
 *
 * x, y, dy and dx are T (float, bf16 or fp16), loaded as float; gamma,
 * beta, the saved and running statistics and dgamma/dbeta are float. */
#include "common.cuh"

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
template <typename T>
static __global__ void bn_fwd_partial_kernel(size_t m, int c, size_t chunk, const T *x,
                                             double *partial)
{
    int j = blockIdx.x * BN_TX + threadIdx.x;
    double a0 = 0.0, a1 = 0.0;
    if (j < c) {
        size_t first = (size_t)blockIdx.y * chunk, end = first + chunk < m ? first + chunk : m;
        double shift = kfac_k_f32(x[j]);
        for (size_t i = first + threadIdx.y; i < end; i += BN_TY) {
            double v = (double)kfac_k_f32(x[i * c + j]) - shift;
            a0 += v;
            a1 += v * v;
        }
    }
    bn_block_sum(a0, a1, c, j, partial);
}

/* Level 2, forward: statistics, saved mean/invstd, running statistics and
 * the affine coefficients coef = (scale | shift). */
template <typename T>
static __global__ void bn_fwd_finalize_kernel(size_t m, int c, unsigned row_blocks,
                                              const double *partial, const T *x,
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
        double mean = mean_shifted + (double)kfac_k_f32(x[j]);
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

/* The per-element kernels (apply, eval, backward apply) take W, the
 * channels per thread and access: 1, or KFAC_K_VEC(T) (16 bytes of
 * activations, one 128-bit access per array, and 128-bit loads of the
 * float per-channel values) when c % W == 0 and every pointer is 16-byte
 * aligned (bn_vec_ok).  A group of W values then lies in one row, at
 * channels col * W + k, where col is the group's column among c / W; the
 * loop tracks col without a division.  Same per-value arithmetic for both
 * W, so both give identical results. */

template <typename T, int W>
static __global__ void bn_apply_kernel(size_t groups, int c, const T *x, const float *coef, T *y,
                                       int relu)
{
    KFAC_K_GRID_LOOP_COL(p, groups, (unsigned)c / W)
    {
        kfac_k_vec<T, W> xv = kfac_k_load<W>(x, p.i), r;
        kfac_k_vec<float, W> scale = kfac_k_load<W>(coef, p.col);
        kfac_k_vec<float, W> shift = kfac_k_load<W>(coef + c, p.col);
#pragma unroll
        for (int k = 0; k < W; k++) {
            float v = kfac_k_f32(xv.v[k]) * scale.v[k] + shift.v[k];
            kfac_k_store(&r.v[k], relu ? fmaxf(v, 0.0f) : v);
        }
        kfac_k_store_vec(y, p.i, r);
    }
}

template <typename T, int W>
static __global__ void bn_eval_kernel(size_t groups, int c, const T *x, const float *gamma,
                                      const float *beta, const float *run_mean,
                                      const float *run_var, float eps, T *y, int relu)
{
    KFAC_K_GRID_LOOP_COL(p, groups, (unsigned)c / W)
    {
        kfac_k_vec<T, W> xv = kfac_k_load<W>(x, p.i), r;
        kfac_k_vec<float, W> g = kfac_k_load<W>(gamma, p.col), b = kfac_k_load<W>(beta, p.col);
        kfac_k_vec<float, W> mean = kfac_k_load<W>(run_mean, p.col);
        kfac_k_vec<float, W> var = kfac_k_load<W>(run_var, p.col);
#pragma unroll
        for (int k = 0; k < W; k++) {
            float scale = g.v[k] / sqrtf(var.v[k] + eps);
            float shift = b.v[k] - mean.v[k] * scale;
            float v = kfac_k_f32(xv.v[k]) * scale + shift;
            kfac_k_store(&r.v[k], relu ? fmaxf(v, 0.0f) : v);
        }
        kfac_k_store_vec(y, p.i, r);
    }
}

/* Level 1, backward: sums of g and g*(x - mean), g = dy masked by y > 0
 * under the fused ReLU. */
template <typename T>
static __global__ void bn_bwd_partial_kernel(size_t m, int c, size_t chunk, const T *x,
                                             const T *y, const T *dy,
                                             const float *save_mean, int relu, double *partial)
{
    int j = blockIdx.x * BN_TX + threadIdx.x;
    double a0 = 0.0, a1 = 0.0;
    if (j < c) {
        size_t first = (size_t)blockIdx.y * chunk, end = first + chunk < m ? first + chunk : m;
        float mu = save_mean[j];
        for (size_t i = first + threadIdx.y; i < end; i += BN_TY) {
            size_t k = i * c + j;
            float g = (relu && kfac_k_f32(y[k]) <= 0.0f) ? 0.0f : kfac_k_f32(dy[k]);
            a0 += g;
            a1 += (double)g * (kfac_k_f32(x[k]) - mu);
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

/* y is read only under the fused ReLU, dx only when accumulating; every
 * input of a group is read before its dx is written (in-place safe). */
template <typename T, int W>
static __global__ void bn_bwd_apply_kernel(size_t groups, int c, const T *x, const T *y,
                                           const T *dy, const float *coef, T *dx, int accumulate,
                                           int relu)
{
    KFAC_K_GRID_LOOP_COL(p, groups, (unsigned)c / W)
    {
        kfac_k_vec<T, W> dv = kfac_k_load<W>(dy, p.i), xv = kfac_k_load<W>(x, p.i), r;
        kfac_k_vec<float, W> k1 = kfac_k_load<W>(coef, p.col);
        kfac_k_vec<float, W> k2 = kfac_k_load<W>(coef + c, p.col);
        kfac_k_vec<float, W> k3 = kfac_k_load<W>(coef + 2 * (size_t)c, p.col);
        float g[W], v[W];
        if (relu) {
            kfac_k_vec<T, W> yv = kfac_k_load<W>(y, p.i);
#pragma unroll
            for (int k = 0; k < W; k++)
                g[k] = kfac_k_f32(yv.v[k]) <= 0.0f ? 0.0f : kfac_k_f32(dv.v[k]);
        } else {
#pragma unroll
            for (int k = 0; k < W; k++) g[k] = kfac_k_f32(dv.v[k]);
        }
#pragma unroll
        for (int k = 0; k < W; k++) v[k] = k1.v[k] * g[k] + k2.v[k] + k3.v[k] * kfac_k_f32(xv.v[k]);
        if (accumulate) {
            kfac_k_vec<T, W> old = kfac_k_load<W>(dx, p.i);
#pragma unroll
            for (int k = 0; k < W; k++) kfac_k_store(&r.v[k], kfac_k_f32(old.v[k]) + v[k]);
        } else {
#pragma unroll
            for (int k = 0; k < W; k++) kfac_k_store(&r.v[k], v[k]);
        }
        kfac_k_store_vec(dx, p.i, r);
    }
}

/* Whether an (m x c) batch norm may take the vector path (see above). */
template <typename T, typename... P>
static bool bn_vec_ok(int c, const P *...p)
{
    return c % KFAC_K_VEC(T) == 0 && kfac_k_aligned16(p...);
}

/* The launchers' kernel sequences for one type T (arguments checked by them). */
template <typename T>
static void bn_train_launch(size_t m, int c, const T *x, const float *gamma, const float *beta,
                            T *y, float *save_mean, float *save_invstd, float *run_mean,
                            float *run_var, float momentum, float eps, int relu, void *scratch,
                            cudaStream_t stream)
{
    unsigned rb = bn_row_blocks(m);
    size_t chunk = (m + rb - 1) / rb;
    double *partial = (double *)scratch;
    float *coef = (float *)((char *)scratch + bn_partial_bytes(m, c));
    dim3 grid((unsigned)((c + BN_TX - 1) / BN_TX), rb), block(BN_TX, BN_TY);
    bn_fwd_partial_kernel<T><<<grid, block, 0, stream>>>(m, c, chunk, x, partial);
    bn_fwd_finalize_kernel<T><<<kfac_k_blocks((size_t)c), KFAC_K_THREADS, 0, stream>>>(
        m, c, rb, partial, x, gamma, beta, save_mean, save_invstd, run_mean, run_var, momentum,
        eps, coef);
    size_t total = m * (size_t)c;
    constexpr int w = KFAC_K_VEC(T);
    if (bn_vec_ok<T>(c, x, y, coef))
        bn_apply_kernel<T, w><<<kfac_k_blocks(total / w), KFAC_K_THREADS, 0, stream>>>(
            total / w, c, x, coef, y, relu);
    else
        bn_apply_kernel<T, 1><<<kfac_k_blocks(total), KFAC_K_THREADS, 0, stream>>>(
            total, c, x, coef, y, relu);
}

template <typename T>
static void bn_backward_launch(size_t m, int c, const T *x, const T *y, const T *dy,
                               const float *gamma, const float *save_mean,
                               const float *save_invstd, T *dx, int accumulate, float *dgamma,
                               float *dbeta, int relu, void *scratch, cudaStream_t stream)
{
    unsigned rb = bn_row_blocks(m);
    size_t chunk = (m + rb - 1) / rb;
    double *partial = (double *)scratch;
    float *coef = (float *)((char *)scratch + bn_partial_bytes(m, c));
    dim3 grid((unsigned)((c + BN_TX - 1) / BN_TX), rb), block(BN_TX, BN_TY);
    bn_bwd_partial_kernel<T><<<grid, block, 0, stream>>>(m, c, chunk, x, y, dy, save_mean, relu,
                                                         partial);
    bn_bwd_finalize_kernel<<<kfac_k_blocks((size_t)c), KFAC_K_THREADS, 0, stream>>>(
        m, c, rb, partial, gamma, save_mean, save_invstd, dgamma, dbeta, coef);
    size_t total = m * (size_t)c;
    constexpr int w = KFAC_K_VEC(T);
    if (bn_vec_ok<T>(c, x, y, dy, dx, coef))
        bn_bwd_apply_kernel<T, w><<<kfac_k_blocks(total / w), KFAC_K_THREADS, 0, stream>>>(
            total / w, c, x, y, dy, coef, dx, accumulate, relu);
    else
        bn_bwd_apply_kernel<T, 1><<<kfac_k_blocks(total), KFAC_K_THREADS, 0, stream>>>(
            total, c, x, y, dy, coef, dx, accumulate, relu);
}

extern "C" cudaError_t kfac_k_bn_forward_train(kfac_dtype t, size_t m, int c, const void *x,
                                               const float *gamma, const float *beta, void *y,
                                               float *save_mean, float *save_invstd,
                                               float *run_mean, float *run_var, float momentum,
                                               float eps, int relu, void *scratch,
                                               cudaStream_t stream)
{
    if (m == 0 || c <= 0) return cudaSuccess;
    KFAC_K_DISPATCH(t, T,
                    bn_train_launch<T>(m, c, (const T *)x, gamma, beta, (T *)y, save_mean,
                                       save_invstd, run_mean, run_var, momentum, eps, relu,
                                       scratch, stream));
    return cudaGetLastError();
}

extern "C" cudaError_t kfac_k_bn_forward_eval(kfac_dtype t, size_t m, int c, const void *x,
                                              const float *gamma, const float *beta, void *y,
                                              const float *run_mean, const float *run_var,
                                              float eps, int relu, cudaStream_t stream)
{
    size_t total = m * (size_t)(c > 0 ? c : 0);
    if (total == 0) return cudaSuccess;
    KFAC_K_DISPATCH(t, T, {
        constexpr int w = KFAC_K_VEC(T);
        if (bn_vec_ok<T>(c, x, y, gamma, beta, run_mean, run_var))
            bn_eval_kernel<T, w><<<kfac_k_blocks(total / w), KFAC_K_THREADS, 0, stream>>>(
                total / w, c, (const T *)x, gamma, beta, run_mean, run_var, eps, (T *)y, relu);
        else
            bn_eval_kernel<T, 1><<<kfac_k_blocks(total), KFAC_K_THREADS, 0, stream>>>(
                total, c, (const T *)x, gamma, beta, run_mean, run_var, eps, (T *)y, relu);
    });
    return cudaGetLastError();
}

extern "C" cudaError_t kfac_k_bn_backward(kfac_dtype t, size_t m, int c, const void *x,
                                          const void *y, const void *dy, const float *gamma,
                                          const float *save_mean, const float *save_invstd,
                                          void *dx, int accumulate, float *dgamma,
                                          float *dbeta, int relu, void *scratch,
                                          cudaStream_t stream)
{
    if (m == 0 || c <= 0) return cudaSuccess;
    KFAC_K_DISPATCH(t, T,
                    bn_backward_launch<T>(m, c, (const T *)x, (const T *)y, (const T *)dy, gamma,
                                          save_mean, save_invstd, (T *)dx, accumulate, dgamma,
                                          dbeta, relu, scratch, stream));
    return cudaGetLastError();
}
