/* test_model.c - the model graph as a whole: gradients of every parameter
 * and of the input path through residual blocks (directional derivative
 * against central finite differences of the mean loss, evaluated in double
 * from the float forward), eval-mode chunking, BN train/eval semantics,
 * determinism, no allocation after finalize, the loss in parts (as graph
 * captures run it), the input bound to another buffer, the memory plan
 * (which activations share memory) against ResNet-50's architecture, and
 * inference-only models. */
#include <malloc.h>
#include <string.h>

#include "kfac/kfac_optim.h"
#include "kfac/kfac_pass_graph.h"
#include "kfac/kfac_resnet.h"
#include "testutil.h"

#define BATCH 8 /* largest batch used */

static int g_batch = BATCH, g_image = 8;

static kfac_backend *be;

static double mean_loss(kfac_model *m, const int32_t *labels)
{
    double loss;
    int correct;
    CHECK_OK(kfac_model_forward(m, g_batch, KFAC_MODE_TRAIN));
    CHECK_OK(kfac_model_loss(m, g_batch, labels, 0.1f, &loss, &correct));
    return loss / g_batch;
}

/* A model for `batch` random images of `image` pixels and 5 classes; sets
 * the batch and image size the other helpers use. */
static kfac_model *small_model(const char *name, int channels, int batch, int image,
                               unsigned long long *seed, int32_t *labels)
{
    kfac_model *m = NULL;
    g_batch = batch;
    g_image = image;
    kfac_resnet_options opt = {.image_size = image, .in_channels = channels, .num_classes = 5};
    CHECK_OK(kfac_resnet_build(name, &opt, be, batch, 3, &m));
    if (!m) return NULL;
    float *x = kfac_model_input(m);
    for (int i = 0; i < batch * image * image * channels; i++) x[i] = (float)test_uniform(seed);
    for (int i = 0; i < batch; i++) labels[i] = i % 5;
    return m;
}

/* Central difference of the mean loss along direction v (parameters p0 +-
 * h v), extrapolated from steps h and h/3: ReLU and max-pool kinks crossed
 * by a step make the plain difference's error linear in h, and float
 * rounding forbids much smaller steps, so (3 D(h/3) - D(h)) / 2 is used. */
static double fd_along(kfac_model *m, const int32_t *labels, const float *p0, const double *v,
                       size_t first, size_t count, double h)
{
    float *p = kfac_model_params(m);
    double d[2];
    for (int k = 0; k < 2; k++, h /= 3) {
        for (size_t i = first; i < first + count; i++) p[i] = (float)(p0[i] + h * v[i]);
        double lp = mean_loss(m, labels);
        for (size_t i = first; i < first + count; i++) p[i] = (float)(p0[i] - h * v[i]);
        double lm = mean_loss(m, labels);
        d[k] = (lp - lm) / (2 * h);
    }
    for (size_t i = first; i < first + count; i++) p[i] = p0[i];
    return (3 * d[1] - d[0]) / 2;
}

/* Checks the backward pass along each parameter tensor's own gradient
 * direction u = g_t/|g_t|: the finite-difference slope of the loss along u
 * must equal |g_t|, so a tensor with a wrong or missing gradient (a
 * residual branch not accumulated, say) cannot hide in a sum. */
static void check_gradient_of(kfac_model *m, const char *name, const int32_t *labels,
                              double tol)
{
    size_t n = kfac_model_param_count(m);
    double *grad = malloc(n * sizeof *grad), *u = malloc(n * sizeof *u);
    float *p0 = malloc(n * sizeof *p0);
    memcpy(p0, kfac_model_params(m), n * sizeof *p0);
    mean_loss(m, labels);
    CHECK_OK(kfac_model_backward(m, g_batch));
    for (size_t i = 0; i < n; i++) grad[i] = kfac_model_grads(m)[i];
    int checked = 0;
    for (int t = 0; t < kfac_model_num_param_tensors(m); t++) {
        const kfac_param *pt = kfac_model_param_tensor(m, t);
        double gn = 0;
        for (size_t i = pt->offset; i < pt->offset + pt->count; i++) gn += grad[i] * grad[i];
        gn = sqrt(gn);
        if (gn < 1e-6) continue; /* e.g. a bias the loss ignores: nothing to compare */
        for (size_t i = pt->offset; i < pt->offset + pt->count; i++) u[i] = grad[i] / gn;
        double num = fd_along(m, labels, p0, u, pt->offset, pt->count, 1e-3);
        CHECK(fabs(gn - num) < tol * fabs(num), "%s %s: |g| %.6g vs finite differences along g %.6g",
              name, pt->name, gn, num);
        checked++;
    }
    CHECK(checked > kfac_model_num_param_tensors(m) / 2, "%s: only %d tensors had gradients", name,
          checked);
    free(grad);
    free(u);
    free(p0);
}

