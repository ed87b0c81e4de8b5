/*
 * postgres.c: a PostgreSQL table or query as a batch record source (warehouse.h), with libpq.
 *
 * At open: connect (the URI without its `table` parameter is libpq's own, so PGPASSWORD,
 * PGPASSFILE and PGSERVICE work as for psql), find the table in the catalog and its primary
 * key when no key columns were named, and describe the columns the source yields (a prepared
 * statement described, not run): each must be a key, a number, a boolean, or the one array
 * column holding the whole row. Then one statement,
 *   COPY (SELECT keys..., features... FROM source ORDER BY keys...) TO STDOUT
 * streams the rows in key order through PQgetCopyData, one row per call, so memory holds a
 * row at a time whatever the table's size; rows are rendered by copy_text.c. The text format
 * was measured against CSV on 200k rows x 28 real columns: the same speed, and it splits without
 * quotes (README, "Tables").
 *
 * Messages never hold a password: the location is shown masked, and the password libpq used
 * (from the URI or the environment) is replaced by *** in any message the server or libpq
 * gives.
 */
#define _GNU_SOURCE
#include "warehouse/warehouse_internal.h"
#include "core/log.h"

#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* type oids (pg_type.dat): stable across releases */
#define OID_BOOL 16
#define OID_INT8 20
#define OID_INT2 21
#define OID_INT4 23
#define OID_FLOAT4 700
#define OID_FLOAT8 701
#define OID_FLOAT4_ARRAY 1021
#define OID_FLOAT8_ARRAY 1022
#define OID_NUMERIC 1700

struct pg_source {
    PGconn *conn;
    struct warehouse_row_layout layout;
    unsigned char *key_is_number;
    int64_t rows;
    int done;
};

static int pg_supports(const char *uri)
{
    return strncmp(uri, "postgresql://", 13) == 0 || strncmp(uri, "postgres://", 11) == 0;
}

/* `msg` on one line, without the password libpq used: into `out` */
static void clean(PGconn *conn, const char *msg, char *out, size_t size)
{
    const char *pw = conn ? PQpass(conn) : NULL;
    size_t n = 0, pw_len = pw ? strlen(pw) : 0;

    for (const char *p = msg ? msg : ""; *p && n + 4 < size;) {
        if (pw_len > 0 && strncmp(p, pw, pw_len) == 0) {
            memcpy(out + n, "***", 3);
            n += 3;
            p += pw_len;
            continue;
        }
        out[n++] = *p == '\n' || *p == '\t' || *p == '\r' ? ' ' : *p;
        p++;
    }
    while (n > 0 && out[n - 1] == ' ')
        n--;
    out[n] = '\0';
}

static int pg_fail(const char *shown, PGconn *conn, const PGresult *res, int code,
                   const char *what, struct err *e)
{
    char msg[200];

    /* the server's primary message: its LINE/HINT context would quote the statement */
    const char *primary = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;

    clean(conn,
          primary ? primary
          : res   ? PQresultErrorMessage(res)
                  : PQerrorMessage(conn),
          msg, sizeof(msg));
    if (!msg[0] && conn)
        clean(conn, PQerrorMessage(conn), msg, sizeof(msg));
    return err_set(e, code, "%s: %s: %s", shown, what, msg);
}

/* Splits `uri` into libpq's conninfo (without `table=`) and the table (NULL if none). */
static int split_uri(const char *uri, struct buf *conninfo, char **table)
{
    const char *q = strchr(uri, '?');
    char sep = '?';

    *table = NULL;
    if (buf_append(conninfo, uri, q ? (size_t)(q - uri) : strlen(uri)) != 0)
        return -1;
    while (q && *q) {
        size_t n = strcspn(q + 1, "&");
        if (strncmp(q + 1, "table=", 6) == 0) {
            free(*table);
            if (!(*table = strndup(q + 7, n - 6)))
                return -1;
        } else if (n > 0) {
            if (buf_printf(conninfo, "%c%.*s", sep, (int)n, q + 1) != 0)
                return -1;
            sep = '&';
        }
        q = q[1 + n] ? q + 1 + n : NULL;
    }
    return buf_append(conninfo, "", 1);
}

