"""Delta Lake I/O: create tables, idempotent appends and MERGEs, reads.

Idempotency: every write made for a streaming micro-batch carries Delta's transaction identifier
(``txnAppId`` = the query's app id, ``txnVersion`` = the batch id). Delta records the pair in the
table's log in the same commit as the data, and skips any later write with a version it has already
seen. A batch replayed after a crash therefore writes each table at most once.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from datetime import timezone
from pathlib import Path
from typing import Callable, Iterable, Sequence, TypeVar

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.types import StructType

T = TypeVar("T")

TXN_APP_ID = "spark.databricks.delta.write.txnAppId"
TXN_VERSION = "spark.databricks.delta.write.txnVersion"
USER_METADATA = "spark.databricks.delta.commitInfo.userMetadata"


def commit_tag(app_id: str, version: int) -> str:
    """Written into the commit's userMetadata, so the commit of a batch can be found in history."""
    return f"{app_id}#{int(version)}"


def is_delta_table(path: Path | str) -> bool:
    return (Path(path) / "_delta_log").is_dir()


def ensure_table(
    spark: SparkSession,
    path: Path | str,
    schema: StructType,
    partition_by: Sequence[str] = (),
    properties: dict[str, str] | None = None,
) -> bool:
    """Create the Delta table at ``path`` with ``schema`` unless it exists already (a table with a
    commit is left as it is, without a Spark call). Returns whether it was created here."""
    from delta.tables import DeltaTable

    if table_version(path) is not None:
        return False

    builder = DeltaTable.createIfNotExists(spark).location(str(path)).addColumns(schema)
    if partition_by:
        builder = builder.partitionedBy(*partition_by)
    for key, value in (properties or {}).items():
        builder = builder.property(key, value)
    builder.execute()
    return True


def append_once(df: DataFrame, path: Path | str, app_id: str, version: int, merge_schema: bool = False) -> None:
    """Append ``df`` unless this (app_id, version) was already committed to the table.

    ``merge_schema`` lets the append add new nullable columns to an older table.
    """
    writer = (
        df.write.format("delta")
        .mode("append")
        .option("txnAppId", app_id)
        .option("txnVersion", int(version))
        .option("userMetadata", commit_tag(app_id, version))
    )
    if merge_schema:
        writer = writer.option("mergeSchema", "true")
    writer.save(str(path))


def replace_range_once(df: DataFrame, path: Path | str, predicate: str, app_id: str | None,
                       version: int | None) -> None:
    """Atomically replace the rows matching ``predicate`` (Delta ``replaceWhere``) with ``df``,
    unless this (app_id, version) was already committed to the table; with no app_id, always."""
    writer = df.write.format("delta").mode("overwrite").option("replaceWhere", predicate)
    if app_id is not None:
        writer = (writer.option("txnAppId", app_id).option("txnVersion", int(version))
                  .option("userMetadata", commit_tag(app_id, version)))
    writer.save(str(path))


@contextmanager
def idempotent_dml(spark: SparkSession, app_id: str, version: int):
    """Make the DML (MERGE/UPDATE/DELETE) run inside the block idempotent for (app_id, version).

    Use the micro-batch's own session (``batch_df.sparkSession``): each streaming query runs on a
    clone of the session, so the setting never leaks into a query running beside it.
    """
    spark.conf.set(TXN_APP_ID, app_id)
    spark.conf.set(TXN_VERSION, str(int(version)))
    spark.conf.set(USER_METADATA, commit_tag(app_id, version))
    try:
        yield
    finally:
        for key in (TXN_APP_ID, TXN_VERSION, USER_METADATA):
            spark.conf.unset(key)


