/* pass_graph.c - training passes replayed from backend graphs (kfac_pass_graph.h). */
#include <stdio.h>
#include <stdlib.h>

#include "kfac/kfac_pass_graph.h"

/* Two input buffers, and room for a second batch size or loss scale. */
#define MAX_GRAPHS 4

typedef struct entry {
    const float *input; /* the key: what a captured pass holds fixed */
    int n;
    float loss_scale, smoothing;
    int seen;       /* passes run with this key */
    long last_used; /* for eviction: the entry least recently used goes */
    void *graph;    /* NULL until captured */
} entry;

struct kfac_pass_graphs {
    kfac_model *model;
    kfac_backend *be;
    entry entries[MAX_GRAPHS];
    int count;
    long passes; /* through kfac_pass_graphs_run: the entries' clock */
    long replays;
    int off;
    char reason[512];
};

kfac_status kfac_pass_graphs_init(kfac_pass_graphs **out, kfac_model *m)
{
    kfac_backend *be = kfac_model_backend(m);
    *out = NULL;
    if (!be->capture_begin)
        return KFAC_ERR(KFAC_ENOTSUP, "backend '%s' has no graphs", be->name);
    kfac_pass_graphs *g = calloc(1, sizeof *g);
    if (!g) return KFAC_ERR(KFAC_ENOMEM, "graphs: out of memory");
    g->model = m;
    g->be = be;
    *out = g;
    return KFAC_OK;
}

void kfac_pass_graphs_free(kfac_pass_graphs *g)
{
    if (!g) return;
    for (int i = 0; i < g->count; i++)
        if (g->entries[i].graph) g->be->graph_free(g->be, g->entries[i].graph);
    free(g);
}

const char *kfac_pass_graphs_off(const kfac_pass_graphs *g) { return g->off ? g->reason : NULL; }

long kfac_pass_graphs_replays(const kfac_pass_graphs *g) { return g->replays; }

static int same_key(const entry *e, const float *input, int n, float loss_scale,
                    float smoothing)
{
    return e->input == input && e->n == n && e->loss_scale == loss_scale &&
           e->smoothing == smoothing;
}

/* The entry of the key; a new one replaces the least recently used when
 * the table is full (fp16's loss scale moves on: old scales' graphs go). */
static entry *lookup(kfac_pass_graphs *g, const float *input, int n, float loss_scale,
                     float smoothing)
{
    entry *e = NULL;
    for (int i = 0; i < g->count && !e; i++)
        if (same_key(&g->entries[i], input, n, loss_scale, smoothing)) e = &g->entries[i];
    if (!e && g->count < MAX_GRAPHS) e = &g->entries[g->count++];
    if (!e) {
        e = &g->entries[0];
        for (int i = 1; i < MAX_GRAPHS; i++)
            if (g->entries[i].last_used < e->last_used) e = &g->entries[i];
    }
    if (!same_key(e, input, n, loss_scale, smoothing)) {
        /* an evicted graph still running is freed when it completes */
        if (e->graph) g->be->graph_free(g->be, e->graph);
        *e = (entry){.input = input, .n = n, .loss_scale = loss_scale, .smoothing = smoothing};
    }
    e->last_used = ++g->passes;
    return e;
}

static kfac_status backward(kfac_model *m, int n, kfac_backward_hook hook, void *user)
{
    kfac_model_set_backward_hook(m, hook, user);
    kfac_status st = kfac_model_backward(m, n);
    kfac_model_set_backward_hook(m, NULL, NULL);
    return st;
}

static kfac_status eager(kfac_pass_graphs *g, int n, const int32_t *labels, float smoothing,
                         kfac_backward_hook hook, void *user, double *loss_sum, int *correct)
{
    KFAC_TRY(kfac_model_forward(g->model, n, KFAC_MODE_TRAIN));
    KFAC_TRY(kfac_model_loss(g->model, n, labels, smoothing, loss_sum, correct));
    return backward(g->model, n, hook, user);
}

/* Records the pass (labels already set) into e->graph, without the hook;
 * on failure turns graphs off with the first error as the reason. */
static kfac_status capture(kfac_pass_graphs *g, entry *e, int n, float smoothing)
{
    kfac_model *m = g->model;
    kfac_status st = g->be->capture_begin(g->be);
    if (st == KFAC_OK) {
        st = kfac_model_forward(m, n, KFAC_MODE_TRAIN);
        if (st == KFAC_OK) st = kfac_model_loss_queue(m, n, smoothing);
        if (st == KFAC_OK) st = backward(m, n, NULL, NULL);
        if (st != KFAC_OK) /* before capture_end records its own error */
            snprintf(g->reason, sizeof g->reason, "%s", kfac_last_error());
        kfac_status end = g->be->capture_end(g->be, &e->graph);
        if (st == KFAC_OK) st = end;
    }
    if (st != KFAC_OK) {
        if (!g->reason[0]) snprintf(g->reason, sizeof g->reason, "%s", kfac_last_error());
        if (e->graph) g->be->graph_free(g->be, e->graph);
        e->graph = NULL;
        g->off = 1;
    }
    return st;
}

kfac_status kfac_pass_graphs_run(kfac_pass_graphs *g, int n, const int32_t *labels,
                                  float smoothing, kfac_backward_hook hook, void *user,
                                  double *loss_sum, int *correct)
{
    kfac_model *m = g->model;
    entry *e = g->off ? NULL
                      : lookup(g, kfac_model_input(m), n, kfac_model_loss_scale(m), smoothing);
    if (!e || e->seen++ == 0) /* no graph, or the warm-up pass */
        return eager(g, n, labels, smoothing, hook, user, loss_sum, correct);
    KFAC_TRY(kfac_model_set_labels(m, n, labels));
    if (!e->graph && capture(g, e, n, smoothing) != KFAC_OK) /* nothing ran */
        return eager(g, n, labels, smoothing, hook, user, loss_sum, correct);
    KFAC_TRY(g->be->graph_launch(g->be, e->graph));
    g->replays++;
    for (int i = kfac_model_num_nodes(m) - 1; hook && i >= 0; i--)
        KFAC_TRY(hook(m, i, n, user));
    return kfac_model_loss_result(m, n, loss_sum, correct);
}