static PGresult *query1(PGconn *conn, const char *sql, const char *param)
{
    return PQexecParams(conn, sql, param ? 1 : 0, NULL, param ? &param : NULL, NULL, NULL, 0);
}

/* The table's "SCHEMA.TABLE" and its quoted form for SQL; ERR_INVALID when there is none. */
static int find_table(struct warehouse_source *s, PGconn *conn, const char *table, struct buf *from,
                      char **oid, struct err *e)
{
    PGresult *res = query1(conn,
                           "SELECT n.nspname, c.relname, c.oid::text FROM pg_catalog.pg_class c "
                           "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                           "WHERE c.oid = pg_catalog.to_regclass($1)",
                           table);
    char *ns = NULL, *rel = NULL;
    int rc = 0;

    if (PQresultStatus(res) != PGRES_TUPLES_OK)
        rc = pg_fail(s->shown, conn, res, ERR_INVALID, "table", e);
    else if (PQntuples(res) != 1)
        rc = err_set(e, ERR_INVALID, "%s: no such table '%.100s'", s->shown, table);
    else if (!(ns = PQescapeIdentifier(conn, PQgetvalue(res, 0, 0),
                                       strlen(PQgetvalue(res, 0, 0)))) ||
             !(rel = PQescapeIdentifier(conn, PQgetvalue(res, 0, 1),
                                        strlen(PQgetvalue(res, 0, 1)))) ||
             buf_printf(from, "%s.%s", ns, rel) != 0 ||
             asprintf(&s->name, "%s.%s", PQgetvalue(res, 0, 0), PQgetvalue(res, 0, 1)) < 0 ||
             !(*oid = strdup(PQgetvalue(res, 0, 2))))
        rc = err_set(e, ERR_NOMEM, "out of memory");
    PQfreemem(ns);
    PQfreemem(rel);
    PQclear(res);
    return rc;
}

/* The key columns: as named, else the table's primary key. */
static int find_keys(struct warehouse_source *s, PGconn *conn, const char *spec, const char *oid,
                     struct err *e)
{
    PGresult *res = NULL;
    int rc = 0;

    s->key_names = calloc(64, sizeof(*s->key_names));
    s->key_types = calloc(64, sizeof(*s->key_types));
    if (!s->key_names || !s->key_types)
        return err_set(e, ERR_NOMEM, "out of memory");
    if (spec && spec[0]) {
        for (const char *p = spec; rc == 0 && *p && s->n_keys < 64;) {
            size_t n = strcspn(p, ",");
            const char *a = p, *b = p + n;
            while (a < b && (*a == ' ' || *a == '\t'))
                a++;
            while (b > a && (b[-1] == ' ' || b[-1] == '\t'))
                b--;
            if (!(s->key_names[s->n_keys++] = strndup(a, (size_t)(b - a))))
                rc = err_set(e, ERR_NOMEM, "out of memory");
            p += n + (p[n] == ',');
        }
        return rc;
    }
    if (!oid)
        return err_set(e, ERR_INVALID,
                       "%s: a query source needs --key-columns: they order the rows and name "
                       "them in outputs and errors",
                       s->shown);
    res = query1(conn,
                 "SELECT a.attname FROM pg_catalog.pg_index i JOIN pg_catalog.pg_attribute a "
                 "ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
                 "WHERE i.indrelid = $1::oid AND i.indisprimary "
                 "ORDER BY pg_catalog.array_position(i.indkey::int2[], a.attnum)",
                 oid);
    if (PQresultStatus(res) != PGRES_TUPLES_OK)
        rc = pg_fail(s->shown, conn, res, ERR_INVALID, "primary key", e);
    else if (PQntuples(res) == 0)
        rc = err_set(e, ERR_INVALID,
                     "table %s has no primary key: name the columns that identify a row with "
                     "--key-columns",
                     s->name);
    for (int i = 0; rc == 0 && i < PQntuples(res) && s->n_keys < 64; i++)
        if (!(s->key_names[s->n_keys++] = strdup(PQgetvalue(res, i, 0))))
            rc = err_set(e, ERR_NOMEM, "out of memory");
    PQclear(res);
    return rc;
}

