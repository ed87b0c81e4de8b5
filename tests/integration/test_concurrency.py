"""Concurrent clients, queue limits (429), timeouts (504) and SIGTERM."""
import json
import signal
import threading

import numpy as np
import pytest
import requests

from conftest import (Client, HTTP_TIMEOUT_S, assert_close, error_message, infer_body,
                      output_array, parallel, split_binary_response, wait_for)
from prometheus_client.parser import text_string_to_metric_families

TIMEOUT_WORDS = ("timeout", "timed out", "deadline", "expired")


def test_64_concurrent_clients_get_their_own_answers(server_factory, repo_dir, trained):
    names = ["binary", "regression", "multiclass"]
    for n in names:
        trained[n].install(repo_dir, config={"backend": "xgboost", "max_batch_size": 64,
                                             "max_queue_delay_us": 500})
    srv = server_factory(repo_dir, "--threads", "16")
    n_clients, n_requests = 64, 20

    def client(i):
        m = trained[names[i % 3]]
        rng = np.random.default_rng(10_000 + i)
        c = Client(srv.url)
        mismatches = []
        for j in range(n_requests):
            n_rows = int(rng.integers(1, 5))
            X = m.rows(n_rows, seed=i * 1000 + j, nan_fraction=0.05)
            r = c.infer(m.name, X, nested=bool(j % 2), id=f"c{i}-r{j}")
            assert r.status_code == 200, f"client {i} request {j}: {r.status_code} {r.text[:200]}"
            body = r.json()
            assert body.get("id") == f"c{i}-r{j}", f"client {i} got id {body.get('id')!r}"
            got = output_array(body, n_rows)
            exp = m.expected(X)
            if got.shape != exp.shape or not (np.abs(got - exp) <= 1e-6).all():
                mismatches.append((j, got.tolist(), exp.tolist()))
        return mismatches

    results = parallel(n_clients, client)
    bad = [(i, r) for i, r in enumerate(results) if r]
    assert not bad, (f"{len(bad)} of {n_clients} clients got someone else's (or wrong) answers; "
                     f"first: client {bad[0][0]}: {bad[0][1][:1]}")


def test_concurrent_v1_json_and_binary_mixed(server_factory, repo_dir, trained):
    m = trained["multiclass"]
    m.install(repo_dir)
    srv = server_factory(repo_dir)             # default --threads (one per CPU)

    def client(i):
        c = Client(srv.url)
        for j in range(12):
            X = m.rows(3, seed=50_000 + i * 100 + j)
            kind = (i + j) % 3
            if kind == 0:
                r = c.post("/v1/models/multiclass:predict", json={"instances": X.tolist()})
                assert r.status_code == 200, r.text[:200]
                got = np.asarray(r.json()["predictions"], dtype=np.float64)
            elif kind == 1:
                got = c.predict("multiclass", X)
            else:
                raw = X.astype("<f4").tobytes()
                hdr = json.dumps({"inputs": [{"name": "input__0", "datatype": "FP32", "shape": [3, 10],
                                              "parameters": {"binary_data_size": len(raw)}}],
                                  "parameters": {"binary_data_output": True}}).encode()
                r = c.post("/v2/models/multiclass/infer", data=hdr + raw,
                           headers={"Inference-Header-Content-Length": str(len(hdr))})
                assert r.status_code == 200, r.text[:200]
                _, out = split_binary_response(r)
                got = np.frombuffer(out, dtype="<f4").astype(np.float64).reshape(3, 3)
            assert_close(got, m.expected(X), f"client {i} request {j} (kind {kind})")

    parallel(16, client)


# ---------------------------------------------------------------------------
# 429: queue full
# ---------------------------------------------------------------------------

