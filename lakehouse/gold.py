"""Gold backfill: recompute gold tables for a date range from silver, as a batch.

Uses the same pure feature functions as the stream will (:mod:`lakehouse.transforms.features`), so
the two cannot drift. Each table's date range is replaced atomically (Delta ``replaceWhere``): the
backfill is idempotent, and running it twice leaves the same rows.
"""

from __future__ import annotations

from datetime import date, timedelta

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from lakehouse.config import Settings
from lakehouse.io import delta
from lakehouse.transforms import features
from lakehouse.transforms import risk as risk_t

#: Gold tables: partition column and key (the key is also the Postgres mirror's primary key).
GOLD_TABLES: dict[str, dict] = {
    "gold_transaction_features": {"partition": "event_date", "key": ("event_id",),
                                  "indexes": (("user_id", "event_time"), ("merchant_id", "event_time"),
                                              ("country", "event_time"), ("event_date",))},
    "gold_user_features_5m": {"partition": "window_date", "key": ("user_id", "window_start"),
                              "indexes": (("window_start",), ("window_date",))},
    "gold_merchant_risk_daily": {"partition": "day", "key": ("merchant_id", "day"), "indexes": (("day",),)},
    "gold_country_risk_daily": {"partition": "day", "key": ("country", "day"), "indexes": (("day",),)},
}


def _between(col: str, lo: date, hi: date):
    return (F.col(col) >= F.lit(lo)) & (F.col(col) <= F.lit(hi))


def gold_frames(silver: DataFrame, labels: DataFrame, date_from: date, date_to: date,
                as_of: date | None = None) -> dict[str, DataFrame]:
    """The gold rows of [date_from, date_to] (UTC dates), computed from silver. Pure."""
    lookback = timedelta(seconds=features.LOOKBACK_SECONDS + 86_400)
    history = silver.where(_between("event_date", date_from - lookback, date_to))
    targets = history.where(_between("event_date", date_from, date_to))
    tx = features.transaction_features(targets, history, labels)
    # A window starting on date_to can hold events of the next day's first minutes.
    window_events = silver.where(_between("event_date", date_from, date_to + timedelta(days=1)))
    windows = (features.user_windows_5m(window_events)
               .withColumn("window_date", F.to_date("window_start"))
               .where(_between("window_date", date_from, date_to)))
    baseline_from = date_from - timedelta(days=30)
    as_of = as_of or date.today()
    risk = {
        f"gold_{prefix}_risk_daily": risk_t.risk_daily(history.where(F.col("event_date") >= F.lit(baseline_from)),
                                                       tx, labels, key, date_from, date_to, baseline_from, as_of)
        for key, prefix in (("merchant_id", "merchant"), ("country", "country"))
    }
    return {"gold_transaction_features": tx, "gold_user_features_5m": windows, **risk}


def backfill(spark: SparkSession, settings: Settings, date_from: date, date_to: date) -> dict[str, int]:
    """Recompute and replace the gold rows of [date_from, date_to]; returns rows written per table."""
    if date_to < date_from:
        raise ValueError(f"--to {date_to} is before --from {date_from}")
    silver_path = settings.table_path("silver_transactions")
    if not delta.is_delta_table(silver_path):
        raise FileNotFoundError(f"no silver table at {silver_path}: run `lakehouse stream --once` first")
    silver = delta.read(spark, silver_path)
    labels_path = settings.table_path("silver_labels")
    labels = delta.read(spark, labels_path) if delta.is_delta_table(labels_path) else \
        spark.createDataFrame([], "event_id string, is_fraud boolean, scenario string, reported_at timestamp")
    written = {}
    for name, df in gold_frames(silver, labels, date_from, date_to).items():
        spec = GOLD_TABLES[name]
        path = settings.table_path(name)
        delta.ensure_table(spark, path, df.schema, partition_by=(spec["partition"],),
                           properties={"delta.enableChangeDataFeed": "true"})
        df = df.persist()
        written[name] = df.count()
        (df.write.format("delta").mode("overwrite")
         .option("replaceWhere", f"{spec['partition']} >= '{date_from}' AND {spec['partition']} <= '{date_to}'")
         .save(str(path)))
        df.unpersist()
    return written
