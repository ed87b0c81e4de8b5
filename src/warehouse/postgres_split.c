/*
 * postgres_split.c: a PostgreSQL table or query cut into key ranges (warehouse_split()), so
 * that the tasks of a server batch job share one source.
 *
 * One statement over the keys alone:
 *   SELECT k1::text, k2::text FROM (SELECT k1, k2, row_number() OVER w AS inferd_rn,
 *          lead(true, 1, false) OVER w AS inferd_more FROM source WINDOW w AS (ORDER BY k1, k2))
 *   AS inferd_keys WHERE inferd_rn % N = 0 AND inferd_more ORDER BY inferd_rn
 * returns the key of every N-th row but the last: the upper bound of one part and the lower
 * bound (exclusive) of the next. row_number() and lead() need one row of look-ahead, not the
 * whole result, so the server streams the keys (an index scan for a primary key) whatever the
 * table's size. The values come back as text in the key columns' own output format, which the
 * source's range reading casts back to their types (postgres.c, put_bound), and they compare
 * as ORDER BY does, so the parts hold every row once. A row whose key is NULL would be in no
 * part: named key columns are first checked for NULL (a primary key has none).
 */
#define _GNU_SOURCE
#include "warehouse/postgres_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int warehouse_pg_split_sql(const char *from, const char *const *quoted_keys, size_t n_keys,
                           int64_t rows_per_part, struct buf *sql)
{
    struct buf keys = {0}, texts = {0};
    int rc = 0;

    for (size_t k = 0; rc == 0 && k < n_keys; k++)
        rc = buf_printf(&keys, "%s%s", k ? ", " : "", quoted_keys[k]) ||
             buf_printf(&texts, "%s%s::text", k ? ", " : "", quoted_keys[k]);
    if (rc == 0)
        rc = buf_printf(sql,
                        "SELECT %s FROM (SELECT %s, row_number() OVER w AS inferd_rn, "
                        "lead(true, 1, false) OVER w AS inferd_more FROM %s WINDOW w AS "
                        "(ORDER BY %s)) AS inferd_keys WHERE inferd_rn %% %lld = 0 AND "
                        "inferd_more ORDER BY inferd_rn",
                        texts.data, keys.data, from, keys.data, (long long)rows_per_part);
    buf_release(&keys);
    buf_release(&texts);
    return rc == 0 ? 0 : -1;
}

/* `from` for the source: the table's quoted name, or the query as a subquery */
static int source_from(const struct warehouse_source *s, PGconn *conn, const char *table,
                       const char *query, struct buf *from, struct err *e)
{
    PGresult *res;
    size_t n;
    int rc = 0;

    if (query && query[0]) {
        n = strlen(query);
        while (n > 0 && strchr(" \t\r\n;", query[n - 1]))
            n--;
        return buf_printf(from, "(%.*s) AS inferd_source", (int)n, query) == 0
                   ? 0
                   : err_set(e, ERR_NOMEM, "out of memory");
    }
    res = warehouse_pg_query1(conn,
                              "SELECT pg_catalog.quote_ident(n.nspname) || '.' || "
                              "pg_catalog.quote_ident(c.relname) FROM pg_catalog.pg_class c "
                              "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                              "WHERE c.oid = pg_catalog.to_regclass($1)",
                              table);
    if (PQresultStatus(res) != PGRES_TUPLES_OK)
        rc = warehouse_pg_fail(s->shown, conn, res, ERR_INVALID, "table", e);
    else if (PQntuples(res) != 1) /* dropped since the source opened */
        rc = err_set(e, ERR_INVALID, "%s: no such table '%.100s'", s->shown, table);
    else if (buf_puts(from, PQgetvalue(res, 0, 0)) != 0)
        rc = err_set(e, ERR_NOMEM, "out of memory");
    PQclear(res);
    return rc;
}

