/* kfac_status.h - the error contract of libkfac.
 *
 * Every library function that can fail at run time returns a kfac_status:
 * KFAC_OK (0) on success, a negative code otherwise.  On failure it also
 * records a one-line message for the calling thread, retrievable with
 * kfac_last_error(), and the source location that raised it with
 * kfac_last_error_where().  Programmer errors (NULL handles, impossible
 * shapes in internal calls) are asserts, not statuses.  Library code never
 * prints and never exits: only bin/ does.
 */
#ifndef KFAC_STATUS_H
#define KFAC_STATUS_H

#ifdef __cplusplus
extern "C" {
#endif

typedef enum kfac_status {
    KFAC_OK = 0,
    KFAC_EINVAL = -1,   /* bad argument or bad configuration value */
    KFAC_ENOMEM = -2,   /* allocation failed */
    KFAC_EIO = -3,      /* a file could not be opened, read or written */
    KFAC_EFORMAT = -4,  /* a file exists but its content is malformed */
    KFAC_ENOTSUP = -5,  /* valid request this build or backend cannot do */
    KFAC_EBACKEND = -6, /* a backend library (BLAS, CUDA, ...) failed */
    KFAC_ENODEV = -7,   /* no device of the requested kind */
    KFAC_ECOMM = -8     /* a collective or the launcher failed (MPI, PMIx, NCCL) */
} kfac_status;

/* A short constant name for a status, e.g. "invalid argument". */
const char *kfac_status_str(kfac_status status);

/* The message of the last failure on this thread ("" if none). */
const char *kfac_last_error(void);

/* "file:line" of the library code that recorded the last failure. */
const char *kfac_last_error_where(void);

/* Clears this thread's last error. */
void kfac_clear_error(void);

/* Internal: records a failure and returns `status` so callers can write
 * `return KFAC_ERR(KFAC_EINVAL, "batch %d < 1", n);`. */
kfac_status kfac__set_error(kfac_status status, const char *file, int line,
                            const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#define KFAC_ERR(status, ...) kfac__set_error((status), __FILE__, __LINE__, __VA_ARGS__)

/* Propagates a failing status unchanged (the message is already set). */
#define KFAC_TRY(expr)                         \
    do {                                       \
        kfac_status kfac__st = (expr);         \
        if (kfac__st != KFAC_OK) return kfac__st; \
    } while (0)

#ifdef __cplusplus
}
#endif
#endif
