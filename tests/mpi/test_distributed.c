/* test_distributed.c - data-parallel training and distributed K-FAC give
 * the weights of one process, and move exactly the bytes the layer shapes
 * predict.
 *
 *   test_distributed --reference DIR FMNIST   one process: trains each case
 *       as R micro-batches of 16 images per step (R = 8) and writes the
 *       weights to DIR/<case>.f32
 *   mpirun -n P test_distributed --compare DIR FMNIST   (P divides 8)
 *       each case on P ranks of R/P micro-batches: every rank must end with
 *       bit-identical weights, within the stated tolerance of the reference,
 *       and the bytes per step of the every-step cases must equal the
 *       formula below.
 * BN statistics are per micro-batch in both, so the runs compute the same
 * function; what differs is the order of fp32 sums (MPI's reductions), which
 * the tolerance covers.  Measured on 2, 4 and 8 ranks (2-core x86, Open MPI
 * 4.1): SGD <= 4e-6, K-FAC <= 5e-4 (the eigendecompositions amplify
 * last-bit differences of the factors; after one step it is 1.4e-6), bf16
 * factor traffic <= 6.3e-3.  A wrong owner, scale or stale inverse moves
 * weights by 1e-2 or more.
 */
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kfac/kfac_factors.h"
#include "kfac/kfac_resnet.h"
#include "kfac/kfac_topo.h"
#include "kfac/kfac_train.h"
#include "testutil.h"

#define R 8      /* micro-batches per step in total */
#define MICRO 32 /* images per micro-batch */
#define STEPS 3

typedef struct test_case {
    const char *name;
    const char *sets[8];
    double tol;      /* max |w - w_ref| / max |w_ref| */
    int every_step;  /* K-FAC factors and inverses refresh at every step */
    int factor_bytes;/* element size of factor traffic */
} test_case;

static const test_case CASES[] = {
    {"sgd", {"optimizer.name=sgd"}, 2e-5, 0, 0},
    {"kfac_every_step", {"optimizer.name=kfac", "optimizer.kfac.warmup_steps=100"}, 2e-3, 1, 4},
    {"kfac_intervals",
     {"optimizer.name=kfac", "optimizer.kfac.warmup_steps=1", "optimizer.kfac.factor_interval=2",
      "optimizer.kfac.inverse_interval=3"},
     2e-3, 0, 4},
    {"kfac_reduce_at_inverse",
     {"optimizer.name=kfac", "optimizer.kfac.warmup_steps=1", "optimizer.kfac.factor_interval=1",
      "optimizer.kfac.inverse_interval=3", "distributed.factor_reduce=inverse"},
     2e-3, 0, 4},
    {"kfac_sampled_bn_sgd",
     {"optimizer.name=kfac", "optimizer.kfac.warmup_steps=100", "optimizer.kfac.fisher=sampled",
      "optimizer.kfac.bn=sgd", "optimizer.kfac.inverse=cholesky"},
     2e-3, 0, 4},
    {"kfac_bf16_factors",
     {"optimizer.name=kfac", "optimizer.kfac.warmup_steps=100", "distributed.factor_dtype=bf16"},
     2e-2, 1, 2},
};
enum { NCASES = sizeof CASES / sizeof CASES[0] };

static float *trained;
static size_t trained_count;

static void keep_params(const float *params, size_t count, void *user)
{
    free(trained);
    trained = malloc(count * sizeof(float));
    memcpy(trained, params, count * sizeof(float));
    trained_count = count;
}

/* The reference always reduces factors at every refresh, so the
 * reduce-at-inverse case also checks that both modes give the same weights. */
