/* fc_cublas.c - fully connected layers of the CUDA backend as cuBLAS GEMMs
 * (cublasGemmEx on the backend's handle, bound to its stream).  With 1x1
 * images and a 1x1 kernel, stride 1, pad 0, the NHWC activations and the
 * KRSC weights are row-major matrices and the layer is
 *     y  (n x k) = x (n x c) W^T + bias        W: (k x c)
 *     dx (n x c) = dy (n x k) W   (+ dx when accumulating)
 *     dW (k x c) = dy^T x,   db (k) = column sums of dy.
 * cuBLAS is column-major: a row-major r x s matrix (leading dimension s) is
 * the column-major s x r matrix with the same leading dimension, i.e. its
 * transpose, so each product is computed transposed (gemm_* below).
 *
 * Precision (kfac_backend.h), as the cuDNN path of conv_cudnn.c:
 *  - float32: float products and sums (CUBLAS_COMPUTE_32F), or TF32 tensor
 *    cores (CUBLAS_COMPUTE_32F_FAST_TF32) when cu->allow_tf32 is on, the
 *    switch that lets cuDNN convolutions use them.  Either way the handle's
 *    math mode must stay CUBLAS_DEFAULT_MATH (cuda_backend.h).
 *  - bf16 / fp16: the float32 weights are rounded to act_dtype into the
 *    workspace (kfac_k_convert, as conv_cudnn.c does for cuDNN); 16-bit
 *    inputs, float accumulation (CUBLAS_COMPUTE_32F).  y and dx are rounded
 *    once, from float (dx += ... included: cuBLAS reads the 16-bit dx and
 *    adds in float); dW is written as float32 by the GEMM itself (16-bit
 *    inputs, CUDA_R_32F output), not rounded to 16 bits and widened as the
 *    cuDNN path must.  With a bias the product goes to a float32 copy of y
 *    in the workspace, the bias is added there and the sum rounded once into
 *    y; the cuDNN path rounds the product, then the biased sum (two
 *    roundings).
 *  - the bias and its gradient use kernels/bias.cu, as the cuDNN path: db
 *    is summed in double in a fixed order.
 *
 * Workspace (16-bit only; each piece 256-byte aligned from the start):
 *     [ W in act_dtype (k x c) | y in float32 (n x k) ]
 *
 * Graphs: nothing here allocates or synchronises.  alpha and beta are host
 * scalars (pointer mode host: their values are captured), the weight copy
 * and the float32 output live in the caller's workspace, and cuBLAS's own
 * scratch is the buffer backend_cuda.c gives the handle (cublasSetWorkspace),
 * so a captured GEMM holds no allocation nodes.  cuBLAS GEMMs on one stream
 * with a fixed workspace give the same bits on every run. */
#include <stdio.h>

#include "cuda/fc_cublas.h"

#define WS_ALIGN ((size_t)256)

static size_t align_up(size_t bytes) { return (bytes + WS_ALIGN - 1) / WS_ALIGN * WS_ALIGN; }

int kfac__fc_is_gemm(const kfac_conv_desc *d)
{
    return d->h == 1 && d->w == 1 && d->kh == 1 && d->kw == 1 && d->stride == 1 && d->pad == 0;
}

/* ---- workspace ---- */

/* Bytes of the 16-bit weight copy; the float32 output follows it. */
static size_t w_copy_bytes(kfac_dtype t, const kfac_conv_desc *d)
{
    return align_up((size_t)d->k * d->c * kfac_dtype_size(t));
}

size_t kfac__fc_workspace(kfac_dtype t, const kfac_conv_desc *d)
{
    if (t == KFAC_F32 || d->n <= 0) return 0;
    return w_copy_bytes(t, d) + align_up((size_t)d->n * d->k * sizeof(float));
}

static float *y_f32(kfac_dtype t, const kfac_conv_desc *d, void *ws)
{
    return (float *)((char *)ws + w_copy_bytes(t, d));
}

/* ---- checks ---- */

