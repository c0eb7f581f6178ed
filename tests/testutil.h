/* testutil.h - tiny assertion helpers shared by the unit tests.
 *
 * CHECK records a failure with file:line and continues, so one run reports
 * every broken assertion; a test's main returns test_summary(), which prints
 * "N passed, N failed" and is non-zero when anything failed. */
#ifndef KFAC_TESTUTIL_H
#define KFAC_TESTUTIL_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int test_passed_count, test_failed_count;

#define CHECK(cond, ...)                                                      \
    do {                                                                      \
        if (cond) {                                                           \
            test_passed_count++;                                              \
        } else {                                                              \
            test_failed_count++;                                              \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);   \
            fprintf(stderr, __VA_ARGS__);                                     \
            fputc('\n', stderr);                                              \
        }                                                                     \
    } while (0)

/* Asserts a kfac_status call succeeded, printing the library's message. */
#define CHECK_OK(expr)                                                        \
    do {                                                                      \
        kfac_status st__ = (expr);                                            \
        CHECK(st__ == KFAC_OK, "%s -> %s: %s (%s)", #expr, kfac_status_str(st__), \
              kfac_last_error(), kfac_last_error_where());                    \
    } while (0)

/* For the GPU tests (kfac_backend.h included): returns 77 from main,
 * printing "skipped: no GPU", where this build has no CUDA or no GPU is
 * visible; a CUDA backend failing otherwise is a test failure. */
#define TEST_REQUIRE_GPU(test_name)                                           \
    do {                                                                      \
        kfac_backend *gpu__ = NULL;                                           \
        kfac_status gst__ = kfac_backend_get("cuda", 0, &gpu__);              \
        if (gst__ == KFAC_ENOTSUP || gst__ == KFAC_ENODEV) {                  \
            printf("skipped: no GPU (%s)\n", kfac_last_error());              \
            return 77;                                                        \
        }                                                                     \
        CHECK(gst__ == KFAC_OK, "cuda backend: %s", kfac_last_error());       \
        kfac_backend_free(gpu__);                                             \
        if (gst__ != KFAC_OK) return test_summary(test_name);                 \
    } while (0)

/* Largest relative error max|a-b| / max(max|b|, floor) over n elements. */
static inline double test_max_rel_err(const float *a, const double *b, size_t n, double floor_)
{
    double max_abs_diff = 0, max_ref = floor_;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (!(d <= max_abs_diff)) max_abs_diff = d; /* also catches NaN */
        if (fabs(b[i]) > max_ref) max_ref = fabs(b[i]);
    }
    return max_abs_diff / max_ref;
}

/* A whole file in a malloc'ed buffer (NUL-terminated, *n bytes before the
 * NUL), or NULL when it cannot be read. */
static inline char *test_read_file(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = len >= 0 ? malloc((size_t)len + 1) : NULL;
    if (buf && fread(buf, 1, (size_t)len, f) != (size_t)len) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    if (buf) buf[len] = '\0', *n = (size_t)len;
    return buf;
}

/* Whether two files have the same bytes. */
static inline int test_same_file(const char *a, const char *b)
{
    size_t na = 0, nb = 0;
    char *x = test_read_file(a, &na), *y = test_read_file(b, &nb);
    int same = x && y && na == nb && memcmp(x, y, na) == 0;
    free(x);
    free(y);
    return same;
}

static inline int test_summary(const char *name)
{
    printf("%s: %d passed, %d failed\n", name, test_passed_count, test_failed_count);
    return test_failed_count ? 1 : 0;
}

/* Deterministic uniform numbers in [-1, 1) for test inputs. */
static inline double test_uniform(unsigned long long *state)
{
    *state = *state * 6364136223846793005ULL + 1442695040888963407ULL;
    return (double)(*state >> 11) / (double)(1ULL << 53) * 2.0 - 1.0;
}

#endif
