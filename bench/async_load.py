#!/usr/bin/python3
"""Load generator and analysis for the async benchmark (inferd's job API).

    /usr/bin/python3 bench/async_load.py inferd --port P --model-file MODEL --out OUT.json
    /usr/bin/python3 bench/async_load.py report INFERD.json CELERY.json

`inferd` runs, against an inferd already serving the bench model on 127.0.0.1:P:

  1. capacity: N jobs (--capacity-jobs) submitted as fast as --connections keep-alive
     HTTP/1.1 connections can (`Prefer: respond-async` on the v2 infer endpoint), then a wait
     for the queue to drain. Capacity = jobs / (last finished_at - first submission).
  2. steady: --steady-factor x capacity jobs/s for --steady-seconds, open loop: a fixed
     schedule (job i at start + i/rate), each job sent by the first free connection.
  3. spike: --spike-factor x capacity jobs/s for --spike-seconds over --spike-connections,
     open loop, right after the steady phase. The spike lasts its seconds: a job that no
     connection could send by its end (they were all waiting for inferd's answers) is
     counted as "not sent in time", never sent later. Then a wait for the drain (deadline
     30 s + 4x the backlog at capacity, at most --drain-deadline-s).

Afterwards every job record is fetched through the listing pages (GET /v1/jobs?limit=1000&
cursor=...), and each accepted job is looked up: lost = accepted but not final (succeeded,
failed, cancelled, expired) by the deadline; failed = final but not succeeded. End-to-end
latency = the record's finished_at - the time the job was sent; the open-loop phases also
report it from the job's scheduled time. Drain time = last finished_at - the spike's end.
A sample of results is compared with python3-xgboost (1e-5): a wrong answer, a lost or a
failed job, or an undrained queue makes this script exit non-zero after writing OUT.json.
With --server-pid, the server's CPU use (and this process's) is reported per phase.

Every request uses one of --rows distinct rows (row i of job i mod rows), made with a fixed
seed. All loops are bounded in count and in time.

`report` prints the markdown table of both runs (celery.json from bench/celery_load.py).
"""
import argparse
import asyncio
import http.client
import json
import os
import random
import sys
import time
from datetime import datetime, timezone

import numpy as np

FINAL = ("succeeded", "failed", "cancelled", "expired")
N_FEATURES = 28


