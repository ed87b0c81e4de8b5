"""Feature names and key columns: records are mapped to a model's features by name, and ids
travel through a batch.

The model is trained from a pandas DataFrame with named columns (``booster.feature_names``),
as a data scientist's model is. Files are written with their columns in another order than
training's, with an id column, as CSV with a header and as pandas' ``to_dict('records')`` in
JSON Lines; predictions must equal python-xgboost's given the DataFrame. The online v1 API
takes the same objects. Missing and unknown columns are errors naming them, and a header
line without --csv-header is refused with a hint.

Nothing here asserts on elapsed time; servers and batch jobs are waited for by polling.
"""
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import xgboost as xgb

from conftest import INFERD_BIN, assert_close, async_args, error_message, wait_for

FEATURES = ["f_age", "f_income", "tenure months", "f_score", "f_visits", "f_region"]
RUN_DEADLINE_S = 180.0


class NamedModel:
    """A 3-class booster trained from a DataFrame, and how to install it."""

    def __init__(self, path, booster):
        self.path, self.booster = path, booster

    def frame(self, n, seed):
        rng = np.random.default_rng(seed)
        X = rng.normal(0.0, 1.0, size=(n, len(FEATURES))).astype(np.float32)
        X[rng.random(X.shape) < 0.05] = np.nan
        df = pd.DataFrame(X, columns=FEATURES)
        df.insert(0, "id", [f"cust-{seed}-{i}" for i in range(n)])
        return df

    def expected(self, df):
        """python-xgboost's predictions given the DataFrame (its columns in any order)."""
        return self.booster.predict(xgb.DMatrix(df[FEATURES], missing=np.nan))

    def install(self, repo, name="named"):
        (repo / name / "1").mkdir(parents=True, exist_ok=True)
        (repo / name / "1" / "model.json").write_bytes(self.path.read_bytes())
        (repo / name / "config.json").write_text(json.dumps({"backend": "xgboost"}))


@pytest.fixture(scope="module")
def named(tmp_path_factory):
    rng = np.random.default_rng(7)
    X = rng.normal(0.0, 1.0, size=(1500, len(FEATURES))).astype(np.float32)
    score = X @ rng.normal(size=len(FEATURES))
    y = np.digitize(score, np.quantile(score, [1 / 3, 2 / 3])).astype(np.float32)
    df = pd.DataFrame(X, columns=FEATURES)
    booster = xgb.train({"objective": "multi:softprob", "num_class": 3, "max_depth": 4,
                         "eta": 0.3, "nthread": 1, "seed": 7},
                        xgb.DMatrix(df, label=y), num_boost_round=15)
    assert booster.feature_names == FEATURES
    path = tmp_path_factory.mktemp("named") / "model.json"
    booster.save_model(str(path))
    loaded = xgb.Booster(model_file=str(path))
    loaded.set_param({"nthread": 1})
    return NamedModel(path, loaded)


@pytest.fixture
def repo(tmp_path, named, trained):
    r = tmp_path / "models"
    named.install(r)
    trained["binary"].install(r)    # trained from numpy: no feature names
    trained["regression"].install(r)
    return r


def run_batch(repo, model, inp, out, *extra, check=True):
    cmd = [str(INFERD_BIN), "batch", "--models", str(repo), "--model", model,
           "--input", str(inp), "--output", str(out), *[str(a) for a in extra]]
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=RUN_DEADLINE_S)
    stderr = p.stderr.decode("utf-8", "replace")
    if check:
        assert p.returncode == 0, f"{' '.join(cmd)}: exit {p.returncode}\n{stderr[-3000:]}"
    return p.returncode, stderr


def reversed_csv(path, df, columns=None):
    """The frame with its columns reversed (the id column lands in the middle of them)."""
    cols = columns or list(reversed(list(df.columns)))
    path.parent.mkdir(parents=True, exist_ok=True)
    df[cols].to_csv(path, index=False, na_rep="")
    return path


