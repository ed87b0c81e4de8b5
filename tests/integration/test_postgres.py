"""The job queue on PostgreSQL (``--queue postgresql://...``), shared by separate processes:
crash safety with ``kill -9`` of a worker and of the API, a worker stopped past its lease whose
stale result must not count, PostgreSQL restarted and stopped mid-run (503 + Retry-After, no
hang, workers reconnect), two ``serve`` processes firing each scheduled run once, passwords
kept out of every output, and the versioned schema.

Each test has its own throw-away cluster (``postgres_server``: initdb as the ``postgres``
user, a free loopback port, fsync and synchronous_commit on). test_async.py,
test_async_crash.py, test_batch_jobs.py and the others that use ``fresh_queue`` also run on
PostgreSQL. Everything waits by polling against a deadline; nothing asserts on elapsed time.
"""
import itertools
import shutil
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from conftest import (HTTP_TIMEOUT_S, INFERD_BIN, async_args, assert_close, free_port,
                      infer_body, metric_value, wait_for, write_plugin_model)
from test_redis import (busy, check_outage_answers, check_signed, fetch_results,
                        outage_submitter, runs, wait_counts)

SECRET = "s3cret"        # test_redis.check_signed checks signatures with this secret
SHORT_LEASE_S = 2        # the lease of the models whose holders the tests kill or stop

N_CRASH = 2000
CRASH_CLIENTS = 16


@pytest.fixture(scope="module")
def repo(trained, tmp_path_factory):
    repo = tmp_path_factory.mktemp("pg-models")
    trained["binary"].install(repo)
    trained["binary"].install(repo, name="binary_short",
                              config={"backend": "xgboost", "lease_timeout_s": SHORT_LEASE_S})
    write_plugin_model(repo, "rowsum", width=4)
    write_plugin_model(repo, "rowsum_short", width=4, extra={"lease_timeout_s": SHORT_LEASE_S})
    return repo


@pytest.fixture
def inferd_copy(tmp_path):
    """A private copy of the binary: kills and restarts run the same build even if
    build/inferd is rebuilt meanwhile."""
    dst = tmp_path / "inferd-under-test"
    shutil.copy2(INFERD_BIN, dst)
    return dst


@pytest.fixture
def split(postgres_server, server_factory, worker_factory, repo, tmp_path, inferd_copy):
    """``start(n_workers, *worker_args, serve_args=())`` -> ``(serve, [workers], queue_url)``:
    ``inferd serve --workers 0`` and ``n_workers`` ``inferd worker`` processes on a new
    database of the test's cluster (which is stopped after them)."""
    counter = itertools.count()

    def start(n_workers=1, *worker_args, serve_args=()):
        url = postgres_server.fresh_url()
        n = next(counter)
        serve = server_factory(repo, *async_args(tmp_path / f"data-{n}", "--workers", "0",
                                                 *serve_args, queue=url),
                               tag="serve", binary=inferd_copy)
        workers = [worker_factory(repo, url, *worker_args, tag=f"worker{chr(ord('A') + i)}",
                                  binary=inferd_copy)
                   for i in range(n_workers)]
        return serve, workers, url
    return start


def db_name(url):
    return url.rsplit("/", 1)[1].split("?", 1)[0]


def succeeded(server):
    text = requests.get(server.url + "/metrics", timeout=HTTP_TIMEOUT_S).text
    return metric_value(text, "inferd_jobs", {"state": "succeeded"}) or 0


def outbox_per_job(pg, url):
    """{job id: webhook events created} from the store's outbox: one per final state."""
    return {job: int(n) for job, n in
            pg.psql("SELECT job_id, COUNT(*) FROM inferd_outbox GROUP BY job_id", db_name(url))}


def check_jobs_table(pg, url, ids):
    """The jobs table after every job succeeded: exactly ``ids``, all state 2 (succeeded),
    and one row of inferd_attempts per attempt counted on the job."""
    db = db_name(url)
    rows = {jid: (int(state), int(attempts)) for jid, state, attempts in
            pg.psql("SELECT id, state, attempts FROM inferd_jobs", db)}
    assert set(rows) == set(ids), \
        f"inferd_jobs: {len(rows)} rows, {len(set(rows) & set(ids))} of our {len(ids)} jobs"
    not_ok = [(j, r) for j, r in rows.items() if r[0] != 2]
    assert not not_ok, f"{len(not_ok)} jobs not succeeded (state != 2): {not_ok[:5]}"
    tried = {jid: int(n) for jid, n in
             pg.psql("SELECT job_id, COUNT(*) FROM inferd_attempts GROUP BY job_id", db)}
    odd = [(j, rows[j][1], tried.get(j)) for j in ids if tried.get(j) != rows[j][1]]
    assert not odd, f"jobs whose attempts differ from their inferd_attempts rows: {odd[:5]}"
    return rows


