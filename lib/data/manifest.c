/* manifest.c - DIR/manifest.yaml (format in kfac_shards.h): written with
 * fprintf, read with the internal YAML tree and checked key by key, so every
 * complaint points at "DIR/manifest.yaml:LINE:COL".
 *
 * Strings are written plain when they are unmistakably strings (letters,
 * digits, _ . / -, starting with a letter, _ or /, and not a YAML word like
 * "no"); otherwise double-quoted with escapes, so class names with spaces,
 * colons or digits only ("0") read back as the same strings in any YAML
 * reader.  Hashes are plain unless a YAML reader would take them for a
 * number.
 */
#include "kfac/kfac_shards.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "config/yaml_tree.h"
#include "data/shards_internal.h"

enum { PATH_CAP = 4096, MSG_CAP = 512 };

static const char MANIFEST[] = "manifest.yaml";

/* ---- durable files ---- */

/* fsync of a file or folder opened read-only (Linux allows it on both). */
static kfac_status sync_path(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return KFAC_ERR(KFAC_EIO, "%s: cannot open to sync: %s", path, strerror(errno));
    int rc = fsync(fd);
    int err = errno;
    close(fd);
    /* some file systems cannot sync folders; the rename itself is done */
    if (rc != 0 && err != EINVAL && err != EROFS)
        return KFAC_ERR(KFAC_EIO, "%s: fsync: %s", path, strerror(err));
    return KFAC_OK;
}

kfac_status kfac__publish_file(const char *tmp, const char *path)
{
    kfac_status st = sync_path(tmp);
    if (st == KFAC_OK && rename(tmp, path) != 0)
        st = KFAC_ERR(KFAC_EIO, "%s: cannot rename to %s: %s", tmp, path, strerror(errno));
    if (st != KFAC_OK) {
        unlink(tmp);
        return st;
    }
    char dir[PATH_CAP];
    const char *slash = strrchr(path, '/');
    size_t len = slash ? (size_t)(slash - path) : 0;
    if (len >= sizeof dir) return KFAC_ERR(KFAC_EINVAL, "%s: path too long", path);
    if (slash && len == 0) len = 1; /* "/name" lives in "/" */
    memcpy(dir, slash ? path : ".", slash ? len : 1);
    dir[slash ? len : 1] = '\0';
    return sync_path(dir);
}

/* ---- writing ---- */

static int is_valid_utf8(const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    while (*p) {
        int extra = *p < 0x80 ? 0 : (*p & 0xE0) == 0xC0 ? 1 : (*p & 0xF0) == 0xE0 ? 2
                  : (*p & 0xF8) == 0xF0 ? 3 : -1;
        if (extra < 0 || (extra == 1 && *p < 0xC2)) return 0;
        p++;
        for (int i = 0; i < extra; i++, p++)
            if ((*p & 0xC0) != 0x80) return 0;
    }
    return 1;
}

static int plain_ok(const char *s)
{
    static const char *const words[] = {"true", "false", "yes", "no", "on",
                                        "off",  "null",  "y",   "n"};
    if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || *s == '_' || *s == '/'))
        return 0;
    for (const char *p = s; *p; p++)
        if (!strchr("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_./-", *p))
            return 0;
    for (size_t i = 0; i < sizeof words / sizeof *words; i++)
        if (strcasecmp(s, words[i]) == 0) return 0;
    return 1;
}

static void put_str(FILE *f, const char *s)
{
    if (plain_ok(s)) {
        fputs(s, f);
        return;
    }
    fputc('"', f);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\')
            fprintf(f, "\\%c", *p);
        else if (*p < 0x20 || *p == 0x7F)
            fprintf(f, "\\x%02x", *p);
        else
            fputc(*p, f);
    }
    fputc('"', f);
}

/* 16 hex digits that are all decimal, or decimal around one 'e', read as a
 * number in YAML 1.1 or 1.2: quote those. */
