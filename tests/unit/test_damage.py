"""A damaged Delta table told as one error (lakehouse.damage), on the texts Spark 4.2 and Delta 4.4 gave
for each kind of damage, made by hand on a real table (a log entry cut short with and without its
Hadoop checksum, a data file gone or overwritten, the log's first commit gone, a commit in the middle
gone); and the checkpoint's own log entries (streaming._log_entry_problem)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lakehouse import cli, damage
from lakehouse.config import TABLES, Settings
from lakehouse.streaming import _log_entry_problem

ROOT = Path("/data/lake")
TABLE_PATHS = {name: ROOT / "delta" / layer / folder for name, (layer, folder) in TABLES.items()}

CHECKSUM = (
    "py4j.protocol.Py4JJavaError: An error occurred while calling o1592.execute.\n"
    ": org.apache.spark.SparkException: [FAILED_READ_FILE.NO_HINT] Encountered error while reading file "
    "file:///data/lake/delta/silver/transactions/_delta_log/00000000000000000001.json.  SQLSTATE: KD001\n"
    "\tat org.apache.spark.sql.errors.QueryExecutionErrors$.cannotReadFilesError(QueryExecutionErrors.scala:940)\n"
    "Caused by: org.apache.hadoop.fs.ChecksumException: Checksum error: "
    "file:/data/lake/delta/silver/transactions/_delta_log/00000000000000000001.json at 0 exp: -1170308654 "
    "got: -600133061\n")
CUT_JSON = (
    ": org.apache.spark.SparkException: [FAILED_READ_FILE.NO_HINT] Encountered error while reading file "
    "file:///data/lake/delta/gold/user_features_5m/_delta_log/00000000000000000007.json.  SQLSTATE: KD001\n"
    "Caused by: org.apache.spark.SparkException: [MALFORMED_RECORD_IN_PARSING.WITHOUT_SUGGESTION] Malformed "
    "records are detected in record parsing: [null,null,null].\n"
    "Caused by: com.fasterxml.jackson.core.io.JsonEOFException: Unexpected end-of-input: expected close "
    "marker for Object (start marker at [Source: REDACTED; line: 1, column: 15])\n")
DATA_GONE = (
    ": org.apache.spark.SparkException: [FAILED_READ_FILE.FILE_NOT_EXIST] Encountered error while reading file "
    "file:/data/lake/delta/gold/transaction_features/event_date=2026-11-20/part-00000-59ebfd6b.c000.snappy."
    "parquet. File does not exist. It is possible the underlying files have been updated.\n"
    "Caused by: java.io.FileNotFoundException: File file:/data/lake/delta/gold/transaction_features/"
    "event_date=2026-11-20/part-00000-59ebfd6b.c000.snappy.parquet does not exist\n")
DATA_OVERWRITTEN = (
    ": org.apache.spark.SparkException: [FAILED_READ_FILE.NO_HINT] Encountered error while reading file "
    "file:/data/lake/delta/bronze/events/part-00003-aa.c000.snappy.parquet.  SQLSTATE: KD001\n"
    "Caused by: java.lang.RuntimeException: file:/data/lake/delta/bronze/events/part-00003-aa.c000.snappy.parquet "
    "is not a Parquet file. Expected magic number at tail, but found [98, 97, 103, 101]\n")
FIRST_COMMIT_GONE = (
    ": org.apache.spark.sql.delta.DeltaFileNotFoundException: [DELTA_TRUNCATED_TRANSACTION_LOG] "
    "file:/data/lake/delta/gold/risk_scores/_delta_log/00000000000000000000.json: Unable to reconstruct state "
    "at version 2 as the transaction log has been truncated due to manual deletion or the log retention policy\n")
GAP = (
    ": org.apache.spark.sql.delta.DeltaIllegalStateException: [DELTA_VERSIONS_NOT_CONTIGUOUS] Versions (0, 2) "
    "are not contiguous.\nA gap in the delta log between versions 0 and 2 was detected while trying to load "
    "version -1.\n")


@pytest.mark.parametrize("text, table, file, reason", [
    (CHECKSUM, "silver_transactions", "_delta_log/00000000000000000001.json", "checksum does not match"),
    (CUT_JSON, "gold_user_features_5m", "_delta_log/00000000000000000007.json", "cut short"),
    (DATA_GONE, "gold_transaction_features", "event_date=2026-11-20/part-00000-59ebfd6b.c000.snappy.parquet",
     "it is missing"),
    (DATA_OVERWRITTEN, "bronze_events", "part-00003-aa.c000.snappy.parquet", "not a readable Parquet file"),
    (FIRST_COMMIT_GONE, "risk_scores", "_delta_log/00000000000000000000.json", "first commits are gone"),
])
def test_the_error_names_the_table_the_file_and_what_is_wrong(text, table, file, reason):
    found = damage.find(text, TABLE_PATHS)
    assert found is not None
    assert (found.table, found.file) == (table, file)
    assert reason in found.reason
    message = str(found)
    assert message.startswith(f"The Delta table {table} at {TABLE_PATHS[table]} is damaged: {file}: ")
    assert "Fix: restore the table's folder from a backup" in message


def test_the_fix_is_the_one_of_the_table_layer():
    assert "lakehouse stream --reset" in damage.fix_for("silver_transactions")
    assert "lakehouse stream --reset" in damage.fix_for("bronze_labels")
    # too-late records come from the order events arrived in: only a replay of the inbox rebuilds them
    assert "lakehouse stream --reset" in damage.fix_for("gold_too_late_events")
    assert "lakehouse backfill" in damage.fix_for("gold_merchant_risk_daily")
    assert "lakehouse backfill" not in damage.fix_for("silver_labels")
    assert "lakehouse score" in damage.fix_for("risk_scores")


@pytest.mark.parametrize("text", [
    # an inbox file that cannot be read is the stream's input, not a table
    "[FAILED_READ_FILE.NO_HINT] Encountered error while reading file file:/data/lake/inbox/events/a.jsonl.",
    # a table's path in an error that is not about its files
    "[DELTA_CONCURRENT_APPEND] ConcurrentAppendException: Files were added to /data/lake/delta/gold/"
    "transaction_features/event_date=2026-11-20 by a concurrent update.",
    # a table folder that does not exist yet is not a damaged table
    "[PATH_NOT_FOUND] Path does not exist: file:/data/lake/delta/gold/risk_scores.",
    "psycopg.OperationalError: connection failed: Connection refused",
])
def test_other_errors_are_not_a_damaged_table(text):
    assert damage.find(text, TABLE_PATHS) is None


def test_a_folder_with_a_space_is_found_too():
    paths = {name: Path("/my data/lake") / p.relative_to(ROOT) for name, p in TABLE_PATHS.items()}
    found = damage.find(DATA_GONE.replace("/data/lake", "/my%20data/lake"), paths)
    assert found is not None and found.table == "gold_transaction_features"
    assert found.file == "event_date=2026-11-20/part-00000-59ebfd6b.c000.snappy.parquet"


def _query_failure(batch_error: str) -> RuntimeError:
    """A streaming query's failure, raised over the batch's error (a Py4J error's text) as its cause."""
    try:
        try:
            raise RuntimeError(batch_error)
        except RuntimeError as inner:
            raise RuntimeError("[STREAM_FAILED] Query terminated with exception") from inner
    except RuntimeError as exc:
        return exc


def _commits(folder: Path, versions, checkpoint: int | None = None) -> Path:
    """A table folder whose log holds a JSON commit per version (and a checkpoint file, named by
    ``_last_checkpoint``)."""
    log = folder / "_delta_log"
    log.mkdir(parents=True)
    for v in versions:
        (log / f"{v:020d}.json").write_text('{"commitInfo":{"operation":"WRITE"}}\n{"add":{"path":"a.parquet"}}\n')
    if checkpoint is not None:
        (log / f"{checkpoint:020d}.checkpoint.parquet").write_bytes(b"PAR1...PAR1")
        (log / "_last_checkpoint").write_text(f'{{"version":{checkpoint},"size":3}}')
    return folder


def test_log_gap_looks_only_at_the_commits_a_reader_needs(tmp_path):
    assert damage.log_gap(_commits(tmp_path / "a", [0, 1, 3, 4])) == (1, 3)
    assert damage.log_gap(_commits(tmp_path / "b", [0, 1, 2])) is None
    # before the checkpoint, commits may be gone (log clean-up): a reader starts from the checkpoint
    assert damage.log_gap(_commits(tmp_path / "c", [4, 7, 8, 10, 11, 12], checkpoint=10)) is None
    assert damage.log_gap(_commits(tmp_path / "d", [10, 11, 13], checkpoint=10)) == (11, 13)
    assert damage.log_gap(tmp_path / "none") is None


def test_commits_removed_by_log_clean_up_are_told_from_a_damaged_log(tmp_path):
    from lakehouse.io import delta

    cleaned = _commits(tmp_path / "a", [9, 10, 11, 12], checkpoint=10)  # clean-up kept 9 on
    assert delta.cleaned_before(cleaned, 3) == 9  # the changes from 3 on cannot be read
    assert delta.cleaned_before(cleaned, 11) is None  # commit 11 is there
    assert delta.cleaned_before(_commits(tmp_path / "b", [10, 11], checkpoint=9), 3) == 10
    # a commit gone with no checkpoint standing in, or one gone after the first left: damage, not clean-up
    assert delta.cleaned_before(_commits(tmp_path / "c", [5, 6]), 3) is None
    assert delta.cleaned_before(_commits(tmp_path / "d", [9, 10, 12], checkpoint=10), 11) is None
    assert delta.cleaned_before(tmp_path / "none", 0) is None


def test_a_gap_error_names_no_file_so_the_table_is_found_by_its_log(tmp_path):
    settings = Settings.from_env({"LAKEHOUSE_DATA": str(tmp_path)})
    for name in ("bronze_events", "silver_transactions", "silver_labels"):
        _commits(settings.table_path(name), [0, 1, 2] if name != "silver_labels" else [0, 3])
    found = damage.explain(RuntimeError(GAP), settings)
    assert found is not None and found.table == "silver_labels" and found.file is None
    assert "its log lacks the commit files of versions 1 to 2" in str(found)
    # the same error with no gap to be found: not told as a damaged table
    assert damage.explain(RuntimeError(GAP), Settings.from_env({"LAKEHOUSE_DATA": str(tmp_path / "x")})) is None


def test_the_cli_tells_a_damaged_table_as_its_one_error_line():
    settings = Settings.from_env({"LAKEHOUSE_DATA": "/data/lake"})
    told = cli._user_error(_query_failure(DATA_GONE), settings)  # a Py4J error under the query's failure
    assert isinstance(told, damage.DamagedTable) and told.table == "gold_transaction_features"
    assert cli._user_error(RuntimeError("a bug"), settings) is None
    assert cli._user_error(RuntimeError(DATA_GONE), None) is None  # no settings, nothing to map it to


def test_a_full_disk_is_told_as_one_line_not_as_a_damaged_table(tmp_path):
    import errno

    settings = Settings.from_env({"LAKEHOUSE_DATA": str(tmp_path)})
    # a Delta write on a full disk: the error names a file of a table, and Java's words for it
    text = (": org.apache.spark.SparkException: Task failed while writing rows to file:" + str(tmp_path) +
            "/delta/silver/transactions.\nCaused by: java.io.IOException: No space left on device\n"
            "\tat java.base/java.io.FileOutputStream.writeBytes(Native Method)\n"
            "Caused by: java.io.FileNotFoundException: File does not exist")
    told = cli._user_error(_query_failure(text), settings)
    assert isinstance(told, cli.DiskFull)
    assert f"data folder {tmp_path}: " in str(told) and "GB free" in str(told) and "run the command again" in str(told)
    assert isinstance(cli._user_error(OSError(errno.ENOSPC, "No space left on device"), settings), cli.DiskFull)
    assert isinstance(cli._user_error(RuntimeError('could not extend file "base/5/16384": Disk quota exceeded'),
                                      settings), cli.DiskFull)  # Postgres' words
    assert cli.disk_full(RuntimeError("a bug"), settings) is None


def test_a_machine_limit_is_never_taken_for_a_damaged_table(tmp_path):
    """The stream's query wait asks `explain` first: a full disk or the open-file limit, which Java words
    like a missing file of a table, must reach the command's own message, not a rebuild's."""
    settings = Settings.from_env({"LAKEHOUSE_DATA": str(tmp_path)})
    part = tmp_path / "delta/silver/transactions/event_date=2026-11-20/part-00000-59ebfd6b.c000.snappy.parquet"
    for why in ("No space left on device", "Too many open files"):
        exc = _query_failure(f"org.apache.spark.SparkException: [FAILED_READ_FILE] Error while reading file "
                             f"file:{part}.\nCaused by: java.io.FileNotFoundException: {part} ({why})")
        assert damage.explain(exc, settings) is None, why
    told = cli._user_error(exc, settings)
    assert isinstance(told, cli.UserError) and "limit of files a process may hold open" in str(told)
    assert "`ulimit -n " in str(told) and "nothing is damaged" in str(told)
    # the same words without the limit: the damaged table it is
    exc = _query_failure(f"[FAILED_READ_FILE] Error while reading file file:{part}.\n"
                         f"Caused by: java.io.FileNotFoundException: {part} (No such file or directory)")
    assert damage.explain(exc, settings).table == "silver_transactions"
    assert cli.open_files_exhausted(RuntimeError("a bug")) is None


def test_a_refused_access_is_told_as_such_not_as_a_damaged_table(tmp_path):
    import errno

    settings = Settings.from_env({"LAKEHOUSE_DATA": str(tmp_path)})
    log = tmp_path / "delta/silver/transactions/_delta_log"
    # Java's words for a commit the OS refused (a folder of another user, or made immutable): the same
    # exception as a missing file, which was told as a damaged table to rebuild with `stream --reset`
    text = (f"py4j.protocol.Py4JJavaError: An error occurred while calling o1832.execute.\n: java.io."
            f"FileNotFoundException: {log}/.00000000000000000002.json.842ab394.tmp (Operation not permitted)")
    exc = _query_failure(text)
    told = cli._user_error(exc, settings)
    assert damage.explain(exc, settings) is None
    assert isinstance(told, damage.AccessRefused)
    assert told.path == log / ".00000000000000000002.json.842ab394.tmp" and told.why == "Operation not permitted"
    assert f"chown -R $(id -un) {tmp_path}" in str(told) and "nothing is damaged" in str(told)
    java_nio = RuntimeError(f"java.nio.file.AccessDeniedException: {log}/00000000000000000003.json")
    assert damage.refused(java_nio, settings).why == "Permission denied"
    # Python's own: a folder of another user, a file in the place of a folder
    denied = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "checkpoints/events"))
    assert damage.refused(denied, settings).path == tmp_path / "checkpoints/events"
    (tmp_path / "inbox").write_text("")
    in_the_way = NotADirectoryError(errno.ENOTDIR, "Not a directory", str(tmp_path / "inbox/events"))
    assert "move that file away" in str(damage.refused(in_the_way, settings))
    # not refusals of the data folder: elsewhere, a folder made twice, another error
    assert damage.refused(PermissionError(errno.EACCES, "Permission denied", "/etc/shadow"), settings) is None
    assert damage.refused(FileExistsError(errno.EEXIST, "File exists", str(tmp_path)), settings) is None
    assert damage.refused(RuntimeError(DATA_GONE), settings) is None


