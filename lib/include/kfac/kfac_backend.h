/* kfac_backend.h - the table of operations a compute backend provides.
 *
 * The model graph (kfac_model.h) is backend-neutral: it owns shapes and
 * buffers and calls these operations in order.  The CPU backend (lib/cpu)
 * is always built and is the reference; the CUDA backend (lib/cuda +
 * kernels/) implements the same table on device pointers.  A backend is
 * chosen once at start-up with kfac_backend_get(); the only #ifdef for CUDA
 * lives in lib/core/backend.c.
 *
 * Layout conventions:
 *   activations NHWC: x[((n*H + h)*W + w)*C + c]
 *   conv weights KRSC: w[((k*KH + r)*KW + s)*C + c]  (= cuDNN's NHWC filter)
 *   fully connected layers are 1x1 convolutions on 1x1 images.
 * Why NHWC: a 1x1 convolution is then a plain GEMM on the activation
 * matrix (N*H*W, C) with no copy, im2col rows are runs of C contiguous
 * floats, the same rows are K-FAC's input patches, and cuDNN's tensor-core
 * kernels want channels-last.
 *
 * Precision: parameters, their gradients, BN statistics and optimizer
 * state are float32 always.  Activations and their gradients (x, y, dx, dy,
 * logits, dlogits below) are stored in the backend's `act_dtype`: float32
 * unless kfac_backend_set_precision chose bf16 or fp16 (CUDA only).  Their
 * parameters keep the type `float *` as an address; with a 16-bit
 * act_dtype they point at 16-bit values.  Arithmetic is float32 inside
 * every operation (tensor-core products accumulate in float32), as
 * PyTorch's autocast: convolutions round the float32 weights to act_dtype
 * for the product and return float32 weight gradients.  With float32
 * activations, kfac_backend_set_tf32 lets convolutions round their inputs
 * to TF32 (10-bit mantissa) for tensor-core products, as PyTorch does for
 * float32 convolutions by default; off by default here.
 *
 * Backward operations *accumulate* into input gradients when `accumulate`
 * is nonzero (a tensor read by two layers, e.g. a residual block's input),
 * otherwise they overwrite.  Parameter gradients are always overwritten.
 */
#ifndef KFAC_BACKEND_H
#define KFAC_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "kfac/kfac_dtype.h"
#include "kfac/kfac_status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* One convolution's geometry; ho/wo are derived by kfac_conv_desc_init. */
typedef struct kfac_conv_desc {
    int n, h, w, c;        /* input NHWC */
    int k, kh, kw;         /* output channels, kernel size */
    int stride, pad;
    int ho, wo;            /* output spatial size */
} kfac_conv_desc;

void kfac_conv_desc_init(kfac_conv_desc *d, int n, int h, int w, int c, int k, int kh, int kw,
                         int stride, int pad);

typedef struct kfac_pool_desc {
    int n, h, w, c;
    int kh, kw, stride, pad;
    int ho, wo;
} kfac_pool_desc;

void kfac_pool_desc_init(kfac_pool_desc *d, int n, int h, int w, int c, int k, int stride, int pad);

typedef struct kfac_backend kfac_backend;

struct kfac_backend {
    const char *name;
    int threads;           /* compute threads (CPU) */
    int cache_chunks;      /* evaluation runs in cache-sized pieces of the batch (CPU) */
    kfac_dtype act_dtype;  /* storage of activations: F32, BF16 or F16 (see Precision) */
    void *impl;

    /* Switches act_dtype; only before the first conv_workspace call (a
     * model built on the backend keeps the type it was built with).  NULL:
     * float32 only (CPU). */
    kfac_status (*set_precision)(kfac_backend *be, kfac_dtype t);
    /* Lets float32 convolutions use TF32 tensor cores (on != 0) or not;
     * same restriction.  NULL: the backend has no TF32 (CPU). */
    kfac_status (*set_tf32)(kfac_backend *be, int on);
    /* dst[i] = src[i] for n values of the given types (round to nearest
     * even when narrowing).  NULL where act_dtype can only be float32. */
    kfac_status (*convert)(kfac_backend *be, size_t n, const void *src, kfac_dtype src_t,
                           void *dst, kfac_dtype dst_t);

