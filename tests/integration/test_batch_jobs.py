"""Server-side batch jobs: ``/v1/batch-jobs`` through the queue.

A batch job is split into one queue task per input object, run by the server's
workers; its outputs must be exactly what ``inferd batch`` writes for the same
input (``<name>.out`` per object, ``_manifest.json``, ``_SUCCESS``). The tests
start real ``inferd serve`` processes, submit over HTTP, read the files back and
compare predictions with python-xgboost. Schedules run against a clock file
(``INFERD_CLOCK_FILE``) that the test moves forward, so no test waits minutes.
Every test runs on both queues (SQLite and Redis: the ``fresh_queue`` fixture).
Nothing asserts on elapsed time.
"""
import calendar
import hashlib
import hmac
import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from conftest import (INFERD_BIN, SHARED_QUEUE_KINDS, async_args, assert_close, error_message,
                      wait_for)

SECRET = "batch-secret"


def qa(queue, data_dir, *extra):
    """serve's options for a job queue: SQLite under data_dir, or the Redis of fresh_queue."""
    return async_args(data_dir, *extra, queue=queue)
DEADLINE_S = 120.0


def write_csv(path, X):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in X:
            f.write(",".join("" if np.isnan(v) else repr(float(v)) for v in row) + "\n")


def write_jsonl(path, X):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in X:
            f.write(json.dumps([None if np.isnan(v) else float(v) for v in row]) + "\n")


def read_predictions(path):
    return np.array([float(line) for line in path.read_text().splitlines()])


