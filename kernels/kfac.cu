/* kfac.cu - the kernels of K-FAC's stages (lib/cuda/kfac_cuda.c runs the
 * products and factorisations through cuBLAS and cuSOLVER): im2col of
 * patch rows, column sums, packing and unpacking of symmetric factors,
 * the double-precision reductions of dot, trace and factor change, batch
 * norm's unit-wise Fisher and 2x2 preconditioning, and the small
 * element-wise steps between library calls.  Same math as
 * lib/cpu/factors.c.
 *
 * Sums are deterministic: every reduction adds per-thread partials in a
 * fixed tree, then per-block partials in a fixed order, on a grid that
 * depends only on the problem size (no atomics).  Activations are T
 * (float, bf16 or fp16), loaded as float; everything else is float32,
 * with double accumulators where the CPU uses them. */
#include <math.h>

#include "common.cuh"

/* ---- im2col ---- */

/* A block gathers tiles of up to IM2COL_MAX_ROWS patch rows; a tile holds
 * about IM2COL_TILE_VALUES values so short patches (the stem's 7x7x3)
 * still give every thread work, and its rows' origins are decoded once
 * into shared memory. */
#define IM2COL_MAX_ROWS 64
#define IM2COL_TILE_VALUES 2048

template <typename T>
static __global__ void im2col_kernel(kfac_conv_desc d, unsigned kd, size_t row0, size_t rows,
                                     unsigned tile_rows, const T *x, T *cols)
{
    __shared__ int s_n[IM2COL_MAX_ROWS], s_h[IM2COL_MAX_ROWS], s_w[IM2COL_MAX_ROWS];
    const size_t plane = (size_t)d.ho * d.wo;
    const unsigned c = (unsigned)d.c, kw = (unsigned)d.kw;
    for (size_t t0 = (size_t)blockIdx.x * tile_rows; t0 < rows;
         t0 += (size_t)gridDim.x * tile_rows) {
        unsigned tr = rows - t0 < tile_rows ? (unsigned)(rows - t0) : tile_rows;
        __syncthreads(); /* the previous tile's readers are done */
        if (threadIdx.x < tr) {
            size_t g = row0 + t0 + threadIdx.x, p = g % plane;
            s_n[threadIdx.x] = (int)(g / plane);
            s_h[threadIdx.x] = (int)(p / d.wo) * d.stride - d.pad;
            s_w[threadIdx.x] = (int)(p % d.wo) * d.stride - d.pad;
        }
        __syncthreads();
        /* tr * kd <= IM2COL_TILE_VALUES + kd: fits 32 bits (kd < 2^30). */
        const unsigned total = tr * kd;
        for (unsigned e = threadIdx.x; e < total; e += blockDim.x) {
            unsigned r = e / kd, k = e - r * kd;
            unsigned ch = k % c, tap = k / c;
            int ih = s_h[r] + (int)(tap / kw), iw = s_w[r] + (int)(tap % kw);
            T v;
            if (ih >= 0 && ih < d.h && iw >= 0 && iw < d.w)
                v = x[(((size_t)s_n[r] * d.h + ih) * d.w + iw) * c + ch];
            else
                kfac_k_store(&v, 0.0f);
            cols[(t0 + r) * kd + k] = v;
        }
    }
}

extern "C" cudaError_t kfac_k_im2col(kfac_dtype t, const kfac_conv_desc *d, size_t row0,
                                     size_t rows, const void *x, void *cols, cudaStream_t stream)
{
    size_t kd = (size_t)d->kh * d->kw * d->c;
    if (rows == 0 || kd == 0) return cudaSuccess;
    if (kd >= ((size_t)1 << 30)) return cudaErrorInvalidValue;
    size_t tile = (IM2COL_TILE_VALUES + kd - 1) / kd;
    if (tile > IM2COL_MAX_ROWS) tile = IM2COL_MAX_ROWS;
    size_t tiles = (rows + tile - 1) / tile;
    unsigned blocks = (unsigned)(tiles < KFAC_K_MAX_BLOCKS ? tiles : KFAC_K_MAX_BLOCKS);
    KFAC_K_DISPATCH(t, T,
                    im2col_kernel<T><<<blocks, KFAC_K_THREADS, 0, stream>>>(
                        *d, (unsigned)kd, row0, rows, (unsigned)tile, (const T *)x, (T *)cols));
    return cudaGetLastError();
}

