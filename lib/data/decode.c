/* decode.c - JPEG (libturbojpeg 2.1 API) and PNG (libpng, errors through
 * setjmp) decoding to gray or RGB pixels, and JPEG encoding (decode.h).
 * Everything a file can do wrong ends as a status with a reason; nothing
 * here aborts or prints. */
#include "data/decode.h"

#include <png.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <turbojpeg.h>

struct kfac__codec {
    tjhandle dec, enc;
    kfac__buf work;  /* CMYK or PNG pixels before conversion */
    png_bytep *rows; /* row pointers for libpng */
    size_t rows_cap;
};

int kfac__buf_reserve(kfac__buf *b, size_t n)
{
    if (n <= b->cap) return 1;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < n) cap = cap > SIZE_MAX / 2 ? n : cap * 2;
    uint8_t *p = realloc(b->p, cap);
    if (!p) return 0;
    b->p = p;
    b->cap = cap;
    return 1;
}

void kfac__buf_free(kfac__buf *b)
{
    free(b->p);
    memset(b, 0, sizeof *b);
}

kfac_status kfac__codec_init(kfac__codec **out)
{
    *out = NULL;
    kfac__codec *c = calloc(1, sizeof *c);
    if (!c) return KFAC_ERR(KFAC_ENOMEM, "cannot allocate an image codec");
    c->dec = tjInitDecompress();
    c->enc = tjInitCompress();
    if (!c->dec || !c->enc) {
        kfac__codec_free(c);
        return KFAC_ERR(KFAC_ENOMEM, "cannot create turbojpeg handles: %s",
                        tjGetErrorStr2(NULL));
    }
    *out = c;
    return KFAC_OK;
}

void kfac__codec_free(kfac__codec *c)
{
    if (!c) return;
    if (c->dec) tjDestroy(c->dec);
    if (c->enc) tjDestroy(c->enc);
    kfac__buf_free(&c->work);
    free(c->rows);
    free(c);
}

kfac__image_kind kfac__image_sniff(const uint8_t *b, size_t n)
{
    static const uint8_t png_magic[8] = {0x89, 'P', 'N', 'G', 0x0d, 0x0a, 0x1a, 0x0a};
    if (n >= 3 && b[0] == 0xff && b[1] == 0xd8 && b[2] == 0xff) return KFAC__IMAGE_JPEG;
    if (n >= 8 && memcmp(b, png_magic, 8) == 0) return KFAC__IMAGE_PNG;
    return KFAC__IMAGE_UNKNOWN;
}

/* ---- pixel conversions (in place where the result is not larger) ---- */

/* ITU-R 601-2 luma in Pillow's fixed point (its convert("L")). */
static uint8_t luma(const uint8_t *rgb)
{
    return (uint8_t)((rgb[0] * 19595 + rgb[1] * 38470 + rgb[2] * 7471 + 0x8000) >> 16);
}

static uint8_t over_white(unsigned v, unsigned a)
{
    return (uint8_t)((v * a + 255 * (255 - a) + 127) / 255);
}

/* Gray in p[0..n) replicated to RGB in p[0..3n), back to front. */
void kfac__gray_to_rgb(uint8_t *p, size_t n)
{
    for (size_t i = n; i-- > 0;) p[3 * i] = p[3 * i + 1] = p[3 * i + 2] = p[i];
}

static void rgb_to_gray(uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++) p[i] = luma(p + 3 * i);
}

/* Inverted (Adobe) CMYK to RGB: Pillow reads such files as CMYK;I and
 * converts with R = (255-K) - (C*(255-K))/255 on the uninverted values. */
static void cmyk_to_rgb(const uint8_t *cmyk, uint8_t *rgb, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        int nk = cmyk[4 * i + 3];
        for (int ch = 0; ch < 3; ch++) {
            int t = (255 - cmyk[4 * i + ch]) * nk + 128;
            int v = nk - (((t >> 8) + t) >> 8);
            rgb[3 * i + ch] = (uint8_t)(v < 0 ? 0 : v);
        }
    }
}

