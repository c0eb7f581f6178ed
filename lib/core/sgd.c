/* sgd.c - momentum SGD over the model's flat parameter array, one fused
 * backend update per parameter tensor (weight decay differs by kind). */
#include <stdlib.h>

#include "kfac/kfac_optim.h"

struct kfac_sgd {
    kfac_model *model;
    kfac_sgd_config cfg;
    float *velocity;
};

kfac_status kfac_sgd_init(kfac_sgd **out, kfac_model *m, const kfac_sgd_config *cfg)
{
    *out = NULL;
    if (cfg->momentum < 0 || cfg->momentum >= 1)
        return KFAC_ERR(KFAC_EINVAL, "sgd: momentum %g outside [0, 1)", cfg->momentum);
    if (cfg->weight_decay < 0)
        return KFAC_ERR(KFAC_EINVAL, "sgd: negative weight decay %g", cfg->weight_decay);
    if (!kfac_model_grads(m))
        return KFAC_ERR(KFAC_EINVAL, "sgd: the model was built for inference only (no gradients)");
    kfac_sgd *s = calloc(1, sizeof *s);
    if (!s) return KFAC_ERR(KFAC_ENOMEM, "sgd: out of memory");
    kfac_backend *be = kfac_model_backend(m);
    size_t n = kfac_model_param_count(m);
    kfac_status st = be->alloc(be, n * sizeof(float), (void **)&s->velocity);
    if (st == KFAC_OK) st = be->fill(be, s->velocity, 0.0f, n);
    if (st != KFAC_OK) {
        if (s->velocity) be->release(be, s->velocity);
        free(s);
        return st;
    }
    s->model = m;
    s->cfg = *cfg;
    *out = s;
    return KFAC_OK;
}

void kfac_sgd_free(kfac_sgd *s)
{
    if (!s) return;
    kfac_backend *be = kfac_model_backend(s->model);
    be->release(be, s->velocity);
    free(s);
}

kfac_status kfac_sgd_step(kfac_sgd *s, float lr)
{
    kfac_model *m = s->model;
    kfac_backend *be = kfac_model_backend(m);
    float *p = kfac_model_params(m), *g = kfac_model_grads(m);
    for (int i = 0; i < kfac_model_num_param_tensors(m); i++) {
        const kfac_param *t = kfac_model_param_tensor(m, i);
        int decay = t->kind == KFAC_PARAM_WEIGHT || s->cfg.decay_bn_and_bias;
        KFAC_TRY(be->sgd_update(be, t->count, p + t->offset, g + t->offset,
                                s->velocity + t->offset, lr, s->cfg.momentum,
                                decay ? s->cfg.weight_decay : 0.0f, s->cfg.nesterov));
    }
    return KFAC_OK;
}

float *kfac_sgd_velocity(kfac_sgd *s) { return s->velocity; }
