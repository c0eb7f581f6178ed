/* pool.cu - NHWC max pooling (padding never wins the max) and global average
 * pooling; same results as lib/cpu/pool.c.
 *
 * Max-pool backward is a gather, one thread per input element: it adds the
 * gradient of every output window whose first input (in scan order) equal
 * to the max is this element, in output order.  No atomics: deterministic,
 * and bitwise the same sums as the CPU's scatter. */
#include <float.h>

#include "common.cuh"
#include "kernels.h"

struct pool_geom {
    int n, h, w, c, kh, kw, stride, pad, ho, wo;
};

template <typename T>
static __global__ void maxpool_fwd_kernel(pool_geom g, const T *x, T *y)
{
    size_t total = (size_t)g.n * g.ho * g.wo * g.c;
    KFAC_K_GRID_LOOP(o, total)
    {
        int j = (int)(o % g.c);
        size_t t = o / g.c;
        int ow = (int)(t % g.wo);
        t /= g.wo;
        int oh = (int)(t % g.ho);
        size_t n = t / g.ho;
        float out = -FLT_MAX;
        for (int kr = 0; kr < g.kh; kr++) {
            int ih = oh * g.stride - g.pad + kr;
            if (ih < 0 || ih >= g.h) continue;
            for (int ks = 0; ks < g.kw; ks++) {
                int iw = ow * g.stride - g.pad + ks;
                if (iw < 0 || iw >= g.w) continue;
                float in = kfac_k_f32(x[((n * g.h + ih) * g.w + iw) * g.c + j]);
                out = in > out ? in : out;
            }
        }
        kfac_k_store(&y[o], out);
    }
}

/* True when (ih, iw) is the first input of window (oh, ow) equal to m. */
template <typename T>
static __device__ bool first_max(const pool_geom &g, const T *x, size_t n, int j, int oh, int ow,
                                 float m, int ih, int iw)
{
    for (int kr = 0; kr < g.kh; kr++) {
        int h = oh * g.stride - g.pad + kr;
        if (h < 0 || h >= g.h) continue;
        for (int ks = 0; ks < g.kw; ks++) {
            int w = ow * g.stride - g.pad + ks;
            if (w < 0 || w >= g.w) continue;
            if (kfac_k_f32(x[((n * g.h + h) * g.w + w) * g.c + j]) == m)
                return h == ih && w == iw;
        }
    }
    return false;
}

template <typename T>
static __global__ void maxpool_bwd_kernel(pool_geom g, const T *x, const T *y, const T *dy, T *dx,
                                          int accumulate)
{
    size_t total = (size_t)g.n * g.h * g.w * g.c;
    KFAC_K_GRID_LOOP(i, total)
    {
        int j = (int)(i % g.c);
        size_t t = i / g.c;
        int iw = (int)(t % g.w);
        t /= g.w;
        int ih = (int)(t % g.h);
        size_t n = t / g.h;
        float xi = kfac_k_f32(x[i]);
        float acc = accumulate ? kfac_k_f32(dx[i]) : 0.0f;
        /* Windows covering ih: oh*stride - pad <= ih < oh*stride - pad + kh. */
        int hnum = ih + g.pad - g.kh, wnum = iw + g.pad - g.kw;
        int oh0 = hnum < 0 ? 0 : hnum / g.stride + 1;
        int ow0 = wnum < 0 ? 0 : wnum / g.stride + 1;
        int oh1 = min((ih + g.pad) / g.stride, g.ho - 1);
        int ow1 = min((iw + g.pad) / g.stride, g.wo - 1);
        for (int oh = oh0; oh <= oh1; oh++)
            for (int ow = ow0; ow <= ow1; ow++) {
                size_t o = ((n * g.ho + oh) * g.wo + ow) * g.c + j;
                float m = kfac_k_f32(y[o]);
                if (xi == m && first_max(g, x, n, j, oh, ow, m, ih, iw)) acc += kfac_k_f32(dy[o]);
            }
        kfac_k_store(&dx[i], acc);
    }
}

