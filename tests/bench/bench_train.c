/* bench_train.c - images/s of one model's training step or inference on
 * synthetic data, and the machine's sgemm peak, as JSON lines:
 *   {"name": ..., "value": ..., "unit": ..., ...}
 * Usage: bench_train [--model NAME] [--batch N] [--mode train|infer|sgemm]
 *                    [--optimizer sgd|kfac] [--threads T] [--seconds S]
 *                    [--device cpu|cuda] [--precision f32|tf32|bf16|f16]
 *                    [--kfac-warmup STEPS]
 * With --optimizer kfac the step is K-FAC's with its default refresh
 * intervals (averaged over at least one full inverse interval), and the
 * seconds spent in its stages are reported beside images/s; its warm-up
 * (every step refreshing, untimed) is 20 steps unless --kfac-warmup says.
 * Peak resident memory of the process is reported with each figure (run one
 * configuration per process to compare it), with the model's arena
 * (kfac_model_memory: fixed buffers, the shared slots and the most bytes
 * live in them at once, workspace).
 *
 * --device cuda (train or infer): the same step on the CUDA backend,
 * reported as kfac_{mode}[_kfac]_{model}_b{batch}_cuda_fp32 (_tf32 with --precision
 * tf32 or under KFAC_CUDNN_TF32=1: TF32 tensor-core convolutions) with the backend's peak device memory (model arena
 * with cuDNN workspace, parameters, gradients, momentum, scratch; not the
 * CUDA context or library handles, as torch.cuda.max_memory_allocated).
 * --precision bf16|f16 (cuda) stores activations in 16 bits (train.precision;
 * f16 with dynamic loss scaling), reported as _cuda_bf16 / _cuda_f16;
 * under KFAC_CUDNN_DETERMINISTIC=0 the names end in _nondet, under
 * KFAC_CUDNN_SEARCH=1 (cuDNN's timed algorithm search) in _search.
 * Training runs the trainer's step (kfac_step_run on one rank).  On cuda it
 * replays forward, loss and backward from CUDA graphs as the trainer does,
 * except in K-FAC's steps that estimate factors (KFAC_CUDA_GRAPHS=0: never;
 * the names of training figures then end in _eager); the line says whether
 * graphs were used ("cuda_graphs": true, or the reason they are off).
 * K-FAC on cuda (any precision) runs its stages on the device.
 * Every timed step ends with a wait for the device, so the time covers
 * finished GPU work. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include <cblas.h>

#include "kfac/kfac_resnet.h"
#include "kfac/kfac_rng.h"

#include "bench_common.h"

static double peak_rss_mib(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_maxrss / 1024.0;
}

static int die(const char *what)
{
    fprintf(stderr, "bench_train: %s: %s\n", what, kfac_last_error());
    return 1;
}

static int usage(const char *why)
{
    if (why) fprintf(stderr, "bench_train: %s\n", why);
    fprintf(stderr, "usage: bench_train [--model M] [--batch N] [--mode train|infer|sgemm] "
                    "[--optimizer sgd|kfac] [--threads T] [--seconds S] [--device cpu|cuda] "
                    "[--precision f32|tf32|bf16|f16] [--kfac-warmup STEPS]\n");
    return 2;
}

/* Waits for the work queued on a device backend: download synchronizes. */
static kfac_status finish(kfac_backend *be, kfac_model *m)
{
    float first;
    return be->download(be, &first, kfac_model_logits(m), sizeof first);
}

/* The CUDA figure's line; precision: the activations' type, and for f32 how
 * the backend runs its convolutions. */
static void print_cuda(const kfac_backend *be, const kfac_pass_graphs *graphs, const char *mode,
                       int kfac, const char *model, int batch, const char *precision_name,
                       double ips, double gflops)
{
    const char *tf32 = getenv("KFAC_CUDNN_TF32");
    const char *precision = strcmp(precision_name, "f32") ? precision_name
                            : tf32 && !strcmp(tf32, "1") ? "tf32"
                                                          : "fp32";
    const char *det = getenv("KFAC_CUDNN_DETERMINISTIC"), *search = getenv("KFAC_CUDNN_SEARCH"),
               *use_graphs = getenv("KFAC_CUDA_GRAPHS");
    double peak = be->peak_bytes ? be->peak_bytes(be) / 1048576.0 : -1;
    printf("{\"name\": \"kfac_%s%s_%s_b%d_cuda_%s%s%s%s\", \"value\": %.1f, \"unit\": "
           "\"images/s\", \"step_ms\": %.2f, \"gflops\": %.1f, \"peak_gpu_mib\": %.1f, "
           "\"cuda_graphs\": ",
           mode, kfac ? "_kfac" : "", model, batch, precision, det && !strcmp(det, "0") ? "_nondet" : "",
           search && !strcmp(search, "1") ? "_search" : "",
           !strcmp(mode, "train") && use_graphs && !strcmp(use_graphs, "0") ? "_eager" : "", ips,
           1e3 * batch / ips, gflops, peak);
    const char *off = graphs ? kfac_pass_graphs_off(graphs) : "not used";
    if (!off) {
        printf("true");
        return;
    }
    putchar('"');
    for (; *off; off++) /* a JSON string: the reason, quotes and controls dropped */
        if (*off != '"' && *off != '\\' && (unsigned char)*off >= 0x20) putchar(*off);
    putchar('"');
}

