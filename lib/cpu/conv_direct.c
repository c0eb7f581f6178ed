/* conv_direct.c - direct convolution kernels: GEMM micro-kernels that read
 * each output pixel's patch in place instead of from an im2col matrix.
 *
 * In NHWC an output pixel's patch is KH runs of KW*C contiguous floats, one
 * per kernel row, once the image is zero-padded.  So each image is copied
 * into a padded buffer (one pass over x instead of the KH*KW-fold im2col
 * write, and no BLAS packing copy after it) and the micro-kernels walk the
 * runs directly.  Register tiles (AVX2 + FMA, 12 of the 16 ymm registers):
 *   forward       6 pixels x 16 output channels, over the KH*KW*C patch;
 *   weight grad   6 patch entries x 16 output channels, over the image's
 *                 pixels;
 *   input grad    the forward of the flipped kernel over the padded output
 *                 gradient (stride 1 only: then it is a plain convolution).
 * Weights are used transposed, wt(KD, K) with KD = KH*KW*C, so a patch
 * entry meets 16 contiguous output channels.  Sums run in a fixed order
 * per image: results do not depend on the thread count. */
#include <string.h>

#include "cpu/cpu.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DIRECT_KERNELS 1
#else
#define DIRECT_KERNELS 0
#endif

#define TILE_PIXELS 6
#define TILE_CHANNELS 16

/* lo/hi (two 8-channel halves of one tile row) += broadcast(*src) * (v0, v1). */
#define FMA_ROW(lo, hi, src, v0, v1)                  \
    do {                                              \
        __m256 fma_b = _mm256_broadcast_ss(src);      \
        lo = _mm256_fmadd_ps(fma_b, v0, lo);          \
        hi = _mm256_fmadd_ps(fma_b, v1, hi);          \
    } while (0)

/* The kernels stream one image's padded input, its output (gradient) and
 * the weights many times: they win while those stay in L2 (small layers:
 * resnet8/20's are at most 45K floats).  Larger layers (ResNet-50's) ran
 * 20% slower than im2col + OpenBLAS, whose blocking is built for them. */
#define DIRECT_MAX_FLOATS (96 * 1024)

static size_t padded_floats(const kfac_conv_desc *d)
{
    return (size_t)(d->h + 2 * d->pad) * (d->w + 2 * d->pad) * d->c;
}

int kfac__cpu_direct_ok(const kfac_conv_desc *d)
{
    size_t working_set = padded_floats(d) + (size_t)d->ho * d->wo * d->k +
                         (size_t)d->kh * d->kw * d->c * d->k;
    return DIRECT_KERNELS && !kfac__cpu_conv_is_pointwise(d) && d->k % TILE_CHANNELS == 0 &&
           working_set <= DIRECT_MAX_FLOATS;
}

/* The input gradient as a convolution of dy needs stride 1, a square
 * kernel and padding that leaves the flipped kernel a valid padding. */
int kfac__cpu_direct_input_grad_ok(const kfac_conv_desc *d)
{
    return kfac__cpu_direct_ok(d) && d->stride == 1 && d->kh == d->kw && d->pad <= d->kh - 1 &&
           d->c % TILE_CHANNELS == 0;
}

/* The flipped convolution that maps dy (ho, wo, k) to dx (h, w, c). */
static kfac_conv_desc flipped(const kfac_conv_desc *d)
{
    kfac_conv_desc f;
    kfac_conv_desc_init(&f, 1, d->ho, d->wo, d->k, d->c, d->kh, d->kw, 1, d->kh - 1 - d->pad);
    return f;
}

size_t kfac__cpu_direct_scratch_floats(const kfac_conv_desc *d)
{
    size_t n = padded_floats(d);
    if (kfac__cpu_direct_input_grad_ok(d)) {
        kfac_conv_desc f = flipped(d);
        if (padded_floats(&f) > n) n = padded_floats(&f);
    }
    return n;
}

void kfac__cpu_direct_transpose_weights(const kfac_conv_desc *d, const float *w, float *wt)
{
    const size_t kd = (size_t)d->kh * d->kw * d->c, k = (size_t)d->k;
    for (size_t o = 0; o < k; o++)
        for (size_t j = 0; j < kd; j++) wt[j * k + o] = w[o * kd + j];
}

/* wf(KH*KW*K, C): entry ((r, s, o), c) = w(o, KH-1-r, KW-1-s, c). */
void kfac__cpu_direct_flip_weights(const kfac_conv_desc *d, const float *w, float *wf)
{
    const size_t c = (size_t)d->c, k = (size_t)d->k;
    for (int r = 0; r < d->kh; r++)
        for (int s = 0; s < d->kw; s++)
            for (size_t o = 0; o < k; o++) {
                const float *src = w + ((o * d->kh + (d->kh - 1 - r)) * d->kw + (d->kw - 1 - s)) * c;
                float *dst = wf + (((size_t)r * d->kw + s) * k + o) * c;
                memcpy(dst, src, c * sizeof(float));
            }
}

