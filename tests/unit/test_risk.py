"""Daily merchant/country risk on hand-made days: counts, outliers, fraud, trailing z-scores."""

from __future__ import annotations

from datetime import date, datetime, timedelta

import pytest

from lakehouse.transforms.risk import risk_daily

D0 = date(2026, 11, 1)


def _tx(spark, rows):
    return spark.createDataFrame(
        [(f"e{i}", u, m, "FR", amt, datetime.combine(d, datetime.min.time()) + timedelta(hours=1), d)
         for i, (u, m, amt, d) in enumerate(rows)],
        "event_id string, user_id string, merchant_id string, country string, amount_base double, "
        "event_time timestamp, event_date date")


def test_counts_outliers_fraud_and_baseline(spark):
    rows = []
    for k in range(10):  # merchant m1: 2 payments a day for 10 days, then 6 on the last day
        day = D0 + timedelta(days=k)
        rows += [("u1", "m1", 10.0, day), ("u2", "m1", 20.0, day + timedelta(days=0))]
    last = D0 + timedelta(days=10)
    rows += [("u1", "m1", 10.0, last)] * 1 + [("u3", "m1", 500.0, last)] + [("u4", "m1", 30.0, last)] * 4
    history = _tx(spark, rows)
    features = history.where(f"event_date = '{last}'").withColumn(
        "user_amount_ratio_30d", (history.amount_base / 10.0))  # u3's 500 is 50x, u4's 30 is 3x
    fraud_ids = [r.event_id for r in history.where("user_id = 'u3'").collect()]
    labels = spark.createDataFrame([(i, True) for i in fraud_ids] + [("e0", False)], "event_id string, is_fraud boolean")

    got = risk_daily(history, features, labels, "merchant_id", last, last, D0, as_of=last + timedelta(days=31))
    row = got.collect()
    assert len(row) == 1
    r = row[0].asDict()
    assert (r["merchant_id"], r["day"], r["tx_count"], r["distinct_users"]) == ("m1", last, 6, 3)
    assert r["amount_sum"] == pytest.approx(10 + 500 + 4 * 30)
    assert r["amount_outlier_share"] == pytest.approx(1 / 6)
    assert (r["fraud_count"], r["fraud_rate"]) == (1, pytest.approx(1 / 6))
    assert r["is_matured"] is True
    # Baseline: 2 a day for the previous 7 days -> no spread -> no z-score; amount also flat.
    assert r["tx_count_z_7d"] is None and r["amount_sum_z_7d"] is None


def test_zscore_counts_quiet_days_and_excludes_the_day_itself(spark):
    rows = []
    for k in range(7):  # 1, 3, 1, 3, ... payments on the 7 previous days
        day = D0 + timedelta(days=k)
        rows += [("u1", "m1", 10.0, day)] * (1 if k % 2 == 0 else 3)
    target = D0 + timedelta(days=7)
    rows += [("u1", "m1", 10.0, target)] * 9
    history = _tx(spark, rows)
    feats = history.where(f"event_date = '{target}'").withColumn("user_amount_ratio_30d", history.amount_base * 0 + 1)
    labels = spark.createDataFrame([], "event_id string, is_fraud boolean")
    r = risk_daily(history, feats, labels, "merchant_id", target, target, D0, as_of=target).first().asDict()
    counts = [1, 3, 1, 3, 1, 3, 1]
    mean = sum(counts) / 7
    std = (sum((c - mean) ** 2 for c in counts) / 6) ** 0.5
    assert r["tx_count_z_7d"] == pytest.approx((9 - mean) / std)
    assert r["is_matured"] is False and r["fraud_rate"] == 0.0
