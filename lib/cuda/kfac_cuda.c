/* kfac_cuda.c - K-FAC's stages on the CUDA backend (the table's section in
 * kfac_backend.h; the maths and the CPU reference in kfac_factors.h and
 * lib/cpu/factors.c): Gram matrices by cuBLAS (ssyrk for float32; tensor-
 * core GEMMs for 16-bit activations, or TF32 where allowed), damped
 * inverses by cuSOLVER (spotrf + spotri, ssyevd), preconditioning by
 * sgemm, and the kernels of kernels/kfac.cu between the library calls.
 * All work is queued on the backend's stream; packed_trace and
 * factor_change wait for their double result (dot leaves its result in
 * device memory), inverse_cholesky and eigh for cuSOLVER's info (to report
 * a failed factorisation, as the CPU does).
 *
 * Row-major arrays, column-major libraries: a row-major r x c matrix is
 * the column-major c x r matrix (its transpose) with leading dimension c,
 * so row-major C = A B is column-major C^T = B^T A^T and every gemm below
 * swaps its operands.  A symmetric result's column-major upper triangle
 * (what syrk, potri and syevd's 'U' use) is the row-major lower one, whose
 * row j, contiguous, is packed column j. */
#include <limits.h>
#include <math.h>

#include "cuda/cuda_backend.h"

/* Sub-buffers of a workspace start on cudaMalloc's alignment. */
#define WS_ALIGN 256
static size_t align_up(size_t bytes) { return (bytes + WS_ALIGN - 1) / WS_ALIGN * WS_ALIGN; }

/* ---- Gram matrices ---- */

/* The im2col chunk: ~64 MiB of patch rows, enough for cuBLAS to reach full
 * speed on the deepest factors (a 3x3x512 patch is 18 KiB in float32) while
 * the workspace stays small next to the model. */
#define GRAM_CHUNK_BYTES ((size_t)64 << 20)

/* Workspace of a Gram matrix of order n: the n x n float32 product (its
 * column-major upper triangle is used), the n double column sums of the
 * ones column with their per-block partials, then the im2col chunk. */
typedef struct gram_ws {
    float *gram;
    double *sums, *partial;
    void *cols;
} gram_ws;

static size_t gram_ws_head(size_t n)
{
    return align_up(n * n * sizeof(float)) + align_up(n * sizeof(double)) +
           align_up(kfac_k_colsum_partial_doubles((int)n) * sizeof(double));
}

static gram_ws gram_ws_at(size_t n, void *ws)
{
    char *p = ws;
    gram_ws w;
    w.gram = (float *)p;
    p += align_up(n * n * sizeof(float));
    w.sums = (double *)p;
    p += align_up(n * sizeof(double));
    w.partial = (double *)p;
    w.cols = (char *)ws + gram_ws_head(n);
    return w;
}

/* Rows per cuBLAS call for rows of n values: every int argument of the
 * call fits, and so does rows * n (the elements it addresses). */
static size_t call_rows(size_t n, size_t total)
{
    size_t rows = (size_t)INT_MAX / n;
    return rows < total ? rows : total;
}

/* Rows per im2col chunk: GRAM_CHUNK_BYTES of them (at least one). */
static size_t chunk_rows(size_t kd, size_t elt, size_t total)
{
    size_t rows = GRAM_CHUNK_BYTES / (kd * elt);
    if (rows < 1) rows = 1;
    rows = rows < total ? rows : total;
    return call_rows(kd, rows);
}

static size_t patch_len(const kfac_conv_desc *d) { return (size_t)d->kh * d->kw * d->c; }

static size_t patch_rows(const kfac_conv_desc *d) { return (size_t)d->n * d->ho * d->wo; }

/* Patch rows are then the input's rows themselves (no im2col). */
static int is_pointwise(const kfac_conv_desc *d)
{
    return d->kh == 1 && d->kw == 1 && d->stride == 1 && d->pad == 0;
}

static cudaDataType act_type(kfac_dtype t)
{
    return t == KFAC_BF16 ? CUDA_R_16BF : t == KFAC_F16 ? CUDA_R_16F : CUDA_R_32F;
}

/* gram = R^T R (first) or gram += R^T R for R = rows x n row-major values
 * of act_dtype: column-major R^T is n x rows with leading dimension n, and
 * R^T R = Rc Rc^T.  float32: ssyrk (the upper triangle, half the flops).
 * 16-bit: a tensor-core GEMM of the whole matrix (twice the flops, at a
 * much higher rate), 16-bit products exact in float32, float32 sums; the
 * same GEMM with TF32 (float32 inputs cut to 10-bit mantissas) only where
 * cu->allow_tf32 lets float32 convolutions use it too. */
