/* test_job.c - job files: defaults, loading, --set overrides, the exact
 * text and file:line:col of every kind of error, the write -> load round
 * trip, and that the shipped jobs/ files and jobs/README.md agree with the schema. */
#include "kfac/kfac_job.h"

#include <glob.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "testutil.h"

#define MAX_TMP 128
static char tmp_paths[MAX_TMP][32];
static int tmp_count;

/* Writes `text` to a fresh file under /tmp; all are removed at exit. */
static const char *tmp_file(const char *text)
{
    if (tmp_count == MAX_TMP) {
        fprintf(stderr, "test_job: raise MAX_TMP\n");
        exit(1);
    }
    char *path = tmp_paths[tmp_count++];
    strcpy(path, "/tmp/test_job_XXXXXX");
    int fd = mkstemp(path);
    FILE *f = fd >= 0 ? fdopen(fd, "w") : NULL;
    if (!f || fputs(text, f) < 0 || fclose(f) != 0) {
        perror("test_job: temporary file");
        exit(1);
    }
    return path;
}

static void remove_tmp_files(void)
{
    for (int i = 0; i < tmp_count; i++) unlink(tmp_paths[i]);
}

/* The whole of a text file, or NULL; free() it. */
static char *read_text(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    char *text = NULL;
    size_t len = 0;
    FILE *mem = open_memstream(&text, &len);
    for (int c; (c = fgetc(f)) != EOF;) fputc(c, mem);
    fclose(mem);
    fclose(f);
    return text;
}

/* A job as the YAML kfac_job_write_yaml makes: compares every field. */
static char *job_text(const kfac_job *job)
{
    const char *path = tmp_file("");
    CHECK_OK(kfac_job_write_yaml(job, path));
    return read_text(path);
}

static int same_job(const kfac_job *a, const kfac_job *b)
{
    char *ta = job_text(a), *tb = job_text(b);
    int same = ta && tb && strcmp(ta, tb) == 0;
    free(ta);
    free(tb);
    return same;
}

static kfac_status load_text(kfac_job *job, const char *yaml, int nset, const char *const *sets)
{
    return kfac_job_load(job, yaml ? tmp_file(yaml) : NULL, nset, sets);
}

/* Loads `yaml` (NULL: no file) plus `sets` and checks it fails with
 * `status` and a message starting with `want`; a `want` that starts with
 * ':' must come right after the file's path (":7:3: unknown key ..."). */
static void expect_error_(int line, const char *yaml, int nset, const char *const *sets, kfac_status status,
                          const char *want)
{
    const char *path = yaml ? tmp_file(yaml) : NULL;
    kfac_job job;
    kfac_status st = kfac_job_load(&job, path, nset, sets);
    const char *msg = kfac_last_error();
    size_t skip = want[0] == ':' && path ? strlen(path) : 0;
    int ok = st == status && (!skip || strncmp(msg, path, skip) == 0) &&
             strncmp(msg + skip, want, strlen(want)) == 0;
    CHECK(ok, "line %d: got %s '%s', wanted %s '%s'", line, kfac_status_str(st), msg,
          kfac_status_str(status), want);
}
#define EXPECT_ERROR(yaml, status, want) expect_error_(__LINE__, yaml, 0, NULL, status, want)
#define EXPECT_SET_ERROR(yaml, set, want) \
    expect_error_(__LINE__, yaml, 1, (const char *const[]){set}, KFAC_EINVAL, want)

