/* conv.c - CPU convolution: im2col + OpenBLAS sgemm in cache-sized chunks.
 *
 * Activations are NHWC and weights KRSC, so with M = N*HO*WO output pixels
 * and KD = KH*KW*C patch length:
 *   forward        Y(M,K)   = cols(M,KD) * W(K,KD)^T
 *   weight grad    dW(K,KD) = dY(M,K)^T * cols(M,KD)
 *   input grad     dcols    = dY(M,K) * W(K,KD), scattered back by col2im
 * A 1x1 stride-1 unpadded convolution needs no im2col: X itself is cols.
 * Each thread handles a contiguous range of output rows (backward: of
 * images, so col2im scatters never overlap) in chunks of CHUNK_FLOATS patch
 * floats, so the patch matrix stays in L2 while the GEMM consumes it and a
 * batch of 2048 runs as fast per image as a batch of 64.
 * Where the direct kernels apply (conv_direct.c: multiples of 16 output
 * channels, AVX2) they replace im2col + GEMM image by image; the input
 * gradient of strided convolutions still goes through GEMM + col2im.
 */
#include <omp.h>
#include <string.h>

#include <cblas.h>

#include "cpu/cpu.h"

/* ~128 KiB of patches per chunk, but never fewer than 32 rows. */
#define CHUNK_FLOATS (32 * 1024)
#define MIN_CHUNK_ROWS 32
#define ALIGN_FLOATS 16

static size_t round_up(size_t n) { return (n + ALIGN_FLOATS - 1) / ALIGN_FLOATS * ALIGN_FLOATS; }

int kfac__cpu_conv_is_pointwise(const kfac_conv_desc *d)
{
    return d->kh == 1 && d->kw == 1 && d->stride == 1 && d->pad == 0;
}

static size_t patch_len(const kfac_conv_desc *d) { return (size_t)d->kh * d->kw * d->c; }

static size_t chunk_rows(const kfac_conv_desc *d)
{
    size_t rows = CHUNK_FLOATS / patch_len(d);
    return rows < MIN_CHUNK_ROWS ? MIN_CHUNK_ROWS : rows;
}

/* Workspace: for the direct kernels, the transposed and the flipped
 * weights (K x KD each, shared), then per thread: cols, dcols (chunk_rows x
 * KD each), a private dW (K x KD; transposed, KD x K, on the direct path), a
 * private db (K doubles) and the direct kernels' padded image. */
typedef struct thread_ws {
    float *cols, *dcols, *dw;
    double *db;
    float *padded;
} thread_ws;

static size_t shared_floats(const kfac_conv_desc *d)
{
    return kfac__cpu_direct_ok(d) ? 2 * round_up((size_t)d->k * patch_len(d)) : 0;
}

static size_t thread_ws_floats(const kfac_conv_desc *d)
{
    size_t chunk = round_up(chunk_rows(d) * patch_len(d));
    size_t padded = kfac__cpu_direct_ok(d) ? round_up(kfac__cpu_direct_scratch_floats(d)) : 0;
    return 2 * chunk + round_up((size_t)d->k * patch_len(d)) + round_up(2 * (size_t)d->k) + padded;
}

static thread_ws thread_ws_at(const kfac_conv_desc *d, void *ws, int t)
{
    size_t chunk = round_up(chunk_rows(d) * patch_len(d)), dw = round_up((size_t)d->k * patch_len(d));
    float *base = (float *)ws + shared_floats(d) + (size_t)t * thread_ws_floats(d);
    thread_ws tw;
    tw.cols = base;
    tw.dcols = base + chunk;
    tw.dw = base + 2 * chunk;
    tw.db = (double *)(base + 2 * chunk + dw);
    tw.padded = base + 2 * chunk + dw + round_up(2 * (size_t)d->k);
    return tw;
}

size_t kfac__cpu_conv_workspace(const kfac_backend *be, const kfac_conv_desc *d)
{
    return (shared_floats(d) + (size_t)be->threads * thread_ws_floats(d)) * sizeof(float);
}

/* The [first, end) share of `total` items for thread t of nt. */
static void split_range(size_t total, int t, int nt, size_t *first, size_t *end)
{
    *first = total * (size_t)t / (size_t)nt;
    *end = total * (size_t)(t + 1) / (size_t)nt;
}