static void check_gradient(const char *name, int channels, int batch, int image, double tol)
{
    unsigned long long seed = 11;
    int32_t labels[BATCH];
    kfac_model *m = small_model(name, channels, batch, image, &seed, labels);
    if (!m) return;
    check_gradient_of(m, name, labels, tol);
    kfac_model_free(m);
}

/* A hand-built graph with the layer kinds a ResNet does not combine this
 * way: a conv read only by a standalone relu, a bn without ReLU and an add
 * without ReLU, each read only in forward (so their activations share
 * memory: 3 of them, counted by hand), then relu, max pool, pool, fc.  The
 * gradients must match finite differences all the same. */
static void check_plain_graph(void)
{
    const int batch = 6, side = 8, ch = 8;
    unsigned long long seed = 17;
    int32_t labels[BATCH];
    kfac_model *m = NULL;
    CHECK_OK(kfac_model_init(&m, be, batch, side, side, 3));
    if (!m) return;
    int a = kfac_model_conv(m, 0, ch, 3, 1, 1, "a");
    int r = kfac_model_relu(m, a);
    int b = kfac_model_conv(m, r, ch, 3, 1, 1, "b");
    int bn = kfac_model_bn(m, b, 0, "bn");
    int sum = kfac_model_add(m, bn, r, 0);
    int pooled = kfac_model_gap(m, kfac_model_maxpool(m, kfac_model_relu(m, sum), 2, 2, 0));
    kfac_model_fc(m, pooled, 5, "fc");
    CHECK_OK(kfac_model_finalize(m, 3));
    kfac_model_memory mem;
    kfac_model_get_memory(m, &mem);
    size_t one = (size_t)batch * side * side * ch * sizeof(float);
    CHECK(mem.forward_only_activations == 3 * one, "plain graph: %zu forward-only bytes, "
          "expected 3 x %zu", mem.forward_only_activations, one);
    g_batch = batch;
    float *x = kfac_model_input(m);
    for (int i = 0; i < batch * side * side * 3; i++) x[i] = (float)test_uniform(&seed);
    for (int i = 0; i < batch; i++) labels[i] = i % 5;
    check_gradient_of(m, "plain graph", labels, 0.02);
    kfac_model_free(m);
}

/* Eval mode runs in cache-sized chunks: logits equal those of running the
 * images one at a time, and BN uses running statistics (so one image's
 * logits do not depend on the others in the batch). */
static void check_eval(void)
{
    unsigned long long seed = 5;
    int32_t labels[BATCH];
    kfac_model *m = small_model("resnet20", 3, 6, 8, &seed, labels);
    if (!m) return;
    mean_loss(m, labels); /* one training forward: moves the running stats */
    int classes = kfac_model_classes(m);
    CHECK_OK(kfac_model_forward(m, g_batch, KFAC_MODE_EVAL));
    float all[BATCH * 5];
    memcpy(all, kfac_model_logits(m), sizeof all);
    float *x = kfac_model_input(m);
    size_t image = (size_t)g_image * g_image * 3;
    float first[8 * 8 * 3];
    memcpy(first, x, sizeof first);
    double maxdiff = 0;
    for (int i = 0; i < g_batch; i++) {
        memcpy(x, x + i * image, sizeof first);
        if (i == 0) memcpy(x, first, sizeof first);
        CHECK_OK(kfac_model_forward(m, 1, KFAC_MODE_EVAL));
        for (int j = 0; j < classes; j++)
            maxdiff = fmax(maxdiff, fabs(kfac_model_logits(m)[j] - all[i * classes + j]));
        memcpy(x, first, sizeof first);
    }
    CHECK(maxdiff < 1e-5, "eval logits batch vs one at a time differ by %g", maxdiff);
    /* train mode uses batch statistics: the same image gives other logits */
    CHECK_OK(kfac_model_forward(m, g_batch, KFAC_MODE_TRAIN));
    double train_diff = 0;
    for (int j = 0; j < classes; j++) train_diff = fmax(train_diff, fabs(kfac_model_logits(m)[j] - all[j]));
    CHECK(train_diff > 1e-4, "train-mode BN uses batch statistics (diff %g)", train_diff);
    CHECK(kfac_model_forward(m, g_batch + 1, KFAC_MODE_EVAL) == KFAC_EINVAL, "batch above max rejected");
    kfac_model_free(m);
}