/* Named key columns may hold NULL, which no range holds: an error naming the column. */
static int check_no_null_key(const struct warehouse_source *s, PGconn *conn, const char *from,
                             char *const *quoted, struct err *e)
{
    struct buf sql = {0};
    PGresult *res = NULL;
    int rc = buf_puts(&sql, "SELECT ");

    for (size_t k = 0; rc == 0 && k < s->n_keys; k++)
        rc = buf_printf(&sql, "%s%s IS NULL", k ? ", " : "", quoted[k]);
    rc = rc || buf_printf(&sql, " FROM %s WHERE ", from);
    for (size_t k = 0; rc == 0 && k < s->n_keys; k++)
        rc = buf_printf(&sql, "%s%s IS NULL", k ? " OR " : "", quoted[k]);
    if (rc != 0 || buf_puts(&sql, " LIMIT 1") != 0) {
        buf_release(&sql);
        return err_set(e, ERR_NOMEM, "out of memory");
    }
    res = PQexec(conn, sql.data);
    if (PQresultStatus(res) != PGRES_TUPLES_OK)
        rc = warehouse_pg_fail(s->shown, conn, res, ERR_INVALID, "key columns", e);
    for (size_t k = 0; rc == 0 && PQntuples(res) == 1 && k < s->n_keys; k++)
        if (strcmp(PQgetvalue(res, 0, (int)k), "t") == 0)
            rc = err_set(e, ERR_INVALID,
                         "%s: key column '%.64s' is NULL in some rows: a server batch job splits "
                         "the rows by their keys (name key columns that are never NULL)",
                         s->name, s->key_names[k]);
    PQclear(res);
    buf_release(&sql);
    return rc;
}

static int pg_split(const struct warehouse_source *s, const struct warehouse_spec *spec,
                    int64_t rows_per_part, struct warehouse_split *out, struct err *e)
{
    struct buf conninfo = {0}, from = {0}, sql = {0};
    char *table = NULL, **quoted = calloc(s->n_keys + 1, sizeof(*quoted));
    const char **values = calloc(s->n_keys + 1, sizeof(*values));
    PGconn *conn = NULL;
    PGresult *res = NULL;
    int rc = 0;

    if (!quoted || !values || warehouse_pg_split_uri(spec->uri, &conninfo, &table) != 0) {
        rc = err_set(e, ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    if ((rc = warehouse_pg_connect(s->shown, conninfo.data, &conn, e)) != 0 ||
        (rc = source_from(s, conn, table, spec->query, &from, e)) != 0)
        goto cleanup;
    for (size_t k = 0; k < s->n_keys; k++)
        if (!(quoted[k] = PQescapeIdentifier(conn, s->key_names[k], strlen(s->key_names[k])))) {
            rc = err_set(e, ERR_NOMEM, "out of memory");
            goto cleanup;
        }
    if (spec->key_columns && spec->key_columns[0] &&
        (rc = check_no_null_key(s, conn, from.data, quoted, e)) != 0)
        goto cleanup;
    if (warehouse_pg_split_sql(from.data, (const char *const *)quoted, s->n_keys, rows_per_part,
                               &sql) != 0) {
        rc = err_set(e, ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    res = PQexec(conn, sql.data);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        rc = warehouse_pg_fail(s->shown, conn, res, ERR_INVALID, "splitting by the keys", e);
        goto cleanup;
    }
    for (int row = 0; rc == 0 && row < PQntuples(res); row++) {
        for (size_t k = 0; rc == 0 && k < s->n_keys; k++) {
            if (PQgetisnull(res, row, (int)k))
                rc = err_set(e, ERR_INVALID,
                             "%s: key column '%.64s' is NULL in some rows: the rows cannot be "
                             "split by their keys (name key columns without NULL)",
                             s->name, s->key_names[k]);
            values[k] = PQgetvalue(res, row, (int)k);
        }
        if (rc == 0 && warehouse_split_add(out, values) != 0)
            rc = err_set(e, ERR_NOMEM, "out of memory");
    }
cleanup:
    PQclear(res);
    if (conn)
        PQfinish(conn);
    for (size_t k = 0; quoted && k < s->n_keys; k++)
        PQfreemem(quoted[k]);
    free(quoted);
    free(values);
    free(table);
    buf_release(&conninfo);
    buf_release(&from);
    buf_release(&sql);
    return rc;
}

const struct warehouse_split_ops warehouse_postgres_split_ops = {
    .supports = warehouse_pg_supports,
    .split = pg_split,
};
