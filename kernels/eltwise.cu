/* eltwise.cu - element-wise CUDA kernels: fill, ReLU, residual add (+ReLU),
 * the fused momentum-SGD update, and fp32 <-> bf16 / fp16 conversions for
 * mixed precision.  Same arithmetic as lib/cpu/eltwise.c, grid-stride
 * loops, one thread per element. */
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"
#include "kernels.h"

static __global__ void fill_kernel(size_t n, float *x, float value)
{
    KFAC_K_GRID_LOOP(i, n) x[i] = value;
}

static __global__ void relu_fwd_kernel(size_t n, const float *x, float *y)
{
    KFAC_K_GRID_LOOP(i, n) y[i] = fmaxf(x[i], 0.0f);
}

static __global__ void relu_bwd_kernel(size_t n, const float *y, const float *dy, float *dx,
                                       int accumulate)
{
    KFAC_K_GRID_LOOP(i, n)
    {
        float g = y[i] > 0.0f ? dy[i] : 0.0f;
        dx[i] = accumulate ? dx[i] + g : g;
    }
}

static __global__ void add_fwd_kernel(size_t n, const float *a, const float *b, float *y,
                                      int relu)
{
    KFAC_K_GRID_LOOP(i, n)
    {
        float v = a[i] + b[i];
        y[i] = relu ? fmaxf(v, 0.0f) : v;
    }
}

static __global__ void add_bwd_kernel(size_t n, const float *y, const float *dy, float *da,
                                      int acc_a, float *db, int acc_b, int relu)
{
    KFAC_K_GRID_LOOP(i, n)
    {
        float g = (relu && y[i] <= 0.0f) ? 0.0f : dy[i];
        da[i] = acc_a ? da[i] + g : g;
        db[i] = acc_b ? db[i] + g : g;
    }
}

static __global__ void sgd_kernel(size_t n, float *p, const float *g, float *v, float lr,
                                  float mom, float wd, int nesterov)
{
    KFAC_K_GRID_LOOP(i, n)
    {
        float gi = g[i] + wd * p[i];
        float vi = mom * v[i] + gi;
        v[i] = vi;
        p[i] -= lr * (nesterov ? gi + mom * vi : vi);
    }
}

static __global__ void f32_to_bf16_kernel(size_t n, const float *x, __nv_bfloat16 *y)
{
    KFAC_K_GRID_LOOP(i, n) y[i] = __float2bfloat16_rn(x[i]);
}

static __global__ void bf16_to_f32_kernel(size_t n, const __nv_bfloat16 *x, float *y)
{
    KFAC_K_GRID_LOOP(i, n) y[i] = __bfloat162float(x[i]);
}

static __global__ void f32_to_f16_kernel(size_t n, const float *x, __half *y)
{
    KFAC_K_GRID_LOOP(i, n) y[i] = __float2half_rn(x[i]);
}

static __global__ void f16_to_f32_kernel(size_t n, const __half *x, float *y)
{
    KFAC_K_GRID_LOOP(i, n) y[i] = __half2float(x[i]);
}

#define LAUNCH(kernel, n, stream, ...)                                                  \
    do {                                                                                \
        if ((n) == 0) return cudaSuccess;                                               \
        kernel<<<kfac_k_blocks(n), KFAC_K_THREADS, 0, (stream)>>>((n), __VA_ARGS__);    \
        return cudaGetLastError();                                                      \
    } while (0)

extern "C" cudaError_t kfac_k_fill(size_t n, float *x, float value, cudaStream_t stream)
{
    LAUNCH(fill_kernel, n, stream, x, value);
}

extern "C" cudaError_t kfac_k_relu_forward(size_t n, const float *x, float *y,
                                           cudaStream_t stream)
{
    LAUNCH(relu_fwd_kernel, n, stream, x, y);
}

extern "C" cudaError_t kfac_k_relu_backward(size_t n, const float *y, const float *dy, float *dx,
                                            int accumulate, cudaStream_t stream)
{
    LAUNCH(relu_bwd_kernel, n, stream, y, dy, dx, accumulate);
}

extern "C" cudaError_t kfac_k_add_forward(size_t n, const float *a, const float *b, float *y,
                                          int relu, cudaStream_t stream)
{
    LAUNCH(add_fwd_kernel, n, stream, a, b, y, relu);
}

extern "C" cudaError_t kfac_k_add_backward(size_t n, const float *y, const float *dy, float *da,
                                           int acc_a, float *db, int acc_b, int relu,
                                           cudaStream_t stream)
{
    LAUNCH(add_bwd_kernel, n, stream, y, dy, da, acc_a, db, acc_b, relu);
}

extern "C" cudaError_t kfac_k_sgd_update(size_t n, float *p, const float *g, float *v, float lr,
                                         float mom, float wd, int nesterov, cudaStream_t stream)
{
    LAUNCH(sgd_kernel, n, stream, p, g, v, lr, mom, wd, nesterov);
}

extern "C" cudaError_t kfac_k_f32_to_bf16(size_t n, const float *x, uint16_t *y,
                                          cudaStream_t stream)
{
    LAUNCH(f32_to_bf16_kernel, n, stream, x, reinterpret_cast<__nv_bfloat16 *>(y));
}

extern "C" cudaError_t kfac_k_bf16_to_f32(size_t n, const uint16_t *x, float *y,
                                          cudaStream_t stream)
{
    LAUNCH(bf16_to_f32_kernel, n, stream, reinterpret_cast<const __nv_bfloat16 *>(x), y);
}

extern "C" cudaError_t kfac_k_f32_to_f16(size_t n, const float *x, uint16_t *y,
                                         cudaStream_t stream)
{
    LAUNCH(f32_to_f16_kernel, n, stream, x, reinterpret_cast<__half *>(y));
}

extern "C" cudaError_t kfac_k_f16_to_f32(size_t n, const uint16_t *x, float *y,
                                         cudaStream_t stream)
{
    LAUNCH(f16_to_f32_kernel, n, stream, reinterpret_cast<const __half *>(x), y);
}