/* ---- column sums (the ones column of a factor with a bias) ---- */

/* Level 1: a 32x8 block owns 32 consecutive columns (coalesced rows) and
 * one of COLSUM_PARTS contiguous row ranges; its 8 row-threads add every
 * 8th row, then row-thread 0 adds the 8 sums in order. */
#define COLSUM_TX 32
#define COLSUM_TY 8
#define COLSUM_PARTS 64

extern "C" size_t kfac_k_colsum_partial_doubles(int n)
{
    return (size_t)COLSUM_PARTS * (size_t)(n > 0 ? n : 0);
}

template <typename T>
static __global__ void colsum_partial_kernel(size_t rows, int n, size_t chunk, const T *a,
                                             double *partial)
{
    __shared__ double part[COLSUM_TY][COLSUM_TX];
    int j = blockIdx.x * COLSUM_TX + threadIdx.x;
    double s = 0.0;
    if (j < n) {
        size_t first = (size_t)blockIdx.y * chunk, end = first + chunk < rows ? first + chunk : rows;
        for (size_t i = first + threadIdx.y; i < end; i += COLSUM_TY)
            s += kfac_k_f32(a[i * n + j]);
    }
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && j < n) {
        double t = 0.0;
        for (int r = 0; r < COLSUM_TY; r++) t += part[r][threadIdx.x];
        partial[(size_t)blockIdx.y * n + j] = t;
    }
}

/* Level 2: sums[j] += the COLSUM_PARTS partials of column j, in order. */
static __global__ void colsum_add_kernel(int n, const double *partial, double *sums)
{
    KFAC_K_GRID_LOOP(j, (size_t)n)
    {
        double s = sums[j];
        for (int r = 0; r < COLSUM_PARTS; r++) s += partial[(size_t)r * n + j];
        sums[j] = s;
    }
}

extern "C" cudaError_t kfac_k_colsum(kfac_dtype t, size_t rows, int n, const void *a,
                                     double *partial, double *sums, cudaStream_t stream)
{
    if (rows == 0 || n <= 0) return cudaSuccess;
    size_t chunk = (rows + COLSUM_PARTS - 1) / COLSUM_PARTS;
    dim3 grid((unsigned)((n + COLSUM_TX - 1) / COLSUM_TX), COLSUM_PARTS),
        block(COLSUM_TX, COLSUM_TY);
    KFAC_K_DISPATCH(t, T,
                    colsum_partial_kernel<T><<<grid, block, 0, stream>>>(rows, n, chunk,
                                                                        (const T *)a, partial));
    colsum_add_kernel<<<kfac_k_blocks((size_t)n), KFAC_K_THREADS, 0, stream>>>(n, partial, sums);
    return cudaGetLastError();
}

/* ---- packed <-> full ---- */

static inline unsigned rows_grid(int n)
{
    return (unsigned)(n < KFAC_K_MAX_BLOCKS ? n : KFAC_K_MAX_BLOCKS);
}

/* Block per packed column j (contiguous in both arrays: gram's column-major
 * upper column j is packed column j). */
static __global__ void pack_gram_kernel(int n, const float *gram, float scale, const double *sums,
                                        size_t rows, float *packed)
{
    const int cols = sums ? n + 1 : n;
    for (int j = blockIdx.x; j < cols; j += gridDim.x) {
        float *col = packed + (size_t)j * (j + 1) / 2;
        if (j < n) {
            const float *g = gram + (size_t)j * n;
            for (int i = threadIdx.x; i <= j; i += blockDim.x) col[i] = scale * g[i];
        } else { /* the ones column, as the CPU's set_ones_column */
            for (int i = threadIdx.x; i <= n; i += blockDim.x)
                col[i] = (float)((double)scale * (i < n ? sums[i] : (double)rows));
        }
    }
}

extern "C" cudaError_t kfac_k_pack_gram(int n, const float *gram, float scale,
                                        const double *sums, size_t rows, float *packed,
                                        cudaStream_t stream)
{
    int cols = sums ? n + 1 : n;
    if (n < 0 || cols <= 0) return cudaSuccess;
    pack_gram_kernel<<<rows_grid(cols), KFAC_K_THREADS, 0, stream>>>(n, gram, scale, sums, rows,
                                                                    packed);
    return cudaGetLastError();
}

