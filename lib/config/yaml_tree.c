/* yaml_tree.c - builds a ytree from libyaml's event stream (yaml_tree.h).
 *
 * Every node is linked into its parent as soon as it exists, so on any
 * error freeing the root releases everything built so far. */
#include "config/yaml_tree.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <yaml.h>

/* Config files nest three levels (optimizer: kfac: damping:); the limit only stops hostile input from
 * exhausting the stack through build_node's recursion. */
#define MAX_DEPTH 64

typedef struct builder {
    yaml_parser_t parser;
    FILE *file;
    const char *path;
} builder;

static kfac_status parse_error(const builder *b)
{
    const yaml_parser_t *p = &b->parser;
    const char *problem = p->problem ? p->problem : "unknown error";
    if (p->error == YAML_MEMORY_ERROR)
        return KFAC_ERR(KFAC_ENOMEM, "%s: out of memory while reading YAML", b->path);
    if (p->error == YAML_READER_ERROR) { /* I/O failure or bad encoding: no line known */
        if (ferror(b->file))
            return KFAC_ERR(KFAC_EIO, "%s: cannot read: %s", b->path, strerror(errno));
        return KFAC_ERR(KFAC_EFORMAT, "%s: bad YAML: %s at byte %zu", b->path, problem,
                        p->problem_offset);
    }
    return KFAC_ERR(KFAC_EFORMAT, "%s:%zu:%zu: bad YAML: %s", b->path,
                    p->problem_mark.line + 1, p->problem_mark.column + 1, problem);
}

static kfac_status next_event(builder *b, yaml_event_t *ev)
{
    return yaml_parser_parse(&b->parser, ev) ? KFAC_OK : parse_error(b);
}

static kfac_status no_memory(const builder *b)
{
    return KFAC_ERR(KFAC_ENOMEM, "%s: out of memory while reading YAML", b->path);
}

/* Mapping keys must be unique (YAML requires it; libyaml does not check).
 * Checks the key of pair `i` against the pairs before it. */
static kfac_status check_unique_key(const builder *b, const ytree *map, int i)
{
    const ytree *key = map->kids[2 * i];
    if (key->kind != YTREE_SCALAR) return KFAC_OK;
    for (int j = 0; j < i; j++) {
        const ytree *other = map->kids[2 * j];
        if (other->kind == YTREE_SCALAR && strcmp(other->text, key->text) == 0)
            return KFAC_ERR(KFAC_EFORMAT, "%s:%d:%d: duplicate key '%s' (first at line %d)",
                            b->path, key->line, key->col, key->text, other->line);
    }
    return KFAC_OK;
}

static kfac_status build_node(builder *b, yaml_event_t *ev, ytree **out, int depth);

/* Reads the items (or keys and values) of `t` up to the `end` event. */
static kfac_status build_children(builder *b, ytree *t, yaml_event_type_t end, int depth)
{
    int count = 0, cap = 0;
    for (;;) {
        yaml_event_t ev;
        KFAC_TRY(next_event(b, &ev));
        if (ev.type == end) {
            yaml_event_delete(&ev);
            return KFAC_OK;
        }
        if (count == cap) {
            int grown = cap ? 2 * cap : 8;
            ytree **kids = realloc(t->kids, grown * sizeof *kids);
            if (!kids) {
                yaml_event_delete(&ev);
                return no_memory(b);
            }
            /* NULL slots let ytree_free handle a key still waiting for its value */
            memset(kids + cap, 0, (grown - cap) * sizeof *kids);
            t->kids = kids;
            cap = grown;
        }
        count++;
        t->n = t->kind == YTREE_MAP ? (count + 1) / 2 : count;
        KFAC_TRY(build_node(b, &ev, &t->kids[count - 1], depth + 1));
        if (t->kind == YTREE_MAP && count % 2 == 0) KFAC_TRY(check_unique_key(b, t, count / 2 - 1));
    }
}

