/* strbuf.c - snprintf-style appending (strbuf.h). */
#include "core/strbuf.h"

#include <stdarg.h>
#include <stdio.h>

kfac_strbuf kfac__strbuf_init(char *p, size_t cap)
{
    if (cap) p[0] = '\0';
    return (kfac_strbuf){p, cap, 0};
}

size_t kfac__strbuf_room(const kfac_strbuf *sb) { return sb->len < sb->cap ? sb->cap - sb->len : 0; }

void kfac__strbuf_add(kfac_strbuf *sb, const char *fmt, ...)
{
    size_t room = kfac__strbuf_room(sb);
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(room ? sb->p + sb->len : NULL, room, fmt, ap);
    va_end(ap);
    if (n > 0) sb->len += (size_t)n;
}
