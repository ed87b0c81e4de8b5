"""``s3://`` storage: ``inferd batch`` and async job locations against s3rver.

Inputs are uploaded and outputs read back with Debian's awscli (``/usr/bin/aws``), so what
inferd writes is checked by another S3 client. Each test works under its own prefix of one
bucket of a module-wide s3rver (``conftest.S3rver``).

Two small proxies sit in front of s3rver where s3rver is too kind: one answers
``503 SlowDown`` to the first requests for each key (inferd must retry), the other recomputes
every request's AWS SigV4 signature with botocore and answers 403 on a mismatch (s3rver
checks only the access key id).

Nothing here asserts on elapsed time; the kill -9 test polls the manifest against a deadline.
"""
import hashlib
import http.client
import http.server
import json
import re
import shutil
import signal
import subprocess
import threading
import time
import warnings
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import numpy as np
import pytest
import requests

from conftest import (INFERD_BIN, S3_BUCKET, S3_KEY, assert_close, async_args, infer_body,
                      output_array)
from test_batch import Result, csv_text, jsonl_text, parse_numbers

RUN_DEADLINE_S = 120.0


# ---------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inferd(tmp_path_factory):
    """A private copy of build/inferd for this module."""
    if not INFERD_BIN.exists():
        pytest.fail(f"{INFERD_BIN} does not exist; build it first (make)")
    dst = tmp_path_factory.mktemp("s3-bin") / "inferd-under-test"
    shutil.copy2(INFERD_BIN, dst)
    return dst


@pytest.fixture(scope="module")
def repo(trained, tmp_path_factory):
    d = tmp_path_factory.mktemp("s3-models")
    for name in ("binary", "regression", "multiclass", "slow"):
        trained[name].install(d)
    return d


@pytest.fixture
def prefix(request):
    """s3://<bucket>/<this test's name>: where a test keeps its objects."""
    return f"s3://{S3_BUCKET}/" + re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)


@pytest.fixture
def batch(inferd, s3rver, repo, tmp_path):
    """``batch(model, input, output, *extra, check=True, endpoint=None, env=None)`` -> Result.

    Runs with s3rver's credentials and ``--s3-endpoint`` (``endpoint=False``: no option).
    """
    def run(model, inp, out, *extra, check=True, endpoint=None, env=None):
        cmd = [str(inferd), "batch", "--models", str(repo), "--model", model,
               "--input", str(inp), "--output", str(out), *[str(a) for a in extra]]
        if endpoint is not False:
            cmd += ["--s3-endpoint", endpoint or s3rver.endpoint]
        try:
            p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                               cwd=str(tmp_path), timeout=RUN_DEADLINE_S,
                               env=s3rver.env(**(env or {})))
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"inferd batch did not finish within {RUN_DEADLINE_S:.0f}s\n"
                        f"command: {' '.join(cmd)}\n--- stderr ---\n"
                        f"{(exc.stderr or b'').decode('utf-8', 'replace')[-4000:]}")
        res = Result(cmd, p.returncode, p.stdout.decode("utf-8", "replace"),
                     p.stderr.decode("utf-8", "replace"))
        if check:
            assert res.rc == 0, f"exit status {res.rc} (expected 0)\n{res}"
        return res
    return run


def write_tree(root, files):
    """Writes {relative name: text} under ``root``; returns root."""
    root = Path(root)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def lines_of(data, what):
    text = data.decode()
    assert text.endswith("\n"), f"{what}: last line has no newline: {text[-80:]!r}"
    return text[:-1].split("\n")


