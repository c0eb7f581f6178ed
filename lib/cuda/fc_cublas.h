/* fc_cublas.h - internal: fully connected layers of the CUDA backend as
 * cuBLAS GEMMs (see fc_cublas.c for the mapping and the precision).  A
 * fully connected layer is a kfac_conv_desc with 1x1 images, a 1x1 kernel,
 * stride 1 and pad 0 (kfac_backend.h); conv_cudnn.c hands those geometries
 * here instead of planning cuDNN convolutions for them, so the functions
 * implement the conv_* contracts of kfac_backend.h for them, with n >= 1.
 * They only queue work on cu->stream: no allocation, no synchronisation
 * (capturable into a CUDA graph). */
#ifndef KFAC_FC_CUBLAS_H
#define KFAC_FC_CUBLAS_H

#include "cuda/cuda_backend.h"

/* Whether d is a plain GEMM (runs here). */
int kfac__fc_is_gemm(const kfac_conv_desc *d);

/* Bytes of workspace d needs with activations of type t: 0 for float32;
 * for 16-bit types the rounded weights and a float32 output.  Grows with
 * d->n, so a larger batch's workspace serves a smaller one. */
size_t kfac__fc_workspace(kfac_dtype t, const kfac_conv_desc *d);

/* conv_forward / conv_backward for a GEMM geometry d (n >= 1) in
 * cu->act_dtype; ws: kfac__fc_workspace bytes (may be NULL for float32). */
kfac_status kfac__fc_forward(kfac_cuda *cu, const kfac_conv_desc *d, const float *x,
                             const float *w, const float *bias, float *y, void *ws);
kfac_status kfac__fc_backward(kfac_cuda *cu, const kfac_conv_desc *d, const float *x,
                              const float *w, const float *dy, float *dx, int accumulate,
                              float *dw, float *db, void *ws);

/* One line on how d runs with activations of type t, e.g. "bf16: cuBLAS
 * GEMMs fwd, data, filter, compute 32F, ws 4.08 MiB" (conv_describe). */
void kfac__fc_describe(const kfac_cuda *cu, kfac_dtype t, const kfac_conv_desc *d, char *buf,
                       size_t len);

#endif
