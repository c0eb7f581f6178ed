/* gradsync.c - micro-batch gradient sums and the bucketed, overlapped
 * all-reduce of data-parallel training (kfac_gradsync.h).  The sums and
 * the final scaling are backend operations on the model's gradients
 * (backend memory: device memory on a GPU). */
#include <stdlib.h>

#include "kfac/kfac_gradsync.h"

typedef struct bucket {
    size_t offset, count;  /* range of the flat gradient array */
    int tensors_left;      /* not yet final in this step */
    int tensors;
    int started;
} bucket;

struct kfac_gradsync {
    kfac_model *model;
    kfac_comm *comm;
    kfac_gradsync_config cfg;
    int num_tensors, num_nodes;
    int *bucket_of_tensor;     /* -1: not synchronized here */
    int (*tensors_of_node)[2]; /* parameter tensors each node writes (-1: none) */
    bucket *buckets;
    int num_buckets;
    kfac_backend *be;          /* the model's: its memory holds the gradients */
    float *sum;                /* micro-batch sums (NULL if max_micro_batches == 1) */
    int micro_batches, micro;  /* this step's count, and the one running */
};

/* Buckets over synchronized tensors in reverse (backward) order; a bucket
 * ends at the size limit or where the next tensor is not adjacent. */
static kfac_status make_buckets(kfac_gradsync *gs, const unsigned char *sync_tensor)
{
    kfac_model *m = gs->model;
    gs->buckets = calloc((size_t)gs->num_tensors + 1, sizeof *gs->buckets);
    if (!gs->buckets) return KFAC_ERR(KFAC_ENOMEM, "gradsync: out of memory");
    bucket *cur = NULL;
    for (int i = gs->num_tensors - 1; i >= 0; i--) {
        gs->bucket_of_tensor[i] = -1;
        if (sync_tensor && !sync_tensor[i]) {
            cur = NULL;
            continue;
        }
        const kfac_param *p = kfac_model_param_tensor(m, i);
        int adjacent = cur && p->offset + p->count == cur->offset;
        if (!adjacent || (cur->count + p->count) * sizeof(float) > gs->cfg.bucket_bytes)
            cur = &gs->buckets[gs->num_buckets++];
        cur->offset = p->offset; /* buckets grow downwards */
        cur->count += p->count;
        cur->tensors++;
        gs->bucket_of_tensor[i] = (int)(cur - gs->buckets);
    }
    return KFAC_OK;
}

kfac_status kfac_gradsync_init(kfac_gradsync **out, kfac_model *m, kfac_comm *comm,
                               const unsigned char *sync_tensor, const kfac_gradsync_config *cfg)
{
    *out = NULL;
    if (cfg->max_micro_batches < 1)
        return KFAC_ERR(KFAC_EINVAL, "gradsync: max_micro_batches %d < 1", cfg->max_micro_batches);
    if (!kfac_model_grads(m))
        return KFAC_ERR(KFAC_EINVAL, "gradsync: the model was built for inference only (no "
                        "gradients)");
    kfac_gradsync *gs = calloc(1, sizeof *gs);
    if (!gs) return KFAC_ERR(KFAC_ENOMEM, "gradsync: out of memory");
    gs->model = m;
    gs->be = kfac_model_backend(m);
    gs->comm = comm;
    gs->cfg = *cfg;
    if (!gs->cfg.bucket_bytes) gs->cfg.bucket_bytes = (size_t)25 << 20;
    gs->num_tensors = kfac_model_num_param_tensors(m);
    gs->num_nodes = kfac_model_num_nodes(m);
    gs->bucket_of_tensor = malloc(((size_t)gs->num_tensors + 1) * sizeof(int));
    gs->tensors_of_node = malloc((size_t)gs->num_nodes * sizeof *gs->tensors_of_node);
    kfac_status st = gs->bucket_of_tensor && gs->tensors_of_node
                         ? KFAC_OK
                         : KFAC_ERR(KFAC_ENOMEM, "gradsync: out of memory");
    for (int i = 0; st == KFAC_OK && i < gs->num_nodes; i++) {
        kfac_layer_view v;
        kfac_model_layer(m, i, 1, &v);
        gs->tensors_of_node[i][0] = v.param[0];
        gs->tensors_of_node[i][1] = v.param[1];
    }
    if (st == KFAC_OK) st = make_buckets(gs, sync_tensor);
    if (st == KFAC_OK && cfg->max_micro_batches > 1)
        st = gs->be->alloc(gs->be, kfac_model_param_count(m) * sizeof(float) + 1,
                           (void **)&gs->sum);
    if (st != KFAC_OK) {
        kfac_gradsync_free(gs);
        return st;
    }
    *out = gs;
    return KFAC_OK;
}