def test_queue_full_429(server_factory, repo_dir, trained):
    m = trained["slow"]
    m.install(repo_dir, config={"backend": "xgboost", "max_queue_size": 1, "max_batch_size": 1,
                                "instances": 1, "nthread": 1})
    srv = server_factory(repo_dir, "--threads", "16")
    n_clients, n_rows = 24, 2000
    X = m.rows(n_rows, seed=77)
    expected = m.expected(X)
    body = json.dumps(infer_body(X)).encode()
    statuses = []
    lock = threading.Lock()

    def client(i):
        c = Client(srv.url)
        for _ in range(3):
            r = c.post("/v2/models/slow/infer", data=body, headers={"Content-Type": "application/json"})
            with lock:
                statuses.append(r.status_code)
            if r.status_code == 200:
                assert_close(output_array(r.json(), n_rows), expected, f"client {i}: 200 answer")
            elif r.status_code == 429:
                ra = r.headers.get("Retry-After")
                assert ra is not None and ra.strip().isdigit(), f"429 without a valid Retry-After: {ra!r}"
                msg = error_message(r)
                assert "slow" in msg or "queue" in msg.lower(), f"429 error should name model/queue: {msg!r}"
            else:
                raise AssertionError(f"client {i}: unexpected HTTP {r.status_code}: {r.text[:200]}")

    # A burst of 24 clients x 3 requests against a queue of 1; repeat the burst
    # (at most 3 times) only if, improbably, no request found the queue full.
    for _burst in range(3):
        parallel(n_clients, client)
        if 429 in statuses:
            break
    counts = {s: statuses.count(s) for s in set(statuses)}
    print(f"statuses of the burst(s): {counts}")
    assert set(counts) <= {200, 429}, counts
    assert counts.get(429, 0) >= 1, f"no 429 with max_queue_size=1 under {n_clients} concurrent clients: {counts}"
    assert counts.get(200, 0) >= 1, f"no request succeeded: {counts}"
    # The model keeps serving once the burst is over.
    small = m.rows(5, seed=78)
    assert_close(srv.client().predict("slow", small), m.expected(small), "after the burst")


# ---------------------------------------------------------------------------
# 504: timeouts while queued
# ---------------------------------------------------------------------------

def _assert_504(r, what):
    assert r.status_code == 504, f"{what}: expected 504, got {r.status_code} {r.text[:200]}"
    msg = error_message(r)
    assert any(w in msg.lower() for w in TIMEOUT_WORDS), f"{what}: 504 error should say timeout: {msg!r}"


def test_default_timeout_us_gives_504(server_factory, repo_dir, trained):
    m = trained["binary"]
    # default_timeout_us=1 with default batching: handing a request from the
    # HTTP thread to a model instance alone takes longer than 1 us.
    m.install(repo_dir, name="t_default", config={"backend": "xgboost", "default_timeout_us": 1})
    # Same, with a 200 ms batching window to leave no doubt it waited.
    m.install(repo_dir, name="t_window", config={"backend": "xgboost", "default_timeout_us": 1,
                                                  "max_queue_delay_us": 200000})
    srv = server_factory(repo_dir)
    c = srv.client()
    X = m.rows(2, seed=1)
    for name in ("t_default", "t_window"):
        for _ in range(3):
            _assert_504(c.infer(name, X), f"{name} (default_timeout_us=1)")
    # The server is fine afterwards.
    assert c.get("/v2/health/ready").status_code == 200


def test_request_timeout_parameter(server_factory, repo_dir, trained):
    m = trained["binary"]
    # A long batching window (200 ms) and a batch that never fills: every
    # request waits in the queue for the window.
    m.install(repo_dir, name="windowed", config={"backend": "xgboost", "max_batch_size": 64,
                                                  "max_queue_delay_us": 200000})
    srv = server_factory(repo_dir)
    c = srv.client()
    X = m.rows(2, seed=2)
    for timeout_us in (1, 1000):
        r = c.post("/v2/models/windowed/infer", json=infer_body(X, parameters={"timeout": timeout_us}))
        _assert_504(r, f"parameters.timeout={timeout_us} with a 200 ms batching window")
    # A generous timeout succeeds, as does no timeout.
    r = c.post("/v2/models/windowed/infer", json=infer_body(X, parameters={"timeout": 60_000_000}))
    assert r.status_code == 200, r.text[:200]
    assert_close(output_array(r.json(), 2), m.expected(X), "timeout=60 s")
    assert_close(c.predict("windowed", X), m.expected(X), "no timeout")