def test_the_data_folder_is_checked_before_a_job_starts(tmp_path):
    (tmp_path / "afile").write_text("")
    for root, why in ((tmp_path / "afile", "it is a file, not a folder"),
                      (tmp_path / "afile" / "data", "a file is in the place of one of its parent folders")):
        with pytest.raises(cli.UserError, match=f"cannot write the data folder {root} .LAKEHOUSE_DATA.: {why}"):
            cli.check_data_root(Settings.from_env({"LAKEHOUSE_DATA": str(root)}))
    cli.check_data_root(Settings.from_env({"LAKEHOUSE_DATA": str(tmp_path / "new" / "data")}))
    assert (tmp_path / "new" / "data").is_dir() and not any((tmp_path / "new" / "data").iterdir())


@pytest.mark.parametrize("data, problem", [
    (b'v1\n{"batchWatermarkMs":0,"batchTimestampMs":1}\n{"logOffset":0}\n', None),
    (b'v1\n{"batchWatermarkMs":0}\n-\n', None),  # a source with no offset yet
    (b'v1\n{"nextBatchWatermarkMs":0}', None),  # a commit, no trailing newline
    (b'v1\n{"batchWatermarkMs":0,"batchTi', "line 2 is not JSON"),  # cut short
    (b'v1\n{"batchWatermarkMs":0}\n{"logOff', "line 3 is not JSON"),
    (b"", "no version line"),  # emptied
    (b"\x00garbage", "no version line"),
    (b'{"logOffset":0}\n', "no version line"),
])
def test_a_checkpoint_log_entry_is_checked_line_by_line(data, problem):
    found = _log_entry_problem(data)
    assert found is None if problem is None else problem in found


