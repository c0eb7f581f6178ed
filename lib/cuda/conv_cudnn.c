/* conv_cudnn.c - the CUDA backend's convolutions through cuDNN:
 * cudnnConvolutionForward (+ cudnnAddTensor for the bias),
 * cudnnConvolutionBackwardData, cudnnConvolutionBackwardFilter and
 * cudnnConvolutionBackwardBias, all on the backend's stream.
 *
 * Layouts map one to one: NHWC activations are CUDNN_TENSOR_NHWC tensors,
 * KRSC weights are cuDNN's NHWC filters with dims (k, c, kh, kw), and a
 * kfac_conv_desc is a cross-correlation with equal padding and stride on
 * both axes and no dilation.
 *
 * Algorithm policy, decided once per geometry (choose()):
 *  - cuDNN's heuristics (cudnnGet*Algorithm_v7), not the Find* searches:
 *    they run no kernels and need no memory, so conv_workspace can answer
 *    at model build time, before the arena exists; and they give the same
 *    answer on every run and every rank, where Find* timings vary.
 *  - the first (best-ranked) algorithm whose workspace fits WS_CAP.
 *  - backward data and filter first look among the algorithms cuDNN marks
 *    CUDNN_DETERMINISTIC (the others sum with atomics, so gradients would
 *    change from run to run); only when none fits is the best
 *    nondeterministic one taken.  Forward algorithms are deterministic.
 *  - math CUDNN_FMA_MATH unless KFAC_CUDNN_TF32 is set (cu->allow_tf32):
 *    CUDNN_DEFAULT_MATH *permits* TF32 tensor cores for fp32 data on
 *    Ampere and later, so plain fp32 has to be asked for.
 *
 * cuDNN 9 marks this legacy API deprecated (a warning only under
 * CUDNN_WARN_DEPRECATED) but still ships it; its replacement is the graph
 * API, should a later major version drop it.
 */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/conv_cudnn.h"

/* Largest workspace one convolution may ask for, so that no layer's
 * fastest algorithm claims gigabytes of the model's arena; past it the
 * heuristics' next-ranked algorithm is taken. */
#define WS_CAP ((size_t)256 << 20)

enum { FWD, DATA, FILTER, NDIR };
static const char *const dir_name[NDIR] = {"forward", "backward data", "backward filter"};

typedef struct conv_plan {
    kfac_conv_desc d;
    int sized;                          /* ws_bytes was reported by conv_workspace */
    cudnnTensorDescriptor_t x, y, bias; /* (n,c,h,w), (n,k,ho,wo), (1,k,1,1), NHWC */
    cudnnFilterDescriptor_t w;          /* (k,c,kh,kw) NHWC = KRSC */
    cudnnConvolutionDescriptor_t conv;
    int algo[NDIR];                     /* cudnnConvolution{Fwd,BwdData,BwdFilter}Algo_t */
    cudnnMathType_t math[NDIR];         /* set on conv before each direction runs */
    cudnnDeterminism_t determinism[NDIR];
    size_t ws[NDIR], ws_bytes;          /* per direction, and their max */
} conv_plan;

struct kfac_conv_cache {
    conv_plan **plans; /* pointers, so plans stay put when the array grows */
    int count, cap;
};

#define GEOM_FMT "n=%d %dx%dx%d -> k=%d %dx%d stride %d pad %d"
#define GEOM_ARGS(d) (d)->n, (d)->h, (d)->w, (d)->c, (d)->k, (d)->kh, (d)->kw, (d)->stride, (d)->pad

/* ---- the cache ---- */

/* Everything but the batch size. */
static int same_geometry(const kfac_conv_desc *a, const kfac_conv_desc *b)
{
    return a->h == b->h && a->w == b->w && a->c == b->c && a->k == b->k && a->kh == b->kh &&
           a->kw == b->kw && a->stride == b->stride && a->pad == b->pad && a->ho == b->ho &&
           a->wo == b->wo;
}

