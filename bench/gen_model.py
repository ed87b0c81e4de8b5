#!/usr/bin/python3
"""Generate the benchmark's "large model" and its model repository.

    /usr/bin/python3 bench/gen_model.py OUT_DIR

Trains an XGBoost binary:logistic model with 500 trees of max_depth 8 on
synthetic data (28 features, HIGGS-sized rows, fixed seed) and writes:

  OUT_DIR/bench_large/1/model.json          the model
  OUT_DIR/bench_large/config.json           dynamic batching on (max_batch_size 64)
  OUT_DIR/bench_large_nobatch/1/model.json  the same model file
  OUT_DIR/bench_large_nobatch/config.json   dynamic batching off (max_batch_size 1)
  OUT_DIR/row.json                          a v2 infer request body with one row
  OUT_DIR/row_expected.json                 python-xgboost's prediction of that row

Idempotent: if OUT_DIR already holds a model made with the same parameters
(OUT_DIR/.gen_model.stamp), training is skipped and only the small files are
rewritten.
"""
import json
import os
import shutil
import sys

import numpy as np
import xgboost as xgb

N_ROWS = 20000
N_FEATURES = 28
N_TREES = 500
MAX_DEPTH = 8
SEED = 1234
PARAMS = {
    "objective": "binary:logistic",
    "max_depth": MAX_DEPTH,
    "eta": 0.1,
    "tree_method": "hist",
    "seed": SEED,
    "eval_metric": "logloss",
}
STAMP = json.dumps({"rows": N_ROWS, "features": N_FEATURES, "trees": N_TREES,
                    "params": PARAMS, "xgboost": xgb.__version__}, sort_keys=True)

BATCH_CONFIG = {"backend": "xgboost", "max_batch_size": 64, "max_queue_delay_us": 200}
NOBATCH_CONFIG = {"backend": "xgboost", "max_batch_size": 1}


def make_data(rng):
    X = rng.standard_normal((N_ROWS, N_FEATURES)).astype(np.float32)
    # A non-linear target with interactions and noise, so that trees grow to
    # full depth instead of stopping early.
    logit = (np.sin(2.0 * X[:, 0]) + X[:, 1] * X[:, 2] - 0.5 * X[:, 3] ** 2
             + np.tanh(X[:, 4] + X[:, 5]) + 0.3 * X[:, 6:14].sum(axis=1)
             - 0.2 * np.abs(X[:, 14:28]).sum(axis=1) + 2.0)
    logit += rng.standard_normal(N_ROWS) * 0.5
    y = (logit > 0).astype(np.float32)
    return X, y


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.write("\n")
    os.replace(tmp, path)


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: gen_model.py OUT_DIR")
    out = sys.argv[1]
    large = os.path.join(out, "bench_large")
    nobatch = os.path.join(out, "bench_large_nobatch")
    model = os.path.join(large, "1", "model.json")
    model_nb = os.path.join(nobatch, "1", "model.json")
    stamp_path = os.path.join(out, ".gen_model.stamp")
    os.makedirs(os.path.join(large, "1"), exist_ok=True)
    os.makedirs(os.path.join(nobatch, "1"), exist_ok=True)

    rng = np.random.default_rng(SEED)
    X, y = make_data(rng)

    fresh = (os.path.exists(model) and os.path.exists(stamp_path)
             and open(stamp_path).read() == STAMP)
    if fresh:
        print(f"gen_model: {model} is up to date, not retraining")
    else:
        params = dict(PARAMS, nthread=os.cpu_count() or 1)
        booster = xgb.train(params, xgb.DMatrix(X, label=y), num_boost_round=N_TREES)
        booster.save_model(model + ".tmp.json")
        os.replace(model + ".tmp.json", model)
        with open(stamp_path, "w") as f:
            f.write(STAMP)
    shutil.copyfile(model, model_nb)
    write_json(os.path.join(large, "config.json"), BATCH_CONFIG)
    write_json(os.path.join(nobatch, "config.json"), NOBATCH_CONFIG)

    row = [float(v) for v in X[0]]  # float32 values, exact as doubles
    write_json(os.path.join(out, "row.json"),
               {"inputs": [{"name": "input__0", "datatype": "FP32",
                            "shape": [1, N_FEATURES], "data": row}]})

    booster = xgb.Booster(model_file=model)
    booster.set_param({"nthread": 1})
    pred = float(booster.predict(xgb.DMatrix(np.array([row], dtype=np.float32)))[0])
    write_json(os.path.join(out, "row_expected.json"), {"data": [pred]})
    trees = booster.num_boosted_rounds()
    print(f"gen_model: {model} ({os.path.getsize(model) // 1024} KiB, {trees} trees, "
          f"max_depth {MAX_DEPTH}, {N_FEATURES} features); row.json prediction {pred:.9g}")


if __name__ == "__main__":
    main()
