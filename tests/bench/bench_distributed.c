/* bench_distributed.c - one rank of the distributed step benchmark (run by
 * tests/bench/run_distributed under mpirun): synthetic images through the
 * trainer's step (kfac_step_run), timed over --steps steps after one
 * warm-up step.  Rank 0 prints one JSON object:
 *   {"model", "optimizer", "ranks", "batch_per_rank", "step_ms",
 *    "bytes_per_step": {stage: bytes summed over ranks},
 *    "kfac_factor_bytes_naive": all-reduce of full d x d and k x k factors,
 *    "kfac_bytes_naive": that plus an all-reduce of every gradient}
 * K-FAC refreshes factors and inverses at every step here (the worst case
 * for traffic). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kfac/kfac_resnet.h"
#include "kfac/kfac_rng.h"
#include "kfac/kfac_topo.h"

#include "bench_common.h"

#define CHECK(x)                                                                   \
    do {                                                                           \
        if ((x) != KFAC_OK) {                                                      \
            fprintf(stderr, "bench_distributed: %s: %s\n", #x, kfac_last_error()); \
            return 1;                                                              \
        }                                                                          \
    } while (0)

int main(int argc, char **argv)
{
    const char *model_name = "resnet8-fmnist", *optimizer = "sgd";
    int batch = 32, steps = 5, image = 0, threads = 1;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--model")) model_name = argv[i + 1];
        else if (!strcmp(argv[i], "--optimizer")) optimizer = argv[i + 1];
        else if (!strcmp(argv[i], "--batch")) batch = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--steps")) steps = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--image")) image = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--threads")) threads = atoi(argv[i + 1]);
        else {
            fprintf(stderr, "usage: bench_distributed [--model M] [--optimizer sgd|kfac] "
                            "[--batch per-rank] [--steps S] [--image PX] [--threads T]\n");
            return 2;
        }
    }
    kfac_topo *topo;
    CHECK(kfac_topo_init(&topo, 0));
    kfac_comm *world = kfac_topo_world(topo);
    int rank = kfac_comm_rank(world), ranks = kfac_comm_size(world);
    kfac_backend *be;
    CHECK(kfac_backend_get("cpu", threads, &be));
    kfac_resnet_options opt = {.image_size = image};
    kfac_step b = {.rank = rank, .ranks = ranks, .micro_batches = 1};
    CHECK(kfac_resnet_build(model_name, &opt, be, batch, 1, &b.model));
    kfac_sgd_config sc = {.momentum = 0.9f, .weight_decay = 5e-4f};
    CHECK(kfac_sgd_init(&b.sgd, b.model, &sc));
    if (!strcmp(optimizer, "kfac")) {
        kfac_precond_config kc;
        kfac_precond_config_defaults(&kc);
        kc.warmup_steps = 1 << 30; /* refresh everything every step */
        kc.kl_clip = 0.01f;
        CHECK(kfac_precond_init(&b.kfac, b.model, &kc));
        CHECK(kfac_precond_set_comm(b.kfac, world));
    }
    kfac_gradsync_config gc = {.overlap = 1, .max_micro_batches = 1};
    CHECK(kfac_step_gradsync(b.model, b.kfac, world, &gc, &b.sync));
    /* Synthetic batch: normal pixels, uniform labels, different per rank. */
    int h, w, c;
    kfac_model_input_shape(b.model, &h, &w, &c);
    size_t pixels = (size_t)batch * h * w * c;
    float *x = malloc(pixels * sizeof(float));
    int32_t *labels = malloc((size_t)batch * sizeof(int32_t));
    kfac_rng rng;
    kfac_rng_seed(&rng, 1000 + (uint64_t)rank);
    for (size_t i = 0; i < pixels; i++) x[i] = (float)kfac_rng_normal(&rng);
    for (int i = 0; i < batch; i++) labels[i] = (int32_t)(kfac_rng_next_u64(&rng) % (uint64_t)kfac_model_classes(b.model));
    CHECK(be->upload(be, kfac_model_input(b.model), x, pixels * sizeof(float)));

    bench_fixed_batch fb = {batch, labels};
    double loss = 0;
    long correct = 0, seen = 0;
#define STEP(s) kfac_step_run(&b, (s), 0.0, 0.01f, bench_load_fixed, &fb, &loss, &correct, &seen)
    CHECK(STEP(0)); /* warm-up */
    kfac_comm_reset_bytes(world);
    kfac_comm_barrier(world);
    double t0 = bench_now();
    for (int s = 1; s <= steps; s++) CHECK(STEP(s));
    kfac_comm_barrier(world);
    double ms = (bench_now() - t0) * 1e3 / steps;
    kfac_comm_bytes bytes;
    kfac_comm_get_bytes(world, &bytes);
    double per_stage[KFAC_STAGE_COUNT + 1];
    for (int s = 0; s < KFAC_STAGE_COUNT; s++)
        per_stage[s] = (double)(bytes.sent[s][0] + bytes.sent[s][1]) / steps;
    per_stage[KFAC_STAGE_COUNT] = ms;
    CHECK(kfac_comm_allreduce(world, per_stage, KFAC_STAGE_COUNT + 1, KFAC_F64, KFAC_STAGE_OTHER));
    if (rank == 0) {
        /* The naive scheme: every rank all-reduces full factors (ring: each
         * rank sends 2(P-1)/P of them) and every gradient. */
        double full = 0, params = (double)kfac_model_param_count(b.model);
        for (int i = 0; i < kfac_model_num_nodes(b.model); i++) {
            kfac_layer_view v;
            kfac_model_layer(b.model, i, 1, &v);
            if (v.kind == KFAC_NODE_CONV || v.kind == KFAC_NODE_FC) {
                double d = (double)v.conv.kh * v.conv.kw * v.conv.c + (v.param[1] >= 0);
                full += d * d + (double)v.conv.k * v.conv.k;
            } else if (v.kind == KFAC_NODE_BN) {
                full += 4.0 * v.channels; /* a full 2x2 block per channel */
            }
        }
        double naive_factors = 2.0 * (ranks - 1) * full * 4, naive_grads = 2.0 * (ranks - 1) * params * 4;
        printf("{\"model\": \"%s\", \"optimizer\": \"%s\", \"ranks\": %d, \"batch_per_rank\": %d, "
               "\"image\": %d, \"step_ms\": %.2f, \"bytes_per_step\": {",
               model_name, optimizer, ranks, batch, h, per_stage[KFAC_STAGE_COUNT] / ranks);
        for (int s = 0; s < KFAC_STAGE_COUNT; s++)
            printf("%s\"%s\": %.0f", s ? ", " : "", kfac_comm_stage_name(s), per_stage[s]);
        printf("}, \"kfac_factor_bytes_naive\": %.0f, \"kfac_bytes_naive\": %.0f}\n", naive_factors,
               naive_factors + naive_grads);
    }
    free(x);
    free(labels);
    kfac_gradsync_free(b.sync);
    kfac_precond_free(b.kfac);
    kfac_sgd_free(b.sgd);
    kfac_model_free(b.model);
    kfac_backend_free(be);
    kfac_topo_free(topo);
    return 0;
}