static void test_defaults(void)
{
    kfac_job job, loaded;
    kfac_job_defaults(&job);
    CHECK(!strcmp(job.model.name, "resnet8-fmnist") && !job.model.zero_init_residual, "model");
    CHECK(!strcmp(job.data.format, "idx") && !strcmp(job.data.path, "/usr/share/datasets/fashion-mnist"),
          "data files");
    CHECK(job.data.augment == 1 && job.data.pad == 2 && job.data.num_mean == 1 && job.data.mean[0] == 0.2860f && job.data.num_std == 1 && job.data.std[0] == 0.3530f,
          "data");
    CHECK(!strcmp(job.optimizer.name, "sgd") && job.optimizer.momentum == 0.9f && job.optimizer.nesterov == 1 &&
              job.optimizer.weight_decay == 5e-4f && !job.optimizer.decay_bn_and_bias,
          "optimizer");
    CHECK(job.schedule.lr == 0.1f && job.schedule.warmup_epochs == 1 && job.schedule.warmup_start_lr == 0 &&
              !strcmp(job.schedule.decay, "cosine") && job.schedule.final_lr == 0 &&
              job.schedule.poly_power == 2,
          "schedule");
    CHECK(job.schedule.decay_start_epoch == -1 && job.schedule.decay_end_epoch == -1 &&
              job.schedule.num_milestones == 0 && job.schedule.gamma == 0.1f,
          "schedule decay window");
    CHECK(job.train.epochs == 15 && job.train.batch_size == 128 && job.train.eval_batch_size == 1000 &&
              job.train.seed == 1 && job.train.threads == 0 && job.train.label_smoothing == 0 &&
              job.train.max_steps == 0 && job.train.precise_bn_images == 0,
          "train");
    CHECK(!strcmp(job.optimizer.kfac.fisher, "empirical") && !strcmp(job.optimizer.kfac.inverse, "eig") &&
              !job.optimizer.kfac.exact_kronecker && job.optimizer.kfac.factor_decay == 0.95f &&
              job.optimizer.kfac.factor_interval == 10 && job.optimizer.kfac.inverse_interval == 10 &&
              job.optimizer.kfac.warmup_steps == 20 && job.optimizer.kfac.adaptive_threshold == 0 &&
              job.optimizer.kfac.max_interval == 100,
          "optimizer.kfac intervals");
    CHECK(job.optimizer.kfac.damping == 1e-3f && job.optimizer.kfac.damping_decay == 1 &&
              job.optimizer.kfac.damping_min == 0 && job.optimizer.kfac.kl_clip == 1e-3f &&
              job.optimizer.kfac.subsample == 1 && !strcmp(job.optimizer.kfac.bn, "unitwise") &&
              !strcmp(job.optimizer.kfac.exclude, ""),
          "optimizer.kfac damping");
    CHECK(!strcmp(job.output.dir, "runs/job") && !strcmp(job.output.metrics, "metrics.jsonl"), "output");
    CHECK_OK(kfac_job_validate(&job));

    CHECK_OK(kfac_job_load(&loaded, NULL, 0, NULL));
    CHECK(same_job(&job, &loaded), "no file, no --set: the defaults");
    const char *empties[] = {"", "# only a comment\n", "---\n", "model:\noptimizer: ~\n",
                             "optimizer:\n  kfac:\n", "optimizer: {kfac: {}}\n"};
    for (size_t i = 0; i < sizeof empties / sizeof empties[0]; i++) {
        CHECK_OK(load_text(&loaded, empties[i], 0, NULL));
        CHECK(same_job(&job, &loaded), "'%s' gives the defaults", empties[i]);
    }
}

static void test_valid_file(void)
{
    kfac_job job;
    CHECK_OK(load_text(&job,
                       "# a full job\n"
                       "model: {name: resnet20, zero_init_residual: yes}\n"
                       "data:\n"
                       "  path: '/data/fmnist'\n"
                       "  augment: off\n"
                       "  pad: 4\n"
                       "  mean: [0.485, 0.456, 0.406]\n"
                       "  std: 0.25\n"
                       "optimizer:\n"
                       "  momentum: 0.95\n"
                       "  nesterov: False\n"
                       "  weight_decay: 1e-4\n"
                       "schedule:\n"
                       "  lr: 0.4\n"
                       "  decay: step\n"
                       "  milestones:\n"
                       "    - 30\n"
                       "    - 60.5\n"
                       "  gamma: 0.2\n"
                       "train:\n"
                       "  epochs: 90\n"
                       "  seed: 18446744073709551615\n"
                       "  label_smoothing: 0.1\n"
                       "output:\n"
                       "  dir: \"runs/a b: #c\"\n",
                       0, NULL));
    CHECK(!strcmp(job.model.name, "resnet20") && job.model.zero_init_residual == 1, "model");
    CHECK(!strcmp(job.data.path, "/data/fmnist") && job.data.augment == 0 && job.data.pad == 4, "data");
    CHECK(job.data.num_mean == 3 && job.data.mean[2] == 0.406f && job.data.num_std == 1 &&
              job.data.std[0] == 0.25f,
          "per-channel mean, one std (a number is a list of one)");
    CHECK(job.optimizer.momentum == 0.95f && job.optimizer.nesterov == 0 && job.optimizer.weight_decay == 1e-4f,
          "optimizer");
    CHECK(job.schedule.lr == 0.4f && !strcmp(job.schedule.decay, "step") && job.schedule.gamma == 0.2f, "lr");
    CHECK(job.schedule.num_milestones == 2 && job.schedule.milestones[0] == 30 &&
              job.schedule.milestones[1] == 60.5f,
          "milestones %d", job.schedule.num_milestones);
    CHECK(job.train.epochs == 90 && job.train.seed == UINT64_MAX && job.train.label_smoothing == 0.1f, "train");
    CHECK(!strcmp(job.output.dir, "runs/a b: #c"), "quoted string '%s'", job.output.dir);
    CHECK(job.train.batch_size == 128 && !strcmp(job.output.metrics, "metrics.jsonl"), "untouched keys");

    const char *words[][2] = {{"true", "1"}, {"no", "0"}, {"ON", "1"}, {"0", "0"}, {"Yes", "1"}};
    for (size_t i = 0; i < sizeof words / sizeof words[0]; i++) {
        char yaml[64];
        snprintf(yaml, sizeof yaml, "data:\n  augment: %s\n", words[i][0]);
        CHECK_OK(load_text(&job, yaml, 0, NULL));
        CHECK(job.data.augment == atoi(words[i][1]), "augment: %s", words[i][0]);
    }
}

