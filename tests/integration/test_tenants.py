"""Tenants through the API, on SQLite, Redis and PostgreSQL: a key's jobs, batch jobs and
schedules are its own (404 for another tenant's, never listed, never cancelled or retried),
idempotency keys are per tenant, webhooks carry the tenant, and an admin key sees everyone's."""
import json
import os

import numpy as np
import pytest
import requests

from conftest import async_args, error_message, infer_body, wait_for
from test_auth import add_key, auth

DEADLINE_S = 60


class Tenants:
    def __init__(self, tmp_path, server_factory, repo_dir, trained, queue, *extra):
        trained["binary"].install(repo_dir)
        self.X = trained["binary"].rows(4, seed=11)
        self.expected = trained["binary"].expected(self.X)
        self.tmp = tmp_path
        kf = tmp_path / "inferd.keys"
        self.a = add_key(kf, "team-a", "infer,jobs,batch")
        self.b = add_key(kf, "team-b", "infer,jobs,batch")
        self.a2 = add_key(kf, "team-a-new", "jobs", "--tenant", "team-a")
        self.admin = add_key(kf, "ops", "admin")
        (tmp_path / "in").mkdir()
        (tmp_path / "in" / "rows.jsonl").write_text(
            "".join(json.dumps([float(v) for v in row]) + "\n" for row in self.X))
        self.s = server_factory(repo_dir, "--keys-file", kf, "--webhook-secret", "s3cr3t",
                                *async_args(tmp_path / "data", *extra, queue=queue))
        self.url = self.s.url

    def call(self, method, path, key, body=None, headers=None):
        return requests.request(method, self.url + path, json=body, timeout=60,
                                headers={**auth(key), **(headers or {})})

    def submit(self, key, fail=False, **fields):
        body = {"model": "binary", "max_attempts": 1, **fields}
        if fail:
            body["input_location"] = str(self.tmp / "missing.json")
        else:
            body["input"] = infer_body(self.X)
        r = self.call("POST", "/v1/jobs", key, body)
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def wait(self, key, jid, status):
        wait_for(lambda: self.call("GET", f"/v1/jobs/{jid}", key).json()["status"] == status,
                 DEADLINE_S, f"job {jid} to be {status}")


def listed_ids(t, key, path="/v1/jobs", field="jobs"):
    r = t.call("GET", path + "?limit=1000", key)
    assert r.status_code == 200, r.text
    return {j["id"] for j in r.json()[field]}


def assert_hidden(r, what):
    assert r.status_code == 404, (what, r.status_code, r.text)


@pytest.fixture
def tenants(tmp_path, server_factory, repo_dir, trained, fresh_queue, webhook_receiver):
    t = Tenants(tmp_path, server_factory, repo_dir, trained, fresh_queue())
    t.hook = webhook_receiver
    return t


def test_a_tenant_sees_only_its_own_jobs(tenants):
    t = tenants
    ja = t.submit(t.a, callback_url=t.hook.url + "/a")
    jb = t.submit(t.b)
    fb = t.submit(t.b, fail=True)
    t.wait(t.a, ja, "succeeded")
    t.wait(t.b, jb, "succeeded")
    t.wait(t.b, fb, "failed")
    missing = t.call("GET", "/v1/jobs/01nosuchjob0000000000000", t.a)
    for method, path in (("GET", f"/v1/jobs/{jb}"), ("GET", f"/v1/jobs/{jb}/result"),
                         ("DELETE", f"/v1/jobs/{jb}"), ("POST", f"/v1/jobs/{fb}/retry"),
                         ("GET", f"/v1/jobs/{fb}?wait=1")):
        r = t.call(method, path, t.a)
        assert_hidden(r, f"team-a: {method} {path}")
        # the same answer as an id that does not exist, but for the id itself
        assert error_message(r).replace(jb, "X").replace(fb, "X") == \
            error_message(missing).replace("01nosuchjob0000000000000", "X"), (r.text, missing.text)
    assert t.call("GET", f"/v1/jobs/{fb}", t.b).json()["status"] == "failed", "B's job unchanged"
    # listings
    assert ja in listed_ids(t, t.a) and not {jb, fb} & listed_ids(t, t.a)
    assert {jb, fb} <= listed_ids(t, t.b) and ja not in listed_ids(t, t.b)
    assert {ja, jb, fb} <= listed_ids(t, t.admin)
    # another key of the same tenant sees the tenant's jobs
    assert t.call("GET", f"/v1/jobs/{ja}", t.a2).status_code == 200
    # the owner and admin read the result: the model's predictions
    for key in (t.a, t.admin):
        r = t.call("GET", f"/v1/jobs/{ja}/result", key)
        assert r.status_code == 200, r.text
        got = np.asarray(r.json()["outputs"][0]["data"], dtype=np.float64)
        np.testing.assert_allclose(got, t.expected, atol=1e-6)
    job = t.call("GET", f"/v1/jobs/{ja}", t.a).json()
    assert job["tenant"] == "team-a", job
    # the webhook carries the tenant
    wait_for(lambda: t.hook.received("/a"), DEADLINE_S, "team-a's webhook")
    body = json.loads(t.hook.received("/a")[0]["body"])
    assert body["job"]["tenant"] == "team-a", body
    # admin may retry and cancel anyone's
    r = t.call("POST", f"/v1/jobs/{fb}/retry", t.admin)
    assert r.status_code == 202, r.text
    assert r.json()["tenant"] == "team-b"


