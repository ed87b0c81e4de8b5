#!/usr/bin/python3
"""Generate the batch benchmark's records and its "light" model.

    /usr/bin/python3 bench/gen_records.py OUT_DIR [--rows N] [--seed S]

Writes, from one fixed-seed numpy generator, N records of 28 float32 features drawn like
bench/raw_predict.c's rows (uniform over the grid (k - 10000) / 3333, k in 0..20000, about
-3..3), so that the raw in-process measurement and the batch runs traverse the trees alike:

  OUT_DIR/records.csv      N lines of 28 comma-separated numbers, no header
  OUT_DIR/records.jsonl    the same records, one JSON array per line
  OUT_DIR/models/bench_light/1/model.json   XGBoost binary:logistic, 20 trees, max_depth 4,
                                            28 features, trained with a fixed seed
  OUT_DIR/models/bench_light/config.json    {"backend": "xgboost"}

Every value is written with 9 significant digits ("%.9g"), which round-trips a float32
exactly: inferd (strtof) and python (float64, then float32) read the same features.

Idempotent: each artefact has a stamp (rows, seed, format, xgboost version); what is up to
date is not rewritten, so a re-run costs a second.
"""
import argparse
import json
import os
import time

import numpy as np
import xgboost as xgb

N_FEATURES = 28
FMT = "%.9g"
FORMAT_VERSION = 2  # 2: raw_predict-like values (1 was standard normal)

LIGHT_ROWS = 20000
LIGHT_TREES = 20
LIGHT_DEPTH = 4
LIGHT_SEED = 4321
LIGHT_PARAMS = {
    "objective": "binary:logistic",
    "max_depth": LIGHT_DEPTH,
    "eta": 0.3,
    "tree_method": "hist",
    "seed": LIGHT_SEED,
    "nthread": 1,  # deterministic and cheap: 20 small trees
}
LIGHT_CONFIG = {"backend": "xgboost"}
CHUNK_ROWS = 100000


def stamp_ok(path, stamp):
    return os.path.exists(path) and open(path).read() == stamp


def write_stamp(path, stamp):
    with open(path + ".tmp", "w") as f:
        f.write(stamp)
    os.replace(path + ".tmp", path)


def raw_like_rows(rng, n):
    """Rows like raw_predict.c's pool: ((float)(k % 20001) - 10000.0f) / 3333.0f."""
    k = rng.integers(0, 20001, size=(n, N_FEATURES), dtype=np.int32)
    return (k - 10000).astype(np.float32) / np.float32(3333.0)


def gen_records(out, rows, seed):
    csv_path = os.path.join(out, "records.csv")
    jsonl_path = os.path.join(out, "records.jsonl")
    stamp_path = os.path.join(out, ".records.stamp")
    stamp = json.dumps({"rows": rows, "features": N_FEATURES, "seed": seed, "fmt": FMT,
                        "version": FORMAT_VERSION}, sort_keys=True)
    if (stamp_ok(stamp_path, stamp) and os.path.exists(csv_path)
            and os.path.exists(jsonl_path)):
        print(f"gen_records: {csv_path} and {jsonl_path} are up to date ({rows} rows, "
              f"seed {seed})")
        return
    if os.path.exists(stamp_path):
        os.remove(stamp_path)
    t0 = time.monotonic()
    rng = np.random.default_rng(seed)
    row_fmt = ",".join([FMT] * N_FEATURES)
    with open(csv_path + ".tmp", "wb") as fc, open(jsonl_path + ".tmp", "wb") as fj:
        left = rows
        while left > 0:
            n = min(CHUNK_ROWS, left)
            X = raw_like_rows(rng, n)
            np.savetxt(fc, X, fmt=row_fmt)
            np.savetxt(fj, X, fmt="[" + row_fmt + "]")
            left -= n
    os.replace(csv_path + ".tmp", csv_path)
    os.replace(jsonl_path + ".tmp", jsonl_path)
    write_stamp(stamp_path, stamp)
    print(f"gen_records: wrote {rows} records (seed {seed}) to {csv_path} "
          f"({os.path.getsize(csv_path) >> 20} MiB) and {jsonl_path} "
          f"({os.path.getsize(jsonl_path) >> 20} MiB) in {time.monotonic() - t0:.1f}s")


def gen_light_model(out):
    repo = os.path.join(out, "models", "bench_light")
    model = os.path.join(repo, "1", "model.json")
    stamp_path = os.path.join(repo, ".gen.stamp")
    stamp = json.dumps({"rows": LIGHT_ROWS, "trees": LIGHT_TREES, "params": LIGHT_PARAMS,
                        "xgboost": xgb.__version__}, sort_keys=True)
    os.makedirs(os.path.dirname(model), exist_ok=True)
    with open(os.path.join(repo, "config.json"), "w") as f:
        json.dump(LIGHT_CONFIG, f)
        f.write("\n")
    if stamp_ok(stamp_path, stamp) and os.path.exists(model):
        print(f"gen_records: {model} is up to date, not retraining")
        return
    rng = np.random.default_rng(LIGHT_SEED)
    X = rng.standard_normal((LIGHT_ROWS, N_FEATURES), dtype=np.float32)
    logit = (np.sin(2.0 * X[:, 0]) + X[:, 1] * X[:, 2] - 0.5 * X[:, 3] ** 2
             + 0.3 * X[:, 4:14].sum(axis=1) - 0.2 * np.abs(X[:, 14:28]).sum(axis=1) + 2.0
             + rng.standard_normal(LIGHT_ROWS) * 0.5)
    y = (logit > 0).astype(np.float32)
    booster = xgb.train(LIGHT_PARAMS, xgb.DMatrix(X, label=y), num_boost_round=LIGHT_TREES)
    booster.save_model(model + ".tmp.json")
    os.replace(model + ".tmp.json", model)
    write_stamp(stamp_path, stamp)
    print(f"gen_records: trained {model} ({LIGHT_TREES} trees, max_depth {LIGHT_DEPTH}, "
          f"{N_FEATURES} features, seed {LIGHT_SEED})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--rows", type=int, default=1000000)
    ap.add_argument("--seed", type=int, default=20240601)
    a = ap.parse_args()
    if a.rows < 1:
        ap.error("--rows must be at least 1")
    os.makedirs(a.out, exist_ok=True)
    gen_records(a.out, a.rows, a.seed)
    gen_light_model(a.out)


if __name__ == "__main__":
    main()
