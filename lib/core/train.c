/* train.c - the training loop: one place that sequences data, forward,
 * loss, backward, gradient reduction, optimizer and schedule, then
 * evaluates and records metrics once per epoch.  With several ranks, each
 * takes an equal slice of every global batch (in micro-batches), gradients
 * are averaged over ranks (K-FAC layers through their owners), and rank 0
 * alone writes output and calls the callbacks. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/clock.h"
#include "core/fsutil.h"
#include "kfac/kfac_dataset.h"
#include "kfac/kfac_gradsync.h"
#include "kfac/kfac_loader.h"
#include "kfac/kfac_optim.h"
#include "kfac/kfac_precond.h"
#include "kfac/kfac_resnet.h"
#include "kfac/kfac_shards.h"
#include "kfac/kfac_step.h"
#include "kfac/kfac_train.h"
#include "core/feed.h"

typedef struct trainer {
    const kfac_job *job;
    kfac_backend *be;
    kfac_dataset *train_set, *test_set;
    kfac_batcher *train_batches, *test_batches;
    kfac_batcher *bn_batches; /* precise BN: un-augmented training images */
    kfac_loader *train_loader; /* this rank's micro-batches of train_batches, read ahead */
    kfac_feed *feed;           /* train_loader's pieces into the model, uploads overlapped */
    kfac_pass_graphs *graphs;  /* train.cuda_graphs where they apply; NULL: eager */
    int graphs_noticed;        /* their fallback was reported */
    kfac_model *model;
    kfac_sgd *sgd;
    kfac_precond *kfac;       /* NULL for plain SGD */
    kfac_comm *world, *self_comm;
    int rank, size;
    int micro_batches, micro_size; /* per rank: count and images of each */
    kfac_gradsync *sync;
    kfac_loss_scale loss_scale; /* train.precision f16 */
    int scaled;                 /* loss_scale in use */
    kfac_comm_bytes bytes_before;   /* counters at the start of the epoch */
    kfac_lr_schedule schedule;
    int32_t *labels;
    float *host_images; /* evaluation batches on their way to the backend */
    int host_images_pinned; /* from the backend's host_alloc (else malloc) */
    float *bn_saved;    /* BN running statistics kept aside during precise BN */
    FILE *metrics;
} trainer;

static kfac_status schedule_from_job(const kfac_job *job, kfac_lr_schedule *s)
{
    memset(s, 0, sizeof *s);
    KFAC_TRY(kfac_lr_decay_parse(job->schedule.decay, &s->decay));
    s->peak = job->schedule.lr;
    s->warmup_start = job->schedule.warmup_start_lr;
    s->final = job->schedule.final_lr;
    s->warmup_epochs = job->schedule.warmup_epochs;
    s->decay_start = job->schedule.decay_start_epoch >= 0 ? job->schedule.decay_start_epoch
                                                          : job->schedule.warmup_epochs;
    s->decay_end = job->schedule.decay_end_epoch >= 0 ? job->schedule.decay_end_epoch
                                                      : job->train.epochs;
    s->power = job->schedule.poly_power;
    s->gamma = job->schedule.gamma;
    s->num_milestones = job->schedule.num_milestones;
    for (int i = 0; i < s->num_milestones; i++) s->milestones[i] = job->schedule.milestones[i];
    return KFAC_OK;
}

static void precond_config_from_job(const kfac_job *job, kfac_precond_config *c)
{
    const typeof(job->optimizer.kfac) *k = &job->optimizer.kfac;
    kfac_precond_config_defaults(c);
    c->fisher = strcmp(k->fisher, "sampled") == 0 ? KFAC_FISHER_SAMPLED : KFAC_FISHER_EMPIRICAL;
    c->inverse = strcmp(k->inverse, "cholesky") == 0 ? KFAC_INVERSE_CHOLESKY : KFAC_INVERSE_EIG;
    c->exact_kronecker = k->exact_kronecker;
    c->factor_decay = k->factor_decay;
    c->factor_interval = k->factor_interval;
    c->inverse_interval = k->inverse_interval;
    c->warmup_steps = k->warmup_steps;
    c->adaptive_threshold = k->adaptive_threshold;
    c->max_interval = k->max_interval;
    c->damping = k->damping;
    c->damping_decay = k->damping_decay;
    c->damping_min = k->damping_min;
    c->kl_clip = k->kl_clip;
    c->subsample = k->subsample;
    c->bn = strcmp(k->bn, "sgd") == 0        ? KFAC_BN_SGD
            : strcmp(k->bn, "diagonal") == 0 ? KFAC_BN_DIAGONAL
                                             : KFAC_BN_UNITWISE;
    c->exclude = k->exclude;
    c->seed = job->train.seed;
    kfac_dtype_parse(job->distributed.factor_dtype, &c->factor_dtype); /* validated by the job */
    c->reduce_at_inverse = strcmp(job->distributed.factor_reduce, "inverse") == 0;
}

