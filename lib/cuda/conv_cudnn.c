/* conv_cudnn.c - the CUDA backend's convolutions through cuDNN:
 * cudnnConvolutionForward, cudnnConvolutionBackwardData and
 * cudnnConvolutionBackwardFilter, all on the backend's stream; the bias of
 * fully connected layers is added and summed by kernels/bias.cu (one code
 * path for every precision, deterministic).
 *
 * Layouts map one to one: NHWC activations are CUDNN_TENSOR_NHWC tensors,
 * KRSC weights are cuDNN's NHWC filters with dims (k, c, kh, kw), and a
 * kfac_conv_desc is a cross-correlation with equal padding and stride on
 * both axes and no dilation.
 *
 * Precision: tensors and filters have the backend's act_dtype (float,
 * bf16 or half); the convolution computes in float always (cuDNN's
 * PSEUDO_HALF / PSEUDO_BFLOAT16 configurations: 16-bit products, float
 * accumulation).  Weights and weight gradients are float32 masters, so
 * with a 16-bit act_dtype the operations round w into a 16-bit copy in the
 * workspace before the product, and backward filter writes a 16-bit dw
 * into the workspace that is then widened into the float32 dw.  Workspace
 * layout (each piece 256-byte aligned from the workspace's start):
 *     [ cuDNN scratch | w in act_dtype | dw in act_dtype ]
 * (only the first piece for float32).
 *
 * Algorithm policy, decided once per geometry (choose()):
 *  - cuDNN's heuristics (cudnnGet*Algorithm_v7), not the Find* searches:
 *    they run no kernels and need no memory, so conv_workspace can answer
 *    at model build time, before the arena exists; and they give the same
 *    answer on every run and every rank, where Find* timings vary.
 *    KFAC_CUDNN_SEARCH=1 ranks by the timed search instead (cudnnFind*,
 *    which allocates its own buffers, so it too works before the arena).
 *  - the first (best-ranked) algorithm whose workspace fits WS_CAP.
 *  - backward data and filter first look among the algorithms cuDNN marks
 *    CUDNN_DETERMINISTIC (the others sum with atomics, so gradients would
 *    change from run to run); only when none fits is the best
 *    nondeterministic one taken (KFAC_CUDNN_DETERMINISTIC=0: the
 *    best-ranked, whichever).  Forward algorithms are deterministic.
 *  - float32: math CUDNN_FMA_MATH unless KFAC_CUDNN_TF32 is set
 *    (cu->allow_tf32): CUDNN_DEFAULT_MATH *permits* TF32 tensor cores for
 *    fp32 data on Ampere and later, so plain fp32 has to be asked for.
 *  - 16-bit: the heuristics are asked under CUDNN_TENSOR_OP_MATH and each
 *    candidate runs with the math type they give for it
 *    (CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION, never needed for 16-bit data,
 *    becomes CUDNN_TENSOR_OP_MATH).  Should no candidate work (tensor-core
 *    kernels can refuse odd channel counts, e.g. the 3 channels of an RGB
 *    stem), they are asked again under CUDNN_DEFAULT_MATH, then
 *    CUDNN_FMA_MATH, before choose() gives up with the reason.
 *
 * Fully connected layers (1x1 images, 1x1 kernel, stride 1, pad 0: plain
 * GEMMs, kfac__fc_is_gemm) get no cuDNN plan: they run as cuBLAS GEMMs in
 * fc_cublas.c.  The cache still records them (a plan with `gemm` set and no
 * descriptors, one per geometry and type whatever the batch) so that
 * KFAC_CUDNN_VERBOSE reports them once and kfac__cudnn_conv_plans counts
 * them (the precision and TF32 are fixed once they exist); their workspace
 * is fc_cublas.c's (kfac__fc_workspace).
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
#include "cuda/fc_cublas.h"

/* Largest workspace one convolution may ask for, so that no layer's
 * fastest algorithm claims gigabytes of the model's arena; past it the
 * heuristics' next-ranked algorithm is taken. */
#define WS_CAP ((size_t)256 << 20)
/* Alignment of each piece of the workspace (layout at the top). */
#define WS_ALIGN ((size_t)256)

