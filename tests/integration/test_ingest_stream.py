"""Inbox files -> bronze, silver, quarantine and data-quality tables, with real Spark and Delta."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import datetime
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from lakehouse import streaming, summary
from lakehouse.damage import EMPTY_COMMIT, AccessRefused, DamagedTable
from lakehouse.io import delta
from tests.conftest import write_lines
from tests.integration.inbox_data import FILE_MTIME, event_line, label_line, write_feed

pytestmark = pytest.mark.integration


def table(spark, settings, name):
    return delta.read(spark, settings.table_path(name))


def dq_rows(spark, settings):
    return [r.asDict() for r in table(spark, settings, "silver_dq_batches").orderBy("kind", "batch_id").collect()]


def test_feed_lands_in_silver_exactly_once_and_reconciles(spark, settings):
    expected = write_feed(settings.events_inbox, settings.labels_inbox, n_files=6, per_file=800)
    streaming.run_streams(spark, settings.replace(max_files_per_trigger=2), once=True)

    silver = table(spark, settings, "silver_transactions")
    ids = [r.event_id for r in silver.select("event_id").collect()]
    assert len(ids) == len(set(ids)) == len(expected["valid_ids"])
    assert set(ids) == expected["valid_ids"]
    assert table(spark, settings, "bronze_events").count() == expected["lines"]
    quarantined = table(spark, settings, "silver_quarantine").where("kind = 'events'")
    assert quarantined.count() == expected["bad"]

    rec = summary.reconciliation(spark, settings)
    assert rec["events"]["records_in"] == expected["lines"]
    assert rec["events"]["inserted"] == len(expected["valid_ids"])
    assert rec["events"]["quarantined"] == expected["bad"]
    assert rec["events"]["duplicates"] == expected["lines"] - expected["bad"] - len(expected["valid_ids"])
    assert rec["events"]["batches"] == 3  # 6 files, 2 per micro-batch
    assert all(r["reconciled"] for r in dq_rows(spark, settings))
    assert [r["source_files"] for r in dq_rows(spark, settings) if r["kind"] == "events"] == [2, 2, 2]
    assert rec["labels"]["inserted"] == expected["labels"] and rec["labels"]["duplicates"] == 5
    # Silver is partitioned by event date, so a MERGE reads only the dates of its batch.
    assert delta.read(spark, settings.table_path("silver_transactions")).inputFiles()
    detail = spark.sql(f"DESCRIBE DETAIL delta.`{settings.table_path('silver_transactions')}`").first()
    assert detail["partitionColumns"] == ["event_date"]


def test_rerun_and_redelivery_are_counted_not_inserted(spark, settings):
    write_lines(settings.events_inbox, "a.jsonl", [event_line(i) for i in range(10)], mtime=FILE_MTIME)
    streaming.run_streams(spark, settings, once=True, kinds=("events",))
    version = delta.table_version(settings.table_path("silver_transactions"))

    streaming.run_streams(spark, settings, once=True, kinds=("events",))  # nothing new: no batch
    assert delta.table_version(settings.table_path("silver_transactions")) == version

    # The same events delivered again in a new file, plus one new event.
    write_lines(settings.events_inbox, "b.jsonl", [event_line(i) for i in range(5)] + [event_line(99)],
                mtime=FILE_MTIME + 10)
    streaming.run_streams(spark, settings, once=True, kinds=("events",))
    assert table(spark, settings, "silver_transactions").count() == 11
    last = dq_rows(spark, settings)[-1]
    assert (last["records_in"], last["inserted"], last["duplicates_existing"], last["duplicates_in_batch"]) == (6, 1, 5, 0)
    assert last["reconciled"]


def test_a_redelivery_with_a_moved_time_is_a_duplicate_within_the_redelivery_days(spark, settings):
    # Silver is partitioned by event date and its MERGE reads the batch's dates. A re-delivery whose
    # event_time was corrected across midnight carries another date: the MERGE also reads the dates
    # LAKEHOUSE_REDELIVERY_DAYS (1) on either side, so it is a duplicate of the first delivery, not a
    # second row of the same event. Moved further, it is outside what the MERGE reads.
    settings = settings.replace(max_files_per_trigger=1)
    first = [event_line(1, event_time="2026-11-01T23:59:00Z"), event_line(2, event_time="2026-11-01T12:00:00Z"),
             event_line(3, event_time="2026-11-03T00:00:30Z")]
    write_lines(settings.events_inbox, "a.jsonl", first, mtime=FILE_MTIME)
    again = [event_line(1, event_time="2026-11-02T00:01:00Z"),   # +2 min, the next day
             event_line(3, event_time="2026-11-02T23:59:30Z"),   # -1 min, the day before
             event_line(4, event_time="2026-11-02T10:00:00Z"),   # new
             event_line(4, event_time="2026-11-03T10:00:00Z")]   # the same new event twice, two dates
    write_lines(settings.events_inbox, "b.jsonl", again, mtime=FILE_MTIME + 10)
    moved = [event_line(2, event_time="2026-11-04T12:00:00Z")]   # +3 days, alone in its batch
    write_lines(settings.events_inbox, "c.jsonl", moved, mtime=FILE_MTIME + 20)
    streaming.run_streams(spark, settings, once=True, kinds=("events",))

    silver = {(r.event_id, str(r.event_time)) for r in table(spark, settings, "silver_transactions").collect()}
    assert silver == {("e000001", "2026-11-01 23:59:00"), ("e000002", "2026-11-01 12:00:00"),
                      ("e000003", "2026-11-03 00:00:30"), ("e000002", "2026-11-04 12:00:00"),
                      ("e000004", "2026-11-02 10:00:00")}
    dq = [(r["records_in"], r["inserted"], r["duplicates_existing"], r["duplicates_in_batch"], r["reconciled"])
          for r in dq_rows(spark, settings)]
    assert dq == [(3, 3, 0, 0, True), (4, 1, 2, 1, True), (1, 1, 0, 0, True)]

    # With 3 days, the +3 days re-delivery is a duplicate too.
    wide = settings.with_data_root(settings.data_root.parent / "wide").replace(redelivery_days=3)
    for name, lines, mtime in (("a", first, 0), ("b", again, 10), ("c", moved, 20)):
        write_lines(wide.events_inbox, f"{name}.jsonl", lines, mtime=FILE_MTIME + mtime)
    streaming.run_streams(spark, wide, once=True, kinds=("events",))
    ids = [r.event_id for r in table(spark, wide, "silver_transactions").collect()]
    assert sorted(ids) == ["e000001", "e000002", "e000003", "e000004"]
    # A batch of duplicates only: its MERGE commits nothing, and its distinct keys are counted anew.
    dq = [(r["records_in"], r["inserted"], r["duplicates_existing"], r["duplicates_in_batch"], r["reconciled"])
          for r in dq_rows(spark, wide)]
    assert dq == [(3, 3, 0, 0, True), (4, 1, 2, 1, True), (1, 0, 1, 0, True)]


def test_bad_input_gets_a_clear_outcome(spark, settings):
    inbox = settings.events_inbox
    write_lines(inbox, "good.jsonl", [event_line(i) for i in range(3)], mtime=FILE_MTIME)
    write_lines(inbox, "empty.jsonl", [], mtime=FILE_MTIME)
    latin1 = event_line(10, user_id="JXrgen").encode().replace(b"JXrgen", "J\u00fcrgen".encode("latin-1"))
    write_lines(inbox, "latin1.jsonl", [latin1], mtime=FILE_MTIME)
    write_lines(inbox, "foreign.csv", ["sku,qty", "A-1,3"], mtime=FILE_MTIME)
    write_lines(inbox, "foreign.jsonl", [json.dumps({"order": 1, "items": [1, 2]})], mtime=FILE_MTIME)
    write_lines(inbox, "types.jsonl", [event_line(20, amount={"v": 1}), event_line(21, event_time=12345),
                                       event_line(22, amount=...), event_line(23, country=...)], mtime=FILE_MTIME)
    # A Windows exporter's file: a byte-order mark, then CRLF line ends. Two events a writer ran
    # together on one line, a time without seconds, an id holding a NUL.
    write_lines(inbox, "windows.jsonl", [b"\xef\xbb\xbf" + event_line(30).encode() + b"\r",
                                         event_line(31).encode() + b"\r"], mtime=FILE_MTIME)
    joined = event_line(32) + event_line(33)
    twice = event_line(36).replace('"user_id": ', '"user_id": "u-other", "user_id": ')  # a field given twice
    write_lines(inbox, "odd.jsonl", [joined, event_line(34, event_time="2026-11-20T10:07Z"),
                                     event_line(35, user_id="u\u0000"), twice], mtime=FILE_MTIME)
    # Folders under the inbox (a feed that files by day; a partition-like name, which Spark would
    # otherwise take for a partition and then ignore the files beside it); a hidden one is a writer's.
    write_lines(inbox / "2026" / "11" / "20", "b.jsonl", [event_line(40)], mtime=FILE_MTIME)
    write_lines(inbox / "date=2026-11-20", "c.jsonl", [event_line(41)], mtime=FILE_MTIME)
    write_lines(inbox / ".partial", "d.jsonl", [event_line(42)], mtime=FILE_MTIME)
    # A name with a time in it: Hadoop's local file system cannot read a name holding a colon (its
    # checksum file's name is taken for a URI), and the stream stopped on it, for good.
    write_lines(inbox, "events 2026-11-20T10:00:00+01:00 #1.jsonl", [event_line(43)], mtime=FILE_MTIME)
    big = [event_line(1000 + i) for i in range(30_000)]
    write_lines(inbox, "big.jsonl", big, mtime=FILE_MTIME)
    streaming.run_streams(spark, settings, once=True, kinds=("events",))

    q = {r["raw"]: sorted(r["failed_checks"]) for r in table(spark, settings, "silver_quarantine").collect()}
    by_file = {os.path.basename(r["source_file"]): r["n"] for r in table(spark, settings, "silver_quarantine")
               .groupBy("source_file").agg(F.count(F.lit(1)).alias("n")).collect()}
    assert by_file == {"latin1.jsonl": 1, "foreign.csv": 2, "foreign.jsonl": 1, "types.jsonl": 4, "odd.jsonl": 3}
    assert q[joined] == ["record_is_valid_json"]
    assert [v for k, v in q.items() if "e000035" in k] == [["text_has_no_control_characters"]]
    assert q[twice] == ["record_has_unique_fields"]
    assert q["sku,qty"] == ["record_is_valid_json"]
    assert q[json.dumps({"order": 1, "items": [1, 2]})] == ["record_has_known_fields"]
    assert sorted(v for k, v in q.items() if any(f"e0000{n}" in k for n in (20, 21, 22, 23))) == sorted(
        [["amount_is_number"], ["event_time_is_iso8601_with_offset"], ["amount_not_null"], ["country_not_null"]])
    assert [v for k, v in q.items() if "e000010" in k] == [["record_is_valid_utf8"]]
    assert table(spark, settings, "silver_transactions").count() == 3 + 3 + 3 + 30_000
    times = {r.event_id: r.event_time for r in table(spark, settings, "silver_transactions")
             .where(F.col("event_id").isin("e000030", "e000031", "e000034", "e000040", "e000041", "e000042",
                                           "e000043"))
             .collect()}
    assert sorted(times) == ["e000030", "e000031", "e000034", "e000040", "e000041", "e000043"]
    assert times["e000034"] == datetime(2026, 11, 20, 10, 7)
    rec = summary.reconciliation(spark, settings)["events"]
    assert rec["records_in"] == 3 + 1 + 2 + 1 + 4 + 2 + 4 + 3 + 30_000 and rec["reconciled"]


def test_replayed_batch_after_a_crash_writes_nothing_twice(spark, settings, monkeypatch):
    """Crash between the silver MERGE and the data-quality row, then replay the same batch."""
    write_lines(settings.events_inbox, "a.jsonl",
                [event_line(i) for i in range(20)] + [event_line(3), "{broken"], mtime=FILE_MTIME)
    streaming.ensure_tables(spark, settings, ("events",))
    lines = (spark.read.format("text").load(str(settings.events_inbox))
             .select("value", F.col("_metadata.file_path").alias("source_file"),
                     F.col("_metadata.file_modification_time").alias("file_modified_at")))
    batch = streaming.IngestBatch(settings, "events", app_id="test-app")

    real_append = delta.append_once

    def crash_on_dq(df, path, app_id, version, **kw):
        if str(path).endswith("dq_batches"):
            raise RuntimeError("simulated crash")
        return real_append(df, path, app_id, version, **kw)

    monkeypatch.setattr(delta, "append_once", crash_on_dq)
    with pytest.raises(RuntimeError, match="simulated crash"):
        batch(lines, 0)
    monkeypatch.setattr(delta, "append_once", real_append)
    versions = {n: delta.table_version(settings.table_path(n))
                for n in ("bronze_events", "silver_quarantine", "silver_transactions")}

    batch(lines, 0)   # the replay
    batch(lines, 0)   # and once more, as if the replay too had died before Spark's commit

    for name, version in versions.items():  # bronze, quarantine, silver: not written again
        assert delta.table_version(settings.table_path(name)) == version, name
    assert table(spark, settings, "bronze_events").count() == 22
    assert table(spark, settings, "silver_transactions").count() == 20
    dq = dq_rows(spark, settings)
    assert len(dq) == 1
    assert (dq[0]["records_in"], dq[0]["inserted"], dq[0]["duplicates"], dq[0]["quarantined"]) == (22, 20, 1, 1)
    assert dq[0]["reconciled"]


def test_a_check_of_severity_fail_stops_the_batch_with_its_lines_kept_in_bronze(spark, settings):
    from lakehouse import quality

    write_lines(settings.events_inbox, "a.jsonl", [event_line(i) for i in range(5)] + ["{broken"], mtime=FILE_MTIME)
    streaming.ensure_tables(spark, settings, ("events",))
    lines = (spark.read.format("text").load(str(settings.events_inbox))
             .select("value", F.col("_metadata.file_path").alias("source_file"),
                     F.col("_metadata.file_modification_time").alias("file_modified_at")))
    batch = streaming.IngestBatch(settings, "events", app_id="test-app")
    checks = quality.checks_for("events", settings)
    json_check = next(c for c in checks if c.name == "record_is_valid_json")
    batch.checks = [quality._check(c.name, quality.FAIL, c.expectation, c.structural) if c is json_check else c
                    for c in checks]
    with pytest.raises(quality.ExpectationFailed, match="record_is_valid_json"):
        batch(lines, 0)
    assert table(spark, settings, "bronze_events").count() == 6  # as received, for inspection
    for name in ("silver_transactions", "silver_quarantine", "silver_dq_batches"):
        assert table(spark, settings, name).count() == 0, name


def test_labels_stream_into_silver_labels(spark, settings):
    write_lines(settings.labels_inbox, "l.jsonl",
                [label_line(1), label_line(2), label_line(1), label_line(5, is_fraud="yes")], mtime=FILE_MTIME)
    streaming.run_streams(spark, settings, once=True, kinds=("labels",))
    got = {r.event_id: r.is_fraud for r in table(spark, settings, "silver_labels").collect()}
    assert got == {"e000001": True, "e000002": True}
    rec = summary.reconciliation(spark, settings)["labels"]
    assert (rec["records_in"], rec["inserted"], rec["duplicates"], rec["quarantined"]) == (4, 2, 1, 1)


def test_mismatched_checkpoint_is_refused_with_the_fix(spark, settings):
    write_lines(settings.events_inbox, "a.jsonl", [event_line(1)], mtime=FILE_MTIME)
    streaming.run_streams(spark, settings, once=True, kinds=("events",))
    # Someone copies the events checkpoint over the labels one.
    import shutil
    shutil.copytree(settings.checkpoint("events"), settings.checkpoint("labels"))
    with pytest.raises(streaming.CheckpointError, match="lakehouse stream --reset"):
        streaming.run_streams(spark, settings, once=True, kinds=("labels",))
    # A corrupt offset log is refused too: garbage, or an entry cut short after its version line.
    offsets = sorted((settings.checkpoint("events") / "offsets").glob("[0-9]*"))
    entry = offsets[-1].read_bytes()
    offsets[-1].write_bytes(b"\x00garbage")
    with pytest.raises(streaming.CheckpointError, match="corrupt"):
        streaming.run_streams(spark, settings, once=True, kinds=("events",))
    offsets[-1].write_bytes(entry[:entry.index(b"\n") + 20])
    with pytest.raises(streaming.CheckpointError, match=rf"offsets/{offsets[-1].name} is cut short"):
        streaming.run_streams(spark, settings, once=True, kinds=("events",))
    offsets[-1].write_bytes(entry)


def test_a_damaged_table_is_one_error_naming_its_file_and_the_fix(spark, settings):
    """A data file of silver gone (a disk fault, a hand-made clean-up): the next batch that reads it
    fails with the table, the file and how to rebuild it, not a Java trace blaming the checkpoint."""
    write_lines(settings.events_inbox, "a.jsonl", [event_line(i) for i in range(20)], mtime=FILE_MTIME)
    streaming.run_streams(spark, settings, once=True, kinds=("events",))
    silver = settings.table_path("silver_transactions")
    gone = sorted(silver.glob("event_date=*/*.parquet"))
    for f in gone:
        f.unlink()
    # A re-delivery: the silver MERGE must read the files of its date to find it there.
    write_lines(settings.events_inbox, "b.jsonl", [event_line(i) for i in range(20)], mtime=FILE_MTIME + 1)
    with pytest.raises(DamagedTable) as told:
        streaming.run_streams(spark, settings, once=True, kinds=("events",))
    assert told.value.table == "silver_transactions" and told.value.reason == "it is missing"
    assert told.value.file in {str(f.relative_to(silver)) for f in gone}
    assert "lakehouse stream --reset" in str(told.value)


class _Refusal:
    """Make a folder refuse writes, root's included (``chattr +i``; for another user, mode 0555), and
    give them back (at the latest when the test ends)."""

    def __init__(self):
        self.folders: list[Path] = []

    def refuse(self, folder: Path) -> None:
        if os.getuid() == 0:
            res = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
            if res.returncode != 0:
                pytest.skip(f"cannot make a folder refuse root's writes here: {res.stderr.strip()}")
        else:
            folder.chmod(0o555)
        self.folders.append(folder)

    def allow(self, folder: Path) -> None:
        if os.getuid() == 0:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        else:
            folder.chmod(0o755)
        self.folders.remove(folder)


@pytest.fixture
def refusal():
    made = _Refusal()
    yield made
    for folder in list(made.folders):
        made.allow(folder)


def test_a_table_folder_the_os_refuses_is_not_told_as_a_damaged_table(spark, settings, refusal):
    """Java words a refused write like a missing file (`FileNotFoundException: ... (Operation not
    permitted)`); it was told as a damaged table whose fix, `stream --reset`, rebuilds whole tables.
    It is told as the access it is, and once the folder is writable again the batch lands once."""
    write_lines(settings.events_inbox, "a.jsonl", [event_line(i) for i in range(10)], mtime=FILE_MTIME)
    streaming.run_streams(spark, settings, once=True, kinds=("events",))
    log = settings.table_path("silver_transactions") / "_delta_log"
    write_lines(settings.events_inbox, "b.jsonl", [event_line(i) for i in range(10, 20)], mtime=FILE_MTIME + 1)
    refusal.refuse(log)
    with pytest.raises(AccessRefused) as told:
        streaming.run_streams(spark, settings, once=True, kinds=("events",))
    assert told.value.path.parent == log and "nothing is damaged" in str(told.value)
    assert told.value.why in ("Operation not permitted", "Permission denied")
    refusal.allow(log)
    streaming.run_streams(spark, settings, once=True, kinds=("events",))
    silver = delta.read(spark, settings.table_path("silver_transactions"))
    assert sorted(r[0] for r in silver.select("event_id").collect()) == [f"e{i:06d}" for i in range(20)]
    dq = delta.read(spark, settings.table_path("silver_dq_batches")).where("kind = 'events'")
    assert dq.count() == 2 and dq.where("not reconciled").count() == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB file system of its own (tmpfs; needs root and the right to mount, else the test skips)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {res.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_mid_batch_is_told_as_such_and_the_batch_lands_once_after(spark, settings, small_disk):
    """A micro-batch's writes (Delta's files, the checkpoint's) on a disk that fills: the command says
    the disk is full, nothing else; once space is freed, the batch lands once and reconciles."""
    from lakehouse import cli

    settings = settings.with_data_root(small_disk / "data")
    write_lines(settings.events_inbox, "a.jsonl", [event_line(i) for i in range(10)], mtime=FILE_MTIME)
    streaming.run_streams(spark, settings, once=True, kinds=("events",))
    write_lines(settings.events_inbox, "b.jsonl", [event_line(i) for i in range(10, 20)], mtime=FILE_MTIME + 1)
    filler = small_disk / "filler"
    with filler.open("wb", buffering=0) as f:  # every byte left
        try:
            while True:
                f.write(b"x" * 4096)
        except OSError:
            pass
    with pytest.raises(Exception) as failed:
        streaming.run_streams(spark, settings, once=True, kinds=("events",))
    told = cli._user_error(failed.value, settings)
    assert isinstance(told, cli.DiskFull), repr(failed.value)[:2000]
    assert f"data folder {settings.data_root}: 0.0 GB free" in str(told)
    filler.unlink()
    streaming.run_streams(spark, settings, once=True, kinds=("events",))
    silver = delta.read(spark, settings.table_path("silver_transactions"))
    assert sorted(r[0] for r in silver.select("event_id").collect()) == [f"e{i:06d}" for i in range(20)]
    dq = delta.read(spark, settings.table_path("silver_dq_batches")).where("kind = 'events'")
    assert dq.count() == 2 and dq.where("not reconciled").count() == 0


def test_a_file_gone_before_its_batch_read_it_stops_the_stream_instead_of_vanishing(spark, settings,
                                                                                    monkeypatch):
    """The stream crashed after planning a batch; meanwhile a clean-up removed one of its files. Spark's
    replay would skip the file without a word (the batch reconciles with the lines it read); the batch
    stops before it writes, names the file, and completes once the file is back."""
    a = write_lines(settings.events_inbox, "a.jsonl", [event_line(i) for i in range(10)], mtime=FILE_MTIME)
    write_lines(settings.events_inbox, "b.jsonl", [event_line(i) for i in range(10, 25)], mtime=FILE_MTIME + 1)

    def crash(*args, **kwargs):
        raise RuntimeError("crashed before the batch wrote anything")

    with monkeypatch.context() as m:  # the batch is planned, then the process dies
        m.setattr(delta, "merge_insert_new", crash)
        with pytest.raises(Exception, match="crashed before the batch wrote anything"):
            streaming.run_streams(spark, settings, once=True, kinds=("events",))
    assert sorted(streaming.source_entries(settings.checkpoint("events"), 0)) \
        == [(str(a), int(FILE_MTIME * 1000)), (str(a.with_name("b.jsonl")), int((FILE_MTIME + 1) * 1000))]
    kept = a.read_bytes()
    a.unlink()
    with pytest.raises(streaming.InboxFileGone, match=r"1 file\(s\) of events micro-batch 0 .*: a\.jsonl\. ") as told:
        streaming.run_streams(spark, settings, once=True, kinds=("events",))
    assert "put them back under the same names" in str(told.value)
    a.write_bytes(kept)  # back, as it was
    os.utime(a, (FILE_MTIME, FILE_MTIME))
    streaming.run_streams(spark, settings, once=True, kinds=("events",))
    assert table(spark, settings, "silver_transactions").count() == 25
    assert [(r["batch_id"], r["records_in"], r["reconciled"]) for r in dq_rows(spark, settings)] == [(0, 25, True)]


def test_a_late_file_with_an_old_modification_time_is_still_read(spark, settings):
    """A delivery copied with its original time (rsync -a) lands after newer files: Spark's file source
    would ignore a file more than a week older than the newest it has seen, without a word."""
    write_lines(settings.events_inbox, "new.jsonl", [event_line(i) for i in range(5)], mtime=FILE_MTIME)
    streaming.run_streams(spark, settings, once=True, kinds=("events",))
    # sent a month before (its events older still: not in the future of their file's arrival)
    write_lines(settings.events_inbox, "old.jsonl",
                [event_line(i, event_time=f"2026-10-23T12:{i:02d}:00Z") for i in range(5, 12)],
                mtime=FILE_MTIME - 30 * 86_400)
    streaming.run_streams(spark, settings, once=True, kinds=("events",))
    assert table(spark, settings, "silver_transactions").count() == 12
    assert [r["records_in"] for r in dq_rows(spark, settings)] == [5, 7]


def test_lines_appended_to_a_file_after_its_batch_read_it_are_read_again_not_lost(spark, settings):
    """A writer that appends to an inbox file instead of renaming a finished one: Spark's file source
    reads a file once, by name, so the lines added after its batch would never be read, without a word.
    The changed file is copied whole under a new name, whose lines read before are re-deliveries."""
    settings = settings.replace(max_files_per_trigger=1)
    # A writer's name with a time in it (a colon and a space: Hadoop reads neither in a plain path).
    a = write_lines(settings.events_inbox, "a 10:00.jsonl", [event_line(i) for i in range(3)], mtime=FILE_MTIME)
    b = write_lines(settings.events_inbox, "b.jsonl", [event_line(i) for i in range(10, 12)], mtime=FILE_MTIME + 1)

    def append(path, ids, mtime):
        with open(path, "a", encoding="utf-8") as f:
            f.writelines(event_line(i) + "\n" for i in ids)
        os.utime(path, (mtime, mtime))

    def on_batch(result):  # once batch 0 has read a.jsonl, its writer adds two lines to it
        if result.batch_id == 0:
            append(a, [3, 4], FILE_MTIME + 5)

    streaming.run_streams(spark, settings, once=True, kinds=("events",), on_batch=on_batch)
    copy = a.with_name(f"a 10:00.changed-{int((FILE_MTIME + 5) * 1000)}.jsonl")
    assert copy.read_bytes() == a.read_bytes()  # made by batch 1; under --once the next run reads it
    assert sorted(p.name for p in settings.events_inbox.iterdir()) == sorted([a.name, copy.name, "b.jsonl"])
    streaming.run_streams(spark, settings, once=True, kinds=("events",))
    ids = sorted(r["event_id"] for r in table(spark, settings, "silver_transactions").collect())
    assert ids == [f"e{i:06d}" for i in (0, 1, 2, 3, 4, 10, 11)]
    assert [(r["records_in"], r["inserted"], r["duplicates"], r["reconciled"]) for r in dq_rows(spark, settings)] \
        == [(3, 3, 0, True), (2, 2, 0, True), (5, 2, 3, True)]

    # Lines added while no stream ran are found at the start; files unchanged are never copied again.
    append(b, [12], FILE_MTIME + 9)
    streaming.run_streams(spark, settings, once=True, kinds=("events",))
    assert table(spark, settings, "silver_transactions").count() == 8
    assert [(r["records_in"], r["inserted"], r["duplicates"]) for r in dq_rows(spark, settings)][3:] == [(3, 1, 2)]
    assert len(list(settings.events_inbox.iterdir())) == 4
    streaming.run_streams(spark, settings, once=True, kinds=("events",))
    assert len(dq_rows(spark, settings)) == 4 and len(list(settings.events_inbox.iterdir())) == 4


def test_a_line_read_before_its_writer_finished_it_is_quarantined_as_such_then_ingested_whole(spark, settings):
    """A writer that writes an inbox file in place was stopped mid-line when the batch read it: the
    partial line is not JSON, and its quarantine row says why (beside record_is_valid_json). A line
    that is broken JSON but whole (its file ends with a line end) keeps the suite's name alone. Once
    the writer finishes, the file is read again whole and its complete line is ingested."""
    inbox = settings.events_inbox
    whole_line, cut = event_line(2), event_line(2)[:25]
    a = write_lines(inbox, "a.jsonl", [event_line(0), event_line(1)], mtime=FILE_MTIME)
    with open(a, "ab") as f:
        f.write(cut.encode())  # no line end yet: the writer is still at it
    os.utime(a, (FILE_MTIME, FILE_MTIME))
    write_lines(inbox, "b.jsonl", [event_line(10), event_line(11)[:25]], mtime=FILE_MTIME)  # cut, but whole
    streaming.run_streams(spark, settings, once=True, kinds=("events",))

    q = {(os.path.basename(r["source_file"]), r["raw"]): r["failed_checks"]
         for r in table(spark, settings, "silver_quarantine").collect()}
    assert q == {("a.jsonl", cut): ["record_is_valid_json", streaming.INCOMPLETE_LINE],
                 ("b.jsonl", event_line(11)[:25]): ["record_is_valid_json"]}
    first = dq_rows(spark, settings)[0]
    assert first["check_failures"][streaming.INCOMPLETE_LINE] == 1
    assert first["check_failures"]["record_is_valid_json"] == 2 and first["quarantined"] == 2

    with open(a, "ab") as f:  # the writer finishes the line
        f.write(whole_line[25:].encode() + b"\n")
    os.utime(a, (FILE_MTIME + 5, FILE_MTIME + 5))
    streaming.run_streams(spark, settings, once=True, kinds=("events",))
    ids = sorted(r["event_id"] for r in table(spark, settings, "silver_transactions").collect())
    assert ids == [f"e{i:06d}" for i in (0, 1, 2, 10)]
    second = dq_rows(spark, settings)[1]
    assert (second["records_in"], second["inserted"], second["duplicates"], second["quarantined"],
            second["check_failures"][streaming.INCOMPLETE_LINE], second["reconciled"]) == (3, 1, 2, 0, 0, True)


def test_a_replay_after_the_bronze_write_is_made_of_the_lines_the_first_attempt_received(spark, settings,
                                                                                          monkeypatch):
    """A batch read a file its writer had not finished, wrote silver and bronze, and died before its
    data-quality row; the writer finished meanwhile. The replay is made of the lines bronze holds (the
    file, read again, would give it lines the first attempt never saw, and counts that do not
    reconcile); the lines added come in the copy the inbox watch makes at the start."""
    inbox = settings.events_inbox
    a = write_lines(inbox, "a.jsonl", [event_line(0), event_line(1)], mtime=FILE_MTIME)
    with open(a, "ab") as f:
        f.write(event_line(2)[:25].encode())  # the writer is still at it
    os.utime(a, (FILE_MTIME, FILE_MTIME))
    real = delta.append_once

    def dies_before_the_dq_row(df, path, *args, **kwargs):
        if str(path) == str(settings.table_path("silver_dq_batches")):
            raise RuntimeError("killed before the data-quality row")
        return real(df, path, *args, **kwargs)

    monkeypatch.setattr(delta, "append_once", dies_before_the_dq_row)
    with pytest.raises(Exception, match="killed before the data-quality row"):
        streaming.run_streams(spark, settings, once=True, kinds=("events",))
    monkeypatch.setattr(delta, "append_once", real)
    assert table(spark, settings, "bronze_events").count() == 3 and not dq_rows(spark, settings)

    with open(a, "ab") as f:  # the writer finishes the line and adds one
        f.write((event_line(2)[25:] + "\n" + event_line(3) + "\n").encode())
    os.utime(a, (FILE_MTIME + 5, FILE_MTIME + 5))
    streaming.run_streams(spark, settings, once=True, kinds=("events",))

    rows = [(r["batch_id"], r["records_in"], r["inserted"], r["duplicates"], r["quarantined"], r["reconciled"])
            for r in dq_rows(spark, settings)]
    assert rows == [(0, 3, 2, 0, 1, True), (1, 4, 2, 2, 0, True)]
    assert dq_rows(spark, settings)[0]["check_failures"][streaming.INCOMPLETE_LINE] == 1
    ids = sorted(r["event_id"] for r in table(spark, settings, "silver_transactions").collect())
    assert ids == [f"e{i:06d}" for i in range(4)]
    bronze = table(spark, settings, "bronze_events")
    assert bronze.where("batch_id = 0").count() == 3 and bronze.count() == 7


def test_a_commit_emptied_by_a_power_loss_is_refused_before_delta_reads_it_as_nothing(spark, settings):
    """After a power loss a commit file can be left empty (renamed, never written to disk): Delta reads it
    as a commit of nothing and the rows it added vanish without an error. The stream refuses to start."""
    write_lines(settings.events_inbox, "a.jsonl", [event_line(i) for i in range(10)], mtime=FILE_MTIME)
    streaming.run_streams(spark, settings, once=True, kinds=("events",))
    write_lines(settings.events_inbox, "b.jsonl", [event_line(i) for i in range(10, 30)], mtime=FILE_MTIME + 1)
    streaming.run_streams(spark, settings, once=True, kinds=("events",))
    bronze = settings.table_path("bronze_events")
    latest = bronze / "_delta_log" / f"{delta.table_version(bronze):020d}.json"
    latest.write_bytes(b"")
    (latest.parent / f".{latest.name}.crc").unlink(missing_ok=True)  # as the power loss leaves it
    spark._jvm.org.apache.spark.sql.delta.DeltaLog.clearCache()  # as a new process finds the log
    assert delta.read(spark, bronze).count() == 10  # Delta's reading: 20 rows gone, no error
    write_lines(settings.events_inbox, "c.jsonl", [event_line(30)], mtime=FILE_MTIME + 2)
    versions = {n: delta.table_version(settings.table_path(n)) for n in ("silver_transactions", "silver_dq_batches")}
    with pytest.raises(DamagedTable) as told:
        streaming.run_streams(spark, settings, once=True, kinds=("events",))
    assert (told.value.table, told.value.file, told.value.reason) == ("bronze_events", f"_delta_log/{latest.name}",
                                                                     EMPTY_COMMIT)
    assert {n: delta.table_version(settings.table_path(n)) for n in versions} == versions  # nothing ran


def test_generated_feed_reconciles_with_the_generator_ground_truth(spark, settings):
    from lakehouse.generator import GeneratorConfig, generate_backlog

    gen = generate_backlog(settings.events_inbox, settings.labels_inbox,
                           GeneratorConfig(seed=5, days=1.0, n_users=400, n_merchants=80, file_events=1500,
                                           malformed_rate=0.01, duplicate_rate=0.03))
    streaming.run_streams(spark, settings.replace(max_files_per_trigger=6), once=True)
    rec = summary.reconciliation(spark, settings)
    assert rec["events"]["records_in"] == gen["lines_written"]
    assert rec["events"]["inserted"] == gen["events"]
    assert rec["events"]["duplicates"] == gen["duplicates"]
    assert rec["events"]["quarantined"] == gen["malformed"]
    assert rec["events"]["reconciled"] and rec["labels"]["reconciled"]
    assert rec["labels"]["inserted"] == gen["labels_written"]
    silver = table(spark, settings, "silver_transactions")
    assert silver.select("event_id").distinct().count() == gen["events"]
    # Fraud is only in the labels: every label points at an event that reached silver.
    labels = table(spark, settings, "silver_labels")
    assert labels.join(silver, "event_id", "left_anti").count() == 0


def test_a_name_read_long_ago_and_written_again_is_read_again(spark, settings):
    """A writer that reuses its file names (``hour-00.jsonl`` every day). Spark's file source reads a
    path once, ever; the inbox watch copies a file that changed since it was read, but it watched the
    files of the last ten micro-batches only, so a name read earlier than that was never read again,
    without a word. At a start the watch now checks every file the checkpoint lists."""
    settings = settings.replace(max_files_per_trigger=1)
    inbox = settings.events_inbox
    write_lines(inbox, "hour-00.jsonl", [event_line(i) for i in range(3)], mtime=FILE_MTIME)
    for h in range(1, 12):
        write_lines(inbox, f"hour-{h:02d}.jsonl", [event_line(10 * h)], mtime=FILE_MTIME + h)
    streaming.run_streams(spark, settings, once=True, kinds=("events",))
    assert len(dq_rows(spark, settings)) == 12

    # The next day, while no stream runs: hour-00.jsonl written again, with other events.
    write_lines(inbox, "hour-00.jsonl", [event_line(i) for i in range(200, 203)], mtime=FILE_MTIME + 3600)
    streaming.run_streams(spark, settings, once=True, kinds=("events",))
    ids = {r.event_id for r in table(spark, settings, "silver_transactions").collect()}
    assert {f"e{i:06d}" for i in range(200, 203)} <= ids and len(ids) == 3 + 11 + 3
    last = dq_rows(spark, settings)[-1]
    assert (last["records_in"], last["inserted"], last["duplicates"], last["reconciled"]) == (3, 3, 0, True)
    assert sorted(p.name for p in inbox.iterdir())[:2] == [
        f"hour-00.changed-{int((FILE_MTIME + 3600) * 1000)}.jsonl", "hour-00.jsonl"]


def test_continuous_mode_picks_up_new_files_and_appended_lines_until_stopped(spark, settings):
    """A continuous stream reads each new file; and lines appended to a file already read, while no
    new file lands (so Spark plans no batch), are copied by the stream's check between batches."""
    import threading
    import time

    fast = settings.replace(trigger_seconds=0.5)
    stop = threading.Event()
    errors = []

    def run():
        try:
            streaming.run_streams(spark, fast, once=False, kinds=("events",), stop_event=stop)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    # Create the tables first, so polling below never meets a table that is half created.
    streaming.ensure_tables(spark, fast, ("events",))
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    def wait_for(rows):
        deadline = time.time() + 120
        while time.time() < deadline and not errors:
            if delta.read(spark, settings.table_path("silver_transactions")).count() == rows:
                break
            time.sleep(1)
        assert not errors, errors
        assert delta.read(spark, settings.table_path("silver_transactions")).count() == rows

    try:
        for n, name in enumerate(["first.jsonl", "second.jsonl"]):
            write_lines(settings.events_inbox, name, [event_line(100 * n + i) for i in range(5)], mtime=FILE_MTIME)
            wait_for(5 * (n + 1))
        second = settings.events_inbox / "second.jsonl"
        with open(second, "a", encoding="utf-8") as f:  # no new file lands after this
            f.writelines(event_line(100 + i) + "\n" for i in (5, 6))
        os.utime(second, (FILE_MTIME + 5, FILE_MTIME + 5))
        wait_for(12)
        whole = second.read_bytes()
        with open(second, "a", encoding="utf-8") as f:  # and again: this copy holds the new line alone
            f.write(event_line(107) + "\n")
        os.utime(second, (FILE_MTIME + 9, FILE_MTIME + 9))
        wait_for(13)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive()
    assert (settings.events_inbox / f"second.changed-{int((FILE_MTIME + 5) * 1000)}.jsonl").read_bytes() == whole
    assert (settings.events_inbox / f"second.changed-{int((FILE_MTIME + 9) * 1000)}.jsonl").read_text() \
        == event_line(107) + "\n"
    assert summary.reconciliation(spark, settings)["events"]["inserted"] == 13
    assert [(r["records_in"], r["inserted"], r["duplicates"], r["reconciled"]) for r in dq_rows(spark, settings)] \
        == [(5, 5, 0, True), (5, 5, 0, True), (7, 2, 5, True), (1, 1, 0, True)]


