/* placement.c - the size-balanced greedy owner plan (kfac_placement.h). */
#include <stdlib.h>

#include "kfac/kfac_placement.h"

double kfac_placement_cost(int d, int k)
{
    double dd = d, kk = k;
    return dd * dd * dd + kk * kk * kk + kk * dd * (kk + dd);
}

double kfac_placement_cost_bn(int channels) { return 16.0 * channels; }

typedef struct by_cost {
    double cost;
    int layer;
} by_cost;

static int larger_cost_first(const void *a, const void *b)
{
    const by_cost *x = a, *y = b;
    if (x->cost != y->cost) return x->cost > y->cost ? -1 : 1;
    return x->layer - y->layer; /* stable: the same plan on every rank */
}

kfac_status kfac_placement_greedy(int num_layers, const double *cost, int num_ranks,
                                  kfac_placement *out)
{
    out->owner = NULL;
    out->load = NULL;
    if (num_layers < 0 || num_ranks < 1)
        return KFAC_ERR(KFAC_EINVAL, "placement: %d layers over %d ranks", num_layers, num_ranks);
    out->num_layers = num_layers;
    out->num_ranks = num_ranks;
    out->owner = malloc(((size_t)num_layers + 1) * sizeof(int));
    out->load = calloc((size_t)num_ranks, sizeof(double));
    by_cost *order = malloc(((size_t)num_layers + 1) * sizeof *order);
    if (!out->owner || !out->load || !order) {
        free(order);
        kfac_placement_free(out);
        return KFAC_ERR(KFAC_ENOMEM, "placement: out of memory");
    }
    for (int i = 0; i < num_layers; i++) order[i] = (by_cost){cost[i], i};
    qsort(order, (size_t)num_layers, sizeof *order, larger_cost_first);
    for (int i = 0; i < num_layers; i++) {
        int best = 0;
        for (int r = 1; r < num_ranks; r++)
            if (out->load[r] < out->load[best]) best = r;
        out->owner[order[i].layer] = best;
        out->load[best] += order[i].cost;
    }
    free(order);
    return KFAC_OK;
}

void kfac_placement_free(kfac_placement *p)
{
    free(p->owner);
    free(p->load);
    p->owner = NULL;
    p->load = NULL;
}

double kfac_placement_imbalance(const kfac_placement *p)
{
    double max = 0, sum = 0;
    for (int r = 0; r < p->num_ranks; r++) {
        sum += p->load[r];
        max = p->load[r] > max ? p->load[r] : max;
    }
    return sum > 0 ? max * p->num_ranks / sum : 1.0;
}
