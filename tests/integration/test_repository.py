"""Model repository: broken models, load/unload, reload from disk, SIGHUP."""
import os
import shutil
import signal
import threading

import numpy as np
import pytest

from conftest import Client, assert_close, error_message, infer_body, output_array, wait_for

BROKEN = ["bad_json", "missing_file", "bad_config", "no_version", "bad_backend"]
# Words (any one, case-insensitive) the load-failure reason of each should contain.
REASON_WORDS = {
    "bad_json": ["model.json"],
    "missing_file": ["model.json", "model.ubj", "no model", "missing", "not found", "no such"],
    "bad_config": ["config.json"],
    "no_version": ["version"],
    "bad_backend": ["tensorflow"],
}


def assert_reason(name, msg):
    words = REASON_WORDS[name]
    assert any(w in msg.lower() for w in words), f"{name}: reason {msg!r} should mention one of {words}"


def make_broken(repo, trained):
    """Broken models next to a good one: each should fail to load, alone."""
    d = repo / "bad_json"
    (d / "1").mkdir(parents=True)
    (d / "config.json").write_text('{"backend": "xgboost"}')
    (d / "1" / "model.json").write_text('{"learner": {"this is": not json')
    d = repo / "missing_file"
    (d / "1").mkdir(parents=True)
    (d / "config.json").write_text('{"backend": "xgboost"}')
    d = repo / "bad_config"
    trained["binary"].install(repo, name="bad_config")
    (d / "config.json").write_text('{"backend": "xgboost", ')
    d = repo / "no_version"
    d.mkdir()
    (d / "config.json").write_text('{"backend": "xgboost"}')
    trained["binary"].install(repo, name="bad_backend", config={"backend": "tensorflow"})


def index(client):
    r = client.post("/v2/repository/index")
    assert r.status_code == 200, f"POST /v2/repository/index: {r.status_code} {r.text[:300]}"
    entries = r.json()
    assert isinstance(entries, list), entries
    by_name = {}
    for e in entries:
        assert e["state"] in ("READY", "UNAVAILABLE"), e
        by_name.setdefault(e["name"], []).append(e)
    return by_name


def state_of(client, name):
    entries = index(client).get(name, [])
    states = {e["state"] for e in entries}
    return "READY" if "READY" in states else ("UNAVAILABLE" if states else None)


def test_broken_models_logged_and_others_serve(server_factory, repo_dir, trained):
    trained["binary"].install(repo_dir)
    make_broken(repo_dir, trained)
    srv = server_factory(repo_dir)
    c = srv.client()
    X = trained["binary"].rows(10, seed=1)
    assert_close(c.predict("binary", X), trained["binary"].expected(X), "good model next to broken ones")

    log = srv.log()
    for name in BROKEN:
        assert str(repo_dir / name) in log, f"start-up log should name the broken model's path {repo_dir / name}"
        r = c.get(f"/v2/models/{name}/ready")
        assert r.status_code == 404, f"{name}/ready: {r.status_code} {r.text[:200]}"
        assert name in error_message(r)
        r = c.post(f"/v2/models/{name}/infer", json=infer_body(X))
        assert r.status_code == 404, f"{name}/infer: {r.status_code} {r.text[:200]}"
        assert name in error_message(r)

    idx = index(c)
    assert [e["state"] for e in idx["binary"]] == ["READY"], idx["binary"]
    assert str(idx["binary"][0]["version"]) == "1", idx["binary"]
    for name in BROKEN:
        assert name in idx, f"index should list broken model {name}: {sorted(idx)}"
        for e in idx[name]:
            assert e["state"] == "UNAVAILABLE", e
            assert isinstance(e.get("reason"), str) and e["reason"], f"{name}: no reason: {e}"
            assert_reason(name, e["reason"])
    assert c.get("/v2/health/ready").status_code == 200, "server ready although some models are broken"


