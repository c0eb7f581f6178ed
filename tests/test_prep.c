/* test_prep.c - `kfac prep`'s pieces against independent references:
 *   resize   the antialiased bilinear resize against a double-precision
 *            direct evaluation of the same filter (every input pixel
 *            weighted by the triangle, no bounds logic, no fixed point,
 *            no intermediate rounding): |ours - exact| <= 1.01 levels (two
 *            roundings of 0.5 plus 22-bit weights); a window equals the
 *            full resize cropped, bit for bit;
 *   decode   PNGs written here with libpng (gray, RGB, RGBA, 1/2/16-bit,
 *            palette + tRNS, interlaced) give their exact pixels; JPEG
 *            edge cases (truncated, extraneous bytes, CMYK, gray, not an
 *            image) give the documented status and reason;
 *   pipeline a small tree through kfac_prep_plan/run: counts, skip list,
 *            pixels read back with kfac_dataset_open_hdf5, identical
 *            files with 1 and 3 threads.
 * `test_prep --dump DIR SPLIT PREFIX` is a helper for tests/cli/prep.sh:
 * it reads a split's shards with HDF5 directly (decoding JPEG storage) and
 * writes PREFIX.bin (all pixels, HWC, in order) and PREFIX.txt (one
 * "height width label" line per image). */
#define _GNU_SOURCE /* mkdtemp */
#include <dirent.h>
#include <hdf5.h>
#include <png.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <turbojpeg.h>
#include <unistd.h>
#include <zlib.h>

#include "data/decode.h"
#include "data/resize.h"
#include "kfac/kfac_prep.h"
#include "kfac/kfac_shards.h"
#include "testutil.h"

static uint8_t *random_image(int h, int w, int c, unsigned long long seed)
{
    uint8_t *p = malloc((size_t)h * w * c);
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++)
            for (int ch = 0; ch < c; ch++) {
                /* a gradient plus noise: smooth and sharp content */
                double v = 128 + 100 * test_uniform(&seed) * ((x + y + ch) % 3 == 0) +
                           60.0 * (x - w / 2.0) / (w + 1) + 40.0 * (y - h / 2.0) / (h + 1);
                p[((size_t)y * w + x) * c + ch] = (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
            }
    return p;
}

/* ---- resize ---- */

static double triangle(double x)
{
    x = fabs(x);
    return x < 1 ? 1 - x : 0;
}

/* w[o * in + i]: weight of input i in output o, from the definition:
 * triangle of half-width max(scale, 1) input pixels around the output's
 * centre (o + 0.5) * scale, normalised to sum 1. */
static double *axis_weights(int in, int out)
{
    double scale = (double)in / out, support = scale > 1 ? scale : 1;
    double *w = calloc((size_t)in * out, sizeof *w);
    for (int o = 0; o < out; o++) {
        double sum = 0, center = (o + 0.5) * scale;
        for (int i = 0; i < in; i++) sum += w[(size_t)o * in + i] = triangle((i + 0.5 - center) / support);
        for (int i = 0; i < in; i++) w[(size_t)o * in + i] /= sum;
    }
    return w;
}