#define GEOM_FMT "n=%d %dx%dx%d -> k=%d"
#define GEOM_ARGS(d) (d)->n, (d)->h, (d)->w, (d)->c, (d)->k

static kfac_status check_call(const kfac_cuda *cu, const kfac_conv_desc *d, const void *ws)
{
    if (d->n < 1 || d->c < 1 || d->k < 1 || d->ho != 1 || d->wo != 1)
        return KFAC_ERR(KFAC_EINVAL, "fc: bad geometry " GEOM_FMT " (output %dx%d)",
                        GEOM_ARGS(d), d->ho, d->wo);
    if (cu->act_dtype != KFAC_F32 && !ws)
        return KFAC_ERR(KFAC_EINVAL, "fc: " GEOM_FMT ": %s layers need the workspace "
                        "conv_workspace() reports (%zu bytes), got NULL", GEOM_ARGS(d),
                        kfac_dtype_name(cu->act_dtype), kfac__fc_workspace(cu->act_dtype, d));
    return KFAC_OK;
}

/* ---- the GEMMs ---- */

static cudaDataType cuda_type(kfac_dtype t)
{
    return t == KFAC_BF16 ? CUDA_R_16BF : t == KFAC_F16 ? CUDA_R_16F : CUDA_R_32F;
}

static cublasComputeType_t compute_type(const kfac_cuda *cu)
{
    return cu->act_dtype == KFAC_F32 && cu->allow_tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32
                                                       : CUBLAS_COMPUTE_32F;
}

/* Column-major C (m x n, ldc) = alpha op(A) op(B) + beta C, op(A): m x kk;
 * A and B have type a_t, C c_t; alpha and beta are floats on the host. */
static kfac_status gemm(kfac_cuda *cu, const char *what, const kfac_conv_desc *d,
                        cublasOperation_t ta, cublasOperation_t tb, int m, int n, int kk,
                        const void *a, int lda, const void *b, int ldb, float beta, void *c,
                        cudaDataType c_t, int ldc)
{
    static const float one = 1.0f;
    cudaDataType a_t = cuda_type(cu->act_dtype);
    cublasStatus_t s = cublasGemmEx(cu->cublas, ta, tb, m, n, kk, &one, a, a_t, lda, b, a_t, ldb,
                                    &beta, c, c_t, ldc, compute_type(cu), CUBLAS_GEMM_DEFAULT);
    if (s != CUBLAS_STATUS_SUCCESS)
        return KFAC_ERR(s == CUBLAS_STATUS_ALLOC_FAILED ? KFAC_ENOMEM : KFAC_EBACKEND,
                        "cuda: fc %s " GEOM_FMT " in %s: cublasGemmEx: %s", what, GEOM_ARGS(d),
                        kfac_dtype_name(cu->act_dtype), cublasGetStatusString(s));
    return KFAC_OK;
}

/* y^T (k x n, ld k) = W (col-major c x k, ld c)^T . x^T (c x n, ld c). */
static kfac_status gemm_forward(kfac_cuda *cu, const kfac_conv_desc *d, const void *x,
                                const void *w, void *y, cudaDataType y_t)
{
    return gemm(cu, "forward", d, CUBLAS_OP_T, CUBLAS_OP_N, d->k, d->n, d->c, w, d->c, x, d->c,
                0.0f, y, y_t, d->k);
}

/* dx^T (c x n, ld c) = W^T (col-major c x k, ld c) . dy^T (k x n, ld k) + beta dx^T. */
static kfac_status gemm_data(kfac_cuda *cu, const kfac_conv_desc *d, const void *w,
                             const void *dy, void *dx, int accumulate)
{
    return gemm(cu, "backward data", d, CUBLAS_OP_N, CUBLAS_OP_N, d->c, d->n, d->k, w, d->c, dy,
                d->k, accumulate ? 1.0f : 0.0f, dx, cuda_type(cu->act_dtype), d->c);
}

