/* status.c - per-thread error messages behind kfac_last_error(). */
#include "kfac/kfac_status.h"

#include <stdarg.h>
#include <stdio.h>

static _Thread_local char last_message[1024];
static _Thread_local char last_where[256];

const char *kfac_status_str(kfac_status status)
{
    switch (status) {
    case KFAC_OK: return "ok";
    case KFAC_EINVAL: return "invalid argument";
    case KFAC_ENOMEM: return "out of memory";
    case KFAC_EIO: return "i/o error";
    case KFAC_EFORMAT: return "bad file format";
    case KFAC_ENOTSUP: return "not supported";
    case KFAC_EBACKEND: return "backend failure";
    case KFAC_ENODEV: return "no device";
    case KFAC_ECOMM: return "communication failure";
    }
    return "unknown status";
}

const char *kfac_last_error(void) { return last_message; }

const char *kfac_last_error_where(void) { return last_where; }

void kfac_clear_error(void)
{
    last_message[0] = '\0';
    last_where[0] = '\0';
}

kfac_status kfac__set_error(kfac_status status, const char *file, int line,
                            const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_message, sizeof last_message, fmt, ap);
    va_end(ap);
    snprintf(last_where, sizeof last_where, "%s:%d", file, line);
    return status;
}