/* Patch rows are short (C floats per tap, 3 for the first layer): plain
 * loops the compiler inlines beat memcpy/memset calls, so GCC is told not
 * to turn them back into library calls. */
#define KFAC_INLINE_LOOPS __attribute__((optimize("no-tree-loop-distribute-patterns")))

static inline KFAC_INLINE_LOOPS void copy_floats(float *restrict dst, const float *restrict src,
                                                 size_t n)
{
    for (size_t i = 0; i < n; i++) dst[i] = src[i];
}

static inline KFAC_INLINE_LOOPS void zero_floats(float *dst, size_t n)
{
    for (size_t i = 0; i < n; i++) dst[i] = 0.0f;
}

static inline void add_floats(float *restrict dst, const float *restrict src, size_t n)
{
    for (size_t i = 0; i < n; i++) dst[i] += src[i];
}

/* An output pixel (image, row, column), stepped through in row order
 * without a division per pixel. */
typedef struct out_pixel {
    size_t n;
    int oh, ow;
} out_pixel;

static inline out_pixel out_pixel_of(const kfac_conv_desc *d, size_t row)
{
    size_t plane = (size_t)d->ho * d->wo, p = row % plane;
    out_pixel at = {row / plane, (int)(p / d->wo), (int)(p % d->wo)};
    return at;
}

static inline void out_pixel_next(const kfac_conv_desc *d, out_pixel *at)
{
    if (++at->ow < d->wo) return;
    at->ow = 0;
    if (++at->oh < d->ho) return;
    at->oh = 0;
    at->n++;
}

/* Gathers the patches of output rows [row0, row0+rows) into cols(rows, KD). */
KFAC_INLINE_LOOPS void kfac__cpu_im2col(const kfac_conv_desc *d, const float *x, size_t row0,
                                        size_t rows, float *cols)
{
    const size_t c = (size_t)d->c, span = d->kw * c;
    out_pixel at = out_pixel_of(d, row0);
    for (size_t i = 0; i < rows; i++, out_pixel_next(d, &at)) {
        size_t n = at.n;
        int ih0 = at.oh * d->stride - d->pad, iw0 = at.ow * d->stride - d->pad;
        int inside = iw0 >= 0 && iw0 + d->kw <= d->w;
        float *dst = cols + i * patch_len(d);
        for (int kr = 0; kr < d->kh; kr++, dst += span) {
            int ih = ih0 + kr;
            if (ih < 0 || ih >= d->h) {
                zero_floats(dst, span);
                continue;
            }
            const float *src = x + ((n * d->h + ih) * d->w) * c;
            if (inside) { /* the kernel row's taps are contiguous in x */
                copy_floats(dst, src + iw0 * c, span);
                continue;
            }
            for (int ks = 0; ks < d->kw; ks++) {
                int iw = iw0 + ks;
                if (iw < 0 || iw >= d->w)
                    zero_floats(dst + ks * c, c);
                else
                    copy_floats(dst + ks * c, src + iw * c, c);
            }
        }
    }
}

const float *kfac__cpu_patch_rows(const kfac_conv_desc *d, const float *x, size_t row0,
                                  size_t rows, float *cols)
{
    if (kfac__cpu_conv_is_pointwise(d)) return x + row0 * patch_len(d);
    kfac__cpu_im2col(d, x, row0, rows, cols);
    return cols;
}

/* Adds dcols(rows, KD) back onto the input pixels they were gathered from. */
static void col2im_add(const kfac_conv_desc *d, const float *dcols, size_t row0, size_t rows,
                       float *dx)
{
    const size_t c = (size_t)d->c, span = d->kw * c;
    out_pixel at = out_pixel_of(d, row0);
    for (size_t i = 0; i < rows; i++, out_pixel_next(d, &at)) {
        size_t n = at.n;
        int ih0 = at.oh * d->stride - d->pad, iw0 = at.ow * d->stride - d->pad;
        int inside = iw0 >= 0 && iw0 + d->kw <= d->w;
        const float *src = dcols + i * patch_len(d);
        for (int kr = 0; kr < d->kh; kr++, src += span) {
            int ih = ih0 + kr;
            if (ih < 0 || ih >= d->h) continue;
            float *row = dx + ((n * d->h + ih) * d->w) * c;
            if (inside) {
                add_floats(row + iw0 * c, src, span);
                continue;
            }
            for (int ks = 0; ks < d->kw; ks++) {
                int iw = iw0 + ks;
                if (iw >= 0 && iw < d->w) add_floats(row + iw * c, src + ks * c, c);
            }
        }
    }
}

