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

import numpy as np
import pandas as pd
import pytest
import requests
import xgboost as xgb

from conftest import INFERD_BIN, assert_close, async_args, error_message, free_port

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
    """Tables are not in server batch jobs yet: a definition naming one is a 400 that says so,
    and shows the URI without its password."""
    server = server_factory(repo, *async_args(tmp_path / "data"))
    password = "Srv7pwSecret99"
    r = requests.post(f"{server.url}/v1/batch-jobs", timeout=60, json={
        "model": "binary", "output": str(tmp_path / "out"),
        "input": f"postgresql://u:{password}@127.0.0.1:5432/db?table=t"})
    assert r.status_code == 400, r.text
    msg = error_message(r)
    assert "tables are not supported in server batch jobs yet" in msg, msg
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
