/* prep_input.c - what `kfac prep` converts: the sorted file list of an
 * image folder tree with its labels, or the images of IDX files
 * (prep_internal.h).  Folder layout and label-file rules are those of
 * kfac_prep.h; anything in the tree that is not an input is recorded as a
 * skipped entry with its reason rather than failing the run. */
#define _GNU_SOURCE /* getline, strdup */
#include "data/prep_internal.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* ---- issue lists ---- */

kfac_status kfac__issues_add(kfac__issues *l, const char *path, const char *reason)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? 2 * l->cap : 16;
        kfac_prep_issue *v = realloc(l->v, cap * sizeof *v);
        if (!v) return KFAC_ERR(KFAC_ENOMEM, "cannot grow the list of skipped inputs");
        l->v = v;
        l->cap = cap;
    }
    char *p = strdup(path), *r = strdup(reason);
    if (!p || !r) {
        free(p);
        free(r);
        return KFAC_ERR(KFAC_ENOMEM, "cannot grow the list of skipped inputs");
    }
    l->v[l->n++] = (kfac_prep_issue){p, r};
    return KFAC_OK;
}

kfac_status kfac__issues_take(kfac__issues *dst, kfac__issues *src)
{
    if (dst->n + src->n > dst->cap) {
        size_t cap = dst->n + src->n;
        kfac_prep_issue *v = realloc(dst->v, cap * sizeof *v);
        if (!v) return KFAC_ERR(KFAC_ENOMEM, "cannot grow the list of skipped inputs");
        dst->v = v;
        dst->cap = cap;
    }
    if (src->n) memcpy(dst->v + dst->n, src->v, src->n * sizeof *src->v);
    dst->n += src->n;
    src->n = 0;
    return KFAC_OK;
}

static int issue_cmp(const void *a, const void *b)
{
    return strcmp(((const kfac_prep_issue *)a)->path, ((const kfac_prep_issue *)b)->path);
}

void kfac__issues_sort(kfac__issues *l)
{
    if (l->n > 1) qsort(l->v, l->n, sizeof *l->v, issue_cmp);
}

void kfac__issues_free(kfac__issues *l)
{
    for (size_t i = 0; i < l->n; i++) {
        free(l->v[i].path);
        free(l->v[i].reason);
    }
    free(l->v);
    memset(l, 0, sizeof *l);
}

/* ---- folders ---- */

typedef struct dir_entry {
    char *name;
    int is_dir;
} dir_entry;

typedef struct dir_list {
    dir_entry *v;
    size_t n, cap;
} dir_list;

static void dir_list_free(dir_list *d)
{
    for (size_t i = 0; i < d->n; i++) free(d->v[i].name);
    free(d->v);
    memset(d, 0, sizeof *d);
}

static char *join(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    char *p = malloc(la + lb + 2);
    if (!p) return NULL;
    memcpy(p, a, la);
    p[la] = '/';
    memcpy(p + la + 1, b, lb + 1);
    return p;
}

static int entry_cmp(const void *a, const void *b)
{
    return strcmp(((const dir_entry *)a)->name, ((const dir_entry *)b)->name);
}

/* The files and folders of `path`, sorted by name; names starting with '.'
 * and anything that is neither (sockets, dangling links) are left out.
 * readdir's d_type saves a stat per file on file systems that give it. */
