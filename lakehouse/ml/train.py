"""The nightly training job: pinned training set -> model and baseline -> evaluation, threshold report
and drift -> MLflow run -> registered model version -> champion gate.

Everything a run decides is logged: the Delta versions it read and the split (params), the content
hashes of the train and test frames, the metrics of the model and of the logistic baseline, the
threshold report files, the PSI drift table, the model with its signature and input example, and
the promotion decision with its reason.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from pyspark.sql import SparkSession

from lakehouse.config import Settings
from lakehouse.ml import dataset, evaluate, model as model_mod, registry, threshold as thr
from lakehouse.transforms.features import FEATURE_COLUMNS

#: Variables whose drift (PSI, training window vs newest day) is logged, besides the score.
DRIFT_FEATURES = (
    "amount_base", "user_tx_count_1h", "user_tx_count_24h", "user_amount_sum_24h", "user_amount_ratio_30d",
    "seconds_since_prev_user_tx", "is_first_user_merchant", "is_unusual_country", "is_night",
    "merchant_tx_count_24h", "merchant_fraud_rate_7d", "country_fraud_rate_7d",
)


@dataclass(frozen=True)
class TrainConfig:
    split: dataset.SplitConfig = field(default_factory=dataset.SplitConfig)
    policy: thr.ThresholdPolicy = field(default_factory=thr.ThresholdPolicy)
    model: str = "hgb"
    #: Overrides of the classifier's hyper-parameters (see lakehouse.ml.model).
    model_params: dict | None = None
    #: Also fit the logistic-regression baseline and log it beside the model (in a child run).
    baseline: bool = True
    seed: int = 0
    top_k: int = 100
    model_name: str = registry.MODEL_NAME


@dataclass
class TrainResult:
    run_id: str
    model_name: str
    model_version: str
    promoted: bool
    reason: str
    threshold: float
    metrics: dict
    baseline_metrics: dict | None
    champion_average_precision: float | None
    snapshot: dict
    windows: dict
    train_hash: str
    test_hash: str
    drift: dict
    seconds: dict

    def summary(self) -> dict:
        keys = ("roc_auc", "roc_auc_ci_low", "roc_auc_ci_high", "average_precision", "average_precision_ci_low",
                "average_precision_ci_high", "precision_at_100_per_day", "precision_at_threshold",
                "recall_at_threshold", "fraud_rate", "n_test", "n_test_fraud")
        return {
            "run_id": self.run_id, "model": f"{self.model_name} v{self.model_version}",
            "promoted": self.promoted, "reason": self.reason, "threshold": round(self.threshold, 6),
            **{k: round(self.metrics[k], 4) for k in keys if k in self.metrics},
            "baseline_average_precision": (round(self.baseline_metrics["average_precision"], 4)
                                           if self.baseline_metrics else None),
            "recall_by_scenario": {k.removeprefix("recall_"): round(v, 3) for k, v in self.metrics.items()
                                   if k.startswith("recall_") and k != "recall_at_threshold"},
            "snapshot": self.snapshot, "windows": self.windows, "seconds": self.seconds,
        }


def _say(progress: Callable[[str], None] | None, text: str) -> None:
    if progress:
        progress(text)


def drift_table(ts: dataset.TrainingSet, train_scores: np.ndarray, latest_scores: np.ndarray) -> pd.DataFrame:
    rows = [{"variable": "score", "psi": evaluate.psi(train_scores, latest_scores)}]
    for col in DRIFT_FEATURES:
        if col in ts.train.columns:
            rows.append({"variable": col, "psi": evaluate.psi(ts.train[col].astype(float).to_numpy(),
                                                              ts.latest[col].astype(float).to_numpy())})
    return pd.DataFrame(rows)


def train(spark: SparkSession, settings: Settings, cfg: TrainConfig = TrainConfig(),
          as_of_version: tuple[int, int | None] | None = None, as_of_timestamp: datetime | None = None,
          progress: Callable[[str], None] | None = None) -> TrainResult:
    """Train, evaluate, log, register and gate one model (see module doc)."""
    import mlflow
    import mlflow.sklearn
    import sklearn
    from mlflow.models import infer_signature

    seconds: dict[str, float] = {}
    t0 = time.time()
    snapshot = dataset.resolve_snapshot(spark, settings, as_of_version, as_of_timestamp)
    _say(progress, f"snapshot: gold_transaction_features v{snapshot.features_version}, "
                   f"silver_labels v{snapshot.labels_version}")
    ts = dataset.build(spark, settings, cfg.split, snapshot)
    seconds["dataset"] = round(time.time() - t0, 2)
    w = ts.windows
    _say(progress, f"train {w.train_start}..{w.train_end}, test {w.test_start}..{w.test_end} "
                   f"(labels known at {w.cutoff:%Y-%m-%d %H:%M}Z): {ts.summary()}")
    if ts.train["is_fraud"].sum() < 2 or ts.test["is_fraud"].sum() < 1:
        raise dataset.DatasetError(f"too few fraud labels to train and evaluate: {ts.summary()}")

    t0 = time.time()
    fitted = model_mod.fit(cfg.model, ts.train, cfg.model_params, cfg.seed)
    seconds["fit"] = round(time.time() - t0, 2)
    p_test = model_mod.predict(fitted, ts.test)
    report = thr.choose(ts.test, p_test, cfg.policy)
    metrics, details = evaluate.evaluate(ts.test, p_test, report.chosen_threshold, cfg.top_k)
    _say(progress, f"{cfg.model}: fit {seconds['fit']}s, {evaluate.ranking_summary(metrics)}, "
                   f"threshold {report.chosen_threshold:.4f}")

    baseline = None
    if cfg.baseline and cfg.model != "logreg":
        t0 = time.time()
        base_model = model_mod.fit("logreg", ts.train, None, cfg.seed)
        seconds["fit_baseline"] = round(time.time() - t0, 2)
        p_base = model_mod.predict(base_model, ts.test)
        base_t = thr.choose(ts.test, p_base, cfg.policy).chosen_threshold
        baseline = evaluate.evaluate(ts.test, p_base, base_t, cfg.top_k)[0]
        _say(progress, f"logreg baseline: AP {baseline['average_precision']:.4f}")

    p_train = model_mod.predict(fitted, ts.train)
    p_latest = model_mod.predict(fitted, ts.latest) if len(ts.latest) else np.zeros(0)
    drift = drift_table(ts, p_train, p_latest)

    client = registry.connect(settings)
    exp_id = registry.ensure_experiment(client, settings)
    t0 = time.time()
    params = {
        **snapshot.as_params(), **w.as_params(),
        "train_days": cfg.split.train_days, "gap_days": cfg.split.gap_days, "test_days": cfg.split.test_days,
        "maturity_days": cfg.split.maturity_days,
        "anchor_date_given": str(cfg.split.anchor_date) if cfg.split.anchor_date else "none",
        "model_kind": cfg.model, "model_params": json.dumps(cfg.model_params or {}, sort_keys=True),
        "seed": cfg.seed, "alert_budget": cfg.policy.alert_budget,
        "alerts_per_day": cfg.policy.alerts_per_day or "none", "review_cost": cfg.policy.review_cost,
        "threshold_policy": cfg.policy.policy, "n_features": len(FEATURE_COLUMNS),
        "train_hash": ts.train_hash, "test_hash": ts.test_hash,
    }
    with mlflow.start_run(experiment_id=exp_id, run_name=f"{cfg.model}-{w.test_end}") as run:
        mlflow.log_params(params)
        mlflow.log_metrics({k: v for k, v in metrics.items() if np.isfinite(v)})
        mlflow.log_metrics({"budget_threshold": report.budget_threshold, "cost_threshold": report.cost_threshold,
                            **{f"n_{k}": float(v) for k, v in ts.summary().items() if k.startswith("n_")}})
        mlflow.log_metrics({f"psi_{r.variable}": r.psi for r in drift.itertuples() if np.isfinite(r.psi)})
        if baseline:
            mlflow.log_metrics({f"baseline_{k}": v for k, v in baseline.items() if np.isfinite(v)})
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            thr.write_report(folder / "threshold_report", ts.test, p_test, report, metrics, details,
                             title=f"Threshold report: {cfg.model}, test {w.test_start}..{w.test_end}")
            mlflow.log_artifacts(str(folder / "threshold_report"), "threshold_report")
            (folder / "evaluation").mkdir()
            for name, table in details.items():
                table.to_csv(folder / "evaluation" / f"{name}.csv", index=False)
            drift.to_csv(folder / "evaluation" / "drift_psi.csv", index=False)
            mlflow.log_artifacts(str(folder / "evaluation"), "evaluation")
            reference = {
                "features": list(FEATURE_COLUMNS),
                "medians": [None if np.isnan(v) else float(v)
                            for v in np.nanmedian(model_mod.to_matrix(ts.train).to_numpy(), axis=0)],
                "threshold": report.chosen_threshold, "threshold_policy": cfg.policy.policy,
                "model_kind": cfg.model, "train_start": str(w.train_start), "test_end": str(w.test_end),
            }
            (folder / "reference.json").write_text(json.dumps(reference, indent=1))
            mlflow.log_artifact(str(folder / "reference.json"), "scoring")
        example = model_mod.to_matrix(ts.train.head(5))
        info = mlflow.sklearn.log_model(
            fitted, name="model", signature=infer_signature(example, model_mod.predict(fitted, ts.train.head(5))),
            input_example=example, registered_model_name=cfg.model_name, pyfunc_predict_fn="predict_proba",
            pip_requirements=[f"scikit-learn=={sklearn.__version__}", f"pandas=={pd.__version__}",
                              f"numpy=={np.__version__}"],
            serialization_format="cloudpickle",
        )
        version = str(info.registered_model_version)
        if baseline:
            with mlflow.start_run(experiment_id=exp_id, run_name=f"logreg-baseline-{w.test_end}", nested=True):
                mlflow.log_params({**snapshot.as_params(), "model_kind": "logreg", "role": "baseline",
                                   "train_hash": ts.train_hash, "test_hash": ts.test_hash})
                mlflow.log_metrics({k: v for k, v in baseline.items() if np.isfinite(v)})

        # The champion gate: score the current champion on this run's test window.
        champ = registry.champion_version(client, cfg.model_name)
        champion_ap = None
        label = "champion"
        if champ is not None and str(champ.version) != version:
            label = f"champion v{champ.version}"
            try:
                champ_model = registry.load_model(cfg.model_name, champ.version)
                champion_ap = evaluate.evaluate(ts.test, model_mod.predict(champ_model, ts.test),
                                                report.chosen_threshold, cfg.top_k)[0]["average_precision"]
            except Exception as exc:  # an unloadable champion cannot defend its title
                champion_ap = float("nan")
                label = f"champion v{champ.version} (not loadable: {str(exc)[:200]})"
        promoted, reason = registry.decide(metrics["average_precision"], champion_ap, label)
        if promoted:
            client.set_registered_model_alias(cfg.model_name, registry.CHAMPION, version)
        decision = {"promotion_decision": "promoted" if promoted else "rejected", "promotion_reason": reason,
                    "previous_champion": champ.version if champ is not None else "none",
                    "model_version": version}
        mlflow.set_tags(decision)
        if champion_ap is not None and np.isfinite(champion_ap):
            mlflow.log_metric("champion_average_precision", champion_ap)
        for key, value in {**decision, "threshold": f"{report.chosen_threshold:.8g}",
                           "average_precision": f"{metrics['average_precision']:.6f}",
                           "test_window": f"{w.test_start}..{w.test_end}", "train_hash": ts.train_hash}.items():
            client.set_model_version_tag(cfg.model_name, version, key, str(value))
        seconds["mlflow"] = round(time.time() - t0, 2)
        _say(progress, f"registered {cfg.model_name} v{version}: {decision['promotion_decision']} ({reason})")
        run_id = run.info.run_id

    return TrainResult(
        run_id=run_id, model_name=cfg.model_name, model_version=version, promoted=promoted, reason=reason,
        threshold=report.chosen_threshold, metrics=metrics, baseline_metrics=baseline,
        champion_average_precision=champion_ap, snapshot=asdict(snapshot), windows=w.as_params(),
        train_hash=ts.train_hash, test_hash=ts.test_hash,
        drift={r.variable: round(r.psi, 4) for r in drift.itertuples()}, seconds=seconds,
    )
