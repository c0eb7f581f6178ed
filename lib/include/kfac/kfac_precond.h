/* kfac_precond.h - the K-FAC optimizer: per-layer state and the schedule
 * that sequences the stages of kfac_factors.h around a training step.
 *
 * One step (kfac_precond_step):
 *   forward -> [sampled Fisher: loss at sampled labels, backward with
 *   capture] -> loss -> backward [empirical Fisher: with capture]
 *   -> invert where due -> precondition every K-FAC layer's gradient in
 *   place -> KL clip -> (the caller's) momentum SGD with weight decay.
 * Capture (a backward hook) computes each due layer's batch factors while
 * its output gradient is alive and folds them into the running averages.
 *
 * Layers: conv and FC get Kronecker factors (kfac_factors.h conventions);
 * batch norm gets the unit-wise 2x2 Fisher (SP-NGD), its diagonal, or
 * plain SGD; layers whose names match an exclude pattern stay on SGD.
 *
 * Distribution (kfac_precond_set_comm): every K-FAC layer has an owner
 * rank from a placement plan (kfac_placement.h).  Each rank captures batch
 * factors from its own micro-batches; at the end of the step the factors
 * of due layers and the gradients of all K-FAC layers are reduce-scattered
 * to their owners (packed upper triangles, factors optionally in f16/bf16);
 * owners fold, invert and precondition; the KL clip's <P g> is all-reduced
 * (f64); preconditioned gradients are all-gathered.  Schedule bookkeeping
 * (which layer is due) runs identically on every rank.  With
 * reduce_at_inverse, ranks fold their own batch factors into local running
 * averages and only those averages are reduced, when an inversion needs
 * them: the EMA is linear, so the result is the same, but factor traffic
 * follows the inverse interval instead of the factor interval.
 *
 * Schedule (kfac_precond_plan, the one place it is decided): before
 * warmup_steps every step refreshes factors and inverses; after, a layer's
 * factors refresh every `interval` steps (factor_interval, doubled up to
 * max_interval while the factors change less than adaptive_threshold
 * between refreshes, SP-NGD) and its inverse every inverse_interval steps
 * when its factors changed since the last inversion.
 */
#ifndef KFAC_PRECOND_H
#define KFAC_PRECOND_H

#include "kfac/kfac_comm.h"
#include "kfac/kfac_model.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum kfac_fisher { KFAC_FISHER_EMPIRICAL, KFAC_FISHER_SAMPLED } kfac_fisher;
typedef enum kfac_inverse { KFAC_INVERSE_CHOLESKY, KFAC_INVERSE_EIG } kfac_inverse;
typedef enum kfac_bn_mode { KFAC_BN_UNITWISE, KFAC_BN_DIAGONAL, KFAC_BN_SGD } kfac_bn_mode;

typedef struct kfac_precond_config {
    kfac_fisher fisher;
    kfac_inverse inverse;
    int exact_kronecker;
    float factor_decay;
    int factor_interval, inverse_interval, warmup_steps, max_interval;
    float adaptive_threshold;
    float damping, damping_decay, damping_min;
    float kl_clip;
    float subsample;
    kfac_bn_mode bn;
    const char *exclude; /* comma-separated fnmatch patterns, or NULL */
    uint64_t seed;       /* sampled-Fisher labels */
    kfac_dtype factor_dtype; /* factor traffic between ranks: f32, f16 or bf16 */
    int reduce_at_inverse;   /* reduce running factors only for inversions */
} kfac_precond_config;

/* Fills the defaults documented in jobs/README.md (optimizer.kfac). */
void kfac_precond_config_defaults(kfac_precond_config *cfg);

typedef struct kfac_precond kfac_precond;

/* Whether models under this configuration must keep their activations
 * through backward (kfac_model_set_keep_activations): a sampled Fisher. */
int kfac_precond_needs_kept_activations(const kfac_precond_config *cfg);
kfac_status kfac_precond_init(kfac_precond **out, kfac_model *m, const kfac_precond_config *cfg);
void kfac_precond_free(kfac_precond *p);

/* Decides which layers refresh factors / inverses at `step` (0-based) and
 * returns whether any factor is due (a capture is needed). */
int kfac_precond_plan(kfac_precond *p, long step);

/* Distributes the optimizer over `comm` (not owned; the same on every
 * rank, before the first step): computes the owner plan. */
kfac_status kfac_precond_set_comm(kfac_precond *p, kfac_comm *comm);
/* Whether parameter tensor `tensor` belongs to a K-FAC layer (its gradient
 * is reduced by kfac_precond_finish, not by a data-parallel all-reduce). */
int kfac_precond_owns_tensor(const kfac_precond *p, int tensor);

/* The whole single-process step on the model's current input: forward,
 * loss (summed loss and correct count as kfac_model_loss), backward(s) with
 * capture, then inversion, preconditioning and KL clipping of the gradients
 * in place.  `epoch` (fractional) sets the damping; `lr` the KL clip. */
kfac_status kfac_precond_step(kfac_precond *p, long step, double epoch, float lr, int n,
                              const int32_t *labels, float smoothing, double *loss_sum,
                              int *correct);

/* The same step in stages, for callers that run micro-batches and own the
 * backward hook (the trainer):
 *   kfac_precond_begin(p, step, M)
 *   per micro-batch j: forward; kfac_precond_sampled_pass(p, n, j);
 *     loss; backward with kfac_precond_capture called from the hook;
 *     kfac_precond_end_micro(p)
 *   kfac_precond_finish(p, epoch, lr, grad_scale)
 * grad_scale turns the K-FAC layers' reduced gradient sums into means
 * (1 / (ranks * M)). */
int kfac_precond_begin(kfac_precond *p, long step, int micro_batches);
/* Sampled Fisher only (else a no-op): loss at sampled labels and a backward
 * with capture; `micro_index` makes each micro-batch's samples distinct.
 * The real backward then runs over the same forward, so kfac_precond_init
 * refuses a sampled Fisher unless the model keeps its activations
 * (kfac_model_set_keep_activations; kfac_precond_needs_kept_activations
 * says whether a configuration needs that). */
kfac_status kfac_precond_sampled_pass(kfac_precond *p, int n, long micro_index);
/* Whether the capture hook is wanted in the real backward of this step. */
int kfac_precond_capture_in_backward(const kfac_precond *p);
kfac_status kfac_precond_capture(kfac_precond *p, int node, int n);
void kfac_precond_end_micro(kfac_precond *p);
kfac_status kfac_precond_finish(kfac_precond *p, double epoch, float lr, float grad_scale);

/* Counters and time spent per stage since init. */
typedef struct kfac_precond_stats {
    int layers;               /* K-FAC (Kronecker) layers */
    int bn_layers;            /* BN layers with a unit-wise or diagonal Fisher */
    long factor_refreshes;    /* summed over layers */
    long inverse_refreshes;
    double seconds_capture, seconds_invert, seconds_precondition;
    double seconds_comm;      /* reduce-scatters, all-gathers and scalar reductions */
    double last_kl_scale;
    double kl_scale_sum;      /* summed over steps (mean = sum / steps) */
    long kl_steps, kl_clipped; /* steps with a KL scale; of those, clipped (< 1) */
} kfac_precond_stats;
void kfac_precond_get_stats(const kfac_precond *p, kfac_precond_stats *out);

/* Per-layer counters (for tests and logs); index < stats.layers + stats.bn_layers. */
const char *kfac_precond_layer_name(const kfac_precond *p, int index);
void kfac_precond_layer_counts(const kfac_precond *p, int index, long *factors, long *inverses);

#ifdef __cplusplus
}
#endif
#endif
