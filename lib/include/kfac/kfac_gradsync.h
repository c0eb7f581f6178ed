/* kfac_gradsync.h - data-parallel gradients: sums over micro-batches and a
 * bucketed all-reduce that starts while backward is still running.
 *
 * A step of M micro-batches on each of P ranks:
 *   kfac_gradsync_begin(gs, M)
 *   for j in 0..M-1: forward, loss, backward with kfac_gradsync_node_done
 *     called from the backward hook after each node; kfac_gradsync_end_micro
 *   kfac_gradsync_finish(gs, 1/(P*M))
 * after which every synchronized parameter's gradient is the mean over all
 * P*M micro-batches (each micro-batch gradient being its own mean), on
 * every rank.  Parameters not synchronized here (those K-FAC reduces to
 * their owners) still get their micro-batch sums, unscaled.
 *
 * Buckets: runs of parameter tensors in backward order that are adjacent in
 * the flat gradient array, up to bucket_bytes each.  The moment the last
 * tensor of a bucket is final (its node's backward in the last micro-batch
 * ran), the bucket's all-reduce is started (nonblocking) when overlap is on,
 * and MPI is given a chance to progress at every later node.
 *
 * BN running statistics are not touched: batch statistics stay local to
 * each rank's micro-batch (the usual data-parallel choice; see jobs/README).
 */
#ifndef KFAC_GRADSYNC_H
#define KFAC_GRADSYNC_H

#include "kfac/kfac_comm.h"
#include "kfac/kfac_model.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kfac_gradsync_config {
    size_t bucket_bytes;   /* 0: 25 MiB (PyTorch DDP's default) */
    int overlap;           /* start buckets during backward */
    int max_micro_batches; /* >= 1; sizes the accumulation buffer */
} kfac_gradsync_config;

typedef struct kfac_gradsync kfac_gradsync;

/* sync_tensor[i] nonzero: parameter tensor i is all-reduced here (NULL: all). */
kfac_status kfac_gradsync_init(kfac_gradsync **out, kfac_model *m, kfac_comm *comm,
                               const unsigned char *sync_tensor, const kfac_gradsync_config *cfg);
void kfac_gradsync_free(kfac_gradsync *gs);

kfac_status kfac_gradsync_begin(kfac_gradsync *gs, int micro_batches);
/* From the backward hook: node `node` has written its parameter gradients. */
kfac_status kfac_gradsync_node_done(kfac_gradsync *gs, int node);
/* After each micro-batch's backward. */
void kfac_gradsync_end_micro(kfac_gradsync *gs);
/* Completes every bucket and scales the synchronized gradients. */
kfac_status kfac_gradsync_finish(kfac_gradsync *gs, float scale);

int kfac_gradsync_num_buckets(const kfac_gradsync *gs);

#ifdef __cplusplus
}
#endif
#endif
