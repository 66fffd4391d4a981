"""Scoring: gold transaction features + a fitted model -> ``risk_scores`` rows. Pure (no I/O).

Each row gets the model's probability of fraud (``score``), the decision at the model's threshold
(``is_alert = score >= threshold``) and its top three reasons.

Top reasons (feature contributions, "replace with the training median"): for each feature ``f``,
``contribution_f = score(x) - score(x with f set to its training-window median)``: how much this
transaction's value of ``f`` moved the score away from a typical value. Positive raises the risk.
The three largest by absolute value (ignoring exact zeros) are kept, as a JSON list of
``{"feature", "contribution"}``. It is model-agnostic and exact for the model used (no surrogate),
costs one batched prediction of ``n_features`` perturbed copies, and, as any one-at-a-time method,
does not split the effect of interacting features.

The model travels to the executors as a broadcast of ``(model, reference)``; ``reference`` holds the
feature list, the medians and the threshold (``scoring/reference.json`` of the training run).
"""

from __future__ import annotations

import json
from datetime import datetime

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import (BooleanType, DateType, DoubleType, StringType, StructField, StructType,
                               TimestampType)

#: Columns of the gold ``risk_scores`` table, in order (``scored_at`` last).
RISK_SCORES_SCHEMA = StructType([
    StructField("event_id", StringType(), False),
    StructField("user_id", StringType(), True),
    StructField("merchant_id", StringType(), True),
    StructField("country", StringType(), True),
    StructField("event_time", TimestampType(), True),
    StructField("event_date", DateType(), True),
    StructField("amount_base", DoubleType(), True),
    StructField("score", DoubleType(), True),
    StructField("threshold", DoubleType(), True),
    StructField("is_alert", BooleanType(), True),
    StructField("model_name", StringType(), True),
    StructField("model_version", StringType(), True),
    StructField("top_reasons", StringType(), True),
    StructField("scored_at", TimestampType(), True),
])
_PASS = ("event_id", "user_id", "merchant_id", "country", "event_time", "event_date", "amount_base")
_UDF_SCHEMA = StructType([f for f in RISK_SCORES_SCHEMA.fields if f.name != "scored_at"])
TOP_REASONS = 3
#: Rows per batched prediction (each row becomes 1 + n_features rows of the perturbed matrix).
CHUNK_ROWS = 2_000


def explain(model, x: pd.DataFrame, medians: np.ndarray, k: int = TOP_REASONS) -> tuple[np.ndarray, list[str]]:
    """(scores, top-reason JSON strings) for ``x`` (float64 features in model order)."""
    n, m = x.shape
    if n == 0:
        return np.zeros(0), []
    base = x.to_numpy(dtype=float)
    medians = np.asarray([np.nan if v is None else v for v in medians], dtype=float)
    stack = np.repeat(base[None, :, :], m + 1, axis=0)         # copy 0 = as is, copy j+1 = f_j at median
    idx = np.arange(m)
    stack[idx + 1, :, idx] = medians[:, None]
    probs = model.predict_proba(pd.DataFrame(stack.reshape(-1, m), columns=x.columns))[:, 1].reshape(m + 1, n)
    scores = probs[0]
    contrib = (scores[None, :] - probs[1:]).T                  # n x m
    names = list(x.columns)
    order = np.argsort(-np.abs(contrib), axis=1, kind="mergesort")[:, :k]
    reasons = []
    for i in range(n):
        top = [{"feature": names[j], "contribution": round(float(contrib[i, j]), 6)}
               for j in order[i] if contrib[i, j] != 0.0]
        reasons.append(json.dumps(top))
    return scores, reasons


def score_pandas(pdf: pd.DataFrame, model, reference: dict, model_name: str, model_version: str) -> pd.DataFrame:
    """risk_scores rows (without scored_at) for a pandas frame of gold feature rows."""
    from threadpoolctl import threadpool_limits

    x = pdf[list(reference["features"])].astype("float64")
    scores, reasons = [], []
    with threadpool_limits(1):  # Spark already runs one Python worker per core
        for lo in range(0, len(x), CHUNK_ROWS):
            s, r = explain(model, x.iloc[lo:lo + CHUNK_ROWS], reference["medians"])
            scores.append(s)
            reasons.extend(r)
    score = np.concatenate(scores) if scores else np.zeros(0)
    t = float(reference["threshold"])
    out = pdf[list(_PASS)].copy()
    out["amount_base"] = out["amount_base"].astype("float64")
    out["score"] = score
    out["threshold"] = t
    out["is_alert"] = score >= t
    out["model_name"] = model_name
    out["model_version"] = str(model_version)
    out["top_reasons"] = reasons
    return out


def score_features(features: DataFrame, model_bc, model_name: str, model_version: str,
                   scored_at: datetime) -> DataFrame:
    """Score gold feature rows on the executors (mapInPandas). ``model_bc`` is a broadcast of
    ``(fitted model, reference dict)``; ``scored_at`` is fixed by the caller so that a recomputed
    partition gives identical rows."""
    cols = list(dict.fromkeys([*_PASS, *model_bc.value[1]["features"]]))

    def run(batches):
        model, reference = model_bc.value
        for pdf in batches:
            yield score_pandas(pdf, model, reference, model_name, model_version)

    return (features.select(*cols).mapInPandas(run, _UDF_SCHEMA)
            .withColumn("scored_at", F.lit(scored_at).cast("timestamp")))
