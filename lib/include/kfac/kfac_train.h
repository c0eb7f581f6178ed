/* kfac_train.h - the single-process training loop that `kfac train` runs:
 * job -> dataset, model, optimizer, schedule -> epochs of steps, evaluation
 * and metrics.
 *
 * Output (in job->output.dir, created if missing):
 *   job.yaml        the resolved job (defaults + file + --set)
 *   METRICS         JSON lines, one object per epoch: epoch, lr, train_loss,
 *                   train_acc, test_loss, test_acc, images_per_s,
 *                   epoch_seconds, seconds (elapsed since start); with K-FAC
 *                   also kfac_capture_s, kfac_invert_s, kfac_precondition_s;
 *                   with precise BN also test_loss_precise_bn, test_acc_precise_bn
 * The library prints nothing: callers get each epoch (and progress within
 * an epoch) through callbacks.
 */
#ifndef KFAC_TRAIN_H
#define KFAC_TRAIN_H

#include "kfac/kfac_job.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kfac_epoch_metrics {
    int epoch;               /* 1-based */
    long step;               /* optimizer steps so far */
    double lr;               /* learning rate at the end of the epoch */
    double train_loss, train_acc;
    double test_loss, test_acc;
    double test_loss_precise_bn, test_acc_precise_bn; /* -1 unless train.precise_bn_images */
    double images_per_s;     /* training images / training seconds of this epoch */
    double epoch_seconds;    /* training + evaluation of this epoch */
    double seconds;          /* since the start of the run */
    /* K-FAC only: seconds spent so far in its stages (cumulative) */
    double seconds_capture, seconds_invert, seconds_precondition;
} kfac_epoch_metrics;

typedef struct kfac_train_callbacks {
    /* Called once when the run is set up, with a one-line description. */
    void (*on_start)(const char *summary, void *user);
    /* Called every `progress_every` steps within an epoch (0: never). */
    void (*on_progress)(int epoch, int step_in_epoch, int steps_per_epoch, double loss,
                        void *user);
    int progress_every;
    void (*on_epoch)(const kfac_epoch_metrics *m, void *user);
    void *user;
} kfac_train_callbacks;

/* Runs the whole job.  *final (may be NULL) receives the last epoch. */
kfac_status kfac_train_run(const kfac_job *job, const kfac_train_callbacks *cb,
                           kfac_epoch_metrics *final);

#ifdef __cplusplus
}
#endif
#endif
