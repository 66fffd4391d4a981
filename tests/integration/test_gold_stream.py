"""Gold kept by the stream: lateness, too-late events, late labels, and parity with the backfill."""

from __future__ import annotations

import os
from datetime import date, datetime, timezone

import pandas as pd
import pytest
from pyspark.sql import functions as F

from lakehouse import gold, streaming
from lakehouse.io import delta
from lakehouse.transforms import driver_features
from tests.conftest import write_lines
from tests.integration.inbox_data import FILE_MTIME, event_line, label_line

pytestmark = pytest.mark.integration


def _table(spark, settings, name) -> pd.DataFrame:
    spec = gold.GOLD_TABLES[name]
    df = delta.read(spark, settings.table_path(name)).toPandas()
    return df.sort_values(list(spec["key"])).reset_index(drop=True)


def _ev(i, user, minute, second=0, merchant="m001", country="FR", amount="10.00"):
    return event_line(i, user_id=user, merchant_id=merchant, country=country, amount=amount, currency="USD",
                      event_time=f"2026-11-20T12:{minute:02d}:{second:02d}Z")


@pytest.fixture
def settings(settings):
    return settings.replace(stream_gold=True)


#: The Spark feature route (``features_driver_max_rows=0``), the fallback for a look-back of over 3M
#: rows: its gold took 14 to 37 s for a batch of two events (against 3 to 11 s in the driver), so its
#: variants are in the slow tier (`make test-slow`, run by CI).
IN_SPARK = pytest.mark.slow


@pytest.mark.parametrize("driver_max_rows,files_per_batch", [
    pytest.param(3_000_000, 1, id="in-driver"), pytest.param(0, 1, id="in-spark", marks=IN_SPARK),
    pytest.param(3_000_000, 2, id="in-driver-one-batch"), pytest.param(0, 2, id="in-spark-one-batch", marks=IN_SPARK)])
def test_lateness_inside_updates_windows_and_beyond_is_recorded(spark, settings, driver_max_rows, files_per_batch):
    # An events batch's gold is computed in the driver while its look-back fits there, else in Spark.
    # The two files in one batch or in two: the same events are too late (the watermark moves on
    # file by file, in the order they arrived; the later file's name sorts first).
    settings = settings.replace(max_files_per_trigger=files_per_batch, features_driver_max_rows=driver_max_rows)
    # first file: user u1 pays at 12:00 and 12:30 (watermark after it: 12:30)
    write_lines(settings.events_inbox, "b.jsonl", [_ev(1, "u1", 0), _ev(2, "u1", 30)], mtime=FILE_MTIME)
    # then: 12:26 is 4 min late (inside the 10 min lateness); 12:05 is 25 min late (too late)
    write_lines(settings.events_inbox, "a.jsonl", [_ev(3, "u1", 26), _ev(4, "u1", 5)], mtime=FILE_MTIME + 1)
    streaming.run_streams(spark, settings, once=True, kinds=("events",))

    late = _table(spark, settings, "gold_too_late_events")
    assert list(late["event_id"]) == ["e000004"]
    assert late["lateness_seconds"].iloc[0] == 25 * 60
    assert late["watermark"].iloc[0] == pd.Timestamp("2026-11-20 12:30:00")
    assert "allowed lateness is 10 min" in late["reason"].iloc[0]

    tx = _table(spark, settings, "gold_transaction_features").set_index("event_id")
    # The on-time late event (12:26) changed the 12:30 transaction's features; the too-late one did not.
    assert tx.loc["e000002", "user_tx_count_5m"] == 2          # 12:26 and 12:30
    assert tx.loc["e000002", "user_tx_count_1h"] == 3          # 12:00, 12:26, 12:30 (not 12:05)
    assert tx.loc["e000002", "seconds_since_prev_user_tx"] == 240.0
    # The too-late event still has its own row, as of its own time, from all of silver.
    assert tx.loc["e000004", "user_tx_count_1h"] == 2          # 12:00 and itself
    assert tx.loc["e000004", "seconds_since_prev_user_tx"] == 300.0
    assert len(tx) == 4

    windows = _table(spark, settings, "gold_user_features_5m")
    starts = {w.strftime("%H:%M"): n for w, n in zip(windows["window_start"], windows["tx_count"])}
    # 12:26 is in the windows starting 12:22..12:26; 12:05 is in none (too late).
    assert starts["12:22"] == 1 and starts["12:26"] == 2 and starts["12:30"] == 1
    assert "12:05" not in starts and "12:02" not in starts
    assert starts["12:00"] == 1

    dq = delta.read(spark, settings.table_path("silver_dq_batches")).orderBy("batch_id").toPandas()
    assert list(dq["too_late"]) == ([0, 1] if files_per_batch == 1 else [1])
    assert dq["max_event_time"].iloc[0] == pd.Timestamp("2026-11-20 12:30:00")


