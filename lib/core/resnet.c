/* resnet.c - ResNet builders: resnet8-fmnist, CIFAR resnet20/32 and
 * ImageNet resnet18/34/50 (see kfac_resnet.h). */
#include <stdio.h>
#include <string.h>

#include "kfac/kfac_resnet.h"

typedef enum { BASIC, BOTTLENECK } block_kind;

typedef struct arch {
    const char *name;
    block_kind block;
    int imagenet_stem;      /* 7x7/2 conv + 3x3/2 max pool, else 3x3/1 conv */
    int stem_channels;
    int num_stages;
    int blocks[4];
    int channels[4];        /* block width (bottleneck: inner width, output x4) */
    int strides[4];
    int image_size, in_channels, num_classes;
} arch;

static const arch ARCHS[] = {
    {"resnet8-fmnist", BASIC, 0, 16, 3, {1, 1, 1}, {16, 32, 64}, {1, 2, 2}, 28, 1, 10},
    {"resnet20", BASIC, 0, 16, 3, {3, 3, 3}, {16, 32, 64}, {1, 2, 2}, 32, 3, 10},
    {"resnet32", BASIC, 0, 16, 3, {5, 5, 5}, {16, 32, 64}, {1, 2, 2}, 32, 3, 10},
    {"resnet18", BASIC, 1, 64, 4, {2, 2, 2, 2}, {64, 128, 256, 512}, {1, 2, 2, 2}, 224, 3, 1000},
    {"resnet34", BASIC, 1, 64, 4, {3, 4, 6, 3}, {64, 128, 256, 512}, {1, 2, 2, 2}, 224, 3, 1000},
    {"resnet50", BOTTLENECK, 1, 64, 4, {3, 4, 6, 3}, {64, 128, 256, 512}, {1, 2, 2, 2}, 224, 3,
     1000},
};

const char *kfac_resnet_names(void)
{
    return "resnet8-fmnist, resnet20, resnet32, resnet18, resnet34, resnet50";
}

/* conv + BN (+ fused ReLU); names follow torchvision: PREFIX.convN/.bnN. */
static int conv_bn(kfac_model *m, int x, int ch, int k, int stride, int relu, const char *prefix,
                   const char *conv_name, const char *bn_name)
{
    char name[64];
    snprintf(name, sizeof name, "%s%s", prefix, conv_name);
    int y = kfac_model_conv(m, x, ch, k, stride, k / 2, name);
    snprintf(name, sizeof name, "%s%s", prefix, bn_name);
    return kfac_model_bn(m, y, relu, name);
}

/* One residual block; *last_bn receives the BN output to zero-init. */
static int block(kfac_model *m, const arch *a, int x, int in_ch, int width, int stride,
                 const char *prefix, int *last_bn)
{
    int out_ch = a->block == BOTTLENECK ? 4 * width : width;
    int y;
    if (a->block == BASIC) {
        y = conv_bn(m, x, width, 3, stride, 1, prefix, "conv1", "bn1");
        y = *last_bn = conv_bn(m, y, width, 3, 1, 0, prefix, "conv2", "bn2");
    } else {
        y = conv_bn(m, x, width, 1, 1, 1, prefix, "conv1", "bn1");
        y = conv_bn(m, y, width, 3, stride, 1, prefix, "conv2", "bn2");
        y = *last_bn = conv_bn(m, y, out_ch, 1, 1, 0, prefix, "conv3", "bn3");
    }
    int shortcut = x;
    if (stride != 1 || in_ch != out_ch)
        shortcut = conv_bn(m, x, out_ch, 1, stride, 0, prefix, "downsample.0", "downsample.1");
    return kfac_model_add(m, y, shortcut, 1);
}

static kfac_status build(kfac_model *m, const arch *a, int num_classes, int zero_init)
{
    int x = 0;
    if (a->imagenet_stem) {
        int y = kfac_model_conv(m, x, a->stem_channels, 7, 2, 3, "conv1");
        y = kfac_model_bn(m, y, 1, "bn1");
        x = kfac_model_maxpool(m, y, 3, 2, 1);
    } else {
        x = conv_bn(m, x, a->stem_channels, 3, 1, 1, "", "conv1", "bn1");
    }
    int ch = a->stem_channels;
    for (int s = 0; s < a->num_stages; s++)
        for (int b = 0; b < a->blocks[s]; b++) {
            char prefix[32];
            int last_bn = -1;
            snprintf(prefix, sizeof prefix, "layer%d.%d.", s + 1, b);
            x = block(m, a, x, ch, a->channels[s], b == 0 ? a->strides[s] : 1, prefix, &last_bn);
            ch = a->block == BOTTLENECK ? 4 * a->channels[s] : a->channels[s];
            if (zero_init && last_bn >= 0) KFAC_TRY(kfac_model_zero_init_gamma(m, last_bn));
        }
    x = kfac_model_gap(m, x);
    kfac_model_fc(m, x, num_classes, "fc");
    return KFAC_OK;
}

kfac_status kfac_resnet_build(const char *name, const kfac_resnet_options *opt, kfac_backend *be,
                              int max_batch, uint64_t seed, kfac_model **out)
{
    *out = NULL;
    const arch *a = NULL;
    for (size_t i = 0; i < sizeof ARCHS / sizeof ARCHS[0]; i++)
        if (strcmp(ARCHS[i].name, name) == 0) a = &ARCHS[i];
    if (!a) return KFAC_ERR(KFAC_EINVAL, "unknown model '%s' (known: %s)", name, kfac_resnet_names());
    kfac_resnet_options defaults = {0};
    if (!opt) opt = &defaults;
    int size = opt->image_size ? opt->image_size : a->image_size;
    int in_ch = opt->in_channels ? opt->in_channels : a->in_channels;
    int classes = opt->num_classes ? opt->num_classes : a->num_classes;
    kfac_model *m;
    KFAC_TRY(kfac_model_init(&m, be, max_batch, size, size, in_ch));
    kfac_status st = opt->inference_only ? kfac_model_set_inference_only(m) : KFAC_OK;
    if (st == KFAC_OK && opt->keep_activations) st = kfac_model_set_keep_activations(m);
    if (st == KFAC_OK) st = build(m, a, classes, opt->zero_init_residual);
    if (st == KFAC_OK) st = kfac_model_finalize(m, seed);
    if (st != KFAC_OK) {
        kfac_model_free(m);
        return st;
    }
    *out = m;
    return KFAC_OK;
}
