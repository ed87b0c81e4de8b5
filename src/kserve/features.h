/*
 * features.h: a model's feature names, looked up by name: how a CSV header, a JSON object
 * record or a v1 instance that is an object finds the column each value belongs to.
 */
#ifndef INFERD_FEATURES_H
#define INFERD_FEATURES_H

#include "core/err.h"

#include <stddef.h>
#include <stdint.h>

struct feature_entry {
    const char *name;
    size_t index;
};

struct features {
    const char *const *names;     /* borrowed from the model's info; NULL: the model has none */
    const char *const *types;     /* borrowed; NULL: not given */
    size_t n;                     /* the input's width when names is set, else 0 */
    struct feature_entry *sorted; /* names in strcmp order with their columns */
};

/*
 * Indexes `names` (n of them, borrowed until features_release). NULL `names` gives a lookup
 * that finds nothing. ERR_INVALID names a duplicate or empty name; ERR_NOMEM.
 */
int features_init(struct features *f, const char *const *names, const char *const *types, size_t n,
                  struct err *e);
void features_release(struct features *f);

/* The column of feature `name` (`len` bytes, not NUL-terminated necessarily), or -1. */
int64_t features_find(const struct features *f, const char *name, size_t len);

#endif