def check_outputs(s3rver, out_uri, tmp_path, expect):
    """``expect``: {input name: (model, X, mode, join)}; downloads ``out_uri`` and checks every
    ``<name>.out``, the manifest and _SUCCESS."""
    local = s3rver.download(out_uri, tmp_path / f"dl-{time.monotonic_ns()}")
    got = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    want = sorted([f"{n}.out" for n in expect] + ["_SUCCESS", "_manifest.json"])
    assert got == want, f"{out_uri} holds {got}, expected {want}"
    objects = json.loads((local / "_manifest.json").read_text())["objects"]
    for name, (m, X, mode, join) in expect.items():
        data = (local / f"{name}.out").read_bytes()
        lines = lines_of(data, name)
        assert len(lines) == len(X), f"{name}.out: {len(lines)} lines for {len(X)} records"
        entry = dict(objects[name])
        ident = entry.pop("input", None)
        assert entry == {"records": len(X), "sha256": hashlib.sha256(data).hexdigest()}, \
            f"manifest entry of {name}: {objects[name]!r}"
        assert isinstance(ident, dict) and set(ident) == {"size", "etag"}, \
            f"manifest entry of {name} has no S3 input identity: {objects[name]!r}"
        if join and mode == "jsonl":
            rows = [json.loads(l) for l in lines]
            assert all(set(r) == {"input", "prediction"} for r in rows), lines[0]
            got_in = np.asarray([r["input"] for r in rows], dtype=np.float64).astype(np.float32)
            assert np.array_equal(got_in, X), f"{name}: joined inputs differ from the rows"
            preds = np.asarray([r["prediction"] for r in rows], dtype=np.float64)
        elif join:
            vals = np.asarray([[float(v) for v in l.split(",")] for l in lines])
            assert np.array_equal(vals[:, :m.n_features].astype(np.float32), X), \
                f"{name}: joined input columns differ from the rows"
            preds = vals[:, m.n_features:]
        else:
            preds = parse_numbers(lines, m.n_outputs, mode, f"{name}.out")
        assert_close(preds.reshape(m.expected(X).shape), m.expected(X), f"{out_uri}/{name}.out")
    return local


# ---------------------------------------------------------------------------
# proxies in front of s3rver
# ---------------------------------------------------------------------------

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "date", "server", "expect"}


