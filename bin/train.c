/* train.c - `kfac train JOB.yaml [--set key=value ...]`: loads the job,
 * finds the ranks (kfac_topo), runs kfac_train_run and prints progress and
 * one line per epoch (rank 0).  A failing rank prints its rank and host and
 * aborts the whole job, so no rank waits forever in a collective. */
#define _GNU_SOURCE /* sched_getaffinity */
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "commands.h"
#include "kfac/kfac_topo.h"
#include "kfac/kfac_train.h"

#define MAX_SETS 128

static void usage(FILE *out)
{
    fprintf(out,
            "usage: kfac train JOB.yaml [--set section.key=value ...]\n"
            "       srun --mpi=pmix [-N nodes] [-n ranks] kfac train JOB.yaml ...\n"
            "       mpirun -n ranks kfac train JOB.yaml ...\n"
            "\n"
            "Trains the job's model and writes job.yaml (the resolved job) and a\n"
            "JSON-lines metrics file (one object per epoch) to output.dir.  Started by\n"
            "srun or mpirun, the ranks train data-parallel: train.batch_size is the\n"
            "global batch, split evenly over ranks (see distributed.* in --help-keys);\n"
            "rank 0 prints the node map and writes the output.\n"
            "\n"
            "options:\n"
            "  --set KEY=VALUE  override one job key, e.g. --set train.epochs=1\n"
            "                   (precedence: --set > job file > default)\n"
            "  --help-keys      list every job key with its type, default and meaning\n"
            "  -q, --quiet      no progress lines within an epoch\n"
            "  -h, --help       this text\n");
}

/* Redraw progress in place only on a terminal of a single process
 * (launchers give ranks a pseudo-terminal that is not the user's). */
static int live_terminal;

static void on_start(const char *summary, void *user)
{
    printf("%s\n", summary);
    fflush(stdout);
}

static void on_notice(const char *message, void *user)
{
    if (live_terminal) printf("\r\033[K");
    fflush(stdout);
    fprintf(stderr, "kfac train: %s\n", message);
}

static void on_progress(int epoch, int step, int steps, double loss, void *user)
{
    /* On a terminal, redraw one line; in a log, print nothing within epochs. */
    if (!live_terminal) return;
    printf("\repoch %d  step %d/%d  loss %.4f", epoch, step, steps, loss);
    fflush(stdout);
}

static void on_epoch(const kfac_epoch_metrics *m, void *user)
{
    if (live_terminal) printf("\r\033[K");
    printf("epoch %3d  lr %.4f  train_loss %.4f  train_acc %.2f%%  test_loss %.4f  "
           "test_acc %.2f%%",
           m->epoch, m->lr, m->train_loss, 100 * m->train_acc, m->test_loss, 100 * m->test_acc);
    if (m->test_acc_precise_bn >= 0) printf("  (precise BN %.2f%%)", 100 * m->test_acc_precise_bn);
    printf("  %.0f img/s  %.1fs (total %.1fs)", m->images_per_s, m->epoch_seconds, m->seconds);
    /* Say when the input, not the model, set the pace (over 5% of the epoch). */
    if (m->loader_wait_s > 0.05 * m->epoch_seconds)
        printf("  loader-bound %.1fs", m->loader_wait_s);
    printf("\n");
    fflush(stdout);
}

/* data.stage: copies the shards to node-local storage and points this
 * rank's job at its node's copy (or the shared one, on fallback); the
 * resolved job.yaml then records the folder read, with data.stage none. */
static int stage_data(kfac_job *job, kfac_topo *topo)
{
    if (strcmp(job->data.format, "hdf5") != 0) {
        fprintf(stderr, "kfac train: data.stage %s needs data.format hdf5 (got %s)\n",
                job->data.stage, job->data.format);
        return 1;
    }
    kfac_stage_options opt;
    kfac_stage_options_init(&opt);
    opt.src_dir = job->data.path;
    opt.local_dir = job->data.local_dir[0] ? job->data.local_dir : NULL;
    kfac_stage_mode_parse(job->data.stage, &opt.mode); /* validated by the job schema */
    char dir[KFAC_STAGE_PATH];
    if (kfac_stage_and_report(&opt, topo, "kfac train: staging", 0, dir, sizeof dir, NULL, 0))
        return 1;
    if (strlen(dir) >= sizeof job->data.path) {
        fprintf(stderr, "kfac train: staged folder %s is longer than %zu characters\n", dir,
                sizeof job->data.path - 1);
        return 1;
    }
    snprintf(job->data.path, sizeof job->data.path, "%s", dir);
    snprintf(job->data.stage, sizeof job->data.stage, "none");
    return 0;
}

