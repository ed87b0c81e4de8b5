/*
 * postgres_sink.c: a PostgreSQL table as a batch sink (warehouse.h), with libpq.
 *
 * At open: connect (its own connection: the source's is busy with its COPY), take a session
 * advisory lock on the target's name (one writer at a time; a killed run's lock ends with its
 * connection), check the target TABLE and TABLE_errors when they exist (the key columns of the
 * source's types, `prediction`, `model_version` / `reason`, a unique index on exactly the
 * keys), drop a staging table a failed or killed run left, and create an UNLOGGED
 * TABLE__inferd_staging (keys, prediction, reason). Each chunk is one
 *   COPY staging FROM STDIN (FORMAT csv)
 * committed on its own, so memory holds one chunk. The commit, in one transaction: create the
 * target and errors tables if missing, upsert the scored rows, remove their keys from the
 * errors table, upsert the bad rows there, drop the staging table.
 */
#define _GNU_SOURCE
#include "warehouse/postgres_internal.h"
#include "core/log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct pg_sink {
    PGconn *conn;
    char *target, *errors, *staging; /* quoted SCHEMA.TABLE */
    struct buf keys;                 /* quoted "k1", "k2" */
    struct buf match;                /* e."k1" = s."k1" AND ... */
    struct buf create;               /* CREATE TABLE IF NOT EXISTS ... for both */
    char *version;                   /* quoted literal */
    int committed;
};

/* pg_exec: runs `sql` (no result rows wanted); 0 or a masked error saying `what` */
static int pg_run(struct warehouse_sink *k, PGconn *conn, const char *sql, const char *what,
                  struct err *e)
{
    PGresult *res = PQexec(conn, sql);
    int rc = 0;

    if (PQresultStatus(res) != PGRES_COMMAND_OK && PQresultStatus(res) != PGRES_TUPLES_OK)
        rc = warehouse_pg_fail(k->shown, conn, res, ERR_INVALID, what, e);
    PQclear(res);
    return rc;
}

static char *quoted2(PGconn *conn, const char *schema, const char *table, const char *suffix)
{
    char *a = PQescapeIdentifier(conn, schema, strlen(schema)), *b = NULL, *name = NULL,
         *out = NULL;

    if (a && asprintf(&name, "%s%s", table, suffix) >= 0)
        b = PQescapeIdentifier(conn, name, strlen(name));
    if (b && asprintf(&out, "%s.%s", a, b) < 0)
        out = NULL;
    PQfreemem(a);
    PQfreemem(b);
    free(name);
    return out;
}

/*
 * Checks an existing table (`schema`.`name`) for the columns `want` (name, type pairs, n of
 * them) and a unique index on exactly the n_keys first. 0 when it does not exist (*exists 0).
 */
