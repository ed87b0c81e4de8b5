"""Crash safety of the async job queue: ``kill -9`` mid-run, restart on the same
--data-dir (or Redis database) and port, every accepted job ends succeeded exactly once.

The mid-run test runs on every queue (``[sqlite]``, ``[redis]``, ``[postgres]``: inferd serve
with its own workers on ``--queue redis://`` or ``postgresql://``); test_redis.py and
test_postgres.py kill separate worker processes, and Redis or PostgreSQL itself.
"""
import hashlib
import hmac
import json
import shutil
import signal
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from conftest import (INFERD_BIN, JOB_FINAL_STATES, SHARED_QUEUE_KINDS, RedisClient,
                      assert_close, async_args, infer_body, metric_value, output_array, wait_for,
                      write_plugin_model)

N_JOBS = 2000
CLIENTS = 16
KILL_AT = 0.4           # kill when this fraction has succeeded (any point in 20-80% is fine)
SECRET = "s3cret"
# Redis, PostgreSQL: the jobs a killed process held run again once their lease ends (a
# restarted serve cannot tell a dead holder from a live one on another machine), so the
# model's lease is short.
REDIS_LEASE_S = 3


@pytest.fixture
def inferd_copy(tmp_path):
    """A private copy of the binary: kill and restart run the same build even if
    build/inferd is rebuilt meanwhile."""
    dst = tmp_path / "inferd-under-test"
    shutil.copy2(INFERD_BIN, dst)
    return dst