@pytest.mark.parametrize("name", BROKEN)
def test_load_broken_model_400_then_fix(server_factory, repo_dir, trained, name):
    trained["regression"].install(repo_dir)
    make_broken(repo_dir, trained)
    srv = server_factory(repo_dir)
    c = srv.client()
    r = c.post(f"/v2/repository/models/{name}/load")
    assert r.status_code == 400, f"load {name}: {r.status_code} {r.text[:300]}"
    assert_reason(name, error_message(r))
    # Fix it on disk and load again.
    shutil.rmtree(repo_dir / name)
    trained["binary"].install(repo_dir, name=name)
    r = c.post(f"/v2/repository/models/{name}/load")
    assert r.status_code == 200, f"load fixed {name}: {r.status_code} {r.text[:300]}"
    assert r.json() == {}
    assert c.get(f"/v2/models/{name}/ready").json() == {"name": name, "ready": True}
    assert state_of(c, name) == "READY"
    X = trained["binary"].rows(20, seed=2)
    assert_close(c.predict(name, X), trained["binary"].expected(X), f"fixed {name}")
    # The other model was never disturbed.
    Y = trained["regression"].rows(5, seed=3)
    assert_close(c.predict("regression", Y), trained["regression"].expected(Y), "regression")


def test_load_unknown_model_is_an_error(server_factory, repo_dir, trained):
    trained["binary"].install(repo_dir)
    srv = server_factory(repo_dir)
    c = srv.client()
    r = c.post("/v2/repository/models/not_there/load")
    assert r.status_code in (400, 404), f"load of a model not on disk: {r.status_code} {r.text[:200]}"
    assert "not_there" in error_message(r)
    X = trained["binary"].rows(3, seed=4)
    c.predict("binary", X)


def test_unload_and_load(server_factory, repo_dir, trained):
    m = trained["multiclass"]
    m.install(repo_dir)
    trained["binary"].install(repo_dir)
    srv = server_factory(repo_dir)
    c = srv.client()
    X = m.rows(10, seed=5)
    c.predict("multiclass", X)

    r = c.post("/v2/repository/models/multiclass/unload")
    assert r.status_code == 200, f"unload: {r.status_code} {r.text[:200]}"
    r = c.infer("multiclass", X)
    assert r.status_code == 404, f"infer after unload: {r.status_code} {r.text[:200]}"
    assert "multiclass" in error_message(r)
    assert c.get("/v2/models/multiclass/ready").status_code == 404
    assert state_of(c, "multiclass") in ("UNAVAILABLE", None), "unloaded model must not be READY"
    # Others unaffected.
    B = trained["binary"].rows(3, seed=6)
    assert_close(c.predict("binary", B), trained["binary"].expected(B), "binary while multiclass unloaded")

    r = c.post("/v2/repository/models/multiclass/load")
    assert r.status_code == 200, f"load: {r.status_code} {r.text[:200]}"
    assert state_of(c, "multiclass") == "READY"
    assert_close(c.predict("multiclass", X), m.expected(X), "multiclass after unload + load")


def _replace_model_file(repo, name, model):
    """Atomically replace <repo>/<name>/1/<file> with ``model``'s file."""
    dst = repo / name / "1" / model.filename
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(model.src_path, tmp)
    os.replace(tmp, dst)


def test_replace_on_disk_then_load(server_factory, repo_dir, trained):
    a, b = trained["binary"], trained["binary_v2"]
    a.install(repo_dir, name="swap")
    srv = server_factory(repo_dir)
    c = srv.client()
    X = a.rows(200, seed=7)
    assert not np.allclose(a.expected(X), b.expected(X))
    assert_close(c.predict("swap", X), a.expected(X), "before replacing")
    _replace_model_file(repo_dir, "swap", b)
    r = c.post("/v2/repository/models/swap/load")
    assert r.status_code == 200, r.text[:200]
    assert_close(c.predict("swap", X), b.expected(X), "after replacing model.json + load")
    # A reload that fails (file broken on disk) keeps the old model serving.
    (repo_dir / "swap" / "1" / "model.json").write_text("{broken")
    r = c.post("/v2/repository/models/swap/load")
    assert r.status_code == 400, f"load of a now-broken model: {r.status_code} {r.text[:200]}"
    error_message(r)
    r = c.infer("swap", X)
    if r.status_code == 200:   # keeping the old version is the friendlier behaviour
        assert_close(output_array(r.json(), 200), b.expected(X), "after failed reload")
    else:
        assert r.status_code == 404, f"after failed reload: {r.status_code} {r.text[:200]}"