def test_idempotency_keys_are_per_tenant(tenants):
    t = tenants
    h = {"Idempotency-Key": "order-42"}
    body = {"model": "binary", "input": infer_body(t.X)}
    ra = t.call("POST", "/v1/jobs", t.a, body, h)
    rb = t.call("POST", "/v1/jobs", t.b, body, h)
    assert ra.status_code == 202 and rb.status_code == 202, (ra.text, rb.text)
    assert ra.json()["id"] != rb.json()["id"], "one key, two tenants: two jobs"
    again = t.call("POST", "/v1/jobs", t.a, body, h)
    assert again.status_code == 200 and again.json()["id"] == ra.json()["id"], again.text
    other = t.call("POST", "/v1/jobs", t.a, {"model": "binary", "input": infer_body(t.X * 2)}, h)
    assert other.status_code == 409, other.text


def test_batch_jobs_and_schedules_are_the_tenants(tenants):
    t = tenants
    defn = {"model": "binary", "input": str(t.tmp / "in"), "output": str(t.tmp / "out-a")}
    r = t.call("POST", "/v1/batch-jobs", t.a, defn)
    assert r.status_code == 202, r.text
    run = r.json()["id"]
    assert r.json()["tenant"] == "team-a"
    r = t.call("POST", "/v1/batch-jobs", t.a,
               dict(defn, output=str(t.tmp / "out-s"), schedule="0 0 1 1 *"))
    assert r.status_code == 201, r.text
    sched = r.json()["id"]
    wait_for(lambda: t.call("GET", f"/v1/batch-jobs/{run}", t.a).json()["status"] == "succeeded",
             DEADLINE_S, "team-a's batch run")
    for method, path in (("GET", f"/v1/batch-jobs/{run}"), ("DELETE", f"/v1/batch-jobs/{run}"),
                         ("GET", f"/v1/batch-jobs/{sched}"),
                         ("POST", f"/v1/batch-jobs/{sched}/run"),
                         ("POST", f"/v1/batch-jobs/{sched}/pause"),
                         ("POST", f"/v1/batch-jobs/{sched}/resume"),
                         ("DELETE", f"/v1/batch-jobs/{sched}")):
        assert_hidden(t.call(method, path, t.b), f"team-b: {method} {path}")
    assert t.call("GET", f"/v1/batch-jobs/{sched}", t.a).json()["status"] == "scheduled"
    ids_b = listed_ids(t, t.b, "/v1/batch-jobs", "batch_jobs")
    assert not {run, sched} & ids_b
    assert {run, sched} <= listed_ids(t, t.a, "/v1/batch-jobs", "batch_jobs")
    assert {run, sched} <= listed_ids(t, t.admin, "/v1/batch-jobs", "batch_jobs")
    # a run now by admin still belongs to the schedule's tenant
    r = t.call("POST", f"/v1/batch-jobs/{sched}/run", t.admin)
    assert r.status_code == 202, r.text
    assert r.json()["tenant"] == "team-a", r.json()
    assert r.json()["id"] in listed_ids(t, t.a, "/v1/batch-jobs", "batch_jobs") or \
        t.call("GET", f"/v1/batch-jobs/{r.json()['id']}", t.a).status_code == 200
    assert_hidden(t.call("GET", f"/v1/batch-jobs/{r.json()['id']}", t.b), "team-b: the run")
