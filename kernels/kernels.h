/* kernels.h - internal: C-callable launchers of the CUDA kernels in
 * kernels/, used by lib/cuda (see kfac_backend.h for the contracts of the
 * operations they implement).
 *
 * All pointers are device pointers.  Every launcher enqueues its kernels on
 * `stream` and returns the launch status (cudaGetLastError); faults inside a
 * kernel surface at the next synchronisation.  n == 0 launches nothing
 * (bias_backward and scale_grads still write their results).
 *
 * Precision: activation arrays (x, y, dx, dy, logits, dlogits, a, b, da,
 * db of add) are `void *` holding values of the kfac_dtype `t` given first;
 * parameters, parameter gradients and statistics are float32 always.  The
 * kernels load 16-bit values as float, compute in float (double where the
 * CPU does), and round results to nearest even when storing them.  An
 * unknown `t` returns cudaErrorInvalidValue and launches nothing. */
#ifndef KFAC_KERNELS_H
#define KFAC_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#include "kfac/kfac_backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- eltwise.cu ---- */
/* cudaSuccess when this build's kernels have an image the current device
 * runs (CMAKE_CUDA_ARCHITECTURES covers it), else the runtime's error. */
cudaError_t kfac_k_probe(void);
cudaError_t kfac_k_fill(size_t n, float *x, float value, cudaStream_t stream);
cudaError_t kfac_k_relu_forward(kfac_dtype t, size_t n, const void *x, void *y,
                                cudaStream_t stream);
cudaError_t kfac_k_relu_backward(kfac_dtype t, size_t n, const void *y, const void *dy, void *dx,
                                 int accumulate, cudaStream_t stream);
cudaError_t kfac_k_add_forward(kfac_dtype t, size_t n, const void *a, const void *b, void *y,
                               int relu, cudaStream_t stream);
cudaError_t kfac_k_add_backward(kfac_dtype t, size_t n, const void *y, const void *dy, void *da,
                                int acc_a, void *db, int acc_b, int relu, cudaStream_t stream);
cudaError_t kfac_k_sgd_update(size_t n, float *p, const float *g, float *v, float lr, float mom,
                              float wd, int nesterov, cudaStream_t stream);
/* dst[i] = src[i] for n values, any type to any type (round to nearest
 * even when narrowing).  src and dst must not overlap. */
cudaError_t kfac_k_convert(size_t n, const void *src, kfac_dtype src_t, void *dst,
                           kfac_dtype dst_t, cudaStream_t stream);
/* g[i] *= scale for n floats; sets *nonfinite (a device int) to 1 when a
 * result is inf or nan, else to 0 (also for n == 0). */
cudaError_t kfac_k_scale_grads(size_t n, float *g, float scale, int *nonfinite,
                               cudaStream_t stream);

/* ---- bias.cu ---- (the bias of fully connected layers) */
/* y(row, j) += bias(j) for rows x k values of y. */
cudaError_t kfac_k_bias_forward(kfac_dtype t, size_t rows, int k, void *y, const float *bias,
                                cudaStream_t stream);
/* db(j) = sum over rows of dy(row, j), summed in a fixed order (zeros
 * when rows == 0). */
cudaError_t kfac_k_bias_backward(kfac_dtype t, size_t rows, int k, const void *dy, float *db,
                                 cudaStream_t stream);

/* ---- bn.cu ---- */
/* Bytes of device scratch the batch-norm launchers need for (m, c). */
size_t kfac_k_bn_scratch_bytes(size_t m, int c);
cudaError_t kfac_k_bn_forward_train(kfac_dtype t, size_t m, int c, const void *x,
                                    const float *gamma, const float *beta, void *y,
                                    float *save_mean, float *save_invstd, float *run_mean,
                                    float *run_var, float momentum, float eps, int relu,
                                    void *scratch, cudaStream_t stream);
cudaError_t kfac_k_bn_forward_eval(kfac_dtype t, size_t m, int c, const void *x,
                                   const float *gamma, const float *beta, void *y,
                                   const float *run_mean, const float *run_var, float eps,
                                   int relu, cudaStream_t stream);
cudaError_t kfac_k_bn_backward(kfac_dtype t, size_t m, int c, const void *x, const void *y,
                               const void *dy, const float *gamma, const float *save_mean,
                               const float *save_invstd, void *dx, int accumulate,
                               float *dgamma, float *dbeta, int relu, void *scratch,
                               cudaStream_t stream);

/* ---- pool.cu ---- (geometry as kfac_pool_desc) */
cudaError_t kfac_k_maxpool_forward(kfac_dtype t, int n, int h, int w, int c, int kh, int kw,
                                   int stride, int pad, int ho, int wo, const void *x, void *y,
                                   cudaStream_t stream);
cudaError_t kfac_k_maxpool_backward(kfac_dtype t, int n, int h, int w, int c, int kh, int kw,
                                    int stride, int pad, int ho, int wo, const void *x,
                                    const void *y, const void *dy, void *dx, int accumulate,
                                    cudaStream_t stream);
cudaError_t kfac_k_gap_forward(kfac_dtype t, int n, int hw, int c, const void *x, void *y,
                               cudaStream_t stream);
cudaError_t kfac_k_gap_backward(kfac_dtype t, int n, int hw, int c, const void *dy, void *dx,
                                int accumulate, cudaStream_t stream);

/* ---- loss.cu ---- */
/* Device result of kfac_k_softmax_xent. */
typedef struct kfac_k_xent_result {
    double loss_sum;
    int correct;
    int bad_row; /* smallest row with a label outside [0, classes), or n if none */
} kfac_k_xent_result;