static void test_overrides(void)
{
    kfac_job job;
    const char *yaml = "optimizer:\n  momentum: 0.5\nschedule:\n  milestones: [10, 20, 30]\n";
    const char *sets[] = {"optimizer.momentum=0.8", " train.epochs = 20 ", "schedule.milestones=[30,60]",
                          "output.dir=runs/x=y"};
    CHECK_OK(load_text(&job, yaml, 4, sets));
    CHECK(job.optimizer.momentum == 0.8f, "--set beats the file: %g", job.optimizer.momentum);
    CHECK(job.train.epochs == 20, "spaces around --set parts");
    CHECK(job.schedule.num_milestones == 2 && job.schedule.milestones[0] == 30 &&
              job.schedule.milestones[1] == 60 && job.schedule.milestones[2] == 0,
          "--set list replaces the file's");
    CHECK(!strcmp(job.output.dir, "runs/x=y"), "only the first '=' splits: '%s'", job.output.dir);

    CHECK_OK(kfac_job_load(&job, NULL, 1, (const char *const[]){"schedule.milestones= 5, 7.5 ,9"}));
    CHECK(job.schedule.num_milestones == 3 && job.schedule.milestones[1] == 7.5f, "bare comma list");
    CHECK_OK(load_text(&job, yaml, 1, (const char *const[]){"schedule.milestones=[]"}));
    CHECK(job.schedule.num_milestones == 0, "[] empties the list");
    CHECK_OK(load_text(&job, "schedule:\n  milestones: []\n", 0, NULL));
    CHECK(job.schedule.num_milestones == 0, "empty list in a file");

    /* validation runs after the overrides, so they can repair a file */
    CHECK_OK(load_text(&job, "optimizer:\n  momentum: 1.5\n", 1, (const char *const[]){"optimizer.momentum=0"}));
    CHECK(job.optimizer.momentum == 0, "repaired momentum");
}

