#!/usr/bin/python3
"""Checks the table benchmark's outputs against python3-xgboost.

    /usr/bin/python3 bench/table_check.py --model MODEL_JSON --dsn postgresql://USER@HOST:PORT/DB
        --table SCHEMA.TABLE --records RECORDS.csv [--first 1000] [--tol 1e-5] OUTPUT...

python3-xgboost predicts the source table's first --first rows by id (after checking that
they are the first lines of RECORDS.csv, the file the table was loaded from, id = line
number). Each OUTPUT must hold exactly one row per source row (the source's count(*)) and
its first --first rows by id must be those ids with those predictions within --tol:

  table:SCHEMA.TABLE   a table with `id` and `prediction` columns
  csv:PATH             a CSV file, an `id,prediction` header, then one `id,prediction` per row
  lines:PATH           one prediction per line, line i for id i (the file baseline's output)

Prints one line per OUTPUT ("ok ..." or "WRONG OUTPUT: why"); exits 1 if any is wrong.
"""
import argparse
import itertools
import sys

import numpy as np
import psycopg2
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


def compare(got, ids, want, tol):
    """got: [(id, prediction)] in order; None if they match ids/want, else why not."""
    if len(got) != len(ids):
        return f"{len(got)} rows among the first, expected {len(ids)}"
    for i, ((gid, v), wid, w) in enumerate(zip(got, ids, want)):
        if gid != wid:
            return f"row {i + 1} by id: id {gid}, expected {wid}"
        d = abs(v - float(w))
        if not d <= tol:  # NaN-safe
            return (f"id {wid}: {v!r}, python3-xgboost predicts {float(w)!r} (|diff| {d:.3g})")
    return None


def check_table(cur, name, rows, ids, want, tol):
    cur.execute(f"SELECT count(*) FROM {name}")
    n = cur.fetchone()[0]
    if n != rows:
        return f"{n} rows, expected {rows}"
    cur.execute(f"SELECT id, prediction FROM {name} ORDER BY id LIMIT %s", (len(ids),))
    return compare([(int(i), float(p)) for i, p in cur.fetchall()], ids, want, tol)


def check_csv(path, rows, ids, want, tol):
    n = count_lines(path) - 1
    if n != rows:
        return f"{n} lines after the header, expected {rows}"
    head = first_lines(path, len(ids) + 1)
    if head[0] != "id,prediction":
        return f"header '{head[0][:40]}', expected 'id,prediction'"
    got = []
    for k, text in enumerate(head[1:]):
        try:
            i, p = text.split(",")
            got.append((int(i), float(p)))
        except ValueError:
            return f"line {k + 2}: '{text[:40]}' is not id,prediction"
    return compare(got, ids, want, tol)


def check_lines(path, rows, ids, want, tol):
    n = count_lines(path)
    if n != rows:
        return f"{n} lines, expected {rows}"
    got = []
    for k, text in enumerate(first_lines(path, len(ids))):
        try:
            got.append((k + 1, float(text)))
        except ValueError:
            return f"line {k + 1}: '{text[:40]}' is not a number"
    return compare(got, ids, want, tol)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--table", required=True)
    ap.add_argument("--records", required=True)
    ap.add_argument("--first", type=int, default=1000)
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("outputs", nargs="+")
    a = ap.parse_args()

    conn = psycopg2.connect(a.dsn)
    conn.autocommit = True
    cur = conn.cursor()
    cur.execute(f"SELECT count(*) FROM {a.table}")
    rows = cur.fetchone()[0]
    cur.execute(f"SELECT * FROM {a.table} ORDER BY id LIMIT %s", (a.first,))
    src = cur.fetchall()
    ids = [int(r[0]) for r in src]
    X = np.array([r[1:] for r in src], dtype=np.float32)
    F = np.array([[float(v) for v in line.split(",")] for line in first_lines(a.records, a.first)],
                 dtype=np.float32)
    if ids != list(range(1, len(ids) + 1)) or X.shape != F.shape or not np.array_equal(X, F):
        sys.exit(f"table_check: the first {a.first} rows of {a.table} by id are not the first "
                 f"lines of {a.records}")
    booster = xgb.Booster(model_file=a.model)
    booster.set_param({"nthread": 1})
    want = booster.predict(xgb.DMatrix(X))

    bad = 0
    for out in a.outputs:
        kind, _, where = out.partition(":")
        try:
            if kind == "table":
                why = check_table(cur, where, rows, ids, want, a.tol)
            elif kind == "csv":
                why = check_csv(where, rows, ids, want, a.tol)
            elif kind == "lines":
                why = check_lines(where, rows, ids, want, a.tol)
            else:
                why = f"unknown output kind '{kind}' (table:, csv: or lines:)"
        except (OSError, psycopg2.Error) as e:
            why = str(e).strip()
        if why:
            bad += 1
            print(f"WRONG {out}: {why}", flush=True)
        else:
            print(f"ok {out} ({rows} rows, first {len(want)} by id within {a.tol:g} of "
                  f"python3-xgboost)", flush=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
