/*
 * postgres_internal.h: what the PostgreSQL source (postgres.c) and sink (postgres_sink.c)
 * share; included by src/warehouse/ only.
 */
#ifndef INFERD_WAREHOUSE_POSTGRES_INTERNAL_H
#define INFERD_WAREHOUSE_POSTGRES_INTERNAL_H

#include "warehouse/warehouse_internal.h"

#include <libpq-fe.h>

/* 1 for postgresql:// and postgres:// */
int warehouse_pg_supports(const char *uri);
/*
 * Fills `e` with `code` and "SHOWN: WHAT: the server's (or libpq's) message", on one line and
 * with the password libpq used replaced by ***. Returns code.
 *   res  NULL: the connection's message
 */
int warehouse_pg_fail(const char *shown, PGconn *conn, const PGresult *res, int code,
                      const char *what, struct err *e);
/* Connects with `conninfo`, asking the server for no NOTICE (libpq would print it on stderr,
 * where a run's progress goes). 0 and *out, or ERR_IO naming the server (shown masked) and
 * libpq's reason. */
int warehouse_pg_connect(const char *shown, const char *conninfo, PGconn **out, struct err *e);
/* Splits `uri` into libpq's conninfo (without `table=`, NUL-terminated) and the table.
 *   table  new string, or NULL when there is none; free() it */
int warehouse_pg_split_uri(const char *uri, struct buf *conninfo, char **table);
/* `sql` with one text parameter (NULL: none), results as text. PQclear() it. */
PGresult *warehouse_pg_query1(PGconn *conn, const char *sql, const char *param);

/*
 * The statement that splits a source (postgres_split.c): the keys, as text, of every
 * `rows_per_part`-th row in key order that is not the last row.
 *   from         "SCHEMA"."TABLE", or "(SELECT ...) AS inferd_source": already quoted
 *   quoted_keys  n_keys column names, already quoted
 * 0, or -1 without memory.
 */
int warehouse_pg_split_sql(const char *from, const char *const *quoted_keys, size_t n_keys,
                           int64_t rows_per_part, struct buf *sql);

#endif
