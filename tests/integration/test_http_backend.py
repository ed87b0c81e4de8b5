"""The ``http`` backend: a model that lives in another server.

A model folder whose config.json says ``"backend": "http"`` forwards each request to an
upstream: another inferd (``protocol: v2``), an OpenAI-compatible completions server
(``openai``) or any JSON endpoint (``json``). These tests put real servers on 127.0.0.1 on
both sides: a second ``inferd serve`` in front of a first one, and the fake upstreams of
``upstreams.py`` (a ThreadingHTTPServer in this process that counts calls per payload,
tracks how many are in flight and plays per-payload scripts of answers and delays).

Covered: online, async (``Prefer: respond-async`` and ``POST /v1/jobs``) and batch
(``inferd batch`` and ``POST /v1/batch-jobs``) through an http model; slow upstreams and
long jobs (lease extension, no double runs), ``max_concurrency``; retries of 5xx / 429
(``Retry-After``) and no retry of 4xx; ``kill -9`` during an upstream call; cancelling a
job mid-call; online error mapping (502 / 504 / 4xx pass-through).

The async tests that depend on the job queue (lease extension, retries, kill -9, cancel) run
on both queues (``fresh_queue``: ``[sqlite]`` and ``[redis]``). Every server runs a private
copy of build/inferd, so a rebuild mid-run does not matter.
Waits poll against deadlines; the few time bounds asserted (a cancel within ~1-2 s, a
Retry-After of 1 s honoured) are what the feature promises, with slack.
"""
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import xgboost as xgb

from conftest import (HTTP_TIMEOUT_S, INFERD_BIN, JOB_FINAL_STATES, REPO_ROOT, assert_close,
                      async_args, check_accepted, error_message, free_port, infer_body,
                      output_array, parallel, wait_for)
from upstreams import Reply, Script, Upstream, echo, openai

BATCH_DEADLINE_S = 120.0
BC_MODEL = REPO_ROOT / "models" / "breast_cancer"


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inferd_bin(tmp_path_factory):
    """A private copy of build/inferd for this module."""
    if not INFERD_BIN.exists():
        pytest.fail(f"{INFERD_BIN} does not exist; build it first (make)")
    dst = tmp_path_factory.mktemp("http-bin") / "inferd-under-test"
    shutil.copy2(INFERD_BIN, dst)
    return dst


@pytest.fixture
def serve(server_factory, inferd_bin):
    """``serve(repo, *args, tag=..., port=None)`` -> a started Server running the copy."""
    def start(repo, *args, tag="inferd", port=None):
        return server_factory(repo, *args, binary=inferd_bin, tag=tag, port=port)
    return start


@pytest.fixture
def upstream():
    """``upstream(behaviour, name)`` -> a started :class:`Upstream`; all stopped at teardown."""
    started = []

    def start(behaviour=None, name="upstream"):
        u = Upstream(behaviour, name=name).start()
        started.append(u)
        return u
    yield start
    for u in started:
        u.stop()


def http_model(repo, name, url, protocol, **config):
    """Writes ``repo/name/config.json`` of an http model (no version folder)."""
    d = Path(repo) / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(
        {"backend": "http", "url": url, "protocol": protocol, **config}))
    return d


def run_batch(inferd_bin, repo, model, inp, out, *extra, env=None):
    """``inferd batch``; asserts exit 0 (stderr in the message)."""
    cmd = [str(inferd_bin), "batch", "--models", str(repo), "--model", model,
           "--input", str(inp), "--output", str(out), *map(str, extra)]
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                           timeout=BATCH_DEADLINE_S, env=env)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"inferd batch did not finish within {BATCH_DEADLINE_S:.0f}s\n"
                    f"command: {' '.join(cmd)}\n"
                    f"{(exc.stderr or b'').decode('utf-8', 'replace')[-3000:]}")
    stderr = p.stderr.decode("utf-8", "replace")
    assert p.returncode == 0, (f"inferd batch exited {p.returncode}\ncommand: {' '.join(cmd)}\n"
                               f"--- stderr ---\n{stderr[-3000:]}")
    return stderr


def run_batch_job(server, model, inp, out, **fields):
    """POST /v1/batch-jobs and wait until it is final; returns the batch job (succeeded)."""
    r = requests.post(f"{server.url}/v1/batch-jobs", timeout=HTTP_TIMEOUT_S,
                      json={"model": model, "input": f"file://{inp}",
                            "output": f"file://{out}", **fields})
    assert r.status_code == 202, f"POST /v1/batch-jobs: HTTP {r.status_code}: {r.text[:500]}"
    bid = r.json()["id"]

    def final():
        j = requests.get(f"{server.url}/v1/batch-jobs/{bid}", timeout=HTTP_TIMEOUT_S).json()
        return j if j["status"] in ("succeeded", "failed", "cancelled") else None
    job = wait_for(final, BATCH_DEADLINE_S, f"batch job {bid} to end")
    assert job["status"] == "succeeded", f"batch job {bid}: {job!r}"
    return job


def out_lines(path):
    path = Path(path)
    assert path.exists(), f"{path} was not written; the folder has " \
        f"{sorted(p.name for p in path.parent.iterdir()) if path.parent.exists() else 'nothing'}"
    text = path.read_text()
    assert text.endswith("\n"), f"{path}: the last line has no newline: {text[-80:]!r}"
    return text[:-1].split("\n")


def settle(client, n, deadline_s=60):
    """Waits until all ``n`` jobs of a fresh server are final (the inferd_jobs gauge)."""
    def done():
        counts = client.job_counts()
        final = sum(counts[s] or 0 for s in JOB_FINAL_STATES)
        return counts if final >= n else None
    return wait_for(done, deadline_s, f"{n} jobs to be final")


def submit_docs(client, model, docs, clients=8, **fields):
    """POST /v1/jobs {"model", "input": doc} for each document (from a few threads);
    returns the job ids in the order of ``docs``."""
    local = threading.local()

    def one(doc):
        if not hasattr(local, "s"):
            local.s = requests.Session()
        r = local.s.post(client.url + "/v1/jobs", json={"model": model, "input": doc, **fields},
                         timeout=HTTP_TIMEOUT_S)
        return check_accepted(r, f"POST /v1/jobs {model} {doc!r:.80}")
    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, docs))


