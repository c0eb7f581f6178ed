/* kfac_model.h - the model graph: layers, explicit forward and backward,
 * parameters in one flat allocation, activations in one arena.
 *
 * Lifecycle:
 *   kfac_model_init(&m, backend, max_batch, H, W, C)
 *   add layers (kfac_model_conv, _bn, ...; each returns the id of its output
 *     value, or -1 after a failure, which kfac_model_finalize then reports)
 *   kfac_model_finalize(m, seed)   allocates everything, initialises weights
 *   per step: fill kfac_model_input(m); kfac_model_forward; kfac_model_loss;
 *     kfac_model_backward; an optimizer reads kfac_model_params/grads
 *   kfac_model_free(m)
 * After finalize nothing allocates: forward, loss and backward only use
 * memory sized for max_batch at finalize.
 *
 * All layers are in NHWC (see kfac_backend.h).  Activations are stored in
 * the backend's act_dtype at the time of kfac_model_init (set the
 * precision first); parameters and gradients are float32.  Conv and FC weights are
 * Kaiming-normal (fan_out, ReLU gain, as torchvision's ResNet); FC layers
 * use PyTorch's default uniform(+-1/sqrt(fan_in)); BN gamma 1, beta 0.
 */
#ifndef KFAC_MODEL_H
#define KFAC_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "kfac/kfac_backend.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kfac_model kfac_model;

typedef enum kfac_node_kind {
    KFAC_NODE_CONV,
    KFAC_NODE_BN,
    KFAC_NODE_RELU,
    KFAC_NODE_MAXPOOL,
    KFAC_NODE_GAP,
    KFAC_NODE_FC,
    KFAC_NODE_ADD
} kfac_node_kind;

typedef enum kfac_param_kind {
    KFAC_PARAM_WEIGHT, /* conv/FC weight: decayed */
    KFAC_PARAM_BIAS,   /* FC bias */
    KFAC_PARAM_BN      /* BN gamma or beta */
} kfac_param_kind;

/* One parameter tensor: a slice of the flat parameter and gradient arrays. */
typedef struct kfac_param {
    char name[64];
    kfac_param_kind kind;
    size_t offset, count;
} kfac_param;

typedef enum kfac_mode { KFAC_MODE_TRAIN = 0, KFAC_MODE_EVAL = 1 } kfac_mode;

kfac_status kfac_model_init(kfac_model **out, kfac_backend *be, int max_batch, int h, int w,
                            int c);
void kfac_model_free(kfac_model *m);

/* Value 0 is the input image batch. */
int kfac_model_conv(kfac_model *m, int x, int out_channels, int ksize, int stride, int pad,
                    const char *name);
/* momentum as PyTorch (0.1), eps 1e-5; relu fuses a ReLU on the output. */
int kfac_model_bn(kfac_model *m, int x, int relu, const char *name);
int kfac_model_relu(kfac_model *m, int x);
int kfac_model_maxpool(kfac_model *m, int x, int ksize, int stride, int pad);
int kfac_model_gap(kfac_model *m, int x);
int kfac_model_fc(kfac_model *m, int x, int out_features, const char *name);
int kfac_model_add(kfac_model *m, int a, int b, int relu);

/* Sets BN gamma of the BN node that produced value `bn_out` to zero at
 * initialisation (ResNet zero-init of the last BN in each block). */
kfac_status kfac_model_zero_init_gamma(kfac_model *m, int bn_out);

/* Before finalize: the model will only run forwards (evaluation), so only
 * its input and logits are kept and every other activation shares slots
 * with those of other layers; nothing is allocated for gradients (of
 * values or parameters: kfac_model_grads is NULL), kfac_model_backward is
 * refused, and so are optimizers on it. */
kfac_status kfac_model_set_inference_only(kfac_model *m);

/* Before finalize: activations a backward reads stay valid until the next
 * forward, instead of sharing memory with gradients once that backward has
 * run; for a second backward over the same forward (K-FAC's sampled
 * Fisher) or reading them after backward.  Costs memory. */
kfac_status kfac_model_set_keep_activations(kfac_model *m);
int kfac_model_keeps_activations(const kfac_model *m);

kfac_status kfac_model_finalize(kfac_model *m, uint64_t seed);

/* The input buffer (max_batch x H x W x C float32, backend memory; with a
 * 16-bit precision each forward converts it into the first activation). */
float *kfac_model_input(kfac_model *m);
/* Points the model's input at another buffer of the same size (backend
 * memory, owned by the caller), e.g. one of two buffers an input pipeline
 * alternates so the next batch uploads while this one computes;
 * kfac_model_input then returns it.  kfac_model_own_input gives back the
 * buffer the model was built with. */
void kfac_model_bind_input(kfac_model *m, float *input);
float *kfac_model_own_input(kfac_model *m);
/* The logits buffer (max_batch x classes, in act_dtype) and its size. */
const float *kfac_model_logits(const kfac_model *m);
int kfac_model_classes(const kfac_model *m);
int kfac_model_max_batch(const kfac_model *m);
void kfac_model_input_shape(const kfac_model *m, int *h, int *w, int *c);

/* Forward over the first n images.  Training mode keeps what backward
 * needs and updates BN running statistics; eval mode runs the whole network
 * on chunks of images that fit in cache (on backends with cache_chunks). */
kfac_status kfac_model_forward(kfac_model *m, int n, kfac_mode mode);
/* Mean softmax cross-entropy of the logits against labels (host memory:
 * the model copies them to the backend); writes the logits' gradient for
 * backward; loss_sum and correct as the backend op. */
