/* train.c - `kfac train JOB.yaml [--set key=value ...]`: loads the job,
 * runs kfac_train_run and prints progress and one line per epoch. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "commands.h"
#include "kfac/kfac_train.h"

#define MAX_SETS 128

static void usage(FILE *out)
{
    fprintf(out,
            "usage: kfac train JOB.yaml [--set section.key=value ...]\n"
            "\n"
            "Trains the job's model in this process and writes job.yaml (the resolved\n"
            "job) and a JSON-lines metrics file (one object per epoch) to output.dir.\n"
            "\n"
            "options:\n"
            "  --set KEY=VALUE  override one job key, e.g. --set train.epochs=1\n"
            "                   (precedence: --set > job file > default)\n"
            "  --help-keys      list every job key with its type, default and meaning\n"
            "  -q, --quiet      no progress lines within an epoch\n"
            "  -h, --help       this text\n");
}

static void on_start(const char *summary, void *user)
{
    printf("%s\n", summary);
    fflush(stdout);
}

static void on_progress(int epoch, int step, int steps, double loss, void *user)
{
    /* On a terminal, redraw one line; in a log, print nothing within epochs. */
    if (!isatty(STDOUT_FILENO)) return;
    printf("\repoch %d  step %d/%d  loss %.4f", epoch, step, steps, loss);
    fflush(stdout);
}

static void on_epoch(const kfac_epoch_metrics *m, void *user)
{
    if (isatty(STDOUT_FILENO)) printf("\r\033[K");
    printf("epoch %3d  lr %.4f  train_loss %.4f  train_acc %.2f%%  test_loss %.4f  "
           "test_acc %.2f%%",
           m->epoch, m->lr, m->train_loss, 100 * m->train_acc, m->test_loss, 100 * m->test_acc);
    if (m->test_acc_precise_bn >= 0) printf("  (precise BN %.2f%%)", 100 * m->test_acc_precise_bn);
    printf("  %.0f img/s  %.1fs (total %.1fs)\n", m->images_per_s, m->epoch_seconds, m->seconds);
    fflush(stdout);
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
    };
    kfac_epoch_metrics final;
    if (kfac_train_run(&job, &cb, &final) != KFAC_OK) {
        fprintf(stderr, "kfac train: %s\n", kfac_last_error());
        if (getenv("KFAC_DEBUG")) fprintf(stderr, "  (raised at %s)\n", kfac_last_error_where());
        return 1;
    }
    printf("done: test accuracy %.2f%% after %d epochs in %.1f s; metrics in %s/%s\n",
           100 * final.test_acc, final.epoch, final.seconds, job.output.dir, job.output.metrics);
    return 0;
}
