/* backend_cuda.c - the CUDA backend table: device memory, one stream, a
 * cuBLAS, a cuSOLVER and a cuDNN handle, the kernels of kernels/ for every
 * operation but convolutions, which conv_cudnn.c runs through cuDNN, and
 * K-FAC's stages, which kfac_cuda.c implements.  All array
 * arguments are device pointers, labels of softmax_xent included.
 * Activations are stored in be->act_dtype (float32, bf16 or fp16, chosen
 * by set_precision before any convolution is planned), which every
 * activation launcher receives. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/conv_cudnn.h"
#include "cuda/cuda_backend.h"

/* Launches one kernels.h launcher on the backend's stream. */
#define LAUNCH(be, op, ...)                                                          \
    do {                                                                             \
        KFAC_CUDA_CHECK_AS(#op, kfac_k_##op(__VA_ARGS__, kfac__cuda(be)->stream));   \
        return KFAC_OK;                                                              \
    } while (0)

/* Device bytes held: `freed` bytes given back, then `taken` allocated. */
static void count_bytes(kfac_cuda *cu, size_t taken, size_t freed)
{
    cu->bytes_held = cu->bytes_held - freed + taken;
    if (cu->bytes_held > cu->bytes_peak) cu->bytes_peak = cu->bytes_held;
}

/* Grows the scratch buffer.  The old one is kept, not freed: queued work
 * and captured graphs (which hold its address) may still use it.  Growth
 * is rare (the largest batch-norm layer or loss batch seen so far). */
static kfac_status ensure_scratch(kfac_cuda *cu, size_t bytes)
{
    if (bytes <= cu->scratch_bytes) return KFAC_OK;
    if (cu->scratch) {
        void **r = realloc(cu->retired, (size_t)(cu->nretired + 1) * sizeof *r);
        if (!r) return KFAC_ERR(KFAC_ENOMEM, "cuda: cannot grow the list of scratch buffers");
        cu->retired = r;
        cu->retired[cu->nretired++] = cu->scratch;
    }
    cu->scratch = NULL;
    cu->scratch_bytes = 0;
    size_t round = (size_t)1 << 20;
    bytes = (bytes + round - 1) / round * round;
    KFAC_CUDA_CHECK_AS("scratch allocation", cudaMalloc(&cu->scratch, bytes));
    cu->scratch_bytes = bytes;
    count_bytes(cu, bytes, 0);
    return KFAC_OK;
}

/* ---- memory ---- */

/* cudaFree does not say how many bytes it gave back, so each block's size
 * is kept here (a model makes a handful of blocks: the search is short). */
static kfac_status remember_block(kfac_cuda *cu, void *ptr, size_t bytes)
{
    if (cu->nblocks == cu->cap_blocks) {
        int cap = cu->cap_blocks ? 2 * cu->cap_blocks : 16;
        kfac_cuda_block *b = realloc(cu->blocks, (size_t)cap * sizeof *b);
        if (!b) return KFAC_ERR(KFAC_ENOMEM, "cuda: cannot grow the table of device blocks");
        cu->blocks = b;
        cu->cap_blocks = cap;
    }
    cu->blocks[cu->nblocks++] = (kfac_cuda_block){ptr, bytes};
    count_bytes(cu, bytes, 0);
    return KFAC_OK;
}

static void forget_block(kfac_cuda *cu, void *ptr)
{
    for (int i = cu->nblocks - 1; i >= 0; i--)
        if (cu->blocks[i].ptr == ptr) {
            count_bytes(cu, 0, cu->blocks[i].bytes);
            cu->blocks[i] = cu->blocks[--cu->nblocks];
            return;
        }
}

static kfac_status cuda_alloc(kfac_backend *be, size_t bytes, void **ptr)
{
    *ptr = NULL;
    cudaError_t e = cudaMalloc(ptr, bytes ? bytes : 1);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        *ptr = NULL;
        size_t free_b = 0, total_b = 0;
        if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) (void)cudaGetLastError();
        return KFAC_ERR(kfac__cuda_status(e),
                        "cuda: cannot allocate %zu bytes of device memory (%zu of %zu MiB free): %s",
                        bytes, free_b >> 20, total_b >> 20, cudaGetErrorString(e));
    }
    kfac_status st = remember_block(kfac__cuda(be), *ptr, bytes ? bytes : 1);
    if (st != KFAC_OK) {
        cudaFree(*ptr);
        *ptr = NULL;
    }
    return st;
}