def test_check_log_finds_an_emptied_or_cut_commit_before_delta_reads_it(tmp_path):
    assert damage.check_log("silver_labels", _commits(tmp_path / "ok", range(4))) is None
    assert damage.check_log("silver_labels", tmp_path / "no_table") is None

    empty = _commits(tmp_path / "empty", range(4))
    (empty / "_delta_log" / f"{3:020d}.json").write_bytes(b"")
    found = damage.check_log("silver_labels", empty)
    assert found is not None and found.file == f"_delta_log/{3:020d}.json" and found.reason == damage.EMPTY_COMMIT
    assert "lakehouse stream --reset" in str(found)
    # a reader whose range ends before it (the mirror, up to the version it read) is not concerned
    assert damage.check_log("silver_labels", empty, since=1, until=2) is None

    cut = _commits(tmp_path / "cut", range(3))
    (cut / "_delta_log" / f"{1:020d}.json").write_text('{"commitInfo":{}}\n{"add":{"pa')
    found = damage.check_log("gold_user_features_5m", cut)
    assert found is not None and found.file == f"_delta_log/{1:020d}.json" and "line 2 is not JSON" in found.reason


def test_check_log_starts_at_the_last_checkpoint_and_checks_its_file(tmp_path):
    # commits before the checkpoint may be cleaned up (or damaged): a snapshot never reads them
    table = _commits(tmp_path / "t", [10, 11, 12], checkpoint=10)
    (table / "_delta_log" / f"{9:020d}.json").write_bytes(b"")
    assert damage.check_log("bronze_events", table) is None
    (table / "_delta_log" / f"{10:020d}.checkpoint.parquet").write_bytes(b"")
    found = damage.check_log("bronze_events", table)
    assert found is not None and found.file == f"_delta_log/{10:020d}.checkpoint.parquet"
    assert found.reason == damage.EMPTY
    (table / "_delta_log" / f"{10:020d}.checkpoint.parquet").unlink()
    found = damage.check_log("bronze_events", table)
    assert found is not None and found.file == "_delta_log/_last_checkpoint" and "version 10" in found.reason
    # a range past the checkpoint (the mirror's change feed) reads only its own commits
    assert damage.check_log("bronze_events", table, since=11) is None


