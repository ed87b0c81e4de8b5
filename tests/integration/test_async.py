"""The asynchronous job API: POST /v1/jobs, ``Prefer: respond-async``, long-polls,
cancel, ttl, priorities, idempotency, queue limits, retries, listing, metrics and
webhooks.

Every test runs twice, once per queue (the ``queue_kind`` fixture of conftest.py):
``[sqlite]`` (the default, under --data-dir) and ``[redis]`` (``--queue redis://...``, a
fresh database of the session's redis-server per server; serve runs its own workers here,
test_redis.py covers serve + separate ``inferd worker`` processes).

Tests that need jobs to stay queued run ``--workers 1 --worker-batch 1`` and hold that
worker with a :class:`conftest.Gate` job (the example plugin holds it in the model until
the test releases it), so nothing here depends on how fast the machine is.
"""
import datetime as dt
import hashlib
import hmac
import itertools
import json
import threading
import time
import uuid

import numpy as np
import pytest
import requests

from conftest import (HTTP_TIMEOUT_S, Gate, WebhookReceiver, assert_close, async_args,
                      check_accepted, error_message, infer_body, job_id_from_location,
                      metric_value, output_array, parse_time, wait_for, write_plugin_model)

WEBHOOK_SECRET = "s3cret"


def rowsum(X):
    return np.asarray(X, dtype=np.float32).sum(axis=1, dtype=np.float32).astype(np.float64)


def rows4(n, seed):
    return np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)


def poison_rows(n=1):
    X = np.ones((n, 4), dtype=np.float32)
    X[0, 0] = -999.0
    return X


@pytest.fixture(scope="module")
def repo(trained, tmp_path_factory):
    repo = tmp_path_factory.mktemp("async-models")
    for name in ("binary", "multiclass", "slow"):
        trained[name].install(repo)
    write_plugin_model(repo, "rowsum", width=4)
    return repo


@pytest.fixture(scope="module")
def srv(module_server_factory, repo, tmp_path_factory, queue_kind, fresh_queue):
    data = tmp_path_factory.mktemp("async-data")
    s = module_server_factory(repo, *async_args(data, "--workers", "2", queue=fresh_queue()),
                              tag=f"async-{queue_kind}")
    yield s
    s.stop()    # before the other queue's server starts (the module's factory checks it too)


@pytest.fixture
def client(srv):
    return srv.client()


@pytest.fixture
def one_worker(server_factory, repo, tmp_path, queue_kind, fresh_queue):
    """start(*extra_args) -> a fresh server with one worker running one job at a time
    (--workers 1 --worker-batch 1) and its own --data-dir or Redis database."""
    counter = itertools.count()

    def start(*extra, models=None):
        data = tmp_path / f"data-{next(counter)}"
        return server_factory(models or repo,
                              *async_args(data, "--workers", "1", "--worker-batch", "1", *extra,
                                          queue=fresh_queue()),
                              tag=f"async-1w-{queue_kind}")
    return start


def check_result(client, jid, expected, model, what=""):
    r = client.get(f"/v1/jobs/{jid}/result")
    assert r.status_code == 200, f"{what}: GET result: HTTP {r.status_code}: {r.text[:400]}"
    body = r.json()
    assert body.get("model_name") == model, f"{what}: {body!r:.300}"
    assert_close(output_array(body, expected.shape[0]), expected, what)
    return body


def assert_409_naming(r, word, what):
    assert r.status_code == 409, f"{what}: HTTP {r.status_code} (expected 409): {r.text[:300]}"
    msg = error_message(r)
    assert word in msg.lower(), f"{what}: error {msg!r} does not name {word!r}"


# ---------------------------------------------------------------------------
# lifecycle
# ---------------------------------------------------------------------------


def test_lifecycle_prefer_respond_async(client, trained):
    m = trained["binary"]
    X = m.rows(5, seed=101)
    r = client.post("/v2/models/binary/infer", json=infer_body(X),
                    headers={"Prefer": "respond-async"})
    jid = check_accepted(r, "POST /v2/models/binary/infer with Prefer: respond-async")
    job = client.wait_final(jid, what="Prefer job")
    assert job["status"] == "succeeded", job
    assert job["model"] == "binary" and job["attempts"] == 1 and job["max_attempts"] == 3, job
    assert job["priority"] == 0 and job["error"] is None, job
    assert job["output_location"] is None and job["callback_url"] is None, job
    created, started, finished = (parse_time(job[k]) for k in
                                  ("created_at", "started_at", "finished_at"))
    assert created <= started <= finished, job
    # the Location header, used as is, is the job
    loc = client.get(r.headers["Location"])
    assert loc.status_code == 200 and loc.json()["id"] == jid, loc.text[:300]
    check_result(client, jid, m.expected(X), "binary", "Prefer job result")


def test_lifecycle_post_v1_jobs(client, trained):
    for name, n, seed in (("binary", 7, 102), ("multiclass", 4, 103)):
        m = trained[name]
        X = m.rows(n, seed=seed)
        jid = client.submit_ok(name, X, priority=3, max_attempts=5)
        job = client.wait_final(jid, what=f"{name} job")
        assert job["status"] == "succeeded", job
        assert (job["model"], job["priority"], job["max_attempts"], job["attempts"]) == \
            (name, 3, 5, 1), job
        check_result(client, jid, m.expected(X), name, f"{name} job result")


def test_prefer_wait_returns_the_result(client, trained):
    m = trained["binary"]
    X = m.rows(3, seed=104)
    r = client.post("/v2/models/binary/infer", json=infer_body(X),
                    headers={"Prefer": "respond-async, wait=10"})
    if r.status_code == 202:
        jid = job_id_from_location(r)
        pytest.fail(f"Prefer: respond-async, wait=10 answered 202 (job not final within 10 s?); "
                    f"job now: {client.job(jid)!r}")
    assert r.status_code == 200, f"HTTP {r.status_code}: {r.text[:400]}"
    body = r.json()
    assert body["model_name"] == "binary", body
    assert_close(output_array(body, 3), m.expected(X), "Prefer wait=10 result")