def job_result(client, jid):
    r = client.get(f"/v1/jobs/{jid}/result")
    assert r.status_code == 200, f"GET /v1/jobs/{jid}/result: HTTP {r.status_code}: {r.text[:400]}"
    return r.json()


def bytes_output(body, name):
    """The single string of a BYTES output of a v2 response."""
    outs = {o["name"]: o for o in body.get("outputs", [])}
    assert name in outs, f"no output {name!r} in {body!r:.500}"
    o = outs[name]
    assert o["datatype"] == "BYTES" and o["shape"] == [1], o
    assert isinstance(o["data"], list) and len(o["data"]) == 1, o
    return o["data"][0]


def prompt_body(text, name="prompt"):
    return {"inputs": [{"name": name, "datatype": "BYTES", "shape": [1], "data": [text]}]}


# ---------------------------------------------------------------------------
# 1. inferd in front of inferd (protocol v2)
# ---------------------------------------------------------------------------


def breast_cancer_rows(n, seed):
    """Plausible rows for models/breast_cancer: its sample rows, each feature scaled."""
    sample = json.loads((BC_MODEL / "sample_request.json").read_text())["inputs"][0]
    base = np.asarray(sample["data"], dtype=np.float64).reshape(-1, 30)
    rng = np.random.default_rng(seed)
    rows = base[rng.integers(0, len(base), size=n)] * rng.uniform(0.6, 1.4, size=(n, 30))
    return rows.astype(np.float32)


def test_inferd_in_front_of_inferd(serve, inferd_bin, tmp_path):
    booster = xgb.Booster(model_file=str(BC_MODEL / "1" / "model.json"))
    booster.set_param({"nthread": 1})
    X = breast_cancer_rows(40, seed=1)
    expected = np.asarray(booster.inplace_predict(X), dtype=np.float64).reshape(len(X))

    back = serve(REPO_ROOT / "models", "--data-dir", tmp_path / "back-data", "--workers", "0",
                 tag="back")
    front_repo = tmp_path / "front-models"
    http_model(front_repo, "bc", f"{back.url}/v2/models/breast_cancer/infer", "v2",
               timeout_s=60, max_concurrency=4)
    front = serve(front_repo, *async_args(tmp_path / "front-data", "--workers", "2"),
                  tag="front")
    fc, bc = front.client(), back.client()

    # metadata: the upstream's inputs and outputs
    meta_back = bc.get("/v2/models/breast_cancer").json()
    r = fc.get("/v2/models/bc")
    assert r.status_code == 200, r.text[:300]
    meta = r.json()
    for k in ("inputs", "outputs"):
        strip = [{f: t[f] for f in ("name", "datatype", "shape")} for t in meta_back[k]]
        assert [{f: t[f] for f in ("name", "datatype", "shape")} for t in meta[k]] == strip, \
            f"GET /v2/models/bc {k}: {meta[k]!r}, upstream has {meta_back[k]!r}"
    assert meta["name"] == "bc", meta

    # online: same as the upstream, and as python-xgboost
    direct = bc.predict("breast_cancer", X).reshape(len(X))
    assert_close(direct, expected, "upstream inferd vs xgboost")
    via = fc.predict("bc", X).reshape(len(X))
    assert_close(via, expected, "online through the http model")
    assert_close(via, direct, "online: front vs back")
    # one row at a time, from several clients at once
    singles = parallel(8, lambda i: fc.predict("bc", X[i:i + 1]).reshape(1)[0])
    assert_close(singles, expected[:8], "concurrent single-row requests")

    # async: Prefer: respond-async, and POST /v1/jobs
    r = fc.post("/v2/models/bc/infer", json=infer_body(X[:10]), headers={"Prefer": "respond-async"})
    pj = check_accepted(r, "Prefer: respond-async on the http model")
    jj = fc.submit_ok("bc", X[10:25])
    for jid, lo, hi in ((pj, 0, 10), (jj, 10, 25)):
        job = fc.wait_final(jid, what="async job through the http model")
        assert job["status"] == "succeeded" and job["attempts"] == 1, job
        body = job_result(fc, jid)
        assert body.get("model_name") == "bc", f"{body!r:.300}"
        assert_close(output_array(body, hi - lo).reshape(hi - lo), expected[lo:hi],
                     f"async job rows {lo}-{hi}")

    # batch: `inferd batch` over CSV and JSON Lines files, and a server batch job
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "rows.csv").write_text("".join(",".join(repr(float(v)) for v in row) + "\n"
                                          for row in X))
    (inp / "rows.jsonl").write_text("".join(json.dumps([float(v) for v in row]) + "\n"
                                            for row in X))
    run_batch(inferd_bin, front_repo, "bc", inp, tmp_path / "out-cli", "--records-per-batch", 16)
    for name in ("rows.csv", "rows.jsonl"):
        got = [float(line) for line in out_lines(tmp_path / "out-cli" / f"{name}.out")]
        assert_close(got, expected, f"inferd batch {name}")
    assert (tmp_path / "out-cli" / "_SUCCESS").exists()
    run_batch_job(front, "bc", inp, tmp_path / "out-job", records_per_batch=16)
    for name in ("rows.csv", "rows.jsonl"):
        got = [float(line) for line in out_lines(tmp_path / "out-job" / f"{name}.out")]
        assert_close(got, expected, f"server batch job {name}")
        assert (tmp_path / "out-job" / f"{name}.out").read_bytes() == \
            (tmp_path / "out-cli" / f"{name}.out").read_bytes(), \
            f"{name}: the server batch job's output differs from inferd batch's"


# ---------------------------------------------------------------------------
# 2. slow upstreams: long jobs run once; max_concurrency bounds the calls in flight
# ---------------------------------------------------------------------------


