/* eltwise.cu - element-wise CUDA kernels: fill, ReLU, residual add (+ReLU),
 * the fused momentum-SGD update, type conversions and the gradient scaling
 * of dynamic loss scaling.  Same arithmetic as lib/cpu/eltwise.c, grid-stride
 * loops, one thread per element.  Activations are T (float, bf16 or fp16),
 * computed in float; fill, SGD and scale_grads work on float32 only. */
#include "common.cuh"

static __global__ void fill_kernel(size_t n, float *x, float value)
{
    KFAC_K_GRID_LOOP(i, n) x[i] = value;
}

template <typename T>
static __global__ void relu_fwd_kernel(size_t n, const T *x, T *y)
{
    KFAC_K_GRID_LOOP(i, n) kfac_k_store(&y[i], fmaxf(kfac_k_f32(x[i]), 0.0f));
}

template <typename T>
static __global__ void relu_bwd_kernel(size_t n, const T *y, const T *dy, T *dx, int accumulate)
{
    KFAC_K_GRID_LOOP(i, n)
    {
        float g = kfac_k_f32(y[i]) > 0.0f ? kfac_k_f32(dy[i]) : 0.0f;
        kfac_k_store(&dx[i], accumulate ? kfac_k_f32(dx[i]) + g : g);
    }
}

template <typename T>
static __global__ void add_fwd_kernel(size_t n, const T *a, const T *b, T *y, int relu)
{
    KFAC_K_GRID_LOOP(i, n)
    {
        float v = kfac_k_f32(a[i]) + kfac_k_f32(b[i]);
        kfac_k_store(&y[i], relu ? fmaxf(v, 0.0f) : v);
    }
}

template <typename T>
static __global__ void add_bwd_kernel(size_t n, const T *y, const T *dy, T *da, int acc_a, T *db,
                                      int acc_b, int relu)
{
    KFAC_K_GRID_LOOP(i, n)
    {
        float g = (relu && kfac_k_f32(y[i]) <= 0.0f) ? 0.0f : kfac_k_f32(dy[i]);
        kfac_k_store(&da[i], acc_a ? kfac_k_f32(da[i]) + g : g);
        kfac_k_store(&db[i], acc_b ? kfac_k_f32(db[i]) + g : g);
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

/* Through float: exact for every widening, one rounding for every
 * narrowing (float holds bf16 and fp16 values exactly). */
template <typename S, typename D>
static __global__ void convert_kernel(size_t n, const S *x, D *y)
{
    KFAC_K_GRID_LOOP(i, n) kfac_k_store(&y[i], kfac_k_f32(x[i]));
}

/* Threads that find a non-finite result all write the same 1. */
static __global__ void scale_grads_kernel(size_t n, float *g, float scale, int *nonfinite)
{
    KFAC_K_GRID_LOOP(i, n)
    {
        float v = g[i] * scale;
        g[i] = v;
        if (!isfinite(v)) *nonfinite = 1;
    }
}

/* One thread per element over n elements: <<<blocks, threads, 0, stream>>>. */
#define GRID(n, stream) kfac_k_blocks(n), KFAC_K_THREADS, 0, (stream)

extern "C" cudaError_t kfac_k_fill(size_t n, float *x, float value, cudaStream_t stream)
{
    if (n == 0) return cudaSuccess;
    fill_kernel<<<GRID(n, stream)>>>(n, x, value);
    return cudaGetLastError();
}

extern "C" cudaError_t kfac_k_relu_forward(kfac_dtype t, size_t n, const void *x, void *y,
                                           cudaStream_t stream)
{
    if (n == 0) return cudaSuccess;
    KFAC_K_DISPATCH(t, T, relu_fwd_kernel<T><<<GRID(n, stream)>>>(n, (const T *)x, (T *)y));
    return cudaGetLastError();
}

extern "C" cudaError_t kfac_k_relu_backward(kfac_dtype t, size_t n, const void *y,
                                            const void *dy, void *dx, int accumulate,
                                            cudaStream_t stream)
{
    if (n == 0) return cudaSuccess;
    KFAC_K_DISPATCH(t, T,
                    relu_bwd_kernel<T><<<GRID(n, stream)>>>(n, (const T *)y, (const T *)dy,
                                                            (T *)dx, accumulate));
    return cudaGetLastError();
}

extern "C" cudaError_t kfac_k_add_forward(kfac_dtype t, size_t n, const void *a, const void *b,
                                          void *y, int relu, cudaStream_t stream)
{
    if (n == 0) return cudaSuccess;
    KFAC_K_DISPATCH(t, T,
                    add_fwd_kernel<T><<<GRID(n, stream)>>>(n, (const T *)a, (const T *)b,
                                                           (T *)y, relu));
    return cudaGetLastError();
}

extern "C" cudaError_t kfac_k_add_backward(kfac_dtype t, size_t n, const void *y, const void *dy,
                                           void *da, int acc_a, void *db, int acc_b, int relu,
                                           cudaStream_t stream)
{
    if (n == 0) return cudaSuccess;
    KFAC_K_DISPATCH(t, T,
                    add_bwd_kernel<T><<<GRID(n, stream)>>>(n, (const T *)y, (const T *)dy,
                                                           (T *)da, acc_a, (T *)db, acc_b,
                                                           relu));
    return cudaGetLastError();
}

extern "C" cudaError_t kfac_k_sgd_update(size_t n, float *p, const float *g, float *v, float lr,
                                         float mom, float wd, int nesterov, cudaStream_t stream)
{
    if (n == 0) return cudaSuccess;
    sgd_kernel<<<GRID(n, stream)>>>(n, p, g, v, lr, mom, wd, nesterov);
    return cudaGetLastError();
}

extern "C" cudaError_t kfac_k_convert(size_t n, const void *src, kfac_dtype src_t, void *dst,
                                      kfac_dtype dst_t, cudaStream_t stream)
{
    if (n == 0) return cudaSuccess;
    KFAC_K_DISPATCH(src_t, S,
                    KFAC_K_DISPATCH(dst_t, D,
                                    convert_kernel<S, D><<<GRID(n, stream)>>>(
                                        n, (const S *)src, (D *)dst)));
    return cudaGetLastError();
}

extern "C" cudaError_t kfac_k_scale_grads(size_t n, float *g, float scale, int *nonfinite,
                                          cudaStream_t stream)
{
    cudaError_t e = cudaMemsetAsync(nonfinite, 0, sizeof *nonfinite, stream);
    if (e != cudaSuccess || n == 0) return e;
    scale_grads_kernel<<<GRID(n, stream)>>>(n, g, scale, nonfinite);
    return cudaGetLastError();
}