def test_check_tables_raises_for_the_first_damaged_table(tmp_path):
    settings = Settings.from_env({"LAKEHOUSE_DATA": str(tmp_path)})
    _commits(settings.table_path("bronze_events"), range(2))
    _commits(settings.table_path("gold_country_risk_daily"), range(3))
    damage.check_tables(settings)  # missing tables are not damaged ones
    (settings.table_path("gold_country_risk_daily") / "_delta_log" / f"{2:020d}.json").write_bytes(b"\n")
    with pytest.raises(damage.DamagedTable, match="gold_country_risk_daily .* is empty") as told:
        damage.check_tables(settings)
    assert "lakehouse backfill" in str(told.value)
    damage.check_tables(settings, ("bronze_events",))


def test_a_snapshot_of_an_older_version_is_checked_from_the_checkpoint_before_it(tmp_path):
    table = _commits(tmp_path / "t", range(13), checkpoint=10)  # the last checkpoint is after version 7
    (table / "_delta_log" / f"{0:020d}.checkpoint.parquet").write_bytes(b"PAR1...PAR1")
    assert damage.check_log("silver_labels", table, until=7) is None
    (table / "_delta_log" / f"{5:020d}.json").write_bytes(b"")
    found = damage.check_log("silver_labels", table, until=7)  # read from checkpoint 0: 1..7
    assert found is not None and found.file == f"_delta_log/{5:020d}.json"
    assert damage.check_log("silver_labels", table, until=4) is None
    assert damage.check_log("silver_labels", table) is None  # the latest starts at checkpoint 10
    (table / "_delta_log" / f"{5:020d}.checkpoint.parquet").write_bytes(b"PAR1...PAR1")
    assert damage.check_log("silver_labels", table, until=7) is None  # now from checkpoint 5