static void cuda_release(kfac_backend *be, void *ptr)
{
    if (!ptr) return;
    forget_block(kfac__cuda(be), ptr);
    if (cudaFree(ptr) != cudaSuccess) (void)cudaGetLastError();
}

/* Pinned and portable (any context may copy from it); NULL on failure. */
static void *cuda_host_alloc(kfac_backend *be, size_t bytes)
{
    (void)be;
    void *ptr = NULL;
    if (cudaHostAlloc(&ptr, bytes ? bytes : 1, cudaHostAllocPortable) != cudaSuccess) {
        (void)cudaGetLastError();
        return NULL;
    }
    return ptr;
}

static void cuda_host_release(kfac_backend *be, void *ptr)
{
    (void)be;
    if (ptr && cudaFreeHost(ptr) != cudaSuccess) (void)cudaGetLastError();
}

static size_t cuda_peak_bytes(const kfac_backend *be)
{
    return ((const kfac_cuda *)be->impl)->bytes_peak;
}

static kfac_status cuda_upload(kfac_backend *be, void *dst, const void *src, size_t bytes)
{
    kfac_cuda *cu = kfac__cuda(be);
    if (bytes == 0) return KFAC_OK;
    KFAC_CUDA_CHECK_AS("upload",
                       cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, cu->stream));
    KFAC_CUDA_CHECK_AS("upload (synchronize)", cudaStreamSynchronize(cu->stream));
    return KFAC_OK;
}

static kfac_status cuda_download(kfac_backend *be, void *dst, const void *src, size_t bytes)
{
    kfac_cuda *cu = kfac__cuda(be);
    if (bytes == 0) return KFAC_OK;
    KFAC_CUDA_CHECK_AS("download",
                       cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, cu->stream));
    KFAC_CUDA_CHECK_AS("download (synchronize)", cudaStreamSynchronize(cu->stream));
    return KFAC_OK;
}

static kfac_status cuda_upload_async(kfac_backend *be, void *dst, const void *src, size_t bytes)
{
    kfac_cuda *cu = kfac__cuda(be);
    if (bytes == 0) return KFAC_OK;
    /* After the work queued so far, which may still read dst. */
    KFAC_CUDA_CHECK_AS("upload_async (order)", cudaEventRecord(cu->queued_mark, cu->stream));
    KFAC_CUDA_CHECK_AS("upload_async (order)",
                       cudaStreamWaitEvent(cu->copy_stream, cu->queued_mark, 0));
    KFAC_CUDA_CHECK_AS("upload_async", cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice,
                                                       cu->copy_stream));
    KFAC_CUDA_CHECK_AS("upload_async (done)", cudaEventRecord(cu->uploads_done, cu->copy_stream));
    return KFAC_OK;
}

/* Waiting on an event never recorded returns at once: no upload, no wait. */
static kfac_status cuda_upload_join(kfac_backend *be)
{
    kfac_cuda *cu = kfac__cuda(be);
    KFAC_CUDA_CHECK_AS("upload_join", cudaStreamWaitEvent(cu->stream, cu->uploads_done, 0));
    return KFAC_OK;
}

static kfac_status cuda_upload_wait(kfac_backend *be)
{
    KFAC_CUDA_CHECK_AS("upload_wait", cudaEventSynchronize(kfac__cuda(be)->uploads_done));
    return KFAC_OK;
}