static void test_file_errors(void)
{
    EXPECT_ERROR("model:\n"
                 "  name: resnet20\n"
                 "optimizer:\n"
                 "  momentum: 0.9\n"
                 "  momentun: 0.8\n",
                 KFAC_EINVAL,
                 ":5:3: unknown key 'momentun' in section 'optimizer' "
                 "(known: name, momentum, nesterov, weight_decay, decay_bn_and_bias, kfac)");
    EXPECT_ERROR("# comment\noptimiser:\n  momentum: 0.9\n", KFAC_EINVAL,
                 ":2:1: unknown section 'optimiser' (known: model, data, optimizer, schedule, train, distributed, output)");
    EXPECT_ERROR("optimizer:\n  momentum: 0.9\n  nesterov: a: b\n", KFAC_EFORMAT,
                 ":3:14: bad YAML: mapping values are not allowed in this context");
    EXPECT_ERROR("train:\n  epochs: [1, 2\n", KFAC_EFORMAT, ":3:1: bad YAML: ");
    EXPECT_ERROR("train:\n  epochs: 3\n  epochs: 4\n", KFAC_EFORMAT, ":3:3: duplicate key 'epochs' (first at line 2)");
    EXPECT_ERROR("train: {}\nmodel: {}\ntrain: {}\n", KFAC_EFORMAT, ":3:1: duplicate key 'train' (first at line 1)");
    EXPECT_ERROR("train:\n  epochs: &n 3\n  batch_size: *n\n", KFAC_EFORMAT, ":3:15: YAML aliases are not supported");
    EXPECT_ERROR("train: {}\n---\nmodel: {}\n", KFAC_EFORMAT, ":2:1: a second YAML document");

    EXPECT_ERROR("optimizer:\n  momentum: fast\n", KFAC_EINVAL, ":2:13: optimizer.momentum: expected a number, got 'fast'");
    EXPECT_ERROR("optimizer:\n  momentum:\n", KFAC_EINVAL, ":2:12: optimizer.momentum: expected a number, got ''");
    EXPECT_ERROR("train:\n  epochs:\n    a: 1\n", KFAC_EINVAL, ":3:5: train.epochs: expected an integer, got a mapping");
    EXPECT_ERROR("train:\n  epochs: 12abc\n", KFAC_EINVAL, ":2:11: train.epochs: expected an integer, got '12abc'");
    EXPECT_ERROR("train:\n  epochs: 1.5\n", KFAC_EINVAL, ":2:11: train.epochs: expected an integer, got '1.5'");
    EXPECT_ERROR("train:\n  epochs: 99999999999\n", KFAC_EINVAL, ":2:11: train.epochs: expected an integer");
    EXPECT_ERROR("train:\n  seed: -1\n", KFAC_EINVAL, ":2:9: train.seed: expected a non-negative integer, got '-1'");
    EXPECT_ERROR("data:\n  augment: maybe\n", KFAC_EINVAL, ":2:12: data.augment: expected true or false, got 'maybe'");
    EXPECT_ERROR("data:\n  mean: .nan\n", KFAC_EINVAL, ":2:9: data.mean: expected a number, got '.nan'");
    EXPECT_ERROR("data:\n  mean: inf\n", KFAC_EINVAL, ":2:9: data.mean: expected a number, got 'inf'");
    EXPECT_ERROR("model: resnet20\n", KFAC_EINVAL, ":1:8: section 'model' must be a mapping of keys, got a scalar");
    EXPECT_ERROR("- model\n- data\n", KFAC_EINVAL,
                 ":1:1: expected a mapping of sections (model, data, optimizer, schedule, train, distributed, output), got a list");
    EXPECT_ERROR("train:\n  [a]: 1\n", KFAC_EINVAL, ":2:3: expected a key name, got a list");

    EXPECT_ERROR("schedule:\n  milestones: {a: 1}\n", KFAC_EINVAL,
                 ":2:15: schedule.milestones: expected a number or a list of numbers like [30, 60], got a mapping");
    EXPECT_ERROR("data:\n  mean: []\n", KFAC_EINVAL, ":2:9: data.mean: needs one value, or one per channel");
    EXPECT_ERROR("data:\n  std: [0.2, 0]\n", KFAC_EINVAL, ":2:8: data.std: must be > 0, got 0");
    EXPECT_ERROR("schedule:\n  milestones: [30, x]\n", KFAC_EINVAL, ":2:20: schedule.milestones: expected a number, got 'x'");
    EXPECT_ERROR("schedule:\n  milestones: [30, [1]]\n", KFAC_EINVAL,
                 ":2:20: schedule.milestones: expected a number, got a list");
    EXPECT_ERROR("schedule:\n  milestones: [1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17]\n", KFAC_EINVAL,
                 ":2:55: schedule.milestones: more than 16 items");
    EXPECT_ERROR("schedule:\n  milestones: [60, 30]\n", KFAC_EINVAL,
                 ":2:15: schedule.milestones: must be increasing, got 30 after 60");
    EXPECT_ERROR("schedule:\n  milestones: [-1]\n", KFAC_EINVAL, ":2:15: schedule.milestones: must be >= 0, got -1");

    char long_name[400] = "output:\n  dir: ";
    memset(long_name + strlen(long_name), 'x', 300);
    EXPECT_ERROR(long_name, KFAC_EINVAL, ":2:8: output.dir: longer than 255 characters");

    EXPECT_ERROR("just text\n", KFAC_EINVAL, ":1:1: expected a mapping of sections");
}

static void test_range_errors(void)
{
    EXPECT_ERROR("optimizer:\n  momentum: 1.0\n", KFAC_EINVAL, ":2:13: optimizer.momentum: must be in [0, 1), got 1");
    EXPECT_ERROR("optimizer:\n  momentum: -0.1\n", KFAC_EINVAL, ":2:13: optimizer.momentum: must be in [0, 1), got -0.1");
    EXPECT_ERROR("schedule:\n  lr: 0\n", KFAC_EINVAL, ":2:7: schedule.lr: must be > 0, got 0");
    EXPECT_ERROR("train:\n  epochs: 0\n", KFAC_EINVAL, ":2:11: train.epochs: must be >= 1, got 0");
    EXPECT_ERROR("train:\n  batch_size: 0\n", KFAC_EINVAL, ":2:15: train.batch_size: must be >= 1, got 0");
    EXPECT_ERROR("train:\n  label_smoothing: 1\n", KFAC_EINVAL, ":2:20: train.label_smoothing: must be in [0, 1), got 1");
    EXPECT_ERROR("train:\n  threads: -1\n", KFAC_EINVAL, ":2:12: train.threads: must be >= 0, got -1");
    EXPECT_ERROR("schedule:\n  decay: linear\n", KFAC_EINVAL,
                 ":2:10: schedule.decay: must be one of cosine|poly|step|constant, got 'linear'");
    EXPECT_ERROR("model:\n  name: resnet9\n", KFAC_EINVAL,
                 ":2:9: model.name: must be one of resnet8-fmnist|resnet20|resnet32|resnet18|resnet34|resnet50, "
                 "got 'resnet9'");
    EXPECT_ERROR("data:\n  format: jpeg\n", KFAC_EINVAL, ":2:11: data.format: must be one of idx|hdf5, got 'jpeg'");
    EXPECT_ERROR("optimizer:\n  name: adam\n", KFAC_EINVAL, ":2:9: optimizer.name: must be one of sgd|kfac, got 'adam'");
    EXPECT_ERROR("output:\n  dir: ''\n", KFAC_EINVAL, ":2:8: output.dir: must not be empty");
    EXPECT_ERROR("schedule:\n  decay_start_epoch: 10\n  decay_end_epoch: 5\n", KFAC_EINVAL,
                 ":3:20: schedule.decay_end_epoch: must be after decay_start_epoch (10), got 5");
    /* the valid extremes pass */
    kfac_job job;
    CHECK_OK(load_text(&job, "optimizer: {momentum: 0}\ntrain: {epochs: 1, batch_size: 1, label_smoothing: 0.99}\n",
                       0, NULL));
}

