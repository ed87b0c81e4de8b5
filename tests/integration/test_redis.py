"""The job queue on Redis shared by separate processes: ``inferd serve --queue redis://...
--workers 0`` accepts and answers, ``inferd worker --queue redis://...`` processes run the
jobs. Load spread over workers, a worker killed with ``kill -9`` (its leases run out and
others finish its jobs once), Redis itself killed and restarted mid-run, start-up errors,
the worker's HTTP port, SIGTERM, the job API across processes, and webhooks.

Each test has its own redis-server (``redis_server``: AOF, fsync always). Everything waits
by polling against a deadline; nothing asserts on elapsed time. test_async.py and
test_async_crash.py also run on Redis, with serve running its own workers.
"""
import hashlib
import hmac
import itertools
import json
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from conftest import (HTTP_TIMEOUT_S, INFERD_BIN, JOB_FINAL_STATES, RedisClient, assert_close,
                      async_args, check_accepted, error_message, free_port, infer_body,
                      metric_value, output_array, parse_time, wait_for, write_plugin_model)

SECRET = "s3cret"
SHORT_LEASE_S = 2        # the lease of the models killed workers hold ("sleepy", "binary_short")
SUBMIT_CLIENTS = 16


@pytest.fixture(scope="module")
def repo(trained, tmp_path_factory):
    repo = tmp_path_factory.mktemp("redis-models")
    trained["binary"].install(repo)
    trained["binary"].install(repo, name="binary_short",
                              config={"backend": "xgboost", "lease_timeout_s": SHORT_LEASE_S})
    write_plugin_model(repo, "rowsum", width=4)
    # one job per backend call, several at once: a row [-998, ms, ...] sleeps ms in the plugin
    write_plugin_model(repo, "sleepy", width=4, extra={
        "lease_timeout_s": SHORT_LEASE_S, "max_batch_size": 1, "instances": 4})
    return repo


@pytest.fixture
def split(redis_server, server_factory, worker_factory, repo, tmp_path):
    """``start(n_workers, *worker_args, serve_args=())`` -> ``(serve, [workers], queue_url)``:
    ``inferd serve --workers 0`` and ``n_workers`` ``inferd worker`` processes on one fresh
    database of the test's redis-server (which is stopped after them)."""
    counter = itertools.count()

    def start(n_workers=1, *worker_args, serve_args=()):
        url = redis_server.fresh_url()
        n = next(counter)
        serve = server_factory(repo, *async_args(tmp_path / f"data-{n}", "--workers", "0",
                                                 *serve_args, queue=url), tag="serve")
        workers = [worker_factory(repo, url, *worker_args, tag=f"worker{chr(ord('A') + i)}")
                   for i in range(n_workers)]
        return serve, workers, url
    return start


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def rowsum(X):
    return np.asarray(X, dtype=np.float32).sum(axis=1, dtype=np.float32).astype(np.float64)


def sleep_rows(n, ms):
    """Rows of the "sleepy" model: each sleeps ``ms`` and sums to -998 + ms + i."""
    X = np.zeros((n, 4), dtype=np.float32)
    X[:, 0] = -998.0
    X[:, 1] = ms
    X[:, 2] = np.arange(n)
    return X


def submit_all(url, bodies, clients=SUBMIT_CLIENTS):
    """POST /v1/jobs each body from ``clients`` threads; every answer must be a 202."""
    local = threading.local()

    def one(body):
        if not hasattr(local, "s"):
            local.s = requests.Session()
        return check_accepted(local.s.post(url + "/v1/jobs", json=body, timeout=HTTP_TIMEOUT_S),
                              f"POST /v1/jobs model={body.get('model')}")
    with ThreadPoolExecutor(clients) as ex:
        return list(ex.map(one, bodies))


def one_row_jobs(model, X, **fields):
    return [dict({"model": model, "input": infer_body(X[i:i + 1])}, **fields)
            for i in range(X.shape[0])]


def wait_counts(client, n, deadline_s, what):
    """Until the inferd_jobs gauge says ``n`` jobs are final and none queued or running."""
    def settled():
        counts = client.job_counts()
        final = sum(counts[s] or 0 for s in JOB_FINAL_STATES)
        return counts if final == n and not counts["queued"] and not counts["running"] else None
    return wait_for(settled, deadline_s, what)