def test_long_poll_big_request(client, trained):
    """20,000 rows on the 400-tree depth-8 model; ?wait=30 comes back succeeded."""
    m = trained["slow"]
    X = m.rows(20000, seed=105)
    jid = client.submit_ok("slow", X)
    r = client.get(f"/v1/jobs/{jid}?wait=30", timeout=90)
    assert r.status_code == 200, r.text[:300]
    job = r.json()
    assert job["status"] == "succeeded", f"?wait=30 returned a job that is not succeeded: {job!r}"
    check_result(client, jid, m.expected(X), "slow", "20,000-row job")


def test_long_poll_is_woken_when_the_job_ends(one_worker, gates):
    """A ?wait=60 poll on a queued job answers once the job ends.

    The job is held queued (gate) while the poll starts; the client timeout (45 s) is
    below the wait, so a poll that is only answered at its deadline fails the test.
    """
    s = one_worker()
    c = s.client()
    gate = gates()
    gate.hold(c)
    X = rows4(2, 106)
    jid = c.submit_ok("rowsum", X)
    assert c.job(jid)["status"] == "queued"
    out = {}

    def poll(key, job_id):
        try:
            out[key] = requests.get(f"{s.url}/v1/jobs/{job_id}?wait=60", timeout=45)
        except Exception as exc:  # noqa: BLE001 - reported below
            out[key] = exc
    threads = [threading.Thread(target=poll, args=(k, j), daemon=True)
               for k, j in (("job", jid), ("gate", gate.id))]
    for t in threads:
        t.start()
    # the polls are registered before the job can end: it is still held by the gate
    assert c.job(jid)["status"] == "queued"
    assert gate.release()
    for t in threads:
        t.join(timeout=120)
    for key in ("gate", "job"):
        r = out.get(key)
        assert isinstance(r, requests.Response), \
            f"GET ?wait=60 on the {key} job: no answer within 45 s after the job ended: {r!r}"
        assert r.status_code == 200, r.text[:300]
        assert r.json()["status"] == "succeeded", f"{key}: {r.json()!r}"
    check_result(c, jid, rowsum(X), "rowsum", "woken long-poll job")


def test_long_poll_deadline_returns_current_status(one_worker, gates):
    s = one_worker()
    c = s.client()
    gate = gates()
    gate.hold(c)
    jid = c.submit_ok("rowsum", rows4(1, 107))
    r = c.get(f"/v1/jobs/{jid}?wait=1")
    assert r.status_code == 200, r.text[:300]
    assert r.json()["status"] == "queued", r.json()
    r = c.get(f"/v1/jobs/{gate.id}?wait=1")
    assert r.status_code == 200 and r.json()["status"] == "running", r.text[:300]
    # Prefer wait=1 on a job that cannot run: 202 + Location, not a result
    r = c.post("/v2/models/rowsum/infer", json=infer_body(rows4(1, 108)),
               headers={"Prefer": "respond-async, wait=1"})
    assert r.status_code == 202, f"Prefer wait=1 behind a held worker: HTTP {r.status_code}: {r.text[:300]}"
    jid2 = job_id_from_location(r)
    assert r.json().get("id") == jid2 and r.json().get("status") in ("queued", "running"), r.json()
    # wait=0 answers at once
    r = c.get(f"/v1/jobs/{jid}?wait=0")
    assert r.status_code == 200 and r.json()["status"] == "queued", r.text[:300]
    r = c.get(f"/v1/jobs/{jid}?wait=abc")
    assert r.status_code == 400, f"?wait=abc: HTTP {r.status_code}: {r.text[:300]}"
    assert gate.release()
    for j in (jid, jid2):
        assert c.wait_final(j)["status"] == "succeeded"


# ---------------------------------------------------------------------------
# cancel, ttl, priority
# ---------------------------------------------------------------------------