# ---------------------------------------------------------------------------
# crash safety
# ---------------------------------------------------------------------------


def test_kill9_worker_and_api_every_job_succeeds_once(split, postgres_server, trained,
                                                      server_factory, worker_factory, repo,
                                                      inferd_copy, webhook_receiver):
    """2,000 jobs through ``serve --workers 0`` and two ``inferd worker`` processes;
    ``kill -9`` of the API while jobs are submitted and of worker A while it runs jobs; both
    restarted. Every accepted job ends succeeded, its result recorded once (one final
    state, so one webhook event in the outbox and at most one event id delivered), its
    attempts 1 or (the jobs A held) 2."""
    m = trained["binary"]
    recv = webhook_receiver
    worker_args = ("--workers", "2", "--worker-batch", "8", "--webhook-secret", SECRET)
    serve, (a, b), url = split(2, *worker_args, serve_args=("--webhook-secret", SECRET))
    api_args = serve.extra_args
    X = m.rows(N_CRASH, seed=771)
    expected = m.expected(X)
    api = {"url": serve.url}
    accepted = {}
    failures = []
    restarted = threading.Event()
    lock = threading.Lock()
    local = threading.local()

    def submit(i):
        if not hasattr(local, "s"):
            local.s = requests.Session()
        body = {"model": "binary_short", "input": infer_body(X[i:i + 1]),
                "callback_url": f"{recv.url}/hook/{i}"}
        end = time.monotonic() + 300
        while time.monotonic() < end:
            try:
                r = local.s.post(api["url"] + "/v1/jobs", json=body,
                                 headers={"Idempotency-Key": f"crash-{i}"}, timeout=60)
            except requests.RequestException:
                # the API is gone: the same key again once it is back
                local.s = requests.Session()
                restarted.wait(timeout=120)
                continue
            if r.status_code in (200, 202):
                with lock:
                    accepted[i] = r.json()["id"]
                return
            if r.status_code in (429, 503):
                time.sleep(0.1)
                continue
            failures.append(f"job {i}: HTTP {r.status_code}: {r.text[:200]}")
            return
        failures.append(f"job {i}: no answer within 300 s")

    pool = ThreadPoolExecutor(CRASH_CLIENTS)
    futures = [pool.submit(submit, i) for i in range(N_CRASH)]
    try:
        # the API, while submissions go on
        wait_for(lambda: len(accepted) >= 0.3 * N_CRASH, 180,
                 f"{0.3 * N_CRASH:.0f} of {N_CRASH} jobs accepted before the API's kill -9")
        serve.proc.send_signal(signal.SIGKILL)
        serve.proc.wait(timeout=30)
        n_at_api_kill = len(accepted)
        serve = server_factory(repo, *api_args, binary=inferd_copy, port=serve.port,
                               tag="serve-2")
        restarted.set()
        # worker A, while it runs jobs
        wait_for(lambda: succeeded(serve) >= 0.5 * N_CRASH and busy(a) >= 1, 180,
                 f"{0.5 * N_CRASH:.0f} jobs succeeded and worker A running one")
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(timeout=30)
        n_at_worker_kill = succeeded(serve)
        a2 = worker_factory(repo, url, *worker_args, tag="workerA2", binary=inferd_copy)
        for f in futures:
            f.result(timeout=300)
    finally:
        restarted.set()
        pool.shutdown(wait=False, cancel_futures=True)
    assert not failures, f"{len(failures)} submissions failed: {failures[:5]}"
    ids = [accepted[i] for i in range(N_CRASH)]
    assert len(set(ids)) == N_CRASH, \
        f"{N_CRASH} submissions with distinct Idempotency-Keys gave {len(set(ids))} ids"
    c = serve.client()
    counts = wait_counts(c, N_CRASH, 180, f"all {N_CRASH} jobs final after the kills "
                         f"(A's jobs once their {SHORT_LEASE_S} s leases end)")
    assert counts["succeeded"] == N_CRASH, f"after the kills: {counts}"
    got = fetch_results(serve.url, ids)
    assert_close(np.array([got[j][0] for j in ids]), expected,
                 "results after kill -9 of the API and of a worker (job i -> row i)")
    # attempts: 1, or 2 for the jobs A held (2 threads x 8 leased at once)
    rows = check_jobs_table(postgres_server, url, ids)
    again = [j for j, (_, att) in rows.items() if att != 1]
    assert all(rows[j][1] == 2 for j in again) and len(again) <= 16, \
        f"{len(again)} jobs with attempts != 1 (worker A held at most 16): " \
        f"{[(j, rows[j][1]) for j in again[:5]]}"
    # results recorded once: one final state each, so one webhook event each
    created = outbox_per_job(postgres_server, url)
    twice = {j: n for j, n in created.items() if n != 1}
    assert set(created) == set(ids) and not twice, \
        f"webhook events created: {len(created)} jobs, several for {list(twice.items())[:5]}"

    def delivered_or_waiting():
        ev = {}
        for req in recv.received("/hook/"):
            ev.setdefault(int(req["path"].rsplit("/", 1)[1]), set()).add(check_signed(req)["id"])
        waiting = {j for (j,) in postgres_server.psql(
            "SELECT job_id FROM inferd_outbox WHERE done = 0", db_name(url))}
        return ev if {ids[i] for i in ev} | waiting == set(ids) else None
    # (a webhook the killed worker had taken is held for PG_OUTBOX_HOLD_MS, 60 s)
    events = wait_for(delivered_or_waiting, 90,
                      f"webhooks of all {N_CRASH} jobs delivered or waiting in inferd_outbox")
    multi = {i: e for i, e in events.items() if len(e) != 1}
    assert not multi, f"jobs delivered under several event ids: {list(multi.items())[:5]}"
    assert all(p.alive() for p in (serve, b, a2)), "a process died"
    print(f"\nAPI killed at {n_at_api_kill} accepted, worker A at {n_at_worker_kill:.0f} "
          f"succeeded; {len(again)} jobs ran twice; runs: B {runs(b, 'binary_short'):.0f}, "
          f"A2 {runs(a2, 'binary_short'):.0f}")


