"""Webhooks to https receivers: certificates are verified; --webhook-ca-file trusts a private CA.

The receiver is conftest's WebhookReceiver with a TLS context whose certificate (127.0.0.1)
the test's own CA signed (conftest's ``test_ca``). Without the CA file, each attempt fails as a
certificate error recorded in the job's ``notifications`` and is retried as any failed attempt
is; with it, the signed webhook arrives.
"""
import hashlib
import hmac
import json
import subprocess
import time

import pytest

from conftest import INFERD_BIN, WebhookReceiver, async_args, wait_for, write_plugin_model

SECRET = "webhook-tls-secret-0010"
ROWS = [[1.0, 2.0, 3.0, 4.0]]


@pytest.fixture
def repo(tmp_path):
    d = tmp_path / "models"
    write_plugin_model(d, "rowsum", width=4)
    return d


@pytest.fixture
def tls_receiver(test_ca):
    r = WebhookReceiver(tls=test_ca.server_context())
    yield r
    r.close()


def start(server_factory, repo, tmp_path, *extra):
    return server_factory(repo, *async_args(tmp_path / f"data-{time.monotonic_ns()}",
                                            "--webhook-secret", SECRET,
                                            "--webhook-attempts", "3",
                                            "--webhook-backoff-ms", "50", *extra))


def submit(c, url):
    return c.submit_ok("rowsum", ROWS, callback_url=url)


def notes_of(c, jid, n):
    return wait_for(lambda: len(c.job(jid)["notifications"]) >= n and c.job(jid)["notifications"],
                    30, f"{n} webhook attempts in job {jid}'s notifications")


def test_https_receiver_with_an_unknown_ca_is_a_certificate_error(server_factory, repo, tmp_path,
                                                                  tls_receiver, test_ca):
    assert tls_receiver.url.startswith("https://")
    for extra in ((), ("--webhook-ca-file", str(test_ca.other_ca_cert))):
        srv = start(server_factory, repo, tmp_path, *extra)
        c = srv.client()
        jid = submit(c, tls_receiver.url + "/hook/unknown-ca")
        notes = notes_of(c, jid, 3)   # every attempt made, as for any failure
        assert len(notes) == 3, notes
        for n in notes:
            assert "certificate verification failed" in n["error"] and \
                "--webhook-ca-file" in n["error"], n
            assert not n["status_code"], n
        assert not tls_receiver.received("/hook/unknown-ca")
        assert SECRET not in srv.log()
        srv.stop()


def test_webhook_ca_file_trusts_a_private_ca(server_factory, repo, tmp_path, tls_receiver,
                                             test_ca):
    srv = start(server_factory, repo, tmp_path, "--webhook-ca-file", test_ca.ca_cert)
    c = srv.client()
    jid = submit(c, tls_receiver.url + "/hook/trusted")
    notes = notes_of(c, jid, 1)
    assert notes[0]["status_code"] == 200 and not notes[0]["error"], notes
    got = tls_receiver.received("/hook/trusted")
    assert len(got) == 1, got
    want = "sha256=" + hmac.new(SECRET.encode(), got[0]["body"], hashlib.sha256).hexdigest()
    assert got[0]["headers"].get("X-Inferd-Signature") == want
    assert json.loads(got[0]["body"])["job"]["id"] == jid
    assert SECRET not in srv.log() and SECRET not in json.dumps(c.job(jid))
    assert SECRET not in c.get("/metrics").text


@pytest.mark.parametrize("bad,says", [("missing.pem", "cannot read"),
                                      ("key", "holds no PEM certificate")])
def test_a_bad_webhook_ca_file_stops_the_start(repo, tmp_path, test_ca, bad, says):
    path = test_ca.server_key if bad == "key" else tmp_path / bad
    p = subprocess.run([str(INFERD_BIN), "serve", "--models", str(repo), "--port", "0",
                        "--data-dir", str(tmp_path / "data"), "--webhook-ca-file", str(path)],
                       capture_output=True, timeout=60, cwd=str(tmp_path))
    err = p.stderr.decode()
    assert p.returncode != 0 and "--webhook-ca-file" in err and says in err, err

