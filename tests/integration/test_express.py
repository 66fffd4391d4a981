"""The express lane (lakehouse.express) against a real stream, real Delta and the embedded Postgres:
its provisional rows equal gold's to the bit, never overwrite a row, and Postgres still converges to
gold (orphans deleted once their file is processed, and after a crash by the next lane)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime, time as clock, timedelta, timezone

import pandas as pd
import pyarrow as pa
import pytest
from pyspark.sql import functions as F

from lakehouse import gold, mirror, streaming
from lakehouse.express import ExpressLane, parse_events, resolve_journal
from lakehouse.generator import GeneratorConfig, generate_backlog
from lakehouse.io import delta, pg_mirror, postgres
from lakehouse.transforms import features
from tests.conftest import pg_rows, write_lines
from tests.integration.inbox_data import BASE, FILE_MTIME, event_line
from tests.integration.test_mirror_convergence import _pg_count, assert_pg_equals_delta, pg  # noqa: F401 -- the fixture

pytestmark = pytest.mark.integration


def _batch(spark, settings, g, lane) -> None:
    """One events micro-batch per inbox file, as the live stream runs them (availableNow)."""
    q = streaming.start_query(spark, settings, "events", once=True, gold=g, express=lane)
    q.awaitTermination()


def _journal(settings) -> pd.DataFrame:
    return pg_rows(settings, pg_mirror.JOURNAL_TABLE, "event_id")


def test_provisional_features_equal_golds_and_postgres_converges(spark, pg):
    # The stream quarantines records over 400 bytes; the lane (its settings differ here on purpose)
    # takes them: the orphans its journal must clean up once the stream has processed their file.
    settings = pg.replace(max_files_per_trigger=1, max_record_bytes=400)
    lane = ExpressLane(settings.replace(max_record_bytes=100_000), keep_published=True)
    g = gold.GoldStream(settings)
    streaming.ensure_tables(spark, settings, ("events",))
    write_lines(settings.events_inbox, "e0.jsonl", [event_line(i) for i in range(100)], mtime=FILE_MTIME)
    lane.bind(spark, g)  # e0 was there at the start: the stream's alone
    assert lane.step() == 0
    _batch(spark, settings, g, lane)
    mirror.mirror_all(spark, settings)
    assert g.express_view() is not None

    # e1 lands: new on-time events of known users (after the first file's watermark), a re-delivery
    # of a mirrored event with other values, and a record the stream will quarantine.
    at = lambda s: (BASE + timedelta(days=2, seconds=s)).strftime("%Y-%m-%dT%H:%M:%SZ")  # noqa: E731
    fresh = [event_line(100 + i, user_id=f"u{i % 7:03d}", event_time=at(i * 13)) for i in range(60)]
    redelivered = event_line(5, amount=999.0)
    # (of its own user, merchant and country: counted in no other event's provisional features)
    orphan = event_line(900, note="x" * 400, event_time=at(40), user_id="u999", merchant_id="m999", country="DE")
    write_lines(settings.events_inbox, "e1.jsonl", fresh + [redelivered, orphan], mtime=FILE_MTIME + 60)
    # e1b, just after: more events of the same users, whose windows hold e1's (not in silver yet), and
    # one of e1's events again (published once, from e1: both files are served in one round)
    later = [event_line(160 + i, user_id=f"u{i % 7:03d}", event_time=at(800 + i * 17)) for i in range(30)]
    write_lines(settings.events_inbox, "e1b.jsonl", later + [fresh[3]], mtime=FILE_MTIME + 61)
    before = pg_rows(settings, "gold_transaction_features", "event_id")
    assert lane.step() == 91  # the 90 new events and the orphan; not the re-delivery
    journal = _journal(settings)
    assert set(journal["event_id"]) == {f"e{100 + i:06d}" for i in range(90)} | {"e000900"}
    assert journal.groupby("source_file").size().to_dict() == {"e1.jsonl": 61, "e1b.jsonl": 30}
    now = pg_rows(settings, "gold_transaction_features", "event_id")
    e5 = lambda df: df[df["event_id"] == "e000005"].drop(columns="mirrored_at").reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(e5(now), e5(before))  # an existing row is never overwritten
    assert lane.step() == 0  # a file is published once
    row = delta.read(spark, settings.table_path("gold_transaction_features")).where(F.col("event_id") == "e000005")
    row = row.toArrow()
    row = row.set_column(row.schema.get_field_index("amount_base"), "amount_base", pa.array([1.0]))
    conn = postgres.connect(settings)
    try:  # even a provisional row the lane would compute for a key Postgres holds is not written
        assert pg_mirror.publish_provisional(conn, settings.pg_schema, lane._table,
                                             row, "x.jsonl") == []
    finally:
        conn.close()
    pd.testing.assert_frame_equal(e5(pg_rows(settings, "gold_transaction_features", "event_id")), e5(before))

    # The stream processes e1 and e1b (nothing published ahead, no mirror yet): gold's rows for the
    # new events equal the provisional ones, feature by feature.
    _batch(spark, settings, g, lane)
    provisional = pa.concat_tables(lane.published_rows).to_pandas().set_index("event_id").sort_index()
    golden = (delta.read(spark, settings.table_path("gold_transaction_features"))
              .where(F.col("event_id").isin(list(provisional.index))).toPandas().set_index("event_id").sort_index())
    assert len(golden) == 90 and "e000900" not in golden.index
    assert golden.loc["e000189", "user_tx_count_5m"] > 1  # counts events of e1 and e1b
    pd.testing.assert_frame_equal(provisional.loc[golden.index, golden.columns], golden, check_dtype=False)
    assert delta.read(spark, settings.table_path("silver_quarantine")).where(
        F.col("record_key") == "e000900").count() == 1

    # The next round resolves e1's journal: the orphan goes, gold's rows stay; the mirror then finds
    # Postgres holding gold's values already.
    lane.step()
    assert _journal(settings).empty
    assert lane.stats["orphans_deleted"] == 1 and lane.stats["entries_resolved"] == 91
    mirror.mirror_all(spark, settings)
    assert assert_pg_equals_delta(spark, settings, tables=("gold_transaction_features",))[
        "gold_transaction_features"] == 190

    # A lane dies (kill -9) with e2 published and not processed; the stream goes on without it, then
    # a new lane starts: the journal left is resolved against silver before anything else.
    write_lines(settings.events_inbox, "e2.jsonl", [event_line(200 + i, event_time=at(900 + i)) for i in range(20)]
                + [event_line(901, note="y" * 400, event_time=at(950))], mtime=FILE_MTIME + 120)
    assert lane.step() == 21
    _batch(spark, settings, g, None)
    write_lines(settings.events_inbox, "e3.jsonl", [event_line(300 + i, event_time=at(1200 + i)) for i in range(10)],
                mtime=FILE_MTIME + 180)
    assert lane.step() == 10  # e3 is published, then the lane dies before the stream takes it
    assert len(_journal(settings)) == 31
    # A restart: a new stream (no kept look-back) and a new lane, which collects a look-back of its own
    # before the stream starts; its first round resolves the journal left.
    g2 = gold.GoldStream(settings)
    lane2 = ExpressLane(settings, keep_published=True)
    lane2.bind(spark, g2)
    lane2.prime()
    assert g2.express_view() is None and lane2.stats["snapshot_seconds"] is not None
    lane2.step()
    assert _journal(settings).empty
    assert lane2.stats["orphans_deleted"] == 11 and lane2.stats["entries_resolved"] == 31  # e901 and e3's
    # e3c lands before the restarted stream's first batch: served from the lane's own look-back (users
    # with rows in silver; a merchant and a country e3, whose rows were deleted, does not have).
    write_lines(settings.events_inbox, "e3c.jsonl",
                [event_line(320 + i, user_id=f"u{20 + i % 7:03d}", merchant_id="m777", country="DE",
                            event_time=at(1300 + i * 7)) for i in range(12)], mtime=FILE_MTIME + 200)
    assert lane2.step() == 12
    _batch(spark, settings, g2, lane2)
    served = pa.concat_tables(lane2.published_rows).to_pandas().set_index("event_id").sort_index()
    golden = (delta.read(spark, settings.table_path("gold_transaction_features"))
              .where(F.col("event_id").isin(list(served.index))).toPandas().set_index("event_id").sort_index())
    assert len(golden) == 12 and (golden["user_tx_count_30d"] > 1).all()  # the users' e0 rows are counted
    pd.testing.assert_frame_equal(served.loc[golden.index, golden.columns], golden, check_dtype=False)
    mirror.mirror_all(spark, settings)
    assert assert_pg_equals_delta(spark, settings, tables=("gold_transaction_features",))[
        "gold_transaction_features"] == 232

    # A live job killed with e4 published and never restarted live: a one-off mirror (`lakehouse
    # mirror`, the end of `stream --once --mirror`) resolves the journal against silver.
    write_lines(settings.events_inbox, "e4.jsonl", [event_line(400 + i, event_time=at(1500 + i)) for i in range(5)],
                mtime=FILE_MTIME + 240)
    assert lane2.step() == 5
    assert resolve_journal(spark, settings) == 5
    assert _journal(settings).empty
    assert assert_pg_equals_delta(spark, settings, tables=("gold_transaction_features",))[
        "gold_transaction_features"] == 232
    lane2.stop()


def _snapshot_and_jobs(spark, g):
    """The lane's first look-back (``express_snapshot``) and the Spark jobs it ran."""
    sc = spark.sparkContext
    sc.setJobGroup("lane-snapshot", "the express lane's first look-back")
    try:
        return g.express_snapshot(spark), sc.statusTracker().getJobIdsForGroup("lane-snapshot")
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)
        sc.setLocalProperty("spark.job.description", None)