def fetch_results(url, ids, n_rows=1, threads=8):
    """{id: output array} from GET /v1/jobs/{id}/result, all 200."""
    local = threading.local()

    def one(jid):
        if not hasattr(local, "s"):
            local.s = requests.Session()
        r = local.s.get(f"{url}/v1/jobs/{jid}/result", timeout=HTTP_TIMEOUT_S)
        assert r.status_code == 200, f"result of {jid}: HTTP {r.status_code}: {r.text[:200]}"
        return output_array(r.json(), n_rows)
    with ThreadPoolExecutor(threads) as ex:
        return dict(zip(ids, ex.map(one, ids)))


def runs(server, model):
    """The job attempts this process ran for ``model``: its inferd_job_run_seconds count."""
    return metric_value(server.client().metrics_text(), "inferd_job_run_seconds_count",
                        {"model": model}) or 0


def busy(server):
    return metric_value(server.client().metrics_text(), "inferd_workers_busy") or 0


def check_streams_clean(url):
    """Nothing left on the priority streams, nothing pending in the consumer group."""
    with RedisClient.from_url(url) as r:
        for p in range(10):
            stream = f"inferd:q:{p}"
            length, pending = r.execute("XLEN", stream), r.execute("XPENDING", stream,
                                                                   "workers")[0]
            assert (length, pending) == (0, 0), \
                f"{stream}: {length} entries, {pending} pending after every job ended"


def wait_past(created_at, seconds, what):
    import datetime as dt
    target = parse_time(created_at) + dt.timedelta(seconds=seconds)
    wait_for(lambda: dt.datetime.now(dt.timezone.utc) > target, seconds + 30, what)


# ---------------------------------------------------------------------------
# many workers
# ---------------------------------------------------------------------------

N_SHARED = 5000


def test_three_workers_share_5000_jobs(split, trained):
    m = trained["binary"]
    serve, workers, _ = split(3, "--workers", "2", "--worker-batch", "16")
    c = serve.client()
    X = m.rows(N_SHARED, seed=901)
    ids = submit_all(serve.url, one_row_jobs("binary", X))
    assert len(set(ids)) == N_SHARED
    counts = wait_counts(c, N_SHARED, 240, f"{N_SHARED} jobs final (inferd_jobs on serve)")
    assert counts["succeeded"] == N_SHARED, counts
    jobs, _ = c.list_all(status="succeeded")
    assert {j["id"] for j in jobs} == set(ids), f"{len(jobs)} succeeded jobs listed"
    again = [j for j in jobs if j["attempts"] != 1]
    assert not again, f"{len(again)} jobs ran more than once (no worker died): {again[:3]}"
    got = fetch_results(serve.url, ids)
    assert_close(np.array([got[j][0] for j in ids]), m.expected(X),
                 f"{N_SHARED} jobs run by 3 worker processes (job i -> row i)")
    # each worker process ran a share, and together each job exactly once
    per_worker = [runs(w, "binary") for w in workers]
    assert all(n > 0 for n in per_worker), f"job runs per worker process: {per_worker}"
    assert sum(per_worker) == N_SHARED, f"job runs per worker process: {per_worker}"
    assert runs(serve, "binary") == 0, "serve --workers 0 ran jobs"
    print(f"\njob runs per worker process: {per_worker}")