class S3Proxy:
    """An HTTP proxy on 127.0.0.1:0 forwarding to s3rver.

    ``judge(handler, body)`` runs first for every request and may return
    ``(status, code, message)`` to answer an S3 XML error instead of forwarding.
    ``requests`` records (method, path, Range header, answered status) of each one.
    """

    def __init__(self, upstream_port, judge):
        self.requests = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def handle_one(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                verdict = judge(self, body)
                if verdict:
                    status, code, message = verdict
                    payload = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>'
                               + code.encode() + b"</Code><Message>" + message.encode()
                               + b"</Message></Error>")
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                else:
                    status = self.forward(body)
                with proxy.lock:
                    proxy.requests.append((self.command, self.path, self.headers.get("Range"),
                                           status))

            def forward(self, body):
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items()
                               if k.lower() not in HOP_BY_HOP}
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status)
                    for k, v in resp.getheaders():
                        if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                            self.send_header(k, v)
                    length = resp.getheader("Content-Length") if self.command == "HEAD" \
                        else str(len(data))
                    self.send_header("Content-Length", length or "0")
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                    return resp.status
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_one

            def log_message(self, *args):
                pass

        class Quiet(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a client killed mid-request resets its connection

        self.httpd = Quiet(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def seen(self, method=None, contains=""):
        with self.lock:
            return [r for r in self.requests
                    if (method is None or r[0] == method) and contains in r[1]]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def proxies():
    made = []

    def make(upstream_port, judge):
        p = S3Proxy(upstream_port, judge)
        made.append(p)
        return p
    yield make
    for p in made:
        p.close()


SIGV4_AUTH = re.compile(r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/s3/aws4_request, "
                        r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})$")


def sigv4_judge(secret, region="us-east-1", token=None):
    """A judge that accepts only requests signed as S3 checks them (botocore recomputes)."""
    with warnings.catch_warnings():   # awscli's vendored urllib3 import is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        import awscli  # noqa: F401 - puts Debian's bundled botocore on the import path
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

    def judge(h, body):
        m = SIGV4_AUTH.match(h.headers.get("Authorization", ""))
        if not m:
            return 403, "AccessDenied", "no AWS4-HMAC-SHA256 Authorization"
        key_id, date, req_region, signed, signature = m.groups()
        names = signed.split(";")
        if key_id != S3_KEY or req_region != region:
            return 403, "InvalidAccessKeyId", f"credential {key_id}/{req_region}"
        for need in ("host", "x-amz-date", "x-amz-content-sha256") + \
                (("x-amz-security-token",) if token else ()):
            if need not in names:
                return 403, "AccessDenied", f"{need} is not signed"
        if token and h.headers.get("x-amz-security-token") != token:
            return 403, "InvalidToken", "wrong or missing x-amz-security-token"
        if not (h.headers.get("x-amz-date") or "").startswith(date):
            return 403, "AccessDenied", "x-amz-date does not match the credential scope"
        if h.headers.get("x-amz-content-sha256") != hashlib.sha256(body).hexdigest():
            return 400, "XAmzContentSHA256Mismatch", "x-amz-content-sha256 is not the body's"
        # S3 decodes the path and query, then re-encodes both canonically before checking
        parts = urlsplit(h.path)
        req = AWSRequest(method=h.command,
                         url=f"http://{h.headers['host']}{quote(unquote(parts.path), safe='/-_.~')}",
                         headers={n: ",".join(h.headers.get_all(n)) for n in names},
                         data=body, params=dict(parse_qsl(parts.query, keep_blank_values=True)))
        req.context["timestamp"] = h.headers["x-amz-date"]
        signer = S3SigV4Auth(Credentials(key_id, secret, token), "s3", region)
        want = signer.signature(signer.string_to_sign(req, signer.canonical_request(req)), req)
        if want != signature:
            return 403, "SignatureDoesNotMatch", "the request signature we calculated differs"
        return None
    return judge


def complete_fails_once():
    """Answers the first CompleteMultipartUpload with 200 and an <Error> document, as S3 may."""
    state = {"failed": False}

    def judge(h, body):
        if h.command == "POST" and "uploadId=" in h.path and not state["failed"]:
            state["failed"] = True
            return 200, "InternalError", "We encountered an internal error. Please try again."
        return None
    return judge


def chain(*judges):
    def judge(h, body):
        for j in judges:
            verdict = j(h, body)
            if verdict:
                return verdict
        return None
    return judge


# ---------------------------------------------------------------------------
# batch: formats, --join-input, pagination
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("join", [False, True], ids=["plain", "join-input"])
def test_batch_jsonl_and_csv_s3_to_s3(batch, s3rver, prefix, trained, tmp_path, join):
    m = trained["regression"]
    data = {"a.jsonl": (m.rows(700, seed=301), "jsonl"), "sub/b.csv": (m.rows(300, seed=302), "csv"),
            "sub/deeper/c.jsonl": (m.rows(1, seed=303), "jsonl")}
    local = write_tree(tmp_path / "in", {n: jsonl_text(X) if mode == "jsonl" else csv_text(X)
                                         for n, (X, mode) in data.items()})
    s3rver.upload(local, f"{prefix}/in")
    res = batch("regression", f"{prefix}/in", f"{prefix}/out", *(["--join-input"] if join else []))
    assert res.summary() == (1001, 0), res
    check_outputs(s3rver, f"{prefix}/out", tmp_path,
                  {n: (m, X, mode, join) for n, (X, mode) in data.items()})


def test_batch_single_object_and_endpoint_from_environment(batch, s3rver, prefix, trained,
                                                           tmp_path):
    """An object URI is one input named by its basename; AWS_ENDPOINT_URL_S3 names the endpoint."""
    m = trained["multiclass"]
    X = m.rows(40, seed=304)
    s3rver.upload(write_tree(tmp_path / "in", {"one.csv": csv_text(X)}), f"{prefix}/in")
    batch("multiclass", f"{prefix}/in/one.csv", f"{prefix}/out", endpoint=False,
          env={"AWS_ENDPOINT_URL_S3": s3rver.endpoint, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    check_outputs(s3rver, f"{prefix}/out", tmp_path, {"one.csv": (m, X, "csv", False)})


def test_batch_1200_objects_pages_the_listing(batch, s3rver, prefix, trained, tmp_path):
    """s3rver lists 1,000 keys a page: every one of 1,200 inputs must be found and done."""
    m = trained["binary"]
    n = 1200
    X = m.rows(n, seed=305)
    local = write_tree(tmp_path / "in", {f"part-{i:05d}.jsonl": jsonl_text(X[i:i + 1])
                                         for i in range(n)})
    s3rver.upload(local, f"{prefix}/in")
    res = batch("binary", f"{prefix}/in", f"{prefix}/out")
    assert res.summary() == (n, 0), res
    keys = s3rver.keys(f"{prefix}/out")
    outs = sorted(k for k in keys if k.endswith(".out"))
    assert outs == [f"part-{i:05d}.jsonl.out" for i in range(n)], \
        f"{len(outs)} outputs for {n} inputs; first missing: " \
        f"{sorted(set(f'part-{i:05d}.jsonl.out' for i in range(n)) - set(outs))[:5]}"
    assert "_SUCCESS" in keys and "_manifest.json" in keys, sorted(keys)[-5:]
    manifest = json.loads(s3rver.get_bytes(f"{prefix}/out/_manifest.json", tmp_path))
    assert len(manifest["objects"]) == n, len(manifest["objects"])
    for i in (0, 999, 1000, n - 1):   # both sides of the page boundary
        got = lines_of(s3rver.get_bytes(f"{prefix}/out/part-{i:05d}.jsonl.out", tmp_path), i)
        assert_close(parse_numbers(got, 1, "jsonl", f"part-{i}"), m.expected(X[i:i + 1]),
                     f"part-{i:05d}")


# ---------------------------------------------------------------------------
# signatures, ranged reads and multipart writes, checked by a SigV4-verifying proxy
# ---------------------------------------------------------------------------


def test_signed_listing_ranged_reads_and_multipart_write(batch, s3rver, proxies, prefix, trained,
                                                         tmp_path):
    """Through a proxy that recomputes SigV4 (botocore) for every request: a listing, ranged
    reads of an 11 MB input, a 12 MB multipart output (5 MB parts) and a key that needs
    encoding, with a session token; byte-identical to the same run on files. Then a wrong
    secret gets a clear 'access denied'."""
    m = trained["regression"]
    X = m.rows(75_000, seed=306)
    text = csv_text(X)
    assert len(text) > 8 << 20, "the input must span more than one 8 MiB ranged read"
    odd = "odd dir/a+b=c,d~e.csv"   # keys are URI-encoded as S3 signs them
    local = write_tree(tmp_path / "in", {"big.csv": text, odd: csv_text(X[:3])})
    s3rver.upload(local, f"{prefix}/in")
    proxy = proxies(s3rver.port, chain(sigv4_judge(S3_KEY, token="session-token-1"),
                                       complete_fails_once()))
    res = batch("regression", f"{prefix}/in", f"{prefix}/out", "--join-input",
                "--s3-part-size-mb", "5", endpoint=proxy.endpoint,
                env={"AWS_SESSION_TOKEN": "session-token-1"})
    assert res.line_naming("retrying", "InternalError"), \
        f"a 200 with an <Error> from CompleteMultipartUpload was not retried\n{res}"
    refused = [r for r in proxy.requests if r[3] in (400, 403)]
    assert not refused, f"the signature-checking proxy refused {refused[:5]}"
    assert proxy.seen("GET", "list-type=2"), "no ListObjectsV2 went through the proxy"
    ranged = [r for r in proxy.seen("GET", "/in/big.csv") if r[2]]
    assert len(ranged) >= 2, f"expected several ranged GETs of big.csv, saw {ranged}"
    assert proxy.seen("POST", "big.csv.out?uploads="), "the big output was not a multipart upload"
    parts = proxy.seen("PUT", "big.csv.out?partNumber=")
    assert len(parts) >= 3, f"12 MB in 5 MB parts: saw {len(parts)} UploadPart requests"
    assert len(proxy.seen("POST", "big.csv.out?uploadId=")) == 2, \
        "CompleteMultipartUpload was not sent again after its 200 <Error>"

    # the same run on files gives the same bytes
    ref = tmp_path / "ref"
    batch("regression", local, ref, "--join-input")
    got = s3rver.get_bytes(f"{prefix}/out/big.csv.out", tmp_path)
    want = (ref / "big.csv.out").read_bytes()
    assert len(got) > 10 << 20, f"the output is only {len(got)} bytes: not past two parts"
    assert got == want, f"S3 output ({len(got)} bytes) differs from the file run ({len(want)})"
    assert s3rver.get_bytes(f"{prefix}/out/{odd}.out", tmp_path) == (ref / f"{odd}.out").read_bytes()

    # a failure after parts were uploaded aborts the upload: no object, no parts left behind
    s3rver.upload(write_tree(tmp_path / "bad", {"big.csv": text + "1,2,oops\n"}), f"{prefix}/bad")
    res = batch("regression", f"{prefix}/bad", f"{prefix}/out-bad", "--join-input",
                "--s3-part-size-mb", "5", check=False, endpoint=proxy.endpoint,
                env={"AWS_SESSION_TOKEN": "session-token-1"})
    assert res.rc != 0 and res.line_naming("big.csv", str(len(X) + 1)), res
    assert proxy.seen("PUT", "out-bad/big.csv.out?partNumber="), "no part was uploaded first"
    # AbortMultipartUpload, signed right (s3rver 3.7.1 itself answers it 405: not implemented)
    aborts = proxy.seen("DELETE", "out-bad/big.csv.out?uploadId=")
    assert aborts and all(r[3] not in (400, 403) for r in aborts), \
        f"the upload was not aborted: {aborts}"
    assert not s3rver.keys(f"{prefix}/out-bad"), s3rver.keys(f"{prefix}/out-bad")

    res = batch("regression", f"{prefix}/in", f"{prefix}/out-denied", check=False,
                endpoint=proxy.endpoint, env={"AWS_SECRET_ACCESS_KEY": "wrong-secret",
                                              "AWS_SESSION_TOKEN": "session-token-1"})
    assert res.rc != 0, f"a wrong secret was accepted\n{res}"
    line = res.line_naming(f"{prefix}/in", "access denied", "SignatureDoesNotMatch")
    assert line, f"no stderr line says access to {prefix}/in was denied\n{res}"


# ---------------------------------------------------------------------------
# errors and retries
# ---------------------------------------------------------------------------


def test_missing_bucket_and_missing_key(batch, s3rver, prefix, trained, tmp_path):
    s3rver.upload(write_tree(tmp_path / "in", {"a.jsonl": jsonl_text(trained["binary"].rows(2, 307))}),
                  f"{prefix}/in")
    res = batch("binary", "s3://no-such-bucket-42/in/", f"{prefix}/out1", check=False)
    assert res.rc != 0, f"a missing bucket was accepted\n{res}"
    errors = [l for l in res.stderr.splitlines() if "no-such-bucket-42" in l]
    assert errors and "bucket 'no-such-bucket-42' does not exist" in errors[0], res

    key = f"{prefix}/in/nope.jsonl"
    res = batch("binary", key, f"{prefix}/out2", check=False)
    assert res.rc != 0, f"a missing key was accepted\n{res}"
    line = res.line_naming(key, "no such key", f"bucket '{S3_BUCKET}'")
    assert line, f"no stderr line names the missing key and its bucket\n{res}"

    # a missing output bucket fails at the first write, naming it
    res = batch("binary", f"{prefix}/in", "s3://no-such-bucket-43/out", check=False)
    assert res.rc != 0 and res.line_naming("bucket 'no-such-bucket-43' does not exist"), res
    assert not s3rver.keys(f"{prefix}/out1") and not s3rver.keys(f"{prefix}/out2")
    # and a good run still works afterwards
    batch("binary", f"{prefix}/in", f"{prefix}/out3")
    assert "a.jsonl.out" in s3rver.keys(f"{prefix}/out3")


def slowdown_judge(first_n, always=()):
    """Answers 503 SlowDown to the first ``first_n`` requests for each path (and to every
    request whose path contains one of ``always``)."""
    hits, lock = {}, threading.Lock()

    def judge(h, body):
        path = urlsplit(h.path).path
        with lock:
            hits[path] = hits.get(path, 0) + 1
            n = hits[path]
        if n <= first_n or any(a in path for a in always):
            return 503, "SlowDown", "Please reduce your request rate."
        return None
    return judge


def test_slowdown_503_is_retried(batch, s3rver, proxies, prefix, trained, tmp_path):
    m = trained["binary"]
    data = {"a.jsonl": m.rows(50, seed=308), "b.jsonl": m.rows(20, seed=309)}
    s3rver.upload(write_tree(tmp_path / "in", {n: jsonl_text(X) for n, X in data.items()}),
                  f"{prefix}/in")
    proxy = proxies(s3rver.port, slowdown_judge(2))
    res = batch("binary", f"{prefix}/in", f"{prefix}/out", endpoint=proxy.endpoint)
    slowed = {r[1].split("?")[0] for r in proxy.requests if r[3] == 503}
    assert len(slowed) >= 5, f"the proxy slowed down only {slowed}"
    assert "retrying" in res.stderr, f"no retry was logged\n{res}"
    check_outputs(s3rver, f"{prefix}/out", tmp_path,
                  {n: (m, X, "jsonl", False) for n, X in data.items()})

    # a key that never recovers fails after a bounded number of attempts, naming it
    proxy2 = proxies(s3rver.port, slowdown_judge(0, always=("/in/b.jsonl",)))
    res = batch("binary", f"{prefix}/in", f"{prefix}/out-never", check=False,
                endpoint=proxy2.endpoint)
    assert res.rc != 0, f"a key answering 503 forever was accepted\n{res}"
    assert res.line_naming(f"{prefix}/in/b.jsonl", "503", "6 attempts"), res
    tries = [r for r in proxy2.requests if r[1].startswith(f"/{S3_BUCKET}/") and "b.jsonl" in r[1]]
    assert 3 <= len(tries) <= 10, f"{len(tries)} attempts at b.jsonl"


# ---------------------------------------------------------------------------
# re-runs and resume
# ---------------------------------------------------------------------------


def poll_get(s3rver, uri):
    """An object's bytes, or None, through plain HTTP (s3rver allows it): fast enough to poll."""
    bucket, _, key = uri[len("s3://"):].partition("/")
    r = requests.get(f"{s3rver.endpoint}/{bucket}/{key}", timeout=10)
    return r.content if r.status_code == 200 else None


def test_rerun_skips_and_kill9_resume_is_byte_identical(inferd, batch, s3rver, repo, prefix,
                                                        trained, tmp_path):
    m = trained["slow"]
    files = {"a.csv": m.rows(2_000, seed=310), "b.csv": m.rows(30_000, seed=311),
             "c.csv": m.rows(30_000, seed=312)}
    s3rver.upload(write_tree(tmp_path / "in", {n: csv_text(X) for n, X in files.items()}),
                  f"{prefix}/in")
    extra = ["--records-per-batch", "256"]
    out1, out2 = f"{prefix}/out1", f"{prefix}/out2"
    batch("slow", f"{prefix}/in", out1, *extra)
    ref = s3rver.download(out1, tmp_path / "ref")
    ref_objects = json.loads((ref / "_manifest.json").read_text())["objects"]

    res = batch("slow", f"{prefix}/in", out1, *extra)   # everything done: skipped
    assert "objects=0 skipped=3" in res.stderr, f"a re-run did not skip all 3 objects\n{res}"

    cmd = [str(inferd), "batch", "--models", str(repo), "--model", "slow", "--input",
           f"{prefix}/in", "--output", out2, "--s3-endpoint", s3rver.endpoint, *extra]
    log = tmp_path / "killed.stderr"
    with open(log, "wb") as lf:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=lf, stderr=lf,
                                env=s3rver.env(), cwd=str(tmp_path))
    done_at_kill = None
    try:
        end = time.monotonic() + RUN_DEADLINE_S
        while time.monotonic() < end and proc.poll() is None:
            manifest = poll_get(s3rver, f"{out2}/_manifest.json")
            objs = json.loads(manifest)["objects"] if manifest else None
            if objs and poll_get(s3rver, f"{out2}/_SUCCESS") is None:
                proc.send_signal(signal.SIGKILL)
                done_at_kill = sorted(objs)
                break
            time.sleep(0.005)
    finally:
        if proc.poll() is None and done_at_kill is None:
            proc.kill()
        proc.wait()
    if done_at_kill is None:
        pytest.fail(f"could not catch the run mid-way (exit status {proc.returncode})\n"
                    f"{log.read_text()[-2000:]}")
    assert proc.returncode == -signal.SIGKILL, proc.returncode
    at_kill = s3rver.keys(out2)
    assert "_SUCCESS" not in at_kill and len([k for k in at_kill if k.endswith(".out")]) < 3, \
        f"every object was already done at the kill: {sorted(at_kill)}"
    for k in at_kill:   # whatever exists under its final name is complete
        if k.endswith(".out"):
            assert s3rver.get_bytes(f"{out2}/{k}", tmp_path) == (ref / k).read_bytes(), \
                f"{k} exists after kill -9 but is not the complete output"

    res = batch("slow", f"{prefix}/in", out2, *extra)
    for name in done_at_kill:
        assert res.line_naming(re.compile("skip", re.I), name), \
            f"the resume does not say it skipped {name}\n{res}"
    got = s3rver.download(out2, tmp_path / "resumed")
    names = sorted(str(p.relative_to(got)) for p in got.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(ref)) for p in ref.rglob("*") if p.is_file()), names
    for n in files:
        assert (got / f"{n}.out").read_bytes() == (ref / f"{n}.out").read_bytes(), \
            f"{n}.out differs from the uninterrupted run"
    assert json.loads((got / "_manifest.json").read_text())["objects"] == ref_objects


# ---------------------------------------------------------------------------
# async jobs with s3:// locations
# ---------------------------------------------------------------------------


def test_async_job_with_s3_locations(server_factory, s3rver, monkeypatch, repo, prefix, trained,
                                     tmp_path):
    for k, v in s3rver.env().items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    srv = server_factory(repo, *async_args(tmp_path / "data"), "--s3-endpoint", s3rver.endpoint)
    c = srv.client()
    m = trained["binary"]
    X = m.rows(9, seed=313)
    local = write_tree(tmp_path / "req", {"request.json": json.dumps(infer_body(X))})
    s3rver.upload(local, f"{prefix}/jobs")
    out_uri = f"{prefix}/jobs/out/result.json"
    r = c.submit("binary", input_location=f"{prefix}/jobs/request.json", output_location=out_uri)
    if r.status_code == 400 and "only file://" in r.text:
        pytest.skip("src/http/jobs.c check_location() does not accept s3:// yet")
    assert r.status_code == 202, r.text
    jid = r.json()["id"]
    job = c.wait_final(jid)
    assert job["status"] == "succeeded", job
    written = json.loads(s3rver.get_bytes(out_uri, tmp_path))
    assert_close(output_array(written, 9), m.expected(X), "result written to S3")
    served = c.get(f"/v1/jobs/{jid}/result")
    assert served.status_code == 200 and served.json() == written, served.text[:300]

    missing = f"{prefix}/jobs/missing.json"
    jid = c.submit_ok("binary", input_location=missing)
    job = c.wait_final(jid)
    assert job["status"] == "failed" and "no such key" in job["error"] and \
        missing in job["error"], job


# ---------------------------------------------------------------------------
# issue 13: a re-run redoes objects whose input changed (ETag)
# ---------------------------------------------------------------------------


def head(s3rver, uri):
    """{"size", "etag"} of an object, as another S3 client (awscli) sees it."""
    bucket, _, key = uri[len("s3://"):].partition("/")
    p = s3rver.aws("s3api", "head-object", "--bucket", bucket, "--key", key, "--output", "json")
    h = json.loads(p.stdout)
    return {"size": h["ContentLength"], "etag": h["ETag"]}


def test_rerun_redoes_an_object_whose_etag_changed(batch, s3rver, prefix, trained, tmp_path):
    """The manifest records each input's size and ETag; an object replaced by one of the same
    size but other bytes (a new ETag) is redone on re-run, and only it."""
    m = trained["binary"]
    Xa, Xb = m.rows(120, seed=320), m.rows(40, seed=321)
    local = write_tree(tmp_path / "in", {"a.csv": csv_text(Xa), "b.csv": csv_text(Xb)})
    s3rver.upload(local, f"{prefix}/in")
    out = f"{prefix}/out"
    batch("binary", f"{prefix}/in", out)
    objs = json.loads(s3rver.get_bytes(f"{out}/_manifest.json", tmp_path))["objects"]
    for name in ("a.csv", "b.csv"):
        assert objs[name]["input"] == head(s3rver, f"{prefix}/in/{name}"), objs[name]
    b_out = head(s3rver, f"{out}/b.csv.out")
    b_modified = s3rver.aws("s3api", "head-object", "--bucket", S3_BUCKET, "--key",
                            out[len(f"s3://{S3_BUCKET}/"):] + "/b.csv.out").stdout

    # the same number of bytes, other values: flip the sign of negative first values
    lines = csv_text(Xa).splitlines()
    for i, line in enumerate(lines):
        if line.startswith("-"):
            lines[i] = "+" + line[1:]
            Xa[i, 0] = -Xa[i, 0]
    (local / "a.csv").write_text("\n".join(lines) + "\n")
    s3rver.aws("s3", "cp", "--only-show-errors", local / "a.csv", f"{prefix}/in/a.csv")
    now = head(s3rver, f"{prefix}/in/a.csv")
    assert now["size"] == objs["a.csv"]["input"]["size"] and now != objs["a.csv"]["input"]

    res = batch("binary", f"{prefix}/in", out)
    assert "objects=1 skipped=1" in res.stderr, f"expected a.csv redone, b.csv skipped\n{res}"
    got = s3rver.download(out, tmp_path / "dl")
    preds = parse_numbers(lines_of((got / "a.csv.out").read_bytes(), "a.csv.out"), 1, "csv",
                          "a.csv.out")
    assert_close(preds, m.expected(Xa), "a.csv.out after the re-run")
    assert head(s3rver, f"{out}/b.csv.out") == b_out
    assert s3rver.aws("s3api", "head-object", "--bucket", S3_BUCKET, "--key",
                      out[len(f"s3://{S3_BUCKET}/"):] + "/b.csv.out").stdout == b_modified, \
        "an unchanged input's .out was written again"
    objs = json.loads((got / "_manifest.json").read_text())["objects"]
    assert objs["a.csv"]["input"] == now, objs["a.csv"]
