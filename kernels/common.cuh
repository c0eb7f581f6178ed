/* common.cuh - internal helpers shared by the kernel sources in kernels/:
 * launch geometry for grid-stride loops, and the activation storage types
 * (float, bf16, fp16): loads to float, rounded stores, and the dispatch
 * from a kfac_dtype to a template argument. */
#ifndef KFAC_KERNELS_COMMON_CUH
#define KFAC_KERNELS_COMMON_CUH

#include <stddef.h>

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