/* The per-channel normalisation of the job: one value for every channel, or
 * one per channel. */
static kfac_status normalisation(const kfac_job *job, int channels, kfac_batcher_config *cfg)
{
    if (channels > 4)
        return KFAC_ERR(KFAC_ENOTSUP, "%s: %d channels (at most 4)", job->data.path, channels);
    if ((job->data.num_mean != 1 && job->data.num_mean != channels) ||
        (job->data.num_std != 1 && job->data.num_std != channels))
        return KFAC_ERR(KFAC_EINVAL, "data.mean/data.std: %d and %d values for %d-channel images "
                        "(give one, or one per channel)", job->data.num_mean, job->data.num_std,
                        channels);
    for (int c = 0; c < channels; c++) {
        cfg->mean[c] = job->data.mean[job->data.num_mean == 1 ? 0 : c];
        cfg->std[c] = job->data.std[job->data.num_std == 1 ? 0 : c];
    }
    return KFAC_OK;
}

static kfac_status open_datasets(trainer *t)
{
    const kfac_job *job = t->job;
    if (strcmp(job->data.format, "hdf5") == 0) {
        KFAC_TRY(kfac_dataset_open_hdf5(job->data.path, "train", &t->train_set));
        return kfac_dataset_open_hdf5(job->data.path, "val", &t->test_set);
    }
    KFAC_TRY(kfac_dataset_open_idx(job->data.path, KFAC_SPLIT_TRAIN, &t->train_set));
    return kfac_dataset_open_idx(job->data.path, KFAC_SPLIT_TEST, &t->test_set);
}

/* data.loader_threads, where 0 means the compute threads on the CPU and
 * every core when a GPU computes. */
static int loader_threads(const trainer *t)
{
    if (t->job->data.loader_threads) return t->job->data.loader_threads;
    if (strcmp(t->job->train.device, "cpu") == 0) return t->be->threads;
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    return cores > 0 ? (int)cores : 1;
}

/* The loader's allocator hook on the backend's host memory. */
static void *backend_host_alloc(size_t bytes, void *user)
{
    kfac_backend *be = user;
    return be->host_alloc(be, bytes);
}

static void backend_host_release(void *ptr, void *user)
{
    kfac_backend *be = user;
    be->host_release(be, ptr);
}

static kfac_status open_data(trainer *t)
{
    const kfac_job *job = t->job;
    KFAC_TRY(open_datasets(t));
    if (t->train_set->channels != t->test_set->channels)
        return KFAC_ERR(KFAC_EFORMAT, "%s: train images have %d channels, test images %d",
                        job->data.path, t->train_set->channels, t->test_set->channels);
    if (job->data.crop == 0 && (!t->train_set->fixed_size || !t->test_set->fixed_size))
        return KFAC_ERR(KFAC_EINVAL, "%s: the images differ in size: set data.crop",
                        job->data.path);
    kfac_augment augment = KFAC_AUGMENT_NONE;
    if (job->data.augment)
        augment = strcmp(job->data.transform, "random_resized_crop") == 0
                      ? KFAC_AUGMENT_RANDOM_RESIZED_CROP
                      : KFAC_AUGMENT_PAD_CROP_FLIP;
    kfac_batcher_config cfg = {
        .batch_size = job->train.batch_size,
        .augment = augment,
        .out_height = job->data.crop, /* 0: the stored size */
        .out_width = job->data.crop,
        .pad = job->data.pad,
        .scale_min = job->data.scale_min,
        .seed = job->train.seed,
        .shuffle = 1,
        .drop_last = 1, /* equal-sized steps: BN statistics and the schedule stay clean */
        .threads = loader_threads(t),
    };
    KFAC_TRY(normalisation(job, t->train_set->channels, &cfg));
    KFAC_TRY(kfac_batcher_init(&t->train_batches, t->train_set, &cfg));
    int local = job->train.batch_size / t->size;
    kfac_loader_config lc = {
        .first = t->rank * local,
        .count = local,
        .piece = t->micro_size,
        .depth = job->data.prefetch,
    };
    if (t->be->host_alloc) { /* pieces the backend uploads fastest from */
        lc.alloc = backend_host_alloc;
        lc.release = backend_host_release;
        lc.alloc_user = t->be;
    }
    KFAC_TRY(kfac_loader_init(&t->train_loader, t->train_batches, &lc));
    /* Un-augmented images: center crops, after val_resize. */
    cfg.augment = KFAC_AUGMENT_NONE;
    cfg.resize = job->data.val_resize;
    cfg.drop_last = 0;
    if (job->train.precise_bn_images > 0)
        KFAC_TRY(kfac_batcher_init(&t->bn_batches, t->train_set, &cfg));
    cfg.batch_size = job->train.eval_batch_size;
    cfg.shuffle = 0;
    return kfac_batcher_init(&t->test_batches, t->test_set, &cfg);
}