static kfac_status cuda_fill(kfac_backend *be, float *x, float value, size_t n)
{
    LAUNCH(be, fill, n, x, value);
}

/* ---- precision ---- */

static int known_dtype(kfac_dtype t) { return t == KFAC_F32 || t == KFAC_BF16 || t == KFAC_F16; }

/* cuDNN plans carry the type in their descriptors and the model sized its
 * buffers and workspace by it: the type is fixed once a plan exists. */
static kfac_status cuda_set_precision(kfac_backend *be, kfac_dtype t)
{
    kfac_cuda *cu = kfac__cuda(be);
    if (!known_dtype(t)) return KFAC_ERR(KFAC_EINVAL, "cuda: unknown precision %d", (int)t);
    if (t == be->act_dtype) return KFAC_OK;
    if (kfac__cudnn_conv_plans(cu) > 0)
        return KFAC_ERR(KFAC_EINVAL, "cuda: cannot switch activations from %s to %s after "
                        "convolutions were planned for %s (set the precision before building "
                        "a model)", kfac_dtype_name(be->act_dtype), kfac_dtype_name(t),
                        kfac_dtype_name(be->act_dtype));
    kfac__cudnn_conv_free(cu); /* an empty cache, if any */
    be->act_dtype = t;
    cu->act_dtype = t;
    return KFAC_OK;
}

/* Like the type, the math of cuDNN plans is fixed once one exists. */
static kfac_status cuda_set_tf32(kfac_backend *be, int on)
{
    kfac_cuda *cu = kfac__cuda(be);
    on = on != 0;
    if (on == cu->allow_tf32) return KFAC_OK;
    if (kfac__cudnn_conv_plans(cu) > 0)
        return KFAC_ERR(KFAC_EINVAL, "cuda: cannot turn TF32 %s after convolutions were "
                        "planned (set it before building a model)", on ? "on" : "off");
    cu->allow_tf32 = on;
    return KFAC_OK;
}

static kfac_status cuda_convert(kfac_backend *be, size_t n, const void *src, kfac_dtype src_t,
                                void *dst, kfac_dtype dst_t)
{
    if (!known_dtype(src_t) || !known_dtype(dst_t))
        return KFAC_ERR(KFAC_EINVAL, "cuda: convert from type %d to type %d", (int)src_t,
                        (int)dst_t);
    LAUNCH(be, convert, n, src, src_t, dst, dst_t);
}

static kfac_status cuda_scale_grads(kfac_backend *be, size_t n, float *g, float scale,
                                    int *finite)
{
    kfac_cuda *cu = kfac__cuda(be);
    int bad = 1;
    KFAC_CUDA_CHECK_AS("scale_grads", kfac_k_scale_grads(n, g, scale, cu->nonfinite, cu->stream));
    KFAC_CUDA_CHECK_AS("scale_grads (result)",
                       cudaMemcpyAsync(&bad, cu->nonfinite, sizeof bad, cudaMemcpyDeviceToHost,
                                       cu->stream));
    KFAC_CUDA_CHECK_AS("scale_grads (synchronize)", cudaStreamSynchronize(cu->stream));
    *finite = !bad;
    return KFAC_OK;
}

/* ---- convolution (conv_cudnn.c) ---- */

static size_t cuda_conv_workspace(const kfac_backend *be, const kfac_conv_desc *d)
{
    return kfac__cudnn_conv_workspace((kfac_cuda *)be->impl, d);
}

static kfac_status cuda_conv_forward(kfac_backend *be, const kfac_conv_desc *d, const float *x,
                                     const float *w, const float *bias, float *y, void *ws)
{
    return kfac__cudnn_conv_forward(kfac__cuda(be), d, x, w, bias, y, ws);
}

