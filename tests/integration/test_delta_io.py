"""Delta I/O helpers on real tables: MERGE bounds that let Delta skip files, and the rows of a
plain insert read from its commit's files, a table never written, and MERGEs run in parallel."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from pyspark.sql import functions as F

from lakehouse.io import delta
from lakehouse.io import maintenance as mio

pytestmark = pytest.mark.integration

SCHEMA = "k string, ts timestamp, d date, v long"
NOON = datetime(2026, 11, 20, 12, 0, 0, 1, tzinfo=timezone.utc)


def _rows(spark, path):
    return sorted((r["k"], r["ts"].astimezone(timezone.utc), r["v"]) for r in delta.read(spark, path).collect())


def test_an_upsert_bounded_by_a_span_matches_its_rows_in_any_local_time_zone(spark, tmp_path, local_time_zone_new_york):
    # The span is written as a UTC literal to the µs: were it taken in the process's (New York) time,
    # k1 would fall outside it, fail to match and be inserted a second time.
    path = str(tmp_path / "t")
    for k, ts in (("k1", NOON), ("k2", NOON + timedelta(hours=6))):  # one file each
        spark.createDataFrame([(k, ts, ts.date(), 1)], SCHEMA).write.format("delta").mode("append") \
            .partitionBy("d").save(path)
    later = NOON + timedelta(minutes=30)
    source = spark.createDataFrame([("k1", NOON, NOON.date(), 2), ("k3", later, later.date(), 3)], SCHEMA)
    new_york = ZoneInfo("America/New_York")
    delta.merge_upsert(spark, source, path, ["k"], {"d": [str(NOON.date())]},
                       {"ts": (NOON.astimezone(new_york), later.astimezone(new_york))})
    assert _rows(spark, path) == [("k1", NOON, 2), ("k2", NOON + timedelta(hours=6), 1), ("k3", later, 3)]


def test_the_rows_of_a_plain_insert_are_read_from_its_commit(spark, tmp_path):
    path = str(tmp_path / "t")
    first = spark.createDataFrame([("k1", NOON, NOON.date(), 1)], SCHEMA)
    first.write.format("delta").partitionBy("d").save(path)
    more = spark.createDataFrame([("k2", NOON, NOON.date(), 2), ("k3", NOON + timedelta(days=1),
                                  (NOON + timedelta(days=1)).date(), 3)], SCHEMA)
    more.write.format("delta").mode("append").save(path)
    rows = delta.inserted_rows(path, 1, ("k", "ts", "d", "v")).sort_by("k")
    assert rows["k"].to_pylist() == ["k2", "k3"] and rows["v"].to_pylist() == [2, 3]
    assert rows["d"].to_pylist() == [str(NOON.date()), str((NOON + timedelta(days=1)).date())]
    assert rows["ts"].cast("int64").to_pylist()[0] == int(NOON.timestamp()) * 1_000_000 + 1

    # A commit that rewrote a file is not a plain insert: the table is not the version before plus it.
    delta.merge_upsert(spark, more.withColumn("v", F.lit(9).cast("long")), path, ["k"])
    assert delta.inserted_rows(path, 2, ("k", "v")) is None
    assert delta.inserted_rows(path, 1, ("k", "no_such_column")) is None
    assert delta.inserted_rows(path, 99, ("k",)) is None  # no such commit


def test_a_features_table_made_before_deletion_vectors_gets_them_and_its_upserts_copy_nothing(spark, settings):
    from lakehouse import gold

    schema = "event_id string, event_time timestamp, event_date date, v long"
    path = settings.table_path("gold_transaction_features")
    # As an older release created it: change data feed only, no deletion vectors.
    struct = spark.createDataFrame([], schema).schema
    delta.ensure_table(spark, path, struct, partition_by=("event_date",), properties=gold._CDF)
    later = NOON + timedelta(hours=1)
    spark.createDataFrame([("k1", NOON, NOON.date(), 1), ("k2", later, later.date(), 1)], schema) \
        .coalesce(1).write.format("delta").mode("append").save(str(path))  # one file

    gold.ensure_gold_tables(spark, settings, {"gold_transaction_features": struct})
    props = mio.detail(spark, path)["properties"]
    assert props["delta.enableDeletionVectors"] == "true" and props["delta.enableChangeDataFeed"] == "true"

    before = delta.table_version(path)
    with delta.idempotent_dml(spark, "dv-test", 0):
        delta.merge_upsert(spark, spark.createDataFrame([("k1", NOON, NOON.date(), 2)], schema), path,
                           ["event_id"], {"event_date": [str(NOON.date())]}, {"event_time": (NOON, NOON)})
    metrics = delta.commit_metrics(path, "dv-test", 0)
    # The file is not rewritten (without deletion vectors k2 would be copied): k1 is marked deleted in it.
    assert metrics["numTargetRowsUpdated"] == 1 and metrics["numTargetRowsCopied"] == 0
    assert metrics["numTargetDeletionVectorsAdded"] == 1
    rows = sorted((r["event_id"], r["v"]) for r in delta.read(spark, path).collect())
    assert rows == [("k1", 2), ("k2", 1)]
    # The mirror reads the change data feed: one update, pre- and post-image, nothing else.
    changes = (spark.read.format("delta").option("readChangeFeed", "true").option("startingVersion", before + 1)
               .load(str(path)).select("event_id", "_change_type", "v").collect())
    assert sorted(tuple(r) for r in changes) == [("k1", "update_postimage", 2), ("k1", "update_preimage", 1)]


def test_a_table_never_written_is_told_from_its_log_and_any_write_ends_it(spark, tmp_path):
    from pyspark.sql.types import StructType

    path = str(tmp_path / "t")
    assert not delta.never_written(path)  # no table
    delta.ensure_table(spark, path, StructType.fromDDL(SCHEMA), ("d",))
    assert delta.never_written(path)
    empty = spark.createDataFrame([], SCHEMA)
    delta.append_once(empty, path, "app", 0)  # a commit that adds no row is still a write
    assert not delta.never_written(path) and delta.read(spark, path).count() == 0

    other = str(tmp_path / "u")  # created with rows in its first commit
    spark.createDataFrame([("k1", NOON, NOON.date(), 1)], SCHEMA).write.format("delta").save(other)
    assert delta.table_version(other) == 0 and not delta.never_written(other)


def test_merges_in_parallel_each_keep_their_own_transaction_id(spark, tmp_path):
    # Two idempotent MERGEs at once, into two tables, with different transaction ids: each commit
    # carries its own (were the session shared, one would take the other's id or lose it), so a
    # second run of both writes nothing.
    paths = [str(tmp_path / name) for name in ("a", "b")]
    for path in paths:
        spark.createDataFrame([("k0", NOON, NOON.date(), 0)], SCHEMA).write.format("delta").save(path)

    def upsert(path, app, batch, value):
        def step(session):
            source = session.createDataFrame([("k1", NOON, NOON.date(), value)], SCHEMA)
            with delta.idempotent_dml(session, app, batch):
                delta.merge_upsert(session, source, path, ["k"])
            return path
        return step

    steps = [upsert(paths[0], "app-a", 3, 1), upsert(paths[1], "app-b", 7, 2)]
    assert delta.in_parallel(spark, *steps) == paths
    assert delta.commit_info(paths[0], 1)["userMetadata"] == delta.commit_tag("app-a", 3)
    assert delta.commit_info(paths[1], 1)["userMetadata"] == delta.commit_tag("app-b", 7)
    assert spark.conf.get(delta.TXN_APP_ID, None) is None  # the caller's session is left clean
    delta.in_parallel(spark, *steps)  # a replay: both skipped
    assert [delta.table_version(p) for p in paths] == [1, 1]
    assert _rows(spark, paths[1]) == [("k0", NOON, 0), ("k1", NOON, 2)]

    def fails(_session):
        raise ValueError("step two failed")
    with pytest.raises(ValueError, match="step two failed"):
        delta.in_parallel(spark, upsert(paths[0], "app-a", 4, 5), fails)
    assert _rows(spark, paths[0]) == [("k0", NOON, 0), ("k1", NOON, 5)]  # the other step still ran to its end
