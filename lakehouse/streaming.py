"""Streaming ingestion: inbox JSON lines -> bronze -> silver (+ quarantine, data-quality), exactly once.

One Structured Streaming query per inbox (events, labels), each with its own checkpoint. A single
``foreachBatch`` does all the layers of a micro-batch, in this order:

1. validate every line (parsed once, cached) with the expectation suite;
2. silver: deduplicate the valid rows within the batch, then an insert-only MERGE keyed by
   ``event_id`` whose condition names the batch's partitions, so it reads only those (idempotent DML);
3. gold, when the stream keeps it (:class:`lakehouse.gold.GoldStream`);
4. bronze: append every line as received, and the quarantine: the lines that failed a check
   (idempotent appends by txnAppId/txnVersion). They come after silver and gold so the batch's
   features are ready sooner; a batch that a check of severity 'fail' stops writes bronze only;
5. data-quality: one row per batch with the counts measured from the three tables, and whether
   ``records in = inserted + duplicates + quarantined`` holds (idempotent append).

A crash anywhere replays the same batch (Spark's offset log fixes which files it holds); each table
write of the replay is skipped if it committed before, and every count is measured from the tables,
so the replay records exactly what an uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import (
    BooleanType, IntegerType, LongType, MapType, StringType, StructField, StructType, TimestampType,
)

from lakehouse import damage, quality
from lakehouse.config import Settings
from lakehouse.express import ExpressLane
from lakehouse.gold import GoldStream
from lakehouse.io import delta
from lakehouse.io.paths import (copy_name, copy_origin, in_arrival_order, local_path, source_entries,
                                source_log_all)
from lakehouse.laps import Laps
from lakehouse.transforms import bronze as bronze_t
from lakehouse.transforms import silver as silver_t

log = logging.getLogger(__name__)

#: Schema of the lines a stream reads from an inbox (the text source plus file metadata).
LINES_SCHEMA = StructType(
    [
        StructField("value", StringType(), True),
        StructField("source_file", StringType(), True),
        StructField("file_modified_at", TimestampType(), True),
    ]
)

DQ_SCHEMA = StructType(
    [
        StructField("kind", StringType(), False),
        StructField("batch_id", LongType(), False),
        StructField("app_id", StringType(), False),
        StructField("source_files", IntegerType(), False),
        StructField("records_in", LongType(), False),
        StructField("inserted", LongType(), False),
        StructField("duplicates", LongType(), False),
        StructField("duplicates_in_batch", LongType(), False),
        StructField("duplicates_existing", LongType(), False),
        StructField("quarantined", LongType(), False),
        StructField("warned", LongType(), False),
        StructField("check_failures", MapType(StringType(), LongType()), False),
        StructField("reconciled", BooleanType(), False),
        StructField("processed_at", TimestampType(), False),
        # Latest event time among the transactions the batch inserted (the gold watermark's input),
        # and how many of them were too late for the five-minute windows (see lakehouse.gold).
        StructField("max_event_time", TimestampType(), True),
        StructField("too_late", LongType(), True),
    ]
)


class CheckpointError(RuntimeError):
    """The checkpoint cannot be used; the message names the folder and the fix."""


class StreamRunning(RuntimeError):
    """Another process runs a stream query on the same checkpoint; the message names it and the fix."""


def lock_path(settings: Settings, kind: str) -> Path:
    """The lock file of the stream query ``kind`` (:func:`stream_lock`), beside its checkpoint folder
    (``stream --reset`` removes the folder, and is refused while another process holds the lock)."""
    return settings.checkpoint_root / f".{kind}.lock"


_held: dict[Path, list] = {}  # lock file -> [fd, holders in this process]
_held_guard = threading.Lock()


@contextlib.contextmanager
def stream_lock(settings: Settings, kinds: Iterable[str]) -> Iterator[None]:
    """Hold the lock of each stream query of ``kinds`` for the block, or raise :class:`StreamRunning`
    naming the process that holds one. Two processes running one query would race each other for
    its checkpoint and tables (Spark and Delta refuse the loser with an exception from deep inside,
    after its inbox watch and express lane may have acted). An ``fcntl.flock``: the kernel releases
    it however the holder ends, ``kill -9`` included, so a crash leaves no stale lock. Re-entrant in
    one process (``stream --reset`` holds both while its run takes its own)."""
    taken: list[Path] = []
    try:
        for kind in sorted(set(kinds)):
            path = lock_path(settings, kind)
            if _take(path, kind, settings):
                taken.append(path)
        yield
    finally:
        for path in taken:
            _release(path)


def _take(path: Path, kind: str, settings: Settings) -> bool:
    """Lock ``path`` (or count one more holder in this process); False when locks are not available here."""
    with _held_guard:
        if path in _held:
            _held[path][1] += 1
            return True
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                # a file system without locks (some network mounts): run, unguarded, and say so
                log.warning("cannot lock %s (%s): a second stream on %s would not be refused", path, exc,
                            settings.data_root)
                return False
            raise StreamRunning(_holder_message(path, kind, settings)) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}).encode())
        _held[path] = [fd, 1]
        return True


def _release(path: Path) -> None:
    with _held_guard:
        entry = _held.get(path)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _held[path]
            # Unlocked before it is closed: a child forked meanwhile (multiprocessing) shares the
            # descriptor, and would hold the lock until it exits.
            fcntl.flock(entry[0], fcntl.LOCK_UN)
            os.close(entry[0])


def _holder_message(path: Path, kind: str, settings: Settings) -> str:
    try:
        who = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        who = {}
    pid = who.get("pid")
    named = (f"process {pid} on {who.get('host', 'this host')}, running since {who.get('since', '?')}"
             if pid else "another process")
    stop = f"Ctrl-C in its terminal, or `kill {pid}`" if pid else f"the process holding {path}"
    return (f"the {kind} stream on {settings.data_root} is already running ({named}); a second one would race "
            f"it for the same checkpoint and tables. Stop that one first ({stop}), or point LAKEHOUSE_DATA at "
            "another folder for this one.")


@dataclass(frozen=True)
class Layer:
    """What differs between the events and the labels inbox."""

    kind: str
    inbox: Path
    bronze: str
    silver: str
    validation_frame: Callable[[DataFrame], DataFrame]
    to_silver: Callable[[DataFrame], DataFrame]
    keys: tuple[str, ...]
    partition_by: tuple[str, ...]
    partition_of: Callable[[DataFrame], object] | None = None


def layer(settings: Settings, kind: str) -> Layer:
    if kind == "events":
        return Layer("events", settings.events_inbox, "bronze_events", "silver_transactions",
                     silver_t.event_validation_frame, silver_t.silver_events,
                     keys=("event_id",), partition_by=("event_date",),
                     partition_of=lambda df: F.to_date("event_time"))
    if kind == "labels":
        return Layer("labels", settings.labels_inbox, "bronze_labels", "silver_labels",
                     silver_t.label_validation_frame, silver_t.silver_labels,
                     keys=("event_id",), partition_by=())
    raise ValueError(f"unknown stream {kind!r}; expected 'events' or 'labels'")


def dates_around(dates, days: int) -> list[str]:
    """The ``dates`` and the ``days`` dates on either side of each, sorted, as ISO strings."""
    days = max(0, int(days))
    return sorted({str(d + timedelta(days=k)) for d in dates for k in range(-days, days + 1)})


# ---- tables ---------------------------------------------------------------------------------------

#: Schemas derived by :func:`_schema_of` in this process, by stream and checks (the derivation is pure).
_DERIVED_SCHEMAS: dict[tuple, dict[str, StructType]] = {}


def _schema_of(spark: SparkSession, lay: Layer, settings: Settings) -> dict[str, StructType]:
    """Table schemas derived from the transforms themselves, so they cannot drift apart. The plans
    are built once per process for a stream and its checks: their inputs are constants, and building
    them costs a few thousand Python-to-JVM calls (about 2 s)."""
    checks = quality.checks_for(lay.kind, settings)
    key = (lay.kind, tuple((c.name, c.severity) for c in checks))
    if key not in _DERIVED_SCHEMAS:
        lines = spark.createDataFrame([], LINES_SCHEMA)
        b = bronze_t.to_bronze(lines, 0, datetime(2000, 1, 1, tzinfo=timezone.utc))
        checked = quality.apply_checks(lay.validation_frame(b), checks)
        _DERIVED_SCHEMAS[key] = {
            "bronze": b.schema,
            "silver": lay.to_silver(checked).schema,
            "quarantine": silver_t.quarantine_rows(checked, lay.kind).schema,
        }
    return dict(_DERIVED_SCHEMAS[key])


def ensure_tables(spark: SparkSession, settings: Settings, kinds=("events", "labels")) -> None:
    """Create every bronze/silver table the streams write, if missing. A restart finds them all: their
    schemas are derived (from the transforms' plans, about 2 s a stream) only when one is missing."""
    cdf = {"delta.enableChangeDataFeed": "true"}
    for kind in kinds:
        lay = layer(settings, kind)
        if all(delta.table_version(settings.table_path(name)) is not None
               for name in (lay.bronze, lay.silver, "silver_quarantine")):
            continue
        schemas = _schema_of(spark, lay, settings)
        delta.ensure_table(spark, settings.table_path(lay.bronze), schemas["bronze"])
        delta.ensure_table(spark, settings.table_path(lay.silver), schemas["silver"],
                           partition_by=lay.partition_by, properties=cdf)
        delta.ensure_table(spark, settings.table_path("silver_quarantine"), schemas["quarantine"])
    delta.ensure_table(spark, settings.table_path("silver_dq_batches"), DQ_SCHEMA, properties=cdf)


# ---- checkpoints ----------------------------------------------------------------------------------

APP_FILE = "lakehouse_app.json"
#: Beside Spark's checkpoint: what the inbox watch copied of each watched file (:class:`InboxWatch`).
COPIES_FILE = "lakehouse_inbox_copies.json"


def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"The checkpoint at {path} is corrupt or belongs to another query ({why}). Fix: run "
        f"`lakehouse stream --reset` to rebuild bronze, silver and gold from the inbox files (they are kept), "
        f"or restore the folder from a backup."
    )