static void test_resize_reference(void)
{
    static const int cases[][4] = {
        {28, 28, 20, 20},   {28, 28, 56, 56}, {150, 200, 100, 133}, {100, 7, 13, 1},
        {1, 1, 5, 3},       {64, 48, 64, 17}, {48, 64, 17, 64},     {9, 9, 9, 9},
        {123, 77, 31, 200}, {56, 84, 20, 30},
    };
    for (size_t t = 0; t < sizeof cases / sizeof cases[0]; t++) {
        for (int c = 1; c <= 3; c += 2) {
            int ih = cases[t][0], iw = cases[t][1], oh = cases[t][2], ow = cases[t][3];
            uint8_t *in = random_image(ih, iw, c, 7 + t), *out = malloc((size_t)oh * ow * c);
            kfac__resize_work work = {0};
            CHECK_OK(kfac__resize(in, ih, iw, c, oh, ow, 0, 0, oh, ow, out, &work));
            /* separable, so rows then columns, all in double */
            double *wy = axis_weights(ih, oh), *wx = axis_weights(iw, ow), worst = 0;
            double *rows = calloc((size_t)ih * ow * c, sizeof *rows);
            for (int i = 0; i < ih; i++)
                for (int x = 0; x < ow; x++)
                    for (int j = 0; j < iw; j++)
                        for (int ch = 0; ch < c; ch++)
                            rows[((size_t)i * ow + x) * c + ch] +=
                                wx[(size_t)x * iw + j] * in[((size_t)i * iw + j) * c + ch];
            for (int y = 0; y < oh; y++)
                for (int x = 0; x < ow; x++)
                    for (int ch = 0; ch < c; ch++) {
                        double v = 0;
                        for (int i = 0; i < ih; i++)
                            v += wy[(size_t)y * ih + i] * rows[((size_t)i * ow + x) * c + ch];
                        double d = fabs(out[((size_t)y * ow + x) * c + ch] - v);
                        if (d > worst) worst = d;
                    }
            free(rows);
            CHECK(worst <= 1.01, "%dx%d -> %dx%d, %d channels: max |ours - exact| = %.3f", iw, ih,
                  ow, oh, c, worst);
            if (ih == oh && iw == ow) CHECK(!memcmp(in, out, (size_t)oh * ow * c), "identity");
            /* any window equals the same part of the full result */
            int top = oh / 3, left = ow / 4, wh = oh - top - oh / 5, ww = ow - left;
            uint8_t *win = malloc((size_t)wh * ww * c);
            CHECK_OK(kfac__resize(in, ih, iw, c, oh, ow, top, left, wh, ww, win, &work));
            int same = 1;
            for (int y = 0; y < wh; y++)
                same &= !memcmp(win + (size_t)y * ww * c,
                                out + ((size_t)(y + top) * ow + left) * c, (size_t)ww * c);
            CHECK(same, "%dx%d -> %dx%d: window (%d,%d %dx%d) differs from the full resize", iw,
                  ih, ow, oh, left, top, ww, wh);
            free(win);
            free(wy);
            free(wx);
            free(in);
            free(out);
            kfac__resize_work_free(&work);
        }
    }
    int h, w;
    kfac__resize_shape(375, 500, 256, &h, &w);
    CHECK(h == 256 && w == 341, "375x500 -> %dx%d, expected 256x341", h, w);
    kfac__resize_shape(500, 375, 256, &h, &w);
    CHECK(h == 341 && w == 256, "500x375 -> %dx%d", h, w);
    kfac__resize_shape(10, 1000, 3, &h, &w);
    CHECK(h == 3 && w == 300, "10x1000 -> %dx%d", h, w);
    kfac__resize_shape(1000, 1, 3, &h, &w);
    CHECK(h == 3000 && w == 3, "1000x1 -> %dx%d", h, w);
    kfac__resize_shape(20, 30, 0, &h, &w);
    CHECK(h == 20 && w == 30, "size 0 keeps 20x30: %dx%d", h, w);
}

/* ---- PNG writing (the reference encoder is libpng itself) ---- */

typedef struct membuf {
    uint8_t *p;
    size_t n, cap;
} membuf;

static void mem_write(png_structp png, png_bytep data, size_t len)
{
    membuf *b = png_get_io_ptr(png);
    if (b->n + len > b->cap) {
        b->cap = (b->n + len) * 2;
        b->p = realloc(b->p, b->cap);
    }
    memcpy(b->p + b->n, data, len);
    b->n += len;
}

static void mem_flush(png_structp png) {}

typedef struct png_spec {
    int w, h, color, depth, interlace;
    const uint8_t *rows;       /* packed rows as libpng expects them */
    const png_color *palette;  /* color PALETTE */
    int npalette;
    const uint8_t *trns;       /* palette alpha */
    int ntrns;
} png_spec;

static png_spec spec(int w, int h, int color, int depth, int interlace, const void *rows)
{
    return (png_spec){.w = w, .h = h, .color = color, .depth = depth, .interlace = interlace,
                      .rows = rows};
}

static membuf write_png(const png_spec *s);
static membuf write_png_(int w, int h, int color, int depth, int interlace, const void *rows)
{
    png_spec s = spec(w, h, color, depth, interlace, rows);
    return write_png(&s);
}

