/* schedule.c - learning-rate schedules: warm-up then cosine, polynomial or
 * step decay.  The single place that maps (epoch) -> learning rate. */
#include <math.h>
#include <string.h>

#include "kfac/kfac_optim.h"

kfac_status kfac_lr_decay_parse(const char *name, kfac_lr_decay *out)
{
    static const struct { const char *name; kfac_lr_decay decay; } table[] = {
        {"constant", KFAC_LR_CONSTANT}, {"cosine", KFAC_LR_COSINE},
        {"poly", KFAC_LR_POLY},         {"step", KFAC_LR_STEP},
    };
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++)
        if (strcmp(name, table[i].name) == 0) {
            *out = table[i].decay;
            return KFAC_OK;
        }
    return KFAC_ERR(KFAC_EINVAL, "unknown lr decay '%s' (known: constant, cosine, poly, step)", name);
}

double kfac_lr_at(const kfac_lr_schedule *s, double epoch)
{
    if (epoch < s->warmup_epochs)
        return s->warmup_start + (s->peak - s->warmup_start) * epoch / s->warmup_epochs;
    double span = s->decay_end - s->decay_start;
    double t = span > 0 ? (epoch - s->decay_start) / span : 1.0;
    t = t < 0 ? 0 : t > 1 ? 1 : t;
    switch (s->decay) {
    case KFAC_LR_CONSTANT:
        return s->peak;
    case KFAC_LR_COSINE:
        return s->final + (s->peak - s->final) * 0.5 * (1.0 + cos(M_PI * t));
    case KFAC_LR_POLY:
        return s->final + (s->peak - s->final) * pow(1.0 - t, s->power);
    case KFAC_LR_STEP: {
        double lr = s->peak;
        for (int i = 0; i < s->num_milestones; i++)
            if (epoch >= s->milestones[i]) lr *= s->gamma;
        return lr;
    }
    }
    return s->peak;
}