    /* memory */
    kfac_status (*alloc)(kfac_backend *be, size_t bytes, void **ptr);
    void (*release)(kfac_backend *be, void *ptr);
    /* Host memory the backend copies from fastest (CUDA: pinned, so uploads
     * run by DMA); NULL on backends where malloc serves (CPU). */
    void *(*host_alloc)(kfac_backend *be, size_t bytes);
    void (*host_release)(kfac_backend *be, void *ptr);
    /* Most bytes of device memory held at once since creation; NULL: not tracked (CPU). */
    size_t (*peak_bytes)(const kfac_backend *be);
    kfac_status (*upload)(kfac_backend *be, void *dst, const void *src, size_t bytes);
    kfac_status (*download)(kfac_backend *be, void *dst, const void *src, size_t bytes);
    /* Input prefetch: upload_async queues a copy of host memory (from
     * host_alloc where the backend has one) into dst and returns at once;
     * the copy starts after the operations queued before the call (so dst
     * may be a buffer they still read) and runs beside those queued after.
     * upload_join makes operations queued after it wait for the copies
     * (on the device; the host does not block); upload_wait blocks the host
     * until the copies are done (their sources may then be reused).  The
     * CPU copies at once and joins trivially. */
    kfac_status (*upload_async)(kfac_backend *be, void *dst, const void *src, size_t bytes);
    kfac_status (*upload_join)(kfac_backend *be);
    kfac_status (*upload_wait)(kfac_backend *be);
    kfac_status (*fill)(kfac_backend *be, float *x, float value, size_t n);
    /* Bytes of scratch memory conv operations need for this geometry. */
    size_t (*conv_workspace)(const kfac_backend *be, const kfac_conv_desc *d);

    /* y(n,ho,wo,k) = sum w(k,r,s,c) x(n,..,c) + bias(k); bias may be NULL. */
    kfac_status (*conv_forward)(kfac_backend *be, const kfac_conv_desc *d, const float *x,
                                const float *w, const float *bias, float *y, void *ws);
    /* dx (may be NULL: not needed), dw, db (may be NULL) from dy. */
    kfac_status (*conv_backward)(kfac_backend *be, const kfac_conv_desc *d, const float *x,
                                 const float *w, const float *dy, float *dx, int accumulate,
                                 float *dw, float *db, void *ws);

    /* Batch norm over m = N*H*W rows of c channels.  Training: batch
     * statistics (biased variance to normalise, unbiased to update the
     * running variance, as PyTorch), running = (1-momentum)*running +
     * momentum*batch; saves mean and 1/sqrt(var+eps) for backward.
     * Eval: running statistics.  relu != 0 fuses max(0, .) on the output. */
    kfac_status (*bn_forward_train)(kfac_backend *be, size_t m, int c, const float *x,
                                    const float *gamma, const float *beta, float *y,
                                    float *save_mean, float *save_invstd, float *run_mean,
                                    float *run_var, float momentum, float eps, int relu);
    kfac_status (*bn_forward_eval)(kfac_backend *be, size_t m, int c, const float *x,
                                   const float *gamma, const float *beta, float *y,
                                   const float *run_mean, const float *run_var, float eps,
                                   int relu);
    /* y is the forward output (read for the fused ReLU's mask). */
    kfac_status (*bn_backward)(kfac_backend *be, size_t m, int c, const float *x, const float *y,
                               const float *dy, const float *gamma, const float *save_mean,
                               const float *save_invstd, float *dx, int accumulate,
                               float *dgamma, float *dbeta, int relu);

    kfac_status (*relu_forward)(kfac_backend *be, size_t n, const float *x, float *y);
    kfac_status (*relu_backward)(kfac_backend *be, size_t n, const float *y, const float *dy,
                                 float *dx, int accumulate);
    /* y = a + b, optionally followed by ReLU. */
    kfac_status (*add_forward)(kfac_backend *be, size_t n, const float *a, const float *b,
                               float *y, int relu);
    /* da (+)= g, db (+)= g where g = dy masked by y > 0 when relu. */
    kfac_status (*add_backward)(kfac_backend *be, size_t n, const float *y, const float *dy,
                                float *da, int acc_a, float *db, int acc_b, int relu);

    kfac_status (*maxpool_forward)(kfac_backend *be, const kfac_pool_desc *d, const float *x,
                                   float *y);
    kfac_status (*maxpool_backward)(kfac_backend *be, const kfac_pool_desc *d, const float *x,
                                    const float *y, const float *dy, float *dx, int accumulate);
    /* Global average pool: (n, h*w, c) -> (n, c). */
    kfac_status (*gap_forward)(kfac_backend *be, int n, int hw, int c, const float *x, float *y);
    kfac_status (*gap_backward)(kfac_backend *be, int n, int hw, int c, const float *dy, float *dx,
                                int accumulate);