static int run_case(const test_case *c, const char *fmnist, kfac_comm *world, int ranks,
                    int reference, kfac_epoch_metrics *em)
{
    char sets[24][160];
    const char *ptrs[24];
    int n = 0;
    snprintf(sets[n++], 160, "data.path=%s", fmnist);
    snprintf(sets[n++], 160, "train.batch_size=%d", R * MICRO);
    snprintf(sets[n++], 160, "train.micro_batches=%d", R / ranks);
    snprintf(sets[n++], 160, "train.max_steps=%d", STEPS);
    char out[64];
    snprintf(out, sizeof out, "/tmp/kfac_test_distributed_%d", (int)getpid());
    snprintf(sets[n++], 160, "output.dir=%s", out);
    snprintf(sets[n++], 160, "train.epochs=1");
    snprintf(sets[n++], 160, "train.threads=1");
    snprintf(sets[n++], 160, "schedule.warmup_epochs=0");
    snprintf(sets[n++], 160, "schedule.lr=0.05");
    snprintf(sets[n++], 160, "optimizer.kfac.kl_clip=0.01");
    snprintf(sets[n++], 160, "optimizer.kfac.damping=0.01");
    for (int i = 0; i < 8 && c->sets[i]; i++)
        if (!reference || strncmp(c->sets[i], "distributed.factor_reduce", 25) != 0)
            snprintf(sets[n++], 160, "%s", c->sets[i]);
    if (getenv("KFAC_TEST_SET")) snprintf(sets[n++], 160, "%s", getenv("KFAC_TEST_SET"));
    for (int i = 0; i < n; i++) ptrs[i] = sets[i];
    kfac_job job;
    CHECK_OK(kfac_job_load(&job, NULL, n, ptrs));
    kfac_train_callbacks cb = {.on_finish = keep_params};
    kfac_status st = kfac_train_run(&job, world, &cb, em);
    CHECK(st == KFAC_OK, "%s: %s", c->name, kfac_last_error());
    char path[512]; /* rank 0's output: job.yaml and the metrics */
    snprintf(path, sizeof path, "%s/job.yaml", out);
    remove(path);
    snprintf(path, sizeof path, "%s/%s", out, job.output.metrics);
    remove(path);
    rmdir(out);
    return st == KFAC_OK;
}

static int reference(const char *dir, const char *fmnist)
{
    for (int i = 0; i < NCASES; i++) {
        kfac_epoch_metrics em;
        if (!run_case(&CASES[i], fmnist, NULL, 1, 1, &em)) continue;
        char path[512];
        snprintf(path, sizeof path, "%s/%s.f32", dir, CASES[i].name);
        FILE *f = fopen(path, "wb");
        CHECK(f && fwrite(trained, sizeof(float), trained_count, f) == trained_count, "write %s", path);
        if (f) fclose(f);
        printf("reference %-24s %zu weights, train loss %.4f\n", CASES[i].name, trained_count,
               em.train_loss);
    }
    return test_summary("test_distributed --reference");
}

/* Sizes of the K-FAC traffic, from the layer shapes of the model. */
typedef struct shapes {
    double factor_floats, grad_floats, params;
} shapes;

static shapes model_shapes(void)
{
    shapes s = {0, 0, 0};
    kfac_backend *be;
    kfac_model *m;
    kfac_resnet_options opt = {0};
    CHECK_OK(kfac_backend_get("cpu", 1, &be));
    CHECK_OK(kfac_resnet_build("resnet8-fmnist", &opt, be, 1, 1, &m));
    for (int i = 0; i < kfac_model_num_nodes(m); i++) {
        kfac_layer_view v;
        kfac_model_layer(m, i, 1, &v);
        if (v.kind == KFAC_NODE_CONV || v.kind == KFAC_NODE_FC) {
            double d = (double)v.conv.kh * v.conv.kw * v.conv.c + (v.param[1] >= 0), k = v.conv.k;
            s.factor_floats += d * (d + 1) / 2 + k * (k + 1) / 2;
            s.grad_floats += k * d;
        } else if (v.kind == KFAC_NODE_BN) {
            s.factor_floats += 3.0 * v.channels;
            s.grad_floats += 2.0 * v.channels;
        }
    }
    s.params = (double)kfac_model_param_count(m);
    kfac_model_free(m);
    kfac_backend_free(be);
    return s;
}