static void put_hash(FILE *f, uint64_t h)
{
    char hex[17];
    snprintf(hex, sizeof hex, "%016" PRIx64, h);
    size_t digits = strspn(hex, "0123456789");
    int numeric = hex[digits] == '\0' ||
                  (digits > 0 && hex[digits] == 'e' && hex[digits + 1] &&
                   strspn(hex + digits + 1, "0123456789") == strlen(hex + digits + 1));
    fprintf(f, numeric ? "\"%s\"" : "%s", hex);
}

static kfac_status check_for_write(const char *dir, const kfac_manifest *m)
{
    if (m->num_splits < 0 || m->num_splits > 2)
        return KFAC_ERR(KFAC_EINVAL, "%s: %d splits, at most 2", dir, m->num_splits);
    if (m->num_classes < 1) return KFAC_ERR(KFAC_EINVAL, "%s: %d classes", dir, m->num_classes);
    if (strnlen(m->settings.source, sizeof m->settings.source) == sizeof m->settings.source ||
        !is_valid_utf8(m->settings.source))
        return KFAC_ERR(KFAC_EINVAL, "%s: source is not a NUL-terminated UTF-8 string", dir);
    for (int i = 0; i < m->num_classes; i++)
        if (strnlen(m->classes[i], KFAC_CLASS_NAME_MAX) == KFAC_CLASS_NAME_MAX ||
            !m->classes[i][0] || !is_valid_utf8(m->classes[i]))
            return KFAC_ERR(KFAC_EINVAL, "%s: class %d: name empty, too long or not UTF-8", dir, i);
    for (int s = 0; s < m->num_splits; s++) {
        const kfac_split_entry *sp = &m->splits[s];
        if (strcmp(sp->name, "train") != 0 && strcmp(sp->name, "val") != 0)
            return KFAC_ERR(KFAC_EINVAL, "%s: split '%.16s', expected train or val", dir, sp->name);
        size_t sum = 0;
        for (size_t i = 0; i < sp->num_shards; i++) {
            const char *file = sp->shards[i].file;
            if (!file[0] || strnlen(file, KFAC_SHARD_FILE_MAX) == KFAC_SHARD_FILE_MAX ||
                strchr(file, '/') || !is_valid_utf8(file))
                return KFAC_ERR(KFAC_EINVAL, "%s: split %s: shard %zu: bad file name", dir,
                                sp->name, i);
            sum += sp->shards[i].count;
        }
        if (sum != sp->count)
            return KFAC_ERR(KFAC_EINVAL, "%s: split %s: count %zu, but its shards hold %zu", dir,
                            sp->name, sp->count, sum);
    }
    return KFAC_OK;
}

static void put_manifest(FILE *f, const kfac_manifest *m)
{
    const kfac_prep_settings *s = &m->settings;
    fprintf(f, "kfac_dataset: %d\n", KFAC_SHARD_FORMAT);
    fprintf(f, "storage: %s\n", s->storage == KFAC_STORAGE_JPEG ? "jpeg" : "raw");
    fprintf(f, "channels: %d\nresize: %d\ncrop: %s\njpeg_quality: %d\nsource: ", s->channels,
            s->resize, s->center_crop ? "center" : "none", s->jpeg_quality);
    put_str(f, s->source);
    fputs("\nclasses: [", f);
    for (int i = 0; i < m->num_classes; i++) {
        if (i) fputs(", ", f);
        put_str(f, m->classes[i]);
    }
    fputs("]\nsplits:", f);
    if (m->num_splits == 0) fputs(" {}", f);
    fputc('\n', f);
    for (int i = 0; i < m->num_splits; i++) {
        const kfac_split_entry *sp = &m->splits[i];
        fprintf(f, "  %s:\n    count: %zu\n    shards:%s\n", sp->name, sp->count,
                sp->num_shards ? "" : " []");
        for (size_t j = 0; j < sp->num_shards; j++) {
            const kfac_shard_entry *e = &sp->shards[j];
            fputs("      - {file: ", f);
            put_str(f, e->file);
            fprintf(f, ", count: %zu, bytes: %" PRIu64 ", xxh64: ", e->count, e->bytes);
            put_hash(f, e->xxh64);
            fputs("}\n", f);
        }
    }
}