def test_worker_stopped_past_its_lease_records_nothing(split, gates, webhook_receiver,
                                                       worker_factory, repo, postgres_server,
                                                       inferd_copy):
    """Worker A runs a job and is SIGSTOPped; its lease runs out and worker B runs the job
    again (attempt 2) to the end. SIGCONT: A finishes its stale attempt, and the store
    fences its outcome out: the job keeps B's result and has one final state, one webhook."""
    recv = webhook_receiver
    serve, (a,), url = split(1, "--workers", "1", "--worker-batch", "1",
                             "--webhook-secret", SECRET,
                             serve_args=("--webhook-secret", SECRET))
    c = serve.client()
    gate = gates("rowsum_short")
    jid = gate.submit(c, callback_url=f"{recv.url}/gate")
    c.wait_status(jid, "running", 30, "worker A to run the gate job")
    a.signal(signal.SIGSTOP)
    try:
        b = worker_factory(repo, url, "--workers", "1", "--worker-batch", "1",
                           "--webhook-secret", SECRET, tag="workerB", binary=inferd_copy)
        wait_for(lambda: (lambda j: j["status"] == "running" and j["attempts"] == 2)(c.job(jid)),
                 60, f"worker B to run the job again once A's {SHORT_LEASE_S} s lease ran out")
        gate.release()
        job = c.wait_final(jid, 60, "B's attempt to finish")
        assert job["status"] == "succeeded" and job["attempts"] == 2, job
        wait_for(lambda: recv.received("/gate"), 30, "the webhook of B's attempt")
    finally:
        a.signal(signal.SIGCONT)
    wait_for(lambda: f"job={jid}" in "\n".join(
        ln for ln in a.log().splitlines() if "attempt fenced out" in ln), 60,
        "worker A to finish its stale attempt and be fenced out (its log)")
    job = c.job(jid)
    assert job["status"] == "succeeded" and job["attempts"] == 2, job
    r = c.get(f"/v1/jobs/{jid}/result")
    assert r.status_code == 200, r.text[:300]
    assert runs(b, "rowsum_short") == 1, "B ran the job once"
    check_jobs_table(postgres_server, url, [jid])
    assert outbox_per_job(postgres_server, url) == {jid: 1}, "A's stale outcome made an event"
    assert len(recv.received("/gate")) == 1, [h["body"] for h in recv.received("/gate")]
    # A carries on
    X = np.array([[1, 2, 3, 4]], dtype=np.float32)
    for _ in range(2):
        assert c.wait_final(c.submit_ok("rowsum", X))["status"] == "succeeded"
    assert a.alive() and b.alive()


