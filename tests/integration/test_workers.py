"""Worker processes and the job record: each worker (the pool of ``inferd serve``, each
``inferd worker``) heartbeats to the queue; one silent for ``--worker-timeout-s`` is presumed
dead and its jobs run again at once, however long their lease; ``GET /v1/workers`` lists the
live ones; a job says which worker holds it and which worker ran each attempt. The
worker-process tests run on Redis and on PostgreSQL (``shared_queue``).

Everything waits by polling against a deadline named in the message; the deadlines are far
below the 300 s lease the jobs hold, so passing proves the heartbeat, not the lease, freed
them.
"""
import re
import signal
import subprocess

import numpy as np
import pytest

from conftest import (INFERD_BIN, REPO_ROOT, async_args, check_accepted, infer_body,
                      wait_for, write_plugin_model)

WORKER_TIMEOUT_S = 3     # --worker-timeout-s of the workers these tests kill
LEASE_S = 300            # the jobs' lease: the default, far longer than any deadline here


@pytest.fixture
def repo(tmp_path):
    repo = tmp_path / "models"
    # several held jobs at once on one worker, each in its own instance
    write_plugin_model(repo, "rowsum", width=4,
                       extra={"max_batch_size": 1, "instances": 4, "lease_timeout_s": LEASE_S})
    return repo


def workers_of(client):
    r = client.get("/v1/workers")
    assert r.status_code == 200, f"GET /v1/workers: HTTP {r.status_code}: {r.text[:300]}"
    return r.json()["workers"]


def worker_with_pid(client, pid):
    return next((w for w in workers_of(client) if w["pid"] == pid), None)


def test_kill9_worker_jobs_back_in_seconds(shared_queue, server_factory, worker_factory, repo,
                                           tmp_path, gates):
    url = shared_queue()
    serve = server_factory(repo, *async_args(tmp_path / "data", "--workers", "0", queue=url),
                           tag="serve")
    c = serve.client()
    wargs = ("--workers", "2", "--worker-batch", "1", "--worker-timeout-s", str(WORKER_TIMEOUT_S))
    a = worker_factory(repo, url, *wargs, tag="workerA")
    wa = wait_for(lambda: worker_with_pid(c, a.proc.pid), 30, "worker A in GET /v1/workers")
    assert wa["host"] and wa["started_at"] and wa["last_heartbeat"], wa
    held = [gates(), gates()]
    for g in held:  # only A runs: both are held in A's model
        g.hold(c)
    for g in held:
        job = c.job(g.id)
        assert job["worker"] == wa["id"], f"running job's worker: {job}"
        assert [h["worker"] for h in job["attempts_history"]] == [wa["id"]], job
    wait_for(lambda: (worker_with_pid(c, a.proc.pid) or {}).get("jobs_running") == 2, 30,
             "worker A's heartbeat to say jobs_running 2")
    b = worker_factory(repo, url, *wargs, tag="workerB")
    wb = wait_for(lambda: worker_with_pid(c, b.proc.pid), 30, "worker B in GET /v1/workers")
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(timeout=30)
    for g in held:  # B's attempts pass at once
        g.release()
    # the lease is 300 s: only the heartbeat can bring them back this soon
    for g in held:
        job = c.wait_final(g.id, 60)
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 2, job
        first, second = job["attempts_history"]
        assert first["worker"] == wa["id"] and "heartbeat" in first["error"], first
        assert first["ended_at"] is not None, first
        assert second["worker"] == wb["id"] and second["error"] is None, second
        assert job["worker"] is None, "a finished job is held by no worker"
    ids = [w["id"] for w in workers_of(c)]
    assert wa["id"] not in ids and wb["id"] in ids, f"workers after A's kill -9: {ids}"
    logs = serve.log() + b.log()
    # one line on every store, naming the worker and why
    assert re.search(r"worker lost; its running jobs are queued again\" worker=" +
                     re.escape(wa["id"]) + r" jobs=\d+ reason=\"its worker .*sent no heartbeat",
                     logs), f"no process logged the dead worker: {logs[-3000:]}"


