"""Delta maintenance and the data-quality summary on real Delta tables fed by the real stream."""

from __future__ import annotations

import os
import shutil
from datetime import datetime, timedelta, timezone

import pytest
from delta.tables import DeltaTable

from lakehouse import dq_summary, maintenance, streaming
from lakehouse.config import Settings
from lakehouse.io import delta
from lakehouse.io import maintenance as mio
from tests.conftest import write_lines
from tests.integration.inbox_data import FILE_MTIME, event_line

NOW = datetime(2026, 11, 29, 3, 0, tzinfo=timezone.utc)


def test_retention_keeps_the_oldest_pinned_commit():
    assert maintenance.retention_hours(None, NOW) == 168
    assert maintenance.retention_hours(NOW - timedelta(hours=2), NOW) == 168  # floor: Delta's default
    assert maintenance.retention_hours(NOW - timedelta(days=10), NOW) == 241  # 240 h old + 1 h slack
    assert maintenance.retention_hours(NOW - timedelta(days=10, minutes=1), NOW) == 242  # rounded up
    assert maintenance.retention_hours(NOW - timedelta(minutes=30), NOW, minimum=0) == 2


def test_interval_parsing():
    assert mio._interval_hours("interval 30 days") == 720
    assert mio._interval_hours("interval 1 week") == 168
    assert mio._interval_hours("INTERVAL 36 HOURS") == 36
    assert mio._interval_hours(None) is None


def test_compaction_candidates_are_partitions_in_scope_with_two_files_on_disk(tmp_path):
    def touch(*parts):
        f = tmp_path.joinpath(*parts)
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x")

    touch("_delta_log", "00000000000000000000.json")
    touch("event_date=2026-11-27", "a.parquet")
    touch("event_date=2026-11-28", "a.parquet")
    touch("event_date=2026-11-29", "a.parquet")
    touch("event_date=2026-11-29", "b.parquet")  # today: out of the scope
    touch("_change_data", "event_date=2026-11-28", "cdc-1.parquet")  # change files are never compacted
    assert mio.compaction_candidates(tmp_path, "event_date", "2026-11-29") == 0
    assert mio.compaction_candidates(tmp_path, "event_date", "2026-11-30") == 1
    assert mio.compaction_candidates(tmp_path) == 1  # no date partition: the whole table is in scope
    assert mio.compaction_candidates(tmp_path, "event_date") == 1  # no bound: every day is in scope
    assert mio.data_files(tmp_path) == 5  # change-data files are data files on disk all the same
    touch("event_date=2026-11-28", "b.parquet")  # a second file (live, or tombstoned but still on disk)
    assert mio.compaction_candidates(tmp_path, "event_date", "2026-11-29") == 1
    touch("deletion_vector_0b1c.bin")  # OPTIMIZE may rewrite a single file to purge its deleted rows
    assert mio.compaction_candidates(tmp_path, "event_date", "2026-11-29") is None


def _scan(spark, path, version) -> int:
    """Rows of a version, read from its data files (count() alone may be answered from the log)."""
    return len(delta.read(spark, path, version=version).select("event_id", "amount").collect())


