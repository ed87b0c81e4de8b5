"""``inferd batch`` with a PostgreSQL table or query as its input (issue 16, first slice).

Each test makes a database of its own in one throw-away cluster (``shared_postgres``), creates
tables with psql, runs ``build/inferd batch --input postgresql://...`` as a subprocess and
compares the predictions in the output object (``SCHEMA.TABLE.jsonl`` / ``.csv``,
``query.jsonl``) with python-xgboost's on the same rows, in key order.
"""
import csv
import io
import itertools
import json
import math
import subprocess
import time

import numpy as np
import pandas as pd
import pytest
import requests
import xgboost as xgb

from conftest import S3_BUCKET, INFERD_BIN, assert_close, async_args, error_message, free_port

RUN_DEADLINE_S = 180.0
_dbs = itertools.count(1)


@pytest.fixture
def pg(shared_postgres):
    """(cluster, database name, its URL): a database of this test's own."""
    name = f"tables_{next(_dbs)}"
    shared_postgres.psql(f'CREATE DATABASE "{name}"')
    return shared_postgres, name, shared_postgres.db_url(name)


@pytest.fixture
def repo(tmp_path, trained):
    d = tmp_path / "models"
    for name in ("binary", "regression", "multiclass"):
        trained[name].install(d)
    return d


def run(repo, model, inp, out, *extra, check=True, env=None):
    cmd = [str(INFERD_BIN), "batch", "--models", str(repo), "--model", model, "--input", inp,
           "--output", str(out), *[str(a) for a in extra]]
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=RUN_DEADLINE_S, env=env)
    if check:
        assert p.returncode == 0, f"{' '.join(cmd)}: exit {p.returncode}\n{p.stderr}"
    return p


def sql_value(v):
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, str):
        return "'" + v.replace("'", "''") + "'"
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "NULL"
    return repr(float(v)) if isinstance(v, (float, np.floating)) else str(v)


def insert(cluster, db, table, rows):
    """INSERTs `rows` (tuples of python values; NaN becomes NULL), 200 per statement."""
    for k in range(0, len(rows), 200):
        values = ",".join("(" + ",".join(sql_value(v) for v in r) + ")" for r in rows[k:k + 200])
        cluster.psql(f"INSERT INTO {table} VALUES {values}", db=db)


def feature_table(cluster, db, table, m, n, seed, key_type="integer", ftype="double precision",
                  nan_fraction=0.1):
    """A table (id KEY PRIMARY KEY, f0..fN) of `n` rows of model `m`, inserted in shuffled
    order; returns (ids in key order, X in key order)."""
    X = m.rows(n, seed, nan_fraction=nan_fraction)
    ids = np.arange(n, dtype=np.int64) * (3_000_000_007 if key_type == "bigint" else 7) + 5
    cols = ", ".join(f"f{j} {ftype}" for j in range(m.n_features))
    cluster.psql(f"CREATE TABLE {table} (id {key_type} PRIMARY KEY, {cols})", db=db)
    order = np.random.default_rng(seed).permutation(n)
    insert(cluster, db, table, [(int(ids[i]), *[float(v) for v in X[i]]) for i in order])
    return ids, X


def jsonl(path):
    return [json.loads(ln) if ln else None for ln in path.read_text().split("\n")[:-1]]


# ---------------------------------------------------------------------------
# sources and models
# ---------------------------------------------------------------------------


def test_table_binary_integer_key_with_nulls(pg, repo, trained, tmp_path):
    cluster, db, url = pg
    m = trained["binary"]
    ids, X = feature_table(cluster, db, "feat", m, 500, 1)
    p = run(repo, "binary", f"{url}?table=feat", tmp_path / "out")
    rows = jsonl(tmp_path / "out" / "public.feat.jsonl")
    assert [r["id"] for r in rows] == ids.tolist(), "rows not in key order"
    assert list(rows[0]) == ["id", "prediction"], rows[0]
    assert_close([r["prediction"] for r in rows], m.expected(X), "binary, NULL features")
    assert (tmp_path / "out" / "_SUCCESS").exists()
    assert "records=500" in p.stderr and "errors=0" in p.stderr, p.stderr


