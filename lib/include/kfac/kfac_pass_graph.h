/* kfac_pass_graph.h - a model's training pass (forward, loss,
 * backward) replayed from backend graphs (CUDA graphs), so the several
 * hundred operations of a ResNet-50 pass cost one launch.
 *
 * A graph keeps the pointers and scalars it was captured with, so there is
 * one per (input buffer, batch size): the trainer's feed alternates two
 * input buffers.  The first pass of each runs eagerly (it plans cuDNN
 * convolutions and sizes scratch memory, which a capture must not do), the
 * second is captured, and it and later ones replay.  A failed capture
 * turns graphs off for good, with its reason kept; passes then run eagerly.
 *
 * Only for passes whose scalars stay as captured (BN momentum, label
 * smoothing, loss scale: not fp16 loss scaling) and whose backward hook
 * queues no device work (gradient bookkeeping on one rank, no K-FAC): with
 * a graph the hook runs for every node after the launch. */
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