static void test_set_errors(void)
{
    EXPECT_SET_ERROR(NULL, "optimizer.momentun=0.5",
                     "--set optimizer.momentun: unknown key 'momentun' in section 'optimizer' (known: name, momentum,");
    EXPECT_SET_ERROR(NULL, "optimiser.momentum=0.5", "--set optimiser.momentum: unknown section 'optimiser' (known: model,");
    EXPECT_SET_ERROR(NULL, "optimizer.momentum", "--set 'optimizer.momentum': expected section.key=value");
    EXPECT_SET_ERROR(NULL, "momentum=0.5", "--set 'momentum=0.5': expected section.key=value");
    EXPECT_SET_ERROR(NULL, "optimizer.momentum=fast", "--set optimizer.momentum: expected a number, got 'fast'");
    EXPECT_SET_ERROR(NULL, "optimizer.momentum=2", "--set optimizer.momentum: must be in [0, 1), got 2");
    EXPECT_SET_ERROR(NULL, "schedule.milestones=[30,x]", "--set schedule.milestones: expected a number, got 'x'");
    EXPECT_SET_ERROR(NULL, "schedule.milestones=30,,60", "--set schedule.milestones: expected a number, got ''");
    EXPECT_SET_ERROR(NULL, "train.seed=-3", "--set train.seed: expected a non-negative integer, got '-3'");
    /* a good file value broken by --set is reported at the --set */
    EXPECT_SET_ERROR("train:\n  epochs: 3\n", "train.epochs=0", "--set train.epochs: must be >= 1, got 0");
    /* file errors come before --set ones */
    EXPECT_ERROR("train:\n  epochs: x\n", KFAC_EINVAL, ":2:11: train.epochs: expected an integer, got 'x'");
}