/* Block per row i of full; element (i, j) is packed (min, max). */
static __global__ void unpack_kernel(int n, const float *packed, float shift, float *full)
{
    for (int i = blockIdx.x; i < n; i += gridDim.x)
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            int lo = i < j ? i : j, hi = i < j ? j : i;
            float v = packed[(size_t)hi * (hi + 1) / 2 + lo];
            full[(size_t)i * n + j] = i == j ? v + shift : v;
        }
}

extern "C" cudaError_t kfac_k_unpack(int n, const float *packed, float shift, float *full,
                                     cudaStream_t stream)
{
    if (n <= 0) return cudaSuccess;
    unpack_kernel<<<rows_grid(n), KFAC_K_THREADS, 0, stream>>>(n, packed, shift, full);
    return cudaGetLastError();
}

/* Writes only the upper triangle, reads only the lower one: no race. */
static __global__ void mirror_lower_kernel(int n, float *a)
{
    for (int i = blockIdx.x; i < n; i += gridDim.x)
        for (int j = i + 1 + threadIdx.x; j < n; j += blockDim.x)
            a[(size_t)i * n + j] = a[(size_t)j * n + i];
}

extern "C" cudaError_t kfac_k_mirror_lower(int n, float *a, cudaStream_t stream)
{
    if (n <= 1) return cudaSuccess;
    mirror_lower_kernel<<<rows_grid(n), KFAC_K_THREADS, 0, stream>>>(n, a);
    return cudaGetLastError();
}

/* 32x32 tiles through shared memory (padded against bank conflicts), so
 * reads and writes are both coalesced; 32x8 threads per tile. */
#define TR_TILE 32
#define TR_TY 8

static __global__ void transpose_kernel(int n, const float *in, float *out)
{
    __shared__ float tile[TR_TILE][TR_TILE + 1];
    const int tiles = (n + TR_TILE - 1) / TR_TILE;
    for (int by = blockIdx.y; by < tiles; by += gridDim.y)
        for (int bx = blockIdx.x; bx < tiles; bx += gridDim.x) {
            int x = bx * TR_TILE + threadIdx.x, y0 = by * TR_TILE;
            __syncthreads(); /* the previous tile's readers are done */
            for (int k = threadIdx.y; k < TR_TILE; k += TR_TY)
                if (x < n && y0 + k < n) tile[k][threadIdx.x] = in[(size_t)(y0 + k) * n + x];
            __syncthreads();
            int ox = y0 + threadIdx.x;
            for (int k = threadIdx.y; k < TR_TILE; k += TR_TY) {
                int oy = bx * TR_TILE + k;
                if (ox < n && oy < n) out[(size_t)oy * n + ox] = tile[threadIdx.x][k];
            }
        }
}

extern "C" cudaError_t kfac_k_transpose(int n, const float *in, float *out, cudaStream_t stream)
{
    if (n <= 0) return cudaSuccess;
    int tiles = (n + TR_TILE - 1) / TR_TILE;
    unsigned g = (unsigned)(tiles < KFAC_K_MAX_BLOCKS ? tiles : KFAC_K_MAX_BLOCKS);
    transpose_kernel<<<dim3(g, g), dim3(TR_TILE, TR_TY), 0, stream>>>(n, in, out);
    return cudaGetLastError();
}

/* ---- element-wise steps of the inverses and preconditioning ---- */

static __global__ void clamp_negative_kernel(int n, float *v)
{
    KFAC_K_GRID_LOOP(i, (size_t)n)
    {
        if (v[i] < 0.0f) v[i] = 0.0f; /* NaN stays NaN, as on the CPU */
    }
}

extern "C" cudaError_t kfac_k_clamp_negative(int n, float *v, cudaStream_t stream)
{
    if (n <= 0) return cudaSuccess;
    clamp_negative_kernel<<<kfac_k_blocks((size_t)n), KFAC_K_THREADS, 0, stream>>>(n, v);
    return cudaGetLastError();
}

/* Grid for the (row, column) loops below: blockIdx.y strides rows,
 * blockIdx.x and threads the columns of a row (coalesced). */
