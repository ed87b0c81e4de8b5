"""Triton's statistics extension: GET /v2/models[/{m}[/versions/{v}]]/stats."""
import json
import time

from conftest import assert_close, error_message, infer_body

DURATIONS = ["success", "fail", "queue", "compute_input", "compute_infer", "compute_output"]


def stats(client, path):
    r = client.get(path)
    assert r.status_code == 200, f"GET {path}: {r.status_code} {r.text[:300]}"
    body = r.json()
    assert list(body) == ["model_stats"], body
    for s in body["model_stats"]:
        assert set(s) == {"name", "version", "last_inference", "inference_count",
                          "execution_count", "inference_stats", "batch_stats"}, s
        assert list(s["inference_stats"]) == DURATIONS, s["inference_stats"]
        for d in s["inference_stats"].values():
            assert set(d) == {"count", "ns"} and all(isinstance(x, int) for x in d.values()), d
    return body["model_stats"]


def test_statistics_extension(server_factory, repo_dir, trained):
    trained["binary"].install(repo_dir)
    trained["regression"].install(repo_dir)
    (repo_dir / "broken" / "1").mkdir(parents=True)      # never loads: no statistics
    (repo_dir / "broken" / "config.json").write_text('{"backend": "xgboost"}')
    c = server_factory(repo_dir).client()
    assert "statistics" in c.get("/v2").json()["extensions"]

    [fresh] = stats(c, "/v2/models/binary/stats")
    assert (fresh["name"], fresh["version"]) == ("binary", "1"), fresh
    assert fresh["inference_count"] == fresh["execution_count"] == fresh["last_inference"] == 0
    assert all(d == {"count": 0, "ns": 0} for d in fresh["inference_stats"].values()), fresh

    before_ms = int(time.time() * 1000)
    rows = [1, 3, 5, 2]
    for i, n in enumerate(rows):
        X = trained["binary"].rows(n, seed=i)
        assert_close(c.predict("binary", X), trained["binary"].expected(X), f"request {i}")
    X = trained["binary"].rows(2, seed=9)
    r = c.post("/v1/models/binary:predict", json={"instances": X.tolist()})
    assert r.status_code == 200, r.text[:300]
    rows.append(2)
    bad = c.post("/v2/models/binary/infer", json=infer_body(trained["binary"].rows(1, seed=1)[:, :3]))
    assert bad.status_code == 422, bad.text[:300]
    after_ms = int(time.time() * 1000)

    [s] = stats(c, "/v2/models/binary/stats")
    st = s["inference_stats"]
    n_ok = len(rows)
    assert s["inference_count"] == sum(rows), s
    assert 1 <= s["execution_count"] <= n_ok, s
    assert before_ms <= s["last_inference"] <= after_ms, (before_ms, s["last_inference"], after_ms)
    for key in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert st[key]["count"] == n_ok, f"{key}: {st[key]} after {n_ok} good requests"
    assert st["success"]["ns"] > 0 and st["compute_infer"]["ns"] > 0, st
    assert st["success"]["ns"] >= st["compute_infer"]["ns"], st
    assert st["fail"]["count"] == 1, f"the 422 should count as a failure: {st['fail']}"
    assert sum(b["compute_infer"]["count"] for b in s["batch_stats"]) == s["execution_count"], s
    assert sum(b["batch_size"] * b["compute_infer"]["count"] for b in s["batch_stats"]) \
        == s["inference_count"], s
    sizes = [b["batch_size"] for b in s["batch_stats"]]
    assert sizes == sorted(set(sizes)), sizes

    # the version route, every model, and what is not there
    assert stats(c, "/v2/models/binary/versions/1/stats") == [s]
    every = stats(c, "/v2/models/stats")
    assert [(m["name"], m["version"]) for m in every] == [("binary", "1"), ("regression", "1")]
    assert every[1]["inference_count"] == 0, every[1]
    for path, word in [("/v2/models/nope/stats", "nope"), ("/v2/models/broken/stats", "broken"),
                       ("/v2/models/binary/versions/2/stats", "2")]:
        r = c.get(path)
        assert r.status_code == 404, f"{path}: {r.status_code} {r.text[:200]}"
        assert word in error_message(r)


def test_statistics_count_async_jobs(server_factory, repo_dir, trained):
    """Jobs run through the same batcher: their inferences are counted too."""
    trained["binary"].install(repo_dir)
    c = server_factory(repo_dir).client()
    X = trained["binary"].rows(4, seed=3)
    r = c.post("/v2/models/binary/infer", json=infer_body(X),
               headers={"Prefer": "respond-async"})
    assert r.status_code == 202, r.text[:300]
    job = c.wait_final(r.json()["id"])
    assert job["status"] == "succeeded", job
    [s] = stats(c, "/v2/models/binary/stats")
    assert s["inference_count"] == 4 and s["inference_stats"]["success"]["count"] == 1, s