/* Nested sections: optimizer.kfac.* in files, --set, errors and describe. */
static void test_nested(void)
{
    kfac_job job;
    CHECK_OK(load_text(&job,
                       "optimizer:\n"
                       "  name: kfac\n"
                       "  kfac:\n"
                       "    fisher: sampled\n"
                       "    inverse: cholesky\n"
                       "    damping: 0.03\n"
                       "    exclude: 'fc,layer1.*'\n"
                       "  momentum: 0.8\n" /* a parent key after the nested mapping */
                       "train:\n"
                       "  precise_bn_images: 4096\n",
                       0, NULL));
    CHECK(!strcmp(job.optimizer.name, "kfac") && job.optimizer.momentum == 0.8f, "optimizer keys beside kfac");
    CHECK(!strcmp(job.optimizer.kfac.fisher, "sampled") && !strcmp(job.optimizer.kfac.inverse, "cholesky") &&
              job.optimizer.kfac.damping == 0.03f && !strcmp(job.optimizer.kfac.exclude, "fc,layer1.*"),
          "nested keys");
    CHECK(job.optimizer.kfac.factor_interval == 10 && !strcmp(job.optimizer.kfac.bn, "unitwise"), "untouched nested keys");
    CHECK(job.train.precise_bn_images == 4096, "precise_bn_images");
    CHECK_OK(load_text(&job, "optimizer: {kfac: {bn: diagonal, exact_kronecker: yes, subsample: 0.25}}\n", 0, NULL));
    CHECK(!strcmp(job.optimizer.kfac.bn, "diagonal") && job.optimizer.kfac.exact_kronecker == 1 &&
              job.optimizer.kfac.subsample == 0.25f,
          "flow style");
    CHECK_OK(load_text(&job, "optimizer:\n  kfac:\n    exclude:\n", 0, NULL));
    CHECK(!strcmp(job.optimizer.kfac.exclude, ""), "exclude may be empty");

    const char *sets[] = {"optimizer.kfac.damping=1e-2", "optimizer.kfac.max_interval = 50",
                          "optimizer.kfac.exclude="};
    CHECK_OK(load_text(&job, "optimizer:\n  kfac:\n    damping: 0.5\n    exclude: fc\n", 3, sets));
    CHECK(job.optimizer.kfac.damping == 1e-2f && job.optimizer.kfac.max_interval == 50 &&
              !job.optimizer.kfac.exclude[0],
          "--set of nested keys beats the file");

    EXPECT_ERROR("optimizer:\n  momentum: 0.9\n  kfac:\n    damping: 0.1\n    dampin: 1\n", KFAC_EINVAL,
                 ":5:5: unknown key 'dampin' in section 'optimizer.kfac' (known: fisher, inverse, exact_kronecker, "
                 "factor_decay, factor_interval, inverse_interval, warmup_steps, adaptive_threshold, max_interval, "
                 "damping, damping_decay, damping_min, kl_clip, subsample, bn, exclude)");
    EXPECT_ERROR("optimizer:\n  kfac:\n    damping: big\n", KFAC_EINVAL,
                 ":3:14: optimizer.kfac.damping: expected a number, got 'big'");
    EXPECT_ERROR("optimizer:\n  kfac:\n    factor_interval: [1]\n", KFAC_EINVAL,
                 ":3:22: optimizer.kfac.factor_interval: expected an integer, got a list");
    EXPECT_ERROR("optimizer:\n  kfac:\n    damping: 0\n", KFAC_EINVAL, ":3:14: optimizer.kfac.damping: must be > 0, got 0");
    EXPECT_ERROR("optimizer:\n  kfac:\n    subsample: 1.5\n", KFAC_EINVAL,
                 ":3:16: optimizer.kfac.subsample: must be in (0, 1], got 1.5");
    EXPECT_ERROR("optimizer:\n  kfac:\n    factor_decay: 1\n", KFAC_EINVAL,
                 ":3:19: optimizer.kfac.factor_decay: must be in [0, 1), got 1");
    EXPECT_ERROR("optimizer:\n  kfac:\n    fisher: true\n", KFAC_EINVAL,
                 ":3:13: optimizer.kfac.fisher: must be one of empirical|sampled, got 'true'");
    EXPECT_ERROR("optimizer:\n  kfac:\n    bn: ''\n", KFAC_EINVAL, ":3:9: optimizer.kfac.bn: must not be empty");
    EXPECT_ERROR("train:\n  precise_bn_images: -1\n", KFAC_EINVAL, ":2:22: train.precise_bn_images: must be >= 0, got -1");
    EXPECT_ERROR("optimizer: {kfac: 3}\n", KFAC_EINVAL, ":1:19: section 'optimizer.kfac' must be a mapping of keys, got a scalar");
    EXPECT_ERROR("optimizer:\n  kfac:\n    - damping\n", KFAC_EINVAL,
                 ":3:5: section 'optimizer.kfac' must be a mapping of keys, got a list");
    EXPECT_ERROR("optimizer:\n  kfac:\n    damping:\n      x: 1\n", KFAC_EINVAL,
                 ":4:7: optimizer.kfac.damping: expected a number, got a mapping");
    EXPECT_ERROR("kfac:\n  damping: 1\n", KFAC_EINVAL, ":1:1: unknown section 'kfac' (known: model, data,");
    EXPECT_ERROR("optimizer:\n  kfac.damping: 1\n", KFAC_EINVAL, ":2:3: unknown key 'kfac.damping' in section 'optimizer'");
    EXPECT_ERROR("optimizer:\n  kfac: {}\n  kfac: {}\n", KFAC_EFORMAT, ":3:3: duplicate key 'kfac' (first at line 2)");

    EXPECT_SET_ERROR(NULL, "optimizer.kfac.dampin=1",
                     "--set optimizer.kfac.dampin: unknown key 'dampin' in section 'optimizer.kfac' (known: fisher, "
                     "inverse,");
    EXPECT_SET_ERROR(NULL, "optimizer.kfc.damping=1",
                     "--set optimizer.kfc.damping: unknown key 'kfc' in section 'optimizer' (known: name, momentum, "
                     "nesterov, weight_decay, decay_bn_and_bias, kfac)");
    EXPECT_SET_ERROR(NULL, "optimizer.kfac=1",
                     "--set optimizer.kfac: 'optimizer.kfac' is a section, not a key (its keys: fisher, inverse,");
    EXPECT_SET_ERROR(NULL, "optimizer=1", "--set 'optimizer=1': expected section.key=value");
    EXPECT_SET_ERROR(NULL, "optimizer.momentum.x=1", "--set optimizer.momentum.x: 'optimizer.momentum' is a key, not a section");
    EXPECT_SET_ERROR(NULL, "optimizer.kfac.damping=-1", "--set optimizer.kfac.damping: must be > 0, got -1");
    EXPECT_SET_ERROR(NULL, "optimizer.kfac.warmup_steps=x", "--set optimizer.kfac.warmup_steps: expected an integer, got 'x'");
    EXPECT_SET_ERROR(NULL, "optimizer.kfac.inverse=", "--set optimizer.kfac.inverse: must not be empty");
}