def test_slow_upstream_jobs_run_once(serve, upstream, repo_dir, tmp_path, fresh_queue):
    """40 jobs on an upstream that answers after 5 s, with a 2 s lease: the leases of
    running jobs (in a call, or waiting for a place) are extended; none runs twice."""
    n = 40
    up = upstream(echo(delay_s=5), name="slow-5s")
    http_model(repo_dir, "slow", up.url + "/work", "json", timeout_s=30, max_concurrency=20,
               lease_timeout_s=2)
    srv = serve(repo_dir, *async_args(tmp_path / "data", "--workers", "4", queue=fresh_queue()),
                tag="slow")
    c = srv.client()
    docs = [{"n": i} for i in range(n)]
    ids = submit_docs(c, "slow", docs)
    up.wait(lambda u: u.in_flight >= 1, 30, "the first upstream call")
    # a running job shows it: status running, started_at, elapsed_s
    running = c.wait_status(ids[0], ("running", "succeeded"), 30, "the first slow job to run")
    if running["status"] == "running":
        assert running["started_at"] is not None, running
        assert isinstance(running.get("elapsed_s"), (int, float)) and running["elapsed_s"] >= 0, \
            f"a running job should show elapsed_s: {running!r}"
    counts = settle(c, n, deadline_s=90)
    assert counts["succeeded"] == n, f"{counts} (upstream saw {up.keys()!r:.500})"
    for i, jid in enumerate(ids):
        job = c.job(jid)
        assert job["status"] == "succeeded" and job["attempts"] == 1, job
        assert job_result(c, jid) == {"echo": {"n": i}, "call": 1}, f"job {i}"
    seen = up.keys()
    twice = {k: v for k, v in seen.items() if v != 1}
    assert not twice, f"payloads the upstream saw more than once: {twice}"
    assert len(seen) == n and up.count() == n, f"upstream saw {up.count()} calls: {seen}"
    assert not [x for x in up.snapshot() if x.disconnected], "a call was aborted (timed out?)"
    assert up.max_in_flight <= 20, f"max_concurrency 20, upstream saw {up.max_in_flight} at once"


