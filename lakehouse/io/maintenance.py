"""Delta table maintenance primitives: compaction (OPTIMIZE), VACUUM, commit timestamps, properties.

Only this module and :mod:`lakehouse.io.delta` touch Delta storage; the policy (which tables, which
retention) is in :mod:`lakehouse.maintenance`.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from pyspark.sql import SparkSession

from lakehouse.spark import as_utc

#: How long the transaction log keeps old commits at least (time travel needs the log entry of a
#: version as well as its data files).
LOG_RETENTION_DAYS = 30

#: The Spark setting by which Delta's VACUUM spreads its listing of a table: each level of folders is
#: repartitioned into this many tasks, 10,000 unless set (a size for object stores holding millions
#: of files). On 2 local cores that is 10,000 tasks of a few milliseconds each per level: 20 to 40 s
#: for a table of a handful of files. :func:`vacuum` uses a few tasks per core instead, unless the
#: session sets it (``--conf`` under spark-submit, or ``spark.conf.set``).
LISTING_PARALLELISM = "spark.sql.sources.parallelPartitionDiscovery.parallelism"
LISTING_TASKS_PER_CORE = 4


def _files_on_disk(path: Path | str) -> tuple[dict[str, int], bool]:
    """Parquet files on disk per folder of the table (relative to it, the log left out), and whether a
    deletion vector file is there too."""
    per_folder: dict[str, int] = {}
    deletion_vectors = False
    for folder, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if d != "_delta_log"]
        deletion_vectors = deletion_vectors or any(f.startswith("deletion_vector") and f.endswith(".bin")
                                                   for f in files)
        n = sum(1 for f in files if f.endswith(".parquet"))
        if n:
            per_folder[os.path.relpath(folder, path)] = n
    return per_folder, deletion_vectors


def data_files(path: Path | str) -> int:
    """Parquet files on disk under the table folder (live, tombstoned and change-data files)."""
    return sum(_files_on_disk(path)[0].values())


def compaction_candidates(path: Path | str, date_column: str | None = None, before: str | None = None) -> int | None:
    """Folders (partitions) that may hold something for OPTIMIZE to do, read from the disk, no Spark job.

    A folder counts when it holds two or more Parquet data files (change-data files are never
    compacted); with ``date_column``, only the partition folders ``<date_column>=<day>``, and with
    ``before`` only those with ``day < before`` (the compaction's scope). The disk holds every live file
    and the tombstoned ones VACUUM has not deleted yet, so a folder with at most one file there has at
    most one live file: nothing to bin-pack. None (unknown: run OPTIMIZE) when the table has deletion
    vectors (OPTIMIZE also rewrites a single file to purge its deleted rows)."""
    per_folder, deletion_vectors = _files_on_disk(path)
    if deletion_vectors:
        return None
    prefix = f"{date_column}="
    candidates = 0
    for folder, n in per_folder.items():
        parts = folder.split(os.sep)
        if n < 2 or parts[0] == "_change_data":
            continue
        if date_column is not None:
            day = next((part[len(prefix):] for part in parts if part.startswith(prefix)), None)
            if day is None or (before is not None and not day < before):
                continue
        candidates += 1
    return candidates


def detail(spark: SparkSession, path: Path | str) -> dict:
    """``numFiles``, ``partitionColumns``, ``properties`` ... of the latest snapshot (DESCRIBE DETAIL)."""
    from delta.tables import DeltaTable

    return DeltaTable.forPath(spark, str(path)).detail().first().asDict(recursive=True)


def commit_timestamps(spark: SparkSession, path: Path | str) -> dict[int, datetime]:
    """Commit time (UTC) of every version still in the table's log."""
    from delta.tables import DeltaTable

    rows = DeltaTable.forPath(spark, str(path)).history().select("version", "timestamp").collect()
    return {r["version"]: as_utc(r["timestamp"]) for r in rows}


def _interval_hours(value: str | None) -> float | None:
    """Hours of a Delta interval property ('interval 30 days', 'interval 168 hours', ...)."""
    if not value:
        return None
    parts = value.lower().replace("interval", "").split()
    units = {"week": 168, "day": 24, "hour": 1, "minute": 1 / 60, "second": 1 / 3600}
    total = 0.0
    for amount, unit in zip(parts[::2], parts[1::2]):
        factor = next((f for u, f in units.items() if unit.startswith(u)), None)
        if factor is None:
            return None
        total += float(amount) * factor
    return total


def set_properties(spark: SparkSession, path: Path | str, properties: dict[str, str]) -> None:
    """Set the table ``properties`` in one ``ALTER TABLE`` (a metadata commit). Enabling a table feature
    this way (say ``delta.enableDeletionVectors``) upgrades the table's protocol, as creating it with
    the property would."""
    pairs = ", ".join(f"'{k}' = '{v}'" for k, v in properties.items())
    spark.sql(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES ({pairs})")


def ensure_properties(spark: SparkSession, path: Path | str, properties: dict[str, str]) -> None:
    """Set those of ``properties`` that the table lacks or holds with another value (none: no commit)."""
    current = detail(spark, path).get("properties") or {}
    differ = {k: v for k, v in properties.items() if current.get(k) != v}
    if differ:
        set_properties(spark, path, differ)


def ensure_log_retention(spark: SparkSession, path: Path | str, hours: float,
                         properties: dict | None = None) -> str | None:
    """Make ``delta.logRetentionDuration`` at least ``max(hours, 30 days)``; returns the new value when
    it had to change (a metadata commit), None when it already sufficed. ``properties``: the table's
    current properties, when the caller has them (saves a DESCRIBE DETAIL)."""
    props = (properties if properties is not None else detail(spark, path).get("properties")) or {}
    current = _interval_hours(props.get("delta.logRetentionDuration")) or 30 * 24.0  # Delta's default
    wanted_days = max(LOG_RETENTION_DAYS, math.ceil(hours / 24))
    if "delta.logRetentionDuration" in props and current >= wanted_days * 24:
        return None
    value = f"interval {wanted_days} days"
    set_properties(spark, path, {"delta.logRetentionDuration": value})
    return value


def optimize(spark: SparkSession, path: Path | str, where: str | None = None) -> dict:
    """Bin-pack small files (OPTIMIZE); ``where`` restricts it to partitions (a partition predicate).

    Returns ``files_removed`` and ``files_added`` (the compaction's own metrics). The commit has
    dataChange=false, so readers of the change data feed (the Postgres mirror) see nothing.
    """
    from delta.tables import DeltaTable

    builder = DeltaTable.forPath(spark, str(path)).optimize()
    if where:
        builder = builder.where(where)
    metrics = builder.executeCompaction().select("metrics.*").first()
    return {"files_removed": int(metrics["numFilesRemoved"] or 0), "files_added": int(metrics["numFilesAdded"] or 0)}


def vacuum(spark: SparkSession, path: Path | str, retention_hours: float) -> int:
    """Delete files no version newer than ``retention_hours`` ago needs; returns files deleted.

    Retentions under Delta's safety check (the table's deletedFileRetentionDuration, 7 days by
    default) are refused by Delta itself unless the caller's session disabled the check.
    """
    from delta.tables import DeltaTable

    before = data_files(path)
    with _listing_tasks(spark):
        DeltaTable.forPath(spark, str(path)).vacuum(float(retention_hours))
    return before - data_files(path)


@contextmanager
def _listing_tasks(spark: SparkSession):
    """Within it, Delta lists a table in :data:`LISTING_TASKS_PER_CORE` tasks per core of the
    session (its default parallelism), unless the session sets :data:`LISTING_PARALLELISM` itself."""
    if spark.conf.get(LISTING_PARALLELISM, None) is not None:
        yield
        return
    spark.conf.set(LISTING_PARALLELISM, str(LISTING_TASKS_PER_CORE * max(1, spark.sparkContext.defaultParallelism)))
    try:
        yield
    finally:
        spark.conf.unset(LISTING_PARALLELISM)