static kfac_status list_dir(const char *path, dir_list *out)
{
    memset(out, 0, sizeof *out);
    DIR *d = opendir(path);
    if (!d) return KFAC_ERR(KFAC_EIO, "%s: cannot open folder: %s", path, strerror(errno));
    kfac_status st = KFAC_OK;
    struct dirent *e;
    while (st == KFAC_OK && (errno = 0, e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        int is_dir = -1;
        if (e->d_type == DT_DIR) {
            is_dir = 1;
        } else if (e->d_type == DT_REG) {
            is_dir = 0;
        } else {
            char *full = join(path, e->d_name);
            struct stat sb;
            if (!full) {
                st = KFAC_ERR(KFAC_ENOMEM, "%s: out of memory listing the folder", path);
                break;
            }
            if (stat(full, &sb) == 0) is_dir = S_ISDIR(sb.st_mode) ? 1 : S_ISREG(sb.st_mode) ? 0 : -1;
            free(full);
        }
        if (is_dir < 0) continue;
        if (out->n == out->cap) {
            size_t cap = out->cap ? 2 * out->cap : 64;
            dir_entry *v = realloc(out->v, cap * sizeof *v);
            if (!v) {
                st = KFAC_ERR(KFAC_ENOMEM, "%s: out of memory listing the folder", path);
                break;
            }
            out->v = v;
            out->cap = cap;
        }
        char *name = strdup(e->d_name);
        if (!name) {
            st = KFAC_ERR(KFAC_ENOMEM, "%s: out of memory listing the folder", path);
            break;
        }
        out->v[out->n++] = (dir_entry){name, is_dir};
    }
    if (st == KFAC_OK && errno)
        st = KFAC_ERR(KFAC_EIO, "%s: cannot read folder: %s", path, strerror(errno));
    closedir(d);
    if (st != KFAC_OK) {
        dir_list_free(out);
        return st;
    }
    if (out->n > 1) qsort(out->v, out->n, sizeof *out->v, entry_cmp);
    return KFAC_OK;
}

static int is_folder(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISDIR(sb.st_mode);
}

static int exists(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0;
}

/* ---- building a split ---- */

static kfac_status add_item(kfac__prep_split *s, size_t *cap, const char *sub, const char *name,
                            int32_t label)
{
    if (s->count == *cap) {
        size_t n = *cap ? 2 * *cap : 1024;
        kfac__prep_item *v = realloc(s->items, n * sizeof *v);
        if (!v) return KFAC_ERR(KFAC_ENOMEM, "%s: out of memory listing the inputs", s->dir);
        s->items = v;
        *cap = n;
    }
    char *path = sub ? join(sub, name) : strdup(name);
    if (!path) return KFAC_ERR(KFAC_ENOMEM, "%s: out of memory listing the inputs", s->dir);
    s->items[s->count++] = (kfac__prep_item){path, label};
    return KFAC_OK;
}

/* Issue path "<split>/<a>[/<b>]<suffix>". */
static kfac_status note(kfac__prep_input *in, const char *split, const char *a, const char *b,
                        const char *suffix, const char *reason)
{
    char path[4096];
    int len = snprintf(path, sizeof path, "%s/%s%s%s%s", split, a, b ? "/" : "", b ? b : "", suffix);
    if (len < 0 || (size_t)len >= sizeof path)
        return KFAC_ERR(KFAC_EINVAL, "%s/%s: path too long", split, a);
    return kfac__issues_add(&in->skipped, path, reason);
}

/* The files of class folder `cls` (label `label`) into s. */
static kfac_status add_class(kfac__prep_input *in, kfac__prep_split *s, size_t *cap,
                             const char *cls, int32_t label)
{
    char *dir = join(s->dir, cls);
    if (!dir) return KFAC_ERR(KFAC_ENOMEM, "out of memory listing %s", s->dir);
    dir_list d;
    kfac_status st = list_dir(dir, &d);
    free(dir);
    size_t files = 0;
    for (size_t i = 0; st == KFAC_OK && i < d.n; i++) {
        if (d.v[i].is_dir) {
            st = note(in, s->name, cls, d.v[i].name, "/", "folder inside a class folder (not read)");
        } else {
            st = add_item(s, cap, cls, d.v[i].name, label);
            files++;
        }
    }
    if (st == KFAC_OK && files == 0) st = note(in, s->name, cls, NULL, "/", "empty class folder");
    dir_list_free(&d);
    return st;
}

static int item_cmp(const void *a, const void *b)
{
    return strcmp(((const kfac__prep_item *)a)->path, ((const kfac__prep_item *)b)->path);
}

static int class_index(const kfac__prep_input *in, const char *name)
{
    int lo = 0, hi = in->num_classes - 1; /* classes are sorted */
    while (lo <= hi) {
        int mid = (lo + hi) / 2, c = strcmp(in->classes[mid], name);
        if (c == 0) return mid;
        if (c < 0) lo = mid + 1;
        else hi = mid - 1;
    }
    return -1;
}

static kfac_status new_split(kfac__prep_input *in, const char *root, const char *name,
                             kfac__prep_split **out)
{
    kfac__prep_split *s = &in->splits[in->num_splits++];
    snprintf(s->name, sizeof s->name, "%s", name);
    s->dir = join(root, name);
    if (!s->dir) return KFAC_ERR(KFAC_ENOMEM, "%s: out of memory", root);
    *out = s;
    return KFAC_OK;
}

/* Classes from the folders of root/train, then their files. */
static kfac_status open_train(kfac__prep_input *in, const char *root)
{
    kfac__prep_split *s = NULL;
    KFAC_TRY(new_split(in, root, "train", &s));
    dir_list d;
    KFAC_TRY(list_dir(s->dir, &d));
    kfac_status st = KFAC_OK;
    size_t folders = 0, cap = 0;
    for (size_t i = 0; i < d.n; i++) folders += d.v[i].is_dir;
    if (folders == 0) st = KFAC_ERR(KFAC_EIO, "%s: no class folders", s->dir);
    if (st == KFAC_OK && folders > INT32_MAX)
        st = KFAC_ERR(KFAC_EINVAL, "%s: %zu class folders is too many", s->dir, folders);
    if (st == KFAC_OK && !(in->classes = calloc(folders, sizeof *in->classes)))
        st = KFAC_ERR(KFAC_ENOMEM, "%s: out of memory for %zu classes", s->dir, folders);
    for (size_t i = 0; st == KFAC_OK && i < d.n; i++) {
        const char *name = d.v[i].name;
        if (!d.v[i].is_dir) {
            st = note(in, "train", name, NULL, "", "not in a class folder");
        } else if (strlen(name) >= KFAC_CLASS_NAME_MAX) {
            st = KFAC_ERR(KFAC_EINVAL, "%s/%s: class name longer than %d bytes", s->dir, name,
                          KFAC_CLASS_NAME_MAX - 1);
        } else {
            memcpy(in->classes[in->num_classes], name, strlen(name) + 1);
            st = add_class(in, s, &cap, name, in->num_classes++);
        }
    }
    dir_list_free(&d);
    return st;
}

/* Trims white space at both ends, in place. */
static char *trim(char *s)
{
    while (isspace((unsigned char)*s)) s++;
    size_t n = strlen(s);
    while (n && isspace((unsigned char)s[n - 1])) s[--n] = '\0';
    return s;
}

/* One label per non-blank line: a 1-based index into the sorted classes,
 * or a class name. */
static kfac_status read_label_file(const kfac__prep_input *in, const char *path,
                                   int32_t **labels, size_t *n)
{
    *labels = NULL;
    *n = 0;
    FILE *f = fopen(path, "r");
    if (!f) return KFAC_ERR(KFAC_EIO, "%s: cannot open: %s", path, strerror(errno));
    kfac_status st = KFAC_OK;
    char *line = NULL;
    size_t line_cap = 0, cap = 0;
    long lineno = 0;
    while (st == KFAC_OK && getline(&line, &line_cap, f) >= 0) {
        lineno++;
        char *t = trim(line), *end;
        if (!*t) continue;
        long v;
        if (isdigit((unsigned char)*t)) {
            errno = 0;
            v = strtol(t, &end, 10);
            if (*end || errno) {
                st = KFAC_ERR(KFAC_EFORMAT, "%s:%ld: '%s' is neither a class index nor a class name",
                              path, lineno, t);
                break;
            }
            if (v < 1 || v > in->num_classes) {
                st = KFAC_ERR(KFAC_EFORMAT, "%s:%ld: class index %ld outside 1..%d (1-based, "
                              "sorted train/ folder order)", path, lineno, v, in->num_classes);
                break;
            }
            v -= 1;
        } else if ((v = class_index(in, t)) < 0) {
            st = KFAC_ERR(KFAC_EFORMAT, "%s:%ld: unknown class '%s' (no such folder in train/)",
                          path, lineno, t);
            break;
        }
        if (*n == cap) {
            cap = cap ? 2 * cap : 1024;
            int32_t *p = realloc(*labels, cap * sizeof *p);
            if (!p) {
                st = KFAC_ERR(KFAC_ENOMEM, "%s: out of memory", path);
                break;
            }
            *labels = p;
        }
        (*labels)[(*n)++] = (int32_t)v;
    }
    if (st == KFAC_OK && ferror(f))
        st = KFAC_ERR(KFAC_EIO, "%s: read error: %s", path, strerror(errno));
    free(line);
    fclose(f);
    if (st != KFAC_OK) {
        free(*labels);
        *labels = NULL;
    }
    return st;
}

/* root/val: class folders named as in train/, or flat with a label file. */
static kfac_status open_val(kfac__prep_input *in, const char *root, const char *val_labels)
{
    kfac__prep_split *s = NULL;
    KFAC_TRY(new_split(in, root, "val", &s));
    dir_list d;
    KFAC_TRY(list_dir(s->dir, &d));
    kfac_status st = KFAC_OK;
    size_t folders = 0, cap = 0;
    for (size_t i = 0; i < d.n; i++) folders += d.v[i].is_dir;
    if (!val_labels && folders == 0 && d.n > 0)
        st = KFAC_ERR(KFAC_EINVAL, "%s: %zu files and no class folders: give their labels with "
                      "--val-labels FILE", s->dir, d.n);
    for (size_t i = 0; st == KFAC_OK && i < d.n; i++) {
        const char *name = d.v[i].name;
        int cls = d.v[i].is_dir ? class_index(in, name) : -1;
        if (val_labels) {
            st = d.v[i].is_dir ? note(in, "val", name, NULL, "/", "folder in a flat val/ (not read)")
                               : add_item(s, &cap, NULL, name, 0);
        } else if (!d.v[i].is_dir) {
            st = note(in, "val", name, NULL, "", "not in a class folder");
        } else if (cls < 0) {
            st = note(in, "val", name, NULL, "/", "class folder not in train/");
        } else {
            st = add_class(in, s, &cap, name, cls);
        }
    }
    dir_list_free(&d);
    if (st == KFAC_OK && val_labels) {
        /* lines follow the sorted file names, which is the item order */
        int32_t *labels;
        size_t n;
        KFAC_TRY(read_label_file(in, val_labels, &labels, &n));
        if (n != s->count)
            st = KFAC_ERR(KFAC_EFORMAT, "%s: %zu labels for %zu files in %s", val_labels, n,
                          s->count, s->dir);
        for (size_t i = 0; st == KFAC_OK && i < n; i++) s->items[i].label = labels[i];
        free(labels);
    }
    return st;
}

static kfac_status open_folder(kfac__prep_input *in, const char *root, const char *val_labels)
{
    char *train = join(root, "train"), *val = join(root, "val");
    kfac_status st = KFAC_OK;
    if (!train || !val) st = KFAC_ERR(KFAC_ENOMEM, "%s: out of memory", root);
    if (st == KFAC_OK && !is_folder(train))
        st = KFAC_ERR(KFAC_EIO, "%s: neither IDX files (train-images-idx3-ubyte[.gz]) nor a "
                      "train/ folder", root);
    if (st == KFAC_OK) st = open_train(in, root);
    if (st == KFAC_OK && is_folder(val))
        st = open_val(in, root, val_labels);
    else if (st == KFAC_OK && val_labels)
        st = KFAC_ERR(KFAC_EIO, "%s: no such folder (--val-labels labels its files)", val);
    free(train);
    free(val);
    for (int i = 0; st == KFAC_OK && i < in->num_splits; i++) {
        kfac__prep_split *s = &in->splits[i];
        if (s->count > 1) qsort(s->items, s->count, sizeof *s->items, item_cmp);
    }
    if (st == KFAC_OK && in->splits[0].count == 0)
        st = KFAC_ERR(KFAC_EIO, "%s: no files in its class folders", in->splits[0].dir);
    /* an empty val/ is no split */
    if (st == KFAC_OK && in->num_splits == 2 && in->splits[1].count == 0) {
        free(in->splits[1].dir);
        free(in->splits[1].items);
        memset(&in->splits[1], 0, sizeof in->splits[1]);
        in->num_splits = 1;
    }
    return st;
}

/* ---- IDX ---- */

static int idx_has(const char *root, const char *prefix)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s-images-idx3-ubyte", root, prefix);
    if (exists(path)) return 1;
    snprintf(path, sizeof path, "%s/%s-images-idx3-ubyte.gz", root, prefix);
    return exists(path);
}

