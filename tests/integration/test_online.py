"""Endpoints and predictions of a server with the suite's trained models."""
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


def test_request_id_is_echoed(client, trained):
    X = trained["binary"].rows(2, seed=700)
    r = client.post("/v2/models/binary/infer", json=infer_body(X, id="req-42/é"))
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "req-42/é"


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
