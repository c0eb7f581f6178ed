/* pool.c - CPU max pooling (padding never wins the max) and global average
 * pooling, NHWC, split over images. */
#include <float.h>
#include <string.h>

#include "cpu/cpu.h"

kfac_status kfac__cpu_maxpool_forward(kfac_backend *be, const kfac_pool_desc *d, const float *x,
                                      float *y)
{
    const int c = d->c;
#pragma omp parallel for num_threads(be->threads) schedule(static)
    for (int n = 0; n < d->n; n++)
        for (int oh = 0; oh < d->ho; oh++)
            for (int ow = 0; ow < d->wo; ow++) {
                float *out = y + (((size_t)n * d->ho + oh) * d->wo + ow) * c;
                for (int j = 0; j < c; j++) out[j] = -FLT_MAX;
                for (int kr = 0; kr < d->kh; kr++) {
                    int ih = oh * d->stride - d->pad + kr;
                    if (ih < 0 || ih >= d->h) continue;
                    for (int ks = 0; ks < d->kw; ks++) {
                        int iw = ow * d->stride - d->pad + ks;
                        if (iw < 0 || iw >= d->w) continue;
                        const float *in = x + (((size_t)n * d->h + ih) * d->w + iw) * c;
                        for (int j = 0; j < c; j++) out[j] = in[j] > out[j] ? in[j] : out[j];
                    }
                }
            }
    return KFAC_OK;
}

/* The gradient goes to the first input in scan order equal to the max. */
kfac_status kfac__cpu_maxpool_backward(kfac_backend *be, const kfac_pool_desc *d, const float *x,
                                       const float *y, const float *dy, float *dx, int accumulate)
{
    const int c = d->c;
    const size_t image = (size_t)d->h * d->w * c;
#pragma omp parallel for num_threads(be->threads) schedule(static)
    for (int n = 0; n < d->n; n++) {
        if (!accumulate) memset(dx + n * image, 0, image * sizeof(float));
        for (int oh = 0; oh < d->ho; oh++)
            for (int ow = 0; ow < d->wo; ow++) {
                size_t o = (((size_t)n * d->ho + oh) * d->wo + ow) * c;
                for (int j = 0; j < c; j++) {
                    int done = 0;
                    for (int kr = 0; kr < d->kh && !done; kr++) {
                        int ih = oh * d->stride - d->pad + kr;
                        if (ih < 0 || ih >= d->h) continue;
                        for (int ks = 0; ks < d->kw; ks++) {
                            int iw = ow * d->stride - d->pad + ks;
                            if (iw < 0 || iw >= d->w) continue;
                            size_t i = (((size_t)n * d->h + ih) * d->w + iw) * c + j;
                            if (x[i] == y[o + j]) {
                                dx[i] += dy[o + j];
                                done = 1;
                                break;
                            }
                        }
                    }
                }
            }
    }
    return KFAC_OK;
}

kfac_status kfac__cpu_gap_forward(kfac_backend *be, int n, int hw, int c, const float *x,
                                  float *y)
{
#pragma omp parallel for num_threads(be->threads) schedule(static)
    for (int i = 0; i < n; i++) {
        float *out = y + (size_t)i * c;
        for (int j = 0; j < c; j++) out[j] = 0.0f;
        for (int p = 0; p < hw; p++) {
            const float *in = x + ((size_t)i * hw + p) * c;
            for (int j = 0; j < c; j++) out[j] += in[j];
        }
        for (int j = 0; j < c; j++) out[j] /= (float)hw;
    }
    return KFAC_OK;
}

kfac_status kfac__cpu_gap_backward(kfac_backend *be, int n, int hw, int c, const float *dy,
                                   float *dx, int accumulate)
{
    const float inv = 1.0f / (float)hw;
#pragma omp parallel for num_threads(be->threads) schedule(static)
    for (int i = 0; i < n; i++)
        for (int p = 0; p < hw; p++) {
            float *out = dx + ((size_t)i * hw + p) * c;
            const float *g = dy + (size_t)i * c;
            for (int j = 0; j < c; j++) out[j] = (accumulate ? out[j] : 0.0f) + g[j] * inv;
        }
    return KFAC_OK;
}