kfac_status kfac_model_loss(kfac_model *m, int n, const int32_t *labels, float smoothing,
                            double *loss_sum, int *correct);
/* The same in three parts, for a pass that must not wait for the device in
 * between (a graph capture): set_labels (host labels, before), loss_queue
 * (queues the loss and the logits' gradient, waits for nothing), and
 * loss_result (after: the summed loss and correct predictions of the last
 * queued loss, or of a graph replaying it, for the same n). */
kfac_status kfac_model_set_labels(kfac_model *m, int n, const int32_t *labels);
kfac_status kfac_model_loss_queue(kfac_model *m, int n, float smoothing);
kfac_status kfac_model_loss_result(kfac_model *m, int n, double *loss_sum, int *correct);
kfac_status kfac_model_backward(kfac_model *m, int n);

/* Parameters: one flat array of kfac_model_param_count floats, its
 * gradient (NULL for an inference-only model), and the per-tensor table. */
float *kfac_model_params(kfac_model *m);
float *kfac_model_grads(kfac_model *m);
size_t kfac_model_param_count(const kfac_model *m);
int kfac_model_num_param_tensors(const kfac_model *m);
const kfac_param *kfac_model_param_tensor(const kfac_model *m, int i);

/* BN running statistics, one flat array (mean and var of each BN). */
float *kfac_model_buffers(kfac_model *m);
size_t kfac_model_buffer_count(const kfac_model *m);

/* Loss scale of fp16 training: kfac_model_loss (and _loss_sampled) write
 * scale times the logits' gradient, so every gradient of the backward
 * pass is scaled (default 1; see kfac_loss_scale.h). */
void kfac_model_set_loss_scale(kfac_model *m, float scale);
float kfac_model_loss_scale(const kfac_model *m);

/* Multiply-adds of one forward pass per image (conv + FC). */
double kfac_model_macs_per_image(const kfac_model *m);
/* Bytes of the activation arena plus the layers' workspace (parameters,
 * their gradients and BN statistics are a separate allocation). */
size_t kfac_model_arena_bytes(const kfac_model *m);

/* How the arena is spent, in bytes, at max_batch.  Buffers whose lifetimes
 * in a training step do not overlap share memory (model.c, "memory
 * plan"): activations that no backward reads (in a ResNet each branch's
 * last bn output, read only by its add) are dead after forward, the
 * others once the backward reading them has run, unless the model keeps
 * them (kfac_model_set_keep_activations), and value gradients live only
 * in backward. */
typedef struct kfac_model_memory {
    size_t arena;                    /* fixed + shared_slots (no workspace) */
    size_t fixed;                    /* input, logits, float32 input, BN saves */
    size_t backward_activations;     /* the input, logits and what a backward reads (sum) */
    size_t forward_only_activations; /* the others (sum) */
    size_t value_gradients;          /* sum of the values' gradients */
    size_t shared_slots;             /* what all but the fixed buffers take */
    size_t peak_live;                /* the most of those live at one step */
    size_t workspace;                /* the layers' scratch (conv_workspace) */
} kfac_model_memory;
void kfac_model_get_memory(const kfac_model *m, kfac_model_memory *out);

kfac_backend *kfac_model_backend(kfac_model *m);

/* Momentum of the BN running statistics in training-mode forwards (default
 * 0.1; a negative value restores it).  Precise BN sets 1/(k+1) for its k-th
 * batch so the running statistics become the mean over its batches. */
void kfac_model_set_bn_momentum(kfac_model *m, float momentum);

/* ---- what K-FAC sees of a layer ---- */

/* A node's tensors for the current batch of n images.  dy (the gradient of
 * the node's output) is valid only inside a backward hook for that node:
 * gradient buffers are shared between layers whose lifetimes do not
 * overlap.  The activations a backward reads (conv, fc, bn and max pool
 * inputs; relu and max pool outputs, bn and add outputs under a fused
 * ReLU) stay valid until the last backward reading them has run, so x and
 * such a y are valid inside this node's backward hook; after the whole
 * step only the input and the logits are, unless the model keeps its
 * activations (kfac_model_set_keep_activations).  Any other y may hold a
 * later layer's activation as soon as its readers' forwards have run. */
typedef struct kfac_layer_view {
    kfac_node_kind kind;
    const char *name;
    kfac_conv_desc conv;      /* conv/fc geometry with n = the batch */
    size_t rows;              /* n * H * W of the output */
    int channels;             /* output channels */
    const float *x, *y, *dy;  /* input, output, output gradient */
    int param[2];             /* conv/fc: weight, bias; bn: gamma, beta (-1: none) */
    const float *save_mean, *save_invstd; /* bn */
    int relu;                 /* bn/add: fused ReLU (dy applies after the mask) */
} kfac_layer_view;

int kfac_model_num_nodes(const kfac_model *m);
void kfac_model_layer(const kfac_model *m, int node, int n, kfac_layer_view *out);

/* Called after each node's backward, while that node's dy is still valid;
 * a failing hook stops the backward pass with its status.  NULL removes. */
typedef kfac_status (*kfac_backward_hook)(kfac_model *m, int node, int n, void *user);
void kfac_model_set_backward_hook(kfac_model *m, kfac_backward_hook hook, void *user);

/* Writes the gradient of the mean softmax cross-entropy at labels sampled
 * from the model's own predictive distribution (the "true" Fisher's labels)
 * into the logits' gradient, for a backward pass that only K-FAC reads.
 * The samples come from `seed`. */
kfac_status kfac_model_loss_sampled(kfac_model *m, int n, uint64_t seed);

#ifdef __cplusplus
}
#endif
#endif
