/* common.cuh - internal helpers shared by the kernel sources in kernels/:
 * launch geometry for grid-stride loops. */
#ifndef KFAC_KERNELS_COMMON_CUH
#define KFAC_KERNELS_COMMON_CUH

#include <stddef.h>

#include <cuda_runtime.h>

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

#endif
