"""FastAPI peer for the benchmark: the same prediction as inferd, in Python.

Serves the bench "large model" with python3-xgboost behind the KServe v2
infer endpoint, as a typical Python model server would:

    BENCH_MODEL_PATH=build/bench/bench_large/1/model.json \
    /usr/bin/python3 -m uvicorn --workers 2 --loop uvloop --http httptools \
        --port 8000 --app-dir bench fastapi_app:app

Endpoints:
  GET  /v2/health/ready                    200 once the model is loaded
  POST /v2/models/bench_large/infer        v2 request with one FP32 input
                                           [n, n_features], returns output__0 [n]

It is written to be a fair, reasonably fast baseline: the raw body is parsed
with json (no pydantic validation), predicted with inplace_predict on a
booster with nthread=1 (one process per core via --workers), and the response
serialised by hand.
"""
import json
import os

import numpy as np
import xgboost as xgb
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

MODEL_NAME = os.environ.get("BENCH_MODEL_NAME", "bench_large")
MODEL_PATH = os.environ.get("BENCH_MODEL_PATH")
if not MODEL_PATH:
    raise RuntimeError("set BENCH_MODEL_PATH to the model.json to serve")

booster = xgb.Booster(model_file=MODEL_PATH)
booster.set_param({"nthread": 1})
N_FEATURES = booster.num_features()
# Warm up: the first predict does one-time setup.
booster.inplace_predict(np.zeros((1, N_FEATURES), dtype=np.float32))

app = FastAPI()


def error(status, msg):
    return JSONResponse({"error": msg}, status_code=status)


@app.get("/v2/health/ready")
async def ready():
    return Response(status_code=200)


@app.post("/v2/models/{model_name}/infer")
async def infer(model_name: str, request: Request):
    if model_name != MODEL_NAME:
        return error(404, f"model '{model_name}' not found")
    try:
        body = json.loads(await request.body())
        inp = body["inputs"][0]
        if inp.get("datatype", "FP32") != "FP32":
            return error(400, "datatype must be FP32")
        shape = inp["shape"]
        x = np.asarray(inp["data"], dtype=np.float32).reshape(shape)
        if x.ndim != 2 or x.shape[1] != N_FEATURES:
            return error(400, f"shape must be [n, {N_FEATURES}]")
    except (ValueError, KeyError, IndexError, TypeError) as e:
        return error(400, f"bad request: {e}")
    preds = booster.inplace_predict(x)
    resp = {
        "model_name": MODEL_NAME,
        "outputs": [{"name": "output__0", "datatype": "FP32",
                     "shape": [int(preds.shape[0])],
                     "data": preds.tolist()}],
    }
    if "id" in body:
        resp["id"] = body["id"]
    return Response(json.dumps(resp), media_type="application/json")
