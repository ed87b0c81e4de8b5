#!/usr/bin/python3
"""The batch benchmark's peer: the same job as `inferd batch`, in pandas + python3-xgboost.

    /usr/bin/python3 bench/pandas_batch.py --model MODEL_JSON --input CSV --output OUT
        [--nthread N] [--chunksize 100000]

What a competent data scientist writes: pandas.read_csv in chunks (no header, float32
columns), booster.inplace_predict on each chunk (nthread N), and the predictions appended to
OUT as CSV lines in the same text form as inferd's ("%.9g"), one per record, in input order.

The timer covers what `inferd batch`'s own does: loading the model, then reading, predicting
and writing every record (not the interpreter's start-up or its imports). Prints one line:

  PANDAS_RESULT records=N seconds=S records_per_s=R load_s=L parse_s=P predict_s=Q write_s=W
"""
import argparse
import os
import time

t_import = time.monotonic()
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import xgboost as xgb  # noqa: E402

t_import = time.monotonic() - t_import


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--nthread", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--chunksize", type=int, default=100000)
    a = ap.parse_args()

    t0 = time.monotonic()
    booster = xgb.Booster(model_file=a.model)
    booster.set_param({"nthread": a.nthread})
    n_features = booster.num_features()
    load_s = time.monotonic() - t0

    parse_s = predict_s = write_s = 0.0
    records = 0
    reader = pd.read_csv(a.input, header=None, dtype=np.float32, chunksize=a.chunksize)
    with open(a.output, "w") as out:
        while True:
            t = time.monotonic()
            try:
                df = next(reader)
            except StopIteration:
                parse_s += time.monotonic() - t
                break
            if df.shape[1] != n_features:
                raise SystemExit(f"pandas_batch: {a.input}: {df.shape[1]} columns, the model "
                                 f"takes {n_features}")
            parse_s += time.monotonic() - t

            t = time.monotonic()
            pred = booster.inplace_predict(df, missing=np.nan)
            predict_s += time.monotonic() - t

            t = time.monotonic()
            pd.Series(pred).to_csv(out, header=False, index=False, float_format="%.9g")
            write_s += time.monotonic() - t
            records += len(df)
    reader.close()
    seconds = time.monotonic() - t0
    rate = records / seconds if seconds > 0 else 0.0
    print(f"PANDAS_RESULT records={records} seconds={seconds:.3f} records_per_s={rate:.0f} "
          f"load_s={load_s:.3f} parse_s={parse_s:.3f} predict_s={predict_s:.3f} "
          f"write_s={write_s:.3f} import_s={t_import:.3f} nthread={a.nthread} "
          f"chunksize={a.chunksize}", flush=True)


if __name__ == "__main__":
    main()