static kfac_status gram_add(kfac_backend *be, int n, int rows, const void *r, int first,
                            float *gram)
{
    kfac_cuda *cu = kfac__cuda(be);
    const float one = 1.0f, beta = first ? 0.0f : 1.0f;
    if (be->act_dtype == KFAC_F32 && !cu->allow_tf32) {
        KFAC_CUBLAS_CHECK(cublasSsyrk(cu->cublas, CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_N, n, rows,
                                      &one, (const float *)r, n, &beta, gram, n));
        return KFAC_OK;
    }
    cudaDataType t = act_type(be->act_dtype);
    cublasComputeType_t math =
        be->act_dtype == KFAC_F32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    KFAC_CUBLAS_CHECK(cublasGemmEx(cu->cublas, CUBLAS_OP_N, CUBLAS_OP_T, n, n, rows, &one, r, t, n,
                                   r, t, n, &beta, gram, CUDA_R_32F, n, math,
                                   CUBLAS_GEMM_DEFAULT));
    return KFAC_OK;
}

/* One chunk of rows: into the Gram matrix and, for the ones column, the
 * column sums. */
static kfac_status gram_chunk(kfac_backend *be, int n, size_t rows, const void *r, int first,
                              int append_one, gram_ws w)
{
    KFAC_TRY(gram_add(be, n, (int)rows, r, first, w.gram));
    if (append_one)
        KFAC_CUDA_CHECK_AS("gram (column sums)",
                           kfac_k_colsum(be->act_dtype, rows, n, r, w.partial, w.sums,
                                         kfac__cuda(be)->stream));
    return KFAC_OK;
}

/* Before the chunks: zero sums; a Gram matrix of no rows is zero. */
static kfac_status gram_begin(kfac_cuda *cu, size_t n, size_t total, int append_one, gram_ws w)
{
    if (append_one)
        KFAC_CUDA_CHECK_AS("gram (zero sums)",
                           cudaMemsetAsync(w.sums, 0, n * sizeof(double), cu->stream));
    if (total == 0)
        KFAC_CUDA_CHECK_AS("gram (zero)",
                           cudaMemsetAsync(w.gram, 0, n * n * sizeof(float), cu->stream));
    return KFAC_OK;
}

/* After them: packed = scale * the upper triangle (+ the ones column). */
static kfac_status gram_end(kfac_cuda *cu, int n, size_t total, int append_one, float scale,
                            float *packed, gram_ws w)
{
    KFAC_CUDA_CHECK_AS("gram (pack)", kfac_k_pack_gram(n, w.gram, scale,
                                                       append_one ? w.sums : NULL, total, packed,
                                                       cu->stream));
    return KFAC_OK;
}

size_t kfac__cuda_gram_rows_workspace(const kfac_backend *be, size_t m, int n)
{
    (void)be;
    (void)m;
    return n > 0 ? gram_ws_head((size_t)n) : 0;
}

kfac_status kfac__cuda_gram_rows(kfac_backend *be, size_t m, int n, const float *rows,
                                 int append_one, float scale, float *packed, void *ws)
{
    kfac_cuda *cu = kfac__cuda(be);
    if (n < 1) return KFAC_ERR(KFAC_EINVAL, "Gram matrix of order %d", n);
    const size_t elt = kfac_dtype_size(be->act_dtype), step = call_rows((size_t)n, m);
    gram_ws w = gram_ws_at((size_t)n, ws);
    KFAC_TRY(gram_begin(cu, (size_t)n, m, append_one, w));
    for (size_t r0 = 0; r0 < m; r0 += step) {
        size_t k = m - r0 < step ? m - r0 : step;
        const char *r = (const char *)rows + r0 * (size_t)n * elt;
        KFAC_TRY(gram_chunk(be, n, k, r, r0 == 0, append_one, w));
    }
    return gram_end(cu, n, m, append_one, scale, packed, w);
}

size_t kfac__cuda_gram_patches_workspace(const kfac_backend *be, const kfac_conv_desc *d)
{
    const size_t kd = patch_len(d), elt = kfac_dtype_size(be->act_dtype);
    if (kd == 0) return 0;
    size_t chunk = is_pointwise(d) ? 0 : chunk_rows(kd, elt, patch_rows(d)) * kd * elt;
    return gram_ws_head(kd) + chunk;
}