static membuf write_png(const png_spec *s)
{
    membuf b = {0};
    png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, NULL, NULL, NULL);
    png_infop info = png_create_info_struct(png);
    png_set_write_fn(png, &b, mem_write, mem_flush);
    png_set_IHDR(png, info, s->w, s->h, s->depth, s->color,
                 s->interlace ? PNG_INTERLACE_ADAM7 : PNG_INTERLACE_NONE,
                 PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
    if (s->palette) png_set_PLTE(png, info, s->palette, s->npalette);
    if (s->trns) png_set_tRNS(png, info, s->trns, s->ntrns, NULL);
    png_write_info(png, info);
    size_t rowbytes = png_get_rowbytes(png, info);
    png_bytep *rows = malloc(s->h * sizeof *rows);
    for (int y = 0; y < s->h; y++) rows[y] = (png_bytep)s->rows + y * rowbytes;
    png_write_image(png, rows);
    png_write_end(png, NULL);
    png_destroy_write_struct(&png, &info);
    free(rows);
    return b;
}

static uint8_t white(int v, int a)
{
    return (uint8_t)((v * a + 255 * (255 - a) + 127) / 255);
}

/* Decodes and compares with `expect` (h x w x channels). */
static void expect_pixels(kfac__codec *c, const membuf *b, int channels, int h, int w,
                          const uint8_t *expect, const char *what)
{
    kfac__buf out = {0};
    int dh = 0, dw = 0;
    char warning[128];
    kfac_status st = kfac__image_decode(c, b->p, b->n, channels, 1 << 20, &out, &dh, &dw, warning,
                                        sizeof warning);
    CHECK(st == KFAC_OK, "%s: %s", what, kfac_last_error());
    if (st == KFAC_OK) {
        CHECK(dh == h && dw == w, "%s: %dx%d, expected %dx%d", what, dw, dh, w, h);
        CHECK(!memcmp(out.p, expect, (size_t)h * w * channels), "%s: pixels differ", what);
        CHECK(!warning[0], "%s: unexpected warning %s", what, warning);
    }
    kfac__buf_free(&out);
}

static void expect_failure(kfac__codec *c, const uint8_t *p, size_t n, const char *reason,
                           const char *what)
{
    kfac__buf out = {0};
    int h, w;
    char warning[128];
    kfac_status st = kfac__image_decode(c, p, n, 3, 1 << 20, &out, &h, &w, warning, sizeof warning);
    CHECK(st == KFAC_EFORMAT, "%s: status %s", what, kfac_status_str(st));
    CHECK(!strncmp(kfac_last_error(), reason, strlen(reason)), "%s: reason '%s', expected '%s...'",
          what, kfac_last_error(), reason);
    kfac__buf_free(&out);
}

