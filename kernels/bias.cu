/* bias.cu - the bias of fully connected layers (1x1 convolutions on 1x1
 * images) on rows x k activations: y(row, j) += bias(j) and its gradient
 * db(j) = sum over rows of dy(row, j); same sums as lib/cpu/conv.c.
 *
 * The backward sum is deterministic without atomics or scratch: a block of
 * 32x8 threads owns 32 consecutive channels (its warps read 32 consecutive
 * values of a row: coalesced), each of its 8 row-threads adds every 8th row
 * in order, and thread row 0 adds the 8 partial sums in order.  Sums are in
 * double.  Parallelism is ceil(k/32) blocks, plenty for a classifier
 * (k = classes, rows = batch), which is the only layer with a bias. */
#include "common.cuh"

#define BIAS_TX 32
#define BIAS_TY 8

template <typename T>
static __global__ void bias_fwd_kernel(size_t total, int k, T *y, const float *bias)
{
    KFAC_K_GRID_LOOP(i, total)
    {
        int j = (int)(i % (size_t)k);
        kfac_k_store(&y[i], kfac_k_f32(y[i]) + bias[j]);
    }
}

/* grid (ceil(k/32)), block (32, 8); also right for rows == 0 (zeros). */
template <typename T>
static __global__ void bias_bwd_kernel(size_t rows, int k, const T *dy, float *db)
{
    __shared__ double part[BIAS_TY][BIAS_TX];
    int j = blockIdx.x * BIAS_TX + threadIdx.x;
    double s = 0.0;
    if (j < k)
        for (size_t i = threadIdx.y; i < rows; i += BIAS_TY) s += kfac_k_f32(dy[i * k + j]);
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && j < k) {
        double t = 0.0;
        for (int r = 0; r < BIAS_TY; r++) t += part[r][threadIdx.x];
        db[j] = (float)t;
    }
}

extern "C" cudaError_t kfac_k_bias_forward(kfac_dtype t, size_t rows, int k, void *y,
                                           const float *bias, cudaStream_t stream)
{
    size_t total = rows * (size_t)(k > 0 ? k : 0);
    if (total == 0) return cudaSuccess;
    KFAC_K_DISPATCH(t, T,
                    bias_fwd_kernel<T><<<kfac_k_blocks(total), KFAC_K_THREADS, 0, stream>>>(
                        total, k, (T *)y, bias));
    return cudaGetLastError();
}

extern "C" cudaError_t kfac_k_bias_backward(kfac_dtype t, size_t rows, int k, const void *dy,
                                            float *db, cudaStream_t stream)
{
    if (k <= 0) return cudaSuccess;
    dim3 grid((unsigned)((k + BIAS_TX - 1) / BIAS_TX)), block(BIAS_TX, BIAS_TY);
    KFAC_K_DISPATCH(t, T,
                    bias_bwd_kernel<T><<<grid, block, 0, stream>>>(rows, k, (const T *)dy, db));
    return cudaGetLastError();
}