def in_parallel(spark: SparkSession, *steps: Callable[[SparkSession], T]) -> list[T]:
    """Run ``steps`` at the same time and return their results in order; the first error is raised
    once every step has ended. Each step gets a session of its own: the first ``spark``, the others
    clones of it (same settings), since :func:`idempotent_dml` keeps the transaction id in the
    session's settings and two MERGEs on one session would take each other's. The threads inherit
    this thread's job group and local properties (:class:`pyspark.InheritableThread`), so stopping a
    stream cancels their jobs too.

    For writes to different tables, whose driver-side work (planning, the commit, a single-task
    stage) leaves a core idle when they run one after the other."""
    if len(steps) < 2:
        return [step(spark) for step in steps]
    from pyspark import InheritableThread

    results: list = [None] * len(steps)
    errors: list[BaseException | None] = [None] * len(steps)

    def run(i: int, session: SparkSession) -> None:
        try:
            results[i] = steps[i](session)
        except BaseException as exc:  # noqa: BLE001 -- raised in the caller's thread below
            errors[i] = exc

    threads = [InheritableThread(target=run, args=(i, SparkSession(spark.sparkContext,
                                                                   spark._jsparkSession.cloneSession())),
                                 name=f"lakehouse-parallel-{i}", daemon=True)
               for i in range(1, len(steps))]
    for thread in threads:
        thread.start()
    run(0, spark)
    for thread in threads:
        thread.join()
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return results


def _commit_name(version: int) -> str:
    """The file name of commit ``version`` in ``_delta_log``."""
    return f"{int(version):020d}.json"


def _commit_lines(path: Path | str, version: int) -> list[str] | None:
    """The actions of the table's commit ``version``, one JSON line each, from its commit file (no
    Spark job); None when the file is gone (log clean-up)."""
    try:
        return (Path(path) / "_delta_log" / _commit_name(version)).read_text().splitlines()
    except FileNotFoundError:
        return None


def _metadata_id(lines: list[str] | None) -> str | None:
    """The table id of a commit's ``metaData`` action (``lines``: :func:`_commit_lines`), if it has one."""
    for line in lines or ():
        if line.startswith('{"metaData"'):
            return json.loads(line)["metaData"]["id"]
    return None


def commit_info(path: Path | str, version: int) -> dict | None:
    """The ``commitInfo`` of the table's commit ``version``, read from its JSON commit file (no
    Spark job); None when the file is gone (log clean-up) or holds none."""
    for line in _commit_lines(path, version) or ():  # one action per line
        if line.startswith('{"commitInfo"'):
            return json.loads(line)["commitInfo"]
    return None


def commit_metrics(path: Path | str, app_id: str, version: int, depth: int = 25) -> dict[str, int] | None:
    """The operation metrics of the commit that (app_id, version) made to the table, searched in its
    last ``depth`` commits (:func:`commit_info`); None when that commit is not among them."""
    tag, latest = commit_tag(app_id, version), table_version(path)
    if latest is None:
        return None
    for v in range(latest, max(-1, latest - depth), -1):
        info = commit_info(path, v)
        if info is not None and info.get("userMetadata") == tag:
            metrics = info.get("operationMetrics") or {}
            return {k: int(n) for k, n in metrics.items() if str(n).lstrip("-").isdigit()}
    return None


def rows_committed(path: Path | str, app_id: str, version: int, metric: str, depth: int = 25) -> int | None:
    """The ``metric`` (e.g. numOutputRows) of the commit that (app_id, version) made, or None when
    that commit is not among the last ``depth`` commits (:func:`commit_metrics`)."""
    metrics = commit_metrics(path, app_id, version, depth)
    return None if metrics is None else metrics.get(metric, 0)


def _merge_condition(keys: Sequence[str], prune: dict[str, list] | None, spans: dict[str, tuple] | None) -> str:
    """``t.k = s.k`` for every key, plus the literal bounds on the target that let Delta skip files:
    ``prune`` (partition values, ``IN``) and ``spans`` (``(lo, hi)`` per column, UTC datetimes or
    numbers: a range that holds every target row a source row can match)."""
    cond = [f"t.`{k}` = s.`{k}`" for k in keys]
    for column, values in (prune or {}).items():
        if values:
            cond.append(f"t.`{column}` IN ({', '.join(repr(str(v)) for v in values)})")
    for column, (lo, hi) in (spans or {}).items():
        if hasattr(lo, "astimezone"):  # a timestamp literal in UTC, to the µs
            lo, hi = (f"TIMESTAMP '{v.astimezone(timezone.utc):%Y-%m-%d %H:%M:%S.%f}Z'" for v in (lo, hi))
        cond.append(f"t.`{column}` BETWEEN {lo} AND {hi}")
    return " AND ".join(cond)