/* Same seed, same thread count: bitwise the same weights after steps. */
static void check_determinism(void)
{
    float *result[2];
    size_t n = 0;
    for (int run = 0; run < 2; run++) {
        unsigned long long seed = 9;
        int32_t labels[BATCH];
        kfac_model *m = small_model("resnet8-fmnist", 1, 6, 8, &seed, labels);
        if (!m) return;
        n = kfac_model_param_count(m);
        for (int step = 0; step < 3; step++) {
            mean_loss(m, labels);
            CHECK_OK(kfac_model_backward(m, g_batch));
            float *p = kfac_model_params(m), *g = kfac_model_grads(m);
            for (size_t i = 0; i < n; i++) p[i] -= 0.1f * g[i];
        }
        result[run] = malloc(n * sizeof(float));
        memcpy(result[run], kfac_model_params(m), n * sizeof(float));
        kfac_model_free(m);
    }
    CHECK(memcmp(result[0], result[1], n * sizeof(float)) == 0, "two seeded runs differ");
    free(result[0]);
    free(result[1]);
}

/* After finalize (and one warm-up step, which lets OpenMP and OpenBLAS
 * start their threads), training steps allocate nothing: the heap in use
 * stays the same across further steps. */
static void check_no_allocation(void)
{
    unsigned long long seed = 4;
    int32_t labels[BATCH];
    kfac_model *m = small_model("resnet20", 3, 8, 16, &seed, labels);
    if (!m) return;
    mean_loss(m, labels);
    CHECK_OK(kfac_model_backward(m, g_batch));
    size_t before = mallinfo2().uordblks;
    for (int step = 0; step < 3; step++) {
        mean_loss(m, labels);
        CHECK_OK(kfac_model_backward(m, g_batch));
        CHECK_OK(kfac_model_forward(m, g_batch, KFAC_MODE_EVAL));
    }
    size_t after = mallinfo2().uordblks;
    CHECK(after == before, "heap in use grew from %zu to %zu bytes during steps", before, after);
    kfac_model_free(m);
}

/* set_labels + loss_queue + loss_result give kfac_model_loss's results
 * and gradients; a pass through kfac_pass_graphs needs a backend with
 * graphs (the CPU has none); an input bound to another buffer is read. */
