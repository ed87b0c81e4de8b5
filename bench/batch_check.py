#!/usr/bin/python3
"""Checks the batch benchmark's outputs against python3-xgboost.

    /usr/bin/python3 bench/batch_check.py --model MODEL_JSON --csv RECORDS.csv
        --jsonl RECORDS.jsonl --lines N [--first 1000] [--tol 1e-5] OUTPUT...

python3-xgboost predicts the first --first records of RECORDS.csv (after checking that
RECORDS.jsonl's first records are the same numbers); each OUTPUT must have exactly N lines
and its first --first lines must be those predictions within --tol. Prints one line per
OUTPUT ("ok PATH" or "WRONG PATH: why"); exits 1 if any is wrong.
"""
import argparse
import itertools
import json
import sys

import numpy as np
import xgboost as xgb


def count_lines(path):
    n = 0
    last = b"\n"
    with open(path, "rb") as f:
        while True:
            block = f.read(1 << 22)
            if not block:
                break
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")  # a last line without its newline still counts


def first_lines(path, n):
    with open(path) as f:
        return [line.rstrip("\n") for line in itertools.islice(f, n)]


def check_output(path, want, lines, tol):
    got_lines = count_lines(path)
    if got_lines != lines:
        return f"{got_lines} lines, expected {lines}"
    head = first_lines(path, len(want))
    for i, (text, w) in enumerate(zip(head, want)):
        try:
            v = float(text)
        except ValueError:
            return f"line {i + 1}: '{text[:40]}' is not a number"
        d = abs(v - float(w))
        if not d <= tol:  # NaN-safe
            return f"line {i + 1}: {v!r}, python3-xgboost predicts {float(w)!r} (|diff| {d:.3g})"
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--csv", required=True)
    ap.add_argument("--jsonl", required=True)
    ap.add_argument("--lines", type=int, required=True)
    ap.add_argument("--first", type=int, default=1000)
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("outputs", nargs="+")
    a = ap.parse_args()

    X = np.array([[float(v) for v in line.split(",")] for line in first_lines(a.csv, a.first)],
                 dtype=np.float32)
    J = np.array([json.loads(line) for line in first_lines(a.jsonl, a.first)], dtype=np.float32)
    if X.shape != J.shape or not np.array_equal(X, J):
        sys.exit(f"batch_check: the first {a.first} records of {a.csv} and {a.jsonl} differ")
    booster = xgb.Booster(model_file=a.model)
    booster.set_param({"nthread": 1})
    want = booster.predict(xgb.DMatrix(X))

    bad = 0
    for path in a.outputs:
        try:
            why = check_output(path, want, a.lines, a.tol)
        except OSError as e:
            why = str(e)
        if why:
            bad += 1
            print(f"WRONG {path}: {why}", flush=True)
        else:
            print(f"ok {path} ({a.lines} lines, first {len(want)} within {a.tol:g} of "
                  f"python3-xgboost)", flush=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
