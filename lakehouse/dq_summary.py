"""Data-quality summary of a period: what the stream received, kept, dropped and why.

Built from ``silver_dq_batches`` (one row per micro-batch and stream, written in the batch's own
transaction): records in, inserted, duplicates (within the batch / already in silver), quarantined
per expectation, warnings, and whether each batch reconciled (records in = inserted + duplicates +
quarantined). Batches are selected by the UTC date they were processed on. Events that arrived too
late for the five-minute windows (``gold_too_late_events``, when that table exists) are counted by
their event date in the same range.
"""

from __future__ import annotations

from datetime import date, datetime, timezone

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from lakehouse.config import TABLES, Settings
from lakehouse.io import delta
from lakehouse.spark import as_utc

_SUMS = ("records_in", "inserted", "duplicates", "duplicates_in_batch", "duplicates_existing",
         "quarantined", "warned")


def summarize(spark: SparkSession, settings: Settings, date_from: date, date_to: date) -> dict:
    """The summary of batches processed on [date_from, date_to] (UTC dates, inclusive)."""
    result: dict = {"from": date_from.isoformat(), "to": date_to.isoformat(),
                    "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "streams": {}, "too_late_events": None}
    path = settings.table_path("silver_dq_batches")
    if delta.is_delta_table(path):
        day = F.to_date("processed_at")
        batches = delta.read(spark, path).where((day >= F.lit(date_from)) & (day <= F.lit(date_to))).cache()
        totals = (batches.groupBy("kind")
                  .agg(F.count(F.lit(1)).alias("batches"),
                       *[F.sum(c).alias(c) for c in _SUMS],
                       F.sum(F.col("reconciled").cast("int")).alias("reconciled_batches"),
                       F.min("processed_at").alias("first_batch_at"), F.max("processed_at").alias("last_batch_at"))
                  .collect())
        checks = (batches.select("kind", F.explode("check_failures").alias("check", "failed"))
                  .groupBy("kind", "check").agg(F.sum("failed").alias("failed"))
                  .where("failed > 0").orderBy("kind", F.desc("failed"), "check").collect())
        batches.unpersist()
        for r in totals:
            stream = {"batches": r["batches"], **{c: int(r[c] or 0) for c in _SUMS},
                      "reconciled_batches": int(r["reconciled_batches"] or 0),
                      **{at: as_utc(r[at]).isoformat(timespec="seconds") if r[at] else None
                         for at in ("first_batch_at", "last_batch_at")},
                      "failed_checks": {}}
            stream["unreconciled_batches"] = stream["batches"] - stream["reconciled_batches"]
            stream["quarantine_rate"] = round(stream["quarantined"] / stream["records_in"], 6) \
                if stream["records_in"] else 0.0
            result["streams"][r["kind"]] = stream
        for r in checks:
            result["streams"][r["kind"]]["failed_checks"][r["check"]] = int(r["failed"])
    if "gold_too_late_events" in TABLES and delta.is_delta_table(settings.table_path("gold_too_late_events")):
        late = delta.read(spark, settings.table_path("gold_too_late_events"))
        result["too_late_events"] = late.where((F.col("event_date") >= F.lit(date_from))
                                               & (F.col("event_date") <= F.lit(date_to))).count()
    result["batches"] = sum(s["batches"] for s in result["streams"].values())
    result["all_reconciled"] = all(s["unreconciled_batches"] == 0 for s in result["streams"].values())
    return result


def render_text(summary: dict) -> list[str]:
    """Human-readable lines of :func:`summarize`'s result."""
    lines = [f"data quality {summary['from']} .. {summary['to']}: {summary['batches']} batches, "
             + ("every batch reconciled" if summary["all_reconciled"] else "SOME BATCHES DID NOT RECONCILE")]
    if not summary["streams"]:
        lines.append("  no batches processed in this period")
    for kind, s in summary["streams"].items():
        lines.append(f"  {kind:<6} in {s['records_in']:>9,}  inserted {s['inserted']:>9,}  "
                     f"duplicates {s['duplicates']:>7,} (in batch {s['duplicates_in_batch']:,}, "
                     f"already in silver {s['duplicates_existing']:,})  quarantined {s['quarantined']:>7,} "
                     f"({s['quarantine_rate']:.2%})  warned {s['warned']:,}  "
                     f"reconciled {s['reconciled_batches']}/{s['batches']}")
        for check, n in s["failed_checks"].items():
            lines.append(f"           {check:<40} {n:>8,}")
    if summary["too_late_events"] is not None:
        lines.append(f"  too late for the 5-minute windows: {summary['too_late_events']:,} events")
    return lines
