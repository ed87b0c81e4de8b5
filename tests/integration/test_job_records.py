"""The job record tells the truth, on SQLite and on Redis: each attempt's start, end, worker
and error (attempts_history), kept across attempts and redrives; a redriven job keeps its own
max_attempts; a running job that cannot stop at once is `cancelling`; listings show a job as
GET /v1/jobs/{id} does (webhook notifications included); failed jobs are logged and counted
per model; POST /v1/jobs/retry redrives in bulk.

Every wait polls against a deadline that names what it waits for.
"""
import numpy as np
import pytest

from conftest import async_args, metric_value, wait_for
from upstreams import Reply, Script, Upstream

POISON = np.array([[-999, 1, 1, 1]], dtype=np.float32)  # the plugin fails this row, always
ONES = np.ones((1, 4), dtype=np.float32)


@pytest.fixture
def upstream():
    started = []

    def start(behaviour):
        u = Upstream(behaviour, name="scripted").start()
        started.append(u)
        return u
    yield start
    for u in started:
        u.stop()


@pytest.fixture
def repo(tmp_path):
    from conftest import write_plugin_model
    repo = tmp_path / "models"
    for name in ("rowsum", "other"):
        write_plugin_model(repo, name, width=4, extra={"max_batch_size": 1, "instances": 2})
    return repo


def http_model(repo, name, url):
    import json
    d = repo / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(
        {"backend": "http", "url": url, "protocol": "json", "timeout_s": 30}))


def start(server_factory, repo, tmp_path, fresh_queue, *args):
    return server_factory(repo, *async_args(tmp_path / "data", "--workers", "1",
                                            "--worker-batch", "1", *args, queue=fresh_queue()))


def listed(client, jid, **params):
    """The job as GET /v1/jobs lists it (None when it is not in the page)."""
    r = client.get("/v1/jobs", params=params)
    assert r.status_code == 200, f"GET /v1/jobs {params}: HTTP {r.status_code}: {r.text[:300]}"
    return next((j for j in r.json()["jobs"] if j["id"] == jid), None)


def errors_of(job):
    return [a["error"] for a in job["attempts_history"]]


def test_attempts_history_and_redrive_keep_what_happened(server_factory, upstream, repo,
                                                         tmp_path, fresh_queue):
    up = upstream(Script({
        "flaky": [Reply(500, {"error": "overloaded"}), Reply(503, {"error": "still overloaded"}),
                  Reply(200, {"ok": "third time"})],
        "twice": [Reply(500, {"error": "first boom"}), Reply(500, {"error": "second boom"}),
                  Reply(200, {"ok": "after redrive"})],
    }, key=lambda call: call.json["case"]))
    http_model(repo, "api", up.url + "/api")
    srv = start(server_factory, repo, tmp_path, fresh_queue)
    c = srv.client()
    worker_id = wait_for(lambda: c.get("/v1/workers").json()["workers"], 30,
                         "serve's pool in /v1/workers")[0]["id"]

    # succeeded on attempt 3: attempts 1 and 2 still say why they failed
    flaky = c.submit_ok("api", input={"case": "flaky"}, max_attempts=3)
    job = c.wait_final(flaky, 60, "500, 503, then 200")
    assert (job["status"], job["attempts"]) == ("succeeded", 3), job
    errs = errors_of(job)
    assert len(errs) == 3 and "overloaded" in errs[0] and "still overloaded" in errs[1], errs
    assert errs[2] is None and job["error"] is None, job
    for n, a in enumerate(job["attempts_history"], 1):
        assert a["attempt"] == n and a["worker"] == worker_id, a
        assert a["started_at"] and a["ended_at"] and a["ended_at"] >= a["started_at"], a
    assert listed(c, flaky)["attempts_history"] == job["attempts_history"]

    # failed after its 2 attempts; a redrive gives it its own max_attempts (2) again, and the
    # history of the first round stays
    twice = c.submit_ok("api", input={"case": "twice"}, max_attempts=2)
    job = c.wait_final(twice, 60, "two 500s")
    assert (job["status"], job["attempts"], job["max_attempts"]) == ("failed", 2, 2), job
    r = c.post(f"/v1/jobs/{twice}/retry")
    assert r.status_code == 202, r.text
    assert r.json()["max_attempts"] == 2, f"a redriven job keeps its max_attempts: {r.json()}"
    job = c.wait_final(twice, 60, "the redriven job")
    assert (job["status"], job["attempts"], job["max_attempts"]) == ("succeeded", 3, 2), job
    errs = errors_of(job)
    assert "first boom" in errs[0] and "second boom" in errs[1] and errs[2] is None, errs


def test_redrive_budget_is_the_jobs_own(server_factory, upstream, repo, tmp_path, fresh_queue):
    up = upstream(Script(default=[Reply(500, {"error": "always"})]))
    http_model(repo, "api", up.url + "/api")
    srv = start(server_factory, repo, tmp_path, fresh_queue, "--max-attempts", "5")
    c = srv.client()
    jid = c.submit_ok("api", input={"case": "always"}, max_attempts=2)
    assert c.wait_final(jid, 60)["attempts"] == 2
    assert c.post(f"/v1/jobs/{jid}/retry").status_code == 202
    job = c.wait_final(jid, 60, "the redriven job's two more attempts")
    assert (job["status"], job["attempts"], job["max_attempts"]) == ("failed", 4, 2), \
        f"a redrive runs the job's own 2 attempts again, not --max-attempts 5: {job}"
    assert len(job["attempts_history"]) == 4 and up.count() == 4


