/* common.cuh - internal helpers shared by the kernel sources in kernels/:
 * launch geometry for grid-stride loops, the activation storage types
 * (float, bf16, fp16): loads to float, rounded stores, and the dispatch
 * from a kfac_dtype to a template argument; 16-byte vector accesses for
 * the bandwidth-bound kernels. */
#ifndef KFAC_KERNELS_COMMON_CUH
#define KFAC_KERNELS_COMMON_CUH

#include <stddef.h>
#include <stdint.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels.h"

#define KFAC_K_THREADS 256
/* Grid-stride loops cover any n; more blocks than this only adds overhead. */
#define KFAC_K_MAX_BLOCKS 65535

static inline unsigned kfac_k_blocks(size_t n)
{
    size_t b = (n + KFAC_K_THREADS - 1) / KFAC_K_THREADS;
    return (unsigned)(b < KFAC_K_MAX_BLOCKS ? b : KFAC_K_MAX_BLOCKS);
}

/* for (i = first; i < n; i += total threads) */
#define KFAC_K_GRID_LOOP(i, n)                                                      \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n);          \
         i += (size_t)blockDim.x * gridDim.x)

/* A grid-stride loop over n items laid out in rows of `cols` (> 0)
 * columns that also keeps p.col == p.i % cols: the column advances by
 * (grid size) % cols with one wrap, because a 64-bit modulo per item
 * costs dozens of instructions and made such kernels compute-bound. */
struct kfac_k_col_loop {
    size_t i, step;
    unsigned col, col_step, cols;

    __device__ explicit kfac_k_col_loop(unsigned n_cols)
        : i((size_t)blockIdx.x * blockDim.x + threadIdx.x),
          step((size_t)blockDim.x * gridDim.x),
          col((unsigned)(i % n_cols)),
          col_step((unsigned)(step % n_cols)),
          cols(n_cols)
    {
    }
    __device__ void next()
    {
        i += step;
        col += col_step; /* < 2 * cols < 2^32 */
        if (col >= cols) col -= cols;
    }
};
#define KFAC_K_GRID_LOOP_COL(p, n, cols) for (kfac_k_col_loop p(cols); p.i < (n); p.next())

/* N consecutive values of T, aligned to their size up to 16 bytes: a copy
 * of one compiles to 128-bit loads/stores (one per 16 bytes) when
 * N * sizeof(T) >= 16, and to a plain scalar access when N == 1, so one
 * kernel template serves both paths with the same arithmetic. */
template <typename T, int N>
struct alignas(N * sizeof(T) < 16 ? N * sizeof(T) : 16) kfac_k_vec {
    T v[N];
};

/* Values of T per 16 bytes: 4 floats, 8 bf16 or fp16. */
#define KFAC_K_VEC(T) ((int)(16 / sizeof(T)))

/* Item i of the array p viewed as groups of N values. */
template <int N, typename T>
__device__ __forceinline__ kfac_k_vec<T, N> kfac_k_load(const T *p, size_t i)
{
    return reinterpret_cast<const kfac_k_vec<T, N> *>(p)[i];
}
template <int N, typename T>
__device__ __forceinline__ void kfac_k_store_vec(T *p, size_t i, const kfac_k_vec<T, N> &v)
{
    reinterpret_cast<kfac_k_vec<T, N> *>(p)[i] = v;
}

/* Host side: whether every pointer is 16-byte aligned (the vector paths
 * need it; buffers are, but callers may pass offsets into them). */
template <typename... P>
static inline bool kfac_k_aligned16(const P *...p)
{
    return ((((uintptr_t)p & 15u) == 0) && ...);
}

/* An activation value as float (exact for all three types). */
__device__ __forceinline__ float kfac_k_f32(float v) { return v; }
__device__ __forceinline__ float kfac_k_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float kfac_k_f32(__half v) { return __half2float(v); }

/* *p = v rounded to nearest even in p's type (fp16 overflows to inf). */
__device__ __forceinline__ void kfac_k_store(float *p, float v) { *p = v; }
__device__ __forceinline__ void kfac_k_store(__nv_bfloat16 *p, float v)
{
    *p = __float2bfloat16_rn(v);
}
__device__ __forceinline__ void kfac_k_store(__half *p, float v) { *p = __float2half_rn(v); }

/* Runs the statement `...` with the type name T bound to the C++ type of
 * the kfac_dtype t; an unknown t returns cudaErrorInvalidValue from the
 * enclosing launcher.  Every launcher dispatches through this macro. */
#define KFAC_K_DISPATCH(t, T, ...)                                                  \
    switch (t) {                                                                    \
    case KFAC_F32: {                                                                \
        typedef float T;                                                            \
        __VA_ARGS__;                                                                \
        break;                                                                      \
    }                                                                               \
    case KFAC_BF16: {                                                               \
        typedef __nv_bfloat16 T;                                                    \
        __VA_ARGS__;                                                                \
        break;                                                                      \
    }                                                                               \
    case KFAC_F16: {                                                                \
        typedef __half T;                                                           \
        __VA_ARGS__;                                                                \
        break;                                                                      \
    }                                                                               \
    default: return cudaErrorInvalidValue;                                          \
    }

#endif
