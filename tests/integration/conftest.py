"""Shared fixtures for the inferd integration suite.

Run from the repository root with Debian's interpreter:

    /usr/bin/python3 -m pytest -q tests/integration

The suite needs ``build/inferd`` and
``build/examples/plugin/libinferd_example_plugin.so`` (``make`` builds both).
``INFERD_BIN`` / ``INFERD_PLUGIN`` override those paths. The Redis queue's tests run
Debian's ``/usr/bin/redis-server`` and the PostgreSQL queue's start throw-away PostgreSQL 15
clusters (``postgresql-15``; ``scripts/install-deps`` installs both).

Everything here waits by polling against a deadline; nothing asserts on
elapsed time (the machines running this are small and shared).
"""
import atexit
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import xgboost as xgb

REPO_ROOT = Path(__file__).resolve().parents[2]
# inferd looks for S3 credentials at the EC2 instance metadata address (169.254.169.254) when
# no other source has them: no test may reach the host's own. Tests of that source serve it
# on loopback (test_s3_credentials.py) and lift this for their own processes.
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
INFERD_BIN = Path(os.environ.get("INFERD_BIN", REPO_ROOT / "build" / "inferd"))
PLUGIN_SO = Path(os.environ.get(
    "INFERD_PLUGIN",
    REPO_ROOT / "build" / "examples" / "plugin" / "libinferd_example_plugin.so"))

