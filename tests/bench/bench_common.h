/* bench_common.h - small pieces the benchmark programs share: a monotonic
 * clock, and the micro-batch loader of a fixed synthetic batch. */
#ifndef KFAC_BENCH_COMMON_H
#define KFAC_BENCH_COMMON_H

#include <time.h>

#include "kfac/kfac_step.h"

static inline double bench_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* The same batch at every step, already in the model's input. */
typedef struct bench_fixed_batch {
    int n;
    const int32_t *labels;
} bench_fixed_batch;

/* A kfac_micro_loader over a bench_fixed_batch. */
static inline kfac_status bench_load_fixed(void *user, int micro, int *n, const int32_t **labels)
{
    const bench_fixed_batch *fb = user;
    (void)micro;
    *n = fb->n;
    *labels = fb->labels;
    return KFAC_OK;
}

#endif
