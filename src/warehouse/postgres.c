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
#include "warehouse/postgres_internal.h"
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

int warehouse_pg_supports(const char *uri)
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

int warehouse_pg_fail(const char *shown, PGconn *conn, const PGresult *res, int code,
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

int warehouse_pg_connect(const char *shown, const char *conninfo, PGconn **out, struct err *e)
{
    PGconn *c = PQconnectdb(conninfo);
    int rc;

    *out = NULL;
    if (!c)
        return err_set(e, ERR_NOMEM, "out of memory");
    if (PQstatus(c) != CONNECTION_OK) {
        rc = warehouse_pg_fail(shown, c, NULL, ERR_IO, "cannot connect", e);
        PQfinish(c);
        return rc;
    }
    PQclear(PQexec(c, "SET client_min_messages TO warning"));
    *out = c;
    return 0;
}

/* Splits `uri` into libpq's conninfo (without `table=`) and the table (NULL if none). */
int warehouse_pg_split_uri(const char *uri, struct buf *conninfo, char **table)
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

PGresult *warehouse_pg_query1(PGconn *conn, const char *sql, const char *param)
{
    return PQexecParams(conn, sql, param ? 1 : 0, NULL, param ? &param : NULL, NULL, NULL, 0);
}

/* The table's "SCHEMA.TABLE" and its quoted form for SQL; ERR_INVALID when there is none. */
static int find_table(struct warehouse_source *s, PGconn *conn, const char *table, struct buf *from,
                      char **oid, struct err *e)
{
    PGresult *res =
        warehouse_pg_query1(conn,
                            "SELECT n.nspname, c.relname, c.oid::text FROM pg_catalog.pg_class c "
                            "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                            "WHERE c.oid = pg_catalog.to_regclass($1)",
                            table);
    char *ns = NULL, *rel = NULL;
    int rc = 0;

    if (PQresultStatus(res) != PGRES_TUPLES_OK)
        rc = warehouse_pg_fail(s->shown, conn, res, ERR_INVALID, "table", e);
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
    res = warehouse_pg_query1(
        conn,
        "SELECT a.attname FROM pg_catalog.pg_index i JOIN pg_catalog.pg_attribute a "
        "ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
        "WHERE i.indrelid = $1::oid AND i.indisprimary "
        "ORDER BY pg_catalog.array_position(i.indkey::int2[], a.attnum)",
        oid);
    if (PQresultStatus(res) != PGRES_TUPLES_OK)
        rc = warehouse_pg_fail(s->shown, conn, res, ERR_INVALID, "primary key", e);
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
    res = PQexecParams(conn, "SELECT pg_catalog.format_type($1::oid, NULLIF($2::int, -1))", 2, NULL,
                       params, NULL, NULL, 0);
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
/* ` WHERE|AND (k1, k2) OP ('v1'::type1, 'v2'::type2)`: a bound of the range read; the row
 * comparison orders as ORDER BY k1, k2 does */
static int put_bound(const struct warehouse_source *s, PGconn *conn, struct buf *sql,
                     const char *word, const char *op, const char *const *values, struct err *e)
{
    int rc = buf_printf(sql, " %s (", word);

    for (size_t k = 0; rc == 0 && k < s->n_keys; k++)
        rc = (k && buf_puts(sql, ", ")) || put_column(conn, sql, s->key_names[k], 0);
    if (rc == 0)
        rc = buf_printf(sql, ") %s (", op);
    for (size_t k = 0; rc == 0 && k < s->n_keys; k++) {
        char *lit = values[k] ? PQescapeLiteral(conn, values[k], strlen(values[k])) : NULL;
        if (!values[k])
            return err_set(e, ERR_INVALID, "%s: a key range without a value for '%s'", s->shown,
                           s->key_names[k]);
        rc = !lit || buf_printf(sql, "%s%s::%s", k ? ", " : "", lit, s->key_types[k]);
        PQfreemem(lit);
    }
    if (rc == 0)
        rc = buf_puts(sql, ")");
    return rc == 0 ? 0 : err_set(e, ERR_NOMEM, "out of memory");
}

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

    if (!pg || warehouse_pg_split_uri(spec->uri, &conninfo, &table) != 0) {
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
    if ((rc = warehouse_pg_connect(s->shown, conninfo.data, &pg->conn, e)) != 0)
        goto cleanup;
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
        rc = warehouse_pg_fail(s->shown, pg->conn, res, ERR_INVALID, is_query ? "query" : s->name,
                               e);
        goto cleanup;
    }
    PQclear(res);
    res = PQdescribePrepared(pg->conn, "");
    if (PQresultStatus(res) != PGRES_COMMAND_OK) {
        rc = warehouse_pg_fail(s->shown, pg->conn, res, ERR_INVALID, is_query ? "query" : s->name,
                               e);
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
    if (rc == 0 && buf_printf(&copy, " FROM %s ", from.data) != 0)
        rc = err_set(e, ERR_NOMEM, "out of memory");
    if (rc == 0 && spec->after)
        rc = put_bound(s, pg->conn, &copy, "WHERE", ">", spec->after, e);
    if (rc == 0 && spec->upto)
        rc = put_bound(s, pg->conn, &copy, spec->after ? "AND" : "WHERE", "<=", spec->upto, e);
    if (rc == 0 && buf_puts(&copy, " ORDER BY ") != 0)
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
        rc = warehouse_pg_fail(s->shown, pg->conn, res, ERR_INVALID, is_query ? "query" : s->name,
                               e);
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
            rc = warehouse_pg_fail(s->shown, pg->conn, res, ERR_IO, "reading", e);
        PQclear(res);
        return rc ? rc : 0;
    }
    if (n < 0)
        return warehouse_pg_fail(s->shown, pg->conn, NULL, ERR_IO, "reading", e);
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
    .supports = warehouse_pg_supports,
    .open = pg_open,
    .read_row = pg_read_row,
    .close = pg_close,
};