def test_notifications_in_listings_and_across_redrive(server_factory, repo, tmp_path,
                                                      fresh_queue, gates, webhook_receiver):
    srv = start(server_factory, repo, tmp_path, fresh_queue)
    c = srv.client()
    jid = c.submit_ok("rowsum", POISON, max_attempts=1,
                      callback_url=webhook_receiver.url + "/hook")
    assert c.wait_final(jid, 60)["status"] == "failed"
    job = wait_for(lambda: (lambda j: j if j["notifications"] else None)(c.job(jid)), 60,
                   "the failed job's webhook to be delivered and recorded")
    assert job["notifications"][0]["status_code"] == 200, job
    assert listed(c, jid, status="failed")["notifications"] == job["notifications"], \
        "GET /v1/jobs shows a job's notifications as GET /v1/jobs/{id} does"
    # redriven while the only worker is held: queued again, and what happened stays
    gate = gates()
    gate.hold(c)
    assert c.post(f"/v1/jobs/{jid}/retry").status_code == 202
    again = c.job(jid)
    assert again["status"] == "queued", again
    assert again["notifications"] == job["notifications"], again
    assert errors_of(again) == errors_of(job) and "poison" in errors_of(job)[0], again
    assert listed(c, jid, status="queued")["notifications"] == job["notifications"]
    gate.release()
    assert c.wait_final(jid, 60)["status"] == "failed"
    job = wait_for(lambda: (lambda j: j if len(j["notifications"]) == 2 else None)(c.job(jid)),
                   60, "the second failure's webhook, beside the first")
    assert len({n["event_id"] for n in job["notifications"]}) == 2, job


def test_delete_of_a_job_that_cannot_stop_is_cancelling(server_factory, repo, tmp_path,
                                                        fresh_queue, gates):
    srv = start(server_factory, repo, tmp_path, fresh_queue)
    c = srv.client()
    stubborn = gates()
    stubborn.X[0, 0] = -996  # held like a gate, but the model ignores cancellation
    stubborn.hold(c)
    r = c.session.delete(f"{c.url}/v1/jobs/{stubborn.id}", timeout=30)
    assert r.status_code == 202, f"DELETE of a job that cannot stop: {r.status_code} {r.text}"
    assert r.json()["status"] == "cancelling" and r.json()["cancel_requested"], r.json()
    assert c.job(stubborn.id)["status"] == "cancelling"
    assert listed(c, stubborn.id, status="cancelling") is not None
    assert listed(c, stubborn.id, status="running") is None
    stubborn.release()
    job = c.wait_final(stubborn.id, 60, "the cancelling job to stop")
    assert job["status"] == "cancelled", job
    assert c.get("/v1/jobs", params={"status": "bogus"}).status_code == 400


def test_failed_jobs_are_logged_and_counted_per_model(server_factory, repo, tmp_path,
                                                      fresh_queue, webhook_receiver):
    srv = start(server_factory, repo, tmp_path, fresh_queue)
    c = srv.client()
    hook = webhook_receiver.url.replace("http://", "http://user:hunter2pw@") + "/hook"
    jid = c.submit_ok("rowsum", POISON, max_attempts=1, callback_url=hook)
    ok = c.submit_ok("other", ONES)
    assert c.wait_final(jid, 60)["status"] == "failed"
    assert c.wait_final(ok, 60)["status"] == "succeeded"
    line = wait_for(lambda: next((ln for ln in srv.log().splitlines()
                                  if 'msg="job failed"' in ln and jid in ln), None), 30,
                    "the failed job's log line")
    assert "model=rowsum" in line and "attempts=1" in line and "poison" in line, line
    assert "hunter2pw" not in srv.log(), "a callback URL's password reached the log"
    text = c.metrics_text()
    assert metric_value(text, "inferd_job_attempts_total",
                        {"model": "rowsum", "outcome": "failed"}) == 1, text
    assert metric_value(text, "inferd_job_attempts_total",
                        {"model": "other", "outcome": "succeeded"}) == 1, text


def test_bulk_redrive_by_filter(server_factory, repo, tmp_path, fresh_queue, gates):
    srv = start(server_factory, repo, tmp_path, fresh_queue)
    c = srv.client()
    mine = [c.submit_ok("rowsum", POISON, max_attempts=1) for _ in range(3)]
    theirs = c.submit_ok("other", POISON, max_attempts=1)
    for jid in mine + [theirs]:
        assert c.wait_final(jid, 60)["status"] == "failed"
    gate = gates()
    gate.hold(c)  # the redriven jobs stay queued while we look
    for bad, what in (({"status": "succeeded"}, "status"), ({"nope": 1}, "nope"),
                      ({"limit": 0}, "limit"), ("[1]", "object")):
        r = c.post("/v1/jobs/retry", **({"data": bad} if isinstance(bad, str) else {"json": bad}))
        assert r.status_code == 400 and what in r.json()["error"], (bad, r.status_code, r.text)
    r = c.post("/v1/jobs/retry", json={"status": "failed", "model": "rowsum"})
    assert r.status_code == 200 and r.json() == {"retried": 3}, r.text
    assert {c.job(j)["status"] for j in mine} == {"queued"}
    assert c.job(theirs)["status"] == "failed", "another model's job was redriven"
    r = c.post("/v1/jobs/retry", json={"status": "failed", "model": "rowsum"})
    assert r.json() == {"retried": 0}, r.text
    gate.release()
    for jid in mine:
        job = c.wait_final(jid, 60, "a redriven job")
        assert (job["status"], job["attempts"], job["max_attempts"]) == ("failed", 2, 1), job
    r = c.post("/v1/jobs/retry", json={})  # every failed or expired job
    assert r.json() == {"retried": 4}, r.text