@pytest.fixture(scope="module")
def fed(spark, tmp_path_factory):
    """Three micro-batches into silver (one file each), with one malformed record and re-deliveries.
    Streamed once for the module; the test that compacts and vacuums runs last."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAKEHOUSE_")}
    env.update(LAKEHOUSE_DATA=str(tmp_path_factory.mktemp("maint") / "data"), LAKEHOUSE_SHUFFLE_PARTITIONS="2",
               LAKEHOUSE_SPARK_MASTER="local[2]", LAKEHOUSE_MAX_FILES_PER_TRIGGER="1",
               LAKEHOUSE_STREAM_GOLD="0")
    settings = Settings.from_env(env)
    for f in range(3):
        lines = [event_line(i) for i in range(f * 100, f * 100 + 100)] + [event_line(f * 100)]
        if f == 1:
            lines.append('{"event_id": "broken"')
        write_lines(settings.events_inbox, f"part-{f}.jsonl", lines, mtime=FILE_MTIME + f)
    streaming.run_streams(spark, settings, once=True, kinds=("events",))
    return settings


@pytest.mark.integration
def test_dq_summary_counts_every_batch(spark, fed, local_time_zone_new_york):
    now = datetime.now(timezone.utc)
    today = now.date()
    s = dq_summary.summarize(spark, fed, today - timedelta(days=1), today)
    ev = s["streams"]["events"]
    assert ev["batches"] == 3 and ev["reconciled_batches"] == 3 and s["all_reconciled"]
    assert ev["records_in"] == 304 and ev["inserted"] == 300 and ev["duplicates"] == 3
    assert ev["quarantined"] == 1 and ev["failed_checks"] == {"record_is_valid_json": 1}
    assert any("reconciled 3/3" in line for line in dq_summary.render_text(s))
    # When the batches ran, as UTC instants whatever the local time zone
    first, last = (datetime.fromisoformat(ev[k]) for k in ("first_batch_at", "last_batch_at"))
    assert now - timedelta(hours=1) < first <= last <= now
    older = dq_summary.summarize(spark, fed, today - timedelta(days=9), today - timedelta(days=8))
    assert older["streams"] == {} and older["batches"] == 0


@pytest.mark.integration
def test_dry_run_changes_nothing_and_skips_missing_tables(spark, fed):
    path = fed.table_path("silver_transactions")
    version = delta.table_version(path)
    reports = maintenance.maintain(spark, fed, dry_run=True, pins={})
    names = {r.table for r in reports}
    assert {"silver_transactions", "bronze_events", "silver_dq_batches"} <= names
    assert "gold_transaction_features" not in names  # no such table yet: skipped
    assert all(r.retention_hours == 168 for r in reports)
    assert delta.table_version(path) == version
    with pytest.raises(KeyError):
        maintenance.maintain(spark, fed, tables=["nope"], pins={})


@pytest.mark.integration
def test_commit_times_are_utc_in_any_local_time_zone(spark, fed, local_time_zone_new_york):
    # Retention (VACUUM keeps pinned versions) and training's time travel both read commit times.
    from lakehouse.ml import dataset

    path = fed.table_path("silver_transactions")
    commits = mio.commit_timestamps(spark, path)
    now = datetime.now(timezone.utc)
    assert all(now - timedelta(hours=1) < at <= now for at in commits.values()), commits
    assert dataset.version_at(spark, path, now) == max(commits)
    with pytest.raises(dataset.DatasetError):
        dataset.version_at(spark, path, min(commits.values()) - timedelta(seconds=1))


@pytest.mark.integration
def test_compaction_keeps_rows_and_vacuum_keeps_pinned_version(spark, fed):
    settings = fed
    path = settings.table_path("silver_transactions")
    first_version = min(mio.commit_timestamps(spark, path))
    rows_at_first = _scan(spark, path, first_version + 1)  # after the first batch
    pinned = first_version + 1
    before = delta.read(spark, path).count()
    live_files = mio.detail(spark, path)["numFiles"]
    assert before == 300 and live_files >= 3

    # Below Delta's 168 h floor only with its safety check off, so that the test need not wait a week.
    spark.conf.set("spark.databricks.delta.retentionDurationCheck.enabled", "false")
    try:
        reports = maintenance.maintain(spark, settings, tables=["silver_transactions"], minimum_hours=0,
                                       pins={"silver_transactions": [("model", pinned)]})
        r = reports[0]
        assert r.compacted_files_removed >= 3 and r.compacted_files_added < r.compacted_files_removed
        assert r.pinned_version == pinned and r.pinned_by == ["model"] and r.retention_hours >= 1
        assert r.compaction_scope.startswith("`event_date` <")
        assert r.vacuum_files_deleted == 0 and r.vacuum_skipped  # the table is younger than the retention
        assert mio.vacuum(spark, path, r.retention_hours) == 0  # Delta's own VACUUM agrees: all still needed
        assert delta.read(spark, path).count() == before
        assert mio.detail(spark, path)["numFiles"] < live_files
        assert _scan(spark, path, pinned) == rows_at_first  # time travel works
        props = mio.detail(spark, path)["properties"]
        assert props["delta.logRetentionDuration"] == "interval 30 days"

        # Without the pin, the same VACUUM removes the compacted-away files: the old version is gone.
        r2 = maintenance.maintain(spark, settings, tables=["silver_transactions"], minimum_hours=0, pins={})[0]
        assert r2.vacuum_skipped is None and r2.vacuum_files_deleted >= 3 and r2.log_retention_set is None
        assert delta.read(spark, path).count() == before
        with pytest.raises(Exception, match="(?i)not found|does not exist|FileNotFound|FAILED_READ_FILE"):
            _scan(spark, path, pinned)

        # Now every partition holds one file on disk: the next run skips OPTIMIZE (VACUUM still logs its run).
        version = delta.table_version(path)
        r3 = maintenance.maintain(spark, settings, tables=["silver_transactions"], minimum_hours=0, pins={})[0]
        assert r3.compaction_skipped and r3.compacted_files_removed == r3.compacted_files_added == 0
        assert r2.compaction_skipped is None  # r2 still had the compacted-away files on disk
        ops = {r[0] for r in DeltaTable.forPath(spark, str(path)).history()
               .where(f"version > {version}").select("operation").collect()}
        assert ops <= {"VACUUM START", "VACUUM END"} and r3.files_after == r3.files_before  # no OPTIMIZE
        assert delta.read(spark, path).count() == before
    finally:
        spark.conf.unset("spark.databricks.delta.retentionDurationCheck.enabled")



def test_the_latest_version_and_the_id_are_read_without_listing_a_long_log(spark, tmp_path, monkeypatch):
    """A streaming table keeps a commit per micro-batch for 30 days: table_version probes the commits
    after the last checkpoint and table_id reads version 0, neither lists the folder; without a
    checkpoint pointer (or with a stale one) the answers are the same."""
    path = tmp_path / "t"
    spark.range(3).write.format("delta").option("delta.checkpointInterval", "3").save(str(path))
    for i in range(7):  # versions 1..7, checkpoints at 3 and 6
        spark.range(i, i + 1).write.format("delta").mode("append").save(str(path))
    log_dir = path / "_delta_log"
    latest = spark.sql(f"DESCRIBE HISTORY delta.`{path}`").agg({"version": "max"}).first()[0]
    assert latest == 7 and (log_dir / f"{6:020d}.checkpoint.parquet").exists()
    first = delta.table_id(path)
    listed = []
    real_listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda p=".": listed.append(p) or real_listdir(p))
    assert delta.table_version(path) == 7 and delta.table_id(path) == first
    assert listed == []
    pointer = (log_dir / "_last_checkpoint").read_text()
    (log_dir / "_last_checkpoint").write_text(pointer.replace('"version":6', '"version":3'))  # stale
    assert delta.table_version(path) == 7 and listed == []
    (log_dir / "_last_checkpoint").unlink()
    assert delta.table_version(path) == 7 and len(listed) == 1
    (log_dir / "_last_checkpoint").write_text(pointer)
    spark.range(9, 10).write.format("delta").mode("append").save(str(path))
    assert delta.table_version(path) == 8


def test_a_table_id_survives_log_clean_up_and_changes_when_the_table_is_created_again(spark, tmp_path):
    path = tmp_path / "t"
    assert delta.table_id(path) is None
    spark.range(3).write.format("delta").option("delta.checkpointInterval", "2").save(str(path))
    first = delta.table_id(path)
    assert first and len(first) == 36  # a UUID
    for i in range(4):  # a checkpoint at versions 2 and 4
        spark.range(i, i + 1).write.format("delta").mode("append").save(str(path))
    log_dir = path / "_delta_log"
    assert (log_dir / f"{4:020d}.checkpoint.parquet").exists()
    for v in range(4):  # what log clean-up leaves: the latest checkpoint and the commits after it
        (log_dir / f"{v:020d}.json").unlink()
    assert delta.table_id(path) == first
    shutil.rmtree(path)
    spark.range(3).write.format("delta").save(str(path))
    assert delta.table_id(path) not in (None, first)


def _tasks_of_jobs_in(spark, group: str) -> list[int]:
    """The number of tasks of each stage the jobs of ``group`` ran."""
    tracker = spark.sparkContext.statusTracker()
    stages = [s for j in tracker.getJobIdsForGroup(group) for s in (tracker.getJobInfo(j).stageIds or [])]
    return [info.numTasks for s in stages if (info := tracker.getStageInfo(s)) is not None]


def test_vacuum_lists_a_table_in_a_few_tasks_per_core_unless_the_session_says(spark, tmp_path):
    # Delta's VACUUM spreads its listing over spark.sql.sources.parallelPartitionDiscovery.parallelism
    # tasks per folder level, 10,000 unless set: 20 to 40 s of empty tasks on 2 cores, for 4 files.
    path = tmp_path / "t"
    for day in ("2026-11-01", "2026-11-02"):
        spark.range(3).selectExpr("id", f"date'{day}' as event_date").write.format("delta") \
            .partitionBy("event_date").mode("append").save(str(path))
    spark.conf.set("spark.databricks.delta.retentionDurationCheck.enabled", "false")
    try:
        spark.sparkContext.setJobGroup("vacuum-default", "vacuum")
        DeltaTable.forPath(spark, str(path)).delete("event_date = '2026-11-01'")  # one file to delete
        assert mio.vacuum(spark, path, 0) >= 1
        tasks = _tasks_of_jobs_in(spark, "vacuum-default")
        cores = spark.sparkContext.defaultParallelism
        assert tasks and max(tasks) == mio.LISTING_TASKS_PER_CORE * cores
        assert spark.conf.get(mio.LISTING_PARALLELISM, None) is None  # the session's setting is left as it was

        spark.conf.set(mio.LISTING_PARALLELISM, "3")  # the session's own choice is kept
        spark.sparkContext.setJobGroup("vacuum-set", "vacuum")
        assert mio.vacuum(spark, path, 0) == 0
        assert max(_tasks_of_jobs_in(spark, "vacuum-set")) == 3
        assert spark.conf.get(mio.LISTING_PARALLELISM) == "3"
    finally:
        spark.sparkContext.setLocalProperty("spark.jobGroup.id", None)
        spark.conf.unset(mio.LISTING_PARALLELISM)
        spark.conf.unset("spark.databricks.delta.retentionDurationCheck.enabled")
    assert sorted(r[0] for r in delta.read(spark, path).select("id").collect()) == [0, 1, 2]
