"""Bad requests: status code, JSON error naming the problem, server still serves."""
import json

import pytest

from conftest import assert_close, error_message, infer_body, output_array

WIDTH = 7   # the "binary" model's number of features


@pytest.fixture(scope="module")
def server(module_server_factory, trained, tmp_path_factory):
    repo = tmp_path_factory.mktemp("errors-models")
    trained["binary"].install(repo)
    trained["multiclass"].install(repo)
    return module_server_factory(repo, "--threads", "2")


@pytest.fixture
def client(server):
    return server.client()


def good_rows(trained):
    return trained["binary"].rows(3, seed=5)


def assert_still_serves(client, trained):
    X = good_rows(trained)
    assert_close(client.predict("binary", X), trained["binary"].expected(X),
                 "valid request after a bad one")


def tensor(**over):
    t = {"name": "input__0", "datatype": "FP32", "shape": [1, WIDTH], "data": [0.5] * WIDTH}
    t.update(over)
    return {k: v for k, v in t.items() if v is not DROP}


DROP = object()

# (id, raw body bytes or JSON object, expected status, substrings: at least one
#  must occur in the error message, case-insensitive)
CASES = [
    ("malformed-json", b'{"inputs": [', 400, ["json", "parse"]),
    ("malformed-json-garbage", b"not json at all", 400, ["json", "parse"]),
    ("empty-body", b"", 400, ["json", "body", "empty"]),
    ("body-not-object", [1, 2, 3], 400, ["object"]),
    ("body-string", "inputs", 400, ["object", "json"]),
    ("inputs-missing", {"id": "x"}, 400, ["inputs"]),
    ("inputs-empty", {"inputs": []}, 400, ["inputs"]),
    ("inputs-not-list", {"inputs": tensor()}, 400, ["inputs"]),
    ("input-not-object", {"inputs": [42]}, 400, ["input", "tensor", "object", "name"]),
    ("tensor-missing-name", {"inputs": [tensor(name=DROP)]}, 400, ["name"]),
    ("tensor-missing-datatype", {"inputs": [tensor(datatype=DROP)]}, 400, ["datatype"]),
    ("tensor-missing-shape", {"inputs": [tensor(shape=DROP)]}, 400, ["shape"]),
    ("tensor-missing-data", {"inputs": [tensor(data=DROP)]}, 400, ["data"]),
    ("unknown-input-name", {"inputs": [tensor(name="features")]}, 422, ["features"]),
    ("unsupported-datatype", {"inputs": [tensor(datatype="FP128")]}, 422, ["fp128"]),
    ("wrong-datatype-bytes", {"inputs": [tensor(datatype="BYTES", data=["a"] * WIDTH)]}, 422, ["bytes"]),
    ("datatype-lowercase-garbage", {"inputs": [tensor(datatype="float")]}, 422, ["float"]),
    ("shape-1d", {"inputs": [tensor(shape=[WIDTH])]}, 422, ["shape", "2-d", "2d", "dimension"]),
    ("shape-3d", {"inputs": [tensor(shape=[1, 1, WIDTH])]}, 422, ["shape", "2-d", "2d", "dimension"]),
    ("width-too-small", {"inputs": [tensor(shape=[1, WIDTH - 2], data=[0.5] * (WIDTH - 2))]}, 422,
     [str(WIDTH)]),
    ("width-too-large", {"inputs": [tensor(shape=[1, WIDTH + 1], data=[0.5] * (WIDTH + 1))]}, 422,
     [str(WIDTH)]),
    ("data-count-short", {"inputs": [tensor(shape=[2, WIDTH])]}, 422,
     [str(2 * WIDTH), "count", "element", "data"]),
    ("data-count-long", {"inputs": [tensor(data=[0.5] * (WIDTH + 1))]}, 422,
     [str(WIDTH + 1), "count", "element", "data"]),
    ("data-nested-ragged", {"inputs": [tensor(shape=[2, WIDTH], data=[[0.5] * WIDTH, [0.5] * (WIDTH - 1)])]},
     422, ["count", "element", "data", str(2 * WIDTH), str(WIDTH)]),
    ("data-non-numeric", {"inputs": [tensor(data=["abc"] + [0.5] * (WIDTH - 1))]}, 422,
     ["numeric", "number", "data", "abc"]),
    ("data-object-element", {"inputs": [tensor(data=[{"x": 1}] + [0.5] * (WIDTH - 1))]}, 422,
     ["numeric", "number", "data"]),
]


