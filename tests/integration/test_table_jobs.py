"""Server batch jobs (``POST /v1/batch-jobs``) over a PostgreSQL table or query (issue 16).

A table input is cut by its keys into tasks of about ``records_per_task`` rows, which the
workers of a shared queue run side by side; each task writes ``SCHEMA.TABLE-NNNNN.jsonl`` (or
``.csv``), keys first. The tests start a throw-away PostgreSQL cluster (``shared_postgres``),
real ``inferd serve`` and ``inferd worker`` processes, and check that the parts together hold
every key once with python-xgboost's predictions, byte for byte what ``inferd batch`` writes
for the same table; that schedules, webhooks, cancel and bad definitions behave as for file
jobs; and that the password in the URI is never shown.
"""
import hashlib
import hmac
import itertools
import json
import re
import time

import numpy as np
import pytest
import requests

from conftest import SHARED_QUEUE_KINDS, assert_close, async_args, error_message, wait_for
from test_tables import feature_table, jsonl, run as cli_run

DEADLINE_S = 120.0
SECRET = "table-jobs-secret"
_dbs = itertools.count(1)


@pytest.fixture
def pg(shared_postgres):
    """(cluster, database name, its URL): a database of this test's own."""
    name = f"tjobs_{next(_dbs)}"
    shared_postgres.psql(f'CREATE DATABASE "{name}"')
    return shared_postgres, name, shared_postgres.db_url(name)


@pytest.fixture
def repo(tmp_path, trained):
    d = tmp_path / "models"
    for name in ("binary", "multiclass"):
        trained[name].install(d)
    return d


@pytest.fixture(params=SHARED_QUEUE_KINDS)
def queue_url(request):
    """The URL of a new queue that several processes share: a database of the session's
    redis-server or PostgreSQL cluster."""
    if request.param == "postgres":
        return request.getfixturevalue("shared_postgres").fresh_url()
    return request.getfixturevalue("shared_redis").fresh_url()


def submit(server, **definition):
    return requests.post(f"{server.url}/v1/batch-jobs", json=definition, timeout=60)