def test_max_concurrency_bounds_upstream_calls(serve, upstream, repo_dir, tmp_path):
    n, limit = 200, 8
    up = upstream(echo(delay_s=0.2), name="fast-0.2s")
    http_model(repo_dir, "bounded", up.url + "/work", "json", timeout_s=30,
               max_concurrency=limit)
    srv = serve(repo_dir, *async_args(tmp_path / "data", "--workers", "4"), tag="bounded")
    c = srv.client()
    ids = submit_docs(c, "bounded", [{"n": i} for i in range(n)])
    counts = settle(c, n, deadline_s=90)
    assert counts["succeeded"] == n, counts
    assert up.max_in_flight <= limit, \
        f"max_concurrency {limit}: the upstream saw {up.max_in_flight} calls at once"
    assert up.max_in_flight >= limit // 2, \
        f"the calls did not overlap (at most {up.max_in_flight} at once, limit {limit})"
    assert up.count() == n and all(v == 1 for v in up.keys().values()), \
        f"{up.count()} calls for {n} jobs"
    for i in (0, n // 2, n - 1):
        assert job_result(c, ids[i]) == {"echo": {"n": i}, "call": 1}
    # online requests share the same bound
    before = up.max_in_flight
    res = parallel(16, lambda i: requests.post(f"{srv.url}/v2/models/bounded/infer",
                                               json={"online": i}, timeout=HTTP_TIMEOUT_S))
    assert [r.status_code for r in res] == [200] * 16, [r.text[:200] for r in res]
    assert [r.json() for r in res] == [{"echo": {"online": i}, "call": 1} for i in range(16)]
    assert max(before, up.max_in_flight) <= limit, up.max_in_flight


def test_json_protocol_documents(serve, upstream, inferd_bin, repo_dir, tmp_path):
    """protocol json: any JSON document in (online body, Prefer job, job input, JSONL
    record), forwarded as it is; the upstream's JSON out, as it is (batch: one compact line)."""
    up = upstream(echo(), name="echo")
    http_model(repo_dir, "doc", up.url + "/doc", "json", timeout_s=30)
    srv = serve(repo_dir, *async_args(tmp_path / "data", "--workers", "2"), tag="json-docs")
    c = srv.client()
    # online: an object that looks like a v2 request is a document too
    for i, doc in enumerate([{"a": [1, 2, {"b": None}]}, "a string", [1, "two"], 3.5,
                             {"inputs": [{"name": "x"}], "not": "v2 here"}]):
        r = c.post("/v2/models/doc/infer", json=doc)
        assert r.status_code == 200, f"{doc!r}: HTTP {r.status_code}: {r.text[:300]}"
        assert r.json() == {"echo": doc, "call": 1}, r.text[:300]
        assert up.snapshot()[-1].body == json.dumps(doc).encode(), \
            "the document should be forwarded as it is"
    # Prefer: respond-async, and POST /v1/jobs with inputs of each JSON kind
    r = c.post("/v2/models/doc/infer", json={"via": "prefer"}, headers={"Prefer": "respond-async"})
    pj = check_accepted(r, "Prefer: respond-async with a document")
    docs = [{"job": 1}, "job two", [3], None, True]
    ids = submit_docs(c, "doc", docs)
    for jid, doc in zip([pj] + ids, [{"via": "prefer"}] + docs):
        job = c.wait_final(jid, what=f"document job {doc!r}")
        assert job["status"] == "succeeded", job
        assert job_result(c, jid) == {"echo": doc, "call": 1}, doc
    # batch: each JSONL record is a document; each output line the answer, compact
    inp = tmp_path / "docs"
    inp.mkdir()
    records = [{"n": i, "text": f"record {i}", "list": [i, None, True]} for i in range(6)] + \
              ["a string record", [1, 2, 3], {"nested": {"deep": {"x": 1.5}}}]
    (inp / "docs.jsonl").write_text("".join(json.dumps(rec) + "\n" for rec in records))
    before = up.count()
    run_batch(inferd_bin, repo_dir, "doc", inp, tmp_path / "out-cli")
    run_batch_job(srv, "doc", inp, tmp_path / "out-job")
    for out in ("out-cli", "out-job"):
        lines = out_lines(tmp_path / out / "docs.jsonl.out")
        assert len(lines) == len(records), f"{out}: {lines!r:.500}"
        for line, rec in zip(lines, records):
            got = json.loads(line)
            assert got["echo"] == rec, f"{out}: line {line!r} for record {rec!r}"
            assert line == json.dumps(got, separators=(",", ":")), \
                f"{out}: a batch output line should be compact JSON: {line!r}"
    assert up.count() == before + 2 * len(records)


def test_batch_sends_records_again_after_a_passing_failure(upstream, inferd_bin, repo_dir,
                                                           tmp_path):
    """A document record whose upstream call fails for a passing reason (503 with
    Retry-After, 500) is sent again on its own, up to 3 attempts in all; the run keeps every
    other record's answer and its alignment. A record that keeps failing fails the run,
    naming the upstream, after its third attempt."""
    flaky = [Reply(503, {"error": "overloaded"}, headers={"Retry-After": "1"}), Reply()]
    twice = [Reply(500, {"error": "boom"}), Reply(500, {"error": "boom"}), Reply()]
    always = [Reply(500, {"error": "still broken"})]
    up = upstream(Script({0: flaky, 3: flaky, 5: twice, 99: always},
                         key=lambda c: c.json["n"]), name="flaky")
    http_model(repo_dir, "flaky", up.url + "/x", "json", timeout_s=30)
    inp = tmp_path / "in"
    inp.mkdir()
    records = [{"n": i} for i in range(8)]
    (inp / "recs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    t0 = time.monotonic()
    run_batch(inferd_bin, repo_dir, "flaky", inp, tmp_path / "out")
    took = time.monotonic() - t0
    lines = out_lines(tmp_path / "out" / "recs.jsonl.out")
    assert len(lines) == len(records), lines
    for line, rec in zip(lines, records):
        got = json.loads(line)
        assert got["echo"] == rec, f"line {line!r} for record {rec!r}"
        want_calls = {0: 2, 3: 2, 5: 3}.get(rec["n"], 1)
        assert got["call"] == want_calls, f"record {rec!r}: answered by call {got['call']}"
        assert up.count(json.dumps(rec, sort_keys=True, separators=(",", ":"))) == want_calls, \
            f"record {rec!r}: called again only while it failed"
    assert took >= 0.9, f"the 503's Retry-After: 1 should hold the retry back ({took:.2f}s)"
    # a record that never recovers fails the run after 3 attempts, naming the upstream
    (inp / "recs.jsonl").write_text(json.dumps({"n": 99}) + "\n")
    cmd = [str(inferd_bin), "batch", "--models", str(repo_dir), "--model", "flaky",
           "--input", str(inp), "--output", str(tmp_path / "out2")]
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                       timeout=BATCH_DEADLINE_S)
    stderr = p.stderr.decode("utf-8", "replace")
    assert p.returncode != 0, f"the run should fail; stderr:\n{stderr[-2000:]}"
    assert "still broken" in stderr and up.url in stderr, stderr[-2000:]
    calls_99 = [c for c in up.snapshot() if c.json == {"n": 99}]
    assert len(calls_99) == 3, f"a failing record is tried 3 times, not {len(calls_99)}"
    assert not (tmp_path / "out2" / "_SUCCESS").exists()


# ---------------------------------------------------------------------------
# 3. upstream failures of async jobs: retried (5xx, 429 + Retry-After) or not (4xx)
# ---------------------------------------------------------------------------


def test_job_retries_follow_the_upstream(serve, upstream, repo_dir, tmp_path, fresh_queue):
    script = Script({
        "flaky": [Reply(500, {"error": "overloaded"}), Reply(503, {"error": "still overloaded"}),
                  Reply(200, {"ok": "third time"})],
        "bad": [Reply(400, {"error": "bad prompt"})],
        "busy": [Reply(429, {"error": "slow down"}, headers={"Retry-After": "1"}),
                 Reply(200, {"ok": "after retry-after"})],
        "hang": [Reply(200, {"ok": "too late"}, delay_s=3)],
    }, key=lambda call: call.json["case"])
    up = upstream(script, name="scripted")
    down_url = f"http://127.0.0.1:{free_port()}/api"
    http_model(repo_dir, "api", up.url + "/api", "json", timeout_s=30)
    http_model(repo_dir, "api_1s", up.url + "/api", "json", timeout_s=1)
    http_model(repo_dir, "api_down", down_url, "json", timeout_s=5)
    srv = serve(repo_dir, *async_args(tmp_path / "data", "--workers", "2", backoff_ms=50,
                                      queue=fresh_queue()), tag="retries")
    c = srv.client()
    ids = dict(zip(("flaky", "bad", "busy"),
                   submit_docs(c, "api", [{"case": k} for k in ("flaky", "bad", "busy")])))
    # no answer within timeout_s, and nothing listening: retried, then failed
    ids["hang"] = c.submit_ok("api_1s", input={"case": "hang"}, max_attempts=2)
    ids["down"] = c.submit_ok("api_down", input={"case": "down"}, max_attempts=2)

    job = c.wait_final(ids["flaky"], what="500, 503, then 200")
    assert (job["status"], job["attempts"]) == ("succeeded", 3), job
    assert job_result(c, ids["flaky"]) == {"ok": "third time"}
    assert up.count({"case": "flaky"}) == 3

    job = c.wait_final(ids["bad"], what="400")
    assert (job["status"], job["attempts"]) == ("failed", 1), \
        f"an upstream 400 must fail the job at once, not be retried: {job!r}"
    err = job["error"] or ""
    assert "bad prompt" in err and "400" in err and up.url in err, \
        f"the error should carry the upstream's status, message and URL: {err!r}"
    assert up.count({"case": "bad"}) == 1

    job = c.wait_final(ids["busy"], what="429 + Retry-After: 1, then 200")
    assert (job["status"], job["attempts"]) == ("succeeded", 2), job
    assert job_result(c, ids["busy"]) == {"ok": "after retry-after"}
    first, second = up.calls_for({"case": "busy"})
    gap = second.started - first.ended
    assert gap >= 0.9, f"Retry-After: 1 not honoured: the second call came {gap:.3f} s after " \
                       f"the 429 (--retry-backoff-ms is 50)"

    job = c.wait_final(ids["hang"], what="an upstream slower than timeout_s, twice")
    assert (job["status"], job["attempts"]) == ("failed", 2), \
        f"a timed-out call is retried, up to max_attempts: {job!r}"
    assert up.url in (job["error"] or ""), job["error"]
    calls = up.calls_for({"case": "hang"})
    assert len(calls) == 2, calls
    up.wait(lambda u: all(x.disconnected for x in calls), 5,
            "the timed-out calls' connections to close")
    job = c.wait_final(ids["down"], what="an upstream with nothing listening")
    assert (job["status"], job["attempts"]) == ("failed", 2), \
        f"a refused connection is retried, up to max_attempts: {job!r}"
    assert down_url in (job["error"] or ""), job["error"]

    # nothing else arrives for the final jobs
    time.sleep(0.3)
    assert up.keys() == {json.dumps({"case": k}, separators=(",", ":")): v
                         for k, v in (("flaky", 3), ("bad", 1), ("busy", 2), ("hang", 2))}, \
        up.keys()


# ---------------------------------------------------------------------------
# 4. an OpenAI-compatible upstream
# ---------------------------------------------------------------------------

TOKEN = "tok-8c1e-secret"
UNSET_VAR = "INFERD_TEST_HTTP_SURELY_UNSET_VAR"
PROMPTS = [  # (JSONL record, the completion expected, what the upstream's body holds)
    ("hello world", "HELLO WORLD", {"messages": [{"role": "user", "content": "hello world"}]}),
    ({"prompt": "with options", "max_tokens": 7, "temperature": 0},
     "WITH OPTIONS", {"messages": [{"role": "user", "content": "with options"}],
                      "max_tokens": 7, "temperature": 0}),
    ([{"role": "system", "content": "be loud"}, {"role": "user", "content": "a list"}],
     "A LIST", {"messages": [{"role": "system", "content": "be loud"},
                             {"role": "user", "content": "a list"}]}),
    ({"messages": [{"role": "user", "content": "an object"}], "max_tokens": 3},
     "AN OBJECT", {"messages": [{"role": "user", "content": "an object"}], "max_tokens": 3}),
    ("ünïcödé, \"quotes\"\nand a newline", "ÜNÏCÖDÉ, \"QUOTES\"\nAND A NEWLINE",
     {"messages": [{"role": "user", "content": "ünïcödé, \"quotes\"\nand a newline"}]}),
]


@pytest.fixture
def openai_setup(serve, upstream, repo_dir, tmp_path, monkeypatch):
    """A fake OpenAI server and an inferd with: ``chat`` (…/v1/chat/completions),
    ``complete`` (…/v1/completions), both with ``Authorization: Bearer ${UPSTREAM_TOKEN}``,
    and ``nokey`` (a header naming an unset variable: it must not load)."""
    monkeypatch.setenv("UPSTREAM_TOKEN", TOKEN)
    monkeypatch.delenv(UNSET_VAR, raising=False)
    up = upstream(openai(extra_keys=("top_k",)), name="fake-openai")
    auth = {"Authorization": "Bearer ${UPSTREAM_TOKEN}"}
    http_model(repo_dir, "chat", up.url + "/v1/chat/completions", "openai",
               upstream_model="fake-chat", headers=auth, timeout_s=30)
    http_model(repo_dir, "complete", up.url + "/v1/completions", "openai",
               upstream_model="fake-complete", headers=auth, timeout_s=30)
    http_model(repo_dir, "extras", up.url + "/v1/chat/completions", "openai",
               upstream_model="fake-chat", headers=auth, forward_keys=["top_k"])
    http_model(repo_dir, "nokey", up.url + "/v1/completions", "openai",
               headers={"Authorization": "Bearer ${" + UNSET_VAR + "}"})
    srv = serve(repo_dir, *async_args(tmp_path / "data", "--workers", "2"), tag="openai")
    return up, srv


def test_openai_online_and_async(openai_setup):
    up, srv = openai_setup
    c = srv.client()
    # a v2 request with a BYTES prompt, chat endpoint
    r = c.post("/v2/models/chat/infer", json=prompt_body("hello there"))
    assert r.status_code == 200, r.text[:500]
    assert bytes_output(r.json(), "text") == "HELLO THERE"
    raw = json.loads(bytes_output(r.json(), "response"))
    assert raw["choices"][0]["message"]["content"] == "HELLO THERE" and \
        raw["model"] == "fake-chat", raw
    call = up.snapshot()[-1]
    assert call.path == "/v1/chat/completions", call
    assert call.json == {"model": "fake-chat",
                         "messages": [{"role": "user", "content": "hello there"}]}, call.json
    assert call.headers.get("authorization") == f"Bearer {TOKEN}", \
        f"Authorization with ${{UPSTREAM_TOKEN}} expanded should reach the upstream: {call.headers}"
    # completions endpoint: the prompt as it is, choices[0].text
    r = c.post("/v2/models/complete/infer", json=prompt_body("plain completion"))
    assert r.status_code == 200, r.text[:500]
    assert bytes_output(r.json(), "text") == "PLAIN COMPLETION"
    call = up.snapshot()[-1]
    assert call.path == "/v1/completions" and \
        call.json == {"model": "fake-complete", "prompt": "plain completion"}, call
    assert call.headers.get("authorization") == f"Bearer {TOKEN}", call.headers
    # a v2 request with a `messages` input (the JSON text of a list)
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "from messages"}]
    r = c.post("/v2/models/chat/infer", json=prompt_body(json.dumps(msgs), name="messages"))
    assert r.status_code == 200, r.text[:500]
    assert bytes_output(r.json(), "text") == "FROM MESSAGES"
    assert up.snapshot()[-1].json == {"model": "fake-chat", "messages": msgs}
    # a whole JSON document online: extra fields pass through; the answer is {"text","response"}
    r = c.post("/v2/models/chat/infer", json={"prompt": "a document", "max_tokens": 5})
    assert r.status_code == 200, r.text[:500]
    doc = r.json()
    assert doc.get("text") == "A DOCUMENT" and \
        doc["response"]["choices"][0]["message"]["content"] == "A DOCUMENT", doc
    assert up.snapshot()[-1].json == {"model": "fake-chat", "max_tokens": 5,
                                      "messages": [{"role": "user", "content": "a document"}]}
    # async jobs: a document input of each kind, and a v2 request
    inputs = [rec for rec, _, _ in PROMPTS[:4]]
    ids = submit_docs(c, "chat", inputs + [prompt_body("v2 in a job")])
    for jid, (_, want, _) in zip(ids, PROMPTS[:4]):
        job = c.wait_final(jid, what="openai document job")
        assert job["status"] == "succeeded", job
        res = job_result(c, jid)
        assert res.get("text") == want and \
            res["response"]["choices"][0]["message"]["content"] == want, res
    job = c.wait_final(ids[-1], what="openai v2 job")
    assert job["status"] == "succeeded", job
    assert bytes_output(job_result(c, ids[-1]), "text") == "V2 IN A JOB"
    # a document that is no prompt: 400 online, a job failed at once; the upstream never asked
    before = up.count()
    r = c.post("/v2/models/chat/infer", json={"temperature": 1})
    assert r.status_code == 400, f"a document without prompt/messages: HTTP {r.status_code}: " \
                                 f"{r.text[:300]}"
    assert "prompt" in error_message(r), error_message(r)
    r = c.post("/v1/jobs", json={"model": "chat", "input": 42})
    if r.status_code == 202:
        job = c.wait_final(check_accepted(r), what="a job whose input is no prompt")
        assert (job["status"], job["attempts"]) == ("failed", 1), job
        assert "prompt" in (job["error"] or ""), job
    else:
        assert 400 <= r.status_code < 500, r.text[:300]
        error_message(r)
    assert up.count() == before, up.snapshot()[before:]
    # a model whose header names an unset variable does not load, and says why
    entries = [e for e in c.post("/v2/repository/index").json() if e["name"] == "nokey"]
    assert entries and all(e["state"] == "UNAVAILABLE" for e in entries), entries
    assert any(UNSET_VAR in (e.get("reason") or "") for e in entries), \
        f"the load failure should name {UNSET_VAR}: {entries}"
    assert UNSET_VAR in srv.log(), "the load failure should be logged"
    r = c.post("/v2/models/nokey/infer", json=prompt_body("x"))
    assert r.status_code in (404, 503), r.text[:300]
    assert all(x.headers.get("authorization") == f"Bearer {TOKEN}" for x in up.snapshot())


