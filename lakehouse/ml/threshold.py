"""The threshold report: choose the alert threshold from an alert budget and from a cost matrix, and
show the trade-off (candidate table, PR curve, score distributions, calibration).

Rules (a transaction is alerted when ``score >= threshold``):

* **Alert budget**: the analysts can review a share of the transactions (``alert_budget``, e.g.
  0.005 = the top 0.5%) or ``alerts_per_day``; the threshold is the score of the last transaction
  inside the budget on the test window (ties at the threshold are all alerted).
* **Cost matrix**: a missed fraud costs its amount (``amount_base``, USD); every alert costs a fixed
  review cost (``review_cost``, USD); a correct pass costs nothing. The cost-optimal threshold
  minimises ``sum(amount of missed fraud) + review_cost * alerts`` over every distinct score.
* Both are computed on the test window, which the model never saw; the labels are used by the cost
  rule only (so its threshold is an in-sample optimum there, reported for comparison). The
  **chosen** threshold (the one scoring uses) is the budget one unless ``policy="cost"``.

Files written: ``thresholds.csv`` (one row per candidate), ``threshold_report.md``,
``pr_curve.png``, ``score_distribution.png``, ``calibration.png``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

TOP_SHARES = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05)
PROBABILITIES = (0.1, 0.25, 0.5, 0.75, 0.9)


@dataclass(frozen=True)
class ThresholdPolicy:
    alert_budget: float = 0.005
    alerts_per_day: int | None = None
    review_cost: float = 5.0
    policy: str = "budget"   # which threshold scoring uses: "budget" or "cost"

    def __post_init__(self) -> None:
        if not 0 < self.alert_budget < 1:
            raise ValueError(f"alert budget must be a share in (0, 1), got {self.alert_budget}")
        if self.policy not in ("budget", "cost"):
            raise ValueError(f"threshold policy must be 'budget' or 'cost', got {self.policy!r}")
        if self.review_cost < 0:
            raise ValueError("review cost cannot be negative")


def top_n_threshold(p: np.ndarray, n: int) -> float:
    """The score of the n-th highest transaction (n >= 1): alerting ``p >= it`` alerts at least n."""
    if len(p) == 0:
        return 1.0
    n = int(min(max(n, 1), len(p)))
    return float(np.sort(p)[::-1][n - 1])


def budget_threshold(p: np.ndarray, n_days: int, policy: ThresholdPolicy) -> float:
    n = policy.alerts_per_day * n_days if policy.alerts_per_day else round(policy.alert_budget * len(p))
    return top_n_threshold(p, max(int(n), 1))


def cost_curve(y: np.ndarray, p: np.ndarray, amount: np.ndarray, review_cost: float) -> pd.DataFrame:
    """Cost at every distinct score used as the threshold (plus 'alert nothing' at +inf)."""
    order = np.argsort(-p, kind="mergesort")
    ps, ys, am = p[order], y[order].astype(bool), np.nan_to_num(amount[order].astype(float))
    fraud_amount = np.cumsum(np.where(ys, am, 0.0))
    last_of_tie = np.r_[ps[1:] != ps[:-1], True]    # cut only between distinct scores
    k = np.flatnonzero(last_of_tie) + 1             # alerts when threshold = ps[k-1]
    total_fraud_amount = fraud_amount[-1] if len(ps) else 0.0
    curve = pd.DataFrame({
        "threshold": ps[k - 1], "alerts": k, "tp": np.cumsum(ys)[k - 1],
        "missed_fraud_amount": total_fraud_amount - fraud_amount[k - 1],
    })
    none = pd.DataFrame({"threshold": [np.inf], "alerts": [0], "tp": [0], "missed_fraud_amount": [total_fraud_amount]})
    curve = pd.concat([none, curve], ignore_index=True)
    curve["total_cost"] = curve["missed_fraud_amount"] + review_cost * curve["alerts"]
    return curve


def cost_threshold(y: np.ndarray, p: np.ndarray, amount: np.ndarray, review_cost: float) -> float:
    curve = cost_curve(y, p, amount, review_cost)
    best = curve.loc[curve["total_cost"].idxmin(), "threshold"]
    return float(min(best, 1.0 + 1e-9)) if np.isfinite(best) else 1.0 + 1e-9


def row_for(label: str, threshold: float, y, p, amount, n_days: int, review_cost: float) -> dict:
    alert = p >= threshold
    tp = int((alert & y).sum())
    fp = int((alert & ~y).sum())
    fn = int((~alert & y).sum())
    missed = float(np.nan_to_num(amount[~alert & y]).sum())
    alerts = tp + fp
    return {"candidate": label, "threshold": float(threshold), "alerts": alerts,
            "alerts_per_day": alerts / max(n_days, 1), "tp": tp, "fp": fp, "fn": fn,
            "precision": tp / alerts if alerts else 0.0, "recall": tp / (tp + fn) if tp + fn else 0.0,
            "missed_fraud_amount": missed, "review_cost": review_cost * alerts,
            "total_cost": missed + review_cost * alerts}


@dataclass
class ThresholdReport:
    budget_threshold: float
    cost_threshold: float
    chosen_threshold: float
    policy: ThresholdPolicy
    table: pd.DataFrame

    def chosen_row(self) -> pd.Series:
        return self.table[self.table["candidate"] == "chosen"].iloc[0]


def choose(test: pd.DataFrame, p: np.ndarray, policy: ThresholdPolicy) -> ThresholdReport:
    """Both thresholds and the candidate table (rows: chosen, budget, cost-optimal, top shares,
    probability levels)."""
    y = test["is_fraud"].to_numpy(bool)
    amount = test["amount_base"].to_numpy(float)
    n_days = int(test["event_date"].nunique()) or 1
    t_budget = budget_threshold(p, n_days, policy)
    t_cost = cost_threshold(y, p, amount, policy.review_cost)
    chosen = t_budget if policy.policy == "budget" else t_cost
    budget_label = (f"budget {policy.alerts_per_day}/day" if policy.alerts_per_day
                    else f"budget top {policy.alert_budget:.2%}")
    candidates = [("chosen", chosen), (budget_label, t_budget), ("cost-optimal", t_cost)]
    candidates += [(f"top {s:.1%}", top_n_threshold(p, round(s * len(p)))) for s in TOP_SHARES]
    candidates += [(f"score >= {q}", q) for q in PROBABILITIES]
    table = pd.DataFrame([row_for(lbl, t, y, p, amount, n_days, policy.review_cost) for lbl, t in candidates])
    return ThresholdReport(t_budget, t_cost, chosen, policy, table)


def write_report(out_dir: Path, test: pd.DataFrame, p: np.ndarray, report: ThresholdReport,
                 metrics: dict, details: dict, title: str = "Threshold report") -> list[Path]:
    """Write the CSV, Markdown and PNG files of the report into ``out_dir``; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve

    out_dir.mkdir(parents=True, exist_ok=True)
    y = test["is_fraud"].to_numpy(bool)
    files = []
    csv = out_dir / "thresholds.csv"
    report.table.to_csv(csv, index=False)
    files.append(csv)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    prec, rec, _ = precision_recall_curve(y, p)
    ax.plot(rec, prec, label=f"AP = {metrics['average_precision']:.3f}")
    for lbl, marker in (("chosen", "o"), ("cost-optimal", "s")):
        row = report.table[report.table["candidate"] == lbl].iloc[0]
        ax.scatter([row["recall"]], [row["precision"]], marker=marker, zorder=3,
                   label=f"{lbl} (t={row['threshold']:.3f})")
    ax.axhline(y.mean(), ls=":", c="grey", label=f"fraud rate {y.mean():.3%}")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall (test window)", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="upper right", fontsize=8)
    files.append(_save(fig, out_dir / "pr_curve.png"))

    fig, ax = plt.subplots(figsize=(6, 4.5))
    bins = np.linspace(0, 1, 51)
    ax.hist(p[~y], bins=bins, alpha=0.6, density=True, label=f"legitimate (n={int((~y).sum())})")
    ax.hist(p[y], bins=bins, alpha=0.6, density=True, label=f"fraud (n={int(y.sum())})")
    ax.axvline(report.chosen_threshold, c="k", ls="--", label="chosen threshold")
    ax.set(yscale="log", xlabel="score", ylabel="density (log)", title="Score distribution by class")
    ax.legend(fontsize=8)
    files.append(_save(fig, out_dir / "score_distribution.png"))

    calib = details["calibration"]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.plot(calib["mean_score"], calib["fraud_rate"], marker="o")
    top = max(calib["mean_score"].max(), calib["fraud_rate"].max(), 1e-3) * 1.05
    ax.set(xlabel="mean score", ylabel="observed fraud rate", title=f"Calibration (ECE {metrics['ece']:.4f})",
           xlim=(0, top), ylim=(0, top))
    files.append(_save(fig, out_dir / "calibration.png"))

    md = out_dir / "threshold_report.md"
    md.write_text(_markdown(title, report, metrics, details))
    files.append(md)
    return files


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _markdown(title: str, report: ThresholdReport, metrics: dict, details: dict) -> str:
    pol = report.policy
    budget = f"{pol.alerts_per_day} alerts/day" if pol.alerts_per_day else f"top {pol.alert_budget:.2%} of transactions"
    lines = [
        f"# {title}", "",
        f"- alert budget: {budget} -> threshold **{report.budget_threshold:.4f}**",
        f"- cost matrix: missed fraud = its amount (USD), review = {pol.review_cost:g} USD "
        f"-> cost-optimal threshold **{report.cost_threshold:.4f}**",
        f"- chosen ({pol.policy}): **{report.chosen_threshold:.4f}**", "",
        "## Metrics (test window)", "",
        "| metric | value |", "|---|---|",
        *[f"| {k} | {v:.4f} |" for k, v in metrics.items()], "",
        "## Candidate thresholds", "",
        _md_table(report.table), "",
        "## Recall per fraud scenario (at the chosen threshold)", "",
        _md_table(details["scenarios"]), "",
        "## Precision@100 per day (users)", "",
        _md_table(details["per_day"]), "",
        "## Calibration (equal-count bins)", "",
        _md_table(details["calibration"]), "",
        "Plots: `pr_curve.png`, `score_distribution.png`, `calibration.png`.", "",
    ]
    return "\n".join(lines)


def _md_table(df: pd.DataFrame) -> str:
    if df is None or df.empty:
        return "(none)"
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    head = "| " + " | ".join(df.columns) + " |"
    sep = "|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])