def test_kill9_midway_all_jobs_succeed_once(server_factory, trained, tmp_path, inferd_copy,
                                            webhook_receiver, queue_kind, fresh_queue, request):
    m = trained["binary"]
    repo = tmp_path / "models"
    shared = queue_kind in SHARED_QUEUE_KINDS
    m.install(repo, config={"backend": "xgboost", "lease_timeout_s": REDIS_LEASE_S}
              if shared else None)
    data = tmp_path / "data"
    X = m.rows(N_JOBS, seed=777)
    expected = m.expected(X)
    recv = webhook_receiver
    queue = fresh_queue()
    args = async_args(data, "--workers", "4", "--webhook-secret", SECRET, queue=queue)
    first = server_factory(repo, *args, binary=inferd_copy, tag="crash-1")
    url = first.url
    restarted = threading.Event()
    killed = threading.Event()
    local = threading.local()
    failures = []

    def submit(i):
        if not hasattr(local, "s"):
            local.s = requests.Session()
        body = {"model": "binary", "input": infer_body(X[i:i + 1]),
                "callback_url": f"{recv.url}/hook/{i}"}
        end = time.monotonic() + 240
        while time.monotonic() < end:
            before_kill = not killed.is_set()
            try:
                r = local.s.post(url + "/v1/jobs", json=body,
                                 headers={"Idempotency-Key": f"crash-{i}"}, timeout=60)
            except requests.RequestException:
                # the server is gone: retry with the same key once it is back
                local.s = requests.Session()
                restarted.wait(timeout=120)
                continue
            if r.status_code in (200, 202):
                return i, r.json()["id"], r.status_code, before_kill and not restarted.is_set()
            if r.status_code in (429, 503):
                time.sleep(0.1)
                continue
            failures.append(f"job {i}: HTTP {r.status_code}: {r.text[:200]}")
            return i, None, r.status_code, False
        failures.append(f"job {i}: no answer within 240 s")
        return i, None, None, False

    # kill -9 once KILL_AT of the jobs have succeeded, from a monitor thread
    seen = {}

    def monitor():
        s = requests.Session()
        while not killed.is_set():
            try:
                text = s.get(url + "/metrics", timeout=10).text
                done = metric_value(text, "inferd_jobs", {"state": "succeeded"}) or 0
            except requests.RequestException:
                continue
            if done >= KILL_AT * N_JOBS:
                seen["at_kill"] = done
                killed.set()
                first.proc.send_signal(signal.SIGKILL)
                return
            time.sleep(0.02)
    mon = threading.Thread(target=monitor, daemon=True)
    mon.start()
    pool = ThreadPoolExecutor(CLIENTS)
    futures = [pool.submit(submit, i) for i in range(N_JOBS)]
    try:
        mon.join(timeout=180)
        assert killed.is_set(), \
            f"never saw {KILL_AT:.0%} of {N_JOBS} jobs succeed within 180 s (monitor)"
        first.proc.wait(timeout=30)
        assert first.proc.returncode == -signal.SIGKILL, first.proc.returncode
        at_kill = seen["at_kill"]
        assert at_kill <= 0.8 * N_JOBS, \
            f"precondition: killed only at {at_kill:.0f}/{N_JOBS} succeeded (> 80%)"
        second = server_factory(repo, *args, binary=inferd_copy, port=first.port, tag="crash-2")
        assert second.url == url
        restarted.set()
        results = [f.result(timeout=300) for f in futures]
    finally:
        restarted.set()
        pool.shutdown(wait=False, cancel_futures=True)
    assert not failures, f"{len(failures)} submissions failed: {failures[:5]}"
    ids = [jid for _, jid, _, _ in results]
    acked_by_first = [jid for _, jid, _, first_srv in results if first_srv]
    assert len(set(ids)) == N_JOBS, \
        f"{N_JOBS} submissions with distinct Idempotency-Keys gave {len(set(ids))} distinct ids"
    c = second.client()

    # every accepted job reaches a final state
    def all_final():
        counts = c.job_counts()
        final = sum(counts[s] or 0 for s in JOB_FINAL_STATES)
        return counts if final == N_JOBS and not counts["queued"] and not counts["running"] else None
    counts = wait_for(all_final, 120, f"all {N_JOBS} jobs final after the restart "
                      "(inferd_jobs gauge; running ones must be requeued at once, "
                      f"on Redis after their {REDIS_LEASE_S} s lease)")
    assert counts["succeeded"] == N_JOBS, f"after the crash: {counts}"

    # each job: succeeded with its own row's prediction
    local2 = threading.local()

    def check(i):
        if not hasattr(local2, "s"):
            local2.s = requests.Session()
        jid = ids[i]
        job = local2.s.get(f"{url}/v1/jobs/{jid}", timeout=60)
        assert job.status_code == 200, f"job {i} ({jid}): GET HTTP {job.status_code}"
        job = job.json()
        assert job["status"] == "succeeded" and job["attempts"] >= 1, f"job {i}: {job!r}"
        r = local2.s.get(f"{url}/v1/jobs/{jid}/result", timeout=60)
        assert r.status_code == 200, f"job {i} ({jid}): result HTTP {r.status_code}: {r.text[:200]}"
        got = output_array(r.json(), 1)
        return i, float(got[0]), job["attempts"]
    with ThreadPoolExecutor(8) as ex:
        checked = list(ex.map(check, range(N_JOBS)))
    got = np.array([g for _, g, _ in checked])
    assert_close(got, expected, "results after kill -9 and restart (row i -> job i)")
    requeued = sum(1 for _, _, a in checked if a > 1)
    listed = {j["id"] for j in c.list_all(status="succeeded")[0]}
    assert listed == set(ids), \
        f"GET /v1/jobs?status=succeeded: {len(listed)} ids, {len(listed & set(ids))} of ours"
    assert set(acked_by_first) <= listed

    # webhooks: one event per job, each signed and carrying that job's result
    def delivered():
        ev = {}
        for req in recv.received("/hook/"):
            ev.setdefault(req["path"], set()).add(req["headers"].get("X-Inferd-Event-Id"))
        return ev if len(ev) == N_JOBS else None
    # On Redis a webhook the killed process had taken is held for the Redis store's
    # OUTBOX_HOLD_MS (60 s) before anyone sends it again (and
    # test_redis.py::test_webhook_burst_is_not_held_back shows a burst held that long too),
    # on PostgreSQL for PG_OUTBOX_HOLD_MS (60 s):
    # there every job's webhook must be delivered or waiting in the outbox, none lost.
    def delivered_or_waiting():
        ev = {}
        for req in recv.received("/hook/"):
            ev.setdefault(req["path"], set()).add(req["headers"].get("X-Inferd-Event-Id"))
        sent = {ids[int(p.rsplit("/", 1)[1])] for p in ev}
        return ev if sent | outbox_jobs() == set(ids) else None

    def outbox_jobs():
        if queue_kind == "redis":
            return redis_outbox_jobs(queue)
        return {j for (j,) in request.getfixturevalue("shared_postgres").psql(
            "SELECT job_id FROM inferd_outbox WHERE done = 0", db_name(queue))}
    events = wait_for(delivered_or_waiting if shared else delivered, 60,
                      f"webhooks for all {N_JOBS} jobs"
                      + (f" delivered or waiting in the {queue_kind} outbox" if shared else ""))
    multi = {p: e for p, e in events.items() if len(e) != 1}
    assert not multi, f"jobs with several event ids: {list(multi.items())[:5]}"
    for req in recv.received("/hook/"):
        sig = req["headers"].get("X-Inferd-Signature", "")
        want = hmac.new(SECRET.encode(), req["body"], hashlib.sha256).hexdigest()
        assert hmac.compare_digest(sig, "sha256=" + want), f"bad signature {sig!r}"
        body = json.loads(req["body"])
        i = int(req["path"].rsplit("/", 1)[1])
        assert body["type"] == "job.succeeded" and body["job"]["id"] == ids[i], body
        assert_close(output_array(body["result"], 1), expected[i:i + 1], f"webhook of job {i}")

    # the store itself, after a clean shutdown
    second.stop()
    if queue_kind == "redis":
        check_redis_store(queue, ids)
    elif queue_kind == "postgres":
        check_postgres_store(request.getfixturevalue("shared_postgres"), queue, ids)
    else:
        check_sqlite_store(data)
    print(f"\nkilled at {at_kill:.0f}/{N_JOBS} succeeded; {len(acked_by_first)} acked before the "
          f"kill; {requeued} jobs ran more than once (requeued after the crash)")