def check_checkpoint(path: Path, kind: str, inbox: Path) -> None:
    """Refuse a checkpoint that Spark could not resume from, with a message that names the fix."""
    if not path.exists():
        return
    app = path / APP_FILE
    if app.exists():
        try:
            meta = json.loads(app.read_text())
        except ValueError:
            raise _corrupt(path, f"{APP_FILE} is not JSON") from None
        if meta.get("kind") != kind or meta.get("inbox") != str(inbox):
            raise _corrupt(path, f"it was made for the {meta.get('kind')} stream of {meta.get('inbox')}, "
                                 f"not the {kind} stream of {inbox}")
    metadata = path / "metadata"
    if metadata.exists():
        try:
            json.loads(metadata.read_text().splitlines()[0])
        except (ValueError, IndexError):
            raise _corrupt(path, "its metadata file is unreadable") from None
    logs = [path / "offsets", path / "commits", *sorted((path / "sources").glob("*"))]
    for log in (d for d in logs if d.is_dir()):
        for f in sorted(log.glob("[0-9]*")):
            why = _log_entry_problem(f.read_bytes())
            if why:
                raise _corrupt(path, f"{f.relative_to(path)} {why}")


def _log_entry_problem(data: bytes) -> str | None:
    """What makes ``data`` no entry of Spark's metadata logs (offsets, commits, a file source's list
    of files): a version line ``v<N>``, then a JSON value per line (``-`` for a source without an
    offset yet). None when it is one. Spark writes each entry whole (a temporary file, renamed), so
    this finds entries damaged afterwards: cut short, overwritten, emptied."""
    lines = data.decode("utf-8", errors="replace").splitlines()
    if not lines or not re.fullmatch(r"v\d+", lines[0].strip()):
        return "is not a Spark log entry (no version line)"
    n = damage.first_line_not_json(lines[1:], start=2, skip=("-",))
    return None if n is None else f"is cut short or damaged (line {n} is not JSON)"


def app_id_for(path: Path, kind: str, inbox: Path) -> str:
    """The stable id of this query's writes (txnAppId), kept beside Spark's checkpoint.

    A new checkpoint gets a new id, so a rebuilt stream's batch 0 is never mistaken for the old one.
    """
    check_checkpoint(path, kind, inbox)
    app = path / APP_FILE
    if app.exists():
        return json.loads(app.read_text())["app_id"]
    path.mkdir(parents=True, exist_ok=True)
    app_id = f"lakehouse-{kind}-{uuid.uuid4()}"
    tmp = app.with_suffix(".tmp")
    tmp.write_text(json.dumps({"app_id": app_id, "kind": kind, "inbox": str(inbox)}))
    tmp.replace(app)
    return app_id


# ---- the micro-batch ------------------------------------------------------------------------------

@dataclass
class BatchResult:
    kind: str
    batch_id: int
    records_in: int
    inserted: int
    duplicates: int
    quarantined: int
    reconciled: bool
    seconds: dict[str, float] = field(default_factory=dict)


class StoppedMidBatch(RuntimeError):
    """A micro-batch ended because its query was stopped while it ran (see :func:`stopped_mid_batch`)."""


