"""The example plugin backend (row sum)."""
import json
import os
import shutil

import numpy as np
import pytest

from conftest import (PLUGIN_SO, Client, error_message, output_array, parallel,
                      split_binary_response, write_plugin_model)


def row_sums(X):
    return np.asarray(X, dtype=np.float32).astype(np.float64).sum(axis=1)


def assert_sums(got, X, what):
    exp = row_sums(X)
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == exp.shape, f"{what}: shape {got.shape} != {exp.shape}"
    assert np.allclose(got, exp, rtol=1e-6, atol=1e-5), f"{what}: got {got[:5]}, expected {exp[:5]}"


@pytest.fixture(scope="module")
def server(module_server_factory, trained, tmp_path_factory):
    if not PLUGIN_SO.exists():
        pytest.fail(f"{PLUGIN_SO} does not exist; build it first (make)")
    repo = tmp_path_factory.mktemp("plugin-models")
    write_plugin_model(repo, "rowsum", width=4)
    mdir = repo / "rowsum_rel"
    mdir.mkdir()
    write_plugin_model(repo, "rowsum_rel", width=6, path=os.path.relpath(PLUGIN_SO, mdir))
    # A copy of the library inside the model folder, referenced by bare file name.
    local = repo / "rowsum_local"
    local.mkdir()
    shutil.copyfile(PLUGIN_SO, local / "librowsum.so")
    write_plugin_model(repo, "rowsum_local", width=3, path="librowsum.so")
    write_plugin_model(repo, "rowsum_missing", width=4, path=str(repo / "nope" / "libnope.so"))
    trained["binary"].install(repo)
    return module_server_factory(repo, "--threads", "4")


@pytest.fixture
def client(server):
    return server.client()


def test_plugin_row_sums(client):
    X = np.random.default_rng(1).normal(size=(10, 4)).astype(np.float32)
    r = client.infer("rowsum", X)
    assert r.status_code == 200, r.text[:300]
    body = r.json()
    assert body["model_name"] == "rowsum"
    assert body["outputs"][0]["shape"] == [10]
    assert_sums(output_array(body, 10), X, "rowsum")


def test_plugin_metadata_and_ready(client):
    assert client.get("/v2/models/rowsum/ready").json() == {"name": "rowsum", "ready": True}
    md = client.get("/v2/models/rowsum").json()
    assert md["inputs"] == [{"name": "input__0", "datatype": "FP32", "shape": [-1, 4]}], md
    assert md["outputs"] == [{"name": "output__0", "datatype": "FP32", "shape": [-1]}], md


def test_plugin_parameters_and_relative_paths(client):
    for name, width in (("rowsum_rel", 6), ("rowsum_local", 3)):
        md = client.get(f"/v2/models/{name}").json()
        assert md["inputs"][0]["shape"] == [-1, width], (name, md)
        X = np.arange(2 * width, dtype=np.float32).reshape(2, width) - 3.5
        r = client.infer(name, X)
        assert r.status_code == 200, f"{name}: {r.text[:300]}"
        assert_sums(output_array(r.json(), 2), X, name)


def test_plugin_single_rows_and_v1(client):
    rng = np.random.default_rng(2)
    for _ in range(20):
        X = rng.normal(size=(1, 4))
        r = client.infer("rowsum", X)
        assert r.status_code == 200, r.text[:300]
        assert_sums(output_array(r.json(), 1), X, "single row")
    X = rng.integers(-5, 5, size=(3, 4))
    r = client.post("/v1/models/rowsum:predict", json={"instances": X.tolist()})
    assert r.status_code == 200, r.text[:300]
    assert_sums(r.json()["predictions"], X, "v1 predict")


def test_plugin_wrong_width_422(client):
    X = np.ones((2, 5), dtype=np.float32)
    r = client.infer("rowsum", X)
    assert r.status_code == 422, r.text[:300]
    assert "4" in error_message(r), "error should mention the width 4"
    r = client.infer("rowsum", np.ones((2, 4)))
    assert r.status_code == 200


def test_plugin_binary_io(client):
    X = np.random.default_rng(3).normal(size=(50, 4)).astype("<f4")
    raw = X.tobytes()
    header = json.dumps({"inputs": [{"name": "input__0", "datatype": "FP32", "shape": [50, 4],
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "parameters": {"binary_data_output": True}}).encode()
    r = client.post("/v2/models/rowsum/infer", data=header + raw,
                    headers={"Inference-Header-Content-Length": str(len(header)),
                             "Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text[:300]
    hdr, out = split_binary_response(r)
    assert hdr["outputs"][0]["parameters"]["binary_data_size"] == 200
    assert_sums(np.frombuffer(out, dtype="<f4"), X, "binary rowsum")


def test_plugin_concurrent(server):
    def worker(i):
        c = Client(server.url)
        rng = np.random.default_rng(100 + i)
        for _ in range(15):
            X = rng.normal(size=(int(rng.integers(1, 6)), 4)).astype(np.float32)
            r = c.infer("rowsum", X)
            assert r.status_code == 200, r.text[:200]
            assert_sums(output_array(r.json(), len(X)), X, f"client {i}")

    parallel(16, worker)


def test_plugin_missing_library_is_broken_model(server, client):
    r = client.get("/v2/models/rowsum_missing/ready")
    assert r.status_code == 404, r.text[:200]
    assert "rowsum_missing" in error_message(r)
    assert "libnope.so" in server.log() or "rowsum_missing" in server.log(), \
        "start-up log should report the plugin model that failed to load"
    # xgboost and plugin models side by side.
    X = np.ones((1, 7), dtype=np.float32)
    assert client.infer("binary", X).status_code == 200
