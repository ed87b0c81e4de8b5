#!/usr/bin/python3
"""Celery side of the async benchmark: N single-row jobs through a running Celery worker.

    BENCH_CELERY_URL=redis://127.0.0.1:P/0 BENCH_MODEL_PATH=MODEL \
    /usr/bin/python3 bench/celery_load.py --model-file MODEL --out OUT.json

Waits (bounded) for the worker to answer a ping, runs a few warm-up tasks through it and
checks their results, then submits --jobs tasks as fast as one client thread can with
`predict.delay(row)` (the same distinct rows as bench/async_load.py, row i mod --rows),
recording each submission's time. It then polls the Redis result backend (MGET of the
result keys, no effect on the worker) until every result is there or the deadline passes.
Latency = the result's date_done (set by the worker when it stores the result) - the
submission time; end-to-end jobs/s = jobs / (last date_done - first submission).
Every result is compared with python3-xgboost (1e-5). Exits non-zero on a lost, failed or
wrong job, after writing OUT.json.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import redis  # noqa: E402

from async_load import expected_predictions, make_rows, parse_ts, pct  # noqa: E402
from celery_app import URL, app, predict  # noqa: E402

READY = ("SUCCESS", "FAILURE", "REVOKED")


def log(msg):
    print(f"celery_load: {msg}", file=sys.stderr, flush=True)


def wait_worker(deadline_s):
    t0 = time.time()
    while time.time() - t0 < deadline_s:
        try:
            if app.control.ping(timeout=1.0):
                return True
        except Exception as e:  # the broker may not answer yet
            log(f"ping: {e}")
            time.sleep(0.5)
    return False


def fetch_metas(r, ids):
    out = {}
    for k in range(0, len(ids), 1000):
        chunk = ids[k:k + 1000]
        vals = r.mget([f"celery-task-meta-{i}" for i in chunk])
        for i, v in zip(chunk, vals):
            if v is not None:
                m = json.loads(v)
                if m.get("status") in READY:
                    out[i] = m
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-file", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--jobs", type=int, default=5000)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--concurrency", type=int, default=2, help="for the record only")
    ap.add_argument("--ready-deadline-s", type=float, default=60)
    ap.add_argument("--deadline-s", type=float, default=120)
    a = ap.parse_args()

    rows = make_rows(a.rows)
    want = expected_predictions(a.model_file, rows)
    row_lists = [[float(v) for v in row] for row in rows]
    res = {"system": "celery", "jobs": a.jobs, "concurrency": a.concurrency}

    if not wait_worker(a.ready_deadline_s):
        sys.exit(f"celery_load: no worker answered a ping within {a.ready_deadline_s:.0f}s")
    # warm-up, and a first correctness check
    warm = [predict.delay(row_lists[i]) for i in range(8)]
    for i, w in enumerate(warm):
        got = w.get(timeout=30)
        if abs(got - want[i]) > 1e-5:
            sys.exit(f"celery_load: warm-up row {i}: got {got}, python-xgboost {want[i]}")
    log("worker ready; warm-up results match python-xgboost")

    r = redis.Redis.from_url(URL)
    n = a.jobs
    t_sub = [0.0] * n
    ids = [None] * n
    t0 = time.time()
    for i in range(n):
        t_sub[i] = time.time()
        ids[i] = predict.delay(row_lists[i % a.rows]).id
    t1 = time.time()
    res["submit_per_s"] = n / (t1 - t0)
    log(f"{n} tasks submitted in {t1 - t0:.2f}s ({res['submit_per_s']:.0f}/s); "
        f"waiting for the results")

    metas = {}
    pending = list(ids)
    deadline = t0 + a.deadline_s
    last_log = time.time()
    while pending and time.time() < deadline:
        got = fetch_metas(r, pending)
        metas.update(got)
        pending = [i for i in pending if i not in metas]
        if pending:
            if time.time() - last_log >= 5:
                log(f"{len(metas)}/{n} results")
                last_log = time.time()
            time.sleep(0.2)
    res["wait_s"] = time.time() - t1

    lat, fins, failed, wrong = [], [], 0, 0
    for i, tid in enumerate(ids):
        m = metas.get(tid)
        if m is None:
            continue
        if m["status"] != "SUCCESS":
            failed += 1
            continue
        f = parse_ts(m["date_done"])
        fins.append(f)
        lat.append(f - t_sub[i])
        if abs(float(m["result"]) - want[i % a.rows]) > 1e-5:
            wrong += 1
    res.update({
        "lost": len(pending), "failed": failed, "succeeded": len(fins),
        "verified": len(fins), "wrong": wrong,
        "p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3,
    })
    if fins:
        res["e2e_jobs_per_s"] = len(fins) / (max(fins) - t0)
    json.dump(res, open(a.out, "w"), indent=1)
    log(f"{len(fins)} succeeded: {res.get('e2e_jobs_per_s', 0):.0f} jobs/s end to end, "
        f"p50 {res['p50_ms']:.0f} ms p99 {res['p99_ms']:.0f} ms; lost {len(pending)}, "
        f"failed {failed}, wrong {wrong} (all results checked against python-xgboost)")
    if pending or failed or wrong:
        sys.exit(f"celery_load: FAILED: lost {len(pending)}, failed {failed}, wrong {wrong}")


if __name__ == "__main__":
    main()