# where gates' release files appear: every plugin model's "hold_dir" (write_plugin_model)
GATE_DIR = Path(tempfile.mkdtemp(prefix="inferd-gates-"))
atexit.register(shutil.rmtree, GATE_DIR, True)

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
    """``build/inferd serve`` (or ``command``, e.g. ``worker``) on a free port;
    stderr/stdout captured to files."""

    def __init__(self, models_dir, log_dir, extra_args=(), scope="function", tag="inferd",
                 binary=None, port=None, command="serve"):
        self.binary = Path(binary) if binary is not None else INFERD_BIN
        self.command = command
        self.fixed_port = port    # None: a fresh free port per start
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
        if not self.binary.exists():
            pytest.fail(f"{self.binary} does not exist; build it first (make)")
        # A fixed port (a restart on the same address) may still be held for a moment.
        attempts = 3 if self.fixed_port is None else 40
        for attempt in range(attempts):
            self.port = free_port() if self.fixed_port is None else self.fixed_port
            self.url = f"http://127.0.0.1:{self.port}"
            self.log_path = self.log_dir / f"{self.tag}-{self.port}-{attempt}-{len(_SERVERS)}.stderr.log"
            cmd = [str(self.binary), self.command, "--models", str(self.models_dir),
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
            if attempt < attempts - 1 and ("address already in use" in log or "bind" in log):
                self._log_f.close()
                if self.fixed_port is not None:
                    time.sleep(0.25)
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

    def start(models_dir, *extra_args, wait_ready=True, tag="inferd", binary=None, port=None):
        s = Server(models_dir, tmp_path, extra_args, scope="function", tag=tag,
                   binary=binary, port=port)
        started.append(s)
        return s.start(wait_ready=wait_ready)

    yield start
    _stop_all(started)


@pytest.fixture
def worker_factory(tmp_path):
    """``start(models_dir, queue_url, *extra_args, backoff_ms=50, wait_ready=True)`` ->
    a started ``inferd worker --queue queue_url`` (a :class:`Server`; its ``url`` is its
    own port, which serves only /metrics and /v2/health/*).

    Like ``server_factory``: ready when GET /v2/health/ready answers 200 on its port;
    workers still running at teardown are SIGTERMed and must exit 0.
    """
    started = []

    def start(models_dir, queue_url, *extra_args, backoff_ms=50, wait_ready=True, tag="worker",
              binary=None):
        args = ["--queue", queue_url, "--retry-backoff-ms", str(backoff_ms), *extra_args]
        s = Server(models_dir, tmp_path, args, scope="function", tag=tag, binary=binary,
                   command="worker")
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
    cfg = {"backend": "plugin", "path": str(path or PLUGIN_SO),
           "parameters": {"width": width, "hold_dir": str(GATE_DIR)}}
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


# ---------------------------------------------------------------------------
# the asynchronous job API (test_async*.py)
# ---------------------------------------------------------------------------

JOB_FINAL_STATES = ("succeeded", "failed", "cancelled", "expired")
JOB_STATES = ("queued", "running") + JOB_FINAL_STATES
JOB_SHOWN_STATES = JOB_STATES + ("cancelling",)  # running, asked to cancel (job JSON only)
JOB_KEYS = ("id", "model", "status", "priority", "attempts", "max_attempts", "created_at",
            "started_at", "finished_at", "error", "output_location", "callback_url",
            "notifications")


def async_args(data_dir, *extra, backoff_ms=50, queue="sqlite"):
    """``serve`` options for the job API: a private --data-dir, a short retry backoff and,
    when ``queue`` is a ``redis://`` or ``postgresql://`` URL (see the ``fresh_queue``
    fixture), ``--queue URL``.

    With the default ``queue="sqlite"`` no --queue is given: the default stays tested.
    """
    queue_args = [] if queue in (None, "sqlite") else ["--queue", str(queue)]
    return ["--data-dir", str(data_dir), *queue_args, "--retry-backoff-ms", str(backoff_ms),
            *extra]


def parse_time(value):
    """An ISO-8601 UTC time of the job JSON as a datetime (None for null)."""
    import datetime as _dt
    if value is None:
        return None
    assert isinstance(value, str), f"time is not a string: {value!r}"
    v = value[:-1] + "+00:00" if value.endswith("Z") else value
    try:
        t = _dt.datetime.fromisoformat(v)
    except ValueError:
        pytest.fail(f"not an ISO-8601 time: {value!r}")
    assert t.tzinfo is not None and t.utcoffset() == _dt.timedelta(0), \
        f"time is not UTC: {value!r}"
    return t


def job_id_from_location(resp):
    loc = resp.headers.get("Location")
    assert loc, f"HTTP {resp.status_code} without a Location header: {dict(resp.headers)}"
    assert loc.startswith("/v1/jobs/"), f"Location {loc!r} is not /v1/jobs/{{id}}"
    return loc[len("/v1/jobs/"):]


def check_accepted(resp, what="submit"):
    """A 202 answer to a submission: Location + {"id","status":"queued"}; returns the id."""
    assert resp.status_code == 202, f"{what}: HTTP {resp.status_code} (expected 202): {resp.text[:500]}"
    body = resp.json()
    jid = job_id_from_location(resp)
    assert body.get("id") == jid, f"{what}: body id {body.get('id')!r} != Location id {jid!r}"
    assert body.get("status") == "queued", f"{what}: body {body!r}"
    return jid


def check_job_json(job, jid=None):
    missing = [k for k in JOB_KEYS if k not in job]
    assert not missing, f"job JSON lacks {missing}: {job!r}"
    if jid is not None:
        assert job["id"] == jid, job
    assert job["status"] in JOB_SHOWN_STATES, job
    for k in ("created_at", "started_at", "finished_at"):
        parse_time(job[k])
    assert job["created_at"] is not None, job
    assert isinstance(job["notifications"], list), job
    return job


def job_row_body(model, X, **fields):
    """A POST /v1/jobs body with an inline input."""
    body = {"model": model, "input": infer_body(X)}
    body.update(fields)
    return body


def _jobs_submit(self, model=None, X=None, headers=None, **fields):
    """POST /v1/jobs ``{"model": model, "input": infer_body(X), **fields}``."""
    body = {}
    if model is not None:
        body["model"] = model
    if X is not None:
        body["input"] = infer_body(X)
    body.update(fields)
    return self.post("/v1/jobs", json=body, headers=headers or {})


def _jobs_submit_ok(self, model, X=None, headers=None, **fields):
    return check_accepted(self.submit(model, X, headers=headers, **fields),
                          f"POST /v1/jobs model={model} {sorted(fields)}")


def _jobs_job(self, jid, wait=None, **kw):
    path = f"/v1/jobs/{jid}" + (f"?wait={wait}" if wait is not None else "")
    r = self.get(path, **kw)
    assert r.status_code == 200, f"GET {path}: HTTP {r.status_code}: {r.text[:500]}"
    return check_job_json(r.json(), jid)


def _jobs_wait_status(self, jid, statuses, deadline_s=60, what=None):
    """Poll GET /v1/jobs/{id} (no long-poll) until its status is one of ``statuses``."""
    statuses = (statuses,) if isinstance(statuses, str) else tuple(statuses)
    last = {}

    def check():
        last["job"] = self.job(jid)
        return last["job"] if last["job"]["status"] in statuses else None
    end = time.monotonic() + deadline_s
    while True:
        job = check()
        if job:
            return job
        if time.monotonic() > end:
            pytest.fail(f"timed out after {deadline_s:.0f}s waiting for job {jid} "
                        f"({what or ''}) to be {'/'.join(statuses)}; last: {last.get('job')!r}")
        time.sleep(0.05)


def _jobs_wait_final(self, jid, deadline_s=60, what=None):
    return self.wait_status(jid, JOB_FINAL_STATES, deadline_s, what)


def _jobs_list_all(self, limit=1000, **params):
    """Every job of GET /v1/jobs (following next_cursor); returns (jobs, pages)."""
    jobs, pages, cursor = [], 0, None
    seen_cursors = set()
    while True:
        q = dict(params, limit=limit)
        if cursor is not None:
            q["cursor"] = cursor
        r = self.get("/v1/jobs", params=q)
        assert r.status_code == 200, f"GET /v1/jobs {q}: HTTP {r.status_code}: {r.text[:300]}"
        page = r.json()
        assert isinstance(page.get("jobs"), list) and "next_cursor" in page, page
        assert len(page["jobs"]) <= limit, f"page of {len(page['jobs'])} > limit {limit}"
        jobs.extend(page["jobs"])
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            return jobs, pages
        assert cursor not in seen_cursors, f"next_cursor {cursor!r} repeats"
        seen_cursors.add(cursor)
        assert pages < 10000, "GET /v1/jobs paging does not end"


def metric_value(text, name, labels=None):
    """The value of one sample of a Prometheus text exposition (None if absent)."""
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if labels is None:
            if key == name:
                return float(value)
        elif key.startswith(name + "{"):
            got = dict(kv.split("=", 1) for kv in key[len(name) + 1:-1].split(","))
            got = {k: v.strip('"') for k, v in got.items()}
            if all(got.get(k) == v for k, v in labels.items()):
                return float(value)
    return None


def _jobs_counts(self):
    """{state: count} from the inferd_jobs gauge of /metrics."""
    text = self.metrics_text()
    return {s: metric_value(text, "inferd_jobs", {"state": s}) for s in JOB_STATES}


Client.submit = _jobs_submit
Client.submit_ok = _jobs_submit_ok
Client.job = _jobs_job
Client.wait_status = _jobs_wait_status
Client.wait_final = _jobs_wait_final
Client.list_all = _jobs_list_all
Client.job_counts = _jobs_counts


class Gate:
    """A job that holds an async worker until the test releases it.

    Its input is one row whose first values are ``-997, n``: the example plugin holds that
    request in the model until the file ``GATE_DIR/release-<n>`` exists, or the job is
    cancelled (then it ends cancelled at once). With ``--workers 1 --worker-batch 1`` this
    keeps every other job queued for as long as the test needs, with no timing assumptions.
    The gate job's result is the row sums of :attr:`X` (its first row holds the marker).
    """
    _n = 0

    def __init__(self, model="rowsum", X=None):
        Gate._n += 1
        self.n = Gate._n
        X = np.ones((1, 4), dtype=np.float32) if X is None else np.array(X, dtype=np.float32)
        X[0, 0], X[0, 1] = -997, self.n
        self.X = X
        self.model = model
        self.released = False
        self.id = None

    def submit(self, client, **fields):
        self.id = check_accepted(client.post("/v1/jobs", json=dict(
            {"model": self.model, "input": infer_body(self.X)}, **fields)), "gate job")
        return self.id

    def hold(self, client, deadline_s=30):
        """Submit and wait until the gate job runs (the worker is now held)."""
        self.submit(client)
        client.wait_status(self.id, "running", deadline_s, "gate job to occupy the worker")
        return self.id

    def release(self):
        """Lets the held request (and any later attempt of it) go; True."""
        (GATE_DIR / f"release-{self.n}").touch()
        self.released = True
        return True

    def defuse(self):
        """At teardown: release."""
        self.release()


@pytest.fixture
def gates(server_factory):
    """``gates(model, X)`` -> a new :class:`Gate`; all are released before the servers stop."""
    made = []

    def make(model="rowsum", X=None):
        g = Gate(model, X)
        made.append(g)
        return g

    yield make
    for g in made:
        g.defuse()


class WebhookReceiver:
    """An HTTP server on 127.0.0.1:0 recording every POST.

    Paths ``/flaky/<key>`` answer 500 to the first two POSTs for that key, then 200;
    ``/fail/...`` always 500; ``/slow/...`` 200 after ``SLOW_S`` (so deliveries overlap);
    everything else 200. ``tls``: an ``ssl.SSLContext`` (server side) makes it an https
    receiver (``url`` starts with https://).
    """
    SLOW_S = 0.3

    def __init__(self, tls=None):
        import http.server

        self.requests = []
        self.lock = threading.Lock()
        self.hits = {}
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802 - http.server API
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                with receiver.lock:
                    receiver.hits[self.path] = receiver.hits.get(self.path, 0) + 1
                    hit = receiver.hits[self.path]
                    receiver.requests.append({"path": self.path, "headers": dict(self.headers),
                                              "body": body, "at": time.time()})
                status = 200
                if self.path.startswith("/slow/"):
                    time.sleep(receiver.SLOW_S)
                if self.path.startswith("/fail/") or (self.path.startswith("/flaky/") and hit <= 2):
                    status = 500
                payload = b'{"ok":true}' if status == 200 else b'{"error":"try again"}'
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        class Quiet(http.server.ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # a sender killed mid-request (kill -9 tests) resets its connection

        self.httpd = Quiet(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
            self.url = "https" + self.url[len("http"):]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def received(self, path_prefix=""):
        with self.lock:
            return [r for r in self.requests if r["path"].startswith(path_prefix)]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def webhook_receiver():
    r = WebhookReceiver()
    yield r
    r.close()


# ---------------------------------------------------------------------------
# S3: s3rver (installed by scripts/install-deps into .deps/) and Debian's awscli
# ---------------------------------------------------------------------------

S3RVER_BIN = REPO_ROOT / ".deps" / "node_modules" / ".bin" / "s3rver"
AWS_BIN = Path("/usr/bin/aws")      # Debian's awscli, not a pyenv shim
S3_KEY = "S3RVER"                   # the credentials s3rver accepts
S3_BUCKET = "inferd-test"           # created at start-up; tests use their own prefixes
S3_DEADLINE_S = 30.0


class S3rver:
    """An s3rver on 127.0.0.1 with its own data folder and bucket ``S3_BUCKET``.

    s3rver checks the access key id but not SigV4 signatures (test_s3.py has a proxy that does).
    Node 20 needs ``--openssl-legacy-provider`` for s3rver's continuation tokens.
    """

    def __init__(self, data_dir, buckets=(S3_BUCKET,)):
        if not S3RVER_BIN.exists():
            pytest.fail(f"{S3RVER_BIN} is missing: run scripts/install-deps")
        if not AWS_BIN.exists():
            pytest.fail(f"{AWS_BIN} is missing: run scripts/install-deps (Debian's awscli)")
        self.data_dir = Path(data_dir)
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = self.data_dir.parent / f"s3rver-{self.port}.log"
        cmd = [str(S3RVER_BIN), "-d", str(self.data_dir), "-a", "127.0.0.1",
               "-p", str(self.port), "-s"]
        for b in buckets:
            cmd += ["--configure-bucket", b]
        env = dict(os.environ, NODE_OPTIONS="--openssl-legacy-provider")
        self._log_f = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log_f, stderr=self._log_f,
                                     stdin=subprocess.DEVNULL, env=env)
        wait_for(self._ready, S3_DEADLINE_S, f"s3rver on {self.endpoint} to answer")

    def _ready(self):
        if self.proc.poll() is not None:
            pytest.fail(f"s3rver exited with {self.proc.returncode}:\n"
                        f"{self.log_path.read_text(errors='replace')[-2000:]}")
        return requests.get(f"{self.endpoint}/{S3_BUCKET}?list-type=2&max-keys=1",
                            timeout=5).status_code == 200

    def env(self, **extra):
        """The environment for awscli and inferd: s3rver's credentials and region."""
        env = dict(os.environ, AWS_ACCESS_KEY_ID=S3_KEY, AWS_SECRET_ACCESS_KEY=S3_KEY,
                   AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
        for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_REGION",
                  "AWS_PROFILE"):
            env.pop(k, None)
        env.update(extra)
        return env

    def aws(self, *args, check=True, endpoint=None):
        """Runs ``/usr/bin/aws --endpoint-url ... ARGS``; returns the CompletedProcess."""
        cmd = [str(AWS_BIN), "--endpoint-url", endpoint or self.endpoint, *map(str, args)]
        p = subprocess.run(cmd, env=self.env(), capture_output=True, timeout=300)
        if check and p.returncode != 0:
            pytest.fail(f"{' '.join(cmd)}: exit {p.returncode}\n"
                        f"{p.stderr.decode(errors='replace')[-2000:]}")
        return p

    def upload(self, local_dir, uri):
        """Copies every file under ``local_dir`` to the prefix ``uri`` (s3://bucket/prefix)."""
        self.aws("s3", "cp", "--recursive", "--only-show-errors", local_dir, uri)

    def download(self, uri, local_dir):
        """Copies every object under the prefix ``uri`` into ``local_dir``."""
        self.aws("s3", "cp", "--recursive", "--only-show-errors", uri, local_dir)
        return Path(local_dir)

    def keys(self, uri):
        """{key relative to the prefix ``uri``: size} of every object under it."""
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        p = self.aws("s3api", "list-objects-v2", "--bucket", bucket, "--prefix", prefix,
                     "--output", "json")
        out = json.loads(p.stdout or b"{}")
        return {o["Key"][len(prefix):]: o["Size"] for o in out.get("Contents", [])}

    def get_bytes(self, uri, tmp_dir):
        dst = Path(tmp_dir) / f"get-{time.monotonic_ns()}"
        self.aws("s3", "cp", "--only-show-errors", uri, dst)
        return dst.read_bytes()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_f.close()


@pytest.fixture(scope="module")
def s3rver(tmp_path_factory):
    """A module's s3rver (bucket ``S3_BUCKET``); stopped at the end of the module."""
    server = S3rver(tmp_path_factory.mktemp("s3rver") / "data")
    yield server
    server.stop()


# ---------------------------------------------------------------------------
# Redis: Debian's redis-server (scripts/install-deps), and the queue parametrization
# ---------------------------------------------------------------------------

REDIS_SERVER_BIN = Path("/usr/bin/redis-server")
REDIS_DEADLINE_S = 30.0
REDIS_DATABASES = 1001      # inferd accepts redis://host:port/0 ... /1000


class RedisError(Exception):
    """An error reply (``-ERR ...``) from Redis."""


class RedisClient:
    """A minimal RESP client, for the tests' own look into Redis (no python3-redis needed).

    ``execute("HGETALL", "inferd:counts")`` -> the decoded reply (bulk strings as ``bytes``);
    ``pipeline([cmd, ...])`` sends them all, then reads every reply (errors as RedisError
    objects, not raised).
    """

    def __init__(self, port, db=0, timeout=10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.rf = self.sock.makefile("rb")
        if db:
            self.execute("SELECT", db)

    @classmethod
    def from_url(cls, url):
        """For ``redis://127.0.0.1:PORT/DB`` (the form the fixtures hand out)."""
        hostport, _, db = url[len("redis://"):].partition("/")
        return cls(int(hostport.rsplit(":", 1)[1]), int(db or 0))

    @staticmethod
    def _encode(args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            a = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        return b"".join(out)

    def _read(self):
        line = self.rf.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("Redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            return RedisError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.rf.read(n + 2)[:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._read() for _ in range(n)]
        raise ConnectionError(f"unexpected RESP line {line!r}")

    def execute(self, *args):
        self.sock.sendall(self._encode(args))
        reply = self._read()
        if isinstance(reply, RedisError):
            raise reply
        return reply

    def pipeline(self, commands, chunk=500):
        replies = []
        for i in range(0, len(commands), chunk):
            part = commands[i:i + chunk]
            self.sock.sendall(b"".join(self._encode(c) for c in part))
            replies.extend(self._read() for _ in part)
        return replies

    def scan_keys(self, pattern):
        keys, cursor = [], b"0"
        while True:
            cursor, batch = self.execute("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
            keys.extend(batch)
            if cursor == b"0":
                return keys

    def close(self):
        try:
            self.rf.close()
        finally:
            self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RedisServer:
    """``redis-server`` on a free 127.0.0.1 port with its own folder and an append-only
    file fsynced on every write (``--appendonly yes --appendfsync always --save ""``), so
    :meth:`kill9` loses nothing it acknowledged and :meth:`restart` (same port, same
    folder) replays it. Its log is attached to a failing test's report, like inferd's.
    """

    def __init__(self, data_dir, tag="redis", scope="function"):
        if not REDIS_SERVER_BIN.exists():
            pytest.fail(f"{REDIS_SERVER_BIN} is missing: run scripts/install-deps")
        self.dir = Path(data_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tag = tag
        self.scope = scope
        self.port = None
        self.url = None
        self.proc = None
        self.log_path = None
        self._log_f = None
        self.n_starts = 0
        self._db_lock = threading.Lock()
        self._next_db = 0

    # -- lifecycle --------------------------------------------------------
    def start(self):
        """Starts it (on the same port after the first start); returns once PING answers."""
        fixed = self.port is not None
        attempts = 40 if fixed else 3
        for attempt in range(attempts):
            if not fixed:
                self.port = free_port()
            self.url = f"redis://127.0.0.1:{self.port}"
            self.n_starts += 1
            self.log_path = self.dir / f"redis-{self.port}-{self.n_starts}.log"
            cmd = [str(REDIS_SERVER_BIN), "--port", str(self.port), "--bind", "127.0.0.1",
                   "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "always",
                   "--save", "", "--daemonize", "no", "--logfile", "",
                   "--databases", str(REDIS_DATABASES)]
            self._log_f = open(self.log_path, "wb")
            self.proc = subprocess.Popen(cmd, stdout=self._log_f, stderr=self._log_f,
                                         stdin=subprocess.DEVNULL, cwd=str(self.dir))
            if self._wait_ready():
                return self
            self._log_f.close()
            if attempt < attempts - 1 and "address already in use" in self.log().lower():
                time.sleep(0.25 if fixed else 0)
                continue
            pytest.fail(f"redis-server exited with {self.proc.returncode} before answering "
                        f"PING\ncommand: {' '.join(cmd)}\n--- log ---\n{self.log_tail()}")
        return self

    def _wait_ready(self):
        """True once PING answers PONG (not -LOADING); False if the process exits."""
        end = time.monotonic() + REDIS_DEADLINE_S
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                return False
            try:
                with RedisClient(self.port, timeout=2) as c:
                    if c.execute("PING") == "PONG":
                        return True
            except (OSError, RedisError):
                pass
            time.sleep(0.02)
        self.proc.kill()
        self.proc.wait()
        pytest.fail(f"redis-server on port {self.port} did not answer PING within "
                    f"{REDIS_DEADLINE_S:.0f}s\n--- log ---\n{self.log_tail()}")

    def kill9(self):
        """SIGKILL, as a crash: no shutdown, no final save (the AOF has every write)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._log_f.close()

    def restart(self):
        """Starts it again on the same port and folder: the AOF replays."""
        assert not self.alive(), "restart() of a redis-server that is still running"
        return self.start()

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log_f is not None:
            self._log_f.close()

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    # -- databases / clients ------------------------------------------------
    def db_url(self, db=0):
        return f"redis://127.0.0.1:{self.port}/{db}"

    def fresh_url(self):
        """The URL of a database no other queue of this session uses now, emptied first.

        Databases 1..1000 are handed out in turn (0 is left for tests' own use).
        """
        with self._db_lock:
            self._next_db = self._next_db % (REDIS_DATABASES - 1) + 1
            db = self._next_db
        with RedisClient(self.port, db) as c:
            c.execute("FLUSHDB")
        return self.db_url(db)

    def client(self, db=0):
        return RedisClient(self.port, db)

    # -- logs ----------------------------------------------------------------
    def log(self):
        try:
            return self.log_path.read_bytes().decode("utf-8", "replace")
        except (OSError, AttributeError):
            return ""

    def log_tail(self, lines=150):
        return "\n".join(self.log().splitlines()[-lines:])


@pytest.fixture
def redis_server(tmp_path):
    """A test's own redis-server (AOF, fsync always); see :class:`RedisServer` for
    ``kill9()`` / ``restart()``. Stopped at teardown.

    Request it before ``server_factory`` / ``worker_factory``, so that it is stopped after
    them (inferd then shuts down against a living Redis).
    """
    r = RedisServer(tmp_path / "redis", tag="redis")
    _SERVERS.append(r)
    r.start()
    yield r
    r.stop()


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory):
    """One redis-server for the whole session; each queue gets its own database
    (``fresh_url()``), so module-scoped servers and per-test servers never share keys."""
    r = RedisServer(tmp_path_factory.mktemp("redis-shared"), tag="redis-shared",
                    scope="session")
    _SERVERS.append(r)
    r.start()
    yield r
    r.stop()
    if r in _SERVERS:
        _SERVERS.remove(r)


# ---------------------------------------------------------------------------
# PostgreSQL (the postgresql:// queue): throw-away clusters started by the tests
# ---------------------------------------------------------------------------

PG_BIN = Path(os.environ.get("INFERD_PG_BIN", "/usr/lib/postgresql/15/bin"))
PG_DEADLINE_S = 60.0


class PostgresError(Exception):
    """psql failed; the message holds its stderr."""


class PostgresServer:
    """A PostgreSQL 15 cluster of its own: ``initdb`` in a temporary folder (owned by the
    ``postgres`` user when the tests run as root, because PostgreSQL refuses to run as root),
    on a free 127.0.0.1 port with a unix socket folder of its own, ``trust`` authentication
    (roles with a password can be made to need it: :meth:`require_password`), fsync and
    synchronous_commit on, so what inferd acknowledged survives :meth:`restart`. Started and
    stopped with ``pg_ctl``; its log is attached to a failing test's report, like inferd's.
    :meth:`destroy` stops it and deletes the folder.
    """

    def __init__(self, tag="postgres", scope="function"):
        if not (PG_BIN / "pg_ctl").exists():
            pytest.fail(f"{PG_BIN}/pg_ctl is missing: run scripts/install-deps (postgresql-15)")
        self.dir = Path(tempfile.mkdtemp(prefix="inferd-pg-"))
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        self.sock = self.dir / "sock"
        self.tag = tag
        self.scope = scope
        self.port = None
        self.url = None
        self.proc = None          # pg_ctl runs the postmaster in the background: see pid()
        self.log_path = self.dir / "postgres.log"
        self._db_lock = threading.Lock()
        self._next_db = 0

    def _run(self, *cmd, check=True, timeout=PG_DEADLINE_S, input=None):
        """Runs a PostgreSQL program as the cluster's owner; returns the CompletedProcess."""
        full = (["runuser", "-u", "postgres", "--"] if self.as_root else []) + [str(c) for c in cmd]
        p = subprocess.run(full, capture_output=True, text=True, timeout=timeout,
                           cwd=str(self.dir), input=input,
                           stdin=None if input is not None else subprocess.DEVNULL)
        if check and p.returncode != 0:
            raise PostgresError(f"{' '.join(full)}: exit {p.returncode}\n{p.stdout}{p.stderr}"
                                f"\n--- log ---\n{self.log_tail(40)}")
        return p

    # -- lifecycle --------------------------------------------------------
    def start(self):
        """initdb (first time), then ``pg_ctl start -w`` on the same port after the first
        start; returns once the server accepts connections."""
        if not self.data.exists():
            self._run("mkdir", "-p", self.sock)
            self._run(PG_BIN / "initdb", "-D", self.data, "-U", "postgres", "-A", "trust",
                      "-E", "UTF8", "--no-locale")
            # in the file, not on the command line, so a reload (require_password) keeps them
            self._run("sh", "-c", f"cat >> {self.data}/postgresql.conf", input=(
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.sock}'\n"
                "max_connections = 300\nfsync = on\nsynchronous_commit = on\n"))
        fixed = self.port is not None
        for attempt in range(40 if fixed else 3):
            if not fixed:
                self.port = free_port()
            self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
            p = self._run(PG_BIN / "pg_ctl", "-D", self.data, "-l", self.log_path, "-w",
                          "-t", str(int(PG_DEADLINE_S)), "-o", f"-c port={self.port}", "start",
                          check=False)
            if p.returncode == 0:
                return self
            if attempt < 39 and "address already in use" in self.log().lower():
                time.sleep(0.25 if fixed else 0)
                continue
            pytest.fail(f"PostgreSQL did not start on port {self.port}: {p.stdout}{p.stderr}"
                        f"\n--- log ---\n{self.log_tail()}")
        return self

    def stop(self, mode="fast"):
        """``pg_ctl stop -m mode`` (fast: sessions are ended, nothing acknowledged is lost)."""
        if self.alive():
            self._run(PG_BIN / "pg_ctl", "-D", self.data, "-m", mode, "-w", "stop", check=False)

    def restart(self, mode="fast"):
        """``pg_ctl restart -m mode`` on the same port (a start after :meth:`stop`)."""
        if not self.alive():
            return self.start()
        self._run(PG_BIN / "pg_ctl", "-D", self.data, "-l", self.log_path, "-m", mode, "-w",
                  "-t", str(int(PG_DEADLINE_S)), "restart")
        return self

    def destroy(self):
        self.stop(mode="immediate")
        shutil.rmtree(self.dir, ignore_errors=True)

    def pid(self):
        """The postmaster's pid while it runs (from postmaster.pid), else None."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def alive(self):
        return self.pid() is not None

    # -- databases / roles --------------------------------------------------
    def db_url(self, db="postgres", user="postgres", password=None):
        auth = user if password is None else f"{user}:{password}"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{db}"

    def psql(self, sql, db="postgres"):
        """Runs ``sql`` with psql (unaligned, tuples only) as postgres; returns the rows as
        lists of strings."""
        p = subprocess.run([str(PG_BIN / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At",
                            "-F", "\t", "-h", "127.0.0.1", "-p", str(self.port), "-U",
                            "postgres", "-d", db, "-c", sql],
                           capture_output=True, text=True, timeout=PG_DEADLINE_S,
                           stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            raise PostgresError(f"psql -d {db} -c {sql!r}: exit {p.returncode}: {p.stderr}")
        return [line.split("\t") for line in p.stdout.splitlines()]

    def create_db(self, name):
        self.psql(f'CREATE DATABASE "{name}"')
        return self.db_url(name)

    def fresh_url(self):
        """The URL of a new, empty database (``q_1``, ``q_2``, ...) no other queue uses."""
        with self._db_lock:
            self._next_db += 1
            n = self._next_db
        return self.create_db(f"q_{n}")

    def require_password(self, role, method="scram-sha-256"):
        """``role`` must now log in over 127.0.0.1 with its password (``method``: md5 or
        scram-sha-256), ahead of the trust lines initdb wrote; the configuration is reloaded."""
        hba = self.data / "pg_hba.conf"
        text = hba.read_text()
        line = f"host all {role} 127.0.0.1/32 {method}\n"
        if line not in text:
            hba.write_text(line + text)
        self.psql("SELECT pg_reload_conf()")

    def create_role(self, role, password, db=None, encryption="scram-sha-256"):
        """A login role with ``password`` stored as ``encryption`` (md5 or scram-sha-256)
        and, with ``db``, a database it owns."""
        self.psql(f"SET password_encryption = '{encryption}'; "
                  f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        if db is not None:
            self.psql(f'CREATE DATABASE "{db}" OWNER {role}')

    # -- logs ----------------------------------------------------------------
    def log(self):
        try:
            return self.log_path.read_bytes().decode("utf-8", "replace")
        except OSError:
            return ""

    def log_tail(self, lines=150):
        return "\n".join(self.log().splitlines()[-lines:])


@pytest.fixture
def postgres_server():
    """A test's own PostgreSQL cluster (:class:`PostgresServer`: ``stop()``, ``restart()``,
    ``psql()``, ``fresh_url()``), destroyed at teardown.

    Request it before ``server_factory`` / ``worker_factory``, so that it is stopped after
    them (inferd then shuts down against a living database).
    """
    pg = PostgresServer(tag="postgres")
    _SERVERS.append(pg)
    try:
        pg.start()
        yield pg
    finally:
        pg.destroy()


@pytest.fixture(scope="session")
def shared_postgres():
    """One PostgreSQL cluster for the whole session; each queue gets a database of its own
    (``fresh_url()``: CREATE DATABASE q_N), so no two queues share tables."""
    pg = PostgresServer(tag="postgres-shared", scope="session")
    _SERVERS.append(pg)
    try:
        pg.start()
        yield pg
    finally:
        pg.destroy()
        if pg in _SERVERS:
            _SERVERS.remove(pg)


QUEUE_KINDS = ("sqlite", "redis", "postgres")
SHARED_QUEUE_KINDS = ("redis", "postgres")   # stores that several inferd processes share


@pytest.fixture(params=SHARED_QUEUE_KINDS)
def shared_queue(request):
    """``shared_queue()`` -> the URL of a new, empty queue that several processes share, once
    per store: a database of the test's own redis-server, or of its own PostgreSQL cluster.
    Request it before ``server_factory`` / ``worker_factory`` (the store outlives them)."""
    store = request.getfixturevalue({"redis": "redis_server",
                                     "postgres": "postgres_server"}[request.param])
    return store.fresh_url


@pytest.fixture(scope="module", params=QUEUE_KINDS)
def queue_kind(request):
    """Runs every test that (indirectly) uses it once per queue: ``sqlite``, ``redis``,
    ``postgres``."""
    return request.param


@pytest.fixture(scope="module")
def fresh_queue(queue_kind, request):
    """``fresh_queue()`` -> the ``queue=`` of :func:`async_args` for a new, empty queue:
    ``"sqlite"`` (the queue lives under the server's --data-dir), or the URL of an emptied
    database of the session's redis-server, or the URL of a new database of the session's
    PostgreSQL cluster."""
    if queue_kind == "sqlite":
        return lambda: "sqlite"
    if queue_kind == "postgres":
        return request.getfixturevalue("shared_postgres").fresh_url
    return request.getfixturevalue("shared_redis").fresh_url


# ---------------------------------------------------------------------------
# stored text in error messages (issue 13: errors do not quote what they read)
# ---------------------------------------------------------------------------

SECRET_WORD = "hunter2secret"   # on a line of its own in every passwd copy


def passwd_copy(path):
    """A copy of /etc/passwd at ``path`` (a file anyone could name as an input location), with
    one more line holding SECRET_WORD. Returns the text written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        text = Path("/etc/passwd").read_text()
    except OSError:
        text = "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"
    text = text if text.endswith("\n") else text + "\n"
    text += f"{SECRET_WORD}:x:4242:4242:{SECRET_WORD}:/home/{SECRET_WORD}:/bin/sh\n"
    path.write_text(text)
    return text


def assert_quotes_nothing_of(text, message, what):
    """``message`` (an error, a .errors object) shows none of ``text``'s words: not its first
    word, and no word of 4 letters or more that is not also one of the message's own words
    of a message about nothing (``line``, ``column``, ``number``, ...)."""
    import re
    first = re.findall(r"[A-Za-z0-9_]+", text)[0]
    assert not re.search(rf"(?<![A-Za-z0-9_]){re.escape(first)}(?![A-Za-z0-9_])", message), \
        f"{what} quotes the file's first word {first!r}: {message[:500]!r}"
    ours = {"line", "column", "columns", "number", "malformed", "JSON", "invalid", "token",
            "expected", "model", "input", "inputs", "name", "position", "byte"}
    file_words = {w for w in re.findall(r"[A-Za-z_]{4,}", text)} - ours
    leaked = sorted(w for w in set(re.findall(r"[A-Za-z_]{4,}", message)) if w in file_words)
    assert not leaked, f"{what} quotes the file's words {leaked}: {message[:500]!r}"
    assert SECRET_WORD not in message, f"{what} quotes {SECRET_WORD!r}: {message[:500]!r}"


# ---------------------------------------------------------------------------
# a certificate authority of the test's own (openssl CLI), for TLS in and out
# ---------------------------------------------------------------------------

class LocalCA:
    """A CA made with the openssl CLI in ``folder``, and certificates it signs.

    ``ca_cert``: the CA's certificate (PEM); ``server_cert`` / ``server_key``: a server
    certificate for 127.0.0.1 and localhost; ``client_cert`` / ``client_key``: a client
    certificate (CN ``client``); ``other_ca_cert``: a second, unrelated CA, for "the right
    name but the wrong issuer"."""

    def __init__(self, folder):
        self.dir = Path(folder)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca_cert, self.ca_key = self._ca("inferd test CA")
        self.other_ca_cert, self.other_ca_key = self._ca("unrelated CA")
        self.server_cert, self.server_key = self.issue(
            "server", "127.0.0.1", san="IP:127.0.0.1,DNS:localhost", usage="serverAuth")
        self.client_cert, self.client_key = self.issue("client", "client", usage="clientAuth")

    def _run(self, *args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=self.dir)

    def _ca(self, cn):
        stem = cn.replace(" ", "_")
        cert, key = self.dir / f"{stem}.pem", self.dir / f"{stem}.key"
        self._run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                  "-subj", f"/CN={cn}", "-keyout", str(key), "-out", str(cert),
                  "-addext", "basicConstraints=critical,CA:TRUE",
                  "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        return cert, key

    def issue(self, stem, cn, san=None, usage="serverAuth", ca=None):
        """Signs a new key pair with this CA (or ``ca``: (cert, key)); returns (cert, key)."""
        ca_cert, ca_key = ca or (self.ca_cert, self.ca_key)
        key, csr, cert = (self.dir / f"{stem}.key", self.dir / f"{stem}.csr",
                          self.dir / f"{stem}.pem")
        ext = self.dir / f"{stem}.ext"
        lines = [f"extendedKeyUsage={usage}", "basicConstraints=CA:FALSE"]
        if san:
            lines.append(f"subjectAltName={san}")
        ext.write_text("\n".join(lines) + "\n")
        self._run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
                  "-keyout", str(key), "-out", str(csr))
        self._run("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
                  "-CAcreateserial", "-days", "2", "-out", str(cert), "-extfile", str(ext))
        return cert, key

    def server_context(self):
        """An ssl server context serving ``server_cert`` (127.0.0.1), for a test's own
        receivers (S3, webhooks)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(self.server_cert), str(self.server_key))
        return ctx


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory):
    return LocalCA(tmp_path_factory.mktemp("ca"))