kfac_status kfac_manifest_write(const char *dir, const kfac_manifest *m)
{
    KFAC_TRY(check_for_write(dir, m));
    char path[PATH_CAP], tmp[PATH_CAP];
    int len = snprintf(path, sizeof path, "%s/%s", dir, MANIFEST);
    if (len < 0 || (size_t)len + 4 >= sizeof tmp)
        return KFAC_ERR(KFAC_EINVAL, "%s: folder path too long", dir);
    memcpy(tmp, path, (size_t)len);
    memcpy(tmp + len, ".tmp", sizeof ".tmp");
    FILE *f = fopen(tmp, "w");
    if (!f) return KFAC_ERR(KFAC_EIO, "%s: cannot create: %s", tmp, strerror(errno));
    put_manifest(f, m);
    int failed = ferror(f) || fflush(f) != 0;
    int err = errno;
    if (fclose(f) != 0 && !failed) {
        failed = 1;
        err = errno;
    }
    if (failed) {
        unlink(tmp);
        return KFAC_ERR(KFAC_EIO, "%s: cannot write: %s", tmp, strerror(err));
    }
    return kfac__publish_file(tmp, path);
}

/* ---- reading ---- */

typedef struct reader {
    const char *path; /* DIR/manifest.yaml */
} reader;