static kfac_status build_model(trainer *t)
{
    const kfac_job *job = t->job;
    /* Sized for training: evaluation runs in pieces of this size, so it
     * never needs more memory than a step (ResNet-50's arena is ~82 MiB
     * per image in f32). */
    int max_batch = t->micro_size;
    const int kfac = strcmp(job->optimizer.name, "kfac") == 0;
    kfac_precond_config kc;
    precond_config_from_job(job, &kc);
    int height, width, channels;
    kfac_batcher_sample_shape(t->train_batches, &height, &width, &channels);
    kfac_resnet_options opt = {
        .zero_init_residual = job->model.zero_init_residual,
        .num_classes = t->train_set->num_classes,
        .image_size = height,
        .in_channels = channels,
        .keep_activations = kfac && kfac_precond_needs_kept_activations(&kc),
    };
    if (height != width)
        return KFAC_ERR(KFAC_ENOTSUP, "non-square images (%dx%d): set data.crop", height, width);
    KFAC_TRY(kfac_resnet_build(job->model.name, &opt, t->be, max_batch, job->train.seed,
                               &t->model));
    kfac_sgd_config sgd = {
        .momentum = job->optimizer.momentum,
        .nesterov = job->optimizer.nesterov,
        .weight_decay = job->optimizer.weight_decay,
        .decay_bn_and_bias = job->optimizer.decay_bn_and_bias,
    };
    KFAC_TRY(kfac_sgd_init(&t->sgd, t->model, &sgd));
    if (kfac) {
        KFAC_TRY(kfac_precond_init(&t->kfac, t->model, &kc));
        KFAC_TRY(kfac_precond_set_comm(t->kfac, t->world));
    }
    kfac_gradsync_config gc = {
        .bucket_bytes = (size_t)(job->distributed.bucket_mb * 1024.0 * 1024.0),
        .overlap = job->distributed.overlap,
        .max_micro_batches = t->micro_batches,
    };
    KFAC_TRY(kfac_step_gradsync(t->model, t->kfac, t->world, &gc, &t->sync));
    t->labels = malloc((size_t)max_batch * sizeof(int32_t));
    size_t image = kfac_batcher_image_floats(t->train_batches);
    size_t bytes = (size_t)max_batch * image * sizeof(float);
    if (t->be->host_alloc) t->host_images = t->be->host_alloc(t->be, bytes);
    t->host_images_pinned = t->host_images != NULL;
    if (!t->host_images) t->host_images = malloc(bytes); /* pinning is an optimisation */
    t->bn_saved = malloc((kfac_model_buffer_count(t->model) + 1) * sizeof(float));
    if (!t->labels || !t->host_images || !t->bn_saved)
        return KFAC_ERR(KFAC_ENOMEM, "trainer: out of memory");
    return KFAC_OK;
}

/* n images into the model's input. */
static kfac_status upload_images(trainer *t, const float *images, int n)
{
    int h, w, c;
    kfac_model_input_shape(t->model, &h, &w, &c);
    return t->be->upload(t->be, kfac_model_input(t->model), images,
                         (size_t)n * h * w * c * sizeof(float));
}

/* Loads images offset..offset+count-1 of batch `batch` into the model's
 * input; *n = 0 past the epoch's end. */
static kfac_status load_batch(trainer *t, kfac_batcher *b, size_t batch, int offset, int count,
                              int *n)
{
    KFAC_TRY(kfac_batcher_read(b, batch, offset, count, t->host_images, t->labels, n));
    if (*n == 0) return KFAC_OK;
    return upload_images(t, t->host_images, *n);
}

/* BN running statistics are per rank (each sees its own micro-batches);
 * before anything reads them (evaluation) every rank takes their mean, so
 * all ranks hold the same model. */
