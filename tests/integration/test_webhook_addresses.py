"""Where webhooks may go, and what of a callback URL is shown back.

A ``callback_url`` never reaches inferd's own API, whatever the URL's spelling: an address
literal (127.0.0.1, 127.1, 0.0.0.0, [::ffff:127.0.0.1], a decimal or hex number), ``localhost``
or a host name that resolves to this machine. Refused at submission (400 naming
``callback_url``) when the text shows it; otherwise refused by the notifier at connect time,
against the address libcurl actually connects to, and recorded as a refused attempt. The model
that such a callback would unload stays loaded.

A server that listens beyond loopback (``--host 0.0.0.0``) also refuses loopback, private and
link-local receivers unless ``--webhook-hosts`` names them, and delivers when it does; on the
default (loopback) configuration a receiver on 127.0.0.1 keeps working.

Credentials in a callback URL (``user:password@``) are shown as ``***`` in the job JSON, the
batch-job JSON, the webhook events, errors and logs, while the delivery still sends them.

Nothing asserts on elapsed time: every wait polls with a deadline that names what it waits for.
"""
import base64
import json
import socket

import numpy as np
import pytest
import requests

from conftest import (HTTP_TIMEOUT_S, async_args, check_accepted, error_message, free_port,
                      infer_body, wait_for, write_plugin_model)

MODEL = "rowsum"
SECRET_PW = "pa55-w0rd-XYZ"
DEADLINE_S = 60


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("hook-models")
    write_plugin_model(repo, MODEL, width=4)
    return repo


def job_body(seed=0, **fields):
    X = np.random.default_rng(seed).normal(size=(1, 4)).astype(np.float32)
    return dict({"model": MODEL, "input": infer_body(X)}, **fields)


def local_name():
    """A host name (not "localhost") that resolves only to loopback here, or None."""
    name = socket.gethostname()
    try:
        addrs = {a[4][0] for a in socket.getaddrinfo(name, None, socket.AF_INET)}
    except OSError:
        return None
    if name.lower().rstrip(".") == "localhost" or not addrs or \
            not all(a.startswith("127.") for a in addrs):
        return None
    return name


def own_spellings(port, path):
    """inferd's own address:port as a callback URL, spelled every way the text shows it."""
    return [f"http://127.0.0.1:{port}{path}", f"http://localhost:{port}{path}",
            f"http://LocalHost.:{port}{path}", f"http://0.0.0.0:{port}{path}",
            f"http://127.1:{port}{path}", f"http://2130706433:{port}{path}",
            f"http://0x7f.0.0.1:{port}{path}", f"http://[::ffff:127.0.0.1]:{port}{path}",
            f"http://[::1]:{port}{path}", f"http://x:y@127.0.0.1:{port}{path}",
            f"https://127.0.0.1:{port}{path}"]


