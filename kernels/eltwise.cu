/* eltwise.cu - element-wise CUDA kernels: fill, ReLU, residual add (+ReLU),
 * the fused momentum-SGD update, type conversions and the gradient scaling
 * of dynamic loss scaling.  Same arithmetic as lib/cpu/eltwise.c, grid-stride
 * loops, one thread per element, or per 16 bytes for the activation
 * kernels (ReLU, add, convert) where sizes and alignment allow: they are
 * bandwidth-bound, and 128-bit accesses are what reach full bandwidth.
 * Activations are T (float, bf16 or fp16), computed in float; fill, SGD
 * and scale_grads work on float32 only. */
#include "common.cuh"

static __global__ void fill_kernel(size_t n, float *x, float value)
{
    KFAC_K_GRID_LOOP(i, n) x[i] = value;
}

/* The activation kernels below take W, the values per thread and access:
 * 1 (any n and alignment) or KFAC_K_VEC(T) (16 bytes: one 128-bit load or
 * store per array; n a multiple of W and every pointer 16-byte aligned,
 * see vec_ok).  They loop over n / W groups with the same per-value
 * arithmetic, so both give identical results.  Each group's inputs are
 * read before its outputs are written, in the scalar order, so in-place
 * calls (dx == dy, ...) behave the same on both paths. */

template <typename T, int W>
static __global__ void relu_fwd_kernel(size_t groups, const T *x, T *y)
{
    KFAC_K_GRID_LOOP(i, groups)
    {
        kfac_k_vec<T, W> a = kfac_k_load<W>(x, i), r;
#pragma unroll
        for (int k = 0; k < W; k++) kfac_k_store(&r.v[k], fmaxf(kfac_k_f32(a.v[k]), 0.0f));
        kfac_k_store_vec(y, i, r);
    }
}

template <typename T, int W>
static __global__ void relu_bwd_kernel(size_t groups, const T *y, const T *dy, T *dx,
                                       int accumulate)
{
    KFAC_K_GRID_LOOP(i, groups)
    {
        kfac_k_vec<T, W> yv = kfac_k_load<W>(y, i), d = kfac_k_load<W>(dy, i), r;
        float g[W];
#pragma unroll
        for (int k = 0; k < W; k++) g[k] = kfac_k_f32(yv.v[k]) > 0.0f ? kfac_k_f32(d.v[k]) : 0.0f;
        if (accumulate) {
            kfac_k_vec<T, W> old = kfac_k_load<W>(dx, i);
#pragma unroll
            for (int k = 0; k < W; k++) kfac_k_store(&r.v[k], kfac_k_f32(old.v[k]) + g[k]);
        } else {
#pragma unroll
            for (int k = 0; k < W; k++) kfac_k_store(&r.v[k], g[k]);
        }
        kfac_k_store_vec(dx, i, r);
    }
}

template <typename T, int W>
static __global__ void add_fwd_kernel(size_t groups, const T *a, const T *b, T *y, int relu)
{
    KFAC_K_GRID_LOOP(i, groups)
    {
        kfac_k_vec<T, W> av = kfac_k_load<W>(a, i), bv = kfac_k_load<W>(b, i), r;
#pragma unroll
        for (int k = 0; k < W; k++) {
            float v = kfac_k_f32(av.v[k]) + kfac_k_f32(bv.v[k]);
            kfac_k_store(&r.v[k], relu ? fmaxf(v, 0.0f) : v);
        }
        kfac_k_store_vec(y, i, r);
    }
}

/* g[k] = dy masked by y > 0 under the fused ReLU (y is read only then). */
template <typename T, int W>
static __device__ __forceinline__ void add_bwd_grad(const T *y, const T *dy, size_t i, int relu,
                                                    float g[W])
{
    kfac_k_vec<T, W> d = kfac_k_load<W>(dy, i);
    if (relu) {
        kfac_k_vec<T, W> yv = kfac_k_load<W>(y, i);
#pragma unroll
        for (int k = 0; k < W; k++) g[k] = kfac_k_f32(yv.v[k]) <= 0.0f ? 0.0f : kfac_k_f32(d.v[k]);
    } else {
#pragma unroll
        for (int k = 0; k < W; k++) g[k] = kfac_k_f32(d.v[k]);
    }
}

/* out = g (or out + g): group i of one input gradient of add. */
template <typename T, int W>
static __device__ __forceinline__ void add_bwd_out(T *out, size_t i, int acc, const float g[W])
{
    kfac_k_vec<T, W> r;
    if (acc) {
        kfac_k_vec<T, W> old = kfac_k_load<W>(out, i);
#pragma unroll
        for (int k = 0; k < W; k++) kfac_k_store(&r.v[k], kfac_k_f32(old.v[k]) + g[k]);
    } else {
#pragma unroll
        for (int k = 0; k < W; k++) kfac_k_store(&r.v[k], g[k]);
    }
    kfac_k_store_vec(out, i, r);
}

