/* clock.h - internal: the monotonic clock every timing in the library
 * reads (step times, loader waits, staging and prep rates). */
#ifndef KFAC_CORE_CLOCK_H
#define KFAC_CORE_CLOCK_H

#include <time.h>

/* Seconds on CLOCK_MONOTONIC: only differences mean anything. */
static inline double kfac__now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

#endif