/* Chunks of chunk_rows (of this call's rows: no more than the workspace's,
 * sized for at least as many images) gathered by im2col in act_dtype. */
kfac_status kfac__cuda_gram_patches(kfac_backend *be, const kfac_conv_desc *d, const float *x,
                                    int append_one, float scale, float *packed, void *ws)
{
    kfac_cuda *cu = kfac__cuda(be);
    const size_t total = patch_rows(d), kd = patch_len(d);
    if (kd < 1 || kd > INT_MAX / 2) return KFAC_ERR(KFAC_EINVAL, "patch length %zu", kd);
    if (is_pointwise(d))
        return kfac__cuda_gram_rows(be, total, (int)kd, x, append_one, scale, packed, ws);
    const size_t step = chunk_rows(kd, kfac_dtype_size(be->act_dtype), total);
    gram_ws w = gram_ws_at(kd, ws);
    KFAC_TRY(gram_begin(cu, kd, total, append_one, w));
    for (size_t r0 = 0; r0 < total; r0 += step) {
        size_t k = total - r0 < step ? total - r0 : step;
        KFAC_CUDA_CHECK_AS("gram_patches (im2col)",
                           kfac_k_im2col(be->act_dtype, d, r0, k, x, w.cols, cu->stream));
        KFAC_TRY(gram_chunk(be, (int)kd, k, w.cols, r0 == 0, append_one, w));
    }
    return gram_end(cu, (int)kd, total, append_one, scale, packed, w);
}

/* ---- batch norm, unit-wise ---- */

kfac_status kfac__cuda_bn_fisher(kfac_backend *be, int n, size_t per_image, int c,
                                 const float *x, const float *y, const float *dy,
                                 const float *save_mean, const float *save_invstd, int relu,
                                 float grad_scale, float *sg, float *sb, float *fisher)
{
    if (n < 1 || c < 0) return KFAC_ERR(KFAC_EINVAL, "bn_fisher of %d images, %d channels", n, c);
    KFAC_CUDA_CHECK_AS("bn_fisher",
                       kfac_k_bn_fisher(be->act_dtype, n, per_image, c, x, y, dy, save_mean,
                                        save_invstd, relu, grad_scale, sg, sb, fisher,
                                        kfac__cuda(be)->stream));
    return KFAC_OK;
}

kfac_status kfac__cuda_bn_precondition(kfac_backend *be, int c, const float *fisher,
                                       float lambda, int diagonal_only, const float *dgamma,
                                       const float *dbeta, float *pgamma, float *pbeta)
{
    KFAC_CUDA_CHECK_AS("bn_precondition",
                       kfac_k_bn_precondition(c, fisher, lambda, diagonal_only, dgamma, dbeta,
                                              pgamma, pbeta, kfac__cuda(be)->stream));
    return KFAC_OK;
}

/* ---- vectors ---- */

kfac_status kfac__cuda_axpby(kfac_backend *be, size_t n, float alpha, const float *x, float beta,
                             float *y)
{
    KFAC_CUDA_CHECK_AS("axpby", kfac_k_axpby(n, alpha, x, beta, y, kfac__cuda(be)->stream));
    return KFAC_OK;
}

/* One plain copy where the runs are contiguous (or single): no pitch limit. */
kfac_status kfac__cuda_copy2d(kfac_backend *be, size_t rows, size_t row_bytes, void *dst,
                              size_t dst_pitch, const void *src, size_t src_pitch)
{
    cudaStream_t s = kfac__cuda(be)->stream;
    if (rows == 0 || row_bytes == 0) return KFAC_OK;
    if (rows == 1 || (dst_pitch == row_bytes && src_pitch == row_bytes)) {
        KFAC_CUDA_CHECK_AS("copy2d", cudaMemcpyAsync(dst, src, rows * row_bytes,
                                                     cudaMemcpyDeviceToDevice, s));
        return KFAC_OK;
    }
    if (dst_pitch < row_bytes || src_pitch < row_bytes)
        return KFAC_ERR(KFAC_EINVAL, "copy2d: runs of %zu bytes with pitches %zu and %zu",
                        row_bytes, dst_pitch, src_pitch);
    KFAC_CUDA_CHECK_AS("copy2d", cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, row_bytes,
                                                   rows, cudaMemcpyDeviceToDevice, s));
    return KFAC_OK;
}

