/* step.c - one data-parallel optimizer step (kfac_step.h). */
#include <stdlib.h>

#include "kfac/kfac_step.h"

kfac_status kfac_step_gradsync(kfac_model *m, const kfac_precond *kfac, kfac_comm *comm,
                               const kfac_gradsync_config *cfg, kfac_gradsync **out)
{
    int tensors = kfac_model_num_param_tensors(m);
    unsigned char *sync = malloc((size_t)tensors + 1);
    if (!sync) return KFAC_ERR(KFAC_ENOMEM, "step: out of memory");
    for (int i = 0; i < tensors; i++) sync[i] = !kfac || !kfac_precond_owns_tensor(kfac, i);
    kfac_status st = kfac_gradsync_init(out, m, comm, sync, cfg);
    free(sync);
    return st;
}

/* The backward hook: K-FAC capture, then gradient buckets. */
static kfac_status step_hook(kfac_model *m, int node, int n, void *user)
{
    const kfac_step *s = user;
    if (s->kfac && kfac_precond_capture_in_backward(s->kfac))
        KFAC_TRY(kfac_precond_capture(s->kfac, node, n));
    return kfac_gradsync_node_done(s->sync, node);
}

/* Forward, [sampled-Fisher pass], loss and backward of micro-batch j;
 * from a graph unless K-FAC estimates factors in this step (its hook and
 * sampled pass read activations between the backward operations). */
static kfac_status pass(const kfac_step *s, int j, int factors, int n, const int32_t *labels,
                        double *loss, int *hits)
{
    if (s->graphs && !factors)
        return kfac_pass_graphs_run(s->graphs, n, labels, s->label_smoothing, step_hook,
                                    (void *)s, loss, hits);
    KFAC_TRY(kfac_model_forward(s->model, n, KFAC_MODE_TRAIN));
    if (s->kfac) KFAC_TRY(kfac_precond_sampled_pass(s->kfac, n, (long)s->rank * s->micro_batches + j));
    KFAC_TRY(kfac_model_loss(s->model, n, labels, s->label_smoothing, loss, hits));
    kfac_model_set_backward_hook(s->model, step_hook, (void *)s);
    kfac_status st = kfac_model_backward(s->model, n);
    kfac_model_set_backward_hook(s->model, NULL, NULL);
    return st;
}

static kfac_status micro_batch(const kfac_step *s, int j, int factors, kfac_micro_loader load,
                               void *user, double *loss_sum, long *correct, long *seen)
{
    int n, hits;
    double loss;
    const int32_t *labels;
    KFAC_TRY(load(user, j, &n, &labels));
    KFAC_TRY(pass(s, j, factors, n, labels, &loss, &hits));
    kfac_gradsync_end_micro(s->sync);
    if (s->kfac) kfac_precond_end_micro(s->kfac);
    *loss_sum += loss;
    *correct += hits;
    *seen += n;
    return KFAC_OK;
}

kfac_status kfac_step_run(const kfac_step *s, long step, double epoch, float lr,
                          kfac_micro_loader load, void *user, double *loss_sum, long *correct,
                          long *seen)
{
    if (s->graphs && s->ranks > 1)
        return KFAC_ERR(KFAC_ENOTSUP, "step: graphs are for one rank (a replayed pass starts "
                        "no all-reduce before it ends)");
    if (s->loss_scale) kfac_loss_scale_begin(s->loss_scale, s->model);
    KFAC_TRY(kfac_gradsync_begin(s->sync, s->micro_batches));
    int factors = s->kfac ? kfac_precond_begin(s->kfac, step, s->micro_batches) : 0;
    for (int j = 0; j < s->micro_batches; j++)
        KFAC_TRY(micro_batch(s, j, factors, load, user, loss_sum, correct, seen));
    float mean = 1.0f / (float)(s->ranks * s->micro_batches);
    KFAC_TRY(kfac_gradsync_finish(s->sync, mean));
    if (s->loss_scale) {
        int apply;
        KFAC_TRY(kfac_loss_scale_finish(s->loss_scale, s->model, &apply));
        if (!apply) return KFAC_OK; /* overflowed: the scale is halved, the step skipped */
    }
    if (s->kfac) KFAC_TRY(kfac_precond_finish(s->kfac, epoch, lr, mean));
    return kfac_sgd_step(s->sgd, lr);
}