    /* Mean softmax cross-entropy over n rows with label smoothing eps
     * (target = (1-eps) onehot + eps/classes).  Writes dlogits (grad_scale
     * times the gradient of the mean loss, may be NULL; grad_scale is the
     * loss scale of fp16 training, else 1), the summed loss and the number
     * of correct argmax predictions (host values).  With loss_sum and
     * correct NULL the call does not wait for the device (it may be
     * captured into a graph); xent_result, given the same n, classes and
     * labels, then reads that result (of the call or of a graph replaying
     * it) and reports a label outside [0, classes). */
    kfac_status (*softmax_xent)(kfac_backend *be, int n, int classes, const float *logits,
                                const int32_t *labels, float smoothing, float grad_scale,
                                float *dlogits, double *loss_sum, int *correct);
    kfac_status (*xent_result)(kfac_backend *be, int n, int classes, const int32_t *labels,
                               double *loss_sum, int *correct);

    /* g[i] *= scale for n float32 values; *finite (host) = 1 when every
     * result is finite, 0 when one is inf or nan (dynamic loss scaling). */
    kfac_status (*scale_grads)(kfac_backend *be, size_t n, float *g, float scale, int *finite);

    /* Momentum SGD on n parameters:
     *   g' = g + wd*p;  v = mom*v + g';  p -= lr * (nesterov ? g' + mom*v : v)   */
    kfac_status (*sgd_update)(kfac_backend *be, size_t n, float *p, const float *g, float *v,
                              float lr, float mom, float wd, int nesterov);

    /* ---- K-FAC's stages (kfac_factors.h has the maths, the conventions
     * and the CPU reference of each; kfac_precond.h sequences them).
     * Arrays are backend memory, float32 unless act_dtype is named;
     * symmetric factors are packed (kfac_packed_len(n) floats, LAPACK 'U'),
     * full matrices row-major.  Calls that return a host scalar through a
     * pointer wait for the device; the others only queue work. */

    /* packed = scale * P^T P for the im2col patch rows P of x (act_dtype,
     * geometry d; d->n images), with a ones column when append_one
     * (kfac_gram_patches).  ws: gram_patches_workspace(d) bytes. */
    size_t (*gram_patches_workspace)(const kfac_backend *be, const kfac_conv_desc *d);
    kfac_status (*gram_patches)(kfac_backend *be, const kfac_conv_desc *d, const float *x,
                                int append_one, float scale, float *packed, void *ws);
    /* packed = scale * R^T R for R = rows (m x n, act_dtype), with a ones
     * column when append_one (kfac_gram_rows).  ws: gram_rows_workspace(m, n)
     * bytes (0 where the backend needs none). */
    size_t (*gram_rows_workspace)(const kfac_backend *be, size_t m, int n);
    kfac_status (*gram_rows)(kfac_backend *be, size_t m, int n, const float *rows, int append_one,
                             float scale, float *packed, void *ws);
    /* Batch norm's unit-wise Fisher (kfac_bn_sample_grads, then
     * kfac_bn_unit_fisher) of the first n images of a BN layer: x, y, dy
     * (act_dtype) are its input, output and output gradient, per_image
     * rows of c channels each; sg, sb: n*c floats of scratch; fisher: 3*c. */
    kfac_status (*bn_fisher)(kfac_backend *be, int n, size_t per_image, int c, const float *x,
                             const float *y, const float *dy, const float *save_mean,
                             const float *save_invstd, int relu, float grad_scale, float *sg,
                             float *sb, float *fisher);
    /* y = alpha * x + beta * y over n floats.  beta == 0: y is only written
     * (y = alpha * x); alpha == 0: x is not read (may be NULL). */
    kfac_status (*axpby)(kfac_backend *be, size_t n, float alpha, const float *x, float beta,
                         float *y);
    /* `rows` runs of row_bytes bytes from src (runs src_pitch bytes apart)
     * to dst (dst_pitch apart); regions do not overlap. */
    kfac_status (*copy2d)(kfac_backend *be, size_t rows, size_t row_bytes, void *dst,
                          size_t dst_pitch, const void *src, size_t src_pitch);
    /* *out = sum a[i] b[i], accumulated in double; out is backend memory
     * (one double), written in queue order like any result: read it with
     * download (so many dots cost one wait on a device). */
    kfac_status (*dot)(kfac_backend *be, size_t n, const float *a, const float *b, double *out);
    /* *out = kfac_packed_trace / kfac_factor_change of packed factors. */
    kfac_status (*packed_trace)(kfac_backend *be, int n, const float *packed, double *out);
    kfac_status (*factor_change)(kfac_backend *be, int n, const float *old_packed,
                                 const float *new_packed, double *out);
    /* Damped inverses of order n (kfac_inverse_cholesky, kfac_eigh,
     * kfac_inverse_from_eig); ws: inverse_workspace(n) bytes (0 where the
     * backend needs none).  inverse_cholesky fails with KFAC_EBACKEND,
     * naming n and the shift, when F + shift I is not positive definite. */
    size_t (*inverse_workspace)(const kfac_backend *be, int n);
    kfac_status (*inverse_cholesky)(kfac_backend *be, int n, const float *packed, float shift,
                                    float *inv, void *ws);
    kfac_status (*eigh)(kfac_backend *be, int n, const float *packed, float *evals, float *evecs,
                        void *ws);
    kfac_status (*inverse_from_eig)(kfac_backend *be, int n, const float *evals,
                                    const float *evecs, float shift, float *inv, void *ws);
    /* out = ginv * grad * ainv (kfac_precondition) and the exact damped
     * Kronecker inverse in the eigenbases (kfac_precondition_eig_exact);
     * tmp: k*d floats; out may alias grad (not tmp). */
    kfac_status (*precondition)(kfac_backend *be, int k, int d, const float *ginv,
                                const float *ainv, const float *grad, float *out, float *tmp);
    kfac_status (*precondition_eig_exact)(kfac_backend *be, int k, int d, const float *qg,
                                          const float *dg, const float *qa, const float *da,
                                          float lambda, const float *grad, float *out, float *tmp);
    /* Per channel 2x2 solve (kfac_bn_precondition); outputs may alias inputs. */
    kfac_status (*bn_precondition)(kfac_backend *be, int c, const float *fisher, float lambda,
                                   int diagonal_only, const float *dgamma, const float *dbeta,
                                   float *pgamma, float *pbeta);