#: The interruptions by which Spark recognizes a foreachBatch function cut short by ``stop()``.
_INTERRUPTIONS = ("java.lang.InterruptedException", "java.io.InterruptedIOException",
                  "java.nio.channels.ClosedByInterruptException")


def stopped_mid_batch(exc: BaseException) -> bool:
    """Whether ``exc`` (raised inside a micro-batch) means its query was stopped meanwhile: a Spark
    call interrupted, or a job cancelled because the query was stopped.

    Spark tells such a stop from a failure by matching the Python traceback it gets back against a
    regular expression that recurses once per character (``StreamExecution.PROXY_ERROR``). The
    traceback of an interrupted Spark call holds a Java stack trace and overflows the thread's
    stack (a ``StackOverflowError`` instead of a clean stop), so the batch function re-raises it as a
    short :class:`StoppedMidBatch` in the form Spark looks for.
    """
    try:
        text = str(exc)  # a Py4JJavaError asks the JVM for its stack trace
    except Exception:  # noqa: BLE001 -- the JVM is gone: not a stop to recognize
        return False
    return any(name in text for name in _INTERRUPTIONS) or ("SPARK_JOB_CANCELLED" in text and "was stopped" in text)


class InboxFileGone(RuntimeError):
    """Files a micro-batch was planned with left the inbox before the batch read them."""


def ranked(lines: DataFrame, files: list[str], uris: list[str]) -> DataFrame:
    """``lines`` with ``file_rank``, each line's file's place in ``files`` (local paths, in the order
    the file source took them in), when the batch holds several and their names do not sort in that
    order already: the first delivery of a key in silver is then the first to arrive, however the
    files were grouped into batches. ``uris``: the lines' ``source_file`` values; a file not in
    ``files`` ranks after them. A broadcast join, not a map literal: a lookup per line."""
    if len(files) < 2:
        return lines
    rank = {path: i for i, path in enumerate(files)}
    ranks = sorted((rank.get(local_path(uri), len(files)), uri) for uri in uris)
    if [uri for _, uri in ranks] == sorted(uris):
        return lines  # the names sort as the files arrived: source_file orders them already
    table = lines.sparkSession.createDataFrame([(uri, r) for r, uri in ranks], "source_file string, file_rank int")
    return lines.join(F.broadcast(table), "source_file", "left")


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


#: Suffixes of the compression codecs Spark's text source reads a file through (Hadoop's, by name): such
#: a file's bytes are not its lines, so its copies are always whole.
COMPRESSED_SUFFIXES = frozenset({".gz", ".bz2", ".deflate", ".lz4", ".snappy", ".zst", ".xz"})


def requeue_copy(path: Path, mtime_ms: int, copied: tuple[int, bytes] | None = None
                 ) -> tuple[Path | None, bool, tuple[int, bytes]]:
    """Copy inbox file ``path``, as it is now (modification time ``mtime_ms``), to
    ``<stem>.changed-<mtime_ms><suffix>`` beside it, with that modification time (written as the
    generator lands its files, so the file source never reads it half-written).

    ``copied``: the size and :func:`_digest` of the content an earlier copy of ``path`` held whole.
    When the file still begins with that content (its writer appended), the copy holds only what
    follows that content's last line end: the new lines, after the last line again when the earlier
    copy ended mid-line. A writer that appends line after line is then copied once whole and then line
    by line, not whole at every change. Otherwise (the first change, a file rewritten, a compressed
    file: :data:`COMPRESSED_SUFFIXES`) the copy holds the whole file.

    Returns the copy (None when the file holds nothing after the earlier copy's content: no copy is
    made), whether it was made now (False: an earlier attempt made it), and the size and digest of the
    file's content now (for the next change's ``copied``)."""
    from lakehouse.generator.writer import fsync_dir, write_atomic

    copy = copy_name(path, mtime_ms)
    data = path.read_bytes()
    now = (len(data), _digest(data))
    if copy.exists():
        return copy, False, now
    start = 0
    if (copied is not None and path.suffix.lower() not in COMPRESSED_SUFFIXES and len(data) >= copied[0]
            and _digest(data[:copied[0]]) == copied[1]):
        start = data.rfind(b"\n", 0, copied[0]) + 1  # \r\n ends with \n; a file of \r alone is copied whole
    if start == len(data):
        return None, False, now
    # The copy lands with the file's modification time: its lines arrived when the writer wrote them
    # (the age checks measure from it), however late the copy is made.
    write_atomic(path.parent, copy.name, data[start:], mtime_ns=mtime_ms * 1_000_000)
    fsync_dir(path.parent)  # the rename survives a power loss (a lost one is made again at the start)
    return copy, True, now


#: The check a line that is not JSON fails too when it was read unfinished: the unterminated end of
#: its file, or the start of a longer line in the file as it is now (a writer was still writing it).
#: It is found in the driver, beside the suite's checks, and only in a batch that has a line that is
#: not JSON.
INCOMPLETE_LINE = "line_incomplete_when_read"


def may_end_unfinished(path: str, listed_ms: int | None) -> bool:
    """Whether inbox file ``path``'s last line may have been read unfinished: the file changed since it
    was listed (``listed_ms``, its modification time then; None: unknown), or it does not end with a
    line end now. False for a file that is gone or empty."""
    try:
        st = os.stat(path)
        if listed_ms is None or st.st_mtime_ns // 1_000_000 != listed_ms:
            return True
        if st.st_size == 0:
            return False
        with open(path, "rb") as fh:
            fh.seek(st.st_size - 1)
            return fh.read(1) not in (b"\n", b"\r")
    except OSError:
        return False


def unfinished_lines(data: bytes, lines: Iterable[str]) -> set[str]:
    """Those of ``lines`` (lines read from a file, without their line end) that ``data``, the file's
    content now, holds as an unterminated last line or as the start of a longer line: lines read while
    a writer was still writing them. Line ends are \\n, \\r\\n or \\r, as Spark's text source reads
    them; it drops a UTF-8 byte order mark at the start of a file, and so does this."""
    found = set()
    for line in set(lines):
        b = line.encode("utf-8")
        at = data.find(b)
        while b and at >= 0:
            end = at + len(b)
            starts_line = at == 0 or data[at - 1] in b"\r\n" or (at == 3 and data.startswith(b"\xef\xbb\xbf"))
            if starts_line and (end == len(data) or data[end] not in b"\r\n"):
                found.add(line)
                break
            at = data.find(b, at + 1)
    return found


#: How often a continuous stream checks its :class:`InboxWatch` between micro-batches (seconds).
WATCH_IDLE_SECONDS = 5.0


