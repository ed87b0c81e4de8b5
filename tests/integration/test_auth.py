"""API keys and scopes: `inferd keys`, `--keys-file`, the route table walked key by key, SIGHUP,
protected mode (a non-loopback --host without keys)."""
import json
import os
import signal
import stat
import subprocess

import numpy as np
import pytest
import requests

from conftest import GATE_DIR, INFERD_BIN, error_message, infer_body, wait_for, write_plugin_model

SCOPES = ("infer", "jobs", "batch", "admin")


def keys(keys_file, *args, check=True):
    r = subprocess.run([str(INFERD_BIN), "keys", *args, "--keys-file", str(keys_file)],
                       capture_output=True, text=True, timeout=60)
    if check:
        assert r.returncode == 0, f"inferd keys {' '.join(args)}: {r.returncode} {r.stderr}"
    return r


def add_key(keys_file, name, scopes, *extra):
    r = keys(keys_file, "add", name, "--scopes", scopes, *extra)
    key = r.stdout.strip()
    assert key.startswith("inferd_") and len(key) == 50, f"a new key on stdout: {r.stdout!r}"
    return key


def routes():
    r = subprocess.run([str(INFERD_BIN), "routes"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    assert len(rows) >= 30, rows
    return rows


def auth(key):
    return {"Authorization": f"Bearer {key}"} if key else {}


# ---------------------------------------------------------------------------
# the keys file
# ---------------------------------------------------------------------------

def test_keys_add_list_revoke(tmp_path):
    kf = tmp_path / "k" / "inferd.keys"
    kf.parent.mkdir()
    k1 = add_key(kf, "svc-a", "infer,jobs")
    k2 = add_key(kf, "svc-b", "batch", "--tenant", "team-b")
    assert k1 != k2
    assert stat.S_IMODE(os.stat(kf).st_mode) == 0o600, oct(os.stat(kf).st_mode)
    text = kf.read_text()
    assert k1 not in text and k2 not in text, "only hashes are stored"
    listed = keys(kf, "list").stdout
    assert "svc-a" in listed and "infer,jobs" in listed and "team-b" in listed, listed
    assert k1 not in listed
    # a second active key of one name is refused; an unknown scope is named
    r = keys(kf, "add", "svc-a", "--scopes", "infer", check=False)
    assert r.returncode != 0 and "svc-a" in r.stderr and not r.stdout.strip(), r
    r = keys(kf, "add", "svc-c", "--scopes", "infer,root", check=False)
    assert r.returncode == 2 and "root" in r.stderr, r
    r = keys(kf, "add", "bad name", "--scopes", "infer", check=False)
    assert r.returncode == 2 and "NAME" in r.stderr, r
    keys(kf, "revoke", "svc-a")
    assert "revoked" in keys(kf, "list").stdout
    r = keys(kf, "revoke", "svc-a", check=False)
    assert r.returncode != 0 and "svc-a" in r.stderr, r
    # a revoked name may be given a new key (the same tenant: its jobs stay its own)
    add_key(kf, "svc-a", "infer")


@pytest.mark.parametrize("content,words", [
    ("svc infer svc abc 1\n", ["line 1", "hash"]),
    ("svc nope svc " + "a" * 64 + " 1\n", ["line 1", "nope"]),
    ("# c\n\nsvc infer svc " + "a" * 64 + " x\n", ["line 3", "created"]),
    ("svc infer svc " + "a" * 64 + " 1 revoked\n", ["line 1", "revoked="]),
    ("svc infer svc " + "a" * 64 + " 1\nsvc jobs svc " + "b" * 64 + " 1\n", ["line 2", "svc"]),
    ("s\u00e9 infer s " + "a" * 64 + " 1\n", ["line 1", "name"]),
])
def test_a_bad_keys_file_refuses_to_start_naming_the_line(tmp_path, repo_dir, content, words):
    kf = tmp_path / "bad.keys"
    kf.write_text(content)
    kf.chmod(0o600)
    r = subprocess.run([str(INFERD_BIN), "serve", "--models", str(repo_dir), "--port", "0",
                        "--keys-file", str(kf), "--data-dir", str(tmp_path / "d")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, (r.returncode, r.stderr)
    for w in words:
        assert w in r.stderr, (w, r.stderr)
    assert "a" * 64 not in r.stderr, "the stored hash is not echoed"


# ---------------------------------------------------------------------------
# the route table, key by key
# ---------------------------------------------------------------------------

class World:
    """A server with keys, and what each route's request needs to succeed."""

    def __init__(self, tmp_path, server_factory, repo_dir, trained):
        self.tmp = tmp_path
        self.trained = trained
        trained["binary"].install(repo_dir)
        trained["binary"].install(repo_dir, name="spare")
        write_plugin_model(repo_dir)   # "rowsum": holds a job until it is cancelled
        self.held = []
        self.kf = tmp_path / "inferd.keys"
        self.keys = {s: add_key(self.kf, f"k-{s}", s) for s in SCOPES}
        self.revoked = add_key(self.kf, "k-revoked", "infer,jobs,batch,admin")
        keys(self.kf, "revoke", "k-revoked")
        (tmp_path / "in").mkdir()
        X = trained["binary"].rows(3, seed=1)
        self.X = X
        (tmp_path / "in" / "a.jsonl").write_text(
            "".join(json.dumps([float(v) for v in row]) + "\n" for row in X))
        self.server = server_factory(repo_dir, "--keys-file", self.kf, "--data-dir",
                                     tmp_path / "data", "--retry-backoff-ms", "50")
        self.url = self.server.url

    def release_held(self):
        for n in self.held:
            (GATE_DIR / f"release-{n}").touch()

    def call(self, method, path, key, body=None):
        return requests.request(method, self.url + path, headers=auth(key), json=body, timeout=60)

    def job(self, key, fail=False):
        body = {"model": "binary", "max_attempts": 1}
        if fail:
            body["input_location"] = str(self.tmp / "missing.json")
        else:
            body["input"] = infer_body(self.X)
        r = self.call("POST", "/v1/jobs", key, body)
        assert r.status_code == 202, r.text
        jid = r.json()["id"]
        if fail:
            wait_for(lambda: self.call("GET", f"/v1/jobs/{jid}", key).json()["status"] == "failed",
                     60, f"job {jid} to fail")
        return jid

    def held_job(self, key):
        """A job the example plugin holds (never released: DELETE cancels it)."""
        X = np.ones((1, 4), dtype=np.float32)
        n = 900000 + int.from_bytes(os.urandom(3), "big")
        X[0, 0], X[0, 1] = -997, n
        self.held.append(n)
        r = self.call("POST", "/v1/jobs", key, {"model": "rowsum", "input": infer_body(X)})
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def done_job(self, key):
        jid = self.job(key)
        wait_for(lambda: self.call("GET", f"/v1/jobs/{jid}", key).json()["status"] == "succeeded",
                 60, f"job {jid} to succeed")
        return jid

    def batch(self, key, schedule=False):
        body = {"model": "binary", "input": str(self.tmp / "in"),
                "output": str(self.tmp / f"out-{os.urandom(4).hex()}")}
        if schedule:
            body["schedule"] = "0 0 1 1 *"
        r = self.call("POST", "/v1/batch-jobs", key, body)
        assert r.status_code in (201, 202), r.text
        return r.json()["id"]

    # what each row of the table needs: (path with its parameters, body), made with `key`
    def request_for(self, row, key):
        m, p = row["method"], row["path"]
        path = p.replace("{m}", "binary").replace("{v}", "1")
        body = None
        if p.endswith("/infer"):
            body = infer_body(self.X)
        elif p == "/v1/models/{m}:predict":
            body = {"instances": self.X.tolist()}
        elif p.startswith("/v2/repository/models/"):
            path = p.replace("{m}", "spare")
        elif (m, p) == ("POST", "/v1/jobs"):
            body = {"model": "binary", "input": infer_body(self.X)}
        elif (m, p) == ("POST", "/v1/jobs/retry"):
            body = {}
        elif (m, p) == ("DELETE", "/v1/jobs/{id}"):
            path = p.replace("{id}", self.held_job(key))
        elif p.startswith("/v1/jobs/{id}"):
            jid = (self.job(key, fail=True) if p.endswith("/retry")
                   else self.done_job(key) if p.endswith("/result") else self.job(key))
            path = p.replace("{id}", jid)
        elif (m, p) == ("POST", "/v1/batch-jobs"):
            body = {"model": "binary", "input": str(self.tmp / "in"),
                    "output": str(self.tmp / f"out-{os.urandom(4).hex()}")}
        elif p.startswith("/v1/batch-jobs/{id}"):
            bid = self.batch(key, schedule=p.endswith(("/run", "/pause", "/resume")))
            path = p.replace("{id}", bid)
        return path, body


EXPECTED_2XX = {200, 201, 202}


def test_every_route_against_every_kind_of_key(tmp_path, server_factory, repo_dir, trained):
    w = World(tmp_path, server_factory, repo_dir, trained)
    try:
        walk(w)
    finally:
        w.release_held()


def walk(w):
    rows = routes()
    checked = set()
    for row in rows:
        m, scope = row["method"], row["scope"]
        what = f"{m} {row['path']} ({scope})"
        needs = scope not in ("public", "metrics")
        owner = w.keys[scope] if needs else None
        path, body = w.request_for(row, owner or w.keys["admin"])
        cases = {"no key": None, "unknown key": "inferd_" + "x" * 43, "revoked key": w.revoked}
        for case, key in cases.items():
            r = w.call(m, path, key, body)
            if not needs:
                assert r.status_code in EXPECTED_2XX, (what, case, r.status_code, r.text)
                continue
            assert r.status_code == 401, (what, case, r.status_code, r.text)
            assert r.headers.get("WWW-Authenticate", "").startswith("Bearer"), (what, r.headers)
            if key:
                assert 'error="invalid_token"' in r.headers["WWW-Authenticate"], (what, r.headers)
        if needs:
            for other in SCOPES:
                if other in (scope, "admin"):
                    continue
                r = w.call(m, path, w.keys[other], body)
                assert r.status_code == 403, (what, f"key with {other}", r.status_code, r.text)
                assert f"'{scope}'" in error_message(r), (what, r.text)
                assert f"k-{other}" in error_message(r), (what, r.text)
        # with the scope (admin has every scope), the route does its work
        for key in ([owner, w.keys["admin"]] if needs and scope != "admin" else
                    [w.keys["admin"]] if needs else [None]):
            path, body = w.request_for(row, key)
            r = w.call(m, path, key, body)
            assert r.status_code in EXPECTED_2XX, (what, r.status_code, r.text)
        checked.add((m, row["path"]))
    assert len(checked) == len(rows)
    log = w.server.log()
    for key in list(w.keys.values()) + [w.revoked]:
        assert key not in log, "an API key reached the log"


def test_async_infer_needs_the_jobs_scope_too(tmp_path, server_factory, repo_dir, trained):
    trained["binary"].install(repo_dir)
    kf = tmp_path / "inferd.keys"
    infer_only, both = add_key(kf, "on", "infer"), add_key(kf, "both", "infer,jobs")
    s = server_factory(repo_dir, "--keys-file", kf, "--data-dir", tmp_path / "data")
    X = trained["binary"].rows(2, seed=3)
    for key, want in ((infer_only, 403), (both, 202)):
        r = requests.post(f"{s.url}/v2/models/binary/infer", json=infer_body(X), timeout=60,
                          headers={**auth(key), "Prefer": "respond-async"})
        assert r.status_code == want, r.text
    r = requests.post(f"{s.url}/v2/models/binary/infer", json=infer_body(X), timeout=60,
                      headers=auth(infer_only))
    assert r.status_code == 200
    got = np.asarray(r.json()["outputs"][0]["data"], dtype=np.float64)
    np.testing.assert_allclose(got, trained["binary"].expected(X), atol=1e-6)


@pytest.mark.parametrize("header", [
    "Basic dXNlcjpwYXNz", "Bearer", "Bearer ", "bearer\tinferd_x y", "Bearer inferd_\u00e9",
    "Token inferd_x", "Bearer " + "a" * 600,
])
def test_malformed_authorization_is_401(tmp_path, server_factory, repo_dir, trained, header):
    trained["binary"].install(repo_dir)
    kf = tmp_path / "inferd.keys"
    add_key(kf, "a", "infer")
    s = server_factory(repo_dir, "--keys-file", kf, "--data-dir", tmp_path / "data")
    r = requests.get(f"{s.url}/v2/models/binary", timeout=60,
                     headers={"Authorization": header.encode("utf-8")})
    assert r.status_code == 401, r.text
    assert r.headers["WWW-Authenticate"].startswith("Bearer realm=")
    assert s.alive()


def test_sighup_rereads_keys_without_dropping_connections(tmp_path, server_factory, repo_dir,
                                                          trained):
    trained["binary"].install(repo_dir)
    kf = tmp_path / "inferd.keys"
    old = add_key(kf, "old", "infer")
    s = server_factory(repo_dir, "--keys-file", kf, "--data-dir", tmp_path / "data")
    session = requests.Session()   # one kept-alive connection across the reload
    url = f"{s.url}/v2/models/binary"
    assert session.get(url, headers=auth(old), timeout=60).status_code == 200
    new = add_key(kf, "new", "infer")
    keys(kf, "revoke", "old")
    assert session.get(url, headers=auth(new), timeout=60).status_code == 401, "not before SIGHUP"
    s.signal(signal.SIGHUP)
    wait_for(lambda: session.get(url, headers=auth(new), timeout=60).status_code == 200, 30,
             "the new key to work after SIGHUP")
    assert session.get(url, headers=auth(old), timeout=60).status_code == 401, "revoked at once"
    # a broken file on SIGHUP keeps the keys in use, and says why
    kf.write_text("garbage\n")
    s.signal(signal.SIGHUP)
    wait_for(lambda: "keys in use stay" in s.log(), 30, "the reload's error in the log")
    assert session.get(url, headers=auth(new), timeout=60).status_code == 200
    assert new not in s.log() and old not in s.log()


def test_metrics_auth(tmp_path, server_factory, repo_dir, trained):
    trained["binary"].install(repo_dir)
    kf = tmp_path / "inferd.keys"
    key = add_key(kf, "scraper", "infer")
    s = server_factory(repo_dir, "--keys-file", kf, "--metrics-auth", "--data-dir",
                       tmp_path / "data")
    assert requests.get(f"{s.url}/metrics", timeout=60).status_code == 401
    r = requests.get(f"{s.url}/metrics", headers=auth(key), timeout=60)
    assert r.status_code == 200 and "inferd_" in r.text
    assert requests.get(f"{s.url}/v2/health/live", timeout=60).status_code == 200


# ---------------------------------------------------------------------------
# protected mode
# ---------------------------------------------------------------------------

def test_non_loopback_host_without_keys_refuses_to_start(tmp_path, repo_dir):
    r = subprocess.run([str(INFERD_BIN), "serve", "--models", str(repo_dir), "--host", "0.0.0.0",
                        "--port", "0", "--data-dir", str(tmp_path / "d")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "--keys-file" in r.stderr and "--allow-unauthenticated" in r.stderr, r.stderr
    assert "inferd keys add" in r.stderr, r.stderr


def test_allow_unauthenticated_starts_and_warns(tmp_path, server_factory, repo_dir, trained):
    trained["binary"].install(repo_dir)
    s = server_factory(repo_dir, "--host", "0.0.0.0", "--allow-unauthenticated", "--data-dir",
                       tmp_path / "data")
    assert requests.get(f"{s.url}/v2/models/binary", timeout=60).status_code == 200
    assert "without API keys" in s.log()


def test_non_loopback_host_with_keys_starts(tmp_path, server_factory, repo_dir, trained):
    trained["binary"].install(repo_dir)
    kf = tmp_path / "inferd.keys"
    key = add_key(kf, "a", "infer")
    s = server_factory(repo_dir, "--host", "0.0.0.0", "--keys-file", kf, "--data-dir",
                       tmp_path / "data")
    assert requests.get(f"{s.url}/v2/models/binary", timeout=60).status_code == 401
    assert requests.get(f"{s.url}/v2/models/binary", headers=auth(key),
                        timeout=60).status_code == 200