    /* Graphs (CUDA graphs): the operations queued between capture_begin
     * and capture_end are recorded instead of run, into a graph that
     * graph_launch replays with the same arguments (pointers and scalars
     * as they were at capture).  Nothing may wait for the device in
     * between (softmax_xent without host results); a failed capture
     * leaves the backend as before capture_begin.  NULL where the backend
     * has none (CPU). */
    kfac_status (*capture_begin)(kfac_backend *be);
    kfac_status (*capture_end)(kfac_backend *be, void **graph);
    kfac_status (*graph_launch)(kfac_backend *be, void *graph);
    void (*graph_free)(kfac_backend *be, void *graph);

    void (*destroy)(kfac_backend *be);
};

/* Creates the backend named "cpu" or "cuda" with `threads` compute threads
 * (0: all cores).  "cuda" fails with KFAC_ENOTSUP when built without CUDA
 * and KFAC_ENODEV when no GPU is present. */
kfac_status kfac_backend_get(const char *name, int threads, kfac_backend **out);
void kfac_backend_free(kfac_backend *be);

/* Sets the backend's activation type (before building a model on it);
 * KFAC_ENOTSUP, with the reason, where the backend has only float32. */
kfac_status kfac_backend_set_precision(kfac_backend *be, kfac_dtype t);

/* Lets float32 convolutions use TF32 tensor cores (before building a
 * model); KFAC_ENOTSUP where the backend has none. */
kfac_status kfac_backend_set_tf32(kfac_backend *be, int on);

/* Sets the activation type from a precision name (train.precision): f32,
 * tf32 (f32 activations, and TF32 convolutions turned on), bf16 or f16.
 * Other names leave TF32 as the backend has it (CUDA: off unless
 * KFAC_CUDNN_TF32=1). */
kfac_status kfac_backend_set_precision_name(kfac_backend *be, const char *name);

/* Backend constructors (used by kfac_backend_get). */
kfac_status kfac_backend_cpu_init(int threads, kfac_backend **out);
#ifdef KFAC_HAVE_CUDA
kfac_status kfac_backend_cuda_init(int device, kfac_backend **out);
#endif

#ifdef __cplusplus
}
#endif
#endif
