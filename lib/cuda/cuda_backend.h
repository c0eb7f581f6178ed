/* cuda_backend.h - internal: the CUDA backend's state and its error checks.
 * Operations run in order on one non-blocking stream; only upload, download,
 * softmax_xent, scale_grads, dot, packed_trace and factor_change (whose
 * results are host values) and inverse_cholesky and eigh (which report a
 * failed factorisation) wait for it.  cuBLAS, cuSOLVER and cuDNN are bound
 * to that stream.  upload_async copies on a second stream, ordered against
 * the first by two events.
 *
 * The cuBLAS handle runs in a workspace of its own (cublas_ws, given with
 * cublasSetWorkspace), so that cuBLAS calls captured into CUDA graphs make
 * no allocation nodes; cublasSetStream resets it to cuBLAS's pool, so code
 * that rebinds the stream must set it again.  Pointer mode host and math
 * mode CUBLAS_DEFAULT_MATH are the handle's state between calls: code that
 * changes them restores them (fc_cublas.c passes host scalars and chooses
 * TF32 by compute type).
 *
 * Environment (read once, when the backend is created):
 *   KFAC_CUDNN_TF32=1  lets cuDNN convolutions use TF32 tensor cores (10-bit
 *                      mantissa products, ~1e-3 relative error, several
 *                      times faster), as kfac_backend_set_tf32 does (and
 *                      train.precision tf32).  Default off: convolutions are
 *                      plain fp32 FMA, so they match the CPU backend to ~1e-6.
 *   KFAC_CUDNN_DETERMINISTIC=0  takes cuDNN's best-ranked backward
 *                      algorithms even where they sum with atomics
 *                      (gradients then vary in the last bits from run to
 *                      run, as PyTorch's default).  Default 1.
 *   KFAC_CUDNN_SEARCH=1  ranks each geometry's algorithms by cuDNN's timed
 *                      search (cudnnFind*: every candidate run once, as
 *                      PyTorch's cudnn.benchmark) instead of its
 *                      heuristics.  Faster picks where the heuristics rank
 *                      badly, but timings can order near-equal algorithms
 *                      differently from run to run, so results are then
 *                      reproducible only within a run.  Default 0.
 *   KFAC_CUDNN_VERBOSE=1  prints each convolution plan to stderr when it
 *                      is made (geometry, algorithms, math, workspace). */
#ifndef KFAC_CUDA_BACKEND_H
#define KFAC_CUDA_BACKEND_H

#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <cudnn.h>
#include <cusolverDn.h>

#include "kfac/kfac_backend.h"
#include "../../kernels/kernels.h"

/* One cuda_alloc block: cudaFree does not report sizes (peak_bytes). */
typedef struct kfac_cuda_block {
    void *ptr;
    size_t bytes;
} kfac_cuda_block;

typedef struct kfac_cuda {
    int device;
    char device_name[256];
    cudaStream_t stream;
    cudaStream_t copy_stream;        /* upload_async */
    cudaEvent_t queued_mark;         /* stream's work before an upload_async */
    cudaEvent_t uploads_done;        /* the last upload_async's copy */
    cublasHandle_t cublas;
    void *cublas_ws;                 /* cuBLAS's workspace (see above) */
    cusolverDnHandle_t cusolver;     /* K-FAC's inverses (kfac_cuda.c) */
    cudnnHandle_t cudnn;
    int allow_tf32;                  /* KFAC_CUDNN_TF32: see above */
    int deterministic;               /* KFAC_CUDNN_DETERMINISTIC: see above */
    int search;                      /* KFAC_CUDNN_SEARCH: see above */
    int verbose;                     /* KFAC_CUDNN_VERBOSE: see above */
    int nondet_noted;                /* a nondeterministic fallback was reported */
    kfac_dtype act_dtype;            /* = the backend's act_dtype (set_precision sets both) */
    struct kfac_conv_cache *convs;   /* conv_cudnn.c: one plan per geometry */
    void *scratch;                   /* batch-norm and loss scratch, grown on demand */
    size_t scratch_bytes;
    void **retired;                  /* scratch buffers outgrown: graphs may hold */
    int nretired;                    /* them, so they live until destroy */
    kfac_k_xent_result *xent_result; /* device */
    int *nonfinite;                  /* device flag of scale_grads */
    double *reduce;                  /* device: KFAC_K_REDUCE_DOUBLES for dot,
                                      * packed_trace and factor_change */
    kfac_cuda_block *blocks;         /* live cuda_alloc blocks (model arena, cuDNN */
    int nblocks, cap_blocks;         /* workspace, parameters, optimizer state) */
    size_t bytes_held, bytes_peak;   /* blocks + scratch + results + cublas_ws: peak_bytes */
} kfac_cuda;

