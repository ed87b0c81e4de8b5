"""Shared fixtures for the inferd integration suite.

Run from the repository root with Debian's interpreter:

    /usr/bin/python3 -m pytest -q tests/integration

The suite needs ``build/inferd`` and
``build/examples/plugin/libinferd_example_plugin.so`` (``make`` builds both).
``INFERD_BIN`` / ``INFERD_PLUGIN`` override those paths.

Everything here waits by polling against a deadline; nothing asserts on
elapsed time (the machines running this are small and shared).
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import xgboost as xgb

REPO_ROOT = Path(__file__).resolve().parents[2]
INFERD_BIN = Path(os.environ.get("INFERD_BIN", REPO_ROOT / "build" / "inferd"))
PLUGIN_SO = Path(os.environ.get(
    "INFERD_PLUGIN",
    REPO_ROOT / "build" / "examples" / "plugin" / "libinferd_example_plugin.so"))

READY_DEADLINE_S = 30.0      # start-up: spec says ready within ~20 s
STOP_DEADLINE_S = 30.0       # SIGTERM -> exit
HTTP_TIMEOUT_S = 60.0        # per HTTP request; generous, the box is noisy
ATOL = 1e-6                  # server vs python-xgboost predictions

# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------


def free_port():
    """A TCP port that was free a moment ago (bind to 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, deadline_s, what, interval=0.05):
    """Poll ``predicate`` until it returns a truthy value or the deadline.

    Returns the truthy value; fails the test naming ``what`` otherwise.
    """
    end = time.monotonic() + deadline_s
    last_exc = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - reported below
            last_exc = exc
        if time.monotonic() > end:
            pytest.fail(f"timed out after {deadline_s:.0f}s waiting for {what}"
                        + (f" (last error: {last_exc!r})" if last_exc else ""))
        time.sleep(interval)


def error_message(resp):
    """Assert the response is a JSON ``{"error": "<non-empty str>"}``; return it."""
    try:
        body = resp.json()
    except ValueError:
        pytest.fail(f"HTTP {resp.status_code} body is not JSON: {resp.text[:300]!r}")
    assert isinstance(body, dict) and isinstance(body.get("error"), str), \
        f"HTTP {resp.status_code} body has no 'error' string: {body!r}"
    assert body["error"].strip(), f"empty error message: {body!r}"
    return body["error"]


def assert_close(got, expected, what=""):
    got = np.asarray(got, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert got.shape == expected.shape, \
        f"{what}: shape {got.shape} != expected {expected.shape}"
    both_nan = np.isnan(got) & np.isnan(expected)
    diff = np.where(both_nan, 0.0, np.abs(got - expected))
    worst = int(np.argmax(diff)) if diff.size else 0
    assert not np.isnan(diff).any() and (diff <= ATOL).all(), (
        f"{what}: max abs diff {diff.max() if diff.size else 0:.3g} > {ATOL} "
        f"(flat index {worst}: got {got.ravel()[worst]!r}, "
        f"expected {expected.ravel()[worst]!r})")


# ---------------------------------------------------------------------------
# request builders / client
# ---------------------------------------------------------------------------


def infer_body(X, datatype="FP32", nested=False, name="input__0", **extra):
    """A v2 infer JSON body for a 2-D array ``X`` (NaN -> null)."""
    X = np.asarray(X)
    if datatype == "BOOL":
        rows = [[bool(v) for v in r] for r in X]
    elif datatype in ("INT32", "INT64"):
        rows = [[int(v) for v in r] for r in X]
    else:
        rows = [[None if np.isnan(v) else float(v) for v in r] for r in X]
    data = rows if nested else [v for r in rows for v in r]
    body = {"inputs": [{"name": name, "datatype": datatype,
                        "shape": [int(X.shape[0]), int(X.shape[1])], "data": data}]}
    body.update(extra)
    return body


def output_array(resp_json, n_rows):
    """The ``output__0`` tensor of a JSON response as a numpy array shaped by its shape."""
    outs = resp_json["outputs"]
    assert len(outs) == 1, f"expected one output, got {outs!r}"
    out = outs[0]
    assert out["name"] == "output__0", out
    assert out["datatype"] == "FP32", out
    shape = out["shape"]
    assert shape[0] == n_rows, f"output shape {shape} for {n_rows} rows"
    arr = np.asarray(out["data"], dtype=np.float64)
    assert arr.size == int(np.prod(shape)), \
        f"output data has {arr.size} values for shape {shape}"
    return arr.reshape(shape)


def split_binary_response(resp):
    """(json_header, raw_bytes) of a binary-extension response."""
    hlen = resp.headers.get("Inference-Header-Content-Length")
    assert hlen is not None, \
        f"binary response lacks Inference-Header-Content-Length; headers={dict(resp.headers)}"
    hlen = int(hlen)
    content = resp.content
    assert 0 < hlen <= len(content), f"header length {hlen} vs body {len(content)}"
    return json.loads(content[:hlen]), content[hlen:]


class Client:
    def __init__(self, url):
        self.url = url
        self.session = requests.Session()

    def get(self, path, **kw):
        kw.setdefault("timeout", HTTP_TIMEOUT_S)
        return self.session.get(self.url + path, **kw)

    def post(self, path, **kw):
        kw.setdefault("timeout", HTTP_TIMEOUT_S)
        return self.session.post(self.url + path, **kw)

    def infer(self, model, X, version=None, **kw):
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version is not None else "") + "/infer"
        return self.post(path, json=infer_body(X, **kw))

    def predict(self, model, X, version=None, **kw):
        """Infer and return the output as an array (asserting 200)."""
        r = self.infer(model, X, version=version, **kw)
        assert r.status_code == 200, f"infer {model}: HTTP {r.status_code}: {r.text[:500]}"
        return output_array(r.json(), np.asarray(X).shape[0])

    def metrics_text(self):
        r = self.get("/metrics")
        assert r.status_code == 200, f"/metrics: HTTP {r.status_code}"
        return r.text