static conv_plan *find_plan(const kfac_cuda *cu, const kfac_conv_desc *d)
{
    const struct kfac_conv_cache *cc = cu->convs;
    for (int i = 0; cc && i < cc->count; i++)
        if (cc->plans[i]->d.n == d->n && same_geometry(&cc->plans[i]->d, d)) return cc->plans[i];
    return NULL;
}

/* The workspace a caller gives a batch of d->n when it sized it for a larger
 * batch of the same geometry (the model's partial batches): the smallest
 * such size, 0 when there is none. */
static size_t sibling_workspace(const kfac_cuda *cu, const kfac_conv_desc *d)
{
    const struct kfac_conv_cache *cc = cu->convs;
    size_t best = 0;
    int found = 0;
    for (int i = 0; cc && i < cc->count; i++) {
        const conv_plan *q = cc->plans[i];
        if (!q->sized || q->d.n < d->n || !same_geometry(&q->d, d)) continue;
        if (!found || q->ws_bytes < best) best = q->ws_bytes;
        found = 1;
    }
    return best;
}

static kfac_status cache_add(kfac_cuda *cu, conv_plan *p)
{
    struct kfac_conv_cache *cc = cu->convs;
    if (!cc) {
        cc = calloc(1, sizeof *cc);
        if (!cc) return KFAC_ERR(KFAC_ENOMEM, "cudnn: cannot allocate the convolution cache");
        cu->convs = cc;
    }
    if (cc->count == cc->cap) {
        int cap = cc->cap ? 2 * cc->cap : 32;
        conv_plan **plans = realloc(cc->plans, (size_t)cap * sizeof *plans);
        if (!plans) return KFAC_ERR(KFAC_ENOMEM, "cudnn: cannot grow the convolution cache");
        cc->plans = plans;
        cc->cap = cap;
    }
    cc->plans[cc->count++] = p;
    return KFAC_OK;
}

static void plan_free(conv_plan *p)
{
    if (!p) return;
    if (p->x) cudnnDestroyTensorDescriptor(p->x);
    if (p->y) cudnnDestroyTensorDescriptor(p->y);
    if (p->bias) cudnnDestroyTensorDescriptor(p->bias);
    if (p->w) cudnnDestroyFilterDescriptor(p->w);
    if (p->conv) cudnnDestroyConvolutionDescriptor(p->conv);
    free(p);
}

void kfac__cudnn_conv_free(kfac_cuda *cu)
{
    struct kfac_conv_cache *cc = cu->convs;
    if (!cc) return;
    for (int i = 0; i < cc->count; i++) plan_free(cc->plans[i]);
    free(cc->plans);
    free(cc);
    cu->convs = NULL;
}

/* ---- descriptors ---- */

static kfac_status check_geometry(const kfac_conv_desc *d)
{
    if (d->n < 1 || d->h < 1 || d->w < 1 || d->c < 1 || d->k < 1 || d->kh < 1 || d->kw < 1 ||
        d->stride < 1 || d->pad < 0 || d->ho < 1 || d->wo < 1)
        return KFAC_ERR(KFAC_EINVAL, "conv: bad geometry " GEOM_FMT " (output %dx%d)",
                        GEOM_ARGS(d), d->ho, d->wo);
    /* The 4-d descriptors count elements in int. */
    double in = (double)d->n * d->h * d->w * d->c, out = (double)d->n * d->ho * d->wo * d->k;
    double filt = (double)d->k * d->kh * d->kw * d->c;
    if (in > INT_MAX || out > INT_MAX || filt > INT_MAX)
        return KFAC_ERR(KFAC_ENOTSUP, "cudnn: " GEOM_FMT ": a tensor of over 2^31 elements "
                        "(use a smaller batch per GPU)", GEOM_ARGS(d));
    return KFAC_OK;
}