static void type_name_mod(PGconn *conn, Oid type, int mod, char *out, size_t size)
{
    char oid[16], typmod[16];
    const char *params[2] = {oid, typmod};
    PGresult *res;

    snprintf(oid, sizeof(oid), "%u", type);
    snprintf(typmod, sizeof(typmod), "%d", mod);
    res = PQexecParams(conn, "SELECT pg_catalog.format_type($1::oid, NULLIF($2::int, -1))", 2,
                       NULL, params, NULL, NULL, 0);
    snprintf(out, size, "%s",
             PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1 ? PQgetvalue(res, 0, 0)
                                                                           : oid);
    PQclear(res);
}

static void type_name(PGconn *conn, Oid type, char *out, size_t size)
{
    type_name_mod(conn, type, -1, out, size);
}

static int is_number_type(Oid t)
{
    return t == OID_INT2 || t == OID_INT4 || t == OID_INT8 || t == OID_FLOAT4 || t == OID_FLOAT8 ||
           t == OID_NUMERIC;
}

/* Appends a column's quoted name (and a cast for booleans) to `sql`. */
static int put_column(PGconn *conn, struct buf *sql, const char *name, int as_int)
{
    char *q = PQescapeIdentifier(conn, name, strlen(name));
    int rc = q ? buf_printf(sql, "%s%s", q, as_int ? "::int" : "") : -1;

    PQfreemem(q);
    return rc;
}

/*
 * Checks the described columns against the keys and the model, and writes the SELECT list
 * (keys first, then the features in the model's order when it names them) into `sql`.
 */