@pytest.mark.parametrize("body,status,needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request(client, trained, body, status, needles):
    if isinstance(body, bytes):
        r = client.post("/v2/models/binary/infer", data=body,
                        headers={"Content-Type": "application/json"})
    else:
        r = client.post("/v2/models/binary/infer", json=body)
    assert r.status_code == status, f"expected {status}, got {r.status_code}: {r.text[:300]}"
    assert r.headers.get("Content-Type", "").startswith("application/json"), r.headers
    msg = error_message(r)
    assert any(n.lower() in msg.lower() for n in needles), \
        f"error {msg!r} should mention one of {needles}"
    assert_still_serves(client, trained)


# Requests the spec does not pin to one status: any 4xx listed is fine, but the
# body must be a JSON error and the server must keep serving.
ODD_CASES = [
    ("shape-negative", {"inputs": [tensor(shape=[-1, WIDTH])]}, (400, 422)),
    ("shape-zero-width", {"inputs": [tensor(shape=[1, 0], data=[])]}, (422,)),
    ("shape-huge-overflow", {"inputs": [tensor(shape=[2 ** 62, WIDTH])]}, (400, 413, 422)),
    ("shape-huge-overflow-2", {"inputs": [tensor(shape=[2 ** 61 + 1, 8], data=[0.5] * 8)]}, (400, 413, 422)),
    ("shape-not-ints", {"inputs": [tensor(shape=["1", WIDTH])]}, (400, 422)),
    ("shape-float", {"inputs": [tensor(shape=[1.5, WIDTH])]}, (400, 422)),
    ("shape-not-list", {"inputs": [tensor(shape="1x7")]}, (400, 422)),
    ("name-not-string", {"inputs": [tensor(name=0)]}, (400, 422)),
    ("datatype-not-string", {"inputs": [tensor(datatype=32)]}, (400, 422)),
    ("data-not-list", {"inputs": [tensor(data=0.5)]}, (400, 422)),
    ("data-nested-too-deep", {"inputs": [tensor(data=[[[0.5] * WIDTH]])]}, (200, 400, 422)),
    ("int32-out-of-range", {"inputs": [tensor(datatype="INT32", data=[2 ** 40] * WIDTH)]}, (422,)),
    ("int-with-fraction", {"inputs": [tensor(datatype="INT64", data=[0.5] * WIDTH)]}, (422,)),
    ("bool-as-string", {"inputs": [tensor(datatype="BOOL", data=["true"] * WIDTH)]}, (422,)),
    ("two-inputs", {"inputs": [tensor(), tensor()]}, (400, 422)),
    ("parameters-not-object", dict({"parameters": [1]}, inputs=[tensor()]), (200, 400)),
    ("timeout-not-number", dict({"parameters": {"timeout": "soon"}}, inputs=[tensor()]), (400, 422)),
    ("timeout-negative", dict({"parameters": {"timeout": -5}}, inputs=[tensor()]), (200, 400, 422, 504)),
    ("outputs-unknown-name", dict({"outputs": [{"name": "nope"}]}, inputs=[tensor()]), (400, 422)),
    ("id-not-string", dict({"id": 12}, inputs=[tensor()]), (200, 400)),
    ("deeply-nested-json", b"[" * 100000 + b"]" * 100000, (400, 413)),
    ("huge-number", b'{"inputs":[{"name":"input__0","datatype":"FP32","shape":[1,7],'
                    b'"data":[1e999,1,1,1,1,1,1]}]}', (200, 400, 422)),
]


@pytest.mark.parametrize("body,statuses", [c[1:] for c in ODD_CASES], ids=[c[0] for c in ODD_CASES])
def test_odd_request(client, trained, body, statuses):
    if isinstance(body, bytes):
        r = client.post("/v2/models/binary/infer", data=body, headers={"Content-Type": "application/json"})
    else:
        r = client.post("/v2/models/binary/infer", json=body)
    assert r.status_code in statuses, f"expected one of {statuses}, got {r.status_code}: {r.text[:300]}"
    if r.status_code != 200:
        error_message(r)
    assert_still_serves(client, trained)


def test_zero_rows(client, trained):
    """shape [0, 7]: an empty answer or a 4xx JSON error, never a crash."""
    r = client.post("/v2/models/binary/infer", json={"inputs": [tensor(shape=[0, WIDTH], data=[])]})
    assert r.status_code in (200, 400, 422), f"{r.status_code}: {r.text[:300]}"
    if r.status_code == 200:
        out = r.json()["outputs"][0]
        assert out["shape"] == [0] and out["data"] == [], out
    else:
        error_message(r)
    r = client.post("/v1/models/binary:predict", json={"instances": []})
    assert r.status_code in (200, 400, 422), f"v1 empty instances: {r.status_code}: {r.text[:300]}"
    if r.status_code == 200:
        assert r.json()["predictions"] == []
    else:
        error_message(r)
    assert_still_serves(client, trained)


def test_unknown_model_404(client, trained):
    r = client.post("/v2/models/no_such_model/infer", json=infer_body(good_rows(trained)))
    assert r.status_code == 404, r.text
    assert "no_such_model" in error_message(r)
    assert_still_serves(client, trained)


def test_unknown_version_404(client, trained):
    r = client.post("/v2/models/binary/versions/7/infer", json=infer_body(good_rows(trained)))
    assert r.status_code == 404, r.text
    assert "7" in error_message(r)
    assert_still_serves(client, trained)


def test_width_error_names_expected_width_other_model(client, trained):
    # multiclass has 10 features; send the binary model's 7.
    r = client.post("/v2/models/multiclass/infer", json=infer_body(good_rows(trained)))
    assert r.status_code == 422, r.text
    assert "10" in error_message(r), "error should mention the expected width 10"
    assert_still_serves(client, trained)


def test_unknown_input_name_mentions_expected(client, trained):
    r = client.post("/v2/models/binary/infer", json={"inputs": [tensor(name="features")]})
    assert r.status_code == 422, r.text
    msg = error_message(r)
    assert "features" in msg or "input__0" in msg, msg


def test_v1_bad_requests(client, trained):
    for body, status in [({"rows": [[0.5] * WIDTH]}, 400),
                         ([[0.5] * WIDTH], 400),
                         ({"instances": [[0.5] * (WIDTH - 1)]}, 422)]:
        r = client.post("/v1/models/binary:predict", json=body)
        assert r.status_code == status, f"{body!r}: {r.status_code} {r.text[:300]}"
        error_message(r)
    r = client.post("/v1/models/binary:predict", data=b"{nope", headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error_message(r)
    assert_still_serves(client, trained)


@pytest.mark.parametrize("hdr,needles", [
    ("99999", ["header", "length"]),           # longer than the body
    ("-1", ["header", "length"]),
    ("abc", ["header", "length"]),
    ("5", ["header", "length", "json"]),       # cuts the JSON header short
])
def test_bad_binary_header_length(client, trained, hdr, needles):
    header = json.dumps({"inputs": [tensor()]}).encode()
    r = client.post("/v2/models/binary/infer", data=header,
                    headers={"Inference-Header-Content-Length": hdr,
                             "Content-Type": "application/octet-stream"})
    assert r.status_code == 400, f"header length {hdr!r}: {r.status_code} {r.text[:300]}"
    msg = error_message(r)
    assert any(n in msg.lower() for n in needles), f"error {msg!r} should mention one of {needles}"
    assert_still_serves(client, trained)


def test_many_bad_then_good(client, trained):
    """A burst of assorted bad requests must not wedge or crash the server."""
    for _ in range(5):
        for c in CASES:
            body = c[1]
            if isinstance(body, bytes):
                client.post("/v2/models/binary/infer", data=body)
            else:
                client.post("/v2/models/binary/infer", json=body)
    assert_still_serves(client, trained)


def test_max_body_bytes_413(server_factory, repo_dir, trained):
    trained["binary"].install(repo_dir)
    srv = server_factory(repo_dir, "--max-body-bytes", "4096")
    client = srv.client()
    m = trained["binary"]
    big = m.rows(400, seed=9)                      # ~400*7 floats: well over 4 KiB of JSON
    body = json.dumps(infer_body(big)).encode()
    assert len(body) > 4096 * 4
    r = client.post("/v2/models/binary/infer", data=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 413, f"{len(body)}-byte body with --max-body-bytes 4096: {r.status_code}"
    msg = error_message(r)
    assert any(s in msg.lower() for s in ("4096", "large", "body", "size")), msg
    # A small request still works on the same server.
    small = m.rows(2, seed=10)
    assert len(json.dumps(infer_body(small))) < 4096
    # ... on the same keep-alive session too (the server must not parse the
    # rest of the rejected body as a new request).
    assert_close(client.predict("binary", small), m.expected(small), "small request after 413")
    assert_close(client.predict("binary", small), m.expected(small), "second small request after 413")

    # Chunked transfer encoding (no Content-Length): the limit still applies.
    def chunks(data, size=1024):
        for i in range(0, len(data), size):
            yield data[i:i + size]
    r = srv.client().post("/v2/models/binary/infer", data=chunks(body),
                          headers={"Content-Type": "application/json"})
    assert r.status_code == 413, f"chunked {len(body)}-byte body over the limit: {r.status_code}"
    error_message(r)
    small_body = json.dumps(infer_body(small)).encode()
    r = srv.client().post("/v2/models/binary/infer", data=chunks(small_body, 100),
                          headers={"Content-Type": "application/json"})
    assert r.status_code == 200, f"small chunked request: {r.status_code} {r.text[:200]}"
    assert_close(output_array(r.json(), 2), m.expected(small), "small chunked request")


def test_unknown_route_is_json_404(client):
    for method, path in [("get", "/v2/nothing/here"), ("post", "/v2/models"), ("get", "/v3")]:
        r = getattr(client, method)(path)
        assert r.status_code in (404, 405), f"{method.upper()} {path}: {r.status_code}"
        error_message(r)


def test_binary_header_covering_whole_body(client, trained):
    """Inference-Header-Content-Length equal to the body: a JSON-only request."""
    X = good_rows(trained)
    body = json.dumps(infer_body(X)).encode()
    r = client.post("/v2/models/binary/infer", data=body,
                    headers={"Inference-Header-Content-Length": str(len(body)),
                             "Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text[:300]
    assert_close(output_array(r.json(), len(X)), trained["binary"].expected(X), "header == whole body")


def test_id_with_nul_character_is_echoed_escaped(client, trained):
    """A v2 "id" is any JSON string: one holding \\u0000 is accepted and echoed back, escaped
    (issue 13: it was refused)."""
    X = good_rows(trained)
    body = json.dumps(infer_body(X, id="a\u0000b")).encode()
    assert b"a\\u0000b" in body
    r = client.post("/v2/models/binary/infer", data=body,
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert b'"id":"a\\u0000b"' in r.content, r.content[:300]
    assert r.json()["id"] == "a\x00b"
    assert_close(output_array(r.json(), len(X)), trained["binary"].expected(X), "id with NUL")


def test_nan_in_body_says_send_null(client, trained):
    """Python's json.dumps writes NaN and Infinity, which JSON has not: the error says what to
    send instead, on every route that reads a JSON body (issue 14)."""
    X = good_rows(trained)
    row = [float(v) for v in X[0]]
    nan_row, inf_row = row[:1] + [float("nan")] + row[2:], row[:1] + [float("-inf")] + row[2:]
    v2 = {"inputs": [{"name": "input__0", "datatype": "FP32", "shape": [1, WIDTH], "data": nan_row}]}
    cases = [
        ("/v2/models/binary/infer", v2, "JSON has no NaN: send null for a missing value"),
        ("/v1/models/binary:predict", {"instances": [nan_row]}, "JSON has no NaN"),
        ("/v1/models/binary:predict", {"instances": [inf_row]}, "JSON has no Infinity"),
        ("/v1/jobs", {"model": "binary", "input": v2}, "JSON has no NaN"),
    ]
    for path, body, want in cases:
        data = json.dumps(body).encode()      # allow_nan=True: NaN / -Infinity, as Python does
        assert b"NaN" in data or b"Infinity" in data, data
        r = client.post(path, data=data, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, f"{path}: {r.status_code} {r.text[:300]}"
        msg = error_message(r)
        assert want in msg, f"{path}: {msg!r} lacks {want!r}"
        assert "line 1 column" in msg, f"{path}: {msg!r} should say where"
    # null is the missing value the message asks for, and it is served
    ok = dict(v2, inputs=[dict(v2["inputs"][0], data=row[:1] + [None] + row[2:])])
    r = client.post("/v2/models/binary/infer", json=ok)
    assert r.status_code == 200, r.text[:300]
    assert_still_serves(client, trained)
