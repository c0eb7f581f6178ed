/* cuda_backend.h - internal: the CUDA backend's state and its error check.
 * Operations run in order on one non-blocking stream; only upload, download
 * and softmax_xent (whose results are host values) wait for it. */
#ifndef KFAC_CUDA_BACKEND_H
#define KFAC_CUDA_BACKEND_H

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "kfac/kfac_backend.h"
#include "../../kernels/kernels.h"

typedef struct kfac_cuda {
    int device;
    char device_name[256];
    cudaStream_t stream;
    cublasHandle_t cublas;
    void *scratch;                   /* batch-norm and loss scratch, grown on demand */
    size_t scratch_bytes;
    kfac_k_xent_result *xent_result; /* device */
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

#endif