static int check_table(struct warehouse_sink *k, PGconn *conn, const char *schema, const char *name,
                       const char *const *want, size_t n, size_t n_keys, int *exists, struct err *e)
{
    const char *params[2] = {schema, name};
    PGresult *res = PQexecParams(
        conn,
        "SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod) "
        "FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid "
        "JOIN pg_catalog.pg_namespace ns ON ns.oid = c.relnamespace "
        "WHERE ns.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
        2, NULL, params, NULL, NULL, 0);
    int rc = 0;

    *exists = 0;
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        rc = warehouse_pg_fail(k->shown, conn, res, ERR_INVALID, "table", e);
        PQclear(res);
        return rc;
    }
    *exists = PQntuples(res) > 0;
    for (size_t i = 0; *exists && rc == 0 && i < n; i++) {
        int row = -1;
        for (int r = 0; r < PQntuples(res); r++)
            if (strcmp(PQgetvalue(res, r, 0), want[2 * i]) == 0)
                row = r;
        if (row < 0)
            rc = err_set(e, ERR_INVALID, "%s.%s: no column '%.64s' (%s): the output table needs it",
                         schema, name, want[2 * i], want[2 * i + 1]);
        else if (strcmp(PQgetvalue(res, row, 1), want[2 * i + 1]) != 0 &&
                 !(strcmp(want[2 * i + 1], "text") == 0 &&
                   strncmp(PQgetvalue(res, row, 1), "character varying", 17) == 0))
            rc = err_set(e, ERR_INVALID, "%s.%s: column '%.64s' has type %s; the output needs %s",
                         schema, name, want[2 * i], PQgetvalue(res, row, 1), want[2 * i + 1]);
    }
    PQclear(res);
    if (rc != 0 || !*exists)
        return rc;
    /* ON CONFLICT needs a unique index on exactly the keys */
    res = PQexecParams(
        conn,
        "SELECT i.indexrelid::text, a.attname FROM pg_catalog.pg_index i "
        "JOIN pg_catalog.pg_class c ON c.oid = i.indrelid "
        "JOIN pg_catalog.pg_namespace ns ON ns.oid = c.relnamespace "
        "JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
        "WHERE ns.nspname = $1 AND c.relname = $2 AND i.indisunique AND i.indpred IS NULL "
        "AND i.indexprs IS NULL ORDER BY 1",
        2, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        rc = warehouse_pg_fail(k->shown, conn, res, ERR_INVALID, "table", e);
        PQclear(res);
        return rc;
    }
    int found = 0;
    for (int r = 0; !found && r < PQntuples(res);) {
        int end = r, all = 1;
        while (end < PQntuples(res) && strcmp(PQgetvalue(res, end, 0), PQgetvalue(res, r, 0)) == 0)
            end++;
        for (int q = r; q < end; q++) {
            size_t j;
            for (j = 0; j < n_keys && strcmp(want[2 * j], PQgetvalue(res, q, 1)) != 0; j++)
                ;
            all &= j < n_keys;
        }
        found = all && (size_t)(end - r) == n_keys;
        r = end;
    }
    PQclear(res);
    if (!found)
        rc = err_set(e, ERR_INVALID,
                     "%s.%s: no unique constraint on exactly the key columns: rows are upserted "
                     "by them",
                     schema, name);
    return rc;
}

/* Column definitions "k1" type, ... into `b`; then `extra` */
static int put_defs(PGconn *conn, struct buf *b, const struct warehouse_sink_spec *spec,
                    const char *extra)
{
    for (size_t i = 0; i < spec->n_keys; i++) {
        char *q = PQescapeIdentifier(conn, spec->key_names[i], strlen(spec->key_names[i]));
        int rc = q ? buf_printf(b, "%s %s, ", q, spec->key_types[i]) : -1;
        PQfreemem(q);
        if (rc != 0)
            return -1;
    }
    return buf_puts(b, extra);
}

/* The target's schema and name as PostgreSQL reads `table` (unquoted parts folded, no schema:
 * the current one), into k->name and the quoted names of the three tables. */
static int resolve_names(struct warehouse_sink *k, struct pg_sink *pg, const char *table,
                         char **schema, char **rel, struct err *e)
{
    PGresult *res = warehouse_pg_query1(
        pg->conn,
        "SELECT CASE WHEN cardinality(p) = 2 THEN p[1] ELSE current_schema() END, "
        "p[cardinality(p)], cardinality(p) > 2 FROM pg_catalog.parse_ident($1) AS p",
        table);
    int rc = 0;

    if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1)
        rc = warehouse_pg_fail(k->shown, pg->conn, res, ERR_INVALID, "output table", e);
    else if (strcmp(PQgetvalue(res, 0, 2), "t") == 0 || PQgetisnull(res, 0, 0))
        rc = err_set(e, ERR_INVALID, "%s: output table '%.100s': give [SCHEMA.]TABLE", k->shown,
                     table);
    else if (!(*schema = strdup(PQgetvalue(res, 0, 0))) ||
             !(*rel = strdup(PQgetvalue(res, 0, 1))) ||
             asprintf(&k->name, "%s.%s", *schema, *rel) < 0)
        k->name = NULL, rc = err_set(e, ERR_NOMEM, "out of memory");
    PQclear(res);
    if (rc == 0 && strlen(*rel) + strlen("__inferd_staging") > 63)
        rc = err_set(e, ERR_INVALID,
                     "%s: the table's name is longer than 47 bytes: its staging table "
                     "%s__inferd_staging would not fit PostgreSQL's 63",
                     k->name, *rel);
    if (rc != 0)
        return rc;
    pg->target = quoted2(pg->conn, *schema, *rel, "");
    pg->errors = quoted2(pg->conn, *schema, *rel, "_errors");
    pg->staging = quoted2(pg->conn, *schema, *rel, "__inferd_staging");
    return pg->target && pg->errors && pg->staging ? 0 : err_set(e, ERR_NOMEM, "out of memory");
}

