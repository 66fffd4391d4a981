"""Mirror gold Delta tables into Postgres, exactly once, converging after any failure.

Each run reads the Delta versions the Postgres ledger has not applied yet: the change data feed
between the ledger's version and the latest one, netted per key (the last change wins; a key whose
last change is a delete is deleted), or the whole snapshot on the first run. The rows and the new
ledger version are committed in one Postgres transaction (:mod:`lakehouse.io.pg_mirror`), so a kill at
any moment leaves Postgres at some applied version, and the next run catches up from there. An
unreachable Postgres is retried with back-off. A table whose changes since the ledger's version can no
longer be read (VACUUM or log clean-up removed them while the mirror was behind) is read whole and
replaces its Postgres rows, as one created again does. A table the ledger has no entry for (loaded
for the first time, or forgotten because it was dropped, emptied or written outside the mirror in
Postgres: :mod:`lakehouse.io.pg_mirror`'s triggers) gets the snapshot too, and loses the rows it holds
that the snapshot does not (``upsert_batch(whole=True)``).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import (ArrayType, BooleanType, DateType, DoubleType, FloatType, IntegerType,
                               LongType, MapType, StringType, StructType, TimestampType)

from lakehouse import damage
from lakehouse.config import TABLES, Settings
from lakehouse.gold import GOLD_TABLES
from lakehouse.io import delta, pg_mirror, postgres

_PG_TYPES = {StringType: "text", DoubleType: "double precision", FloatType: "real", LongType: "bigint",
             IntegerType: "integer", BooleanType: "boolean", TimestampType: "timestamptz", DateType: "date",
             MapType: "jsonb", ArrayType: "jsonb"}
_JSON_TYPES = (MapType, ArrayType)

#: Every table served from Postgres (schema ``Settings.pg_schema``): primary key and indexes, and the
#: days a deleted row marks as changed for the dbt marts (:attr:`pg_mirror.MirrorTable.deleted_days`:
#: the UTC days the marts group it by; a label, its payment's day). Each also gets ``mirrored_at``
#: (when the mirror last wrote the row) for freshness checks and the marts' incremental builds.
MIRRORED_TABLES: dict[str, dict] = {
    **{name: {"key": spec["key"], "indexes": spec["indexes"], "deleted_days": (f"o.{spec['partition']}",)}
       for name, spec in GOLD_TABLES.items()},
    "silver_labels": {"key": ("event_id",), "indexes": (("reported_at",),), "deleted_days": (
        "(SELECT t.event_date FROM {schema}.gold_transaction_features AS t WHERE t.event_id = o.event_id)",)},
    "silver_dq_batches": {"key": ("kind", "app_id", "batch_id"), "indexes": (("processed_at",),),
                          "deleted_days": ("o.processed_at AT TIME ZONE 'UTC'",)},
    "risk_scores": {"key": ("event_id",), "indexes": (("event_date",), ("is_alert", "event_time"),
                                                      ("user_id", "event_time")), "deleted_days": ("o.event_date",)},
}
# The data-quality mart counts too-late events by the day they were detected.
MIRRORED_TABLES["gold_too_late_events"]["deleted_days"] += ("o.detected_at AT TIME ZONE 'UTC'",)
LOADED_AT = "mirrored_at"

log = logging.getLogger(__name__)


def ledger_source(name: str) -> str:
    """The name under which the Postgres ledger records the versions of Delta table ``name``."""
    return f"delta:{name}"


def mirror_spec(name: str, schema: StructType) -> pg_mirror.MirrorTable:
    """The Postgres table mirroring Delta table ``name`` (its schema mapped to Postgres types; maps
    and arrays become ``jsonb``)."""
    spec = MIRRORED_TABLES[name]
    columns = []
    for f in schema.fields:
        pg_type = _PG_TYPES.get(type(f.dataType))
        if pg_type is None:
            raise TypeError(f"{name}.{f.name}: no Postgres type for {f.dataType.simpleString()}")
        columns.append((f.name, pg_type))
    return pg_mirror.MirrorTable(name=name, columns=tuple(columns), key=spec["key"], indexes=spec["indexes"],
                                 loaded_at=LOADED_AT, deleted_days=spec.get("deleted_days", ()))


def as_json(df: DataFrame) -> DataFrame:
    """Nested columns as JSON text (Postgres casts it to jsonb on COPY)."""
    return df.select(*[F.to_json(F.col(f.name)).alias(f.name) if isinstance(f.dataType, _JSON_TYPES)
                       else F.col(f.name) for f in df.schema.fields])


def net_changes(cdf: DataFrame, key: tuple[str, ...]) -> tuple[DataFrame, DataFrame]:
    """(upserts, deletes) from a change data feed: per key, the last change by commit version; within
    one version an insert/post-image wins over a delete (an overwrite deletes then re-inserts)."""
    cdf = cdf.where(F.col("_change_type") != "update_preimage")
    rank = F.when(F.col("_change_type") == "delete", 0).otherwise(1)
    w = Window.partitionBy(*key).orderBy(F.desc("_commit_version"), F.desc(rank))
    last = cdf.withColumn("_rn", F.row_number().over(w)).where("_rn = 1")
    meta = ["_change_type", "_commit_version", "_commit_timestamp", "_rn"]
    upserts = last.where(F.col("_change_type") != "delete").drop(*meta)
    deletes = last.where(F.col("_change_type") == "delete").select(*key)
    return upserts, deletes


def mirror_table(spark: SparkSession, settings: Settings, name: str,
                 on_retry: Callable | None = None, attempts: int | None = 10,
                 applied: dict[str, int] | None = None) -> dict:
    """Bring the Postgres copy of Delta table ``name`` to the latest Delta version.

    ``applied`` (the mirror loop's memory: table -> the Delta version this process last saw applied
    in Postgres) skips a table whose version has not moved, without loading its snapshot or asking
    Postgres; the ledger stays the truth for every table that did move.
    """
    if name not in TABLES:
        return {"table": name, "skipped": "not defined in this version"}
    path = settings.table_path(name)
    version = delta.table_version(path)
    if version is None:
        return {"table": name, "skipped": "no Delta table yet"}
    if applied is not None and applied.get(name) == version:
        return {"table": name, "version": version, "applied": version, "rows": 0}
    snapshot = delta.read(spark, path, version=version)
    table = mirror_spec(name, snapshot.schema)
    source, source_id = ledger_source(name), delta.table_id(path)

    def ledger_entry(conn) -> tuple[int, str | None] | None:
        pg_mirror.ensure_schema(conn, settings.pg_schema, [table])
        return pg_mirror.ledger_entry(conn, settings.pg_schema, source, name)

    entry = pg_mirror.with_retries(ledger_entry, settings, attempts=attempts, on_retry=on_retry)
    done = None if entry is None else entry[0]
    # Created again since (stream --reset): its versions count anew, and its snapshot replaces the rows.
    recreated = pg_mirror.recreated(entry, source_id)
    if done is not None and done >= version and not recreated:
        if applied is not None:
            applied[name] = version
        return {"table": name, "version": version, "applied": done, "rows": 0}
    # Log clean-up removed the commits after the ledger's (the mirror was behind for longer than the
    # table's log retention): the snapshot replaces the rows, as for a table created again.
    feed_gone = None
    if done is not None and not recreated and (kept := delta.cleaned_before(path, done + 1)) is not None:
        feed_gone = f"its log keeps the commits from version {kept} on (log retention)"
    # The commits this read takes in, checked before Delta reads an emptied one as a commit of nothing
    # and the ledger records its version as applied.
    incremental = done is not None and not recreated and not feed_gone
    damaged = damage.check_log(name, path, since=done + 1 if incremental else None, until=version)
    if damaged is not None:
        raise damaged
    # Arrow end to end (Spark -> pyarrow -> COPY, binary or CSV): no row-by-row Python conversion.
    rows, gone = None, None
    if incremental:
        try:
            cdf = (spark.read.format("delta").option("readChangeFeed", "true")
                   .option("startingVersion", done + 1).option("endingVersion", version).load(str(path)))
            upserts, deletes = net_changes(cdf, table.key)
            rows, gone = as_json(upserts).toArrow(), deletes.toArrow()
        except Exception as exc:  # noqa: BLE001 -- only a file VACUUM removed is taken here
            found = damage.explain(exc, settings)
            if found is None or found.table != name or found.reason != damage.MISSING:
                raise
            # VACUUM removed a file the changes since the ledger's version need (the mirror was behind
            # for longer than the retention). A file the snapshot needs fails the read below: damage.
            feed_gone = f"{found.file} is gone (VACUUM)"
    if rows is None:
        if feed_gone:
            log.warning("%s: the changes after version %d, which Postgres holds, can no longer be read: %s; "
                        "the rows of version %d replace the Postgres table's", name, done, feed_gone, version)
        rows = as_json(snapshot).toArrow()

    def apply(conn) -> int:
        # No ledger entry (a first load, or Postgres forgot the table: dropped, emptied, or written outside
        # the mirror): the snapshot is upserted and the rows it does not hold are deleted (``whole``).
        return pg_mirror.upsert_batch(conn, settings.pg_schema, table, rows, source, version, deletes=gone,
                                      source_id=source_id, replace=bool(feed_gone), whole=done is None,
                                      since=done if gone is not None else None)

    try:
        changed = pg_mirror.with_retries(apply, settings, attempts=attempts, on_retry=on_retry)
    except pg_mirror.LedgerForgotten as exc:  # forgotten while the changes were read: read it whole
        log.warning("%s; it is read whole", exc)
        return mirror_table(spark, settings, name, on_retry=on_retry, attempts=attempts, applied=applied)
    if applied is not None:
        applied[name] = version
    return {"table": name, "version": version, "applied_before": done, "rows": changed,
            "deleted": 0 if gone is None else len(gone), **({"replaced": True} if recreated or feed_gone else {})}


def mirror_all(spark: SparkSession, settings: Settings, on_retry: Callable | None = None,
               attempts: int | None = 10, tables=MIRRORED_TABLES, view_always: bool = True,
               applied: dict[str, int] | None = None, workers: int = 2) -> list[dict]:
    """Mirror ``tables`` (default: all), then (re)create the analysts' ``risk_alerts`` view once
    ``risk_scores`` exists: always, or with ``view_always=False`` only when this round wrote rows to
    a table the view reads (the mirror loop: no DDL lock every second). ``applied``: see
    :func:`mirror_table`.

    ``workers`` tables are mirrored at once (each in its own Postgres transaction, as alone): while
    Postgres loads one table in its own process, Spark reads the next. The mirror loop beside a
    stream uses one, so as not to take the stream's cores."""
    from lakehouse.ml import alerts

    def one(name: str) -> dict:
        return mirror_table(spark, settings, name, on_retry=on_retry, attempts=attempts, applied=applied)

    if workers > 1:
        from pyspark.util import inheritable_thread_target

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lakehouse-mirror") as pool:
            futures = [pool.submit(inheritable_thread_target(spark)(one), name) for name in tables]
        results = [f.result() for f in futures]  # the first error, after every table had its try
    else:
        results = [one(name) for name in tables]
    wrote = any(r["table"] in ("risk_scores", "silver_labels") and r.get("rows") for r in results)
    if (view_always or wrote) and any(r["table"] == "risk_scores" and "skipped" not in r for r in results):
        pg_mirror.with_retries(lambda conn: alerts.ensure_alerts_view(conn, settings.pg_schema), settings,
                               attempts=attempts, on_retry=on_retry)
    return results