def test_before_anything_is_ingested_the_lanes_look_back_is_empty_and_takes_no_spark_job(spark, settings):
    """A new deployment: the lane's look-back is Spark's collection over the empty tables, made in the
    driver (events landing while a JVM runs its first jobs would wait for them); once silver holds
    rows, it is collected by Spark."""
    streaming.ensure_tables(spark, settings)
    g = gold.GoldStream(settings)
    earliest = datetime.combine(gold._today(), clock.min, timezone.utc)
    collected = features.lookback_rows(delta.read(spark, settings.table_path("silver_transactions")), earliest,
                                       g._fraud_only_labels(spark), gold.too_late_ids(spark, settings)).toArrow()
    gold._schemas_of(spark, settings)  # gold's schemas, derived once per process (a job over no rows)
    (kept, mark, schema), jobs = _snapshot_and_jobs(spark, g)
    assert jobs == [] and mark is None
    assert kept.table.num_rows == 0 and collected.num_rows == 0
    assert [(f.name, f.type) for f in kept.table.schema] == [(f.name, f.type) for f in collected.schema]
    assert kept.lo_us == features.lookback_start(earliest) and kept.reports.num_rows == 0
    assert "user_tx_count_5m" in schema.fieldNames()

    write_lines(settings.events_inbox, "e0.jsonl", [event_line(i) for i in range(5)], mtime=FILE_MTIME)
    streaming.run_streams(spark, settings, once=True, kinds=("events",))
    (kept, _, _), jobs = _snapshot_and_jobs(spark, gold.GoldStream(settings))
    assert jobs and sorted(kept.table["event_id"].to_pylist()) == [f"e{i:06d}" for i in range(5)]


