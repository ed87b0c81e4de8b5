"""Hostile HTTP clients: request smuggling, trickled headers and bodies, connection floods,
NUL bytes in paths, half-closed clients and unbounded long-polls.

Every test talks raw TCP to a real server on 127.0.0.1, keeps its connection count and
duration bounded, and checks that a valid client is still served afterwards (or meanwhile).
"""
import json
import resource
import socket
import threading
import time

import numpy as np
import pytest

from conftest import error_message, infer_body, metric_value, wait_for, write_plugin_model

SMUGGLED = b"POST /v2/repository/index HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"


def connect(port, source="127.0.0.1", timeout=10):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    if source != "127.0.0.1":
        s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def read_all(s, deadline_s=10):
    """Everything the server sends until it closes the connection (or the deadline)."""
    out = b""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        s.settimeout(max(0.05, end - time.monotonic()))
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            return out, False
        except ConnectionResetError:
            return out, True
        if not chunk:
            return out, True
        out += chunk
    return out, False


def responses(raw):
    """The status codes and JSON bodies of the HTTP responses in `raw`, in order."""
    found = []
    while raw.startswith(b"HTTP/1."):
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        body, raw = rest[:length], rest[length:]
        found.append((status, json.loads(body) if body.startswith(b"{") else body))
    return found


def closed_by_server(s, deadline_s):
    """True once the server closes `s` (EOF or reset) within the deadline."""
    _, closed = read_all(s, deadline_s)
    return closed


@pytest.fixture
def breast(repo_dir, trained):
    m = trained["binary"]
    m.install(repo_dir)
    return m


def assert_serves(srv, m, timeout=5):
    """A valid request from a fresh connection is answered, with the right predictions."""
    X = m.rows(2, seed=11)
    r = srv.client().session.post(f"{srv.url}/v2/models/binary/infer", json=infer_body(X),
                                  timeout=timeout)
    assert r.status_code == 200, r.text
    got = np.asarray(r.json()["outputs"][0]["data"])
    assert np.allclose(got, m.expected(X), atol=1e-6)


# ---- request smuggling: ambiguous framing is a 400 that closes the connection ----