static kfac_status cuda_conv_backward(kfac_backend *be, const kfac_conv_desc *d, const float *x,
                                      const float *w, const float *dy, float *dx, int accumulate,
                                      float *dw, float *db, void *ws)
{
    return kfac__cudnn_conv_backward(kfac__cuda(be), d, x, w, dy, dx, accumulate, dw, db, ws);
}

/* ---- batch norm ---- */

static kfac_status cuda_bn_forward_train(kfac_backend *be, size_t m, int c, const float *x,
                                         const float *gamma, const float *beta, float *y,
                                         float *save_mean, float *save_invstd, float *run_mean,
                                         float *run_var, float momentum, float eps, int relu)
{
    kfac_cuda *cu = kfac__cuda(be);
    if (c < 0) return KFAC_ERR(KFAC_EINVAL, "batch norm: %d channels", c);
    KFAC_TRY(ensure_scratch(cu, kfac_k_bn_scratch_bytes(m, c)));
    LAUNCH(be, bn_forward_train, be->act_dtype, m, c, x, gamma, beta, y, save_mean, save_invstd,
           run_mean, run_var, momentum, eps, relu, cu->scratch);
}

static kfac_status cuda_bn_forward_eval(kfac_backend *be, size_t m, int c, const float *x,
                                        const float *gamma, const float *beta, float *y,
                                        const float *run_mean, const float *run_var, float eps,
                                        int relu)
{
    LAUNCH(be, bn_forward_eval, be->act_dtype, m, c, x, gamma, beta, y, run_mean, run_var, eps,
           relu);
}

static kfac_status cuda_bn_backward(kfac_backend *be, size_t m, int c, const float *x,
                                    const float *y, const float *dy, const float *gamma,
                                    const float *save_mean, const float *save_invstd, float *dx,
                                    int accumulate, float *dgamma, float *dbeta, int relu)
{
    kfac_cuda *cu = kfac__cuda(be);
    if (c < 0) return KFAC_ERR(KFAC_EINVAL, "batch norm: %d channels", c);
    KFAC_TRY(ensure_scratch(cu, kfac_k_bn_scratch_bytes(m, c)));
    LAUNCH(be, bn_backward, be->act_dtype, m, c, x, y, dy, gamma, save_mean, save_invstd, dx,
           accumulate, dgamma, dbeta, relu, cu->scratch);
}

/* ---- element-wise ---- */

static kfac_status cuda_relu_forward(kfac_backend *be, size_t n, const float *x, float *y)
{
    LAUNCH(be, relu_forward, be->act_dtype, n, x, y);
}

static kfac_status cuda_relu_backward(kfac_backend *be, size_t n, const float *y, const float *dy,
                                      float *dx, int accumulate)
{
    LAUNCH(be, relu_backward, be->act_dtype, n, y, dy, dx, accumulate);
}

static kfac_status cuda_add_forward(kfac_backend *be, size_t n, const float *a, const float *b,
                                    float *y, int relu)
{
    LAUNCH(be, add_forward, be->act_dtype, n, a, b, y, relu);
}

static kfac_status cuda_add_backward(kfac_backend *be, size_t n, const float *y, const float *dy,
                                     float *da, int acc_a, float *db, int acc_b, int relu)
{
    LAUNCH(be, add_backward, be->act_dtype, n, y, dy, da, acc_a, db, acc_b, relu);
}

static kfac_status cuda_sgd_update(kfac_backend *be, size_t n, float *p, const float *g, float *v,
                                   float lr, float mom, float wd, int nesterov)
{
    LAUNCH(be, sgd_update, n, p, g, v, lr, mom, wd, nesterov);
}

/* ---- pooling ---- */

static kfac_status cuda_maxpool_forward(kfac_backend *be, const kfac_pool_desc *d, const float *x,
                                        float *y)
{
    LAUNCH(be, maxpool_forward, be->act_dtype, d->n, d->h, d->w, d->c, d->kh, d->kw, d->stride,
           d->pad, d->ho, d->wo, x, y);
}