static kfac_status open_idx(kfac__prep_input *in, const char *root)
{
    static const struct {
        const char *file_prefix, *split;
        kfac_split which;
    } parts[] = {{"train", "train", KFAC_SPLIT_TRAIN}, {"t10k", "val", KFAC_SPLIT_TEST}};
    for (int i = 0; i < 2; i++) {
        if (i > 0 && !idx_has(root, parts[i].file_prefix)) break;
        kfac__prep_split *s = NULL;
        KFAC_TRY(new_split(in, root, parts[i].split, &s));
        KFAC_TRY(kfac_dataset_open_idx(root, parts[i].which, &s->idx));
        s->count = s->idx->count;
    }
    in->num_classes = in->splits[0].idx->num_classes;
    in->classes = calloc((size_t)in->num_classes, sizeof *in->classes);
    if (!in->classes) return KFAC_ERR(KFAC_ENOMEM, "%s: out of memory", root);
    for (int c = 0; c < in->num_classes; c++)
        snprintf(in->classes[c], sizeof in->classes[c], "%d", c);
    return KFAC_OK;
}

/* ---- entry points ---- */

kfac_status kfac__prep_input_kind(const char *root, int *is_idx)
{
    struct stat sb;
    if (stat(root, &sb) != 0) return KFAC_ERR(KFAC_EIO, "%s: %s", root, strerror(errno));
    if (!S_ISDIR(sb.st_mode)) return KFAC_ERR(KFAC_EIO, "%s: not a folder", root);
    *is_idx = idx_has(root, "train");
    return KFAC_OK;
}

kfac_status kfac__prep_input_open(kfac__prep_input *in, const char *root, const char *val_labels)
{
    memset(in, 0, sizeof *in);
    kfac_status st = kfac__prep_input_kind(root, &in->is_idx);
    if (st == KFAC_OK && in->is_idx && val_labels)
        st = KFAC_ERR(KFAC_EINVAL, "--val-labels: %s holds IDX files, which carry their labels",
                      root);
    if (st == KFAC_OK) st = in->is_idx ? open_idx(in, root) : open_folder(in, root, val_labels);
    if (st != KFAC_OK) kfac__prep_input_free(in);
    return st;
}

void kfac__prep_input_free(kfac__prep_input *in)
{
    for (int i = 0; i < 2; i++) {
        kfac__prep_split *s = &in->splits[i];
        for (size_t j = 0; s->items && j < s->count; j++) free(s->items[j].path);
        free(s->items);
        free(s->dir);
        kfac_dataset_free(s->idx);
    }
    free(in->classes);
    kfac__issues_free(&in->skipped);
    memset(in, 0, sizeof *in);
}