def get(server, bid):
    r = requests.get(f"{server.url}/v1/batch-jobs/{bid}", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def wait_status(server, bid, statuses):
    def check():
        j = get(server, bid)
        return j if j["status"] in statuses else None
    return wait_for(check, DEADLINE_S, f"batch job {bid} to be {statuses}")


def parts(out, stem, ext):
    """The part objects under `out`, in part order."""
    found = sorted(p for p in out.iterdir() if re.fullmatch(rf"{re.escape(stem)}-\d{{5}}\.{ext}",
                                                            p.name))
    assert found, f"no {stem}-NNNNN.{ext} under {out}: {sorted(p.name for p in out.iterdir())}"
    return found


def password_role(cluster, db, tables, password):
    """A role that must log in with `password`, allowed to read `tables`; its URL."""
    role = f"{db}_reader"
    cluster.create_role(role, password)
    cluster.psql(f"GRANT USAGE ON SCHEMA public TO {role}", db=db)
    for t in tables:
        cluster.psql(f"GRANT SELECT ON {t} TO {role}", db=db)
    cluster.require_password(role)
    return cluster.db_url(db, role, password)


def check_signed(req):
    h = {k.lower(): v for k, v in req["headers"].items()}
    want = hmac.new(SECRET.encode(), req["body"], hashlib.sha256).hexdigest()
    assert h.get("x-inferd-signature") == "sha256=" + want
    return json.loads(req["body"])


def test_workers_share_a_table_and_a_query(pg, repo, trained, tmp_path, queue_url,
                                           server_factory, worker_factory, webhook_receiver):
    """A table of 1000 rows in tasks of 100, and a query over it in CSV, run by two worker
    processes on one queue: each key once, python-xgboost's predictions, the bytes inferd batch
    writes; progress, manifest, _SUCCESS, the signed webhook; the password nowhere."""
    cluster, db, _ = pg
    m = trained["binary"]
    ids, X = feature_table(cluster, db, "feat", m, 1000, 21)
    password = "Tj8pwSecret5151"
    url = password_role(cluster, db, ["feat"], password)
    server = server_factory(repo, *async_args(tmp_path / "data", "--workers", "0",
                                              "--webhook-secret", SECRET, "--log-level", "debug",
                                              queue=queue_url))
    workers = [worker_factory(repo, queue_url, "--workers", "1", "--log-level", "debug",
                              "--webhook-secret", SECRET,
                              tag=f"worker{i}") for i in range(2)]

    out = tmp_path / "out"
    r = submit(server, model="binary", input=f"{url}?table=feat", output=str(out),
               records_per_task=100, records_per_batch=32,
               callback_url=webhook_receiver.url + "/t")
    assert r.status_code == 202, r.text
    assert password not in r.text
    bid = r.json()["id"]
    host_db = url.split("@", 1)[1]
    assert r.json()["input"] == f"postgresql://***@{host_db}?table=feat", r.json()["input"]
    assert r.json()["progress"]["objects_total"] == 10
    done = wait_status(server, bid, ("succeeded", "failed"))
    assert done["status"] == "succeeded", done
    assert done["progress"] == {"objects_total": 10, "objects_done": 10, "records_done": 1000,
                                "records_failed": 0}, done["progress"]
    files = parts(out, "public.feat", "jsonl")
    assert len(files) == 10
    rows = [row for f in files for row in jsonl(f)]
    assert [r["id"] for r in rows] == ids.tolist(), "each key once, in key order"
    assert_close([r["prediction"] for r in rows], m.expected(X), "parts of a table")
    cli_run(repo, "binary", f"{url}?table=feat", tmp_path / "cli", "--records-per-batch", "32")
    assert b"".join(f.read_bytes() for f in files) == \
        (tmp_path / "cli" / "public.feat.jsonl").read_bytes()
    assert (out / "_SUCCESS").exists()
    manifest = json.loads((out / "_manifest.json").read_text())
    assert sorted(manifest["objects"]) == [f.name for f in files]
    assert sum(o["records"] for o in manifest["objects"].values()) == 1000
    first = manifest["objects"]["public.feat-00000.jsonl"]["input"]
    assert first["after"] is None and first["upto"] == [str(ids[99])], first
    assert manifest["objects"]["public.feat-00009.jsonl"]["input"]["upto"] is None
    ran = [w.log().count('msg="batch task done"') for w in workers]
    assert sum(ran) == 10 and all(n > 0 for n in ran), f"tasks per worker: {ran}"

    # a query, CSV, composite order: the same rows through input_query
    out2 = tmp_path / "out2"
    r = submit(server, model="binary", input=url, output=str(out2), format="csv",
               input_query="SELECT * FROM feat WHERE id % 2 = 1", key_columns=["id"],
               records_per_task=70, callback_url=webhook_receiver.url + "/q")
    assert r.status_code == 202, r.text
    done = wait_status(server, r.json()["id"], ("succeeded", "failed"))
    assert done["status"] == "succeeded", done
    odd = ids % 2 == 1
    files = parts(out2, "query", "csv")
    assert len(files) == -(-int(odd.sum()) // 70)
    got = []
    for f in files:
        lines = f.read_text().splitlines()
        assert lines[0] == "id,prediction", lines[0]
        got += [ln.split(",") for ln in lines[1:]]
    assert [int(k) for k, _ in got] == ids[odd].tolist()
    assert_close([float(p) for _, p in got], m.expected(X[odd]), "parts of a query")

    hooks = wait_for(lambda: (lambda h: h if len(h) == 2 else None)(webhook_receiver.received()),
                     30, "two batch webhooks")
    for h in hooks:
        body = check_signed(h)
        assert body["type"] == "batch.succeeded", body
        assert password not in h["body"].decode()
    listed = requests.get(f"{server.url}/v1/batch-jobs", timeout=30)
    assert listed.status_code == 200 and password not in listed.text
    assert password not in get(server, bid).__repr__()
    metrics = requests.get(f"{server.url}/metrics", timeout=30).text
    assert password not in metrics
    for p in [server, *workers]:
        assert password not in p.log(), f"{p.tag} logged the password"


def test_schedule_fires_on_a_table(pg, repo, trained, tmp_path, monkeypatch, server_factory,
                                   webhook_receiver):
    """A schedule over a table runs on the clock, split into parts; a row added before the
    second run is in it."""
    cluster, db, url = pg
    m = trained["multiclass"]
    ids, X = feature_table(cluster, db, "mc", m, 300, 22)
    clock = tmp_path / "clock"
    clock.write_text(str(1893456030000))  # 2030-01-01T00:00:30Z
    monkeypatch.setenv("INFERD_CLOCK_FILE", str(clock))
    server = server_factory(repo, *async_args(tmp_path / "data", "--workers", "2",
                                              "--webhook-secret", SECRET))
    out = tmp_path / "nightly"
    r = submit(server, model="multiclass", input=f"{url}?table=mc", output=str(out),
               schedule="* * * * *", records_per_task=128,
               callback_url=webhook_receiver.url + "/s")
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    assert r.json()["records_per_task"] == 128 and r.json()["next_run_at"] == \
        "2030-01-01T00:01:00.000Z"

    clock.write_text(str(1893456065000))  # 00:01:05
    s = wait_for(lambda: (lambda j: j if j["runs"] else None)(get(server, sid)), 30, "a run")
    done = wait_status(server, s["runs"][0]["id"], ("succeeded", "failed"))
    assert done["status"] == "succeeded", done
    assert done["progress"]["objects_total"] == 3 and done["progress"]["records_done"] == 300
    files = parts(out / "20300101T0001Z", "public.mc", "jsonl")
    rows = [row for f in files for row in jsonl(f)]
    assert [r["id"] for r in rows] == ids.tolist()
    assert_close([r["prediction"] for r in rows], m.expected(X), "scheduled, multiclass")
    hook = wait_for(lambda: webhook_receiver.received("/s"), 30, "the run's webhook")
    assert check_signed(hook[0])["type"] == "batch.succeeded"

    # the table is gone by the next run: that run fails naming it, with its webhook
    cluster.psql("DROP TABLE mc", db=db)
    clock.write_text(str(1893456125000))  # 00:02:05
    s = wait_for(lambda: (lambda j: j if len(j["runs"]) == 2 else None)(get(server, sid)), 30,
                 "a second run")
    failed = wait_status(server, s["runs"][0]["id"], ("failed", "succeeded"))
    assert failed["status"] == "failed" and "no such table 'mc'" in failed["error"], failed
    hooks = wait_for(lambda: (lambda h: h if len(h) == 2 else None)(
        webhook_receiver.received("/s")), 30, "the failed run's webhook")
    assert check_signed(hooks[1])["type"] == "batch.failed"
    r = requests.delete(f"{server.url}/v1/batch-jobs/{sid}", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text


def test_bad_table_definitions(pg, repo, trained, tmp_path, server_factory):
    """Each mistake is a 400 naming it, with the URI's password masked; a good definition
    still runs afterwards."""
    cluster, db, _ = pg
    m = trained["binary"]
    feature_table(cluster, db, "feat", m, 50, 23)
    cols = ", ".join(f"f{j} double precision" for j in range(m.n_features))
    cluster.psql(f"CREATE TABLE txt (id integer PRIMARY KEY, {cols}, note text)", db=db)
    cluster.psql(f"CREATE TABLE nokey ({cols})", db=db)
    password = "Bd4pwSecret8080"
    url = password_role(cluster, db, ["feat", "txt", "nokey"], password)
    server = server_factory(repo, *async_args(tmp_path / "data", "--workers", "1"))
    base = {"model": "binary", "output": str(tmp_path / "out")}
    cases = [
        ({"input": f"{url}?table=nope"}, "no such table 'nope'"),
        ({"input": f"{url}?table=txt"}, "column 'note' has type text"),
        ({"input": f"{url}?table=feat", "key_columns": "idx"}, "no key column 'idx'"),
        ({"input": f"{url}?table=nokey"}, "has no primary key"),
        ({"input": url, "input_query": "SELECT * FROM feat"}, "needs --key-columns"),
        ({"input": url, "input_query": "SELECT * FROM nothere", "key_columns": "id"},
         'relation "nothere" does not exist'),
        ({"input": f"{url}?table=feat", "records_per_task": 0}, "records_per_task"),
        ({"input": str(tmp_path), "records_per_task": 10}, "records_per_task: only for a table"),
        ({"input": str(tmp_path), "input_query": "SELECT 1"}, "input_query: needs a postgresql"),
        ({"input": str(tmp_path), "output": f"{url}?table=scores", "key_columns": "0"},
         "key_columns: objects go into a table keyed by source_object and line"),
        ({"input": f"{url}?table=feat", "output": f"{url}?table=scores", "join_input": True},
         "join_input: a table output holds the keys and the prediction only"),
    ]
    for extra, words in cases:
        r = submit(server, **{**base, **extra})
        assert r.status_code == 400, (extra, r.status_code, r.text)
        assert words in error_message(r), (extra, error_message(r))
        assert password not in r.text, r.text
        # schedules are checked as runs are
        r = submit(server, **{**base, **extra, "schedule": "0 3 * * *"})
        assert r.status_code == 400 and words in error_message(r), (extra, r.text)
    # a key column holding NULL cannot be split by
    cluster.psql("CREATE TABLE nulls (code text, "
                 + ", ".join(f"f{j} double precision" for j in range(m.n_features)) + ")", db=db)
    cluster.psql("INSERT INTO nulls VALUES ('a'" + ", 0" * m.n_features + "), (NULL"
                 + ", 1" * m.n_features + ")", db=db)
    cluster.psql(f"GRANT SELECT ON nulls TO {db}_reader", db=db)
    r = submit(server, **base, input=f"{url}?table=nulls", key_columns="code")
    assert r.status_code == 400 and "key column 'code' is NULL in some rows" in error_message(r), \
        r.text
    r = submit(server, **base, input=f"{url}?table=feat", records_per_task=20)
    assert r.status_code == 202, r.text
    done = wait_status(server, r.json()["id"], ("succeeded", "failed"))
    assert done["status"] == "succeeded" and done["progress"]["objects_total"] == 3, done
    assert password not in server.log()


def test_cancel_and_a_source_gone_at_run_time(pg, repo, trained, tmp_path, shared_postgres,
                                              server_factory, worker_factory):
    """Cancel stops a table job's tasks; a table dropped after the split fails its tasks, and
    the run fails naming the table."""
    cluster, db, url = pg
    m = trained["binary"]
    feature_table(cluster, db, "big", m, 3000, 24, nan_fraction=0.0)
    feature_table(cluster, db, "gone", m, 40, 25)
    queue = shared_postgres.fresh_url()
    server = server_factory(repo, *async_args(tmp_path / "data", "--workers", "0", queue=queue))
    r = submit(server, model="binary", input=f"{url}?table=big", output=str(tmp_path / "o1"),
               records_per_task=10, records_per_batch=1)
    assert r.status_code == 202, r.text
    bid = r.json()["id"]
    assert r.json()["progress"]["objects_total"] == 300
    r = submit(server, model="binary", input=f"{url}?table=gone", output=str(tmp_path / "o2"),
               records_per_task=20)
    assert r.status_code == 202, r.text
    gone = r.json()["id"]
    cluster.psql("DROP TABLE gone", db=db)
    worker_factory(repo, queue, "--workers", "1")
    r = requests.delete(f"{server.url}/v1/batch-jobs/{bid}", timeout=30)
    assert r.status_code == 200, r.text
    done = wait_status(server, bid, ("cancelled",))
    assert done["progress"]["objects_done"] < 300, done
    failed = wait_status(server, gone, ("failed", "succeeded"))
    assert failed["status"] == "failed", failed
    assert "no such table 'gone'" in failed["error"], failed["error"]


def test_a_task_retries_while_its_source_is_down(postgres_server, trained, repo, tmp_path,
                                                  shared_postgres, server_factory,
                                                  worker_factory):
    """The source's server goes down after the split: the worker's attempts fail for a passing
    reason and are retried with backoff; once it is back, the run succeeds whole."""
    src = postgres_server
    src.psql('CREATE DATABASE "retry"')
    m = trained["binary"]
    ids, X = feature_table(src, "retry", "feat", m, 200, 26)
    queue = shared_postgres.fresh_url()
    server = server_factory(repo, *async_args(tmp_path / "data", "--workers", "0",
                                              "--max-attempts", "100", queue=queue))
    r = submit(server, model="binary", input=f"{src.db_url('retry')}?table=feat",
               output=str(tmp_path / "out"), records_per_task=80)
    assert r.status_code == 202, r.text
    bid = r.json()["id"]
    src.stop()
    worker = worker_factory(repo, queue, "--workers", "1")
    wait_for(lambda: 'msg="batch task failed"' in worker.log() and "retryable=1" in worker.log(),
             DEADLINE_S, "a task attempt to fail while the source is down")
    src.start()
    done = wait_status(server, bid, ("succeeded", "failed"))
    assert done["status"] == "succeeded", done
    assert done["progress"]["objects_done"] == 3 and done["progress"]["records_done"] == 200
    rows = [row for f in parts(tmp_path / "out", "public.feat", "jsonl") for row in jsonl(f)]
    assert [r["id"] for r in rows] == ids.tolist()
    assert_close([r["prediction"] for r in rows], m.expected(X), "after retries")


def test_workers_score_a_table_into_a_table(pg, repo, trained, tmp_path, queue_url,
                                            server_factory, worker_factory, webhook_receiver):
    """A table into a table by two worker processes, 10 parts: readers see no row until the
    finishing job merges every part at once; the table equals inferd batch's (the same
    predictions, key by key); the run has its inferd_batch_runs row; a second run replaces
    the scores; the password shows nowhere."""
    cluster, db, _ = pg
    m = trained["multiclass"]
    ids, X = feature_table(cluster, db, "feat", m, 1000, 31, key_type="bigint")
    password = "Tt7pwSecret6262"
    role = f"{db}_reader"
    url = password_role(cluster, db, ["feat"], password)
    cluster.psql(f"GRANT CREATE ON SCHEMA public TO {role}", db=db)
    server = server_factory(repo, *async_args(tmp_path / "data", "--workers", "0",
                                              "--webhook-secret", SECRET, "--log-level", "debug",
                                              queue=queue_url))
    workers = [worker_factory(repo, queue_url, "--workers", "1", "--log-level", "debug",
                              "--webhook-secret", SECRET, tag=f"worker{i}") for i in range(2)]
    out = f"{url}?table=scores"
    r = submit(server, model="multiclass", input=f"{url}?table=feat", output=out,
               records_per_task=100, records_per_batch=32,
               callback_url=webhook_receiver.url + "/tt")
    assert r.status_code == 202, r.text
    assert password not in r.text and r.json()["output"].startswith("postgresql://***@"), r.text
    bid = r.json()["id"]
    done = wait_status(server, bid, ("succeeded", "failed"))
    assert done["status"] == "succeeded", done
    assert done["progress"]["objects_total"] == 10 and done["progress"]["records_done"] == 1000

    def table(name):
        return [(int(k), [float(v) for v in p[1:-1].split(",")], ver) for k, p, ver in
                cluster.psql(f"SELECT id, prediction, model_version FROM {name} ORDER BY id",
                             db=db)]

    got = table("scores")
    assert [k for k, _, _ in got] == ids.tolist() and {v for _, _, v in got} == {"1"}
    assert_close([p for _, p, _ in got], m.expected(X), "a table into a table by two workers")
    cli_run(repo, "multiclass", f"{url}?table=feat", f"{url}?table=cli_scores")
    assert table("cli_scores") == got, "the server's table is inferd batch's"
    assert cluster.psql("SELECT count(*) FROM pg_class WHERE relname LIKE 'scores__inferd_%'",
                        db=db) == [["0"]], "the run's staging table is gone"
    rows = cluster.psql("SELECT status, records, errors, model, model_version, source "
                        f"FROM inferd_batch_runs WHERE batch_job = '{bid}'", db=db)
    assert len(rows) == 1 and rows[0][:5] == ["succeeded", "1000", "0", "multiclass", "1"], rows
    assert rows[0][5].startswith("postgresql://***@") and password not in rows[0][5]
    ran = [w.log().count('msg="batch task done"') for w in workers]
    assert sum(ran) == 10 and all(n > 0 for n in ran), f"tasks per worker: {ran}"

    # scored again: the scores replaced, key by key, one row each
    cluster.psql("UPDATE feat SET f0 = f0 + 1", db=db)
    X2 = X.copy()
    X2[:, 0] += 1
    r = submit(server, model="multiclass", input=f"{url}?table=feat", output=out,
               records_per_task=300)
    assert r.status_code == 202, r.text
    assert wait_status(server, r.json()["id"], ("succeeded", "failed"))["status"] == "succeeded"
    again = table("scores")
    assert [k for k, _, _ in again] == ids.tolist()
    assert_close([p for _, p, _ in again], m.expected(X2), "scored again")
    hook = wait_for(lambda: webhook_receiver.received("/tt"), 30, "the run's webhook")
    assert check_signed(hook[0])["type"] == "batch.succeeded" and \
        password not in hook[0]["body"].decode()
    for p in [server, *workers]:
        assert password not in p.log(), f"{p.tag} logged the password"


def test_a_schedule_scores_objects_into_a_table(pg, repo, trained, tmp_path, monkeypatch,
                                                 server_factory):
    """Files into a table by a scheduled server job, one task per object: keyed by
    source_object and line as inferd batch keys them; a bad line goes to the errors table;
    the next run replaces the scores."""
    cluster, db, url = pg
    m = trained["binary"]
    X = m.rows(300, 32)
    inp = tmp_path / "in"
    inp.mkdir()
    for k in range(3):
        lines = [",".join(repr(float(v)) for v in X[i]) for i in range(k * 100, (k + 1) * 100)]
        if k == 1:
            lines[9] = "1,2"  # part-1.csv line 10: a bad record
        (inp / f"part-{k}.csv").write_text("\n".join(lines) + "\n")
    clock = tmp_path / "clock"
    clock.write_text(str(1893456030000))  # 2030-01-01T00:00:30Z
    monkeypatch.setenv("INFERD_CLOCK_FILE", str(clock))
    server = server_factory(repo, *async_args(tmp_path / "data", "--workers", "2"))
    r = submit(server, model="binary", input=str(inp), output=f"{url}?table=obj",
               schedule="* * * * *", max_errors=1)
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    clock.write_text(str(1893456065000))  # 00:01:05
    s = wait_for(lambda: (lambda j: j if j["runs"] else None)(get(server, sid)), 30, "a run")
    run_id = s["runs"][0]["id"]
    done = wait_status(server, run_id, ("succeeded", "failed"))
    assert done["status"] == "succeeded", done
    got = cluster.psql("SELECT source_object, line, prediction FROM obj "
                       "ORDER BY source_object, line", db=db)
    keys = [(f"part-{k}.csv", i) for k in range(3) for i in range(1, 101)
            if (k, i) != (1, 10)]
    assert [(o, int(n)) for o, n, _ in got] == keys
    want = np.delete(m.expected(X), 109)
    assert_close([float(p) for _, _, p in got], want, "objects into a table, scheduled")
    assert cluster.psql("SELECT source_object, line, reason FROM obj_errors", db=db) == \
        [["part-1.csv", "10", f"expected {m.n_features} columns, got 2"]]
    rows = cluster.psql("SELECT status, records, errors FROM inferd_batch_runs WHERE "
                        f"batch_job = '{run_id}'", db=db)
    assert rows == [["succeeded", "300", "1"]], rows
    # the next run, with part-1 fixed: scored, and out of the errors table
    (inp / "part-1.csv").write_text("".join(",".join(repr(float(v)) for v in X[i]) + "\n"
                                            for i in range(100, 200)))
    clock.write_text(str(1893456125000))  # 00:02:05
    s = wait_for(lambda: (lambda j: j if len(j["runs"]) == 2 else None)(get(server, sid)), 30,
                 "a second run")
    assert wait_status(server, s["runs"][0]["id"], ("succeeded", "failed"))["status"] == \
        "succeeded"
    assert cluster.psql("SELECT count(*) FROM obj", db=db) == [["300"]]
    assert cluster.psql("SELECT count(*) FROM obj_errors", db=db) == [["0"]]
    requests.delete(f"{server.url}/v1/batch-jobs/{sid}", timeout=30)
