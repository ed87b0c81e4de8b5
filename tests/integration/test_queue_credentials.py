"""TLS and credentials to the job queue's stores: ``rediss://`` (a redis-server with
tls-port and a certificate of the suite's CA), ``redis://USER:PASSWORD@`` and
``redis://:PASSWORD@`` (ACL user and requirepass), for ``inferd serve`` and ``inferd worker``;
and PostgreSQL's ``sslmode`` passed through libpq, for the queue and the warehouse. Jobs run
end to end; a wrong password or CA is a clear start-up error that never shows a secret."""
import json
import os
import shutil
import socket
import ssl
import subprocess
import urllib.parse

import numpy as np
import pytest

from conftest import (INFERD_BIN, REDIS_SERVER_BIN, assert_close, async_args, free_port,
                      parallel, wait_for, write_plugin_model)

PASSWORD = "p@ss:w/rd-7Q%x"  # reserved characters: the URL carries it percent-encoded
PASSWORD_URL = urllib.parse.quote(PASSWORD, safe="")
DEADLINE_S = 60


class TLSRedis:
    """A redis-server with only a TLS port (certificates from ``test_ca``), and optional
    ``requirepass`` / ACL user."""

    def __init__(self, folder, ca, tls=True, requirepass=None, acl_user=None,
                 auth_clients="no"):
        self.dir = folder
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca, self.tls = ca, tls
        self.requirepass, self.acl_user = requirepass, acl_user
        self.port = free_port()
        cmd = [str(REDIS_SERVER_BIN), "--bind", "127.0.0.1", "--dir", str(self.dir),
               "--save", "", "--appendonly", "no", "--daemonize", "no", "--logfile", ""]
        if tls:
            cmd += ["--port", "0", "--tls-port", str(self.port),
                    "--tls-cert-file", str(ca.server_cert), "--tls-key-file", str(ca.server_key),
                    "--tls-ca-cert-file", str(ca.ca_cert), "--tls-auth-clients", auth_clients]
        else:
            cmd += ["--port", str(self.port)]
        if requirepass:
            cmd += ["--requirepass", requirepass]
        self.log_path = self.dir / "redis.log"
        self._log_f = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log_f, stderr=self._log_f,
                                     stdin=subprocess.DEVNULL, cwd=str(self.dir))
        wait_for(self._ready, DEADLINE_S, f"redis-server on port {self.port} to answer PING")
        if acl_user:
            user, password = acl_user
            self.command("ACL", "SETUSER", user, "on", f">{password}", "~*", "&*", "+@all")

    def _connect(self):
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        if not self.tls:
            return s
        ctx = ssl.create_default_context(cafile=str(self.ca.ca_cert))
        ctx.load_cert_chain(str(self.ca.client_cert), str(self.ca.client_key))
        return ctx.wrap_socket(s, server_hostname="127.0.0.1")

    def command(self, *args):
        with self._connect() as s:
            if self.requirepass:
                args_auth = [b"AUTH", self.requirepass.encode()]
                s.sendall(b"*2\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args_auth))
                assert s.recv(100).startswith(b"+OK")
            enc = [a if isinstance(a, bytes) else str(a).encode() for a in args]
            s.sendall(b"*%d\r\n" % len(enc) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a)
                                                       for a in enc))
            return s.recv(65536)

    def _ready(self):
        assert self.proc.poll() is None, f"redis-server exited:\n{self.log()}"
        return self.command("PING").startswith(b"+PONG")

    def log(self):
        return self.log_path.read_text(errors="replace")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self._log_f.close()


@pytest.fixture
def redis_factory(tmp_path, test_ca):
    made = []

    def make(**kw):
        r = TLSRedis(tmp_path / f"redis-{len(made)}", test_ca, **kw)
        made.append(r)
        return r
    yield make
    for r in made:
        r.stop()


@pytest.fixture
def repo(trained, repo_dir):
    trained["binary"].install(repo_dir)
    write_plugin_model(repo_dir, "rowsum", width=4)
    return repo_dir