/* One image (h, w, c) into buf with `pad` zero pixels on every side. */
static void pad_image(const float *img, int h, int w, int c, int pad, float *buf)
{
    const size_t row = (size_t)(w + 2 * pad) * c, edge = (size_t)pad * c;
    memset(buf, 0, pad * row * sizeof(float));
    for (int i = 0; i < h; i++) {
        float *dst = buf + (i + pad) * row;
        memset(dst, 0, edge * sizeof(float));
        memcpy(dst + edge, img + (size_t)i * w * c, (size_t)w * c * sizeof(float));
        memset(dst + edge + (size_t)w * c, 0, edge * sizeof(float));
    }
    memset(buf + (h + pad) * row, 0, pad * row * sizeof(float));
}

#if DIRECT_KERNELS

/* y(np, 16) (+)= patches(np, KD) * wt(KD, 16): a[i] is pixel i's first
 * run; run r starts run_stride floats later; wt's rows are k floats apart. */
static inline void tile_forward(const float *const a[TILE_PIXELS], size_t run_stride, int runs,
                                int span, const float *wt, size_t k, float *y, int np,
                                int accumulate)
{
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (int r = 0; r < runs; r++) {
        const size_t off = (size_t)r * run_stride;
        const float *a0 = a[0] + off, *a1 = a[1] + off, *a2 = a[2] + off;
        const float *a3 = a[3] + off, *a4 = a[4] + off, *a5 = a[5] + off;
        const float *w = wt + (size_t)r * span * k;
        for (int j = 0; j < span; j++, w += k) {
            __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8);
            FMA_ROW(c00, c01, a0 + j, w0, w1);
            FMA_ROW(c10, c11, a1 + j, w0, w1);
            FMA_ROW(c20, c21, a2 + j, w0, w1);
            FMA_ROW(c30, c31, a3 + j, w0, w1);
            FMA_ROW(c40, c41, a4 + j, w0, w1);
            FMA_ROW(c50, c51, a5 + j, w0, w1);
        }
    }
    __m256 acc[TILE_PIXELS][2] = {{c00, c01}, {c10, c11}, {c20, c21},
                                  {c30, c31}, {c40, c41}, {c50, c51}};
    for (int i = 0; i < np; i++) {
        float *out = y + (size_t)i * k;
        if (accumulate) {
            acc[i][0] = _mm256_add_ps(acc[i][0], _mm256_loadu_ps(out));
            acc[i][1] = _mm256_add_ps(acc[i][1], _mm256_loadu_ps(out + 8));
        }
        _mm256_storeu_ps(out, acc[i][0]);
        _mm256_storeu_ps(out + 8, acc[i][1]);
    }
}

/* Convolution of one zero-padded image xp (wp pixels a row) into y(ho*wo, k). */
static void forward_padded(const kfac_conv_desc *d, const float *xp, int wp, const float *wt,
                           float *y, int accumulate)
{
    const size_t c = (size_t)d->c, k = (size_t)d->k, run_stride = (size_t)wp * c;
    const int pixels = d->ho * d->wo, span = d->kw * d->c;
    for (int p0 = 0; p0 < pixels; p0 += TILE_PIXELS) {
        int np = pixels - p0 < TILE_PIXELS ? pixels - p0 : TILE_PIXELS;
        const float *a[TILE_PIXELS];
        for (int i = 0; i < TILE_PIXELS; i++) {
            int p = p0 + (i < np ? i : 0); /* spare lanes repeat pixel 0, unused */
            int oh = p / d->wo, ow = p % d->wo;
            a[i] = xp + ((size_t)oh * d->stride * wp + (size_t)ow * d->stride) * c;
        }
        for (size_t k0 = 0; k0 < k; k0 += TILE_CHANNELS)
            tile_forward(a, run_stride, d->kh, span, wt + k0, k, y + (size_t)p0 * k + k0, np,
                         accumulate);
    }
}

void kfac__cpu_direct_forward_image(const kfac_conv_desc *d, const float *x, const float *wt,
                                    float *y, float *scratch)
{
    pad_image(x, d->h, d->w, d->c, d->pad, scratch);
    forward_padded(d, scratch, d->w + 2 * d->pad, wt, y, 0);
}

void kfac__cpu_direct_input_grad_image(const kfac_conv_desc *d, const float *dy, const float *wf,
                                       float *dx, int accumulate, float *scratch)
{
    kfac_conv_desc f = flipped(d);
    pad_image(dy, f.h, f.w, f.c, f.pad, scratch);
    forward_padded(&f, scratch, f.w + 2 * f.pad, wf, dx, accumulate);
}

