/* test_resnet.c - ResNet builders against published parameter counts and
 * multiply-add counts (torchvision's models: resnet18 11,689,512,
 * resnet34 21,797,672, resnet50 25,557,032 parameters; 1.82, 3.67 and
 * 4.09 G MACs at 224x224) and against counts derived by hand from the
 * architecture for the small models. */
#include <string.h>

#include "kfac/kfac_resnet.h"
#include "testutil.h"

static kfac_backend *be;

static void check_model(const char *name, size_t want_params, double want_gmacs, double tol)
{
    kfac_model *m;
    CHECK_OK(kfac_resnet_build(name, NULL, be, 1, 1, &m));
    if (!m) return;
    size_t got = kfac_model_param_count(m);
    CHECK(got == want_params, "%s: %zu parameters, expected %zu", name, got, want_params);
    double gmacs = kfac_model_macs_per_image(m) / 1e9;
    CHECK(fabs(gmacs - want_gmacs) <= tol, "%s: %.4f G MACs, expected %.4f", name, gmacs, want_gmacs);
    kfac_model_free(m);
}

/* Basic-block CIFAR/FMNIST ResNet: stem conv3x3(in->16)+BN, stages of
 * `blocks` blocks (16, 32, 64 channels), 1x1 conv + BN shortcuts where the
 * shape changes, FC(64 -> classes). */
static size_t small_resnet_params(int in_ch, int blocks, int classes)
{
    size_t p = 9 * in_ch * 16 + 2 * 16;
    int ch[3] = {16, 32, 64}, prev = 16;
    for (int s = 0; s < 3; s++)
        for (int b = 0; b < blocks; b++) {
            int in = b == 0 ? prev : ch[s];
            p += 9 * in * ch[s] + 9 * ch[s] * ch[s] + 4 * ch[s];
            if (in != ch[s]) p += in * ch[s] + 2 * ch[s];
            prev = ch[s];
        }
    return p + 64 * classes + classes;
}

int main(void)
{
    CHECK_OK(kfac_backend_get("cpu", 2, &be));
    check_model("resnet50", 25557032, 4.09, 0.02);
    check_model("resnet18", 11689512, 1.82, 0.01);
    check_model("resnet34", 21797672, 3.67, 0.01);
    /* resnet8-fmnist MACs: 28x28 stem and stage 1, 14x14, 7x7 */
    double r8 = 784.0 * 16 * 9 + 2 * 784.0 * 16 * 16 * 9 + 196.0 * (32 * 16 * 9 + 32 * 32 * 9 + 16 * 32) +
                49.0 * (64 * 32 * 9 + 64 * 64 * 9 + 32 * 64) + 640;
    check_model("resnet8-fmnist", small_resnet_params(1, 1, 10), r8 / 1e9, 1e-9);
    check_model("resnet20", small_resnet_params(3, 3, 10), 0.0408, 0.001);
    check_model("resnet32", small_resnet_params(3, 5, 10), 0.0693, 0.001);

    kfac_model *m;
    CHECK(kfac_resnet_build("resnet51", NULL, be, 1, 1, &m) == KFAC_EINVAL && m == NULL,
          "unknown name rejected");
    /* zero_init_residual: the last BN gamma of each block starts at 0 */
    kfac_resnet_options opt = {.zero_init_residual = 1};
    CHECK_OK(kfac_resnet_build("resnet20", &opt, be, 1, 1, &m));
    int zeroed = 0, ones = 0;
    for (int i = 0; i < kfac_model_num_param_tensors(m); i++) {
        const kfac_param *p = kfac_model_param_tensor(m, i);
        if (p->kind != KFAC_PARAM_BN || !strstr(p->name, ".weight")) continue;
        float g = kfac_model_params(m)[p->offset];
        if (g == 0.0f) {
            zeroed++;
            CHECK(strstr(p->name, ".bn2.") != NULL, "%s zeroed", p->name);
        } else {
            ones += g == 1.0f;
        }
    }
    CHECK(zeroed == 9, "resnet20 zero-init: %d gammas zeroed, expected 9 (one per block)", zeroed);
    CHECK(ones == 21 - 9, "the other gammas (21 BNs in all) are 1: %d", ones);
    kfac_model_free(m);
    kfac_backend_free(be);
    return test_summary("test_resnet");
}