template <typename T>
static __global__ void gap_fwd_kernel(int n, int hw, int c, const T *x, T *y)
{
    KFAC_K_GRID_LOOP(o, (size_t)n * c)
    {
        size_t img = o / c;
        int j = (int)(o % c);
        float s = 0.0f;
        for (int p = 0; p < hw; p++) s += kfac_k_f32(x[(img * hw + p) * c + j]);
        kfac_k_store(&y[o], s / (float)hw);
    }
}

template <typename T>
static __global__ void gap_bwd_kernel(int n, int hw, int c, float inv, const T *dy, T *dx,
                                      int accumulate)
{
    KFAC_K_GRID_LOOP(i, (size_t)n * hw * c)
    {
        size_t img = i / ((size_t)hw * c);
        int j = (int)(i % c);
        float v = (accumulate ? kfac_k_f32(dx[i]) : 0.0f) + kfac_k_f32(dy[img * c + j]) * inv;
        kfac_k_store(&dx[i], v);
    }
}

extern "C" cudaError_t kfac_k_maxpool_forward(kfac_dtype t, int n, int h, int w, int c, int kh,
                                              int kw, int stride, int pad, int ho, int wo,
                                              const void *x, void *y, cudaStream_t stream)
{
    pool_geom g = {n, h, w, c, kh, kw, stride, pad, ho, wo};
    if (n <= 0 || ho <= 0 || wo <= 0 || c <= 0) return cudaSuccess;
    size_t total = (size_t)n * ho * wo * c;
    KFAC_K_DISPATCH(t, T,
                    maxpool_fwd_kernel<T><<<kfac_k_blocks(total), KFAC_K_THREADS, 0, stream>>>(
                        g, (const T *)x, (T *)y));
    return cudaGetLastError();
}

extern "C" cudaError_t kfac_k_maxpool_backward(kfac_dtype t, int n, int h, int w, int c, int kh,
                                               int kw, int stride, int pad, int ho, int wo,
                                               const void *x, const void *y, const void *dy,
                                               void *dx, int accumulate, cudaStream_t stream)
{
    pool_geom g = {n, h, w, c, kh, kw, stride, pad, ho, wo};
    if (n <= 0 || h <= 0 || w <= 0 || c <= 0) return cudaSuccess;
    size_t total = (size_t)n * h * w * c;
    KFAC_K_DISPATCH(t, T,
                    maxpool_bwd_kernel<T><<<kfac_k_blocks(total), KFAC_K_THREADS, 0, stream>>>(
                        g, (const T *)x, (const T *)y, (const T *)dy, (T *)dx, accumulate));
    return cudaGetLastError();
}

extern "C" cudaError_t kfac_k_gap_forward(kfac_dtype t, int n, int hw, int c, const void *x,
                                          void *y, cudaStream_t stream)
{
    if (n <= 0 || c <= 0) return cudaSuccess;
    size_t total = (size_t)n * c;
    KFAC_K_DISPATCH(t, T,
                    gap_fwd_kernel<T><<<kfac_k_blocks(total), KFAC_K_THREADS, 0, stream>>>(
                        n, hw, c, (const T *)x, (T *)y));
    return cudaGetLastError();
}

extern "C" cudaError_t kfac_k_gap_backward(kfac_dtype t, int n, int hw, int c, const void *dy,
                                           void *dx, int accumulate, cudaStream_t stream)
{
    if (n <= 0 || hw <= 0 || c <= 0) return cudaSuccess;
    /* The CPU multiplies by the same float reciprocal. */
    float inv = 1.0f / (float)hw;
    size_t total = (size_t)n * hw * c;
    KFAC_K_DISPATCH(t, T,
                    gap_bwd_kernel<T><<<kfac_k_blocks(total), KFAC_K_THREADS, 0, stream>>>(
                        n, hw, c, inv, (const T *)dy, (T *)dx, accumulate));
    return cudaGetLastError();
}