static void test_png(kfac__codec *c)
{
    enum { W = 7, H = 5 };
    uint8_t rgba[H * W * 4], rgb[H * W * 3], gray[H * W], ga[H * W * 2], expect[H * W * 3],
        expect1[H * W];
    unsigned long long seed = 3;
    for (int i = 0; i < H * W * 4; i++) rgba[i] = (uint8_t)(128 + 127 * test_uniform(&seed));
    rgba[3] = 0, rgba[7] = 255; /* fully transparent, fully opaque */
    for (int i = 0; i < H * W; i++) {
        memcpy(rgb + 3 * i, rgba + 4 * i, 3);
        gray[i] = rgba[4 * i];
        ga[2 * i] = rgba[4 * i], ga[2 * i + 1] = rgba[4 * i + 3];
    }

    membuf b = write_png_(W, H, PNG_COLOR_TYPE_RGB, 8, 0, rgb);
    expect_pixels(c, &b, 3, H, W, rgb, "RGB PNG");
    for (int i = 0; i < H * W; i++)
        expect1[i] = (uint8_t)((rgb[3 * i] * 19595 + rgb[3 * i + 1] * 38470 + rgb[3 * i + 2] * 7471 +
                                0x8000) >> 16);
    expect_pixels(c, &b, 1, H, W, expect1, "RGB PNG as gray (ITU-R 601 luma)");
    free(b.p);

    b = write_png_(W, H, PNG_COLOR_TYPE_RGB, 8, 1, rgb);
    expect_pixels(c, &b, 3, H, W, rgb, "interlaced RGB PNG");
    free(b.p);

    b = write_png_(W, H, PNG_COLOR_TYPE_GRAY, 8, 0, gray);
    for (int i = 0; i < H * W; i++) memset(expect + 3 * i, gray[i], 3);
    expect_pixels(c, &b, 3, H, W, expect, "gray PNG as RGB");
    expect_pixels(c, &b, 1, H, W, gray, "gray PNG");
    free(b.p);

    b = write_png_(W, H, PNG_COLOR_TYPE_RGBA, 8, 0, rgba);
    for (int i = 0; i < H * W * 3; i++) expect[i] = white(rgba[4 * (i / 3) + i % 3], rgba[4 * (i / 3) + 3]);
    CHECK(expect[0] == 255 && expect[3] == rgba[4], "alpha 0 -> white, 255 -> colour");
    expect_pixels(c, &b, 3, H, W, expect, "RGBA PNG onto white");
    free(b.p);

    b = write_png_(W, H, PNG_COLOR_TYPE_GRAY_ALPHA, 8, 0, ga);
    for (int i = 0; i < H * W; i++) expect1[i] = white(ga[2 * i], ga[2 * i + 1]);
    expect_pixels(c, &b, 1, H, W, expect1, "gray+alpha PNG onto white");
    free(b.p);

    /* 16-bit: v * 257 is exactly v after scaling */
    uint8_t deep[H * W * 2];
    for (int i = 0; i < H * W; i++) deep[2 * i] = deep[2 * i + 1] = gray[i]; /* big-endian v*257 */
    b = write_png_(W, H, PNG_COLOR_TYPE_GRAY, 16, 0, deep);
    expect_pixels(c, &b, 1, H, W, gray, "16-bit gray PNG");
    free(b.p);

    /* 2-bit palette with one transparent and one half-transparent entry */
    png_color pal[4] = {{255, 0, 0}, {0, 255, 0}, {0, 0, 255}, {10, 20, 30}};
    uint8_t trns[4] = {255, 0, 128, 255}, idx[H][2];
    int index[H][W];
    for (int y = 0; y < H; y++) {
        memset(idx[y], 0, 2);
        for (int x = 0; x < W; x++) {
            index[y][x] = (x + 2 * y) % 4;
            idx[y][x / 4] |= (uint8_t)(index[y][x] << (6 - 2 * (x % 4)));
        }
    }
    png_spec ps = spec(W, H, PNG_COLOR_TYPE_PALETTE, 2, 0, &idx[0][0]);
    ps.palette = pal, ps.npalette = 4, ps.trns = trns, ps.ntrns = 4;
    b = write_png(&ps);
    for (int y = 0; y < H; y++)
        for (int x = 0; x < W; x++) {
            const png_color *p = &pal[index[y][x]];
            uint8_t *e = expect + 3 * (y * W + x);
            int a = trns[index[y][x]];
            e[0] = white(p->red, a), e[1] = white(p->green, a), e[2] = white(p->blue, a);
        }
    expect_pixels(c, &b, 3, H, W, expect, "2-bit palette PNG with tRNS");
    free(b.p);

    /* 1-bit gray: 0 and 255 */
    uint8_t bits[H] = {0xaa, 0x55, 0xf0, 0x0f, 0x81};
    b = write_png_(W, H, PNG_COLOR_TYPE_GRAY, 1, 0, bits);
    for (int y = 0; y < H; y++)
        for (int x = 0; x < W; x++) expect1[y * W + x] = (bits[y] >> (7 - x)) & 1 ? 255 : 0;
    expect_pixels(c, &b, 1, H, W, expect1, "1-bit gray PNG");
    free(b.p);

    /* failures */
    b = write_png_(W, H, PNG_COLOR_TYPE_RGB, 8, 0, rgb);
    expect_failure(c, b.p, b.n - 30, "corrupt PNG: ", "PNG cut in its pixel data");
    b.p[20] ^= 0xff; /* IHDR width byte: the chunk's CRC no longer matches */
    expect_failure(c, b.p, b.n, "corrupt PNG: ", "PNG with a bad IHDR CRC");
    free(b.p);
    uint8_t big[W * 3] = {0};
    b = write_png_(W, 1, PNG_COLOR_TYPE_RGB, 8, 0, big);
    /* claim 200000 rows: 1.4 Mpixels, over max_pixels = 2^20 (libpng itself
     * allows up to 10^6 rows) */
    b.p[16 + 4] = 0x00, b.p[16 + 5] = 0x03, b.p[16 + 6] = 0x0d, b.p[16 + 7] = 0x40;
    {
        uint32_t crc = (uint32_t)crc32(0, b.p + 12, 17); /* type + IHDR data */
        b.p[29] = (uint8_t)(crc >> 24), b.p[30] = (uint8_t)(crc >> 16), b.p[31] = (uint8_t)(crc >> 8),
        b.p[32] = (uint8_t)crc;
    }
    expect_failure(c, b.p, b.n, "image too large: ", "PNG over the pixel limit");
    free(b.p);
}

