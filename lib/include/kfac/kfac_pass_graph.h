/* kfac_pass_graph.h - a model's training pass (forward, loss,
 * backward) replayed from backend graphs (CUDA graphs), so the several
 * hundred operations of a ResNet-50 pass cost one launch.
 *
 * A graph keeps the pointers and scalars it was captured with, so there is
 * one per key (input buffer, batch size, loss scale, label smoothing): the
 * trainer's feed alternates two input buffers, and fp16's dynamic loss
 * scale changes now and then (a new key's graphs replace the least
 * recently used).  BN momentum must stay as captured (precise BN changes it
 * only for its own eager passes and restores it).  The first pass of each
 * key runs eagerly (it plans cuDNN convolutions and sizes scratch memory,
 * which a capture must not do), the second is captured, and it and later
 * ones replay.  A failed capture turns graphs off for good, with its reason
 * kept; passes then run eagerly.
 *
 * With a graph the backward hook runs for every node after the launch,
 * not between the nodes' backward operations.  So graphs are only for
 * passes whose hook reads no activation or activation gradient (those of
 * the arena die during backward): gradient bookkeeping and micro-batch
 * sums, and K-FAC only in steps that estimate no factors.  On several
 * ranks the hook would also start no all-reduce before the pass ends, so
 * the step (kfac_step.h) uses graphs on one rank only.  */
#ifndef KFAC_PASS_GRAPH_H
#define KFAC_PASS_GRAPH_H

#include "kfac/kfac_model.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kfac_pass_graphs kfac_pass_graphs;

/* KFAC_ENOTSUP when m's backend has no graphs. */
kfac_status kfac_pass_graphs_init(kfac_pass_graphs **out, kfac_model *m);

/* Forward in training mode, loss against labels (host) with label
 * smoothing, and backward of the first n images of the model's input;
 * hook (may be NULL) as kfac_model_set_backward_hook's.  The summed loss
 * and correct predictions as kfac_model_loss. */
kfac_status kfac_pass_graphs_run(kfac_pass_graphs *g, int n, const int32_t *labels,
                                  float smoothing, kfac_backward_hook hook, void *user,
                                  double *loss_sum, int *correct);

/* NULL while graphs are in use, else why passes run eagerly. */
const char *kfac_pass_graphs_off(const kfac_pass_graphs *g);

/* Passes run from a graph so far. */
long kfac_pass_graphs_replays(const kfac_pass_graphs *g);

void kfac_pass_graphs_free(kfac_pass_graphs *g);

#ifdef __cplusplus
}
#endif
#endif