class InboxWatch:
    """The inbox files of recent micro-batches, watched for a change after they were read.

    Spark's file source reads a file once, by its name: lines a writer adds to it after its
    micro-batch was planned (a writer that appends, instead of writing a temporary name and renaming
    the finished file) would never be read, and nothing would say so. A watched file whose
    modification time is no longer the one its micro-batch was planned with is copied whole into the
    inbox under a new name (:func:`requeue_copy`), which a later micro-batch reads: its lines already
    ingested come again as re-deliveries of the same records (the silver MERGE keeps one; the batch's
    data-quality row counts them as duplicates), and the new lines are ingested. When the same file
    changes again and still begins with what its last copy held, the next copy holds only what was
    added after that copy's last whole line. What each copy held is kept beside the checkpoint
    (:data:`COPIES_FILE`, written once the copy is on disk), so this holds across a restart too; when
    that file is lost or unreadable, the next copy is whole (re-deliveries, never a lost line). A
    watched file that is removed is dropped from the watch (removing files once read is fine).

    The watch holds the files of the micro-batches of this run, at most ``limit`` files, the latest
    read; at a start, until its first check, every file the checkpoint lists (:meth:`seed`). A copy a
    micro-batch read is not made again after a clean-up removed it. It is checked at a
    start, in every micro-batch, and by a continuous stream every few seconds between batches (Spark
    runs no batch while no new file lands, and the copy is one).
    """

    #: Who reads a copy, by when it was made (for the warning).
    READERS = {"start": "this run reads", "batch": "a later micro-batch reads (under --once, the next run)",
               "idle": "the next micro-batch reads"}

    def __init__(self, checkpoint: Path, kind: str, limit: int = 10_000):
        self.checkpoint, self.kind, self.limit = checkpoint, kind, limit
        self.files: dict[str, int] = {}
        # by file: the size and digest of the content its copies hold, up to the last one's end
        self.copied: dict[str, tuple[int, bytes]] = self._load_copied()
        self._saved = dict(self.copied)
        self.requeued = 0
        self.read_copies: set[str] = set()
        self._lock = threading.Lock()  # the batch function's thread and the stream loop's check it

    def add(self, entries: list[tuple[str, int]]) -> None:
        with self._lock:
            self._put(entries)
            self._trim()

    def _put(self, entries: Iterable[tuple[str, int]]) -> None:
        for path, mtime_ms in entries:  # the latest read last
            self.files.pop(path, None)
            self.files[path] = mtime_ms

    def _trim(self) -> None:
        # the oldest, in one pass (next(iter()) after deletions scans the dict's emptied slots again)
        for path in list(itertools.islice(self.files, max(0, len(self.files) - self.limit))):
            self._forget(path)

    def _forget(self, path: str) -> None:
        del self.files[path]
        self.copied.pop(path, None)

    def seed(self) -> None:
        """Watch every file the checkpoint lists, until the first check (made at the start): a writer
        that reuses its names (``hour-00.jsonl`` every day) writes again a file read long ago, which
        Spark's file source never reads again. That check then keeps the ``limit`` latest read."""
        listed = source_log_all(self.checkpoint)
        with self._lock:
            self._put(listed.items())
            # copies a micro-batch read: not made again when a clean-up has removed them since
            self.read_copies |= {p for p in listed if copy_origin(p) is not None}

    def requeue_changed(self, when: str = "batch") -> list[Path]:
        """Copy every watched file that changed since it was listed; returns the copies made.

        ``when``: ``"start"`` (before the query lists the inbox: this run reads the copies),
        ``"batch"`` (in a micro-batch) or ``"idle"`` (a continuous stream, between batches)."""
        with self._lock:
            return self._requeue_changed(self.READERS[when])

    def _requeue_changed(self, reader: str) -> list[Path]:
        made = []
        for path, listed_ms in list(self.files.items()):
            try:
                now_ms = os.stat(path).st_mtime_ns // 1_000_000
            except FileNotFoundError:
                self._forget(path)
                continue
            if now_ms == listed_ms:
                continue
            if str(copy_name(Path(path), now_ms)) in self.read_copies:  # made and read before a restart
                self.files[path] = now_ms
                continue
            try:
                copy, new, self.copied[path] = requeue_copy(Path(path), now_ms, self.copied.get(path))
            except FileNotFoundError:  # removed between the stat and the copy
                self._forget(path)
                continue
            except OSError as exc:  # a full disk, say: the stream goes on, and the next check tries again
                log.error(
                    "%s inbox file %s changed after a micro-batch was planned with it, but copying it failed (%s): "
                    "its new lines are not read until a copy succeeds. Tried again at the next micro-batch, every "
                    "%g s in continuous mode and at the next start.", self.kind, os.path.basename(path), exc,
                    WATCH_IDLE_SECONDS)
                continue
            self.files[path] = now_ms
            if new:
                made.append(copy)
                self.requeued += 1
                log.warning(
                    "%s inbox file %s changed after a micro-batch was planned with it (a writer appended to or "
                    "rewrote it): copied as %s (%s), which %s; its lines already ingested count as re-deliveries. "
                    "Writers should write a temporary name starting with '.' and rename the finished file.",
                    self.kind, os.path.basename(path), copy.name,
                    "whole" if copy.stat().st_size == self.copied[path][0] else "what it added since its last copy",
                    reader)
        self._trim()
        self._save_copied()
        return made

    def _load_copied(self) -> dict[str, tuple[int, bytes]]:
        path = self.checkpoint / COPIES_FILE
        try:
            entries = json.loads(path.read_text())["copies"]
            return {f: (int(size), bytes.fromhex(digest)) for f, (size, digest) in entries.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("%s inbox watch: %s is unreadable (%s); a file changed again is copied whole "
                        "(its lines read before count as re-deliveries)", self.kind, path, exc)
            return {}

    def _save_copied(self) -> None:
        """Keep what the copies hold beside the checkpoint, once they are on disk (a copy made and
        not recorded is only copied again: re-deliveries, never a line lost)."""
        copied = {f: v for f, v in self.copied.items() if f in self.files}
        if copied == self._saved:
            return
        from lakehouse.generator.writer import write_atomic

        body = {"copies": {f: [size, digest.hex()] for f, (size, digest) in copied.items()}}
        try:
            write_atomic(self.checkpoint, COPIES_FILE, json.dumps(body).encode())
        except OSError as exc:  # a full disk: the next copy after a restart is whole, that is all
            log.warning("%s inbox watch: could not write %s (%s)", self.kind, self.checkpoint / COPIES_FILE, exc)
            return
        self._saved = copied


#: The error a batch function raised, by checkpoint, when it is one the user can act on: the query's
#: failure wraps it in a Java trace, and :func:`_await` raises it again as itself.
_TOLD: dict[str, Exception] = {}

#: Attempts at a micro-batch whose write lost a Delta commit race with another writer of the table,
#: and the wait before the second (doubled before each next).
CONFLICT_ATTEMPTS = 5
CONFLICT_BACKOFF_SECONDS = 2.0


def _commit_conflict(exc: BaseException) -> bool:
    """Whether ``exc`` is a Delta commit conflict (``io.delta.exceptions.*``: a concurrent append,
    delete, metadata or protocol change), here or as the cause of another error."""
    from delta.exceptions import (ConcurrentAppendException, ConcurrentDeleteDeleteException,
                                  ConcurrentDeleteReadException, ConcurrentTransactionException,
                                  ConcurrentWriteException, DeltaConcurrentModificationException,
                                  MetadataChangedException, ProtocolChangedException)

    kinds = (ConcurrentAppendException, ConcurrentDeleteDeleteException, ConcurrentDeleteReadException,
             ConcurrentTransactionException, ConcurrentWriteException, DeltaConcurrentModificationException,
             MetadataChangedException, ProtocolChangedException)
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, kinds) or "io.delta.exceptions.Concurrent" in str(exc).split("\n", 1)[0]:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