def test_sighup_reloads_from_disk(server_factory, repo_dir, trained):
    a, b = trained["binary"], trained["binary_v2"]
    a.install(repo_dir, name="swap")
    trained["regression"].install(repo_dir)
    srv = server_factory(repo_dir)
    c = srv.client()
    X = a.rows(100, seed=8)
    assert_close(c.predict("swap", X), a.expected(X), "before SIGHUP")
    _replace_model_file(repo_dir, "swap", b)
    srv.signal(signal.SIGHUP)
    expected = b.expected(X)

    def reloaded():
        got = c.predict("swap", X)
        return np.abs(got - expected).max() <= 1e-6
    wait_for(reloaded, 30, "predictions of 'swap' to match the replaced model.json after SIGHUP")
    assert srv.alive(), "SIGHUP killed the server"
    Y = trained["regression"].rows(5, seed=9)
    assert_close(c.predict("regression", Y), trained["regression"].expected(Y), "regression after SIGHUP")
    # SIGHUP with a broken model on disk: the server survives.
    (repo_dir / "swap" / "1" / "model.json").write_text("{broken")
    log_len = len(srv.log())
    srv.signal(signal.SIGHUP)
    wait_for(lambda: str(repo_dir / "swap") in srv.log()[log_len:], 30,
             f"the failed SIGHUP reload of {repo_dir / 'swap'} to be logged")
    assert srv.alive(), "SIGHUP with a broken model killed the server"
    assert_close(c.predict("regression", Y), trained["regression"].expected(Y), "regression after 2nd SIGHUP")


def _hammer(url, model_a, model_b, name, stop, out):
    """Infer until ``stop``; record (status, matched) for each request."""
    c = Client(url)
    rng = np.random.default_rng(threading.get_ident() % 2**32)
    try:
        while not stop.is_set():
            X = model_a.rows(int(rng.integers(1, 8)), seed=int(rng.integers(2**31)))
            r = c.infer(name, X)
            if r.status_code != 200:
                out.append((r.status_code, r.text[:200]))
                continue
            got = output_array(r.json(), len(X))
            ok = any(np.abs(got - m.expected(X)).max() <= 1e-6 for m in (model_a, model_b))
            out.append((200, "ok" if ok else f"wrong predictions {got[:3]}"))
    except BaseException as exc:  # noqa: BLE001
        out.append(("exception", repr(exc)))


def test_inflight_requests_survive_repeated_loads(server_factory, repo_dir, trained):
    a, b = trained["binary"], trained["binary_v2"]
    # A 20 ms batching window keeps requests in flight while the model is swapped.
    a.install(repo_dir, name="swap", config={"backend": "xgboost", "max_queue_delay_us": 20000})
    srv = server_factory(repo_dir, "--threads", "8")
    c = srv.client()
    stop = threading.Event()
    results = []
    threads = [threading.Thread(target=_hammer, args=(srv.url, a, b, "swap", stop, results), daemon=True)
               for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(results) >= 4, 30, "the hammering clients' first answers")
        for i in range(10):
            _replace_model_file(repo_dir, "swap", b if i % 2 == 0 else a)
            r = c.post("/v2/repository/models/swap/load")
            assert r.status_code == 200, f"load #{i}: {r.status_code} {r.text[:200]}"
            n = len(results)
            wait_for(lambda: len(results) > n, 30, f"a hammer answer after load #{i}")
        for i in range(3):
            srv.signal(signal.SIGHUP)
            n = len(results)
            wait_for(lambda: len(results) > n + 4, 30, f"hammer answers after SIGHUP #{i}")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    bad = [r for r in results if r != (200, "ok")]
    assert not bad, f"{len(bad)} of {len(results)} requests failed during loads/SIGHUPs; first: {bad[:3]}"
    assert srv.alive()