static kfac_status average_bn_statistics(trainer *t)
{
    if (t->size == 1) return KFAC_OK;
    size_t count = kfac_model_buffer_count(t->model);
    float *stats = kfac_model_buffers(t->model);
    KFAC_TRY(kfac_comm_allreduce(t->world, stats, count, KFAC_F32, KFAC_STAGE_OTHER));
    for (size_t i = 0; i < count; i++) stats[i] /= (float)t->size;
    return KFAC_OK;
}

/* Sums of (loss, correct, images) over ranks. */
static kfac_status sum_over_ranks(trainer *t, double *loss, long *correct, long *seen)
{
    double v[3] = {*loss, (double)*correct, (double)*seen};
    KFAC_TRY(kfac_comm_allreduce(t->world, v, 3, KFAC_F64, KFAC_STAGE_OTHER));
    *loss = v[0];
    *correct = (long)v[1];
    *seen = (long)v[2];
    return KFAC_OK;
}

/* Precise BN: recompute every BN's running statistics as the mean over
 * batches of un-augmented training images, so evaluation does not see
 * statistics that lag weights moving fast under a high learning rate.
 * Each rank takes every size-th batch; the ranks' means are averaged. */
static kfac_status precise_bn(trainer *t, int epoch)
{
    int n, k = 0, bs = t->job->train.batch_size;
    long images = 0;
    size_t batches = kfac_batcher_batches_per_epoch(t->bn_batches);
    kfac_batcher_start_epoch(t->bn_batches, epoch);
    for (size_t b = (size_t)t->rank; b < batches && images < t->job->train.precise_bn_images;
         b += (size_t)t->size, images += (long)bs * t->size)
        for (int off = 0; off < bs; off += t->micro_size) {
            KFAC_TRY(load_batch(t, t->bn_batches, b, off, t->micro_size, &n));
            if (n == 0) break;
            kfac_model_set_bn_momentum(t->model, 1.0f / (float)++k);
            kfac_status st = kfac_model_forward(t->model, n, KFAC_MODE_TRAIN);
            kfac_model_set_bn_momentum(t->model, -1);
            KFAC_TRY(st);
        }
    return average_bn_statistics(t);
}

/* Each rank evaluates every size-th test batch; the sums are combined. */
static kfac_status evaluate(trainer *t, double *loss, double *acc)
{
    double loss_sum = 0;
    long correct = 0, seen = 0;
    int n, ebs = t->job->train.eval_batch_size, piece = kfac_model_max_batch(t->model);
    size_t batches = kfac_batcher_batches_per_epoch(t->test_batches);
    kfac_batcher_start_epoch(t->test_batches, 0);
    for (size_t b = (size_t)t->rank; b < batches; b += (size_t)t->size)
        for (int off = 0; off < ebs; off += piece) {
            KFAC_TRY(load_batch(t, t->test_batches, b, off, ebs - off < piece ? ebs - off : piece,
                                &n));
            if (n == 0) break;
            double l;
            int hits;
            KFAC_TRY(kfac_model_forward(t->model, n, KFAC_MODE_EVAL));
            KFAC_TRY(kfac_model_loss(t->model, n, t->labels, 0.0f, &l, &hits));
            loss_sum += l;
            correct += hits;
            seen += n;
        }
    KFAC_TRY(sum_over_ranks(t, &loss_sum, &correct, &seen));
    *loss = loss_sum / (double)seen;
    *acc = (double)correct / (double)seen;
    return KFAC_OK;
}

/* Evaluates again with precise BN statistics, then puts the running
 * statistics back, so the plain evaluation of later epochs is unaffected
 * and both can be compared from one run. */
static kfac_status evaluate_precise_bn(trainer *t, int epoch, kfac_epoch_metrics *em)
{
    size_t bytes = kfac_model_buffer_count(t->model) * sizeof(float);
    float *stats = kfac_model_buffers(t->model);
    KFAC_TRY(t->be->download(t->be, t->bn_saved, stats, bytes));
    KFAC_TRY(precise_bn(t, epoch));
    KFAC_TRY(evaluate(t, &em->test_loss_precise_bn, &em->test_acc_precise_bn));
    return t->be->upload(t->be, stats, t->bn_saved, bytes);
}

/* KFAC_FAULT=RANK:STEP:exit|kill makes rank RANK fail at step STEP: with
 * an error (exit) or by SIGKILL (kill).  For the tests that check a dying
 * rank ends the whole job. */