/* "PATH:LINE:COL: WHAT: message" at `node`. */
static kfac_status bad(const reader *r, const ytree *node, const char *what, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static kfac_status bad(const reader *r, const ytree *node, const char *what, const char *fmt, ...)
{
    char msg[MSG_CAP];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return KFAC_ERR(KFAC_EFORMAT, "%s:%d:%d: %s: %s", r->path, node->line, node->col, what, msg);
}

/* The node as messages show it: 'text', a list, a mapping or nothing. */
static const char *shown(const ytree *node, char *buf, size_t cap)
{
    if (ytree_is_null(node)) return "nothing";
    if (node->kind != YTREE_SCALAR) return ytree_kind_name(node->kind);
    snprintf(buf, cap, "'%.60s'", node->text);
    return buf;
}

static kfac_status expect_kind(const reader *r, const ytree *node, ytree_kind kind,
                               const char *what)
{
    char buf[80];
    if (node->kind == kind && !(kind == YTREE_SCALAR && ytree_is_null(node))) return KFAC_OK;
    return bad(r, node, what, "expected %s, got %s", ytree_kind_name(kind),
               shown(node, buf, sizeof buf));
}

/* Every key of `map` must be one of `known` (NULL-terminated). */
static kfac_status check_keys(const reader *r, const ytree *map, const char *const *known,
                              const char *what)
{
    for (int i = 0; i < map->n; i++) {
        const ytree *key = map->kids[2 * i];
        KFAC_TRY(expect_kind(r, key, YTREE_SCALAR, what));
        const char *const *k = known;
        while (*k && strcmp(*k, key->text) != 0) k++;
        if (!*k) return bad(r, key, what, "unknown key '%s'", key->text);
    }
    return KFAC_OK;
}

/* The value of `key` in `map`; missing keys are reported at the mapping. */
static kfac_status get(const reader *r, const ytree *map, const char *key, const char *what,
                       const ytree **value)
{
    *value = NULL;
    for (int i = 0; i < map->n; i++)
        if (strcmp(map->kids[2 * i]->text, key) == 0) {
            *value = map->kids[2 * i + 1];
            return KFAC_OK;
        }
    return bad(r, map, what, "missing key '%s'", key);
}

static kfac_status get_u64(const reader *r, const ytree *map, const char *key, const char *what,
                           uint64_t lo, uint64_t hi, uint64_t *out)
{
    const ytree *v;
    KFAC_TRY(get(r, map, key, what, &v));
    char buf[80];
    uint64_t x = 0;
    int ok = v->kind == YTREE_SCALAR && v->text[0] != '\0';
    for (const char *p = ok ? v->text : ""; *p && ok; p++) {
        ok = *p >= '0' && *p <= '9' && x <= (UINT64_MAX - (uint64_t)(*p - '0')) / 10;
        x = x * 10 + (uint64_t)(*p - '0');
    }
    if (!ok || x < lo || x > hi)
        return bad(r, v, what, "%s: expected an integer in [%" PRIu64 ", %" PRIu64 "], got %s",
                   key, lo, hi, shown(v, buf, sizeof buf));
    *out = x;
    return KFAC_OK;
}

static kfac_status get_int(const reader *r, const ytree *map, const char *key, const char *what,
                           int lo, int hi, int *out)
{
    uint64_t x;
    KFAC_TRY(get_u64(r, map, key, what, (uint64_t)lo, (uint64_t)hi, &x));
    *out = (int)x;
    return KFAC_OK;
}

/* A string value of at most cap-1 bytes; with `one_of` ('|'-separated)
 * one of those words, whose index goes to *choice. */
static kfac_status get_str(const reader *r, const ytree *map, const char *key, const char *what,
                           char *buf, size_t cap, const char *one_of, int *choice)
{
    const ytree *v;
    KFAC_TRY(get(r, map, key, what, &v));
    char tmp[80];
    if (v->kind != YTREE_SCALAR || ytree_is_null(v) || !v->text[0])
        return bad(r, v, what, "%s: expected a string, got %s", key, shown(v, tmp, sizeof tmp));
    if (strlen(v->text) >= cap)
        return bad(r, v, what, "%s: longer than %zu bytes", key, cap - 1);
    if (one_of) {
        int i = 0;
        for (const char *w = one_of; *w; i++) {
            size_t len = strcspn(w, "|");
            if (strlen(v->text) == len && strncmp(w, v->text, len) == 0) {
                *choice = i;
                break;
            }
            w += len + (w[len] == '|');
            if (!*w)
                return bad(r, v, what, "%s: unknown value '%s' (expected %s)", key, v->text,
                           one_of);
        }
    }
    snprintf(buf, cap, "%s", v->text);
    return KFAC_OK;
}

static kfac_status read_settings(const reader *r, const ytree *root, kfac_manifest *m)
{
    kfac_prep_settings *s = &m->settings;
    int version, storage, crop;
    char word[16];
    KFAC_TRY(get_int(r, root, "kfac_dataset", "manifest", 0, 1000000, &version));
    if (version != KFAC_SHARD_FORMAT) {
        const ytree *v;
        KFAC_TRY(get(r, root, "kfac_dataset", "manifest", &v));
        return bad(r, v, "kfac_dataset", "format version %d, this build reads %d (rerun kfac prep)",
                   version, KFAC_SHARD_FORMAT);
    }
    KFAC_TRY(get_str(r, root, "storage", "manifest", word, sizeof word, "raw|jpeg", &storage));
    s->storage = storage ? KFAC_STORAGE_JPEG : KFAC_STORAGE_RAW;
    const ytree *v;
    KFAC_TRY(get_int(r, root, "channels", "manifest", 1, 3, &s->channels));
    if (s->channels == 2) {
        KFAC_TRY(get(r, root, "channels", "manifest", &v));
        return bad(r, v, "channels", "expected 1 or 3, got 2");
    }
    KFAC_TRY(get_int(r, root, "resize", "manifest", 0, 65535, &s->resize));
    KFAC_TRY(get_str(r, root, "crop", "manifest", word, sizeof word, "none|center", &crop));
    s->center_crop = crop;
    KFAC_TRY(get_int(r, root, "jpeg_quality", "manifest", 0, 100, &s->jpeg_quality));
    KFAC_TRY(get_str(r, root, "source", "manifest", s->source, sizeof s->source, NULL, NULL));
    return KFAC_OK;
}

static kfac_status read_classes(const reader *r, const ytree *root, kfac_manifest *m)
{
    const ytree *list;
    KFAC_TRY(get(r, root, "classes", "manifest", &list));
    KFAC_TRY(expect_kind(r, list, YTREE_LIST, "classes"));
    if (list->n < 1) return bad(r, list, "classes", "no class names");
    m->classes = calloc((size_t)list->n, sizeof *m->classes);
    if (!m->classes) return KFAC_ERR(KFAC_ENOMEM, "%s: cannot allocate the classes", r->path);
    m->num_classes = list->n;
    for (int i = 0; i < list->n; i++) {
        const ytree *v = list->kids[i];
        char what[32];
        snprintf(what, sizeof what, "classes[%d]", i);
        KFAC_TRY(expect_kind(r, v, YTREE_SCALAR, what));
        if (!v->text[0] || strlen(v->text) >= KFAC_CLASS_NAME_MAX)
            return bad(r, v, what, "name empty or longer than %d bytes", KFAC_CLASS_NAME_MAX - 1);
        snprintf(m->classes[i], KFAC_CLASS_NAME_MAX, "%s", v->text);
    }
    return KFAC_OK;
}

static kfac_status read_shard(const reader *r, const ytree *item, const char *what,
                              kfac_shard_entry *e)
{
    static const char *const keys[] = {"file", "count", "bytes", "xxh64", NULL};
    KFAC_TRY(expect_kind(r, item, YTREE_MAP, what));
    KFAC_TRY(check_keys(r, item, keys, what));
    KFAC_TRY(get_str(r, item, "file", what, e->file, sizeof e->file, NULL, NULL));
    const ytree *v;
    if (strchr(e->file, '/') || strcmp(e->file, ".") == 0 || strcmp(e->file, "..") == 0) {
        KFAC_TRY(get(r, item, "file", what, &v));
        return bad(r, v, what, "file '%s' is not a plain file name", e->file);
    }
    uint64_t count;
    KFAC_TRY(get_u64(r, item, "count", what, 0, SIZE_MAX, &count));
    e->count = (size_t)count;
    KFAC_TRY(get_u64(r, item, "bytes", what, 0, UINT64_MAX, &e->bytes));
    char hex[20];
    KFAC_TRY(get_str(r, item, "xxh64", what, hex, sizeof hex, NULL, NULL));
    KFAC_TRY(get(r, item, "xxh64", what, &v));
    if (strlen(hex) != 16 || strspn(hex, "0123456789abcdefABCDEF") != 16)
        return bad(r, v, what, "xxh64: expected 16 hex digits, got '%s'", hex);
    e->xxh64 = strtoull(hex, NULL, 16);
    return KFAC_OK;
}

static kfac_status read_split(const reader *r, const ytree *name, const ytree *body,
                              kfac_split_entry *sp)
{
    static const char *const keys[] = {"count", "shards", NULL};
    char what[64];
    snprintf(what, sizeof what, "splits.%.16s", name->text);
    char buf[80];
    if (name->kind != YTREE_SCALAR || (strcmp(name->text, "train") != 0 &&
                                       strcmp(name->text, "val") != 0))
        return bad(r, name, "splits", "unknown split %s (expected train or val)",
                   shown(name, buf, sizeof buf));
    snprintf(sp->name, sizeof sp->name, "%s", name->text);
    KFAC_TRY(expect_kind(r, body, YTREE_MAP, what));
    KFAC_TRY(check_keys(r, body, keys, what));
    uint64_t count;
    KFAC_TRY(get_u64(r, body, "count", what, 0, SIZE_MAX, &count));
    sp->count = (size_t)count;
    const ytree *list;
    KFAC_TRY(get(r, body, "shards", what, &list));
    char list_what[80];
    snprintf(list_what, sizeof list_what, "%s.shards", what);
    KFAC_TRY(expect_kind(r, list, YTREE_LIST, list_what));
    sp->shards = calloc(list->n ? (size_t)list->n : 1, sizeof *sp->shards);
    if (!sp->shards) return KFAC_ERR(KFAC_ENOMEM, "%s: cannot allocate the shards", r->path);
    sp->num_shards = (size_t)list->n;
    size_t sum = 0;
    for (int i = 0; i < list->n; i++) {
        char item_what[96];
        snprintf(item_what, sizeof item_what, "%s[%d]", list_what, i);
        KFAC_TRY(read_shard(r, list->kids[i], item_what, &sp->shards[i]));
        sum += sp->shards[i].count;
    }
    if (sum != sp->count) {
        const ytree *v;
        KFAC_TRY(get(r, body, "count", what, &v));
        return bad(r, v, what, "count %zu, but its shards hold %zu images", sp->count, sum);
    }
    return KFAC_OK;
}

/* Shard file names must be unique over the folder: two entries for one
 * file would make copies and checks overwrite each other. */
static kfac_status check_unique_files(const reader *r, const ytree *splits, const kfac_manifest *m)
{
    for (int a = 0; a < m->num_splits; a++)
        for (size_t i = 0; i < m->splits[a].num_shards; i++)
            for (int b = a; b < m->num_splits; b++)
                for (size_t j = b == a ? i + 1 : 0; j < m->splits[b].num_shards; j++)
                    if (strcmp(m->splits[a].shards[i].file, m->splits[b].shards[j].file) == 0)
                        return bad(r, splits, "splits", "shard file '%s' listed twice",
                                   m->splits[a].shards[i].file);
    return KFAC_OK;
}

static kfac_status read_tree(const reader *r, const ytree *root, kfac_manifest *m)
{
    static const char *const keys[] = {"kfac_dataset", "storage", "channels", "resize",
                                       "crop", "jpeg_quality", "source", "classes", "splits",
                                       NULL};
    if (!root) return KFAC_ERR(KFAC_EFORMAT, "%s: empty file", r->path);
    KFAC_TRY(expect_kind(r, root, YTREE_MAP, "manifest"));
    KFAC_TRY(check_keys(r, root, keys, "manifest"));
    KFAC_TRY(read_settings(r, root, m));
    KFAC_TRY(read_classes(r, root, m));
    const ytree *splits;
    KFAC_TRY(get(r, root, "splits", "manifest", &splits));
    KFAC_TRY(expect_kind(r, splits, YTREE_MAP, "splits"));
    if (splits->n > 2)
        return bad(r, splits, "splits", "%d splits, expected train and val", splits->n);
    for (int i = 0; i < splits->n; i++) {
        KFAC_TRY(read_split(r, splits->kids[2 * i], splits->kids[2 * i + 1], &m->splits[i]));
        m->num_splits = i + 1;
    }
    return check_unique_files(r, splits, m);
}

kfac_status kfac_manifest_read(const char *dir, kfac_manifest **out)
{
    *out = NULL;
    char path[PATH_CAP];
    int len = snprintf(path, sizeof path, "%s/%s", dir, MANIFEST);
    if (len < 0 || (size_t)len >= sizeof path)
        return KFAC_ERR(KFAC_EINVAL, "%s: folder path too long", dir);
    ytree *root;
    KFAC_TRY(ytree_load(path, &root));
    kfac_manifest *m = calloc(1, sizeof *m);
    if (!m) {
        ytree_free(root);
        return KFAC_ERR(KFAC_ENOMEM, "%s: cannot allocate the manifest", path);
    }
    kfac_status st = read_tree(&(reader){path}, root, m);
    ytree_free(root);
    if (st != KFAC_OK) {
        kfac_manifest_free(m);
        return st;
    }
    *out = m;
    return KFAC_OK;
}

void kfac_manifest_free(kfac_manifest *m)
{
    if (!m) return;
    free(m->classes);
    for (int i = 0; i < 2; i++) free(m->splits[i].shards);
    free(m);
}

const kfac_split_entry *kfac_manifest_split(const kfac_manifest *m, const char *name)
{
    for (int i = 0; i < m->num_splits; i++)
        if (strcmp(m->splits[i].name, name) == 0) return &m->splits[i];
    return NULL;
}