@pytest.mark.parametrize("driver_max_rows,files_per_batch", [
    pytest.param(3_000_000, 1, id="in-driver"), pytest.param(0, 1, id="in-spark", marks=IN_SPARK),
    pytest.param(3_000_000, 3, id="in-driver-one-batch")])
def test_files_landed_in_the_same_millisecond_do_not_judge_each_other(spark, settings, driver_max_rows,
                                                                       files_per_batch):
    # A backlog copied in bulk: files written within a millisecond (Spark records modification times
    # in ms; an object store keeps whole seconds). Spark leaves such ties in its listing's order, so
    # whichever it took first made the other's events too late (here either order would). Tied files
    # are judged by the files before them all, in one batch or split between batches.
    settings = settings.replace(max_files_per_trigger=files_per_batch, features_driver_max_rows=driver_max_rows)
    write_lines(settings.events_inbox, "a.jsonl", [_ev(1, "u1", 0), _ev(2, "u1", 40)], mtime=FILE_MTIME)
    write_lines(settings.events_inbox, "b.jsonl", [_ev(3, "u2", 20), _ev(4, "u2", 50)], mtime=FILE_MTIME)
    # a file that landed after both: judged by their latest event (12:50), its 12:30 is too late
    write_lines(settings.events_inbox, "c.jsonl", [_ev(5, "u3", 30)], mtime=FILE_MTIME + 1)
    streaming.run_streams(spark, settings, once=True, kinds=("events",))

    late = _table(spark, settings, "gold_too_late_events")
    assert list(late["event_id"]) == ["e000005"]
    assert late["watermark"].iloc[0] == pd.Timestamp("2026-11-20 12:50:00")
    windows = _table(spark, settings, "gold_user_features_5m")
    assert windows.groupby("user_id")["window_start"].min().dt.strftime("%H:%M").to_dict() == {
        "u1": "11:56", "u2": "12:16"}
    dq = delta.read(spark, settings.table_path("silver_dq_batches")).orderBy("batch_id").toPandas()
    assert list(dq["too_late"]) == ([0, 0, 1] if files_per_batch == 1 else [1])


@pytest.mark.parametrize("driver_max_rows", [pytest.param(3_000_000, id="in-driver"),
                                             pytest.param(0, id="in-spark", marks=IN_SPARK)])
