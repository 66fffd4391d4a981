"""Pure parts of the model code: split windows, content hash, per-day user precision, PSI, thresholds,
top reasons. Small hand-made inputs with hand-computed answers."""

from __future__ import annotations

import json
from datetime import date

import numpy as np
import pandas as pd
import pytest

from lakehouse.ml import dataset, evaluate, registry, threshold as thr


def test_windows_default_anchor_and_cutoff():
    w = dataset.choose_windows(date(2026, 10, 1), date(2026, 10, 30), dataset.SplitConfig())
    # anchor = newest day - 7 = 10-23; test 10-17..10-23; gap 10-10..10-16; train 10-03..10-09
    assert (w.test_end, w.test_start) == (date(2026, 10, 23), date(2026, 10, 17))
    assert (w.train_start, w.train_end) == (date(2026, 10, 3), date(2026, 10, 9))
    assert w.cutoff.isoformat() == "2026-10-17T00:00:00+00:00"
    w2 = dataset.choose_windows(date(2026, 10, 1), date(2026, 10, 30),
                                dataset.SplitConfig(train_days=3, gap_days=2, test_days=4, anchor_date=date(2026, 10, 20)))
    assert (w2.train_start, w2.train_end, w2.test_start, w2.test_end) == (
        date(2026, 10, 12), date(2026, 10, 14), date(2026, 10, 17), date(2026, 10, 20))
    with pytest.raises(dataset.DatasetError, match="not enough history"):
        dataset.choose_windows(date(2026, 10, 10), date(2026, 10, 30), dataset.SplitConfig())


def test_parse_as_of_version():
    assert dataset.parse_as_of_version("12:7") == (12, 7)
    assert dataset.parse_as_of_version("3") == (3, None)
    with pytest.raises(dataset.DatasetError):
        dataset.parse_as_of_version("a:b")


def test_content_hash_sees_any_change():
    df = pd.DataFrame({"event_id": ["a", "b"], "x": [1.0, np.nan], "d": [date(2026, 1, 1), date(2026, 1, 2)]})
    h = dataset.content_hash(df)
    assert h == dataset.content_hash(df.copy())
    changed = df.copy()
    changed.loc[1, "x"] = 0.0
    assert dataset.content_hash(changed) != h
    assert dataset.content_hash(df.rename(columns={"x": "y"})) != h


def test_precision_at_k_per_day_excludes_users_caught_earlier():
    test = pd.DataFrame({
        "event_date": [date(2026, 1, 1)] * 4 + [date(2026, 1, 2)] * 4,
        "user_id": ["u1", "u1", "u2", "u3", "u1", "u2", "u3", "u4"],
        "is_fraud": [False, True, False, False, True, False, True, False],
        "p": [0.1, 0.9, 0.8, 0.2, 0.99, 0.5, 0.4, 0.3],
    })
    mean, per_day = evaluate.precision_at_k_per_day(test, test["p"].to_numpy(), k=2)
    # day 1: users by max score u1 (0.9, fraud), u2 (0.8) -> 1/2; u1 is caught.
    # day 2: u1 left out; u2 (0.5), u3 (0.4, fraud) -> 1/2.
    assert [d["hits"] for d in per_day] == [1, 1]
    assert per_day[1]["users"] == 3
    assert mean == pytest.approx(0.5)


def test_psi_zero_for_same_distribution_and_large_for_shift():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=5000)
    assert evaluate.psi(ref, ref) == pytest.approx(0.0, abs=1e-12)
    assert evaluate.psi(ref, rng.normal(size=5000)) < 0.02
    assert evaluate.psi(ref, rng.normal(loc=1.0, size=5000)) > 0.25
    flags = np.array([0.0] * 90 + [1.0] * 10)
    # shares 0.9/0.1 -> 0.5/0.5: (0.5-0.9)ln(0.5/0.9) + (0.5-0.1)ln(0.5/0.1)
    expected = -0.4 * np.log(0.5 / 0.9) + 0.4 * np.log(5.0)
    assert evaluate.psi(flags, np.array([0.0] * 50 + [1.0] * 50)) == pytest.approx(expected)