static kfac_status injected_fault(const trainer *t, long step)
{
    const char *spec = getenv("KFAC_FAULT");
    int rank;
    long at;
    char how[8] = "";
    if (!spec || sscanf(spec, "%d:%ld:%7s", &rank, &at, how) != 3) return KFAC_OK;
    if (rank != t->rank || at != step) return KFAC_OK;
    if (strcmp(how, "kill") == 0) raise(SIGKILL);
    return KFAC_ERR(KFAC_ECOMM, "injected failure at step %ld (KFAC_FAULT=%s)", step, spec);
}

/* This rank's micro-batch `micro` of the global batch being trained. */
typedef struct slice_loader {
    trainer *t;
    size_t batch;
    int last_batch; /* of the epoch, or of the run (train.max_steps) */
} slice_loader;

static kfac_status load_slice(void *user, int micro, int *n, const int32_t **labels)
{
    slice_loader *sl = user;
    trainer *t = sl->t;
    kfac_loader_piece piece;
    int last = sl->last_batch && micro == t->micro_batches - 1;
    KFAC_TRY(kfac__feed_take(t->feed, last, &piece));
    if (piece.n != t->micro_size || piece.batch != sl->batch || piece.index != micro)
        return KFAC_ERR(KFAC_EINVAL, "trainer: batch %zu micro-batch %d: the loader gave %d "
                        "images of batch %zu piece %d", sl->batch, micro, piece.n, piece.batch,
                        piece.index);
    *n = piece.n;
    *labels = piece.labels;
    return KFAC_OK;
}

/* One optimizer step on global batch `batch`. */
static kfac_status train_step(trainer *t, long step, size_t batch, int last_batch, double epoch,
                              float lr, double *loss_sum, long *correct, long *seen)
{
    kfac_step s = {
        .model = t->model,
        .sgd = t->sgd,
        .kfac = t->kfac,
        .sync = t->sync,
        .loss_scale = t->scaled ? &t->loss_scale : NULL,
        .graphs = t->graphs,
        .rank = t->rank,
        .ranks = t->size,
        .micro_batches = t->micro_batches,
        .label_smoothing = t->job->train.label_smoothing,
    };
    slice_loader sl = {t, batch, last_batch};
    KFAC_TRY(injected_fault(t, step));
    return kfac_step_run(&s, step, epoch, lr, load_slice, &sl, loss_sum, correct, seen);
}

/* Bytes all ranks sent during the epoch's training steps, per step. */
static kfac_status epoch_bytes(trainer *t, kfac_epoch_metrics *em)
{
    kfac_comm_bytes now;
    kfac_comm_get_bytes(t->world, &now);
    double v[KFAC_STAGE_COUNT][KFAC_LINK_COUNT];
    for (int s = 0; s < KFAC_STAGE_COUNT; s++)
        for (int l = 0; l < KFAC_LINK_COUNT; l++)
            v[s][l] = (double)(now.sent[s][l] - t->bytes_before.sent[s][l]);
    KFAC_TRY(kfac_comm_allreduce(t->world, v, sizeof v / sizeof(double), KFAC_F64,
                                 KFAC_STAGE_OTHER));
    int steps = em->steps_in_epoch > 0 ? em->steps_in_epoch : 1;
    for (int s = 0; s < KFAC_STAGE_COUNT; s++)
        for (int l = 0; l < KFAC_LINK_COUNT; l++) em->bytes_per_step[s][l] = v[s][l] / steps;
    return KFAC_OK;
}

static kfac_status train_epoch(trainer *t, int epoch, long *step, kfac_epoch_metrics *em,
                               const kfac_train_callbacks *cb)
{
    const kfac_job *job = t->job;
    int steps = (int)kfac_batcher_batches_per_epoch(t->train_batches);
    double loss_sum = 0;
    long correct = 0, seen = 0;
    double t0 = kfac__now_seconds();
    KFAC_TRY(kfac__feed_start(t->feed, (kfac_loader_cursor){epoch, 0}));
    kfac_loader_take_wait(t->train_loader);
    for (int i = 0; i < steps; i++) {
        if (job->train.max_steps > 0 && *step >= job->train.max_steps) break;
        double pos = epoch + (double)i / steps, lr = kfac_lr_at(&t->schedule, pos);
        double before = loss_sum;
        long seen_before = seen;
        int last = i == steps - 1 ||
                   (job->train.max_steps > 0 && *step + 1 >= job->train.max_steps);
        KFAC_TRY(train_step(t, *step, (size_t)i, last, pos, (float)lr, &loss_sum, &correct,
                            &seen));
        (*step)++;
        em->lr = lr;
        if (cb && cb->on_progress && cb->progress_every > 0 && (i + 1) % cb->progress_every == 0)
            cb->on_progress(epoch + 1, i + 1, steps, (loss_sum - before) / (seen - seen_before),
                            cb->user);
    }
    KFAC_TRY(kfac__feed_stop(t->feed));
    double train_seconds = kfac__now_seconds() - t0;
    em->loader_wait_s = kfac_loader_take_wait(t->train_loader);
    em->steps_in_epoch = (int)(*step - em->step);
    KFAC_TRY(epoch_bytes(t, em));
    KFAC_TRY(sum_over_ranks(t, &loss_sum, &correct, &seen));
    em->train_loss = seen ? loss_sum / seen : 0;
    em->train_acc = seen ? (double)correct / seen : 0;
    em->images_per_s = train_seconds > 0 ? seen / train_seconds : 0;
    return KFAC_OK;
}