/* Any of gray, gray+alpha, RGB, RGBA (src_ch 1..4) to `channels` (1, 3),
 * alpha composited onto white. */
static void to_channels(const uint8_t *src, int src_ch, uint8_t *dst, int channels, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        const uint8_t *s = src + i * src_ch;
        uint8_t px[3];
        if (src_ch <= 2) {
            px[0] = px[1] = px[2] = src_ch == 2 ? over_white(s[0], s[1]) : s[0];
        } else {
            for (int ch = 0; ch < 3; ch++) px[ch] = src_ch == 4 ? over_white(s[ch], s[3]) : s[ch];
        }
        if (channels == 1)
            dst[i] = src_ch <= 2 ? px[0] : luma(px);
        else
            memcpy(dst + 3 * i, px, 3);
    }
}

/* ---- JPEG ---- */

/* A JPEG is truncated when it has a start-of-scan marker (FF DA) and no
 * end-of-image marker (FF D9) after the last one.  Scan data cannot
 * contain either (an FF there is stuffed), so searching back from the end
 * finds the real markers. */
static int jpeg_truncated(const uint8_t *b, size_t n)
{
    size_t eoi = 0;
    for (size_t i = n; i-- > 1;) {
        if (b[i - 1] != 0xff) continue;
        if (!eoi && b[i] == 0xd9) eoi = i;
        if (b[i] == 0xda) return eoi < i;
    }
    return 0; /* no scan at all: corrupt, not cut short */
}

/* A fresh decompressor after a failure: turbojpeg 2.1 leaves the handle
 * mid-header when tjDecompressHeader3 fails, and the next file's header
 * would be parsed in that state. */
static kfac_status jpeg_reset(kfac__codec *c, kfac_status st)
{
    tjDestroy(c->dec);
    c->dec = tjInitDecompress();
    if (!c->dec) return KFAC_ERR(KFAC_ENOMEM, "cannot create a turbojpeg handle");
    return st;
}

static kfac_status jpeg_fail(kfac__codec *c, const uint8_t *b, size_t n)
{
    kfac_status st = KFAC_ERR(KFAC_EFORMAT, "%s JPEG: %s",
                              jpeg_truncated(b, n) ? "truncated" : "corrupt",
                              tjGetErrorStr2(c->dec));
    return jpeg_reset(c, st);
}

static kfac_status decode_jpeg(kfac__codec *c, const uint8_t *b, size_t n, int channels,
                               size_t max_pixels, kfac__buf *out, int *height, int *width,
                               char *warning, size_t warning_cap)
{
    int w, h, subsamp, cs;
    if (tjDecompressHeader3(c->dec, b, (unsigned long)n, &w, &h, &subsamp, &cs) != 0)
        return jpeg_fail(c, b, n);
    /* libjpeg can end a garbage header at its fake end marker "successfully" */
    if (w < 1 || h < 1 || cs < 0 || cs > TJCS_YCCK)
        return jpeg_reset(c, KFAC_ERR(KFAC_EFORMAT, "corrupt JPEG: no frame header"));
    size_t pixels = (size_t)w * (size_t)h;
    if (pixels > max_pixels)
        return KFAC_ERR(KFAC_EFORMAT, "image too large: %dx%d (more than %zu pixels)", w, h,
                        max_pixels);
    int cmyk = cs == TJCS_CMYK || cs == TJCS_YCCK;
    int gray = !cmyk && (channels == 1 || cs == TJCS_GRAY);
    int pf = cmyk ? TJPF_CMYK : gray ? TJPF_GRAY : TJPF_RGB;
    kfac__buf *dst = cmyk ? &c->work : out;
    if (!kfac__buf_reserve(dst, pixels * (cmyk ? 4 : 3)) ||
        !kfac__buf_reserve(out, pixels * (size_t)channels))
        return KFAC_ERR(KFAC_ENOMEM, "out of memory for a %dx%d image", w, h);
    /* flags 0: accurate integer DCT and fancy upsampling, as djpeg and Pillow */
    if (tjDecompress2(c->dec, b, (unsigned long)n, dst->p, w, 0, h, pf, 0) != 0) {
        if (tjGetErrorCode(c->dec) != TJERR_WARNING || jpeg_truncated(b, n))
            return jpeg_fail(c, b, n);
        snprintf(warning, warning_cap, "%s", tjGetErrorStr2(c->dec));
    }
    if (cmyk) {
        cmyk_to_rgb(c->work.p, out->p, pixels);
        if (channels == 1) rgb_to_gray(out->p, pixels);
    } else if (gray && channels == 3) {
        kfac__gray_to_rgb(out->p, pixels);
    }
    *height = h;
    *width = w;
    return KFAC_OK;
}

