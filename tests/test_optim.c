/* test_optim.c - momentum SGD against its formula computed by hand in
 * double, weight-decay exclusion of BN parameters and biases, the
 * learning-rate schedules against their closed forms, and dynamic loss
 * scaling (its policy, and gradients through a scaled loss against the
 * unscaled ones). */
#include <math.h>
#include <string.h>

#include "kfac/kfac_loss_scale.h"
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

/* The policy: unscale exactly (powers of two), skip and halve on inf/nan,
 * double after growth_interval good steps, fail on overflow at scale 1. */
static void check_loss_scale_policy(void)
{
    kfac_model *m;
    CHECK_OK(kfac_resnet_build("resnet8-fmnist", NULL, be, 1, 1, &m));
    size_t n = kfac_model_param_count(m);
    float *g = kfac_model_grads(m), *want = malloc(n * sizeof *want);
    unsigned long long seed = 5;
    kfac_loss_scale ls;
    kfac_loss_scale_init(&ls, 1024.0f, 3);
    int apply = -1, exact = 1;
    for (size_t i = 0; i < n; i++) {
        want[i] = (float)test_uniform(&seed);
        g[i] = want[i] * 1024.0f;
    }
    CHECK_OK(kfac_loss_scale_finish(&ls, m, &apply));
    for (size_t i = 0; i < n; i++) exact &= g[i] == want[i];
    CHECK(apply == 1 && exact && ls.scale == 1024.0f && ls.good_steps == 1,
          "good step: apply %d, exact %d, scale %g, good %d", apply, exact, ls.scale, ls.good_steps);
    g[n / 2] = INFINITY;
    CHECK_OK(kfac_loss_scale_finish(&ls, m, &apply));
    CHECK(apply == 0 && ls.scale == 512.0f && ls.good_steps == 0 && ls.skipped_steps == 1,
          "inf: apply %d, scale %g, good %d, skipped %ld", apply, ls.scale, ls.good_steps,
          ls.skipped_steps);
    g[n / 2] = NAN;
    CHECK_OK(kfac_loss_scale_finish(&ls, m, &apply));
    CHECK(apply == 0 && ls.scale == 256.0f && ls.skipped_steps == 2, "nan: apply %d, scale %g",
          apply, ls.scale);
    for (int k = 0; k < 3; k++) {
        for (size_t i = 0; i < n; i++) g[i] = 1.0f;
        CHECK_OK(kfac_loss_scale_finish(&ls, m, &apply));
    }
    CHECK(apply == 1 && ls.scale == 512.0f && ls.good_steps == 0,
          "growth after 3 good steps: scale %g, good %d", ls.scale, ls.good_steps);
    kfac_loss_scale_init(&ls, 1.0f, 3);
    g[0] = INFINITY;
    CHECK(kfac_loss_scale_finish(&ls, m, &apply) == KFAC_EINVAL &&
              strstr(kfac_last_error(), "diverged"),
          "overflow at scale 1 fails: %s", kfac_last_error());
    free(want);
    kfac_model_free(m);
}

/* One forward/backward on a random batch with loss scale 2^16, unscaled by
 * kfac_loss_scale_finish, against the same pass unscaled: every operation
 * of backward is linear in the loss gradient, and scaling by a power of
 * two is exact, so only subnormal gradients may differ. */
static void check_loss_scale_gradients(void)
{
    const int batch = 8;
    kfac_model *m;
    CHECK_OK(kfac_resnet_build("resnet8-fmnist", NULL, be, batch, 1, &m));
    size_t n = kfac_model_param_count(m);
    int h, w, c;
    kfac_model_input_shape(m, &h, &w, &c);
    float *x = kfac_model_input(m), *g = kfac_model_grads(m), *plain = malloc(n * sizeof *plain);
    unsigned long long seed = 9;
    for (size_t i = 0; i < (size_t)batch * h * w * c; i++) x[i] = (float)test_uniform(&seed);
    int32_t labels[8] = {0, 1, 2, 3, 4, 5, 6, 7};
    double loss_plain, loss_scaled;
    int hits;
    CHECK_OK(kfac_model_forward(m, batch, KFAC_MODE_TRAIN));
    CHECK_OK(kfac_model_loss(m, batch, labels, 0.0f, &loss_plain, &hits));
    CHECK_OK(kfac_model_backward(m, batch));
    memcpy(plain, g, n * sizeof *g);
    kfac_loss_scale ls;
    kfac_loss_scale_init(&ls, 65536.0f, 2000);
    kfac_loss_scale_begin(&ls, m);
    CHECK_OK(kfac_model_forward(m, batch, KFAC_MODE_TRAIN));
    CHECK_OK(kfac_model_loss(m, batch, labels, 0.0f, &loss_scaled, &hits));
    CHECK_OK(kfac_model_backward(m, batch));
    double scaled_max = 0, plain_max = 0;
    for (size_t i = 0; i < n; i++) {
        scaled_max = fmax(scaled_max, fabs(g[i]));
        plain_max = fmax(plain_max, fabs(plain[i]));
    }
    CHECK(scaled_max > 1000 * plain_max, "the backward pass saw the scale: max |g| %g vs %g",
          scaled_max, plain_max);
    int apply;
    CHECK_OK(kfac_loss_scale_finish(&ls, m, &apply));
    double err = 0;
    for (size_t i = 0; i < n; i++)
        err = fmax(err, fabs((double)g[i] - plain[i]) / fmax(plain_max, 1e-30));
    CHECK(apply == 1 && err < 1e-6 && loss_scaled == loss_plain,
          "scaled then unscaled gradients: apply %d, max err %.2e of max |g|, loss %.9g vs %.9g",
          apply, err, loss_scaled, loss_plain);
    free(plain);
    kfac_model_free(m);
}

int main(void)
{
    CHECK_OK(kfac_backend_get("cpu", 2, &be));
    check_sgd(0, 0);
    check_sgd(1, 0);
    check_sgd(1, 1);
    check_schedules();
    check_loss_scale_policy();
    check_loss_scale_gradients();
    kfac_backend_free(be);
    return test_summary("test_optim");
}