static void add_bias(const float *bias, size_t rows, size_t k, float *y)
{
    for (size_t i = 0; i < rows; i++)
        for (size_t j = 0; j < k; j++) y[i * k + j] += bias[j];
}

/* Image by image with the direct kernel, images split over threads. */
static void conv_forward_direct(kfac_backend *be, const kfac_conv_desc *d, const float *x,
                                const float *w, const float *bias, float *y, void *ws)
{
    const size_t image = (size_t)d->h * d->w * d->c, plane = (size_t)d->ho * d->wo;
    float *wt = ws;
    kfac__cpu_direct_transpose_weights(d, w, wt);
#pragma omp parallel num_threads(be->threads)
    {
        int t = omp_get_thread_num();
        thread_ws tw = thread_ws_at(d, ws, t);
        size_t first, end;
        split_range((size_t)d->n, t, omp_get_num_threads(), &first, &end);
        for (size_t n = first; n < end; n++) {
            float *out = y + n * plane * d->k;
            kfac__cpu_direct_forward_image(d, x + n * image, wt, out, tw.padded);
            if (bias) add_bias(bias, plane, (size_t)d->k, out);
        }
    }
}

kfac_status kfac__cpu_conv_forward(kfac_backend *be, const kfac_conv_desc *d, const float *x,
                                   const float *w, const float *bias, float *y, void *ws)
{
    const size_t total = (size_t)d->n * d->ho * d->wo, kd = patch_len(d), k = (size_t)d->k;
    const size_t cr = chunk_rows(d);
    if (kfac__cpu_direct_ok(d)) {
        conv_forward_direct(be, d, x, w, bias, y, ws);
        return KFAC_OK;
    }
#pragma omp parallel num_threads(be->threads)
    {
        int t = omp_get_thread_num();
        thread_ws tw = thread_ws_at(d, ws, t);
        size_t first, end;
        split_range(total, t, omp_get_num_threads(), &first, &end);
        for (size_t r = first; r < end; r += cr) {
            size_t rows = end - r < cr ? end - r : cr;
            const float *a = kfac__cpu_patch_rows(d, x, r, rows, tw.cols);
            float *out = y + r * k;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)rows, (int)k, (int)kd, 1.0f,
                        a, (int)kd, w, (int)kd, 0.0f, out, (int)k);
            if (bias) add_bias(bias, rows, k, out);
        }
    }
    return KFAC_OK;
}

static void add_db(const float *g, size_t rows, size_t k, double *db)
{
    for (size_t i = 0; i < rows; i++)
        for (size_t j = 0; j < k; j++) db[j] += g[i * k + j];
}

/* Input gradient of output rows [r, r+rows) of a non-pointwise convolution:
 * dcols = dy * W, scattered back onto dx. */
static void input_grad_gemm(const kfac_conv_desc *d, const float *w, const float *g, size_t r,
                            size_t rows, float *dcols, float *dx)
{
    const size_t kd = patch_len(d), k = (size_t)d->k;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)rows, (int)kd, (int)k, 1.0f, g,
                (int)k, w, (int)kd, 0.0f, dcols, (int)kd);
    col2im_add(d, dcols, r, rows, dx);
}

/* Zeroes a thread's private dW and db and, where the input gradient is
 * scattered (added) rather than written, its images of dx. */
static void begin_backward(const kfac_conv_desc *d, thread_ws tw, float *dx, int zero_dx,
                           size_t n_first, size_t n_end)
{
    const size_t image = (size_t)d->h * d->w * d->c;
    memset(tw.dw, 0, (size_t)d->k * patch_len(d) * sizeof(float));
    memset(tw.db, 0, (size_t)d->k * sizeof(double));
    if (dx && zero_dx) memset(dx + n_first * image, 0, (n_end - n_first) * image * sizeof(float));
}

