"""Celery peer for the async benchmark: the same single-row prediction as inferd's jobs.

    BENCH_CELERY_URL=redis://127.0.0.1:P/0 BENCH_MODEL_PATH=.../model.json \
    /usr/bin/python3 -m celery --app celery_app worker --concurrency 2 --pool prefork
    (with bench/ on PYTHONPATH; bench/async_run does this)

Redis is both the broker and the result backend. Each worker process loads the model
with python3-xgboost once, when it starts (worker_process_init), with nthread=1, and
predicts one row per task with inplace_predict; the result (a float) goes to the Redis
backend. Settings are Celery's defaults except JSON-only serialisation and the result
expiry. The client (bench/celery_load.py) imports this module too, for the task's
signature only: it never loads the model.
"""
import os

from celery import Celery, signals

URL = os.environ.get("BENCH_CELERY_URL", "redis://127.0.0.1:6379/0")
MODEL_PATH = os.environ.get("BENCH_MODEL_PATH")

app = Celery("bench", broker=URL, backend=URL)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_expires=3600,
    worker_hijack_root_logger=False,
)

_booster = None


def _load():
    global _booster
    if _booster is None:
        import numpy as np
        import xgboost as xgb
        if not MODEL_PATH:
            raise RuntimeError("set BENCH_MODEL_PATH to the model.json to serve")
        b = xgb.Booster(model_file=MODEL_PATH)
        b.set_param({"nthread": 1})
        # the first predict does one-time setup
        b.inplace_predict(np.zeros((1, b.num_features()), dtype=np.float32))
        _booster = b
    return _booster


@signals.worker_process_init.connect
def _load_in_child(**_):
    _load()


@app.task(name="bench.predict")
def predict(row):
    import numpy as np
    return float(_load().inplace_predict(np.asarray([row], dtype=np.float32))[0])