static kfac_status cuda_maxpool_backward(kfac_backend *be, const kfac_pool_desc *d,
                                         const float *x, const float *y, const float *dy,
                                         float *dx, int accumulate)
{
    LAUNCH(be, maxpool_backward, be->act_dtype, d->n, d->h, d->w, d->c, d->kh, d->kw, d->stride,
           d->pad, d->ho, d->wo, x, y, dy, dx, accumulate);
}

static kfac_status cuda_gap_forward(kfac_backend *be, int n, int hw, int c, const float *x,
                                    float *y)
{
    LAUNCH(be, gap_forward, be->act_dtype, n, hw, c, x, y);
}

static kfac_status cuda_gap_backward(kfac_backend *be, int n, int hw, int c, const float *dy,
                                     float *dx, int accumulate)
{
    LAUNCH(be, gap_backward, be->act_dtype, n, hw, c, dy, dx, accumulate);
}

/* ---- loss ---- */

/* The result of the last softmax_xent of (n, classes, labels), once the
 * device has it. */
static kfac_status read_xent(kfac_cuda *cu, int n, int classes, const int32_t *labels,
                             double *loss_sum, int *correct)
{
    kfac_k_xent_result r;
    KFAC_CUDA_CHECK_AS("softmax_xent (result)",
                       cudaMemcpyAsync(&r, cu->xent_result, sizeof r, cudaMemcpyDeviceToHost,
                                       cu->stream));
    KFAC_CUDA_CHECK_AS("softmax_xent (synchronize)", cudaStreamSynchronize(cu->stream));
    if (r.bad_row < n) {
        int32_t label = 0;
        KFAC_CUDA_CHECK_AS("softmax_xent (bad label)",
                           cudaMemcpy(&label, labels + r.bad_row, sizeof label,
                                      cudaMemcpyDeviceToHost));
        return KFAC_ERR(KFAC_EINVAL, "label %d of sample %d outside [0, %d)", (int)label,
                        r.bad_row, classes);
    }
    *loss_sum = r.loss_sum;
    *correct = r.correct;
    return KFAC_OK;
}

static kfac_status cuda_softmax_xent(kfac_backend *be, int n, int classes, const float *logits,
                                     const int32_t *labels, float smoothing, float grad_scale,
                                     float *dlogits, double *loss_sum, int *correct)
{
    kfac_cuda *cu = kfac__cuda(be);
    KFAC_TRY(ensure_scratch(cu, kfac_k_xent_scratch_bytes(n)));
    KFAC_CUDA_CHECK_AS("softmax_xent",
                       kfac_k_softmax_xent(be->act_dtype, n, classes, logits, labels, smoothing,
                                           grad_scale, dlogits, cu->xent_result, cu->scratch,
                                           cu->stream));
    if (!loss_sum || !correct) return KFAC_OK; /* xent_result reads it later */
    return read_xent(cu, n, classes, labels, loss_sum, correct);
}

static kfac_status cuda_xent_result(kfac_backend *be, int n, int classes, const int32_t *labels,
                                    double *loss_sum, int *correct)
{
    return read_xent(kfac__cuda(be), n, classes, labels, loss_sum, correct);
}

/* ---- graphs ---- */

/* Thread-local mode: only this thread's calls that would break the capture
 * (a synchronisation, an allocation) fail; the loader's threads make none. */
static kfac_status cuda_capture_begin(kfac_backend *be)
{
    KFAC_CUDA_CHECK_AS("capture_begin",
                       cudaStreamBeginCapture(kfac__cuda(be)->stream,
                                              cudaStreamCaptureModeThreadLocal));
    return KFAC_OK;
}