def test_kill9_worker_jobs_reclaimed_and_run_once(split):
    n, ms = 24, 1200
    serve, (a, b, c3), url = split(3, "--workers", "2", "--worker-batch", "1")
    c = serve.client()
    X = sleep_rows(n, ms)
    ids = submit_all(serve.url, one_row_jobs("sleepy", X))
    wait_for(lambda: busy(a) >= 1, 60, "worker A to run a job")
    queued = c.job_counts()["queued"]
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(timeout=30)
    assert queued and queued > 0, "precondition: no job was left queued when A was killed"
    counts = wait_counts(c, n, 120, f"all {n} jobs final after worker A's kill -9 "
                         f"(its leases last {SHORT_LEASE_S} s)")
    assert counts["succeeded"] == n, counts
    jobs = {j: c.job(j) for j in ids}
    attempts = sorted(job["attempts"] for job in jobs.values())
    assert all(job["status"] == "succeeded" for job in jobs.values()), jobs
    assert set(attempts) <= {1, 2}, f"attempts: {attempts}"
    # A ran at most 2 jobs at once (--workers 2 --worker-batch 1), and at least one at the kill
    again = [j for j, job in jobs.items() if job["attempts"] == 2]
    assert 1 <= len(again) <= 2, \
        f"{len(again)} jobs ran twice; worker A held 1 or 2 when killed: {attempts}"
    got = fetch_results(serve.url, ids)
    assert_close(np.array([got[j][0] for j in ids]), rowsum(X), "results after kill -9 of A")
    assert sum(runs(w, "sleepy") for w in (b, c3)) >= len(again)
    logs = serve.log() + b.log() + c3.log()
    assert "leases expired; jobs reclaimed" in logs, "no process logged the reclaim"
    check_streams_clean(url)


def test_sigterm_worker_finishes_its_running_jobs(split, worker_factory, repo):
    serve, (a,), url = split(1, "--workers", "2", "--worker-batch", "1")
    c = serve.client()
    X = sleep_rows(4, 1500)
    ids = submit_all(serve.url, one_row_jobs("sleepy", X))
    wait_for(lambda: busy(a) == 2, 60, "worker A to run 2 jobs at once")
    running = [j for j in ids if c.job(j)["status"] == "running"]
    assert len(running) == 2, [c.job(j) for j in ids]
    a.signal(signal.SIGTERM)
    rc = a.wait_exit()
    assert rc == 0, f"inferd worker exited {rc} after SIGTERM\n{a.log_tail()}"
    assert 'msg="stopped"' in a.log(), a.log_tail()
    # the rest (and any job A did not finish, once its lease ends) run on another worker
    worker_factory(repo, url, "--workers", "2", tag="workerB")
    wait_counts(c, 4, 60, "all 4 jobs final after worker A's SIGTERM")
    for jid in ids:
        job = c.job(jid)
        assert job["status"] == "succeeded", job
    for jid in running:
        assert c.job(jid)["attempts"] in (1, 2), c.job(jid)
    got = fetch_results(serve.url, ids)
    assert_close(np.array([got[j][0] for j in ids]), rowsum(X), "results around SIGTERM")
    check_streams_clean(url)


# ---------------------------------------------------------------------------
# Redis down and back
# ---------------------------------------------------------------------------


def outage_submitter(url, n, body_of, stop):
    """A body for jobs 0..n-1 submitted by however many threads run the returned function,
    until `stop`: (accepted {row: id}, the 503 answers, anything else, the function)."""
    accepted, unavailable, bad = {}, [], []
    counter = itertools.count()
    lock = threading.Lock()

    def submitter():
        s = requests.Session()
        while not stop.is_set():
            i = next(counter)
            if i >= n:
                return
            try:
                r = s.post(url + "/v1/jobs", json=body_of(i), timeout=HTTP_TIMEOUT_S)
            except requests.RequestException as exc:
                bad.append(f"row {i}: {exc!r}")
                s = requests.Session()
                continue
            with lock:
                if r.status_code == 202:
                    accepted[i] = check_accepted(r, f"row {i}")
                elif r.status_code == 503:
                    unavailable.append(r)
                else:
                    bad.append(f"row {i}: HTTP {r.status_code}: {r.text[:200]}")
            if r.status_code == 503:
                stop.wait(0.05)
    return accepted, unavailable, bad, submitter


def check_outage_answers(bad, unavailable):
    """Every answer was a 202 or a 503, and each 503 said when to retry, in JSON."""
    assert not bad, f"{len(bad)} submissions neither 202 nor 503: {bad[:5]}"
    for r in unavailable:
        ra = r.headers.get("Retry-After")
        assert ra is not None and ra.strip().isdigit() and int(ra) >= 1, \
            f"503 with Retry-After {ra!r}: {r.text[:200]}"
        error_message(r)