static void check_loss_parts_and_binding(void)
{
    unsigned long long seed = 21;
    int32_t labels[BATCH], bad[BATCH];
    kfac_model *m = small_model("resnet8-fmnist", 1, 6, 8, &seed, labels);
    if (!m) return;
    size_t n = kfac_model_param_count(m);
    double loss1, loss2;
    int hits1, hits2;
    CHECK_OK(kfac_model_forward(m, g_batch, KFAC_MODE_TRAIN));
    CHECK_OK(kfac_model_loss(m, g_batch, labels, 0.1f, &loss1, &hits1));
    CHECK_OK(kfac_model_backward(m, g_batch));
    float *g1 = malloc(n * sizeof *g1);
    memcpy(g1, kfac_model_grads(m), n * sizeof *g1);
    CHECK_OK(kfac_model_forward(m, g_batch, KFAC_MODE_TRAIN));
    CHECK_OK(kfac_model_set_labels(m, g_batch, labels));
    CHECK_OK(kfac_model_loss_queue(m, g_batch, 0.1f));
    CHECK_OK(kfac_model_backward(m, g_batch));
    CHECK_OK(kfac_model_loss_result(m, g_batch, &loss2, &hits2));
    CHECK(loss1 == loss2 && hits1 == hits2 && !memcmp(g1, kfac_model_grads(m), n * sizeof *g1),
          "loss in parts: %.9g vs %.9g, %d vs %d hits", loss2, loss1, hits2, hits1);
    memcpy(bad, labels, sizeof bad);
    bad[2] = 7; /* 5 classes */
    CHECK(kfac_model_set_labels(m, g_batch, bad) == KFAC_OK &&
              kfac_model_loss_queue(m, g_batch, 0.0f) == KFAC_EINVAL,
          "a bad label is refused: %s", kfac_last_error());

    kfac_pass_graphs *graphs = NULL;
    CHECK(kfac_pass_graphs_init(&graphs, m) == KFAC_ENOTSUP && !graphs,
          "graphs on the cpu: %s", kfac_last_error());

    /* the same images in another buffer give the same loss */
    int h, w, c;
    kfac_model_input_shape(m, &h, &w, &c);
    size_t pixels = (size_t)g_batch * h * w * c;
    float *other = malloc(pixels * sizeof *other);
    memcpy(other, kfac_model_input(m), pixels * sizeof *other);
    float *own = kfac_model_own_input(m);
    for (size_t i = 0; i < pixels; i++) own[i] = 0.0f;
    kfac_model_bind_input(m, other);
    CHECK(kfac_model_input(m) == other, "bound input returned");
    CHECK_OK(kfac_model_forward(m, g_batch, KFAC_MODE_TRAIN));
    CHECK_OK(kfac_model_loss(m, g_batch, labels, 0.1f, &loss2, &hits2));
    CHECK(loss2 == loss1, "bound input: loss %.9g vs %.9g", loss2, loss1);
    kfac_model_bind_input(m, own);
    free(other);
    free(g1);
    kfac_model_free(m);
}

static size_t round64(size_t bytes) { return (bytes + 63) / 64 * 64; }

/* ResNet-50's memory plan at 224x224, batch 2, against counts from its
 * architecture: the forward-only activations are the last bn of each of
 * the 16 bottlenecks and the 4 shortcut bns (no ReLU, read only by their
 * add); all activations, all gradients and the fixed buffers are counted
 * from the layer views.  Gradients reuse the memory of activations whose
 * backward is done, so the arena stays within 5% of the activations that
 * backward reads (plus the BN saves); kept through the step
 * (kfac_model_set_keep_activations) they take more, but no more than
 * keeping everything and giving gradients their own slots. */