def run_jobs_end_to_end(server_factory, worker_factory, repo, url, tmp_path, trained):
    """inferd serve --workers 0 and one inferd worker on `url`: jobs submitted to serve are
    run by the worker, and their results match python-xgboost."""
    m = trained["binary"]
    serve = server_factory(repo, *async_args(tmp_path / "data", "--workers", "0", queue=url),
                           tag="serve")
    worker = worker_factory(repo, url, tag="worker")
    c = serve.client()
    X = m.rows(6, seed=21)
    ids = [c.submit_ok("binary", X[i:i + 2]) for i in range(0, 6, 2)]
    for i, jid in enumerate(ids):
        job = c.wait_final(jid, DEADLINE_S, "a job run by the worker over the queue")
        assert job["status"] == "succeeded", job
        r = c.get(f"/v1/jobs/{jid}/result")
        assert r.status_code == 200, r.text
        got = np.asarray(r.json()["outputs"][0]["data"], dtype=np.float64)
        assert_close(got, m.expected(X[2 * i:2 * i + 2]), f"job {jid}")
    return serve, worker


def start_fails(server_factory, repo, tmp_path, url, tag="bad"):
    """inferd serve with `url` must exit non-zero; returns its log."""
    s = server_factory(repo, *async_args(tmp_path / f"data-{tag}", queue=url), tag=tag,
                       wait_ready=False)
    rc = s.proc.wait(timeout=DEADLINE_S)
    assert rc != 0, s.log()
    return s.log()


# ---------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------


def test_rediss_runs_jobs_end_to_end(redis_factory, server_factory, worker_factory, repo,
                                     tmp_path, trained, test_ca):
    r = redis_factory()
    url = f"rediss://127.0.0.1:{r.port}/3?ca={test_ca.ca_cert}"
    serve, worker = run_jobs_end_to_end(server_factory, worker_factory, repo, url, tmp_path,
                                        trained)
    assert "tls=on" in serve.log() and "tls=on" in worker.log()
    # a burst: HTTP threads' enqueues are pipelined on one bridged connection, and the
    # worker's leases and outcomes on others
    c = serve.client()
    X = np.arange(4 * 50, dtype=np.float32).reshape(50, 4)
    ids = parallel(16, lambda i: [c.submit_ok("rowsum", X + i * 1000 + k) for k in range(12)])
    for i, batch in enumerate(ids):
        for k, jid in enumerate(batch):
            job = c.wait_final(jid, DEADLINE_S, "a job of the burst over rediss://")
            assert job["status"] == "succeeded", job
            got = c.get(f"/v1/jobs/{jid}/result").json()["outputs"][0]["data"]
            assert_close(np.asarray(got, dtype=np.float64),
                         (X + i * 1000 + k).sum(axis=1, dtype=np.float64), f"job {jid}")


def test_rediss_with_a_client_certificate(redis_factory, server_factory, worker_factory, repo,
                                          tmp_path, trained, test_ca):
    r = redis_factory(auth_clients="yes")
    base = f"rediss://127.0.0.1:{r.port}/1?ca={test_ca.ca_cert}"
    # without a client certificate Redis refuses the handshake
    log = start_fails(server_factory, repo, tmp_path, base, tag="nocert")
    assert "cannot open the job queue" in log and f"Redis at 127.0.0.1:{r.port}" in log, log
    url = base + f"&cert={test_ca.client_cert}&key={test_ca.client_key}"
    run_jobs_end_to_end(server_factory, worker_factory, repo, url, tmp_path, trained)


def test_rediss_refuses_a_server_the_ca_did_not_sign(redis_factory, server_factory, repo,
                                                     tmp_path, test_ca):
    r = redis_factory()
    log = start_fails(server_factory, repo, tmp_path,
                      f"rediss://127.0.0.1:{r.port}/0?ca={test_ca.other_ca_cert}")
    assert "TLS handshake failed" in log and "certificate" in log, log
    # without ?ca= the system's CAs do not know the suite's CA either
    log = start_fails(server_factory, repo, tmp_path, f"rediss://127.0.0.1:{r.port}/0",
                      tag="system")
    assert "TLS handshake failed" in log, log
    # and a file that is not there is named
    log = start_fails(server_factory, repo, tmp_path,
                      f"rediss://127.0.0.1:{r.port}/0?ca={tmp_path}/nope.pem", tag="nofile")
    assert f"?ca={tmp_path}/nope.pem" in log, log