/* One thread's share of the backward pass over images [n_first, n_end). */
static void conv_backward_images(const kfac_conv_desc *d, const float *x, const float *w,
                                 const float *dy, float *dx, int accumulate, int want_db,
                                 thread_ws tw, size_t n_first, size_t n_end)
{
    const size_t plane = (size_t)d->ho * d->wo, kd = patch_len(d), k = (size_t)d->k;
    const size_t cr = chunk_rows(d);
    const int pointwise = kfac__cpu_conv_is_pointwise(d);
    begin_backward(d, tw, dx, !accumulate && !pointwise, n_first, n_end);
    for (size_t r = n_first * plane, end = n_end * plane; r < end; r += cr) {
        size_t rows = end - r < cr ? end - r : cr;
        const float *g = dy + r * k;
        const float *a = kfac__cpu_patch_rows(d, x, r, rows, tw.cols);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)k, (int)kd, (int)rows, 1.0f, g,
                    (int)k, a, (int)kd, 1.0f, tw.dw, (int)kd);
        if (want_db) add_db(g, rows, k, tw.db);
        if (!dx) continue;
        if (pointwise)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)rows, (int)kd, (int)k,
                        1.0f, g, (int)k, w, (int)kd, accumulate ? 1.0f : 0.0f, dx + r * kd,
                        (int)kd);
        else
            input_grad_gemm(d, w, g, r, rows, tw.dcols, dx);
    }
}

/* The same with the direct kernels, image by image: dW transposed (KD x K)
 * into tw.dw; dx by the flipped kernel wf where that applies, else by
 * GEMM + col2im. */
static void conv_backward_images_direct(const kfac_conv_desc *d, const float *x, const float *w,
                                        const float *wf, const float *dy, float *dx,
                                        int accumulate, int want_db, thread_ws tw,
                                        size_t n_first, size_t n_end)
{
    const size_t plane = (size_t)d->ho * d->wo, k = (size_t)d->k;
    const size_t cr = chunk_rows(d), image = (size_t)d->h * d->w * d->c;
    const int flip = kfac__cpu_direct_input_grad_ok(d);
    begin_backward(d, tw, dx, !accumulate && !flip, n_first, n_end);
    for (size_t n = n_first; n < n_end; n++) {
        const float *g = dy + n * plane * k;
        kfac__cpu_direct_weight_grad_image(d, x + n * image, g, tw.dw, tw.padded);
        if (want_db) add_db(g, plane, k, tw.db);
        if (!dx) continue;
        if (flip) {
            kfac__cpu_direct_input_grad_image(d, g, wf, dx + n * image, accumulate, tw.padded);
            continue;
        }
        for (size_t r = n * plane, end = r + plane; r < end; r += cr)
            input_grad_gemm(d, w, dy + r * k, r, end - r < cr ? end - r : cr, tw.dcols, dx);
    }
}

kfac_status kfac__cpu_conv_backward(kfac_backend *be, const kfac_conv_desc *d, const float *x,
                                    const float *w, const float *dy, float *dx, int accumulate,
                                    float *dw, float *db, void *ws)
{
    const size_t kd = patch_len(d), k = (size_t)d->k;
    const int direct = kfac__cpu_direct_ok(d);
    float *wf = (float *)ws + round_up(k * kd);
    if (direct && dx && kfac__cpu_direct_input_grad_ok(d)) kfac__cpu_direct_flip_weights(d, w, wf);
#pragma omp parallel num_threads(be->threads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        size_t first, end;
        split_range((size_t)d->n, t, nt, &first, &end);
        thread_ws tw = thread_ws_at(d, ws, t);
        if (direct)
            conv_backward_images_direct(d, x, w, wf, dy, dx, accumulate, db != NULL, tw, first, end);
        else
            conv_backward_images(d, x, w, dy, dx, accumulate, db != NULL, tw, first, end);
#pragma omp barrier
        /* Sum the private partials in thread order (deterministic). */
        size_t lo, hi;
        split_range(k * kd, t, nt, &lo, &hi);
        const float *partial[nt];
        for (int u = 0; u < nt; u++) partial[u] = thread_ws_at(d, ws, u).dw;
        for (size_t i = lo; i < hi; i++) {
            size_t at = direct ? (i % kd) * k + i / kd : i; /* (o, j) of KD x K */
            float s = 0.0f;
            for (int u = 0; u < nt; u++) s += partial[u][at];
            dw[i] = s;
        }
        if (db && t == 0)
            for (size_t j = 0; j < k; j++) {
                double s = 0.0;
                for (int u = 0; u < nt; u++) s += thread_ws_at(d, ws, u).db[j];
                db[j] = (float)s;
            }
    }
    return KFAC_OK;
}