class IngestBatch:
    """The foreachBatch function of one inbox stream."""

    def __init__(self, settings: Settings, kind: str, app_id: str,
                 on_batch: Callable[[BatchResult], None] | None = None, gold: GoldStream | None = None,
                 express: ExpressLane | None = None, watch: InboxWatch | None = None):
        self.settings = settings
        self.gold = gold
        self.express = express
        self.layer = layer(settings, kind)
        self.checks = quality.checks_for(kind, settings)
        self._compiled: tuple[list, quality.CompiledChecks] | None = None  # (for these checks, compiled)
        self.app_id = app_id
        self.on_batch = on_batch
        self.watch = watch or InboxWatch(settings.checkpoint(kind), kind)
        self.cached_columns = {
            *bronze_t.BRONZE_COLUMNS, *silver_t.SILVER_EVENT_COLUMNS, *silver_t.SILVER_LABEL_COLUMNS,
            *silver_t.QUARANTINE_COLUMNS, "failed_checks", "warned_checks", "failed_fatal",
        }

    def _path(self, name: str) -> str:
        return str(self.settings.table_path(name))

    def _deduplicated(self, valid: DataFrame, merged: dict[str, int] | None) -> int:
        """How many distinct keys the batch's ``valid`` rows hold: the source rows of its silver MERGE
        (one per key), from that commit's metrics ``merged``; counted again when the MERGE committed
        nothing (every row was in silver already) or its commit is too far back in the history to find."""
        if merged is not None and "numSourceRows" in merged:
            return merged["numSourceRows"]
        return int(valid.agg(F.count_distinct(*self.layer.keys)).first()[0])

    def _check_files(self, batch_id: int, planned: list[tuple[str, int]] | None, read: list[str]) -> None:
        """Stop the batch, before it writes, if a file it was planned with is gone from the inbox.

        Spark's file source plans a batch from a listing (kept in the checkpoint), then reads the
        files; one removed in between, or before a replay of the batch after a crash, it skips without
        a word. Files planned but not read are fine when they are there (an empty file has no line)."""
        read_paths = {local_path(f) for f in read}
        gone = [f for f, _ in planned or [] if f not in read_paths and not os.path.exists(f)]
        if gone:
            names = ", ".join(os.path.basename(f) for f in gone[:5]) + (f" and {len(gone) - 5} more" if len(gone) > 5
                                                                        else "")
            raise InboxFileGone(
                f"{len(gone)} file(s) of {self.layer.kind} micro-batch {batch_id} left {self.layer.inbox} before "
                f"the batch read them: {names}. The checkpoint lists them, and Spark would go on without their "
                f"lines and without a word. Fix: put them back under the same names and start the stream again "
                f"(the batch is replayed with them); to go on without their lines, put an empty file under each "
                f"name. Remove inbox files only once bronze holds them (bronze_{self.layer.kind}.source_file).")

    def _unfinished(self, checked: DataFrame, stats, planned: list[tuple[str, int]] | None,
                    batch_id: int) -> list[tuple[str, str]]:
        """``(source_file, raw)`` of the batch's lines that are not JSON because they were read
        unfinished (:func:`unfinished_lines`), one per line read. Nothing to do (no Spark job, no file read) unless the
        batch has a line that is not JSON and a file that changed since it was listed or ends without a
        line end."""
        if not stats[quality.VALID_JSON]:
            return []
        listed = dict(planned or [])
        suspects = [f for f in stats["files"] or [] if Path(local_path(f)).suffix.lower() not in COMPRESSED_SUFFIXES
                    and may_end_unfinished(local_path(f), listed.get(local_path(f)))]  # bytes that are its lines
        if not suspects:
            return []
        by_file: dict[str, list[str]] = {}
        for r in (checked.where(F.array_contains("failed_checks", quality.VALID_JSON)
                                & F.col("source_file").isin(suspects))
                  .select("source_file", "raw").collect()):
            by_file.setdefault(r["source_file"], []).append(r["raw"])
        found = []
        for file, raws in by_file.items():
            try:
                data = Path(local_path(file)).read_bytes()
            except OSError:  # gone since: its lines stay what the suite found
                continue
            cut = unfinished_lines(data, raws)
            found += [(file, raw) for raw in raws if raw in cut]  # one per row, as the quarantine holds them
            if cut:
                log.warning(
                    "%s batch %d: %d line(s) of inbox file %s are not JSON because they were read unfinished (the "
                    "end of the file without a line end, or the start of a longer line now): quarantined with the "
                    "check %s. If a writer was still writing them, they come again whole in the copy the stream "
                    "makes when the file changes; if the file was cut short, they stay quarantined. Writers should "
                    "write a temporary name starting with '.' and rename the finished file.",
                    self.layer.kind, batch_id, len(cut), os.path.basename(local_path(file)), INCOMPLETE_LINE)
        return found

    def __call__(self, lines: DataFrame, batch_id: int) -> None:
        try:
            for attempt in itertools.count(1):
                try:
                    self._batch(lines, batch_id)
                    break
                except Exception as exc:  # noqa: BLE001 -- only a commit conflict is taken here
                    if not _commit_conflict(exc) or attempt >= CONFLICT_ATTEMPTS:
                        raise
                    self._after_conflict(exc, batch_id, attempt)
        except Exception as exc:
            if isinstance(exc, (InboxFileGone, quality.ExpectationFailed)):
                _TOLD[str(self.settings.checkpoint(self.layer.kind))] = exc
            if not stopped_mid_batch(exc):
                raise
            log.warning("%s batch %d interrupted: the query was stopped; a restart replays the batch",
                        self.layer.kind, batch_id)
            raise StoppedMidBatch(
                f"py4j.protocol.Py4JJavaError: An error occurred while calling Spark in {self.layer.kind} batch "
                f"{batch_id}: java.lang.InterruptedException (the query was stopped during the batch; a "
                "restart replays it, and each of its writes lands once)") from None

    def _after_conflict(self, exc: Exception, batch_id: int, attempt: int) -> None:
        """A write of the batch lost a commit race with another writer of its table (the nightly
        backfill, compaction or scoring: a late event landing in the day they rewrite). Each write of
        the batch lands once (idempotent per batch), so the batch runs again, as a replay after a
        crash does: from the tables, the in-memory look-back dropped. The query goes on."""
        wait = CONFLICT_BACKOFF_SECONDS * 2 ** (attempt - 1)
        log.warning("%s batch %d: %s from a concurrent writer of the same table (%s); the batch runs again in "
                    "%.0f s (attempt %d of %d), and each of its writes lands once", self.layer.kind, batch_id,
                    type(exc).__name__, str(exc).splitlines()[0][:300], wait, attempt + 1, CONFLICT_ATTEMPTS)
        if self.gold is not None:
            self.gold.forget()
        time.sleep(wait)

    def _first_attempt(self, spark: SparkSession, batch_id: int) -> DataFrame | None:
        """The lines an earlier attempt at ``batch_id`` received, as it wrote them to bronze, when this
        is a replay after that write (bronze is written after silver and gold): the batch is then made
        of them again, not of its files as they are now. A file a writer was still writing when the
        first attempt read it holds more lines by the replay; read again, the batch would hold lines
        its bronze rows do not, and its counts would not reconcile. The lines added since come in the
        copy the inbox watch makes of the changed file. None when there is no such write among
        bronze's last commits (a first attempt, or a replay before the write), or when bronze holds
        other rows with this batch id too (a checkpoint removed by hand)."""
        path = self._path(self.layer.bronze)
        metrics = delta.commit_metrics(path, self.app_id, batch_id, depth=4)
        if metrics is None:
            return None
        rows = delta.read(spark, path).where(F.col("batch_id") == batch_id).select(*bronze_t.BRONZE_COLUMNS)
        if rows.count() != metrics.get("numOutputRows", -1):
            return None
        log.info("%s batch %d: a replay after its bronze write: made of the %d lines bronze holds",
                 self.layer.kind, batch_id, metrics.get("numOutputRows"))
        return rows

    def _batch(self, lines: DataFrame, batch_id: int) -> None:
        spark = lines.sparkSession
        lay, app = self.layer, self.app_id
        ingested_at = datetime.now(timezone.utc)
        lap = Laps()  # where the batch spends its time, for the progress line and the bench

        # One cached frame serves every step: the inbox files are read and parsed once, and only
        # the columns some table needs are kept in the cache.
        bronze = bronze_t.to_bronze(lines, batch_id, ingested_at)
        if (first := self._first_attempt(spark, batch_id)) is not None:
            bronze = first
        if self._compiled is None or self._compiled[0] is not self.checks:  # once, not per batch
            self._compiled = (self.checks, quality.compile_checks(self.checks))
        checked = quality.apply_checks(lay.validation_frame(bronze), self._compiled[1])
        keep = [c for c in checked.columns if c in self.cached_columns]
        checked = checked.select(*keep).persist(StorageLevel.MEMORY_AND_DISK)
        try:
            stats = checked.agg(
                F.count(F.lit(1)).alias("rows"),
                F.sum(F.when(silver_t.is_quarantined(checked), 0).otherwise(1)).alias("valid"),
                F.sum(F.when(F.size("warned_checks") > 0, 1).otherwise(0)).alias("warned"),
                F.sum(F.size("failed_fatal")).alias("fatal"),
                F.collect_set("source_file").alias("files"),  # no distinct aggregate: no extra shuffle
                # The valid rows' partitions (collect_set skips the nulls of the quarantined rows).
                F.collect_set(F.when(~silver_t.is_quarantined(checked), lay.partition_of(checked))
                              if lay.partition_by else F.lit(None)).alias("dates"),
                *[F.sum(F.when(F.array_contains("failed_checks", c.name)
                               | F.array_contains("warned_checks", c.name), 1).otherwise(0)).alias(c.name)
                  for c in self.checks],
            ).first()
            planned = source_entries(self.settings.checkpoint(lay.kind), batch_id)
            # the order the file source took the files in (files listed with one time: by name)
            arrived = [path for path, _ in in_arrival_order(planned or [])]
            self._check_files(batch_id, planned, stats["files"] or [])
            unfinished = self._unfinished(checked, stats, planned, batch_id)
            self.watch.requeue_changed()  # files of earlier batches written to since
            self.watch.add(planned or [])
            lap("validate")

            def write_bronze() -> None:
                delta.append_once(checked.select(*bronze_t.BRONZE_COLUMNS), self._path(lay.bronze), app, batch_id)
                lap("bronze")

            if stats["fatal"]:
                write_bronze()  # the lines that stop the stream are kept as received
                fatal = [c.name for c in self.checks if c.severity == quality.FAIL and stats[c.name]]
                raise quality.ExpectationFailed(
                    f"{lay.kind} batch {batch_id}: checks with severity 'fail' failed: {', '.join(fatal)}"
                )
            n_quarantine = int(stats["rows"]) - int(stats["valid"] or 0)

            # The partitions to prune come from the validation's pass. The deduplicated rows are
            # computed once, inside the MERGE (its source is deterministic, so Delta need not
            # materialize it first: see spark.py), and so are their count (the MERGE's numSourceRows).
            valid = checked.where(~silver_t.is_quarantined(checked))
            n_valid = int(stats["valid"] or 0)
            prune = merge_prune = {}
            if lay.partition_by:
                col = lay.partition_by[0]
                prune = {col: sorted(str(d) for d in stats["dates"])}
                # A re-delivery can carry a corrected event_time, hence another date than the first
                # delivery's: the MERGE matches keys among the dates around the batch's own (an event
                # delivered twice with dates either side of midnight is one event).
                merge_prune = {col: dates_around(stats["dates"], self.settings.redelivery_days)}
            if n_valid:
                with delta.idempotent_dml(spark, app, batch_id):
                    delta.merge_insert_new(spark, lay.to_silver(ranked(checked, arrived, stats["files"] or [])),
                                           self._path(lay.silver), lay.keys,
                                           merge_prune)
            lap("merge")
            gold_info: dict = {}
            if self.gold is not None and n_valid:
                if lay.kind == "events":
                    gold_info = self.gold.after_events(spark, app, batch_id, prune.get("event_date", []), arrived,
                                                       dict(planned or []))
                else:
                    gold_info = self.gold.after_labels(spark, app, batch_id)
            lap("gold")
            lap.seconds.update({f"gold.{step}": t for step, t in gold_info.get("seconds", {}).items()})
            # Bronze and the quarantine after silver and gold, so the batch's features are computed
            # (and published) without waiting for them; each write lands once whatever the order.
            write_bronze()
            if n_quarantine:  # an empty append would commit nothing worth a version
                delta.append_once(silver_t.quarantine_rows(checked, lay.kind, (INCOMPLETE_LINE, unfinished)),
                                  self._path("silver_quarantine"), app, batch_id)
            lap("quarantine")

            # Counts measured from the tables: the metrics of the commit this batch made (in this
            # attempt or an earlier one), or, if that commit is too far back in history, a count of
            # the rows carrying this batch id.
            def commit(table: str) -> dict[str, int] | None:
                return delta.commit_metrics(self._path(table), app, batch_id)

            def written(table: str, metric: str, metrics: dict[str, int] | None, extra=None) -> int:
                """``metric`` of the batch's commit to ``table`` (its ``metrics``: :func:`commit`)."""
                if metrics is not None:
                    return metrics.get(metric, 0)
                df = delta.read(spark, self._path(table)).where(F.col("batch_id") == batch_id)
                return (df.where(extra) if extra is not None else df).count()

            records_in = written(lay.bronze, "numOutputRows", commit(lay.bronze))
            quarantined = (written("silver_quarantine", "numOutputRows", commit("silver_quarantine"),
                                   F.col("kind") == lay.kind) if n_quarantine else 0)
            date_filter = None
            for col, values in prune.items():
                date_filter = F.col(col).isin(values)
            inserted = n_deduped = 0
            if n_valid:  # the silver MERGE's commit, read once for both counts (None: not found)
                merged = commit(lay.silver)
                inserted = written(lay.silver, "numTargetRowsInserted", merged, date_filter)
                n_deduped = self._deduplicated(valid, merged)
            lap("count")
            dup_in_batch = n_valid - n_deduped
            dup_existing = n_deduped - inserted
            duplicates = dup_in_batch + dup_existing
            reconciled = (records_in == int(stats["rows"])
                          and records_in == inserted + duplicates + quarantined
                          and dup_existing >= 0)
            row = {
                "kind": lay.kind, "batch_id": batch_id, "app_id": app,
                "source_files": len(stats["files"] or []), "records_in": records_in,
                "inserted": inserted, "duplicates": duplicates,
                "duplicates_in_batch": dup_in_batch, "duplicates_existing": dup_existing,
                "quarantined": quarantined, "warned": int(stats["warned"] or 0),
                "check_failures": {**{c.name: int(stats[c.name] or 0) for c in self.checks},
                                   INCOMPLETE_LINE: len(unfinished)},
                "reconciled": reconciled, "processed_at": ingested_at,
                "max_event_time": gold_info.get("max_event_time"), "too_late": gold_info.get("too_late"),
            }
            delta.append_once(spark.createDataFrame([row], DQ_SCHEMA),
                              self._path("silver_dq_batches"), app, batch_id, merge_schema=True)
            lap("dq")
            # A writer that finished a file of this batch (or an earlier one) while it ran: copied now,
            # before Spark plans the next batch, so it lists the copy beside the files landed since
            # and takes them in the order they were written (modification time). Left to the next
            # batch's check, the copy would come after a file written later than its lines.
            self.watch.requeue_changed()
        finally:
            checked.unpersist()
        if self.express is not None:  # its provisional rows of these files are gold's now, or orphans
            self.express.processed(stats["files"] or [])
        if self.on_batch:
            self.on_batch(BatchResult(lay.kind, batch_id, records_in, inserted, duplicates,
                                      quarantined, reconciled, lap.seconds))