def brief(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 200 characters) of ``exc``, for a one-line report;
    an exception without a message gives its type alone."""
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text.strip() else type(exc).__name__

class MirrorLoop(threading.Thread):
    """Mirror to Postgres beside a running stream, every ``interval`` seconds.

    It runs in its own thread on the stream's SparkSession, so a Postgres outage never blocks the
    stream into Delta: a failed round is reported (once per outage) and retried with back-off up to
    ``max_backoff`` seconds; each round catches up from the ledger, so Postgres converges to gold as
    soon as it is back. ``stop()`` ends the loop after the current round and runs a final round, so
    what the stream wrote last is mirrored too.
    """

    def __init__(self, spark: SparkSession, settings: Settings, interval: float = 1.0,
                 max_backoff: float = 30.0, report: Callable[[str], None] | None = None,
                 tables: tuple[str, ...] | None = None):
        super().__init__(name="lakehouse-mirror", daemon=True)
        self.spark, self.settings, self.interval, self.max_backoff = spark, settings, interval, max_backoff
        self.report = report or (lambda msg: log.warning("%s", msg))
        self.tables = tables or tuple(MIRRORED_TABLES)
        self.rounds = 0
        self.last_error: BaseException | None = None
        self._applied: dict[str, int] = {}
        self._halt = threading.Event()

    #: Every this many rounds, and after a failed round (Postgres may have been restored or reset
    #: meanwhile), a round checks every table against the ledger instead of trusting its memory.
    FULL_CHECK_EVERY = 60

    def run_round(self, remember: bool = True, workers: int = 1) -> list[dict]:
        """One round; with ``remember``, tables whose Delta version has not moved since this loop
        last applied it are skipped without a snapshot load (a poll every second must not compete
        with the stream for the driver), once one query found the ledger still holding that version.
        ``workers``: tables mirrored at once (:func:`mirror_all`); one beside a running stream."""
        if not remember:
            self._applied.clear()  # relearned from the ledger in this round
        elif self._applied:
            self._forget_what_postgres_forgot()
        return mirror_all(self.spark, self.settings, attempts=1, tables=self.tables,
                          view_always=self.rounds == 0, applied=self._applied, workers=workers)

    def _forget_what_postgres_forgot(self) -> None:
        """Drop from memory the tables whose ledger entry is gone or behind it (written outside the
        mirror, emptied, dropped, or a restored Postgres): this round reads them from the ledger, and
        loads whole those it forgot. One query, on a connection of its own."""
        schema, entries = self.settings.pg_schema, [(ledger_source(n), n) for n in self._applied]
        held = pg_mirror.with_retries(lambda conn: pg_mirror.held_versions(conn, schema, entries),
                                      self.settings, attempts=1)
        for entry in entries:
            name, version = entry[1], held[entry]
            if version is None or version < self._applied[name]:
                log.info("mirror: Postgres no longer holds %s.%s at version %d (ledger: %s); it is checked again",
                         schema, name, self._applied[name], version)
                del self._applied[name]

    def run(self) -> None:
        delay = self.interval
        while not self._halt.is_set():
            try:
                self.run_round(remember=self.last_error is None and self.rounds % self.FULL_CHECK_EVERY != 0)
                self.rounds += 1
                if self.last_error is not None:
                    self.report("mirror: Postgres is back; caught up with gold")
                self.last_error, delay = None, self.interval
            except Exception as exc:  # noqa: BLE001 -- the stream must go on; the ledger makes a retry safe
                if self.last_error is None:
                    told = (damage.refused(exc, self.settings) or damage.explain(exc, self.settings)
                            or postgres.privilege_refused(exc, self.settings))  # what fixes it, once
                    self.report(f"mirror: {told if told is not None else brief(exc)}; "
                                "the stream goes on, retrying with back-off")
                self.last_error, delay = exc, min(self.max_backoff, max(delay * 2, 1.0))
            self._halt.wait(delay)

    def stop(self, final_round: bool = True, timeout: float = 300.0) -> None:
        """End the loop; the final round checks every table against the Postgres ledger, two tables
        at once (call it once the stream has stopped: the cores are the mirror's then)."""
        self._halt.set()
        self.join(timeout)
        if final_round:
            self.run_round(remember=False, workers=2)


class Publisher(threading.Thread):
    """Serve a stream's new gold rows from Postgres as soon as they are computed, ahead of their Delta
    commit and the next :class:`MirrorLoop` round (:func:`lakehouse.io.pg_mirror.publish_ahead`).

    The micro-batch hands its rows over (:meth:`submit`) and goes on with its Delta writes while this
    thread upserts them, on a connection of its own, in the order submitted. Publishing is only a head
    start: the mirror still applies every Delta version through its ledger, so rows this thread drops
    (Postgres down, a full queue) or publishes and never sees committed (a crash) converge as before. A
    failure is reported once per outage; publishing pauses ``pause`` seconds after each failed try,
    so an unreachable Postgres costs the stream nothing.
    """

    def __init__(self, settings: Settings, report: Callable[[str], None] | None = None,
                 max_pending: int = 16, pause: float = 5.0):
        super().__init__(name="lakehouse-publish", daemon=True)
        self.settings, self.pause = settings, pause
        self.report = report or (lambda msg: log.warning("%s", msg))
        self.published = self.skipped = self.dropped = 0
        self.last_error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(max_pending)
        self._ensured: set[str] = set()
        self._retry_at = 0.0
        self._conn = None

    def submit(self, name: str, rows, schema: StructType, before: int | None) -> None:
        """Publish ``rows`` of gold table ``name`` (Spark ``schema``), about to be committed after its
        Delta version ``before``; never blocks (a full queue drops the rows: the mirror brings them)."""
        if time.monotonic() < self._retry_at:
            self.dropped += 1
            return
        try:
            self._queue.put_nowait((name, rows, schema, before))
        except queue.Full:
            self.dropped += 1

    def _publish(self, name: str, rows, schema: StructType, before: int | None) -> None:
        table = mirror_spec(name, schema)
        if self._conn is None or self._conn.closed:
            self._conn = postgres.connect(self.settings)
            self._ensured.clear()
        if name not in self._ensured:
            pg_mirror.ensure_schema(self._conn, self.settings.pg_schema, [table])
            self._ensured.add(name)
        n = pg_mirror.publish_ahead(self._conn, self.settings.pg_schema, table, rows, ledger_source(name), before,
                                    source_id=delta.table_id(self.settings.table_path(name)))
        if n is None:
            self.skipped += 1
        else:
            self.published += len(rows)

    def run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if time.monotonic() < self._retry_at:
                    self.dropped += 1
                    continue
                self._publish(*item)
                if self.last_error is not None:
                    self.report("publish: Postgres is back; new gold rows are served ahead of the mirror again")
                self.last_error = None
            except Exception as exc:  # noqa: BLE001 -- a head start only: the mirror converges anyway
                if self._conn is not None:
                    with contextlib.suppress(Exception):
                        self._conn.close()
                self._conn = None
                if self.last_error is None:
                    self.report(f"publish: {brief(exc)}; new gold rows "
                                f"reach Postgres through the mirror meanwhile (retrying every {self.pause:.0f} s)")
                self.last_error, self._retry_at = exc, time.monotonic() + self.pause
                self.dropped += 1
            finally:
                self._queue.task_done()

    def stop(self, timeout: float = 60.0) -> None:
        """Publish what was submitted, then end the thread."""
        if self.is_alive():
            self._queue.put(None)
            self.join(timeout)
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