def test_redis_killed_and_restarted_mid_run(split, redis_server, trained):
    """kill -9 of redis-server (AOF, fsync always) while jobs are submitted and run:
    every 202 ends succeeded, the outage answers 503 + Retry-After, nobody restarts."""
    m = trained["binary"]
    serve, workers, url = split(2, "--workers", "2", "--worker-batch", "8")
    pids = [p.proc.pid for p in [serve, *workers]]
    X = m.rows(20000, seed=902)
    expected = m.expected(X)
    stop = threading.Event()
    accepted, unavailable, bad, submitter = outage_submitter(
        serve.url, len(X), lambda i: {"model": "binary_short", "input": infer_body(X[i:i + 1])},
        stop)
    threads = [threading.Thread(target=submitter, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(accepted) >= 300, 60, "300 jobs accepted before the kill")
        redis_server.kill9()
        wait_for(lambda: len(unavailable) >= 5, 60, "submissions to get 503 while Redis is down")
        redis_server.restart()
        n_back = len(accepted)
        wait_for(lambda: len(accepted) >= n_back + 300, 60,
                 "300 more jobs accepted after Redis came back")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    check_outage_answers(bad, unavailable)
    for r in unavailable:
        assert "Location" not in r.headers, f"a 503 with a Location: {dict(r.headers)}"
    # every accepted job ends succeeded, with its row's prediction
    c = serve.client()
    want = {jid: i for i, jid in accepted.items()}
    wait_for(lambda: set(want) <= {j["id"] for j in c.list_all(status="succeeded")[0]}, 120,
             f"all {len(want)} accepted jobs to succeed (lease {SHORT_LEASE_S} s)")
    got = fetch_results(serve.url, list(want))
    assert_close(np.array([got[j][0] for j in want]), expected[list(want.values())],
                 "results of the jobs accepted around the Redis restart")
    # the same processes carry on: a new job and a long-poll on it (pub/sub re-subscribed)
    assert [p.proc.pid for p in [serve, *workers]] == pids and \
        all(p.alive() for p in [serve, *workers]), "a process died or was restarted"
    jid = c.submit_ok("binary_short", X[:2])
    r = c.get(f"/v1/jobs/{jid}?wait=30", timeout=60)
    assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text[:300]
    print(f"\n{len(accepted)} accepted, {len(unavailable)} answered 503 during the outage")


WEBHOOK_JOBS = 600   # submitted at most, by WEBHOOK_CLIENTS threads
WEBHOOK_CLIENTS = 8


def test_redis_killed_with_webhooks_pending(split, redis_server, webhook_receiver):
    """kill -9 of redis-server while jobs with a callback_url are submitted, run and their
    webhooks sent (issue 13 item 1: the API process and both workers used to abort with
    ``free(): invalid pointer`` taking webhooks whose body could not be built). Every
    process stays up, the outage answers 503 + Retry-After, and after the restart on the
    same AOF every accepted job ends succeeded once, with one webhook event."""
    recv = webhook_receiver
    serve, workers, url = split(2, "--workers", "2", "--worker-batch", "8",
                                "--webhook-secret", SECRET,
                                serve_args=("--webhook-secret", SECRET))
    procs = [serve, *workers]
    pids = [p.proc.pid for p in procs]
    X = np.arange(WEBHOOK_JOBS * 4, dtype=np.float32).reshape(WEBHOOK_JOBS, 4)
    stop = threading.Event()
    accepted, unavailable, bad, submitter = outage_submitter(
        serve.url, WEBHOOK_JOBS,
        lambda i: {"model": "rowsum", "input": infer_body(X[i:i + 1]),
                   "callback_url": f"{recv.url}/ok/{i}"},
        stop)
    threads = [threading.Thread(target=submitter, daemon=True) for _ in range(WEBHOOK_CLIENTS)]
    for t in threads:
        t.start()
    try:
        # mid-burst: jobs queued, running and finished, their webhooks in the outbox
        wait_for(lambda: len(accepted) >= 60 and len(recv.received("/ok/")) >= 5, 60,
                 "60 jobs accepted and 5 webhooks delivered before the kill")
        redis_server.kill9()
        wait_for(lambda: len(unavailable) >= 5, 60, "submissions to get 503 while Redis is down")
        assert all(p.alive() for p in procs), "a process died while Redis was down"
        redis_server.restart()
        n_back = len(accepted)
        wait_for(lambda: len(accepted) >= n_back + 60 or not any(t.is_alive() for t in threads),
                 60, "60 more jobs accepted after Redis came back (or every row submitted)")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    check_outage_answers(bad, unavailable)
    c = serve.client()
    want = {jid: i for i, jid in accepted.items()}
    # (a lease whose answer Redis never sent is handed back on the worker's next lease, so
    # no job waits out its 300 s lease)
    wait_for(lambda: set(want) <= {j["id"] for j in c.list_all(status="succeeded")[0]}, 120,
             f"all {len(want)} accepted jobs to succeed")

    def events():
        """{row: {event ids}} of the job.succeeded webhooks received."""
        got = {}
        for req in recv.received("/ok/"):
            body = check_signed(req)
            assert body["type"] == "job.succeeded", body
            got.setdefault(int(req["path"].rsplit("/", 1)[1]), set()).add(
                (body["job"]["id"], body["id"]))
        return got
    wait_for(lambda: set(accepted) <= set(events()), 120,
             f"a webhook for each of the {len(accepted)} accepted jobs")
    for i, evs in events().items():
        if i in accepted:
            assert len(evs) == 1 and next(iter(evs))[0] == accepted[i], \
                f"row {i}: job {accepted[i]} ended more than once or under another id: {evs}"
    assert [p.proc.pid for p in procs] == pids and all(p.alive() for p in procs), \
        "a process died or was restarted"
    logs = "".join(p.log() for p in procs)
    assert "free(): invalid pointer" not in logs and "AddressSanitizer" not in logs
    # an outage is logged when it starts (and once a minute), not at every retry
    for p in procs:
        lease_lines = p.log().count("lease failed")
        assert lease_lines <= 4, f"{p.tag}: {lease_lines} 'lease failed' lines in one outage"
    # and the same processes carry on
    jid = c.submit_ok("rowsum", X[:1], callback_url=f"{recv.url}/after/0")
    assert c.wait_final(jid)["status"] == "succeeded"
    wait_for(lambda: recv.received("/after/0"), 30, "the webhook of a job after the restart")
    print(f"\n{len(accepted)} accepted, {len(unavailable)} answered 503 during the outage, "
          f"{len(recv.received('/ok/'))} webhooks received")


def test_unreachable_redis_at_start_up(repo, tmp_path):
    closed = free_port()
    for command in ("serve", "worker"):
        cmd = [str(INFERD_BIN), command, "--models", str(repo), "--port", str(free_port()),
               "--queue", f"redis://127.0.0.1:{closed}/0"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path)
        errors = [ln for ln in p.stderr.splitlines() if "level=error" in ln]
        assert p.returncode != 0, f"{command}: exit 0 with Redis unreachable\n{p.stderr}"
        assert len(errors) == 1 and f"127.0.0.1:{closed}" in errors[0], \
            f"{command}: expected one error line naming 127.0.0.1:{closed}:\n{p.stderr}"


def test_worker_needs_a_redis_queue(repo, tmp_path):
    for extra in ([], ["--queue", "sqlite"]):
        cmd = [str(INFERD_BIN), "worker", "--models", str(repo), "--port", str(free_port()),
               *extra]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert p.returncode == 2, f"inferd worker {extra}: exit {p.returncode}\n{p.stderr}"
        assert "--queue redis://" in p.stderr, p.stderr


# ---------------------------------------------------------------------------
# the worker's HTTP port
# ---------------------------------------------------------------------------


def test_worker_port_serves_only_metrics_and_health(split):
    _, (w,), _ = split(1, "--workers", "3")
    c = w.client()
    for path in ("/metrics", "/v2/health/live", "/v2/health/ready"):
        r = c.get(path)
        assert r.status_code == 200, f"worker GET {path}: HTTP {r.status_code}: {r.text[:200]}"
    assert metric_value(c.metrics_text(), "inferd_workers") == 3
    body = infer_body(np.ones((1, 4), dtype=np.float32))
    for method, path in (("GET", "/v2/models/rowsum"), ("GET", "/v2/models/rowsum/ready"),
                         ("POST", "/v2/models/rowsum/infer"),
                         ("POST", "/v1/models/rowsum:predict"), ("GET", "/v1/jobs"),
                         ("POST", "/v1/jobs"), ("GET", "/v1/jobs/0123abc"),
                         ("DELETE", "/v1/jobs/0123abc"), ("GET", "/v1/batch-jobs"),
                         ("GET", "/nope")):
        r = c.session.request(method, c.url + path, timeout=HTTP_TIMEOUT_S,
                              json=body if method == "POST" else None)
        assert r.status_code == 404, f"worker {method} {path}: HTTP {r.status_code}: {r.text[:200]}"
        error_message(r)
    assert c.get("/metrics").status_code == 200, "/metrics after the 404s"


# ---------------------------------------------------------------------------
# the job API across processes
# ---------------------------------------------------------------------------


def one_at_a_time(split, *serve_args, worker_args=()):
    """serve --workers 0 and one worker running one job at a time."""
    serve, (w,), url = split(1, "--workers", "1", "--worker-batch", "1", *worker_args,
                             serve_args=serve_args)
    return serve, w, url


def test_idempotency_key_across_processes(split):
    serve, _, _ = one_at_a_time(split)
    c = serve.client()
    X = np.arange(8, dtype=np.float32).reshape(2, 4)
    body = {"model": "rowsum", "input": infer_body(X), "priority": 4}
    key = {"Idempotency-Key": "redis-idem-1"}
    jid = check_accepted(c.post("/v1/jobs", json=body, headers=key), "first submission")
    r = c.post("/v1/jobs", json=body, headers=key)
    assert r.status_code == 200 and r.json()["id"] == jid, f"same key: {r.status_code} {r.text[:200]}"
    r = c.post("/v1/jobs", json=dict(body, priority=5), headers=key)
    assert r.status_code == 409, f"same key, other body: HTTP {r.status_code}: {r.text[:200]}"
    error_message(r)
    assert c.wait_final(jid)["status"] == "succeeded"
    r = c.post("/v1/jobs", json=body, headers=key)
    assert r.status_code == 200 and r.json()["id"] == jid and \
        r.json()["status"] == "succeeded", f"same key once finished: {r.text[:300]}"
    other = check_accepted(c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "other"}))
    assert other != jid and c.wait_final(other)["status"] == "succeeded"
    r = c.get(f"/v1/jobs/{jid}/result")
    assert r.status_code == 200, r.text[:300]
    assert_close(output_array(r.json(), 2), rowsum(X), "idempotent job's result")