# ---- queries --------------------------------------------------------------------------------------

#: Spark's file source ignores a new file whose modification time is older than the newest file's it
#: has seen by more than ``maxFileAge`` (a week by default), without a word: a late delivery copied
#: with its original time (``rsync -a``, ``cp -p``) would never be read. Ten years instead: the source
#: then remembers every file it has seen (about 150 bytes each in the driver; its checkpoint log
#: lists them all anyway).
INBOX_MAX_FILE_AGE = "3650d"


def inbox_lines(spark: SparkSession, inbox: Path, max_files: int) -> DataFrame:
    """The inbox as a stream of text lines with their file's path and modification time.

    Files whose names start with '.' or '_' are ignored by Spark: writers use such a temporary name
    and rename the finished file, so a half-written file is never read. A file is read whatever its
    modification time (:data:`INBOX_MAX_FILE_AGE`), and wherever it is under the inbox: by default
    Spark reads no file in a folder, or takes ``date=...`` for a partition and skips the files beside
    it, or stops on "conflicting directory structures" (folders named with '.' or '_' stay unread).
    A local file's name may hold a colon.
    """
    inbox.mkdir(parents=True, exist_ok=True)
    return (
        spark.readStream.format("text")
        .option("maxFilesPerTrigger", max_files)
        .option("maxFileAge", INBOX_MAX_FILE_AGE)
        .option("recursiveFileLookup", "true")
        # A local inbox is read without Hadoop's checksum layer: it looks for a ".<name>.crc" beside
        # each file, and a name holding a colon (a writer's time, "events 10:00.jsonl") makes that a
        # URI it cannot parse, so the batch failed, and its replay after every restart. (Writers
        # leave no .crc files; Delta's tables are written through the session's own file system.)
        .option("fs.file.impl", "org.apache.hadoop.fs.RawLocalFileSystem")
        .option("fs.file.impl.disable.cache", "true")  # else the cached checksum file system is used
        .load(str(inbox))
        .select(
            F.col("value"),
            F.col("_metadata.file_path").alias("source_file"),
            F.col("_metadata.file_modification_time").alias("file_modified_at"),
        )
    )