static kfac_status plan_describe(conv_plan *p, const kfac_conv_desc *d)
{
    p->d = *d;
    KFAC_CUDNN_CHECK(cudnnCreateTensorDescriptor(&p->x));
    KFAC_CUDNN_CHECK(cudnnCreateTensorDescriptor(&p->y));
    KFAC_CUDNN_CHECK(cudnnCreateTensorDescriptor(&p->bias));
    KFAC_CUDNN_CHECK(cudnnCreateFilterDescriptor(&p->w));
    KFAC_CUDNN_CHECK(cudnnCreateConvolutionDescriptor(&p->conv));
    KFAC_CUDNN_CHECK(cudnnSetTensor4dDescriptor(p->x, CUDNN_TENSOR_NHWC, CUDNN_DATA_FLOAT, d->n,
                                                d->c, d->h, d->w));
    KFAC_CUDNN_CHECK(cudnnSetTensor4dDescriptor(p->y, CUDNN_TENSOR_NHWC, CUDNN_DATA_FLOAT, d->n,
                                                d->k, d->ho, d->wo));
    KFAC_CUDNN_CHECK(cudnnSetTensor4dDescriptor(p->bias, CUDNN_TENSOR_NHWC, CUDNN_DATA_FLOAT, 1,
                                                d->k, 1, 1));
    KFAC_CUDNN_CHECK(cudnnSetFilter4dDescriptor(p->w, CUDNN_DATA_FLOAT, CUDNN_TENSOR_NHWC, d->k,
                                                d->c, d->kh, d->kw));
    KFAC_CUDNN_CHECK(cudnnSetConvolution2dDescriptor(p->conv, d->pad, d->pad, d->stride,
                                                     d->stride, 1, 1, CUDNN_CROSS_CORRELATION,
                                                     CUDNN_DATA_FLOAT));
    int n, k, ho, wo;
    KFAC_CUDNN_CHECK(cudnnGetConvolution2dForwardOutputDim(p->conv, p->x, p->w, &n, &k, &ho, &wo));
    if (ho != d->ho || wo != d->wo)
        return KFAC_ERR(KFAC_EINVAL, "conv: " GEOM_FMT ": output %dx%d, cuDNN computes %dx%d "
                        "(make descriptors with kfac_conv_desc_init)", GEOM_ARGS(d), d->ho,
                        d->wo, ho, wo);
    return KFAC_OK;
}

/* ---- algorithm choice ---- */

typedef struct candidate {
    int algo;
    cudnnStatus_t status;
    cudnnDeterminism_t determinism;
    cudnnMathType_t math;
} candidate;

#define COPY_PERF(perf, n, out)                                                            \
    for (int i_ = 0; i_ < (n); i_++) {                                                     \
        (out)[i_].algo = (int)(perf)[i_].algo;                                             \
        (out)[i_].status = (perf)[i_].status;                                              \
        (out)[i_].determinism = (perf)[i_].determinism;                                    \
        (out)[i_].math = (perf)[i_].mathType;                                              \
    }

/* cuDNN's ranking for one direction, best first (at most 8 entries). */
static kfac_status heuristics(kfac_cuda *cu, const conv_plan *p, int dir, candidate *out,
                              int *count)
{
    *count = 0;
    if (dir == FWD) {
        cudnnConvolutionFwdAlgoPerf_t perf[CUDNN_CONVOLUTION_FWD_ALGO_COUNT];
        KFAC_CUDNN_CHECK_AS("forward heuristics",
                            cudnnGetConvolutionForwardAlgorithm_v7(
                                cu->cudnn, p->x, p->w, p->conv, p->y,
                                CUDNN_CONVOLUTION_FWD_ALGO_COUNT, count, perf));
        COPY_PERF(perf, *count, out);
    } else if (dir == DATA) {
        cudnnConvolutionBwdDataAlgoPerf_t perf[CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT];
        KFAC_CUDNN_CHECK_AS("backward data heuristics",
                            cudnnGetConvolutionBackwardDataAlgorithm_v7(
                                cu->cudnn, p->w, p->y, p->conv, p->x,
                                CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT, count, perf));
        COPY_PERF(perf, *count, out);
    } else {
        cudnnConvolutionBwdFilterAlgoPerf_t perf[CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT];
        KFAC_CUDNN_CHECK_AS("backward filter heuristics",
                            cudnnGetConvolutionBackwardFilterAlgorithm_v7(
                                cu->cudnn, p->x, p->y, p->conv, p->w,
                                CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT, count, perf));
        COPY_PERF(perf, *count, out);
    }
    return KFAC_OK;
}

