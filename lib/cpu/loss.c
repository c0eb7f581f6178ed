/* loss.c - CPU softmax cross-entropy with label smoothing, its gradient and
 * top-1 accuracy.  Stable log-sum-exp in double per row. */
#include <math.h>

#include "cpu/cpu.h"

kfac_status kfac__cpu_softmax_xent(kfac_backend *be, int n, int classes, const float *logits,
                                   const int32_t *labels, float smoothing, float grad_scale,
                                   float *dlogits, double *loss_sum, int *correct)
{
    double total = 0.0;
    int hits = 0;
    for (int i = 0; i < n; i++) {
        if (labels[i] < 0 || labels[i] >= classes)
            return KFAC_ERR(KFAC_EINVAL, "label %d of sample %d outside [0, %d)", labels[i], i,
                            classes);
    }
#pragma omp parallel for num_threads(be->threads) schedule(static) reduction(+ : total, hits)
    for (int i = 0; i < n; i++) {
        const float *z = logits + (size_t)i * classes;
        int best = 0;
        for (int j = 1; j < classes; j++)
            if (z[j] > z[best]) best = j;
        double zmax = z[best], sumexp = 0.0, sumz = 0.0;
        for (int j = 0; j < classes; j++) {
            sumexp += exp((double)z[j] - zmax);
            sumz += z[j];
        }
        double lse = zmax + log(sumexp);
        double off = smoothing / classes, on = 1.0 - smoothing + off;
        /* loss = -sum_j target_j * (z_j - lse) */
        total += on * (lse - z[labels[i]]) + off * (classes * lse - sumz) - off * (lse - z[labels[i]]);
        hits += best == labels[i];
        if (dlogits) {
            float *g = dlogits + (size_t)i * classes;
            for (int j = 0; j < classes; j++) {
                double target = j == labels[i] ? on : off;
                g[j] = (float)((exp((double)z[j] - lse) - target) / n * grad_scale);
            }
        }
    }
    if (!loss_sum || !correct) { /* for xent_result; the CPU's work is done now */
        loss_sum = &kfac__cpu(be)->xent_loss;
        correct = &kfac__cpu(be)->xent_correct;
    }
    *loss_sum = total;
    *correct = hits;
    return KFAC_OK;
}

kfac_status kfac__cpu_xent_result(kfac_backend *be, int n, int classes, const int32_t *labels,
                                  double *loss_sum, int *correct)
{
    (void)n, (void)classes, (void)labels; /* checked when the loss was computed */
    *loss_sum = kfac__cpu(be)->xent_loss;
    *correct = kfac__cpu(be)->xent_correct;
    return KFAC_OK;
}
