"""Endpoints and predictions of a server with the suite's trained models."""
import json

import numpy as np
import pytest

from conftest import assert_close, error_message, infer_body, output_array

MODELS = ["binary", "regression", "multiclass"]


@pytest.fixture(scope="module")
def server(module_server_factory, trained, tmp_path_factory):
    repo = tmp_path_factory.mktemp("online-models")
    for name in MODELS:
        trained[name].install(repo)
    # Two versions, pinned to the older one.
    trained["binary"].install(repo, name="pinned", version=1, config={"backend": "xgboost", "version": 1})
    trained["binary_v2"].install(repo, name="pinned", version=2)
    # Every config.json key set (batches smaller than some requests).
    trained["multiclass"].install(repo, name="configured", config={
        "backend": "xgboost", "version": 1, "max_batch_size": 8, "max_queue_delay_us": 100,
        "instances": 1, "max_queue_size": 16, "default_timeout_us": 0, "nthread": 2})
    trained["binary"].install(repo, name="dash-dot.model_2")
    # Two versions, no pin: the highest (2) is served.
    trained["binary"].install(repo, name="multiver", version=1)
    trained["binary_v2"].install(repo, name="multiver", version=2)
    return module_server_factory(repo, "--threads", "4")


@pytest.fixture
def client(server):
    return server.client()


def test_health_live_and_ready(client):
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200


def test_server_metadata(client):
    r = client.get("/v2")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["name"] == "inferd", body
    assert isinstance(body["version"], str) and body["version"], body
    assert isinstance(body["extensions"], list), body


@pytest.mark.parametrize("name", MODELS)
def test_model_metadata(client, trained, name):
    m = trained[name]
    for path in (f"/v2/models/{name}", f"/v2/models/{name}/versions/1"):
        r = client.get(path)
        assert r.status_code == 200, f"GET {path}: {r.status_code} {r.text}"
        md = r.json()
        assert md["name"] == name, md
        assert "1" in [str(v) for v in md["versions"]], md
        assert isinstance(md["platform"], str) and md["platform"], md
        assert md["inputs"] == [{"name": "input__0", "datatype": "FP32",
                                 "shape": [-1, m.n_features]}], md
        out_shape = [-1] if m.n_outputs == 1 else [-1, m.n_outputs]
        assert md["outputs"] == [{"name": "output__0", "datatype": "FP32",
                                  "shape": out_shape}], md


def test_model_ready(client):
    for name in MODELS + ["pinned", "multiver"]:
        r = client.get(f"/v2/models/{name}/ready")
        assert r.status_code == 200, f"{name}: {r.status_code} {r.text}"
        assert r.json() == {"name": name, "ready": True}


def test_unknown_model_endpoints_404(client, trained):
    X = trained["binary"].rows(1, seed=0)
    for method, path, kw in [
        ("get", "/v2/models/nosuchmodel", {}),
        ("get", "/v2/models/nosuchmodel/ready", {}),
        ("post", "/v2/models/nosuchmodel/infer", {"json": infer_body(X)}),
        ("post", "/v1/models/nosuchmodel:predict", {"json": {"instances": X.tolist()}}),
    ]:
        r = getattr(client, method)(path, **kw)
        assert r.status_code == 404, f"{method.upper()} {path}: {r.status_code} {r.text}"
        assert "nosuchmodel" in error_message(r), f"{path}: error should name the model"


@pytest.mark.parametrize("name", MODELS)
def test_predictions_match_xgboost_in_batches(client, trained, name):
    m = trained[name]
    X = m.rows(1000, seed=100)
    expected = m.expected(X)
    got = []
    for start in range(0, len(X), 100):
        chunk = X[start:start + 100]
        r = client.infer(name, chunk)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_name"] == name, body.keys()
        assert str(body["model_version"]) == "1", body["model_version"]
        out = output_array(body, len(chunk))
        expected_shape = [len(chunk)] if m.n_outputs == 1 else [len(chunk), m.n_outputs]
        assert body["outputs"][0]["shape"] == expected_shape
        got.append(out)
    assert_close(np.concatenate(got), expected, f"{name}: 1000 rows in batches of 100")