/* Workspace of one algorithm under the math type set on p->conv; fails for
 * a combination cuDNN cannot run. */
static cudnnStatus_t algo_workspace(kfac_cuda *cu, const conv_plan *p, int dir, int algo,
                                    size_t *bytes)
{
    if (dir == FWD)
        return cudnnGetConvolutionForwardWorkspaceSize(cu->cudnn, p->x, p->w, p->conv, p->y,
                                                       (cudnnConvolutionFwdAlgo_t)algo, bytes);
    if (dir == DATA)
        return cudnnGetConvolutionBackwardDataWorkspaceSize(
            cu->cudnn, p->w, p->y, p->conv, p->x, (cudnnConvolutionBwdDataAlgo_t)algo, bytes);
    return cudnnGetConvolutionBackwardFilterWorkspaceSize(
        cu->cudnn, p->x, p->y, p->conv, p->w, (cudnnConvolutionBwdFilterAlgo_t)algo, bytes);
}

static cudnnMathType_t base_math(const kfac_cuda *cu)
{
    return cu->allow_tf32 ? CUDNN_DEFAULT_MATH : CUDNN_FMA_MATH;
}

/* Picks p's algorithm for one direction (policy at the top of the file). */
static kfac_status choose(kfac_cuda *cu, conv_plan *p, int dir, size_t cap)
{
    candidate cand[CUDNN_CONVOLUTION_FWD_ALGO_COUNT];
    int n = 0;
    KFAC_CUDNN_CHECK(cudnnSetConvolutionMathType(p->conv, base_math(cu)));
    KFAC_TRY(heuristics(cu, p, dir, cand, &n));
    for (int pass = dir == FWD ? 1 : 0; pass < 2; pass++) { /* 0: deterministic only */
        for (int i = 0; i < n; i++) {
            if (cand[i].status != CUDNN_STATUS_SUCCESS) continue;
            if (pass == 0 && cand[i].determinism != CUDNN_DETERMINISTIC) continue;
            cudnnMathType_t math = cu->allow_tf32 ? cand[i].math : CUDNN_FMA_MATH;
            if (math == CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION) /* no fp32 -> fp16 */
                math = CUDNN_TENSOR_OP_MATH;
            size_t bytes = 0;
            KFAC_CUDNN_CHECK(cudnnSetConvolutionMathType(p->conv, math));
            if (algo_workspace(cu, p, dir, cand[i].algo, &bytes) != CUDNN_STATUS_SUCCESS) {
                char drain[256]; /* keeps this refusal out of a later error's message */
                cudnnGetLastErrorString(drain, sizeof drain);
                continue;
            }
            if (bytes > cap) continue;
            p->algo[dir] = cand[i].algo;
            p->math[dir] = math;
            p->determinism[dir] = cand[i].determinism;
            p->ws[dir] = bytes;
            return KFAC_OK;
        }
    }
    return KFAC_ERR(KFAC_ENOTSUP,
                    "cudnn: no %s algorithm for " GEOM_FMT " fits in %zu bytes of "
                    "workspace (%d candidates)%s",
                    dir_name[dir], GEOM_ARGS(&p->d), cap, n,
                    cap < WS_CAP ? "; call conv_workspace() for this geometry first" : "");
}

