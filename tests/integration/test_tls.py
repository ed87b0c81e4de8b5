"""HTTPS in: --tls-cert/--tls-key serve HTTPS, --tls-client-ca requires client certificates
(mutual TLS), and SIGHUP re-reads them without dropping open connections. The certificates
come from the suite's own CA (conftest's ``test_ca``, made with the openssl CLI)."""
import http.client
import json
import shutil
import signal
import socket
import ssl
import subprocess

import pytest
import requests

from conftest import (READY_DEADLINE_S, assert_close, infer_body, metric_value, output_array,
                      wait_for, write_plugin_model)

TIMEOUT_S = 30


def start_tls(server_factory, repo, ca_file, *extra, client_cert=None):
    """An inferd serve with ``extra`` TLS flags, ready over HTTPS (verified with ``ca_file``)."""
    srv = server_factory(repo, *extra, wait_ready=False)
    srv.url = f"https://127.0.0.1:{srv.port}"

    def ready():
        assert srv.alive(), f"inferd exited:\n{srv.log_tail()}"
        return requests.get(srv.url + "/v2/health/ready", verify=str(ca_file), cert=client_cert,
                            timeout=5).status_code == 200

    wait_for(ready, READY_DEADLINE_S, "inferd to answer GET /v2/health/ready over HTTPS")
    return srv


def tls_args(ca, cert=None, key=None):
    return ["--tls-cert", str(cert or ca.server_cert), "--tls-key", str(key or ca.server_key)]