static int plan_columns(struct warehouse_source *s, struct pg_source *pg, const PGresult *desc,
                        const struct warehouse_spec *spec, struct buf *sql, struct err *e)
{
    int n = PQnfields(desc), n_features = 0, array_col = -1, rc = 0;
    int *order = calloc((size_t)(n > 0 ? n : 1), sizeof(*order));
    unsigned char *role = calloc((size_t)(n > 0 ? n : 1), 1); /* 1 key, 2 feature */
    char type[128];

    if (!order || !role || !(pg->key_is_number = calloc(s->n_keys + 1, 1))) {
        rc = err_set(e, ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    for (size_t k = 0; rc == 0 && k < s->n_keys; k++) {
        int col = -1; /* by exact name: PQfnumber() would fold it to lower case */
        for (int i = 0; i < n; i++)
            if (strcmp(PQfname(desc, i), s->key_names[k]) == 0)
                col = i;
        if (col < 0) {
            rc = err_set(e, ERR_INVALID, "%s: no key column '%.64s' among its columns", s->name,
                         s->key_names[k]);
            break;
        }
        role[col] = 1;
        pg->key_is_number[k] = (unsigned char)is_number_type(PQftype(desc, col));
        type_name_mod(pg->conn, PQftype(desc, col), PQfmod(desc, col), type, sizeof(type));
        if (!(s->key_types[k] = strdup(type))) {
            rc = err_set(e, ERR_NOMEM, "out of memory");
            break;
        }
        rc = (k ? buf_puts(sql, ", ") : 0) || put_column(pg->conn, sql, s->key_names[k], 0);
        if (rc)
            rc = err_set(e, ERR_NOMEM, "out of memory");
    }
    for (int i = 0; rc == 0 && i < n; i++) {
        Oid t = PQftype(desc, i);
        if (role[i])
            continue;
        if (t == OID_FLOAT4_ARRAY || t == OID_FLOAT8_ARRAY) {
            array_col = i;
        } else if (!is_number_type(t) && t != OID_BOOL) {
            type_name(pg->conn, t, type, sizeof(type));
            rc = err_set(e, ERR_INVALID,
                         "%s: column '%.64s' has type %s: a feature column must be smallint, "
                         "integer, bigint, real, double precision, numeric or boolean, or the "
                         "one real[] or double precision[] column (or name it in --key-columns)",
                         s->name, PQfname(desc, i), type);
            break;
        }
        role[i] = 2;
        order[n_features++] = i;
    }
    if (rc == 0 && n_features == 0)
        rc = err_set(e, ERR_INVALID, "%s: no feature column besides the key columns", s->name);
    if (rc == 0 && array_col >= 0 && n_features > 1) {
        type_name(pg->conn, PQftype(desc, array_col), type, sizeof(type));
        rc = err_set(e, ERR_INVALID,
                     "%s: column '%.64s' (%s) is an array: an array column must hold the whole "
                     "row, the only feature column",
                     s->name, PQfname(desc, array_col), type);
    }
    if (rc == 0 && array_col < 0 && spec->n_features > 0) {
        /* by name, as a CSV header: in the model's order */
        for (int i = 0; rc == 0 && i < n; i++) {
            size_t j;
            for (j = 0; role[i] == 2 && j < spec->n_features; j++)
                if (strcmp(spec->feature_names[j], PQfname(desc, i)) == 0)
                    break;
            if (role[i] == 2 && j == spec->n_features)
                rc = err_set(e, ERR_INVALID,
                             "%s: column '%.64s' is neither a feature of the model nor a key "
                             "column",
                             s->name, PQfname(desc, i));
        }
        for (size_t j = 0; rc == 0 && j < spec->n_features; j++) {
            int col = -1;
            for (int i = 0; i < n; i++)
                if (role[i] == 2 && strcmp(spec->feature_names[j], PQfname(desc, i)) == 0)
                    col = i;
            if (col < 0)
                rc = err_set(e, ERR_INVALID, "%s: no column for feature '%.64s' of the model",
                             s->name, spec->feature_names[j]);
            else
                order[j] = col;
        }
        n_features = (int)spec->n_features;
    } else if (rc == 0 && array_col < 0 && n_features != spec->width) {
        rc = err_set(e, ERR_INVALID,
                     "%s: %d feature columns besides the key columns; the model takes %lld "
                     "features (it has no feature names, so columns are taken in order)",
                     s->name, n_features, (long long)spec->width);
    }
    for (int j = 0; rc == 0 && j < n_features; j++) {
        const char *name = PQfname(desc, order[j]);
        if (buf_puts(sql, ", ") != 0 ||
            put_column(pg->conn, sql, name, PQftype(desc, order[j]) == OID_BOOL) != 0 ||
            buf_printf(&s->features, "%s%s", j ? "," : "", name) != 0)
            rc = err_set(e, ERR_NOMEM, "out of memory");
    }
    pg->layout.n_keys = s->n_keys;
    pg->layout.n_columns = s->n_keys + (size_t)n_features;
cleanup:
    free(order);
    free(role);
    return rc;
}

/* The query without trailing blanks and semicolons, into `out` */
static int trimmed_query(const char *q, struct buf *out)
{
    size_t n = strlen(q);

    while (n > 0 && strchr(" \t\r\n;", q[n - 1]))
        n--;
    return buf_append(out, q, n) || buf_append(out, "", 1);
}

static int pg_open(struct warehouse_source *s, const struct warehouse_spec *spec, struct err *e)
{
    struct pg_source *pg = calloc(1, sizeof(*pg));
    struct buf conninfo = {0}, from = {0}, sql = {0}, copy = {0};
    char *table = NULL, *oid = NULL;
    PGresult *res = NULL;
    int rc = 0, is_query = spec->query && spec->query[0];

    if (!pg || split_uri(spec->uri, &conninfo, &table) != 0) {
        free(pg);
        rc = err_set(e, ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    s->impl = pg;
    if (is_query && table) {
        rc = err_set(e, ERR_INVALID, "%s: give a table (?table=) or --input-query, not both",
                     s->shown);
        goto cleanup;
    }
    if (!is_query && (!table || !table[0])) {
        rc = err_set(e, ERR_INVALID, "%s: name a table (?table=SCHEMA.TABLE) or give --input-query",
                     s->shown);
        goto cleanup;
    }
    pg->conn = PQconnectdb(conninfo.data);
    if (!pg->conn) {
        rc = err_set(e, ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    if (PQstatus(pg->conn) != CONNECTION_OK) {
        rc = pg_fail(s->shown, pg->conn, NULL, ERR_IO, "cannot connect", e);
        goto cleanup;
    }
    if (is_query) {
        if (!(s->name = strdup("query")) || buf_puts(&from, "(") ||
            trimmed_query(spec->query, &sql))
            rc = err_set(e, ERR_NOMEM, "out of memory");
        else if (buf_printf(&from, "%s) AS inferd_source", sql.data) != 0)
            rc = err_set(e, ERR_NOMEM, "out of memory");
    } else {
        rc = find_table(s, pg->conn, table, &from, &oid, e);
    }
    if (rc == 0)
        rc = find_keys(s, pg->conn, spec->key_columns, oid, e);
    if (rc != 0)
        goto cleanup;
    /* the columns the source yields, without running it */
    sql.len = 0;
    if (buf_printf(&sql, "SELECT * FROM %s", from.data) != 0) {
        rc = err_set(e, ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    res = PQprepare(pg->conn, "", sql.data, 0, NULL);
    if (PQresultStatus(res) != PGRES_COMMAND_OK) {
        rc = pg_fail(s->shown, pg->conn, res, ERR_INVALID, is_query ? "query" : s->name, e);
        goto cleanup;
    }
    PQclear(res);
    res = PQdescribePrepared(pg->conn, "");
    if (PQresultStatus(res) != PGRES_COMMAND_OK) {
        rc = pg_fail(s->shown, pg->conn, res, ERR_INVALID, is_query ? "query" : s->name, e);
        goto cleanup;
    }
    pg->layout.key_names = s->key_names;
    pg->layout.keys_json = spec->keys_json;
    if (buf_puts(&copy, "COPY (SELECT ") != 0) {
        rc = err_set(e, ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    rc = plan_columns(s, pg, res, spec, &copy, e);
    pg->layout.key_is_number = pg->key_is_number;
    if (rc == 0 && buf_printf(&copy, " FROM %s ORDER BY ", from.data) != 0)
        rc = err_set(e, ERR_NOMEM, "out of memory");
    for (size_t k = 0; rc == 0 && k < s->n_keys; k++)
        if ((k && buf_puts(&copy, ", ")) || put_column(pg->conn, &copy, s->key_names[k], 0) ||
            (k + 1 == s->n_keys && buf_puts(&copy, ") TO STDOUT")))
            rc = err_set(e, ERR_NOMEM, "out of memory");
    if (rc != 0)
        goto cleanup;
    PQclear(res);
    res = PQexec(pg->conn, copy.data);
    if (PQresultStatus(res) != PGRES_COPY_OUT)
        rc = pg_fail(s->shown, pg->conn, res, ERR_INVALID, is_query ? "query" : s->name, e);
cleanup:
    PQclear(res);
    buf_release(&conninfo);
    buf_release(&from);
    buf_release(&sql);
    buf_release(&copy);
    free(table);
    free(oid);
    return rc;
}

static int pg_read_row(struct warehouse_source *s, struct buf *features, struct buf *keys,
                       struct err *e)
{
    struct pg_source *pg = s->impl;
    char *row = NULL, *why;
    int n, rc = 0;

    if (pg->done)
        return 0;
    n = PQgetCopyData(pg->conn, &row, 0);
    if (n == -1) {
        PGresult *res = PQgetResult(pg->conn);
        pg->done = 1;
        if (PQresultStatus(res) != PGRES_COMMAND_OK)
            rc = pg_fail(s->shown, pg->conn, res, ERR_IO, "reading", e);
        PQclear(res);
        return rc ? rc : 0;
    }
    if (n < 0)
        return pg_fail(s->shown, pg->conn, NULL, ERR_IO, "reading", e);
    pg->rows++;
    why = warehouse_copy_row(
        &pg->layout, row, n > 0 && row[n - 1] == '\n' ? (size_t)n - 1 : (size_t)n, features, keys);
    PQfreemem(row);
    if (why) {
        rc = err_set(e, ERR_IO, "%s: row %lld as the server sent it: %s", s->shown,
                     (long long)pg->rows, why);
        free(why);
        return rc;
    }
    return 1;
}

static void pg_close(struct warehouse_source *s)
{
    struct pg_source *pg = s->impl;

    if (!pg)
        return;
    if (pg->conn)
        PQfinish(pg->conn); /* a COPY still running ends with the connection */
    free(pg->key_is_number);
    free(pg);
    s->impl = NULL;
}

const struct warehouse_ops warehouse_postgres_ops = {
    .supports = pg_supports,
    .open = pg_open,
    .read_row = pg_read_row,
    .close = pg_close,
};

/*
 * ---- a table as a sink ----
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
        rc = pg_fail(k->shown, conn, res, ERR_INVALID, what, e);
    PQclear(res);
    return rc;
}

static char *quoted2(PGconn *conn, const char *schema, const char *table, const char *suffix)
{
    char *a = PQescapeIdentifier(conn, schema, strlen(schema)), *b = NULL, *name = NULL, *out = NULL;

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
static int check_table(struct warehouse_sink *k, PGconn *conn, const char *schema,
                       const char *name, const char *const *want, size_t n, size_t n_keys,
                       int *exists, struct err *e)
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
        rc = pg_fail(k->shown, conn, res, ERR_INVALID, "table", e);
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
        rc = pg_fail(k->shown, conn, res, ERR_INVALID, "table", e);
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

static int sink_open(struct warehouse_sink *k, const struct warehouse_sink_spec *spec,
                     struct err *e)
{
    struct pg_sink *pg = calloc(1, sizeof(*pg));
    struct buf conninfo = {0}, sql = {0};
    char *table = NULL, *schema = NULL, *rel = NULL, *lock = NULL;
    const char *pred = spec->per_row > 1 ? "double precision[]" : "double precision";
    const char **want = calloc(2 * spec->n_keys + 4, sizeof(*want));
    PGresult *res = NULL;
    int rc = 0, exists = 0;

    if (!pg || !want || split_uri(spec->uri, &conninfo, &table) != 0) {
        free(pg);
        rc = err_set(e, ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    k->impl = pg;
    if (!table || !table[0]) {
        rc = err_set(e, ERR_INVALID, "%s: name the output table (?table=SCHEMA.TABLE)", k->shown);
        goto cleanup;
    }
    pg->conn = PQconnectdb(conninfo.data);
    if (!pg->conn) {
        rc = err_set(e, ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    if (PQstatus(pg->conn) != CONNECTION_OK) {
        rc = pg_fail(k->shown, pg->conn, NULL, ERR_IO, "cannot connect", e);
        goto cleanup;
    }
    PQclear(PQexec(pg->conn, "SET client_min_messages TO warning")); /* no NOTICE on stderr */
    /* the name as PostgreSQL reads it: unquoted parts folded, no schema the current one */
    res = query1(pg->conn,
                 "SELECT CASE WHEN cardinality(p) = 2 THEN p[1] ELSE current_schema() END, "
                 "p[cardinality(p)], cardinality(p) FROM pg_catalog.parse_ident($1) AS p",
                 table);
    if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1) {
        rc = pg_fail(k->shown, pg->conn, res, ERR_INVALID, "output table", e);
        goto cleanup;
    }
    if (atoi(PQgetvalue(res, 0, 2)) > 2 || PQgetisnull(res, 0, 0)) {
        rc = err_set(e, ERR_INVALID, "%s: output table '%.100s': give [SCHEMA.]TABLE", k->shown,
                     table);
        goto cleanup;
    }
    schema = strdup(PQgetvalue(res, 0, 0));
    rel = strdup(PQgetvalue(res, 0, 1));
    PQclear(res);
    res = NULL;
    if (!schema || !rel || asprintf(&k->name, "%s.%s", schema, rel) < 0) {
        k->name = NULL;
        rc = err_set(e, ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    if (strlen(rel) + strlen("__inferd_staging") > 63) {
        rc = err_set(e, ERR_INVALID,
                     "%s: the table's name is longer than 47 bytes: its staging table "
                     "%s__inferd_staging would not fit PostgreSQL's 63",
                     k->name, rel);
        goto cleanup;
    }
    pg->target = quoted2(pg->conn, schema, rel, "");
    pg->errors = quoted2(pg->conn, schema, rel, "_errors");
    pg->staging = quoted2(pg->conn, schema, rel, "__inferd_staging");
    pg->version = PQescapeLiteral(pg->conn, spec->model_version, strlen(spec->model_version));
    if (!pg->target || !pg->errors || !pg->staging || !pg->version ||
        asprintf(&lock, "inferd batch %s", k->name) < 0) {
        lock = NULL;
        rc = err_set(e, ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    /* one writer: a second run would drop the first's staging table. A killed run's lock
     * goes with its session, which the server ends as soon as it sees the connection closed:
     * waited for a little, not failed at once */
    PQclear(PQexec(pg->conn, "SET lock_timeout = '10s'"));
    res = query1(pg->conn, "SELECT pg_catalog.pg_advisory_lock(pg_catalog.hashtext($1))", lock);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
        if (state && strcmp(state, "55P03") == 0)
            rc = err_set(e, ERR_INVALID, "%s: another inferd batch run is writing to it", k->name);
        else
            rc = pg_fail(k->shown, pg->conn, res, ERR_INVALID, "lock", e);
        goto cleanup;
    }
    PQclear(PQexec(pg->conn, "SET lock_timeout = 0"));
    /* the target and its errors table, as they are or as they will be created */
    for (size_t i = 0; i < spec->n_keys; i++) {
        want[2 * i] = spec->key_names[i];
        want[2 * i + 1] = spec->key_types[i];
        char *q = PQescapeIdentifier(pg->conn, spec->key_names[i], strlen(spec->key_names[i]));
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
    free(rel);
    rel = NULL;
    if (asprintf(&rel, "%s_errors", k->name + strlen(schema) + 1) < 0) {
        rel = NULL;
        rc = err_set(e, ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    want[2 * spec->n_keys] = "reason";
    want[2 * spec->n_keys + 1] = "text";
    rc = check_table(k, pg->conn, schema, rel, want, spec->n_keys + 1, spec->n_keys, &exists, e);
    if (rc == 0 && !exists &&
        (buf_printf(&pg->create, "CREATE TABLE IF NOT EXISTS %s (", pg->errors) ||
         put_defs(pg->conn, &pg->create, spec, "") ||
         buf_printf(&pg->create, "reason text, UNIQUE (%s)); ", pg->keys.data)))
        rc = err_set(e, ERR_NOMEM, "out of memory");
    if (rc != 0)
        goto cleanup;
    /* a failed or killed run's staging table goes; this run's is new */
    PQclear(res);
    res = query1(pg->conn, "SELECT pg_catalog.to_regclass($1) IS NOT NULL", pg->staging);
    if (PQresultStatus(res) == PGRES_TUPLES_OK && strcmp(PQgetvalue(res, 0, 0), "t") == 0)
        log_warn("warehouse", "discarding the staging table of a run that did not finish",
                 "name=%s__inferd_staging", k->name);
    if (buf_printf(&sql, "DROP TABLE IF EXISTS %s; CREATE UNLOGGED TABLE %s (", pg->staging,
                   pg->staging) ||
        put_defs(pg->conn, &sql, spec, "") ||
        buf_printf(&sql, "prediction %s, reason text)", pred)) {
        rc = err_set(e, ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    rc = pg_run(k, pg->conn, sql.data, "staging table", e);
cleanup:
    PQclear(res);
    buf_release(&conninfo);
    buf_release(&sql);
    free(table);
    free(schema);
    free(rel);
    free(lock);
    free(want);
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
        rc = pg_fail(k->shown, pg->conn, res, ERR_IO, "writing", e);
        PQclear(res);
        return rc;
    }
    PQclear(res);
    if (PQputCopyData(pg->conn, k->rows.data, (int)k->rows.len) != 1 ||
        PQputCopyEnd(pg->conn, NULL) != 1)
        rc = pg_fail(k->shown, pg->conn, NULL, ERR_IO, "writing", e);
    while ((res = PQgetResult(pg->conn)) != NULL) {
        if (rc == 0 && PQresultStatus(res) != PGRES_COMMAND_OK)
            rc = pg_fail(k->shown, pg->conn, res, ERR_IO, "writing", e);
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
    .supports = pg_supports,
    .open = sink_open,
    .write = sink_write,
    .commit = sink_commit,
    .close = sink_close,
};