def test_redis_password_and_acl_user(redis_factory, server_factory, worker_factory, repo,
                                     tmp_path, trained):
    r = redis_factory(tls=False, requirepass=PASSWORD, acl_user=("inferd", PASSWORD + "-acl"))
    acl_password = urllib.parse.quote(PASSWORD + "-acl", safe="")
    procs = run_jobs_end_to_end(server_factory, worker_factory, repo,
                                f"redis://:{PASSWORD_URL}@127.0.0.1:{r.port}/2", tmp_path / "a",
                                trained)
    assert "auth=password" in procs[0].log()
    procs += run_jobs_end_to_end(server_factory, worker_factory, repo,
                                 f"redis://inferd:{acl_password}@127.0.0.1:{r.port}/4",
                                 tmp_path / "b", trained)
    assert "auth=inferd" in procs[2].log()
    for p in procs:
        log = p.log()
        assert PASSWORD not in log and PASSWORD_URL not in log and acl_password not in log


def test_rediss_with_a_password(redis_factory, server_factory, worker_factory, repo, tmp_path,
                                trained, test_ca):
    r = redis_factory(requirepass=PASSWORD)
    run_jobs_end_to_end(server_factory, worker_factory, repo,
                        f"rediss://:{PASSWORD_URL}@127.0.0.1:{r.port}/5?ca={test_ca.ca_cert}",
                        tmp_path, trained)


@pytest.mark.parametrize("kind", ["password", "acl", "missing"])
def test_a_wrong_redis_password_is_a_clear_error_without_it(redis_factory, server_factory,
                                                            worker_factory, repo, tmp_path,
                                                            kind):
    r = redis_factory(tls=False, requirepass=PASSWORD, acl_user=("inferd", PASSWORD))
    wrong = "Wr0ng-secret-" + kind
    url = {"password": f"redis://:{wrong}@127.0.0.1:{r.port}/0",
           "acl": f"redis://inferd:{wrong}@127.0.0.1:{r.port}/0",
           "missing": f"redis://127.0.0.1:{r.port}/0"}[kind]
    log = start_fails(server_factory, repo, tmp_path, url)
    assert "cannot open the job queue" in log, log
    if kind == "missing":
        assert "NOAUTH" in log, log
    else:
        assert "authentication as" in log and ("WRONGPASS" in log or "invalid" in log), log
        assert wrong not in log, log
    # inferd worker says the same
    w = worker_factory(repo, url, wait_ready=False)
    assert w.proc.wait(timeout=DEADLINE_S) != 0
    assert "cannot open the job queue" in w.log() and wrong not in w.log()


def test_redis_url_errors(server_factory, repo, tmp_path, test_ca):
    log = start_fails(server_factory, repo, tmp_path,
                      f"redis://127.0.0.1:1/0?ca={test_ca.ca_cert}", tag="ca-plain")
    assert "'ca' needs rediss:// (TLS)" in log, log
    log = start_fails(server_factory, repo, tmp_path, "rediss://127.0.0.1:1/0?nope=1",
                      tag="unknown")
    assert "unknown parameter 'nope'" in log, log
    log = start_fails(server_factory, repo, tmp_path, "redis://secretuser@127.0.0.1:1/0",
                      tag="nopass")
    assert "USER:PASSWORD@" in log and "secretuser" not in log, log


# ---------------------------------------------------------------------------
# PostgreSQL: sslmode and friends pass through libpq
# ---------------------------------------------------------------------------

PG_ROLE, PG_PASSWORD = "inferd_tls", "Pg-s3cret-7781"