def test_cancel_queued_job(one_worker, gates):
    s = one_worker()
    c = s.client()
    gate = gates()
    gate.hold(c)
    jid = c.submit_ok("rowsum", rows4(1, 109))
    assert c.job(jid)["status"] == "queued"
    r = c.session.delete(f"{s.url}/v1/jobs/{jid}", timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 200, f"DELETE queued job: HTTP {r.status_code}: {r.text[:300]}"
    assert r.json()["id"] == jid and r.json()["status"] == "cancelled", r.json()
    job = c.job(jid)
    assert job["status"] == "cancelled" and job["finished_at"] is not None, job
    assert_409_naming(c.get(f"/v1/jobs/{jid}/result"), "cancelled", "result of a cancelled job")
    r = c.session.delete(f"{s.url}/v1/jobs/{jid}", timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 409, f"DELETE a cancelled job again: HTTP {r.status_code}: {r.text[:300]}"
    error_message(r)
    # the worker, once free, does not run it
    assert gate.release()
    assert c.wait_final(gate.id)["status"] == "succeeded"
    after = c.job(jid)
    assert after["status"] == "cancelled" and after["attempts"] == 0 and \
        after["started_at"] is None, f"a cancelled job ran: {after!r}"


def test_cancel_running_job(one_worker, gates):
    s = one_worker()
    c = s.client()
    gate = gates()
    gate.hold(c)
    behind = c.submit_ok("rowsum", rows4(1, 110))
    r = c.session.delete(f"{s.url}/v1/jobs/{gate.id}", timeout=HTTP_TIMEOUT_S)
    # the held model stops when asked: DELETE sees the job end
    assert r.status_code == 200, f"DELETE running job: HTTP {r.status_code}: {r.text[:300]}"
    assert r.json()["id"] == gate.id and r.json()["status"] == "cancelled", r.json()
    assert gate.release()
    job = c.wait_final(gate.id)
    assert job["status"] == "cancelled", f"a job cancelled while running ended {job['status']}: {job!r}"
    assert_409_naming(c.get(f"/v1/jobs/{gate.id}/result"), "cancelled",
                      "result of a job cancelled while running")
    assert c.wait_final(behind)["status"] == "succeeded"


def wait_past(created_at, seconds, what):
    """Wait until ``seconds`` have passed since the job's created_at (wall clock)."""
    target = parse_time(created_at) + dt.timedelta(seconds=seconds)
    wait_for(lambda: dt.datetime.now(dt.timezone.utc) > target, seconds + 30, what)


def test_ttl_expiry(one_worker, gates):
    # --job-ttl-s 1 is the default ttl; a job's own ttl_s overrides it
    s = one_worker("--job-ttl-s", "1")
    c = s.client()
    gate = gates()
    gate.submit(c, ttl_s=3600)
    c.wait_status(gate.id, "running", 30, "gate job to occupy the worker")
    own = c.submit_ok("rowsum", rows4(1, 111), ttl_s=1)
    default = c.submit_ok("rowsum", rows4(1, 112))
    keep = c.submit_ok("rowsum", rows4(1, 113), ttl_s=3600)
    wait_past(c.job(default)["created_at"], 1.5, "the jobs' 1 s ttl to pass")
    assert gate.release()
    for jid, what in ((own, "ttl_s=1"), (default, "--job-ttl-s 1")):
        job = c.wait_final(jid, what=what)
        assert job["status"] == "expired", f"{what}: {job!r}"
        assert job["started_at"] is None and job["attempts"] == 0, f"{what}: {job!r}"
        assert_409_naming(c.get(f"/v1/jobs/{jid}/result"), "expired", f"result of {what} job")
    assert c.wait_final(keep)["status"] == "succeeded"
    listed = {j["id"] for j in c.list_all(status="expired")[0]}
    assert listed == {own, default}, f"GET /v1/jobs?status=expired: {listed}"


def test_retry_expired_job(one_worker, gates):
    s = one_worker()
    c = s.client()
    gate = gates()
    gate.hold(c)
    X = rows4(2, 114)
    jid = c.submit_ok("rowsum", X, ttl_s=1)
    wait_past(c.job(jid)["created_at"], 1.5, "the job's 1 s ttl to pass")
    assert gate.release()
    assert c.wait_final(jid)["status"] == "expired"
    r = c.post(f"/v1/jobs/{jid}/retry")
    assert r.status_code == 202, \
        f"POST /v1/jobs/{{id}}/retry on an expired job: HTTP {r.status_code}: {r.text[:300]}"
    job = c.wait_final(jid, what="redriven expired job")
    assert job["status"] == "succeeded", job
    check_result(c, jid, rowsum(X), "rowsum", "redriven expired job")


def test_priority_order(one_worker, gates):
    s = one_worker()
    c = s.client()
    gate = gates()
    gate.hold(c)
    priorities = [0, 9, 5, 9, 0]
    ids = [c.submit_ok("rowsum", rows4(1, 200 + i), priority=p) for i, p in enumerate(priorities)]
    for jid in ids:   # all queued before the worker frees up
        assert c.job(jid)["status"] == "queued"
    assert gate.release()
    jobs = [c.wait_final(jid) for jid in ids]
    assert all(j["status"] == "succeeded" for j in jobs), jobs
    expected = sorted(range(5), key=lambda i: (-priorities[i], i))   # [1, 3, 2, 0, 4]
    started = [parse_time(jobs[i]["started_at"]) for i in expected]
    desc = [f"#{i} prio {priorities[i]} started {jobs[i]['started_at']}" for i in expected]
    assert all(a <= b for a, b in zip(started, started[1:])), \
        "jobs did not start by priority desc then submission order:\n" + "\n".join(desc)
    assert parse_time(c.job(gate.id)["started_at"]) <= started[0]


# ---------------------------------------------------------------------------
# idempotency, queue limit
# ---------------------------------------------------------------------------


def test_idempotency_key(client):
    key = f"idem-{uuid.uuid4()}"
    X = rows4(2, 115)
    body = {"model": "rowsum", "input": infer_body(X), "priority": 4}
    r1 = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
    jid = check_accepted(r1, "first submission with an Idempotency-Key")
    r2 = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
    assert r2.status_code == 200, f"same key + same body: HTTP {r2.status_code}: {r2.text[:300]}"
    assert r2.json()["id"] == jid, f"same key + same body gave job {r2.json()['id']}, not {jid}"
    other = dict(body, input=infer_body(rows4(2, 116)))
    r3 = client.post("/v1/jobs", json=other, headers={"Idempotency-Key": key})
    assert r3.status_code == 409, f"same key + other body: HTTP {r3.status_code}: {r3.text[:300]}"
    error_message(r3)
    r4 = client.post("/v1/jobs", json=dict(body, priority=5), headers={"Idempotency-Key": key})
    assert r4.status_code == 409, f"same key + other priority: HTTP {r4.status_code}: {r4.text[:300]}"
    # another key, or none: a new job
    jid5 = check_accepted(client.post("/v1/jobs", json=body,
                                      headers={"Idempotency-Key": key + "-b"}))
    jid6 = check_accepted(client.post("/v1/jobs", json=body))
    assert len({jid, jid5, jid6}) == 3
    assert client.wait_final(jid)["status"] == "succeeded"
    # still the same job once it has finished
    r7 = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
    assert r7.status_code == 200 and r7.json()["id"] == jid, r7.text[:300]
    assert r7.json()["status"] == "succeeded", r7.json()
    check_result(client, jid, rowsum(X), "rowsum", "idempotent job")


def test_idempotency_key_limits(client):
    """A key is an id: up to 255 bytes of printable ASCII; longer, or with other bytes, is a 400
    naming the header and the limit (and not echoing the key), on both submission routes."""
    X = rows4(1, 117)
    body = {"model": "rowsum", "input": infer_body(X)}
    longest = "k" * 255
    jid = check_accepted(client.post("/v1/jobs", json=body, headers={"Idempotency-Key": longest}))
    again = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": longest})
    assert again.status_code == 200 and again.json()["id"] == jid, again.text[:300]
    for key, words in (("k" * 256, ["Idempotency-Key", "256 bytes", "limit of 255"]),
                       ("caf\u00e9", ["Idempotency-Key", "byte 4", "printable ASCII"])):
        for path, payload in (("/v1/jobs", body),
                              ("/v2/models/rowsum/infer", infer_body(X))):
            headers = {"Idempotency-Key": key.encode("latin-1")}
            if path != "/v1/jobs":
                headers["Prefer"] = "respond-async"
            r = client.post(path, json=payload, headers=headers)
            assert r.status_code == 400, f"{path} key {key[:10]!r}: HTTP {r.status_code} {r.text[:200]}"
            msg = error_message(r)
            for w in words:
                assert w in msg, f"{path}: {msg!r} lacks {w!r}"
            assert key not in msg, f"the key is echoed: {msg!r}"


def test_full_queue_429(one_worker, gates, trained):
    s = one_worker("--max-queue", "5")
    c = s.client()
    gate = gates()
    gate.hold(c)
    ids = [c.submit_ok("rowsum", rows4(1, 300 + i)) for i in range(5)]

    def assert_429(r, what):
        assert r.status_code == 429, f"{what}: HTTP {r.status_code} (expected 429): {r.text[:300]}"
        ra = r.headers.get("Retry-After")
        assert ra is not None and ra.strip().isdigit() and int(ra) >= 1, \
            f"{what}: Retry-After {ra!r} (expected an integer >= 1)"
        error_message(r)
    assert_429(c.submit("rowsum", rows4(1, 310)), "6th job, POST /v1/jobs")
    assert_429(c.post("/v2/models/rowsum/infer", json=infer_body(rows4(1, 311)),
                      headers={"Prefer": "respond-async"}), "6th job, Prefer: respond-async")
    # online inference is not the queue: still served (another model: the gate holds rowsum's)
    m = trained["binary"]
    r = c.infer("binary", m.rows(1, 312))
    assert r.status_code == 200, f"online infer with a full job queue: HTTP {r.status_code}"
    # a cancelled job frees its place
    r = c.session.delete(f"{s.url}/v1/jobs/{ids[0]}", timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 200, r.text[:300]
    ids.append(c.submit_ok("rowsum", rows4(1, 313)))
    assert_429(c.submit("rowsum", rows4(1, 314)), "full again")
    assert gate.release()
    for jid in ids[1:]:
        assert c.wait_final(jid)["status"] == "succeeded"
    c.wait_final(c.submit_ok("rowsum", rows4(1, 315)))


# ---------------------------------------------------------------------------
# failures, retries
# ---------------------------------------------------------------------------


def test_poison_job_fails_after_max_attempts(client):
    jid = client.submit_ok("rowsum", poison_rows(3))
    ok = client.submit_ok("rowsum", rows4(3, 116))
    job = client.wait_final(jid, what="poison job")
    assert job["status"] == "failed", job
    assert job["attempts"] == 3 and job["max_attempts"] == 3, \
        f"expected 3 attempts (default --max-attempts): {job!r}"
    assert job["error"] and "poison value -999" in job["error"], \
        f"error should be the backend's message: {job['error']!r}"
    assert job["finished_at"] is not None
    assert_409_naming(client.get(f"/v1/jobs/{jid}/result"), "failed", "result of a failed job")
    failed = {j["id"] for j in client.list_all(status="failed")[0]}
    assert jid in failed, "failed job missing from GET /v1/jobs?status=failed"
    assert client.wait_final(ok)["status"] == "succeeded"
    # max_attempts of the job itself
    one = client.submit_ok("rowsum", poison_rows(), max_attempts=1)
    job = client.wait_final(one)
    assert (job["status"], job["attempts"], job["max_attempts"]) == ("failed", 1, 1), job
    # through the Prefer entry point too
    r = client.post("/v2/models/rowsum/infer", json=infer_body(poison_rows()),
                    headers={"Prefer": "respond-async"})
    pj = check_accepted(r, "poison via Prefer")
    assert client.wait_final(pj)["status"] == "failed"


def test_retry_failed_job(client):
    jid = client.submit_ok("rowsum", poison_rows(), max_attempts=2)
    job = client.wait_final(jid)
    assert (job["status"], job["attempts"]) == ("failed", 2), job
    r = client.post(f"/v1/jobs/{jid}/retry")
    assert r.status_code == 202, f"retry a failed job: HTTP {r.status_code}: {r.text[:300]}"
    assert r.json().get("id") == jid, r.json()
    assert r.json().get("status") in ("queued", "running", "failed"), r.json()
    if "Location" in r.headers:
        assert job_id_from_location(r) == jid
    again = client.wait_final(jid, what="redriven poison job")
    assert again["status"] == "failed", again
    assert again["attempts"] > 2, f"attempts did not increase after the retry: {again!r}"
    assert "poison value -999" in (again["error"] or ""), again
    # only failed / expired jobs go back
    ok = client.submit_ok("rowsum", rows4(1, 117))
    assert client.wait_final(ok)["status"] == "succeeded"
    assert_409_naming(client.post(f"/v1/jobs/{ok}/retry"), "succeeded", "retry a succeeded job")
    r = client.post("/v1/jobs/nosuchjob123/retry")
    assert r.status_code == 404, f"retry an unknown job: HTTP {r.status_code}"


def test_undecodable_input_location_fails_without_retry(client, tmp_path):
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{this is not json")
    wrong = tmp_path / "wrong-width.json"
    wrong.write_text(json.dumps(infer_body(np.ones((2, 5), dtype=np.float32))))
    for path, what in ((garbage, "malformed JSON file"), (wrong, "5-wide input for a 4-wide model")):
        jid = client.submit_ok("rowsum", input_location=f"file://{path}")
        job = client.wait_final(jid, what=what)
        assert job["status"] == "failed", f"{what}: {job!r}"
        assert job["attempts"] == 1, f"{what}: a decode failure was retried: {job!r}"
        assert job["error"], f"{what}: no error: {job!r}"
    missing = client.submit_ok("rowsum", input_location=f"file://{tmp_path}/nope.json")
    job = client.wait_final(missing, what="missing input file")
    assert job["status"] == "failed" and job["error"], job


def test_unknown_job_404(client):
    for method, path in (("GET", "/v1/jobs/doesnotexist42"), ("GET", "/v1/jobs/doesnotexist42?wait=1"),
                         ("GET", "/v1/jobs/doesnotexist42/result"),
                         ("DELETE", "/v1/jobs/doesnotexist42"),
                         ("POST", "/v1/jobs/doesnotexist42/retry")):
        r = client.session.request(method, client.url + path, timeout=HTTP_TIMEOUT_S)
        assert r.status_code == 404, f"{method} {path}: HTTP {r.status_code}: {r.text[:200]}"
        error_message(r)


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------


def test_bad_submissions(client, tmp_path):
    good = {"model": "rowsum", "input": infer_body(rows4(1, 118))}
    infile = tmp_path / "in.json"
    infile.write_text(json.dumps(infer_body(rows4(1, 119))))
    cases = [
        ("malformed JSON", b'{"model": "rowsum", "input": ', 400, None),
        ("a JSON array", b'[1, 2]', 400, None),
        ("missing model", {"input": good["input"]}, 400, "model"),
        ("unknown model", dict(good, model="no_such_model"), 404, "no_such_model"),
        ("wrong width", dict(good, input=infer_body(np.ones((1, 5), dtype=np.float32))), 422, None),
        ("both input and input_location", dict(good, input_location=f"file://{infile}"), 400,
         "input"),
        ("neither input nor input_location", {"model": "rowsum"}, 400, "input"),
        ("input not an object", dict(good, input=[1, 2, 3]), 400, "input"),
        ("priority 12", dict(good, priority=12), 400, "priority"),
        ("priority -1", dict(good, priority=-1), 400, "priority"),
        ("priority a string", dict(good, priority="high"), 400, "priority"),
        ("ttl_s 0", dict(good, ttl_s=0), 400, "ttl_s"),
        ("max_attempts 0", dict(good, max_attempts=0), 400, "max_attempts"),
        ("max_attempts 101", dict(good, max_attempts=101), 400, "max_attempts"),
        ("callback_url ftp://x", dict(good, callback_url="ftp://x"), 400, "callback_url"),
    ]
    before = len(client.list_all()[0])
    accepted = 0
    for what, body, status, word in cases:
        if isinstance(body, bytes):
            r = client.post("/v1/jobs", data=body, headers={"Content-Type": "application/json"})
        else:
            r = client.post("/v1/jobs", json=body)
        assert r.status_code == status, \
            f"{what}: POST /v1/jobs {body!r:.200}: HTTP {r.status_code} (expected {status}): {r.text[:300]}"
        msg = error_message(r)
        if word:
            assert word in msg, f"{what}: error {msg!r} does not name {word!r}"
        assert "Location" not in r.headers, f"{what}: a rejected job has a Location"
        check_accepted(client.post("/v1/jobs", json=good), f"valid submission after {what}")
        accepted += 1
    # the Prefer entry point validates like online inference
    online = client.infer("rowsum", np.ones((1, 5), dtype=np.float32))
    r = client.post("/v2/models/rowsum/infer", json=infer_body(np.ones((1, 5), dtype=np.float32)),
                    headers={"Prefer": "respond-async"})
    assert r.status_code == online.status_code and 400 <= r.status_code < 500, \
        f"Prefer with a 5-wide input: HTTP {r.status_code}, online gives {online.status_code}"
    r = client.post("/v2/models/no_such_model/infer", json=infer_body(rows4(1, 121)),
                    headers={"Prefer": "respond-async"})
    assert r.status_code == 404, f"Prefer on an unknown model: HTTP {r.status_code}"
    after = len(client.list_all()[0])
    assert after - before == accepted, \
        f"{after - before} jobs were created by {accepted} valid and {len(cases) + 2} invalid submissions"


def test_input_and_output_locations(client, tmp_path, trained):
    m = trained["binary"]
    X = m.rows(6, seed=122)
    inp = tmp_path / "request.json"
    inp.write_text(json.dumps(infer_body(X)))
    out = tmp_path / "out" / "result.json"
    out.parent.mkdir()
    out_uri = f"file://{out}"
    jid = client.submit_ok("binary", input_location=f"file://{inp}", output_location=out_uri)
    job = client.wait_final(jid)
    assert job["status"] == "succeeded", job
    assert job["output_location"] == out_uri, job
    assert out.exists(), f"{out} was not written"
    written = json.loads(out.read_text())
    assert written.get("model_name") == "binary", written
    assert_close(output_array(written, 6), m.expected(X), "result file")
    served = check_result(client, jid, m.expected(X), "binary", "GET result of output_location job")
    assert served == written
    # an inline input with an output location too
    jid2 = client.submit_ok("binary", X, output_location=f"file://{tmp_path}/out/second.json")
    assert client.wait_final(jid2)["status"] == "succeeded"
    assert_close(output_array(json.loads((tmp_path / "out" / "second.json").read_text()), 6),
                 m.expected(X), "second result file")


def test_file_roots_confine_locations(one_worker, tmp_path, trained):
    """--file-roots: a job's file locations must resolve inside it (symlinks followed)."""
    root, outside = tmp_path / "jobs-root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link-out").symlink_to(outside)
    s = one_worker("--file-roots", str(root))
    c = s.client()
    m = trained["binary"]
    X = m.rows(2, seed=140)
    for where in (root, outside):
        (where / "request.json").write_text(json.dumps(infer_body(X)))
    jid = c.submit_ok("binary", input_location=f"file://{root}/request.json",
                      output_location=f"file://{root}/out/result.json")
    assert c.wait_final(jid)["status"] == "succeeded"
    assert_close(output_array(json.loads((root / "out" / "result.json").read_text()), 2),
                 m.expected(X), "result inside the root")
    for field, value in (("input_location", f"file://{outside}/request.json"),
                         ("input_location", str(root / "link-out" / "request.json")),
                         ("input_location", f"{root}/../outside/request.json"),
                         ("input_location", "/etc/passwd"),
                         ("output_location", f"file://{outside}/result.json")):
        body = {"model": "binary", field: value}
        if field == "output_location":
            body["input"] = infer_body(X)
        r = c.post("/v1/jobs", json=body)
        assert r.status_code == 400, f"{field}={value}: HTTP {r.status_code}: {r.text[:300]}"
        msg = error_message(r)
        assert field in msg and "--file-roots" in msg, f"{field}={value}: {msg!r}"
    assert not (outside / "result.json").exists()


def test_webhook_hosts_limit_callback_urls(one_worker):
    s = one_worker("--webhook-hosts", "hooks.example.com,.corp.example")
    c = s.client()
    body = {"model": "rowsum", "input": infer_body(rows4(1, 141))}
    for url in ("http://169.254.169.254/latest/meta-data/", "http://127.0.0.1:6379/",
                "http://hooks.example.com.evil.net/x"):
        r = c.post("/v1/jobs", json=dict(body, callback_url=url))
        assert r.status_code == 400, f"{url}: HTTP {r.status_code}: {r.text[:300]}"
        msg = error_message(r)
        assert "callback_url" in msg and "--webhook-hosts" in msg, msg
    jid = check_accepted(c.post("/v1/jobs", json=dict(
        body, callback_url="https://build.corp.example/hooks/inferd")))
    assert c.wait_final(jid)["status"] == "succeeded"


# ---------------------------------------------------------------------------
# listing, metrics
# ---------------------------------------------------------------------------


def test_listing_filters_and_paging(server_factory, repo, tmp_path, trained, fresh_queue):
    s = server_factory(repo, *async_args(tmp_path / "data", "--workers", "2",
                                         queue=fresh_queue()), tag="async-list")
    c = s.client()
    ok = [c.submit_ok("rowsum", rows4(1, 400 + i)) for i in range(5)]
    bad = [c.submit_ok("rowsum", poison_rows(), max_attempts=1) for _ in range(2)]
    other = c.submit_ok("binary", trained["binary"].rows(1, 410))
    for jid in ok + bad + [other]:
        c.wait_final(jid)
    jobs, _ = c.list_all(status="succeeded")
    assert sorted(j["id"] for j in jobs) == sorted(ok + [other]), jobs
    assert all(j["status"] == "succeeded" for j in jobs)
    created = [parse_time(j["created_at"]) for j in jobs]
    assert created == sorted(created, reverse=True), "GET /v1/jobs is not newest first"
    assert [j["id"] for j in jobs][-1] == ok[0] and [j["id"] for j in jobs][0] == other
    jobs, _ = c.list_all(status="succeeded", model="rowsum")
    assert sorted(j["id"] for j in jobs) == sorted(ok)
    dead, _ = c.list_all(status="failed")
    assert sorted(j["id"] for j in dead) == sorted(bad), dead
    assert all("poison" in (j["error"] or "") for j in dead), dead
    everything, pages = c.list_all(limit=2)
    pages_ids = [j["id"] for j in everything]
    assert sorted(pages_ids) == sorted(ok + bad + [other]), \
        f"limit=2 paging: {len(pages_ids)} jobs, {len(set(pages_ids))} distinct, over {pages} pages"
    # 4 full pages; a server may also answer one empty last page (a cursor after a full page)
    assert pages in (4, 5), f"8 jobs, limit=2: {pages} pages"
    first = c.get("/v1/jobs", params={"limit": 2}).json()
    assert len(first["jobs"]) == 2 and first["next_cursor"], first
    for params in ({"status": "bogus"}, {"limit": "0"}, {"limit": "x"}):
        r = c.get("/v1/jobs", params=params)
        assert r.status_code == 400, f"GET /v1/jobs {params}: HTTP {r.status_code}"


def test_finished_jobs_go_after_result_ttl(one_worker):
    """--result-ttl-s 1: a finished job (and its Idempotency-Key) is gone a little after a
    second (that queued and running jobs stay is tests/unit/test_queue.c's)."""
    s = one_worker("--result-ttl-s", "1")
    c = s.client()
    key = f"idem-{uuid.uuid4()}"
    X = rows4(1, 130)
    body = {"model": "rowsum", "input": infer_body(X)}
    jid = check_accepted(c.post("/v1/jobs", json=body, headers={"Idempotency-Key": key}))
    assert c.wait_final(jid)["status"] == "succeeded"
    check_result(c, jid, rowsum(X), "rowsum", "before its retention ends")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        r = c.get(f"/v1/jobs/{jid}")
        if r.status_code == 404:
            break
        time.sleep(0.2)
    assert r.status_code == 404, f"a job finished 1 s ago is still there after 15 s: {r.text[:300]}"
    error_message(r)
    assert jid not in [j["id"] for j in c.list_all()[0]], "a removed job is still listed"
    # the key names no job any more: the same body makes a new one
    again = check_accepted(c.post("/v1/jobs", json=body, headers={"Idempotency-Key": key}))
    assert again != jid
    assert c.wait_final(again)["status"] == "succeeded"


def test_metrics(one_worker, gates):
    s = one_worker()
    c = s.client()
    gate = gates()
    gate.hold(c)
    ids = [c.submit_ok("rowsum", rows4(1, 500 + i)) for i in range(3)]
    text = c.metrics_text()
    for name, labels, want in (("inferd_jobs", {"state": "queued"}, 3),
                               ("inferd_jobs", {"state": "running"}, 1),
                               ("inferd_queue_depth", None, 3),
                               ("inferd_queue_backlog_per_worker", None, 3),
                               ("inferd_workers_busy", None, 1)):
        got = metric_value(text, name, labels)
        assert got == want, f"{name}{labels or ''} = {got} (expected {want}) while 3 wait behind 1"
    assert gate.release()
    for jid in ids:
        c.wait_final(jid)

    def settled():
        t = c.metrics_text()
        return t if (metric_value(t, "inferd_jobs", {"state": "succeeded"}) == 4 and
                     metric_value(t, "inferd_workers_busy") == 0) else None
    text = wait_for(settled, 30, "inferd_jobs{succeeded} 4 and inferd_workers_busy 0")
    assert metric_value(text, "inferd_queue_depth") == 0
    for h in ("inferd_job_queue_wait_seconds", "inferd_job_run_seconds"):
        n = metric_value(text, h + "_count", {"model": "rowsum"})
        assert n is not None and n >= 4, f"{h}_count{{model=rowsum}} = {n} after 4 jobs"
        assert metric_value(text, h + "_bucket", {"model": "rowsum", "le": "+Inf"}) == n


# ---------------------------------------------------------------------------
# webhooks
# ---------------------------------------------------------------------------

WEBHOOK_DEADLINE_S = 25


@pytest.fixture(scope="module")
def hooks(module_server_factory, repo, tmp_path_factory, queue_kind, fresh_queue):
    """One server (--workers 1, --webhook-secret) and a receiver; every scenario submitted
    at once so the tests share one delivery deadline."""
    recv = WebhookReceiver()
    models = tmp_path_factory.mktemp("hook-models")
    write_plugin_model(models, "rowsum", width=4)
    write_plugin_model(models, "rowsum_cb", width=4,
                       extra={"callback_url": recv.url + "/default/model"})
    data = tmp_path_factory.mktemp("hook-data")
    s = module_server_factory(models, *async_args(data, "--workers", "1", "--worker-batch", "1",
                                                  "--webhook-secret", WEBHOOK_SECRET,
                                                  queue=fresh_queue()),
                              tag=f"async-hooks-{queue_kind}")
    c = s.client()
    sc = {"recv": recv, "client": c}
    gate = Gate("rowsum")
    try:
        # the gate itself is cancelled while it runs
        sc["cancelled_running"] = gate.submit(c, callback_url=recv.url + "/ok/cancelled-running")
        c.wait_status(gate.id, "running", 30, "gate job to occupy the worker")
        sc["cancelled"] = c.submit_ok("rowsum", rows4(1, 600), callback_url=recv.url + "/ok/cancelled")
        r = c.session.delete(f"{s.url}/v1/jobs/{sc['cancelled']}", timeout=HTTP_TIMEOUT_S)
        assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text[:300]
        sc["expired"] = c.submit_ok("rowsum", rows4(1, 601), ttl_s=1,
                                    callback_url=recv.url + "/ok/expired")
        # the gate stops as soon as it is cancelled: only after the ttl passed
        wait_past(c.job(sc["expired"])["created_at"], 1.5, "the 1 s ttl to pass")
        r = c.session.delete(f"{s.url}/v1/jobs/{gate.id}", timeout=HTTP_TIMEOUT_S)
        assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text[:300]
        assert gate.release()
    finally:
        gate.defuse()
    sc["rows"] = {}
    sc["ok"] = []
    for i in range(20):
        X = rows4(2, 610 + i)
        jid = c.submit_ok("rowsum", X, callback_url=f"{recv.url}/ok/{i}")
        sc["ok"].append(jid)
        sc["rows"][jid] = X
    sc["failed"] = c.submit_ok("rowsum", poison_rows(), max_attempts=1,
                               callback_url=recv.url + "/ok/failed")
    sc["redrive"] = c.submit_ok("rowsum", poison_rows(), max_attempts=1,
                                callback_url=recv.url + "/ok/redrive")
    sc["flaky"] = c.submit_ok("rowsum", rows4(1, 640), callback_url=recv.url + "/flaky/one")
    sc["default"] = c.submit_ok("rowsum_cb", rows4(1, 641))
    # a failed job sent back with POST .../retry fails again: a second final state
    assert c.wait_final(sc["redrive"])["status"] == "failed"
    r = c.post(f"/v1/jobs/{sc['redrive']}/retry")
    assert r.status_code == 202, r.text[:300]
    sc["deadline"] = time.monotonic() + WEBHOOK_DEADLINE_S
    for jid in sc["ok"] + [sc["failed"], sc["flaky"], sc["default"], sc["expired"],
                           sc["cancelled_running"], sc["redrive"]]:
        c.wait_final(jid)
    yield sc
    recv.close()
    s.stop()


def _wait_hooks(sc, predicate, what, job=None):
    """Poll until predicate() is truthy or the shared webhook deadline passes."""
    while True:
        v = predicate()
        if v:
            return v
        if time.monotonic() > sc["deadline"]:
            got = [(r["path"], r["headers"].get("X-Inferd-Event-Id")) for r in sc["recv"].received()]
            extra = ""
            if job:
                extra = f"\njob {job} now: {sc['client'].job(sc[job])!r}"
            pytest.fail(f"webhooks: timed out waiting for {what}; receiver got {len(got)} "
                        f"POSTs (path, event id): {sorted(got)}{extra}")
        time.sleep(0.1)


def _check_signed(req):
    h = {k.lower(): v for k, v in req["headers"].items()}
    assert h.get("content-type", "").startswith("application/json"), h
    sig = h.get("x-inferd-signature", "")
    assert sig.startswith("sha256="), f"X-Inferd-Signature {sig!r}"
    want = hmac.new(WEBHOOK_SECRET.encode(), req["body"], hashlib.sha256).hexdigest()
    assert hmac.compare_digest(sig[len("sha256="):], want), \
        f"bad signature on {req['path']}: {sig!r}, HMAC of the raw body is {want}"
    body = json.loads(req["body"])
    assert h.get("x-inferd-event-id") == body.get("id"), \
        f"X-Inferd-Event-Id {h.get('x-inferd-event-id')!r} != body id {body.get('id')!r}"
    return body


def test_webhooks_signed_one_event_per_job(hooks):
    recv, c = hooks["recv"], hooks["client"]
    paths = {f"/ok/{i}": jid for i, jid in enumerate(hooks["ok"])}
    _wait_hooks(hooks, lambda: set(paths) <= {r["path"] for r in recv.received("/ok/")},
                "a POST for each of the 20 jobs")
    # a 2xx answer ends delivery: each job lists exactly the one attempt
    for jid in hooks["ok"]:
        _wait_hooks(hooks, lambda: c.job(jid)["notifications"], f"job {jid} notifications")
    events = {}
    for req in recv.received("/ok/"):
        if req["path"] not in paths:
            continue
        body = _check_signed(req)
        jid = paths[req["path"]]
        assert body["type"] == "job.succeeded", body
        assert body["job"]["id"] == jid and body["job"]["status"] == "succeeded", body["job"]
        X = hooks["rows"][jid]
        assert_close(output_array(body["result"], 2), rowsum(X), f"webhook result of {jid}")
        events.setdefault(jid, set()).add(body["id"])
    assert all(len(v) == 1 for v in events.values()), \
        f"jobs with more than one event id: { {k: v for k, v in events.items() if len(v) > 1} }"
    all_ids = [next(iter(v)) for v in events.values()]
    assert len(set(all_ids)) == 20, "event ids are not distinct across jobs"
    for jid in hooks["ok"]:
        notes = c.job(jid)["notifications"]
        assert len(notes) == 1, f"job {jid}: {notes!r}"
        n = notes[0]
        assert n["status_code"] == 200 and n["error"] in (None, ""), n
        assert n["event_id"] in events[jid], n
        parse_time(n["at"])


def _check_type_events(hooks, want):
    recv = hooks["recv"]
    _wait_hooks(hooks, lambda: set(want) <= {r["path"] for r in recv.received("/ok/")},
                " and ".join(f"{typ} ({path})" for path, (_, typ, _) in want.items()),
                job=next(iter(want.values()))[2] if len(want) == 1 else None)
    for req in recv.received("/ok/"):
        if req["path"] in want:
            body = _check_signed(req)
            status, typ, key = want[req["path"]]
            assert body["type"] == typ and body["job"]["status"] == status, body
            assert hooks[key] == body["job"]["id"], body
            assert "result" not in body or body["result"] is None, body


def test_webhook_failed_expired_and_cancelled_running(hooks):
    _check_type_events(hooks, {
        "/ok/expired": ("expired", "job.expired", "expired"),
        "/ok/failed": ("failed", "job.failed", "failed"),
        "/ok/cancelled-running": ("cancelled", "job.cancelled", "cancelled_running")})


def test_webhook_cancelled_while_queued(hooks):
    _check_type_events(hooks, {"/ok/cancelled": ("cancelled", "job.cancelled", "cancelled")})


def test_webhook_model_default_callback_url(hooks):
    recv = hooks["recv"]
    _wait_hooks(hooks, lambda: recv.received("/default/model"), "the model-default callback")
    body = _check_signed(recv.received("/default/model")[0])
    assert body["type"] == "job.succeeded" and body["job"]["id"] == hooks["default"], body


def test_webhook_retried_until_2xx(hooks):
    recv, c = hooks["recv"], hooks["client"]
    jid = hooks["flaky"]
    notes = _wait_hooks(hooks, lambda: (lambda n: n if len(n) >= 3 else None)(
        c.job(jid)["notifications"]), "3 delivery attempts in the job's notifications")
    assert [n["status_code"] for n in notes] == [500, 500, 200], notes
    assert len({n["event_id"] for n in notes}) == 1, f"one event, retried: {notes!r}"
    posts = recv.received("/flaky/one")
    assert len(posts) == 3, f"receiver got {len(posts)} POSTs"
    ids = {_check_signed(p)["id"] for p in posts}
    assert ids == {notes[0]["event_id"]}, (ids, notes)


def test_webhook_again_after_redrive(hooks):
    """A job.failed webhook for each time the job ends: first failure and, after
    POST /v1/jobs/{id}/retry, the second one (its job snapshot says attempts 2)."""
    recv, c = hooks["recv"], hooks["client"]
    jid = hooks["redrive"]
    assert c.job(jid)["attempts"] == 2 and c.job(jid)["status"] == "failed"

    def bodies():
        return [_check_signed(r) for r in recv.received("/ok/redrive")]
    _wait_hooks(hooks, lambda: any(b["job"].get("attempts") == 2 for b in bodies()),
                "a job.failed webhook for the redriven job's second failure (attempts 2)",
                job="redrive")
    for b in bodies():
        assert b["type"] == "job.failed" and b["job"]["id"] == jid, b


# ---------------------------------------------------------------------------
# issue 13: a job's error quotes nothing of the file it read
# ---------------------------------------------------------------------------


def test_input_location_errors_quote_nothing_of_the_file(client, tmp_path):
    """A job whose input_location names a text file that is no request (a copy of
    /etc/passwd) fails with an error naming the line, column and problem but none of the
    file's words; so do files that are requests but name unknown things. The same request
    sent in the body may be quoted back: the client sent it."""
    from conftest import SECRET_WORD, assert_quotes_nothing_of, passwd_copy
    passwd = tmp_path / "passwd"
    text = passwd_copy(passwd)
    jid = client.submit_ok("rowsum", input_location=f"file://{passwd}")
    job = client.wait_final(jid, what="a job reading a copy of /etc/passwd")
    assert job["status"] == "failed" and job["attempts"] == 1, job
    assert "line 1 column" in job["error"], job["error"]
    assert_quotes_nothing_of(text, job["error"], "the job's error")

    X = rows4(2, seed=140)
    requests_ = {
        "unknown input name": infer_body(X, name=SECRET_WORD),
        "unknown datatype": {"inputs": [dict(infer_body(X)["inputs"][0],
                                             datatype=SECRET_WORD.upper())]},
        "unknown output name": infer_body(X, outputs=[{"name": SECRET_WORD}]),
        "duplicate key": None,
    }
    for what, body in requests_.items():
        path = tmp_path / f"{what.replace(' ', '-')}.json"
        if body is None:
            path.write_text('{"inputs": [], "%s": 1, "%s": 2}' % (SECRET_WORD, SECRET_WORD))
        else:
            path.write_text(json.dumps(body))
        jid = client.submit_ok("rowsum", input_location=f"file://{path}")
        job = client.wait_final(jid, what=what)
        assert job["status"] == "failed" and job["error"], f"{what}: {job!r}"
        assert SECRET_WORD.lower() not in job["error"].lower(), f"{what}: {job['error']!r}"
        if body is not None:   # the same request inline: the client's own words come back
            r = client.submit("rowsum", input=body)
            assert r.status_code in (400, 422), f"{what} inline: {r.status_code} {r.text[:300]}"
            assert SECRET_WORD.lower() in error_message(r).lower(), f"{what}: {r.text[:300]}"


def test_id_with_nul_character_through_the_queue(client):
    """An "id" holding \\u0000, sent with Prefer: respond-async or inline in POST /v1/jobs, is
    kept through the queue and echoed back escaped in the result."""
    X = rows4(2, seed=141)
    body = infer_body(X, id="a\u0000b")
    r = client.post("/v2/models/rowsum/infer", json=body, headers={"Prefer": "respond-async"})
    jids = [check_accepted(r, "Prefer: respond-async")]
    jids.append(client.submit_ok("rowsum", input=body))
    for jid in jids:
        job = client.wait_final(jid)
        assert job["status"] == "succeeded", job
        r = client.get(f"/v1/jobs/{jid}/result")
        assert r.status_code == 200 and b'"id":"a\\u0000b"' in r.content, r.content[:300]
        assert r.json()["id"] == "a\x00b"
        assert_close(output_array(r.json(), 2), rowsum(X), "result of a job with a NUL in its id")
    r = client.submit("rowsum", input=body, callback_url="http://127.0.0.1:9/a\u0000b")
    assert r.status_code == 400 and "callback_url" in error_message(r), r.text
