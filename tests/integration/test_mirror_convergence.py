"""Postgres converges to gold: beside a stream during a Postgres outage, and after a kill -9 of the
job that streams and mirrors. Real stream, real embedded Postgres, compared row for row."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import date, datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from pyspark.sql import functions as F

from lakehouse import gold, mirror, streaming
from lakehouse.config import TABLES
from lakehouse.io import delta, postgres
from tests.conftest import pg_rows, stop_postgres, write_lines
from tests.integration.inbox_data import BASE, FILE_MTIME, event_line, label_line

pytestmark = pytest.mark.integration


@pytest.fixture
def pg(settings):
    settings = settings.replace(stream_gold=True)
    postgres.start(settings)
    yield settings
    stop_postgres(settings)


def assert_pg_equals_delta(spark, settings, tables=None) -> dict[str, int]:
    """Every mirrored table (of ``tables``, default all) that exists in Delta equals its Postgres copy,
    row for row."""
    compared = {}
    for name, spec in mirror.MIRRORED_TABLES.items():
        if name not in TABLES or not delta.is_delta_table(settings.table_path(name)) or name not in (tables or [name]):
            continue
        path = settings.table_path(name)
        key = list(spec["key"])
        df = mirror.as_json(delta.read(spark, path))
        want = df.toPandas().sort_values(key).reset_index(drop=True)
        got = pg_rows(settings, name, ", ".join(f'"{k}"' for k in key))
        assert "mirrored_at" in got.columns
        got = got[list(want.columns)]
        for col in want.columns:
            if pd.api.types.is_datetime64_any_dtype(got[col]):  # timestamptz arrives aware
                got[col] = got[col].dt.tz_convert("UTC").dt.tz_localize(None)
            if len(want) and isinstance(want[col].dropna().iloc[0] if want[col].notna().any() else None, date) \
                    and not pd.api.types.is_datetime64_any_dtype(want[col]):
                got[col] = pd.to_datetime(got[col]).dt.date
            if pd.api.types.is_float_dtype(want[col]):
                got[col] = pd.to_numeric(got[col]).astype("float64")
            if len(got) and isinstance(got[col].dropna().iloc[0] if got[col].notna().any() else None, dict):
                got[col] = got[col].map(lambda v: None if v is None else json.loads(json.dumps(v)))
                want[col] = want[col].map(lambda v: None if v is None else json.loads(v))
        pd.testing.assert_frame_equal(got.reset_index(drop=True), want, check_dtype=False, obj=name)
        compared[name] = len(want)
    return compared


def test_stream_goes_on_while_postgres_is_down_and_the_mirror_catches_up(spark, pg):
    settings = pg.replace(max_files_per_trigger=1)
    postgres.stop(settings)
    messages: list[str] = []
    loop = mirror.MirrorLoop(spark, settings, interval=0.5, max_backoff=2.0, report=messages.append)
    publisher = mirror.Publisher(settings, report=messages.append, pause=0.0)
    loop.start()
    publisher.start()
    try:
        for f in range(2):
            write_lines(settings.events_inbox, f"e{f}.jsonl", [event_line(100 * f + i) for i in range(100)],
                        mtime=FILE_MTIME + f)
        write_lines(settings.labels_inbox, "l.jsonl", [label_line(i) for i in range(0, 200, 9)], mtime=FILE_MTIME)
        streaming.run_streams(spark, settings, once=True, publish=publisher.submit)  # not blocked by the outage
        assert delta.read(spark, settings.table_path("gold_transaction_features")).count() == 200
        publisher.stop()
        # The mirror and the publisher failed meanwhile; the stream did not wait for either.
        assert loop.last_error is not None and publisher.last_error is not None
        assert publisher.dropped == 4 and publisher.published == 0  # two tables of two batches
        rounds = loop.rounds
        postgres.start(settings)
        deadline = time.time() + 180
        while (loop.last_error is not None or loop.rounds == rounds) and time.time() < deadline:
            time.sleep(0.5)
        assert loop.last_error is None and loop.rounds > rounds
        # Postgres loses a table behind the loop's back (a restore, a reset) while Delta stands
        # still: the loop's periodic full check against the ledger brings it back.
        loop.FULL_CHECK_EVERY = 3
        conn = postgres.connect(settings)
        with conn, conn.cursor() as cur:
            cur.execute(f"drop table {settings.pg_schema}.gold_transaction_features")
            cur.execute(f"delete from {settings.pg_schema}._mirror_ledger where table_name = 'gold_transaction_features'")
        conn.close()

        def pg_count() -> int | None:
            try:
                return len(pg_rows(settings, "gold_transaction_features", "event_id"))
            except Exception:  # noqa: BLE001 -- not recreated yet
                return None

        deadline = time.time() + 60
        while time.time() < deadline and pg_count() != 200:
            time.sleep(0.5)
        assert pg_count() == 200
    finally:
        loop.stop(final_round=True)
    assert any("retrying" in m for m in messages) and any("back" in m for m in messages)
    assert any(m.startswith("publish: ") and "through the mirror" in m for m in messages)
    compared = assert_pg_equals_delta(spark, settings)
    assert compared["gold_transaction_features"] == 200 and compared["silver_dq_batches"] == 3


def test_each_batch_publishes_its_gold_rows_ahead_and_the_mirror_finds_them_equal(spark, pg):
    settings = pg.replace(max_files_per_trigger=1)
    write_lines(settings.events_inbox, "e0.jsonl", [event_line(i) for i in range(100)], mtime=FILE_MTIME)
    # The second batch: new events, a re-delivery, and on-time late events (8 min behind the watermark,
    # BASE + 61 min) of users seen before: earlier transactions and windows of theirs are recomputed.
    late = [event_line(500 + i, user_id=f"u{i:03d}", event_time=(BASE + timedelta(seconds=3_180 + i))
                       .strftime("%Y-%m-%dT%H:%M:%SZ")) for i in range(10)]
    write_lines(settings.events_inbox, "e1.jsonl", [event_line(100 + i) for i in range(100)] + [event_line(7)] + late,
                mtime=FILE_MTIME + 1)
    publisher = mirror.Publisher(settings)
    publisher.start()
    streaming.run_streams(spark, settings, once=True, kinds=("events",), publish=publisher.submit)
    publisher.stop()
    assert publisher.last_error is None and publisher.skipped == publisher.dropped == 0
    # No mirror ran: Postgres holds gold's rows because each batch published them, recomputed rows too.
    published = ("gold_transaction_features", "gold_user_features_5m")
    compared = assert_pg_equals_delta(spark, settings, tables=published)
    assert compared["gold_transaction_features"] == 210
    assert publisher.published > 210 + compared["gold_user_features_5m"]  # some rows published twice
    assert pg_rows(settings, "_mirror_ledger", "table_name").empty
    # A replayed batch whose gold writes committed before a crash keeps the first run's rows in Delta
    # (its MERGEs are skipped), so it publishes nothing; a batch not written yet does.
    app_id = streaming.app_id_for(settings.checkpoint("events"), "events", settings.events_inbox)
    calls: list[tuple] = []
    stream = gold.GoldStream(settings, publish=lambda *args: calls.append(args))
    stream._ensure(spark)
    rows = pa.table({"event_id": ["e000001"]})
    stream._publish_ahead({"gold_transaction_features": rows}, app_id, 1)
    assert calls == []
    stream._publish_ahead({"gold_transaction_features": rows}, app_id, 2)
    path = settings.table_path("gold_transaction_features")
    assert [(c[0], c[1], c[3]) for c in calls] == [("gold_transaction_features", rows, delta.table_version(path))]
    # The mirror then applies every Delta version through its ledger: the published rows are gold's.
    changed = {r["table"]: r.get("rows") for r in mirror.mirror_all(spark, settings)}
    assert changed["gold_transaction_features"] == changed["gold_user_features_5m"] == 0
    assert changed["silver_dq_batches"] == 2
    assert assert_pg_equals_delta(spark, settings)["gold_transaction_features"] == 210


def test_after_a_stream_reset_postgres_converges_to_the_rebuilt_tables(spark, pg):
    from lakehouse.cli import reset_stream

    settings = pg.replace(max_files_per_trigger=1)
    for f in range(3):
        write_lines(settings.events_inbox, f"e{f}.jsonl", [event_line(100 * f + i) for i in range(60)],
                    mtime=FILE_MTIME + f)
    streaming.run_streams(spark, settings, once=True, kinds=("events",))
    mirror.mirror_all(spark, settings)
    assert assert_pg_equals_delta(spark, settings)["gold_transaction_features"] == 180
    # The operator drops a bad file and rebuilds: every table starts again at version 0, with fewer
    # batches (versions) than the ledger has applied, and without the dropped file's rows.
    (settings.events_inbox / "e2.jsonl").unlink()
    reset_stream(settings)
    streaming.run_streams(spark, settings, once=True, kinds=("events",))
    results = {r["table"]: r for r in mirror.mirror_all(spark, settings)}
    assert results["gold_transaction_features"].get("replaced") and results["silver_dq_batches"].get("replaced")
    compared = assert_pg_equals_delta(spark, settings)
    assert compared["gold_transaction_features"] == 120 and compared["silver_dq_batches"] == 2


def _pg_count(settings, name: str) -> int:
    """Rows in the Postgres copy of ``name`` (0 while the table does not exist yet)."""
    try:
        conn = postgres.connect(settings)
    except Exception:  # noqa: BLE001 - the server is starting
        return 0
    try:
        with conn.cursor() as cur:
            cur.execute("select to_regclass(%s)", (f'{settings.pg_schema}."{name}"',))
            if cur.fetchone()[0] is None:
                return 0
            cur.execute(f'select count(*) from {settings.pg_schema}."{name}"')
            return cur.fetchone()[0]
    finally:
        conn.close()


@pytest.mark.parametrize("cleanup", ["vacuum", "log-retention"])
def test_a_mirror_behind_the_tables_retention_reloads_it_whole(spark, pg, cleanup):
    # Postgres applied version 0 of silver_labels, then fell behind (down for a week, say) while the
    # table changed and was cleaned up: VACUUM removed files the change feed from version 1 needs, or
    # log clean-up removed commit 1 itself. The mirror cannot read the changes; it reloads the table
    # whole, and Postgres equals the Delta table again (not a "damaged table" error, nor stale rows).
    from delta.tables import DeltaTable

    from lakehouse import maintenance
    from lakehouse.io import pg_mirror

    settings, name = pg, "silver_labels"
    path = str(settings.table_path(name))
    rows = lambda ids, fraud: spark.createDataFrame(  # noqa: E731
        [(f"e{i}", fraud, datetime(2026, 11, 20, 12, i)) for i in ids],
        "event_id string, is_fraud boolean, reported_at timestamp")
    rows(range(6), True).write.format("delta").option("delta.enableChangeDataFeed", "true") \
        .option("delta.checkpointInterval", "3").save(path)
    assert mirror.mirror_table(spark, settings, name)["version"] == 0
    table = DeltaTable.forPath(spark, path)
    table.delete("event_id = 'e1'")                                               # version 1
    table.update("event_id = 'e2'", {"is_fraud": F.lit(False)})                   # 2
    rows([7, 8], True).write.format("delta").mode("append").save(path)            # 3, checkpointed
    table.delete("event_id = 'e7'")                                               # 4
    log_dir = Path(path) / "_delta_log"
    assert (log_dir / f"{3:020d}.checkpoint.parquet").exists()
    assert maintenance.mirror_pins(settings)[name] == 0  # every mirrored table is pinned, not gold alone
    if cleanup == "vacuum":  # with the pin unknown (Postgres was down): Delta's 7 days, here 0 hours
        spark.conf.set("spark.databricks.delta.retentionDurationCheck.enabled", "false")
        try:
            spark.sql(f"VACUUM delta.`{path}` RETAIN 0 HOURS")
        finally:
            spark.conf.unset("spark.databricks.delta.retentionDurationCheck.enabled")
        assert not any(f.is_file() for f in (Path(path) / "_change_data").rglob("*.parquet"))
    else:  # what Delta's clean-up of expired log entries leaves: the checkpoint and the commits after it
        for version in range(3):
            (log_dir / f"{version:020d}.json").unlink()
            (log_dir / f"{version:020d}.crc").unlink(missing_ok=True)
    latest = delta.table_version(path)  # 4, or 6 after VACUUM's own commits
    result = mirror.mirror_table(spark, settings, name)
    assert result["version"] == latest and result.get("replaced") and result["rows"] == 6
    assert assert_pg_equals_delta(spark, settings, [name]) == {name: 6}
    got = pg_rows(settings, name, "event_id")
    assert list(got["event_id"]) == ["e0", "e2", "e3", "e4", "e5", "e8"] and not got["is_fraud"].iloc[1]
    conn = postgres.connect(settings)
    try:
        assert pg_mirror.applied_version(conn, settings.pg_schema, f"delta:{name}", name) == latest
    finally:
        conn.close()
    # the next change is read from the feed again
    table.delete("event_id = 'e8'")
    result = mirror.mirror_table(spark, settings, name)
    assert result["version"] == latest + 1 and not result.get("replaced") and result["deleted"] == 1
    assert assert_pg_equals_delta(spark, settings, [name]) == {name: 5}


def test_a_postgres_table_dropped_or_emptied_behind_the_mirrors_back_is_loaded_whole_again(spark, pg, monkeypatch):
    # Someone drops a mirrored table in Postgres, or empties it with TRUNCATE. The ledger still says
    # which Delta version it holds: the mirror must not apply only the changes after that version.
    settings, name = pg, "silver_labels"
    path = str(settings.table_path(name))
    spark.createDataFrame([(f"e{i}", True, datetime(2026, 11, 20, 12, i)) for i in range(5)],
                          "event_id string, is_fraud boolean, reported_at timestamp") \
        .write.format("delta").option("delta.enableChangeDataFeed", "true").save(path)
    mirror.mirror_table(spark, settings, name)

    def psql(statement):
        conn = postgres.connect(settings)
        try:
            with conn, conn.cursor() as cur:
                cur.execute(statement)
        finally:
            conn.close()

    for version, statement in enumerate(("DROP TABLE", "TRUNCATE"), start=1):
        psql(f"{statement} {settings.pg_schema}.{name}")
        spark.sql(f"DELETE FROM delta.`{path}` WHERE event_id = 'e{version - 1}'")
        result = mirror.mirror_table(spark, settings, name)
        assert result["version"] == version and result["applied_before"] is None, statement
        assert result["rows"] == 5 - version
        assert assert_pg_equals_delta(spark, settings, [name]) == {name: 5 - version}

    # Rows deleted, changed or added by hand, or a column dropped, while the Delta table stays at
    # version 2: the mirror's next run brings the table back to the snapshot, rewriting only the rows
    # that differ (before, the ledger said version 2 was there, and it was skipped).
    table = f"{settings.pg_schema}.{name}"
    for statement, rewritten in ((f"DELETE FROM {table} WHERE event_id = 'e3'", 1),
                                 (f"UPDATE {table} SET is_fraud = false WHERE event_id = 'e4'", 1),
                                 (f"INSERT INTO {table} (event_id, is_fraud, reported_at) VALUES ('x', true, now())",
                                  0),
                                 (f"ALTER TABLE {table} DROP COLUMN is_fraud", 3)):
        psql(statement)
        result = mirror.mirror_table(spark, settings, name)
        assert (result["version"], result["applied_before"], result["rows"]) == (2, None, rewritten), statement
        assert assert_pg_equals_delta(spark, settings, [name]) == {name: 3}
    # The mirror's own writes leave its ledger alone: the next run has nothing to do.
    assert mirror.mirror_table(spark, settings, name) == {"table": name, "version": 2, "applied": 2, "rows": 0}

    # A row deleted by hand while the mirror reads the changes after the ledger's version: that batch
    # of changes is refused (the ledger forgot the table meanwhile), and the table is read whole.
    spark.sql(f"DELETE FROM delta.`{path}` WHERE event_id = 'e2'")
    read_changes = mirror.net_changes

    def meanwhile(cdf, key):
        psql(f"DELETE FROM {table} WHERE event_id = 'e4'")
        monkeypatch.setattr(mirror, "net_changes", read_changes)
        return read_changes(cdf, key)

    monkeypatch.setattr(mirror, "net_changes", meanwhile)
    result = mirror.mirror_table(spark, settings, name)
    assert (result["version"], result["applied_before"], result["rows"]) == (3, None, 1)
    assert assert_pg_equals_delta(spark, settings, [name]) == {name: 2}

    # The mirror loop beside a stream skips a table whose Delta version has not moved since it applied
    # it; it still sees, at its next round, a table Postgres forgot meanwhile (emptied by hand, dropped).
    loop = mirror.MirrorLoop(spark, settings, tables=(name,))
    loop.run_round()
    assert loop.run_round() == [{"table": name, "version": 3, "applied": 3, "rows": 0}]  # from memory
    for statement in (f"DELETE FROM {table}", f"DROP TABLE {table}"):
        psql(statement)
        result = loop.run_round()[0]
        assert (result["version"], result["applied_before"], result["rows"]) == (3, None, 2), statement
        assert assert_pg_equals_delta(spark, settings, [name]) == {name: 2}
    assert loop.run_round() == [{"table": name, "version": 3, "applied": 3, "rows": 0}]


@pytest.mark.slow
def test_kill_9_of_the_streaming_mirror_job_then_restart_converges(spark, pg, tmp_path):
    """The live job (``stream --mirror``: each batch publishes its gold rows to Postgres before its
    MERGEs, the mirror loop beside it) is killed with -9 as soon as Postgres serves rows that Delta has
    not committed; the restart replays that batch, and Postgres ends equal to gold, row for row."""
    settings = pg
    per_file, n_files = 300, 4
    for f in range(n_files):
        lines = [event_line(per_file * f + i) for i in range(per_file)]
        if f:  # on-time late events (8 min behind the watermark) of users seen before: upserts too
            mark = BASE + timedelta(seconds=37 * (per_file * f - 1))
            lines += [event_line(5_000 + 10 * f + i, user_id=f"u{i:03d}",
                                 event_time=(mark - timedelta(minutes=8)).strftime("%Y-%m-%dT%H:%M:%SZ"))
                      for i in range(10)]
        write_lines(settings.events_inbox, f"e{f}.jsonl", lines, mtime=FILE_MTIME + f)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LAKEHOUSE_")},
           "LAKEHOUSE_DATA": str(settings.data_root), "LAKEHOUSE_SPARK_MASTER": "local[2]",
           "LAKEHOUSE_SHUFFLE_PARTITIONS": "2", "LAKEHOUSE_STREAM_GOLD": "1", "LAKEHOUSE_STREAM_SCORING": "0",
           "PYTHONUNBUFFERED": "1"}
    live = [sys.executable, "-m", "lakehouse.cli", "stream", "--mirror", "--max-files", "1",
            "--trigger-seconds", "1", "--only", "events"]
    path = settings.table_path("gold_transaction_features")
    ahead = []  # (rows in Postgres, rows in Delta) at each kill
    log = Path(tmp_path / "live.log")
    while not any(pg_n > delta_n for pg_n, delta_n in ahead):
        assert len(ahead) < n_files - 1, f"no kill landed between a publish and its MERGE: {ahead}"
        seen = _pg_count(settings, "gold_transaction_features")
        with log.open("a") as out:
            proc = subprocess.Popen(live, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.time() + 300
            # Postgres gains rows: a batch published ahead (its MERGEs follow) or the mirror caught up.
            while time.time() < deadline and proc.poll() is None and _pg_count(settings, "gold_transaction_features") <= seen:
                time.sleep(0.05)
            assert proc.poll() is None, log.read_text()[-3000:]
            pg_n = _pg_count(settings, "gold_transaction_features")
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        ahead.append((pg_n, delta.read(spark, path).count() if delta.is_delta_table(path) else 0))
    print("kills (rows in Postgres, rows in Delta):", ahead)
    done = subprocess.run([*live[:4], "--once", *live[4:]], env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    compared = assert_pg_equals_delta(spark, settings)
    assert compared["gold_transaction_features"] == n_files * per_file + (n_files - 1) * 10
