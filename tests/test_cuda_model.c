/* test_cuda_model.c - the whole ResNet-50, CUDA backend against the CPU
 * backend: one forward/backward on a fixed batch (the loss and every
 * parameter tensor's gradient), then a 10-step SGD loss trajectory on that
 * batch (lr 0.002, momentum 0.9: on the CPU the loss falls smoothly from
 * 7.1 to 1.2), for each activation precision the CUDA backend has.  Both
 * models start from the same parameters (built on the host from one seed).
 *
 * Tolerances (per precision; the CPU run in float32 is the reference):
 *   f32   loss 1e-4 relative; each gradient tensor max|gpu - cpu| within
 *         2e-3 of its max|cpu| (cuDNN and our kernels sum in other orders,
 *         ~1e-6 per operation, grown through 53 batch norms at a batch of
 *         4); trajectory 1e-3 relative per step.
 *   bf16  activations rounded to 8 significant bits (2^-9 relative) at
 *         every layer: loss 2e-2 relative; each gradient tensor's cosine
 *         with the CPU's >= 0.98 and its norm within 10%; trajectory 5e-2
 *         relative per step.
 *   f16   11 significant bits (2^-12), loss scale 2^10 on the logits'
 *         gradient (a fixed scale: the policy is test_optim's): loss 5e-3,
 *         cosine >= 0.995, norm within 3%, trajectory 1e-2.
 * A max-error bound would be meaningless for 16-bit gradients, whose tiny
 * entries carry large relative errors; cosine and norm say whether the
 * gradient points the same way with the same length.
 *
 * Without CUDA in the build or without a GPU: "skipped: no GPU", exit 77. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "kfac/kfac_backend.h"
#include "kfac/kfac_optim.h"
#include "kfac/kfac_resnet.h"
#include "kfac/kfac_rng.h"
#include "testutil.h"

enum { BATCH = 4, STEPS = 10 };

typedef struct tolerance {
    kfac_dtype dtype;
    double loss, grad_max_err, grad_cos, grad_norm, trajectory;
    float loss_scale;
} tolerance;

static const tolerance tolerances[] = {
    {KFAC_F32, 1e-4, 2e-3, 0, 0, 1e-3, 1.0f},
    {KFAC_BF16, 2e-2, 0, 0.98, 0.10, 5e-2, 1.0f},
    {KFAC_F16, 5e-3, 0, 0.995, 0.03, 1e-2, 1024.0f},
};

/* One model's run: gradients of the first pass, then the losses of STEPS
 * SGD steps on the same batch. */
typedef struct run_result {
    double loss;
    float *grads;
    double trajectory[STEPS];
} run_result;

static float *images;
static int32_t labels[BATCH];

static kfac_status run(kfac_backend *be, float loss_scale, run_result *r)
{
    kfac_model *m;
    KFAC_TRY(kfac_resnet_build("resnet50", NULL, be, BATCH, 1, &m));
    int h, w, c, hits;
    kfac_model_input_shape(m, &h, &w, &c);
    size_t pixels = (size_t)BATCH * h * w * c, n = kfac_model_param_count(m);
    kfac_status st = be->upload(be, kfac_model_input(m), images, pixels * sizeof(float));
    kfac_sgd_config cfg = {.momentum = 0.9f, .weight_decay = 1e-4f};
    kfac_sgd *sgd = NULL;
    if (st == KFAC_OK) st = kfac_sgd_init(&sgd, m, &cfg);
    r->grads = malloc(n * sizeof(float));
    kfac_model_set_loss_scale(m, loss_scale);
    for (int step = 0; st == KFAC_OK && step <= STEPS; step++) {
        double loss;
        st = kfac_model_forward(m, BATCH, KFAC_MODE_TRAIN);
        if (st == KFAC_OK) st = kfac_model_loss(m, BATCH, labels, 0.0f, &loss, &hits);
        if (st == KFAC_OK) st = kfac_model_backward(m, BATCH);
        int finite = 1;
        if (st == KFAC_OK && loss_scale != 1.0f)
            st = be->scale_grads(be, n, kfac_model_grads(m), 1.0f / loss_scale, &finite);
        if (st == KFAC_OK && !finite) st = KFAC_ERR(KFAC_EINVAL, "gradients overflowed");
        if (st != KFAC_OK) break;
        if (step == 0) {
            r->loss = loss / BATCH;
            st = be->download(be, r->grads, kfac_model_grads(m), n * sizeof(float));
        } else {
            r->trajectory[step - 1] = loss / BATCH;
        }
        if (st == KFAC_OK && step < STEPS) st = kfac_sgd_step(sgd, 0.002f);
    }
    kfac_sgd_free(sgd);
    kfac_model_free(m);
    return st;
}