def test_lines_a_writer_finished_after_the_read_are_judged_with_their_file(spark, settings, driver_max_rows):
    # A writer is stopped mid-line while the stream reads a.jsonl; it finishes the file before b.jsonl
    # is written (modification times), but the watch copies the change only as a later batch runs. The
    # copy's lines must be judged as the whole file would have been: by z alone (12:20), not by a's own
    # first lines (12:40), nor by t (12:35), which landed in the same millisecond as them, nor by b
    # (12:55), which was written after them.
    settings = settings.replace(max_files_per_trigger=1, features_driver_max_rows=driver_max_rows)
    inbox = settings.events_inbox
    write_lines(inbox, "z.jsonl", [_ev(1, "u9", 20)], mtime=FILE_MTIME)
    a = write_lines(inbox, "a.jsonl", [_ev(2, "u1", 25), _ev(3, "u1", 40)], mtime=FILE_MTIME + 1)
    tail = _ev(4, "u2", 15)  # 5 min before 12:20: on time; 25 min before a's first lines
    with open(a, "ab") as f:
        f.write(tail[:25].encode())
    os.utime(a, (FILE_MTIME + 1, FILE_MTIME + 1))
    write_lines(inbox, "t.jsonl", [_ev(7, "u5", 35)], mtime=FILE_MTIME + 5)  # 5 min before 12:40: on time
    write_lines(inbox, "b.jsonl", [_ev(6, "u4", 55)], mtime=FILE_MTIME + 10)

    def on_batch(result):  # a's writer finishes once its first lines were read
        if result.kind == "events" and result.batch_id == 1:
            with open(a, "ab") as f:
                f.write((tail[25:] + "\n" + _ev(5, "u3", 5) + "\n").encode())  # 12:05: 15 min before 12:20
            os.utime(a, (FILE_MTIME + 5, FILE_MTIME + 5))

    streaming.run_streams(spark, settings, once=True, kinds=("events",), on_batch=on_batch)
    copy = a.with_name(f"a.changed-{int((FILE_MTIME + 5) * 1000)}.jsonl")
    assert copy.exists()  # made while a later batch ran; the next run reads it
    streaming.run_streams(spark, settings, once=True, kinds=("events",))

    silver = delta.read(spark, settings.table_path("silver_transactions"))
    assert {r["event_id"]: os.path.basename(r["source_file"]) for r in silver.collect()
            if r["event_id"] in ("e000004", "e000005")} == {"e000004": copy.name, "e000005": copy.name}
    late = _table(spark, settings, "gold_too_late_events")
    assert list(late["event_id"]) == ["e000005"]
    assert late["watermark"].iloc[0] == pd.Timestamp("2026-11-20 12:20:00")
    assert late["lateness_seconds"].iloc[0] == 15 * 60
    windows = _table(spark, settings, "gold_user_features_5m")
    assert set(windows.loc[windows["user_id"] == "u2", "window_start"].dt.strftime("%H:%M")) == {
        f"12:{m:02d}" for m in range(11, 16)}  # the on-time line of the copy is in its windows
    assert "u3" not in set(windows["user_id"])


def test_a_batch_whose_write_loses_a_commit_race_runs_again_and_each_write_lands_once(spark, settings, tmp_path,
                                                                                      monkeypatch, caplog):
    # The nightly backfill, compaction or scoring rewrites a day while a late event of that day
    # lands: one of the two commits loses (Delta's ConcurrentAppendException and kin). The stream's
    # batch runs again, from the tables, and goes on, instead of the live query dying.
    from pyspark.errors.exceptions import captured

    monkeypatch.setattr(streaming, "CONFLICT_BACKOFF_SECONDS", 0.0)
    settings = settings.replace(max_files_per_trigger=1)
    clean = settings.with_data_root(tmp_path / "clean")
    for s in (settings, clean):
        write_lines(s.events_inbox, "b.jsonl", [_ev(1, "u1", 0), _ev(2, "u1", 30), _ev(3, "u2", 31)], mtime=FILE_MTIME)
        write_lines(s.events_inbox, "a.jsonl", [_ev(4, "u1", 26), _ev(5, "u1", 5), _ev(6, "u2", 29)],
                    mtime=FILE_MTIME + 1)
    streaming.run_streams(spark, clean, once=True, kinds=("events",))

    lost = []  # (batch, table) of each conflict raised
    write = gold.GoldStream._write

    def racing(self, session, name, rows, new, app_id, batch_id):
        # the features write loses once in batch 0, twice in batch 1; the windows write beside it lands
        if name == "gold_transaction_features" and lost.count((batch_id, name)) < batch_id + 1:
            lost.append((batch_id, name))
            raise captured.convert_exception(spark._jvm.io.delta.exceptions.ConcurrentAppendException(
                "Files were added to partition [event_date=2026-11-20] by a concurrent update."))
        return write(self, session, name, rows, new, app_id, batch_id)

    monkeypatch.setattr(gold.GoldStream, "_write", racing)
    with caplog.at_level("WARNING", logger="lakehouse.streaming"):
        streaming.run_streams(spark, settings, once=True, kinds=("events",))
    assert lost == [(0, "gold_transaction_features")] + [(1, "gold_transaction_features")] * 2
    assert caplog.text.count("ConcurrentAppendException from a concurrent writer") == 3
    assert "(attempt 3 of 5)" in caplog.text

    for name in (*gold.COMPUTED_TABLES, "gold_too_late_events"):
        got, want = _table(spark, settings, name), _table(spark, clean, name)
        cols = [c for c in want.columns if c not in ("detected_at",)]
        pd.testing.assert_frame_equal(got[cols], want[cols], check_exact=True, obj=name)
    assert list(_table(spark, settings, "gold_too_late_events")["event_id"]) == ["e000005"]
    dq = delta.read(spark, settings.table_path("silver_dq_batches")).orderBy("batch_id").toPandas()
    assert list(dq["batch_id"]) == [0, 1] and dq["reconciled"].all() and list(dq["inserted"]) == [3, 3]
    assert delta.read(spark, settings.table_path("silver_transactions")).count() == 6