static void check_memory(void)
{
    const int batch = 2;
    kfac_model *m = NULL, *keep = NULL;
    CHECK_OK(kfac_resnet_build("resnet50", NULL, be, batch, 1, &m));
    kfac_resnet_options opt = {.keep_activations = 1};
    CHECK_OK(kfac_resnet_build("resnet50", &opt, be, batch, 1, &keep));
    if (!m || !keep) return;
    CHECK(!kfac_model_keeps_activations(m) && kfac_model_keeps_activations(keep), "keeps");
    kfac_model_memory mem, mk;
    kfac_model_get_memory(m, &mem);
    kfac_model_get_memory(keep, &mk);
    const size_t f = sizeof(float);
    /* per image: stages at 56, 28, 14, 7 pixels with 256..2048 channels */
    const size_t branch = 3 * 56 * 56 * 256 + 4 * 28 * 28 * 512 + 6 * 14 * 14 * 1024 +
                          3 * 7 * 7 * 2048,
                 shortcut = 56 * 56 * 256 + 28 * 28 * 512 + 14 * 14 * 1024 + 7 * 7 * 2048;
    const size_t fwd = (branch + shortcut) * batch * f;
    CHECK(mem.forward_only_activations == fwd, "forward-only activations: %zu bytes, expected %zu",
          mem.forward_only_activations, fwd);
    const size_t input = round64((size_t)batch * 224 * 224 * 3 * f);
    size_t all = input, grads = 0, bn_saves = 0, logits = 0;
    for (int i = 0; i < kfac_model_num_nodes(m); i++) {
        kfac_layer_view v;
        kfac_model_layer(m, i, batch, &v);
        size_t out = round64(v.rows * (size_t)v.channels * f);
        all += out;
        grads += out;
        logits = out; /* the last node's */
        if (v.kind == KFAC_NODE_BN) bn_saves += 2 * round64((size_t)v.channels * f);
    }
    CHECK(mem.backward_activations + mem.forward_only_activations == all,
          "backward %zu + forward-only %zu bytes != all activations %zu",
          mem.backward_activations, mem.forward_only_activations, all);
    CHECK(mem.value_gradients == grads, "value gradients: %zu bytes, expected %zu",
          mem.value_gradients, grads);
    CHECK(mem.fixed == input + logits + bn_saves, "fixed: %zu bytes, expected %zu", mem.fixed,
          input + logits + bn_saves);
    CHECK(mem.arena == mem.fixed + mem.shared_slots && mk.arena == mk.fixed + mk.shared_slots,
          "arena = fixed + shared slots");
    CHECK(kfac_model_arena_bytes(m) == mem.arena + mem.workspace, "arena bytes");
    CHECK(mem.peak_live <= mem.shared_slots && mk.peak_live <= mk.shared_slots,
          "slots hold what is live at once");
    size_t bound = (size_t)(1.05 * (double)(mem.backward_activations + bn_saves));
    CHECK(mem.arena <= bound, "arena %zu bytes > 1.05 x (backward activations + BN saves) = %zu",
          mem.arena, bound);
    CHECK(mk.arena > mem.arena && mk.arena <= mem.backward_activations + bn_saves + mem.value_gradients,
          "keep-activations arena %zu bytes vs %zu", mk.arena, mem.arena);
    printf("resnet50 b%d: activations %.1f MiB (%.1f forward-only), gradients %.1f MiB; arena "
           "%.1f MiB (slots %.1f, peak live %.1f); keeping activations %.1f MiB\n",
           batch, all / 1048576.0, mem.forward_only_activations / 1048576.0, grads / 1048576.0,
           mem.arena / 1048576.0, mem.shared_slots / 1048576.0, mem.peak_live / 1048576.0,
           mk.arena / 1048576.0);
    kfac_model_free(m);
    kfac_model_free(keep);
}

/* A model that keeps its activations runs a second backward over one
 * forward (as K-FAC's sampled Fisher does) to the same gradients, bit for
 * bit, and its activations read by backward are still those of the
 * forward afterwards: the FC input equals a fresh forward's. */
static void check_keep_activations(void)
{
    unsigned long long seed = 41;
    int32_t labels[BATCH];
    kfac_model *m = NULL;
    kfac_resnet_options opt = {.image_size = 16, .num_classes = 5, .keep_activations = 1};
    CHECK_OK(kfac_resnet_build("resnet18", &opt, be, 6, 2, &m));
    if (!m) return;
    g_batch = 6;
    float *x = kfac_model_input(m);
    for (int i = 0; i < 6 * 16 * 16 * 3; i++) x[i] = (float)test_uniform(&seed);
    for (int i = 0; i < 6; i++) labels[i] = i % 5;
    size_t n = kfac_model_param_count(m);
    float *g1 = malloc(n * sizeof *g1);
    mean_loss(m, labels);
    CHECK_OK(kfac_model_backward(m, g_batch));
    memcpy(g1, kfac_model_grads(m), n * sizeof *g1);
    double loss;
    int correct;
    CHECK_OK(kfac_model_loss(m, g_batch, labels, 0.1f, &loss, &correct));
    CHECK_OK(kfac_model_backward(m, g_batch));
    CHECK(!memcmp(g1, kfac_model_grads(m), n * sizeof *g1), "second backward, same gradients");
    kfac_layer_view v;
    kfac_model_layer(m, kfac_model_num_nodes(m) - 1, g_batch, &v);
    size_t feats = (size_t)g_batch * v.conv.c;
    float *after = malloc(feats * sizeof *after);
    memcpy(after, v.x, feats * sizeof *after);
    CHECK_OK(kfac_model_forward(m, g_batch, KFAC_MODE_TRAIN));
    CHECK(!memcmp(after, v.x, feats * sizeof *after), "FC input kept through backward");
    free(after);
    free(g1);
    kfac_model_free(m);
}

/* A model built for inference only gives the training model's logits bit
 * for bit (same seed, same images, eval and train-mode forwards), keeps
 * only its input and logits, has no gradient memory, refuses backward, and
 * cannot be switched after finalize. */