void kfac_gradsync_free(kfac_gradsync *gs)
{
    if (!gs) return;
    free(gs->bucket_of_tensor);
    free(gs->tensors_of_node);
    free(gs->buckets);
    if (gs->sum) gs->be->release(gs->be, gs->sum);
    free(gs);
}

int kfac_gradsync_num_buckets(const kfac_gradsync *gs) { return gs->num_buckets; }

kfac_status kfac_gradsync_begin(kfac_gradsync *gs, int micro_batches)
{
    if (micro_batches < 1 || micro_batches > gs->cfg.max_micro_batches)
        return KFAC_ERR(KFAC_EINVAL, "gradsync: %d micro-batches outside [1, %d]", micro_batches,
                        gs->cfg.max_micro_batches);
    gs->micro_batches = micro_batches;
    gs->micro = 0;
    for (int b = 0; b < gs->num_buckets; b++) {
        gs->buckets[b].tensors_left = gs->buckets[b].tensors;
        gs->buckets[b].started = 0;
    }
    return KFAC_OK;
}

static kfac_status start_bucket(kfac_gradsync *gs, bucket *b)
{
    b->started = 1;
    return kfac_comm_iallreduce(gs->comm, kfac_model_grads(gs->model) + b->offset, b->count,
                                KFAC_F32, KFAC_STAGE_GRAD_ALLREDUCE);
}

/* Earlier micro-batches add into the sums; the last one adds the sums in. */
static kfac_status accumulate(kfac_gradsync *gs, const kfac_param *p)
{
    kfac_backend *be = gs->be;
    float *g = kfac_model_grads(gs->model) + p->offset, *s = gs->sum + p->offset;
    if (gs->micro == 0) return be->copy2d(be, 1, p->count * sizeof(float), s, 0, g, 0);
    if (gs->micro < gs->micro_batches - 1) return be->axpby(be, p->count, 1.0f, g, 1.0f, s);
    return be->axpby(be, p->count, 1.0f, s, 1.0f, g);
}

kfac_status kfac_gradsync_node_done(kfac_gradsync *gs, int node)
{
    int last = gs->micro == gs->micro_batches - 1;
    for (int t = 0; t < 2; t++) {
        int ti = gs->tensors_of_node[node][t];
        if (ti < 0) continue;
        if (gs->micro_batches > 1) KFAC_TRY(accumulate(gs, kfac_model_param_tensor(gs->model, ti)));
        int b = gs->bucket_of_tensor[ti];
        if (!last || b < 0) continue;
        if (--gs->buckets[b].tensors_left == 0 && gs->cfg.overlap)
            KFAC_TRY(start_bucket(gs, &gs->buckets[b]));
    }
    return last && gs->cfg.overlap ? kfac_comm_progress(gs->comm) : KFAC_OK;
}

void kfac_gradsync_end_micro(kfac_gradsync *gs) { gs->micro++; }

kfac_status kfac_gradsync_finish(kfac_gradsync *gs, float scale)
{
    for (int b = 0; b < gs->num_buckets; b++)
        if (!gs->buckets[b].started) KFAC_TRY(start_bucket(gs, &gs->buckets[b]));
    KFAC_TRY(kfac_comm_wait_all(gs->comm));
    float *g = kfac_model_grads(gs->model);
    if (scale != 1.0f)
        for (int b = 0; b < gs->num_buckets; b++)
            KFAC_TRY(gs->be->axpby(gs->be, gs->buckets[b].count, 0.0f, NULL, scale,
                                   g + gs->buckets[b].offset));
    return KFAC_OK;
}