@pytest.fixture
def ssl_postgres(postgres_server, test_ca):
    """A cluster with ssl = on (the suite CA's server certificate) that refuses connections
    without TLS over 127.0.0.1, and a role that needs its password; (cluster, url base)."""
    pg = postgres_server
    for src, name, mode in ((test_ca.server_cert, "server.crt", 0o644),
                            (test_ca.server_key, "server.key", 0o600)):
        dst = pg.data / name
        shutil.copyfile(src, dst)
        os.chmod(dst, mode)
        if pg.as_root:
            shutil.chown(dst, "postgres", "postgres")
    with open(pg.data / "postgresql.conf", "a") as f:
        f.write("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n")
    pg.create_role(PG_ROLE, PG_PASSWORD, db="tlsdb")
    hba = pg.data / "pg_hba.conf"
    hba.write_text("hostnossl all all 127.0.0.1/32 reject\n"
                   f"hostssl all {PG_ROLE} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
    pg.psql("SELECT pg_reload_conf()")
    wait_for(lambda: pg.psql("SHOW ssl") == [["on"]], DEADLINE_S, "PostgreSQL to turn ssl on")
    return pg, f"postgresql://{PG_ROLE}:{PG_PASSWORD}@127.0.0.1:{pg.port}/tlsdb"


def test_postgres_queue_with_sslmode_verify_full(ssl_postgres, server_factory, repo, tmp_path,
                                                 trained, test_ca):
    pg, base = ssl_postgres
    m = trained["binary"]
    url = f"{base}?sslmode=verify-full&sslrootcert={test_ca.ca_cert}"
    serve = server_factory(repo, *async_args(tmp_path / "data", queue=url))
    c = serve.client()
    X = m.rows(4, seed=31)
    jid = c.submit_ok("binary", X)
    assert c.wait_final(jid, DEADLINE_S, "a job on the PostgreSQL queue over TLS")["status"] \
        == "succeeded"
    r = c.get(f"/v1/jobs/{jid}/result")
    assert_close(np.asarray(r.json()["outputs"][0]["data"], dtype=np.float64), m.expected(X),
                 "job over TLS")
    # inferd's connections are TLS ones (the cluster refuses any other over 127.0.0.1)
    n = pg.psql("SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) "
                f"WHERE usename = '{PG_ROLE}' AND ssl")
    assert int(n[0][0]) >= 1, n
    assert PG_PASSWORD not in serve.log()


@pytest.mark.parametrize("case", ["wrong-ca", "no-tls", "missing-ca-file"])
def test_postgres_tls_errors_are_clear_and_without_the_password(ssl_postgres, server_factory,
                                                                repo, tmp_path, test_ca, case):
    pg, base = ssl_postgres
    query = {"wrong-ca": f"sslmode=verify-full&sslrootcert={test_ca.other_ca_cert}",
             "no-tls": "sslmode=disable",
             "missing-ca-file": f"sslmode=verify-full&sslrootcert={tmp_path}/none.pem"}[case]
    log = start_fails(server_factory, repo, tmp_path, f"{base}?{query}")
    assert "cannot open the job queue" in log and f"127.0.0.1:{pg.port}" in log, log
    want = {"wrong-ca": "certificate verify failed", "no-tls": "no encryption",
            "missing-ca-file": "none.pem"}[case]
    assert want in log, log
    assert PG_PASSWORD not in log, log


def test_warehouse_table_with_sslmode_verify_full(ssl_postgres, repo, trained, tmp_path,
                                                  test_ca):
    pg, base = ssl_postgres
    m = trained["binary"]
    X = m.rows(50, seed=41)
    cols = ", ".join(f"f{j} double precision" for j in range(m.n_features))
    pg.psql(f"CREATE TABLE feat (id integer PRIMARY KEY, {cols})", db="tlsdb")
    pg.psql(f"ALTER TABLE feat OWNER TO {PG_ROLE}", db="tlsdb")
    values = ",".join("(" + ",".join([str(i)] + [repr(float(v)) for v in X[i]]) + ")"
                      for i in range(50))
    pg.psql(f"INSERT INTO feat VALUES {values}", db="tlsdb")
    ca_q = f"sslmode=verify-full&sslrootcert={test_ca.ca_cert}"
    out = tmp_path / "out"
    p = subprocess.run([str(INFERD_BIN), "batch", "--models", str(repo), "--model", "binary",
                        "--input", f"{base}?{ca_q}&table=feat", "--output", str(out)],
                       capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(l) for l in (out / "public.feat.jsonl").read_text().splitlines()]
    assert_close([r["prediction"] for r in rows], m.expected(X), "table over TLS")
    assert PG_PASSWORD not in p.stderr + p.stdout
    # the wrong CA: a clear error, without the password
    p = subprocess.run([str(INFERD_BIN), "batch", "--models", str(repo), "--model", "binary",
                        "--input", f"{base}?sslmode=verify-full&sslrootcert="
                                   f"{test_ca.other_ca_cert}&table=feat",
                        "--output", str(tmp_path / "out2")],
                       capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert p.returncode != 0 and "certificate verify failed" in p.stderr, p.stderr
    assert PG_PASSWORD not in p.stderr + p.stdout