static kfac_status choose_all(kfac_cuda *cu, conv_plan *p, size_t cap)
{
    for (int dir = 0; dir < NDIR; dir++) KFAC_TRY(choose(cu, p, dir, cap));
    p->ws_bytes = 0;
    for (int dir = 0; dir < NDIR; dir++)
        if (p->ws[dir] > p->ws_bytes) p->ws_bytes = p->ws[dir];
    return KFAC_OK;
}

static kfac_status make_plan(kfac_cuda *cu, const kfac_conv_desc *d, size_t cap, conv_plan **out)
{
    *out = NULL;
    KFAC_TRY(check_geometry(d));
    conv_plan *p = calloc(1, sizeof *p);
    if (!p) return KFAC_ERR(KFAC_ENOMEM, "cudnn: cannot allocate a convolution plan");
    kfac_status st = plan_describe(p, d);
    if (st == KFAC_OK) st = choose_all(cu, p, cap);
    if (st == KFAC_OK) st = cache_add(cu, p);
    if (st != KFAC_OK) {
        plan_free(p);
        return st;
    }
    *out = p;
    return KFAC_OK;
}

/* The plan for a conv call.  A geometry conv_workspace never saw is planned
 * within the workspace its caller can have: that of a larger sized batch
 * of the same geometry, else none. */
static kfac_status plan_for_call(kfac_cuda *cu, const kfac_conv_desc *d, conv_plan **out)
{
    *out = find_plan(cu, d);
    if (*out) return KFAC_OK;
    return make_plan(cu, d, sibling_workspace(cu, d), out);
}

size_t kfac__cudnn_conv_workspace(kfac_cuda *cu, const kfac_conv_desc *d)
{
    if (d->n == 0) return 0;
    conv_plan *p = find_plan(cu, d);
    if (p && !p->sized && choose_all(cu, p, WS_CAP) != KFAC_OK) return 0; /* re-plan, larger cap */
    if (!p && make_plan(cu, d, WS_CAP, &p) != KFAC_OK) return 0;
    p->sized = 1;
    return p->ws_bytes;
}

/* ---- the operations ---- */

static kfac_status use_math(const conv_plan *p, int dir)
{
    KFAC_CUDNN_CHECK(cudnnSetConvolutionMathType(p->conv, p->math[dir]));
    return KFAC_OK;
}

kfac_status kfac__cudnn_conv_forward(kfac_cuda *cu, const kfac_conv_desc *d, const float *x,
                                     const float *w, const float *bias, float *y, void *ws)
{
    static const float one = 1.0f, zero = 0.0f;
    if (d->n == 0) return KFAC_OK;
    conv_plan *p;
    KFAC_TRY(plan_for_call(cu, d, &p));
    KFAC_TRY(use_math(p, FWD));
    KFAC_CUDNN_CHECK_AS("conv forward",
                        cudnnConvolutionForward(cu->cudnn, &one, p->x, x, p->w, w, p->conv,
                                                (cudnnConvolutionFwdAlgo_t)p->algo[FWD],
                                                p->ws[FWD] ? ws : NULL, p->ws[FWD], &zero, p->y,
                                                y));
    if (bias) /* y(n,ho,wo,k) += bias(k): broadcast over n, ho, wo */
        KFAC_CUDNN_CHECK_AS("conv forward bias",
                            cudnnAddTensor(cu->cudnn, &one, p->bias, bias, &one, p->y, y));
    return KFAC_OK;
}