static kfac_status cuda_capture_end(kfac_backend *be, void **graph)
{
    cudaGraph_t g = NULL;
    cudaGraphExec_t exec = NULL;
    *graph = NULL;
    /* Ends the capture even after an operation inside it failed. */
    cudaError_t e = cudaStreamEndCapture(kfac__cuda(be)->stream, &g);
    if (e == cudaSuccess) e = cudaGraphInstantiate(&exec, g, 0);
    if (g) cudaGraphDestroy(g);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return KFAC_ERR(kfac__cuda_status(e), "cuda: graph capture: %s (%s)",
                        cudaGetErrorString(e), cudaGetErrorName(e));
    }
    *graph = exec;
    return KFAC_OK;
}

static kfac_status cuda_graph_launch(kfac_backend *be, void *graph)
{
    KFAC_CUDA_CHECK_AS("graph_launch",
                       cudaGraphLaunch((cudaGraphExec_t)graph, kfac__cuda(be)->stream));
    return KFAC_OK;
}

static void cuda_graph_free(kfac_backend *be, void *graph)
{
    (void)be;
    if (graph && cudaGraphExecDestroy((cudaGraphExec_t)graph) != cudaSuccess)
        (void)cudaGetLastError();
}

/* ---- life cycle ---- */

static void cuda_destroy(kfac_backend *be)
{
    kfac_cuda *cu = kfac__cuda(be);
    if (cu && (cu->stream || cu->copy_stream || cu->cublas || cu->cudnn || cu->xent_result ||
               cu->nonfinite)) {
        cudaSetDevice(cu->device);
        if (cu->stream) cudaStreamSynchronize(cu->stream);
        if (cu->copy_stream) cudaStreamSynchronize(cu->copy_stream);
        if (cu->queued_mark) cudaEventDestroy(cu->queued_mark);
        if (cu->uploads_done) cudaEventDestroy(cu->uploads_done);
        if (cu->copy_stream) cudaStreamDestroy(cu->copy_stream);
        cudaFree(cu->scratch);
        for (int i = 0; i < cu->nretired; i++) cudaFree(cu->retired[i]);
        cudaFree(cu->xent_result);
        cudaFree(cu->nonfinite);
        cudaFree(cu->reduce);
        if (cu->cusolver) cusolverDnDestroy(cu->cusolver);
        kfac__cudnn_conv_free(cu); /* descriptors before their handle */
        if (cu->cudnn) cudnnDestroy(cu->cudnn);
        if (cu->cublas) cublasDestroy(cu->cublas);
        cudaFree(cu->cublas_ws);
        if (cu->stream) cudaStreamDestroy(cu->stream);
        (void)cudaGetLastError();
    }
    if (cu) {
        free(cu->blocks);
        free(cu->retired);
    }
    free(cu);
    free(be);
}

/* The cuBLAS handle, bound to the backend's stream, in a workspace of its
 * own (cuda_backend.h) of the size cuBLAS recommends: 32 MiB from Hopper
 * (compute capability 9) on, 4 MiB before. */
static kfac_status cublas_setup(kfac_cuda *cu, int cc_major)
{
    size_t bytes = (size_t)(cc_major >= 9 ? 32 : 4) << 20;
    KFAC_CUBLAS_CHECK(cublasCreate(&cu->cublas));
    KFAC_CUBLAS_CHECK(cublasSetStream(cu->cublas, cu->stream));
    KFAC_CUDA_CHECK_AS("cuBLAS workspace allocation", cudaMalloc(&cu->cublas_ws, bytes));
    count_bytes(cu, bytes, 0);
    KFAC_CUBLAS_CHECK(cublasSetWorkspace(cu->cublas, cu->cublas_ws, bytes));
    return KFAC_OK;
}