def test_openai_batch_transform(openai_setup, inferd_bin, tmp_path):
    up, srv = openai_setup
    inp = tmp_path / "prompts"
    inp.mkdir()
    (inp / "prompts.jsonl").write_text("".join(json.dumps(rec) + "\n" for rec, _, _ in PROMPTS))
    env = dict(os.environ, UPSTREAM_TOKEN=TOKEN)

    def check(out, what):
        lines = out_lines(out / "prompts.jsonl.out")
        assert len(lines) == len(PROMPTS), f"{what}: {len(lines)} lines for {len(PROMPTS)} records"
        for i, (line, (rec, want, _)) in enumerate(zip(lines, PROMPTS)):
            got = json.loads(line)
            assert got.get("text") == want, f"{what} line {i + 1} (record {rec!r}): {line[:300]}"
            assert got["response"]["choices"][0]["message"]["content"] == want, line[:300]
        assert (out / "_SUCCESS").exists(), f"{what}: no _SUCCESS"

    before = up.count()
    run_batch(inferd_bin, srv.models_dir, "chat", inp, tmp_path / "out-cli", env=env)
    check(tmp_path / "out-cli", "inferd batch")
    cli_calls = up.snapshot()[before:]
    assert sorted(x.key for x in cli_calls) == \
        sorted(json.dumps({"model": "fake-chat", **body}, sort_keys=True, separators=(",", ":"))
               for _, _, body in PROMPTS), [x.json for x in cli_calls]
    assert all(x.headers.get("authorization") == f"Bearer {TOKEN}" for x in cli_calls)

    run_batch_job(srv, "chat", inp, tmp_path / "out-job")
    check(tmp_path / "out-job", "server batch job")
    assert up.count() == before + 2 * len(PROMPTS), up.count()


