"""Model files: the names a model file may have, and clean errors for the wrong one."""
import json
import shutil

import pytest

from conftest import assert_close, error_message

# Every name the xgboost backend looks for, in its order (README, "Serving your own model").
MODEL_NAMES = ["model.json", "model.ubj", "model.bst", "model.bin", "model.model",
               "xgboost.json", "xgboost.ubj", "xgboost.model"]


def binary_bytes(model):
    """The model in XGBoost's old binary format (booster.save_model("x.model") before 2.0)."""
    raw = bytes(model.booster.save_raw("deprecated"))
    assert not raw.lstrip().startswith(b"{"), "save_raw('deprecated') should not be JSON"
    return raw


def write_model(repo, name, filename, data, config=None):
    d = repo / name
    (d / "1").mkdir(parents=True)
    (d / "1" / filename).write_bytes(data)
    if config is not False:
        (d / "config.json").write_text(json.dumps(config or {"backend": "xgboost"}))
    return d


def reason_of(client, name):
    r = client.post("/v2/repository/index")
    assert r.status_code == 200, r.text[:300]
    for e in r.json():
        if e["name"] == name:
            assert e["state"] == "UNAVAILABLE", e
            return e["reason"]
    pytest.fail(f"{name} is not in the repository index")


def assert_one_clean_line(msg, what):
    assert "\n" not in msg, f"{what}: error spans lines: {msg!r}"
    for word in ("Stack trace", "[bt]", "dmlc", ".cc:"):
        assert word not in msg, f"{what}: error shows libxgboost's internals ({word!r}): {msg!r}"


def test_triton_fil_and_binary_names_serve(server_factory, repo_dir, trained):
    """Triton FIL's xgboost.model (old binary format) and model.model predict like python-xgboost."""
    for name, model in (("fil", "binary"), ("mm", "multiclass")):
        filename = "xgboost.model" if name == "fil" else "model.model"
        write_model(repo_dir, name, filename, binary_bytes(trained[model]))
    srv = server_factory(repo_dir)
    c = srv.client()
    for name, model in (("fil", "binary"), ("mm", "multiclass")):
        X = trained[model].rows(25, seed=7, nan_fraction=0.1)
        assert_close(c.predict(name, X), trained[model].expected(X), f"{name} ({model})")


def test_binary_model_json_is_one_clean_line(server_factory, repo_dir, trained):
    trained["regression"].install(repo_dir)
    write_model(repo_dir, "binjson", "model.json", binary_bytes(trained["binary"]))
    srv = server_factory(repo_dir)
    c = srv.client()
    want = "model.json is not JSON: was it saved in the binary format? name it model.bin"

    assert want in srv.log(), f"start-up log should say {want!r}:\n{srv.log_tail(20)}"
    assert "Stack trace" not in srv.log(), srv.log_tail(40)
    msg = reason_of(c, "binjson")
    assert want in msg, msg
    assert_one_clean_line(msg, "repository index")

    r = c.post("/v2/repository/models/binjson/load")
    assert r.status_code == 400, f"load: {r.status_code} {r.text[:300]}"
    msg = error_message(r)
    assert want in msg, msg
    assert_one_clean_line(msg, "load API")

    # Renamed as the error says, it serves; the other model never stopped.
    shutil.move(repo_dir / "binjson" / "1" / "model.json", repo_dir / "binjson" / "1" / "model.bin")
    r = c.post("/v2/repository/models/binjson/load")
    assert r.status_code == 200, f"load after renaming: {r.status_code} {r.text[:300]}"
    X = trained["binary"].rows(10, seed=8)
    assert_close(c.predict("binjson", X), trained["binary"].expected(X), "binjson as model.bin")
    Y = trained["regression"].rows(5, seed=9)
    assert_close(c.predict("regression", Y), trained["regression"].expected(Y), "regression")


def test_wrong_format_and_missing_file_errors(server_factory, repo_dir, trained):
    """UBJSON holding JSON text or binary, a broken JSON model, and no model file at all."""
    json_text = trained["binary"].src_path.read_bytes()
    write_model(repo_dir, "ubj_text", "model.ubj", json_text)
    write_model(repo_dir, "ubj_bin", "model.ubj", binary_bytes(trained["binary"]))
    write_model(repo_dir, "broken", "model.json", b'{"learner": {"this is": not json')
    write_model(repo_dir, "empty", "model.json", b"")
    (repo_dir / "nofile" / "1").mkdir(parents=True)
    (repo_dir / "nofile" / "config.json").write_text('{"backend": "xgboost"}')
    trained["regression"].install(repo_dir)
    c = server_factory(repo_dir).client()

    assert "model.ubj is JSON text, not UBJSON: name it model.json" in reason_of(c, "ubj_text")
    assert "model.ubj is not UBJSON: was it saved in the binary format? name it model.bin" \
        in reason_of(c, "ubj_bin")
    msg = reason_of(c, "broken")
    assert "model.json" in msg, msg
    assert_one_clean_line(msg, "broken model.json")
    assert "model.json is empty" in reason_of(c, "empty")
    msg = reason_of(c, "nofile")
    for name in MODEL_NAMES:
        assert name in msg, f"the no-model-file error should list {name}: {msg!r}"
    # UBJSON is a first-class format: the suite's regression model is model.ubj.
    Y = trained["regression"].rows(5, seed=9)
    assert_close(c.predict("regression", Y), trained["regression"].expected(Y), "model.ubj")


def test_triton_config_pbtxt_gets_a_hint(server_factory, repo_dir, trained):
    d = write_model(repo_dir, "triton", "xgboost.model", binary_bytes(trained["binary"]),
                    config=False)
    (d / "config.pbtxt").write_text('backend: "fil"\nmax_batch_size: 32\n')
    trained["regression"].install(repo_dir)
    srv = server_factory(repo_dir)
    c = srv.client()
    msg = reason_of(c, "triton")
    assert "config.json" in msg and "config.pbtxt" in msg, msg
    assert "inferd reads config.json" in msg, msg

    (d / "config.json").write_text('{"backend": "xgboost"}')
    r = c.post("/v2/repository/models/triton/load")
    assert r.status_code == 200, f"load with config.json: {r.status_code} {r.text[:300]}"
    X = trained["binary"].rows(10, seed=10)
    assert_close(c.predict("triton", X), trained["binary"].expected(X), "triton folder")