static void write_metrics(FILE *f, const kfac_epoch_metrics *m, int kfac, int ranks,
                          int scaled)
{
    fprintf(f,
            "{\"epoch\": %d, \"step\": %ld, \"lr\": %.6g, \"train_loss\": %.6f, "
            "\"train_acc\": %.6f, \"test_loss\": %.6f, \"test_acc\": %.6f, "
            "\"images_per_s\": %.1f, \"loader_wait_s\": %.3f, \"epoch_seconds\": %.3f, "
            "\"seconds\": %.3f",
            m->epoch, m->step, m->lr, m->train_loss, m->train_acc, m->test_loss, m->test_acc,
            m->images_per_s, m->loader_wait_s, m->epoch_seconds, m->seconds);
    if (m->test_acc_precise_bn >= 0)
        fprintf(f, ", \"test_loss_precise_bn\": %.6f, \"test_acc_precise_bn\": %.6f",
                m->test_loss_precise_bn, m->test_acc_precise_bn);
    if (kfac)
        fprintf(f,
                ", \"kfac_capture_s\": %.3f, \"kfac_invert_s\": %.3f, \"kfac_precondition_s\": %.3f, "
                "\"kfac_kl_scale_mean\": %.4g, \"kfac_kl_clipped_fraction\": %.3f",
                m->seconds_capture, m->seconds_invert, m->seconds_precondition, m->kl_scale_mean,
                m->kl_clipped_fraction);
    if (scaled)
        fprintf(f, ", \"loss_scale\": %.6g, \"skipped_steps\": %ld", m->loss_scale,
                m->skipped_steps);
    if (m->graph_passes >= 0) fprintf(f, ", \"graph_passes\": %ld", m->graph_passes);
    if (ranks > 1) {
        fprintf(f, ", \"ranks\": %d, \"kfac_comm_s\": %.3f, \"bytes_per_step\": {", ranks,
                m->seconds_comm);
        for (int s = 0; s < KFAC_STAGE_COUNT; s++)
            fprintf(f, "%s\"%s\": {\"intra\": %.0f, \"inter\": %.0f}", s ? ", " : "",
                    kfac_comm_stage_name(s), m->bytes_per_step[s][KFAC_LINK_INTRA],
                    m->bytes_per_step[s][KFAC_LINK_INTER]);
        fputs("}", f);
    }
    fputs("}\n", f);
    fflush(f);
}

/* Checks that the batch splits evenly over ranks and micro-batches. */
static kfac_status plan_slices(trainer *t)
{
    const kfac_job *job = t->job;
    int per = t->size * job->train.micro_batches;
    if (job->train.batch_size % per != 0)
        return KFAC_ERR(KFAC_EINVAL,
                        "train.batch_size %d does not split into %d ranks x %d micro-batches",
                        job->train.batch_size, t->size, job->train.micro_batches);
    t->micro_batches = job->train.micro_batches;
    t->micro_size = job->train.batch_size / per;
    return KFAC_OK;
}

/* What the CUDA backend can train so far: the model's operations, the
 * micro-batch sums and K-FAC's stages run on the device, but several
 * ranks would need device-aware gradient and BN-statistic reductions. */
static kfac_status check_device(const trainer *t)
{
    const kfac_job *job = t->job;
    if (strcmp(job->train.device, "cuda") != 0) {
        if (strcmp(job->train.precision, "f32") != 0)
            return KFAC_ERR(KFAC_ENOTSUP, "train.precision %s needs train.device cuda (the cpu "
                            "device computes in f32 only)", job->train.precision);
        return KFAC_OK;
    }
    if (t->size > 1)
        return KFAC_ERR(KFAC_ENOTSUP, "train.device cuda: one rank only so far (%d ranks)",
                        t->size);
    return KFAC_OK;
}

