/* resize.c - antialiased bilinear resize (resize.h), the algorithm of
 * Pillow's ImagingResample for 8-bit images so that our shards match what
 * a Python pipeline would feed a model: each output pixel averages the
 * input pixels under a triangle of half-width max(1, in/out) input pixels
 * centred on it, weights normalised then rounded to 22-bit fixed point;
 * rows first (results rounded to uint8), then columns.  The double
 * arithmetic below is written in Pillow's order on purpose: the weights,
 * and so the pixels, are then identical. */
#include "data/resize.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { PRECISION_BITS = 32 - 8 - 2 }; /* Pillow's: sums of 255 * weights fit an int32 */

static double triangle(double x)
{
    if (x < 0.0) x = -x;
    return x < 1.0 ? 1.0 - x : 0.0;
}

static uint8_t clip8(int32_t v)
{
    if (v >= (1 << PRECISION_BITS << 8)) return 255;
    if (v <= 0) return 0;
    return (uint8_t)(v >> PRECISION_BITS);
}

/* Grows *p to at least n elements of size `size`. */
static int grow(void **p, size_t *cap, size_t n, size_t size)
{
    if (n <= *cap) return 1;
    void *q = realloc(*p, n * size);
    if (!q) return 0;
    *p = q;
    *cap = n;
    return 1;
}

/* Kernel length when `scale` input pixels make one output pixel. */
static int kernel_size_of(double scale)
{
    return (int)ceil(scale < 1.0 ? 1.0 : scale) * 2 + 1;
}

/* Pillow's precompute_coeffs and normalize_coeffs_8bpc for the outputs
 * [first, first + count) of out_size: bounds[2i] is the first input,
 * bounds[2i+1] the number of inputs, coef[i*ksize ...] their weights. */
static void coefficients(int in_size, int out_size, int first, int count, int ksize, double *wd,
                         int *bounds, int32_t *coef)
{
    double scale = (double)in_size / out_size;
    double filterscale = scale < 1.0 ? 1.0 : scale;
    double support = 1.0 * filterscale; /* the triangle's support is 1 */
    double ss = 1.0 / filterscale;
    for (int i = 0; i < count; i++) {
        int xx = first + i;
        double center = (xx + 0.5) * scale, ww = 0.0;
        int xmin = (int)(center - support + 0.5);
        if (xmin < 0) xmin = 0;
        int xmax = (int)(center + support + 0.5);
        if (xmax > in_size) xmax = in_size;
        xmax -= xmin;
        for (int x = 0; x < xmax; x++) {
            double w = triangle((x + xmin - center + 0.5) * ss);
            wd[x] = w;
            ww += w;
        }
        int32_t *k = coef + (size_t)i * ksize;
        for (int x = 0; x < ksize; x++) {
            double w = x < xmax && ww != 0.0 ? wd[x] / ww : 0.0;
            k[x] = (int32_t)(w < 0 ? -0.5 + w * (1 << PRECISION_BITS)
                                   : 0.5 + w * (1 << PRECISION_BITS));
        }
        bounds[2 * i] = xmin;
        bounds[2 * i + 1] = xmax;
    }
}

/* Rows [y0, y1) of `in` (in_w x c) resampled horizontally into tmp
 * ((y1-y0) x count x c).  Inlined per channel count so the inner loops
 * are specialised. */
static inline __attribute__((always_inline)) void
horizontal(const uint8_t *in, int in_w, int c, int y0, int y1, int count, int ksize,
           const int *bounds, const int32_t *coef, uint8_t *tmp)
{
    for (int y = y0; y < y1; y++) {
        const uint8_t *row = in + (size_t)y * in_w * c;
        uint8_t *dst = tmp + (size_t)(y - y0) * count * c;
        for (int i = 0; i < count; i++) {
            const uint8_t *src = row + (size_t)bounds[2 * i] * c;
            const int32_t *k = coef + (size_t)i * ksize;
            int n = bounds[2 * i + 1];
            int32_t acc[4] = {1 << (PRECISION_BITS - 1), 1 << (PRECISION_BITS - 1),
                              1 << (PRECISION_BITS - 1), 1 << (PRECISION_BITS - 1)};
            for (int x = 0; x < n; x++)
                for (int ch = 0; ch < c; ch++) acc[ch] += src[x * c + ch] * k[x];
            for (int ch = 0; ch < c; ch++) dst[i * c + ch] = clip8(acc[ch]);
        }
    }
}

/* Output rows from src (rows of `row_len` bytes, stride `stride`): row j
 * sums rows bounds[2j] - y0 ... with its weights.  The sum runs row by row
 * into acc so the inner loop is a contiguous multiply-add. */
static void vertical(const uint8_t *src, size_t stride, int row_len, int y0, int count,
                     int ksize, const int *bounds, const int32_t *coef, int32_t *acc,
                     uint8_t *out)
{
    for (int j = 0; j < count; j++) {
        const int32_t *k = coef + (size_t)j * ksize;
        const uint8_t *first = src + (size_t)(bounds[2 * j] - y0) * stride;
        for (int x = 0; x < row_len; x++) acc[x] = 1 << (PRECISION_BITS - 1);
        for (int y = 0; y < bounds[2 * j + 1]; y++) {
            const uint8_t *r = first + (size_t)y * stride;
            int32_t w = k[y];
            for (int x = 0; x < row_len; x++) acc[x] += r[x] * w;
        }
        uint8_t *dst = out + (size_t)j * row_len;
        for (int x = 0; x < row_len; x++) dst[x] = clip8(acc[x]);
    }
}