def test_the_watermark_survives_a_restart_and_an_older_batch(spark, settings):
    # The watermark is kept between batches and read from the data-quality rows after a restart;
    # a batch of older (on-time) events must not lower it for the next batch.
    settings = settings.replace(max_files_per_trigger=1)
    write_lines(settings.events_inbox, "a.jsonl", [_ev(1, "u1", 0), _ev(2, "u2", 30)], mtime=FILE_MTIME)
    streaming.run_streams(spark, settings, once=True, kinds=("events",))  # watermark 12:30
    # after a restart: 12:25 is on time (5 min late); then 12:17 is 13 min behind 12:30: too late
    write_lines(settings.events_inbox, "b.jsonl", [_ev(3, "u3", 25)], mtime=FILE_MTIME + 1)
    write_lines(settings.events_inbox, "c.jsonl", [_ev(4, "u4", 17)], mtime=FILE_MTIME + 2)
    streaming.run_streams(spark, settings, once=True, kinds=("events",))
    late = _table(spark, settings, "gold_too_late_events")
    assert list(late["event_id"]) == ["e000004"]
    assert late["watermark"].iloc[0] == pd.Timestamp("2026-11-20 12:30:00")
    # The restart took the gold schemas from the tables, not from the transforms' plans: the same.
    assert gold._schemas_of(spark, settings) == gold._derived_schemas(spark, settings)


def test_a_row_taken_for_new_but_already_in_gold_is_still_upserted(spark, settings, monkeypatch):
    # An events batch's new rows go to gold by an insert-only MERGE. Should one be there already with
    # other values (say a backfill racing the stream wrote it first), it still gets the stream's.
    import pyarrow as pa

    real = gold.driver_batch

    def racing(table, new):
        batch = real(table, new)
        for name, rows, fresh, column in (("gold_transaction_features", batch.features, batch.features_new,
                                           "user_tx_count_5m"),
                                          ("gold_user_features_5m", batch.windows, batch.windows_new, "tx_count")):
            stale = rows.filter(pa.array(fresh))
            stale = stale.set_column(stale.schema.get_field_index(column), column, pa.array([99] * stale.num_rows))
            path = str(settings.table_path(name))
            spark.createDataFrame(stale, schema=delta.read(spark, path).schema).write.format("delta") \
                .mode("append").save(path)
        return batch

    monkeypatch.setattr(gold, "driver_batch", racing)
    write_lines(settings.events_inbox, "a.jsonl", [_ev(1, "u1", 0), _ev(2, "u1", 1)], mtime=FILE_MTIME)
    streaming.run_streams(spark, settings, once=True, kinds=("events",))

    tx = _table(spark, settings, "gold_transaction_features")
    assert list(tx["event_id"]) == ["e000001", "e000002"] and list(tx["user_tx_count_5m"]) == [1, 2]
    windows = _table(spark, settings, "gold_user_features_5m")
    assert not windows.duplicated(["user_id", "window_start"]).any()
    starts = {w.strftime("%H:%M"): n for w, n in zip(windows["window_start"], windows["tx_count"])}
    assert starts == {"11:56": 1, "11:57": 2, "11:58": 2, "11:59": 2, "12:00": 2, "12:01": 1}