/*
 * One writer: a second run would drop the first's staging table. A killed run's lock goes
 * with its session, which the server ends as soon as it sees the connection closed: waited
 * for a little, not failed at once.
 */
static int take_lock(struct warehouse_sink *k, struct pg_sink *pg, struct err *e)
{
    char *lock = NULL;
    PGresult *res;
    int rc = 0;

    if (asprintf(&lock, "inferd batch %s", k->name) < 0)
        return err_set(e, ERR_NOMEM, "out of memory");
    PQclear(PQexec(pg->conn, "SET lock_timeout = '10s'"));
    res = warehouse_pg_query1(pg->conn,
                              "SELECT pg_catalog.pg_advisory_lock(pg_catalog.hashtext($1))", lock);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
        if (state && strcmp(state, "55P03") == 0) /* lock_not_available */
            rc = err_set(e, ERR_INVALID, "%s: another inferd batch run is writing to it", k->name);
        else
            rc = warehouse_pg_fail(k->shown, pg->conn, res, ERR_INVALID, "lock", e);
    }
    PQclear(res);
    PQclear(PQexec(pg->conn, "SET lock_timeout = 0"));
    free(lock);
    return rc;
}

/*
 * The target and its errors table, checked as they are or planned (pg->create) for the
 * commit; pg->keys and pg->match for the merge.
 */
