/* kfac_loss_scale.h - dynamic loss scaling for fp16 training (Micikevicius
 * et al., "Mixed Precision Training", 2018; the policy of PyTorch's
 * GradScaler).  fp16 gradients below 2^-24 flush to zero, so the loss's
 * gradient is multiplied by a scale S before backward
 * (kfac_model_set_loss_scale) and the float32 parameter gradients are
 * divided by S afterwards.  A step whose gradients overflowed is skipped
 * and S halves; after `growth_interval` good steps in a row S doubles.
 * bf16 has float32's exponent range and needs none of this. */
#ifndef KFAC_LOSS_SCALE_H
#define KFAC_LOSS_SCALE_H

#include "kfac/kfac_model.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kfac_loss_scale {
    float scale;          /* current S */
    int growth_interval;  /* good steps in a row before S doubles */
    int good_steps;       /* good steps since the last change of S */
    long skipped_steps;   /* steps skipped for overflow, in total */
} kfac_loss_scale;

/* PyTorch's defaults: S = 2^16, doubled after 2000 good steps. */
#define KFAC_LOSS_SCALE_INITIAL 65536.0f
#define KFAC_LOSS_SCALE_GROWTH_INTERVAL 2000

void kfac_loss_scale_init(kfac_loss_scale *ls, float initial, int growth_interval);

/* Before a step's backward passes: gradients of model m come out scaled. */
void kfac_loss_scale_begin(const kfac_loss_scale *ls, kfac_model *m);

/* After the gradients are final (summed over micro-batches and ranks, so
 * every rank decides alike): divides them by S and checks them.  *apply is
 * 1 when the step may be applied, 0 when it must be skipped (S halved).
 * Gradients that overflow even at S = 1 mean the run diverged: that fails
 * with KFAC_EINVAL rather than skipping forever. */
kfac_status kfac_loss_scale_finish(kfac_loss_scale *ls, kfac_model *m, int *apply);

#ifdef __cplusplus
}
#endif
#endif