/* The two doubles a kfac_k_* reduction left in cu->reduce, once done. */
static kfac_status read_reduce(kfac_cuda *cu, const char *what, double r[2])
{
    KFAC_CUDA_CHECK_AS(what, cudaMemcpyAsync(r, cu->reduce, 2 * sizeof(double),
                                             cudaMemcpyDeviceToHost, cu->stream));
    KFAC_CUDA_CHECK_AS(what, cudaStreamSynchronize(cu->stream));
    return KFAC_OK;
}

/* Queued: out is device memory, read when the caller downloads it. */
kfac_status kfac__cuda_dot(kfac_backend *be, size_t n, const float *a, const float *b,
                           double *out)
{
    kfac_cuda *cu = kfac__cuda(be);
    KFAC_CUDA_CHECK_AS("dot", kfac_k_dot(n, a, b, cu->reduce, out, cu->stream));
    return KFAC_OK;
}

kfac_status kfac__cuda_packed_trace(kfac_backend *be, int n, const float *packed, double *out)
{
    kfac_cuda *cu = kfac__cuda(be);
    double r[2];
    KFAC_CUDA_CHECK_AS("packed_trace", kfac_k_packed_trace(n, packed, cu->reduce, cu->stream));
    KFAC_TRY(read_reduce(cu, "packed_trace (result)", r));
    *out = r[0];
    return KFAC_OK;
}

/* As kfac_factor_change: from a zero `old`, 0 if `new` is zero too, else INFINITY. */
kfac_status kfac__cuda_factor_change(kfac_backend *be, int n, const float *old_packed,
                                     const float *new_packed, double *out)
{
    kfac_cuda *cu = kfac__cuda(be);
    double r[2];
    KFAC_CUDA_CHECK_AS("factor_change",
                       kfac_k_factor_change(n, old_packed, new_packed, cu->reduce, cu->stream));
    KFAC_TRY(read_reduce(cu, "factor_change (result)", r));
    if (r[1] == 0)
        *out = r[0] == 0 ? 0.0 : INFINITY;
    else
        *out = sqrt(r[0] / r[1]);
    return KFAC_OK;
}

/* ---- damped inverses ---- */

/* Workspace of order n: cuSOLVER's two info words, an n x n float matrix
 * (eigh's factorisation, inverse_from_eig's scaled eigenvectors), then
 * cuSOLVER's work area.  Sized for the largest order, it serves smaller
 * ones: cuSOLVER's work sizes grow with the order. */
static size_t ws_work_offset(int n)
{
    return align_up(2 * sizeof(int)) + align_up((size_t)n * n * sizeof(float));
}

static int *ws_info(void *ws) { return (int *)ws; }

static float *ws_mat(void *ws) { return (float *)((char *)ws + align_up(2 * sizeof(int))); }

static float *ws_work(void *ws, int n) { return (float *)((char *)ws + ws_work_offset(n)); }

/* cuSOLVER's work size (floats) for spotrf, spotri and ssyevd of order n:
 * the largest.  The queries read only the sizes; the matrix arguments get
 * a device address all the same. */
static kfac_status solver_lwork(const kfac_cuda *cu, int n, int *lwork)
{
    float *any = (float *)cu->reduce;
    int potrf = 0, potri = 0, syevd = 0;
    KFAC_CUSOLVER_CHECK(cusolverDnSpotrf_bufferSize(cu->cusolver, CUBLAS_FILL_MODE_UPPER, n, any,
                                                    n, &potrf));
    KFAC_CUSOLVER_CHECK(cusolverDnSpotri_bufferSize(cu->cusolver, CUBLAS_FILL_MODE_UPPER, n, any,
                                                    n, &potri));
    KFAC_CUSOLVER_CHECK(cusolverDnSsyevd_bufferSize(cu->cusolver, CUSOLVER_EIG_MODE_VECTOR,
                                                    CUBLAS_FILL_MODE_UPPER, n, any, n, any,
                                                    &syevd));
    int w = potrf > potri ? potrf : potri;
    w = w > syevd ? w : syevd;
    *lwork = w > 1 ? w : 1;
    return KFAC_OK;
}

/* 0 when cuSOLVER cannot size it: the inverse then fails with the reason. */
size_t kfac__cuda_inverse_workspace(const kfac_backend *be, int n)
{
    int lwork = 0;
    if (n < 1) return WS_ALIGN;
    if (solver_lwork((const kfac_cuda *)be->impl, n, &lwork) != KFAC_OK) return 0;
    return ws_work_offset(n) + (size_t)lwork * sizeof(float);
}

