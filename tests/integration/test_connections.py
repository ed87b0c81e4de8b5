"""Many connections and hung-up clients: no thread is held per request, so 1,000 concurrent
connections each with a request in flight are all answered; a client that closes its socket
while its request is queued is dropped from the queue (counted with status 499)."""
import json
import socket
import resource

import numpy as np

from conftest import infer_body, metric_value, wait_for, write_plugin_model

N_CONNECTIONS = 1000


def raw_request(port, body, model="binary"):
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    payload = json.dumps(body).encode()
    s.sendall(b"POST /v2/models/%s/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % (model.encode(), len(payload)) + payload)
    return s


def read_response(s):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, "connection closed before a response"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
    while len(rest) < length:
        chunk = s.recv(65536)
        assert chunk, "connection closed inside a body"
        rest += chunk
    return int(head.split(b" ")[1]), json.loads(rest[:length])


def test_a_thousand_concurrent_connections(trained, repo_dir, server_factory):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2 * N_CONNECTIONS + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4 * N_CONNECTIONS), hard))
    m = trained["binary"]
    m.install(repo_dir)
    srv = server_factory(repo_dir)
    X = m.rows(N_CONNECTIONS, seed=7)
    # every connection sends its request before any response is read
    socks = [raw_request(srv.port, infer_body(X[i:i + 1])) for i in range(N_CONNECTIONS)]
    expected = m.expected(X)
    try:
        for i, s in enumerate(socks):
            status, body = read_response(s)
            assert status == 200, f"connection {i}: {status} {body}"
            got = body["outputs"][0]["data"][0]
            assert abs(got - expected[i]) <= 1e-6, f"connection {i}: {got} != {expected[i]}"
    finally:
        for s in socks:
            s.close()


def test_client_that_hangs_up_is_dropped_from_the_queue(trained, repo_dir, server_factory):
    # the example plugin sleeps for row[1] ms when row[0] is -998: a model held busy on demand
    write_plugin_model(repo_dir, name="held", width=4,
                       extra={"instances": 1, "max_batch_size": 1})
    m = trained["binary"]
    m.install(repo_dir)
    srv = server_factory(repo_dir)
    c = srv.client()
    body = {"inputs": [{"name": "input__0", "datatype": "FP32", "shape": [1, 4],
                        "data": [-998, 5000, 0, 0]}]}
    blocker = raw_request(srv.port, body, model="held")

    def inflight():
        return metric_value(c.metrics_text(), "inferd_inflight_requests", {"model": "held"}) or 0

    wait_for(lambda: inflight() >= 1, 60, "the blocking request to be admitted")
    quitter = raw_request(srv.port, {"inputs": [{"name": "input__0", "datatype": "FP32",
                                                 "shape": [1, 4], "data": [1, 2, 3, 4]}]},
                          model="held")
    wait_for(lambda: inflight() >= 2, 60, "the second request to be queued behind it")
    quitter.close()

    def dropped():
        return metric_value(c.metrics_text(), "inferd_requests_total",
                            {"model": "held", "status": "499"}) or 0

    wait_for(lambda: dropped() >= 1, 60, "the hung-up request to be counted with status 499")
    status, out = read_response(blocker)
    assert status == 200 and out["outputs"][0]["data"] == [-998 + 5000 + 0 + 0]
    blocker.close()
    # and the server still serves
    X = m.rows(3, seed=3)
    assert np.allclose(c.predict("binary", X), m.expected(X), atol=1e-6)