/* Every parameter tensor's gradient against the CPU's. */
static void compare_grads(const kfac_model *shape, const run_result *cpu, const run_result *gpu,
                          const tolerance *tol)
{
    double worst_err = 0, worst_cos = 1, worst_norm = 0;
    const char *worst = "";
    for (int t = 0; t < kfac_model_num_param_tensors(shape); t++) {
        const kfac_param *p = kfac_model_param_tensor(shape, t);
        const float *a = gpu->grads + p->offset, *b = cpu->grads + p->offset;
        double max_b = 0, max_d = 0, dot = 0, na = 0, nb = 0;
        for (size_t i = 0; i < p->count; i++) {
            double d = fabs((double)a[i] - b[i]);
            if (!(d <= max_d)) max_d = d; /* NaN too */
            max_b = fmax(max_b, fabs(b[i]));
            dot += (double)a[i] * b[i];
            na += (double)a[i] * a[i];
            nb += (double)b[i] * b[i];
        }
        if (nb == 0) {
            CHECK(na == 0, "%s %s: gradient %g where the CPU's is 0", kfac_dtype_name(tol->dtype),
                  p->name, sqrt(na));
            continue;
        }
        double err = max_d / max_b, cosine = dot / sqrt(na * nb), norm = fabs(sqrt(na / nb) - 1);
        if (!(cosine >= worst_cos)) worst = p->name;
        if (tol->grad_max_err > 0) {
            CHECK(err <= tol->grad_max_err, "%s %s: gradient max error %.3g of max |g|",
                  kfac_dtype_name(tol->dtype), p->name, err);
        } else {
            CHECK(cosine >= tol->grad_cos && norm <= tol->grad_norm,
                  "%s %s: gradient cosine %.5f, norm off by %.3g", kfac_dtype_name(tol->dtype),
                  p->name, cosine, norm);
        }
        worst_err = fmax(worst_err, err);
        worst_cos = fmin(worst_cos, cosine);
        worst_norm = fmax(worst_norm, norm);
    }
    printf("%s: %d gradient tensors: worst max error %.3g, cosine %.5f (%s), norm %.3g\n",
           kfac_dtype_name(tol->dtype), kfac_model_num_param_tensors(shape), worst_err, worst_cos,
           worst, worst_norm);
}

int main(void)
{
    TEST_REQUIRE_GPU("test_cuda_model");
    kfac_backend *cpu = NULL, *gpu = NULL;
    kfac_status st;

    CHECK_OK(kfac_backend_get("cpu", 0, &cpu));
    kfac_model *shape; /* the parameter table, on the CPU */
    CHECK_OK(kfac_resnet_build("resnet50", NULL, cpu, 1, 1, &shape));
    int h, w, c;
    kfac_model_input_shape(shape, &h, &w, &c);
    size_t pixels = (size_t)BATCH * h * w * c;
    images = malloc(pixels * sizeof(float));
    kfac_rng rng;
    kfac_rng_seed(&rng, 21);
    for (size_t i = 0; i < pixels; i++) images[i] = (float)kfac_rng_normal(&rng);
    for (int i = 0; i < BATCH; i++) labels[i] = (int32_t)kfac_rng_below(&rng, 1000);

    run_result ref = {0};
    CHECK_OK(run(cpu, 1.0f, &ref));
    printf("cpu f32: loss %.6f, after %d steps %.6f\n", ref.loss, STEPS, ref.trajectory[STEPS - 1]);
    CHECK(ref.trajectory[STEPS - 1] < 0.5 * ref.loss, "the CPU's loss falls on a fixed batch");
    /* 4 images x 53 BN layers: the CPU run takes ~10 s on 2 cores. */
    for (size_t k = 0; k < sizeof tolerances / sizeof tolerances[0]; k++) {
        const tolerance *tol = &tolerances[k];
        const char *name = kfac_dtype_name(tol->dtype);
        run_result r = {0};
        st = kfac_backend_get("cuda", 0, &gpu);
        if (st == KFAC_OK) st = kfac_backend_set_precision(gpu, tol->dtype);
        if (st == KFAC_OK) st = run(gpu, tol->loss_scale, &r);
        CHECK_OK(st);
        kfac_backend_free(gpu);
        if (st != KFAC_OK) {
            free(r.grads);
            continue;
        }
        printf("cuda %s: loss %.6f (cpu %.6f)\n", name, r.loss, ref.loss);
        CHECK(fabs(r.loss - ref.loss) <= tol->loss * ref.loss, "%s: loss %.6f vs %.6f", name,
              r.loss, ref.loss);
        compare_grads(shape, &ref, &r, tol);
        double worst = 0;
        for (int s = 0; s < STEPS; s++) {
            double rel = fabs(r.trajectory[s] - ref.trajectory[s]) / ref.trajectory[s];
            if (!(rel <= worst)) worst = rel;
            CHECK(rel <= tol->trajectory, "%s: step %d loss %.6f vs %.6f", name, s + 1,
                  r.trajectory[s], ref.trajectory[s]);
        }
        printf("cuda %s: %d-step trajectory within %.3g of the cpu's (last %.6f vs %.6f)\n", name,
               STEPS, worst, r.trajectory[STEPS - 1], ref.trajectory[STEPS - 1]);
        free(r.grads);
    }
    free(ref.grads);
    free(images);
    kfac_model_free(shape);
    kfac_backend_free(cpu);
    return test_summary("test_cuda_model");
}