def test_the_kept_lookback_equals_a_fresh_collect(spark, settings, monkeypatch):
    # Between events batches the stream keeps the look-back and reads only the next batch's new rows,
    # from the files of silver's commit (no Spark job); with a too-late event, a fraud label arriving
    # in between, and one arriving before its event, it must equal what a fresh collect gives, batch
    # after batch.
    import pyarrow.compute as pc

    from lakehouse.transforms import features

    checked, read = [], []
    real_read = delta.inserted_rows

    def reading(path, version, columns):
        rows = real_read(path, version, columns)
        read.append(None if rows is None else rows.num_rows)
        return rows

    monkeypatch.setattr(delta, "inserted_rows", reading)
    real = gold.GoldStream._kept_lookback

    def checking(self, spark, silver, earliest, version, labels_version, app_id, batch_id, dates):
        kept = real(self, spark, silver, earliest, version, labels_version, app_id, batch_id, dates)
        if kept is not None:
            fresh = features.lookback_rows(silver, earliest, self._fraud_only_labels(spark),
                                           gold.too_late_ids(spark, self.settings)).toArrow()
            order = [("event_id", "ascending")]
            assert kept.sort_by(order).equals(fresh.select(kept.column_names).cast(kept.schema).sort_by(order))
            checked.append((batch_id, kept.num_rows, pc.sum(kept["_late"]).as_py(), kept["_r"].null_count))
        return kept

    monkeypatch.setattr(gold.GoldStream, "_kept_lookback", checking)
    settings = settings.replace(max_files_per_trigger=1)
    stream = gold.GoldStream(settings)
    streaming.ensure_tables(spark, settings, ("events", "labels"))

    def run(kind):
        streaming.start_query(spark, settings, kind, True, None, stream).awaitTermination()

    write_lines(settings.events_inbox, "a.jsonl", [_ev(1, "u1", 0), _ev(2, "u2", 5), _ev(3, "u1", 30)],
                mtime=FILE_MTIME)
    # 12:26 is on time (4 min late), 12:05 too late (25 min behind the 12:30 watermark)
    write_lines(settings.events_inbox, "b.jsonl", [_ev(4, "u3", 26), _ev(5, "u1", 5), _ev(6, "u2", 40)],
                mtime=FILE_MTIME + 1)
    run("events")
    # e8's chargeback comes before e8 itself (files arrive in any order)
    write_lines(settings.labels_inbox, "l.jsonl",
                [label_line(1, is_fraud=True, scenario="card_testing", reported_at="2026-11-20T12:10:00Z"),
                 label_line(8, is_fraud=True, scenario="card_testing", reported_at="2026-11-20T12:55:00Z")],
                mtime=FILE_MTIME)
    run("labels")
    write_lines(settings.events_inbox, "c.jsonl", [_ev(7, "u4", 45), _ev(8, "u1", 50)], mtime=FILE_MTIME + 2)
    run("events")
    # batch 1 on batch 0's look-back; batch 2 on batch 1's, with the too-late flag and both reports
    assert checked == [(1, 6, 0, 6), (2, 8, 1, 6)]
    assert read == [3, 2]  # each batch's new rows read from its commit's files
    tx = _table(spark, settings, "gold_transaction_features").set_index("event_id")
    assert tx.loc["e000008", "merchant_fraud_rate_1d"] == pytest.approx(1 / 7)  # e1's label; not e5

    # A labels stream in another process (its own GoldStream) labels e7: this stream never patched
    # that in, so its kept look-back is stale and the next events batch collects afresh.
    write_lines(settings.labels_inbox, "m.jsonl",
                [label_line(7, is_fraud=True, scenario="card_testing", reported_at="2026-11-20T12:46:00Z")],
                mtime=FILE_MTIME + 1)
    streaming.start_query(spark, settings, "labels", True, None, gold.GoldStream(settings)).awaitTermination()
    write_lines(settings.events_inbox, "d.jsonl", [_ev(9, "u5", 55)], mtime=FILE_MTIME + 3)
    run("events")
    assert [c[0] for c in checked] == [1, 2] and read == [3, 2]  # batch 3 did not use the kept look-back
    tx = _table(spark, settings, "gold_transaction_features").set_index("event_id")
    # e1 (reported 12:10), e7 (12:46) and e8 (12:55, at e9's own time) over 8 on-time transactions
    assert tx.loc["e000009", "merchant_fraud_rate_1d"] == pytest.approx(3 / 8)


