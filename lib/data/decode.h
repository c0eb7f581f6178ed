/* decode.h - internal: JPEG and PNG files (bytes in memory) to uint8 HWC
 * pixels with 1 or 3 channels, and pixels back to JPEG.  One kfac__codec
 * per thread (it holds the turbojpeg handles and reusable buffers).
 *
 * Conversions, so that every input ends as gray or RGB:
 *   CMYK/YCCK JPEG  -> RGB, inverted (Adobe) CMYK as Photoshop and Pillow
 *                      write it: R = C*K/255 on the stored values
 *   gray <-> RGB    -> gray is replicated; RGB to gray is ITU-R 601 luma
 *                      (Pillow's convert("L")); a colour JPEG asked for
 *                      gray is decoded as its Y channel
 *   PNG palette, 1/2/4-bit gray, tRNS -> 8-bit gray/RGB(A); 16-bit PNG ->
 *                      8-bit by rounding (png_set_scale_16)
 *   alpha           -> composited onto white: c' = (c*a + 255*(255-a)) / 255
 * A failure is KFAC_EFORMAT (KFAC_ENOMEM) whose message is the reason,
 * without a path: "not a JPEG or PNG file", "truncated JPEG: ...",
 * "corrupt JPEG: ...", "corrupt PNG: ...", "image too large: WxH". */
#ifndef KFAC_DATA_DECODE_H
#define KFAC_DATA_DECODE_H

#include <stddef.h>
#include <stdint.h>

#include "kfac/kfac_status.h"

typedef enum kfac__image_kind {
    KFAC__IMAGE_UNKNOWN = 0,
    KFAC__IMAGE_JPEG = 1,
    KFAC__IMAGE_PNG = 2
} kfac__image_kind;

/* A growable byte buffer. */
typedef struct kfac__buf {
    uint8_t *p;
    size_t len, cap;
} kfac__buf;

int kfac__buf_reserve(kfac__buf *b, size_t n); /* 0 when out of memory */
void kfac__buf_free(kfac__buf *b);

typedef struct kfac__codec kfac__codec;

kfac_status kfac__codec_init(kfac__codec **out);
void kfac__codec_free(kfac__codec *c);

/* The format by magic bytes: JPEG FF D8 FF, PNG 89 'P' 'N' 'G' 0D 0A 1A 0A. */
kfac__image_kind kfac__image_sniff(const uint8_t *bytes, size_t n);

/* Decodes bytes[0..n) into out (grown as needed) as height x width x
 * channels (1 or 3).  Images of more than max_pixels are refused before
 * decoding.  A JPEG that decodes with a libjpeg warning is accepted, the
 * warning copied to `warning` (else warning[0] is 0), unless it is
 * truncated: a start-of-scan marker with no end-of-image marker after the
 * last one ("truncated JPEG: <libjpeg's message>"). */
kfac_status kfac__image_decode(kfac__codec *c, const uint8_t *bytes, size_t n, int channels,
                               size_t max_pixels, kfac__buf *out, int *height, int *width,
                               char *warning, size_t warning_cap);

/* Gray p[0..n) replicated into RGB p[0..3n) (p must hold 3n bytes). */
void kfac__gray_to_rgb(uint8_t *p, size_t n);

/* Encodes pixels (height x width x channels, 1 or 3) as a baseline JPEG of
 * the given quality (4:2:0 for RGB) into out. */
kfac_status kfac__jpeg_encode(kfac__codec *c, const uint8_t *pixels, int height, int width,
                              int channels, int quality, kfac__buf *out);

#endif