/* Waits for the stream and reads `count` info words. */
static kfac_status read_info(kfac_cuda *cu, const int *dev_info, int count, int *info)
{
    KFAC_CUDA_CHECK_AS("cusolver info", cudaMemcpyAsync(info, dev_info, count * sizeof(int),
                                                        cudaMemcpyDeviceToHost, cu->stream));
    KFAC_CUDA_CHECK_AS("cusolver info (synchronize)", cudaStreamSynchronize(cu->stream));
    return KFAC_OK;
}

static kfac_status solver_error(const char *routine, int n, int info)
{
    if (info < 0)
        return KFAC_ERR(KFAC_EBACKEND, "cusolver %s (order %d): illegal argument %d", routine, n,
                        -info);
    return KFAC_ERR(KFAC_EBACKEND, "cusolver %s (order %d) failed with info %d", routine, n, info);
}

/* Both factorisations are queued before the one wait: spotri of a failed
 * spotrf computes garbage, never faults, and its result is not used. */
kfac_status kfac__cuda_inverse_cholesky(kfac_backend *be, int n, const float *packed,
                                        float shift, float *inv, void *ws)
{
    kfac_cuda *cu = kfac__cuda(be);
    int lwork = 0, info[2] = {0, 0};
    if (n < 0) return KFAC_ERR(KFAC_EINVAL, "inverse of order %d", n);
    if (n == 0) return KFAC_OK;
    KFAC_TRY(solver_lwork(cu, n, &lwork));
    KFAC_CUDA_CHECK_AS("inverse_cholesky (unpack)",
                       kfac_k_unpack(n, packed, shift, inv, cu->stream));
    KFAC_CUSOLVER_CHECK(cusolverDnSpotrf(cu->cusolver, CUBLAS_FILL_MODE_UPPER, n, inv, n,
                                         ws_work(ws, n), lwork, ws_info(ws)));
    KFAC_CUSOLVER_CHECK(cusolverDnSpotri(cu->cusolver, CUBLAS_FILL_MODE_UPPER, n, inv, n,
                                         ws_work(ws, n), lwork, ws_info(ws) + 1));
    KFAC_CUDA_CHECK_AS("inverse_cholesky (mirror)", kfac_k_mirror_lower(n, inv, cu->stream));
    KFAC_TRY(read_info(cu, ws_info(ws), 2, info));
    if (info[0] > 0) /* the CPU's message (lib/cpu/factors.c) */
        return KFAC_ERR(KFAC_EBACKEND,
                        "Cholesky: factor of order %d with shift %g is not positive definite "
                        "(leading minor %d)",
                        n, (double)shift, info[0]);
    if (info[0] < 0) return solver_error("spotrf", n, info[0]);
    if (info[1] != 0) return solver_error("spotri", n, info[1]);
    return KFAC_OK;
}

/* ssyevd leaves eigenvector j in column j of the column-major matrix,
 * V[i + j*n]; ours are row-major with column j the eigenvector,
 * evecs[i*n + j] = V[i + j*n]: a transpose. */
kfac_status kfac__cuda_eigh(kfac_backend *be, int n, const float *packed, float *evals,
                            float *evecs, void *ws)
{
    kfac_cuda *cu = kfac__cuda(be);
    int lwork = 0, info = 0;
    if (n < 0) return KFAC_ERR(KFAC_EINVAL, "eigendecomposition of order %d", n);
    if (n == 0) return KFAC_OK;
    KFAC_TRY(solver_lwork(cu, n, &lwork));
    float *v = ws_mat(ws);
    KFAC_CUDA_CHECK_AS("eigh (unpack)", kfac_k_unpack(n, packed, 0.0f, v, cu->stream));
    KFAC_CUSOLVER_CHECK(cusolverDnSsyevd(cu->cusolver, CUSOLVER_EIG_MODE_VECTOR,
                                         CUBLAS_FILL_MODE_UPPER, n, v, n, evals, ws_work(ws, n),
                                         lwork, ws_info(ws)));
    KFAC_CUDA_CHECK_AS("eigh (transpose)", kfac_k_transpose(n, v, evecs, cu->stream));
    /* A PSD factor's rounding can give tiny negative eigenvalues. */
    KFAC_CUDA_CHECK_AS("eigh (clamp)", kfac_k_clamp_negative(n, evals, cu->stream));
    KFAC_TRY(read_info(cu, ws_info(ws), 1, &info));
    if (info > 0)
        return KFAC_ERR(KFAC_EBACKEND, "cusolver ssyevd (order %d) did not converge (info %d)",
                        n, info);
    if (info < 0) return solver_error("ssyevd", n, info);
    return KFAC_OK;
}

