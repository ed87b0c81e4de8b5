"""S3 credentials in the AWS SDKs' order, refreshed before they expire, and S3 over https.

Every test runs a real inferd (``batch``, or ``serve`` with async jobs reading
``input_location`` from S3) against ``FakeS3``: a small S3 endpoint on 127.0.0.1 that keeps
objects in memory, recomputes each request's SigV4 signature with botocore for the secret of
the access key id in ``Credential=`` (403 on a mismatch, as S3 does), and records which key id
and session token signed every request. So a test proves WHICH credentials were used, not only
that some were. ``MetadataServer`` plays the ECS/EKS container agent and the EC2 instance
metadata service (IMDSv2), serving credentials the test chooses, with an Expiration the test
chooses (a few seconds away, to see a refresh).

No secret (secret key, session token, container authorization token) may show in inferd's log,
an error, a job's JSON or /metrics: ``assert_no_secrets`` checks each test's output.
"""
import hashlib
import http.server
import json
import re
import subprocess
import threading
import time
import warnings
from datetime import datetime, timedelta, timezone
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import pytest

from conftest import (INFERD_BIN, async_args, infer_body, wait_for, write_plugin_model)

RUN_DEADLINE_S = 60.0
BUCKET = "creds"
SECRETS = {   # every key id FakeS3 knows, and its secret
    "AKIDENV": "env-secret-0001",
    "AKIDFILE": "file-secret-0002",
    "AKIDCONFIG": "config-secret-0003",
    "AKIDCONTAINER1": "container-secret-0004",
    "AKIDCONTAINER2": "container-secret-0005",
    "AKIDIMDS1": "imds-secret-0006",
    "AKIDIMDS2": "imds-secret-0007",
}
SIGV4_AUTH = re.compile(r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/s3/aws4_request, "
                        r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})$")
# tokens are long, as STS's are (well over the 512 bytes a header line once had here)
TOKEN_ENV = "envtoken-" + "e" * 900
TOKEN_CONFIG = "configtoken-" + "c" * 700
CONTAINER_AUTH = "container-auth-token-0008"
ROWS = [[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5]]


def _botocore():
    with warnings.catch_warnings():   # awscli's vendored urllib3 import is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        import awscli  # noqa: F401 - puts Debian's bundled botocore on the import path
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials
    return S3SigV4Auth, AWSRequest, Credentials


