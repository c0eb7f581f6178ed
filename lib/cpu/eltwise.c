/* eltwise.c - CPU element-wise operations: ReLU, residual add (+ReLU),
 * fill, and the fused momentum-SGD update.  Memory-bound loops, split
 * statically over threads. */
#include <math.h>

#include "cpu/cpu.h"

kfac_status kfac__cpu_fill(kfac_backend *be, float *x, float value, size_t n)
{
#pragma omp parallel for num_threads(be->threads) schedule(static)
    for (size_t i = 0; i < n; i++) x[i] = value;
    return KFAC_OK;
}

kfac_status kfac__cpu_relu_forward(kfac_backend *be, size_t n, const float *x, float *y)
{
#pragma omp parallel for num_threads(be->threads) schedule(static)
    for (size_t i = 0; i < n; i++) y[i] = x[i] > 0.0f ? x[i] : 0.0f;
    return KFAC_OK;
}

kfac_status kfac__cpu_relu_backward(kfac_backend *be, size_t n, const float *y, const float *dy,
                                    float *dx, int accumulate)
{
#pragma omp parallel for num_threads(be->threads) schedule(static)
    for (size_t i = 0; i < n; i++) {
        float g = y[i] > 0.0f ? dy[i] : 0.0f;
        dx[i] = accumulate ? dx[i] + g : g;
    }
    return KFAC_OK;
}

kfac_status kfac__cpu_add_forward(kfac_backend *be, size_t n, const float *a, const float *b,
                                  float *y, int relu)
{
#pragma omp parallel for num_threads(be->threads) schedule(static)
    for (size_t i = 0; i < n; i++) {
        float v = a[i] + b[i];
        y[i] = relu && v < 0.0f ? 0.0f : v;
    }
    return KFAC_OK;
}

kfac_status kfac__cpu_add_backward(kfac_backend *be, size_t n, const float *y, const float *dy,
                                   float *da, int acc_a, float *db, int acc_b, int relu)
{
#pragma omp parallel for num_threads(be->threads) schedule(static)
    for (size_t i = 0; i < n; i++) {
        float g = (relu && y[i] <= 0.0f) ? 0.0f : dy[i];
        da[i] = acc_a ? da[i] + g : g;
        db[i] = acc_b ? db[i] + g : g;
    }
    return KFAC_OK;
}

kfac_status kfac__cpu_scale_grads(kfac_backend *be, size_t n, float *g, float scale, int *finite)
{
    int bad = 0;
#pragma omp parallel for num_threads(be->threads) schedule(static) reduction(| : bad)
    for (size_t i = 0; i < n; i++) {
        g[i] *= scale;
        bad |= !isfinite(g[i]);
    }
    *finite = !bad;
    return KFAC_OK;
}

kfac_status kfac__cpu_sgd_update(kfac_backend *be, size_t n, float *p, const float *g, float *v,
                                 float lr, float mom, float wd, int nesterov)
{
#pragma omp parallel for num_threads(be->threads) schedule(static)
    for (size_t i = 0; i < n; i++) {
        float gi = g[i] + wd * p[i];
        float vi = mom * v[i] + gi;
        v[i] = vi;
        p[i] -= lr * (nesterov ? gi + mom * vi : vi);
    }
    return KFAC_OK;
}