@pytest.mark.parametrize("name", MODELS)
def test_predictions_single_rows(client, trained, name):
    m = trained[name]
    X = m.rows(40, seed=200)
    got = np.concatenate([client.predict(name, X[i:i + 1]) for i in range(len(X))])
    assert_close(got, m.expected(X), f"{name}: single-row requests")


def test_one_big_request(client, trained):
    m = trained["multiclass"]
    X = m.rows(1000, seed=300)
    assert_close(client.predict("multiclass", X), m.expected(X), "multiclass: 1000 rows in one request")


@pytest.mark.parametrize("name", MODELS)
def test_nested_and_flat_data_agree(client, trained, name):
    m = trained[name]
    X = m.rows(25, seed=400)
    flat = client.predict(name, X, nested=False)
    nested = client.predict(name, X, nested=True)
    assert_close(flat, m.expected(X), f"{name}: flat data")
    assert_close(nested, m.expected(X), f"{name}: nested data")


@pytest.mark.parametrize("datatype", ["FP32", "FP64", "INT32", "INT64", "BOOL"])
@pytest.mark.parametrize("name", ["binary", "multiclass"])
def test_input_datatypes(client, trained, name, datatype):
    m = trained[name]
    rng = np.random.default_rng(500)
    shape = (30, m.n_features)
    if datatype in ("FP32", "FP64"):
        X = rng.normal(0, 1, size=shape)            # float64 values, not float32-exact
    elif datatype in ("INT32", "INT64"):
        X = rng.integers(-3, 4, size=shape)
    else:
        X = rng.random(shape) < 0.5
    got = client.predict(name, X, datatype=datatype)
    # The server converts every input to float32.
    assert_close(got, m.expected(X.astype(np.float32)), f"{name}: {datatype} input")


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("name", MODELS)
def test_null_is_missing(client, trained, name, nested):
    m = trained[name]
    X = m.rows(200, seed=600, nan_fraction=0.3)
    X[0, :] = np.nan                                  # an all-missing row
    got = client.predict(name, X, nested=nested)
    assert_close(got, m.expected(X), f"{name}: null -> NaN (missing)")


@pytest.mark.parametrize("req_id", ["req-42", "é/ü ☃", 'quote" back\\slash\nnewline\ttab', "", "x" * 2000])
def test_request_id_is_echoed(client, trained, req_id):
    X = trained["binary"].rows(2, seed=700)
    r = client.post("/v2/models/binary/infer", json=infer_body(X, id=req_id))
    assert r.status_code == 200, r.text
    assert r.json()["id"] == req_id
    # Same through the binary-output path (JSON header built differently).
    r = client.post("/v2/models/binary/infer",
                    json=infer_body(X, id=req_id, parameters={"binary_data_output": True}))
    assert r.status_code == 200, r.text[:200]
    hlen = int(r.headers["Inference-Header-Content-Length"])
    assert json.loads(r.content[:hlen])["id"] == req_id