/* ---- PNG ---- */

typedef struct png_ctx {
    png_structp png;
    png_infop info;
    const uint8_t *bytes;
    size_t n, pos;
    kfac__codec *codec;
    size_t max_pixels;
    png_uint_32 width, height;
    int src_channels;   /* after the transforms: 1..4 */
    int too_large, oom;
    char message[160];
} png_ctx;

static void png_read_mem(png_structp png, png_bytep data, size_t len)
{
    png_ctx *c = png_get_io_ptr(png);
    if (c->n - c->pos < len) png_error(png, "file truncated");
    memcpy(data, c->bytes + c->pos, len);
    c->pos += len;
}

static void png_on_error(png_structp png, png_const_charp msg)
{
    png_ctx *c = png_get_error_ptr(png);
    snprintf(c->message, sizeof c->message, "%s", msg);
    png_longjmp(png, 1);
}

/* libpng warnings (an odd sRGB profile, a bad ancillary chunk) leave the
 * pixels intact: not worth a note. */
static void png_on_warning(png_structp png, png_const_charp msg) {}

/* The libpng calls, alone in this function so that setjmp's rules on
 * local variables do not apply: all state lives in *c.  Leaves the pixels
 * in c->codec->work; returns 0 on success. */
static int png_run(png_ctx *c)
{
    if (setjmp(png_jmpbuf(c->png))) return -1;
    png_set_read_fn(c->png, c, png_read_mem);
    png_read_info(c->png, c->info);
    c->width = png_get_image_width(c->png, c->info);
    c->height = png_get_image_height(c->png, c->info);
    if ((size_t)c->width * c->height > c->max_pixels) {
        c->too_large = 1;
        return -1;
    }
    int color = png_get_color_type(c->png, c->info), depth = png_get_bit_depth(c->png, c->info);
    if (color == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(c->png);
    if (color == PNG_COLOR_TYPE_GRAY && depth < 8) png_set_expand_gray_1_2_4_to_8(c->png);
    if (png_get_valid(c->png, c->info, PNG_INFO_tRNS)) png_set_tRNS_to_alpha(c->png);
    if (depth == 16) png_set_scale_16(c->png);
    png_set_interlace_handling(c->png);
    png_read_update_info(c->png, c->info);
    c->src_channels = png_get_channels(c->png, c->info);
    size_t rowbytes = png_get_rowbytes(c->png, c->info);
    kfac__codec *k = c->codec;
    if (!kfac__buf_reserve(&k->work, rowbytes * c->height)) {
        c->oom = 1;
        return -1;
    }
    if (k->rows_cap < c->height) {
        png_bytep *rows = realloc(k->rows, c->height * sizeof *rows);
        if (!rows) {
            c->oom = 1;
            return -1;
        }
        k->rows = rows;
        k->rows_cap = c->height;
    }
    for (png_uint_32 y = 0; y < c->height; y++) k->rows[y] = k->work.p + y * rowbytes;
    /* No png_read_end: a file cut after its pixel data still has all of them. */
    png_read_image(c->png, k->rows);
    return 0;
}

static kfac_status decode_png(kfac__codec *k, const uint8_t *b, size_t n, int channels,
                              size_t max_pixels, kfac__buf *out, int *height, int *width)
{
    png_ctx c = {.bytes = b, .n = n, .codec = k, .max_pixels = max_pixels};
    c.png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &c, png_on_error, png_on_warning);
    c.info = c.png ? png_create_info_struct(c.png) : NULL;
    if (!c.info) {
        png_destroy_read_struct(c.png ? &c.png : NULL, NULL, NULL);
        return KFAC_ERR(KFAC_ENOMEM, "cannot create a libpng reader");
    }
    int rc = png_run(&c);
    png_destroy_read_struct(&c.png, &c.info, NULL);
    if (c.oom)
        return KFAC_ERR(KFAC_ENOMEM, "out of memory for a %ux%u image", (unsigned)c.width,
                        (unsigned)c.height);
    if (c.too_large)
        return KFAC_ERR(KFAC_EFORMAT, "image too large: %ux%u (more than %zu pixels)",
                        (unsigned)c.width, (unsigned)c.height, max_pixels);
    if (rc != 0) return KFAC_ERR(KFAC_EFORMAT, "corrupt PNG: %s", c.message);
    size_t pixels = (size_t)c.width * c.height;
    if (!kfac__buf_reserve(out, pixels * (size_t)channels))
        return KFAC_ERR(KFAC_ENOMEM, "out of memory for a %ux%u image", (unsigned)c.width,
                        (unsigned)c.height);
    to_channels(k->work.p, c.src_channels, out->p, channels, pixels);
    *height = (int)c.height;
    *width = (int)c.width;
    return KFAC_OK;
}