/* The cuDNN handle, bound to the backend's stream, and its options. */
static kfac_status cudnn_setup(kfac_cuda *cu)
{
    /* Same major version as the headers: the legacy API is stable within one.
     * EBACKEND, not ENOTSUP: a broken install must not read as "no CUDA". */
    size_t version = cudnnGetVersion();
    if (version / 10000 != CUDNN_MAJOR)
        return KFAC_ERR(KFAC_EBACKEND, "cudnn: library version %zu loaded, built against %d.%d.%d",
                        version, CUDNN_MAJOR, CUDNN_MINOR, CUDNN_PATCHLEVEL);
    cudnnStatus_t ds = cudnnCreate(&cu->cudnn);
    if (ds != CUDNN_STATUS_SUCCESS)
        return KFAC_ERR(KFAC_EBACKEND, "cudnn: cannot create a handle (library %zu): %s; are all "
                        "libcudnn*.so.9 of one version on LD_LIBRARY_PATH?", version,
                        cudnnGetErrorString(ds));
    KFAC_CUDNN_CHECK(cudnnSetStream(cu->cudnn, cu->stream));
    const char *tf32 = getenv("KFAC_CUDNN_TF32");
    cu->allow_tf32 = tf32 && strcmp(tf32, "1") == 0;
    const char *det = getenv("KFAC_CUDNN_DETERMINISTIC");
    cu->deterministic = !(det && strcmp(det, "0") == 0);
    const char *search = getenv("KFAC_CUDNN_SEARCH"), *verbose = getenv("KFAC_CUDNN_VERBOSE");
    cu->search = search && strcmp(search, "1") == 0;
    cu->verbose = verbose && strcmp(verbose, "1") == 0;
    return KFAC_OK;
}

static kfac_status cuda_setup(kfac_cuda *cu, int device)
{
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return KFAC_ERR(KFAC_ENODEV, "cuda: no GPU visible (cudaGetDeviceCount: %s)",
                        cudaGetErrorString(e));
    }
    if (count == 0)
        return KFAC_ERR(KFAC_ENODEV, "cuda: no GPU visible (cudaGetDeviceCount: 0 devices)");
    if (device < 0 || device >= count)
        return KFAC_ERR(KFAC_ENODEV, "cuda: device %d requested, %d visible", device, count);
    cu->device = device;
    KFAC_CUDA_CHECK(cudaSetDevice(device));
    struct cudaDeviceProp prop;
    KFAC_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    snprintf(cu->device_name, sizeof cu->device_name, "%s", prop.name);
    e = kfac_k_probe();
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return KFAC_ERR(KFAC_EBACKEND, "cuda: %s is sm_%d%d, but this build's kernels are for "
                        "CMAKE_CUDA_ARCHITECTURES \"%s\" (%s): rebuild with "
                        "-DCMAKE_CUDA_ARCHITECTURES=%d%d", prop.name, prop.major, prop.minor,
                        KFAC_CUDA_ARCHITECTURES, cudaGetErrorString(e), prop.major, prop.minor);
    }
    KFAC_CUDA_CHECK(cudaStreamCreateWithFlags(&cu->stream, cudaStreamNonBlocking));
    KFAC_CUDA_CHECK(cudaStreamCreateWithFlags(&cu->copy_stream, cudaStreamNonBlocking));
    KFAC_CUDA_CHECK(cudaEventCreateWithFlags(&cu->queued_mark, cudaEventDisableTiming));
    KFAC_CUDA_CHECK(cudaEventCreateWithFlags(&cu->uploads_done, cudaEventDisableTiming));
    KFAC_TRY(cublas_setup(cu, prop.major));
    KFAC_TRY(cudnn_setup(cu));
    KFAC_CUDA_CHECK(cudaMalloc((void **)&cu->xent_result, sizeof *cu->xent_result));
    count_bytes(cu, sizeof *cu->xent_result, 0);
    KFAC_CUDA_CHECK(cudaMalloc((void **)&cu->nonfinite, sizeof *cu->nonfinite));
    count_bytes(cu, sizeof *cu->nonfinite, 0);
    KFAC_CUSOLVER_CHECK(cusolverDnCreate(&cu->cusolver));
    KFAC_CUSOLVER_CHECK(cusolverDnSetStream(cu->cusolver, cu->stream));
    KFAC_CUDA_CHECK(cudaMalloc((void **)&cu->reduce, KFAC_K_REDUCE_DOUBLES * sizeof(double)));
    count_bytes(cu, KFAC_K_REDUCE_DOUBLES * sizeof(double), 0);
    return KFAC_OK;
}