def test_cancel_queued_job_across_processes(split, gates):
    serve, w, _ = one_at_a_time(split)
    c = serve.client()
    gate = gates()
    gate.hold(c)
    jid = c.submit_ok("rowsum", np.ones((1, 4), dtype=np.float32))
    assert c.job(jid)["status"] == "queued"
    r = c.session.delete(f"{serve.url}/v1/jobs/{jid}", timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text[:300]
    assert gate.release()
    assert c.wait_final(gate.id)["status"] == "succeeded"
    after = c.job(jid)
    assert after["status"] == "cancelled" and after["attempts"] == 0 and \
        after["started_at"] is None, f"the worker process ran a cancelled job: {after!r}"
    assert runs(w, "rowsum") == 1, "the worker ran more than the gate job"


def test_ttl_expiry_across_processes(split, gates):
    serve, _, _ = one_at_a_time(split, "--job-ttl-s", "1")
    c = serve.client()
    gate = gates()
    gate.submit(c, ttl_s=3600)
    c.wait_status(gate.id, "running", 30, "gate job to occupy the worker process")
    own = c.submit_ok("rowsum", np.ones((1, 4), dtype=np.float32), ttl_s=1)
    default = c.submit_ok("rowsum", np.ones((1, 4), dtype=np.float32))
    keep = c.submit_ok("rowsum", np.ones((1, 4), dtype=np.float32), ttl_s=3600)
    wait_past(c.job(default)["created_at"], 1.5, "the jobs' 1 s ttl to pass")
    assert gate.release()
    for jid, what in ((own, "ttl_s=1"), (default, "--job-ttl-s 1")):
        job = c.wait_final(jid, what=what)
        assert job["status"] == "expired" and job["attempts"] == 0, f"{what}: {job!r}"
    assert c.wait_final(keep)["status"] == "succeeded"
    listed = {j["id"] for j in c.list_all(status="expired")[0]}
    assert listed == {own, default}, f"GET /v1/jobs?status=expired: {listed}"


def test_result_ttl_removes_finished_jobs(split):
    serve, _, _ = one_at_a_time(split, "--result-ttl-s", "2",
                                worker_args=("--result-ttl-s", "2"))
    c = serve.client()
    key = {"Idempotency-Key": "kept-2s"}
    body = {"model": "rowsum", "input": infer_body(np.ones((1, 4), dtype=np.float32))}
    jid = check_accepted(c.post("/v1/jobs", json=body, headers=key))
    assert c.wait_final(jid)["status"] == "succeeded"
    wait_for(lambda: c.get(f"/v1/jobs/{jid}").status_code == 404, 30,
             "the finished job to be gone after --result-ttl-s 2")
    r = c.get(f"/v1/jobs/{jid}/result")
    assert r.status_code == 404, f"result after the retention: HTTP {r.status_code}"
    error_message(r)
    assert jid not in {j["id"] for j in c.list_all()[0]}, "an expired job is still listed"
    # its idempotency key no longer pins it: the same request is a new job
    again = check_accepted(c.post("/v1/jobs", json=body, headers=key), "same key after")
    assert again != jid and c.wait_final(again)["status"] == "succeeded"


def test_result_ttl_leaves_no_keys_of_the_job(split):
    serve, _, url = one_at_a_time(split, "--result-ttl-s", "1",
                                  worker_args=("--result-ttl-s", "1"))
    c = serve.client()
    key = "short-lived-key"
    jid = c.submit_ok("rowsum", np.ones((1, 4), dtype=np.float32),
                      headers={"Idempotency-Key": key})
    assert c.wait_final(jid)["status"] == "succeeded"
    wait_for(lambda: c.get(f"/v1/jobs/{jid}").status_code == 404, 30,
             "the finished job to be gone after --result-ttl-s 1")
    with RedisClient.from_url(url) as r:
        left = [k.decode() for k in r.scan_keys("inferd:*")
                if jid.encode() in k or key.encode() in k]
    assert not left, f"keys of job {jid} left after its retention: {left}"


def test_long_poll_woken_by_a_worker_process(split, gates):
    """?wait=60 on serve answers when another process finishes the job (pub/sub); the
    client gives up after 45 s, so an answer only at the poll's deadline fails."""
    serve, _, _ = one_at_a_time(split)
    c = serve.client()
    gate = gates()
    gate.hold(c)
    X = np.arange(4, dtype=np.float32).reshape(1, 4)
    jid = c.submit_ok("rowsum", X)
    out = {}

    def poll(key, job_id):
        try:
            out[key] = requests.get(f"{serve.url}/v1/jobs/{job_id}?wait=60", timeout=45)
        except Exception as exc:  # noqa: BLE001 - reported below
            out[key] = exc
    threads = [threading.Thread(target=poll, args=(k, j), daemon=True)
               for k, j in (("job", jid), ("gate", gate.id))]
    for t in threads:
        t.start()
    assert c.job(jid)["status"] == "queued"
    assert gate.release()
    for t in threads:
        t.join(timeout=120)
    for key in ("gate", "job"):
        r = out.get(key)
        assert isinstance(r, requests.Response), \
            f"GET ?wait=60 on the {key} job: no answer within 45 s after the job ended: {r!r}"
        assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text[:300]


# ---------------------------------------------------------------------------
# webhooks
# ---------------------------------------------------------------------------


def check_signed(req):
    h = {k.lower(): v for k, v in req["headers"].items()}
    want = hmac.new(SECRET.encode(), req["body"], hashlib.sha256).hexdigest()
    assert hmac.compare_digest(h.get("x-inferd-signature", ""), "sha256=" + want), \
        f"bad signature on {req['path']}: {h.get('x-inferd-signature')!r}"
    body = json.loads(req["body"])
    assert h.get("x-inferd-event-id") == body["id"], (h, body["id"])
    return body


def test_webhook_of_a_worker_process_job_delivered_once(split, webhook_receiver):
    recv = webhook_receiver
    serve, workers, url = split(2, "--workers", "1", "--webhook-secret", SECRET,
                                serve_args=("--webhook-secret", SECRET))
    c = serve.client()
    rows = {}
    for i in range(10):
        X = np.full((1, 4), i, dtype=np.float32)
        rows[c.submit_ok("rowsum", X, callback_url=f"{recv.url}/ok/{i}")] = (i, X)
    for jid in rows:
        assert c.wait_final(jid)["status"] == "succeeded"
    notes = {jid: wait_for(lambda: c.job(jid)["notifications"], 30,
                           f"job {jid}'s webhook attempt to be recorded") for jid in rows}
    assert sum(runs(w, "rowsum") for w in workers) == 10 and runs(serve, "rowsum") == 0
    for jid, (i, X) in rows.items():
        posts = recv.received(f"/ok/{i}")
        assert len(posts) == 1, f"job {jid}: {len(posts)} POSTs"
        body = check_signed(posts[0])
        assert body["type"] == "job.succeeded" and body["job"]["id"] == jid, body
        assert_close(output_array(body["result"], 1), rowsum(X), f"webhook result of {jid}")
        assert len(notes[jid]) == 1 and notes[jid][0]["status_code"] == 200, notes[jid]
        assert notes[jid][0]["event_id"] == body["id"], notes[jid]
    with RedisClient.from_url(url) as r:
        assert r.execute("ZCARD", "inferd:outbox") == 0, "webhooks left in the outbox"


BURST = 200
BURST_DEADLINE_S = 15   # the deliveries take ~1 s (64 at once, 0.3 s each)
@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_webhook_burst_is_not_held_back(kind, redis_server, server_factory, repo, tmp_path,
                                        webhook_receiver):
    """200 jobs end at once and their receiver answers slowly, so deliveries overlap:
    each is sent within the deadline (SQLite shows the deadline is ample)."""
    recv = webhook_receiver
    queue = "sqlite" if kind == "sqlite" else redis_server.fresh_url()
    s = server_factory(repo, *async_args(tmp_path / "data", "--workers", "2",
                                         "--webhook-secret", SECRET, queue=queue))
    X = np.ones((BURST, 4), dtype=np.float32)
    submit_all(s.url, [dict(b, callback_url=f"{recv.url}/slow/{i}")
                       for i, b in enumerate(one_row_jobs("rowsum", X))])
    wait_counts(s.client(), BURST, 60, f"{BURST} jobs final")

    def sent():
        return len({r["path"] for r in recv.received("/slow/")})
    end = time.monotonic() + BURST_DEADLINE_S
    while sent() < BURST and time.monotonic() < end:
        time.sleep(0.1)
    assert sent() == BURST, \
        f"{sent()} of {BURST} webhooks sent within {BURST_DEADLINE_S} s of the jobs' end"


def test_autoscaling_grows_under_backlog_and_shrinks_when_idle(split):
    """--min-workers 0 --max-workers 3: no worker thread while idle, more while a backlog
    waits, back to none after --scale-down-delay-s of idleness; every job succeeds."""
    serve, (w,), _ = split(1, "--min-workers", "0", "--max-workers", "3", "--target-backlog",
                           "2", "--scale-down-delay-s", "1", "--worker-batch", "1")

    def workers():
        return metric_value(requests.get(w.url + "/metrics", timeout=HTTP_TIMEOUT_S).text,
                            "inferd_workers")

    assert workers() == 0
    X = sleep_rows(24, 300)
    bodies = [{"model": "sleepy", "input": infer_body(X[i:i + 1])} for i in range(len(X))]
    ids = submit_all(serve.url, bodies)
    seen = []
    def grown():
        seen.append(workers())
        return seen[-1] >= 2
    wait_for(grown, 30, "the worker pool to grow under the backlog")
    c = serve.client()
    for jid in ids:
        assert c.wait_final(jid, deadline_s=120)["status"] == "succeeded"
    wait_for(lambda: workers() == 0, 30, "the pool to shrink to --min-workers 0 when idle")
    assert max(seen) <= 3, f"never more than --max-workers: {seen}"
    scaled = w.log()
    assert 'msg="scaled up"' in scaled and 'msg="scaled down"' in scaled