class CommitAnswerCutter:
    """A TCP proxy in front of PostgreSQL that, once, lets the COMMIT of a transaction that
    sent ``trigger`` through and cuts the connection instead of relaying PostgreSQL's answer:
    the change happened, and inferd never heard so (a network cut at the worst moment)."""

    LEASE = b"attempts = attempts + 1"   # the lease's UPDATE (src/queue/postgres/jobs.c)
    ENQUEUE = b"INSERT INTO inferd_jobs"

    def __init__(self, upstream_port, trigger=LEASE):
        self.trigger = trigger
        self.upstream = upstream_port
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.cut_done = threading.Event()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self):
        self.sock.close()

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.upstream))
            conn = {"armed": False, "cut": False}
            threading.Thread(target=self._up, args=(client, up, conn), daemon=True).start()
            threading.Thread(target=self._down, args=(up, client, conn), daemon=True).start()

    @staticmethod
    def _close(*socks):
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _up(self, client, up, conn):
        try:
            while data := client.recv(65536):
                with self.lock:
                    if not self.cut_done.is_set():
                        if self.trigger in data:
                            conn["armed"] = True
                        if conn["armed"] and b"COMMIT" in data:
                            conn["cut"] = True
                up.sendall(data)
        except OSError:
            pass
        self._close(client, up)

    def _down(self, up, client, conn):
        try:
            while data := up.recv(65536):
                if conn["cut"]:  # COMMIT's answer: dropped, and the connection with it
                    self.cut_done.set()
                    break
                client.sendall(data)
        except OSError:
            pass
        self._close(client, up)


def test_lease_whose_commit_answer_is_lost_runs_again_at_once(postgres_server, server_factory,
                                                              worker_factory, repo, tmp_path):
    """The worker's connection is cut after PostgreSQL committed a lease and before its answer
    arrived. The job is leased to nobody alive in that process: at its next transaction the
    worker releases it (attempt ended, not counted against max_attempts), at once rather than
    after its 300 s lease, and the job succeeds on the next attempt."""
    url = postgres_server.fresh_url()
    serve = server_factory(repo, *async_args(tmp_path / "data", "--workers", "0", queue=url),
                           tag="serve")
    cutter = CommitAnswerCutter(postgres_server.port)
    try:
        proxied = url.replace(f":{postgres_server.port}/", f":{cutter.port}/")
        assert proxied != url, url
        w = worker_factory(repo, proxied, "--workers", "1", "--worker-batch", "1")
        c = serve.client()
        X = np.array([[1, 2, 3, 4]], dtype=np.float32)
        jid = c.submit_ok("rowsum", X)
        assert cutter.cut_done.wait(60), "no lease COMMIT went through the proxy in 60 s"
        job = c.wait_final(jid, 60, "the job whose lease answer was lost (lease: 300 s)")
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 2, job
        first, second = job["attempts_history"]
        assert first["error"] == "the answer of its lease was lost; queued again", first
        assert first["ended_at"] is not None and second["error"] is None, job
        assert "a lease's answer was lost; its job is queued again" in w.log()
        # the released attempt is not counted: one attempt (max_attempts 3 leaves 2 more)
        assert runs(w, "rowsum") == 1, "the job ran more than once"
        assert c.wait_final(c.submit_ok("rowsum", X), 60)["status"] == "succeeded"
    finally:
        cutter.close()