def test_a_file_in_a_folder_is_not_taken_for_the_top_level_file_of_its_name(settings):
    """The lane serves the inbox's top-level files, by name, and leaves a file to the stream once a
    micro-batch has processed it. A feed that files by day repeats names in its folders: the stream
    processing ``2026/11/20/part 0.jsonl`` says nothing of the top-level ``part 0.jsonl``."""
    lane = ExpressLane(settings)
    inbox = settings.events_inbox
    nested = write_lines(inbox / "2026" / "11" / "20", "part 0.jsonl", [event_line(1)], mtime=FILE_MTIME)
    top = write_lines(inbox, "part 0.jsonl", [event_line(2)], mtime=FILE_MTIME + 1)
    lane.processed([nested.as_uri()])  # as Spark names it (file:///..., the space escaped)
    assert [name for name, _, _ in lane._new_files()] == ["part 0.jsonl"]
    assert lane.stats["files_left_to_stream"] == 0
    # Processed itself before the lane looked: the stream's alone.
    late = write_lines(inbox, "part 1.jsonl", [event_line(3)], mtime=FILE_MTIME + 2)
    lane.processed([top.as_uri(), "file:" + str(late)])
    assert list(lane._new_files()) == [] and lane.stats["files_left_to_stream"] == 1


def test_the_lane_never_takes_a_line_silver_quarantines_and_reads_the_rest_as_silver(spark, settings, tmp_path):
    """On a generated feed (broken JSON, wrong types, missing fields, re-deliveries, late events), every
    event the lane reads from a file is the very row silver inserted from it, or a re-delivery of an
    event silver holds: it never publishes a line silver quarantined."""
    summary = generate_backlog(settings.events_inbox, settings.labels_inbox, GeneratorConfig(
        seed=11, n_users=300, n_events=6000, days=1.0, malformed_rate=0.05, duplicate_rate=0.05))
    assert summary["malformed"] > 100
    streaming.run_streams(spark, settings, once=True, kinds=("events",))
    silver = delta.read(spark, settings.table_path("silver_transactions")).select(
        "event_id", "user_id", "merchant_id", "country", "amount_base", F.unix_micros("event_time").alias("_t"),
        "source_file").toPandas()
    silver["file"] = silver["source_file"].map(lambda p: p.rsplit("/", 1)[-1])
    by_id = silver.set_index("event_id")
    read = same = left_out = 0
    for f in sorted(settings.events_inbox.iterdir()):
        rows, n_out = parse_events(f.read_bytes(), f.stat().st_mtime_ns // 1_000_000, settings)
        left_out += n_out
        for r in rows:
            read += 1
            assert r["event_id"] in by_id.index, f"{r['event_id']} of {f.name}: silver does not hold it"
            s = by_id.loc[r["event_id"]]
            if s["file"] == f.name:  # the delivery silver kept: the same values to the bit
                assert (s["user_id"], s["merchant_id"], s["country"], s["amount_base"], s["_t"]) == (
                    r["user_id"], r["merchant_id"], r["country"], r["amount_base"], r["_t"]), r["event_id"]
                same += 1
    assert same == len(silver)  # every silver row was read by the lane, from the file silver took it from
    assert left_out >= summary["malformed"]


def _journal_count(settings) -> int:
    return _pg_count(settings, pg_mirror.JOURNAL_TABLE)


@pytest.mark.slow
def test_kill_9_while_provisional_rows_are_journaled_then_the_next_lane_resolves_them(spark, pg, tmp_path):
    """The live job (``stream --mirror``, express lane on) is killed with -9 while Postgres holds
    provisional rows of a file the stream has not processed; the restarted job's lane resolves the
    journal left, and Postgres ends equal to gold, row for row."""
    settings = pg
    write_lines(settings.events_inbox, "e0.jsonl", [event_line(i) for i in range(200)], mtime=FILE_MTIME)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LAKEHOUSE_")},
           "LAKEHOUSE_DATA": str(settings.data_root), "LAKEHOUSE_SPARK_MASTER": "local[2]",
           "LAKEHOUSE_SHUFFLE_PARTITIONS": "2", "LAKEHOUSE_STREAM_GOLD": "1", "LAKEHOUSE_STREAM_SCORING": "0",
           "PYTHONUNBUFFERED": "1"}
    live = [sys.executable, "-m", "lakehouse.cli", "stream", "--mirror", "--trigger-seconds", "1", "--only", "events"]
    log = tmp_path / "live.log"
    at = lambda s: (BASE + timedelta(days=2, seconds=s)).strftime("%Y-%m-%dT%H:%M:%SZ")  # noqa: E731
    with log.open("a") as out:
        proc = subprocess.Popen(live, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 300
            while time.time() < deadline and proc.poll() is None and "events batch    0" not in log.read_text():
                time.sleep(0.1)  # e0's batch is over: the lane serves from the look-back the stream kept
            write_lines(settings.events_inbox, "e1.jsonl", [event_line(300 + i, event_time=at(i)) for i in range(50)],
                        mtime=FILE_MTIME + 60)
            while time.time() < deadline and proc.poll() is None and _journal_count(settings) == 0:
                time.sleep(0.02)
            assert proc.poll() is None, log.read_text()[-3000:]
            journaled = _journal_count(settings)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert journaled == 50, log.read_text()[-3000:]
    assert _journal_count(settings) == 50  # left by the dead lane
    # the restarted live job: its lane resolves what was left, the stream processes e1; then a clean stop
    with log.open("a") as out:
        proc = subprocess.Popen(live, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 300
            path = settings.table_path("gold_transaction_features")
            while time.time() < deadline and proc.poll() is None and not (
                    _journal_count(settings) == 0 and delta.read(spark, path).count() == 250):
                time.sleep(0.5)
            time.sleep(3)  # a mirror round
            os.kill(proc.pid, signal.SIGTERM)  # a clean stop (the job's own JVM is left to it)
            assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert "50 provisional rows left by an earlier run resolved against silver" in text, text[-3000:]
    assert _journal_count(settings) == 0
    assert assert_pg_equals_delta(spark, settings)["gold_transaction_features"] == 250