def start_query(spark: SparkSession, settings: Settings, kind: str, once: bool,
                on_batch: Callable[[BatchResult], None] | None = None, gold: GoldStream | None = None,
                express: ExpressLane | None = None, watch: InboxWatch | None = None):
    """Start the ingestion query of ``kind``. ``watch``: its :class:`InboxWatch`, when the caller checks
    it between batches too (:func:`run_streams` does, in continuous mode)."""
    lay = layer(settings, kind)
    checkpoint = settings.checkpoint(kind)
    app_id = app_id_for(checkpoint, kind, lay.inbox)
    _TOLD.pop(str(checkpoint), None)  # an earlier run's, never raised
    ingest = IngestBatch(settings, kind, app_id, on_batch, gold, express if kind == "events" else None, watch)
    ingest.watch.seed()
    ingest.watch.requeue_changed("start")  # before the query lists the inbox: written to while no stream ran
    writer = (
        inbox_lines(spark, lay.inbox, settings.max_files_per_trigger)
        .writeStream.queryName(f"ingest_{kind}")
        .option("checkpointLocation", str(checkpoint))
        .foreachBatch(ingest)
    )
    writer = writer.trigger(availableNow=True) if once else writer.trigger(
        processingTime=f"{settings.trigger_seconds} seconds")
    try:
        return writer.start()
    except Exception as exc:  # Spark refuses to resume: say which folder and what to do
        if "checkpoint" in str(exc).lower() or "offset" in str(exc).lower():
            raise _corrupt(checkpoint, str(exc).splitlines()[0][:300]) from exc
        raise