def check_sqlite_store(data):
    db = sqlite3.connect(f"file:{data / 'inferd.db'}?mode=ro", uri=True)
    try:
        (total,) = db.execute("SELECT COUNT(*) FROM jobs").fetchone()
        (not_ok,) = db.execute("SELECT COUNT(*) FROM jobs WHERE state != 2").fetchone()
        (distinct,) = db.execute("SELECT COUNT(DISTINCT id) FROM jobs").fetchone()
        (min_att,) = db.execute("SELECT MIN(attempts) FROM jobs").fetchone()
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        dup_out = []
        if "outbox" in tables:
            dup_out = db.execute("SELECT job_id, COUNT(*) FROM outbox GROUP BY job_id "
                                 "HAVING COUNT(*) > 1 LIMIT 5").fetchall()
    finally:
        db.close()
    assert (total, not_ok, distinct) == (N_JOBS, 0, N_JOBS), \
        f"jobs table: {total} rows, {not_ok} not succeeded (state != 2), {distinct} distinct ids"
    assert min_att >= 1, f"a succeeded job with attempts {min_att}"
    assert not dup_out, f"jobs with more than one outbox event: {dup_out}"


def check_redis_store(url, ids):
    """The Redis queue's keys (src/queue/redis/queue.lua) after every job succeeded once: N job
    hashes, all succeeded, nothing left on the streams or pending, and one webhook each."""
    with RedisClient.from_url(url) as r:
        keys = {k.decode() for k in r.scan_keys("inferd:job:*")}
        assert keys == {f"inferd:job:{j}" for j in ids}, \
            f"{len(keys)} job hashes, {len(keys & {f'inferd:job:{j}' for j in ids})} of ours"
        rows = r.pipeline([("HMGET", f"inferd:job:{j}", "state", "attempts") for j in ids])
        not_ok = [(j, row) for j, row in zip(ids, rows) if row[0] != b"2"]
        assert not not_ok, f"{len(not_ok)} jobs not succeeded (state != 2): {not_ok[:5]}"
        min_att = min(int(row[1]) for row in rows)
        assert min_att >= 1, f"a succeeded job with attempts {min_att}"
        counts = {k.decode(): int(v) for k, v in
                  zip(*[iter(r.execute("HGETALL", "inferd:counts"))] * 2)}
        assert {k: v for k, v in counts.items() if v} == {"succeeded": N_JOBS}, counts
        for p in range(10):
            stream = f"inferd:q:{p}"
            pending = r.execute("XPENDING", stream, "workers")[0]
            assert (r.execute("XLEN", stream), pending) == (0, 0), \
                f"{stream}: {r.execute('XLEN', stream)} entries, {pending} pending"
        # one final state each, so one webhook each
        created = int(r.execute("GET", "inferd:outbox:seq") or 0)
        assert created == N_JOBS, f"{created} webhooks were created for {N_JOBS} jobs"


