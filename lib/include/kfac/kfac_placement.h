/* kfac_placement.h - which rank owns each K-FAC layer: reduces its factors
 * and gradient, inverts, preconditions, and sends the result to all.
 *
 * The plan is one object, computed once from the layers' sizes and the
 * world size, and the only thing the distributed step consults about
 * ownership.  This version is size-balanced greedy (longest processing time
 * first): layers in decreasing cost, each to the rank with the least cost so
 * far (ties: lowest rank).  The cost of a layer is its inversion work,
 * d^3 + k^3 for factor orders d and k (an eigendecomposition or Cholesky of
 * each), plus its preconditioning work k*d*(k+d).  A later version prices
 * links as well (topology-aware).
 */
#ifndef KFAC_PLACEMENT_H
#define KFAC_PLACEMENT_H

#include "kfac/kfac_status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kfac_placement {
    int num_layers, num_ranks;
    int *owner;     /* owner[layer] in [0, num_ranks) */
    double *load;   /* load[rank]: summed cost of the layers it owns */
} kfac_placement;

/* Cost of one layer with factor orders d (A) and k (G); BN layers with a
 * unit-wise Fisher pass d = k = 2 per channel times channels (see
 * kfac_placement_cost_bn). */
double kfac_placement_cost(int d, int k);
double kfac_placement_cost_bn(int channels);

/* Greedy size-balanced plan of num_layers layers with costs cost[i] over
 * num_ranks ranks.  Deterministic: every rank computes the same plan. */
kfac_status kfac_placement_greedy(int num_layers, const double *cost, int num_ranks,
                                  kfac_placement *out);
void kfac_placement_free(kfac_placement *p);

/* max load / mean load (1 = perfectly balanced). */
double kfac_placement_imbalance(const kfac_placement *p);

#ifdef __cplusplus
}
#endif
#endif
