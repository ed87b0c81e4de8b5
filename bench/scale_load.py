#!/usr/bin/python3
"""Load generator and report for the scaling benchmark (bench/scale_run).

    /usr/bin/python3 bench/scale_load.py inferd --port P --model-file MODEL --out OUT.json \
        --jobs 3000 --n N [--cpu LABEL:PGID ...]
    BENCH_CELERY_URL=redis://127.0.0.1:P/0 BENCH_MODEL_PATH=MODEL \
    /usr/bin/python3 bench/scale_load.py celery --model-file MODEL --out OUT.json \
        --jobs 3000 --n N [--cpu LABEL:PGID ...]
    /usr/bin/python3 bench/scale_load.py report DIR --ns "1 2 4"

`inferd` is bench/async_load.py's capacity phase alone, with its code: --jobs single-row jobs
(`Prefer: respond-async`) submitted as fast as --connections keep-alive connections can, a
wait until nothing is queued or running (/metrics), every job record read back through the
listing pages, and a sample of --verify results compared with python3-xgboost (1e-5).
End-to-end jobs/s = jobs / (last finished_at - first submission). It works the same against
`inferd serve` on SQLite, Redis and PostgreSQL (the API reads the shared queue).

`celery` is bench/celery_load.py's measurement, with its helpers: a ping and 8 checked
warm-up tasks, then --jobs `predict.delay(row)` as fast as one client thread can, then the
Redis result backend polled (MGET) until every result is there. End-to-end jobs/s = jobs /
(last date_done - first submission); every result is compared with python3-xgboost. It is
reimplemented here only to record CPU use over exactly the burst.

--cpu LABEL:PGID (repeatable; one label may name several groups): the CPU time of every
process in that process group (bench/scale_run starts each one with setsid) is sampled from
/proc every 10 ms by a thread; --cpu LABEL:+PID counts PID and its children instead
(PostgreSQL's postmaster and its backends, each of which leads a process group of its own).
Members are looked up again every 100 ms, so backends forked per connection count too (a
process that exits keeps the CPU last seen of it); "loadgen" is this process. The JSON records the cores used per
label from the first submission to the last job's finish (to within a sample and a clock tick,
so a burst of a few hundred jobs is too short for them to mean much).

Both exit non-zero after writing OUT.json if a job was refused, lost, failed or wrong, or the
burst did not finish within --deadline-s. `report` prints the markdown table of the
{sqlite,redis,postgres,celery}-N.json files in DIR and the paragraph on where the curve flattens.
"""
import argparse
import json
import os
import random
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from async_load import (Http, build_requests, expected_predictions, make_rows,  # noqa: E402
                        parse_ts, pct, phase_summary, run_async, submit_phase, verify_sample)

SYSTEMS = ("sqlite", "redis", "postgres", "celery")