def test_a_copy_of_a_changed_inbox_file_names_the_file_and_the_time_it_copies():
    from lakehouse.io.paths import copy_name, copy_origin

    assert copy_name(Path("/in/a b.jsonl"), 1234) == Path("/in/a b.changed-1234.jsonl")
    assert copy_origin("/in/a b.changed-1234.jsonl") == ("/in/a b.jsonl", 1234)
    assert copy_origin("file:///in/a%20b.changed-1234.jsonl") == ("/in/a b.jsonl", 1234)  # Spark's URI
    assert copy_origin(str(copy_name(Path("/in/x.json.gz"), 5))) == ("/in/x.json.gz", 5)
    assert copy_origin(str(copy_name(Path("/in/noext"), 7))) == ("/in/noext", 7)
    assert copy_origin("/in/a.jsonl") is None and copy_origin("/in/a.changed-x.jsonl") is None


def test_source_entries_reads_the_batch_entry_of_the_file_source_log(tmp_path):
    from lakehouse.io.paths import local_path
    from lakehouse.streaming import source_entries

    folder = tmp_path / "sources" / "0"
    folder.mkdir(parents=True)
    entry = '{{"path":"file:///in/{name}","timestamp":1796296205939,"batchId":{b}}}'
    (folder / "1").write_text("v1\n" + entry.format(name="a%20b.jsonl", b=1) + "\n" + entry.format(name="c.jsonl", b=1))
    # every tenth batch's entry is a compaction of all entries so far: batch 10 is not batch 1
    (folder / "9.compact").write_text("v1\n" + "\n".join(entry.format(name=f"f{b}.jsonl", b=b) for b in range(10)))
    (folder / "10").write_text("v1\n" + entry.format(name="g.jsonl", b=10))
    listed = 1796296205939  # each file's modification time (ms) when the source listed it
    assert source_entries(tmp_path, 1) == [("/in/a b.jsonl", listed), ("/in/c.jsonl", listed)]
    assert source_entries(tmp_path, 9) == [("/in/f9.jsonl", listed)]
    assert source_entries(tmp_path, 10) == [("/in/g.jsonl", listed)]
    assert source_entries(tmp_path, 11) is None
    assert local_path("file:/in/x.jsonl") == local_path("file:///in/x.jsonl") == "/in/x.jsonl"
    assert local_path("/in/x.jsonl") == "/in/x.jsonl"


