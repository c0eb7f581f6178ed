/* cuda_backend.h - internal: the CUDA backend's state and its error checks.
 * Operations run in order on one non-blocking stream; only upload, download,
 * softmax_xent and scale_grads (whose results are host values) wait for it.
 * cuBLAS and cuDNN are bound to that stream.  upload_async copies on a
 * second stream, ordered against the first by two events.
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
    kfac_cuda_block *blocks;         /* live cuda_alloc blocks (model arena, cuDNN */
    int nblocks, cap_blocks;         /* workspace, parameters, optimizer state) */
    size_t bytes_held, bytes_peak;   /* blocks + scratch + results; peak_bytes */
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

#endif