def test_json_number_formats(client, trained):
    """Integers, exponents, -0.0 and extreme floats in FP32 data parse like Python's json."""
    m = trained["binary"]
    raw = ('{"inputs":[{"name":"input__0","datatype":"FP32","shape":[3,7],"data":['
           '1, -2, 0, 3, 1e-7, -1.5E+2, 2.5e0,'
           '-0.0, 3.4e38, -3.4e38, 1.17549435e-38, 123456789, 0.1, 7,'
           '0.30000001192092896, 1E1, -1e-45, 65504, 0.333333333333333333333, -7.25, 5]}]}')
    X = np.array(json.loads(raw)["inputs"][0]["data"], dtype=np.float64).reshape(3, 7)
    r = client.post("/v2/models/binary/infer", data=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text[:300]
    assert_close(output_array(r.json(), 3), m.expected(X.astype(np.float32)), "number formats")


def test_odd_model_name(client, trained):
    m = trained["binary"]
    X = m.rows(3, seed=750)
    assert_close(client.predict("dash-dot.model_2", X), m.expected(X), "model name with - . _")
    r = client.post("/v1/models/dash-dot.model_2:predict", json={"instances": X.tolist()})
    assert r.status_code == 200, r.text[:200]
    assert_close(r.json()["predictions"], m.expected(X), "v1 with odd name")


def test_explicit_outputs_json(client, trained):
    m = trained["regression"]
    X = m.rows(5, seed=800)
    body = infer_body(X, outputs=[{"name": "output__0"}],
                      parameters={"binary_data_output": False})
    r = client.post("/v2/models/regression/infer", json=body)
    assert r.status_code == 200, r.text
    assert_close(output_array(r.json(), 5), m.expected(X), "regression: outputs requested explicitly")


@pytest.mark.parametrize("name", MODELS)
def test_v1_predict(client, trained, name):
    m = trained[name]
    X = m.rows(50, seed=900)
    r = client.post(f"/v1/models/{name}:predict", json={"instances": X.tolist()})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert isinstance(preds, list) and len(preds) == 50, preds
    if m.n_outputs == 1:
        assert all(isinstance(p, (int, float)) for p in preds), preds[:3]
    else:
        assert all(isinstance(p, list) and len(p) == m.n_outputs for p in preds), preds[:3]
    assert_close(np.asarray(preds, dtype=np.float64), m.expected(X), f"{name}: v1 predict")


def test_version_pin(client, trained):
    v1, v2 = trained["binary"], trained["binary_v2"]
    X = v1.rows(100, seed=1000)
    assert not np.allclose(v1.expected(X), v2.expected(X)), "test models should differ"
    # Unversioned route serves the pinned version 1.
    r = client.infer("pinned", X)
    assert r.status_code == 200, r.text
    assert str(r.json()["model_version"]) == "1"
    assert_close(output_array(r.json(), 100), v1.expected(X), "pinned model (version 1)")
    # Explicit version route.
    assert_close(client.predict("pinned", X, version=1), v1.expected(X), "pinned, /versions/1/infer")
    md = client.get("/v2/models/pinned").json()
    assert "1" in [str(v) for v in md["versions"]], md
    assert client.get("/v2/models/pinned/versions/1").status_code == 200


def test_default_version_is_highest(client, trained):
    v2 = trained["binary_v2"]
    X = v2.rows(100, seed=1100)
    r = client.infer("multiver", X)
    assert r.status_code == 200, r.text
    assert str(r.json()["model_version"]) == "2"
    assert_close(output_array(r.json(), 100), v2.expected(X), "multiver (highest version 2)")
    assert_close(client.predict("multiver", X, version=2), v2.expected(X), "multiver, /versions/2/infer")
    md = client.get("/v2/models/multiver/versions/2")
    assert md.status_code == 200, md.text
    assert "2" in [str(v) for v in md.json()["versions"]]


@pytest.mark.parametrize("path_fmt", ["/v2/models/{m}/versions/99/infer", "/v2/models/{m}/versions/99"])
def test_unknown_version_404(client, trained, path_fmt):
    X = trained["binary"].rows(1, seed=0)
    for model in ("binary", "pinned"):
        path = path_fmt.format(m=model)
        if path.endswith("/infer"):
            r = client.post(path, json=infer_body(X))
        else:
            r = client.get(path)
        assert r.status_code == 404, f"{path}: {r.status_code} {r.text}"
        assert "99" in error_message(r), f"{path}: error should name the version"
    # Still serving.
    client.predict("binary", X)


def test_all_config_keys_and_requests_larger_than_max_batch_size(client, trained):
    m = trained["multiclass"]
    md = client.get("/v2/models/configured").json()
    assert md["outputs"][0]["shape"] == [-1, 3], md
    for n_rows in (1, 8, 9, 500):          # max_batch_size is 8
        X = m.rows(n_rows, seed=1200 + n_rows)
        assert_close(client.predict("configured", X), m.expected(X), f"configured: {n_rows} rows")
