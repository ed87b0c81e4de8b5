/*
 * features.c: a model's feature names, sorted once at load so that mapping a record by name
 * costs a binary search per field, whatever the number of features.
 */
#include "kserve/features.h"

#include <stdlib.h>
#include <string.h>

/* strcmp of a counted string and a NUL-terminated one */
static int cmp_n(const char *a, size_t a_len, const char *b)
{
    size_t b_len = strlen(b);
    int c = memcmp(a, b, a_len < b_len ? a_len : b_len);

    if (c != 0)
        return c;
    return a_len < b_len ? -1 : a_len > b_len;
}

static int cmp_entry(const void *a, const void *b)
{
    return strcmp(((const struct feature_entry *)a)->name, ((const struct feature_entry *)b)->name);
}

int features_init(struct features *f, const char *const *names, const char *const *types, size_t n,
                  struct err *e)
{
    memset(f, 0, sizeof(*f));
    if (!names || n == 0)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!names[i] || !names[i][0])
            return err_set(e, ERR_INVALID, "feature %zu has no name", i);
    f->sorted = malloc(n * sizeof(*f->sorted));
    if (!f->sorted)
        return err_set(e, ERR_NOMEM, "out of memory");
    for (size_t i = 0; i < n; i++)
        f->sorted[i] = (struct feature_entry){.name = names[i], .index = i};
    qsort(f->sorted, n, sizeof(*f->sorted), cmp_entry);
    for (size_t i = 1; i < n; i++) {
        if (strcmp(f->sorted[i - 1].name, f->sorted[i].name) == 0) {
            int rc =
                err_set(e, ERR_INVALID, "feature name '%.64s' appears twice", f->sorted[i].name);
            free(f->sorted);
            f->sorted = NULL;
            return rc;
        }
    }
    f->names = names;
    f->types = types;
    f->n = n;
    return 0;
}

void features_release(struct features *f)
{
    free(f->sorted);
    memset(f, 0, sizeof(*f));
}

int64_t features_find(const struct features *f, const char *name, size_t len)
{
    size_t lo = 0, hi = f->n;

    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = cmp_n(name, len, f->sorted[mid].name);
        if (c == 0)
            return (int64_t)f->sorted[mid].index;
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return -1;
}