/* dW^T (c x k, ld c, float32) = x^T (c x n, ld c) . (dy^T (k x n, ld k))^T. */
static kfac_status gemm_filter(kfac_cuda *cu, const kfac_conv_desc *d, const void *x,
                               const void *dy, float *dw)
{
    return gemm(cu, "backward filter", d, CUBLAS_OP_N, CUBLAS_OP_T, d->c, d->k, d->n, x, d->c, dy,
                d->k, 0.0f, dw, CUDA_R_32F, d->c);
}

/* The weights in act_dtype: w itself for float32, else rounded into ws. */
static kfac_status weights(kfac_cuda *cu, const kfac_conv_desc *d, const float *w, void *ws,
                           const void **out)
{
    *out = w;
    if (cu->act_dtype == KFAC_F32) return KFAC_OK;
    KFAC_CUDA_CHECK_AS("fc (weights to 16 bits)",
                       kfac_k_convert((size_t)d->k * d->c, w, KFAC_F32, ws, cu->act_dtype,
                                      cu->stream));
    *out = ws;
    return KFAC_OK;
}

/* ---- the operations ---- */

kfac_status kfac__fc_forward(kfac_cuda *cu, const kfac_conv_desc *d, const float *x,
                             const float *w, const float *bias, float *y, void *ws)
{
    KFAC_TRY(check_call(cu, d, ws));
    const void *wt;
    KFAC_TRY(weights(cu, d, w, ws, &wt));
    size_t rows = (size_t)d->n;
    if (cu->act_dtype == KFAC_F32 || !bias) {
        KFAC_TRY(gemm_forward(cu, d, x, wt, y, cuda_type(cu->act_dtype)));
        if (bias) /* float32: y(n,k) += bias(k) */
            KFAC_CUDA_CHECK_AS("fc forward bias",
                               kfac_k_bias_forward(KFAC_F32, rows, d->k, y, bias, cu->stream));
        return KFAC_OK;
    }
    /* 16-bit with a bias: float32 product and sum, rounded once into y. */
    float *y32 = y_f32(cu->act_dtype, d, ws);
    KFAC_TRY(gemm_forward(cu, d, x, wt, y32, CUDA_R_32F));
    KFAC_CUDA_CHECK_AS("fc forward bias",
                       kfac_k_bias_forward(KFAC_F32, rows, d->k, y32, bias, cu->stream));
    KFAC_CUDA_CHECK_AS("fc forward (output to 16 bits)",
                       kfac_k_convert(rows * d->k, y32, KFAC_F32, y, cu->act_dtype, cu->stream));
    return KFAC_OK;
}

kfac_status kfac__fc_backward(kfac_cuda *cu, const kfac_conv_desc *d, const float *x,
                              const float *w, const float *dy, float *dx, int accumulate,
                              float *dw, float *db, void *ws)
{
    KFAC_TRY(check_call(cu, d, ws));
    if (dx) { /* beta 1 adds to dx, beta 0 overwrites it without reading it */
        const void *wt;
        KFAC_TRY(weights(cu, d, w, ws, &wt));
        KFAC_TRY(gemm_data(cu, d, wt, dy, dx, accumulate));
    }
    KFAC_TRY(gemm_filter(cu, d, x, dy, dw));
    if (db) /* db(k) = sum over the n rows of dy */
        KFAC_CUDA_CHECK_AS("fc backward bias",
                           kfac_k_bias_backward(cu->act_dtype, (size_t)d->n, d->k, dy, db,
                                                cu->stream));
    return KFAC_OK;
}

void kfac__fc_describe(const kfac_cuda *cu, kfac_dtype t, const kfac_conv_desc *d, char *buf,
                       size_t len)
{
    const char *compute = t == KFAC_F32 && cu->allow_tf32 ? "32F_FAST_TF32" : "32F";
    snprintf(buf, len, "%s: cuBLAS GEMMs fwd, data, filter, compute %s, ws %.2f MiB",
             kfac_dtype_name(t), compute, (double)kfac__fc_workspace(t, d) / (1 << 20));
}
