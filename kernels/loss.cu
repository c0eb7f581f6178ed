/* loss.cu - softmax cross-entropy with label smoothing, its gradient and
 * top-1 hits; same math as lib/cpu/loss.c (log-sum-exp in double).
 *
 * One warp per row writes the row's loss and hit (-1: bad label) to scratch;
 * one block then adds the rows in a fixed order into a kfac_k_xent_result,
 * so the loss is deterministic.  Logits and dlogits are T (float, bf16 or
 * fp16), loaded as float; dlogits are computed in double, then rounded. */
#include <math.h>

#include "common.cuh"

#define XENT_WARPS 8            /* rows per block of the row kernel */
#define XENT_REDUCE_THREADS 256 /* power of two */

static size_t xent_loss_bytes(int n) { return (size_t)(n > 0 ? n : 0) * sizeof(double); }

extern "C" size_t kfac_k_xent_scratch_bytes(int n)
{
    return xent_loss_bytes(n) + (size_t)(n > 0 ? n : 0) * sizeof(int);
}

template <typename T>
static __global__ void xent_rows_kernel(int n, int classes, const T *logits,
                                        const int32_t *labels, float smoothing, float grad_scale,
                                        T *dlogits, double *row_loss, int *row_hit)
{
    const unsigned full = 0xffffffffu;
    int lane = threadIdx.x & 31;
    int warp = (int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5);
    int nwarps = (int)((gridDim.x * blockDim.x) >> 5);
    for (int i = warp; i < n; i += nwarps) {
        int label = labels[i];
        if (label < 0 || label >= classes) {
            if (lane == 0) {
                row_loss[i] = 0.0;
                row_hit[i] = -1;
            }
            continue;
        }
        const T *z = logits + (size_t)i * classes;
        /* argmax: the first index of the largest logit, as the CPU's scan. */
        float bv = 0.0f;
        int bj = -1;
        for (int j = lane; j < classes; j += 32)
            if (bj < 0 || kfac_k_f32(z[j]) > bv) {
                bv = kfac_k_f32(z[j]);
                bj = j;
            }
        for (int d = 16; d > 0; d >>= 1) {
            float ov = __shfl_xor_sync(full, bv, d);
            int oj = __shfl_xor_sync(full, bj, d);
            if (oj >= 0 && (bj < 0 || ov > bv || (ov == bv && oj < bj))) {
                bv = ov;
                bj = oj;
            }
        }
        double zmax = kfac_k_f32(z[bj]), sumexp = 0.0, sumz = 0.0;
        for (int j = lane; j < classes; j += 32) {
            sumexp += exp((double)kfac_k_f32(z[j]) - zmax);
            sumz += kfac_k_f32(z[j]);
        }
        for (int d = 16; d > 0; d >>= 1) {
            sumexp += __shfl_xor_sync(full, sumexp, d);
            sumz += __shfl_xor_sync(full, sumz, d);
        }
        double lse = zmax + log(sumexp);
        double off = smoothing / classes, on = 1.0 - smoothing + off;
        if (lane == 0) {
            double zl = kfac_k_f32(z[label]);
            row_loss[i] = on * (lse - zl) + off * (classes * lse - sumz) - off * (lse - zl);
            row_hit[i] = bj == label;
        }
        if (dlogits) {
            T *g = dlogits + (size_t)i * classes;
            for (int j = lane; j < classes; j += 32) {
                double target = j == label ? on : off;
                double v = (exp((double)kfac_k_f32(z[j]) - lse) - target) / n * grad_scale;
                kfac_k_store(&g[j], (float)v);
            }
        }
    }
}

static __global__ void xent_reduce_kernel(int n, const double *row_loss, const int *row_hit,
                                          kfac_k_xent_result *result)
{
    __shared__ double sl[XENT_REDUCE_THREADS];
    __shared__ int sh[XENT_REDUCE_THREADS], sb[XENT_REDUCE_THREADS];
    int t = threadIdx.x;
    double loss = 0.0;
    int hits = 0, bad = n;
    for (int i = t; i < n; i += XENT_REDUCE_THREADS) {
        loss += row_loss[i];
        if (row_hit[i] < 0)
            bad = min(bad, i);
        else
            hits += row_hit[i];
    }
    sl[t] = loss;
    sh[t] = hits;
    sb[t] = bad;
    __syncthreads();
    for (int s = XENT_REDUCE_THREADS / 2; s > 0; s >>= 1) {
        if (t < s) {
            sl[t] += sl[t + s];
            sh[t] += sh[t + s];
            sb[t] = min(sb[t], sb[t + s]);
        }
        __syncthreads();
    }
    if (t == 0) {
        result->loss_sum = sl[0];
        result->correct = sh[0];
        result->bad_row = sb[0];
    }
}

extern "C" cudaError_t kfac_k_softmax_xent(kfac_dtype t, int n, int classes, const void *logits,
                                           const int32_t *labels, float smoothing,
                                           float grad_scale, void *dlogits,
                                           kfac_k_xent_result *result, void *scratch,
                                           cudaStream_t stream)
{
    double *row_loss = (double *)scratch;
    int *row_hit = (int *)((char *)scratch + xent_loss_bytes(n));
    if (n > 0 && classes > 0) {
        size_t blocks = ((size_t)n + XENT_WARPS - 1) / XENT_WARPS;
        if (blocks > KFAC_K_MAX_BLOCKS) blocks = KFAC_K_MAX_BLOCKS;
        KFAC_K_DISPATCH(t, T,
                        xent_rows_kernel<T><<<(unsigned)blocks, XENT_WARPS * 32, 0, stream>>>(
                            n, classes, (const T *)logits, labels, smoothing, grad_scale,
                            (T *)dlogits, row_loss, row_hit));
    }
    xent_reduce_kernel<<<1, XENT_REDUCE_THREADS, 0, stream>>>(n > 0 && classes > 0 ? n : 0,
                                                             row_loss, row_hit, result);
    return cudaGetLastError();
}