def run_streams(
    spark: SparkSession,
    settings: Settings,
    once: bool,
    kinds=("events", "labels"),
    on_batch: Callable[[BatchResult], None] | None = None,
    stop_event: threading.Event | None = None,
    on_features: Callable[[DataFrame, str, int], None] | None = None,
    publish: Callable | None = None,
    express: ExpressLane | None = None,
) -> None:
    """Run the ingestion queries; with ``once`` process what is in the inboxes and return.

    Continuous mode runs until ``stop_event`` is set or a query fails. With ``settings.stream_gold``
    each micro-batch also updates gold (:class:`lakehouse.gold.GoldStream`); ``on_features`` then
    receives the feature rows of each events batch's new transactions (for scoring), and
    ``publish`` the gold rows each events batch is about to write (see :class:`GoldStream`).
    ``express``: an :class:`lakehouse.express.ExpressLane` to run beside a continuous stream with gold
    (started and stopped here), serving provisional features of newly landed files. Refused
    (:class:`StreamRunning`) while another process runs one of the queries ``kinds``.
    """
    with stream_lock(settings, kinds):
        _run_streams(spark, settings, once, kinds, on_batch, stop_event, on_features, publish, express)


def _run_streams(spark, settings: Settings, once: bool, kinds, on_batch, stop_event, on_features, publish,
                 express) -> None:
    damage.check_tables(settings)  # a commit emptied by a power loss, before Delta reads it as nothing
    ensure_tables(spark, settings, kinds)
    if on_features is None and settings.stream_gold and settings.stream_scoring:
        on_features = scoring_hook(spark, settings)
    gold = GoldStream(settings, on_features=on_features, publish=publish) if settings.stream_gold else None
    if express is not None and (once or gold is None or "events" not in kinds):
        express = None  # live arrivals only, and only from the look-back of the stream's gold step
    if express is not None:
        express.bind(spark, gold)
        express.prime()  # its look-back collected before the first batch, not beside it
    watches = [InboxWatch(settings.checkpoint(kind), kind) for kind in kinds]
    queries = [start_query(spark, settings, kind, once, on_batch, gold, express, watch)
               for kind, watch in zip(kinds, watches)]
    if express is not None:
        express.start()
    try:
        if once:
            for q in queries:
                _await(q, settings)
        else:
            stop_event = stop_event or threading.Event()
            watched_at = time.monotonic()
            while not stop_event.is_set():
                ended = [q for q in queries if not q.isActive]
                for q in ended:
                    _await(q, settings)
                if ended:
                    break
                if gold is not None:  # a daily risk owed by earlier batches, once it is due
                    gold.flush_risk(spark, force=False)
                if time.monotonic() - watched_at >= WATCH_IDLE_SECONDS:
                    # Lines appended to a file already read, while no new file lands: Spark runs no
                    # batch, so the copy is made here (and its landing triggers one). A query in the
                    # middle of a batch is left alone: that batch checks its watch itself.
                    for q, watch in zip(queries, watches):
                        if not q.status.get("isTriggerActive"):
                            watch.requeue_changed("idle")
                    watched_at = time.monotonic()
                stop_event.wait(0.5)
    finally:
        for q in queries:
            _stop_between_batches(q)
        if express is not None:
            express.stop()
    if gold is not None:  # stopped cleanly: what the last batches owed of the daily risk
        gold.flush_risk(spark)


def scoring_hook(spark: SparkSession, settings: Settings) -> Callable[[DataFrame, str, int], None]:
    """Score each events batch's new transactions with the champion model into gold risk_scores
    (exactly once per batch; the champion is re-read without a restart; none yet: nothing scored)."""
    from lakehouse.ml.scorer import Scorer, write_scores

    scorer = Scorer(spark, settings)

    def on_features(features: DataFrame, app_id: str, batch_id: int) -> None:
        scores = scorer.score(features)
        if scores is not None:
            write_scores(features.sparkSession, settings, scores, app_id, batch_id)

    return on_features


def _stop_between_batches(query, timeout: float = 120.0) -> None:
    """Stop a query once its current micro-batch is done, so a Ctrl-C does not leave a batch half
    written (a replay would complete it exactly once anyway, but a clean stop needs no replay)."""
    deadline = time.time() + timeout
    while query.isActive and time.time() < deadline:
        try:
            if not query.status.get("isTriggerActive", False):
                break
        except Exception:  # the query ended while we looked
            break
        time.sleep(0.1)
    if query.isActive:
        query.stop()


def _await(query, settings: Settings) -> None:
    """Wait for ``query`` to end. Its failure is raised as one clear error when it is one: the error the
    batch function raised for the user (:class:`InboxFileGone`, a check of severity ``fail``), a
    damaged table (:mod:`lakehouse.damage`) or a damaged checkpoint; else as Spark raised it."""
    checkpoint = settings.checkpoint(query.name.removeprefix("ingest_"))
    try:
        query.awaitTermination()
    except Exception as exc:
        told = _TOLD.pop(str(checkpoint), None)
        if told is not None:
            raise told from exc
        damaged = damage.refused(exc, settings) or damage.explain(exc, settings)
        if damaged is not None:
            raise damaged from exc
        text = str(exc)
        # Spark's own words for a checkpoint it cannot resume from, on the failure's first line; a
        # failure inside the batch function (our code, Delta) is never the checkpoint's.
        first = (text.splitlines() or [""])[0]
        lowered = first.lower()
        if ("FOREACH_BATCH_USER_FUNCTION_ERROR" not in first
                and any(w in lowered for w in ("checkpoint", "offsets", "metadata"))
                and any(w in lowered for w in ("corrupt", "parse", "invalid", "malformed", "unsupported", "log file"))):
            raise _corrupt(checkpoint, first[:300]) from exc
        raise