enum { FWD, DATA, FILTER, NDIR };
static const char *const dir_name[NDIR] = {"forward", "backward data", "backward filter"};

typedef struct conv_plan {
    kfac_conv_desc d;
    kfac_dtype dtype;                   /* of x, y, w in cuDNN: the backend's act_dtype */
    int sized;                          /* plan_bytes was reported by conv_workspace */
    int gemm;                           /* a fully connected layer: fc_cublas.c, no descriptors */
    cudnnTensorDescriptor_t x, y;       /* (n,c,h,w), (n,k,ho,wo), NHWC */
    cudnnFilterDescriptor_t w;          /* (k,c,kh,kw) NHWC = KRSC */
    cudnnConvolutionDescriptor_t conv;
    int algo[NDIR];                     /* cudnnConvolution{Fwd,BwdData,BwdFilter}Algo_t */
    cudnnMathType_t math[NDIR];         /* set on conv before each direction runs */
    cudnnDeterminism_t determinism[NDIR];
    size_t ws[NDIR], ws_bytes;          /* cuDNN's scratch per direction, and their max */
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
    for (int i = 0; cc && i < cc->count; i++) {
        conv_plan *q = cc->plans[i];
        if (q->d.n == d->n && same_geometry(&q->d, d) && q->dtype == cu->act_dtype) return q;
    }
    return NULL;
}

/* The plan of a larger batch of d's geometry that conv_workspace sized (the
 * smallest such), whose workspace a caller gives a batch of d->n (the
 * model's partial batches); NULL when there is none. */