def test_source_entries_follow_the_query_offset_log_when_a_crash_merged_two_listings(tmp_path):
    # A crash after the file source logged its listing (source batch 1) but before the query logged
    # its offset: the restarted source lists again (source batch 2), and query batch 1 reads both;
    # from then on query batch b is source batch b + 1.
    from lakehouse.streaming import source_entries

    folder, offsets = tmp_path / "sources" / "0", tmp_path / "offsets"
    folder.mkdir(parents=True)
    offsets.mkdir()
    entry = '{{"path":"file:///in/{name}","timestamp":{ts},"batchId":{b}}}'
    for b in range(4):
        (folder / str(b)).write_text("v1\n" + entry.format(name=f"f{b}.jsonl", ts=1000 + b, b=b))
    for query_batch, log_offset in ((0, 0), (1, 2), (2, 3)):
        (offsets / str(query_batch)).write_text(
            'v1\n{"batchWatermarkMs":0,"batchTimestampMs":1}\n{"logOffset":%d}' % log_offset)
    assert source_entries(tmp_path, 0) == [("/in/f0.jsonl", 1000)]
    assert source_entries(tmp_path, 1) == [("/in/f1.jsonl", 1001), ("/in/f2.jsonl", 1002)]
    assert source_entries(tmp_path, 2) == [("/in/f3.jsonl", 1003)]
    # no offset logged for the batch (yet): the source batch of the same id
    assert source_entries(tmp_path, 3) == [("/in/f3.jsonl", 1003)]