@IN_SPARK
def test_utc_midnight_and_the_dst_fold_are_right_in_any_local_time_zone(spark, settings, local_time_zone_new_york):
    # Gold's partitions are UTC dates and its watermark a UTC instant. PySpark hands collected
    # timestamps back as naive New York times here. The Spark route once took their date: 00:02 UTC on
    # Nov 1 read as Oct 31, so the batch's own day was neither read nor pruned to (its features came out
    # null, its windows short). 06:30 UTC on Nov 1 is 01:30 EST, the second 01:30 of the night the
    # clocks go back: a naive 01:30 is an hour off if taken for the first.
    settings = settings.replace(max_files_per_trigger=1, features_driver_max_rows=0)

    def ev(i, at, user="u1", merchant="m001", country="FR"):
        return event_line(i, user_id=user, merchant_id=merchant, country=country, amount="10.00", currency="USD",
                          event_time=at)

    fold = dict(user="u2", merchant="m002", country="DE")
    write_lines(settings.events_inbox, "a.jsonl", [ev(1, "2026-10-31T23:58:00Z")], mtime=FILE_MTIME)
    write_lines(settings.events_inbox, "b.jsonl", [ev(2, "2026-11-01T00:02:00Z"), ev(3, "2026-11-01T00:03:00Z"),
                                                   ev(4, "2026-11-01T06:30:00Z", **fold)], mtime=FILE_MTIME + 1)
    # 15 min before the watermark (06:30 UTC): too late for the 10 min allowed
    write_lines(settings.events_inbox, "c.jsonl", [ev(5, "2026-11-01T06:15:00Z", **fold)], mtime=FILE_MTIME + 2)
    streaming.run_streams(spark, settings, once=True, kinds=("events",))

    dq = delta.read(spark, settings.table_path("silver_dq_batches")).orderBy("batch_id").toPandas()
    assert list(dq["max_event_time"].astype(str)) == ["2026-10-31 23:58:00", "2026-11-01 06:30:00",
                                                      "2026-11-01 06:15:00"]
    late = _table(spark, settings, "gold_too_late_events")
    assert list(late["event_id"]) == ["e000005"] and list(late["lateness_seconds"]) == [15 * 60]
    assert late["watermark"].iloc[0] == pd.Timestamp("2026-11-01 06:30:00")

    tx = _table(spark, settings, "gold_transaction_features").set_index("event_id")
    assert list(tx["user_tx_count_5m"]) == [1, 2, 2, 1, 1]  # 23:58 is exactly 5 min before 00:03: out
    assert list(tx["user_tx_count_1h"]) == [1, 2, 3, 1, 1]  # e5 (too late) sees all, but e4 is later
    assert list(tx["seconds_since_prev_user_tx"].fillna(-1)) == [-1, 240.0, 60.0, -1, -1]
    windows = _table(spark, settings, "gold_user_features_5m")
    counts = {(u, w.strftime("%d %H:%M")): n
              for u, w, n in zip(windows["user_id"], windows["window_start"], windows["tx_count"])}
    assert counts == {**{("u1", f"31 23:5{m}"): 1 for m in range(4, 8)},
                      ("u1", "31 23:58"): 2, ("u1", "31 23:59"): 2, ("u1", "01 00:00"): 2, ("u1", "01 00:01"): 2,
                      ("u1", "01 00:02"): 2, ("u1", "01 00:03"): 1,
                      **{("u2", f"01 06:{m}"): 1 for m in range(26, 31)}}  # e5 is in no window
    assert list(windows["window_date"].astype(str)) == ["2026-10-31"] * 6 + ["2026-11-01"] * 9

    streamed = {n: _table(spark, settings, n) for n in gold.COMPUTED_TABLES}
    gold.backfill(spark, settings, date(2026, 10, 31), date(2026, 11, 1))
    for n in gold.COMPUTED_TABLES:
        pd.testing.assert_frame_equal(_table(spark, settings, n)[list(streamed[n].columns)], streamed[n],
                                      check_exact=True, obj=n)


