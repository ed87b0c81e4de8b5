"""Job and batch locations are regular files, and a job's input is read only up to a limit.

``input_location`` and ``output_location`` of ``POST /v1/jobs`` must name regular files: a
FIFO (which blocked a worker in ``open()`` for ever), a device (``/dev/zero`` grew memory
without end), a socket or a folder is refused with a 400 naming the field and what the
location is, when it can be checked at submission; otherwise (the file appears or changes
later) the job fails with that reason when it runs, without being retried and without reading
it. An input over ``--max-input-bytes`` (default: ``--max-body-bytes``) is refused the same
way, from its size. The inferd process's peak memory (VmHWM in /proc/PID/status) stays far
below the sizes involved. Batch inputs (``inferd batch`` and ``/v1/batch-jobs``) stream, so
they have no size limit, but a FIFO, device or socket among them is a clear error, never a
hang and never skipped silently.

No test here writes to a device: an output_location that is one would be replaced by the
file's rename on an unfixed inferd.
"""
import json
import os
import socket
import subprocess

import numpy as np
import pytest
import requests

from conftest import (HTTP_TIMEOUT_S, INFERD_BIN, async_args, error_message, infer_body,
                      output_array, write_plugin_model)
from upstreams import StallingS3

BATCH_DEADLINE_S = 60.0
MIB = 1 << 20
BIG_BYTES = 1 << 30          # sparse: no disk, but 1 GiB if read whole


def rows4(n, seed):
    return np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)


@pytest.fixture
def repo(tmp_path):
    d = tmp_path / "models"
    write_plugin_model(d, "rowsum", width=4)
    return d


@pytest.fixture
def kinds(tmp_path):
    """{kind: path} of things that are not regular files, and a 1 GiB sparse file."""
    d = tmp_path / "odd"
    d.mkdir()
    os.mkfifo(d / "fifo")
    (d / "folder").mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(d / "socket"))
    (d / "zero").symlink_to("/dev/zero")
    with open(d / "big.json", "wb") as f:
        f.truncate(BIG_BYTES)
    yield {"FIFO": d / "fifo", "folder": d / "folder", "socket": d / "socket",
           "character device": d / "zero", "big": d / "big.json"}
    sock.close()


def peak_rss_bytes(server):
    """The inferd process's peak resident memory (VmHWM)."""
    with open(f"/proc/{server.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{server.proc.pid}/status")


def assert_still_works(c, what):
    X = rows4(2, 7)
    jid = c.submit_ok("rowsum", X)
    job = c.wait_final(jid, what=f"a good job after {what}")
    assert job["status"] == "succeeded", job
    r = c.get(f"/v1/jobs/{jid}/result")
    assert r.status_code == 200, r.text[:300]
    np.testing.assert_allclose(output_array(r.json(), 2), X.sum(axis=1), rtol=1e-6)


def test_submission_refuses_what_is_not_a_regular_file(server_factory, repo, tmp_path, kinds):
    s = server_factory(repo, *async_args(tmp_path / "data", "--workers", "1"))
    c = s.client()
    cases = [("input_location", f"file://{kinds[k]}", f"is a {k}, not a regular file")
             for k in ("FIFO", "folder", "socket")]
    cases += [("input_location", "/dev/zero", "is a character device, not a regular file"),
              ("input_location", str(kinds["character device"]),
               "is a character device, not a regular file"),
              # the default limit is --max-body-bytes (64 MiB)
              ("input_location", f"file://{kinds['big']}",
               f"is {BIG_BYTES} bytes, over the limit of {64 * MIB} (--max-input-bytes)")]
    cases += [("output_location", f"file://{kinds[k]}", f"is a {k}, not a regular file")
              for k in ("FIFO", "folder", "socket")]
    for field, location, reason in cases:
        body = {"model": "rowsum", field: location}
        if field == "output_location":
            body["input"] = infer_body(rows4(1, 1))
        r = c.post("/v1/jobs", json=body)
        assert r.status_code == 400, \
            f"{field}={location}: HTTP {r.status_code} (expected 400): {r.text[:300]}"
        msg = error_message(r)
        assert msg.startswith(f"{field}: ") and reason in msg, f"{field}={location}: {msg!r}"
    jobs, _ = c.list_all()
    assert jobs == [], f"refused submissions created jobs: {jobs!r}"
    assert peak_rss_bytes(s) < BIG_BYTES // 8, f"peak RSS {peak_rss_bytes(s)} bytes"
    assert_still_works(c, "the refusals")