def merge_insert_new(
    spark: SparkSession,
    source: DataFrame,
    path: Path | str,
    keys: Iterable[str],
    prune: dict[str, list] | None = None,
    spans: dict[str, tuple] | None = None,
) -> None:
    """Insert the rows of ``source`` whose keys are not in the target yet (insert-only MERGE).

    Args:
        keys: join columns; include the partition column so a source row can only match rows of
            its own partition.
        prune: literal values per partition column (``{"event_date": [...]}``); added to the merge
            condition so Delta reads only those partitions of the target, whatever its size.
        spans: ``{column: (lo, hi)}``, inclusive bounds of the target rows a source row can match
            (say the source's event times, when the key fixes the event time); added to the condition
            so Delta skips the files whose statistics lie outside.
    """
    from delta.tables import DeltaTable

    (
        DeltaTable.forPath(spark, str(path))
        .alias("t")
        .merge(source.alias("s"), _merge_condition(list(keys), prune, spans))
        .whenNotMatchedInsertAll()
        .execute()
    )


def merge_upsert(
    spark: SparkSession,
    source: DataFrame,
    path: Path | str,
    keys: Iterable[str],
    prune: dict[str, list] | None = None,
    spans: dict[str, tuple] | None = None,
) -> None:
    """Upsert ``source`` into the target by ``keys``: new keys are inserted, and a matched row is
    updated only if some column differs (so the change data feed carries real changes only).

    ``source`` must hold at most one row per key. ``prune`` and ``spans`` as in
    :func:`merge_insert_new`. Wrap the call in :func:`idempotent_dml` to make it exactly-once per batch.
    """
    from delta.tables import DeltaTable

    keys = list(keys)
    changed = " OR ".join(f"NOT (t.`{c}` <=> s.`{c}`)" for c in source.columns if c not in keys) or "false"
    (
        DeltaTable.forPath(spark, str(path))
        .alias("t")
        .merge(source.alias("s"), _merge_condition(keys, prune, spans))
        .whenMatchedUpdateAll(condition=changed)
        .whenNotMatchedInsertAll()
        .execute()
    )


def read(spark: SparkSession, path: Path | str, version: int | None = None) -> DataFrame:
    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", int(version))
    return reader.load(str(path))


def table_version(path: Path | str) -> int | None:
    """Latest committed version of the table, or None when there is no table.

    Read from the commit files in ``_delta_log`` (``<20-digit version>.json``, written atomically): no
    Spark job and no snapshot load, so a loop can poll it every second. From the last checkpoint
    (``_last_checkpoint``) on, the commits after it are probed one by one (Delta checkpoints every
    10 commits), so the cost does not grow with the log: a streaming table keeps a commit per
    micro-batch for the log retention (30 days), hundreds of thousands of files, which a listing
    of the folder would read at every call. Without a usable checkpoint pointer (none yet, or its
    commit gone) the folder is listed. Log clean-up removes old commit files only, never the latest.
    """
    log_dir = Path(path) / "_delta_log"
    version = last_checkpoint_version(log_dir)
    if version is not None and (log_dir / _commit_name(version)).exists():
        while (log_dir / _commit_name(version + 1)).exists():
            version += 1
        return version
    listed = _log_versions(log_dir)
    return None if listed is None else max(listed[0], default=None)


def _log_versions(log_dir: Path) -> tuple[list[int], list[int]] | None:
    """The versions of the commit files and of the checkpoint files in ``log_dir`` (one listing);
    None without the folder."""
    try:
        names = os.listdir(log_dir)
    except FileNotFoundError:
        return None
    return ([int(n[:20]) for n in names if len(n) == 25 and n.endswith(".json") and n[:20].isdigit()],
            [int(n[:20]) for n in names if ".checkpoint" in n and n[:20].isdigit()])


def never_written(path: Path | str) -> bool:
    """Whether the table holds no row because nothing was ever written to it: its only commit is
    version 0 and adds no file (a table just created empty). Read from the log, no Spark job; False
    for anything else, rows or not."""
    if table_version(path) != 0:
        return False
    lines = _commit_lines(path, 0)  # one action per line, named first (as commit_info reads them)
    return lines is not None and not any(line.startswith('{"add"') for line in lines)