def test_a_label_arriving_after_the_transactions_updates_their_fraud_rates(spark, settings):
    settings = settings.replace(max_files_per_trigger=1)
    # e1 (12:00) is fraud, reported at 12:10; e2 at 12:05 (before the report), e3 at 12:20 (after it)
    write_lines(settings.events_inbox, "a.jsonl", [_ev(1, "u1", 0), _ev(2, "u2", 5), _ev(3, "u3", 20)],
                mtime=FILE_MTIME)
    streaming.run_streams(spark, settings, once=True)
    tx = _table(spark, settings, "gold_transaction_features").set_index("event_id")
    assert tx["merchant_fraud_rate_1d"].fillna(0).eq(0).all()

    write_lines(settings.labels_inbox, "l.jsonl",
                [label_line(1, is_fraud=True, scenario="card_testing", reported_at="2026-11-20T12:10:00Z")],
                mtime=FILE_MTIME)
    streaming.run_streams(spark, settings, once=True)
    tx = _table(spark, settings, "gold_transaction_features").set_index("event_id")
    assert tx.loc["e000002", "merchant_fraud_rate_1d"] == 0.0          # reported after 12:05
    assert tx.loc["e000003", "merchant_fraud_rate_1d"] == pytest.approx(1 / 3)
    assert tx.loc["e000003", "country_fraud_rate_30d"] == pytest.approx(1 / 3)
    risk = _table(spark, settings, "gold_merchant_risk_daily")
    assert list(risk["fraud_count"]) == [1]


def test_stream_and_backfill_give_identical_gold(spark, settings, monkeypatch):
    """The parity gate: a generated feed with late, out-of-order, duplicate and malformed events and
    late labels, streamed in small batches, then backfilled: every gold table is equal row for row.
    The stream evaluates the features in the driver, the backfill in Spark (told to, as on a cluster's
    larger data), so the gate also holds the two evaluations to the same values on realistic data."""
    from lakehouse.generator import GeneratorConfig, generate_backlog

    gen = generate_backlog(settings.events_inbox, settings.labels_inbox, GeneratorConfig(
        seed=11, days=2.0, n_users=150, n_merchants=30, file_events=400, file_minutes=60.0,
        start=datetime(2026, 11, 18, tzinfo=timezone.utc), late_rate=0.05, late_min_minutes=2.0,
        late_max_minutes=240.0, duplicate_rate=0.03))
    assert gen["late"] > 0 and gen["duplicates"] > 0
    # Two events batches (a day each): late deliveries early on day 2 are too late for day 1's windows.
    streaming.run_streams(spark, settings.replace(max_files_per_trigger=24), once=True)

    names = gold.COMPUTED_TABLES
    streamed = {n: _table(spark, settings, n) for n in names}
    late = _table(spark, settings, "gold_too_late_events")
    assert len(late) > 0, "the feed should hold events later than the allowed lateness"
    assert len(streamed["gold_transaction_features"]) == gen["events"]

    days = delta.read(spark, settings.table_path("silver_transactions")).agg(
        F.min("event_date"), F.max("event_date")).first()

    def not_in_the_driver(*args, **kwargs):
        raise AssertionError("features_driver_max_rows=0 must keep the features in Spark")

    monkeypatch.setattr(driver_features, "evaluate", not_in_the_driver)
    gold.backfill(spark, settings.replace(features_driver_max_rows=0), days[0], days[1])
    for n in names:
        backfilled = _table(spark, settings, n)
        assert len(backfilled) == len(streamed[n]), n
        pd.testing.assert_frame_equal(backfilled[list(streamed[n].columns)], streamed[n],
                                      check_exact=True, obj=n)  # exact sums: equal to the bit
    # Too-late events are out of the windows, yet every one has its own feature row.
    tx_ids = set(streamed["gold_transaction_features"]["event_id"])
    assert set(late["event_id"]) <= tx_ids