def records_jsonl(path, df, shuffle_seed=0):
    """pandas' to_dict('records'), each record's keys in another order, NaN as null."""
    rng = np.random.default_rng(shuffle_seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for rec in df.to_dict("records"):
            keys = list(rec)
            rng.shuffle(keys)
            f.write(json.dumps({k: (None if isinstance(rec[k], float) and np.isnan(rec[k])
                                    else rec[k]) for k in keys}) + "\n")
    return path


def csv_rows(path):
    return [line.split(",") for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------
# item 1: feature names
# ---------------------------------------------------------------------------


def test_csv_header_is_mapped_by_name(repo, named, tmp_path):
    df = named.frame(300, seed=1)
    src = reversed_csv(tmp_path / "in" / "rev.csv", df.drop(columns="id"))
    run_batch(repo, "named", src, tmp_path / "out", "--csv-header")
    rows = csv_rows(tmp_path / "out" / "rev.csv.out")
    assert rows[0] == ["p0", "p1", "p2"], f"no header line matching the input's: {rows[0]}"
    got = np.array([[float(v) for v in r] for r in rows[1:]])
    assert_close(got, named.expected(df), "reversed-column CSV scored by name")


def test_csv_header_errors_name_the_column(repo, named, tmp_path):
    df = named.frame(20, seed=2)
    missing = reversed_csv(tmp_path / "m" / "missing.csv", df.drop(columns=["id", "f_score"]))
    rc, err = run_batch(repo, "named", missing, tmp_path / "out-m", "--csv-header", check=False)
    assert rc != 0 and "missing.csv" in err and "'f_score'" in err, err
    assert not (tmp_path / "out-m" / "missing.csv.out").exists()

    unknown = reversed_csv(tmp_path / "u" / "unknown.csv", df)   # "id", not a key column
    rc, err = run_batch(repo, "named", unknown, tmp_path / "out-u", "--csv-header", check=False)
    assert rc != 0 and "unknown.csv" in err and "column 'id'" in err, err
    assert "key column" in err, err


def test_header_errors_quote_nothing_of_a_file_that_is_no_data(repo, tmp_path):
    """--csv-header on a text file: its first line is no header, and the error names the
    column by position instead of copying the line (issue 13's rule)."""
    from conftest import assert_quotes_nothing_of, passwd_copy
    src = tmp_path / "in" / "stolen.csv"
    text = passwd_copy(src)
    rc, err = run_batch(repo, "named", src, tmp_path / "out", "--csv-header", check=False)
    assert rc != 0 and "stolen.csv: line 1 (header): column 1 is neither" in err, err
    assert_quotes_nothing_of(text, err, "stderr")
    src = tmp_path / "in2" / "stolen.jsonl"
    src.parent.mkdir(parents=True)
    src.write_text(json.dumps({line: 1 for line in text.splitlines()[:3]}) + "\n")
    rc, err = run_batch(repo, "named", src, tmp_path / "out2", check=False)
    assert rc != 0 and "line 1: field 1 is neither" in err, err
    assert_quotes_nothing_of(text, err, "stderr")


def test_header_line_without_csv_header_gets_a_hint(repo, named, tmp_path):
    src = reversed_csv(tmp_path / "h.csv", named.frame(5, seed=3).drop(columns="id"))
    rc, err = run_batch(repo, "named", src, tmp_path / "out", "--max-errors", "10", check=False)
    assert rc != 0, err
    assert "h.csv" in err and "did you mean --csv-header?" in err, err


def test_model_without_names_reads_the_header_by_position(repo, trained, tmp_path):
    m = trained["binary"]
    for i in range(2):
        X = m.rows(40, seed=30 + i)
        p = tmp_path / "in" / f"p{i}.csv"
        p.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(X, columns=[f"c{j}" for j in range(m.n_features)]).to_csv(p, index=False)
    rc, err = run_batch(repo, "binary", tmp_path / "in", tmp_path / "out", "--csv-header")
    said = [l for l in err.splitlines() if "no feature names" in l]
    assert len(said) == 1, f"expected one log line saying so, got {said}\n{err}"
    for i in range(2):
        rows = csv_rows(tmp_path / "out" / f"p{i}.csv.out")
        assert rows[0] == ["prediction"]
        assert_close(np.array([float(r[0]) for r in rows[1:]]),
                     m.expected(m.rows(40, seed=30 + i)), f"p{i}.csv")


def test_jsonl_object_records_are_mapped_by_name(repo, named, tmp_path):
    df = named.frame(250, seed=4).drop(columns="id")
    src = records_jsonl(tmp_path / "in" / "recs.jsonl", df)
    with open(src, "a") as f:
        f.write(json.dumps({**{k: 1.0 for k in FEATURES}, "zip": 1}) + "\n")
        f.write(json.dumps({k: 1.0 for k in FEATURES[1:]}) + "\n")
    run_batch(repo, "named", src, tmp_path / "out", "--max-errors", "2")
    lines = (tmp_path / "out" / "recs.jsonl.out").read_text().splitlines()
    assert len(lines) == 252 and lines[-2:] == ["", ""], lines[-3:]
    got = np.array([json.loads(l) for l in lines[:250]])
    assert_close(got, named.expected(df), "object records scored by name")
    errors = (tmp_path / "out" / "recs.jsonl.errors").read_text()
    assert "line 251: field 'zip' is neither a feature" in errors, errors
    assert "line 252: missing feature 'f_age'" in errors, errors


def test_object_records_need_feature_names(repo, trained, tmp_path):
    src = tmp_path / "o.jsonl"
    src.write_text(json.dumps({f"c{j}": 0.5 for j in range(7)}) + "\n")
    rc, err = run_batch(repo, "binary", src, tmp_path / "out", check=False)
    assert rc != 0 and "line 1" in err and "no feature names" in err, err


@pytest.fixture
def server(server_factory, repo):
    return server_factory(repo)


def test_metadata_lists_feature_names(server):
    md = requests.get(f"{server.url}/v2/models/named", timeout=30).json()
    assert md["inputs"][0]["parameters"] == {
        "feature_names": FEATURES, "feature_types": ["float"] * len(FEATURES)}, md
    md = requests.get(f"{server.url}/v2/models/binary", timeout=30).json()
    assert "parameters" not in md["inputs"][0], md


def test_v1_instances_as_objects(server, named):
    df = named.frame(50, seed=5).drop(columns="id")
    url = f"{server.url}/v1/models/named:predict"
    recs = [{k: (None if np.isnan(v) else float(v)) for k, v in reversed(list(r.items()))}
            for r in df.to_dict("records")]
    r = requests.post(url, json={"instances": recs}, timeout=60)
    assert r.status_code == 200, r.text
    assert_close(np.array(r.json()["predictions"]), named.expected(df), "v1 objects")

    bad = dict(recs[0], zip=1)
    r = requests.post(url, json={"instances": [recs[0], bad]}, timeout=60)
    assert r.status_code == 422 and "instances[1]" in error_message(r) \
        and "'zip'" in error_message(r), r.text
    short = {k: v for k, v in recs[0].items() if k != "f_income"}
    r = requests.post(url, json={"instances": [short]}, timeout=60)
    assert r.status_code == 422 and "missing feature 'f_income'" in error_message(r), r.text
    r = requests.post(f"{server.url}/v1/models/binary:predict",
                      json={"instances": [{"a": 1}]}, timeout=60)
    assert r.status_code == 400 and "no feature names" in error_message(r), r.text
    r = requests.post(url, json={"instances": recs[:1]}, timeout=60)   # still serving
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------------------
# item 2: key columns and the output suffix
# ---------------------------------------------------------------------------


def test_key_columns_csv_with_header(repo, named, tmp_path):
    df = named.frame(120, seed=6)
    src = reversed_csv(tmp_path / "in" / "customers.csv", df)
    run_batch(repo, "named", src, tmp_path / "out", "--csv-header", "--key-columns", "id")
    rows = csv_rows(tmp_path / "out" / "customers.csv.out")
    assert rows[0] == ["id", "p0", "p1", "p2"], rows[0]
    assert [r[0] for r in rows[1:]] == list(df["id"])
    got = np.array([[float(v) for v in r[1:]] for r in rows[1:]])
    assert_close(got, named.expected(df), "keyed CSV")
    # and pandas reads it back
    back = pd.read_csv(tmp_path / "out" / "customers.csv.out")
    assert list(back.columns) == ["id", "p0", "p1", "p2"] and list(back["id"]) == list(df["id"])


def test_key_columns_csv_without_header(repo, trained, tmp_path):
    m = trained["regression"]
    X = m.rows(80, seed=7)
    src = tmp_path / "plain.csv"
    ids = [f"r{i}" for i in range(len(X))]
    src.write_text("".join(f"{repr(float(r[0]))},{i},{','.join(repr(float(v)) for v in r[1:])}\n"
                           for i, r in zip(ids, X)))
    run_batch(repo, "regression", src, tmp_path / "out", "--key-columns", "1")
    rows = csv_rows(tmp_path / "out" / "plain.csv.out")
    assert len(rows) == len(X) and [r[0] for r in rows] == ids, rows[:2]
    assert_close(np.array([float(r[1]) for r in rows]), m.expected(X), "header-less keyed CSV")
    rc, err = run_batch(repo, "regression", src, tmp_path / "out2", "--key-columns", "id",
                        check=False)
    assert rc != 0 and "'id'" in err and "positions" in err, err


def test_key_columns_jsonl_objects_and_arrays(repo, named, trained, tmp_path):
    df = named.frame(90, seed=8)
    src = records_jsonl(tmp_path / "in" / "recs.jsonl", df, shuffle_seed=3)
    run_batch(repo, "named", src, tmp_path / "out", "--key-columns", "id")
    objs = [json.loads(l) for l in (tmp_path / "out" / "recs.jsonl.out").read_text().splitlines()]
    assert all(list(o) == ["id", "prediction"] for o in objs), objs[0]
    assert [o["id"] for o in objs] == list(df["id"])
    assert_close(np.array([o["prediction"] for o in objs]), named.expected(df), "keyed objects")

    m = trained["binary"]
    X = m.rows(60, seed=9)
    arr = tmp_path / "arr.jsonl"
    arr.write_text("".join(json.dumps([i, *[float(v) for v in r]]) + "\n" for i, r in enumerate(X)))
    run_batch(repo, "binary", arr, tmp_path / "out-arr", "--key-columns", "0")
    objs = [json.loads(l) for l in (tmp_path / "out-arr" / "arr.jsonl.out").read_text().splitlines()]
    assert [o["column_0"] for o in objs] == list(range(len(X))), objs[0]
    assert_close(np.array([o["prediction"] for o in objs]), m.expected(X), "keyed arrays")


def test_output_suffix(repo, named, tmp_path):
    df = named.frame(30, seed=10)
    src = reversed_csv(tmp_path / "in" / "customers.csv", df)
    run_batch(repo, "named", tmp_path / "in", tmp_path / "out", "--csv-header",
              "--key-columns", "id", "--output-suffix", "")
    back = pd.read_csv(tmp_path / "out" / "customers.csv")
    assert list(back["id"]) == list(df["id"])
    assert "customers.csv" in json.loads((tmp_path / "out" / "_manifest.json").read_text())["objects"]
    # a re-run skips it; outputs inside the input are refused (they would replace it)
    rc, err = run_batch(repo, "named", tmp_path / "in", tmp_path / "out", "--csv-header",
                        "--key-columns", "id", "--output-suffix", "")
    assert "skipped=1" in err, err
    rc, err = run_batch(repo, "named", tmp_path / "in", tmp_path / "in", "--csv-header",
                        "--key-columns", "id", "--output-suffix", "", check=False)
    assert rc != 0 and "output suffix" in err, err
    assert src.read_text().startswith(",".join(reversed(list(df.columns))))


def test_server_batch_job_keys_and_suffix(tmp_path, repo, named, server_factory, fresh_queue):
    q = fresh_queue()
    server = server_factory(repo, *async_args(tmp_path / "data", "--workers", "2", queue=q))
    df = named.frame(200, seed=11)
    reversed_csv(tmp_path / "in" / "customers.csv", df)
    records_jsonl(tmp_path / "in" / "more.jsonl", df, shuffle_seed=5)
    out = tmp_path / "out"
    r = requests.post(f"{server.url}/v1/batch-jobs", timeout=60, json={
        "model": "named", "input": str(tmp_path / "in"), "output": str(out),
        "csv_header": True, "key_columns": ["id"], "output_suffix": "",
        "records_per_batch": 64})
    assert r.status_code == 202, r.text
    bid = r.json()["id"]

    def final():
        j = requests.get(f"{server.url}/v1/batch-jobs/{bid}", timeout=30).json()
        return j if j["status"] in ("succeeded", "failed") else None
    job = wait_for(final, RUN_DEADLINE_S, f"batch job {bid} to finish")
    assert job["status"] == "succeeded", job
    back = pd.read_csv(out / "customers.csv")
    assert list(back["id"]) == list(df["id"])
    assert_close(back[["p0", "p1", "p2"]].to_numpy(), named.expected(df), "server keyed CSV")
    objs = [json.loads(l) for l in (out / "more.jsonl").read_text().splitlines()]
    assert [o["id"] for o in objs] == list(df["id"])
    # byte for byte what inferd batch writes
    run_batch(repo, "named", tmp_path / "in", tmp_path / "cli", "--csv-header",
              "--key-columns", "id", "--output-suffix", "", "--records-per-batch", "64")
    for name in ("customers.csv", "more.jsonl"):
        assert (out / name).read_bytes() == (tmp_path / "cli" / name).read_bytes(), name
    # a header that does not fit the model fails the job, naming the object and the column
    r = requests.post(f"{server.url}/v1/batch-jobs", timeout=60, json={
        "model": "named", "input": str(tmp_path / "in" / "customers.csv"),
        "output": str(tmp_path / "out-bad"), "csv_header": True})
    assert r.status_code == 202, r.text
    bid = r.json()["id"]
    job = wait_for(final, RUN_DEADLINE_S, f"batch job {bid} to finish")
    assert job["status"] == "failed" and "customers.csv" in job["error"] \
        and "column 'id'" in job["error"], job
    # bad definitions name the field
    for body, words in (({"key_columns": "id,,x"}, "empty name"),
                        ({"key_columns": 3}, "key_columns"),
                        ({"output_suffix": "a/b"}, "output suffix"),
                        ({"output_suffix": "", "output": str(tmp_path / "in" / "o")},
                         "output suffix")):
        d = {"model": "named", "input": str(tmp_path / "in"), "output": str(tmp_path / "o2"),
             **body}
        r = requests.post(f"{server.url}/v1/batch-jobs", json=d, timeout=60)
        assert r.status_code == 400 and words in error_message(r), (body, r.text)


def test_join_input_keeps_the_header_and_keys(repo, named, tmp_path):
    df = named.frame(40, seed=12)
    cols = list(reversed(list(df.columns)))
    src = reversed_csv(tmp_path / "in" / "j.csv", df)
    run_batch(repo, "named", src, tmp_path / "out", "--csv-header", "--key-columns", "id",
              "--join-input")
    back = pd.read_csv(tmp_path / "out" / "j.csv.out")
    assert list(back.columns) == cols + ["p0", "p1", "p2"], list(back.columns)
    assert list(back["id"]) == list(df["id"])
    assert_close(back[["p0", "p1", "p2"]].to_numpy(), named.expected(df), "joined CSV")

    src = records_jsonl(tmp_path / "in2" / "j.jsonl", df)
    run_batch(repo, "named", src, tmp_path / "out2", "--key-columns", "id", "--join-input")
    objs = [json.loads(l) for l in (tmp_path / "out2" / "j.jsonl.out").read_text().splitlines()]
    assert all(list(o) == ["id", "input", "prediction"] for o in objs), objs[0]
    assert [o["id"] for o in objs] == [o["input"]["id"] for o in objs] == list(df["id"])
    assert_close(np.array([o["prediction"] for o in objs]), named.expected(df), "joined JSONL")