static dim3 row_col_grid(int rows, int cols)
{
    int bx = (cols + KFAC_K_THREADS - 1) / KFAC_K_THREADS;
    return dim3((unsigned)(bx < 64 ? bx : 64), rows_grid(rows));
}

#define ROW_COL_LOOP(i, j, rows, cols)                                                   \
    for (int i = blockIdx.y; i < (rows); i += gridDim.y)                                 \
        for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < (cols);                  \
             j += blockDim.x * gridDim.x)

static __global__ void scale_columns_kernel(int n, const float *q, const float *d, float shift,
                                            float *b)
{
    ROW_COL_LOOP(i, k, n, n)
    {
        size_t at = (size_t)i * n + k;
        b[at] = q[at] * sqrtf(1.0f / (d[k] + shift));
    }
}

extern "C" cudaError_t kfac_k_scale_columns(int n, const float *q, const float *d, float shift,
                                            float *b, cudaStream_t stream)
{
    if (n <= 0) return cudaSuccess;
    scale_columns_kernel<<<row_col_grid(n, n), KFAC_K_THREADS, 0, stream>>>(n, q, d, shift, b);
    return cudaGetLastError();
}

static __global__ void eig_divide_kernel(int k, int d, const float *dg, const float *da,
                                         float lambda, float *v)
{
    ROW_COL_LOOP(i, j, k, d) v[(size_t)i * d + j] /= dg[i] * da[j] + lambda;
}

extern "C" cudaError_t kfac_k_eig_divide(int k, int d, const float *dg, const float *da,
                                         float lambda, float *v, cudaStream_t stream)
{
    if (k <= 0 || d <= 0) return cudaSuccess;
    eig_divide_kernel<<<row_col_grid(k, d), KFAC_K_THREADS, 0, stream>>>(k, d, dg, da, lambda, v);
    return cudaGetLastError();
}

/* The branch is uniform over the grid (kernel arguments). */
static __global__ void axpby_kernel(size_t n, float alpha, const float *x, float beta, float *y)
{
    KFAC_K_GRID_LOOP(i, n)
    {
        float v;
        if (beta == 0.0f)
            v = alpha == 0.0f ? 0.0f : alpha * x[i];
        else if (alpha == 0.0f)
            v = beta * y[i];
        else
            v = alpha * x[i] + beta * y[i];
        y[i] = v;
    }
}

extern "C" cudaError_t kfac_k_axpby(size_t n, float alpha, const float *x, float beta, float *y,
                                    cudaStream_t stream)
{
    if (n == 0) return cudaSuccess;
    axpby_kernel<<<kfac_k_blocks(n), KFAC_K_THREADS, 0, stream>>>(n, alpha, x, beta, y);
    return cudaGetLastError();
}

/* ---- double-precision reductions ---- */

#define RED_THREADS 256 /* power of two */

/* Adds each thread's (s0, s1) over the block in a fixed tree; thread 0
 * returns the totals. */
static __device__ void block_sum2(double &s0, double &s1)
{
    __shared__ double r0[RED_THREADS], r1[RED_THREADS];
    const int t = threadIdx.x;
    r0[t] = s0;
    r1[t] = s1;
    __syncthreads();
    for (int s = RED_THREADS / 2; s > 0; s >>= 1) {
        if (t < s) {
            r0[t] += r0[t + s];
            r1[t] += r1[t + s];
        }
        __syncthreads();
    }
    s0 = r0[0];
    s1 = r1[0];
}

/* Level 1: partial[b] and partial[blocks + b] = block b's sums of f. */
template <typename F>
static __global__ void reduce2_kernel(size_t n, F f, double *partial)
{
    double s0 = 0.0, s1 = 0.0;
    KFAC_K_GRID_LOOP(i, n) f(i, s0, s1);
    block_sum2(s0, s1);
    if (threadIdx.x == 0) {
        partial[blockIdx.x] = s0;
        partial[gridDim.x + blockIdx.x] = s1;
    }
}