/* Every rank starts from rank 0's parameters and statistics (they are
 * built from the same seed; this makes it a guarantee). */
static kfac_status broadcast_model(trainer *t)
{
    if (t->size == 1) return KFAC_OK;
    KFAC_TRY(kfac_comm_bcast(t->world, kfac_model_params(t->model),
                             kfac_model_param_count(t->model), KFAC_F32, 0, KFAC_STAGE_OTHER));
    return kfac_comm_bcast(t->world, kfac_model_buffers(t->model),
                           kfac_model_buffer_count(t->model), KFAC_F32, 0, KFAC_STAGE_OTHER);
}

static kfac_status run(trainer *t, const kfac_train_callbacks *cb, kfac_epoch_metrics *final)
{
    const kfac_job *job = t->job;
    char path[2 * KFAC_JOB_STR + 2];
    double start = kfac__now_seconds();
    int lead = t->rank == 0;
    const kfac_train_callbacks *all_ranks_cb = cb;
    if (!lead) cb = NULL;
    /* Inputs first: a job that cannot run leaves no output behind. */
    KFAC_TRY(plan_slices(t));
    KFAC_TRY(check_device(t));
    KFAC_TRY(kfac_backend_get(job->train.device, job->train.threads, &t->be));
    KFAC_TRY(kfac_backend_set_precision_name(t->be, job->train.precision));
    if (t->be->act_dtype == KFAC_F16) {
        kfac_loss_scale_init(&t->loss_scale, job->train.loss_scale,
                             job->train.loss_scale_growth);
        t->scaled = 1;
    }
    KFAC_TRY(schedule_from_job(job, &t->schedule));
    KFAC_TRY(open_data(t));
    KFAC_TRY(build_model(t));
    KFAC_TRY(kfac__feed_init(&t->feed, t->model, t->train_loader, t->micro_size));
    if (job->train.cuda_graphs && t->be->capture_begin && t->size == 1)
        KFAC_TRY(kfac_pass_graphs_init(&t->graphs, t->model));
    KFAC_TRY(broadcast_model(t));
    if (lead) {
        KFAC_TRY(kfac__make_dirs(job->output.dir));
        snprintf(path, sizeof path, "%s/job.yaml", job->output.dir);
        KFAC_TRY(kfac_job_write_yaml(job, path));
        snprintf(path, sizeof path, "%s/%s", job->output.dir, job->output.metrics);
        t->metrics = fopen(path, "w");
        if (!t->metrics) return KFAC_ERR(KFAC_EIO, "%s: cannot create: %s", path, strerror(errno));
    }
    if (cb && cb->on_start) {
        char summary[1024];
        snprintf(summary, sizeof summary,
                 "%s: %zu parameters, %.1f M MACs/image, %.0f MiB arena (activations, gradients, "
                 "workspace); %zu train / %zu test images; "
                 "batch %d = %d ranks x %d micro-batches x %d, %zu steps/epoch, %d epochs; "
                 "backend %s (precision %s%s), %d threads/rank; comm %s",
                 job->model.name, kfac_model_param_count(t->model),
                 kfac_model_macs_per_image(t->model) / 1e6,
                 kfac_model_arena_bytes(t->model) / 1048576.0, t->train_set->count,
                 t->test_set->count, job->train.batch_size, t->size, t->micro_batches,
                 t->micro_size, kfac_batcher_batches_per_epoch(t->train_batches),
                 job->train.epochs, t->be->name, job->train.precision,
                 t->graphs ? ", CUDA graphs" : "",
                 t->be->threads, kfac_comm_kind(t->world));
        cb->on_start(summary, cb->user);
    }
    if (cb && cb->on_notice && !strcmp(job->train.device, "cuda") &&
        !strcmp(job->train.precision, "f32"))
        cb->on_notice("train.precision f32 on cuda: convolutions run in plain fp32 (unless "
                      "KFAC_CUDNN_TF32=1), where cuDNN's NHWC kernels are slow; ResNet-50 on an "
                      "H100 trained at 112 images/s in f32, 2,578 in tf32 (PyTorch's default "
                      "for fp32 convolutions) and 4,324 in bf16", cb->user);
    long step = 0;
    kfac_precond_stats kfac_before = {0};
    kfac_epoch_metrics em = {.test_acc_precise_bn = -1, .test_loss_precise_bn = -1};
    for (int epoch = 0; epoch < job->train.epochs; epoch++) {
        if (job->train.max_steps > 0 && step >= job->train.max_steps) break;
        double t0 = kfac__now_seconds();
        kfac_comm_get_bytes(t->world, &t->bytes_before);
        em.step = step;
        KFAC_TRY(train_epoch(t, epoch, &step, &em, cb));
        KFAC_TRY(average_bn_statistics(t));
        KFAC_TRY(evaluate(t, &em.test_loss, &em.test_acc));
        if (t->bn_batches) KFAC_TRY(evaluate_precise_bn(t, epoch, &em));
        if (t->kfac) {
            kfac_precond_stats ks;
            kfac_precond_get_stats(t->kfac, &ks);
            em.seconds_capture = ks.seconds_capture;
            em.seconds_invert = ks.seconds_invert;
            em.seconds_precondition = ks.seconds_precondition;
            em.seconds_comm = ks.seconds_comm;
            long kl_steps = ks.kl_steps - kfac_before.kl_steps;
            em.kl_scale_mean = kl_steps ? (ks.kl_scale_sum - kfac_before.kl_scale_sum) / kl_steps : 1;
            em.kl_clipped_fraction =
                kl_steps ? (double)(ks.kl_clipped - kfac_before.kl_clipped) / kl_steps : 0;
            kfac_before = ks;
        }
        em.epoch = epoch + 1;
        em.step = step;
        em.epoch_seconds = kfac__now_seconds() - t0;
        em.seconds = kfac__now_seconds() - start;
        em.loss_scale = t->loss_scale.scale;
        em.skipped_steps = t->loss_scale.skipped_steps;
        em.graph_passes = t->graphs ? kfac_pass_graphs_replays(t->graphs) : -1;
        if (t->graphs && kfac_pass_graphs_off(t->graphs) && !t->graphs_noticed) {
            t->graphs_noticed = 1;
            char notice[700];
            snprintf(notice, sizeof notice, "CUDA graphs off, steps run operation by operation: %s",
                     kfac_pass_graphs_off(t->graphs));
            if (cb && cb->on_notice) cb->on_notice(notice, cb->user);
        }
        if (t->metrics) write_metrics(t->metrics, &em, t->kfac != NULL, t->size, t->scaled);
        if (cb && cb->on_epoch) cb->on_epoch(&em, cb->user);
    }
    if (final) *final = em;
    if (all_ranks_cb && all_ranks_cb->on_finish) {
        size_t count = kfac_model_param_count(t->model);
        float *host = malloc(count * sizeof(float) + 1);
        if (!host) return KFAC_ERR(KFAC_ENOMEM, "trainer: out of memory");
        kfac_status st = t->be->download(t->be, host, kfac_model_params(t->model),
                                         count * sizeof(float));
        if (st == KFAC_OK) all_ranks_cb->on_finish(host, count, all_ranks_cb->user);
        free(host);
        KFAC_TRY(st);
    }
    return KFAC_OK;
}

