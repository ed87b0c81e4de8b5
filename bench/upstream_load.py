#!/usr/bin/python3
"""Load generator, slow upstream and report for the upstream benchmark (bench/upstream_run).

    upstream_load.py prepare --upstream-port PU --front-port PF --sample FILE --dir DIR
    upstream_load.py burst   --port P --model M --dir DIR --jobs N --out OUT.json [--cpu L:PGID]
    upstream_load.py slow    --port PS --hold-s S
    upstream_load.py threads --front-port PF --slow-port PS --pid PID --jobs 500 --dir DIR \
                             --hold-s S --out OUT.json
    upstream_load.py report  --dir DIR

`prepare`: --rows float32-exact single-row requests for the breast_cancer model (the two rows
of models/breast_cancer/sample_request.json, scaled by 1 + 0.005 k), each answered once by
the upstream directly (the expected answers, DIR/rows.json), DIR/row.json (row 0: wrk's
body), then every row through the front's http model online and, for 8 rows, as an async job
(`Prefer: respond-async, wait=10`): each answer must equal the upstream's (1e-6).

`burst`: bench/async_load.py's capacity phase on these rows: --jobs single-row jobs
(`Prefer: respond-async`) submitted as fast as --connections keep-alive connections can, a
wait until nothing is queued or running (/metrics), every job record read back through the
listing pages, and a sample of --verify results compared with the upstream's direct answers.
End-to-end jobs/s = jobs / (last finished_at - first submission); latency = the job's
finished_at - its submission (so a burst's p50 includes its place in the queue). --cpu
L:PGID records the cores each process group used from first submission to last finish.

`slow`: a deliberately slow KServe v2 upstream on 127.0.0.1 (asyncio, one thread, keep-alive,
any number of connections): each POST .../infer is held --hold-s seconds, then answered with
output__0 = 0.5 per row. GET /v2/models/<m> answers the breast_cancer metadata (so inferd's
http model can read it at load), GET /status {"open", "max_open", "received", "answered",
"connections"}: calls open now and at most, and connections open.

`threads`: the thread count of a front inferd (pid --pid) whose http model points at `slow`:
its Threads (/proc/PID/status) and sockets idle, then --jobs async jobs submitted at once, a
wait (at most --hold-s - 2 s) until the upstream reports --jobs calls open at the same time,
Threads and sockets at that moment (and the most seen on the way), then a wait for every job
to succeed (bounded: hold + 30 s).

`report`: the markdown table of DIR's results (wrk lines in DIR/*.wrk, JSON from the other
subcommands). Every command exits non-zero (after writing its output) on a refused, lost,
failed or wrong job, or a phase that missed its deadline. All loops are bounded.
"""
import argparse
import asyncio
import http.client
import json
import os
import random
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from async_load import (Http, first_number, phase_summary, run_async,  # noqa: E402
                        submit_phase, verify_sample)
from scale_load import GroupCpu  # noqa: E402

N_FEATURES = 30


def log(msg):
    print(f"upstream_load: {msg}", file=sys.stderr, flush=True)


def v2_body(row):
    return {"inputs": [{"name": "input__0", "datatype": "FP32", "shape": [1, N_FEATURES],
                        "data": [float(v) for v in row]}]}


