"""Read-only summaries of the tables: row counts and the reconciliation of every batch."""

from __future__ import annotations

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from lakehouse.config import TABLES, Settings
from lakehouse.io import delta


def table_counts(spark: SparkSession, settings: Settings) -> dict[str, int | None]:
    """Rows per Delta table (None where the table does not exist yet)."""
    out: dict[str, int | None] = {}
    for name in TABLES:
        path = settings.table_path(name)
        out[name] = delta.read(spark, path).count() if delta.is_delta_table(path) else None
    return out


def reconciliation(spark: SparkSession, settings: Settings) -> dict[str, dict]:
    """Per stream: records in, inserted, duplicates, quarantined over all batches, and whether
    every batch reconciled (records in = inserted + duplicates + quarantined)."""
    path = settings.table_path("silver_dq_batches")
    if not delta.is_delta_table(path):
        return {}
    rows = (
        delta.read(spark, path)
        .groupBy("kind")
        .agg(
            F.count(F.lit(1)).alias("batches"),
            F.sum("records_in").alias("records_in"),
            F.sum("inserted").alias("inserted"),
            F.sum("duplicates").alias("duplicates"),
            F.sum("quarantined").alias("quarantined"),
            F.sum("warned").alias("warned"),
            F.min(F.col("reconciled").cast("int")).alias("all_reconciled"),
        )
        .collect()
    )
    return {
        r["kind"]: {
            "batches": r["batches"],
            "records_in": r["records_in"],
            "inserted": r["inserted"],
            "duplicates": r["duplicates"],
            "quarantined": r["quarantined"],
            "warned": r["warned"],
            "reconciled": bool(r["all_reconciled"])
            and r["records_in"] == r["inserted"] + r["duplicates"] + r["quarantined"],
        }
        for r in rows
    }


def quarantine_by_check(spark: SparkSession, settings: Settings) -> dict[str, int]:
    """Quarantined records per failed check name (a record may fail several)."""
    path = settings.table_path("silver_quarantine")
    if not delta.is_delta_table(path):
        return {}
    rows = (
        delta.read(spark, path)
        .select(F.explode("failed_checks").alias("check"))
        .groupBy("check")
        .count()
        .orderBy(F.desc("count"))
        .collect()
    )
    return {r["check"]: r["count"] for r in rows}