# ---------------------------------------------------------------------------
# 5. kill -9 during an upstream call; cancel during an upstream call
# ---------------------------------------------------------------------------


def test_kill9_during_upstream_call(serve, upstream, repo_dir, tmp_path, fresh_queue):
    """On SQLite the restart requeues the killed process's running job at once; on Redis it
    runs again once its lease (2 s here) runs out."""
    # the first call of each payload hangs (until its client goes), the second answers
    up = upstream(Script(default=[Reply(delay_s=60), Reply()]), name="hang-then-answer")
    http_model(repo_dir, "long", up.url + "/long", "json", timeout_s=120, lease_timeout_s=2)
    args = async_args(tmp_path / "data", "--workers", "1", queue=fresh_queue())
    first = serve(repo_dir, *args, tag="kill9-1")
    c = first.client()
    jid = c.submit_ok("long", input={"n": 7})
    up.wait(lambda u: u.in_flight == 1, 30, "the job's upstream call")
    job = c.wait_status(jid, "running", 10, "the job to show running")
    assert job["attempts"] == 1 and job["started_at"] is not None, job

    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(timeout=30)
    up.wait(lambda u: u.snapshot()[0].disconnected, 10,
            "the upstream to see the killed inferd's connection close")

    second = serve(repo_dir, *args, tag="kill9-2")
    c2 = second.client()
    job = c2.wait_final(jid, deadline_s=60, what="the job after the restart")
    assert (job["status"], job["attempts"]) == ("succeeded", 2), job
    assert job_result(c2, jid) == {"echo": {"n": 7}, "call": 2}
    calls = up.calls_for({"n": 7})
    assert [x.disconnected for x in calls] == [True, False], calls
    jobs, _ = c2.list_all()
    assert [j["id"] for j in jobs] == [jid], f"one job, recorded once: {jobs!r}"
    counts = c2.job_counts()
    assert counts["succeeded"] == 1 and not counts["queued"] and not counts["running"], counts