def log(msg):
    print(f"async_load: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- rows and checks

def make_rows(n, seed=4321):
    """n distinct float32 rows; their float values are exact as JSON doubles."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, N_FEATURES)).astype(np.float32)


def v2_body(row):
    return {"inputs": [{"name": "input__0", "datatype": "FP32", "shape": [1, N_FEATURES],
                        "data": [float(v) for v in row]}]}


def expected_predictions(model_file, rows):
    import xgboost as xgb
    booster = xgb.Booster(model_file=model_file)
    booster.set_param({"nthread": 1})
    return booster.predict(xgb.DMatrix(rows)).astype(np.float64)


def first_number(data):
    while isinstance(data, list):
        data = data[0]
    return float(data)


def parse_ts(s):
    """ISO-8601 (inferd: ...Z; Celery: naive UTC) -> unix seconds."""
    if s is None:
        return None
    if s.endswith("Z"):
        s = s[:-1]
    d = datetime.fromisoformat(s)
    if d.tzinfo is None:
        d = d.replace(tzinfo=timezone.utc)
    return d.timestamp()


def pct(values, p):
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=np.float64), p))


# ---------------------------------------------------------------- raw HTTP/1.1 client

class Conn:
    """One keep-alive HTTP/1.1 connection, one request in flight."""

    def __init__(self, host, port):
        self.host, self.port = host, port
        self.r = self.w = None

    async def open(self):
        self.r, self.w = await asyncio.open_connection(self.host, self.port)

    def close(self):
        if self.w is not None:
            self.w.close()
            self.r = self.w = None

    async def request(self, data):
        if self.w is None:
            await self.open()
        self.w.write(data)
        head = await self.r.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        low = head.lower()
        i = low.find(b"\r\ncontent-length:")
        n = int(head[i + 17:head.index(b"\r\n", i + 2)]) if i >= 0 else 0
        body = await self.r.readexactly(n) if n else b""
        if b"\r\nconnection: close" in low:
            self.close()
        return status, body


def build_requests(host, port, model, rows):
    reqs = []
    for row in rows:
        body = json.dumps(v2_body(row), separators=(",", ":")).encode()
        head = (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {host}:{port}\r\n"
                f"Content-Type: application/json\r\nPrefer: respond-async\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        reqs.append(head + body)
    return reqs


async def submit_phase(host, port, reqs, n, conns, rate, window_s):
    """Submits n jobs over `conns` connections; rate None = as fast as possible, else open loop
    at `rate` jobs/s (job i scheduled at start + i/rate). A job that no connection could send
    within window_s of the start is not sent (status -2). Returns per-job lists."""
    sched = [0.0] * n
    sent = [0.0] * n
    done = [0.0] * n
    status = [0] * n
    ids = [None] * n
    nxt = 0
    pool = [Conn(host, port) for _ in range(min(conns, n))]
    await asyncio.gather(*(c.open() for c in pool))
    start = time.time() + 0.05
    deadline = start + window_s

    async def worker(c):
        nonlocal nxt
        while nxt < n:
            i = nxt
            nxt += 1
            if rate:
                sched[i] = start + i / rate
                d = sched[i] - time.time()
                if d > 0:
                    await asyncio.sleep(d)
            now = time.time()
            if now > deadline:
                status[i] = -2  # not sent: the phase ran out of time
                continue
            sent[i] = now
            if not rate:
                sched[i] = now
            try:
                st, body = await asyncio.wait_for(c.request(reqs[i % len(reqs)]), 30)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    asyncio.TimeoutError, ValueError):
                c.close()
                st, body = -1, b""
            done[i] = time.time()
            status[i] = st
            if st == 202:
                ids[i] = json.loads(body)["id"]

    if not rate:
        await asyncio.sleep(max(0.0, start - time.time()))
    await asyncio.gather(*(worker(c) for c in pool))
    for c in pool:
        c.close()
    return {"sched": sched, "sent": sent, "done": done, "status": status, "ids": ids,
            "start": start, "rate": rate, "n": n}


def run_async(coro):
    try:
        import uvloop
        return uvloop.run(coro) if hasattr(uvloop, "run") else _run_uvloop(coro, uvloop)
    except ImportError:
        return asyncio.run(coro)


def _run_uvloop(coro, uvloop):
    uvloop.install()
    return asyncio.run(coro)


# ---------------------------------------------------------------- plain HTTP helpers

class Http:
    def __init__(self, host, port):
        self.host, self.port = host, port
        self.c = http.client.HTTPConnection(host, port, timeout=30)

    def get(self, path):
        for attempt in range(3):
            try:
                self.c.request("GET", path)
                r = self.c.getresponse()
                return r.status, r.read()
            except (OSError, http.client.HTTPException):
                self.c.close()
                self.c = http.client.HTTPConnection(self.host, self.port, timeout=30)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def job_gauges(self):
        st, body = self.get("/metrics")
        if st != 200:
            raise RuntimeError(f"/metrics answered {st}")
        g = {}
        for line in body.decode().splitlines():
            if line.startswith('inferd_jobs{state="'):
                k = line.split('"')[1]
                g[k] = float(line.rsplit(" ", 1)[1])
        return g

    def wait_drain(self, deadline_s, phase):
        """Polls the gauges until nothing is queued or running; returns (seconds, gauges)."""
        t0 = time.time()
        last_log = t0
        while True:
            g = self.job_gauges()
            if g.get("queued", 0) == 0 and g.get("running", 0) == 0:
                return time.time() - t0, g
            now = time.time()
            if now - t0 > deadline_s:
                log(f"{phase}: not drained after {deadline_s:.0f}s: {g}")
                return None, g
            if now - last_log >= 5:
                log(f"{phase}: draining: queued {g.get('queued', 0):.0f} "
                    f"running {g.get('running', 0):.0f} succeeded {g.get('succeeded', 0):.0f}")
                last_log = now
            time.sleep(0.1)

    def all_jobs(self, max_pages=10000):
        """Every job record, through the listing pages (newest first)."""
        jobs = {}
        cursor = None
        for _ in range(max_pages):
            path = "/v1/jobs?limit=1000" + (f"&cursor={cursor}" if cursor else "")
            st, body = self.get(path)
            if st != 200:
                raise RuntimeError(f"GET {path} answered {st}: {body[:200]!r}")
            page = json.loads(body)
            for j in page["jobs"]:
                jobs[j["id"]] = j
            cursor = page.get("next_cursor")
            if not cursor:
                return jobs
        raise RuntimeError(f"listing did not end after {max_pages} pages")


# ---------------------------------------------------------------- CPU accounting

class Cpu:
    """CPU seconds used by the server (from /proc, if --server-pid) and by this process."""

    def __init__(self, server_pid):
        self.pid = server_pid
        self.tick = os.sysconf("SC_CLK_TCK")

    def now(self):
        srv = float("nan")
        if self.pid:
            try:
                with open(f"/proc/{self.pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                srv = (int(fields[11]) + int(fields[12])) / self.tick
            except (OSError, ValueError, IndexError):
                pass
        t = os.times()
        return time.time(), srv, t.user + t.system

    @staticmethod
    def cores(a, b):
        dt = b[0] - a[0]
        return {"server_cores": (b[1] - a[1]) / dt, "loadgen_cores": (b[2] - a[2]) / dt,
                "seconds": dt}


# ---------------------------------------------------------------- analysis

def phase_summary(name, ph, jobs):
    n = ph["n"]
    st = ph["status"]
    accepted = [i for i in range(n) if st[i] == 202]
    rejected = sum(1 for s in st if s == 429)
    errors = sum(1 for s in st if s not in (202, 429, -2))
    unsent = sum(1 for s in st if s == -2)
    lost = failed = 0
    lat = []
    ok = []
    first_sub = min((ph["sent"][i] for i in accepted), default=float("nan"))
    last_fin = float("nan")
    fins = []
    for i in accepted:
        j = jobs.get(ph["ids"][i])
        if j is None or j["status"] not in FINAL:
            lost += 1
            continue
        if j["status"] != "succeeded":
            failed += 1
            continue
        f = parse_ts(j["finished_at"])
        fins.append(f)
        lat.append(f - ph["sent"][i])
        ok.append(i)
    if fins:
        last_fin = max(fins)
    sent_acc = [ph["sent"][i] for i in accepted]
    done_acc = [ph["done"][i] for i in accepted]
    sub_window = (max(done_acc) - min(sent_acc)) if accepted else float("nan")
    lag = [ph["sent"][i] - ph["sched"][i] for i in range(n) if st[i] != -2]
    lat_sched = [x + ph["sent"][i] - ph["sched"][i] for x, i in zip(lat, ok)]
    out = {
        "phase": name, "offered": n, "offered_rate": ph["rate"], "accepted": len(accepted),
        "rejected_429": rejected, "errors": errors, "unsent": unsent, "lost": lost,
        "failed": failed, "succeeded": len(lat),
        "submit_window_s": sub_window,
        "accepted_per_s": len(accepted) / sub_window if accepted and sub_window > 0 else 0.0,
        "submit_p99_ms": pct([(ph["done"][i] - ph["sent"][i]) * 1e3 for i in accepted], 99),
        "max_lag_ms": max(lag) * 1e3 if lag else float("nan"),
        "p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3,
        "sched_p50_ms": pct(lat_sched, 50) * 1e3, "sched_p99_ms": pct(lat_sched, 99) * 1e3,
        "first_submit": first_sub, "last_finished": last_fin,
        "submit_end": max(done_acc) if accepted else float("nan"),
    }
    if fins:
        out["e2e_jobs_per_s"] = len(fins) / (last_fin - first_sub)
        starts = [parse_ts(jobs[ph["ids"][i]]["started_at"]) for i in accepted
                  if jobs.get(ph["ids"][i], {}).get("status") == "succeeded"]
        out["run_jobs_per_s"] = len(fins) / (last_fin - min(starts)) if starts else float("nan")
    return out


def verify_sample(h, phases, jobs, want, n_rows, k, rng):
    """Fetches k random succeeded results and compares them with python3-xgboost."""
    pool = []
    for ph in phases:
        for i, jid in enumerate(ph["ids"]):
            if jid and jobs.get(jid, {}).get("status") == "succeeded":
                pool.append((jid, i % n_rows))
    sample = rng.sample(pool, min(k, len(pool)))
    bad = []
    for jid, r in sample:
        st, body = h.get(f"/v1/jobs/{jid}/result")
        if st != 200:
            bad.append(f"{jid}: result answered HTTP {st}")
            continue
        got = first_number(json.loads(body)["outputs"][0]["data"])
        if abs(got - want[r]) > 1e-5:
            bad.append(f"{jid}: row {r}: got {got}, python-xgboost {want[r]}")
    return len(sample), bad


def cmd_inferd(a):
    host, port = "127.0.0.1", a.port
    rows = make_rows(a.rows)
    want = expected_predictions(a.model_file, rows)
    reqs = build_requests(host, port, a.model, rows)
    h = Http(host, port)
    res = {"system": "inferd", "workers": a.workers, "connections": a.connections}
    t_start = time.time()
    cpu = Cpu(a.server_pid)
    c0 = cpu.now()

    # 1. capacity
    log(f"capacity: {a.capacity_jobs} jobs as fast as {a.connections} connections can")
    cap = run_async(submit_phase(host, port, reqs, a.capacity_jobs, a.connections, None, 60))
    if sum(1 for s in cap["status"] if s == 202) == 0:
        sys.exit(f"async_load: no submission accepted (statuses {set(cap['status'])})")
    n_acc = sum(1 for s in cap["status"] if s == 202)
    log(f"capacity: {n_acc}/{a.capacity_jobs} accepted in "
        f"{max(cap['done']) - cap['start']:.2f}s; waiting for the drain")
    drained, _ = h.wait_drain(min(a.drain_deadline_s, 60), "capacity")
    res["cpu_capacity"] = Cpu.cores(c0, cpu.now())
    jobs = h.all_jobs()
    capsum = phase_summary("capacity", cap, jobs)
    capacity = capsum.get("e2e_jobs_per_s", 0.0)
    log(f"capacity: accepted {capsum['accepted_per_s']:.0f} submissions/s, "
        f"{capacity:.0f} jobs/s end to end ({capsum.get('run_jobs_per_s', 0):.0f} jobs/s "
        f"first start -> last finish), p50 {capsum['p50_ms']:.0f} ms p99 {capsum['p99_ms']:.0f} ms")
    res["capacity"] = capsum
    if capacity <= 0 or drained is None:
        res["error"] = "capacity phase did not complete"
        json.dump(res, open(a.out, "w"), indent=1)
        sys.exit("async_load: capacity phase did not complete")

    # 2 + 3. steady, then spike, open loop
    steady_rate = a.steady_factor * capacity
    spike_rate = a.spike_factor * capacity
    n_steady = max(1, int(steady_rate * a.steady_seconds))
    n_spike = max(1, int(spike_rate * a.spike_seconds))
    log(f"steady: {steady_rate:.0f} jobs/s for {a.steady_seconds}s ({n_steady} jobs)")
    steady = run_async(submit_phase(host, port, reqs, n_steady, min(a.connections, 32),
                                    steady_rate, a.steady_seconds + 2))
    log(f"spike: {spike_rate:.0f} jobs/s offered for {a.spike_seconds}s ({n_spike} jobs) "
        f"over {a.spike_connections} connections")
    c1 = cpu.now()
    spike = run_async(submit_phase(host, port, reqs, n_spike, a.spike_connections, spike_rate,
                                   a.spike_seconds))
    c2 = cpu.now()
    spike_end = max(max(spike["done"]), spike["start"] + a.spike_seconds)
    g = h.job_gauges()
    backlog = g.get("queued", 0) + g.get("running", 0)
    deadline = min(a.drain_deadline_s, 30 + 4 * backlog / capacity)
    n_sent = sum(1 for x in spike["status"] if x != -2)
    log(f"spike: {n_sent} of {n_spike} sent in its {a.spike_seconds}s (the rest: no free "
        f"connection in time); backlog {backlog:.0f}; waiting for the drain "
        f"(deadline {deadline:.0f}s)")
    drained, gauges = h.wait_drain(deadline, "spike")
    res["cpu_spike"] = Cpu.cores(c1, c2)
    res["cpu_drain"] = Cpu.cores(c2, cpu.now())
    for k in ("cpu_capacity", "cpu_spike", "cpu_drain"):
        log(f"{k}: inferd {res[k]['server_cores']:.2f} cores, load generator "
            f"{res[k]['loadgen_cores']:.2f} cores over {res[k]['seconds']:.1f}s")
    t_list = time.time()
    jobs = h.all_jobs()
    log(f"listing: {len(jobs)} job records in {time.time() - t_list:.2f}s")
    res["steady"] = phase_summary("steady", steady, jobs)
    sp = phase_summary("spike", spike, jobs)
    last = max(x for x in (res["steady"]["last_finished"], sp["last_finished"]) if x == x)
    sp["drain_s"] = last - spike_end if drained is not None else float("nan")
    sp["scheduled_s"] = a.spike_seconds
    sp["connections"] = a.spike_connections
    sp["accepted_per_s"] = sp["accepted"] / (spike_end - spike["start"])
    res["spike"] = sp
    res["gauges_after"] = gauges

    # correctness
    n_checked, bad = verify_sample(h, [cap, steady, spike], jobs, want, a.rows, a.verify,
                                   random.Random(7))
    res["verified"] = n_checked
    res["wrong"] = len(bad)
    res["elapsed_s"] = time.time() - t_start
    json.dump(res, open(a.out, "w"), indent=1)
    for b in bad[:10]:
        log(f"WRONG: {b}")
    problems = []
    for name in ("capacity", "steady", "spike"):
        p = res[name]
        if p["lost"] or p["failed"] or p["errors"]:
            problems.append(f"{name}: lost {p['lost']} failed {p['failed']} errors {p['errors']}")
    if bad:
        problems.append(f"{len(bad)} of {n_checked} sampled results differ from python-xgboost")
    if drained is None:
        problems.append("the queue did not drain by the deadline")
    log(f"verified {n_checked} sampled results against python-xgboost: {len(bad)} wrong")
    if problems:
        sys.exit("async_load: FAILED: " + "; ".join(problems))


# ---------------------------------------------------------------- report

def cmd_report(a):
    inf = json.load(open(a.inferd)) if os.path.exists(a.inferd) else None
    cel = json.load(open(a.celery)) if os.path.exists(a.celery) else None

    def f0(x):
        return "n/a" if x is None or x != x else f"{x:.0f}"

    def f1(x):
        return "n/a" if x is None or x != x else f"{x:.1f}"

    def lat(p, pre=""):
        return f"{f0(p[pre + 'p50_ms'])} / {f0(p[pre + 'p99_ms'])}"

    lines = ["| measurement | value |", "| --- | ---: |"]
    if inf and "capacity" in inf:
        c = inf["capacity"]
        lines += [
            f"| inferd capacity: {c['offered']} jobs as fast as possible "
            f"({inf['connections']} connections), accepted submissions/s "
            f"| {f0(c['accepted_per_s'])} |",
            f"| inferd capacity: end-to-end jobs/s (first submit -> last finished_at) "
            f"| **{f0(c.get('e2e_jobs_per_s'))}** |",
            f"| inferd capacity: p50 / p99 submit -> finished_at ms | {lat(c)} |",
        ]
    if inf and "spike" in inf:
        st, sp = inf["steady"], inf["spike"]
        allp = [inf["capacity"], st, sp]
        lines += [
            f"| inferd steady: {f0(st['offered_rate'])} jobs/s (10% of capacity) for "
            f"{f1(st['offered'] / st['offered_rate'])} s: p50 / p99 submit -> finished_at ms "
            f"| {lat(st)} |",
            f"| inferd spike: offered {f0(sp['offered_rate'])} jobs/s (10x capacity) for "
            f"{f1(sp['scheduled_s'])} s = {sp['offered']} jobs over {sp['connections']} "
            f"connections: accepted / not sent in time | {sp['accepted']} / {sp['unsent']} |",
            f"| inferd spike: **accepted submissions/s** | **{f0(sp['accepted_per_s'])}** |",
            f"| inferd spike: rejected (429) / other errors / lost / failed "
            f"| {sp['rejected_429']} / {sp['errors']} / {sp['lost']} / {sp['failed']} |",
            f"| inferd spike: time to drain after the spike ends, s | {f1(sp.get('drain_s'))} |",
            f"| inferd spike: p50 / p99 submit -> finished_at ms | {lat(sp)} |",
            f"| inferd spike: p50 / p99 scheduled submit -> finished_at ms (open loop) "
            f"| {lat(sp, 'sched_')} |",
            f"| inferd all phases: lost / failed / 429s; sampled results checked / wrong "
            f"| {sum(p['lost'] for p in allp)} / {sum(p['failed'] for p in allp)} / "
            f"{sum(p['rejected_429'] for p in allp)}; "
            f"{inf.get('verified', 0)} / {inf.get('wrong', 'n/a')} |",
        ]
        cs, cd = inf.get("cpu_spike"), inf.get("cpu_drain")
        if cs and cd:
            lines.append(
                f"| inferd CPU, cores of {os.cpu_count()}: inferd / load generator, during the "
                f"spike; inferd during the drain | {cs['server_cores']:.2f} / "
                f"{cs['loadgen_cores']:.2f}; {cd['server_cores']:.2f} |")
    if not inf or "spike" not in inf:
        lines.append(f"| inferd | {'incomplete' if inf else 'not measured'} "
                     f"(see the log) |")
    if cel and "p50_ms" in cel:
        lines += [
            f"| Celery: {cel['jobs']} jobs via task.delay, submissions/s "
            f"| {f0(cel['submit_per_s'])} |",
            f"| Celery: end-to-end jobs/s (first submit -> last date_done) "
            f"| **{f0(cel.get('e2e_jobs_per_s'))}** |",
            f"| Celery: p50 / p99 submit -> date_done ms | {lat(cel)} |",
            f"| Celery: lost / failed; results checked / wrong "
            f"| {cel['lost']} / {cel['failed']}; {cel['verified']} / {cel['wrong']} |",
        ]
    else:
        lines.append("| Celery | not measured (see the log) |")
    ci = (inf or {}).get("capacity", {}).get("e2e_jobs_per_s")
    cc = (cel or {}).get("e2e_jobs_per_s")
    lines.append(f"| **ratio** inferd / Celery end-to-end jobs/s, same {(cel or {}).get('jobs', '')}"
                 f"-job burst, {(cel or {}).get('concurrency', '')} workers each "
                 f"| **{f'{ci / cc:.3g}' if ci and cc else 'n/a'}** |")
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("inferd")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", default="bench_large")
    p.add_argument("--model-file", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=2, help="for the record only")
    p.add_argument("--server-pid", type=int, default=0, help="to report its CPU use")
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--connections", type=int, default=128)
    p.add_argument("--capacity-jobs", type=int, default=5000)
    p.add_argument("--steady-factor", type=float, default=0.1)
    p.add_argument("--steady-seconds", type=float, default=10)
    p.add_argument("--spike-factor", type=float, default=10)
    p.add_argument("--spike-seconds", type=float, default=10)
    p.add_argument("--spike-connections", type=int, default=256)
    p.add_argument("--drain-deadline-s", type=float, default=300,
                   help="upper bound; the deadline is 30 s + 4x the backlog at capacity")
    p.add_argument("--verify", type=int, default=200)
    r = sub.add_parser("report")
    r.add_argument("inferd")
    r.add_argument("celery")
    a = ap.parse_args()
    {"inferd": cmd_inferd, "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    main()