kfac_status kfac__resize(const uint8_t *in, int in_h, int in_w, int c, int out_h, int out_w,
                         int top, int left, int win_h, int win_w, uint8_t *out,
                         kfac__resize_work *work)
{
    /* Pillow skips a pass whose size does not change; it would be exact. */
    int need_h = out_w != in_w, need_v = out_h != in_h;
    int ksh = need_h ? kernel_size_of((double)in_w / out_w) : 0;
    int ksv = need_v ? kernel_size_of((double)in_h / out_h) : 0;
    size_t ncoef = (size_t)win_w * ksh + (size_t)win_h * ksv;
    size_t nbounds = 2 * ((size_t)win_w + (size_t)win_h);
    size_t nwd = (size_t)(ksh > ksv ? ksh : ksv) + 1;
    if (!grow((void **)&work->coef, &work->coef_cap, ncoef + 1, sizeof *work->coef) ||
        !grow((void **)&work->bounds, &work->bounds_cap, nbounds, sizeof *work->bounds) ||
        !grow((void **)&work->wd, &work->wd_cap, nwd, sizeof *work->wd) ||
        !grow((void **)&work->acc, &work->acc_cap, (size_t)win_w * c, sizeof *work->acc))
        return KFAC_ERR(KFAC_ENOMEM, "resize %dx%d -> %dx%d: out of memory", in_w, in_h, out_w,
                        out_h);
    int *hb = work->bounds, *vb = work->bounds + 2 * (size_t)win_w;
    int32_t *hk = work->coef, *vk = work->coef + (size_t)win_w * ksh;
    if (need_h) coefficients(in_w, out_w, left, win_w, ksh, work->wd, hb, hk);
    if (need_v) coefficients(in_h, out_h, top, win_h, ksv, work->wd, vb, vk);

    /* Input rows the vertical pass reads: [y0, y1). */
    int y0 = need_v ? vb[0] : top;
    int y1 = need_v ? vb[2 * (win_h - 1)] + vb[2 * (win_h - 1) + 1] : top + win_h;
    int row_len = win_w * c;
    const uint8_t *rows; /* row y0 of the horizontally resampled image */
    size_t stride;
    if (need_h) {
        if (!grow((void **)&work->tmp, &work->tmp_cap, (size_t)(y1 - y0) * row_len, 1))
            return KFAC_ERR(KFAC_ENOMEM, "resize %dx%d -> %dx%d: out of memory", in_w, in_h,
                            out_w, out_h);
        switch (c) {
        case 1: horizontal(in, in_w, 1, y0, y1, win_w, ksh, hb, hk, work->tmp); break;
        case 3: horizontal(in, in_w, 3, y0, y1, win_w, ksh, hb, hk, work->tmp); break;
        default: horizontal(in, in_w, c, y0, y1, win_w, ksh, hb, hk, work->tmp); break;
        }
        rows = work->tmp;
        stride = (size_t)row_len;
    } else {
        rows = in + ((size_t)y0 * in_w + left) * c;
        stride = (size_t)in_w * c;
    }
    if (need_v) {
        vertical(rows, stride, row_len, y0, win_h, ksv, vb, vk, work->acc, out);
    } else {
        for (int j = 0; j < win_h; j++)
            memcpy(out + (size_t)j * row_len, rows + (size_t)j * stride, (size_t)row_len);
    }
    return KFAC_OK;
}

kfac_status kfac__resize_reserve(kfac__resize_work *work, int max_in_h, int c, int out_h,
                                 int out_w, double max_scale)
{
    size_t k = (size_t)kernel_size_of(max_scale);
    if (!grow((void **)&work->coef, &work->coef_cap, ((size_t)out_w + out_h) * k + 1,
              sizeof *work->coef) ||
        !grow((void **)&work->bounds, &work->bounds_cap, 2 * ((size_t)out_w + out_h),
              sizeof *work->bounds) ||
        !grow((void **)&work->wd, &work->wd_cap, k + 1, sizeof *work->wd) ||
        !grow((void **)&work->acc, &work->acc_cap, (size_t)out_w * c, sizeof *work->acc) ||
        !grow((void **)&work->tmp, &work->tmp_cap, (size_t)max_in_h * out_w * c, 1))
        return KFAC_ERR(KFAC_ENOMEM, "resize: cannot reserve scratch for %dx%d outputs", out_w,
                        out_h);
    return KFAC_OK;
}

void kfac__resize_shape(int in_h, int in_w, int side, int *out_h, int *out_w)
{
    *out_h = in_h;
    *out_w = in_w;
    if (side <= 0) return;
    /* 64-bit product: sides are bounded by the pixel limit, side by 2^16. */
    if (in_h <= in_w) {
        long long w = (long long)in_w * side / in_h;
        *out_h = side;
        *out_w = w < 1 ? 1 : (int)w;
    } else {
        long long h = (long long)in_h * side / in_w;
        *out_w = side;
        *out_h = h < 1 ? 1 : (int)h;
    }
}

void kfac__resize_work_free(kfac__resize_work *w)
{
    free(w->wd);
    free(w->coef);
    free(w->bounds);
    free(w->tmp);
    free(w->acc);
    memset(w, 0, sizeof *w);
}