def test_submission_whose_commit_answer_is_lost_says_so(postgres_server, server_factory,
                                                        repo, tmp_path):
    """The API's connection is cut after PostgreSQL committed a job and before its answer
    arrived: the client gets 503 saying the job may have been stored (not "nothing was
    stored"), and resubmitting with the same Idempotency-Key finds that one job."""
    url = postgres_server.fresh_url()
    cutter = CommitAnswerCutter(postgres_server.port, CommitAnswerCutter.ENQUEUE)
    try:
        proxied = url.replace(f":{postgres_server.port}/", f":{cutter.port}/")
        serve = server_factory(repo, *async_args(tmp_path / "data", "--workers", "0",
                                                 queue=proxied), tag="serve")
        body = {"model": "rowsum",
                "input": infer_body(np.array([[1, 2, 3, 4]], dtype=np.float32))}
        key = {"Idempotency-Key": "order-in-doubt"}
        r = requests.post(serve.url + "/v1/jobs", json=body, headers=key, timeout=HTTP_TIMEOUT_S)
        assert cutter.cut_done.is_set(), f"the proxy cut nothing: HTTP {r.status_code} {r.text}"
        assert r.status_code == 503 and r.headers.get("Retry-After"), (r.status_code, r.text)
        msg = r.json()["error"]
        assert "whether it was stored is unknown" in msg and "Idempotency-Key" in msg, msg
        assert "nothing was stored" not in msg, msg

        def resubmit():
            r = requests.post(serve.url + "/v1/jobs", json=body, headers=key,
                              timeout=HTTP_TIMEOUT_S)
            return [r] if r.status_code != 503 else None
        again, = wait_for(resubmit, 30, "a resubmission once the API reconnected")
        assert again.status_code == 200, f"HTTP {again.status_code} {again.text[:300]}"
        rows = postgres_server.psql("SELECT id FROM inferd_jobs", db_name(url))
        assert [again.json()["id"]] == [r[0] for r in rows], rows
    finally:
        cutter.close()


def test_max_queue_is_exact_across_api_processes(postgres_server, server_factory, repo,
                                                  tmp_path):
    """Two ``serve`` processes (no workers) on one database with ``--max-queue 40`` take 160
    concurrent submissions: exactly 40 are accepted, the rest get 429, and the table holds
    40 queued jobs. Each process's count of the waiting jobs is taken under one lock, so
    neither admits on a count the other is about to change."""
    url = postgres_server.fresh_url()
    limit, per_process = 40, 80
    serves = [server_factory(repo, *async_args(tmp_path / f"data-{i}", "--workers", "0",
                                               "--max-queue", str(limit), queue=url),
                             tag=f"serve{i}")
              for i in range(2)]
    body = {"model": "rowsum", "input": infer_body(np.array([[1, 2, 3, 4]], dtype=np.float32))}

    def post(i):
        return post_one(serves[i % 2].url, body, HTTP_TIMEOUT_S).status_code

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(post, range(2 * per_process)))
    assert set(codes) <= {202, 429}, sorted(set(codes))
    assert codes.count(202) == limit, f"{codes.count(202)} accepted with --max-queue {limit}"
    queued = int(postgres_server.psql("SELECT COUNT(*) FROM inferd_jobs WHERE state = 0",
                                      db_name(url))[0][0])
    assert queued == limit, f"{queued} jobs waiting with --max-queue {limit}"


# ---------------------------------------------------------------------------
# PostgreSQL restarted and stopped mid-run
# ---------------------------------------------------------------------------


def post_one(url, body, timeout):
    return requests.post(url + "/v1/jobs", json=body, timeout=timeout)