def test_stopped_worker_leaves_the_list(shared_queue, server_factory, worker_factory, repo,
                                        tmp_path):
    url = shared_queue()
    serve = server_factory(repo, *async_args(tmp_path / "data", "--workers", "0", queue=url),
                           tag="serve")
    c = serve.client()
    a = worker_factory(repo, url, "--workers", "1", tag="workerA")
    wa = wait_for(lambda: worker_with_pid(c, a.proc.pid), 30, "worker A in GET /v1/workers")
    assert wa["timeout_s"] == 30, f"--worker-timeout-s default: {wa}"
    a.stop()
    assert worker_with_pid(c, a.proc.pid) is None, "a worker stopped by SIGTERM is still listed"


def test_serve_pool_is_listed_on_sqlite(server_factory, repo, tmp_path):
    serve = server_factory(repo, *async_args(tmp_path / "data", "--workers", "2"))
    c = serve.client()
    w = wait_for(lambda: worker_with_pid(c, serve.proc.pid), 30, "serve's pool in /v1/workers")
    assert w["id"].startswith(f"{w['host']}/{serve.proc.pid}/"), w
    X = np.ones((1, 4), dtype=np.float32)
    jid = check_accepted(c.post("/v1/jobs", json={"model": "rowsum", "input": infer_body(X)}),
                         "job")
    job = c.wait_final(jid, 30)
    assert job["attempts_history"][0]["worker"] == w["id"], job
    assert c.get("/v1/workers/x").status_code == 404


def test_worker_help_and_readme_agree_on_defaults():
    readme = (REPO_ROOT / "README.md").read_text()
    help_text = subprocess.run([str(INFERD_BIN), "worker", "--help"], capture_output=True,
                               text=True, timeout=30).stdout
    defaults = dict(re.findall(r"^\s+--([a-z0-9-]+)\s.*\(default ([^)]*)\)\s*$", help_text, re.M))
    assert defaults["port"] == "8001", help_text
    assert "queue" not in defaults and re.search(r"--queue .*\(required\)", help_text), help_text
    assert "`--port` 8001" in readme and "`--queue redis://...` required" in readme
    # every other default the worker shows is the README table's
    rows = dict(re.findall(r"^\| `--([a-z0-9-]+)` \| ([^|]*) \|", readme, re.M))
    for opt, value in defaults.items():
        if opt == "port":
            continue
        assert opt in rows, f"--{opt} has no row in the README's table"
        assert value in rows[opt], f"--{opt}: worker --help says {value}, README {rows[opt]!r}"


@pytest.mark.parametrize("bad", ["--webhook-ca-file", "--tls-cert"])
def test_a_failed_start_leases_nothing(server_factory, repo, tmp_path, bad):
    """Every start-up check (here an unreadable webhook CA file, or TLS certificate) comes
    before the workers lease: the job queued before is left as it was."""
    data = tmp_path / "data"
    srv = server_factory(repo, *async_args(data, "--workers", "0"))
    jid = srv.client().submit_ok("rowsum", [[1.0, 2.0, 3.0, 4.0]])
    srv.stop()
    missing = str(tmp_path / "missing.pem")
    opts = ["--webhook-ca-file", missing] if bad == "--webhook-ca-file" else \
        ["--tls-cert", missing, "--tls-key", missing]
    p = subprocess.run([str(INFERD_BIN), "serve", "--models", str(repo), "--port", "0",
                        *async_args(data, "--workers", "2"), *opts],
                       capture_output=True, timeout=60, cwd=str(tmp_path))
    err = p.stderr.decode()
    assert p.returncode != 0 and bad in err, err
    job = server_factory(repo, *async_args(data, "--workers", "0")).client().job(jid)
    assert job["status"] == "queued" and job["attempts"] == 0, job