static void check_inference_only(void)
{
    const int batch = 6, image = 16;
    kfac_resnet_options opt = {.image_size = image, .num_classes = 5};
    kfac_model *train = NULL, *infer = NULL;
    CHECK_OK(kfac_resnet_build("resnet18", &opt, be, batch, 9, &train));
    opt.inference_only = 1;
    CHECK_OK(kfac_resnet_build("resnet18", &opt, be, batch, 9, &infer));
    if (!train || !infer) return;
    unsigned long long seed = 31;
    size_t pixels = (size_t)batch * image * image * 3;
    float *x = kfac_model_input(train);
    for (size_t i = 0; i < pixels; i++) x[i] = (float)test_uniform(&seed);
    memcpy(kfac_model_input(infer), x, pixels * sizeof *x);
    const size_t logits = (size_t)batch * 5 * sizeof(float);
    for (int k = 0; k < 2; k++) {
        kfac_mode mode = k ? KFAC_MODE_TRAIN : KFAC_MODE_EVAL;
        CHECK_OK(kfac_model_forward(train, batch, mode));
        CHECK_OK(kfac_model_forward(infer, batch, mode));
        CHECK(!memcmp(kfac_model_logits(train), kfac_model_logits(infer), logits),
              "inference-only logits differ (%s mode)", k ? "train" : "eval");
    }
    kfac_model_memory mt, mi;
    kfac_model_get_memory(train, &mt);
    kfac_model_get_memory(infer, &mi);
    CHECK(mi.backward_activations == round64(pixels * sizeof(float)) + round64(logits) &&
              mi.value_gradients == 0,
          "inference only: %zu bytes of activations read by backward (input and logits), "
          "%zu of gradients", mi.backward_activations, mi.value_gradients);
    CHECK(mi.forward_only_activations + mi.backward_activations ==
              mt.forward_only_activations + mt.backward_activations,
          "inference only: the same activations in all");
    CHECK(mi.arena * 3 < mt.arena, "inference-only arena %zu bytes vs training %zu", mi.arena,
          mt.arena);
    CHECK(kfac_model_backward(infer, batch) == KFAC_EINVAL, "backward refused: %s",
          kfac_last_error());
    /* no parameter gradients either, and no optimizer; the same parameters
     * and (after the same forwards) BN statistics as the training model */
    CHECK(kfac_model_grads(infer) == NULL, "inference-only model has parameter gradients");
    kfac_sgd *sgd = NULL;
    kfac_sgd_config sc = {.momentum = 0.9f};
    CHECK(kfac_sgd_init(&sgd, infer, &sc) == KFAC_EINVAL && !sgd, "sgd on an inference model");
    size_t count = kfac_model_param_count(train);
    CHECK(kfac_model_param_count(infer) == count &&
              !memcmp(kfac_model_params(infer), kfac_model_params(train), count * sizeof(float)),
          "inference-only parameters differ");
    size_t stats = kfac_model_buffer_count(train);
    CHECK(kfac_model_buffer_count(infer) == stats &&
              !memcmp(kfac_model_buffers(infer), kfac_model_buffers(train), stats * sizeof(float)),
          "inference-only BN statistics differ");
    CHECK(kfac_model_set_inference_only(train) == KFAC_EINVAL, "set after finalize refused");
    kfac_model_free(train);
    kfac_model_free(infer);
}

int main(void)
{
    CHECK_OK(kfac_backend_get("cpu", 2, &be));
    /* Small images keep this fast; deeper nets need larger ones so that
     * batch norm never sees a 1x1 map of a few samples, where the loss is
     * too rough for finite differences in float. */
    check_gradient("resnet8-fmnist", 1, 6, 8, 0.02);
    check_gradient("resnet20", 3, 6, 8, 0.02);
    check_gradient("resnet18", 3, 8, 32, 0.05); /* 7x7/2 stem, max pool */
    check_gradient("resnet50", 3, 8, 64, 0.05); /* bottlenecks */
    check_plain_graph();
    check_eval();
    check_determinism();
    check_no_allocation();
    check_loss_parts_and_binding();
    check_memory();
    check_keep_activations();
    check_inference_only();
    kfac_backend_free(be);
    return test_summary("test_model");
}