def get(server, bid):
    r = requests.get(f"{server.url}/v1/batch-jobs/{bid}", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def submit(server, **definition):
    return requests.post(f"{server.url}/v1/batch-jobs", json=definition, timeout=60)


def wait_status(server, bid, statuses, deadline_s=DEADLINE_S):
    def check():
        j = get(server, bid)
        return j if j["status"] in statuses else None
    return wait_for(check, deadline_s, f"batch job {bid} to be {statuses}")


def cli_batch(inp, out, model, repo, *extra):
    p = subprocess.run([str(INFERD_BIN), "batch", "--models", str(repo), "--model", model,
                        "--input", str(inp), "--output", str(out), *extra],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=DEADLINE_S)
    assert p.returncode == 0, p.stderr.decode()


def check_signed(req):
    h = {k.lower(): v for k, v in req["headers"].items()}
    sig = h.get("x-inferd-signature", "")
    want = hmac.new(SECRET.encode(), req["body"], hashlib.sha256).hexdigest()
    assert sig == "sha256=" + want, f"bad signature {sig!r}"
    body = json.loads(req["body"])
    assert h.get("x-inferd-event-id") == body["id"]
    return body


@pytest.fixture
def inputs(tmp_path, trained):
    """Three objects (two CSV, one nested JSONL) for the binary model, and the repo."""
    m = trained["binary"]
    repo = tmp_path / "models"
    m.install(repo)
    data = {}
    for i, name in enumerate(["a.csv", "b.csv", "sub/c.jsonl"]):
        X = m.rows(700 + 50 * i, seed=10 + i, nan_fraction=0.05)
        data[name] = X
        (write_jsonl if name.endswith(".jsonl") else write_csv)(tmp_path / "in" / name, X)
    return m, repo, tmp_path / "in", data


def test_batch_job_end_to_end(tmp_path, inputs, server_factory, webhook_receiver, fresh_queue):
    q = fresh_queue()
    m, repo, inp, data = inputs
    server = server_factory(repo, *qa(q, tmp_path / "data", "--workers", "3",
                                              "--webhook-secret", SECRET))
    out = tmp_path / "out"
    r = submit(server, model=m.name, input=str(inp), output=f"file://{out}",
               records_per_batch=128, callback_url=webhook_receiver.url + "/batch")
    assert r.status_code == 202, r.text
    job = r.json()
    bid = job["id"]
    assert r.headers["Location"] == f"/v1/batch-jobs/{bid}"
    assert job["status"] in ("queued", "running", "succeeded")
    assert job["progress"]["objects_total"] == 3
    done = wait_status(server, bid, ("succeeded", "failed"))
    assert done["status"] == "succeeded", done
    assert done["progress"] == {"objects_total": 3, "objects_done": 3,
                                "records_done": sum(len(X) for X in data.values()),
                                "records_failed": 0}
    assert done["started_at"] and done["finished_at"] and done["error"] is None
    for name, X in data.items():
        assert_close(read_predictions(out / (name + ".out")), m.expected(X), name)
    assert (out / "_SUCCESS").exists()
    manifest = json.loads((out / "_manifest.json").read_text())
    assert sorted(manifest["objects"]) == sorted(data)
    for name in data:
        sha = hashlib.sha256((out / (name + ".out")).read_bytes()).hexdigest()
        st = (inp / name).stat()   # the input's identity: a CLI re-run redoes changed inputs
        assert manifest["objects"][name] == {
            "records": len(data[name]), "sha256": sha,
            "input": {"size": st.st_size, "mtime_ns": st.st_mtime_ns}}, manifest["objects"][name]
    # byte for byte what `inferd batch` writes for the same input
    cli_out = tmp_path / "cli-out"
    cli_batch(inp, cli_out, m.name, repo, "--records-per-batch", "128")
    for name in data:
        assert (out / (name + ".out")).read_bytes() == (cli_out / (name + ".out")).read_bytes()
    # the signed batch.succeeded webhook
    hook = wait_for(lambda: webhook_receiver.received("/batch"), 30, "the batch webhook")
    body = check_signed(hook[0])
    assert body["type"] == "batch.succeeded"
    assert body["batch_job"]["id"] == bid and body["batch_job"]["status"] == "succeeded"
    assert body["batch_job"]["progress"]["objects_done"] == 3
    # the tasks are not async jobs
    jobs = requests.get(f"{server.url}/v1/jobs", timeout=30).json()["jobs"]
    assert jobs == []
    listed = requests.get(f"{server.url}/v1/batch-jobs", timeout=30).json()["batch_jobs"]
    assert [b["id"] for b in listed] == [bid]


def test_bad_record_policies(tmp_path, inputs, server_factory, webhook_receiver, fresh_queue):
    q = fresh_queue()
    m, repo, inp, data = inputs
    lines = (inp / "b.csv").read_text().splitlines()
    lines[41] = "1,2,oops"
    (inp / "b.csv").write_text("\n".join(lines) + "\n")
    server = server_factory(repo, *qa(q, tmp_path / "data", "--webhook-secret", SECRET))
    r = submit(server, model=m.name, input=str(inp), output=str(tmp_path / "strict"),
               callback_url=webhook_receiver.url + "/strict")
    assert r.status_code == 202, r.text
    failed = wait_status(server, r.json()["id"], ("succeeded", "failed"))
    assert failed["status"] == "failed", failed
    assert "b.csv" in failed["error"] and "line 42" in failed["error"], failed["error"]
    assert not (tmp_path / "strict" / "_SUCCESS").exists()
    hook = wait_for(lambda: webhook_receiver.received("/strict"), 30, "the failure webhook")
    body = check_signed(hook[0])
    assert body["type"] == "batch.failed" and "line 42" in body["batch_job"]["error"]

    r = submit(server, model=m.name, input=str(inp), output=str(tmp_path / "lenient"),
               max_errors=3)
    ok = wait_status(server, r.json()["id"], ("succeeded", "failed"))
    assert ok["status"] == "succeeded", ok
    assert ok["progress"]["records_failed"] == 1
    out_lines = (tmp_path / "lenient" / "b.csv.out").read_text().split("\n")
    assert out_lines[41] == "" and len(out_lines) == len(lines) + 1
    assert "line 42" in (tmp_path / "lenient" / "b.csv.errors").read_text()


@pytest.mark.parametrize("body,status,words", [
    ({"input": "/x", "output": "/y"}, 400, "model"),
    ({"model": "nope", "input": "/x", "output": "/y"}, 404, "nope"),
    ({"model": "binary", "output": "/y"}, 400, "input"),
    ({"model": "binary", "input": "/x"}, 400, "output"),
    ({"model": "binary", "input": "/x", "output": "/y", "format": "xml"}, 400, "format"),
    ({"model": "binary", "input": "/x", "output": "/y", "max_errors": -1}, 400, "max_errors"),
    ({"model": "binary", "input": "/x", "output": "/y", "records_per_batch": 0}, 400,
     "records_per_batch"),
    ({"model": "binary", "input": "/x", "output": "/y", "inptu": 1}, 400, "inptu"),
    ({"model": "binary", "input": "gs://b/k", "output": "/y"}, 400, "input"),
    ({"model": "binary", "input": "/x", "output": "/y", "schedule": "61 * * * *"}, 400,
     "schedule"),
    ({"model": "binary", "input": "/x", "output": "/y", "callback_url": "ftp://x"}, 400,
     "callback_url"),
])
def test_bad_definitions(tmp_path, trained, server_factory, body, status, words, fresh_queue):
    q = fresh_queue()
    repo = tmp_path / "models"
    trained["binary"].install(repo)
    server = server_factory(repo, *qa(q, tmp_path / "data"))
    r = submit(server, **body)
    assert r.status_code == status, r.text
    assert words in error_message(r)


def test_file_roots_confine_batch_jobs(tmp_path, trained, server_factory, fresh_queue):
    q = fresh_queue()
    repo = tmp_path / "models"
    trained["binary"].install(repo)
    root = tmp_path / "root"
    X = trained["binary"].rows(5, seed=150)
    write_jsonl(root / "in" / "a.jsonl", X)
    write_jsonl(tmp_path / "elsewhere" / "a.jsonl", X)
    server = server_factory(repo, *qa(q, tmp_path / "data"), "--file-roots", str(root))
    for field, value in (("input", str(tmp_path / "elsewhere")),
                         ("output", str(tmp_path / "elsewhere" / "out"))):
        body = {"model": "binary", "input": str(root / "in"), "output": str(root / "out"),
                field: value}
        r = submit(server, **body)
        assert r.status_code == 400, f"{field}={value}: HTTP {r.status_code}: {r.text[:300]}"
        msg = error_message(r)
        assert field in msg and "--file-roots" in msg, msg
    r = submit(server, model="binary", input=str(root / "in"), output=str(root / "out"))
    assert r.status_code == 202, r.text
    assert wait_status(server, r.json()["id"], {"succeeded"})["status"] == "succeeded"
    assert_close(read_predictions(root / "out" / "a.jsonl.out"), trained["binary"].expected(X),
                 "batch output inside the root")
    assert not (tmp_path / "elsewhere" / "out").exists()


def test_missing_input(tmp_path, trained, server_factory, fresh_queue):
    q = fresh_queue()
    repo = tmp_path / "models"
    trained["binary"].install(repo)
    server = server_factory(repo, *qa(q, tmp_path / "data"))
    r = submit(server, model="binary", input=str(tmp_path / "nothing-here"),
               output=str(tmp_path / "out"))
    assert r.status_code == 404, r.text
    assert "nothing-here" in error_message(r)
    (tmp_path / "weird").mkdir()
    (tmp_path / "weird" / "data.parquet").write_text("x")
    r = submit(server, model="binary", input=str(tmp_path / "weird"), output=str(tmp_path / "o"))
    assert r.status_code == 400 and "data.parquet" in error_message(r), r.text
    r = requests.get(f"{server.url}/v1/batch-jobs/batch-nope", timeout=30)
    assert r.status_code == 404 and "batch-nope" in error_message(r)


def test_cancel_running_batch(tmp_path, trained, server_factory, fresh_queue):
    q = fresh_queue()
    m = trained["slow"]
    repo = tmp_path / "models"
    m.install(repo, config={"backend": "xgboost", "instances": 1})
    for i in range(8):
        write_csv(tmp_path / "in" / f"part-{i}.csv", m.rows(3000, seed=i))
    server = server_factory(repo, *qa(q, tmp_path / "data", "--workers", "1"))
    r = submit(server, model=m.name, input=str(tmp_path / "in"), output=str(tmp_path / "out"),
               records_per_batch=64)
    bid = r.json()["id"]
    wait_status(server, bid, ("running",))
    r = requests.delete(f"{server.url}/v1/batch-jobs/{bid}", timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "cancelled"
    # the running task stops; no further object is started and no _SUCCESS appears
    def idle():
        return requests.get(f"{server.url}/metrics", timeout=30).ok and \
            all(s not in ("queued", "running") for s in [get(server, bid)["status"]])
    wait_for(idle, 30, "the cancelled batch job to settle")
    time.sleep(1.0)
    j = get(server, bid)
    assert j["status"] == "cancelled" and j["progress"]["objects_done"] < 8, j
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    r = requests.delete(f"{server.url}/v1/batch-jobs/{bid}", timeout=30)
    assert r.status_code == 409 and "cancelled" in error_message(r)


def test_batch_survives_kill(tmp_path, trained, server_factory, fresh_queue):
    """kill -9 in the middle; after a restart the run completes with the same outputs.

    SQLite requeues the dead process's tasks when it reopens; Redis (shared by many
    processes) when their lease runs out: hence the short lease."""
    q = fresh_queue()
    m = trained["slow"]
    repo = tmp_path / "models"
    m.install(repo, config={"backend": "xgboost", "instances": 1, "lease_timeout_s": 3})
    for i in range(6):
        write_csv(tmp_path / "in" / f"part-{i}.csv", m.rows(2500, seed=20 + i))
    args = qa(q, tmp_path / "data", "--workers", "1")
    server = server_factory(repo, *args)
    r = submit(server, model=m.name, input=str(tmp_path / "in"), output=str(tmp_path / "out"),
               records_per_batch=64)
    bid = r.json()["id"]
    wait_for(lambda: get(server, bid)["progress"]["objects_done"] >= 1, DEADLINE_S,
             "one object done")
    server.kill()
    server2 = server_factory(repo, *args)
    done = wait_status(server2, bid, ("succeeded", "failed"))
    assert done["status"] == "succeeded", done
    assert done["progress"]["objects_done"] == 6
    cli_batch(tmp_path / "in", tmp_path / "cli", m.name, repo, "--records-per-batch", "64")
    for i in range(6):
        name = f"part-{i}.csv.out"
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "cli" / name).read_bytes()
    assert not [p for p in (tmp_path / "out").iterdir() if ".tmp-" in p.name]


def utc_ms(y, mo, d, h, mi, s=0):
    return calendar.timegm((y, mo, d, h, mi, s)) * 1000


def test_schedule_fires_on_the_clock(tmp_path, inputs, server_factory, monkeypatch,
                                     webhook_receiver, fresh_queue):
    q = fresh_queue()
    m, repo, inp, data = inputs
    clock = tmp_path / "clock"
    clock.write_text(str(utc_ms(2030, 1, 1, 0, 0, 30)))
    monkeypatch.setenv("INFERD_CLOCK_FILE", str(clock))
    server = server_factory(repo, *qa(q, tmp_path / "data", "--webhook-secret", SECRET))
    out = tmp_path / "nightly"
    r = submit(server, model=m.name, input=str(inp), output=str(out), schedule="* * * * *",
               callback_url=webhook_receiver.url + "/sched")
    assert r.status_code == 201, r.text
    sched = r.json()
    sid = sched["id"]
    assert sched["status"] == "scheduled" and sched["schedule"] == "* * * * *"
    assert sched["next_run_at"] == "2030-01-01T00:01:00.000Z"
    assert sched["runs"] == []
    time.sleep(1.5)
    assert get(server, sid)["runs"] == []        # not due yet: the clock has not moved

    clock.write_text(str(utc_ms(2030, 1, 1, 0, 1, 5)))
    s = wait_for(lambda: (lambda j: j if j["runs"] else None)(get(server, sid)), 30, "a run")
    run = s["runs"][0]
    assert run["run_at"] == "2030-01-01T00:01:00.000Z" and run["schedule_id"] == sid
    assert s["next_run_at"] == "2030-01-01T00:02:00.000Z"
    done = wait_status(server, run["id"], ("succeeded", "failed"))
    assert done["status"] == "succeeded", done
    assert done["output"] == str(out / "20300101T0001Z")
    for name, X in data.items():
        assert_close(read_predictions(out / "20300101T0001Z" / (name + ".out")), m.expected(X))
    assert (out / "20300101T0001Z" / "_SUCCESS").exists()

    # minutes missed while nothing looked run once, then the schedule moves past now
    clock.write_text(str(utc_ms(2030, 1, 1, 0, 3, 10)))
    s = wait_for(lambda: (lambda j: j if len(j["runs"]) == 2 else None)(get(server, sid)), 30,
                 "a second run")
    assert s["runs"][0]["run_at"] == "2030-01-01T00:02:00.000Z"
    assert s["next_run_at"] == "2030-01-01T00:04:00.000Z"
    wait_status(server, s["runs"][0]["id"], ("succeeded",))
    hooks = wait_for(lambda: (lambda h: h if len(h) >= 2 else None)(
        webhook_receiver.received("/sched")), 30, "two run webhooks")
    assert all(check_signed(h)["type"] == "batch.succeeded" for h in hooks)

    listed = requests.get(f"{server.url}/v1/batch-jobs", timeout=30).json()["batch_jobs"]
    assert [b["id"] for b in listed] == [sid] and len(listed[0]["runs"]) == 2

    r = requests.delete(f"{server.url}/v1/batch-jobs/{sid}", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    clock.write_text(str(utc_ms(2030, 1, 1, 0, 9, 0)))
    time.sleep(2.5)
    assert len(get(server, sid)["runs"]) == 2


def test_workers_share_one_batch_job(tmp_path, trained, server_factory, worker_factory,
                                     queue_kind, fresh_queue):
    """Redis, PostgreSQL: an API that runs nothing and three worker processes; 30 input
    objects are shared among the workers and the outputs equal a single-process `inferd batch`
    run's."""
    if queue_kind not in SHARED_QUEUE_KINDS:
        pytest.skip("worker processes share a Redis or PostgreSQL queue only")
    q = fresh_queue()
    m = trained["regression"]
    repo = tmp_path / "models"
    m.install(repo)
    for i in range(30):
        write_csv(tmp_path / "in" / f"part-{i:02d}.csv", m.rows(400 + i, seed=100 + i))
    server = server_factory(repo, *qa(q, tmp_path / "data", "--workers", "0"))
    workers = [worker_factory(repo, q, "--workers", "1", tag=f"worker{i}") for i in range(3)]
    r = submit(server, model=m.name, input=str(tmp_path / "in"), output=str(tmp_path / "out"),
               records_per_batch=64)
    assert r.status_code == 202, r.text
    done = wait_status(server, r.json()["id"], ("succeeded", "failed"))
    assert done["status"] == "succeeded", done
    assert done["progress"]["objects_done"] == 30
    cli_batch(tmp_path / "in", tmp_path / "cli", m.name, repo, "--records-per-batch", "64")
    for i in range(30):
        name = f"part-{i:02d}.csv.out"
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "cli" / name).read_bytes()
    assert json.loads((tmp_path / "out" / "_manifest.json").read_text()) == \
        json.loads((tmp_path / "cli" / "_manifest.json").read_text())
    ran = [w.log().count('msg="batch task done"') for w in workers]
    assert sum(ran) == 30 and all(n > 0 for n in ran), f"tasks per worker: {ran}"


# ---------------------------------------------------------------------------
# issue 13: what a file holds stays out of messages; NUL bytes
# ---------------------------------------------------------------------------


def test_errors_quote_nothing_of_the_file(tmp_path, trained, server_factory, fresh_queue):
    """A batch job over a copy of /etc/passwd: .errors and the job's error name the line and
    the problem, and hold none of the file's words."""
    from conftest import assert_quotes_nothing_of, passwd_copy
    q = fresh_queue()
    repo = tmp_path / "models"
    trained["binary"].install(repo)
    texts = {name: passwd_copy(tmp_path / "in" / name) for name in ("stolen.csv", "stolen.jsonl")}
    server = server_factory(repo, *qa(q, tmp_path / "data"))
    r = submit(server, model="binary", input=str(tmp_path / "in"), output=str(tmp_path / "out"),
               max_errors=100000)
    assert r.status_code == 202, r.text
    done = wait_status(server, r.json()["id"], ("succeeded", "failed"))
    assert done["status"] == "succeeded", done
    for name, text in texts.items():
        errs = (tmp_path / "out" / f"{name}.errors").read_text()
        assert errs.startswith("line 1: ") and len(errs.splitlines()) == len(text.splitlines())
        assert_quotes_nothing_of(text, errs, f"{name}.errors")

    r = submit(server, model="binary", input=str(tmp_path / "in"), output=str(tmp_path / "strict"))
    failed = wait_status(server, r.json()["id"], ("succeeded", "failed"))
    assert failed["status"] == "failed" and "line 1:" in failed["error"], failed
    assert_quotes_nothing_of(texts["stolen.csv"], failed["error"], "the job's error")


def test_nul_bytes_make_bad_records(tmp_path, trained, server_factory, fresh_queue):
    """A NUL byte inside a record (CSV and JSON Lines) makes it a bad record, counted and named
    by its line; the other records score as python-xgboost does."""
    q = fresh_queue()
    m = trained["binary"]
    repo = tmp_path / "models"
    m.install(repo)
    X = m.rows(60, seed=170)
    bad = [3, 41]
    for ext, writer in (("csv", write_csv), ("jsonl", write_jsonl)):
        path = tmp_path / "in" / f"nul.{ext}"
        writer(path, X)
        lines = path.read_bytes().split(b"\n")
        for ln in bad:   # five more columns after the NUL: a reader stopping there sees none
            tail = b",1,2,3,4,5" if ext == "csv" else b",1,2,3,4,5]"
            lines[ln - 1] = (lines[ln - 1] if ext == "csv" else lines[ln - 1][:-1]) + b"\0" + tail
        path.write_bytes(b"\n".join(lines))
    server = server_factory(repo, *qa(q, tmp_path / "data"))
    r = submit(server, model=m.name, input=str(tmp_path / "in"), output=str(tmp_path / "out"),
               max_errors=4)
    done = wait_status(server, r.json()["id"], ("succeeded", "failed"))
    assert done["status"] == "succeeded", done
    assert done["progress"]["records_failed"] == 4, done
    good = [i for i in range(len(X)) if i + 1 not in bad]
    for ext in ("csv", "jsonl"):
        out = (tmp_path / "out" / f"nul.{ext}.out").read_text().split("\n")[:-1]
        assert len(out) == len(X) and all(out[ln - 1] == "" for ln in bad), out[:5]
        assert_close(np.array([float(out[i]) for i in good]), m.expected(X[good]), ext)
        errs = (tmp_path / "out" / f"nul.{ext}.errors").read_text().splitlines()
        assert [e.split(":")[0] for e in errs] == [f"line {ln}" for ln in bad], errs
        assert all("NUL byte" in e for e in errs), errs

    r = submit(server, model=m.name, input=str(tmp_path / "in"), output=str(tmp_path / "strict"))
    failed = wait_status(server, r.json()["id"], ("succeeded", "failed"))
    assert failed["status"] == "failed" and "line 3:" in failed["error"], failed
    assert "NUL byte" in failed["error"], failed

    # the inputs repaired and run again into the same output: no stale .errors stays
    write_csv(tmp_path / "in" / "nul.csv", X)
    write_jsonl(tmp_path / "in" / "nul.jsonl", X)
    r = submit(server, model=m.name, input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    done = wait_status(server, r.json()["id"], ("succeeded", "failed"))
    assert done["status"] == "succeeded" and done["progress"]["records_failed"] == 0, done
    for ext in ("csv", "jsonl"):
        assert not (tmp_path / "out" / f"nul.{ext}.errors").exists(), f"a stale nul.{ext}.errors"
        assert_close(read_predictions(tmp_path / "out" / f"nul.{ext}.out"), m.expected(X), ext)


# ---------------------------------------------------------------------------
# issue 14 item 6: schedules a pipeline can use
# ---------------------------------------------------------------------------


def post(server, bid, action):
    return requests.post(f"{server.url}/v1/batch-jobs/{bid}/{action}", timeout=60)


def runs_of(server, sid, n):
    """The schedule's record once it lists n runs."""
    return wait_for(lambda: (lambda j: j if len(j["runs"]) >= n else None)(get(server, sid)),
                    30, f"{n} runs of {sid}")


def test_schedule_macros_and_time_zones(tmp_path, inputs, server_factory, monkeypatch,
                                        fresh_queue):
    """@hourly, @daily, @weekly, @monthly and @yearly, read in the schedule's time zone (UTC
    when it names none); an unknown zone is refused naming the field."""
    q = fresh_queue()
    m, repo, inp, data = inputs
    clock = tmp_path / "clock"
    clock.write_text(str(utc_ms(2030, 1, 1, 10, 7)))    # a Tuesday, winter
    monkeypatch.setenv("INFERD_CLOCK_FILE", str(clock))
    server = server_factory(repo, *qa(q, tmp_path / "data"))
    cases = [
        ("@hourly", None, "2030-01-01T11:00:00.000Z"),
        ("@hourly", "Asia/Kolkata", "2030-01-01T10:30:00.000Z"),   # UTC+05:30
        ("@daily", None, "2030-01-02T00:00:00.000Z"),
        ("@daily", "Europe/Paris", "2030-01-01T23:00:00.000Z"),    # midnight at UTC+1
        ("@daily", "America/New_York", "2030-01-02T05:00:00.000Z"),
        ("@weekly", None, "2030-01-06T00:00:00.000Z"),
        ("@monthly", "Europe/Paris", "2030-01-31T23:00:00.000Z"),
        ("@yearly", None, "2031-01-01T00:00:00.000Z"),
        ("0 9 * * *", "Europe/Paris", "2030-01-02T08:00:00.000Z"),
    ]
    for schedule, zone, want in cases:
        body = dict(model=m.name, input=str(inp), output=str(tmp_path / "o"), schedule=schedule)
        if zone:
            body["timezone"] = zone
        r = submit(server, **body)
        assert r.status_code == 201, r.text
        j = r.json()
        assert j["next_run_at"] == want, (schedule, zone, j)
        assert j["timezone"] == (zone or "UTC") and j["schedule"] == schedule
    # the first @hourly run in Kolkata fires at 10:30 UTC, 16:00 there
    clock.write_text(str(utc_ms(2030, 1, 1, 10, 30, 5)))
    kolkata = [b for b in requests.get(f"{server.url}/v1/batch-jobs?limit=100",
                                       timeout=30).json()["batch_jobs"]
               if b.get("timezone") == "Asia/Kolkata"][0]
    s = runs_of(server, kolkata["id"], 1)
    assert s["runs"][0]["run_at"] == "2030-01-01T10:30:00.000Z"
    assert s["next_run_at"] == "2030-01-01T11:30:00.000Z"
    for zone, words in (("Mars/Olympus", "Mars/Olympus"), ("/etc/passwd", "time zone"),
                        ("../../etc/passwd", "time zone"), (5, "IANA")):
        r = submit(server, model=m.name, input=str(inp), output=str(tmp_path / "o"),
                   schedule="@daily", timezone=zone)
        assert r.status_code == 400, r.text
        msg = error_message(r)
        assert "timezone" in msg and words in msg, msg
    r = submit(server, model=m.name, input=str(inp), output=str(tmp_path / "o"),
               schedule="@fortnightly")
    assert r.status_code == 400 and "schedule" in error_message(r), r.text
    assert "@fortnightly" in error_message(r)


def test_templated_locations_follow_the_scheduled_hour(tmp_path, inputs, server_factory,
                                                       monkeypatch, fresh_queue):
    """An hourly schedule in Paris reads that hour's input and writes that hour's output:
    {date}, {hour} and {%...} fields expand with the run's scheduled time in its zone."""
    q = fresh_queue()
    m, repo, inp, data = inputs
    hours = {}
    for i, (day, hour) in enumerate((("2030-07-01", "02"), ("2030-07-01", "03"))):
        X = m.rows(40 + 10 * i, seed=300 + i)
        write_csv(tmp_path / "events" / day / hour / "part.csv", X)
        hours[hour] = X
    clock = tmp_path / "clock"
    clock.write_text(str(utc_ms(2030, 6, 30, 23, 30)))   # 01:30 in Paris (UTC+2)
    monkeypatch.setenv("INFERD_CLOCK_FILE", str(clock))
    server = server_factory(repo, *qa(q, tmp_path / "data"))
    r = submit(server, model=m.name, input=str(tmp_path / "events" / "{date}" / "{hour}"),
               output=f"file://{tmp_path}/scores/{{%Y/%m/%d}}/h{{hour}}", schedule="@hourly",
               timezone="Europe/Paris")
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    assert r.json()["input"].endswith("/events/{date}/{hour}")
    assert r.json()["next_run_at"] == "2030-07-01T00:00:00.000Z"     # 02:00 in Paris
    for n, (utc_hour, hour) in enumerate(((0, "02"), (1, "03")), start=1):
        clock.write_text(str(utc_ms(2030, 7, 1, utc_hour, 0, 5)))
        run = runs_of(server, sid, n)["runs"][0]
        done = wait_status(server, run["id"], ("succeeded", "failed"))
        assert done["status"] == "succeeded", done
        assert done["input"] == str(tmp_path / "events" / "2030-07-01" / hour)
        out = tmp_path / "scores" / "2030" / "07" / "01" / f"h{hour}"
        assert done["output"] == f"file://{out}"
        assert_close(read_predictions(out / "part.csv.out"), m.expected(hours[hour]), hour)
        assert done["progress"]["records_done"] == len(hours[hour])
    # a template field inferd does not know is refused when the job is created
    for field, value, words in (("input", "/x/{dat}", "{dat}"), ("output", "/y/{%Q}", "%Q"),
                                ("output", "/y/{date", "not closed")):
        body = dict(model=m.name, input="/x", output="/y", schedule="@hourly")
        body[field] = value
        r = submit(server, **body)
        assert r.status_code == 400, r.text
        msg = error_message(r)
        assert msg.startswith(field + ":") and words in msg, msg


def test_run_now_pause_and_resume(tmp_path, inputs, server_factory, monkeypatch, fresh_queue):
    """POST .../run runs a schedule now without moving its next run (and runs a run again);
    a paused schedule is passed over by the scheduler until it is resumed."""
    q = fresh_queue()
    m, repo, inp, data = inputs
    clock = tmp_path / "clock"
    clock.write_text(str(utc_ms(2030, 1, 1, 10, 7, 30)))
    monkeypatch.setenv("INFERD_CLOCK_FILE", str(clock))
    server = server_factory(repo, *qa(q, tmp_path / "data"))
    sid = submit(server, model=m.name, input=str(inp), output=str(tmp_path / "daily"),
                 schedule="@daily").json()["id"]
    r = post(server, sid, "run")
    assert r.status_code == 202, r.text
    run = r.json()
    assert run["schedule_id"] == sid and run["run_at"] == "2030-01-01T10:07:30.000Z"
    done = wait_status(server, run["id"], ("succeeded", "failed"))
    assert done["status"] == "succeeded", done
    assert done["output"] == str(tmp_path / "daily" / "20300101T100730Z")
    for name, X in data.items():
        assert_close(read_predictions(tmp_path / "daily" / "20300101T100730Z" / (name + ".out")),
                     m.expected(X), name)
    s = get(server, sid)
    assert [x["id"] for x in s["runs"]] == [run["id"]]
    assert s["next_run_at"] == "2030-01-02T00:00:00.000Z" and s["status"] == "scheduled"

    # run again: a run (not a schedule) starts anew with the same definition and locations
    r = post(server, run["id"], "run")
    assert r.status_code == 202, r.text
    again = wait_status(server, r.json()["id"], ("succeeded", "failed"))
    assert again["status"] == "succeeded" and again["output"] == done["output"], again
    assert "schedule_id" not in again

    # paused: no run while the clock passes its time; the control schedule proves the
    # scheduler looked
    r = post(server, sid, "pause")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "paused" and r.json()["next_run_at"] is None
    assert post(server, sid, "pause").json()["status"] == "paused"     # idempotent
    control = submit(server, model=m.name, input=str(inp), output=str(tmp_path / "control"),
                     schedule="@daily").json()["id"]
    clock.write_text(str(utc_ms(2030, 1, 2, 0, 0, 5)))
    wait_status(server, runs_of(server, control, 1)["runs"][0]["id"], ("succeeded",))
    assert len(get(server, sid)["runs"]) == 1 and get(server, sid)["status"] == "paused"

    # resumed: the next time after now; the missed midnight does not run
    clock.write_text(str(utc_ms(2030, 1, 2, 9, 0)))
    r = post(server, sid, "resume")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "scheduled"
    assert r.json()["next_run_at"] == "2030-01-03T00:00:00.000Z"
    # run by hand on the very minute the schedule is due: both runs happen
    clock.write_text(str(utc_ms(2030, 1, 3, 0, 0, 0)))
    assert post(server, sid, "run").status_code == 202
    s = runs_of(server, sid, 3)
    assert sorted(x["run_at"] for x in s["runs"][:2]) == [
        "2030-01-03T00:00:00.000Z", "2030-01-03T00:00:00.001Z"], s["runs"]
    assert s["next_run_at"] == "2030-01-04T00:00:00.000Z"

    # what cannot pause or run
    r = post(server, run["id"], "pause")
    assert r.status_code == 409 and "not a schedule" in error_message(r), r.text
    r = post(server, "batch-nope", "run")
    assert r.status_code == 404 and "batch-nope" in error_message(r), r.text
    r = post(server, sid, "explode")
    assert r.status_code == 404, r.text
    assert requests.delete(f"{server.url}/v1/batch-jobs/{sid}", timeout=30).status_code == 200
    for action in ("run", "resume"):
        r = post(server, sid, action)
        assert r.status_code == 409 and "cancelled" in error_message(r), r.text


def test_progress_counts_records_inside_an_object(tmp_path, trained, server_factory,
                                                  fresh_queue):
    """One big object: records_done grows while the object runs, and ends equal to its
    records (never counted twice)."""
    q = fresh_queue()
    m = trained["slow"]
    repo = tmp_path / "models"
    m.install(repo, config={"backend": "xgboost", "instances": 1})
    X = m.rows(6000, seed=7)
    write_csv(tmp_path / "in" / "big.csv", X)
    server = server_factory(repo, *qa(q, tmp_path / "data", "--workers", "1"))
    r = submit(server, model=m.name, input=str(tmp_path / "in"), output=str(tmp_path / "out"),
               records_per_batch=32, concurrency=1)
    assert r.status_code == 202, r.text
    bid = r.json()["id"]
    seen = wait_for(lambda: (lambda j: j if j["progress"]["records_done"] > 0 else None)(
        get(server, bid)), DEADLINE_S, "records counted inside the running object")
    assert seen["progress"]["objects_done"] == 0 and seen["status"] == "running", seen
    assert 0 < seen["progress"]["records_done"] < len(X), seen
    done = wait_status(server, bid, ("succeeded", "failed"))
    assert done["status"] == "succeeded", done
    assert done["progress"] == {"objects_total": 1, "objects_done": 1, "records_done": len(X),
                                "records_failed": 0}


def test_list_filters_by_status(tmp_path, inputs, server_factory, monkeypatch, fresh_queue):
    q = fresh_queue()
    m, repo, inp, data = inputs
    monkeypatch.setenv("INFERD_CLOCK_FILE", str(tmp_path / "clock"))
    (tmp_path / "clock").write_text(str(utc_ms(2030, 1, 1, 10, 7)))
    server = server_factory(repo, *qa(q, tmp_path / "data"))
    ran = submit(server, model=m.name, input=str(inp), output=str(tmp_path / "o1")).json()["id"]
    wait_status(server, ran, ("succeeded",))
    active = submit(server, model=m.name, input=str(inp), output=str(tmp_path / "o2"),
                    schedule="@daily").json()["id"]
    paused = submit(server, model=m.name, input=str(inp), output=str(tmp_path / "o3"),
                    schedule="@daily").json()["id"]
    assert post(server, paused, "pause").status_code == 200

    def listed(status):
        r = requests.get(f"{server.url}/v1/batch-jobs", params={"status": status}, timeout=30)
        assert r.status_code == 200, r.text
        return [b["id"] for b in r.json()["batch_jobs"]]
    assert listed("succeeded") == [ran]
    assert listed("scheduled") == [active]
    assert listed("paused") == [paused]
    assert listed("failed") == [] and listed("running") == []
    all_ids = requests.get(f"{server.url}/v1/batch-jobs", timeout=30).json()["batch_jobs"]
    assert [b["id"] for b in all_ids] == [paused, active, ran]
    r = requests.get(f"{server.url}/v1/batch-jobs?status=done", timeout=30)
    assert r.status_code == 400, r.text
    msg = error_message(r)
    assert "status" in msg and "'done'" in msg and "succeeded" in msg, msg


def test_finished_run_goes_after_result_ttl(tmp_path, inputs, server_factory, webhook_receiver,
                                            fresh_queue):
    """--result-ttl-s 1: a finished run leaves the API (404, gone from the listing) a little
    after a second, on every store, once its webhook is delivered; what it wrote stays."""
    q = fresh_queue()
    m, repo, inp, data = inputs
    server = server_factory(repo, *qa(q, tmp_path / "data", "--workers", "2",
                                      "--result-ttl-s", "1"))
    out = tmp_path / "out"
    r = submit(server, model=m.name, input=str(inp), output=f"file://{out}",
               callback_url=webhook_receiver.url + "/ttl")
    assert r.status_code == 202, r.text
    bid = r.json()["id"]
    assert wait_status(server, bid, ("succeeded", "failed"))["status"] == "succeeded"
    wait_for(lambda: webhook_receiver.received("/ttl"), 30, "the batch webhook")

    def gone():
        r = requests.get(f"{server.url}/v1/batch-jobs/{bid}", timeout=30)
        return [r] if r.status_code == 404 else None  # (a 404 Response is falsy)
    r, = wait_for(gone, 20, f"batch run {bid}, finished with --result-ttl-s 1, to answer 404")
    assert bid in error_message(r), r.text
    listed = requests.get(f"{server.url}/v1/batch-jobs", timeout=30).json()["batch_jobs"]
    assert bid not in [b["id"] for b in listed], listed
    assert (out / "_SUCCESS").exists() and (out / "_manifest.json").exists()
    for name, X in data.items():
        assert_close(read_predictions(out / (name + ".out")), m.expected(X), name)