def test_the_inbox_watch_copies_a_file_changed_after_it_was_listed_once_and_forgets_removed_ones(tmp_path):
    import os

    from lakehouse.streaming import InboxWatch

    inbox, checkpoint = tmp_path / "in box", tmp_path / "checkpoint"
    inbox.mkdir()
    folder = checkpoint / "sources" / "0"
    folder.mkdir(parents=True)
    files, entries = {}, []
    for b in range(12):  # batch b read f<b>.jsonl, listed at its modification time
        f = inbox / f"f{b}.jsonl"
        f.write_text(f'{{"n": {b}}}\n')
        os.utime(f, (1_700_000_000 + b, 1_700_000_000 + b))
        files[b] = f
        entries.append(json.dumps({"path": f.as_uri(), "timestamp": (1_700_000_000 + b) * 1000, "batchId": b},
                                  separators=(",", ":")))  # as Spark writes it
        if b >= 10:
            (folder / str(b)).write_text("v1\n" + entries[-1])
    # Batch 9 compacted the log: its .compact lists batches 0-9, whose own files Spark deleted.
    (folder / "9.compact").write_text("v1\n" + "\n".join(entries[:10]))
    watch = InboxWatch(checkpoint, "events", limit=5)
    watch.seed()
    assert list(watch.files) == [str(files[b]) for b in range(12)]  # every file the checkpoint lists ...
    assert watch.requeue_changed("start") == []  # nothing changed: nothing copied
    assert list(watch.files) == [str(files[b]) for b in range(7, 12)]  # ... then the latest five read

    # A writer reuses a name read long ago (f1, beyond the five): found at the next start.
    files[1].write_text('{"n": 101}\n')
    os.utime(files[1], (1_700_000_050, 1_700_000_050))
    assert watch.requeue_changed() == []
    restarted = InboxWatch(checkpoint, "events", limit=5)
    restarted.seed()
    f1_copy = inbox / "f1.changed-1700000050000.jsonl"
    assert restarted.requeue_changed("start") == [f1_copy]
    # Batch 12 reads the copy; a clean-up then removes it: a restart does not make it again.
    entry = {"path": f1_copy.as_uri(), "timestamp": 1_700_000_050_000, "batchId": 12}
    (folder / "12").write_text("v1\n" + json.dumps(entry, separators=(",", ":")))
    f1_copy.unlink()
    restarted = InboxWatch(checkpoint, "events", limit=5)
    restarted.seed()
    assert restarted.requeue_changed("start") == [] and not f1_copy.exists()

    with open(files[9], "a") as f:  # a writer appends to a file already read
        f.write('{"n": 99}\n')
    os.utime(files[9], (1_700_000_100, 1_700_000_100))
    files[8].unlink()  # a clean-up removes a file already read: fine, and no longer watched
    copy = inbox / "f9.changed-1700000100000.jsonl"
    assert watch.requeue_changed() == [copy]
    assert copy.read_text() == '{"n": 9}\n{"n": 99}\n' and watch.requeued == 1
    assert os.stat(copy).st_mtime_ns == 1_700_000_100 * 10**9  # its lines arrived when the writer wrote them
    assert str(files[8]) not in watch.files and watch.files[str(files[9])] == 1_700_000_100_000
    assert watch.requeue_changed() == []  # once per change
    assert sorted(p.name for p in inbox.iterdir() if p.name.startswith(".")) == []  # no temporary left

    again = InboxWatch(checkpoint, "events")  # a restart before the copy was read: not copied twice
    again.seed()
    assert again.requeue_changed() == [] and copy.exists()

    # The writer goes on appending: each later copy holds what it added after the last copy's last
    # whole line, not the whole file again.
    def change(data: bytes, at: int, append: bool = True) -> list:
        with open(files[9], "ab" if append else "wb") as f:
            f.write(data)
        os.utime(files[9], (at, at))
        return [p.read_bytes() for p in watch.requeue_changed()]

    assert change(b'{"n": 100}\n{"n": 1', 1_700_000_200) == [b'{"n": 100}\n{"n": 1']  # stopped mid-line
    assert change(b'01}\n', 1_700_000_300) == [b'{"n": 101}\n']  # the line read unfinished comes again whole
    assert change(b"", 1_700_000_400) == []  # touched, nothing added: no copy
    assert change(b'{"n": 9}\n{"n": 7}\n', 1_700_000_500, append=False) == [b'{"n": 9}\n{"n": 7}\n']  # rewritten
    assert change(b'{"n": 8}\r\n', 1_700_000_600) == [b'{"n": 8}\r\n']
    assert watch.requeued == 5 and sorted(watch.copied) == [str(files[9])]

    # A compressed file's bytes are not its lines: its copies are whole (gzip members appended here).
    import gzip

    packed = inbox / "g.jsonl.gz"
    packed.write_bytes(gzip.compress(b'{"n": 10}\n', mtime=0))  # its compressed bytes hold a 0x0A
    watch.add([(str(packed), 0)])
    assert [p.read_bytes() for p in watch.requeue_changed()] == [packed.read_bytes()]
    with open(packed, "ab") as f:
        f.write(gzip.compress(b'{"n": 2}\n'))
    os.utime(packed, (1_700_000_700, 1_700_000_700))
    assert [gzip.decompress(p.read_bytes()) for p in watch.requeue_changed()] == [b'{"n": 10}\n{"n": 2}\n']


