/* kfac_resnet.h - ResNet builders on the model graph.
 *
 *   resnet8-fmnist  28x28x1: conv3x3(16)+BN+ReLU, three basic blocks of 16,
 *                   32, 64 channels with strides 1, 2, 2, GAP, FC(10)
 *   resnet20/32     CIFAR-style (He et al. 2016, sec. 4.2): 3 stages of
 *                   3/5 basic blocks, 16/32/64 channels, 32x32x3 input
 *   resnet18/34/50  ImageNet (224x224x3): 7x7/2 stem + 3x3/2 max pool,
 *                   basic (18, 34) or bottleneck (50, stride on the 3x3 as
 *                   torchvision "v1.5") blocks, GAP, FC(1000)
 * A block's shortcut is the identity, or a 1x1 strided conv + BN where the
 * shape changes.  ResNet-50 has 25,557,032 parameters and 4.09 G MACs at
 * 224x224.
 */
#ifndef KFAC_RESNET_H
#define KFAC_RESNET_H

#include "kfac/kfac_model.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kfac_resnet_options {
    int zero_init_residual; /* zero the last BN gamma of every block */
    int num_classes;        /* 0: the architecture's default (10 or 1000) */
    int image_size;         /* 0: the architecture's default (28, 32 or 224) */
    int in_channels;        /* 0: the architecture's default (1 or 3) */
    int inference_only;     /* kfac_model_set_inference_only: forwards only */
    int keep_activations;   /* kfac_model_set_keep_activations: two backwards */
} kfac_resnet_options;

/* Builds and finalizes the named ResNet; names as in the table above. */
kfac_status kfac_resnet_build(const char *name, const kfac_resnet_options *opt, kfac_backend *be,
                              int max_batch, uint64_t seed, kfac_model **out);

/* Comma-separated list of known names (for messages). */
const char *kfac_resnet_names(void);

#ifdef __cplusplus
}
#endif
#endif