static void test_missing_file_and_failure_keeps_job(void)
{
    kfac_job job, before;
    kfac_job_defaults(&job);
    job.train.epochs = 99;
    before = job;
    CHECK(kfac_job_load(&job, "/nonexistent/x.yaml", 0, NULL) == KFAC_EIO, "missing file is KFAC_EIO");
    CHECK(!strcmp(kfac_last_error(), "/nonexistent/x.yaml: cannot open: No such file or directory"), "got '%s'",
          kfac_last_error());
    CHECK(kfac_job_load(&job, tmp_file("train:\n  epochs: 0\n"), 0, NULL) == KFAC_EINVAL, "range error");
    CHECK(same_job(&job, &before), "a failed load leaves the job alone");
    CHECK(kfac_job_write_yaml(&job, "/nonexistent/out.yaml") == KFAC_EIO, "unwritable output");
}

static void test_validate(void)
{
    kfac_job job;
    kfac_job_defaults(&job);
    job.optimizer.momentum = 1.5f;
    CHECK(kfac_job_validate(&job) == KFAC_EINVAL && !strcmp(kfac_last_error(), "optimizer.momentum: must be in [0, 1), got 1.5"),
          "got '%s'", kfac_last_error());
    kfac_job_defaults(&job);
    job.schedule.lr = NAN;
    CHECK(kfac_job_validate(&job) == KFAC_EINVAL && !strcmp(kfac_last_error(), "schedule.lr: must be a finite number, got nan"),
          "got '%s'", kfac_last_error());
    kfac_job_defaults(&job);
    strcpy(job.model.name, "vgg");
    CHECK(kfac_job_validate(&job) == KFAC_EINVAL && strstr(kfac_last_error(), "model.name: must be one of"), "got '%s'",
          kfac_last_error());
    kfac_job_defaults(&job);
    job.schedule.num_milestones = 17;
    CHECK(kfac_job_validate(&job) == KFAC_EINVAL, "milestone count beyond the array");
    kfac_job_defaults(&job);
    job.optimizer.kfac.subsample = 0;
    CHECK(kfac_job_validate(&job) == KFAC_EINVAL &&
              !strcmp(kfac_last_error(), "optimizer.kfac.subsample: must be in (0, 1], got 0"),
          "got '%s'", kfac_last_error());
}

static void test_round_trip(void)
{
    kfac_job job, back;
    const char *sets[] = {"model.name=resnet50", "model.zero_init_residual=true", "data.path=/d/\"q\" \\ x: #y",
                          "data.mean=0.1234567", "data.std=3e-7", "optimizer.momentum=0.999",
                          "schedule.decay=poly", "schedule.decay_start_epoch=2.5", "schedule.decay_end_epoch=7",
                          "schedule.milestones=0.1,2,1e3", "train.seed=12345678901234", "train.max_steps=77",
                          "output.metrics=m.jsonl", "optimizer.name=kfac", "optimizer.kfac.fisher=sampled",
                          "optimizer.kfac.inverse=cholesky", "optimizer.kfac.exact_kronecker=on",
                          "optimizer.kfac.factor_decay=0.9", "optimizer.kfac.factor_interval=3",
                          "optimizer.kfac.inverse_interval=7", "optimizer.kfac.warmup_steps=0",
                          "optimizer.kfac.adaptive_threshold=0.05", "optimizer.kfac.max_interval=64",
                          "optimizer.kfac.damping=0.0123", "optimizer.kfac.damping_decay=0.5",
                          "optimizer.kfac.damping_min=1e-5", "optimizer.kfac.kl_clip=0",
                          "optimizer.kfac.subsample=0.3", "optimizer.kfac.bn=sgd",
                          "optimizer.kfac.exclude=fc, \"layer1.*\": #x", "train.precise_bn_images=1000"};
    int nset = sizeof sets / sizeof sets[0];
    CHECK_OK(kfac_job_load(&job, NULL, nset, sets));
    const char *path = tmp_file("");
    CHECK_OK(kfac_job_write_yaml(&job, path));
    CHECK_OK(kfac_job_load(&back, path, 0, NULL));
    CHECK(same_job(&job, &back), "write -> load gives the same job");
    CHECK(!strcmp(back.data.path, "/d/\"q\" \\ x: #y") && back.data.mean[0] == 0.1234567f && back.data.std[0] == 3e-7f &&
              back.train.seed == 12345678901234u && back.schedule.milestones[2] == 1000,
          "spot checks");
    CHECK(!strcmp(back.optimizer.kfac.exclude, "fc, \"layer1.*\": #x") && back.optimizer.kfac.damping == 0.0123f &&
              back.optimizer.kfac.exact_kronecker == 1 && back.optimizer.kfac.max_interval == 64 &&
              back.train.precise_bn_images == 1000,
          "nested spot checks");
    char *text = read_text(path);
    CHECK(text, "%s is readable", path);
    if (!text) return;
    CHECK(strstr(text, "\noptimizer:\n  name: \"kfac\"\n  momentum: 0.999\n"), "grouped, short floats:\n%s", text);
    CHECK(strstr(text, "  decay_bn_and_bias: false\n  kfac:\n    fisher: \"sampled\"\n"
                               "    inverse: \"cholesky\"\n    exact_kronecker: true\n"),
          "nested mapping, indented:\n%s", text);
    CHECK(strstr(text, "    exclude: \"fc, \\\"layer1.*\\\": #x\"\n\nschedule:\n  lr: 0.1\n"),
          "back to the top level after the nested mapping:\n%s", text);
    free(text);

    /* the defaults round-trip too (empty exclude) */
    kfac_job_defaults(&job);
    CHECK_OK(kfac_job_write_yaml(&job, path));
    CHECK_OK(kfac_job_load(&back, path, 0, NULL));
    CHECK(same_job(&job, &back), "defaults: write -> load gives the same job");
    text = read_text(path);
    CHECK(text && strstr(text, "\n    exclude: \"\"\n"), "empty exclude:\n%s", text ? text : "(unreadable)");
    free(text);
}