/* Adds a register pair to 16 floats of dwt. */
static inline void add_row(float *out, __m256 lo, __m256 hi)
{
    _mm256_storeu_ps(out, _mm256_add_ps(lo, _mm256_loadu_ps(out)));
    _mm256_storeu_ps(out + 8, _mm256_add_ps(hi, _mm256_loadu_ps(out + 8)));
}

/* dwt rows j0..j0+5 of run r, 16 channels from k0 (dwt and dy offset by k0):
 *   dwt(r*span + j0 + jj, k0..) += sum over pixels of patch(p, r, j0+jj) dy(p, k0..).
 * Named accumulators: an array of them would live on the stack. */
static void tile_weight_grad6(const kfac_conv_desc *d, const float *xp, int wp, const float *dy,
                              int r, int j0, float *dwt)
{
    const size_t c = (size_t)d->c, k = (size_t)d->k, step = (size_t)d->stride * c;
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    const float *g = dy;
    for (int oh = 0; oh < d->ho; oh++) {
        const float *a = xp + ((size_t)(oh * d->stride + r) * wp) * c + j0;
        for (int ow = 0; ow < d->wo; ow++, a += step, g += k) {
            __m256 g0 = _mm256_loadu_ps(g), g1 = _mm256_loadu_ps(g + 8);
            FMA_ROW(c00, c01, a, g0, g1);
            FMA_ROW(c10, c11, a + 1, g0, g1);
            FMA_ROW(c20, c21, a + 2, g0, g1);
            FMA_ROW(c30, c31, a + 3, g0, g1);
            FMA_ROW(c40, c41, a + 4, g0, g1);
            FMA_ROW(c50, c51, a + 5, g0, g1);
        }
    }
    float *out = dwt + ((size_t)r * d->kw * d->c + j0) * k;
    add_row(out, c00, c01);
    add_row(out + k, c10, c11);
    add_row(out + 2 * k, c20, c21);
    add_row(out + 3 * k, c30, c31);
    add_row(out + 4 * k, c40, c41);
    add_row(out + 5 * k, c50, c51);
}

/* The same for the single row j0 (the run's tail when KW*C is not a multiple of 6). */
static void tile_weight_grad1(const kfac_conv_desc *d, const float *xp, int wp, const float *dy,
                              int r, int j0, float *dwt)
{
    const size_t c = (size_t)d->c, k = (size_t)d->k, step = (size_t)d->stride * c;
    __m256 c0 = _mm256_setzero_ps(), c1 = c0;
    const float *g = dy;
    for (int oh = 0; oh < d->ho; oh++) {
        const float *a = xp + ((size_t)(oh * d->stride + r) * wp) * c + j0;
        for (int ow = 0; ow < d->wo; ow++, a += step, g += k) {
            FMA_ROW(c0, c1, a, _mm256_loadu_ps(g), _mm256_loadu_ps(g + 8));
        }
    }
    add_row(dwt + ((size_t)r * d->kw * d->c + j0) * k, c0, c1);
}

void kfac__cpu_direct_weight_grad_image(const kfac_conv_desc *d, const float *x, const float *dy,
                                        float *dwt, float *scratch)
{
    const int wp = d->w + 2 * d->pad, span = d->kw * d->c;
    pad_image(x, d->h, d->w, d->c, d->pad, scratch);
    for (int r = 0; r < d->kh; r++)
        for (size_t k0 = 0; k0 < (size_t)d->k; k0 += TILE_CHANNELS) {
            int j0 = 0;
            for (; j0 + TILE_PIXELS <= span; j0 += TILE_PIXELS)
                tile_weight_grad6(d, scratch, wp, dy + k0, r, j0, dwt + k0);
            for (; j0 < span; j0++) tile_weight_grad1(d, scratch, wp, dy + k0, r, j0, dwt + k0);
        }
}

#else /* no AVX2: kfac__cpu_direct_ok is 0 and these are never called */

void kfac__cpu_direct_forward_image(const kfac_conv_desc *d, const float *x, const float *wt,
                                    float *y, float *scratch)
{
    (void)d, (void)x, (void)wt, (void)y, (void)scratch, (void)pad_image;
}

void kfac__cpu_direct_input_grad_image(const kfac_conv_desc *d, const float *dy, const float *wf,
                                       float *dx, int accumulate, float *scratch)
{
    (void)d, (void)dy, (void)wf, (void)dx, (void)accumulate, (void)scratch;
}

void kfac__cpu_direct_weight_grad_image(const kfac_conv_desc *d, const float *x, const float *dy,
                                        float *dwt, float *scratch)
{
    (void)d, (void)x, (void)dy, (void)dwt, (void)scratch;
}

#endif
