/* kernels.h - internal: C-callable launchers of the CUDA kernels in
 * kernels/, used by lib/cuda/backend_cuda.c (see kfac_backend.h for the
 * contracts of the operations they implement).
 *
 * All pointers are device pointers.  Every launcher enqueues its kernels on
 * `stream` and returns the launch status (cudaGetLastError); faults inside a
 * kernel surface at the next synchronisation.  n == 0 launches nothing.
 * bf16 and fp16 values are passed as their raw 16-bit patterns. */
#ifndef KFAC_KERNELS_H
#define KFAC_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- eltwise.cu ---- */
cudaError_t kfac_k_fill(size_t n, float *x, float value, cudaStream_t stream);
cudaError_t kfac_k_relu_forward(size_t n, const float *x, float *y, cudaStream_t stream);
cudaError_t kfac_k_relu_backward(size_t n, const float *y, const float *dy, float *dx,
                                 int accumulate, cudaStream_t stream);
cudaError_t kfac_k_add_forward(size_t n, const float *a, const float *b, float *y, int relu,
                               cudaStream_t stream);
cudaError_t kfac_k_add_backward(size_t n, const float *y, const float *dy, float *da, int acc_a,
                                float *db, int acc_b, int relu, cudaStream_t stream);
cudaError_t kfac_k_sgd_update(size_t n, float *p, const float *g, float *v, float lr, float mom,
                              float wd, int nesterov, cudaStream_t stream);
/* Round-to-nearest-even conversions for mixed precision. */
cudaError_t kfac_k_f32_to_bf16(size_t n, const float *x, uint16_t *y, cudaStream_t stream);
cudaError_t kfac_k_bf16_to_f32(size_t n, const uint16_t *x, float *y, cudaStream_t stream);
cudaError_t kfac_k_f32_to_f16(size_t n, const float *x, uint16_t *y, cudaStream_t stream);
cudaError_t kfac_k_f16_to_f32(size_t n, const uint16_t *x, float *y, cudaStream_t stream);

/* ---- bn.cu ---- */
/* Bytes of device scratch the batch-norm launchers need for (m, c). */
size_t kfac_k_bn_scratch_bytes(size_t m, int c);
cudaError_t kfac_k_bn_forward_train(size_t m, int c, const float *x, const float *gamma,
                                    const float *beta, float *y, float *save_mean,
                                    float *save_invstd, float *run_mean, float *run_var,
                                    float momentum, float eps, int relu, void *scratch,
                                    cudaStream_t stream);
cudaError_t kfac_k_bn_forward_eval(size_t m, int c, const float *x, const float *gamma,
                                   const float *beta, float *y, const float *run_mean,
                                   const float *run_var, float eps, int relu,
                                   cudaStream_t stream);
cudaError_t kfac_k_bn_backward(size_t m, int c, const float *x, const float *y, const float *dy,
                               const float *gamma, const float *save_mean,
                               const float *save_invstd, float *dx, int accumulate,
                               float *dgamma, float *dbeta, int relu, void *scratch,
                               cudaStream_t stream);

/* ---- pool.cu ---- (geometry as kfac_pool_desc) */
cudaError_t kfac_k_maxpool_forward(int n, int h, int w, int c, int kh, int kw, int stride,
                                   int pad, int ho, int wo, const float *x, float *y,
                                   cudaStream_t stream);
cudaError_t kfac_k_maxpool_backward(int n, int h, int w, int c, int kh, int kw, int stride,
                                    int pad, int ho, int wo, const float *x, const float *y,
                                    const float *dy, float *dx, int accumulate,
                                    cudaStream_t stream);
cudaError_t kfac_k_gap_forward(int n, int hw, int c, const float *x, float *y,
                               cudaStream_t stream);
cudaError_t kfac_k_gap_backward(int n, int hw, int c, const float *dy, float *dx, int accumulate,
                                cudaStream_t stream);

/* ---- loss.cu ---- */
/* Device result of kfac_k_softmax_xent. */
typedef struct kfac_k_xent_result {
    double loss_sum;
    int correct;
    int bad_row; /* smallest row with a label outside [0, classes), or n if none */
} kfac_k_xent_result;

/* Bytes of device scratch kfac_k_softmax_xent needs for n rows. */
size_t kfac_k_xent_scratch_bytes(int n);
/* Writes dlogits (may be NULL) and *result (device); rows with a bad label
 * are skipped and reported in result->bad_row. */
cudaError_t kfac_k_softmax_xent(int n, int classes, const float *logits, const int32_t *labels,
                                float smoothing, float *dlogits, kfac_k_xent_result *result,
                                void *scratch, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
#endif