def log(msg):
    print(f"scale_load: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- CPU by process group

class GroupCpu:
    """CPU seconds of whole process groups (threads and forked children included), sampled
    every 10 ms by a thread, so that a window can be cut afterwards at the burst's own ends
    (first submission, last job finished)."""

    def __init__(self, specs):
        self.groups = {}   # pgid -> label
        self.parents = {}  # pid -> label: that process and its children
        for s in specs or []:
            label, _, pgid = s.partition(":")
            if pgid.startswith("+"):
                self.parents.setdefault(int(pgid[1:]), label)
            else:
                self.groups.setdefault(int(pgid), label)
        self.pids = {}  # pid -> label: the groups' members, looked up again every 100 ms
        self.seen = {}  # pid -> ticks last read: a member that exits keeps what it used
        self._rescan()
        self.n_snaps = 0
        self.labels = set(self.groups.values()) | set(self.parents.values()) | {"loadgen"}
        self.tick = os.sysconf("SC_CLK_TCK")
        self.samples = []
        self.stopping = threading.Event()
        self.thread = None

    @staticmethod
    def _stat(pid):
        """(pgrp, utime + stime ticks, ppid), or None if it is gone."""
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return int(fields[2]), int(fields[11]) + int(fields[12]), int(fields[1])
        except (OSError, ValueError, IndexError):
            return None

    def _rescan(self):
        for d in os.listdir("/proc"):
            if d.isdigit() and d not in self.pids:
                st = self._stat(d)
                if not st:
                    continue
                if st[0] in self.groups:
                    self.pids[d] = self.groups[st[0]]
                elif int(d) in self.parents:
                    self.pids[d] = self.parents[int(d)]
                elif st[2] in self.parents:
                    self.pids[d] = self.parents[st[2]]

    def snap(self):
        self.n_snaps += 1
        if self.n_snaps % 10 == 0:
            self._rescan()
        out = dict.fromkeys(self.labels, 0.0)
        for pid, label in self.pids.items():
            st = self._stat(pid)
            if st:
                self.seen[pid] = st[1]
            out[label] += self.seen.get(pid, 0) / self.tick
        t = os.times()
        out["loadgen"] = t.user + t.system
        return time.time(), out

    def start(self):
        def run():
            while not self.stopping.is_set():
                self.samples.append(self.snap())
                self.stopping.wait(0.01)
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def stop(self):
        self.stopping.set()
        self.thread.join()
        self.samples.append(self.snap())

    def window(self, t_a, t_b):
        """({label: cores used}, seconds) from the last sample at or before t_a to the first at
        or after t_b."""
        a = max((x for x in self.samples if x[0] <= t_a), default=self.samples[0],
                key=lambda x: x[0])
        b = min((x for x in self.samples if x[0] >= t_b), default=self.samples[-1],
                key=lambda x: x[0])
        dt = b[0] - a[0]
        if dt <= 0:
            return {}, 0.0
        return {k: (b[1][k] - a[1][k]) / dt for k in b[1]}, dt


def finish(res, out, problems):
    res["ok"] = not problems
    res["problems"] = problems
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    cpu = ", ".join(f"{k} {v:.2f}" for k, v in sorted(res.get("cpu", {}).items()))
    log(f"{res['system']} N={res['n']}: {res.get('e2e_jobs_per_s', 0):.0f} jobs/s end to end; "
        f"cores used: {cpu or 'n/a'}")
    if problems:
        sys.exit(f"scale_load: FAILED: {res['system']} N={res['n']}: " + "; ".join(problems))


# ---------------------------------------------------------------- inferd

def cmd_inferd(a):
    host, port = "127.0.0.1", a.port
    rows = make_rows(a.rows)
    want = expected_predictions(a.model_file, rows)
    reqs = build_requests(host, port, a.model, rows)
    h = Http(host, port)
    g0 = h.job_gauges()
    if g0.get("queued", 0) or g0.get("running", 0) or g0.get("succeeded", 0):
        sys.exit(f"scale_load: the queue is not empty before the burst: {g0}")
    res = {"system": a.system, "n": a.n, "jobs": a.jobs, "connections": a.connections}
    cpu = GroupCpu(a.cpu)
    t0 = time.time()

    log(f"{a.system} N={a.n}: {a.jobs} jobs as fast as {a.connections} connections can")
    cpu.start()
    burst = run_async(submit_phase(host, port, reqs, a.jobs, a.connections, None, a.deadline_s))
    n_acc = sum(1 for s in burst["status"] if s == 202)
    log(f"{n_acc}/{a.jobs} accepted in {max(burst['done']) - burst['start']:.2f}s; "
        f"waiting for the drain")
    left = max(1.0, a.deadline_s - (time.time() - t0))
    drained, gauges = h.wait_drain(left, f"{a.system} N={a.n}")
    cpu.stop()
    jobs = h.all_jobs()
    s = phase_summary("burst", burst, jobs)
    if s["succeeded"]:
        res["cpu"], res["cpu_window_s"] = cpu.window(s["first_submit"], s["last_finished"])
    res.update({k: s.get(k) for k in ("accepted", "rejected_429", "errors", "unsent", "lost",
                                      "failed", "succeeded", "accepted_per_s", "p50_ms",
                                      "p99_ms", "e2e_jobs_per_s", "run_jobs_per_s")})
    res["gauges_after"] = gauges
    n_checked, bad = verify_sample(h, [burst], jobs, want, a.rows, a.verify, random.Random(7))
    res["verified"], res["wrong"] = n_checked, len(bad)
    res["elapsed_s"] = time.time() - t0
    for b in bad[:10]:
        log(f"WRONG: {b}")
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
        problems.append(f"{len(bad)} of {n_checked} sampled results differ from python-xgboost")
    log(f"verified {n_checked} sampled results against python-xgboost: {len(bad)} wrong")
    finish(res, a.out, problems)


# ---------------------------------------------------------------- Celery

def cmd_celery(a):
    import redis
    from celery_app import URL, predict
    from celery_load import fetch_metas, wait_worker

    rows = make_rows(a.rows)
    want = expected_predictions(a.model_file, rows)
    row_lists = [[float(v) for v in row] for row in rows]
    res = {"system": "celery", "n": a.n, "jobs": a.jobs}
    if not wait_worker(a.ready_deadline_s):
        sys.exit(f"scale_load: no Celery worker answered a ping within {a.ready_deadline_s:.0f}s")
    warm = [predict.delay(row_lists[i]) for i in range(8)]
    for i, w in enumerate(warm):
        got = w.get(timeout=30)
        if abs(got - want[i]) > 1e-5:
            sys.exit(f"scale_load: warm-up row {i}: got {got}, python-xgboost {want[i]}")
    r = redis.Redis.from_url(URL)
    n = a.jobs
    t_sub = [0.0] * n
    ids = [None] * n
    cpu = GroupCpu(a.cpu)

    log(f"celery N={a.n}: {n} tasks through task.delay as fast as one client thread can")
    cpu.start()
    t0 = time.time()
    for i in range(n):
        t_sub[i] = time.time()
        ids[i] = predict.delay(row_lists[i % a.rows]).id
    t1 = time.time()
    res["accepted_per_s"] = n / (t1 - t0)
    metas = {}
    pending = list(ids)
    last_log = time.time()
    while pending and time.time() < t0 + a.deadline_s:
        metas.update(fetch_metas(r, pending))
        pending = [i for i in pending if i not in metas]
        if pending:
            if time.time() - last_log >= 5:
                log(f"{len(metas)}/{n} results")
                last_log = time.time()
            time.sleep(0.2)  # as celery_load.py: each poll is an MGET of all that are left
    cpu.stop()

    lat, fins, failed, wrong = [], [], 0, 0
    for i, tid in enumerate(ids):
        m = metas.get(tid)
        if m is None:
            continue
        if m["status"] != "SUCCESS":
            failed += 1
            continue
        fins.append(parse_ts(m["date_done"]))
        lat.append(fins[-1] - t_sub[i])
        if abs(float(m["result"]) - want[i % a.rows]) > 1e-5:
            wrong += 1
    res.update({"lost": len(pending), "failed": failed, "succeeded": len(fins),
                "verified": len(fins), "wrong": wrong,
                "p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3,
                "elapsed_s": time.time() - t0})
    if fins:
        res["e2e_jobs_per_s"] = len(fins) / (max(fins) - t0)
        res["cpu"], res["cpu_window_s"] = cpu.window(t0, max(fins))
    problems = []
    if pending or failed:
        problems.append(f"lost {len(pending)} (not done within {a.deadline_s:.0f}s), "
                        f"failed {failed}")
    if wrong:
        problems.append(f"{wrong} of {len(fins)} results differ from python-xgboost")
    log(f"checked all {len(fins)} results against python-xgboost: {wrong} wrong")
    finish(res, a.out, problems)


# ---------------------------------------------------------------- report

def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def rate(r):
    return r.get("e2e_jobs_per_s") if r and r.get("ok") else None


def cpu_text(r, cores):
    c = r.get("cpu") if r else None
    if not c:
        return "n/a"
    names = {"loadgen": "load generator", "api": "API", "workers": "workers",
             "inferd": "inferd (API + worker threads)", "redis": "Redis",
             "postgres": "PostgreSQL"}
    parts = [f"{names.get(k, k)} {c[k]:.2f}" for k in
             ("loadgen", "inferd", "api", "workers", "redis", "postgres") if k in c]
    total = sum(c.values())
    per_job = total * r["cpu_window_s"] / r["jobs"] * 1e3
    return (f"{total:.2f} of {cores} cores over {r['cpu_window_s']:.2f} s ({', '.join(parts)}; "
            f"{per_job:.2f} ms of CPU per job)")


def gains_of(ns, vals):
    """[(N, % gain over the previous N)], or None if a run failed."""
    if any(v is None for v in vals):
        return None
    return [(ns[k], (vals[k] / vals[k - 1] - 1) * 100) for k in range(1, len(ns))]


# the step every job of a system passes through one at a time
SERIAL = {
    "sqlite": "the queue's one SQLite writer thread (group commits, one fsync each)",
    "redis": "the one API process and Redis's one thread, which every job passes through",
    "postgres": "the one API process and each process's one writer connection, whose group "
                "commits wait for PostgreSQL's WAL flush (synchronous_commit on)",
    "celery": "the one client thread calling task.delay and the prefork parent that "
              "hands every task to a child",
}
NAMES = {"sqlite": "inferd SQLite", "redis": "inferd Redis", "postgres": "inferd PostgreSQL",
         "celery": "Celery"}


def why_flat(s, n, r, cores):
    """One sentence, from the run where the curve flattened: what was spent."""
    c = r.get("cpu", {})
    total = sum(c.values())
    full = [k for k in ("loadgen", "redis") if c.get(k, 0) >= 0.9]
    sub, e2e = r.get("accepted_per_s") or 0, r.get("e2e_jobs_per_s") or 0
    head = f"At N={n}, {NAMES[s]} used {cpu_text(r, cores)}"
    client = (f"it finished {e2e:.0f} jobs/s while the one client submitted {sub:.0f}/s, so "
              f"the client's submission rate is the ceiling" if sub and e2e >= 0.8 * sub else "")
    if total >= 0.8 * cores:
        why = "the cores are (nearly) spent, so another worker process only time-shares them"
    elif full:
        why = (" and ".join("the load generator (one thread)" if k == "loadgen"
                            else "Redis (one thread)" for k in full) +
               " is at a full core and sets the pace, not the workers")
    elif client:
        return f"{head}: {client}."
    else:
        return (f"{head}: the cores are not spent, so a serial step sets the pace rather than "
                f"the workers' CPU, most likely {SERIAL[s]}.")
    return f"{head}: {why}" + (f"; and {client}." if client else ".")


def cmd_report(a):
    ns = [int(x) for x in a.ns.split()]
    cores = a.cores or os.cpu_count()
    ran = [s for s in SYSTEMS if s in a.systems.split()]
    runs = {(s, n): load(os.path.join(a.dir, f"{s}-{n}.json")) for s in SYSTEMS for n in ns}

    def cell(s, n):
        if s not in ran:
            return "not run"
        v = rate(runs[(s, n)])
        return f"{v:.0f}" if v is not None else "failed"  # no JSON: it failed to start

    def ratio(x, y):
        return f"{x / y:.2f}" if x and y else "n/a"

    lines = [
        "| N | inferd SQLite jobs/s (1 process, N worker threads) "
        "| inferd Redis jobs/s (API + N `inferd worker` processes) "
        "| inferd PostgreSQL jobs/s (API + N `inferd worker` processes) "
        "| Celery jobs/s (1 worker, prefork, N processes) | inferd Redis / Celery "
        "| inferd PostgreSQL / Celery | inferd PostgreSQL / Redis |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n in ns:
        rs, rr, rp, rc = (runs[(s, n)] for s in SYSTEMS)
        vr, vp, vc = rate(rr), rate(rp), rate(rc)
        lines.append(f"| {n} | {cell('sqlite', n)} | {cell('redis', n)} "
                     f"| {cell('postgres', n)} | {cell('celery', n)} "
                     f"| {ratio(vr, vc)} | {ratio(vp, vc)} | {ratio(vp, vr)} |")
    print("\n".join(lines))
    print()

    flat_txt, why_txt = [], []
    for s in ran:
        gains = gains_of(ns, [rate(runs[(s, n)]) for n in ns])
        if gains is None:
            flat_txt.append(f"{NAMES[s]}: a run failed, no curve")
            continue
        if not gains:
            flat_txt.append(f"{NAMES[s]}: one N only, no curve")
            continue
        steps = ", ".join(f"{g:+.0f}% at N={m}" for m, g in gains)
        n_flat = next((m for m, g in gains if g < a.flat_pct), None)
        if n_flat is None:
            flat_txt.append(f"{NAMES[s]} does not flatten by N={ns[-1]} ({steps})")
            continue
        flat_txt.append(f"{NAMES[s]} flattens at N={n_flat} ({steps})")
        why_txt.append(why_flat(s, n_flat, runs[(s, n_flat)], cores))

    para = [f"**Where the curve flattens** (the first N whose jobs/s gain over the previous N "
            f"is under {a.flat_pct:.0f}%): " + "; ".join(flat_txt) + "."]
    para.append(
        f"**Why, on {cores} cores:** the load generator, Redis or PostgreSQL, the API process "
        f"and every worker "
        f"share this machine's {cores} cores, and the model is CPU-bound (500 trees of depth 8 "
        f"per row: a worker computes, it does not wait), so once {cores} cores are busy a "
        f"further worker adds no CPU, only switching." +
        (" CPU is measured from each burst's first submission to its last job done. " +
         " ".join(why_txt) if why_txt else ""))
    top = ns[-1]
    para.append("Submissions/s of the one client (while it submitted), N = " +
                "/".join(map(str, ns)) + ": " + "; ".join(
                    f"{NAMES[s]} " + "/".join(
                        f"{runs[(s, n)]['accepted_per_s']:.0f}"
                        if runs[(s, n)] and runs[(s, n)].get("accepted_per_s") else "n/a"
                        for n in ns) for s in ran) + ".")
    para.append(f"CPU during the N={top} bursts: " +
                "; ".join(f"{NAMES[s]} {cpu_text(runs[(s, top)], cores)}" for s in ran) +
                ".")
    short = [r["cpu_window_s"] for r in runs.values() if r and r.get("cpu_window_s")]
    if short and min(short) < 1.0:
        para.append(f"Caution: the shortest burst lasted {min(short):.2f} s, so these gains and "
                    f"CPU shares are rough (10 ms clock ticks, and the last batch's latency "
                    f"weighs on a short burst); raise BENCH_SCALE_JOBS to firm them up.")
    print("\n\n".join(para))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("inferd", "celery"):
        p = sub.add_parser(name)
        p.add_argument("--model-file", required=True)
        p.add_argument("--out", required=True)
        p.add_argument("--jobs", type=int, default=3000)
        p.add_argument("--n", type=int, required=True, help="worker processes, for the record")
        p.add_argument("--rows", type=int, default=512)
        p.add_argument("--deadline-s", type=float, default=90,
                       help="from the first submission until every job is done")
        p.add_argument("--cpu", action="append", metavar="LABEL:PGID")
        if name == "inferd":
            p.add_argument("--system", choices=("sqlite", "redis", "postgres"), required=True)
            p.add_argument("--port", type=int, required=True)
            p.add_argument("--model", default="bench_large")
            p.add_argument("--connections", type=int, default=128)
            p.add_argument("--verify", type=int, default=200)
        else:
            p.add_argument("--ready-deadline-s", type=float, default=60)
    r = sub.add_parser("report")
    r.add_argument("dir")
    r.add_argument("--ns", default="1 2 4")
    r.add_argument("--flat-pct", type=float, default=15)
    r.add_argument("--systems", default=" ".join(SYSTEMS), help="the systems that were run")
    r.add_argument("--cores", type=int, default=0)
    a = ap.parse_args()
    {"inferd": cmd_inferd, "celery": cmd_celery, "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    main()
