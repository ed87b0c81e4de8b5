#!/usr/bin/python3
"""Train the bundled breast_cancer model (XGBoost binary classifier).

Run with Debian's interpreter (it has python3-xgboost / python3-sklearn):

    /usr/bin/python3 models/breast_cancer/train.py

Writes, next to this script:
  1/model.json          the booster (XGBoost JSON format, loaded by inferd)
  sample_request.json   a KServe v2 infer request with 2 rows of the data set
  sample_v1.json        the same 2 rows as a v1 {"instances": ...} request
and prints the expected predictions (probability of class 1) of those rows.
Training is deterministic (fixed seed, single thread), so re-running it
reproduces the same model.
"""
import json
import os

import numpy as np
import xgboost as xgb
from sklearn.datasets import load_breast_cancer

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 42
SAMPLE_ROWS = [0, 19]  # row 0 is malignant (label 0), row 19 benign (label 1)


def main():
    data = load_breast_cancer()
    X = data.data.astype(np.float32)
    y = data.target
    assert X.shape[1] == 30, X.shape

    dtrain = xgb.DMatrix(X, label=y)
    params = {
        "objective": "binary:logistic",
        "max_depth": 4,
        "eta": 0.3,
        "eval_metric": "logloss",
        "seed": SEED,
        "nthread": 1,
    }
    booster = xgb.train(params, dtrain, num_boost_round=50)

    os.makedirs(os.path.join(HERE, "1"), exist_ok=True)
    model_path = os.path.join(HERE, "1", "model.json")
    booster.save_model(model_path)

    # The data set's own (short) decimal values; parsed as FP32 they give
    # exactly the float32 rows the model was trained on.
    rows_list = [[float(v) for v in data.data[r]] for r in SAMPLE_ROWS]
    assert (np.array(rows_list, dtype=np.float32) == X[SAMPLE_ROWS]).all()

    req = {"inputs": [{"name": "input__0", "datatype": "FP32",
                       "shape": [len(rows_list), 30], "data": rows_list}]}
    with open(os.path.join(HERE, "sample_request.json"), "w") as f:
        json.dump(req, f)
        f.write("\n")
    with open(os.path.join(HERE, "sample_v1.json"), "w") as f:
        json.dump({"instances": rows_list}, f)
        f.write("\n")

    # Predict from a freshly loaded copy, exactly as a server would.
    loaded = xgb.Booster(model_file=model_path)
    loaded.set_param({"nthread": 1})
    preds = loaded.predict(xgb.DMatrix(np.array(rows_list, dtype=np.float32)))
    acc = float(((loaded.predict(dtrain) > 0.5) == y).mean())

    print(f"model: {model_path} ({os.path.getsize(model_path)} bytes), "
          f"50 trees, max_depth 4, train accuracy {acc:.4f}")
    for i, (r, p) in enumerate(zip(SAMPLE_ROWS, preds)):
        print(f"row {i} (data set row {r}, label {y[r]}): expected prediction {p:.9g}")
    print("expected outputs: " + json.dumps([float(p) for p in preds]))


if __name__ == "__main__":
    main()