/* ---- JPEG ---- */

static void test_jpeg(kfac__codec *c)
{
    enum { W = 40, H = 24 };
    uint8_t *rgb = malloc((size_t)H * W * 3); /* smooth: 4:2:0 keeps it */
    for (int y = 0; y < H; y++)
        for (int x = 0; x < W; x++)
            for (int ch = 0; ch < 3; ch++)
                rgb[(y * W + x) * 3 + ch] = (uint8_t)(128 + 60 * sin(x / 6.0 + ch) + 50 * cos(y / 5.0));
    kfac__buf jpeg = {0}, out = {0};
    CHECK_OK(kfac__jpeg_encode(c, rgb, H, W, 3, 95, &jpeg));
    int h, w;
    char warning[128];
    CHECK_OK(kfac__image_decode(c, jpeg.p, jpeg.len, 3, 1 << 20, &out, &h, &w, warning, sizeof warning));
    /* the same pixels as turbojpeg's own decode, close to the source */
    tjhandle ref = tjInitDecompress();
    uint8_t *direct = malloc((size_t)H * W * 3);
    CHECK(tjDecompress2(ref, jpeg.p, jpeg.len, direct, W, 0, H, TJPF_RGB, 0) == 0, "tjDecompress2");
    CHECK(h == H && w == W && !memcmp(out.p, direct, (size_t)H * W * 3), "RGB JPEG decode");
    double err = 0;
    for (int i = 0; i < H * W * 3; i++) err += abs(out.p[i] - rgb[i]);
    CHECK(err / (H * W * 3) < 2, "RGB JPEG q95 round trip: mean abs error %.2f", err / (H * W * 3));
    free(direct);
    tjDestroy(ref);

    /* gray JPEG as RGB: the three channels are the gray one */
    uint8_t *g = random_image(H, W, 1, 12);
    kfac__buf gj = {0}, g1 = {0};
    CHECK_OK(kfac__jpeg_encode(c, g, H, W, 1, 90, &gj));
    CHECK_OK(kfac__image_decode(c, gj.p, gj.len, 1, 1 << 20, &g1, &h, &w, warning, sizeof warning));
    CHECK_OK(kfac__image_decode(c, gj.p, gj.len, 3, 1 << 20, &out, &h, &w, warning, sizeof warning));
    int same = 1;
    for (int i = 0; i < H * W; i++)
        same &= out.p[3 * i] == g1.p[i] && out.p[3 * i + 1] == g1.p[i] && out.p[3 * i + 2] == g1.p[i];
    CHECK(same, "gray JPEG expanded to RGB");

    /* truncated: cut in the scan data -> skipped as "truncated JPEG" */
    expect_failure(c, jpeg.p, jpeg.len - 40, "truncated JPEG: ", "JPEG cut at 60%");
    /* extraneous bytes before EOI: complete, converted with a warning */
    size_t n = jpeg.len + 10;
    uint8_t *extra = malloc(n);
    memcpy(extra, jpeg.p, jpeg.len - 2);
    memset(extra + jpeg.len - 2, 0, 10);
    memcpy(extra + n - 2, "\xff\xd9", 2);
    kfac_status st = kfac__image_decode(c, extra, n, 3, 1 << 20, &out, &h, &w, warning, sizeof warning);
    CHECK(st == KFAC_OK && strstr(warning, "extraneous"), "JPEG with extraneous bytes: %s, warning '%s'",
          kfac_last_error(), warning);
    free(extra);
    /* a header that is garbage: corrupt, not truncated */
    uint8_t junk[64] = {0xff, 0xd8, 0xff, 0xe0, 0x00, 0x03, 0x01};
    expect_failure(c, junk, sizeof junk, "corrupt JPEG: ", "JPEG with a garbage header");
    uint8_t cut[300];
    memcpy(cut, jpeg.p, sizeof cut); /* inside the Huffman tables: a header error */
    expect_failure(c, cut, sizeof cut, "corrupt JPEG: ", "JPEG cut in its header");
    /* the codec still decodes good files after those failures */
    CHECK_OK(kfac__image_decode(c, jpeg.p, jpeg.len, 3, 1 << 20, &out, &h, &w, warning, sizeof warning));
    tjhandle ref2 = tjInitDecompress();
    uint8_t *again = malloc((size_t)H * W * 3);
    tjDecompress2(ref2, jpeg.p, jpeg.len, again, W, 0, H, TJPF_RGB, 0);
    CHECK(!memcmp(out.p, again, (size_t)H * W * 3), "decode after failed decodes");
    free(again);
    tjDestroy(ref2);
    expect_failure(c, (const uint8_t *)"hello, world", 12, "not a JPEG or PNG file", "text");
    expect_failure(c, (const uint8_t *)"", 0, "empty file", "empty file");

    /* CMYK (Adobe, inverted as stored): R = K_s - muldiv255(255 - C_s, K_s) */
    tjhandle tj = tjInitCompress();
    uint8_t cmyk[H * W * 4];
    unsigned long long seed = 5;
    for (int i = 0; i < H * W; i++) {
        int v = (int)(128 + 100 * test_uniform(&seed));
        cmyk[4 * i] = (uint8_t)v, cmyk[4 * i + 1] = (uint8_t)(255 - v), cmyk[4 * i + 2] = 200,
        cmyk[4 * i + 3] = (uint8_t)(230 - (i % W));
    }
    unsigned char *cj = NULL;
    unsigned long cn = 0;
    CHECK(tjCompress2(tj, cmyk, W, 0, H, TJPF_CMYK, &cj, &cn, TJSAMP_444, 100, 0) == 0, "CMYK encode");
    kfac__buf raw = {0};
    tjhandle td = tjInitDecompress();
    kfac__buf_reserve(&raw, H * W * 4);
    tjDecompress2(td, cj, cn, raw.p, W, 0, H, TJPF_CMYK, 0);
    CHECK_OK(kfac__image_decode(c, cj, cn, 3, 1 << 20, &out, &h, &w, warning, sizeof warning));
    int exact = 1;
    for (int i = 0; i < H * W; i++)
        for (int ch = 0; ch < 3; ch++) {
            int k = raw.p[4 * i + 3], t = (255 - raw.p[4 * i + ch]) * k + 128;
            exact &= out.p[3 * i + ch] == k - (((t >> 8) + t) >> 8);
        }
    CHECK(exact, "CMYK JPEG -> RGB by Pillow's formula on the decoded CMYK");
    tjFree(cj);
    tjDestroy(tj);
    tjDestroy(td);
    kfac__buf_free(&raw);
    kfac__buf_free(&jpeg);
    kfac__buf_free(&out);
    kfac__buf_free(&gj);
    kfac__buf_free(&g1);
    free(rgb);
    free(g);
}