static int plan_tables(struct warehouse_sink *k, struct pg_sink *pg,
                       const struct warehouse_sink_spec *spec, const char *schema, const char *rel,
                       const char *pred, struct err *e)
{
    const char **want = calloc(2 * spec->n_keys + 4, sizeof(*want));
    char *errors_rel = NULL;
    int rc = want && asprintf(&errors_rel, "%s_errors", rel) >= 0 ? 0 : -1, exists = 0;

    for (size_t i = 0; rc == 0 && i < spec->n_keys; i++) {
        char *q = PQescapeIdentifier(pg->conn, spec->key_names[i], strlen(spec->key_names[i]));
        want[2 * i] = spec->key_names[i];
        want[2 * i + 1] = spec->key_types[i];
        if (!q || buf_printf(&pg->keys, "%s%s", i ? ", " : "", q) != 0 ||
            buf_printf(&pg->match, "%se.%s = s.%s", i ? " AND " : "", q, q) != 0)
            rc = -1;
        PQfreemem(q);
    }
    if (rc != 0) {
        rc = err_set(e, ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    want[2 * spec->n_keys] = "prediction";
    want[2 * spec->n_keys + 1] = pred;
    want[2 * spec->n_keys + 2] = "model_version";
    want[2 * spec->n_keys + 3] = "text";
    rc = check_table(k, pg->conn, schema, rel, want, spec->n_keys + 2, spec->n_keys, &exists, e);
    if (rc == 0 && !exists &&
        (buf_printf(&pg->create, "CREATE TABLE IF NOT EXISTS %s (", pg->target) ||
         put_defs(pg->conn, &pg->create, spec, "") ||
         buf_printf(&pg->create, "prediction %s, model_version text, UNIQUE (%s)); ", pred,
                    pg->keys.data)))
        rc = err_set(e, ERR_NOMEM, "out of memory");
    if (rc != 0)
        goto cleanup;
    want[2 * spec->n_keys] = "reason";
    want[2 * spec->n_keys + 1] = "text";
    rc = check_table(k, pg->conn, schema, errors_rel, want, spec->n_keys + 1, spec->n_keys, &exists,
                     e);
    if (rc == 0 && !exists &&
        (buf_printf(&pg->create, "CREATE TABLE IF NOT EXISTS %s (", pg->errors) ||
         put_defs(pg->conn, &pg->create, spec, "") ||
         buf_printf(&pg->create, "reason text, UNIQUE (%s)); ", pg->keys.data)))
        rc = err_set(e, ERR_NOMEM, "out of memory");
cleanup:
    free(want);
    free(errors_rel);
    return rc;
}

/* A failed or killed run's staging table goes; this run's is new. */
static int new_staging(struct warehouse_sink *k, struct pg_sink *pg,
                       const struct warehouse_sink_spec *spec, const char *pred, struct err *e)
{
    PGresult *res =
        warehouse_pg_query1(pg->conn, "SELECT pg_catalog.to_regclass($1) IS NOT NULL", pg->staging);
    struct buf sql = {0};
    int rc;

    if (PQresultStatus(res) == PGRES_TUPLES_OK && strcmp(PQgetvalue(res, 0, 0), "t") == 0)
        log_warn("warehouse", "discarding the staging table of a run that did not finish",
                 "name=%s__inferd_staging", k->name);
    PQclear(res);
    if (buf_printf(&sql, "DROP TABLE IF EXISTS %s; CREATE UNLOGGED TABLE %s (", pg->staging,
                   pg->staging) ||
        put_defs(pg->conn, &sql, spec, "") || buf_printf(&sql, "prediction %s, reason text)", pred))
        rc = err_set(e, ERR_NOMEM, "out of memory");
    else
        rc = pg_run(k, pg->conn, sql.data, "staging table", e);
    buf_release(&sql);
    return rc;
}

static int sink_open(struct warehouse_sink *k, const struct warehouse_sink_spec *spec,
                     struct err *e)
{
    struct pg_sink *pg = calloc(1, sizeof(*pg));
    struct buf conninfo = {0};
    char *table = NULL, *schema = NULL, *rel = NULL;
    const char *pred = spec->per_row > 1 ? "double precision[]" : "double precision";
    int rc = 0;

    if (!pg || warehouse_pg_split_uri(spec->uri, &conninfo, &table) != 0) {
        free(pg);
        rc = err_set(e, ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    k->impl = pg;
    if (!table || !table[0]) {
        rc = err_set(e, ERR_INVALID, "%s: name the output table (?table=SCHEMA.TABLE)", k->shown);
        goto cleanup;
    }
    if ((rc = warehouse_pg_connect(k->shown, conninfo.data, &pg->conn, e)) != 0)
        goto cleanup;
    pg->version = PQescapeLiteral(pg->conn, spec->model_version, strlen(spec->model_version));
    if (!pg->version)
        rc = err_set(e, ERR_NOMEM, "out of memory");
    if (rc == 0)
        rc = resolve_names(k, pg, table, &schema, &rel, e);
    if (rc == 0)
        rc = take_lock(k, pg, e);
    if (rc == 0)
        rc = plan_tables(k, pg, spec, schema, rel, pred, e);
    if (rc == 0)
        rc = new_staging(k, pg, spec, pred, e);
cleanup:
    buf_release(&conninfo);
    free(table);
    free(schema);
    free(rel);
    return rc;
}

static int sink_write(struct warehouse_sink *k, struct err *e)
{
    struct pg_sink *pg = k->impl;
    struct buf sql = {0};
    PGresult *res;
    int rc = 0;

    if (buf_printf(&sql, "COPY %s FROM STDIN (FORMAT csv)", pg->staging) != 0) {
        buf_release(&sql);
        return err_set(e, ERR_NOMEM, "out of memory");
    }
    res = PQexec(pg->conn, sql.data);
    buf_release(&sql);
    if (PQresultStatus(res) != PGRES_COPY_IN) {
        rc = warehouse_pg_fail(k->shown, pg->conn, res, ERR_IO, "writing", e);
        PQclear(res);
        return rc;
    }
    PQclear(res);
    if (PQputCopyData(pg->conn, k->rows.data, (int)k->rows.len) != 1 ||
        PQputCopyEnd(pg->conn, NULL) != 1)
        rc = warehouse_pg_fail(k->shown, pg->conn, NULL, ERR_IO, "writing", e);
    while ((res = PQgetResult(pg->conn)) != NULL) {
        if (rc == 0 && PQresultStatus(res) != PGRES_COMMAND_OK)
            rc = warehouse_pg_fail(k->shown, pg->conn, res, ERR_IO, "writing", e);
        PQclear(res);
    }
    return rc;
}

static int sink_commit(struct warehouse_sink *k, struct err *e)
{
    struct pg_sink *pg = k->impl;
    struct buf sql = {0};
    int rc = 0;

    rc = buf_printf(
        &sql,
        "BEGIN; %s"
        "INSERT INTO %s AS t (%s, prediction, model_version) SELECT %s, prediction, %s FROM %s "
        "WHERE reason IS NULL ON CONFLICT (%s) DO UPDATE SET prediction = "
        "EXCLUDED.prediction, model_version = EXCLUDED.model_version; "
        "DELETE FROM %s AS e USING %s AS s WHERE s.reason IS NULL AND %s; "
        "INSERT INTO %s (%s, reason) SELECT %s, reason FROM %s WHERE reason IS NOT NULL "
        "ON CONFLICT (%s) DO UPDATE SET reason = EXCLUDED.reason; "
        "DROP TABLE %s; COMMIT",
        pg->create.data ? pg->create.data : "", pg->target, pg->keys.data, pg->keys.data,
        pg->version, pg->staging, pg->keys.data, pg->errors, pg->staging, pg->match.data,
        pg->errors, pg->keys.data, pg->keys.data, pg->staging, pg->keys.data, pg->staging);
    if (rc != 0)
        rc = err_set(e, ERR_NOMEM, "out of memory");
    else
        rc = pg_run(k, pg->conn, sql.data, "merging into the table", e);
    if (rc != 0)
        PQclear(PQexec(pg->conn, "ROLLBACK"));
    pg->committed = rc == 0;
    buf_release(&sql);
    return rc;
}

static void sink_close(struct warehouse_sink *k)
{
    struct pg_sink *pg = k->impl;

    if (!pg)
        return;
    if (pg->conn && pg->staging && !pg->committed && PQstatus(pg->conn) == CONNECTION_OK) {
        struct buf sql = {0};
        if (buf_printf(&sql, "DROP TABLE IF EXISTS %s", pg->staging) == 0)
            PQclear(PQexec(pg->conn, sql.data)); /* best effort: the next run drops it too */
        buf_release(&sql);
    }
    if (pg->conn)
        PQfinish(pg->conn);
    free(pg->target);
    free(pg->errors);
    free(pg->staging);
    PQfreemem(pg->version);
    buf_release(&pg->keys);
    buf_release(&pg->match);
    buf_release(&pg->create);
    free(pg);
    k->impl = NULL;
}

const struct warehouse_sink_ops warehouse_postgres_sink_ops = {
    .supports = warehouse_pg_supports,
    .open = sink_open,
    .write = sink_write,
    .commit = sink_commit,
    .close = sink_close,
};
