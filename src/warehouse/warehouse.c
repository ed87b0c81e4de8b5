/*
 * warehouse.c: the warehouse front (warehouse.h): picks the implementation by the URI and
 * keeps what every source has (its name, masked location, keys and feature columns).
 */
#define _GNU_SOURCE
#include "warehouse/warehouse_internal.h"
#include "core/url.h"

#include <stdlib.h>
#include <string.h>

static const struct warehouse_ops *const warehouses[] = {&warehouse_postgres_ops};
#define N_WAREHOUSES (sizeof(warehouses) / sizeof(warehouses[0]))

static const struct warehouse_ops *ops_for(const char *uri)
{
    for (size_t i = 0; uri && i < N_WAREHOUSES; i++)
        if (warehouses[i]->supports(uri))
            return warehouses[i];
    return NULL;
}

int warehouse_supports(const char *uri)
{
    return ops_for(uri) != NULL;
}

int warehouse_open(const struct warehouse_spec *spec, struct warehouse_source **out, struct err *e)
{
    const struct warehouse_ops *ops = ops_for(spec->uri);
    struct warehouse_source *s;
    int rc;

    *out = NULL;
    if (!ops)
        return err_set(e, ERR_INVALID, "not a warehouse location");
    s = calloc(1, sizeof(*s));
    if (!s || !(s->shown = url_redacted(spec->uri))) {
        free(s);
        return err_set(e, ERR_NOMEM, "out of memory");
    }
    s->ops = ops;
    rc = ops->open(s, spec, e);
    if (rc != 0) {
        warehouse_close(s);
        return rc;
    }
    *out = s;
    return 0;
}

int warehouse_read_row(struct warehouse_source *s, struct buf *features, struct buf *keys,
                       struct err *e)
{
    return s->ops->read_row(s, features, keys, e);
}

void warehouse_close(struct warehouse_source *s)
{
    if (!s)
        return;
    if (s->ops)
        s->ops->close(s);
    for (size_t i = 0; i < s->n_keys; i++)
        free(s->key_names[i]);
    free(s->key_names);
    free(s->name);
    free(s->shown);
    buf_release(&s->features);
    free(s);
}

const char *warehouse_name(const struct warehouse_source *s)
{
    return s->name;
}

const char *warehouse_shown(const struct warehouse_source *s)
{
    return s->shown;
}

size_t warehouse_n_keys(const struct warehouse_source *s)
{
    return s->n_keys;
}

const char *warehouse_key_name(const struct warehouse_source *s, size_t i)
{
    return s->key_names[i];
}

const char *warehouse_feature_header(const struct warehouse_source *s)
{
    return s->features.data ? s->features.data : "";
}