def test_sigterm_releases_the_running_job(serve, upstream, repo_dir, tmp_path, fresh_queue):
    """SIGTERM with a job still running past --drain-timeout-s: the worker hands the job back
    (queued again at once, that attempt not counted), so the next process runs it without
    waiting out its 60 s lease, even though it may make only one attempt."""
    up = upstream(Script(default=[Reply(delay_s=60), Reply()]), name="hang-then-answer")
    http_model(repo_dir, "long", up.url + "/long", "json", timeout_s=120, lease_timeout_s=60)
    args = async_args(tmp_path / "data", "--workers", "1", "--drain-timeout-s", "1",
                      queue=fresh_queue())
    first = serve(repo_dir, *args, tag="sigterm-1")
    c = first.client()
    jid = c.submit_ok("long", input={"n": 8}, max_attempts=1)
    up.wait(lambda u: u.in_flight == 1, 30, "the job's upstream call")
    c.wait_status(jid, "running", 10, "the job to show running")
    t0 = time.monotonic()
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(timeout=30) == 0, "inferd did not exit 0 on SIGTERM"
    assert time.monotonic() - t0 < 15, "SIGTERM took longer than the drain timeout allows"

    second = serve(repo_dir, *args, tag="sigterm-2")
    c2 = second.client()
    job = c2.wait_final(jid, deadline_s=30, what="the released job after the restart")
    assert job["status"] == "succeeded", job
    # the handed-back attempt is not counted: the job keeps its own max_attempts (1)
    assert (job["attempts"], job["max_attempts"]) == (2, 1), job
    assert "shutdown" in job["attempts_history"][0]["error"], job
    assert job_result(c2, jid) == {"echo": {"n": 8}, "call": 2}


