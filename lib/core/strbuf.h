/* strbuf.h - appending formatted text to a caller's buffer, snprintf
 * style: `len` counts all text appended, even past `cap`, so callers can
 * report the size they needed.  Internal to libkfac. */
#ifndef KFAC_STRBUF_H
#define KFAC_STRBUF_H

#include <stddef.h>

typedef struct kfac_strbuf {
    char *p;
    size_t cap, len;
} kfac_strbuf;

/* An empty buffer over p[0..cap) (p may be NULL when cap is 0). */
kfac_strbuf kfac__strbuf_init(char *p, size_t cap);
void kfac__strbuf_add(kfac_strbuf *sb, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Room left at the end (0 once full), for writers that take (buf, size). */
size_t kfac__strbuf_room(const kfac_strbuf *sb);

#endif