def test_matured_flags_are_refreshed_when_the_calendar_moves_on(spark, settings, monkeypatch):
    """``is_matured`` of the daily risk is judged by the calendar: a day the stream wrote as young is
    rewritten as matured once it is 30 days old, though no later event touches that day."""
    clock = {"today": date(2026, 12, 19)}  # 11-20 is 29 days old: not matured yet
    monkeypatch.setattr(gold, "_today", lambda: clock["today"])
    settings = settings.replace(max_files_per_trigger=1, risk_refresh_seconds=0)  # each batch pays its days
    write_lines(settings.events_inbox, "a.jsonl", [_ev(1, "u1", 0), _ev(2, "u2", 5, merchant="m002")],
                mtime=FILE_MTIME)
    write_lines(settings.events_inbox, "b.jsonl",
                [event_line(3, user_id="u1", merchant_id="m001", country="FR", amount="10.00", currency="USD",
                            event_time="2026-11-21T08:00:00Z")], mtime=FILE_MTIME + 1)
    seen = {}

    def flags(name):
        df = delta.read(spark, settings.table_path(name)).select("day", "is_matured").distinct().collect()
        return sorted((str(r["day"]), r["is_matured"]) for r in df)

    def on_batch(r):
        seen[r.batch_id] = {n: flags(n) for n in ("gold_merchant_risk_daily", "gold_country_risk_daily")}
        clock["today"] = date(2026, 12, 20)  # a day passes before the next batch: 11-20 matures

    streaming.run_streams(spark, settings, once=True, kinds=("events",), on_batch=on_batch)
    for name in ("gold_merchant_risk_daily", "gold_country_risk_daily"):
        assert seen[0][name] == [("2026-11-20", False)], name
        # Batch 1 touched only 11-21, yet the 11-20 rows now say matured; 11-21 is 29 days old.
        assert flags(name) == [("2026-11-20", True), ("2026-11-21", False)], name
    merchants = _table(spark, settings, "gold_merchant_risk_daily")
    assert list(merchants["merchant_id"]) == ["m001", "m001", "m002"]
    assert list(merchants["tx_count"]) == [1, 1, 1]


def test_daily_risk_is_deferred_then_paid_even_after_a_crash(spark, settings, monkeypatch):
    """The daily risk is rewritten at most every ``risk_refresh_seconds``, counted from the stream's
    start: a batch inside the interval owes its days (kept on disk), and whoever runs gold next pays
    them -- here a restart after a crash that lost the final flush."""
    settings = settings.replace(max_files_per_trigger=1, risk_refresh_seconds=3600)
    write_lines(settings.events_inbox, "a.jsonl", [_ev(1, "u1", 0), _ev(2, "u2", 5, merchant="m002")],
                mtime=FILE_MTIME)
    write_lines(settings.events_inbox, "b.jsonl",
                [event_line(3, user_id="u1", merchant_id="m001", country="FR", amount="10.00", currency="USD",
                            event_time="2026-11-21T08:00:00Z")], mtime=FILE_MTIME + 1)
    owed = settings.checkpoint_root / "gold_risk_owed.json"

    def days(name="gold_merchant_risk_daily"):
        return sorted(str(r["day"]) for r in delta.read(spark, settings.table_path(name)).select("day").distinct().collect())

    seen = {}

    def on_batch(r):
        seen[r.batch_id] = (days(), owed.read_text() if owed.exists() else None)

    # The crash: the process dies after its last batch committed, before the final flush.
    monkeypatch.setattr(gold.GoldStream, "flush_risk", lambda self, spark, force=True: False)
    streaming.run_streams(spark, settings, once=True, kinds=("events",), on_batch=on_batch)
    # The interval starts with the stream: both batches, inside the hour, owe their days.
    assert seen[0] == ([], '{"from": "2026-11-20"}')
    assert seen[1] == ([], '{"from": "2026-11-20"}')
    assert days() == [] and days("gold_country_risk_daily") == []

    monkeypatch.undo()
    streaming.run_streams(spark, settings, once=True, kinds=("events",))  # nothing new to ingest
    assert not owed.exists()
    for name in ("gold_merchant_risk_daily", "gold_country_risk_daily"):
        assert days(name) == ["2026-11-20", "2026-11-21"], name
    merchants = _table(spark, settings, "gold_merchant_risk_daily")
    assert list(zip(merchants["day"].astype(str), merchants["merchant_id"], merchants["tx_count"])) == [
        ("2026-11-20", "m001", 1), ("2026-11-21", "m001", 1), ("2026-11-20", "m002", 1)]


def test_an_unreadable_owed_risk_file_is_refused_with_the_fix(settings):
    owed = settings.checkpoint_root / "gold_risk_owed.json"
    owed.parent.mkdir(parents=True)
    owed.write_text("{not json")
    with pytest.raises(RuntimeError, match=r"gold_risk_owed.json is unreadable.*lakehouse backfill"):
        gold.GoldStream(settings)
    owed.write_text('{"from": "2026-11-21"}')
    assert gold.GoldStream(settings)._risk_from == date(2026, 11, 21)