/* Builds the node that starts with `ev` (consumed) and everything inside it. */
static kfac_status build_node(builder *b, yaml_event_t *ev, ytree **out, int depth)
{
    yaml_mark_t mark = ev->start_mark;
    ytree_kind kind = YTREE_SCALAR;
    yaml_event_type_t end = YAML_NO_EVENT;
    if (ev->type == YAML_SEQUENCE_START_EVENT) {
        kind = YTREE_LIST;
        end = YAML_SEQUENCE_END_EVENT;
    } else if (ev->type == YAML_MAPPING_START_EVENT) {
        kind = YTREE_MAP;
        end = YAML_MAPPING_END_EVENT;
    } else if (ev->type != YAML_SCALAR_EVENT) { /* an alias: the only other node event */
        yaml_event_delete(ev);
        return KFAC_ERR(KFAC_EFORMAT, "%s:%zu:%zu: YAML aliases are not supported here",
                        b->path, mark.line + 1, mark.column + 1);
    }
    if (depth > MAX_DEPTH) {
        yaml_event_delete(ev);
        return KFAC_ERR(KFAC_EFORMAT, "%s:%zu:%zu: nested deeper than %d levels", b->path,
                        mark.line + 1, mark.column + 1, MAX_DEPTH);
    }

    ytree *t = *out = calloc(1, sizeof *t);
    if (t) {
        t->kind = kind;
        t->line = (int)mark.line + 1;
        t->col = (int)mark.column + 1;
        if (kind == YTREE_SCALAR) {
            t->text = strndup((const char *)ev->data.scalar.value, ev->data.scalar.length);
            t->plain = ev->data.scalar.style == YAML_PLAIN_SCALAR_STYLE;
        }
    }
    yaml_event_delete(ev);
    if (!t || (kind == YTREE_SCALAR && !t->text)) return no_memory(b);
    return kind == YTREE_SCALAR ? KFAC_OK : build_children(b, t, end, depth);
}

/* STREAM-START, at most one DOCUMENT-START root-node DOCUMENT-END, STREAM-END. */
static kfac_status build_stream(builder *b, ytree **root)
{
    int documents = 0;
    for (;;) {
        yaml_event_t ev;
        KFAC_TRY(next_event(b, &ev));
        yaml_event_type_t type = ev.type;
        yaml_mark_t mark = ev.start_mark;
        if (type == YAML_SCALAR_EVENT || type == YAML_SEQUENCE_START_EVENT ||
            type == YAML_MAPPING_START_EVENT || type == YAML_ALIAS_EVENT) {
            KFAC_TRY(build_node(b, &ev, root, 0));
            continue;
        }
        yaml_event_delete(&ev);
        if (type == YAML_STREAM_END_EVENT) return KFAC_OK;
        if (type == YAML_DOCUMENT_START_EVENT && ++documents > 1)
            return KFAC_ERR(KFAC_EFORMAT, "%s:%zu:%zu: a second YAML document; a job file holds one",
                            b->path, mark.line + 1, mark.column + 1);
    }
}

kfac_status ytree_load(const char *path, ytree **root)
{
    *root = NULL;
    builder b = {.path = path};
    b.file = fopen(path, "rb");
    if (!b.file) return KFAC_ERR(KFAC_EIO, "%s: cannot open: %s", path, strerror(errno));
    if (!yaml_parser_initialize(&b.parser)) {
        fclose(b.file);
        return no_memory(&b);
    }
    yaml_parser_set_input_file(&b.parser, b.file);
    kfac_status st = build_stream(&b, root);
    yaml_parser_delete(&b.parser);
    fclose(b.file);
    if (st != KFAC_OK) {
        ytree_free(*root);
        *root = NULL;
    }
    return st;
}

void ytree_free(ytree *node)
{
    if (!node) return;
    int count = node->kind == YTREE_MAP ? 2 * node->n : node->n;
    for (int i = 0; i < count; i++) ytree_free(node->kids[i]);
    free(node->kids);
    free(node->text);
    free(node);
}

int ytree_is_null(const ytree *node)
{
    return node->kind == YTREE_SCALAR && node->plain &&
           (!node->text[0] || !strcmp(node->text, "~") || !strcasecmp(node->text, "null"));
}

const char *ytree_kind_name(ytree_kind kind)
{
    switch (kind) {
    case YTREE_SCALAR: return "a scalar";
    case YTREE_LIST: return "a list";
    case YTREE_MAP: return "a mapping";
    }
    return "a node";
}
