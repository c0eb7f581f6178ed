/* kfac_train.h - the training loop that `kfac train` runs: job -> dataset,
 * model, optimizer, schedule -> epochs of steps, evaluation and metrics, in
 * one process or data-parallel over the ranks of a communicator.
 *
 * Distributed: train.batch_size is the global batch; each of the P ranks
 * takes batch_size / P images of it as train.micro_batches micro-batches.
 * The result equals one process running P * micro_batches micro-batches of
 * the same size (BN statistics are per micro-batch in both), to fp32
 * rounding of the reductions.  Rank 0 writes the output and alone calls the
 * callbacks; every rank evaluates a share of the test set.
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

#include "kfac/kfac_comm.h"
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
    double loader_wait_s;    /* of those seconds, rank 0's wait for its input (loader-bound) */
    double epoch_seconds;    /* training + evaluation of this epoch */
    double seconds;          /* since the start of the run */
    /* K-FAC only: seconds spent so far in its stages (cumulative) */
    double seconds_capture, seconds_invert, seconds_precondition, seconds_comm;
    /* K-FAC only, this epoch: mean KL-clip scale and the fraction of steps clipped */
    double kl_scale_mean, kl_clipped_fraction;
    int steps_in_epoch;
    /* train.precision f16 only: the loss scale at the end of the epoch and
     * the steps skipped for overflow so far (cumulative) */
    double loss_scale;
    long skipped_steps;
    /* train.cuda_graphs: training passes run from a CUDA graph so far (-1:
     * graphs not in use for this run) */
    long graph_passes;
    /* bytes sent per training step, summed over ranks, per stage and link */
    double bytes_per_step[KFAC_STAGE_COUNT][KFAC_LINK_COUNT];
} kfac_epoch_metrics;

typedef struct kfac_train_callbacks {
    /* Called once when the run is set up, with a one-line description. */
    void (*on_start)(const char *summary, void *user);
    /* Called every `progress_every` steps within an epoch (0: never). */
    void (*on_progress)(int epoch, int step_in_epoch, int steps_per_epoch, double loss,
                        void *user);
    int progress_every;
    void (*on_epoch)(const kfac_epoch_metrics *m, void *user);
    /* Called on every rank (the others: rank 0 only) after the last epoch,
     * with the trained parameters (host copy, param_count floats). */
    void (*on_finish)(const float *params, size_t param_count, void *user);
    /* Called (rank 0) with a one-line notice the user should see, e.g. a
     * fallback the run took; NULL: not shown. */
    void (*on_notice)(const char *message, void *user);
    void *user;
} kfac_train_callbacks;

/* Runs the whole job over `world` (NULL: this process alone; the same
 * communicator on every rank otherwise).  *final (may be NULL) receives the
 * last epoch (on every rank). */
kfac_status kfac_train_run(const kfac_job *job, kfac_comm *world, const kfac_train_callbacks *cb,
                           kfac_epoch_metrics *final);

#ifdef __cplusplus
}
#endif
#endif