def test_max_input_bytes(server_factory, repo, tmp_path):
    s = server_factory(repo, *async_args(tmp_path / "data", "--workers", "1",
                                         "--max-input-bytes", "4096"))
    c = s.client()
    X = rows4(1, 2)
    small = tmp_path / "small.json"
    small.write_text(json.dumps(infer_body(X)))
    padded = tmp_path / "padded.json"   # the same request, 4097 bytes with trailing spaces
    padded.write_text(json.dumps(infer_body(X)).ljust(4097))
    r = c.post("/v1/jobs", json={"model": "rowsum", "input_location": str(padded)})
    assert r.status_code == 400, r.text[:300]
    assert error_message(r) == (f"input_location: '{padded}' is 4097 bytes, over the limit of "
                                f"4096 (--max-input-bytes)"), r.text
    jid = c.submit_ok("rowsum", input_location=str(small))
    assert c.wait_final(jid)["status"] == "succeeded"


def test_s3_input_over_the_limit_is_refused_from_its_size(server_factory, repo, tmp_path):
    """An S3 input cannot be checked at submission; when the job runs, its HEAD says it is too
    big and it is never fetched."""
    body = json.dumps(infer_body(rows4(1, 4))).encode().ljust(5000)
    s3 = StallingS3(body)
    try:
        s = server_factory(repo, *async_args(tmp_path / "data", "--workers", "1",
                                             "--max-input-bytes", "4096", "--s3-endpoint", s3.url))
        c = s.client()
        jid = c.submit_ok("rowsum", input_location=f"s3://{s3.BUCKET}/{s3.KEY}")
        job = c.wait_final(jid, what="the job with an S3 input over the limit")
        assert job["status"] == "failed" and job["attempts"] == 1, job
        assert job["error"] == (f"input_location: s3://{s3.BUCKET}/{s3.KEY}: 5000 bytes, over "
                                f"the limit of 4096 (--max-input-bytes)"), job
        assert [m for m, _ in s3.requests] == ["HEAD"], s3.requests
    finally:
        s3.stop()


def test_checked_again_when_the_job_runs(server_factory, repo, tmp_path, kinds, gates):
    """Locations missing at submission are accepted; what is there when the job runs is
    checked then: each job fails at once (one attempt, not retried), naming the field and the
    reason, and nothing is read: memory stays far below the 1 GiB input, /dev/zero included."""
    s = server_factory(repo, *async_args(tmp_path / "data", "--workers", "1",
                                         "--worker-batch", "1", "--max-attempts", "3",
                                         "--max-input-bytes", str(MIB)))
    c = s.client()
    later = tmp_path / "later"
    later.mkdir()
    gate = gates()
    gate.hold(c)
    inputs = {k: later / f"in-{i}" for i, k in enumerate(
        ("FIFO", "folder", "character device", "big", "link to big"))}
    outputs = {k: later / f"out-{i}" for i, k in enumerate(("FIFO", "folder"))}
    ids = {("input_location", k): c.submit_ok("rowsum", input_location=str(p))
           for k, p in inputs.items()}
    ids.update({("output_location", k): c.submit_ok("rowsum", rows4(1, 3), output_location=str(p))
                for k, p in outputs.items()})
    # now they become what they are when the jobs run
    os.mkfifo(inputs["FIFO"])
    inputs["folder"].mkdir()
    inputs["character device"].symlink_to("/dev/zero")
    os.rename(kinds["big"], inputs["big"])
    inputs["link to big"].symlink_to(inputs["big"])
    os.mkfifo(outputs["FIFO"])
    outputs["folder"].mkdir()
    reasons = {"FIFO": "is a FIFO, not a regular file",
               "folder": "is a folder, not a regular file",
               "character device": "is a character device, not a regular file",
               "big": f"{BIG_BYTES} bytes, over the limit of {MIB} (--max-input-bytes)",
               "link to big": f"{BIG_BYTES} bytes, over the limit of {MIB} (--max-input-bytes)"}
    assert gate.release()
    for (field, kind), jid in ids.items():
        job = c.wait_final(jid, deadline_s=60, what=f"{field} {kind}")
        assert job["status"] == "failed" and job["attempts"] == 1, f"{field} {kind}: {job!r}"
        assert job["error"].startswith(f"{field}: ") and reasons[kind] in job["error"], \
            f"{field} {kind}: {job['error']!r}"
    assert not [p for p in later.iterdir() if ".tmp-" in p.name], list(later.iterdir())
    assert peak_rss_bytes(s) < BIG_BYTES // 8, f"peak RSS {peak_rss_bytes(s)} bytes"
    assert_still_works(c, "the failed jobs")