kfac_status kfac__cudnn_conv_backward(kfac_cuda *cu, const kfac_conv_desc *d, const float *x,
                                      const float *w, const float *dy, float *dx, int accumulate,
                                      float *dw, float *db, void *ws)
{
    static const float one = 1.0f, zero = 0.0f;
    if (d->n == 0) { /* sums over no pixels */
        size_t nw = (size_t)d->k * d->kh * d->kw * d->c;
        KFAC_CUDA_CHECK_AS("conv backward (empty batch)",
                           cudaMemsetAsync(dw, 0, nw * sizeof *dw, cu->stream));
        if (db)
            KFAC_CUDA_CHECK_AS("conv backward (empty batch)",
                               cudaMemsetAsync(db, 0, (size_t)d->k * sizeof *db, cu->stream));
        return KFAC_OK;
    }
    conv_plan *p;
    KFAC_TRY(plan_for_call(cu, d, &p));
    if (dx) { /* beta 1 adds to dx, beta 0 overwrites it without reading it */
        KFAC_TRY(use_math(p, DATA));
        KFAC_CUDNN_CHECK_AS("conv backward data",
                            cudnnConvolutionBackwardData(
                                cu->cudnn, &one, p->w, w, p->y, dy, p->conv,
                                (cudnnConvolutionBwdDataAlgo_t)p->algo[DATA],
                                p->ws[DATA] ? ws : NULL, p->ws[DATA], accumulate ? &one : &zero,
                                p->x, dx));
    }
    KFAC_TRY(use_math(p, FILTER));
    KFAC_CUDNN_CHECK_AS("conv backward filter",
                        cudnnConvolutionBackwardFilter(
                            cu->cudnn, &one, p->x, x, p->y, dy, p->conv,
                            (cudnnConvolutionBwdFilterAlgo_t)p->algo[FILTER],
                            p->ws[FILTER] ? ws : NULL, p->ws[FILTER], &zero, p->w, dw));
    if (db) /* db(k) = sum over n, ho, wo of dy */
        KFAC_CUDNN_CHECK_AS("conv backward bias",
                            cudnnConvolutionBackwardBias(cu->cudnn, &one, p->y, dy, &zero,
                                                         p->bias, db));
    return KFAC_OK;
}

/* ---- description ---- */

static const char *algo_name(int dir, int algo)
{
    static const char *const fwd[] = {"IMPLICIT_GEMM", "IMPLICIT_PRECOMP_GEMM", "GEMM", "DIRECT",
                                      "FFT", "FFT_TILING", "WINOGRAD", "WINOGRAD_NONFUSED"};
    static const char *const data[] = {"ALGO_0", "ALGO_1", "FFT", "FFT_TILING", "WINOGRAD",
                                       "WINOGRAD_NONFUSED"};
    static const char *const filter[] = {"ALGO_0", "ALGO_1", "FFT", "ALGO_3", "WINOGRAD",
                                         "WINOGRAD_NONFUSED", "FFT_TILING"};
    const char *const *names[NDIR] = {fwd, data, filter};
    const int counts[NDIR] = {8, 6, 7};
    return algo >= 0 && algo < counts[dir] ? names[dir][algo] : "?";
}

static const char *math_name(cudnnMathType_t m)
{
    switch (m) {
    case CUDNN_FMA_MATH: return "fma";
    case CUDNN_DEFAULT_MATH: return "default";
    case CUDNN_TENSOR_OP_MATH: return "tensor-op";
    default: return "tensor-op-conv";
    }
}

kfac_status kfac__cudnn_conv_describe(kfac_cuda *cu, const kfac_conv_desc *d, char *buf,
                                      size_t len)
{
    conv_plan *p;
    KFAC_TRY(plan_for_call(cu, d, &p));
    int at = 0;
    for (int dir = 0; dir < NDIR && at >= 0 && (size_t)at < len; dir++)
        at += snprintf(buf + at, len - (size_t)at, "%s %s %s%s, ", dir == FWD ? "fwd" :
                       dir == DATA ? "data" : "filter", algo_name(dir, p->algo[dir]),
                       math_name(p->math[dir]),
                       p->determinism[dir] == CUDNN_DETERMINISTIC ? "" : " nondet");
    if (at >= 0 && (size_t)at < len)
        snprintf(buf + at, len - (size_t)at, "ws %.2f MiB", (double)p->ws_bytes / (1 << 20));
    return KFAC_OK;
}
