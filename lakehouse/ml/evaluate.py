"""Evaluation of a fraud score on the test window: ranking, per-day user precision, per-scenario
recall, calibration, the chosen threshold, and drift (population stability index).

Definitions (``y`` = fraud label known in the snapshot, ``p`` = score):

* ``roc_auc``, ``average_precision``: over test transactions (known compromised cards removed).
* ``precision_at_100_per_day`` (card precision top-k, as in the fraud-detection handbook): each test
  day, a user's score is their highest transaction score that day; rank users and take the top k
  (100), leaving out users already caught earlier in the window (a user in an earlier day's top k
  who had fraud that day: an analyst would have blocked the card). Precision is the number of
  those k users with a fraud transaction that day, over k. The mean over days is reported.
* ``recall_<scenario>``: the share of the scenario's fraud transactions at or above the threshold.
* Calibration: ``brier``, and ``ece`` (expected calibration error over 10 equal-count bins of the
  score, ``sum_b n_b/n * |mean(p_b) - mean(y_b)|``); the bins are the calibration table.
* ``roc_auc_ci_low`` / ``_high`` and ``average_precision_ci_low`` / ``_high``: 95% percentile
  intervals from a Poisson bootstrap of the test transactions (200 resamples, fixed seed; each
  resample weighs every row by a Poisson(1) count, the same metrics on the weighted rows). A test
  window with a handful of frauds gives a wide interval: read the point figures with it.
* ``psi`` (population stability index) of a variable between a reference sample (training window)
  and a current one (latest day): 10 bins at the reference's deciles (a variable with at most 10
  distinct values gets one bin per value); ``sum (a - e) * ln(a / e)`` with shares floored at 1e-4.
  Rule of thumb: < 0.1 stable, 0.1-0.25 some shift, > 0.25 a real shift.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score


def precision_at_k_per_day(test: pd.DataFrame, scores: np.ndarray, k: int = 100) -> tuple[float, list[dict]]:
    """(mean over days, per-day rows) of the per-user daily precision at k (see module doc)."""
    df = pd.DataFrame({"day": test["event_date"].to_numpy(), "user": test["user_id"].to_numpy(),
                       "y": test["is_fraud"].to_numpy(bool), "p": np.asarray(scores)})
    caught: set = set()
    per_day = []
    for day, rows in df.groupby("day", sort=True):
        users = rows.groupby("user").agg(p=("p", "max"), y=("y", "any"))
        users = users[~users.index.isin(caught)]
        top = users.sort_values(["p"], ascending=False, kind="mergesort").head(k)
        hits = int(top["y"].sum())
        caught.update(top.index[top["y"]])
        per_day.append({"day": str(day), "users": len(users), "fraud_users": int(users["y"].sum()),
                        "hits": hits, "precision": hits / k})
    mean = float(np.mean([d["precision"] for d in per_day])) if per_day else float("nan")
    return mean, per_day


def calibration_table(y: np.ndarray, p: np.ndarray, bins: int = 10) -> pd.DataFrame:
    """Equal-count bins of the score: n, mean score, observed fraud rate."""
    order = np.argsort(p, kind="mergesort")
    groups = np.array_split(order, bins)
    rows = [{"bin": i, "n": len(g), "mean_score": float(p[g].mean()), "fraud_rate": float(y[g].mean()),
             "score_min": float(p[g].min()), "score_max": float(p[g].max())}
            for i, g in enumerate(groups) if len(g)]
    return pd.DataFrame(rows)


def _ranking_metrics(y_sorted: np.ndarray, group_end: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """(ROC AUC, average precision) of rows sorted by decreasing score, weighted by ``w``;
    ``group_end`` marks the last row of each run of equal scores (one threshold per distinct score,
    ties count half in the AUC). With unit weights these are scikit-learn's two figures."""
    tp = np.cumsum(w * y_sorted)[group_end]
    fp = np.cumsum(w * ~y_sorted)[group_end]
    pos, neg = tp[-1], fp[-1]
    if pos <= 0 or neg <= 0:
        return float("nan"), float("nan")
    tpr, fpr = np.r_[0.0, tp / pos], np.r_[0.0, fp / neg]
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    ap = float(np.sum(np.diff(np.r_[0.0, tp / pos]) * tp / np.maximum(tp + fp, 1e-300)))
    return auc, ap


def bootstrap_intervals(y: np.ndarray, p: np.ndarray, resamples: int = 200, level: float = 0.95,
                        seed: int = 0) -> dict[str, float]:
    """Percentile intervals of ROC AUC and average precision from a Poisson bootstrap (module doc);
    NaN when the test set lacks fraud or legitimate rows."""
    y, p = np.asarray(y, dtype=bool), np.asarray(p, dtype=float)
    names = ("roc_auc_ci_low", "roc_auc_ci_high", "average_precision_ci_low", "average_precision_ci_high")
    if not 0 < y.sum() < len(y):
        return dict.fromkeys(names, float("nan"))
    order = np.argsort(-p, kind="mergesort")
    y_sorted, p_sorted = y[order], p[order]
    group_end = np.r_[p_sorted[1:] != p_sorted[:-1], True]
    rng = np.random.default_rng(seed)
    draws = np.array([_ranking_metrics(y_sorted, group_end, rng.poisson(1.0, len(y)).astype(float))
                      for _ in range(resamples)])
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    (auc_lo, ap_lo), (auc_hi, ap_hi) = np.nanpercentile(draws, lo, axis=0), np.nanpercentile(draws, hi, axis=0)
    return dict(zip(names, (float(auc_lo), float(auc_hi), float(ap_lo), float(ap_hi))))