static void test_describe(void)
{
    int n = kfac_job_describe(NULL, 0);
    char *text = malloc((size_t)n + 1), small[10];
    CHECK(kfac_job_describe(text, n + 1) == n && (int)strlen(text) == n, "length %d", n);
    CHECK(strstr(text, "optimizer.momentum (float, default 0.9, in [0, 1))\n    momentum coefficient\n"), "%s", text);
    CHECK(strstr(text, "schedule.milestones (float list, default [], >= 0)"), "list key");
    CHECK(strstr(text, "model.name (string, default resnet8-fmnist, one of resnet8-fmnist|"), "choices");
    CHECK(strstr(text, "\noptimizer.kfac.damping (float, default 1e-3, > 0)\n    Tikhonov damping lambda;"), "nested key");
    CHECK(strstr(text, "\n\noptimizer.kfac.fisher (string, default empirical, one of empirical|sampled)\n"),
          "nested section starts after a blank line");
    CHECK(strstr(text, "optimizer.kfac.subsample (float, default 1, in (0, 1])\n"), "half-open range");
    CHECK(strstr(text, "optimizer.kfac.exclude (string, default \"\")\n"), "empty default shown as \"\"");
    CHECK(strstr(text, "train.precise_bn_images (int, default 0, >= 0)\n"), "precise_bn_images");
    CHECK(kfac_job_describe(small, sizeof small) == n && strlen(small) == sizeof small - 1, "truncates like snprintf");

    /* jobs/README.md documents every key (as `section.key`) */
    char *readme = read_text(KFAC_SOURCE_DIR "/jobs/README.md");
    CHECK(readme, "jobs/README.md is readable");
    for (char *line = text; readme && line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL) {
        if (*line == ' ' || *line == '\n') continue;
        char key[80];
        snprintf(key, sizeof key, "`%.*s`", (int)strcspn(line, " "), line);
        CHECK(strstr(readme, key), "jobs/README.md lacks %s", key);
    }
    free(readme);
    free(text);
}

/* Every job shipped in jobs/ loads. */
static void test_shipped_jobs(void)
{
    glob_t g;
    if (glob(KFAC_SOURCE_DIR "/jobs/*.yaml", 0, NULL, &g) != 0) return; /* none yet */
    for (size_t i = 0; i < g.gl_pathc; i++) {
        kfac_job job;
        CHECK_OK(kfac_job_load(&job, g.gl_pathv[i], 0, NULL));
    }
    printf("test_job: %zu job files in jobs/ load\n", g.gl_pathc);
    globfree(&g);
}

int main(void)
{
    atexit(remove_tmp_files);
    test_defaults();
    test_valid_file();
    test_overrides();
    test_file_errors();
    test_range_errors();
    test_set_errors();
    test_nested();
    test_missing_file_and_failure_keeps_job();
    test_validate();
    test_round_trip();
    test_describe();
    test_shipped_jobs();
    return test_summary("test_job");
}
