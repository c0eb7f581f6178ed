/* kfac_step.h - one optimizer step of data-parallel training, the sequence
 * the trainer (and the distributed benchmark) runs:
 *   for each of this rank's micro-batches: load it (the caller's loader),
 *     forward, [sampled-Fisher pass], loss, backward with a hook that
 *     captures K-FAC factors and starts gradient buckets
 *   gradient all-reduce (kfac_gradsync) -> [fp16: unscale, and skip the
 *   step if the gradients overflowed] -> K-FAC reduce / invert /
 *   precondition / gather (kfac_precond, if any) -> momentum SGD.
 * Gradients end as the mean over ranks x micro_batches micro-batches.
 */
#ifndef KFAC_STEP_H
#define KFAC_STEP_H

#include "kfac/kfac_gradsync.h"
#include "kfac/kfac_loss_scale.h"
#include "kfac/kfac_optim.h"
#include "kfac/kfac_pass_graph.h"
#include "kfac/kfac_precond.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Puts micro-batch `micro` (0-based, of this rank) into the model's input
 * and its labels into *labels; *n images. */
typedef kfac_status (*kfac_micro_loader)(void *user, int micro, int *n, const int32_t **labels);

typedef struct kfac_step {
    kfac_model *model;
    kfac_sgd *sgd;
    kfac_precond *kfac;   /* NULL: plain SGD */
    kfac_gradsync *sync;
    kfac_loss_scale *loss_scale; /* fp16 training; NULL: none.  K-FAC captures its
                                    factors with the scale divided out, and a
                                    skipped step refreshes nothing */
    kfac_pass_graphs *graphs;    /* each micro-batch's pass from a graph; NULL: eager.
                                    One rank only; steps in which K-FAC estimates
                                    factors run eagerly (kfac_pass_graph.h) */
    int rank, ranks;      /* of the communicator sync and kfac use */
    int micro_batches;    /* per rank */
    float label_smoothing;
} kfac_step;

/* The gradient sync a step needs: all-reduces every parameter tensor that
 * K-FAC (kfac, may be NULL) does not reduce to its owners itself. */
kfac_status kfac_step_gradsync(kfac_model *m, const kfac_precond *kfac, kfac_comm *comm,
                               const kfac_gradsync_config *cfg, kfac_gradsync **out);

/* Runs step `step` (0-based) at fractional `epoch` with learning rate lr.
 * Adds this rank's summed loss, correct predictions and images to the
 * three counters. */
kfac_status kfac_step_run(const kfac_step *s, long step, double epoch, float lr,
                          kfac_micro_loader load, void *user, double *loss_sum, long *correct,
                          long *seen);

#ifdef __cplusplus
}
#endif
#endif