def test_a_file_finished_while_its_batch_runs_is_copied_before_the_next_batch_is_planned(spark, settings,
                                                                                        monkeypatch):
    """A writer finishes the file a batch is reading (after Spark read it, during the silver MERGE).
    The copy is made when the batch ends, before Spark lists the inbox again, so a file landing
    meanwhile (written after the copy's lines) is taken after it, as the lines were written."""
    from lakehouse.io import delta as delta_io

    a = write_lines(settings.events_inbox, "a.jsonl", [event_line(1)], mtime=FILE_MTIME)
    with open(a, "ab") as f:
        f.write(event_line(2)[:20].encode())  # the writer stops mid-line
    os.utime(a, (FILE_MTIME, FILE_MTIME))
    real_merge = delta_io.merge_insert_new

    def finishing(*args, **kwargs):
        with open(a, "ab") as f:
            f.write((event_line(2)[20:] + "\n" + event_line(3) + "\n").encode())
        os.utime(a, (FILE_MTIME + 5, FILE_MTIME + 5))
        return real_merge(*args, **kwargs)

    monkeypatch.setattr(delta_io, "merge_insert_new", finishing)
    streaming.run_streams(spark, settings, once=True, kinds=("events",))
    copy = settings.events_inbox / f"a.changed-{int((FILE_MTIME + 5) * 1000)}.jsonl"
    assert copy.exists()  # before this run ends, so the next listing holds it
    assert copy.read_text().splitlines()[-2:] == [event_line(2), event_line(3)]
    assert [(r["records_in"], r["inserted"], r["quarantined"]) for r in dq_rows(spark, settings)] == [(2, 1, 1)]