/* sgemm GFLOP/s on `threads` threads: 1536^3 products, best of several. */
static double sgemm_peak(int threads)
{
    const int n = 1536;
    float *a = malloc((size_t)n * n * sizeof *a), *b = malloc((size_t)n * n * sizeof *b),
          *c = malloc((size_t)n * n * sizeof *c);
    for (size_t i = 0; i < (size_t)n * n; i++) a[i] = b[i] = 1.0f / (1 + i % 7);
    openblas_set_num_threads(threads);
    double best = 0;
    for (int rep = 0; rep < 6; rep++) {
        double t0 = bench_now();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1, a, n, b, n, 0, c, n);
        double gf = 2.0 * n * n * n / (bench_now() - t0) / 1e9;
        if (gf > best) best = gf;
    }
    free(a);
    free(b);
    free(c);
    return best;
}

int main(int argc, char **argv)
{
    const char *model_name = "resnet8-fmnist", *mode = "train", *optimizer = "sgd",
               *device = "cpu", *precision = "f32";
    int batch = 256, threads = 2, kfac_warmup = -1;
    double seconds = 10;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--model")) model_name = argv[i + 1];
        else if (!strcmp(argv[i], "--batch")) batch = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--mode")) mode = argv[i + 1];
        else if (!strcmp(argv[i], "--optimizer")) optimizer = argv[i + 1];
        else if (!strcmp(argv[i], "--threads")) threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--seconds")) seconds = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--device")) device = argv[i + 1];
        else if (!strcmp(argv[i], "--precision")) precision = argv[i + 1];
        else if (!strcmp(argv[i], "--kfac-warmup")) kfac_warmup = atoi(argv[i + 1]);
        else return usage(NULL);
    }
    int gpu = !strcmp(device, "cuda");
    if (!gpu && strcmp(device, "cpu")) return usage("--device: cpu or cuda");
    if (gpu && !strcmp(mode, "sgemm"))
        return usage("--mode sgemm measures the CPU's BLAS; it takes no --device cuda");
    if (!strcmp(mode, "sgemm")) {
        printf("{\"name\": \"sgemm_peak_%dthreads\", \"value\": %.1f, \"unit\": \"GFLOP/s\"}\n",
               threads, sgemm_peak(threads));
        return 0;
    }
    int train = !strcmp(mode, "train");
    if (!train && !strcmp(optimizer, "kfac"))
        return usage("--optimizer kfac times training steps (--mode train)");
    kfac_backend *be;
    kfac_model *m;
    if (strcmp(precision, "f32") && strcmp(precision, "tf32") && strcmp(precision, "bf16") &&
        strcmp(precision, "f16"))
        return usage("--precision: f32, tf32, bf16 or f16");
    if (kfac_backend_get(device, threads, &be)) return die("backend");
    if (kfac_backend_set_precision_name(be, precision)) return die("precision");
    const kfac_dtype act = be->act_dtype;
    kfac_loss_scale scaler; /* f16, as a GradScaler */
    kfac_loss_scale_init(&scaler, KFAC_LOSS_SCALE_INITIAL, KFAC_LOSS_SCALE_GROWTH_INTERVAL);
    /* infer: a model built for forwards only, as PyTorch's inference without
     * autograd keeps no activation for a backward */
    kfac_resnet_options opt = {.inference_only = !train};
    if (kfac_resnet_build(model_name, &opt, be, batch, 1, &m)) return die("model");
    kfac_sgd *sgd = NULL; /* training only: an inference-only model has no gradients */
    kfac_sgd_config cfg = {.momentum = 0.9f, .nesterov = 1, .weight_decay = 5e-4f};
    if (train && kfac_sgd_init(&sgd, m, &cfg)) return die("sgd");
    kfac_precond *kfac = NULL;
    kfac_precond_config kcfg;
    kfac_precond_config_defaults(&kcfg);
    if (kfac_warmup >= 0) kcfg.warmup_steps = kfac_warmup;
    if (!strcmp(optimizer, "kfac") && kfac_precond_init(&kfac, m, &kcfg)) return die("kfac");
    kfac_pass_graphs *graphs = NULL;
    const char *use_graphs = getenv("KFAC_CUDA_GRAPHS");
    if (gpu && train && !(use_graphs && !strcmp(use_graphs, "0")) &&
        kfac_pass_graphs_init(&graphs, m))
        return die("graphs");
    /* Training runs the trainer's step on one rank: K-FAC's steps that
     * estimate no factors replay their passes from graphs too. */
    kfac_comm *self = NULL;
    kfac_gradsync *sync = NULL;
    kfac_gradsync_config gcfg = {.overlap = 1, .max_micro_batches = 1};
    if (train && (kfac_comm_self(&self) || kfac_step_gradsync(m, kfac, self, &gcfg, &sync)))
        return die("gradient sync");
    kfac_step step = {.model = m, .sgd = sgd, .kfac = kfac, .sync = sync,
                      .loss_scale = act == KFAC_F16 ? &scaler : NULL, .graphs = graphs,
                      .rank = 0, .ranks = 1, .micro_batches = 1};
    int h, w, c;
    kfac_model_input_shape(m, &h, &w, &c);
    kfac_rng rng;
    kfac_rng_seed(&rng, 7);
    size_t floats = (size_t)batch * h * w * c;
    float *x = gpu ? malloc(floats * sizeof *x) : kfac_model_input(m); /* (batch, h, w, c) */
    if (!x) {
        fprintf(stderr, "bench_train: cannot allocate %zu floats of host input\n", floats);
        return 1;
    }
    for (size_t i = 0; i < floats; i++) x[i] = (float)kfac_rng_normal(&rng);
    int32_t *labels = malloc(batch * sizeof *labels);
    for (int i = 0; i < batch; i++) labels[i] = (int32_t)kfac_rng_below(&rng, kfac_model_classes(m));
    if (gpu) { /* the model's input is device memory there */
        if (be->upload(be, kfac_model_input(m), x, floats * sizeof *x)) return die("upload");
        free(x);
    }
    long images = 0;
    double t0 = 0;
    /* K-FAC: time steps after its warm-up, over whole inverse intervals. */
    int warm = kfac ? kcfg.warmup_steps : gpu ? 3 : 2, period = kfac ? kcfg.inverse_interval : 1;
    kfac_precond_stats before = {0}, after = {0};
    for (int it = 0;; it++) {
        if (it == warm) {
            t0 = bench_now();
            if (kfac) kfac_precond_get_stats(kfac, &before);
        }
        if (train) {
            bench_fixed_batch fb = {batch, labels};
            double loss = 0;
            long correct = 0, seen = 0;
            if (kfac_step_run(&step, it, 0.0, 0.01f, bench_load_fixed, &fb, &loss, &correct,
                              &seen))
                return die("step");
        } else if (kfac_model_forward(m, batch, KFAC_MODE_EVAL)) {
            return die("forward");
        }
        if (gpu && finish(be, m)) return die("synchronize");
        if (it >= warm) images += batch;
        if (it >= warm + 2 && (it + 1 - warm) % period == 0 && bench_now() - t0 > seconds) break;
    }
    if (kfac) kfac_precond_get_stats(kfac, &after);
    double ips = images / (bench_now() - t0);
    double macs = kfac_model_macs_per_image(m);
    double gflops = ips * macs * 2 * (train ? 3 : 1) / 1e9;
    double elapsed = bench_now() - t0;
    if (gpu)
        print_cuda(be, graphs, mode, kfac != NULL, model_name, batch, precision, ips, gflops);
    else
        printf("{\"name\": \"kfac_%s%s_%s_b%d\", \"value\": %.1f, \"unit\": \"images/s\", "
               "\"step_ms\": %.2f, \"gflops\": %.1f, \"peak_rss_mib\": %.1f, \"threads\": %d",
               mode, kfac ? "_kfac" : "", model_name, batch, ips, 1e3 * batch / ips, gflops,
               peak_rss_mib(), threads);
    kfac_model_memory mem;
    kfac_model_get_memory(m, &mem);
    printf(", \"arena_mib\": %.1f, \"fixed_mib\": %.1f, \"shared_mib\": %.1f, "
           "\"peak_live_mib\": %.1f, \"workspace_mib\": %.1f",
           mem.arena / 1048576.0, mem.fixed / 1048576.0, mem.shared_slots / 1048576.0,
           mem.peak_live / 1048576.0, mem.workspace / 1048576.0);
    /* On cuda these are host seconds: device work a stage queues counts where the host next waits. */
    if (kfac)
        printf(", \"capture_share\": %.3f, \"invert_share\": %.3f, "
               "\"precondition_share\": %.3f",
               (after.seconds_capture - before.seconds_capture) / elapsed,
               (after.seconds_invert - before.seconds_invert) / elapsed,
               (after.seconds_precondition - before.seconds_precondition) / elapsed);
    printf("}\n");
    kfac_pass_graphs_free(graphs);
    kfac_gradsync_free(sync);
    kfac_comm_free(self);
    kfac_precond_free(kfac);
    kfac_sgd_free(sgd);
    kfac_model_free(m);
    kfac_backend_free(be);
    free(labels);
    return 0;
}