static void check_bytes(const test_case *c, const kfac_epoch_metrics *em, int P)
{
    shapes s = model_shapes();
    double expect[KFAC_STAGE_COUNT] = {0};
    if (!c->factor_bytes) {
        expect[KFAC_STAGE_GRAD_ALLREDUCE] = 2.0 * (P - 1) * s.params * 4;
    } else {
        expect[KFAC_STAGE_FACTOR_REDUCE] = (P - 1) * s.factor_floats * c->factor_bytes;
        expect[KFAC_STAGE_GRAD_REDUCE] = (P - 1) * s.grad_floats * 4;
        expect[KFAC_STAGE_PRECOND_GATHER] = (P - 1) * s.grad_floats * 4;
        expect[KFAC_STAGE_OTHER] = 2.0 * (P - 1) * 8; /* the KL clip's <P g>, one f64 */
    }
    for (int st = 0; st < KFAC_STAGE_COUNT; st++) {
        double got = em->bytes_per_step[st][KFAC_LINK_INTRA] + em->bytes_per_step[st][KFAC_LINK_INTER];
        CHECK(got == expect[st], "%s: %s bytes/step %.0f, formula %.0f", c->name,
              kfac_comm_stage_name(st), got, expect[st]);
    }
}

static int compare(const char *dir, const char *fmnist)
{
    kfac_topo *topo;
    CHECK_OK(kfac_topo_init(&topo, 1));
    kfac_comm *world = kfac_topo_world(topo);
    int rank = kfac_comm_rank(world), P = kfac_comm_size(world);
    if (R % P != 0) {
        if (rank == 0) fprintf(stderr, "test_distributed: %d ranks do not divide %d\n", P, R);
        kfac_topo_free(topo);
        return 2;
    }
    for (int i = 0; i < NCASES; i++) {
        const test_case *c = &CASES[i];
        kfac_epoch_metrics em;
        if (!run_case(c, fmnist, world, P, 0, &em)) break;
        size_t n = trained_count;
        float *all = rank == 0 ? malloc(n * (size_t)P * sizeof(float)) : NULL;
        MPI_Gather(trained, (int)n, MPI_FLOAT, all, (int)n, MPI_FLOAT, 0, MPI_COMM_WORLD);
        if (rank != 0) continue;
        int same = 1;
        for (int r = 1; r < P; r++) same &= memcmp(all, all + (size_t)r * n, n * sizeof(float)) == 0;
        CHECK(same, "%s: ranks ended with different weights", c->name);
        char path[512];
        snprintf(path, sizeof path, "%s/%s.f32", dir, c->name);
        float *ref = malloc(n * sizeof(float));
        FILE *f = fopen(path, "rb");
        int ok = f && fread(ref, sizeof(float), n, f) == n;
        CHECK(ok, "%s: cannot read the reference (run --reference first)", path);
        if (f) fclose(f);
        if (ok) {
            double max_ref = 0, max_diff = 0, moved = 0;
            size_t worst = 0;
            for (size_t j = 0; j < n; j++) {
                max_ref = fmax(max_ref, fabs(ref[j]));
                if (fabs((double)all[j] - ref[j]) > max_diff) worst = j;
                max_diff = fmax(max_diff, fabs((double)all[j] - ref[j]));
            }
            if (getenv("KFAC_TEST_DEBUG")) printf("worst at %zu: %g vs %g\n", worst, all[worst], ref[worst]);
            moved = max_diff / max_ref;
            printf("%d ranks %-24s max |w - w_ref| / max |w_ref| = %.2e (tolerance %.0e)\n", P,
                   c->name, moved, c->tol);
            CHECK(moved <= c->tol, "%s: %d ranks differ from one process by %.3e > %.0e",
                  c->name, P, moved, c->tol);
        }
        if (P > 1 && (c->every_step || !c->factor_bytes)) check_bytes(c, &em, P);
        free(ref);
        free(all);
    }
    int failed = test_failed_count;
    MPI_Bcast(&failed, 1, MPI_INT, 0, MPI_COMM_WORLD);
    kfac_topo_free(topo);
    if (rank != 0) return failed ? 1 : 0;
    return test_summary("test_distributed --compare");
}

int main(int argc, char **argv)
{
    if (argc == 4 && strcmp(argv[1], "--reference") == 0) return reference(argv[2], argv[3]);
    if (argc == 4 && strcmp(argv[1], "--compare") == 0) return compare(argv[2], argv[3]);
    fprintf(stderr, "usage: test_distributed --reference|--compare DIR FASHION_MNIST_DIR\n");
    return 2;
}