/* Level 2, one block: *r0, *r1 (if not NULL) = the sums of the parts. */
static __global__ void reduce2_final_kernel(unsigned parts, const double *partial, double *r0,
                                            double *r1)
{
    double s0 = 0.0, s1 = 0.0;
    for (unsigned i = threadIdx.x; i < parts; i += RED_THREADS) {
        s0 += partial[i];
        s1 += partial[parts + i];
    }
    block_sum2(s0, s1);
    if (threadIdx.x == 0) {
        *r0 = s0;
        if (r1) *r1 = s1;
    }
}

/* The partials go to work + 2, the sums to r0 and r1 (r1 may be NULL). */
template <typename F>
static cudaError_t reduce2(size_t n, F f, double *work, double *r0, double *r1,
                           cudaStream_t stream)
{
    size_t blocks = (n + RED_THREADS - 1) / RED_THREADS;
    if (blocks < 1) blocks = 1; /* n == 0: zeros */
    if (blocks > KFAC_K_REDUCE_BLOCKS) blocks = KFAC_K_REDUCE_BLOCKS;
    reduce2_kernel<F><<<(unsigned)blocks, RED_THREADS, 0, stream>>>(n, f, work + 2);
    reduce2_final_kernel<<<1, RED_THREADS, 0, stream>>>((unsigned)blocks, work + 2, r0, r1);
    return cudaGetLastError();
}

struct dot_term {
    const float *a, *b;
    __device__ void operator()(size_t i, double &s0, double &) const
    {
        s0 += (double)a[i] * (double)b[i];
    }
};

struct trace_term {
    const float *packed;
    __device__ void operator()(size_t j, double &s0, double &) const
    {
        s0 += packed[j * (j + 1) / 2 + j];
    }
};

/* The column j of packed index p: j(j+1)/2 <= p < (j+1)(j+2)/2 (the double
 * square root is exact enough to need at most one step of correction). */
static __device__ size_t packed_col_of(size_t p)
{
    size_t j = (size_t)((sqrt(8.0 * (double)p + 1.0) - 1.0) * 0.5);
    while ((j + 1) * (j + 2) / 2 <= p) j++;
    while (j * (j + 1) / 2 > p) j--;
    return j;
}

struct change_term {
    const float *old_p, *new_p;
    __device__ void operator()(size_t p, double &diff, double &ref) const
    {
        size_t j = packed_col_of(p);
        double weight = p - j * (j + 1) / 2 == j ? 1.0 : 2.0;
        double dv = (double)new_p[p] - old_p[p], o = old_p[p];
        diff += weight * dv * dv;
        ref += weight * o * o;
    }
};

extern "C" cudaError_t kfac_k_dot(size_t n, const float *a, const float *b, double *work,
                                  double *out, cudaStream_t stream)
{
    return reduce2(n, dot_term{a, b}, work, out, (double *)NULL, stream);
}

extern "C" cudaError_t kfac_k_packed_trace(int n, const float *packed, double *work,
                                           cudaStream_t stream)
{
    return reduce2((size_t)(n > 0 ? n : 0), trace_term{packed}, work, work, work + 1, stream);
}

extern "C" cudaError_t kfac_k_factor_change(int n, const float *old_packed,
                                            const float *new_packed, double *work,
                                            cudaStream_t stream)
{
    size_t len = n > 0 ? (size_t)n * (n + 1) / 2 : 0;
    return reduce2(len, change_term{old_packed, new_packed}, work, work, work + 1, stream);
}

/* ---- batch norm, unit-wise ---- */

/* Per-sample sums: a 32x8 block owns 32 consecutive channels of one image
 * (blockIdx.y strides the images); its 8 row-threads add every 8th of the
 * image's rows in double, then row-thread 0 adds their sums in order. */
#define BNF_TX 32
#define BNF_TY 8

