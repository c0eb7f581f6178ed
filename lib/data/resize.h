/* resize.h - internal: antialiased bilinear resize of uint8 HWC images,
 * the filter of Pillow's Image.resize(size, Image.BILINEAR) (reducing_gap
 * None), bit for bit: a triangle filter whose support grows with the
 * downscale factor, 22-bit fixed-point weights, a horizontal pass rounded
 * to uint8, then a vertical pass.  A window of the resized image can be
 * computed alone (resize then crop without the cropped-off work). */
#ifndef KFAC_DATA_RESIZE_H
#define KFAC_DATA_RESIZE_H

#include <stddef.h>
#include <stdint.h>

#include "kfac/kfac_status.h"

/* Scratch memory reused across calls by one thread; zero-initialise. */
typedef struct kfac__resize_work {
    double *wd;     /* one output pixel's weights before fixed point */
    int32_t *coef;  /* fixed-point weights, ksize per output pixel */
    int *bounds;    /* per output pixel: first input index, count */
    uint8_t *tmp;   /* horizontal pass output */
    int32_t *acc;   /* one row of vertical-pass sums */
    size_t wd_cap, coef_cap, bounds_cap, tmp_cap, acc_cap;
} kfac__resize_work;

void kfac__resize_work_free(kfac__resize_work *w);

/* Resizes in (in_h x in_w x c) to out_h x out_w and stores the window
 * rows [top, top+win_h) x cols [left, left+win_w) of the result in out
 * (win_h x win_w x c).  KFAC_ENOMEM when scratch cannot grow. */
kfac_status kfac__resize(const uint8_t *in, int in_h, int in_w, int c, int out_h, int out_w,
                         int top, int left, int win_h, int win_w, uint8_t *out,
                         kfac__resize_work *work);

/* Grows `work` so that calls producing windows of at most out_h x out_w
 * from images of at most max_in_h rows, reducing by at most max_scale
 * input pixels per output pixel, never allocate. */
kfac_status kfac__resize_reserve(kfac__resize_work *work, int max_in_h, int c, int out_h,
                                 int out_w, double max_scale);

/* The size after resizing the shorter side to `side` (0: unchanged): the
 * longer side becomes floor(long * side / short), as torchvision's
 * Resize(side), at least 1. */
void kfac__resize_shape(int in_h, int in_w, int side, int *out_h, int *out_w);

#endif
