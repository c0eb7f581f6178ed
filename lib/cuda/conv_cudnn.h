/* conv_cudnn.h - internal: the CUDA backend's convolutions, through cuDNN's
 * convolution API (see conv_cudnn.c for the algorithm policy).  The
 * functions implement the conv_* entries of kfac_backend.h on the state of
 * cuda_backend.h; backend_cuda.c calls them.
 *
 * Each geometry (the whole kfac_conv_desc) gets a plan: cuDNN descriptors
 * and one algorithm per direction, chosen once.  kfac__cudnn_conv_workspace
 * makes the plan and reports the scratch bytes the plan needs; later calls
 * with that geometry, or with the same one and a smaller batch (the model's
 * partial batches), run in a workspace of that size.  Plans carry the
 * backend's act_dtype (kfac_cuda.act_dtype) when they are made and live
 * until kfac__cudnn_conv_free.  Not thread-safe, like the backend itself.
 *
 * Fully connected geometries (kfac__fc_is_gemm: 1x1 images and kernel,
 * stride 1, pad 0) get no cuDNN plan: these functions hand them to
 * fc_cublas.c (cuBLAS GEMMs) and keep only a record of them, which
 * kfac__cudnn_conv_plans counts; their workspace is kfac__fc_workspace. */
#ifndef KFAC_CONV_CUDNN_H
#define KFAC_CONV_CUDNN_H

#include "cuda/cuda_backend.h"

/* Bytes of workspace for d: cuDNN's scratch, and with a 16-bit act_dtype
 * room for 16-bit copies of w and dw (0 also when no plan could be made:
 * the next conv call with d then returns the reason).  With a 16-bit
 * act_dtype every conv call needs this workspace (that of a larger batch
 * of the same geometry serves), so call this before them. */
size_t kfac__cudnn_conv_workspace(kfac_cuda *cu, const kfac_conv_desc *d);

kfac_status kfac__cudnn_conv_forward(kfac_cuda *cu, const kfac_conv_desc *d, const float *x,
                                     const float *w, const float *bias, float *y, void *ws);

kfac_status kfac__cudnn_conv_backward(kfac_cuda *cu, const kfac_conv_desc *d, const float *x,
                                      const float *w, const float *dy, float *dx, int accumulate,
                                      float *dw, float *db, void *ws);

/* Writes the type and algorithms chosen for d (a plan is made if needed)
 * as one line, e.g. "bf16: fwd IMPLICIT_PRECOMP_GEMM tensor-op, data ALGO_1
 * tensor-op, filter ALGO_1 tensor-op, ws 1.20 MiB", for tests and logs. */
kfac_status kfac__cudnn_conv_describe(kfac_cuda *cu, const kfac_conv_desc *d, char *buf,
                                      size_t len);

/* How many plans exist (set_precision refuses once there is one). */
int kfac__cudnn_conv_plans(const kfac_cuda *cu);

/* Destroys every plan's descriptors (before cudnnDestroy). */
void kfac__cudnn_conv_free(kfac_cuda *cu);

#endif