def test_cancel_during_upstream_call(serve, upstream, repo_dir, tmp_path, fresh_queue):
    up = upstream(Script(default=[Reply(delay_s=60)]), name="60s")
    http_model(repo_dir, "long", up.url + "/long", "json", timeout_s=120, lease_timeout_s=2)
    srv = serve(repo_dir, *async_args(tmp_path / "data", "--workers", "1", queue=fresh_queue()),
                tag="cancel")
    c = srv.client()
    jid = c.submit_ok("long", input={"n": 1})
    up.wait(lambda u: u.in_flight == 1, 30, "the job's upstream call")
    # past its 2 s lease, the job runs on: the lease is extended, no second call
    time.sleep(2.5)
    job = c.job(jid)
    assert job["status"] == "running" and job["attempts"] == 1 and \
        job["started_at"] is not None, job
    assert isinstance(job.get("elapsed_s"), (int, float)) and job["elapsed_s"] >= 2, \
        f"a running job should show elapsed_s: {job!r}"
    assert up.count() == 1 and up.in_flight == 1, up.snapshot()

    t0 = time.monotonic()
    r = c.session.delete(f"{srv.url}/v1/jobs/{jid}", timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 200, f"DELETE a running job: HTTP {r.status_code}: {r.text[:300]}"
    job = c.wait_final(jid, deadline_s=5, what="the cancelled job (within ~1 s)")
    took = time.monotonic() - t0
    assert job["status"] == "cancelled", job
    assert took < 3, f"the job ended {took:.1f} s after DELETE (expected ~1 s)"
    up.wait(lambda u: u.snapshot()[0].disconnected, 3,
            "the upstream to see the aborted call's connection close")
    r = c.get(f"/v1/jobs/{jid}/result")
    assert r.status_code == 409, r.text[:300]
    # nothing runs the cancelled job again
    time.sleep(0.5)
    assert up.count() == 1, f"the cancelled job ran again: {up.snapshot()}"
    assert c.job(jid)["status"] == "cancelled"


# ---------------------------------------------------------------------------
# 6. online errors
# ---------------------------------------------------------------------------


def test_online_errors(serve, upstream, repo_dir, tmp_path):
    ok = upstream(echo(), name="ok")
    slow = upstream(Script(default=[Reply(delay_s=3)]), name="slow-3s")
    picky = upstream(Script({
        "bad": [Reply(400, {"error": "bad prompt"})],
        "shape": [Reply(422, {"detail": "wrong shape"})],
        "boom": [Reply(500, {"error": "exploded"})],
        "busy": [Reply(429, {"error": "slow down"}, headers={"Retry-After": "1"})],
    }, key=lambda call: call.json["case"]), name="picky")
    hang = upstream(Script(default=[Reply(delay_s=60)]), name="hang-60s")
    dead_port = free_port()
    dead_url = f"http://127.0.0.1:{dead_port}/v1/nothing"
    http_model(repo_dir, "ok", ok.url + "/ok", "json")
    http_model(repo_dir, "down", dead_url, "json", timeout_s=5)
    http_model(repo_dir, "slow", slow.url + "/slow", "json", timeout_s=1)
    http_model(repo_dir, "picky", picky.url + "/picky", "json", timeout_s=10)
    http_model(repo_dir, "hang", hang.url + "/hang", "json", timeout_s=120)
    # a v2 model whose upstream is down at load: no metadata, so it does not load
    http_model(repo_dir, "v2down", f"http://127.0.0.1:{dead_port}/v2/models/m/infer", "v2")
    srv = serve(repo_dir, "--data-dir", tmp_path / "data", tag="online-errors")
    c = srv.client()

    # upstream down: 502 naming the URL; inferd keeps serving
    r = c.post("/v2/models/down/infer", json={"q": 1})
    assert r.status_code == 502, f"upstream down: HTTP {r.status_code}: {r.text[:300]}"
    assert dead_url in error_message(r), error_message(r)
    r = c.post("/v2/models/ok/infer", json={"q": 2})
    assert r.status_code == 200 and r.json() == {"echo": {"q": 2}, "call": 1}, r.text[:300]
    assert c.get("/v2/health/ready").status_code == 200

    # slower than timeout_s: 504 naming the URL, and the call is abandoned
    r = c.post("/v2/models/slow/infer", json={"q": 3})
    assert r.status_code == 504, f"upstream too slow: HTTP {r.status_code}: {r.text[:300]}"
    assert slow.url in error_message(r), error_message(r)
    slow.wait(lambda u: u.snapshot()[0].disconnected, 5,
              "the timed-out call's connection to close")

    # malformed JSON for a json-protocol model: 400, and no upstream call
    before = ok.count()
    r = c.post("/v2/models/ok/infer", data=b'{"q": ', headers={"Content-Type": "application/json"})
    assert r.status_code == 400, f"malformed JSON: HTTP {r.status_code}: {r.text[:300]}"
    error_message(r)
    assert ok.count() == before

    # the upstream's 400 / 422 pass through, its 5xx and 429 are a 502; each names the URL
    for case, status, words in (("bad", 400, ["bad prompt"]), ("shape", 422, ["wrong shape"]),
                                ("boom", 502, ["500", "exploded"]),
                                ("busy", 502, ["429", "slow down"])):
        r = c.post("/v2/models/picky/infer", json={"case": case})
        assert r.status_code == status, \
            f"upstream case {case}: HTTP {r.status_code} (expected {status}): {r.text[:300]}"
        msg = error_message(r)
        assert picky.url in msg and all(w in msg for w in words), f"{case}: {msg!r}"

    # the v2 model that could not fetch its metadata says why
    entries = [e for e in c.post("/v2/repository/index").json() if e["name"] == "v2down"]
    assert entries and all(e["state"] == "UNAVAILABLE" for e in entries), entries
    assert any(str(dead_port) in (e.get("reason") or "") for e in entries), entries

    # a client that hangs up: its upstream call is aborted too
    with pytest.raises(requests.ReadTimeout):
        requests.post(f"{srv.url}/v2/models/hang/infer", json={"q": 4}, timeout=(5, 0.5))
    hang.wait(lambda u: u.count() == 1 and u.snapshot()[0].disconnected, 5,
              "the upstream call of a client that hung up to be aborted")

    # and everything still works afterwards
    res = parallel(8, lambda i: requests.post(f"{srv.url}/v2/models/ok/infer", json={"after": i},
                                              timeout=HTTP_TIMEOUT_S))
    assert [r.status_code for r in res] == [200] * 8, [r.text[:200] for r in res]


# ---------------------------------------------------------------------------
# 6. what OpenAI would refuse: streaming, keys outside its schema; its Batch API lines
# ---------------------------------------------------------------------------


def test_openai_stream_true_is_refused(openai_setup):
    """inferd answers with the whole completion: "stream": true is a 400 online and a job
    failed at once, not an upstream stream read as a broken answer and retried as a 502."""
    up, srv = openai_setup
    c = srv.client()
    before = up.count()
    r = c.post("/v2/models/chat/infer", json={"prompt": "hi", "stream": True})
    assert r.status_code == 400, f"stream: true: HTTP {r.status_code}: {r.text[:300]}"
    assert "streaming is not supported" in error_message(r), error_message(r)
    jid = check_accepted(c.post("/v1/jobs", json={
        "model": "complete", "input": {"prompt": "hi", "stream": True}, "max_attempts": 3}))
    job = c.wait_final(jid, what="a job asking for a stream")
    assert (job["status"], job["attempts"]) == ("failed", 1), job
    assert "streaming is not supported" in (job["error"] or ""), job
    assert up.count() == before, f"nothing should reach the upstream: {up.snapshot()[before:]}"
    # "stream": false is what inferd does anyway
    r = c.post("/v2/models/chat/infer", json={"prompt": "no stream", "stream": False})
    assert r.status_code == 200 and r.json()["text"] == "NO STREAM", r.text[:300]


def test_openai_forwards_only_its_request_schema(openai_setup):
    up, srv = openai_setup
    c = srv.client()
    doc = {"custom_id": "req-7", "prompt": "keep it", "max_tokens": 5, "top_k": 3,
           "my_trace": {"a": 1}, "stream_options": {"include_usage": True}}
    for model, path in [("chat", "/v1/chat/completions"), ("complete", "/v1/completions")]:
        r = c.post(f"/v2/models/{model}/infer", json=doc)
        assert r.status_code == 200, f"{model}: HTTP {r.status_code}: {r.text[:300]}"
        got = r.json()
        assert got["custom_id"] == "req-7" and got["text"] == "KEEP IT", got
        call = up.snapshot()[-1]
        assert call.path == path, call
        want = {"model": f"fake-{model}", "max_tokens": 5}
        want.update({"messages": [{"role": "user", "content": "keep it"}]} if model == "chat"
                    else {"prompt": "keep it"})
        assert call.json == want, f"{model}: only OpenAI's keys should be sent: {call.json}"
    # forward_keys lets a server's own extras through (vLLM's top_k); custom_id never goes
    r = c.post("/v2/models/extras/infer", json=doc)
    assert r.status_code == 200, r.text[:300]
    assert up.snapshot()[-1].json == {"model": "fake-chat", "max_tokens": 5, "top_k": 3,
                                      "messages": [{"role": "user", "content": "keep it"}]}
    # a job's document too
    jid = check_accepted(c.post("/v1/jobs", json={"model": "complete", "input": doc}))
    assert c.wait_final(jid)["status"] == "succeeded"
    res = job_result(c, jid)
    assert res["custom_id"] == "req-7" and res["text"] == "KEEP IT", res
    assert "custom_id" not in up.snapshot()[-1].json


def test_openai_batch_api_lines(openai_setup, inferd_bin, tmp_path):
    """A file in the OpenAI Batch API's input format runs as it is, and each result carries
    its custom_id."""
    up, srv = openai_setup
    lines = [{"custom_id": f"task-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "fake-chat", "max_tokens": 10,
                       "messages": [{"role": "user", "content": f"question {i}"}]}}
             for i in range(4)]
    lines[2] = dict(lines[2], url="/v1/embeddings")          # another endpoint: a bad record
    inp = tmp_path / "batch-in"
    inp.mkdir()
    (inp / "requests.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "batch-out"
    before = up.count()
    run_batch(inferd_bin, srv.models_dir, "chat", inp, out, "--max-errors", "1",
              env=dict(os.environ, UPSTREAM_TOKEN=TOKEN))
    got = out_lines(out / "requests.jsonl.out")
    assert len(got) == 4, got
    for i, line in enumerate(got):
        if i == 2:
            assert line == "", f"the refused line's output should be empty: {line!r}"
            continue
        rec = json.loads(line)
        assert rec["custom_id"] == f"task-{i}" and rec["text"] == f"QUESTION {i}", rec
    errors = (out / "requests.jsonl.errors").read_text()
    assert errors.startswith("line 3:") and "url" in errors and "/v1/chat/completions" in errors, \
        errors
    calls = up.snapshot()[before:]
    assert len(calls) == 3, calls
    assert all(set(x.json) == {"model", "max_tokens", "messages"} for x in calls), \
        [x.json for x in calls]
