/* cpu.h - internal: the CPU backend's operations (see kfac_backend.h for
 * their contracts).  Work is split over images or rows with OpenMP; the
 * OpenMP build of OpenBLAS runs single-threaded inside our parallel regions,
 * so every GEMM is sized to one core's caches.  Reductions combine
 * per-thread partials in thread order: results are bitwise reproducible for
 * a fixed thread count. */
#ifndef KFAC_CPU_H
#define KFAC_CPU_H

#include "kfac/kfac_backend.h"

/* Per-channel scratch the BN reductions use: threads x 2 x KFAC_CPU_MAX_CH doubles. */
#define KFAC_CPU_MAX_CH 4096

typedef struct kfac_cpu {
    double *reduce_scratch;
    double xent_loss;  /* the last softmax_xent asked without host results */
    int xent_correct;
} kfac_cpu;

static inline kfac_cpu *kfac__cpu(kfac_backend *be) { return (kfac_cpu *)be->impl; }

/* Gathers the KH*KW*C patch of each output row [row0, row0+rows) (rows
 * numbered n*HO*WO + oh*WO + ow) into cols(rows, KH*KW*C), zeros where the
 * patch covers padding.  K-FAC's input factors use the same rows. */
void kfac__cpu_im2col(const kfac_conv_desc *d, const float *x, size_t row0, size_t rows,
                      float *cols);

/* A 1x1, stride-1, unpadded convolution: its input rows are its patches. */
int kfac__cpu_conv_is_pointwise(const kfac_conv_desc *d);

/* The patch rows [row0, row0+rows): x itself for a pointwise convolution,
 * else gathered into cols by kfac__cpu_im2col. */
const float *kfac__cpu_patch_rows(const kfac_conv_desc *d, const float *x, size_t row0,
                                  size_t rows, float *cols);

/* conv_direct.c: convolutions without the patch matrix (see there). */
int kfac__cpu_direct_ok(const kfac_conv_desc *d);
int kfac__cpu_direct_input_grad_ok(const kfac_conv_desc *d);
size_t kfac__cpu_direct_scratch_floats(const kfac_conv_desc *d); /* padded image, per thread */
void kfac__cpu_direct_transpose_weights(const kfac_conv_desc *d, const float *w, float *wt);
void kfac__cpu_direct_flip_weights(const kfac_conv_desc *d, const float *w, float *wf);
/* One image: y(HO*WO, K) = conv(x); wt from kfac__cpu_direct_transpose_weights. */
void kfac__cpu_direct_forward_image(const kfac_conv_desc *d, const float *x, const float *wt,
                                    float *y, float *scratch);
/* One image: dx (+)= the input gradient of dy; wf from kfac__cpu_direct_flip_weights. */
void kfac__cpu_direct_input_grad_image(const kfac_conv_desc *d, const float *dy, const float *wf,
                                       float *dx, int accumulate, float *scratch);
/* One image: dwt(KD, K) += patches^T dy. */
void kfac__cpu_direct_weight_grad_image(const kfac_conv_desc *d, const float *x, const float *dy,
                                        float *dwt, float *scratch);

size_t kfac__cpu_conv_workspace(const kfac_backend *be, const kfac_conv_desc *d);
kfac_status kfac__cpu_conv_forward(kfac_backend *be, const kfac_conv_desc *d, const float *x,
                                   const float *w, const float *bias, float *y, void *ws);
kfac_status kfac__cpu_conv_backward(kfac_backend *be, const kfac_conv_desc *d, const float *x,
                                    const float *w, const float *dy, float *dx, int accumulate,
                                    float *dw, float *db, void *ws);

kfac_status kfac__cpu_bn_forward_train(kfac_backend *be, size_t m, int c, const float *x,
                                       const float *gamma, const float *beta, float *y,
                                       float *save_mean, float *save_invstd, float *run_mean,
                                       float *run_var, float momentum, float eps, int relu);
kfac_status kfac__cpu_bn_forward_eval(kfac_backend *be, size_t m, int c, const float *x,
                                      const float *gamma, const float *beta, float *y,
                                      const float *run_mean, const float *run_var, float eps,
                                      int relu);
kfac_status kfac__cpu_bn_backward(kfac_backend *be, size_t m, int c, const float *x,
                                  const float *y, const float *dy, const float *gamma,
                                  const float *save_mean, const float *save_invstd, float *dx,
                                  int accumulate, float *dgamma, float *dbeta, int relu);

kfac_status kfac__cpu_relu_forward(kfac_backend *be, size_t n, const float *x, float *y);
kfac_status kfac__cpu_relu_backward(kfac_backend *be, size_t n, const float *y, const float *dy,
                                    float *dx, int accumulate);
kfac_status kfac__cpu_add_forward(kfac_backend *be, size_t n, const float *a, const float *b,
                                  float *y, int relu);
kfac_status kfac__cpu_add_backward(kfac_backend *be, size_t n, const float *y, const float *dy,
                                   float *da, int acc_a, float *db, int acc_b, int relu);
kfac_status kfac__cpu_sgd_update(kfac_backend *be, size_t n, float *p, const float *g, float *v,
                                 float lr, float mom, float wd, int nesterov);
kfac_status kfac__cpu_fill(kfac_backend *be, float *x, float value, size_t n);
kfac_status kfac__cpu_scale_grads(kfac_backend *be, size_t n, float *g, float scale, int *finite);

kfac_status kfac__cpu_maxpool_forward(kfac_backend *be, const kfac_pool_desc *d, const float *x,
                                      float *y);
kfac_status kfac__cpu_maxpool_backward(kfac_backend *be, const kfac_pool_desc *d, const float *x,
                                       const float *y, const float *dy, float *dx,
                                       int accumulate);
kfac_status kfac__cpu_gap_forward(kfac_backend *be, int n, int hw, int c, const float *x,
                                  float *y);
kfac_status kfac__cpu_gap_backward(kfac_backend *be, int n, int hw, int c, const float *dy,
                                   float *dx, int accumulate);

kfac_status kfac__cpu_softmax_xent(kfac_backend *be, int n, int classes, const float *logits,
                                   const int32_t *labels, float smoothing, float grad_scale,
                                   float *dlogits, double *loss_sum, int *correct);
kfac_status kfac__cpu_xent_result(kfac_backend *be, int n, int classes, const int32_t *labels,
                                  double *loss_sum, int *correct);

/* kfac_ops.c: fills the table's K-FAC stages with factors.c's host functions. */
void kfac__cpu_set_kfac_ops(kfac_backend *be);

#endif
