"""A port is owned by one process: a second `inferd serve` or `inferd worker` on a port in use
fails at start, naming the port, before it touches a queue; `--reuse-port` on both shares it
on purpose."""
import subprocess

from conftest import INFERD_BIN, assert_close, output_array

START_DEADLINE_S = 30


def run_refused(cmd, cwd):
    """Runs a command that must exit on its own (refused at start); returns (rc, stderr)."""
    p = subprocess.run([str(INFERD_BIN), *cmd], cwd=str(cwd), stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=START_DEADLINE_S)
    return p.returncode, p.stderr.decode("utf-8", "replace")


def test_second_server_on_a_used_port_is_refused(trained, repo_dir, server_factory, tmp_path):
    trained["binary"].install(repo_dir)
    first = server_factory(repo_dir, "--data-dir", tmp_path / "first")
    second_data = tmp_path / "second"
    rc, err = run_refused(["serve", "--models", str(repo_dir), "--host", "127.0.0.1",
                           "--port", str(first.port), "--data-dir", str(second_data)], tmp_path)
    assert rc != 0, f"a second inferd serve on port {first.port} started (exit {rc})\n{err}"
    assert "address already in use" in err and str(first.port) in err, err
    assert "--reuse-port" in err, f"the error should say how to share on purpose: {err}"
    # refused before it opened a queue of its own
    assert not second_data.exists(), "the refused server created its data folder"

    # the first one still owns the port and answers every request (none go to a stranger)
    X = trained["binary"].rows(4, seed=1)
    for _ in range(20):
        r = first.client().infer("binary", X)
        assert r.status_code == 200, r.text
        assert_close(output_array(r.json(), 4), trained["binary"].expected(X))
    # and its jobs are found on every request
    jid = first.client().submit_ok("binary", X)
    for _ in range(20):
        assert first.client().get(f"/v1/jobs/{jid}").status_code == 200


def test_worker_on_a_used_port_is_refused(trained, repo_dir, server_factory, tmp_path):
    trained["binary"].install(repo_dir)
    first = server_factory(repo_dir, "--data-dir", tmp_path / "first")
    # no Redis listens on port 1: the port is refused before the queue is reached
    rc, err = run_refused(["worker", "--models", str(repo_dir), "--host", "127.0.0.1",
                           "--port", str(first.port), "--queue", "redis://127.0.0.1:1/0"],
                          tmp_path)
    assert rc != 0, err
    assert "address already in use" in err and str(first.port) in err, err
    assert "redis" not in err.lower(), f"the port should be refused first: {err}"


def test_reuse_port_shares_on_purpose(trained, repo_dir, server_factory, tmp_path):
    trained["binary"].install(repo_dir)
    first = server_factory(repo_dir, "--reuse-port", "--data-dir", tmp_path / "first")
    second = server_factory(repo_dir, "--reuse-port", "--data-dir", tmp_path / "second",
                            port=first.port, tag="second")
    assert second.alive() and second.port == first.port
    X = trained["binary"].rows(3, seed=2)
    r = second.client().infer("binary", X)
    assert r.status_code == 200, r.text
    assert_close(output_array(r.json(), 3), trained["binary"].expected(X))


def test_without_reuse_port_the_sharer_is_refused(trained, repo_dir, server_factory, tmp_path):
    """Sharing needs both sides to ask: a process that did not is never joined."""
    trained["binary"].install(repo_dir)
    first = server_factory(repo_dir, "--data-dir", tmp_path / "first")
    rc, err = run_refused(["serve", "--models", str(repo_dir), "--host", "127.0.0.1",
                           "--port", str(first.port), "--reuse-port",
                           "--data-dir", str(tmp_path / "second")], tmp_path)
    assert rc != 0 and "address already in use" in err, err
    assert first.client().get("/v2/health/ready").status_code == 200


def test_a_crash_writes_its_stack_to_the_log(trained, repo_dir, server_factory, tmp_path):
    """A process killed by a fatal signal says so in its log, with frames addr2line can name."""
    import re
    import signal
    trained["binary"].install(repo_dir)
    s = server_factory(repo_dir, "--data-dir", tmp_path / "data")
    s.signal(signal.SIGSEGV)
    assert s.wait_exit() == -signal.SIGSEGV
    log = s.log()
    assert "fatal signal 11" in log, s.log_tail()
    frames = re.findall(r"inferd\(\+(0x[0-9a-f]+)\)", log)
    assert frames, f"no inferd(+0x...) frame in the crash report:\n{s.log_tail()}"
    names = subprocess.run(["addr2line", "-f", "-e", str(INFERD_BIN), *frames],
                           capture_output=True, text=True, timeout=60).stdout
    assert "on_fatal_signal" in names, names
