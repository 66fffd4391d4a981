"""Daily merchant and country risk: pure DataFrame -> DataFrame transforms.

One row per key (merchant_id or country) and UTC day:

* ``tx_count``, ``amount_sum`` (USD), ``distinct_users``;
* ``amount_outlier_share``: the share of the day's transactions whose amount is at least
  :data:`OUTLIER_RATIO` times the card holder's own 30-day mean (``user_amount_ratio_30d`` of the
  point-in-time features), so "outlier" is judged against each user's habits, not the key's;
* ``fraud_count`` / ``fraud_rate``: transactions with a fraud label known now, over tx_count, and
  ``is_matured``: the day is at least :data:`MATURITY_DAYS` old as of ``as_of`` (chargebacks
  arrive within that delay), so its rate will not grow any more; analysts compare matured rates;
* ``tx_count_z_7d`` / ``amount_sum_z_7d`` and ``..._30d``: deviation from the key's own trailing
  baseline, ``(x - mean) / stddev`` over the previous 7 (30) days (the day itself excluded; days
  without transactions count as zero); null while the baseline has fewer than 2 days or no spread.
"""

from __future__ import annotations

from datetime import date

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from lakehouse.transforms.features import usd_sum

OUTLIER_RATIO = 5.0
MATURITY_DAYS = 30
BASELINES = (("7d", 7), ("30d", 30))


def _dense_days(daily: DataFrame, key: str, lo: date, hi: date) -> DataFrame:
    """Every (key, day) in [lo, hi] for keys seen in the range, zero-filled, so a quiet day counts."""
    days = daily.sparkSession.range(1).select(
        F.explode(F.sequence(F.lit(lo), F.lit(hi))).alias("day"))
    keys = daily.select(key).distinct()
    return (keys.crossJoin(days).join(daily, [key, "day"], "left")
            .fillna(0, subset=["tx_count", "amount_sum", "distinct_users"]))


def risk_daily(history: DataFrame, features: DataFrame, labels: DataFrame, key: str,
               date_from: date, date_to: date, baseline_from: date, as_of: date) -> DataFrame:
    """Daily risk of ``key`` for [date_from, date_to].

    Args:
        history: silver transactions from ``baseline_from`` (at least 30 days before date_from)
            to date_to; used for counts and the trailing baselines.
        features: point-in-time transaction features of [date_from, date_to] (for outliers).
        labels: silver labels (the fraud known now).
        as_of: the day the backfill runs for, deciding ``is_matured``.
    """
    daily = (history.groupBy(key, F.col("event_date").alias("day"))
             .agg(F.count(F.lit(1)).alias("tx_count"), usd_sum("amount_base").alias("amount_sum"),
                  F.count_distinct("user_id").alias("distinct_users")))
    dense = _dense_days(daily, key, baseline_from, date_to)
    order = F.datediff(F.col("day"), F.lit(date(1970, 1, 1)))
    for name, days in BASELINES:
        w = Window.partitionBy(key).orderBy(order).rangeBetween(-days, -1)
        for metric in ("tx_count", "amount_sum"):
            mean, std, n = F.avg(metric).over(w), F.stddev_samp(metric).over(w), F.count(metric).over(w)
            dense = dense.withColumn(
                f"{metric}_z_{name}",
                F.when((n >= 2) & (std > 0), (F.col(metric) - mean) / std).cast("double"))
    fraud = labels.where("is_fraud").select("event_id").distinct().withColumn("_fraud", F.lit(1))
    extra = (features.join(fraud, "event_id", "left")
             .groupBy(key, F.col("event_date").alias("day"))
             .agg(F.avg(F.when(F.col("user_amount_ratio_30d") >= OUTLIER_RATIO, 1.0).otherwise(0.0))
                  .alias("amount_outlier_share"),
                  F.sum(F.coalesce("_fraud", F.lit(0))).cast("long").alias("fraud_count")))
    out = (dense.where((F.col("day") >= F.lit(date_from)) & (F.col("day") <= F.lit(date_to))
                       & (F.col("tx_count") > 0))
           .join(extra, [key, "day"], "left")
           .withColumn("fraud_rate", (F.col("fraud_count") / F.col("tx_count")).cast("double"))
           .withColumn("is_matured", F.datediff(F.lit(as_of), F.col("day")) >= MATURITY_DAYS))
    return out.select(
        key, "day", F.col("tx_count").cast("long"), F.col("amount_sum").cast("double"),
        F.col("distinct_users").cast("long"), "amount_outlier_share", "fraud_count", "fraud_rate",
        "is_matured", *[f"{m}_z_{n}" for n, _ in BASELINES for m in ("tx_count", "amount_sum")])