template <typename T>
static __global__ void bn_sample_kernel(int n, size_t per_image, int c, const T *x, const T *y,
                                        const T *dy, const float *save_mean,
                                        const float *save_invstd, int relu, float grad_scale,
                                        float *sg, float *sb)
{
    __shared__ double pg[BNF_TY][BNF_TX], pb[BNF_TY][BNF_TX];
    const int j = blockIdx.x * BNF_TX + threadIdx.x;
    for (int img = blockIdx.y; img < n; img += gridDim.y) {
        double ag = 0.0, ab = 0.0;
        if (j < c) {
            double mu = save_mean[j], invstd = save_invstd[j];
            const size_t base = (size_t)img * per_image;
            for (size_t r = threadIdx.y; r < per_image; r += BNF_TY) {
                size_t k = (base + r) * c + j;
                float g = grad_scale * kfac_k_f32(dy[k]);
                if (relu && kfac_k_f32(y[k]) <= 0.0f) g = 0.0f;
                ab += g;
                ag += (double)g * (((double)kfac_k_f32(x[k]) - mu) * invstd);
            }
        }
        __syncthreads(); /* the previous image's sums were read */
        pg[threadIdx.y][threadIdx.x] = ag;
        pb[threadIdx.y][threadIdx.x] = ab;
        __syncthreads();
        if (threadIdx.y == 0 && j < c) {
            double tg = 0.0, tb = 0.0;
            for (int r = 0; r < BNF_TY; r++) {
                tg += pg[r][threadIdx.x];
                tb += pb[r][threadIdx.x];
            }
            sg[(size_t)img * c + j] = (float)tg;
            sb[(size_t)img * c + j] = (float)tb;
        }
    }
}

/* fisher[3j..3j+2] = (1/n) sum_i [sg sb]^T [sg sb], in image order. */
static __global__ void bn_unit_fisher_kernel(int n, int c, const float *sg, const float *sb,
                                             float *fisher)
{
    KFAC_K_GRID_LOOP(jj, (size_t)c)
    {
        double gg = 0.0, gb = 0.0, bb = 0.0;
        for (int i = 0; i < n; i++) {
            double g = sg[(size_t)i * c + jj], b = sb[(size_t)i * c + jj];
            gg += g * g;
            gb += g * b;
            bb += b * b;
        }
        fisher[3 * jj + 0] = (float)(gg / n);
        fisher[3 * jj + 1] = (float)(gb / n);
        fisher[3 * jj + 2] = (float)(bb / n);
    }
}

extern "C" cudaError_t kfac_k_bn_fisher(kfac_dtype t, int n, size_t per_image, int c,
                                        const void *x, const void *y, const void *dy,
                                        const float *save_mean, const float *save_invstd,
                                        int relu, float grad_scale, float *sg, float *sb,
                                        float *fisher, cudaStream_t stream)
{
    if (n <= 0 || c <= 0) return cudaSuccess;
    dim3 grid((unsigned)((c + BNF_TX - 1) / BNF_TX), rows_grid(n)), block(BNF_TX, BNF_TY);
    KFAC_K_DISPATCH(t, T,
                    bn_sample_kernel<T><<<grid, block, 0, stream>>>(
                        n, per_image, c, (const T *)x, (const T *)y, (const T *)dy, save_mean,
                        save_invstd, relu, grad_scale, sg, sb));
    bn_unit_fisher_kernel<<<kfac_k_blocks((size_t)c), KFAC_K_THREADS, 0, stream>>>(n, c, sg, sb,
                                                                                  fisher);
    return cudaGetLastError();
}

static __global__ void bn_precondition_kernel(int c, const float *fisher, float lambda,
                                              int diagonal_only, const float *dgamma,
                                              const float *dbeta, float *pgamma, float *pbeta)
{
    KFAC_K_GRID_LOOP(j, (size_t)c)
    {
        double a = (double)fisher[3 * j] + lambda, b = diagonal_only ? 0.0 : fisher[3 * j + 1];
        double e = (double)fisher[3 * j + 2] + lambda, g = dgamma[j], bt = dbeta[j];
        double det = a * e - b * b; /* > 0: F_j is PSD and lambda > 0 */
        pgamma[j] = (float)((e * g - b * bt) / det);
        pbeta[j] = (float)((a * bt - b * g) / det);
    }
}

extern "C" cudaError_t kfac_k_bn_precondition(int c, const float *fisher, float lambda,
                                              int diagonal_only, const float *dgamma,
                                              const float *dbeta, float *pgamma, float *pbeta,
                                              cudaStream_t stream)
{
    if (c <= 0) return cudaSuccess;
    bn_precondition_kernel<<<kfac_k_blocks((size_t)c), KFAC_K_THREADS, 0, stream>>>(
        c, fisher, lambda, diagonal_only, dgamma, dbeta, pgamma, pbeta);
    return cudaGetLastError();
}