def test_cost_threshold_and_budget():
    y = np.array([True, False, True, False, False])
    p = np.array([0.9, 0.8, 0.7, 0.2, 0.1])
    amount = np.array([100.0, 50.0, 3.0, 10.0, 10.0])
    # alert top1: missed 3 + 1*5 = 8; top3: 0 + 15 = 15; none: 103 -> best t = 0.9
    assert thr.cost_threshold(y, p, amount, review_cost=5.0) == pytest.approx(0.9)
    # cheap reviews: alert down to 0.7 -> cost 3*1 = 3 beats 3 + 1 = 4
    assert thr.cost_threshold(y, p, amount, review_cost=1.0) == pytest.approx(0.7)
    # expensive reviews: alert nothing (threshold above any score)
    assert thr.cost_threshold(y, p, amount, review_cost=1000.0) > 1.0
    pol = thr.ThresholdPolicy(alert_budget=0.4)
    assert thr.budget_threshold(p, 1, pol) == pytest.approx(0.8)      # 2 of 5 alerted
    assert thr.budget_threshold(p, 2, thr.ThresholdPolicy(alerts_per_day=1)) == pytest.approx(0.8)
    test = pd.DataFrame({"is_fraud": y, "amount_base": amount, "event_date": [date(2026, 1, 1)] * 5})
    rep = thr.choose(test, p, pol)
    row = rep.chosen_row()
    assert (row["alerts"], row["tp"], row["precision"], row["recall"]) == (2, 1, 0.5, 0.5)
    assert row["total_cost"] == pytest.approx(3.0 + 2 * 5.0)


def test_promotion_decision():
    assert registry.decide(0.3, None) == (True, "no champion yet")
    assert registry.decide(0.3, 0.4)[0] is False
    assert registry.decide(0.4, 0.4)[0] is False   # must beat, not tie
    assert registry.decide(0.5, 0.4)[0] is True


def test_top_reasons_name_the_feature_that_drives_the_score():
    from sklearn.linear_model import LogisticRegression

    from lakehouse.transforms.scoring import explain

    rng = np.random.default_rng(1)
    x = pd.DataFrame({"a": rng.normal(size=400), "b": rng.normal(size=400), "c": rng.normal(size=400)})
    y = (x["b"] > 1.0).astype(int)
    model = LogisticRegression().fit(x, y)
    medians = x.median().to_numpy()
    row = pd.DataFrame({"a": [0.0], "b": [3.0], "c": [0.0]})
    scores, reasons = explain(model, row, medians, k=3)
    top = json.loads(reasons[0])
    assert top[0]["feature"] == "b" and top[0]["contribution"] > 0
    assert scores[0] == pytest.approx(model.predict_proba(row)[0, 1])
    base = model.predict_proba(row)[0, 1] - model.predict_proba(row.assign(b=medians[1]))[0, 1]
    assert top[0]["contribution"] == pytest.approx(base, abs=1e-6)


def test_ranking_metrics_equal_scikit_learn_with_unit_weights_ties_included():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(5)
    y = rng.random(3000) < 0.05
    p = np.round(rng.random(3000) * 0.6 + 0.4 * y, 2)  # rounded: many tied scores
    order = np.argsort(-p, kind="mergesort")
    ends = np.r_[p[order][1:] != p[order][:-1], True]
    auc, ap = evaluate._ranking_metrics(y[order], ends, np.ones(len(y)))
    assert auc == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert ap == pytest.approx(average_precision_score(y, p), abs=1e-12)


def test_bootstrap_intervals_hold_the_estimate_and_narrow_with_more_frauds():
    rng = np.random.default_rng(7)

    def data(n, rate):
        y = rng.random(n) < rate
        return y, 1 / (1 + np.exp(-(rng.normal(0, 1, n) + 1.2 * y - 3)))  # probabilities

    y_small, p_small = data(2000, 0.005)   # about 10 frauds, as in a small demo's test window
    y_big, p_big = data(40000, 0.02)       # about 800
    small, big = evaluate.bootstrap_intervals(y_small, p_small), evaluate.bootstrap_intervals(y_big, p_big)
    metrics, _ = evaluate.evaluate(pd.DataFrame({"is_fraud": y_big, "user_id": "u", "scenario": None,
                                                 "event_date": "2026-11-20"}), p_big, threshold=1.0)
    for name in ("roc_auc", "average_precision"):
        assert big[f"{name}_ci_low"] < metrics[name] < big[f"{name}_ci_high"]
        assert metrics[f"{name}_ci_low"] == big[f"{name}_ci_low"]  # evaluate reports them, same seed
        width = lambda ci: ci[f"{name}_ci_high"] - ci[f"{name}_ci_low"]  # noqa: E731
        assert width(small) > 3 * width(big), name
    assert evaluate.bootstrap_intervals(y_small, p_small) == small  # fixed seed: reproducible
    assert np.isnan(evaluate.bootstrap_intervals(np.zeros(10, bool), np.arange(10.0))["roc_auc_ci_low"])
    assert evaluate.with_interval({"roc_auc": 0.9, "roc_auc_ci_low": 0.85, "roc_auc_ci_high": 0.95},
                                  "roc_auc") == "0.900 [0.850, 0.950]"