def test_the_inbox_watch_tries_a_failed_copy_again_at_the_next_check(tmp_path, caplog):
    import os

    from lakehouse.streaming import InboxWatch

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    f = inbox / "a.jsonl"
    f.write_text('{"n": 1}\n{"n": 2}\n')
    os.utime(f, (1_700_000_100, 1_700_000_100))
    watch = InboxWatch(tmp_path / "checkpoint", "events")
    watch.add([(str(f), 1_700_000_000_000)])  # listed before a writer appended its second line
    blocker = inbox / ".a.changed-1700000100000.jsonl.tmp"
    blocker.mkdir()  # the copy's temporary name cannot be written (as on a full disk)
    with caplog.at_level("ERROR", logger="lakehouse.streaming"):
        assert watch.requeue_changed("idle") == []
    assert "copying it failed" in caplog.text and "a.jsonl" in caplog.text
    assert watch.files[str(f)] == 1_700_000_000_000  # still owed
    blocker.rmdir()
    copy = inbox / "a.changed-1700000100000.jsonl"
    assert watch.requeue_changed("idle") == [copy] and copy.read_text() == f.read_text()
    assert watch.requeue_changed("idle") == []


def test_what_the_inbox_watch_copied_is_remembered_across_a_restart(tmp_path, caplog):
    import os

    from lakehouse.streaming import COPIES_FILE, InboxWatch

    inbox, checkpoint = tmp_path / "inbox", tmp_path / "checkpoint"
    inbox.mkdir()
    f = inbox / "a.jsonl"

    def append(data: bytes, at: int) -> int:
        with open(f, "ab") as fh:
            fh.write(data)
        os.utime(f, (at, at))
        return at * 1000

    listed = append(b'{"n": 1}\n', 1_700_000_000)
    watch = InboxWatch(checkpoint, "events")
    watch.add([(str(f), listed)])  # a batch read it, then its writer appended
    append(b'{"n": 2}\n', 1_700_000_100)
    assert [p.read_bytes() for p in watch.requeue_changed()] == [b'{"n": 1}\n{"n": 2}\n']  # the first: whole
    assert (checkpoint / COPIES_FILE).exists()

    # A restart (the start check found the copy made, as seed() does): the next change is copied from
    # where the last copy ended, not whole again.
    restarted = InboxWatch(checkpoint, "events")
    restarted.add([(str(f), 1_700_000_100_000)])
    append(b'{"n": 3}\n', 1_700_000_200)
    assert [p.read_bytes() for p in restarted.requeue_changed()] == [b'{"n": 3}\n']
    again = InboxWatch(checkpoint, "events")
    again.add([(str(f), 1_700_000_200_000)])
    append(b'{"n": 4}\n', 1_700_000_300)
    assert [p.read_bytes() for p in again.requeue_changed()] == [b'{"n": 4}\n']

    # The record unreadable (or lost): the next copy is whole, said once; never a line lost.
    (checkpoint / COPIES_FILE).write_text("{not json")
    with caplog.at_level("WARNING", logger="lakehouse.streaming"):
        damaged = InboxWatch(checkpoint, "events")
    assert "is unreadable" in caplog.text and "copied whole" in caplog.text
    damaged.add([(str(f), 1_700_000_300_000)])
    append(b'{"n": 5}\n', 1_700_000_400)
    assert [p.read_bytes() for p in damaged.requeue_changed()] == [f.read_bytes()]
    # ... and it is written anew: a restart after that copies from there again.
    after = InboxWatch(checkpoint, "events")
    after.add([(str(f), 1_700_000_400_000)])
    append(b'{"n": 6}\n', 1_700_000_500)
    assert [p.read_bytes() for p in after.requeue_changed()] == [b'{"n": 6}\n']