def test_postgres_restarted_and_stopped_mid_run(split, postgres_server, trained):
    """``pg_ctl restart -m fast`` while jobs are submitted and run, then ``pg_ctl stop -m
    fast``: submissions answer 503 with Retry-After (within a deadline: no hang), nobody
    crashes, and once PostgreSQL is back the same workers take jobs again (they reconnect);
    every 202 ends succeeded with its row's prediction."""
    pg = postgres_server
    m = trained["binary"]
    serve, workers, url = split(2, "--workers", "2", "--worker-batch", "8")
    procs = [serve, *workers]
    pids = [p.proc.pid for p in procs]
    X = m.rows(20000, seed=903)
    expected = m.expected(X)
    stop = threading.Event()
    accepted, unavailable, bad, submitter = outage_submitter(
        serve.url, len(X), lambda i: {"model": "binary_short", "input": infer_body(X[i:i + 1])},
        stop)
    threads = [threading.Thread(target=submitter, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(accepted) >= 300, 60, "300 jobs accepted before the restart")
        pg.restart("fast")
        n = len(accepted)
        wait_for(lambda: len(accepted) >= n + 300, 60,
                 "300 more jobs accepted after pg_ctl restart -m fast")
        ran_before = [runs(w, "binary_short") for w in workers]
        pg.stop("fast")
        wait_for(lambda: len(unavailable) >= 5, 60,
                 "submissions to get 503 while PostgreSQL is stopped")
        probe = post_one(serve.url, {"model": "binary_short", "input": infer_body(X[:1])}, 30)
        assert probe.status_code == 503, \
            f"a submission while PostgreSQL is stopped: HTTP {probe.status_code} {probe.text[:200]}"
        assert all(p.alive() for p in procs), "a process died while PostgreSQL was stopped"
        pg.start()
        n = len(accepted)
        wait_for(lambda: len(accepted) >= n + 300, 60,
                 "300 more jobs accepted after PostgreSQL started again")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    check_outage_answers(bad, unavailable + [probe])
    for r in unavailable:
        assert "Location" not in r.headers, f"a 503 with a Location: {dict(r.headers)}"
    c = serve.client()
    want = {jid: i for i, jid in accepted.items()}
    wait_for(lambda: set(want) <= {j["id"] for j in c.list_all(status="succeeded")[0]}, 180,
             f"all {len(want)} accepted jobs to succeed (lease {SHORT_LEASE_S} s)")
    got = fetch_results(serve.url, list(want))
    assert_close(np.array([got[j][0] for j in want]), expected[list(want.values())],
                 "results of the jobs accepted around PostgreSQL's restart and stop")
    # the same processes carry on; each worker ran jobs after the outage (it reconnected)
    assert [p.proc.pid for p in procs] == pids and all(p.alive() for p in procs), \
        "a process died or was restarted"
    ran_after = [runs(w, "binary_short") for w in workers]
    assert all(after > before for before, after in zip(ran_before, ran_after)), \
        f"job runs per worker before the stop {ran_before}, at the end {ran_after}"
    jid = c.submit_ok("binary_short", X[:2])
    r = c.get(f"/v1/jobs/{jid}?wait=30", timeout=60)
    assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text[:300]
    print(f"\n{len(accepted)} accepted, {len(unavailable)} answered 503 while stopped; "
          f"worker runs before the stop {ran_before}, at the end {ran_after}")


def test_unreachable_postgres_at_start_up(repo, tmp_path):
    closed = free_port()
    for command in ("serve", "worker"):
        cmd = [str(INFERD_BIN), command, "--models", str(repo), "--port", str(free_port()),
               "--queue", f"postgresql://postgres@127.0.0.1:{closed}/inferd"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path)
        errors = [ln for ln in p.stderr.splitlines() if "level=error" in ln]
        assert p.returncode != 0, f"{command}: exit 0 with PostgreSQL unreachable\n{p.stderr}"
        assert len(errors) == 1 and f"127.0.0.1:{closed}" in errors[0], \
            f"{command}: expected one error line naming 127.0.0.1:{closed}:\n{p.stderr}"


# ---------------------------------------------------------------------------
# schedules: two serve processes on one database
# ---------------------------------------------------------------------------


def test_two_serves_fire_each_scheduled_run_once(postgres_server, server_factory, trained,
                                                 tmp_path, monkeypatch):
    """A schedule due every minute and two ``serve`` processes on one database, their
    clock (INFERD_CLOCK_FILE) moved a minute at a time: each minute's run exists once (one
    row, one "scheduled run started" line over both logs) and succeeds."""
    from test_batch_jobs import get, utc_ms, wait_status, write_csv
    pg = postgres_server
    m = trained["binary"]
    repo = tmp_path / "models"
    m.install(repo)
    write_csv(tmp_path / "in" / "a.csv", m.rows(50, seed=31))
    q = pg.fresh_url()
    clock = tmp_path / "clock"
    clock.write_text(str(utc_ms(2030, 1, 1, 0, 0, 30)))
    monkeypatch.setenv("INFERD_CLOCK_FILE", str(clock))
    serves = [server_factory(repo, *async_args(tmp_path / f"data-{i}", "--workers", "1",
                                               queue=q), tag=f"serve{i}")
              for i in range(2)]
    r = requests.post(f"{serves[0].url}/v1/batch-jobs", timeout=60, json={
        "model": m.name, "input": str(tmp_path / "in"), "output": str(tmp_path / "out"),
        "schedule": "* * * * *"})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    assert get(serves[1], sid)["next_run_at"] == "2030-01-01T00:01:00.000Z"
    minutes = 4
    for k in range(1, minutes + 1):
        clock.write_text(str(utc_ms(2030, 1, 1, 0, k, 5)))
        s = wait_for(lambda: (lambda j: j if len(j["runs"]) >= k else None)(
            get(serves[k % 2], sid)), 60, f"the run of minute {k}")
        run_ats = sorted(run["run_at"] for run in s["runs"])
        assert run_ats == [f"2030-01-01T00:{i:02d}:00.000Z" for i in range(1, k + 1)], run_ats
        for run in s["runs"]:
            assert wait_status(serves[0], run["id"], ("succeeded", "failed"))["status"] == \
                "succeeded"
    for s in serves:
        s.stop()
    rows = pg.psql(f"SELECT run_at_ms, COUNT(*) FROM inferd_batch_jobs WHERE parent = '{sid}' "
                   "GROUP BY run_at_ms ORDER BY run_at_ms", db_name(q))
    assert [(int(t), int(n)) for t, n in rows] == \
        [(utc_ms(2030, 1, 1, 0, k), 1) for k in range(1, minutes + 1)], rows
    fired = [s.log().count(f'msg="scheduled run started" schedule={sid}') for s in serves]
    assert sum(fired) == minutes, f"scheduled runs started per serve process: {fired}"
    print(f"\nscheduled runs started per serve process: {fired}")


# ---------------------------------------------------------------------------
# passwords
# ---------------------------------------------------------------------------

PASSWORD = "Zq8pwSecret4711"


@pytest.mark.parametrize("method", ["md5", "scram-sha-256"])
def test_password_never_shown(method, postgres_server, server_factory, worker_factory, repo,
                              tmp_path, webhook_receiver):
    """A role that must log in with its password (``method`` in pg_hba.conf): with the
    password in the URL, serve and a worker run jobs, and the password is in no log line
    (at debug level), no --help, no job JSON, no listing, no /metrics and no 503 while
    PostgreSQL is away."""
    pg = postgres_server
    role = "inferd_" + method.replace("-", "_")
    pg.create_role(role, PASSWORD, db=f"{role}_db",
                   encryption="md5" if method == "md5" else "scram-sha-256")
    pg.require_password(role, method)
    url = pg.db_url(f"{role}_db", role, PASSWORD)
    serve = server_factory(repo, *async_args(tmp_path / "data", "--workers", "0",
                                             "--log-level", "debug", queue=url))
    w = worker_factory(repo, url, "--workers", "1", "--log-level", "debug")
    c = serve.client()
    X = np.array([[1, 2, 3, 4]], dtype=np.float32)
    jid = c.submit_ok("rowsum", X, callback_url=f"{webhook_receiver.url}/pw")
    job = c.wait_final(jid)
    assert job["status"] == "succeeded", job
    wait_for(lambda: webhook_receiver.received("/pw"), 30, "the job's webhook")
    shown = {
        "job JSON": c.get(f"/v1/jobs/{jid}").text,
        "job list": c.get("/v1/jobs").text,
        "serve /metrics": c.metrics_text(),
        "worker /metrics": w.client().metrics_text(),
    }
    for command in ("serve", "worker"):
        p = subprocess.run([str(INFERD_BIN), command, "--queue", url, "--help"],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
        shown[f"{command} --help"] = p.stdout + p.stderr
    pg.stop("fast")
    try:
        r = c.post("/v1/jobs", json={"model": "rowsum", "input": infer_body(X)}, timeout=30)
        assert r.status_code == 503, f"while PostgreSQL is stopped: HTTP {r.status_code} {r.text}"
        shown["503 answer"] = r.text + str(r.headers)
    finally:
        pg.start()
    wait_for(lambda: c.submit("rowsum", X).status_code == 202, 60,
             "submissions accepted again once PostgreSQL is back")
    serve.stop()
    w.stop()
    shown["serve log"] = serve.log()
    shown["worker log"] = w.log()
    leaked = [what for what, text in shown.items() if PASSWORD in text]
    assert not leaked, f"the password appears in: {leaked}"
    assert "postgres" in shown["serve log"].lower(), "serve's log does not name its queue"


def test_wrong_password_fails_at_start(postgres_server, repo, tmp_path):
    pg = postgres_server
    pg.create_role("inferd_pw", PASSWORD, db="pw_db")
    pg.require_password("inferd_pw")
    wrong = "WrongPw9876xyz"
    for command in ("serve", "worker"):
        cmd = [str(INFERD_BIN), command, "--models", str(repo), "--port", str(free_port()),
               "--queue", pg.db_url("pw_db", "inferd_pw", wrong)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path)
        out = p.stdout + p.stderr
        errors = [ln for ln in p.stderr.splitlines() if "level=error" in ln]
        assert p.returncode != 0, f"{command}: exit 0 with a wrong password\n{out}"
        assert len(errors) == 1 and "password authentication failed" in errors[0], \
            f"{command}: expected one error line saying the password was refused:\n{out}"
        assert wrong not in out and PASSWORD not in out, f"{command} shows a password:\n{out}"


def test_password_from_pgpassword(postgres_server, server_factory, worker_factory, repo,
                                  tmp_path, monkeypatch):
    """libpq's environment works as in every libpq client: no password in the URL,
    PGPASSWORD holds it."""
    pg = postgres_server
    pg.create_role("inferd_env", PASSWORD, db="env_db")
    pg.require_password("inferd_env")
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    url = pg.db_url("env_db", "inferd_env")
    serve = server_factory(repo, *async_args(tmp_path / "data", "--workers", "0", queue=url))
    worker_factory(repo, url, "--workers", "1")
    c = serve.client()
    jid = c.submit_ok("rowsum", np.ones((1, 4), dtype=np.float32))
    assert c.wait_final(jid)["status"] == "succeeded"


# ---------------------------------------------------------------------------
# the schema
# ---------------------------------------------------------------------------


def test_schema_created_versioned_and_newer_refused(postgres_server, server_factory, repo,
                                                    tmp_path):
    """The first start creates the schema (inferd_schema_version says 2); a database whose
    schema is newer than this binary is refused at start, by serve and by worker, with one
    error line that says so, and left as it was."""
    pg = postgres_server
    url = pg.fresh_url()
    db = db_name(url)
    serve = server_factory(repo, *async_args(tmp_path / "data", queue=url))
    jid = serve.client().submit_ok("rowsum", np.ones((1, 4), dtype=np.float32))
    serve.stop()
    assert pg.psql("SELECT MAX(version) FROM inferd_schema_version", db) == [["2"]]
    tables = {t for (t,) in pg.psql("SELECT tablename FROM pg_tables WHERE schemaname = "
                                    "'public'", db)}
    assert {"inferd_schema_version", "inferd_jobs", "inferd_outbox"} <= tables, tables
    pg.psql("INSERT INTO inferd_schema_version VALUES (999, 0)", db)
    for command in ("serve", "worker"):
        cmd = [str(INFERD_BIN), command, "--models", str(repo), "--port", str(free_port()),
               "--queue", url]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path)
        errors = [ln for ln in p.stderr.splitlines() if "level=error" in ln]
        assert p.returncode != 0, f"{command}: exit 0 on a newer schema\n{p.stderr}"
        assert len(errors) == 1 and "999" in errors[0] and "newer" in errors[0], \
            f"{command}: expected one error line naming schema version 999 as newer:\n{p.stderr}"
    assert pg.psql("SELECT MAX(version) FROM inferd_schema_version", db) == [["999"]]
    assert pg.psql(f"SELECT COUNT(*) FROM inferd_jobs WHERE id = '{jid}'", db) == [["1"]]


def test_schema_created_once_by_processes_starting_together(postgres_server, repo, tmp_path,
                                                            server_factory, worker_factory):
    """serve and three workers started at once on an empty database: each migration runs
    once (one row per version in inferd_schema_version) and every process comes up."""
    pg = postgres_server
    url = pg.fresh_url()

    def start(i):
        if i == 0:
            return server_factory(repo, *async_args(tmp_path / "data", "--workers", "0",
                                                    queue=url))
        return worker_factory(repo, url, "--workers", "1", tag=f"worker{i}")
    with ThreadPoolExecutor(4) as ex:
        procs = list(ex.map(start, range(4)))
    assert pg.psql("SELECT version FROM inferd_schema_version ORDER BY version",
                   db_name(url)) == [["1"], ["2"]]
    c = procs[0].client()
    jid = c.submit_ok("rowsum", np.ones((1, 4), dtype=np.float32))
    assert c.wait_final(jid)["status"] == "succeeded"