/* ---- the pipeline on a small tree ---- */

static void put_file(const char *dir, const char *name, const void *p, size_t n)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    fwrite(p, 1, n, f);
    fclose(f);
}

static int same_file(const char *a, const char *b)
{
    FILE *fa = fopen(a, "rb"), *fb = fopen(b, "rb");
    int same = fa && fb;
    while (same) {
        int ca = fgetc(fa), cb = fgetc(fb);
        if (ca != cb) same = 0;
        if (ca == EOF) break;
    }
    if (fa) fclose(fa);
    if (fb) fclose(fb);
    return same;
}

static void test_pipeline(void)
{
    char root[] = "/tmp/kfac-test-prep-XXXXXX";
    if (!mkdtemp(root)) {
        CHECK(0, "mkdtemp failed");
        return;
    }
    char dir[512], out1[600], out3[600];
    const char *folders[] = {"train", "train/a", "train/b", "val", "val/a", "val/b"};
    for (int i = 0; i < 6; i++) {
        snprintf(dir, sizeof dir, "%s/%s", root, folders[i]);
        mkdir(dir, 0755);
    }
    /* 9 x 13 RGB PNGs; train: a/0..2, b/0..1 + b/bad; val: a/0, b/0 */
    enum { H = 9, W = 13, S = 6 };
    uint8_t *src[8];
    const char *names[8] = {"train/a/0.png", "train/a/1.png", "train/a/2.png", "train/b/0.png",
                            "train/b/1.png", "val/a/0.png",   "val/b/0.png",   NULL};
    for (int i = 0; i < 7; i++) {
        src[i] = random_image(H, W, 3, 100 + i);
        membuf b = write_png_(W, H, PNG_COLOR_TYPE_RGB, 8, 0, src[i]);
        put_file(root, names[i], b.p, b.n);
        free(b.p);
    }
    put_file(root, "train/b/bad.png", "not an image", 12);
    put_file(root, "train/.hidden", "x", 1);

    kfac_prep_options o = {
        .input = root,
        .settings = {.storage = KFAC_STORAGE_RAW, .channels = KFAC_PREP_DEFAULT, .resize = S,
                     .center_crop = KFAC_PREP_DEFAULT, .jpeg_quality = KFAC_PREP_DEFAULT},
        .shard_images = 2,
    };
    snprintf(out1, sizeof out1, "%s/out1", root);
    snprintf(out3, sizeof out3, "%s/out3", root);
    for (int run = 0; run < 2; run++) {
        o.out_dir = run ? out3 : out1;
        o.threads = run ? 3 : 1;
        kfac_prep *p = NULL;
        kfac_prep_report r;
        CHECK_OK(kfac_prep_plan(&p, &o));
        if (!p) break;
        const kfac_prep_info *info = kfac_prep_info_get(p);
        CHECK(info->num_classes == 2 && info->num_splits == 2 && info->splits[0].inputs == 6 &&
                  info->splits[0].shards == 3 && info->splits[1].inputs == 2,
              "plan: %d classes, %d splits, train %zu inputs in %zu shards", info->num_classes,
              info->num_splits, info->splits[0].inputs, info->splits[0].shards);
        CHECK(info->settings.channels == 3 && info->settings.center_crop == 1 &&
                  !strcmp(info->settings.source, "folder"),
              "resolved defaults");
        CHECK_OK(kfac_prep_run(p, &r));
        CHECK(r.written[0] == 5 && r.written[1] == 2 && r.skipped_inputs == 1 && r.num_skipped == 1,
              "written %zu/%zu, skipped %zu", r.written[0], r.written[1], r.skipped_inputs);
        if (r.num_skipped == 1)
            CHECK(!strcmp(r.skipped[0].path, "train/b/bad.png") &&
                      !strcmp(r.skipped[0].reason, "not a JPEG or PNG file"),
                  "skipped %s: %s", r.skipped[0].path, r.skipped[0].reason);
        kfac_prep_free(p);
    }
    const char *files[] = {"manifest.yaml", "skipped.txt", "warnings.txt", "train-00000.h5",
                           "train-00001.h5", "train-00002.h5", "val-00000.h5"};
    for (int i = 0; i < 7; i++) {
        char a[700], b[700];
        snprintf(a, sizeof a, "%s/%s", out1, files[i]);
        snprintf(b, sizeof b, "%s/%s", out3, files[i]);
        CHECK(same_file(a, b), "%s differs between 1 and 3 threads", files[i]);
    }
    /* read back: resized to 6 x 8 (floor(13*6/9)), center-cropped to 6 x 6 at left 1 */
    kfac_dataset *ds = NULL;
    CHECK_OK(kfac_dataset_open_hdf5(out1, "train", &ds));
    if (ds) {
        CHECK(ds->count == 5 && ds->fixed_size && ds->height == S && ds->width == S, "dataset %zu images %dx%d",
              ds->count, ds->width, ds->height);
        uint8_t got[S * S * 3], want[S * S * 3];
        kfac__resize_work work = {0};
        const int32_t labels[5] = {0, 0, 0, 1, 1};
        for (size_t i = 0; i < ds->count && i < 5; i++) {
            int h, w;
            int32_t label;
            CHECK_OK(ds->read_image(ds, i, got, &h, &w, &label));
            CHECK_OK(kfac__resize(src[i], H, W, 3, S, 8, 0, 1, S, S, want, &work));
            CHECK(h == S && w == S && label == labels[i] && !memcmp(got, want, sizeof got),
                  "train image %zu: %dx%d label %d", i, w, h, (int)label);
        }
        kfac__resize_work_free(&work);
        kfac_dataset_free(ds);
    }
    /* a second run refuses to replace the dataset without force */
    o.out_dir = out1;
    kfac_prep *p = NULL;
    CHECK(kfac_prep_plan(&p, &o) == KFAC_EIO && strstr(kfac_last_error(), "--force"),
          "existing dataset: %s", kfac_last_error());
    kfac_prep_free(p);
    for (int i = 0; i < 7; i++) free(src[i]);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", root);
    CHECK(system(cmd) == 0, "cleanup");
}