def check_postgres_store(pg, url, ids):
    """The PostgreSQL queue's tables after every job succeeded once: N job rows, all
    succeeded, attempts matching inferd_attempts, and one webhook event each."""
    from test_postgres import check_jobs_table, outbox_per_job
    rows = check_jobs_table(pg, url, ids)
    assert min(att for _, att in rows.values()) >= 1
    created = outbox_per_job(pg, url)
    assert set(created) == set(ids) and set(created.values()) == {1}, \
        f"webhook events: {len(created)} jobs, counts {sorted(set(created.values()))}"


def db_name(url):
    return url.rsplit("/", 1)[1].split("?", 1)[0]


def redis_outbox_jobs(url):
    """The job ids of the webhooks waiting in the Redis outbox (not yet delivered)."""
    with RedisClient.from_url(url) as r:
        items = r.execute("ZRANGE", "inferd:outbox", 0, -1)
        jobs = r.pipeline([("HGET", f"inferd:out:{n.decode()}", "job_id") for n in items])
    return {j.decode() for j in jobs if isinstance(j, bytes)}


def test_kill9_requeues_running_job_at_once(server_factory, tmp_path, inferd_copy, gates):
    """A job running at kill -9 runs again right after the restart (not after its 300 s
    lease), and its result is recorded once.

    SQLite only: one serve owns the database, so at start-up every running job is its own
    dead attempt. On Redis a restarted serve cannot tell a dead holder from a live worker
    elsewhere: the lease decides (test_redis.py kills a worker with a short lease).
    """
    repo = tmp_path / "models"
    write_plugin_model(repo, "rowsum", width=4)
    data = tmp_path / "data"
    args = async_args(data, "--workers", "1", "--worker-batch", "1")
    first = server_factory(repo, *args, binary=inferd_copy, tag="requeue-1")
    c = first.client()
    X = np.array([[1.5, 2.0, -0.25, 4.0]], dtype=np.float32)
    gate = gates("rowsum", X)
    gate.hold(c)
    queued = c.submit_ok("rowsum", X)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(timeout=30)
    second = server_factory(repo, *args, binary=inferd_copy, port=first.port, tag="requeue-2")
    c = second.client()
    job = c.wait_status(gate.id, "running", 30,
                        "the job that was running at kill -9 to run again (lease 300 s)")
    assert job["attempts"] == 2, f"second run should be attempt 2: {job!r}"
    assert c.job(queued)["status"] == "queued"
    assert gate.release()
    for jid, rows in ((gate.id, gate.X), (queued, X)):
        job = c.wait_final(jid)
        assert job["status"] == "succeeded", job
        r = c.get(f"/v1/jobs/{jid}/result")
        assert r.status_code == 200, r.text[:300]
        assert_close(output_array(r.json(), 1), rows.astype(np.float64).sum(axis=1), f"job {jid}")
    assert c.job(gate.id)["attempts"] == 2
    assert c.job(queued)["attempts"] == 1