int kfac_cmd_train(int argc, char **argv)
{
    const char *job_path = NULL;
    const char *sets[MAX_SETS];
    int nset = 0, quiet = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--help-keys")) {
            static char text[64 * 1024];
            kfac_job_describe(text, sizeof text);
            fputs(text, stdout);
            return 0;
        } else if (!strcmp(a, "-q") || !strcmp(a, "--quiet")) {
            quiet = 1;
        } else if (!strcmp(a, "--set") || !strncmp(a, "--set=", 6)) {
            const char *v = a[5] == '=' ? a + 6 : (i + 1 < argc ? argv[++i] : NULL);
            if (!v) {
                fprintf(stderr, "kfac train: --set needs KEY=VALUE\n");
                return 2;
            }
            if (nset == MAX_SETS) {
                fprintf(stderr, "kfac train: more than %d --set options\n", MAX_SETS);
                return 2;
            }
            sets[nset++] = v;
        } else if (a[0] == '-') {
            fprintf(stderr, "kfac train: unknown option '%s' (see kfac train --help)\n", a);
            return 2;
        } else if (job_path) {
            fprintf(stderr, "kfac train: one job file only ('%s' and '%s')\n", job_path, a);
            return 2;
        } else {
            job_path = a;
        }
    }
    if (!job_path) {
        usage(stderr);
        return 2;
    }
    kfac_job job;
    if (kfac_job_load(&job, job_path, nset, sets) != KFAC_OK) {
        fprintf(stderr, "kfac train: %s\n", kfac_last_error());
        return 1;
    }
    kfac_train_callbacks cb = {
        .on_start = on_start,
        .on_progress = quiet ? NULL : on_progress,
        .progress_every = 1,
        .on_epoch = on_epoch,
        .on_notice = on_notice,
    };
    kfac_topo *topo;
    if (kfac_topo_init(&topo, 0) != KFAC_OK) {
        fprintf(stderr, "kfac train: %s\n", kfac_last_error());
        return 1;
    }
    const kfac_rank_info *me = kfac_topo_self(topo);
    int distributed = me->size > 1;
    live_terminal = !distributed && isatty(STDOUT_FILENO);
    /* train.threads 0 means all cores: with several ranks on a node, share
     * them (the cores this process may use, split over the node's ranks). */
    if (job.train.threads == 0 && me->local_size > 1) {
        int cores = (int)sysconf(_SC_NPROCESSORS_ONLN);
        cpu_set_t set;
        if (sched_getaffinity(0, sizeof set, &set) == 0) cores = CPU_COUNT(&set);
        job.train.threads = cores / me->local_size > 1 ? cores / me->local_size : 1;
    }
    if (distributed && me->rank == 0) {
        static char map[64 * 1024];
        kfac_topo_format_map(topo, map, sizeof map);
        printf("%d ranks on %d nodes (from %s):\n%s", me->size, me->num_nodes,
               kfac_topo_source_name(kfac_topo_source_used(topo)), map);
        fflush(stdout);
    }
    if (strcmp(job.data.stage, "none") != 0 && stage_data(&job, topo) != 0) {
        kfac_topo_free(topo);
        return 1;
    }
    kfac_epoch_metrics final;
    if (kfac_train_run(&job, distributed ? kfac_topo_world(topo) : NULL, &cb,
                       &final) != KFAC_OK) {
        if (distributed)
            fprintf(stderr, "kfac train: rank %d on %s: %s\n", me->rank, me->host,
                    kfac_last_error());
        else
            fprintf(stderr, "kfac train: %s\n", kfac_last_error());
        if (getenv("KFAC_DEBUG")) fprintf(stderr, "  (raised at %s)\n", kfac_last_error_where());
        fflush(stderr);
        if (distributed) kfac_comm_abort(kfac_topo_world(topo), 1); /* ends every rank */
        kfac_topo_free(topo);
        return 1;
    }
    if (me->rank == 0)
        printf("done: test accuracy %.2f%% after %d epochs in %.1f s; metrics in %s/%s\n",
               100 * final.test_acc, final.epoch, final.seconds, job.output.dir,
               job.output.metrics);
    kfac_topo_free(topo);
    return 0;
}