/* inv = B B^T with B = Q diag(1 / sqrt(d + shift)) (row-major, in ws): one
 * ssyrk (column-major B^T, transposed), then the mirror makes it exactly
 * symmetric. */
kfac_status kfac__cuda_inverse_from_eig(kfac_backend *be, int n, const float *evals,
                                        const float *evecs, float shift, float *inv, void *ws)
{
    kfac_cuda *cu = kfac__cuda(be);
    const float one = 1.0f, zero = 0.0f;
    if (n < 0) return KFAC_ERR(KFAC_EINVAL, "inverse of order %d", n);
    if (n == 0) return KFAC_OK;
    float *b = ws_mat(ws);
    KFAC_CUDA_CHECK_AS("inverse_from_eig (scale)",
                       kfac_k_scale_columns(n, evecs, evals, shift, b, cu->stream));
    KFAC_CUBLAS_CHECK(cublasSsyrk(cu->cublas, CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_T, n, n, &one, b,
                                  n, &zero, inv, n));
    KFAC_CUDA_CHECK_AS("inverse_from_eig (mirror)", kfac_k_mirror_lower(n, inv, cu->stream));
    return KFAC_OK;
}

/* ---- preconditioning ---- */

/* Column-major C (m x n) = op(A) op(B), float32 (no TF32: the inverses'
 * products keep full precision). */
static kfac_status sgemm(kfac_cuda *cu, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                         int inner, const float *a, int lda, const float *b, int ldb, float *c,
                         int ldc)
{
    const float one = 1.0f, zero = 0.0f;
    KFAC_CUBLAS_CHECK(cublasSgemm(cu->cublas, ta, tb, m, n, inner, &one, a, lda, b, ldb, &zero, c,
                                  ldc));
    return KFAC_OK;
}

/* k x d row-major results: row-major C = X Y is column-major C^T = Y^T X^T,
 * where the column-major views of X and Y are already X^T and Y^T. */
kfac_status kfac__cuda_precondition(kfac_backend *be, int k, int d, const float *ginv,
                                    const float *ainv, const float *grad, float *out,
                                    float *tmp)
{
    kfac_cuda *cu = kfac__cuda(be);
    if (k <= 0 || d <= 0) return KFAC_OK;
    /* tmp = ginv grad, then out = tmp ainv (grad is read before out is written) */
    KFAC_TRY(sgemm(cu, CUBLAS_OP_N, CUBLAS_OP_N, d, k, k, grad, d, ginv, k, tmp, d));
    return sgemm(cu, CUBLAS_OP_N, CUBLAS_OP_N, d, k, d, ainv, d, tmp, d, out, d);
}

/* The CPU's sequence, through tmp. */
kfac_status kfac__cuda_precondition_eig_exact(kfac_backend *be, int k, int d, const float *qg,
                                              const float *dg, const float *qa, const float *da,
                                              float lambda, const float *grad, float *out,
                                              float *tmp)
{
    kfac_cuda *cu = kfac__cuda(be);
    if (k <= 0 || d <= 0) return KFAC_OK;
    /* tmp = QG^T grad (C^T = grad^T QG), out = tmp QA */
    KFAC_TRY(sgemm(cu, CUBLAS_OP_N, CUBLAS_OP_T, d, k, k, grad, d, qg, k, tmp, d));
    KFAC_TRY(sgemm(cu, CUBLAS_OP_N, CUBLAS_OP_N, d, k, d, qa, d, tmp, d, out, d));
    KFAC_CUDA_CHECK_AS("precondition_eig_exact (divide)",
                       kfac_k_eig_divide(k, d, dg, da, lambda, out, cu->stream));
    /* tmp = QG out, out = tmp QA^T (C^T = QA tmp^T) */
    KFAC_TRY(sgemm(cu, CUBLAS_OP_N, CUBLAS_OP_N, d, k, k, out, d, qg, k, tmp, d));
    return sgemm(cu, CUBLAS_OP_T, CUBLAS_OP_N, d, k, d, qa, d, tmp, d, out, d);
}