static inline kfac_cuda *kfac__cuda(kfac_backend *be) { return (kfac_cuda *)be->impl; }

static inline kfac_status kfac__cuda_status(cudaError_t e)
{
    switch (e) {
    case cudaErrorMemoryAllocation: return KFAC_ENOMEM;
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver: return KFAC_ENODEV;
    default: return KFAC_EBACKEND;
    }
}

/* Runs a CUDA runtime call (or a kernels.h launcher); on failure records
 * "cuda: <what>: <error string> (<error name>)" with this file:line and
 * RETURNS the status from the enclosing function.  A non-sticky error is
 * cleared so the next operation does not report it again. */
#define KFAC_CUDA_CHECK_AS(what, call)                                                  \
    do {                                                                                \
        cudaError_t kfac__ce = (call);                                                  \
        if (kfac__ce != cudaSuccess) {                                                  \
            (void)cudaGetLastError();                                                   \
            return KFAC_ERR(kfac__cuda_status(kfac__ce), "cuda: %s: %s (%s)", (what),   \
                            cudaGetErrorString(kfac__ce), cudaGetErrorName(kfac__ce));  \
        }                                                                               \
    } while (0)
#define KFAC_CUDA_CHECK(call) KFAC_CUDA_CHECK_AS(#call, call)