class _Quiet(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass


def _serve(handler, tls=None):
    httpd = _Quiet(("127.0.0.1", 0), handler)
    scheme = "http"
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
        scheme = "https"
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"{scheme}://127.0.0.1:{httpd.server_address[1]}"


class FakeS3:
    """An S3 endpoint that checks SigV4 signatures and records who signed each request."""

    def __init__(self, tls=None):
        self.objects = {}
        self.seen = []      # {"method", "path", "key_id", "token", "verdict"}
        self.lock = threading.Lock()
        S3SigV4Auth, AWSRequest, Credentials = _botocore()
        s3 = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def check(self, body):
                """None if the signature is S3's, else (status, code)."""
                m = SIGV4_AUTH.match(self.headers.get("Authorization", ""))
                if not m:
                    return 403, "AccessDenied"
                key_id, _date, region, signed, signature = m.groups()
                if key_id not in SECRETS:
                    return 403, "InvalidAccessKeyId"
                token = self.headers.get("x-amz-security-token")
                names = signed.split(";")
                if token and "x-amz-security-token" not in names:
                    return 403, "AccessDenied"
                parts = urlsplit(self.path)
                req = AWSRequest(method=self.command,
                                 url=f"http://{self.headers['host']}"
                                     f"{quote(unquote(parts.path), safe='/-_.~')}",
                                 headers={n: ",".join(self.headers.get_all(n)) for n in names},
                                 data=body,
                                 params=dict(parse_qsl(parts.query, keep_blank_values=True)))
                req.context["timestamp"] = self.headers["x-amz-date"]
                signer = S3SigV4Auth(Credentials(key_id, SECRETS[key_id], token), "s3", region)
                want = signer.signature(signer.string_to_sign(req, signer.canonical_request(req)),
                                        req)
                return None if want == signature else (403, "SignatureDoesNotMatch")

            def reply(self, status, body=b"", headers=()):
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                if not any(k.lower() == "content-length" for k, _ in headers):
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def handle_one(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                m = SIGV4_AUTH.match(self.headers.get("Authorization", ""))
                verdict = self.check(body)
                with s3.lock:
                    s3.seen.append({"method": self.command, "path": self.path,
                                    "key_id": m.group(1) if m else None,
                                    "token": self.headers.get("x-amz-security-token"),
                                    "verdict": verdict})
                if verdict:
                    status, code = verdict
                    xml = (f"<?xml version=\"1.0\"?><Error><Code>{code}</Code>"
                           f"<Message>denied</Message></Error>").encode()
                    return self.reply(status, xml, [("Content-Type", "application/xml")])
                path = unquote(urlsplit(self.path).path)
                with s3.lock:
                    data = s3.objects.get(path)
                etag = f'"{hashlib.md5(data).hexdigest()}"' if data is not None else None
                if self.command == "PUT":
                    with s3.lock:
                        s3.objects[path] = body
                    return self.reply(200, b"", [("ETag", f'"{hashlib.md5(body).hexdigest()}"')])
                if self.command == "GET" and "list-type=2" in self.path:
                    xml = b'<?xml version="1.0"?><ListBucketResult><IsTruncated>false' \
                          b'</IsTruncated></ListBucketResult>'
                    return self.reply(200, xml, [("Content-Type", "application/xml")])
                if data is None:
                    xml = b"<?xml version=\"1.0\"?><Error><Code>NoSuchKey</Code></Error>"
                    return self.reply(404, xml, [("Content-Type", "application/xml")])
                if self.command == "HEAD":
                    return self.reply(200, b"", [("ETag", etag),
                                                 ("Content-Length", str(len(data)))])
                rng = re.match(r"bytes=(\d+)-(\d+)$", self.headers.get("Range") or "")
                if rng:
                    a, b = int(rng.group(1)), int(rng.group(2))
                    return self.reply(206, data[a:b + 1], [
                        ("ETag", etag), ("Content-Range", f"bytes {a}-{b}/{len(data)}")])
                return self.reply(200, data, [("ETag", etag)])

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_one

            def log_message(self, *args):
                pass

        self.httpd, self.endpoint = _serve(Handler, tls)

    def put(self, key, data):
        with self.lock:
            self.objects[f"/{BUCKET}/{key}"] = data

    def signers(self, contains=""):
        """(key id, token) of every request whose path contains ``contains``, in order."""
        with self.lock:
            return [(r["key_id"], r["token"]) for r in self.seen if contains in r["path"]]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def iso(dt):
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class MetadataServer:
    """The container credentials agent (GET /creds) and IMDSv2 (/latest/...) on 127.0.0.1.

    ``serve(key_id, expires_in_s)`` sets the credentials handed out next; ``fail = True``
    answers 500 instead. ``calls`` counts credential documents served (or refused)."""

    ROLE = "inferd-test-role"
    SESSION = "imds-session-token-0009"

    def __init__(self, auth=None):
        self.lock = threading.Lock()
        self.key_id = None
        self.expires = None
        self.fail = False
        self.refuse_token = False   # answer 403 to IMDSv2's token PUT (IMDS turned off)
        self.calls = 0
        self.auth = auth   # the Authorization the container agent requires (None: any)
        self.log = []
        meta = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def reply(self, status, body):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def doc(self):
                with meta.lock:
                    meta.calls += 1
                    if meta.fail or meta.key_id is None:
                        return None
                    d = {"AccessKeyId": meta.key_id, "SecretAccessKey": SECRETS[meta.key_id],
                         "Token": f"token-of-{meta.key_id}-" + "t" * 600, "Code": "Success",
                         "Expiration": iso(meta.expires)}
                return json.dumps(d).encode()

            def do_PUT(self):  # noqa: N802
                with meta.lock:
                    meta.log.append(("PUT", self.path, dict(self.headers)))
                if meta.refuse_token:
                    return self.reply(403, b"")
                if self.path == "/latest/api/token" and \
                        self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    return self.reply(200, meta.SESSION.encode())
                return self.reply(400, b"")

            def do_GET(self):  # noqa: N802
                with meta.lock:
                    meta.log.append(("GET", self.path, dict(self.headers)))
                if self.path.startswith("/latest/"):
                    if self.headers.get("X-aws-ec2-metadata-token") != meta.SESSION:
                        return self.reply(401, b"")
                    if self.path == "/latest/meta-data/iam/security-credentials/":
                        return self.reply(200, meta.ROLE.encode())
                    if self.path != f"/latest/meta-data/iam/security-credentials/{meta.ROLE}":
                        return self.reply(404, b"")
                elif self.path == "/creds":
                    if meta.auth is not None and self.headers.get("Authorization") != meta.auth:
                        return self.reply(401, b'{"error":"bad token"}')
                else:
                    return self.reply(404, b"")
                body = self.doc()
                return self.reply(500, b"{}") if body is None else self.reply(200, body)

            def log_message(self, *args):
                pass

        self.httpd, self.url = _serve(Handler)

    def serve(self, key_id, expires_in_s=3600):
        with self.lock:
            self.key_id = key_id
            self.expires = datetime.now(timezone.utc) + timedelta(seconds=expires_in_s)
            self.fail = False

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_s3():
    made = []

    def make(tls=None):
        s = FakeS3(tls)
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()


@pytest.fixture
def metadata():
    made = []

    def make(auth=None):
        m = MetadataServer(auth)
        made.append(m)
        return m
    yield make
    for m in made:
        m.close()


@pytest.fixture
def repo(tmp_path):
    d = tmp_path / "models"
    write_plugin_model(d, "rowsum", width=4)
    return d


def clean_env(tmp_path, **extra):
    """An environment with no AWS settings but ``extra`` (and no ~/.aws: HOME is empty)."""
    import os
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env.update(HOME=str(home), AWS_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


def run_batch(repo, s3, tmp_path, env, *extra):
    s3.put("in/rows.jsonl", "".join(json.dumps(r) + "\n" for r in ROWS).encode())
    out = tmp_path / f"out-{time.monotonic_ns()}"
    cmd = [str(INFERD_BIN), "batch", "--models", str(repo), "--model", "rowsum",
           "--input", f"s3://{BUCKET}/in/rows.jsonl", "--output", str(out),
           "--s3-endpoint", s3.endpoint, "--log-level", "debug", *map(str, extra)]
    p = subprocess.run(cmd, env=env, capture_output=True, timeout=RUN_DEADLINE_S,
                       stdin=subprocess.DEVNULL, cwd=str(tmp_path))
    return p.returncode, p.stderr.decode("utf-8", "replace"), out


def assert_no_secrets(text, what):
    secrets = list(SECRETS.values()) + [TOKEN_ENV, TOKEN_CONFIG, CONTAINER_AUTH,
                                        MetadataServer.SESSION, "t" * 100]
    for s in secrets:
        assert s not in text, f"{what} holds a secret ({s[:12]}...):\n{text[-3000:]}"


def assert_ok(rc, log, out):
    assert rc == 0, f"inferd batch failed (exit {rc}):\n{log[-3000:]}"
    assert (out / "rows.jsonl.out").read_text().count("\n") == len(ROWS), log[-2000:]


# ---------------------------------------------------------------------------
# the order of the sources
# ---------------------------------------------------------------------------


def write_shared_files(tmp_path):
    creds = tmp_path / "aws-credentials"
    creds.write_text("[default]\naws_access_key_id = AKIDFILE\n"
                     f"aws_secret_access_key = {SECRETS['AKIDFILE']}\n\n"
                     "# a comment\n[both]\naws_access_key_id=AKIDFILE\n"
                     f"aws_secret_access_key={SECRETS['AKIDFILE']}\n")
    config = tmp_path / "aws-config"
    config.write_text("[default]\nregion = us-east-1\n\n[profile cfg]\n"
                      "s3 =\n  addressing_style = path\n"
                      "aws_access_key_id = AKIDCONFIG\n"
                      f"aws_secret_access_key = {SECRETS['AKIDCONFIG']}\n"
                      f"aws_session_token = {TOKEN_CONFIG}\n\n"
                      "[profile both]\naws_access_key_id = AKIDCONFIG\n"
                      f"aws_secret_access_key = {SECRETS['AKIDCONFIG']}\n")
    return {"AWS_SHARED_CREDENTIALS_FILE": str(creds), "AWS_CONFIG_FILE": str(config)}


def test_environment_comes_first_and_sends_the_session_token(repo, fake_s3, tmp_path):
    s3 = fake_s3()
    env = clean_env(tmp_path, AWS_ACCESS_KEY_ID="AKIDENV",
                    AWS_SECRET_ACCESS_KEY=SECRETS["AKIDENV"], AWS_SESSION_TOKEN=TOKEN_ENV,
                    **write_shared_files(tmp_path))
    rc, log, out = run_batch(repo, s3, tmp_path, env)
    assert_ok(rc, log, out)
    signers = s3.signers("/in/rows.jsonl")
    assert signers and all(s == ("AKIDENV", TOKEN_ENV) for s in signers), signers[:3]
    assert_no_secrets(log, "inferd batch's log")


@pytest.mark.parametrize("profile,want", [
    (None, ("AKIDFILE", None)),                # [default] of the credentials file
    ("cfg", ("AKIDCONFIG", TOKEN_CONFIG)),     # only in the config file: [profile cfg]
    ("both", ("AKIDFILE", None)),              # in both: the credentials file wins
])
def test_shared_files_and_profile(repo, fake_s3, tmp_path, profile, want):
    s3 = fake_s3()
    env = clean_env(tmp_path, AWS_PROFILE=profile, **write_shared_files(tmp_path))
    rc, log, out = run_batch(repo, s3, tmp_path, env)
    assert_ok(rc, log, out)
    signers = s3.signers("/in/rows.jsonl")
    assert signers and all(s == want for s in signers), signers[:3]
    assert_no_secrets(log, "inferd batch's log")


@pytest.mark.parametrize("how", ["token", "token-file"])
def test_container_credentials_with_authorization(repo, fake_s3, metadata, tmp_path, how):
    s3, meta = fake_s3(), metadata(auth=CONTAINER_AUTH)
    meta.serve("AKIDCONTAINER1")
    token_file = tmp_path / "eks-pod-identity-token"
    token_file.write_text(CONTAINER_AUTH + "\n")
    env = clean_env(tmp_path, AWS_CONTAINER_CREDENTIALS_FULL_URI=f"{meta.url}/creds",
                    **({"AWS_CONTAINER_AUTHORIZATION_TOKEN": CONTAINER_AUTH} if how == "token"
                       else {"AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": str(token_file),
                             "AWS_CONTAINER_AUTHORIZATION_TOKEN": "not-this-one"}))
    rc, log, out = run_batch(repo, s3, tmp_path, env)
    assert_ok(rc, log, out)
    signers = s3.signers("/in/rows.jsonl")
    assert signers and all(k == "AKIDCONTAINER1" and t.startswith("token-of-AKIDCONTAINER1")
                           for k, t in signers), signers[:3]
    assert_no_secrets(log, "inferd batch's log")


def test_instance_metadata_imdsv2(repo, fake_s3, metadata, tmp_path):
    s3, meta = fake_s3(), metadata()
    meta.serve("AKIDIMDS1")
    env = clean_env(tmp_path, AWS_EC2_METADATA_DISABLED=None,
                    AWS_EC2_METADATA_SERVICE_ENDPOINT=meta.url + "/")
    rc, log, out = run_batch(repo, s3, tmp_path, env)
    assert_ok(rc, log, out)
    signers = s3.signers("/in/rows.jsonl")
    assert signers and all(k == "AKIDIMDS1" for k, _ in signers), signers[:3]
    assert meta.log[0][0] == "PUT", meta.log[:3]   # IMDSv2: the session token first
    assert_no_secrets(log, "inferd batch's log")


def test_no_credentials_names_every_source_tried(repo, fake_s3, tmp_path):
    s3 = fake_s3()
    rc, log, _ = run_batch(repo, s3, tmp_path, clean_env(tmp_path, AWS_PROFILE="nope"))
    assert rc != 0
    assert "no S3 credentials: tried environment, shared files (profile nope), container, " \
           "instance metadata" in log, log[-2000:]


def test_imds_that_refuses_a_token_is_no_source(repo, fake_s3, metadata, tmp_path):
    s3, meta = fake_s3(), metadata()
    meta.serve("AKIDIMDS1")
    meta.refuse_token = True
    env = clean_env(tmp_path, AWS_EC2_METADATA_DISABLED=None,
                    AWS_EC2_METADATA_SERVICE_ENDPOINT=meta.url)
    rc, log, _ = run_batch(repo, s3, tmp_path, env)
    assert rc != 0
    assert "no S3 credentials: tried environment, shared files (profile default), container, " \
           "instance metadata (the token request was answered HTTP 403)" in log, log[-2000:]
    assert all(k is None for k, _ in s3.signers()), "no credentials: the requests go unsigned"


def test_a_failing_container_source_is_an_error_naming_it(repo, fake_s3, metadata, tmp_path):
    s3, meta = fake_s3(), metadata(auth=CONTAINER_AUTH)
    meta.serve("AKIDCONTAINER1")
    env = clean_env(tmp_path, AWS_CONTAINER_CREDENTIALS_FULL_URI=f"{meta.url}/creds",
                    AWS_CONTAINER_AUTHORIZATION_TOKEN="wrong-" + CONTAINER_AUTH)
    rc, log, _ = run_batch(repo, s3, tmp_path, env)
    assert rc != 0
    assert "container (AWS_CONTAINER_CREDENTIALS_FULL_URI)" in log and "HTTP 401" in log, \
        log[-2000:]
    assert not s3.signers(), "nothing may be sent unsigned when a configured source fails"
    assert_no_secrets(log, "inferd batch's log")


# ---------------------------------------------------------------------------
# refresh in a long-lived inferd serve
# ---------------------------------------------------------------------------


def serve_with(server_factory, repo, tmp_path, monkeypatch, s3, env):
    for k in list(__import__("os").environ):
        if k.startswith("AWS_"):
            monkeypatch.delenv(k)
    for k, v in clean_env(tmp_path, **env).items():
        if k.startswith("AWS_") or k == "HOME":
            monkeypatch.setenv(k, v)
    return server_factory(repo, *async_args(tmp_path / "data"), "--s3-endpoint", s3.endpoint,
                          "--log-level", "debug")


def run_job(c, s3, n):
    """A job reading its input from S3; returns the key id that signed its read."""
    key = f"jobs/req-{n}.json"
    s3.put(key, json.dumps(infer_body(ROWS)).encode())
    jid = c.submit_ok("rowsum", input_location=f"s3://{BUCKET}/{key}")
    job = c.wait_final(jid)
    assert job["status"] == "succeeded", job
    signers = {k for k, _ in s3.signers(key)}
    assert len(signers) == 1, signers
    return signers.pop(), job


def check_no_secrets_anywhere(srv, c, jobs):
    assert_no_secrets(srv.log(), "inferd serve's log")
    assert_no_secrets(c.get("/metrics").text, "/metrics")
    for job in jobs:
        assert_no_secrets(json.dumps(job), "a job's JSON")


@pytest.mark.parametrize("source", ["container", "imds"])
def test_temporary_credentials_are_refreshed_before_they_expire(server_factory, repo, fake_s3,
                                                                metadata, tmp_path,
                                                                monkeypatch, source):
    s3, meta = fake_s3(), metadata(auth=CONTAINER_AUTH)
    first, second = ("AKIDCONTAINER1", "AKIDCONTAINER2") if source == "container" \
        else ("AKIDIMDS1", "AKIDIMDS2")
    env = ({"AWS_CONTAINER_CREDENTIALS_FULL_URI": f"{meta.url}/creds",
            "AWS_CONTAINER_AUTHORIZATION_TOKEN": CONTAINER_AUTH} if source == "container"
           else {"AWS_EC2_METADATA_DISABLED": None,
                 "AWS_EC2_METADATA_SERVICE_ENDPOINT": meta.url})
    meta.serve(first, expires_in_s=4)   # a few seconds away: well inside the 5 minute margin
    srv = serve_with(server_factory, repo, tmp_path, monkeypatch, s3, env)
    c = srv.client()
    k1, j1 = run_job(c, s3, 1)
    assert k1 == first
    expires = meta.expires
    meta.serve(second)
    wait_for(lambda: datetime.now(timezone.utc) > expires, 30,
             "the first credentials' Expiration to pass")
    k2, j2 = run_job(c, s3, 2)
    assert k2 == second, f"a request after the first credentials expired used {k2}"
    assert meta.calls >= 2
    check_no_secrets_anywhere(srv, c, [j1, j2])


def test_a_failed_refresh_keeps_the_current_credentials(server_factory, repo, fake_s3, metadata,
                                                        tmp_path, monkeypatch):
    s3, meta = fake_s3(), metadata(auth=CONTAINER_AUTH)
    meta.serve("AKIDCONTAINER1", expires_in_s=240)   # refresh due at once: < 5 minutes left
    srv = serve_with(server_factory, repo, tmp_path, monkeypatch, s3,
                     {"AWS_CONTAINER_CREDENTIALS_FULL_URI": f"{meta.url}/creds",
                      "AWS_CONTAINER_AUTHORIZATION_TOKEN": CONTAINER_AUTH})
    c = srv.client()
    jobs = []
    k, job = run_job(c, s3, 1)
    assert k == "AKIDCONTAINER1"
    jobs.append(job)
    with meta.lock:
        meta.fail = True
    n = [1]

    def refresh_failed():
        n[0] += 1
        k, job = run_job(c, s3, n[0])
        jobs.append(job)
        assert k == "AKIDCONTAINER1", "the current credentials must hold while they last"
        return "cannot refresh S3 credentials" in srv.log()
    wait_for(refresh_failed, 30, "a job after the refresh failed (the log says so)")
    line = next(l for l in srv.log().splitlines() if "cannot refresh S3 credentials" in l)
    assert "HTTP 500" in line and "container" in line, line
    meta.serve("AKIDCONTAINER2")

    def refreshed():
        n[0] += 1
        k, job = run_job(c, s3, n[0])
        jobs.append(job)
        return k == "AKIDCONTAINER2"
    wait_for(refreshed, 30, "a job signed with the credentials served after the failure")
    check_no_secrets_anywhere(srv, c, jobs)


def test_expired_credentials_that_cannot_be_refreshed_fail_requests(server_factory, repo,
                                                                    fake_s3, metadata, tmp_path,
                                                                    monkeypatch):
    s3, meta = fake_s3(), metadata(auth=CONTAINER_AUTH)
    meta.serve("AKIDCONTAINER1", expires_in_s=3)
    srv = serve_with(server_factory, repo, tmp_path, monkeypatch, s3,
                     {"AWS_CONTAINER_CREDENTIALS_FULL_URI": f"{meta.url}/creds",
                      "AWS_CONTAINER_AUTHORIZATION_TOKEN": CONTAINER_AUTH})
    c = srv.client()
    assert run_job(c, s3, 1)[0] == "AKIDCONTAINER1"
    expires = meta.expires
    with meta.lock:
        meta.fail = True
    wait_for(lambda: datetime.now(timezone.utc) > expires, 30, "the Expiration to pass")
    s3.put("jobs/late.json", json.dumps(infer_body(ROWS)).encode())
    job = c.wait_final(c.submit_ok("rowsum", input_location=f"s3://{BUCKET}/jobs/late.json"))
    assert job["status"] == "failed", job
    assert "container (AWS_CONTAINER_CREDENTIALS_FULL_URI)" in job["error"] and \
        ("expired" in job["error"] or "HTTP 500" in job["error"]), job["error"]
    assert not s3.signers("jobs/late.json"), "nothing may be sent unsigned or with expired keys"
    meta.serve("AKIDCONTAINER2")
    n = [10]

    def recovered():
        n[0] += 1
        s3.put(f"jobs/req-{n[0]}.json", json.dumps(infer_body(ROWS)).encode())
        j = c.wait_final(c.submit_ok("rowsum",
                                     input_location=f"s3://{BUCKET}/jobs/req-{n[0]}.json"))
        return j["status"] == "succeeded" and \
            {k for k, _ in s3.signers(f"jobs/req-{n[0]}.json")} == {"AKIDCONTAINER2"}
    wait_for(recovered, 30, "a job signed with the credentials served after the outage")
    check_no_secrets_anywhere(srv, c, [job])


def test_threads_share_one_refresh(server_factory, repo, fake_s3, metadata, tmp_path,
                                   monkeypatch):
    """Jobs run by several workers at once while the credentials expire: every request is
    signed with valid credentials, and each Expiration costs one fetch, not one per thread."""
    s3, meta = fake_s3(), metadata()
    meta.serve("AKIDIMDS1", expires_in_s=3)
    srv = serve_with(server_factory, repo, tmp_path, monkeypatch, s3,
                     {"AWS_EC2_METADATA_DISABLED": None,
                      "AWS_EC2_METADATA_SERVICE_ENDPOINT": meta.url})
    c = srv.client()
    for i in range(16):
        s3.put(f"many/req-{i}.json", json.dumps(infer_body(ROWS)).encode())
    expires = meta.expires
    ids = [c.submit_ok("rowsum", input_location=f"s3://{BUCKET}/many/req-{i}.json")
           for i in range(8)]
    meta.serve("AKIDIMDS2")
    wait_for(lambda: datetime.now(timezone.utc) > expires, 30, "the first Expiration to pass")
    calls_before = meta.calls
    ids += [c.submit_ok("rowsum", input_location=f"s3://{BUCKET}/many/req-{i}.json")
            for i in range(8, 16)]
    for jid in ids:
        job = c.wait_final(jid)
        assert job["status"] == "succeeded", job
    refused = [r for r in s3.seen if r["verdict"]]
    assert not refused, refused[:3]
    late = {k for i in range(8, 16) for k, _ in s3.signers(f"many/req-{i}.json")}
    assert late == {"AKIDIMDS2"}, f"jobs submitted after the expiry were signed by {late}"
    assert meta.calls - calls_before <= 2, \
        f"{meta.calls - calls_before} credential fetches for one expiry"


# ---------------------------------------------------------------------------
# S3 over https: certificates are verified; --s3-ca-file trusts a private CA
# ---------------------------------------------------------------------------


def env_keys(tmp_path):
    return clean_env(tmp_path, AWS_ACCESS_KEY_ID="AKIDENV",
                     AWS_SECRET_ACCESS_KEY=SECRETS["AKIDENV"])


def test_https_s3_verifies_the_certificate(repo, fake_s3, test_ca, tmp_path):
    s3 = fake_s3(tls=test_ca.server_context())
    assert s3.endpoint.startswith("https://")
    rc, log, _ = run_batch(repo, s3, tmp_path, env_keys(tmp_path))
    assert rc != 0, "a certificate signed by an unknown CA must be refused"
    assert "certificate verification failed" in log and "--s3-ca-file" in log, log[-2000:]
    assert not s3.signers(), "no request may reach an endpoint whose certificate did not verify"
    # the right name, but another CA: still refused
    rc, log, _ = run_batch(repo, s3, tmp_path, env_keys(tmp_path),
                           "--s3-ca-file", test_ca.other_ca_cert)
    assert rc != 0 and "certificate verification failed" in log, log[-2000:]
    assert not s3.signers()


def test_s3_ca_file_trusts_a_private_ca(repo, fake_s3, test_ca, tmp_path):
    s3 = fake_s3(tls=test_ca.server_context())
    rc, log, out = run_batch(repo, s3, tmp_path, env_keys(tmp_path),
                             "--s3-ca-file", test_ca.ca_cert)
    assert_ok(rc, log, out)
    assert s3.signers("/in/rows.jsonl")


def test_s3_ca_file_in_serve_and_bad_files(server_factory, repo, fake_s3, test_ca, tmp_path,
                                           monkeypatch):
    s3 = fake_s3(tls=test_ca.server_context())
    srv = serve_with(server_factory, repo, tmp_path, monkeypatch, s3,
                     {"AWS_ACCESS_KEY_ID": "AKIDENV",
                      "AWS_SECRET_ACCESS_KEY": SECRETS["AKIDENV"]})
    c = srv.client()
    s3.put("jobs/x.json", json.dumps(infer_body(ROWS)).encode())
    job = c.wait_final(c.submit_ok("rowsum", input_location=f"s3://{BUCKET}/jobs/x.json"))
    assert job["status"] == "failed" and "certificate verification failed" in job["error"], job
    srv2 = server_factory(repo, *async_args(tmp_path / "data2"), "--s3-endpoint", s3.endpoint,
                          "--s3-ca-file", test_ca.ca_cert)
    assert run_job(srv2.client(), s3, 7)[0] == "AKIDENV"
    for bad, says in ((tmp_path / "missing.pem", "cannot read"),
                      (test_ca.server_key, "holds no PEM certificate")):
        p = subprocess.run([str(INFERD_BIN), "serve", "--models", str(repo), "--port", "0",
                            "--s3-ca-file", str(bad)], capture_output=True, timeout=30,
                           cwd=str(tmp_path))
        err = p.stderr.decode()
        assert p.returncode == 2 and "--s3-ca-file" in err and says in err, err
