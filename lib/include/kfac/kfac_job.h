/* kfac_job.h - the job file: schema, defaults, parsing and overrides.
 *
 * A job YAML has these top-level sections (documented key by key in
 * jobs/README.md and by `kfac train --help-keys`):
 *   model, data, optimizer (with the nested optimizer.kfac), schedule,
 *   train, output
 * Later issues add sections (resources, site, checkpoint) without changing
 * these keys.
 *
 * Precedence: --set on the command line > job YAML > built-in default.
 * Errors are one line naming the file and line:column of the offending node
 * (or "--set KEY" for an override), e.g.
 *   jobs/x.yaml:7:3: unknown key 'momentun' in section 'optimizer'
 */
#ifndef KFAC_JOB_H
#define KFAC_JOB_H

#include <stdint.h>

#include "kfac/kfac_status.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KFAC_JOB_STR 256
#define KFAC_JOB_MAX_MILESTONES 16

typedef struct kfac_job {
    struct {
        char name[KFAC_JOB_STR];    /* resnet8-fmnist | resnet20 | resnet32 | resnet18 | resnet34 | resnet50 */
        int zero_init_residual;     /* zero the last BN gamma of each block */
    } model;
    struct {
        char format[KFAC_JOB_STR];  /* idx | hdf5 (shards made by kfac prep) */
        char path[KFAC_JOB_STR];    /* folder of the dataset files */
        int augment;                /* training augmentation on/off */
        char transform[KFAC_JOB_STR]; /* pad_crop | random_resized_crop */
        int pad;                    /* pad-crop padding in pixels */
        float scale_min;            /* random-resized crop: smallest area fraction */
        int crop;                   /* sample size (square); 0: the stored size */
        int val_resize;             /* evaluation: shorter side scaled to this first; 0: none */
        float mean[KFAC_JOB_MAX_MILESTONES]; /* per channel, or one value for all */
        int num_mean;
        float std[KFAC_JOB_MAX_MILESTONES];
        int num_std;
        int loader_threads;         /* threads decoding a batch; 0: train.threads */
        int prefetch;               /* micro-batches prepared ahead on a loader thread; 0: none */
        char stage[KFAC_JOB_STR];   /* none | copy | broadcast: to node-local storage first */
        char local_dir[KFAC_JOB_STR]; /* staging folder; "": $SLURM_TMPDIR, $TMPDIR, /tmp */
    } data;
    struct {
        char name[KFAC_JOB_STR];    /* sgd | kfac (K-FAC preconditioning, then this SGD) */
        float momentum;
        int nesterov;
        float weight_decay;
        int decay_bn_and_bias;      /* apply weight decay to BN params and biases too */
        struct {                    /* optimizer.kfac.*: used when name is kfac */
            char fisher[KFAC_JOB_STR];  /* empirical | sampled */
            char inverse[KFAC_JOB_STR]; /* cholesky | eig */
            int exact_kronecker;        /* eig only: exact damped Kronecker inverse */
            float factor_decay;         /* running average: new = decay*old + (1-decay)*batch */
            int factor_interval;        /* steps between factor refreshes after warm-up */
            int inverse_interval;       /* steps between inversions after warm-up */
            int warmup_steps;           /* factors and inverses every step before this */
            float adaptive_threshold;   /* SP-NGD: >0 doubles a layer's interval while its
                                           factors change less than this between refreshes */
            int max_interval;           /* cap of the adaptive interval */
            float damping;              /* lambda; gamma = sqrt(lambda) with pi-correction */
            float damping_decay;        /* lambda(epoch) = max(min, damping * decay^epoch) */
            float damping_min;
            float kl_clip;              /* 0: off */
            float subsample;            /* fraction of the batch used for factors, (0, 1] */
            char bn[KFAC_JOB_STR];      /* unitwise | diagonal | sgd */
            char exclude[KFAC_JOB_STR]; /* comma-separated patterns of layers kept on SGD */
        } kfac;
    } optimizer;
    struct {
        float lr;                   /* peak learning rate (after warm-up) */
        float warmup_epochs;        /* linear warm-up from warmup_start_lr to lr */
        float warmup_start_lr;
        char decay[KFAC_JOB_STR];   /* cosine | poly | step | constant */
        float final_lr;             /* cosine/poly end value */
        float poly_power;
        float decay_start_epoch;    /* poly: start of decay (default: end of warm-up) */
        float decay_end_epoch;      /* poly/cosine: lr reaches final_lr here (default: train.epochs) */
        float milestones[KFAC_JOB_MAX_MILESTONES]; /* step: epochs where lr *= gamma */
        int num_milestones;
        float gamma;
    } schedule;
    struct {
        int epochs;
        int batch_size;
        int eval_batch_size;
        uint64_t seed;
        int threads;                /* compute threads (0: all cores) */
        char device[KFAC_JOB_STR];  /* cpu | cuda */
        char precision[KFAC_JOB_STR]; /* f32 | tf32 | bf16 | f16: activations, convolutions */
        float loss_scale;           /* f16: initial dynamic loss scale */
        int loss_scale_growth;      /* f16: good steps before the scale doubles */
        float label_smoothing;
        int max_steps;              /* stop after this many steps in total (0: no limit) */
        int precise_bn_images;      /* >0: recompute BN statistics over this many training
                                       images before each evaluation ("precise BN") */
        int micro_batches;          /* per rank: gradients summed over this many */
        int cuda_graphs;            /* cuda: passes replayed from CUDA graphs where they can be */
    } train;
    struct {                        /* used when several ranks run the job */
        float bucket_mb;            /* gradient all-reduce bucket, MiB */
        int overlap;                /* all-reduce buckets during backward */
        char factor_dtype[KFAC_JOB_STR];  /* f32 | f16 | bf16: K-FAC factor traffic */
        char factor_reduce[KFAC_JOB_STR]; /* refresh | inverse */
    } distributed;
    struct {
        char dir[KFAC_JOB_STR];     /* created if missing */
        char metrics[KFAC_JOB_STR]; /* JSON-lines file name inside dir */
    } output;
} kfac_job;

/* Fills `job` with the built-in defaults. */
void kfac_job_defaults(kfac_job *job);

/* Loads `path` over the defaults, then applies `nset` overrides of the form
 * "section.key=value" (values use the file's scalar syntax, unquoted; lists
 * as "[1,2]", "1,2" or "[]"), then validates.  `path` may be NULL (defaults
 * and overrides only).  Unknown keys, wrong types, out-of-range values and
 * bad YAML fail with a file:line:column message.  Missing file: the path and
 * strerror.  On failure `job` is left unchanged. */
kfac_status kfac_job_load(kfac_job *job, const char *path, int nset, const char *const *sets);

/* Checks cross-field constraints (e.g. known model name); called by load. */
kfac_status kfac_job_validate(const kfac_job *job);

/* Writes the resolved job as YAML (for logs and reproducibility). */
kfac_status kfac_job_write_yaml(const kfac_job *job, const char *path);

/* Prints every key with its type, default and description to `out` as text
 * (bin/ uses it for `kfac train --help-keys`). Returns the text length;
 * like snprintf, the full length even when `cap` is too small (`out` may be
 * NULL when cap is 0), so callers can size a buffer first. */
int kfac_job_describe(char *out, int cap);

#ifdef __cplusplus
}
#endif
#endif
