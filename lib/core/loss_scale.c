/* loss_scale.c - dynamic loss scaling (kfac_loss_scale.h). */
#include "kfac/kfac_loss_scale.h"

void kfac_loss_scale_init(kfac_loss_scale *ls, float initial, int growth_interval)
{
    ls->scale = initial;
    ls->growth_interval = growth_interval;
    ls->good_steps = 0;
    ls->skipped_steps = 0;
}

void kfac_loss_scale_begin(const kfac_loss_scale *ls, kfac_model *m)
{
    kfac_model_set_loss_scale(m, ls->scale);
}

kfac_status kfac_loss_scale_finish(kfac_loss_scale *ls, kfac_model *m, int *apply)
{
    kfac_backend *be = kfac_model_backend(m);
    int finite = 0;
    *apply = 0;
    KFAC_TRY(be->scale_grads(be, kfac_model_param_count(m), kfac_model_grads(m),
                             1.0f / ls->scale, &finite));
    if (!finite) {
        if (ls->scale <= 1.0f)
            return KFAC_ERR(KFAC_EINVAL, "loss scaling: gradients are inf or nan even at loss "
                            "scale 1: the run diverged (lower the learning rate)");
        ls->scale *= 0.5f;
        ls->good_steps = 0;
        ls->skipped_steps++;
        return KFAC_OK;
    }
    *apply = 1;
    if (++ls->good_steps >= ls->growth_interval) {
        if (ls->scale < 1e30f) ls->scale *= 2.0f; /* stays finite */
        ls->good_steps = 0;
    }
    return KFAC_OK;
}