kfac_status kfac__image_decode(kfac__codec *c, const uint8_t *bytes, size_t n, int channels,
                               size_t max_pixels, kfac__buf *out, int *height, int *width,
                               char *warning, size_t warning_cap)
{
    if (warning_cap) warning[0] = '\0';
    switch (kfac__image_sniff(bytes, n)) {
    case KFAC__IMAGE_JPEG:
        return decode_jpeg(c, bytes, n, channels, max_pixels, out, height, width, warning,
                           warning_cap);
    case KFAC__IMAGE_PNG: return decode_png(c, bytes, n, channels, max_pixels, out, height, width);
    default: break;
    }
    return KFAC_ERR(KFAC_EFORMAT, n ? "not a JPEG or PNG file" : "empty file");
}

kfac_status kfac__jpeg_encode(kfac__codec *c, const uint8_t *pixels, int height, int width,
                              int channels, int quality, kfac__buf *out)
{
    int samp = channels == 1 ? TJSAMP_GRAY : TJSAMP_420;
    unsigned long cap = tjBufSize(width, height, samp);
    if (cap == (unsigned long)-1 || !kfac__buf_reserve(out, cap))
        return KFAC_ERR(KFAC_ENOMEM, "out of memory encoding a %dx%d JPEG", width, height);
    unsigned char *dst = out->p;
    unsigned long size = cap;
    /* NOREALLOC: the buffer is ours and tjBufSize bounds the output.
     * ACCURATEDCT: turbojpeg compresses with the fast integer DCT by
     * default; the accurate one is what cjpeg and Pillow use. */
    if (tjCompress2(c->enc, pixels, width, 0, height, channels == 1 ? TJPF_GRAY : TJPF_RGB, &dst,
                    &size, samp, quality, TJFLAG_NOREALLOC | TJFLAG_ACCURATEDCT) != 0)
        return KFAC_ERR(KFAC_EFORMAT, "JPEG encoding failed: %s", tjGetErrorStr2(c->enc));
    out->len = size;
    return KFAC_OK;
}