# ---------------------------------------------------------------------------
# batch inputs
# ---------------------------------------------------------------------------


def batch_inputs(tmp_path, odd):
    """A folder with a.csv (3 records) and an odd entry named b.csv."""
    d = tmp_path / f"in-{odd}"
    d.mkdir()
    (d / "a.csv").write_text("1,2,3,4\n5,6,7,8\n9,10,11,12\n")
    if odd == "FIFO":
        os.mkfifo(d / "b.csv")
    elif odd == "character device":
        (d / "b.csv").symlink_to("/dev/zero")
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(d / "b.csv"))
        sock.close()
    return d


ODD = ("FIFO", "character device", "socket")


@pytest.mark.parametrize("odd", ODD)
def test_cli_batch_refuses_odd_inputs(repo, tmp_path, odd):
    inp = batch_inputs(tmp_path, odd)
    for target, reason in ((inp, f"'{inp}/b.csv' is a {odd}, not a regular file"),
                           (inp / "b.csv",
                            f"'{inp / 'b.csv'}' is a {odd}, not a regular file or a folder")):
        cmd = [str(INFERD_BIN), "batch", "--models", str(repo), "--model", "rowsum",
               "--input", str(target), "--output", str(tmp_path / f"out-{odd}")]
        try:
            p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                               timeout=BATCH_DEADLINE_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"inferd batch hung on a {odd} among its inputs: {' '.join(cmd)}")
        err = p.stderr.decode("utf-8", "replace")
        assert p.returncode == 1, f"{' '.join(cmd)}: exit {p.returncode}\n{err[-2000:]}"
        assert reason in err, f"{' '.join(cmd)}: expected {reason!r} in\n{err[-2000:]}"
    assert not (tmp_path / f"out-{odd}" / "_SUCCESS").exists()


def test_batch_job_refuses_odd_inputs(server_factory, repo, tmp_path):
    """The server lists a batch job's input before it answers: 400 naming the odd entry."""
    s = server_factory(repo, *async_args(tmp_path / "data", "--workers", "1"))
    for odd in ODD:
        inp = batch_inputs(tmp_path, odd)
        r = requests.post(f"{s.url}/v1/batch-jobs", timeout=HTTP_TIMEOUT_S, json={
            "model": "rowsum", "input": str(inp), "output": str(tmp_path / f"out-{odd}")})
        assert r.status_code == 400, f"{odd}: HTTP {r.status_code}: {r.text[:300]}"
        assert error_message(r) == f"input: '{inp}/b.csv' is a {odd}, not a regular file", r.text
    listed = requests.get(f"{s.url}/v1/batch-jobs", timeout=HTTP_TIMEOUT_S).json()["batch_jobs"]
    assert listed == [], listed
    assert_still_works(s.client(), "the refused batch jobs")