FRAMING = {
    "duplicate Content-Length": (
        b"POST /v2/models/binary/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
        b"Content-Length: %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED, "Content-Length"),
    "Content-Length with chunked": (
        b"POST /v2/models/binary/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED, "Transfer-Encoding"),
    "space before the colon": (
        b"POST /v2/models/binary/infer HTTP/1.1\r\nHost: x\r\nContent-Length : %d\r\n\r\n"
        % len(SMUGGLED) + SMUGGLED, "header name"),
    "tab before the colon": (
        b"POST /v2/models/binary/infer HTTP/1.1\r\nHost: x\r\nContent-Length\t: %d\r\n\r\n"
        % len(SMUGGLED) + SMUGGLED, "header name"),
    "obsolete line folding of Content-Length": (
        b"POST /v2/models/binary/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n %d\r\n\r\n"
        % len(SMUGGLED) + SMUGGLED, "Content-Length"),
    "obsolete line folding into a header name": (
        b"POST /v2/models/binary/infer HTTP/1.1\r\nHost: x\r\nX-A: 0\r\n Content-Length: %d"
        b"\r\n\r\n" % len(SMUGGLED) + SMUGGLED, "header name"),
    "bare CR inside a header line": (
        b"POST /v2/models/binary/infer HTTP/1.1\r\nHost: x\r\nX-A: a\rContent-Length: %d"
        b"\r\n\r\n" % len(SMUGGLED) + SMUGGLED, "CR"),
    "a coding other than chunked": (
        b"POST /v2/models/binary/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n"
        b"\r\n" + SMUGGLED, "Transfer-Encoding"),
    "chunked not the final coding": (
        b"POST /v2/models/binary/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip"
        b"\r\n\r\n" + SMUGGLED, "Transfer-Encoding"),
    "two Transfer-Encoding headers": (
        b"POST /v2/models/binary/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED, "Transfer-Encoding"),
}


@pytest.mark.parametrize("case", sorted(FRAMING))
def test_ambiguous_framing_is_refused_and_the_connection_closed(case, breast, repo_dir,
                                                                 server_factory):
    raw, named = FRAMING[case]
    srv = server_factory(repo_dir)
    s = connect(srv.port)
    s.sendall(raw)
    got, closed = read_all(s, 10)
    s.close()
    found = responses(got)
    assert closed, f"{case}: the connection stayed open after {found}"
    assert len(found) == 1, f"{case}: expected one answer, got {found} (a smuggled request ran?)"
    status, body = found[0]
    assert status in (400, 501), f"{case}: {status} {body}"
    assert isinstance(body, dict) and named in body["error"], f"{case}: {body}"
    assert_serves(srv, breast)


def test_bare_lf_line_ends_are_read_as_line_ends(breast, repo_dir, server_factory):
    """RFC 9112 section 2.2 lets a server read a bare LF as a line end; so do common proxies.
    A header after a bare LF is therefore a header, and the framing stays unambiguous."""
    srv = server_factory(repo_dir)
    X = breast.rows(1, seed=3)
    body = json.dumps(infer_body(X)).encode()
    s = connect(srv.port)
    s.sendall(b"POST /v2/models/binary/infer HTTP/1.1\nHost: x\nContent-Length: %d\n\n"
              % len(body) + body)
    s.settimeout(10)
    got = b""
    while b"}]}" not in got:
        chunk = s.recv(65536)
        assert chunk, f"closed early: {got!r}"
        got += chunk
    s.close()
    (status, answer), = responses(got)
    assert status == 200, answer
    assert np.allclose(answer["outputs"][0]["data"], breast.expected(X), atol=1e-6)


# ---- NUL in a path ----

@pytest.mark.parametrize("path", ["/v2/models/binary%00cancer", "/v2/models/binary%00",
                                  "/v1/jobs?status=queued%00x"])
def test_nul_in_a_path_is_400(path, breast, repo_dir, server_factory):
    srv = server_factory(repo_dir)
    c = srv.client()
    r = c.get(path)
    assert r.status_code == 400, r.text
    assert "NUL" in error_message(r)
    assert c.get("/v2/models/binary").status_code == 200
    assert_serves(srv, breast)


# ---- half-closed clients ----

def test_half_closed_client_still_gets_its_answer(breast, repo_dir, server_factory):
    """shutdown(SHUT_WR) after a complete request (nc -N) is not a hang-up, even while the
    request waits in the queue behind a busy model; a client that closes its socket is."""
    write_plugin_model(repo_dir, name="held", width=4, extra={"instances": 1, "max_batch_size": 1})
    srv = server_factory(repo_dir)
    c = srv.client()

    def send(data, shut):
        s = connect(srv.port, timeout=60)
        payload = json.dumps({"inputs": [{"name": "input__0", "datatype": "FP32",
                                          "shape": [1, 4], "data": data}]}).encode()
        s.sendall(b"POST /v2/models/held/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                  % len(payload) + payload)
        if shut:
            s.shutdown(socket.SHUT_WR)
        return s

    def inflight():
        return metric_value(c.metrics_text(), "inferd_inflight_requests", {"model": "held"}) or 0

    # the plugin sleeps row[1] ms when row[0] is -998: the instance is busy for 3 s
    blocker = send([-998, 3000, 0, 0], shut=False)
    wait_for(lambda: inflight() >= 1, 30, "the blocking request to run")
    half = [send([1, 2, 3, i], shut=True) for i in range(5)]
    wait_for(lambda: inflight() >= 6, 30, "the half-closed requests to queue behind it")
    for i, s in enumerate(half):
        got, closed = read_all(s, 60)
        s.close()
        # an interim 100 may come first: it is how inferd tells a half-close from a hang-up
        found = [x for x in responses(got) if x[0] >= 200]
        assert found and found[0][0] == 200, f"half-closed client {i}: {found or got!r}"
        assert found[0][1]["outputs"][0]["data"] == [1 + 2 + 3 + i]
    blocker.close()
    assert (metric_value(c.metrics_text(), "inferd_requests_total",
                         {"model": "held", "status": "499"}) or 0) == 0


def test_a_burst_of_half_closed_clients_is_answered(breast, repo_dir, server_factory):
    srv = server_factory(repo_dir)
    X = breast.rows(1, seed=9)
    payload = json.dumps(infer_body(X)).encode()
    request = (b"POST /v2/models/binary/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
               % len(payload) + payload)
    statuses = []
    lock = threading.Lock()

    def run():
        for _ in range(50):
            s = connect(srv.port, timeout=30)
            s.sendall(request)
            s.shutdown(socket.SHUT_WR)
            got, _ = read_all(s, 30)
            s.close()
            final = [x[0] for x in responses(got) if x[0] >= 200]
            with lock:
                statuses.append(final[0] if final else None)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(statuses) == 400 and all(s == 200 for s in statuses), \
        {s: statuses.count(s) for s in set(statuses)}


# ---- slow and idle clients ----

def trickle(port, stop, first=b"GET /v2/health/live HTTP/1.1\r\n", every_s=0.5, source="127.0.0.1"):
    """A client that sends `first`, then one header byte every `every_s` until stopped or
    closed by the server. Returns (socket, thread); the socket's `closed_at` says when."""
    s = connect(port, source=source)
    s.sendall(first)
    state = {"closed_at": None}

    def run():
        while not stop.is_set():
            try:
                s.sendall(b"X")
                s.setblocking(False)
                try:
                    if s.recv(1) == b"":
                        break
                except BlockingIOError:
                    pass
                finally:
                    s.setblocking(True)
            except OSError:
                break
            stop.wait(every_s)
        state["closed_at"] = time.monotonic()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return s, t, state


def test_trickled_headers_hit_the_header_deadline(breast, repo_dir, server_factory):
    srv = server_factory(repo_dir, "--header-timeout-s", "2", "--idle-timeout-s", "60")
    stop = threading.Event()
    started = time.monotonic()
    s, t, state = trickle(srv.port, stop)
    try:
        # a byte every 0.5 s would keep an idle timer of 60 s alive for ever
        t.join(30)
        assert not t.is_alive(), "the trickling client was still connected after 30 s"
        assert state["closed_at"] - started < 25
        assert_serves(srv, breast)
    finally:
        stop.set()
        s.close()
    assert "header deadline" in srv.log()


def test_trickled_request_line_hits_the_idle_deadline(breast, repo_dir, server_factory):
    srv = server_factory(repo_dir, "--idle-timeout-s", "2")
    stop = threading.Event()
    s, t, state = trickle(srv.port, stop, first=b"GET /v2/health/li")
    try:
        t.join(30)
        assert not t.is_alive(), "a request line trickled in for 30 s"
    finally:
        stop.set()
        s.close()
    assert_serves(srv, breast)


def test_a_trickled_body_hits_the_minimum_rate(breast, repo_dir, server_factory):
    srv = server_factory(repo_dir, "--header-timeout-s", "1", "--body-min-bytes-per-s", "1000")
    s = connect(srv.port)
    s.sendall(b"POST /v2/models/binary/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
              b"\r\n{")
    stop = threading.Event()

    def run():
        while not stop.wait(0.2):
            try:
                s.sendall(b" ")
            except OSError:
                return

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        assert closed_by_server(s, 30), "a body at 5 bytes/s was still being read after 30 s"
    finally:
        stop.set()
        s.close()
    assert "body too slow" in srv.log()
    assert_serves(srv, breast)


def raise_nofile(n):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n), hard))


def test_a_flood_of_idle_connections_does_not_lock_out_others(breast, repo_dir, server_factory):
    raise_nofile(2000)
    srv = server_factory(repo_dir, "--max-connections", "300", "--idle-timeout-s", "60",
                         "--max-connections-per-client", "0")
    flood = []
    try:
        for _ in range(600):  # twice the limit, as fast as they connect
            try:
                flood.append(connect(srv.port, timeout=5))
            except OSError:
                pass
        # a valid client is served at once: the oldest idle connections make room
        for _ in range(5):
            assert_serves(srv, breast, timeout=5)
        wait_for(lambda: "connection limit" in srv.log(), 10, "the limit to be logged")
        evicted = metric_value(srv.client().metrics_text(), "inferd_connections_closed_total",
                               {"reason": "evicted_idle"})
        assert evicted and evicted >= 300, evicted
    finally:
        for s in flood:
            s.close()


def test_tricklers_at_the_limit_do_not_lock_out_others(breast, repo_dir, server_factory):
    raise_nofile(2000)
    srv = server_factory(repo_dir, "--max-connections", "100", "--idle-timeout-s", "60",
                         "--max-connections-per-client", "0")
    stop = threading.Event()
    clients = []
    try:
        for _ in range(100):
            clients.append(trickle(srv.port, stop, every_s=1.0))
        wait_for(lambda: metric_value(srv.client().metrics_text(), "inferd_connections_open")
                 is not None, 10, "/metrics")
        for _ in range(5):
            assert_serves(srv, breast, timeout=5)
    finally:
        stop.set()
        for s, t, _ in clients:
            s.close()


def test_per_client_connection_cap(breast, repo_dir, server_factory):
    srv = server_factory(repo_dir, "--max-connections-per-client", "20")
    held = []
    try:
        for _ in range(20):
            s = connect(srv.port)
            # an answer on each proves inferd holds it (accepts race each other otherwise)
            s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            got = b""
            while not got.endswith(b"}"):
                chunk = s.recv(4096)
                assert chunk, f"held connection {len(held)} closed: {got!r}"
                got += chunk
            held.append(s)
        # the 21st from the same address is closed without an answer
        extra = connect(srv.port)
        assert closed_by_server(extra, 10), "a 21st connection from one address was kept"
        extra.close()
        wait_for(lambda: "per-client connection limit" in srv.log(), 10, "the refusal logged")
        # another address is not affected
        other = connect(srv.port, source="127.0.0.2")
        X = breast.rows(1, seed=5)
        body = json.dumps(infer_body(X)).encode()
        other.sendall(b"POST /v2/models/binary/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body) + body)
        got, _ = read_all(other, 10)
        other.close()
        (status, answer), = responses(got)
        assert status == 200, answer
    finally:
        for s in held:
            s.close()
    # once they are gone, the address may connect again
    wait_for(lambda: assert_serves(srv, breast) is None, 10, "the address to be served again")
    refused = metric_value(srv.client().metrics_text(), "inferd_connections_refused_total",
                           {"reason": "client_limit"})
    assert refused and refused >= 1


def test_max_connections_above_the_fd_limit_is_logged(breast, repo_dir, tmp_path):
    import subprocess
    from conftest import INFERD_BIN, free_port

    port = free_port()

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, 512))

    log = tmp_path / "fd.log"
    with open(log, "wb") as f:
        p = subprocess.Popen([str(INFERD_BIN), "serve", "--models", str(repo_dir), "--port",
                              str(port), "--data-dir", str(tmp_path / "data"),
                              "--max-connections", "10000"],
                             stdout=f, stderr=f, preexec_fn=limit, cwd=str(tmp_path))
    try:
        wait_for(lambda: "listening" in log.read_text(), 60, "the server to start")
        text = log.read_text()
        assert "max-connections" in text and "file descriptor" in text, text
    finally:
        p.terminate()
        assert p.wait(30) == 0