static const conv_plan *sized_sibling(const kfac_cuda *cu, const kfac_conv_desc *d)
{
    const struct kfac_conv_cache *cc = cu->convs;
    const conv_plan *best = NULL;
    for (int i = 0; cc && i < cc->count; i++) {
        const conv_plan *q = cc->plans[i];
        if (!q->sized || q->d.n < d->n || !same_geometry(&q->d, d) || q->dtype != cu->act_dtype)
            continue;
        if (!best || q->ws_bytes < best->ws_bytes) best = q;
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
    if (p->w) cudnnDestroyFilterDescriptor(p->w);
    if (p->conv) cudnnDestroyConvolutionDescriptor(p->conv);
    free(p);
}

int kfac__cudnn_conv_plans(const kfac_cuda *cu) { return cu->convs ? cu->convs->count : 0; }

void kfac__cudnn_conv_free(kfac_cuda *cu)
{
    struct kfac_conv_cache *cc = cu->convs;
    if (!cc) return;
    for (int i = 0; i < cc->count; i++) plan_free(cc->plans[i]);
    free(cc->plans);
    free(cc);
    cu->convs = NULL;
}

/* ---- workspace layout (top of the file) ---- */

static size_t align_up(size_t bytes) { return (bytes + WS_ALIGN - 1) / WS_ALIGN * WS_ALIGN; }

static size_t weight_count(const kfac_conv_desc *d)
{
    return (size_t)d->k * d->kh * d->kw * d->c;
}

/* Bytes of one 16-bit weight copy, padded to the alignment; 0 for float32. */
static size_t copy_bytes(const conv_plan *p)
{
    return p->dtype == KFAC_F32 ? 0 : align_up(weight_count(&p->d) * kfac_dtype_size(p->dtype));
}

/* Workspace bytes p runs in: cuDNN's scratch, then the two weight copies.
 * Monotone in ws_bytes, so a partial batch's plan (ws_bytes capped by its
 * sibling's) fits in the sibling's workspace. */
static size_t plan_bytes(const conv_plan *p)
{
    if (p->gemm) return kfac__fc_workspace(p->dtype, &p->d);
    return p->dtype == KFAC_F32 ? p->ws_bytes : align_up(p->ws_bytes) + 2 * copy_bytes(p);
}

/* The 16-bit weight and weight-gradient copies in ws (16-bit act_dtype). */
static void *w_copy(const conv_plan *p, void *ws) { return (char *)ws + align_up(p->ws_bytes); }
static void *dw_copy(const conv_plan *p, void *ws)
{
    return (char *)ws + align_up(p->ws_bytes) + copy_bytes(p);
}

/* ---- descriptors ---- */

static cudnnDataType_t cudnn_type(kfac_dtype t)
{
    return t == KFAC_BF16 ? CUDNN_DATA_BFLOAT16 : t == KFAC_F16 ? CUDNN_DATA_HALF
                                                                : CUDNN_DATA_FLOAT;
}

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

/* Descriptors of d in the type dtype; the product accumulates in float. */
static kfac_status plan_describe(conv_plan *p, const kfac_conv_desc *d, kfac_dtype dtype)
{
    cudnnDataType_t t = cudnn_type(dtype);
    p->d = *d;
    p->dtype = dtype;
    KFAC_CUDNN_CHECK(cudnnCreateTensorDescriptor(&p->x));
    KFAC_CUDNN_CHECK(cudnnCreateTensorDescriptor(&p->y));
    KFAC_CUDNN_CHECK(cudnnCreateFilterDescriptor(&p->w));
    KFAC_CUDNN_CHECK(cudnnCreateConvolutionDescriptor(&p->conv));
    KFAC_CUDNN_CHECK(cudnnSetTensor4dDescriptor(p->x, CUDNN_TENSOR_NHWC, t, d->n, d->c, d->h,
                                                d->w));
    KFAC_CUDNN_CHECK(cudnnSetTensor4dDescriptor(p->y, CUDNN_TENSOR_NHWC, t, d->n, d->k, d->ho,
                                                d->wo));
    KFAC_CUDNN_CHECK(cudnnSetFilter4dDescriptor(p->w, t, CUDNN_TENSOR_NHWC, d->k, d->c, d->kh,
                                                d->kw));
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

static void print_plan(const kfac_cuda *cu, const conv_plan *p);
static void note_nondeterminism(kfac_cuda *cu, const conv_plan *p, size_t cap);

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

/* cuDNN's ranking for one direction, best first (at most 8 entries): its
 * heuristics, or with cu->search its timed search. */
static kfac_status ranking(kfac_cuda *cu, const conv_plan *p, int dir, candidate *out, int *count)
{
    *count = 0;
    if (dir == FWD) {
        cudnnConvolutionFwdAlgoPerf_t perf[CUDNN_CONVOLUTION_FWD_ALGO_COUNT];
        const int n = CUDNN_CONVOLUTION_FWD_ALGO_COUNT;
        KFAC_CUDNN_CHECK_AS("forward algorithm ranking",
                            cu->search ? cudnnFindConvolutionForwardAlgorithm(
                                             cu->cudnn, p->x, p->w, p->conv, p->y, n, count, perf)
                                       : cudnnGetConvolutionForwardAlgorithm_v7(
                                             cu->cudnn, p->x, p->w, p->conv, p->y, n, count, perf));
        COPY_PERF(perf, *count, out);
    } else if (dir == DATA) {
        cudnnConvolutionBwdDataAlgoPerf_t perf[CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT];
        const int n = CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT;
        KFAC_CUDNN_CHECK_AS("backward data algorithm ranking",
                            cu->search ? cudnnFindConvolutionBackwardDataAlgorithm(
                                             cu->cudnn, p->w, p->y, p->conv, p->x, n, count, perf)
                                       : cudnnGetConvolutionBackwardDataAlgorithm_v7(
                                             cu->cudnn, p->w, p->y, p->conv, p->x, n, count, perf));
        COPY_PERF(perf, *count, out);
    } else {
        cudnnConvolutionBwdFilterAlgoPerf_t perf[CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT];
        const int n = CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT;
        KFAC_CUDNN_CHECK_AS(
            "backward filter algorithm ranking",
            cu->search ? cudnnFindConvolutionBackwardFilterAlgorithm(cu->cudnn, p->x, p->y, p->conv,
                                                                     p->w, n, count, perf)
                       : cudnnGetConvolutionBackwardFilterAlgorithm_v7(cu->cudnn, p->x, p->y,
                                                                       p->conv, p->w, n, count,
                                                                       perf));
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

/* The math types the heuristics are asked under, in order, for p (policy
 * at the top of the file); returns how many. */
static int query_maths(const kfac_cuda *cu, const conv_plan *p, cudnnMathType_t out[3])
{
    if (p->dtype == KFAC_F32) {
        out[0] = cu->allow_tf32 ? CUDNN_DEFAULT_MATH : CUDNN_FMA_MATH;
        return 1;
    }
    out[0] = CUDNN_TENSOR_OP_MATH;
    out[1] = CUDNN_DEFAULT_MATH;
    out[2] = CUDNN_FMA_MATH;
    return 3;
}

/* The math type a candidate runs with, asked under `query`. */
static cudnnMathType_t run_math(const kfac_cuda *cu, const conv_plan *p, cudnnMathType_t query,
                                cudnnMathType_t cand)
{
    if (p->dtype == KFAC_F32 && !cu->allow_tf32) return CUDNN_FMA_MATH;
    if (query == CUDNN_FMA_MATH) return CUDNN_FMA_MATH;
    if (cand == CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION) return CUDNN_TENSOR_OP_MATH;
    return cand;
}

/* The first of cand[0..n) that cuDNN can run within cap bytes of
 * workspace, deterministic ones first (but for FWD), into p; *found = 0
 * when there is none. */
static kfac_status pick(kfac_cuda *cu, conv_plan *p, int dir, size_t cap, cudnnMathType_t query,
                        const candidate *cand, int n, int *found)
{
    *found = 0;
    for (int pass = dir == FWD || !cu->deterministic ? 1 : 0; pass < 2; pass++) {
        /* pass 0: deterministic only */
        for (int i = 0; i < n; i++) {
            if (cand[i].status != CUDNN_STATUS_SUCCESS) continue;
            if (pass == 0 && cand[i].determinism != CUDNN_DETERMINISTIC) continue;
            cudnnMathType_t math = run_math(cu, p, query, cand[i].math);
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
            *found = 1;
            return KFAC_OK;
        }
    }
    return KFAC_OK;
}

/* Picks p's algorithm for one direction (policy at the top of the file). */
static kfac_status choose(kfac_cuda *cu, conv_plan *p, int dir, size_t cap)
{
    candidate cand[CUDNN_CONVOLUTION_FWD_ALGO_COUNT];
    cudnnMathType_t maths[3];
    int nmaths = query_maths(cu, p, maths), n = 0, found = 0;
    for (int m = 0; m < nmaths; m++) {
        KFAC_CUDNN_CHECK(cudnnSetConvolutionMathType(p->conv, maths[m]));
        KFAC_TRY(ranking(cu, p, dir, cand, &n));
        KFAC_TRY(pick(cu, p, dir, cap, maths[m], cand, n, &found));
        if (found) return KFAC_OK;
    }
    return KFAC_ERR(KFAC_ENOTSUP,
                    "cudnn: no %s algorithm for " GEOM_FMT " in %s fits in %zu bytes of "
                    "workspace (%d candidates)%s%s",
                    dir_name[dir], GEOM_ARGS(&p->d), kfac_dtype_name(p->dtype), cap, n,
                    cap < WS_CAP ? "; call conv_workspace() for this geometry first" : "",
                    p->dtype != KFAC_F32 && (p->d.c % 8 || p->d.k % 8)
                        ? "; 16-bit kernels may need channel counts that are multiples of 8"
                        : "");
}

static kfac_status choose_all(kfac_cuda *cu, conv_plan *p, size_t cap)
{
    for (int dir = 0; dir < NDIR; dir++) KFAC_TRY(choose(cu, p, dir, cap));
    p->ws_bytes = 0;
    for (int dir = 0; dir < NDIR; dir++)
        if (p->ws[dir] > p->ws_bytes) p->ws_bytes = p->ws[dir];
    return KFAC_OK;
}

/* Plans d within cap bytes of cuDNN scratch and caches the plan in *out;
 * with out NULL only tries (for the reason planning fails), keeping
 * nothing. */
static kfac_status make_plan(kfac_cuda *cu, const kfac_conv_desc *d, size_t cap, conv_plan **out)
{
    if (out) *out = NULL;
    KFAC_TRY(check_geometry(d));
    conv_plan *p = calloc(1, sizeof *p);
    if (!p) return KFAC_ERR(KFAC_ENOMEM, "cudnn: cannot allocate a convolution plan");
    kfac_status st = plan_describe(p, d, cu->act_dtype);
    if (st == KFAC_OK) st = choose_all(cu, p, cap);
    if (st == KFAC_OK && out) st = cache_add(cu, p);
    if (st == KFAC_OK && out && cu->verbose) print_plan(cu, p);
    if (st == KFAC_OK && out) note_nondeterminism(cu, p, cap);
    if (st != KFAC_OK || !out) {
        plan_free(p);
        return st;
    }
    *out = p;
    return KFAC_OK;
}

/* The plan for a conv call.  A geometry conv_workspace never saw is planned
 * within the workspace its caller can have: that of a larger sized batch
 * of the same geometry, else none (float32 only: 16-bit convolutions need
 * workspace for their weight copies). */
static kfac_status plan_for_call(kfac_cuda *cu, const kfac_conv_desc *d, conv_plan **out)
{
    *out = find_plan(cu, d);
    if (*out) return KFAC_OK;
    const conv_plan *sib = sized_sibling(cu, d);
    if (!sib && cu->act_dtype != KFAC_F32) {
        /* The reason conv_workspace() got no plan (it returned 0), if so. */
        KFAC_TRY(make_plan(cu, d, WS_CAP, NULL));
        return KFAC_ERR(KFAC_EINVAL, "conv: " GEOM_FMT ": %s convolutions run in the workspace "
                        "conv_workspace() reports (it holds 16-bit weight copies); call it for "
                        "this geometry first", GEOM_ARGS(d), kfac_dtype_name(cu->act_dtype));
    }
    return make_plan(cu, d, sib ? sib->ws_bytes : 0, out);
}

/* The record of a fully connected geometry (top of the file), made on
 * first use whatever the batch; no cuDNN call. */
static kfac_status gemm_plan(kfac_cuda *cu, const kfac_conv_desc *d)
{
    const struct kfac_conv_cache *cc = cu->convs;
    for (int i = 0; cc && i < cc->count; i++) {
        const conv_plan *q = cc->plans[i];
        if (q->gemm && same_geometry(&q->d, d) && q->dtype == cu->act_dtype) return KFAC_OK;
    }
    conv_plan *p = calloc(1, sizeof *p);
    if (!p) return KFAC_ERR(KFAC_ENOMEM, "conv: cannot allocate a fully connected plan");
    p->d = *d;
    p->dtype = cu->act_dtype;
    p->gemm = 1;
    p->sized = 1;
    kfac_status st = cache_add(cu, p);
    if (st != KFAC_OK) {
        plan_free(p);
        return st;
    }
    if (cu->verbose) print_plan(cu, p);
    return KFAC_OK;
}

size_t kfac__cudnn_conv_workspace(kfac_cuda *cu, const kfac_conv_desc *d)
{
    if (d->n == 0) return 0;
    if (kfac__fc_is_gemm(d))
        return gemm_plan(cu, d) == KFAC_OK ? kfac__fc_workspace(cu->act_dtype, d) : 0;
    conv_plan *p = find_plan(cu, d);
    if (p && !p->sized && choose_all(cu, p, WS_CAP) != KFAC_OK) return 0; /* re-plan, larger cap */
    if (!p && make_plan(cu, d, WS_CAP, &p) != KFAC_OK) return 0;
    p->sized = 1;
    return plan_bytes(p);
}

/* ---- the operations ---- */

static kfac_status use_math(const conv_plan *p, int dir)
{
    KFAC_CUDNN_CHECK(cudnnSetConvolutionMathType(p->conv, p->math[dir]));
    return KFAC_OK;
}

/* 16-bit act_dtype: w rounded into its copy in ws, which is returned. */
static kfac_status weights_16(kfac_cuda *cu, const conv_plan *p, const float *w, void *ws,
                              const void **out)
{
    void *w16 = w_copy(p, ws);
    KFAC_CUDA_CHECK_AS("conv (weights to 16 bits)",
                       kfac_k_convert(weight_count(&p->d), w, KFAC_F32, w16, p->dtype,
                                      cu->stream));
    *out = w16;
    return KFAC_OK;
}

static kfac_status check_ws(const conv_plan *p, const void *ws)
{
    if (p->dtype != KFAC_F32 && !ws)
        return KFAC_ERR(KFAC_EINVAL, "conv: " GEOM_FMT ": %s convolutions need the workspace "
                        "conv_workspace() reports (%zu bytes), got NULL", GEOM_ARGS(&p->d),
                        kfac_dtype_name(p->dtype), plan_bytes(p));
    return KFAC_OK;
}

kfac_status kfac__cudnn_conv_forward(kfac_cuda *cu, const kfac_conv_desc *d, const float *x,
                                     const float *w, const float *bias, float *y, void *ws)
{
    static const float one = 1.0f, zero = 0.0f;
    if (d->n == 0) return KFAC_OK;
    if (kfac__fc_is_gemm(d)) {
        KFAC_TRY(gemm_plan(cu, d));
        return kfac__fc_forward(cu, d, x, w, bias, y, ws);
    }
    conv_plan *p;
    KFAC_TRY(plan_for_call(cu, d, &p));
    KFAC_TRY(check_ws(p, ws));
    const void *wt = w;
    if (p->dtype != KFAC_F32) KFAC_TRY(weights_16(cu, p, w, ws, &wt));
    KFAC_TRY(use_math(p, FWD));
    KFAC_CUDNN_CHECK_AS("conv forward",
                        cudnnConvolutionForward(cu->cudnn, &one, p->x, x, p->w, wt, p->conv,
                                                (cudnnConvolutionFwdAlgo_t)p->algo[FWD],
                                                p->ws[FWD] ? ws : NULL, p->ws[FWD], &zero, p->y,
                                                y));
    if (bias) /* y(n,ho,wo,k) += bias(k): broadcast over the n*ho*wo rows */
        KFAC_CUDA_CHECK_AS("conv forward bias",
                           kfac_k_bias_forward(p->dtype, (size_t)d->n * d->ho * d->wo, d->k, y,
                                               bias, cu->stream));
    return KFAC_OK;
}

kfac_status kfac__cudnn_conv_backward(kfac_cuda *cu, const kfac_conv_desc *d, const float *x,
                                      const float *w, const float *dy, float *dx, int accumulate,
                                      float *dw, float *db, void *ws)
{
    static const float one = 1.0f, zero = 0.0f;
    if (d->n == 0) { /* sums over no pixels */
        KFAC_CUDA_CHECK_AS("conv backward (empty batch)",
                           cudaMemsetAsync(dw, 0, weight_count(d) * sizeof *dw, cu->stream));
        if (db)
            KFAC_CUDA_CHECK_AS("conv backward (empty batch)",
                               cudaMemsetAsync(db, 0, (size_t)d->k * sizeof *db, cu->stream));
        return KFAC_OK;
    }
    if (kfac__fc_is_gemm(d)) {
        KFAC_TRY(gemm_plan(cu, d));
        return kfac__fc_backward(cu, d, x, w, dy, dx, accumulate, dw, db, ws);
    }
    conv_plan *p;
    KFAC_TRY(plan_for_call(cu, d, &p));
    KFAC_TRY(check_ws(p, ws));
    if (dx) { /* beta 1 adds to dx, beta 0 overwrites it without reading it */
        const void *wt = w;
        if (p->dtype != KFAC_F32) KFAC_TRY(weights_16(cu, p, w, ws, &wt));
        KFAC_TRY(use_math(p, DATA));
        KFAC_CUDNN_CHECK_AS("conv backward data",
                            cudnnConvolutionBackwardData(
                                cu->cudnn, &one, p->w, wt, p->y, dy, p->conv,
                                (cudnnConvolutionBwdDataAlgo_t)p->algo[DATA],
                                p->ws[DATA] ? ws : NULL, p->ws[DATA], accumulate ? &one : &zero,
                                p->x, dx));
    }
    /* 16-bit: cuDNN's dw has the filter's type; it is widened into dw. */
    void *dwt = p->dtype == KFAC_F32 ? (void *)dw : dw_copy(p, ws);
    KFAC_TRY(use_math(p, FILTER));
    KFAC_CUDNN_CHECK_AS("conv backward filter",
                        cudnnConvolutionBackwardFilter(
                            cu->cudnn, &one, p->x, x, p->y, dy, p->conv,
                            (cudnnConvolutionBwdFilterAlgo_t)p->algo[FILTER],
                            p->ws[FILTER] ? ws : NULL, p->ws[FILTER], &zero, p->w, dwt));
    if (p->dtype != KFAC_F32)
        KFAC_CUDA_CHECK_AS("conv backward filter (weight gradient to float)",
                           kfac_k_convert(weight_count(d), dwt, p->dtype, dw, KFAC_F32,
                                          cu->stream));
    if (db) /* db(k) = sum over the n*ho*wo rows of dy */
        KFAC_CUDA_CHECK_AS("conv backward bias",
                           kfac_k_bias_backward(p->dtype, (size_t)d->n * d->ho * d->wo, d->k, dy,
                                                db, cu->stream));
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

/* p's algorithms, math and workspace, as one line into buf. */
static void plan_text(const conv_plan *p, char *buf, size_t len)
{
    int at = snprintf(buf, len, "%s: ", kfac_dtype_name(p->dtype));
    for (int dir = 0; dir < NDIR && at >= 0 && (size_t)at < len; dir++)
        at += snprintf(buf + at, len - (size_t)at, "%s %s %s%s, ", dir == FWD ? "fwd" :
                       dir == DATA ? "data" : "filter", algo_name(dir, p->algo[dir]),
                       math_name(p->math[dir]),
                       p->determinism[dir] == CUDNN_DETERMINISTIC ? "" : " nondet");
    if (at >= 0 && (size_t)at < len)
        snprintf(buf + at, len - (size_t)at, "ws %.2f MiB", (double)plan_bytes(p) / (1 << 20));
}

static void print_plan(const kfac_cuda *cu, const conv_plan *p)
{
    char text[256];
    if (p->gemm) {
        kfac__fc_describe(cu, p->dtype, &p->d, text, sizeof text);
        fprintf(stderr, "cudnn plan " GEOM_FMT ": fully connected, no cuDNN plan: %s\n",
                GEOM_ARGS(&p->d), text);
        return;
    }
    plan_text(p, text, sizeof text);
    fprintf(stderr, "cudnn plan " GEOM_FMT ": %s\n", GEOM_ARGS(&p->d), text);
}

/* Determinism is the default, so losing it is said once per backend, on
 * stderr as cuDNN's own messages (float32 NHWC geometries of ResNet-50 at
 * batch 256 have no deterministic backward-data algorithm within WS_CAP on
 * an H100 with cuDNN 9.19). */
static void note_nondeterminism(kfac_cuda *cu, const conv_plan *p, size_t cap)
{
    for (int dir = DATA; dir < NDIR && cu->deterministic && !cu->nondet_noted; dir++) {
        if (p->determinism[dir] == CUDNN_DETERMINISTIC) continue;
        cu->nondet_noted = 1;
        fprintf(stderr, "kfac: cudnn: " GEOM_FMT " in %s has no deterministic backward %s "
                "algorithm within %.0f MiB of workspace; %s sums with atomics, so results may "
                "vary in the last bits from run to run (other such layers are not reported; "
                "KFAC_CUDNN_VERBOSE=1 lists every plan)\n", GEOM_ARGS(&p->d),
                kfac_dtype_name(p->dtype), dir == DATA ? "data" : "filter", (double)cap / (1 << 20),
                algo_name(dir, p->algo[dir]));
    }
}

kfac_status kfac__cudnn_conv_describe(kfac_cuda *cu, const kfac_conv_desc *d, char *buf,
                                      size_t len)
{
    if (kfac__fc_is_gemm(d)) {
        KFAC_TRY(gemm_plan(cu, d));
        kfac__fc_describe(cu, cu->act_dtype, d, buf, len);
        return KFAC_OK;
    }
    conv_plan *p;
    KFAC_TRY(plan_for_call(cu, d, &p));
    plan_text(p, buf, len);
    return KFAC_OK;
}