kfac_status kfac_train_run(const kfac_job *job, kfac_comm *world, const kfac_train_callbacks *cb,
                           kfac_epoch_metrics *final)
{
    trainer t = {.job = job, .world = world};
    kfac_status st = KFAC_OK;
    if (!t.world) {
        st = kfac_comm_self(&t.self_comm);
        t.world = t.self_comm;
    }
    if (st == KFAC_OK) {
        t.rank = kfac_comm_rank(t.world);
        t.size = kfac_comm_size(t.world);
        st = run(&t, cb, final);
    }
    if (t.metrics) fclose(t.metrics);
    free(t.labels);
    if (t.host_images_pinned)
        t.be->host_release(t.be, t.host_images);
    else
        free(t.host_images);
    free(t.bn_saved);
    kfac_gradsync_free(t.sync);
    kfac_pass_graphs_free(t.graphs);
    kfac__feed_free(t.feed);
    kfac_precond_free(t.kfac);
    kfac_sgd_free(t.sgd);
    kfac_loader_free(t.train_loader);
    kfac_batcher_free(t.bn_batches);
    kfac_model_free(t.model);
    kfac_batcher_free(t.train_batches);
    kfac_batcher_free(t.test_batches);
    kfac_dataset_free(t.train_set);
    kfac_dataset_free(t.test_set);
    kfac_backend_free(t.be);
    kfac_comm_free(t.self_comm);
    return st;
}