def assert_ready(server, what):
    r = requests.get(f"{server.url}/v2/models/{MODEL}/ready", timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 200 and r.json().get("ready") is True, \
        f"{what}: model {MODEL} is no longer loaded: HTTP {r.status_code} {r.text[:200]}"


def wait_notified(client, jid, what):
    """The job's first recorded webhook attempt, once it is final and has one."""
    def attempted():
        job = client.job(jid)
        return job if job["status"] != "queued" and job["status"] != "running" and \
            job["notifications"] else None
    return wait_for(attempted, DEADLINE_S, f"a webhook attempt recorded on job {jid} ({what})")


def unload_path():
    return f"/v2/repository/models/{MODEL}/unload"


def batch_input(tmp_path):
    inp = tmp_path / "batch-in"
    inp.mkdir(exist_ok=True)
    (inp / "a.csv").write_text("1,2,3,4\n5,6,7,8\n")
    return inp


def post_batch(server, **definition):
    return requests.post(f"{server.url}/v1/batch-jobs", json=definition, timeout=HTTP_TIMEOUT_S)


# ---------------------------------------------------------------------------
# inferd's own address and port: refused always
# ---------------------------------------------------------------------------


def test_callback_to_own_port_refused_at_submission(server_factory, repo, tmp_path,
                                                    webhook_receiver):
    s = server_factory(repo, *async_args(tmp_path / "data", "--workers", "1"))
    c = s.client()
    for url in own_spellings(s.port, unload_path()):
        r = c.post("/v1/jobs", json=job_body(callback_url=url))
        assert r.status_code == 400, f"{url}: HTTP {r.status_code}: {r.text[:300]}"
        msg = error_message(r)
        assert "callback_url" in msg and "refused" in msg and "listens" in msg, f"{url}: {msg}"
        assert "y@" not in msg, f"{url}: credentials shown back: {msg}"
    inp = batch_input(tmp_path)
    r = post_batch(s, model=MODEL, input=str(inp), output=str(tmp_path / "out"),
                   callback_url=f"http://127.1:{s.port}{unload_path()}")
    assert r.status_code == 400, f"batch job: HTTP {r.status_code}: {r.text[:300]}"
    assert "callback_url" in error_message(r) and "refused" in error_message(r), r.text
    assert_ready(s, "after the refused submissions")
    # another port on loopback is still a fine receiver when inferd listens on loopback
    jid = c.submit_ok(MODEL, np.ones((1, 4), np.float32),
                      callback_url=webhook_receiver.url + "/loopback-ok")
    wait_for(lambda: webhook_receiver.received("/loopback-ok"), DEADLINE_S,
             "the webhook to the loopback receiver")
    assert c.wait_final(jid)["status"] == "succeeded"


def test_callback_through_a_name_to_own_port_is_never_delivered(server_factory, repo, tmp_path,
                                                                webhook_receiver, fresh_queue):
    name = local_name()
    if not name:
        pytest.skip("this machine's host name does not resolve to loopback only")
    s = server_factory(repo, *async_args(tmp_path / "data", "--workers", "1",
                                         "--webhook-attempts", "3", "--webhook-backoff-ms", "50",
                                         queue=fresh_queue()))
    c = s.client()
    url = f"http://{name}:{s.port}{unload_path()}"
    jid = check_accepted(c.post("/v1/jobs", json=job_body(callback_url=url)),
                         "a callback through a host name (the text cannot show it)")
    job = wait_notified(c, jid, "callback through a name to inferd's own port")
    assert len(job["notifications"]) == 1, f"a refused delivery was retried: {job}"
    n = job["notifications"][0]
    assert n["status_code"] == 0 and "refused" in (n["error"] or ""), n
    assert "listens" in n["error"], n
    assert_ready(s, "after the callback through a name")
    # the same through a batch job's webhook
    inp = batch_input(tmp_path)
    r = post_batch(s, model=MODEL, input=str(inp), output=str(tmp_path / "out"),
                   callback_url=url)
    assert r.status_code == 202, r.text
    bid = r.json()["id"]
    wait_for(lambda: requests.get(f"{s.url}/v1/batch-jobs/{bid}", timeout=HTTP_TIMEOUT_S)
             .json()["status"] in ("succeeded", "failed"), DEADLINE_S, f"batch job {bid} to end")
    wait_for(lambda: f"event=evt_{bid}" in s.log() and "webhook given up" in s.log(), DEADLINE_S,
             "the batch webhook to be given up (refused)")
    assert_ready(s, "after the batch job's callback through a name")
    # and webhooks to a real receiver still go out
    jid = c.submit_ok(MODEL, np.ones((1, 4), np.float32),
                      callback_url=webhook_receiver.url + "/after")
    wait_for(lambda: webhook_receiver.received("/after"), DEADLINE_S, "the later webhook")


def test_model_config_callback_url_follows_the_rules(server_factory, tmp_path):
    port = free_port()
    repo = tmp_path / "models"
    write_plugin_model(repo, "own", width=4, extra={
        "callback_url": f"http://127.0.0.1:{port}/v2/repository/models/{MODEL}/unload"})
    name = local_name()
    target = name or "localhost"
    write_plugin_model(repo, MODEL, width=4, extra={
        "callback_url": f"http://{target}:{port}{unload_path()}"})
    s = server_factory(repo, *async_args(tmp_path / "data", "--workers", "1"), port=port)
    c = s.client()
    r = c.get("/v2/models/own/ready")
    assert r.status_code != 200, f"a model whose callback_url is inferd's own API loaded: {r.text}"
    wait_for(lambda: "callback_url" in s.log() and "refused" in s.log(), DEADLINE_S,
             "the log to say why model 'own' did not load")
    if name:  # the text cannot show it: the notifier refuses when it connects
        r = c.post(f"/v2/models/{MODEL}/infer", json=infer_body(np.ones((1, 4), np.float32)),
                   headers={"Prefer": "respond-async"})
        jid = check_accepted(r, "async infer with the model's default callback_url")
        job = wait_notified(c, jid, "the model's default callback_url")
        assert "refused" in (job["notifications"][0]["error"] or ""), job
        assert_ready(s, "after the model's default callback")
    else:
        r = c.get(f"/v2/models/{MODEL}/ready")
        assert r.status_code != 200, "a model whose callback_url is localhost:<own port> loaded"


def test_api_does_not_act_on_webhook_deliveries(server_factory, repo, tmp_path):
    """Another inferd (an ``inferd worker`` on this host, or one elsewhere) cannot drive this
    API through a callback_url: a request that carries X-Inferd-Event-Id is refused."""
    s = server_factory(repo, *async_args(tmp_path / "data", "--workers", "1"))
    r = requests.post(s.url + unload_path(), timeout=HTTP_TIMEOUT_S,
                      headers={"X-Inferd-Event-Id": "evt_x", "Content-Type": "application/json"},
                      data=b"{}")
    assert r.status_code == 400, f"HTTP {r.status_code}: {r.text[:300]}"
    assert "webhook" in error_message(r), r.text
    assert_ready(s, "after a webhook-shaped request to unload")
    r = requests.post(s.url + unload_path(), timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 200, "an ordinary unload request still works"


def test_worker_callback_to_the_api_never_acts(server_factory, worker_factory, repo, tmp_path,
                                               shared_redis):
    """serve (--workers 0) and an ``inferd worker`` share a Redis queue; a callback through a
    name to serve's port is refused by serve's notifier (its own port) or, when the worker
    sends it, by serve's API."""
    name = local_name()
    if not name:
        pytest.skip("this machine's host name does not resolve to loopback only")
    q = shared_redis.fresh_url()
    s = server_factory(repo, *async_args(tmp_path / "data", "--workers", "0",
                                         "--webhook-attempts", "2", "--webhook-backoff-ms", "50",
                                         queue=q))
    worker_factory(repo, q, "--workers", "1", "--webhook-attempts", "2",
                   "--webhook-backoff-ms", "50")
    c = s.client()
    jids = [check_accepted(c.post("/v1/jobs", json=job_body(
        i, callback_url=f"http://{name}:{s.port}{unload_path()}"))) for i in range(4)]
    for jid in jids:
        job = wait_notified(c, jid, "a callback to serve's API")
        n = job["notifications"][-1]
        assert "refused" in (n["error"] or "") or n["status_code"] == 400, job
    assert_ready(s, "after callbacks to serve's API delivered by serve or the worker")


# ---------------------------------------------------------------------------
# listening beyond loopback: loopback, private and link-local need --webhook-hosts
# ---------------------------------------------------------------------------

LOCAL_URLS = ["http://localhost:9/x", "http://10.1.2.3/x", "http://172.16.0.1/x",
              "http://192.168.1.1/x", "http://169.254.169.254/latest/meta-data/",
              "http://100.64.0.1/x", "http://[fe80::1]/x", "http://[fd00::1]/x",
              "http://[::1]:9/x", "http://0.0.0.0:9/x", "http://[::ffff:10.0.0.1]/x"]


def test_beyond_loopback_refuses_local_receivers_unless_named(server_factory, repo, tmp_path,
                                                             webhook_receiver):
    recv = webhook_receiver
    s = server_factory(repo, *async_args(tmp_path / "data", "--workers", "1", "--host", "0.0.0.0",
                                         "--allow-unauthenticated", "--webhook-attempts", "1"))
    c = s.client()
    for url in [recv.url + "/refused"] + LOCAL_URLS:
        r = c.post("/v1/jobs", json=job_body(callback_url=url))
        assert r.status_code == 400, f"{url}: HTTP {r.status_code}: {r.text[:300]}"
        msg = error_message(r)
        assert "callback_url" in msg and "refused" in msg and "--webhook-hosts" in msg, \
            f"{url}: {msg}"
    r = post_batch(s, model=MODEL, input=str(batch_input(tmp_path)), output=str(tmp_path / "o"),
                   callback_url=recv.url + "/refused")
    assert r.status_code == 400 and "callback_url" in error_message(r), r.text
    # a public address or a name is fine at submission (delivery fails: no network here)
    for url in ("http://198.51.100.7/x", "https://hooks.example.com/x"):
        check_accepted(c.post("/v1/jobs", json=job_body(callback_url=url)), url)
    name = local_name()
    if name:  # through a name: refused where it connects, never sent
        port = recv.url.rsplit(":", 1)[1]
        jid = check_accepted(c.post("/v1/jobs", json=job_body(
            callback_url=f"http://{name}:{port}/by-name")))
        job = wait_notified(c, jid, "a callback through a name to loopback")
        n = job["notifications"][0]
        assert "refused" in (n["error"] or "") and "loopback" in n["error"], n
        assert not recv.received("/by-name"), "a refused webhook reached the receiver"
    assert not recv.received("/refused")
    assert_ready(s, "beyond loopback")

    # --webhook-hosts names the receiver: delivered; inferd's own port still refused
    named = "127.0.0.1" + (f",{name}" if name else "")
    s2 = server_factory(repo, *async_args(tmp_path / "data2", "--workers", "1", "--host",
                                          "0.0.0.0", "--allow-unauthenticated",
                                          "--webhook-hosts", named))
    c2 = s2.client()
    c2.submit_ok(MODEL, np.ones((1, 4), np.float32), callback_url=recv.url + "/named")
    wait_for(lambda: recv.received("/named"), DEADLINE_S, "the webhook to a named loopback host")
    if name:
        port = recv.url.rsplit(":", 1)[1]
        c2.submit_ok(MODEL, np.ones((1, 4), np.float32),
                     callback_url=f"http://{name}:{port}/named-by-name")
        wait_for(lambda: recv.received("/named-by-name"), DEADLINE_S,
                 "the webhook to a named host name that resolves to loopback")
    r = c2.post("/v1/jobs", json=job_body(
        callback_url=f"http://127.0.0.1:{s2.port}{unload_path()}"))
    assert r.status_code == 400 and "listens" in error_message(r), r.text
    r = c2.post("/v1/jobs", json=job_body(callback_url="http://10.1.2.3/x"))
    assert r.status_code == 400 and "--webhook-hosts" in error_message(r), r.text
    assert_ready(s2, "with --webhook-hosts")


# ---------------------------------------------------------------------------
# credentials in a callback URL are never shown back
# ---------------------------------------------------------------------------


def test_callback_userinfo_is_masked_everywhere(server_factory, repo, tmp_path,
                                                webhook_receiver, fresh_queue):
    recv = webhook_receiver
    s = server_factory(repo, *async_args(tmp_path / "data", "--workers", "1",
                                         "--log-level", "debug", queue=fresh_queue()))
    c = s.client()
    host = recv.url[len("http://"):]
    url = f"http://hookuser:{SECRET_PW}@{host}/masked"
    shown = f"http://***@{host}/masked"
    auth = "Basic " + base64.b64encode(f"hookuser:{SECRET_PW}".encode()).decode()

    r = c.post("/v1/jobs", json=job_body(callback_url=url))
    jid = check_accepted(r)
    assert SECRET_PW not in r.text
    job = c.wait_final(jid)
    assert job["callback_url"] == shown, job
    hook = wait_for(lambda: recv.received("/masked"), DEADLINE_S, "the job's webhook")[0]
    assert hook["headers"].get("Authorization") == auth, "the delivery lost the credentials"
    assert SECRET_PW.encode() not in hook["body"]
    assert json.loads(hook["body"])["job"]["callback_url"] == shown
    listed = c.get("/v1/jobs").text
    assert SECRET_PW not in listed and shown in listed.replace("\\/", "/")

    # batch jobs: the answer, GET, list, the webhook event; and a schedule's definition
    r = post_batch(s, model=MODEL, input=str(batch_input(tmp_path)), output=str(tmp_path / "o"),
                   callback_url=url + "-batch")
    assert r.status_code == 202, r.text
    assert SECRET_PW not in r.text and r.json()["callback_url"] == shown + "-batch", r.text
    bid = r.json()["id"]
    hook = wait_for(lambda: recv.received("/masked-batch"), DEADLINE_S, "the batch webhook")[0]
    assert hook["headers"].get("Authorization") == auth
    assert json.loads(hook["body"])["batch_job"]["callback_url"] == shown + "-batch"
    assert SECRET_PW.encode() not in hook["body"]
    got = requests.get(f"{s.url}/v1/batch-jobs/{bid}", timeout=HTTP_TIMEOUT_S)
    assert SECRET_PW not in got.text and got.json()["callback_url"] == shown + "-batch"
    r = post_batch(s, model=MODEL, input=str(batch_input(tmp_path)), output=str(tmp_path / "o2"),
                   callback_url=url + "-sched", schedule="0 3 * * *")
    assert r.status_code == 201, r.text
    assert SECRET_PW not in r.text and r.json()["callback_url"] == shown + "-sched"
    assert SECRET_PW not in requests.get(f"{s.url}/v1/batch-jobs", timeout=HTTP_TIMEOUT_S).text

    # errors
    for bad in (f"ftp://hookuser:{SECRET_PW}@{host}/x", f"http://hookuser:{SECRET_PW}@"):
        r = c.post("/v1/jobs", json=job_body(callback_url=bad))
        assert r.status_code == 400, r.text
        assert SECRET_PW not in r.text, f"an error shows the password: {r.text}"
    # and the log, at debug level, never holds it
    assert SECRET_PW not in s.log()
