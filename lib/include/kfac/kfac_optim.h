/* kfac_optim.h - first-order optimizer (momentum SGD) and learning-rate
 * schedules.  K-FAC (a later module) preconditions the gradients and then
 * hands them to the same SGD step.
 *
 * SGD, per parameter (PyTorch's formulation):
 *   g' = g + wd * p;  v = momentum * v + g';
 *   p -= lr * (nesterov ? g' + momentum * v : v)
 * Weight decay applies to conv/FC weights, and to BN parameters and biases
 * only when decay_bn_and_bias is set.
 */
#ifndef KFAC_OPTIM_H
#define KFAC_OPTIM_H

#include "kfac/kfac_model.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kfac_sgd_config {
    float momentum;
    int nesterov;
    float weight_decay;
    int decay_bn_and_bias;
} kfac_sgd_config;

typedef struct kfac_sgd kfac_sgd;

/* Allocates the velocity (zero) for all parameters of `m` (not owned). */
kfac_status kfac_sgd_init(kfac_sgd **out, kfac_model *m, const kfac_sgd_config *cfg);
void kfac_sgd_free(kfac_sgd *s);
/* One update of every parameter from the model's gradients. */
kfac_status kfac_sgd_step(kfac_sgd *s, float lr);
/* The velocity, one float per parameter (backend memory; for checkpoints). */
float *kfac_sgd_velocity(kfac_sgd *s);

typedef enum kfac_lr_decay {
    KFAC_LR_CONSTANT,
    KFAC_LR_COSINE,
    KFAC_LR_POLY,
    KFAC_LR_STEP
} kfac_lr_decay;

#define KFAC_LR_MAX_MILESTONES 16

/* Linear warm-up from warmup_start to peak over warmup_epochs, then:
 *   cosine: final + (peak-final) * (1 + cos(pi*t)) / 2
 *   poly:   final + (peak-final) * (1 - t)^power     (Osawa et al.)
 *   step:   peak * gamma^(milestones passed)
 * with t = (epoch - decay_start) / (decay_end - decay_start) clamped to
 * [0, 1].  Epochs are fractional (step / steps_per_epoch). */
typedef struct kfac_lr_schedule {
    kfac_lr_decay decay;
    double peak, warmup_start, final;
    double warmup_epochs, decay_start, decay_end;
    double power, gamma;
    double milestones[KFAC_LR_MAX_MILESTONES];
    int num_milestones;
} kfac_lr_schedule;

/* Parses "cosine", "poly", "step" or "constant". */
kfac_status kfac_lr_decay_parse(const char *name, kfac_lr_decay *out);
double kfac_lr_at(const kfac_lr_schedule *s, double epoch);

#ifdef __cplusplus
}
#endif
#endif