template <typename T, int W>
static __global__ void add_bwd_kernel(size_t groups, const T *y, const T *dy, T *da, int acc_a,
                                      T *db, int acc_b, int relu)
{
    KFAC_K_GRID_LOOP(i, groups)
    {
        float g[W];
        add_bwd_grad<T, W>(y, dy, i, relu, g);
        add_bwd_out<T, W>(da, i, acc_a, g); /* da before db is read, as the scalar order */
        add_bwd_out<T, W>(db, i, acc_b, g);
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
 * narrowing (float holds bf16 and fp16 values exactly).  W: 1, or the
 * values in 16 bytes of the narrower type (the wider one then takes one
 * or two 128-bit accesses). */
template <typename S, typename D, int W>
static __global__ void convert_kernel(size_t groups, const S *x, D *y)
{
    KFAC_K_GRID_LOOP(i, groups)
    {
        kfac_k_vec<S, W> a = kfac_k_load<W>(x, i);
        kfac_k_vec<D, W> r;
#pragma unroll
        for (int k = 0; k < W; k++) kfac_k_store(&r.v[k], kfac_k_f32(a.v[k]));
        kfac_k_store_vec(y, i, r);
    }
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

/* One thread per item over n items: <<<blocks, threads, 0, stream>>>. */
#define GRID(n, stream) kfac_k_blocks(n), KFAC_K_THREADS, 0, (stream)

/* Whether n values in groups of w, at the given pointers, may take the
 * vector path: whole groups and 16-byte aligned addresses. */
template <typename... P>
static bool vec_ok(size_t n, int w, const P *...p)
{
    return n % (size_t)w == 0 && kfac_k_aligned16(p...);
}

extern "C" cudaError_t kfac_k_probe(void)
{
    cudaFuncAttributes attr;
    return cudaFuncGetAttributes(&attr, fill_kernel);
}

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
    KFAC_K_DISPATCH(t, T, {
        constexpr int w = KFAC_K_VEC(T);
        if (vec_ok(n, w, x, y))
            relu_fwd_kernel<T, w><<<GRID(n / w, stream)>>>(n / w, (const T *)x, (T *)y);
        else
            relu_fwd_kernel<T, 1><<<GRID(n, stream)>>>(n, (const T *)x, (T *)y);
    });
    return cudaGetLastError();
}

extern "C" cudaError_t kfac_k_relu_backward(kfac_dtype t, size_t n, const void *y,
                                            const void *dy, void *dx, int accumulate,
                                            cudaStream_t stream)
{
    if (n == 0) return cudaSuccess;
    KFAC_K_DISPATCH(t, T, {
        constexpr int w = KFAC_K_VEC(T);
        if (vec_ok(n, w, y, dy, dx))
            relu_bwd_kernel<T, w><<<GRID(n / w, stream)>>>(n / w, (const T *)y, (const T *)dy,
                                                           (T *)dx, accumulate);
        else
            relu_bwd_kernel<T, 1><<<GRID(n, stream)>>>(n, (const T *)y, (const T *)dy, (T *)dx,
                                                       accumulate);
    });
    return cudaGetLastError();
}

extern "C" cudaError_t kfac_k_add_forward(kfac_dtype t, size_t n, const void *a, const void *b,
                                          void *y, int relu, cudaStream_t stream)
{
    if (n == 0) return cudaSuccess;
    KFAC_K_DISPATCH(t, T, {
        constexpr int w = KFAC_K_VEC(T);
        if (vec_ok(n, w, a, b, y))
            add_fwd_kernel<T, w><<<GRID(n / w, stream)>>>(n / w, (const T *)a, (const T *)b,
                                                          (T *)y, relu);
        else
            add_fwd_kernel<T, 1><<<GRID(n, stream)>>>(n, (const T *)a, (const T *)b, (T *)y,
                                                      relu);
    });
    return cudaGetLastError();
}

extern "C" cudaError_t kfac_k_add_backward(kfac_dtype t, size_t n, const void *y, const void *dy,
                                           void *da, int acc_a, void *db, int acc_b, int relu,
                                           cudaStream_t stream)
{
    if (n == 0) return cudaSuccess;
    KFAC_K_DISPATCH(t, T, {
        constexpr int w = KFAC_K_VEC(T);
        if (vec_ok(n, w, y, dy, da, db))
            add_bwd_kernel<T, w><<<GRID(n / w, stream)>>>(n / w, (const T *)y, (const T *)dy,
                                                          (T *)da, acc_a, (T *)db, acc_b, relu);
        else
            add_bwd_kernel<T, 1><<<GRID(n, stream)>>>(n, (const T *)y, (const T *)dy, (T *)da,
                                                      acc_a, (T *)db, acc_b, relu);
    });
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
    KFAC_K_DISPATCH(src_t, S, KFAC_K_DISPATCH(dst_t, D, {
        constexpr int w = KFAC_K_VEC(S) > KFAC_K_VEC(D) ? KFAC_K_VEC(S) : KFAC_K_VEC(D);
        if (vec_ok(n, w, src, dst))
            convert_kernel<S, D, w><<<GRID(n / w, stream)>>>(n / w, (const S *)src, (D *)dst);
        else
            convert_kernel<S, D, 1><<<GRID(n, stream)>>>(n, (const S *)src, (D *)dst);
    }));
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