def served_subject(port, cafile):
    """The CN of the certificate a new TLS connection to ``port`` is served."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            return dict(x[0] for x in s.getpeercert()["subject"])["commonName"]


def keepalive_infer(conn, model, X):
    body = json.dumps(infer_body(X)).encode()
    conn.request("POST", f"/v2/models/{model}/infer", body=body,
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    assert r.status == 200, f"HTTP {r.status}: {data[:300]!r}"
    assert r.getheader("Connection", "").lower() != "close"
    return output_array(json.loads(data), X.shape[0])


@pytest.fixture
def binary_repo(trained, repo_dir):
    trained["binary"].install(repo_dir)
    return repo_dir


def no_secret_in(log, *key_files):
    for kf in key_files:
        lines = [l for l in open(kf).read().splitlines() if l and not l.startswith("-----")]
        for line in lines[1:4]:
            assert line not in log, f"a line of {kf} reached the log"
    assert "PRIVATE KEY" not in log


def test_curl_and_requests_verify_and_infer(test_ca, trained, binary_repo, server_factory):
    m = trained["binary"]
    srv = start_tls(server_factory, binary_repo, test_ca.ca_cert, *tls_args(test_ca))
    assert "url=https://127.0.0.1:" in srv.log()
    X = m.rows(5, seed=11)
    # python3-requests, verifying the chain and the name
    r = requests.post(srv.url + "/v2/models/binary/infer", json=infer_body(X),
                      verify=str(test_ca.ca_cert), timeout=TIMEOUT_S)
    assert r.status_code == 200, r.text
    assert_close(output_array(r.json(), 5), m.expected(X), "requests over HTTPS")
    # curl --cacert, by name (localhost is in the certificate too)
    out = subprocess.run(
        ["curl", "-sS", "--fail", "--max-time", str(TIMEOUT_S), "--cacert", str(test_ca.ca_cert),
         "-H", "Content-Type: application/json", "--data-binary", json.dumps(infer_body(X)),
         f"https://localhost:{srv.port}/v2/models/binary/infer"],
        capture_output=True, text=True, timeout=TIMEOUT_S + 10)
    assert out.returncode == 0, out.stderr
    assert_close(output_array(json.loads(out.stdout), 5), m.expected(X), "curl over HTTPS")
    # a client that does not trust the CA refuses the server
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(srv.url + "/v2/health/ready", timeout=TIMEOUT_S)
    no_secret_in(srv.log(), test_ca.server_key)


def test_keepalive_https_client_gets_clean_answers(test_ca, trained, binary_repo,
                                                   server_factory):
    """Several inferences on one HTTP/1.1 keep-alive HTTPS connection: no raw interim bytes
    (the hang-up probe of plain HTTP) may corrupt the TLS stream."""
    m = trained["binary"]
    srv = start_tls(server_factory, binary_repo, test_ca.ca_cert, *tls_args(test_ca))
    ctx = ssl.create_default_context(cafile=str(test_ca.ca_cert))
    conn = http.client.HTTPSConnection("127.0.0.1", srv.port, context=ctx, timeout=TIMEOUT_S)
    try:
        first_sock = None
        for i in range(8):
            X = m.rows(1 + i, seed=100 + i)
            assert_close(keepalive_infer(conn, "binary", X), m.expected(X), f"inference {i}")
            first_sock = first_sock or conn.sock
            assert conn.sock is first_sock, "the connection was not kept alive"
    finally:
        conn.close()


def test_tls_client_that_hangs_up_is_dropped_from_the_queue(test_ca, trained, repo_dir,
                                                           server_factory):
    """Without the interim probe, the end of a TLS client's connection while its request is
    queued still counts as a hang-up (499), and a queued TLS client that stays is answered."""
    write_plugin_model(repo_dir, name="held", width=4, extra={"instances": 1, "max_batch_size": 1})
    srv = start_tls(server_factory, repo_dir, test_ca.ca_cert, *tls_args(test_ca))
    ctx = ssl.create_default_context(cafile=str(test_ca.ca_cert))

    def send(row):
        conn = http.client.HTTPSConnection("127.0.0.1", srv.port, context=ctx, timeout=60)
        body = json.dumps({"inputs": [{"name": "input__0", "datatype": "FP32", "shape": [1, 4],
                                       "data": row}]}).encode()
        conn.request("POST", "/v2/models/held/infer", body=body,
                     headers={"Content-Type": "application/json"})
        return conn

    def metric(name, labels):
        r = requests.get(srv.url + "/metrics", verify=str(test_ca.ca_cert), timeout=TIMEOUT_S)
        return metric_value(r.text, name, labels) or 0

    blocker = send([-998, 3000, 0, 0])
    wait_for(lambda: metric("inferd_inflight_requests", {"model": "held"}) >= 1, 60,
             "the blocking request to be admitted")
    stayer = send([1, 2, 3, 4])
    quitter = send([1, 2, 3, 5])
    wait_for(lambda: metric("inferd_inflight_requests", {"model": "held"}) >= 3, 60,
             "two requests to queue behind it")
    quitter.close()
    wait_for(lambda: metric("inferd_requests_total", {"model": "held", "status": "499"}) >= 1,
             60, "the hung-up TLS client to be counted with status 499")
    for conn, want in ((blocker, -998 + 3000), (stayer, 10)):
        r = conn.getresponse()
        assert r.status == 200
        assert json.loads(r.read())["outputs"][0]["data"] == [want]
        conn.close()


def test_plain_http_to_the_tls_port_fails_cleanly(test_ca, trained, binary_repo,
                                                  server_factory):
    m = trained["binary"]
    srv = start_tls(server_factory, binary_repo, test_ca.ca_cert, *tls_args(test_ca))
    for _ in range(3):
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(f"http://127.0.0.1:{srv.port}/v2/health/ready", timeout=10)
    # a raw HTTP request gets no HTTP answer, and the connection ends (no hang)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            got = s.recv(4096)
        except ConnectionResetError:
            got = b""
        assert not got.startswith(b"HTTP/"), got
    X = m.rows(3, seed=5)
    r = requests.post(srv.url + "/v2/models/binary/infer", json=infer_body(X),
                      verify=str(test_ca.ca_cert), timeout=TIMEOUT_S)
    assert r.status_code == 200, r.text
    assert_close(output_array(r.json(), 3), m.expected(X), "after plain HTTP attempts")


def test_mutual_tls_refuses_clients_without_the_right_certificate(test_ca, binary_repo,
                                                                  server_factory):
    good = (str(test_ca.client_cert), str(test_ca.client_key))
    srv = start_tls(server_factory, binary_repo, test_ca.ca_cert, *tls_args(test_ca),
                    "--tls-client-ca", str(test_ca.ca_cert), client_cert=good)
    other_cert, other_key = test_ca.issue("client-other", "client", usage="clientAuth",
                                          ca=(test_ca.other_ca_cert, test_ca.other_ca_key))
    url = srv.url + "/v2/health/ready"
    ca = str(test_ca.ca_cert)
    # no certificate: refused at the handshake (or the connection is closed), never served
    with pytest.raises(requests.exceptions.RequestException):
        requests.get(url, verify=ca, timeout=TIMEOUT_S)
    # a certificate with the same name from another CA: refused
    with pytest.raises(requests.exceptions.RequestException):
        requests.get(url, verify=ca, cert=(str(other_cert), str(other_key)), timeout=TIMEOUT_S)
    # a certificate of this CA made for servers (not clientAuth): refused
    with pytest.raises(requests.exceptions.RequestException):
        requests.get(url, verify=ca, cert=(str(test_ca.server_cert), str(test_ca.server_key)),
                     timeout=TIMEOUT_S)
    out = subprocess.run(["curl", "-sS", "--max-time", str(TIMEOUT_S), "--cacert", ca, url],
                         capture_output=True, text=True, timeout=TIMEOUT_S + 10)
    assert out.returncode != 0 and "ready" not in out.stdout, out
    # the right one: served
    r = requests.get(url, verify=ca, cert=good, timeout=TIMEOUT_S)
    assert r.status_code == 200 and r.json() == {"ready": True}
    out = subprocess.run(["curl", "-sS", "--fail", "--max-time", str(TIMEOUT_S), "--cacert", ca,
                          "--cert", good[0], "--key", good[1], url],
                         capture_output=True, text=True, timeout=TIMEOUT_S + 10)
    assert out.returncode == 0 and json.loads(out.stdout) == {"ready": True}, out
    assert "TLS client refused" in srv.log()
    no_secret_in(srv.log(), test_ca.server_key, test_ca.client_key)


def test_sighup_serves_a_new_certificate_and_keeps_open_connections(test_ca, trained, binary_repo,
                                                                    server_factory, tmp_path):
    m = trained["binary"]
    cert, key = tmp_path / "serving.pem", tmp_path / "serving.key"
    shutil.copyfile(test_ca.server_cert, cert)
    shutil.copyfile(test_ca.server_key, key)
    both = tmp_path / "both-cas.pem"
    both.write_text(open(test_ca.ca_cert).read() + open(test_ca.other_ca_cert).read())
    srv = start_tls(server_factory, binary_repo, both, *tls_args(test_ca, cert, key))
    assert served_subject(srv.port, both) == "127.0.0.1"

    ctx = ssl.create_default_context(cafile=str(both))
    conn = http.client.HTTPSConnection("127.0.0.1", srv.port, context=ctx, timeout=TIMEOUT_S)
    try:
        X = m.rows(2, seed=1)
        assert_close(keepalive_infer(conn, "binary", X), m.expected(X), "before SIGHUP")
        sock = conn.sock

        # 1. a certificate from the same CA under a new name
        new_cert, new_key = test_ca.issue("renewed", "renewed", san="IP:127.0.0.1",
                                          usage="serverAuth")
        shutil.copyfile(new_cert, cert)
        shutil.copyfile(new_key, key)
        srv.signal(signal.SIGHUP)
        wait_for(lambda: served_subject(srv.port, both) == "renewed", 30,
                 "a new connection to be served the renewed certificate")
        assert_close(keepalive_infer(conn, "binary", X), m.expected(X), "open connection")
        assert conn.sock is sock, "the open connection was dropped by the reload"

        # 2. a certificate from another CA
        other_cert, other_key = test_ca.issue("moved", "moved", san="IP:127.0.0.1",
                                              usage="serverAuth",
                                              ca=(test_ca.other_ca_cert, test_ca.other_ca_key))
        shutil.copyfile(other_cert, cert)
        shutil.copyfile(other_key, key)
        srv.signal(signal.SIGHUP)
        wait_for(lambda: served_subject(srv.port, both) == "moved", 30,
                 "a new connection to be served the other CA's certificate")
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(srv.url + "/v2/health/ready", verify=str(test_ca.ca_cert),
                         timeout=TIMEOUT_S)

        # 3. a bad file: the old certificate keeps serving, and the log says why
        n_before = srv.log().count("TLS certificates not reloaded")
        cert.write_text("not a certificate\n")
        srv.signal(signal.SIGHUP)
        wait_for(lambda: srv.log().count("TLS certificates not reloaded") > n_before, 30,
                 "the failed reload to be logged")
        assert str(cert) in srv.log().split("TLS certificates not reloaded")[-1].splitlines()[0]
        assert served_subject(srv.port, both) == "moved"
        # 4. a key that is not the certificate's: refused as well
        shutil.copyfile(other_cert, cert)
        shutil.copyfile(test_ca.client_key, key)
        srv.signal(signal.SIGHUP)
        wait_for(lambda: srv.log().count("TLS certificates not reloaded") > n_before + 1, 30,
                 "the mismatched key to be refused")
        assert served_subject(srv.port, both) == "moved"
        assert_close(keepalive_infer(conn, "binary", X), m.expected(X), "after the reloads")
        assert conn.sock is sock
    finally:
        conn.close()
    no_secret_in(srv.log(), test_ca.server_key, test_ca.client_key, other_key, new_key)


def test_sighup_rereads_the_client_ca(test_ca, binary_repo, server_factory, tmp_path):
    client_ca = tmp_path / "client-ca.pem"
    shutil.copyfile(test_ca.ca_cert, client_ca)
    good = (str(test_ca.client_cert), str(test_ca.client_key))
    other = test_ca.issue("client-of-other", "client", usage="clientAuth",
                          ca=(test_ca.other_ca_cert, test_ca.other_ca_key))
    other = (str(other[0]), str(other[1]))
    srv = start_tls(server_factory, binary_repo, test_ca.ca_cert, *tls_args(test_ca),
                    "--tls-client-ca", str(client_ca), client_cert=good)
    url, ca = srv.url + "/v2/health/ready", str(test_ca.ca_cert)
    with pytest.raises(requests.exceptions.RequestException):
        requests.get(url, verify=ca, cert=other, timeout=TIMEOUT_S)
    shutil.copyfile(test_ca.other_ca_cert, client_ca)
    srv.signal(signal.SIGHUP)

    def other_accepted():
        try:
            return requests.get(url, verify=ca, cert=other, timeout=TIMEOUT_S).status_code == 200
        except requests.exceptions.RequestException:
            return False

    wait_for(other_accepted, 30, "the other CA's client to be accepted after SIGHUP")
    with pytest.raises(requests.exceptions.RequestException):
        requests.get(url, verify=ca, cert=good, timeout=TIMEOUT_S)


@pytest.mark.parametrize("which", ["cert", "key", "client-ca"])
def test_a_bad_file_at_start_refuses_to_start_naming_it(test_ca, binary_repo, server_factory,
                                                        tmp_path, which):
    bad = tmp_path / f"bad-{which}.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    args = {"cert": ["--tls-cert", str(bad), "--tls-key", str(test_ca.server_key)],
            "key": ["--tls-cert", str(test_ca.server_cert), "--tls-key", str(bad)],
            "client-ca": [*tls_args(test_ca), "--tls-client-ca", str(bad)]}[which]
    srv = server_factory(binary_repo, *args, wait_ready=False)
    rc = srv.proc.wait(timeout=READY_DEADLINE_S)
    assert rc != 0
    log = srv.log()
    assert f"--tls-{which} '{bad}'" in log, log
    # a missing file is named too
    srv2 = server_factory(binary_repo, *[a if a != str(bad) else str(bad) + ".missing"
                                         for a in args], wait_ready=False)
    assert srv2.proc.wait(timeout=READY_DEADLINE_S) != 0
    assert f"{bad}.missing': cannot open: No such file" in srv2.log(), srv2.log()


def test_tls_flags_go_together(test_ca, binary_repo, server_factory):
    srv = server_factory(binary_repo, "--tls-cert", str(test_ca.server_cert), wait_ready=False)
    assert srv.proc.wait(timeout=READY_DEADLINE_S) == 2
    assert "--tls-cert and --tls-key go together" in srv.log()


def test_worker_serves_its_port_over_https(test_ca, binary_repo, redis_server, worker_factory):
    """inferd worker takes the same flags: its health and metrics port speaks HTTPS."""
    w = worker_factory(binary_repo, redis_server.fresh_url(), *tls_args(test_ca),
                       wait_ready=False)
    url = f"https://127.0.0.1:{w.port}"
    w.url = url

    def ready():
        assert w.alive(), f"inferd worker exited:\n{w.log_tail()}"
        return requests.get(url + "/v2/health/ready", verify=str(test_ca.ca_cert),
                            timeout=5).status_code == 200

    wait_for(ready, READY_DEADLINE_S, "inferd worker to answer over HTTPS")
    r = requests.get(url + "/metrics", verify=str(test_ca.ca_cert), timeout=TIMEOUT_S)
    assert r.status_code == 200 and "inferd_" in r.text
    assert "url=https://" in w.log()