def test_timeout_on_busy_model(server_factory, repo_dir, trained):
    m = trained["slow"]
    m.install(repo_dir, config={"backend": "xgboost", "max_batch_size": 1, "instances": 1})
    srv = server_factory(repo_dir, "--threads", "8")
    X = m.rows(2000, seed=3)
    expected = m.expected(X)
    body = json.dumps(infer_body(X)).encode()
    stop = threading.Event()
    bg_status = []

    bg_errors = []

    def background(i):
        c = Client(srv.url)
        try:
            while not stop.is_set():
                r = c.post("/v2/models/slow/infer", data=body, headers={"Content-Type": "application/json"})
                bg_status.append(r.status_code)
                if r.status_code == 200:
                    assert_close(output_array(r.json(), 2000), expected, "background request")
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            bg_errors.append(exc)

    threads = [threading.Thread(target=background, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    try:
        c = srv.client()
        wait_for(lambda: len(bg_status) >= 2 or bg_errors, 60, "background requests to start completing")
        assert not bg_errors, f"background client failed: {bg_errors[0]!r}"
        small = m.rows(1, seed=4)
        got = []
        for _ in range(10):
            r = c.post("/v2/models/slow/infer", json=infer_body(small, parameters={"timeout": 1}))
            got.append(r.status_code)
            assert r.status_code in (200, 504), f"timeout=1 on a busy model: {r.status_code} {r.text[:200]}"
            if r.status_code == 504:
                _assert_504(r, "timeout=1 on a busy model")
            else:
                assert_close(output_array(r.json(), 1), m.expected(small), "timeout=1 answered 200")
        print(f"timeout=1 statuses on the busy model: {got}")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert not bg_errors, f"background client failed: {bg_errors[0]!r}"
    assert set(bg_status) == {200}, f"background requests without timeout: {bg_status}"


# ---------------------------------------------------------------------------
# SIGTERM
# ---------------------------------------------------------------------------

def test_sigterm_exits_zero(server_factory, repo_dir, trained):
    trained["binary"].install(repo_dir)
    srv = server_factory(repo_dir)
    X = trained["binary"].rows(3, seed=5)
    srv.client().predict("binary", X)
    assert srv.stop() == 0


def _inflight(url, model):
    text = requests.get(url + "/metrics", timeout=10).text
    for fam in text_string_to_metric_families(text):
        if fam.name == "inferd_inflight_requests":
            for s in fam.samples:
                if s.labels.get("model") == model:
                    return s.value
    return 0


def test_sigterm_finishes_inflight_requests(server_factory, repo_dir, trained):
    m = trained["binary"]
    # A 2 s batching window: a lone request stays in flight for ~2 s.
    m.install(repo_dir, name="lingering", config={"backend": "xgboost", "max_batch_size": 64,
                                                   "max_queue_delay_us": 2_000_000})
    srv = server_factory(repo_dir, "--threads", "4")
    X = m.rows(4, seed=6)
    result = {}

    def send():
        try:
            result["resp"] = requests.post(srv.url + "/v2/models/lingering/infer",
                                           json=infer_body(X), timeout=HTTP_TIMEOUT_S)
        except requests.RequestException as exc:
            result["exc"] = exc

    # Send a request and confirm (via the in-flight gauge) that the server holds
    # it; on a very loaded machine it may complete before we look: try again.
    for _attempt in range(3):
        result.clear()
        t = threading.Thread(target=send, daemon=True)
        t.start()
        wait_for(lambda: _inflight(srv.url, "lingering") >= 1 or not t.is_alive(), 30,
                 "inferd_inflight_requests{model=lingering} >= 1 (request in the batcher)")
        if t.is_alive():
            break
        assert "exc" not in result and result["resp"].status_code == 200, result
    else:
        pytest.fail("could not catch a request in flight (each finished before the gauge showed it)")
    srv.signal(signal.SIGTERM)

    # Draining: ready must stop answering 200 (503, or connection refused).
    def not_ready():
        try:
            return requests.get(srv.url + "/v2/health/ready", timeout=5).status_code == 503
        except requests.RequestException:
            return True
    wait_for(not_ready, 30, "GET /v2/health/ready to stop returning 200 after SIGTERM")

    t.join(timeout=60)
    assert not t.is_alive(), "in-flight request did not finish within 60 s of SIGTERM"
    assert "exc" not in result, f"in-flight request failed during shutdown: {result.get('exc')!r}"
    r = result["resp"]
    assert r.status_code == 200, f"in-flight request during SIGTERM: {r.status_code} {r.text[:200]}"
    assert_close(output_array(r.json(), 4), m.expected(X), "in-flight request during SIGTERM")
    assert srv.wait_exit() == 0, "exit status after SIGTERM"