def with_interval(metrics: dict, name: str, digits: int = 3) -> str:
    """``0.912 [0.884, 0.936]``: a metric with its bootstrap interval, when there is one."""
    value, lo, hi = (metrics.get(k, float("nan")) for k in (name, f"{name}_ci_low", f"{name}_ci_high"))
    text = f"{value:.{digits}f}"
    return text if np.isnan(lo) or np.isnan(hi) else f"{text} [{lo:.{digits}f}, {hi:.{digits}f}]"


def ranking_summary(metrics: dict, digits: int = 4) -> str:
    """``AUC 0.912 [0.884, 0.936], AP ... (11 frauds in 3146 test rows; 95% bootstrap intervals)``:
    the ranking figures as train and the demo print them, with what they rest on."""
    return (f"AUC {with_interval(metrics, 'roc_auc', digits)}, AP {with_interval(metrics, 'average_precision', digits)} "
            f"({int(metrics.get('n_test_fraud') or 0)} frauds in {int(metrics.get('n_test') or 0)} test rows; "
            "95% bootstrap intervals)")


def at_threshold(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    alert = p >= threshold
    tp = int((alert & y).sum())
    n_alerts = int(alert.sum())
    n_fraud = int(y.sum())
    return {"alerts": n_alerts, "tp": tp,
            "precision": tp / n_alerts if n_alerts else 0.0,
            "recall": tp / n_fraud if n_fraud else 0.0}


def evaluate(test: pd.DataFrame, scores: np.ndarray, threshold: float, k: int = 100) -> tuple[dict, dict]:
    """(metrics, details): flat numeric metrics for MLflow, and tables (per day, calibration,
    per scenario) for the report."""
    y = test["is_fraud"].to_numpy(bool)
    p = np.asarray(scores, dtype=float)
    both = 0 < y.sum() < len(y)
    p_at_k, per_day = precision_at_k_per_day(test, p, k)
    calib = calibration_table(y, p)
    ece = float((calib["n"] / len(p) * (calib["mean_score"] - calib["fraud_rate"]).abs()).sum()) if len(p) else 0.0
    at = at_threshold(y, p, threshold)
    metrics = {
        "n_test": float(len(y)), "n_test_fraud": float(y.sum()), "fraud_rate": float(y.mean()) if len(y) else 0.0,
        "roc_auc": float(roc_auc_score(y, p)) if both else float("nan"),
        "average_precision": float(average_precision_score(y, p)) if both else float("nan"),
        f"precision_at_{k}_per_day": p_at_k,
        "brier": float(brier_score_loss(y, p)) if len(y) else float("nan"), "ece": ece,
        "threshold": float(threshold), "precision_at_threshold": at["precision"],
        "recall_at_threshold": at["recall"], "alerts_at_threshold": float(at["alerts"]),
        **bootstrap_intervals(y, p),
    }
    scenarios = []
    for name in sorted(set(test.loc[test["is_fraud"], "scenario"].dropna())):
        mask = (test["scenario"] == name).to_numpy() & y
        hit = int((p[mask] >= threshold).sum())
        scenarios.append({"scenario": name, "n_fraud": int(mask.sum()), "caught": hit,
                          "recall": hit / int(mask.sum()),
                          "average_precision_vs_legit": _scenario_ap(y, p, mask)})
        metrics[f"recall_{name}"] = hit / int(mask.sum())
        metrics[f"n_fraud_{name}"] = float(mask.sum())
    return metrics, {"per_day": pd.DataFrame(per_day), "calibration": calib, "scenarios": pd.DataFrame(scenarios)}


def _scenario_ap(y: np.ndarray, p: np.ndarray, mask: np.ndarray) -> float:
    """AP of this scenario's fraud against the legitimate transactions (other fraud left out)."""
    keep = mask | ~y
    return float(average_precision_score(mask[keep], p[keep])) if mask.any() and (~y).any() else float("nan")


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10, floor: float = 1e-4) -> float:
    """Population stability index of ``current`` against ``reference`` (see module doc). NaN is a
    category of its own."""
    ref = np.asarray(reference, dtype=float)
    cur = np.asarray(current, dtype=float)
    if len(ref) == 0 or len(cur) == 0:
        return float("nan")
    ref_ok, cur_ok = ref[~np.isnan(ref)], cur[~np.isnan(cur)]
    values = np.unique(ref_ok)
    if len(values) <= bins:
        edges = np.concatenate([[-np.inf], (values[:-1] + values[1:]) / 2, [np.inf]])
    else:
        inner = np.unique(np.quantile(ref_ok, np.linspace(0, 1, bins + 1)[1:-1]))
        edges = np.concatenate([[-np.inf], inner, [np.inf]])
    e = np.append(np.histogram(ref_ok, edges)[0], np.isnan(ref).sum()) / len(ref)
    a = np.append(np.histogram(cur_ok, edges)[0], np.isnan(cur).sum()) / len(cur)
    e, a = np.maximum(e, floor), np.maximum(a, floor)
    return float(np.sum((a - e) * np.log(a / e)))
