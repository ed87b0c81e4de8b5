"""Binary tensor data extension (Triton style) on input and output."""
import json

import numpy as np
import pytest

from conftest import assert_close, error_message, infer_body, output_array, split_binary_response

NP_TYPES = {"FP32": "<f4", "FP64": "<f8", "INT32": "<i4", "INT64": "<i8", "BOOL": "?"}


@pytest.fixture(scope="module")
def server(module_server_factory, trained, tmp_path_factory):
    repo = tmp_path_factory.mktemp("binary-models")
    for name in ("binary", "regression", "multiclass"):
        trained[name].install(repo)
    return module_server_factory(repo, "--threads", "2")


@pytest.fixture
def client(server):
    return server.client()


def binary_request(X, datatype="FP32", binary_output=False, outputs=None, size_override=None):
    X = np.asarray(X)
    raw = np.ascontiguousarray(X.astype(NP_TYPES[datatype])).tobytes()
    header = {"inputs": [{"name": "input__0", "datatype": datatype, "shape": list(X.shape),
                          "parameters": {"binary_data_size": size_override or len(raw)}}]}
    if binary_output:
        header["parameters"] = {"binary_data_output": True}
    if outputs is not None:
        header["outputs"] = outputs
    hjson = json.dumps(header).encode()
    return hjson + raw, {"Inference-Header-Content-Length": str(len(hjson)),
                         "Content-Type": "application/octet-stream"}


def binary_output_array(resp, n_rows, n_outputs):
    header, raw = split_binary_response(resp)
    out = header["outputs"][0]
    assert out["name"] == "output__0" and out["datatype"] == "FP32", out
    assert "data" not in out, f"binary output must not carry JSON data: {out}"
    size = out["parameters"]["binary_data_size"]
    expected_shape = [n_rows] if n_outputs == 1 else [n_rows, n_outputs]
    assert out["shape"] == expected_shape, out
    assert size == n_rows * n_outputs * 4, f"binary_data_size {size}"
    assert len(raw) == size, f"{len(raw)} raw bytes after the JSON, header says {size}"
    return np.frombuffer(raw, dtype="<f4").astype(np.float64).reshape(expected_shape)


@pytest.mark.parametrize("name", ["binary", "regression", "multiclass"])
def test_binary_input_json_output(client, trained, name):
    m = trained[name]
    X = m.rows(300, seed=11, nan_fraction=0.1)
    body, headers = binary_request(X)
    r = client.post(f"/v2/models/{name}/infer", data=body, headers=headers)
    assert r.status_code == 200, r.text[:300]
    assert_close(output_array(r.json(), 300), m.expected(X), f"{name}: binary FP32 input")


@pytest.mark.parametrize("name", ["binary", "regression", "multiclass"])
def test_json_input_binary_output(client, trained, name):
    m = trained[name]
    X = m.rows(120, seed=12)
    r = client.post(f"/v2/models/{name}/infer",
                    json=infer_body(X, parameters={"binary_data_output": True}))
    assert r.status_code == 200, r.text[:300]
    assert_close(binary_output_array(r, 120, m.n_outputs), m.expected(X),
                 f"{name}: binary output (binary_data_output)")


@pytest.mark.parametrize("name", ["binary", "multiclass"])
def test_binary_input_and_output_via_outputs_entry(client, trained, name):
    m = trained[name]
    X = m.rows(77, seed=13)
    body, headers = binary_request(
        X, outputs=[{"name": "output__0", "parameters": {"binary_data": True}}])
    r = client.post(f"/v2/models/{name}/infer", data=body, headers=headers)
    assert r.status_code == 200, r.text[:300]
    assert_close(binary_output_array(r, 77, m.n_outputs), m.expected(X),
                 f"{name}: binary in, binary out via outputs[].parameters.binary_data")


@pytest.mark.parametrize("datatype", ["FP64", "INT32", "INT64", "BOOL"])
def test_binary_input_datatypes(client, trained, datatype):
    m = trained["binary"]
    rng = np.random.default_rng(14)
    shape = (40, m.n_features)
    if datatype == "FP64":
        X = rng.normal(size=shape)
    elif datatype == "BOOL":
        X = rng.random(shape) < 0.5
    else:
        X = rng.integers(-3, 4, size=shape)
    body, headers = binary_request(X, datatype=datatype)
    r = client.post("/v2/models/binary/infer", data=body, headers=headers)
    assert r.status_code == 200, f"{datatype}: {r.text[:300]}"
    assert_close(output_array(r.json(), 40), m.expected(X.astype(np.float32)), f"binary {datatype} input")


def test_binary_single_row(client, trained):
    m = trained["regression"]
    X = m.rows(1, seed=15)
    body, headers = binary_request(X, binary_output=True)
    r = client.post("/v2/models/regression/infer", data=body, headers=headers)
    assert r.status_code == 200, r.text[:300]
    assert_close(binary_output_array(r, 1, 1), m.expected(X), "single binary row")


@pytest.mark.parametrize("delta", [-4, 4])
def test_binary_size_mismatch_rejected(client, trained, delta):
    """binary_data_size disagreeing with the shape (or the bytes present)."""
    m = trained["binary"]
    X = m.rows(3, seed=16)
    raw_len = X.size * 4
    body, headers = binary_request(X, size_override=raw_len + delta)
    r = client.post("/v2/models/binary/infer", data=body, headers=headers)
    assert r.status_code in (400, 422), f"binary_data_size {raw_len + delta} for {raw_len} bytes: " \
                                        f"{r.status_code} {r.text[:300]}"
    error_message(r)
    # Valid binary request afterwards.
    body, headers = binary_request(X)
    r = client.post("/v2/models/binary/infer", data=body, headers=headers)
    assert r.status_code == 200, r.text[:300]
    assert_close(output_array(r.json(), 3), m.expected(X), "after size mismatch")


def test_binary_input_without_header_is_rejected(client, trained):
    """Raw bytes after JSON but no Inference-Header-Content-Length: not valid JSON."""
    m = trained["binary"]
    X = m.rows(2, seed=17)
    body, headers = binary_request(X)
    del headers["Inference-Header-Content-Length"]
    r = client.post("/v2/models/binary/infer", data=body, headers=headers)
    assert r.status_code == 400, r.text[:300]
    error_message(r)
