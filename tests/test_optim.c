/* test_optim.c - momentum SGD against its formula computed by hand in
 * double, weight-decay exclusion of BN parameters and biases, and the
 * learning-rate schedules against their closed forms. */
#include <string.h>

#include "kfac/kfac_optim.h"
#include "kfac/kfac_resnet.h"
#include "testutil.h"

static kfac_backend *be;

static void check_sgd(int nesterov, int decay_all)
{
    kfac_model *m;
    CHECK_OK(kfac_resnet_build("resnet8-fmnist", NULL, be, 1, 1, &m));
    size_t n = kfac_model_param_count(m);
    float *p = kfac_model_params(m), *g = kfac_model_grads(m);
    kfac_sgd_config cfg = {.momentum = 0.9f, .nesterov = nesterov, .weight_decay = 0.01f,
                           .decay_bn_and_bias = decay_all};
    kfac_sgd *sgd;
    CHECK_OK(kfac_sgd_init(&sgd, m, &cfg));
    double *pd = malloc(n * sizeof *pd), *vd = calloc(n, sizeof *vd);
    int *decays = malloc(n * sizeof *decays);
    for (int t = 0; t < kfac_model_num_param_tensors(m); t++) {
        const kfac_param *pt = kfac_model_param_tensor(m, t);
        for (size_t i = pt->offset; i < pt->offset + pt->count; i++)
            decays[i] = decay_all || pt->kind == KFAC_PARAM_WEIGHT;
    }
    for (size_t i = 0; i < n; i++) pd[i] = p[i];
    unsigned long long seed = 3;
    const double lrs[3] = {0.1, 0.05, 0.2};
    for (int step = 0; step < 3; step++) {
        for (size_t i = 0; i < n; i++) g[i] = (float)test_uniform(&seed);
        for (size_t i = 0; i < n; i++) {
            double gi = g[i] + (decays[i] ? 0.01 : 0.0) * pd[i];
            vd[i] = 0.9 * vd[i] + gi;
            pd[i] -= lrs[step] * (nesterov ? gi + 0.9 * vd[i] : vd[i]);
        }
        CHECK_OK(kfac_sgd_step(sgd, (float)lrs[step]));
    }
    double err = test_max_rel_err(p, pd, n, 1e-3);
    CHECK(err < 1e-5, "sgd nesterov=%d decay_all=%d: rel err %.2e", nesterov, decay_all, err);
    kfac_sgd_config bad = cfg;
    bad.momentum = 1.0f;
    kfac_sgd *s2;
    CHECK(kfac_sgd_init(&s2, m, &bad) == KFAC_EINVAL, "momentum 1 rejected");
    free(pd);
    free(vd);
    free(decays);
    kfac_sgd_free(sgd);
    kfac_model_free(m);
}

static void check_schedules(void)
{
    kfac_lr_schedule s = {.peak = 0.8, .warmup_start = 0.0, .final = 0.0, .warmup_epochs = 2,
                          .decay_start = 2, .decay_end = 20, .power = 2, .gamma = 0.1};
    kfac_lr_decay d;
    CHECK_OK(kfac_lr_decay_parse("cosine", &d));
    s.decay = d;
    CHECK(fabs(kfac_lr_at(&s, 0.0)) < 1e-12, "warm-up starts at 0");
    CHECK(fabs(kfac_lr_at(&s, 1.0) - 0.4) < 1e-12, "half warm-up: %g", kfac_lr_at(&s, 1.0));
    CHECK(fabs(kfac_lr_at(&s, 2.0) - 0.8) < 1e-12, "peak after warm-up");
    CHECK(fabs(kfac_lr_at(&s, 11.0) - 0.4) < 1e-12, "cosine midpoint: %g", kfac_lr_at(&s, 11.0));
    CHECK(fabs(kfac_lr_at(&s, 5.0) - 0.4 * (1 + cos(M_PI * 3 / 18))) < 1e-12, "cosine at 5");
    CHECK(fabs(kfac_lr_at(&s, 20.0)) < 1e-12 && fabs(kfac_lr_at(&s, 25.0)) < 1e-12, "cosine end");

    /* Osawa et al. 32k: poly power 3.5 from epoch 1.5 to 0 at epoch 49.5 */
    kfac_lr_schedule poly = {.decay = KFAC_LR_POLY, .peak = 3e-2, .final = 0, .warmup_epochs = 0,
                             .decay_start = 1.5, .decay_end = 49.5, .power = 3.5};
    CHECK(fabs(kfac_lr_at(&poly, 1.0) - 3e-2) < 1e-12, "poly holds before its start");
    CHECK(fabs(kfac_lr_at(&poly, 25.5) - 3e-2 * pow(0.5, 3.5)) < 1e-12, "poly at 25.5: %g",
          kfac_lr_at(&poly, 25.5));
    CHECK(kfac_lr_at(&poly, 49.5) == 0.0, "poly reaches 0");

    kfac_lr_schedule step = {.decay = KFAC_LR_STEP, .peak = 0.1, .warmup_epochs = 0, .gamma = 0.1,
                             .milestones = {30, 60}, .num_milestones = 2};
    CHECK(fabs(kfac_lr_at(&step, 29.9) - 0.1) < 1e-12, "step before 30");
    CHECK(fabs(kfac_lr_at(&step, 30.0) - 0.01) < 1e-12, "step at 30");
    CHECK(fabs(kfac_lr_at(&step, 75.0) - 0.001) < 1e-12, "step after 60");
    CHECK(kfac_lr_decay_parse("linear", &d) == KFAC_EINVAL, "unknown decay rejected");
}

int main(void)
{
    CHECK_OK(kfac_backend_get("cpu", 2, &be));
    check_sgd(0, 0);
    check_sgd(1, 0);
    check_sgd(1, 1);
    check_schedules();
    kfac_backend_free(be);
    return test_summary("test_optim");
}