/* ---- --dump helper ---- */

static int dump(const char *dir, const char *split, const char *prefix)
{
    kfac_manifest *m;
    if (kfac_manifest_read(dir, &m) != KFAC_OK) {
        fprintf(stderr, "dump: %s\n", kfac_last_error());
        return 1;
    }
    const kfac_split_entry *sp = kfac_manifest_split(m, split);
    char path[4096];
    snprintf(path, sizeof path, "%s.bin", prefix);
    FILE *bin = fopen(path, "wb");
    snprintf(path, sizeof path, "%s.txt", prefix);
    FILE *txt = fopen(path, "w");
    kfac__codec *codec;
    kfac__codec_init(&codec);
    kfac__buf px = {0};
    int rc = sp && bin && txt ? 0 : 1;
    for (size_t s = 0; !rc && s < sp->num_shards; s++) {
        snprintf(path, sizeof path, "%s/%s", dir, sp->shards[s].file);
        hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
        size_t n = sp->shards[s].count;
        uint64_t *off = malloc((n + 1) * sizeof *off);
        uint16_t *shapes = malloc((2 * n + 1) * sizeof *shapes);
        int32_t *labels = malloc((n + 1) * sizeof *labels);
        hid_t d = H5Dopen2(f, "/offsets", H5P_DEFAULT);
        H5Dread(d, H5T_NATIVE_UINT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, off);
        H5Dclose(d);
        uint8_t *data = malloc(off[n] + 1);
        if (n) {
            d = H5Dopen2(f, "/shapes", H5P_DEFAULT);
            H5Dread(d, H5T_NATIVE_UINT16, H5S_ALL, H5S_ALL, H5P_DEFAULT, shapes);
            H5Dclose(d);
            d = H5Dopen2(f, "/labels", H5P_DEFAULT);
            H5Dread(d, H5T_NATIVE_INT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, labels);
            H5Dclose(d);
            d = H5Dopen2(f, "/data", H5P_DEFAULT);
            H5Dread(d, H5T_NATIVE_UINT8, H5S_ALL, H5S_ALL, H5P_DEFAULT, data);
            H5Dclose(d);
        }
        H5Fclose(f);
        for (size_t i = 0; i < n; i++) {
            const uint8_t *p = data + off[i];
            size_t len = off[i + 1] - off[i];
            if (m->settings.storage == KFAC_STORAGE_JPEG) {
                int h, w;
                char warning[128];
                if (kfac__image_decode(codec, p, len, m->settings.channels, 1u << 30, &px, &h, &w,
                                       warning, sizeof warning) != KFAC_OK) {
                    fprintf(stderr, "dump: %s image %zu: %s\n", path, i, kfac_last_error());
                    rc = 1;
                    break;
                }
                p = px.p;
                len = (size_t)h * w * m->settings.channels;
            }
            fwrite(p, 1, len, bin);
            fprintf(txt, "%d %d %d\n", shapes[2 * i], shapes[2 * i + 1], (int)labels[i]);
        }
        free(off);
        free(shapes);
        free(labels);
        free(data);
    }
    if (bin) fclose(bin);
    if (txt) fclose(txt);
    kfac__buf_free(&px);
    kfac__codec_free(codec);
    kfac_manifest_free(m);
    if (!sp) fprintf(stderr, "dump: %s: no split %s\n", dir, split);
    return rc;
}

int main(int argc, char **argv)
{
    if (argc == 5 && !strcmp(argv[1], "--dump")) return dump(argv[2], argv[3], argv[4]);
    test_resize_reference();
    kfac__codec *c = NULL;
    CHECK_OK(kfac__codec_init(&c));
    if (c) {
        test_png(c);
        test_jpeg(c);
    }
    kfac__codec_free(c);
    test_pipeline();
    return test_summary("test_prep");
}