def test_a_stop_during_a_batch_is_clean_and_the_restart_completes_it(spark, settings, monkeypatch):
    """``stop()`` while a micro-batch runs a Spark job: the query ends as stopped (Spark used to die
    on a StackOverflowError matching the interrupted batch's long traceback), and a restart replays
    the batch exactly once."""
    import threading
    import time

    from lakehouse.io import delta as delta_io

    expected = write_feed(settings.events_inbox, settings.labels_inbox, n_files=2, per_file=50)
    running = threading.Event()
    real_merge = delta_io.merge_insert_new

    def slow_merge(spark_, source, *args, **kwargs):  # the silver MERGE is still running when stop() comes
        running.set()
        wait = F.udf(lambda: time.sleep(120) or True, "boolean")
        return real_merge(spark_, source.where(wait()), *args, **kwargs)

    monkeypatch.setattr(delta_io, "merge_insert_new", slow_merge)
    streaming.ensure_tables(spark, settings, ("events",))
    query = streaming.start_query(spark, settings, "events", once=False)
    try:
        assert running.wait(120), "the batch never reached the silver MERGE"
        time.sleep(2)  # the job is running
        started = time.time()
        query.stop()
        assert time.time() - started < 60
        assert query.exception() is None
        # Spark's own verdict: "Stopped" only when it recognized the interruption (a StackOverflowError
        # in the stream thread left the query dead with "Processing new data").
        assert query.status["message"] == "Stopped"
    finally:
        if query.isActive:
            query.stop()
    assert table(spark, settings, "silver_transactions").count() == 0  # the batch was cut before its MERGE

    monkeypatch.setattr(delta_io, "merge_insert_new", real_merge)
    streaming.run_streams(spark, settings, once=True, kinds=("events",))
    silver = table(spark, settings, "silver_transactions")
    assert silver.count() == silver.select("event_id").distinct().count() == len(expected["valid_ids"])
    assert table(spark, settings, "bronze_events").count() == expected["lines"]
    dq = [r for r in dq_rows(spark, settings) if r["kind"] == "events"]
    assert [r["batch_id"] for r in dq] == [0] and dq[0]["reconciled"]