# ---------------------------------------------------------------------------
# server process
# ---------------------------------------------------------------------------

_SERVERS = []   # servers whose logs are attached to a failing test's report


class Server:
    """``build/inferd serve`` on a free port; stderr/stdout captured to files."""

    def __init__(self, models_dir, log_dir, extra_args=(), scope="function", tag="inferd"):
        self.models_dir = Path(models_dir)
        self.log_dir = Path(log_dir)
        self.extra_args = [str(a) for a in extra_args]
        self.scope = scope
        self.tag = tag
        self.proc = None
        self.port = None
        self.url = None
        self.log_path = None
        self.returncode = None

    # -- lifecycle --------------------------------------------------------
    def start(self, wait_ready=True):
        if not INFERD_BIN.exists():
            pytest.fail(f"{INFERD_BIN} does not exist; build it first (make)")
        for attempt in range(3):
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            self.log_path = self.log_dir / f"{self.tag}-{self.port}.stderr.log"
            cmd = [str(INFERD_BIN), "serve", "--models", str(self.models_dir),
                   "--host", "127.0.0.1", "--port", str(self.port), *self.extra_args]
            self.cmd = cmd
            self._log_f = open(self.log_path, "wb")
            # cwd is the test's temporary directory, so anything the server
            # writes relative to it (e.g. a default ./data) stays out of the repo.
            self.proc = subprocess.Popen(cmd, stdout=self._log_f, stderr=self._log_f,
                                         stdin=subprocess.DEVNULL, cwd=str(self.log_dir))
            _SERVERS.append(self)
            if not wait_ready:
                return self
            if self._wait_ready():
                return self
            # Died before ready: retry only when it looks like the port race.
            log = self.log().lower()
            if attempt < 2 and ("address already in use" in log or "bind" in log):
                continue
            pytest.fail(f"inferd exited with {self.proc.returncode} before becoming ready\n"
                        f"command: {' '.join(cmd)}\n--- stderr ---\n{self.log_tail()}")
        return self

    def _wait_ready(self):
        end = time.monotonic() + READY_DEADLINE_S
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                self.returncode = self.proc.returncode
                return False
            try:
                if requests.get(self.url + "/v2/health/ready", timeout=5).status_code == 200:
                    return True
            except requests.RequestException:
                pass
            time.sleep(0.05)
        self.kill()
        pytest.fail(f"inferd not ready (GET /v2/health/ready != 200) within "
                    f"{READY_DEADLINE_S:.0f}s\ncommand: {' '.join(self.cmd)}\n"
                    f"--- stderr ---\n{self.log_tail()}")

    def signal(self, sig):
        self.proc.send_signal(sig)

    def wait_exit(self, deadline_s=STOP_DEADLINE_S):
        try:
            self.returncode = self.proc.wait(timeout=deadline_s)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"inferd did not exit within {deadline_s:.0f}s of SIGTERM\n"
                        f"--- stderr ---\n{self.log_tail()}")
        finally:
            self._log_f.close()
        return self.returncode

    def stop(self, check=True):
        """SIGTERM, wait for exit, and (by default) assert exit status 0."""
        if self.proc is None or self.proc.poll() is not None:
            rc = None if self.proc is None else self.proc.returncode
        else:
            self.proc.send_signal(signal.SIGTERM)
            rc = self.wait_exit()
        self.returncode = rc
        if check:
            assert rc == 0, (f"inferd exited with status {rc} after SIGTERM (expected 0)\n"
                             f"--- stderr ---\n{self.log_tail()}")
        return rc

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    # -- logs / client -----------------------------------------------------
    def log(self):
        try:
            return self.log_path.read_bytes().decode("utf-8", "replace")
        except OSError:
            return ""

    def log_tail(self, lines=150):
        return "\n".join(self.log().splitlines()[-lines:])

    def client(self):
        return Client(self.url)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # Function-scoped servers of earlier tests are no longer interesting.
    _SERVERS[:] = [s for s in _SERVERS if s.scope != "function"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        seen = set()
        for s in _SERVERS:
            if id(s) in seen or s.log_path is None:
                continue
            seen.add(id(s))
            state = "running" if s.alive() else f"exited {s.proc.returncode if s.proc else None}"
            rep.sections.append((f"inferd stderr [{s.tag} {s.url}, {state}] {s.log_path}",
                                 s.log_tail(200)))


@pytest.fixture
def server_factory(tmp_path):
    """``start(models_dir, *extra_args, wait_ready=True)`` -> started Server.

    Servers still running at teardown are SIGTERMed (killed if they hang).
    """
    started = []

    def start(models_dir, *extra_args, wait_ready=True, tag="inferd"):
        s = Server(models_dir, tmp_path, extra_args, scope="function", tag=tag)
        started.append(s)
        return s.start(wait_ready=wait_ready)

    yield start
    _stop_all(started)


def _stop_all(servers):
    """SIGTERM every server still running; each must exit 0 (killed if it hangs).

    Every test thus also checks a clean shutdown after whatever it did.
    """
    problems = []
    for s in servers:
        if not s.alive():
            s._log_f.close()
            continue
        s.signal(signal.SIGTERM)
        try:
            rc = s.proc.wait(timeout=STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            s.kill()
            problems.append(f"{s.tag} {s.url}: still running {STOP_DEADLINE_S:.0f}s after SIGTERM (killed)")
            continue
        s._log_f.close()
        if rc != 0:
            problems.append(f"{s.tag} {s.url}: exit status {rc} after SIGTERM (expected 0)\n"
                            f"--- stderr ---\n{s.log_tail(60)}")
    if problems:
        pytest.fail("shutdown at teardown: " + "\n".join(problems))


@pytest.fixture(scope="module")
def module_server_factory(tmp_path_factory):
    started = []

    def start(models_dir, *extra_args, tag="inferd"):
        log_dir = tmp_path_factory.mktemp("inferd-logs")
        s = Server(models_dir, log_dir, extra_args, scope="module", tag=tag)
        started.append(s)
        return s.start()

    yield start
    try:
        _stop_all(started)
    finally:
        for s in started:
            if s in _SERVERS:
                _SERVERS.remove(s)


# ---------------------------------------------------------------------------
# trained models
# ---------------------------------------------------------------------------


class TrainedModel:
    """A booster trained by the suite, plus how to write it into a repository."""

    def __init__(self, name, booster, n_features, n_outputs, filename, src_path):
        self.name = name
        self.booster = booster
        self.n_features = n_features
        self.n_outputs = n_outputs        # 1 (shape [-1]) or n_classes (shape [-1, c])
        self.filename = filename          # model.json or model.ubj
        self.src_path = src_path

    def expected(self, X):
        X = np.asarray(X, dtype=np.float32)
        p = self.booster.inplace_predict(X, missing=np.nan)
        p = np.asarray(p, dtype=np.float64)
        if self.n_outputs == 1:
            return p.reshape(X.shape[0])
        return p.reshape(X.shape[0], self.n_outputs)

    def rows(self, n, seed, nan_fraction=0.0):
        rng = np.random.default_rng(seed)
        X = rng.normal(0.0, 1.0, size=(n, self.n_features)).astype(np.float32)
        if nan_fraction:
            X[rng.random(X.shape) < nan_fraction] = np.nan
        return X

    def install(self, repo_dir, name=None, version=1, config=None):
        """Write ``<repo_dir>/<name>/config.json`` and ``<name>/<version>/<file>``."""
        mdir = Path(repo_dir) / (name or self.name)
        (mdir / str(version)).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.src_path, mdir / str(version) / self.filename)
        cfg_path = mdir / "config.json"
        if config is not None or not cfg_path.exists():
            cfg_path.write_text(json.dumps(config if config is not None else {"backend": "xgboost"}))
        return mdir


def _train(name, params, n_features, rounds, seed, out_dir, filename, n_train=2000, target="binary",
           n_classes=3, noise=0.3):
    rng = np.random.default_rng(seed)
    X = rng.normal(0.0, 1.0, size=(n_train, n_features)).astype(np.float32)
    w = rng.normal(0.0, 1.0, size=n_features)
    score = X @ w / np.sqrt(n_features)
    if target == "binary":
        y = (score + noise * rng.normal(size=n_train) > 0).astype(np.float32)
    elif target == "regression":
        y = (np.sin(score) + 0.5 * score + 0.1 * rng.normal(size=n_train)).astype(np.float32)
    else:
        y = np.digitize(score, np.quantile(score, np.linspace(0, 1, n_classes + 1)[1:-1])).astype(np.float32)
    # Missing values in training so default directions are learned.
    X[rng.random(X.shape) < 0.05] = np.nan
    params = dict({"nthread": 1}, **params, seed=seed)
    booster = xgb.train(params, xgb.DMatrix(X, label=y, missing=np.nan), num_boost_round=rounds)
    path = Path(out_dir) / name / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    booster.save_model(str(path))
    # Predict from the saved file, as the server will.
    loaded = xgb.Booster(model_file=str(path))
    loaded.set_param({"nthread": 1})
    n_out = n_classes if target == "multi" else 1
    return TrainedModel(name, loaded, n_features, n_out, filename, path)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """The suite's models: binary (7 features, model.json), regression
    (13 features, model.ubj), multiclass (3 classes, 10 features, model.json),
    binary_v2 (a different 7-feature binary model) and slow (400 deep trees)."""
    out = tmp_path_factory.mktemp("trained")
    m = {}
    m["binary"] = _train("binary", {"objective": "binary:logistic", "max_depth": 4, "eta": 0.3},
                         7, 20, 1, out, "model.json", target="binary")
    m["regression"] = _train("regression", {"objective": "reg:squarederror", "max_depth": 4, "eta": 0.3},
                             13, 20, 2, out, "model.ubj", target="regression")
    m["multiclass"] = _train("multiclass", {"objective": "multi:softprob", "num_class": 3,
                                            "max_depth": 4, "eta": 0.3},
                             10, 20, 3, out, "model.json", target="multi")
    m["binary_v2"] = _train("binary_v2", {"objective": "binary:logistic", "max_depth": 3, "eta": 0.5},
                            7, 10, 4, out, "model.json", target="binary")
    # Deliberately expensive: noisy labels grow full depth-8 trees, 400 of them
    # (~20 ms for 2000 rows on one core), to keep a 1-instance model busy.
    m["slow"] = _train("slow", {"objective": "binary:logistic", "max_depth": 8, "eta": 0.05,
                                "tree_method": "hist", "nthread": 2},
                       10, 400, 5, out, "model.json", target="binary", n_train=3000, noise=3.0)
    return m


@pytest.fixture
def repo_dir(tmp_path):
    d = tmp_path / "models"
    d.mkdir()
    return d


def write_plugin_model(repo_dir, name="rowsum", width=4, path=None, extra=None):
    mdir = Path(repo_dir) / name
    (mdir / "1").mkdir(parents=True, exist_ok=True)
    cfg = {"backend": "plugin", "path": str(path or PLUGIN_SO), "parameters": {"width": width}}
    cfg.update(extra or {})
    (mdir / "config.json").write_text(json.dumps(cfg))
    return mdir


def parallel(n, fn):
    """Run fn(i) in n threads started together; return results (re-raises)."""
    results = [None] * n
    errors = []
    barrier = threading.Barrier(n)

    def run(i):
        try:
            barrier.wait(timeout=60)
            results[i] = fn(i)
        except BaseException as exc:  # noqa: BLE001
            errors.append((i, exc))

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "client threads still running after 600 s"
    if errors:
        i, exc = errors[0]
        raise AssertionError(f"{len(errors)} of {n} client threads failed; thread {i}: {exc!r}") from exc
    return results
