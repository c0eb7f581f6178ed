/* test_e2e_fmnist.c - 300 real training steps (batch 64, lr annealed to 0 by
 * the last step) of resnet8-fmnist on
 * the real Fashion-MNIST files through kfac_train_run: the training loss
 * must fall clearly (from ~2.3 at chance) and the test accuracy must be far
 * above chance.  Not a full training run (that is jobs/fmnist_resnet8_sgd.yaml). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kfac/kfac_train.h"
#include "testutil.h"

static double first_loss = -1, last_loss = -1;

static void on_progress(int epoch, int step, int steps, double loss, void *user)
{
    if (first_loss < 0) first_loss = loss;
    last_loss = loss;
}

int main(void)
{
    char dir[] = "/tmp/kfac_e2e_XXXXXX";
    CHECK(mkdtemp(dir) != NULL, "mkdtemp");
    char path[256];
    snprintf(path, sizeof path, "%s/job.yaml", dir);
    FILE *f = fopen(path, "w");
    fprintf(f, "model: {name: resnet8-fmnist}\n"
               "data: {path: %s}\n"
               "schedule: {lr: 0.1, warmup_epochs: 0.05, decay: cosine, decay_end_epoch: 0.32}\n"
               "train: {epochs: 1, batch_size: 64, max_steps: 300, threads: 2}\n"
               "output: {dir: %s/out}\n",
            KFAC_FMNIST_DIR, dir);
    fclose(f);
    kfac_job job;
    CHECK_OK(kfac_job_load(&job, path, 0, NULL));
    kfac_train_callbacks cb = {.on_progress = on_progress, .progress_every = 25};
    kfac_epoch_metrics em;
    CHECK_OK(kfac_train_run(&job, NULL, &cb, &em));
    printf("first 25-step loss %.3f, last %.3f, epoch train loss %.3f, test acc %.2f%%, %.0f img/s\n",
           first_loss, last_loss, em.train_loss, 100 * em.test_acc, em.images_per_s);
    CHECK(em.step == 300, "ran %ld steps", em.step);
    CHECK(last_loss < 0.75, "loss after 300 steps %.3f (chance is 2.30)", last_loss);
    CHECK(last_loss < 0.5 * first_loss, "loss fell from %.3f to %.3f", first_loss, last_loss);
    CHECK(em.test_acc > 0.70, "test accuracy %.3f after 300 steps", em.test_acc);
    /* the metrics file holds one JSON object with the required keys */
    snprintf(path, sizeof path, "%s/out/metrics.jsonl", dir);
    f = fopen(path, "r");
    char line[1024] = "";
    CHECK(f && fgets(line, sizeof line, f), "metrics file %s readable", path);
    const char *keys[] = {"\"epoch\"", "\"train_loss\"", "\"test_acc\"", "\"images_per_s\"", "\"seconds\""};
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++)
        CHECK(strstr(line, keys[i]) != NULL, "metrics line has %s: %s", keys[i], line);
    if (f) fclose(f);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    CHECK(system(cmd) == 0, "cleanup");
    return test_summary("test_e2e_fmnist");
}