# ---- long-polls ----

def test_long_poll_wait_is_bounded(breast, repo_dir, server_factory, tmp_path):
    srv = server_factory(repo_dir, "--data-dir", str(tmp_path / "data"))
    c = srv.client()
    r = c.get("/v1/jobs/abc?wait=301")
    assert r.status_code == 400, r.text
    assert "300" in error_message(r)
    r = c.get("/v1/jobs/abc?wait=300")
    assert r.status_code == 404, r.text


# ---- draining: the answers say when to come back ----

def test_draining_answers_say_when_to_retry(breast, repo_dir, server_factory, tmp_path):
    """While a drain waits for a request in a model, a kept-alive connection still gets
    answers: 503s whose Retry-After is the drain's 5 s, for jobs and batch jobs alike."""
    write_plugin_model(repo_dir, name="held", width=4, extra={"instances": 1, "max_batch_size": 1})
    srv = server_factory(repo_dir, "--data-dir", str(tmp_path / "data"), "--drain-timeout-s", "30")
    c = srv.client()
    assert c.get("/v2/health/live").status_code == 200  # the kept-alive connection
    blocker = connect(srv.port, timeout=60)
    payload = json.dumps({"inputs": [{"name": "input__0", "datatype": "FP32", "shape": [1, 4],
                                      "data": [-998, 4000, 0, 0]}]}).encode()
    blocker.sendall(b"POST /v2/models/held/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                    % len(payload) + payload)
    wait_for(lambda: (metric_value(c.metrics_text(), "inferd_inflight_requests",
                                   {"model": "held"}) or 0) >= 1, 30, "the held request to run")
    srv.signal(15)
    wait_for(lambda: c.get("/v2/health/ready").status_code == 503, 10, "readiness to turn 503")
    for path, body in (("/v1/jobs", {"model": "binary", "input": infer_body(breast.rows(1, seed=2))}),
                       ("/v1/batch-jobs", {"model": "binary", "input": str(tmp_path / "in"),
                                           "output": str(tmp_path / "out")})):
        r = c.post(path, json=body)
        assert r.status_code == 503, (path, r.status_code, r.text)
        assert r.headers.get("Retry-After") == "5", (path, dict(r.headers))
    got, _ = read_all(blocker, 30)
    blocker.close()
    assert [x for x in responses(got) if x[0] == 200], got
    assert srv.wait_exit() == 0
