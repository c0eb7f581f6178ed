/* yaml_tree.h - internal: a YAML file read with libyaml into a small tree of
 * scalars, lists and mappings in which every node keeps the 1-based
 * line:column where it starts, so config errors can point at it.
 *
 * Only what a config file needs: one document, no aliases, no tags.  Syntax
 * errors, duplicate mapping keys, aliases and extra documents fail with
 * "PATH:LINE:COL: ..." (KFAC_EFORMAT); an unreadable file with
 * "PATH: cannot open: ..." (KFAC_EIO).
 */
#ifndef KFAC_CONFIG_YAML_TREE_H
#define KFAC_CONFIG_YAML_TREE_H

#include <stddef.h>

#include "kfac/kfac_status.h"

typedef enum ytree_kind { YTREE_SCALAR, YTREE_LIST, YTREE_MAP } ytree_kind;

typedef struct ytree {
    ytree_kind kind;
    int line, col;       /* 1-based start of the node in the file */
    char *text;          /* scalar: its value, NUL-terminated */
    int plain;           /* scalar: written without quotes (only those can be null) */
    int n;               /* list: number of items; map: number of key/value pairs */
    struct ytree **kids; /* list: n items; map: 2n nodes, key i at 2i, its value at 2i+1 */
} ytree;

/* Reads the YAML file `path` into *root; *root is NULL when the file holds
 * no document (empty or only comments).  Free with ytree_free. */
kfac_status ytree_load(const char *path, ytree **root);

void ytree_free(ytree *node);

/* True for YAML null: an unquoted empty scalar, "~" or "null". */
int ytree_is_null(const ytree *node);

/* "a scalar", "a list" or "a mapping", for messages. */
const char *ytree_kind_name(ytree_kind kind);

#endif
