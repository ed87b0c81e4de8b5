#!/usr/bin/python3
"""The table benchmark's peer: the same job as `inferd batch` from a PostgreSQL table, in
pandas + python3-xgboost.

    /usr/bin/python3 bench/pandas_table.py --model MODEL_JSON --dsn postgresql://USER@HOST:PORT/DB
        --table SCHEMA.TABLE (--output-table SCHEMA.TABLE | --output-csv PATH)
        [--nthread N] [--chunksize 100000]

What a data scientist writes: pandas.read_sql("SELECT * FROM TABLE ORDER BY id") in chunks of
--chunksize over SQLAlchemy + psycopg2, booster.inplace_predict on each chunk's feature
columns (float32, nthread N), and id + prediction written back:
  --output-table: a table created for the run (id bigint PRIMARY KEY, prediction double
                  precision; dropped first if it exists), each chunk sent with psycopg2's
                  copy_expert(COPY ... FROM STDIN (FORMAT csv)) from a CSV buffer, one commit
                  at the end (readers see all rows or none, as with inferd);
  --output-csv:   a CSV file with an `id,prediction` header, as inferd writes one.
Predictions are written as "%.9g", as inferd does. The source's first column is the key
(`id`), every other column a feature.

The timer covers what `inferd batch`'s own does: loading the model, connecting, then reading,
predicting and writing every row and committing (not the interpreter's start-up or its
imports). Prints one line:

  PANDAS_RESULT records=N seconds=S records_per_s=R load_s=L read_s=P predict_s=Q write_s=W
      commit_s=C
"""
import argparse
import io
import os
import time

t_import = time.monotonic()
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import psycopg2  # noqa: E402
import sqlalchemy  # noqa: E402
import xgboost as xgb  # noqa: E402

t_import = time.monotonic() - t_import


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--dsn", required=True, help="postgresql://USER@HOST:PORT/DB")
    ap.add_argument("--table", required=True)
    out = ap.add_mutually_exclusive_group(required=True)
    out.add_argument("--output-table")
    out.add_argument("--output-csv")
    ap.add_argument("--nthread", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--chunksize", type=int, default=100000)
    a = ap.parse_args()

    t0 = time.monotonic()
    booster = xgb.Booster(model_file=a.model)
    booster.set_param({"nthread": a.nthread})
    n_features = booster.num_features()
    engine = sqlalchemy.create_engine(a.dsn.replace("postgresql://", "postgresql+psycopg2://", 1))
    sink = cur = csv_out = None
    if a.output_table:
        sink = psycopg2.connect(a.dsn)
        cur = sink.cursor()
        cur.execute(f"DROP TABLE IF EXISTS {a.output_table}; CREATE TABLE {a.output_table} "
                    "(id bigint PRIMARY KEY, prediction double precision)")
    else:
        csv_out = open(a.output_csv, "w")
        csv_out.write("id,prediction\n")
    load_s = time.monotonic() - t0

    read_s = predict_s = write_s = commit_s = 0.0
    records = 0
    with engine.connect() as conn:
        chunks = pd.read_sql(f"SELECT * FROM {a.table} ORDER BY id", conn, chunksize=a.chunksize)
        while True:
            t = time.monotonic()
            try:
                df = next(chunks)
            except StopIteration:
                read_s += time.monotonic() - t
                break
            if df.shape[1] - 1 != n_features:
                raise SystemExit(f"pandas_table: {a.table}: {df.shape[1] - 1} feature columns, "
                                 f"the model takes {n_features}")
            X = df.iloc[:, 1:].to_numpy(dtype=np.float32)
            read_s += time.monotonic() - t

            t = time.monotonic()
            pred = booster.inplace_predict(X, missing=np.nan)
            predict_s += time.monotonic() - t

            t = time.monotonic()
            scores = pd.DataFrame({"id": df["id"], "prediction": pred})
            if cur is not None:
                buf = io.StringIO()
                scores.to_csv(buf, header=False, index=False, float_format="%.9g")
                buf.seek(0)
                cur.copy_expert(f"COPY {a.output_table} (id, prediction) FROM STDIN (FORMAT csv)",
                                buf)
            else:
                scores.to_csv(csv_out, header=False, index=False, float_format="%.9g")
            write_s += time.monotonic() - t
            records += len(df)
    t = time.monotonic()
    if sink is not None:
        sink.commit()
        sink.close()
    else:
        csv_out.close()
    commit_s = time.monotonic() - t
    engine.dispose()
    seconds = time.monotonic() - t0
    rate = records / seconds if seconds > 0 else 0.0
    print(f"PANDAS_RESULT records={records} seconds={seconds:.3f} records_per_s={rate:.0f} "
          f"load_s={load_s:.3f} read_s={read_s:.3f} predict_s={predict_s:.3f} "
          f"write_s={write_s:.3f} commit_s={commit_s:.3f} import_s={t_import:.3f} "
          f"nthread={a.nthread} chunksize={a.chunksize}", flush=True)


if __name__ == "__main__":
    main()