def post(port, path, body, headers=None, timeout=30):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("POST", path, body=json.dumps(body),
                  headers={"Content-Type": "application/json", **(headers or {})})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def build_requests(port, model, rows):
    reqs = []
    for row in rows:
        body = json.dumps(v2_body(row), separators=(",", ":")).encode()
        head = (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                f"Content-Type: application/json\r\nPrefer: respond-async\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        reqs.append(head + body)
    return reqs


def load_rows(d):
    with open(os.path.join(d, "rows.json")) as f:
        doc = json.load(f)
    return np.asarray(doc["rows"], dtype=np.float32), np.asarray(doc["want"], dtype=np.float64)


# ---------------------------------------------------------------- prepare

def cmd_prepare(a):
    with open(a.sample) as f:
        base = np.asarray(json.load(f)["inputs"][0]["data"], dtype=np.float64)
    rows = np.stack([base[k % len(base)] * (1 + 0.005 * (k // len(base)))
                     for k in range(a.rows)]).astype(np.float32)
    want, problems = [], []
    for k, row in enumerate(rows):
        st, body = post(a.upstream_port, f"/v2/models/{a.upstream_model}/infer", v2_body(row))
        if st != 200:
            sys.exit(f"upstream_load: the upstream answered row {k} with HTTP {st}: {body[:300]!r}")
        want.append(first_number(json.loads(body)["outputs"][0]["data"]))
    with open(os.path.join(a.dir, "rows.json"), "w") as f:
        json.dump({"rows": [[float(v) for v in r] for r in rows], "want": want}, f)
    with open(os.path.join(a.dir, "row.json"), "w") as f:
        json.dump(v2_body(rows[0]), f)
    path = f"/v2/models/{a.front_model}/infer"
    for k, row in enumerate(rows):
        checks = [("online", {})]
        if k < 8:
            checks.append(("async", {"Prefer": "respond-async, wait=10"}))
        for kind, hdr in checks:
            st, body = post(a.front_port, path, v2_body(row), hdr)
            if st != 200:
                problems.append(f"row {k} through the front ({kind}): HTTP {st}: {body[:300]!r}")
                continue
            got = first_number(json.loads(body)["outputs"][0]["data"])
            if abs(got - want[k]) > 1e-6:
                problems.append(f"row {k} through the front ({kind}): {got}, upstream {want[k]}")
    for p in problems[:10]:
        log(f"WRONG: {p}")
    if problems:
        sys.exit(f"upstream_load: {len(problems)} answers through the front differ from the "
                 f"upstream's or failed")
    log(f"{a.rows} rows: the front's answers (online, and 8 as async jobs) equal the "
        f"upstream's")


# ---------------------------------------------------------------- burst

def cmd_burst(a):
    rows, want = load_rows(a.dir)
    reqs = build_requests(a.port, a.model, rows)
    h = Http("127.0.0.1", a.port)
    g0 = h.job_gauges()
    if g0.get("queued", 0) or g0.get("running", 0):
        sys.exit(f"upstream_load: jobs queued or running before the burst: {g0}")
    res = {"label": a.label, "jobs": a.jobs, "connections": a.connections}
    cpu = GroupCpu(a.cpu)
    t0 = time.time()
    log(f"{a.label}: {a.jobs} jobs as fast as {a.connections} connections can")
    cpu.start()
    burst = run_async(submit_phase("127.0.0.1", a.port, reqs, a.jobs, a.connections, None,
                                   a.deadline_s))
    n_acc = sum(1 for s in burst["status"] if s == 202)
    log(f"{a.label}: {n_acc}/{a.jobs} accepted in {max(burst['done']) - burst['start']:.2f}s; "
        f"waiting for the drain")
    drained, gauges = h.wait_drain(max(1.0, a.deadline_s - (time.time() - t0)), a.label)
    cpu.stop()
    jobs = h.all_jobs()
    s = phase_summary("burst", burst, jobs)
    if s["succeeded"]:
        res["cpu"], res["cpu_window_s"] = cpu.window(s["first_submit"], s["last_finished"])
    res.update({k: s.get(k) for k in ("accepted", "rejected_429", "errors", "unsent", "lost",
                                      "failed", "succeeded", "accepted_per_s", "p50_ms",
                                      "p99_ms", "e2e_jobs_per_s", "run_jobs_per_s")})
    res["gauges_after"] = gauges
    n_checked, bad = verify_sample(h, [burst], jobs, want, len(rows), a.verify,
                                   random.Random(7))
    res["verified"], res["wrong"] = n_checked, len(bad)
    for b in bad[:10]:
        log(f"WRONG: {b}")
    errs = [f"{jid}: {j.get('error')}" for jid, j in jobs.items() if j["status"] == "failed"]
    for e in errs[:5]:
        log(f"failed job {e}")
    problems = []
    if s["accepted"] != a.jobs:
        problems.append(f"{a.jobs - s['accepted']} of {a.jobs} submissions not accepted "
                        f"(429 {s['rejected_429']}, errors {s['errors']}, "
                        f"not sent in time {s['unsent']})")
    if s["lost"] or s["failed"]:
        problems.append(f"lost {s['lost']}, failed {s['failed']}")
    if drained is None:
        problems.append(f"not drained within {a.deadline_s:.0f}s")
    if bad:
        problems.append(f"{len(bad)} of {n_checked} sampled results differ from the upstream's")
    cores = ", ".join(f"{k} {v:.2f}" for k, v in sorted(res.get("cpu", {}).items()))
    log(f"{a.label}: {s.get('e2e_jobs_per_s', 0):.0f} jobs/s end to end, p50 "
        f"{s['p50_ms']:.0f} ms p99 {s['p99_ms']:.0f} ms; cores: {cores or 'n/a'}; "
        f"{n_checked} results checked, {len(bad)} wrong")
    finish(res, a.out, problems)


def finish(res, out, problems):
    res["ok"] = not problems
    res["problems"] = problems
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    if problems:
        sys.exit(f"upstream_load: FAILED: {res.get('label', '')}: " + "; ".join(problems))


# ---------------------------------------------------------------- slow upstream

META = {"name": "breast_cancer", "versions": ["1"], "platform": "slow",
        "inputs": [{"name": "input__0", "datatype": "FP32", "shape": [-1, N_FEATURES]}],
        "outputs": [{"name": "output__0", "datatype": "FP32", "shape": [-1]}]}


def cmd_slow(a):
    st = {"open": 0, "max_open": 0, "received": 0, "answered": 0, "connections": 0}

    def answer(status, doc):
        body = json.dumps(doc).encode()
        return (f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    async def handle(reader, writer):
        st["connections"] += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                method, path = lines[0].split(b" ")[:2]
                clen, close = 0, False
                for line in lines[1:]:
                    k, _, v = line.partition(b":")
                    k = k.strip().lower()
                    if k == b"content-length":
                        clen = int(v)
                    elif k == b"connection" and v.strip().lower() == b"close":
                        close = True
                body = await reader.readexactly(clen) if clen else b""
                if method == b"POST" and path.endswith(b"/infer"):
                    st["received"] += 1
                    st["open"] += 1
                    st["max_open"] = max(st["max_open"], st["open"])
                    try:
                        await asyncio.sleep(a.hold_s)
                    finally:
                        st["open"] -= 1
                    try:
                        n = int(json.loads(body)["inputs"][0]["shape"][0])
                    except (ValueError, KeyError, IndexError, TypeError):
                        n = 1
                    out = answer(200, {"model_name": "slow", "outputs": [
                        {"name": "output__0", "datatype": "FP32", "shape": [n],
                         "data": [0.5] * n}]})
                    st["answered"] += 1
                elif method == b"GET" and path == b"/status":
                    out = answer(200, st)
                elif method == b"GET" and path.startswith(b"/v2/models/"):
                    out = answer(200, META)
                elif method == b"GET" and path.startswith(b"/v2/health/"):
                    out = answer(200, {})
                else:
                    out = answer(404, {"error": "not found"})
                writer.write(out)
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
                ValueError):
            pass
        finally:
            st["connections"] -= 1
            writer.close()

    async def main():
        srv = await asyncio.start_server(handle, "127.0.0.1", a.port, backlog=4096)
        log(f"slow upstream on 127.0.0.1:{a.port}, holding each call {a.hold_s}s")
        async with srv:
            await srv.serve_forever()

    run_async(main())


# ---------------------------------------------------------------- threads

def proc_threads(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise RuntimeError(f"no Threads: in /proc/{pid}/status")


def proc_sockets(pid):
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                n += 1
        except OSError:
            pass
    return n


def slow_status(port):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request("GET", "/status")
        return json.loads(c.getresponse().read())
    finally:
        c.close()


def cmd_threads(a):
    rows, _ = load_rows(a.dir)
    reqs = build_requests(a.front_port, a.model, rows)
    h = Http("127.0.0.1", a.front_port)
    res = {"label": "threads", "jobs": a.jobs, "hold_s": a.hold_s,
           "idle_threads": proc_threads(a.pid), "idle_sockets": proc_sockets(a.pid)}
    log(f"front idle: {res['idle_threads']} threads, {res['idle_sockets']} sockets; "
        f"submitting {a.jobs} jobs")
    t0 = time.time()
    sub = run_async(submit_phase("127.0.0.1", a.front_port, reqs, a.jobs, 64, None, 10))
    res["submit_s"] = max(sub["done"]) - sub["start"]
    n_acc = sum(1 for s in sub["status"] if s == 202)
    max_threads = proc_threads(a.pid)
    ramp_deadline = t0 + max(1.0, a.hold_s - 2)
    st = slow_status(a.slow_port)
    while st["open"] < a.jobs and time.time() < ramp_deadline:
        time.sleep(0.05)
        max_threads = max(max_threads, proc_threads(a.pid))
        st = slow_status(a.slow_port)
    res["busy_threads"] = proc_threads(a.pid)
    res["busy_sockets"] = proc_sockets(a.pid)
    st_after = slow_status(a.slow_port)
    res["upstream_open"] = min(st["open"], st_after["open"])
    res["upstream_connections"] = st_after["connections"]
    res["ramp_s"] = time.time() - t0
    res["max_threads_seen"] = max(max_threads, res["busy_threads"])
    log(f"{res['upstream_open']} upstream calls open after {res['ramp_s']:.2f}s: front has "
        f"{res['busy_threads']} threads (most seen {res['max_threads_seen']}), "
        f"{res['busy_sockets']} sockets")
    drained, gauges = h.wait_drain(a.hold_s + 30, "threads")
    jobs = h.all_jobs()
    s = phase_summary("threads", sub, jobs)
    res.update({k: s.get(k) for k in ("accepted", "rejected_429", "errors", "lost", "failed",
                                      "succeeded", "p50_ms", "p99_ms")})
    res["after_threads"] = proc_threads(a.pid)
    res["upstream_max_open"] = slow_status(a.slow_port)["max_open"]
    errs = [f"{jid}: {j.get('error')}" for jid, j in jobs.items() if j["status"] == "failed"]
    for e in errs[:5]:
        log(f"failed job {e}")
    problems = []
    if n_acc != a.jobs:
        problems.append(f"{a.jobs - n_acc} of {a.jobs} submissions not accepted")
    if res["upstream_open"] < a.jobs:
        problems.append(f"only {res['upstream_open']} of {a.jobs} upstream calls open at once "
                        f"within {a.hold_s - 2:.0f}s")
    if s["lost"] or s["failed"]:
        problems.append(f"lost {s['lost']}, failed {s['failed']}")
    if drained is None:
        problems.append("jobs still queued or running after the hold + 30 s")
    log(f"all done after {time.time() - t0:.1f}s: succeeded {s['succeeded']}, failed "
        f"{s['failed']}, lost {s['lost']}; {res['after_threads']} threads")
    finish(res, a.out, problems)


# ---------------------------------------------------------------- report

def read_wrk(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        line = f.read().strip()
    if not line:
        return None
    out = {}
    for kv in line.split()[1:]:
        k, _, v = kv.partition("=")
        out[k] = float(v)
    return out


def read_json(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def cmd_report(a):
    d = a.dir
    A, Bo, Bw = (read_wrk(os.path.join(d, f)) for f in ("direct.wrk", "front_online.wrk",
                                                        "front_async.wrk"))
    bf, bu, th = (read_json(os.path.join(d, f)) for f in ("burst_front.json",
                                                          "burst_upstream.json",
                                                          "threads.json"))

    def f0(x):
        return "n/a" if x is None or x != x else f"{x:,.0f}"

    def f2(x):
        return "n/a" if x is None or x != x else f"{x:.2f}"

    def cpu_us(w, key):
        if not w or not w.get("requests"):
            return "n/a"
        return f"{w[key] / w['requests'] * 1e6:.0f}"

    def wrk_row(label, w, unit):
        if not w:
            return f"| {label} | not measured | | | | | |"
        errs = (f"{int(w['sother'])} / {int(w['socket_errors'])}"
                + (f" (last status {int(w['last_other'])})" if w["sother"] else ""))
        if w["s202"]:
            errs += f"; {int(w['s202'])} answered 202 (not done within the wait)"
        return (f"| {label} | {f0(w['requests_per_s'])} {unit} | {f2(w['p50_ms'])} | "
                f"{f2(w['p99_ms'])} | {errs} | {cpu_us(w, 'front_cpu_s')} | "
                f"{cpu_us(w, 'upstream_cpu_s')} |")

    def burst_row(label, b):
        if not b or not b.get("succeeded"):
            return f"| {label} | {'FAILED' if b else 'not measured'} (see the log) | | | | | |"
        cpu = b.get("cpu", {})
        n = b["succeeded"]
        win = b.get("cpu_window_s", 0)

        def us(k):
            return f"{cpu[k] * win / n * 1e6:.0f}" if k in cpu and n else "n/a"
        probs = f"{b['rejected_429'] + b['errors'] + b['lost'] + b['failed']}"
        return (f"| {label} | {f0(b['e2e_jobs_per_s'])} jobs/s | {f0(b['p50_ms'])} | "
                f"{f0(b['p99_ms'])} | {probs} | {us('front')} | {us('upstream')} |")

    def ratio(x, y):
        return f"{x / y:.3g}" if x and y else "n/a"

    def added(w, key):
        return f"{w[key] - A[key]:+.2f}" if w and A else "n/a"

    lines = [
        "| measurement | throughput | p50 ms | p99 ms | errors: HTTP / socket | front CPU us per "
        "request | upstream CPU us per request |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        wrk_row("A. upstream called directly, online v2", A, "req/s"),
        wrk_row("B'. through the front, online (one upstream call per request)", Bo, "req/s"),
        wrk_row("B. through the front's async path, `Prefer: respond-async, wait=30` "
                "(durable job, a worker, the upstream call; the result in the answer)", Bw,
                "jobs/s"),
    ]
    if bf or bu:
        n = (bf or bu)["jobs"]
        lines += [
            burst_row(f"B burst. {n} jobs through the front's async path, all submitted then "
                      f"waited for (latency: submission -> finished_at, queueing included)", bf),
            burst_row(f"reference burst. {n} jobs on the upstream's own async path (XGBoost in "
                      f"process, no proxy)", bu),
        ]
    lines += [
        f"| **ratio** B' / A req/s (online through the front / direct); ms added at p50, p99 | "
        f"**{ratio(Bo and Bo['requests_per_s'], A and A['requests_per_s'])}** | "
        f"{added(Bo, 'p50_ms')} | {added(Bo, 'p99_ms')} | | | |",
        f"| **ratio** B / A (async jobs with wait / direct); ms added at p50, p99 | "
        f"**{ratio(Bw and Bw['requests_per_s'], A and A['requests_per_s'])}** | "
        f"{added(Bw, 'p50_ms')} | {added(Bw, 'p99_ms')} | | | |",
        f"| **ratio** B burst jobs/s / A req/s | "
        f"**{ratio(bf and bf.get('e2e_jobs_per_s'), A and A['requests_per_s'])}** | | | | | |",
        f"| **ratio** B burst / reference burst jobs/s (the proxy's share of the async path) | "
        f"{ratio(bf and bf.get('e2e_jobs_per_s'), bu and bu.get('e2e_jobs_per_s'))} | | | | | |",
    ]
    if th and "busy_threads" in th:
        lines += [
            f"| **threads** in the front inferd: idle / with {th['upstream_open']} upstream calls "
            f"open (most seen) / after they ended | **{th['idle_threads']} / "
            f"{th['busy_threads']}** ({th['max_threads_seen']}) / {th['after_threads']} "
            f"| | | | | |",
            f"| sockets held by the front: idle / with the calls open | {th['idle_sockets']} / "
            f"{th['busy_sockets']} | | | | | |",
            f"| slow upstream: calls open at once (most) / connections; {th['jobs']} jobs, each "
            f"held {th['hold_s']:g} s: succeeded / failed / lost, p50 / p99 ms | "
            f"{th['upstream_open']} ({th['upstream_max_open']}) / {th['upstream_connections']}; "
            f"{th.get('succeeded')} / {th.get('failed')} / {th.get('lost')}, "
            f"{f0(th.get('p50_ms'))} / {f0(th.get('p99_ms'))} | | | | | |",
        ]
    else:
        lines.append("| threads with 500 upstream calls in flight | "
                     f"{'FAILED' if th else 'not measured'} (see the log) | | | | | |")
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--upstream-port", type=int, required=True)
    p.add_argument("--upstream-model", default="breast_cancer")
    p.add_argument("--front-port", type=int, required=True)
    p.add_argument("--front-model", default="upstream_bc")
    p.add_argument("--sample", required=True)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--dir", required=True)
    p = sub.add_parser("burst")
    p.add_argument("--label", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--jobs", type=int, default=20000)
    p.add_argument("--connections", type=int, default=128)
    p.add_argument("--deadline-s", type=float, default=60)
    p.add_argument("--verify", type=int, default=200)
    p.add_argument("--cpu", action="append", help="LABEL:PGID")
    p.add_argument("--out", required=True)
    p = sub.add_parser("slow")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--hold-s", type=float, default=15)
    p = sub.add_parser("threads")
    p.add_argument("--front-port", type=int, required=True)
    p.add_argument("--slow-port", type=int, required=True)
    p.add_argument("--model", default="slow")
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--jobs", type=int, default=500)
    p.add_argument("--hold-s", type=float, default=15)
    p.add_argument("--dir", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("report")
    p.add_argument("--dir", required=True)
    a = ap.parse_args()
    {"prepare": cmd_prepare, "burst": cmd_burst, "slow": cmd_slow, "threads": cmd_threads,
     "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    main()
