"""Nightly Delta maintenance: compact small files, then VACUUM without breaking time travel.

The stream writes many small files (one or more per micro-batch and partition); OPTIMIZE bin-packs
them. Compaction commits carry dataChange=false, so the change data feed, and with it the Postgres
mirror, sees nothing. In a partitioned table only partitions before today (UTC) are compacted: the
stream is still writing today's, and its MERGE would conflict with a compaction of the files it reads.

Retention. VACUUM deletes the files that no version newer than ``retention`` hours needs. Two
readers need old versions:

* the model: a registered model (or the champion) was trained on a snapshot pinned by Delta version
  (``lakehouse.ml.registry.pinned_versions``), and retraining or auditing it reads that version;
* the Postgres mirror: it reads the change data feed from the version after the one it applied last.

So the retention of a table is ``max(168 h, hours since the commit of its oldest pinned version + 1)``
(the +1 h covers the time between computing it and the VACUUM). Data files needed by version ``v``
are only tombstoned by commits after ``v``, so keeping every tombstone newer than ``v``'s commit
keeps ``v`` readable. The transaction log must keep ``v``'s entry too: ``delta.logRetentionDuration``
is raised to at least 30 days, and to more when a pin is older than that.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timezone
from typing import Callable, Iterable

from pyspark.sql import SparkSession

from lakehouse.config import TABLES, Settings
from lakehouse.io import delta
from lakehouse.io import maintenance as mio

log = logging.getLogger(__name__)

#: Delta's own default VACUUM retention; never go below it.
DEFAULT_RETENTION_HOURS = 168.0
#: Slack between computing the retention and running the VACUUM.
SAFETY_HOURS = 1.0
#: Partition columns holding a UTC date, per partitioned table (others: the whole table is compacted).
DATE_PARTITIONS = ("event_date", "window_date", "day")


@dataclass
class TableReport:
    table: str
    version_before: int | None = None
    files_before: int = 0
    compacted_files_removed: int = 0
    compacted_files_added: int = 0
    compaction_scope: str = "all"
    compaction_skipped: str | None = None
    pinned_version: int | None = None
    pinned_by: list[str] = field(default_factory=list)
    pinned_commit_at: str | None = None
    retention_hours: float = DEFAULT_RETENTION_HOURS
    log_retention_set: str | None = None
    vacuum_files_deleted: int = 0
    vacuum_skipped: str | None = None
    files_after: int = 0
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def retention_hours(pinned_commit_at: datetime | None, now: datetime,
                    minimum: float = DEFAULT_RETENTION_HOURS) -> float:
    """VACUUM retention that keeps a version committed at ``pinned_commit_at`` readable. Pure.

    Args:
        pinned_commit_at: commit time of the oldest version still needed (None: nothing pinned).
        now: the time the VACUUM runs.
        minimum: never retain less than this (Delta's default, 7 days).
    """
    if pinned_commit_at is None:
        return float(minimum)
    age = (now - pinned_commit_at).total_seconds() / 3600.0
    return float(max(minimum, math.ceil(max(age, 0.0) + SAFETY_HOURS)))


def model_pins(settings: Settings) -> dict[str, int]:
    """Oldest Delta version per table that a registered model still needs (the ML registry's view).

    Empty when the ML package does not provide it (no model trained yet on this install).
    """
    try:
        from lakehouse.ml.registry import pinned_versions
    except ImportError:
        log.warning("lakehouse.ml.registry.pinned_versions is not available: no model pins")
        return {}
    return {name: int(v) for name, v in (pinned_versions(settings) or {}).items() if v is not None}


def mirror_pins(settings: Settings) -> dict[str, int]:
    """Last Delta version the Postgres mirror applied, per mirrored table (gold, ``silver_labels``,
    ``silver_dq_batches``, ``risk_scores``): its next change-feed read starts after it.

    Empty when Postgres is unreachable: then only the model pins and the 7-day minimum apply (should
    VACUUM then remove a file the mirror's next read needs, the mirror reloads that table whole).
    """
    from lakehouse.io import pg_mirror, postgres
    from lakehouse.mirror import MIRRORED_TABLES, ledger_source

    try:
        conn = postgres.connect(settings)
    except postgres.PostgresUnavailable as exc:
        log.warning("mirror pins unknown (%s)", exc)
        return {}
    try:
        pins = {}
        for name in MIRRORED_TABLES:
            applied = pg_mirror.applied_version(conn, settings.pg_schema, ledger_source(name), name)
            if applied is not None:
                pins[name] = int(applied)
        return pins
    finally:
        conn.close()


def _date_partition(detail: dict) -> str | None:
    parts = detail.get("partitionColumns") or []
    return next((p for p in parts if p in DATE_PARTITIONS), None)


def _compaction_scope(detail: dict, today: date) -> str | None:
    date_part = _date_partition(detail)
    return f"`{date_part}` < '{today.isoformat()}'" if date_part else None


def maintain_table(spark: SparkSession, settings: Settings, name: str, pins: dict[str, list[tuple[str, int]]],
                   now: datetime, minimum_hours: float = DEFAULT_RETENTION_HOURS,
                   dry_run: bool = False) -> TableReport | None:
    """Compact and vacuum one table; None when the table does not exist."""
    path = settings.table_path(name)
    if not delta.is_delta_table(path):
        return None
    commits = mio.commit_timestamps(spark, path)
    report = TableReport(table=name, version_before=max(commits), files_before=mio.data_files(path))
    table_pins = pins.get(name, [])
    if table_pins:
        oldest = min(v for _, v in table_pins)
        report.pinned_version = oldest
        report.pinned_by = sorted({who for who, _ in table_pins})
        at = commits.get(oldest)
        if at is None:
            # The log no longer has it: fall back to the oldest commit still there (keeps all we have).
            report.warnings.append(f"pinned version {oldest} is no longer in the log; "
                                   f"keeping everything from version {min(commits)}")
            at = commits[min(commits)]
        report.pinned_commit_at = at.isoformat()
        report.retention_hours = retention_hours(at, now, minimum_hours)
    else:
        report.retention_hours = float(minimum_hours)
    detail = mio.detail(spark, path)
    scope = _compaction_scope(detail, now.date())
    report.compaction_scope = scope or "all"
    if dry_run:
        report.files_after = report.files_before
        return report
    report.log_retention_set = mio.ensure_log_retention(spark, path, report.retention_hours,
                                                        detail.get("properties"))
    # OPTIMIZE plans, lists and commits even when no partition in scope has two files; the disk tells
    # first (an upper bound of the live files), without a Spark job.
    candidates = mio.compaction_candidates(path, _date_partition(detail), now.date().isoformat())
    if candidates == 0:
        report.compaction_skipped = "no partition in scope holds more than one file"
    else:
        compacted = mio.optimize(spark, path, where=scope)
        report.compacted_files_removed = compacted["files_removed"]
        report.compacted_files_added = compacted["files_added"]
    # A table whose whole history is younger than the retention has nothing VACUUM may delete (every
    # tombstone and every stray file is younger still): skip the listing, the slow part of VACUUM.
    age_hours = (now - commits[min(commits)]).total_seconds() / 3600.0
    if min(commits) == 0 and age_hours < report.retention_hours:
        report.vacuum_skipped = f"table is {age_hours:.1f} h old, younger than the retention"
    else:
        report.vacuum_files_deleted = mio.vacuum(spark, path, report.retention_hours)
    report.files_after = mio.data_files(path)
    return report


def collect_pins(settings: Settings, extra: dict[str, int] | None = None) -> dict[str, list[tuple[str, int]]]:
    """Every pin per table, with who holds it: the model registry, the Postgres mirror, ``extra``."""
    pins: dict[str, list[tuple[str, int]]] = {}
    for who, source in (("model", model_pins(settings)), ("mirror", mirror_pins(settings)),
                        ("caller", extra or {})):
        for name, version in source.items():
            pins.setdefault(name, []).append((who, int(version)))
    return pins


def maintain(spark: SparkSession, settings: Settings, tables: Iterable[str] | None = None,
             pins: dict[str, list[tuple[str, int]]] | None = None, now: datetime | None = None,
             minimum_hours: float = DEFAULT_RETENTION_HOURS, dry_run: bool = False,
             on_table: Callable[[TableReport], None] | None = None) -> list[TableReport]:
    """OPTIMIZE and VACUUM every existing Delta table (or ``tables``), keeping pinned versions readable.

    Args:
        pins: per table, ``[(who, version), ...]``; default :func:`collect_pins`.
        now: the clock (UTC) the retention is computed against; default now.
        minimum_hours: the retention floor (Delta's 168 h; lower only in tests, with Delta's
            retention check disabled in the session).
        dry_run: report the plan (pins, retention, compaction scope) without changing anything.
        on_table: called with each table's report as soon as it is done (progress).
    """
    names = list(tables) if tables else list(TABLES)
    unknown = [n for n in names if n not in TABLES]
    if unknown:
        raise KeyError(f"unknown table(s) {', '.join(unknown)}; known: {', '.join(TABLES)}")
    pins = collect_pins(settings) if pins is None else pins
    now = now or datetime.now(timezone.utc)
    reports = []
    for name in names:
        report = maintain_table(spark, settings, name, pins, now, minimum_hours, dry_run)
        if report is None:
            continue
        reports.append(report)
        if on_table:
            on_table(report)
    return reports