kfac_status kfac_backend_cuda_init(int device, kfac_backend **out)
{
    *out = NULL;
    kfac_backend *be = calloc(1, sizeof *be);
    kfac_cuda *cu = calloc(1, sizeof *cu);
    if (!be || !cu) {
        free(be);
        free(cu);
        return KFAC_ERR(KFAC_ENOMEM, "cannot allocate the CUDA backend");
    }
    be->impl = cu;
    kfac_status st = cuda_setup(cu, device);
    if (st != KFAC_OK) {
        cuda_destroy(be); /* keeps the message: destroy records no error */
        return st;
    }
    be->name = "cuda";
    be->threads = 1;
    be->act_dtype = KFAC_F32;
    cu->act_dtype = KFAC_F32;
    be->set_precision = cuda_set_precision;
    be->set_tf32 = cuda_set_tf32;
    be->convert = cuda_convert;
    be->alloc = cuda_alloc;
    be->release = cuda_release;
    be->peak_bytes = cuda_peak_bytes;
    be->host_alloc = cuda_host_alloc;
    be->host_release = cuda_host_release;
    be->upload = cuda_upload;
    be->download = cuda_download;
    be->upload_async = cuda_upload_async;
    be->upload_join = cuda_upload_join;
    be->upload_wait = cuda_upload_wait;
    be->fill = cuda_fill;
    be->conv_workspace = cuda_conv_workspace;
    be->conv_forward = cuda_conv_forward;
    be->conv_backward = cuda_conv_backward;
    be->bn_forward_train = cuda_bn_forward_train;
    be->bn_forward_eval = cuda_bn_forward_eval;
    be->bn_backward = cuda_bn_backward;
    be->relu_forward = cuda_relu_forward;
    be->relu_backward = cuda_relu_backward;
    be->add_forward = cuda_add_forward;
    be->add_backward = cuda_add_backward;
    be->maxpool_forward = cuda_maxpool_forward;
    be->maxpool_backward = cuda_maxpool_backward;
    be->gap_forward = cuda_gap_forward;
    be->gap_backward = cuda_gap_backward;
    be->softmax_xent = cuda_softmax_xent;
    be->xent_result = cuda_xent_result;
    be->capture_begin = cuda_capture_begin;
    be->capture_end = cuda_capture_end;
    be->graph_launch = cuda_graph_launch;
    be->graph_free = cuda_graph_free;
    be->scale_grads = cuda_scale_grads;
    be->sgd_update = cuda_sgd_update;
    be->gram_patches_workspace = kfac__cuda_gram_patches_workspace;
    be->gram_patches = kfac__cuda_gram_patches;
    be->gram_rows_workspace = kfac__cuda_gram_rows_workspace;
    be->gram_rows = kfac__cuda_gram_rows;
    be->bn_fisher = kfac__cuda_bn_fisher;
    be->axpby = kfac__cuda_axpby;
    be->copy2d = kfac__cuda_copy2d;
    be->dot = kfac__cuda_dot;
    be->packed_trace = kfac__cuda_packed_trace;
    be->factor_change = kfac__cuda_factor_change;
    be->inverse_workspace = kfac__cuda_inverse_workspace;
    be->inverse_cholesky = kfac__cuda_inverse_cholesky;
    be->eigh = kfac__cuda_eigh;
    be->inverse_from_eig = kfac__cuda_inverse_from_eig;
    be->precondition = kfac__cuda_precondition;
    be->precondition_eig_exact = kfac__cuda_precondition_eig_exact;
    be->bn_precondition = kfac__cuda_bn_precondition;
    be->destroy = cuda_destroy;
    *out = be;
    return KFAC_OK;
}