def test_table_regression_bigint_key_boolean_csv(pg, repo, trained, tmp_path):
    """A bigint key past 2^32, real and boolean feature columns, CSV output with a header."""
    cluster, db, url = pg
    m = trained["regression"]
    X = m.rows(300, 2, nan_fraction=0.05)
    X[:, 3] = (X[:, 3] > 0).astype(np.float32)  # feature 3 is a boolean column
    ids = np.arange(300, dtype=np.int64) * 3_000_000_007 + 5
    cols = ", ".join(f"f{j} {'boolean' if j == 3 else 'real'}" for j in range(m.n_features))
    cluster.psql(f"CREATE TABLE sch_reg (id bigint PRIMARY KEY, {cols})", db=db)
    cluster.psql("CREATE SCHEMA scores", db=db)
    cluster.psql("ALTER TABLE sch_reg SET SCHEMA scores", db=db)
    insert(cluster, db, "scores.sch_reg",
           [(int(ids[i]), *[(None if np.isnan(v) else bool(v > 0)) if j == 3 else float(v)
                            for j, v in enumerate(X[i])]) for i in range(300)[::-1]])
    run(repo, "regression", f"{url}?table=scores.sch_reg", tmp_path / "out", "--format", "csv")
    text = (tmp_path / "out" / "scores.sch_reg.csv").read_text()
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["id", "prediction"], rows[0]
    assert [int(r[0]) for r in rows[1:]] == ids.tolist()
    assert_close([float(r[1]) for r in rows[1:]], m.expected(X), "regression, boolean, bigint")


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_multiclass_text_and_composite_keys(pg, repo, trained, tmp_path, fmt):
    """A composite primary key (text, integer) whose text holds a comma, a quote, a tab and a
    backslash: copied to the output as it is, rows in key order."""
    cluster, db, url = pg
    m = trained["multiclass"]
    X = m.rows(120, 3, nan_fraction=0.1)
    regions = ['eu,"west"', "us\teast", "ap\\south"]
    keys = [(regions[i % 3], i // 3) for i in range(120)]
    cols = ", ".join(f"f{j} double precision" for j in range(m.n_features))
    cluster.psql(f"CREATE TABLE mc (region text, n integer, {cols}, PRIMARY KEY (region, n))",
                 db=db)
    insert(cluster, db, "mc", [(*keys[i], *[float(v) for v in X[i]]) for i in range(120)])
    run(repo, "multiclass", f"{url}?table=public.mc", tmp_path / "out", "--format", fmt)
    order = sorted(range(120), key=lambda i: (keys[i][0].encode(), keys[i][1]))
    out = tmp_path / "out" / f"public.mc.{fmt}"
    if fmt == "jsonl":
        rows = jsonl(out)
        got_keys = [(r["region"], r["n"]) for r in rows]
        preds = [r["prediction"] for r in rows]
    else:
        rows = list(csv.reader(io.StringIO(out.read_text(), newline="")))
        assert rows[0] == ["region", "n", "p0", "p1", "p2"], rows[0]
        got_keys = [(r[0], int(r[1])) for r in rows[1:]]
        preds = [[float(v) for v in r[2:]] for r in rows[1:]]
    assert got_keys == [keys[i] for i in order]
    assert_close(preds, m.expected(X[order]), f"multiclass {fmt}")


def test_named_key_columns_and_join_input(pg, repo, trained, tmp_path):
    """--key-columns names a column that is not the primary key; --join-input writes the
    values the model got."""
    cluster, db, url = pg
    m = trained["binary"]
    X = m.rows(50, 4)
    cols = ", ".join(f"f{j} double precision" for j in range(m.n_features))
    cluster.psql(f"CREATE TABLE nk (code text, {cols})", db=db)  # no primary key
    insert(cluster, db, "nk", [(f"c{i:03d}", *[float(v) for v in X[i]]) for i in range(50)])
    p = run(repo, "binary", f"{url}?table=nk", tmp_path / "o1", check=False)
    assert p.returncode != 0 and "has no primary key" in p.stderr and "--key-columns" in p.stderr, \
        p.stderr
    run(repo, "binary", f"{url}?table=nk", tmp_path / "out", "--key-columns", "code",
        "--join-input")
    rows = jsonl(tmp_path / "out" / "public.nk.jsonl")
    assert [r["code"] for r in rows] == [f"c{i:03d}" for i in range(50)]
    assert_close([r["input"] for r in rows], X, "joined input")
    assert_close([r["prediction"] for r in rows], m.expected(X), "binary, named key")


def test_array_column_source_and_bad_rows(pg, repo, trained, tmp_path):
    """One double precision[] column holds the row; rows of the wrong width are bad records,
    named by their keys: the first fails the run by default, --max-errors tolerates them."""
    cluster, db, url = pg
    m = trained["binary"]
    X = m.rows(200, 5, nan_fraction=0.1)
    bad = {17, 42, 133}
    cluster.psql("CREATE TABLE arr (id integer PRIMARY KEY, x double precision[])", db=db)
    rows = []
    for i in range(200):
        vals = ["NULL" if np.isnan(v) else repr(float(v)) for v in X[i]]
        if i in bad:
            vals = vals[:-1] if i % 2 else vals + ["1.5"]
        rows.append(f"({i}, ARRAY[{','.join(vals)}]::double precision[])")
    cluster.psql(f"INSERT INTO arr VALUES {','.join(rows)}", db=db)
    p = run(repo, "binary", f"{url}?table=arr", tmp_path / "o1", check=False)
    assert p.returncode != 0, p.stderr
    assert 'public.arr.jsonl: row {"id":17}: expected 7 columns' in p.stderr, p.stderr
    assert "line" not in p.stderr.split("row {")[1].split("\n")[0], p.stderr
    p = run(repo, "binary", f"{url}?table=arr", tmp_path / "o2", "--max-errors", "2",
            check=False)
    assert p.returncode != 0 and "more bad records than --max-errors" in p.stderr, p.stderr
    p = run(repo, "binary", f"{url}?table=arr", tmp_path / "out", "--max-errors", "3")
    out = jsonl(tmp_path / "out" / "public.arr.jsonl")
    assert [i for i, r in enumerate(out) if r is None] == sorted(bad)
    good = [i for i in range(200) if i not in bad]
    assert [out[i]["id"] for i in good] == good
    assert_close([out[i]["prediction"] for i in good], m.expected(X[good]), "array source")
    errors = (tmp_path / "out" / "public.arr.jsonl.errors").read_text().splitlines()
    assert [e.split(":")[0] for e in errors] == [f'row {{"id"' for _ in bad], errors
    assert [e.split(":")[1] for e in errors] == [f"{i}}}" for i in sorted(bad)], errors
    assert "errors=3" in p.stderr


def test_query_source(pg, repo, trained, tmp_path):
    cluster, db, url = pg
    m = trained["binary"]
    ids, X = feature_table(cluster, db, "feat", m, 200, 6)
    cluster.psql("CREATE TABLE extra (id integer PRIMARY KEY, w integer)", db=db)
    cluster.psql("INSERT INTO extra SELECT id, id % 3 FROM feat", db=db)
    cols = ", ".join(f"f.f{j}" for j in range(m.n_features))
    q = f"SELECT f.id, {cols} FROM feat f JOIN extra e USING (id) WHERE e.w = 0;"
    run(repo, "binary", url, tmp_path / "out", "--input-query", q, "--key-columns", "id")
    rows = jsonl(tmp_path / "out" / "query.jsonl")
    keep = [i for i in range(200) if ids[i] % 3 == 0]
    assert [r["id"] for r in rows] == ids[keep].tolist()
    assert_close([r["prediction"] for r in rows], m.expected(X[keep]), "query source")
    # a query needs key columns; a query that fails says PostgreSQL's why
    p = run(repo, "binary", url, tmp_path / "o2", "--input-query", q, check=False)
    assert p.returncode != 0 and "needs --key-columns" in p.stderr, p.stderr
    p = run(repo, "binary", url, tmp_path / "o3", "--input-query", "SELECT id, nope FROM feat",
            "--key-columns", "id", check=False)
    assert p.returncode != 0 and 'column "nope" does not exist' in p.stderr, p.stderr
    # a query yielding too few columns for the model: at start, before any row
    p = run(repo, "binary", url, tmp_path / "o4", "--input-query", "SELECT id, f0, f1 FROM feat",
            "--key-columns", "id", check=False)
    assert p.returncode != 0 and "2 feature columns besides the key columns; the model takes 7" \
        in p.stderr, p.stderr


def test_feature_names_map_columns_by_name(pg, tmp_path):
    """A model trained from a DataFrame: the table's columns in another order still reach
    their features."""
    cluster, db, url = pg
    names = ["age", "income", "score"]
    rng = np.random.default_rng(9)
    X = rng.normal(size=(300, 3)).astype(np.float32)
    booster = xgb.train({"objective": "reg:squarederror", "max_depth": 3, "nthread": 1},
                        xgb.DMatrix(pd.DataFrame(X, columns=names), label=X @ [1.0, -2.0, 0.5]),
                        num_boost_round=10)
    repo = tmp_path / "models"
    (repo / "named" / "1").mkdir(parents=True)
    booster.save_model(str(repo / "named" / "1" / "model.json"))
    (repo / "named" / "config.json").write_text(json.dumps({"backend": "xgboost"}))
    cluster.psql("CREATE TABLE people (score real, id integer PRIMARY KEY, income real, age real)",
                 db=db)
    insert(cluster, db, "people", [(float(X[i, 2]), i, float(X[i, 1]), float(X[i, 0]))
                                   for i in range(300)])
    run(repo, "named", f"{url}?table=people", tmp_path / "out")
    rows = jsonl(tmp_path / "out" / "public.people.jsonl")
    want = booster.predict(xgb.DMatrix(pd.DataFrame(X, columns=names)))
    assert_close([r["prediction"] for r in rows], want, "by feature name")
    cluster.psql("ALTER TABLE people ADD COLUMN other real", db=db)
    p = run(repo, "named", f"{url}?table=people", tmp_path / "o2", check=False)
    assert p.returncode != 0 and \
        "column 'other' is neither a feature of the model nor a key column" in p.stderr, p.stderr


# ---------------------------------------------------------------------------
# errors at start
# ---------------------------------------------------------------------------


def test_errors_at_start(pg, repo, trained, tmp_path):
    cluster, db, url = pg
    m = trained["binary"]
    feature_table(cluster, db, "feat", m, 10, 7)
    cluster.psql("ALTER TABLE feat ADD COLUMN label text", db=db)

    def fails(inp, *extra):
        p = run(repo, "binary", inp, tmp_path / "out", *extra, check=False)
        assert p.returncode != 0, p.stderr
        assert not (tmp_path / "out" / "public.feat.jsonl").exists()
        return p.stderr

    err = fails(f"{url}?table=feat")
    assert "column 'label' has type text" in err, err
    err = fails(f"{url}?table=nosuch")
    assert "no such table 'nosuch'" in err, err
    err = fails(f"{url}?table=feat", "--key-columns", "missing")
    assert "no key column 'missing'" in err, err
    err = fails(url)
    assert "name a table" in err, err
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/{db}?table=feat"
    err = fails(dead)
    assert "cannot connect" in err and "refused" in err.lower(), err
    err = fails(str(tmp_path / "in.csv"), "--input-query", "SELECT 1")
    assert "--input-query needs a postgresql:// input" in err, err


def test_quoted_table_names_are_percent_decoded(pg, repo, trained, tmp_path):
    """?table= is decoded like the rest of the URI: %22Feat%20Table%22 names "Feat Table"
    (a quoted, mixed-case name with a space), as a source and as a sink."""
    cluster, db, url = pg
    m = trained["binary"]
    X = m.rows(50, 23)
    cols = ", ".join(f"f{j} real" for j in range(m.n_features))
    cluster.psql(f'CREATE TABLE "Feat Table" (id integer PRIMARY KEY, {cols})', db=db)
    insert(cluster, db, '"Feat Table"', [(i, *[float(v) for v in X[i]]) for i in range(50)])
    run(repo, "binary", f"{url}?table=%22Feat%20Table%22", f"{url}?table=%22Out%2BScores%22")
    got = scores(cluster, db, '"Out+Scores"')
    assert [int(r[0]) for r in got] == list(range(50))
    assert_close([r[1] for r in got], m.expected(X), "quoted names")
    run(repo, "binary", f"{url}?table=%22Feat%20Table%22", tmp_path / "out")
    assert (tmp_path / "out" / "public.Feat Table.jsonl").exists()


def test_a_query_failing_as_it_runs_names_the_server_error(pg, repo, trained, tmp_path):
    cluster, db, url = pg
    m = trained["binary"]
    feature_table(cluster, db, "feat", m, 10, 24)
    feats = ", ".join(f"f{j}" for j in range(m.n_features - 1))
    p = run(repo, "binary", url, tmp_path / "out", "--key-columns", "id", "--input-query",
            f"SELECT id, {feats}, 1 / (id - 5) AS last FROM feat", check=False)
    assert p.returncode != 0 and "division by zero" in p.stderr, p.stderr


def test_a_query_giving_a_key_twice_into_a_table_is_an_error_naming_it(pg, repo, trained,
                                                                        tmp_path):
    """The upsert cannot take one key twice: the run stops at the second row with that key
    (not at the merge after scoring everything) and the table is not created."""
    cluster, db, url = pg
    m = trained["binary"]
    feature_table(cluster, db, "feat", m, 300, 25)
    feats = ", ".join(f"f{j}" for j in range(m.n_features))
    p = run(repo, "binary", url, f"{url}?table=scores", "--key-columns", "g", "--input-query",
            f"SELECT id % 250 AS g, {feats} FROM feat", check=False)
    assert p.returncode != 0, p.stderr
    assert "public.scores: two rows have the keys (" in p.stderr, p.stderr
    assert "the key columns must name one row each" in p.stderr, p.stderr
    assert cluster.psql("SELECT to_regclass('scores') IS NULL", db=db) == [["t"]]


@pytest.mark.parametrize("method", ["md5", "scram-sha-256"])
def test_password_never_shown(method, pg, repo, trained, tmp_path):
    cluster, db, _ = pg
    password = "Tb9pwSecret4242"
    role = "tables_" + method.replace("-", "_") + f"_{db}"
    cluster.create_role(role, password, encryption="md5" if method == "md5" else "scram-sha-256")
    cluster.psql(f"GRANT ALL ON SCHEMA public TO {role}", db=db)
    cluster.require_password(role, method)
    m = trained["binary"]
    X = m.rows(40, 8)
    ids, X = feature_table(cluster, db, "feat", m, 40, 8)
    cluster.psql(f"GRANT SELECT ON feat TO {role}", db=db)
    url = cluster.db_url(db, role, password)
    p = run(repo, "binary", f"{url}?table=feat", tmp_path / "out", "--log-level", "debug")
    shown = p.stdout + p.stderr + "".join(f.read_text() for f in (tmp_path / "out").iterdir())
    assert password not in shown
    assert "***@127.0.0.1" in p.stderr, p.stderr  # the source is named, masked
    rows = jsonl(tmp_path / "out" / "public.feat.jsonl")
    assert_close([r["prediction"] for r in rows], m.expected(X), "with a password")
    # errors too: a failing query, a wrong password, and a password as a URI parameter
    p = run(repo, "binary", url, tmp_path / "o2", "--input-query", f"SELECT '{password}'::text",
            "--key-columns", "text", check=False)
    assert p.returncode != 0 and password not in p.stdout + p.stderr, p.stderr
    wrong = cluster.db_url(db, role, "Wrong" + password)
    p = run(repo, "binary", f"{wrong}?table=feat", tmp_path / "o3", check=False)
    assert p.returncode != 0 and "password authentication failed" in p.stderr, p.stderr
    assert password not in p.stderr and "Wrong" not in p.stderr, p.stderr
    param = f"postgresql://{role}@127.0.0.1:{cluster.port}/{db}?password={password}&table=nope"
    p = run(repo, "binary", param, tmp_path / "o4", check=False)
    assert p.returncode != 0 and "no such table" in p.stderr and password not in p.stderr, \
        p.stderr


def test_server_batch_job_refuses_a_table_without_its_password(repo, server_factory, tmp_path):
    """A server batch job opens its table at submit: one it cannot reach is a 400 that says
    so, and shows the URI without its password (tests/integration/test_table_jobs.py runs
    server jobs over tables)."""
    server = server_factory(repo, *async_args(tmp_path / "data"))
    password = "Srv7pwSecret99"
    r = requests.post(f"{server.url}/v1/batch-jobs", timeout=60, json={
        "model": "binary", "output": str(tmp_path / "out"),
        "input": f"postgresql://u:{password}@127.0.0.1:5432/db?table=t"})
    assert r.status_code == 400, r.text
    msg = error_message(r)
    assert "cannot connect" in msg, msg
    assert "postgresql://***@127.0.0.1:5432/db?table=t" in msg, msg
    assert password not in r.text and password not in server.log()


def test_password_from_pgpassword(pg, repo, trained, tmp_path):
    """libpq's environment works as for psql: no password in the URI, PGPASSWORD set."""
    import os
    cluster, db, _ = pg
    password = "Env5pwSecret31"
    role = f"tables_env_{db}"
    cluster.create_role(role, password)
    cluster.require_password(role)
    m = trained["binary"]
    ids, X = feature_table(cluster, db, "feat", m, 30, 10)
    cluster.psql(f"GRANT SELECT ON feat TO {role}", db=db)
    inp = f"{cluster.db_url(db, role)}?table=feat"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    p = run(repo, "binary", inp, tmp_path / "o1", check=False, env=env)
    assert p.returncode != 0 and "cannot connect" in p.stderr, p.stderr
    run(repo, "binary", inp, tmp_path / "out", env={**env, "PGPASSWORD": password})
    rows = jsonl(tmp_path / "out" / "public.feat.jsonl")
    assert_close([r["prediction"] for r in rows], m.expected(X), "PGPASSWORD")


# ---------------------------------------------------------------------------
# a table as the output (all or nothing, upserted by key)
# ---------------------------------------------------------------------------


def scores(cluster, db, table, keys=("id",)):
    """The output table's rows in key order: (keys..., prediction, model_version), with the
    prediction a float, a list of floats (an array) or None."""
    order = ", ".join(keys)
    out = []
    for r in cluster.psql(f"SELECT {order}, prediction, model_version FROM {table} "
                          f"ORDER BY {order}", db=db):
        p = r[len(keys)]
        if p == "":
            p = None
        elif p.startswith("{"):
            p = [float(v) for v in p[1:-1].split(",")]
        else:
            p = float(p)
        out.append((*r[:len(keys)], p, r[len(keys) + 1]))
    return out


def column_type(cluster, db, table, column):
    return cluster.psql(f"SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE "
                        f"attrelid = '{table}'::regclass AND attname = '{column}'", db=db)[0][0]


def staging_left(cluster, db, table):
    return cluster.psql(f"SELECT to_regclass('{table}__inferd_staging') IS NOT NULL", db=db)[0][0]


@pytest.mark.parametrize("model", ["binary", "regression", "multiclass"])
def test_table_to_table(model, pg, repo, trained, tmp_path):
    """Created when missing (keys of the source's type, prediction double precision or, for
    several values, double precision[], model_version), compared with xgboost row by row;
    the same command again replaces the scores (row count unchanged)."""
    cluster, db, url = pg
    m = trained[model]
    ids, X = feature_table(cluster, db, "feat", m, 400, 11, key_type="bigint")
    out = f"{url}?table=scores"
    p = run(repo, model, f"{url}?table=feat", out)
    assert "records=400" in p.stderr and "errors=0" in p.stderr, p.stderr
    assert column_type(cluster, db, "scores", "id") == "bigint"
    want_type = "double precision[]" if model == "multiclass" else "double precision"
    assert column_type(cluster, db, "scores", "prediction") == want_type
    # room on each page for the next run's updates (HOT), and the unique constraint built
    assert cluster.psql("SELECT reloptions FROM pg_class WHERE relname = 'scores'", db=db) == \
        [["{fillfactor=50}"]]
    assert cluster.psql("SELECT count(*) FROM pg_index WHERE indrelid = 'scores'::regclass "
                        "AND indisunique", db=db) == [["1"]]
    got = scores(cluster, db, "scores")
    assert [int(r[0]) for r in got] == ids.tolist()
    assert {r[2] for r in got} == {"1"}, "model_version"
    assert_close([r[1] for r in got], m.expected(X), f"{model} table to table")
    assert cluster.psql("SELECT count(*) FROM scores_errors", db=db) == [["0"]]
    # again: upserted by key, the same rows and scores; no staging table left behind
    run(repo, model, f"{url}?table=feat", out)
    assert scores(cluster, db, "scores") == got
    assert staging_left(cluster, db, "scores") == "f"
    # a key scored before keeps its row; new scores replace old ones
    cluster.psql("UPDATE scores SET prediction = NULL WHERE id < 100", db=db)
    cluster.psql(f"INSERT INTO scores (id) VALUES (-1)", db=db)
    run(repo, model, f"{url}?table=feat", out)
    assert scores(cluster, db, "scores")[1:] == got
    assert scores(cluster, db, "scores")[0][0] == "-1"


def test_table_to_table_composite_text_key(pg, repo, trained, tmp_path):
    """A (text, integer) key whose text holds a comma, a quote, a tab, a backslash, or is
    empty: the output table's keys are the source's, byte for byte."""
    cluster, db, url = pg
    m = trained["binary"]
    X = m.rows(150, 12, nan_fraction=0.1)
    regions = ['eu,"west"', "us\teast", "ap\\south", "", "plain"]
    keys = [(regions[i % 5], i // 5) for i in range(150)]
    cols = ", ".join(f"f{j} real" for j in range(m.n_features))
    cluster.psql(f"CREATE TABLE ck (region varchar(20), n integer, {cols}, "
                 "PRIMARY KEY (region, n))", db=db)
    insert(cluster, db, "ck", [(*keys[i], *[float(v) for v in X[i]]) for i in range(150)])
    cluster.psql("CREATE SCHEMA out", db=db)
    run(repo, "binary", f"{url}?table=ck", f"{url}?table=out.ck_scores")
    assert column_type(cluster, db, "out.ck_scores", "region") == "character varying(20)"
    got = {}
    for region, n, pred in cluster.psql(
            "SELECT encode(convert_to(region, 'UTF8'), 'hex'), n, prediction "
            "FROM out.ck_scores", db=db):
        got[(bytes.fromhex(region).decode(), int(n))] = float(pred)
    assert sorted(got) == sorted(keys)
    assert_close([got[k] for k in keys], m.expected(X), "composite text key")


def test_incompatible_target_is_an_error_at_start(pg, repo, trained, tmp_path):
    cluster, db, url = pg
    m = trained["multiclass"]
    feature_table(cluster, db, "feat", m, 20, 13)

    def fails(create):
        cluster.psql("DROP TABLE IF EXISTS scores; " + create, db=db)
        p = run(repo, "multiclass", f"{url}?table=feat", f"{url}?table=scores", check=False)
        assert p.returncode != 0, p.stderr
        assert cluster.psql("SELECT count(*) FROM scores", db=db) == [["0"]]
        return p.stderr

    err = fails("CREATE TABLE scores (id integer PRIMARY KEY, model_version text)")
    assert "public.scores: no column 'prediction' (double precision[])" in err, err
    err = fails("CREATE TABLE scores (id integer PRIMARY KEY, prediction double precision, "
                "model_version text)")
    assert "column 'prediction' has type double precision; the output needs double " \
        "precision[]" in err, err
    err = fails("CREATE TABLE scores (id bigint PRIMARY KEY, prediction double precision[], "
                "model_version text)")
    assert "column 'id' has type bigint; the output needs integer" in err, err
    err = fails("CREATE TABLE scores (id integer, prediction double precision[], "
                "model_version text)")
    assert "no unique constraint on exactly the key columns" in err, err


def array_table(cluster, db, m, n, seed, bad):
    """arr (id integer PRIMARY KEY, x double precision[]): rows `bad` one value short."""
    X = m.rows(n, seed, nan_fraction=0.1)
    cluster.psql("CREATE TABLE arr (id integer PRIMARY KEY, x double precision[])", db=db)
    rows = []
    for i in range(n):
        vals = ["NULL" if np.isnan(v) else repr(float(v)) for v in X[i]]
        rows.append(f"({i}, ARRAY[{','.join(vals[:-1] if i in bad else vals)}]"
                    "::double precision[])")
    for k in range(0, n, 500):
        cluster.psql(f"INSERT INTO arr VALUES {','.join(rows[k:k + 500])}", db=db)
    return X


def test_failed_run_leaves_the_target_untouched_and_bad_rows_go_to_errors(pg, repo, trained,
                                                                          tmp_path):
    """Bad rows late in key order past --max-errors: the run fails after many chunks went to
    the staging table, and the target is exactly as before; within --max-errors they go to
    scores_errors with their keys and reason."""
    cluster, db, url = pg
    m = trained["binary"]
    n = 3000
    X = array_table(cluster, db, m, n, 14, bad=set())
    out = f"{url}?table=scores"
    run(repo, "binary", f"{url}?table=arr", out, "--records-per-batch", "100")
    before = scores(cluster, db, "scores")
    assert len(before) == n
    # the last rows now short, and every feature changed: a merge would show
    bad = [2990, 2995, 2999]
    cluster.psql("UPDATE arr SET x = array_append(x[1:6], 0.25) WHERE id < 2990", db=db)
    cluster.psql(f"UPDATE arr SET x = x[1:6] WHERE id IN ({','.join(map(str, bad))})", db=db)
    p = run(repo, "binary", f"{url}?table=arr", out, "--records-per-batch", "100",
            "--max-errors", "2", check=False)
    assert p.returncode != 0 and "row (id)=(2999)" in p.stderr and \
        "more bad records than --max-errors" in p.stderr, p.stderr
    assert scores(cluster, db, "scores") == before, "a failed run changed the target"
    assert cluster.psql("SELECT count(*) FROM scores_errors", db=db) == [["0"]]
    # within the limit: scored rows replaced, bad rows' keys and reasons in scores_errors
    p = run(repo, "binary", f"{url}?table=arr", out, "--records-per-batch", "100",
            "--max-errors", "3")
    assert "errors=3" in p.stderr, p.stderr
    assert staging_left(cluster, db, "scores") == "f"
    errs = cluster.psql("SELECT id, reason FROM scores_errors ORDER BY id", db=db)
    assert [int(r[0]) for r in errs] == bad
    assert all(r[1] == "expected 7 columns, got 6" for r in errs), errs
    X2 = X.copy()
    X2[:2990, 6] = 0.25
    after = scores(cluster, db, "scores")
    good = [i for i in range(n) if i not in bad]
    assert_close([after[i][1] for i in good], m.expected(X2[good]), "after the update")
    assert [after[i] for i in bad] == [before[i] for i in bad], "a refused key keeps its score"
    # fixed: scored, and out of the errors table
    cluster.psql("UPDATE arr SET x = array_append(x, 0.25) WHERE id IN "
                 f"({','.join(map(str, bad))})", db=db)
    run(repo, "binary", f"{url}?table=arr", out)
    assert cluster.psql("SELECT count(*) FROM scores_errors", db=db) == [["0"]]


def runs(cluster, db, schema="public"):
    """The rows of SCHEMA.inferd_batch_runs, oldest first, as dicts."""
    cols = ["id", "target", "source", "query", "key_columns", "model", "model_version", "status",
            "records", "errors", "resumes", "resume_after", "message", "finished"]
    rows = cluster.psql(f"SELECT id, target, source, COALESCE(query, ''), key_columns, model, "
                        f"model_version, status, records, errors, resumes, "
                        f"COALESCE(resume_after, ''), COALESCE(message, ''), "
                        f"finished_at IS NOT NULL AND finished_at >= started_at "
                        f"FROM {schema}.inferd_batch_runs ORDER BY id", db=db)
    return [dict(zip(cols, r)) for r in rows]


def kill_when_staged(cmd, cluster, db, table, at_least):
    """Starts `cmd` and kill -9s it once its run row says `at_least` rows were committed to
    the staging table."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + RUN_DEADLINE_S
        while True:
            assert proc.poll() is None, f"the run ended before it was killed: {proc.stderr.read()}"
            assert time.monotonic() < deadline, f"fewer than {at_least} rows staged"
            if cluster.psql("SELECT to_regclass('inferd_batch_runs') IS NOT NULL",
                            db=db)[0][0] == "t":
                got = cluster.psql(f"SELECT max(records) FROM inferd_batch_runs WHERE "
                                   f"target = 'public.{table}' AND status = 'running'", db=db)
                if got[0][0] and int(got[0][0]) >= at_least:
                    break
            time.sleep(0.02)
        proc.kill()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


def test_kill_9_mid_run_then_the_same_command_continues(pg, repo, trained, tmp_path):
    """kill -9 once chunks are committed to the staging table: the target is as before (here:
    three rows put by hand); the same command again continues after the last row written
    (read from there, not from the start) and the final table equals an uninterrupted run's;
    inferd_batch_runs says so."""
    cluster, db, url = pg
    m = trained["binary"]
    n = 400_000
    cols = ", ".join(f"f{j} real" for j in range(m.n_features))
    vals = ", ".join(f"((i * {j + 3}) % 1000) / 250.0 - 2" for j in range(m.n_features))
    cluster.psql(f"CREATE TABLE big (id integer PRIMARY KEY, {cols}); "
                 f"INSERT INTO big SELECT i, {vals} FROM generate_series(0, {n - 1}) AS i", db=db)
    i = np.arange(n, dtype=np.int64)
    X = np.stack([((i * (j + 3)) % 1000) / 250.0 - 2 for j in range(m.n_features)],
                 axis=1).astype(np.float32)
    cluster.psql("CREATE TABLE scores (id integer PRIMARY KEY, prediction double precision, "
                 "model_version text); INSERT INTO scores VALUES (1, -1, 'x'), (7, -7, 'x'), "
                 "(10000000, -2, 'x')", db=db)
    before = scores(cluster, db, "scores")
    cmd = [str(INFERD_BIN), "batch", "--models", str(repo), "--model", "binary", "--input",
           f"{url}?table=big", "--output", f"{url}?table=scores", "--records-per-batch", "500"]
    kill_when_staged(cmd, cluster, db, "scores", 20_000)
    assert scores(cluster, db, "scores") == before, "a killed run changed the target"
    [left] = runs(cluster, db)
    assert left["status"] == "running" and left["target"] == "public.scores", left
    kept = int(left["records"])
    assert int(cluster.psql("SELECT count(*) FROM scores__inferd_staging", db=db)[0][0]) == kept
    assert left["resume_after"] == f"{kept - 1},", "the resume point is the last key written"
    p = run(repo, "binary", f"{url}?table=big", f"{url}?table=scores", "--records-per-batch",
            "500")
    assert f"records={n}" in p.stderr, p.stderr
    assert "continuing a run that did not finish" in p.stderr, p.stderr
    assert f"continuing after the last row written\" records={kept}" in p.stderr, p.stderr
    assert "discarding" not in p.stderr, p.stderr
    assert staging_left(cluster, db, "scores") == "f"
    got = scores(cluster, db, "scores")
    assert len(got) == n + 1 and got[-1] == before[-1], "the row of another key stays"
    assert [int(r[0]) for r in got[:-1]] == list(range(n))
    assert_close([r[1] for r in got[:-1]], m.expected(X), "after kill -9 and a re-run")
    [done] = runs(cluster, db)
    assert (done["id"], done["status"], done["records"], done["errors"], done["resumes"],
            done["resume_after"], done["finished"]) == \
        (left["id"], "succeeded", str(n), "0", "1", "", "t"), done
    # identical to an uninterrupted run's table
    run(repo, "binary", f"{url}?table=big", f"{url}?table=whole", "--records-per-batch", "500")
    assert cluster.psql("SELECT count(*) FROM (SELECT id, prediction, model_version FROM scores "
                        "WHERE id < 400000 EXCEPT SELECT id, prediction, model_version FROM "
                        "whole) AS d", db=db) == [["0"]]
    assert [r["status"] for r in runs(cluster, db)] == ["succeeded", "succeeded"]


def test_a_failed_run_says_how_to_continue_or_discard(pg, repo, trained, tmp_path):
    """A failed run keeps its rows and records why; another job on the same target (another
    query) discards them, and so does --restart; the run rows tell each run's story."""
    cluster, db, url = pg
    m = trained["binary"]
    X = array_table(cluster, db, m, 1000, 21, bad={950})
    out = f"{url}?table=scores"
    p = run(repo, "binary", f"{url}?table=arr", out, "--records-per-batch", "100", check=False)
    assert p.returncode != 0 and "row (id)=(950)" in p.stderr, p.stderr
    [failed] = runs(cluster, db)
    # rows are sent with their resume point at the first chunk's end, then once a second or
    # a mebibyte has gathered: here at least the first chunk's 100
    kept = int(failed["records"])
    assert 100 <= kept <= 900 and kept % 100 == 0, failed
    assert f"{kept} rows kept: run again to continue, --restart to discard" in p.stderr, p.stderr
    assert "the same command continues after them" in p.stderr, p.stderr
    assert (failed["status"], failed["resume_after"]) == ("failed", f"{kept - 1},"), failed
    assert int(cluster.psql("SELECT count(*) FROM scores__inferd_staging", db=db)[0][0]) == kept
    assert "row (id)=(950)" in failed["message"] and failed["finished"] == "t", failed
    assert cluster.psql("SELECT to_regclass('scores') IS NULL", db=db) == [["t"]]
    # the same again fails at the same row, reading from the row after the last kept
    p = run(repo, "binary", f"{url}?table=arr", out, "--records-per-batch", "100", check=False)
    assert f"continuing after the last row written\" records={kept}" in p.stderr, p.stderr
    assert p.returncode != 0 and "row (id)=(950)" in p.stderr, p.stderr
    # another job (a query) on the same target: what the failed run left goes
    q = "SELECT id, x FROM arr WHERE id < 950"
    p = run(repo, "binary", url, out, "--input-query", q, "--key-columns", "id")
    assert 'discarding the rows of a run that did not finish' in p.stderr, p.stderr
    assert "another job" in p.stderr, p.stderr
    assert len(scores(cluster, db, "scores")) == 950
    r = runs(cluster, db)
    assert [x["status"] for x in r] == ["discarded", "succeeded"], r
    assert r[1]["query"] == q and r[1]["key_columns"] == "id" and r[1]["model"] == "binary"
    # --restart: the same command starts over
    run(repo, "binary", f"{url}?table=arr", out, "--records-per-batch", "100", check=False)
    p = run(repo, "binary", f"{url}?table=arr", out, "--records-per-batch", "100",
            "--max-errors", "1", "--restart")
    assert 'reason="--restart"' in p.stderr and "continuing" not in p.stderr, p.stderr
    assert "records=1000" in p.stderr and "errors=1" in p.stderr, p.stderr
    assert [x["status"] for x in runs(cluster, db)] == \
        ["discarded", "succeeded", "discarded", "succeeded"]
    assert staging_left(cluster, db, "scores") == "f"


def test_objects_killed_mid_run_continue_from_the_object_and_line(pg, repo, trained, tmp_path):
    """Files into a table, kill -9 mid-run: the same command skips the objects written whole,
    writes the rest of the one it stopped in from the line after the last written, and the
    table equals an uninterrupted run's."""
    cluster, db, url = pg
    m = trained["regression"]
    inp = tmp_path / "in"
    inp.mkdir()
    n, parts = 60_000, 4
    X = m.rows(n * parts, 22, nan_fraction=0.05)
    for k in range(parts):
        np.savetxt(inp / f"part-{k}.csv", X[k * n:(k + 1) * n], delimiter=",", fmt="%.7g")
    cmd = [str(INFERD_BIN), "batch", "--models", str(repo), "--model", "regression", "--input",
           str(inp), "--output", f"{url}?table=obj", "--records-per-batch", "256",
           "--instances", "1"]
    kill_when_staged(cmd, cluster, db, "obj", n + 1000)
    [left] = runs(cluster, db)
    obj, line, _ = next(csv.reader([left["resume_after"]]))
    assert obj != "part-0.csv" and int(line) > 0, left
    p = run(repo, "regression", str(inp), f"{url}?table=obj", "--records-per-batch", "256")
    assert f"object={obj} line={line}" in p.stderr, p.stderr
    assert f"records={n * parts}" in p.stderr, p.stderr
    got = scores(cluster, db, "obj", keys=("source_object", "line"))
    assert [(r[0], int(r[1])) for r in got] == \
        [(f"part-{k}.csv", i) for k in range(parts) for i in range(1, n + 1)]
    assert_close([r[2] for r in got], m.expected(X), "objects after kill -9 and a re-run")
    assert runs(cluster, db)[0]["resumes"] == "1"


def test_table_output_password_never_shown(pg, repo, trained, tmp_path):
    cluster, db, _ = pg
    password = "Out3pwSecret77"
    role = f"tables_out_{db}"
    cluster.create_role(role, password)
    cluster.psql(f"GRANT ALL ON SCHEMA public TO {role}", db=db)
    cluster.require_password(role)
    m = trained["binary"]
    ids, X = feature_table(cluster, db, "feat", m, 30, 15)
    cluster.psql(f"GRANT SELECT ON feat TO {role}", db=db)
    url = cluster.db_url(db, role, password)
    p = run(repo, "binary", f"{url}?table=feat", f"{url}?table=scores", "--log-level", "debug")
    assert password not in p.stdout + p.stderr
    assert "***@127.0.0.1" in p.stderr, p.stderr
    got = scores(cluster, db, "scores")
    assert_close([r[1] for r in got], m.expected(X), "with a password")
    [r] = runs(cluster, db)
    assert r["source"].startswith("postgresql://***@127.0.0.1") and password not in str(r), r
    # an error from the sink: the table is not ours to change
    cluster.psql(f"CREATE TABLE locked (id integer PRIMARY KEY)", db=db)
    p = run(repo, "binary", f"{url}?table=feat", f"{url}?table=locked", check=False)
    assert p.returncode != 0 and "no column 'prediction'" in p.stderr, p.stderr
    assert password not in p.stdout + p.stderr
    (tmp_path / "in.csv").write_text("1,2,3,4,5,6,7\n")
    p = run(repo, "binary", str(tmp_path / "in.csv"), f"{url}?table=scores", "--join-input",
            check=False)
    assert p.returncode != 0 and "a table output holds the keys and the prediction only" \
        in p.stderr, p.stderr
    assert password not in p.stdout + p.stderr


def test_objects_into_a_table(pg, repo, trained, tmp_path):
    """Files under a prefix (CSV with a header, JSON Lines) into one table keyed by
    source_object and line; a bad line goes to the errors table by the same keys; the same
    command again replaces the scores."""
    cluster, db, url = pg
    m = trained["regression"]
    X = m.rows(300, 16, nan_fraction=0.1)
    inp = tmp_path / "in"
    (inp / "day=1").mkdir(parents=True)

    def num(v):
        return "" if np.isnan(v) else repr(float(v))

    header = ",".join(f"f{j}" for j in range(m.n_features))
    (inp / "day=1" / "a.csv").write_text(
        header + "\n" + "".join(",".join(num(v) for v in X[i]) + "\n" for i in range(200)))
    lines = [json.dumps([None if np.isnan(v) else float(v) for v in X[i]]) for i in range(200, 300)]
    lines[41] = "[1, 2]"  # line 42: a bad record
    (inp / "b.jsonl").write_text("\n".join(lines) + "\n")
    out = f"{url}?table=obj_scores"
    p = run(repo, "regression", str(inp), out, "--csv-header", "--max-errors", "1")
    assert "records=300" in p.stderr and "errors=1" in p.stderr, p.stderr
    assert column_type(cluster, db, "obj_scores", "source_object") == "text"
    assert column_type(cluster, db, "obj_scores", "line") == "bigint"
    got = scores(cluster, db, "obj_scores", keys=("source_object", "line"))
    assert [(r[0], int(r[1])) for r in got] == \
        [("b.jsonl", i) for i in range(1, 101) if i != 42] + \
        [("day=1/a.csv", i) for i in range(2, 202)]
    want = m.expected(X)
    assert_close([r[2] for r in got[:99]], np.delete(want[200:], 41), "jsonl object")
    assert_close([r[2] for r in got[99:]], want[:200], "csv object")
    errs = cluster.psql("SELECT source_object, line, reason FROM obj_scores_errors", db=db)
    assert errs == [["b.jsonl", "42", f"expected {m.n_features} values, got 2"]], errs
    run(repo, "regression", str(inp), out, "--csv-header", "--max-errors", "1")
    assert scores(cluster, db, "obj_scores", keys=("source_object", "line")) == got
    p = run(repo, "regression", str(inp), out, "--key-columns", "0", check=False)
    assert p.returncode != 0 and "keyed by source_object and line" in p.stderr, p.stderr


def test_s3_objects_into_a_table(pg, repo, trained, tmp_path, s3rver):
    cluster, db, url = pg
    m = trained["binary"]
    X = m.rows(60, 17)
    local = tmp_path / "in"
    local.mkdir()
    (local / "part-0.csv").write_text(
        "".join(",".join(repr(float(v)) for v in X[i]) + "\n" for i in range(60)))
    prefix = f"s3://{S3_BUCKET}/tables-{db}/in/"
    s3rver.upload(local, prefix)
    run(repo, "binary", prefix, f"{url}?table=s3_scores", "--s3-endpoint", s3rver.endpoint,
        env=s3rver.env())
    got = scores(cluster, db, "s3_scores", keys=("source_object", "line"))
    assert [(r[0], int(r[1])) for r in got] == [("part-0.csv", i) for i in range(1, 61)]
    assert_close([r[2] for r in got], m.expected(X), "an S3 object into a table")