def last_checkpoint_version(log_dir: Path) -> int | None:
    """The version ``_delta_log/_last_checkpoint`` names, or None (no checkpoint yet, unreadable)."""
    try:
        return int(json.loads((log_dir / "_last_checkpoint").read_text())["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cleaned_before(path: Path | str, version: int) -> int | None:
    """The earliest commit the log still holds, when log clean-up (``delta.logRetentionDuration``) has
    removed commit ``version`` and those before it: the commits from ``version`` on can then no longer
    be read one by one (a change-data-feed read from there fails), though a checkpoint stands in for
    them in a snapshot. None when commit ``version`` is there (one ``stat``: the usual case), or when
    it is gone with no checkpoint after it standing in (a damaged log, not a cleaned one)."""
    log_dir = Path(path) / "_delta_log"
    if (log_dir / _commit_name(version)).exists():
        return None
    listed = _log_versions(log_dir)
    if listed is None:
        return None
    commits, checkpoints = listed
    first = min(commits, default=None)
    if first is None or first <= version or not any(c >= first - 1 for c in checkpoints):
        return None
    return first


def table_id(path: Path | str) -> str | None:
    """The table's id (Delta's ``metaData.id``): fixed when the table is created, new when it is deleted
    and created again, whatever its versions. Read from the log's files (no Spark job): the oldest commit
    left, which holds it while log clean-up has not removed version 0, else the latest checkpoint. None
    when there is no table, or neither holds it (an unknown checkpoint format)."""
    found = _metadata_id(_commit_lines(path, 0))  # while log clean-up has left it: no listing
    if found is not None:
        return found
    log_dir = Path(path) / "_delta_log"
    try:
        names = sorted(os.listdir(log_dir))
    except FileNotFoundError:
        return None
    commits = [n for n in names if len(n) == 25 and n.endswith(".json") and n[:20].isdigit()]
    if commits and (found := _metadata_id(_commit_lines(path, int(commits[0][:20])))) is not None:
        return found
    checkpoints = [n for n in names if ".checkpoint." in n and n.endswith(".parquet")]
    if checkpoints:
        import pyarrow.parquet as pq

        last = max(checkpoints, key=lambda n: int(n[:20]))
        for meta in pq.read_table(log_dir / last, columns=["metaData"]).column("metaData").to_pylist():
            if meta and meta.get("id"):
                return meta["id"]
    return None


def inserted_rows(path: Path | str, version: int, columns: Sequence[str]):
    """The rows a plain insert committed as ``version`` of the table, read by pyarrow from the data
    files its JSON commit lists (no Spark job), as a ``pyarrow.Table`` of ``columns``: partition
    columns come from the commit's partition values, as strings; INT96 timestamps are read in µs.
    A commit that added no file gives a table of no rows (its columns of type null).

    None unless the commit only added files: it removed any (then the table is not the version
    before plus these rows), an added file carries a deletion vector or lives outside the table's
    folder, a file lacks one of ``columns`` (say the table maps column names to physical ones), or
    the commit file is gone."""
    from urllib.parse import unquote

    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = _commit_lines(path, version)
    if lines is None:
        return None
    adds = []
    for line in lines:
        action = json.loads(line)
        if "remove" in action:
            return None
        add = action.get("add")
        if add is not None:
            if add.get("deletionVector") or "://" in add["path"] or add["path"].startswith("/"):
                return None
            adds.append(add)
    tables = []
    for add in adds:
        file = Path(path) / unquote(add["path"])
        values = add.get("partitionValues") or {}
        stored = [c for c in columns if c not in values]
        if not set(stored) <= set(pq.read_schema(file).names):
            return None
        table = pq.read_table(file, columns=stored, coerce_int96_timestamp_unit="us")
        for name in columns:
            if name in values:
                table = table.append_column(name, pa.array([values[name]] * table.num_rows, pa.string()))
        tables.append(table.select(list(columns)))
    if not tables:
        return pa.table({c: pa.array([], pa.null()) for c in columns})
    return pa.concat_tables(tables, promote_options="permissive")