/* Bytes of device scratch kfac_k_softmax_xent needs for n rows. */
size_t kfac_k_xent_scratch_bytes(int n);
/* Writes dlogits (may be NULL; grad_scale times the gradient of the mean
 * loss) and *result (device); rows with a bad label are skipped and
 * reported in result->bad_row. */
cudaError_t kfac_k_softmax_xent(kfac_dtype t, int n, int classes, const void *logits,
                                const int32_t *labels, float smoothing, float grad_scale,
                                void *dlogits, kfac_k_xent_result *result, void *scratch,
                                cudaStream_t stream);

/* ---- kfac.cu ---- (K-FAC's stages beside cuBLAS/cuSOLVER, lib/cuda/kfac_cuda.c;
 * packed = LAPACK 'U' packed, full matrices n x n row-major) */
/* cols(rows, KH*KW*C) = the im2col patch rows [row0, row0+rows) of x
 * (NHWC, geometry d), in (r, s, c) order with zero padding. */
cudaError_t kfac_k_im2col(kfac_dtype t, const kfac_conv_desc *d, size_t row0, size_t rows,
                          const void *x, void *cols, cudaStream_t stream);
/* Doubles of `partial` kfac_k_colsum needs for n columns. */
size_t kfac_k_colsum_partial_doubles(int n);
/* sums[j] += sum over the rows of a (rows x n) of a(row, j), in double and
 * a fixed order. */
cudaError_t kfac_k_colsum(kfac_dtype t, size_t rows, int n, const void *a, double *partial,
                          double *sums, cudaStream_t stream);
/* Packed order n (n+1 when sums != NULL) from the upper triangle of the
 * column-major n x n `gram` (gram[i + j*n], i <= j, as syrk writes it):
 * packed(i, j) = scale * gram(i, j); with sums, the appended column is
 * (i, n) = scale * sums[i], (n, n) = scale * rows. */
cudaError_t kfac_k_pack_gram(int n, const float *gram, float scale, const double *sums,
                             size_t rows, float *packed, cudaStream_t stream);
/* full = the symmetric n x n matrix of packed, + shift on the diagonal. */
cudaError_t kfac_k_unpack(int n, const float *packed, float shift, float *full,
                          cudaStream_t stream);
/* a(i, j) = a(j, i) for j > i: copies the row-major lower triangle of the
 * n x n `a` onto its upper one. */
cudaError_t kfac_k_mirror_lower(int n, float *a, cudaStream_t stream);
/* out(i, j) = in(j, i) for n x n matrices (out != in). */
cudaError_t kfac_k_transpose(int n, const float *in, float *out, cudaStream_t stream);
/* v[i] = 0 where v[i] < 0. */
cudaError_t kfac_k_clamp_negative(int n, float *v, cudaStream_t stream);
/* b(i, k) = q(i, k) * sqrt(1 / (d[k] + shift)) for n x n row-major q, b. */
cudaError_t kfac_k_scale_columns(int n, const float *q, const float *d, float shift, float *b,
                                 cudaStream_t stream);
/* v(i, j) /= dg[i] * da[j] + lambda for k x d row-major v. */
cudaError_t kfac_k_eig_divide(int k, int d, const float *dg, const float *da, float lambda,
                              float *v, cudaStream_t stream);
/* y = alpha x + beta y over n floats; y is not read when beta == 0, x not
 * when alpha == 0 (both 0: y = 0). */
cudaError_t kfac_k_axpby(size_t n, float alpha, const float *x, float beta, float *y,
                         cudaStream_t stream);
/* Double-precision reductions into work (KFAC_K_REDUCE_DOUBLES doubles,
 * the results in work[0] and work[1]), deterministic for a given size:
 *   dot:           *out = sum a[i] b[i] (out: one device double; work
 *                  holds only the partials, so dots into different outs
 *                  can be queued back to back)
 *   packed_trace:  work[0] = sum of the diagonal of packed order n
 *   factor_change: work[0] = sum w (new - old)^2, work[1] = sum w old^2,
 *                  w = 1 on the diagonal, 2 off it. */
#define KFAC_K_REDUCE_BLOCKS 1024
#define KFAC_K_REDUCE_DOUBLES (2 + 2 * KFAC_K_REDUCE_BLOCKS)
cudaError_t kfac_k_dot(size_t n, const float *a, const float *b, double *work, double *out,
                       cudaStream_t stream);
cudaError_t kfac_k_packed_trace(int n, const float *packed, double *work, cudaStream_t stream);
cudaError_t kfac_k_factor_change(int n, const float *old_packed, const float *new_packed,
                                 double *work, cudaStream_t stream);
/* Batch norm's unit-wise Fisher (kfac_bn_sample_grads then
 * kfac_bn_unit_fisher): sg, sb (n x c floats) from x, y, dy (T, per_image
 * rows of c channels per image), fisher (3 * c) from them; sums in double. */
cudaError_t kfac_k_bn_fisher(kfac_dtype t, int n, size_t per_image, int c, const void *x,
                             const void *y, const void *dy, const float *save_mean,
                             const float *save_invstd, int relu, float grad_scale, float *sg,
                             float *sb, float *fisher, cudaStream_t stream);
/* Per channel 2x2 solve in double (kfac_bn_precondition); outputs may
 * alias inputs. */
cudaError_t kfac_k_bn_precondition(int c, const float *fisher, float lambda, int diagonal_only,
                                   const float *dgamma, const float *dbeta, float *pgamma,
                                   float *pbeta, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
#endif