/* The same for cuBLAS calls. */
#define KFAC_CUBLAS_CHECK(call)                                                         \
    do {                                                                                \
        cublasStatus_t kfac__cs = (call);                                               \
        if (kfac__cs != CUBLAS_STATUS_SUCCESS)                                          \
            return KFAC_ERR(kfac__cs == CUBLAS_STATUS_ALLOC_FAILED ? KFAC_ENOMEM          \
                                                                   : KFAC_EBACKEND,     \
                            "cuda: %s: %s", #call, cublasGetStatusString(kfac__cs));    \
    } while (0)

/* The same for cuSOLVER calls (the library has no status strings). */
static inline const char *kfac__cusolver_status_name(cusolverStatus_t s)
{
    switch (s) {
    case CUSOLVER_STATUS_SUCCESS: return "success";
    case CUSOLVER_STATUS_NOT_INITIALIZED: return "not initialized";
    case CUSOLVER_STATUS_ALLOC_FAILED: return "allocation failed";
    case CUSOLVER_STATUS_INVALID_VALUE: return "invalid value";
    case CUSOLVER_STATUS_ARCH_MISMATCH: return "architecture mismatch";
    case CUSOLVER_STATUS_EXECUTION_FAILED: return "execution failed";
    case CUSOLVER_STATUS_INTERNAL_ERROR: return "internal error";
    case CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED: return "matrix type not supported";
    case CUSOLVER_STATUS_NOT_SUPPORTED: return "not supported";
    case CUSOLVER_STATUS_INVALID_WORKSPACE: return "invalid workspace";
    default: return "error";
    }
}

#define KFAC_CUSOLVER_CHECK(call)                                                       \
    do {                                                                                \
        cusolverStatus_t kfac__ss = (call);                                             \
        if (kfac__ss != CUSOLVER_STATUS_SUCCESS)                                        \
            return KFAC_ERR(kfac__ss == CUSOLVER_STATUS_ALLOC_FAILED ? KFAC_ENOMEM        \
                            : kfac__ss == CUSOLVER_STATUS_NOT_SUPPORTED ? KFAC_ENOTSUP    \
                                                                        : KFAC_EBACKEND,  \
                            "cuda: %s: cusolver %s (status %d)", #call,                 \
                            kfac__cusolver_status_name(kfac__ss), (int)kfac__ss);       \
    } while (0)

/* The same for cuDNN calls; adds cuDNN's own explanation of the last
 * failure (cudnnGetLastErrorString) when it has one. */
static inline kfac_status kfac__cudnn_fail(cudnnStatus_t s, const char *what, const char *file,
                                           int line)
{
    char detail[256] = "";
    cudnnGetLastErrorString(detail, sizeof detail);
    for (char *p = detail; *p; p++)
        if (*p == '\n' || *p == '\r') *p = ' ';
    kfac_status st = KFAC_EBACKEND;
    if (s == CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED ||
        s == CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED)
        st = KFAC_ENOMEM;
    else if (CUDNN_STATUS_CATEGORY(s) == CUDNN_STATUS_NOT_SUPPORTED)
        st = KFAC_ENOTSUP;
    return kfac__set_error(st, file, line, "cudnn: %s: %s%s%s", what, cudnnGetErrorString(s),
                           detail[0] ? ": " : "", detail);
}

#define KFAC_CUDNN_CHECK_AS(what, call)                                                 \
    do {                                                                                \
        cudnnStatus_t kfac__ds = (call);                                                \
        if (kfac__ds != CUDNN_STATUS_SUCCESS)                                           \
            return kfac__cudnn_fail(kfac__ds, (what), __FILE__, __LINE__);              \
    } while (0)
#define KFAC_CUDNN_CHECK(call) KFAC_CUDNN_CHECK_AS(#call, call)

/* K-FAC's stages (kfac_cuda.c): entries of the backend table (kfac_backend.h). */
size_t kfac__cuda_gram_patches_workspace(const kfac_backend *be, const kfac_conv_desc *d);
kfac_status kfac__cuda_gram_patches(kfac_backend *be, const kfac_conv_desc *d, const float *x,
                                    int append_one, float scale, float *packed, void *ws);
size_t kfac__cuda_gram_rows_workspace(const kfac_backend *be, size_t m, int n);
kfac_status kfac__cuda_gram_rows(kfac_backend *be, size_t m, int n, const float *rows,
                                 int append_one, float scale, float *packed, void *ws);
kfac_status kfac__cuda_bn_fisher(kfac_backend *be, int n, size_t per_image, int c,
                                 const float *x, const float *y, const float *dy,
                                 const float *save_mean, const float *save_invstd, int relu,
                                 float grad_scale, float *sg, float *sb, float *fisher);
kfac_status kfac__cuda_axpby(kfac_backend *be, size_t n, float alpha, const float *x, float beta,
                             float *y);
kfac_status kfac__cuda_copy2d(kfac_backend *be, size_t rows, size_t row_bytes, void *dst,
                              size_t dst_pitch, const void *src, size_t src_pitch);
kfac_status kfac__cuda_dot(kfac_backend *be, size_t n, const float *a, const float *b,
                           double *out);
kfac_status kfac__cuda_packed_trace(kfac_backend *be, int n, const float *packed, double *out);
kfac_status kfac__cuda_factor_change(kfac_backend *be, int n, const float *old_packed,
                                     const float *new_packed, double *out);
size_t kfac__cuda_inverse_workspace(const kfac_backend *be, int n);
kfac_status kfac__cuda_inverse_cholesky(kfac_backend *be, int n, const float *packed,
                                        float shift, float *inv, void *ws);
kfac_status kfac__cuda_eigh(kfac_backend *be, int n, const float *packed, float *evals,
                            float *evecs, void *ws);
kfac_status kfac__cuda_inverse_from_eig(kfac_backend *be, int n, const float *evals,
                                        const float *evecs, float shift, float *inv, void *ws);
kfac_status kfac__cuda_precondition(kfac_backend *be, int k, int d, const float *ginv,
                                    const float *ainv, const float *grad, float *out,
                                    float *tmp);
kfac_status kfac__cuda_precondition_eig_exact(kfac_backend *be, int k, int d, const float *qg,
                                              const float *dg, const float *qa, const float *da,
                                              float lambda, const float *grad, float *out,
                                              float *tmp);
kfac_status kfac__cuda_bn_precondition(kfac_backend *be, int c, const float *fisher,
                                       float lambda, int diagonal_only, const float *dgamma,
                                       const float *dbeta, float *pgamma, float *pbeta);

#endif
