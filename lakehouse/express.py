"""The express lane: provisional transaction features in Postgres a moment after a file lands.

A micro-batch of the stream pays a fixed cost of Delta commits and Spark jobs on 2 cores, and an
event waits for the batch running when it lands, then for its own: its features reach Postgres 10 to
25 s after the file lands, at 1,000 events/s (``bench/HISTORY.md``). The express lane serves them
sooner, beside the stream, without a Spark job or a Delta commit on its path:

1. It watches the events inbox (every ``interval`` seconds) for files that landed after it started.
2. It parses and checks each line in Python (:func:`parse_events`): only lines that pass every
   expectation of silver are kept, and only where the Python reading is the same as Spark's beyond
   doubt; anything else (a field given as a number, an offset it does not know, a duplicate JSON key,
   more than µs in a time...) is left to the stream alone.
3. It leaves out what the stream might not insert as a new on-time event: an event id already in
   silver's look-back or already published from an earlier file, and events that may be too late
   for the five-minute windows.
4. It computes the features of the rest exactly as the stream's driver route does
   (:func:`lakehouse.gold.feature_rows`), from the stream's look-back kept between batches
   (:meth:`lakehouse.gold.GoldStream.express_view`) plus the events of the files it published that
   the stream has not processed yet.
5. It inserts them into ``gold_transaction_features`` in Postgres, never over an existing row, and
   journals each row it inserted with its file (:func:`lakehouse.io.pg_mirror.publish_provisional`).

**Postgres still converges to gold.** Provisional rows never overwrite anything; gold's rows always
overwrite them: the stream's own publish and the mirror upsert every row they write, and a row that
differs from gold's (an event that arrived late and changed it, a re-delivery the stream kept instead)
is rewritten by gold's. Once the stream has processed a file (:meth:`ExpressLane.processed`, called by
its events micro-batch after gold), each journaled row of that file is either in silver (gold holds it,
so the mirror brings gold's values) or an *orphan* that gold never will (the stream quarantined or
deduplicated it otherwise), and is deleted (:func:`lakehouse.io.pg_mirror.resolve_provisional`). The
journal lives in Postgres, in the transaction of the rows it records: after a crash, the next lane
resolves every entry left against silver before it publishes anything.

What it does not serve: the five-minute windows table, scores and the daily risk (they come with the
stream's batch as before), and events in files that were in the inbox when it started (a catch-up).
``LAKEHOUSE_EXPRESS=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import threading
import time
from datetime import datetime, timedelta, timezone
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lakehouse.config import Settings
from lakehouse.io.paths import file_name, local_path
from lakehouse.quality import MAX_AMOUNT
from lakehouse.reference import FX_TO_USD, ISO_COUNTRIES
from lakehouse.schemas import EVENT_FIELDS

log = logging.getLogger(__name__)

#: The ISO-8601 forms read here: a subset of ``quality.ISO_TS_WITH_OFFSET`` that Spark's cast reads
#: the same way (seconds present, at most µs, offset Z or ±hh:mm / ±hhmm).
_TIME = re.compile(r"^(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,6}))?(Z|[+-]\d{2}:?\d{2})$")
#: A decimal number as Spark's cast to double reads it.
_NUMBER = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d{1,3})?$")
#: A control character (Unicode category Cc, as ``\p{Cc}`` in silver's check): silver quarantines ids holding one.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: Half a surrogate pair (an escape silver quarantines: ``record_is_valid_utf8``).
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_SIX = Decimal("0.000001")
_US = 1_000_000


class _Num(str):
    """A JSON number's text (``json.loads``' parse_int/parse_float): kept apart from a JSON string."""


def _no_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def _unique(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate key")
    return dict(pairs)


def _text(obj: dict, name: str, numbers: bool = False) -> str | None:
    """A field as silver reads it (trimmed of spaces, empty = missing); None also for a value whose
    Spark reading is not beyond doubt (a number where a string is expected, an object, a boolean)."""
    v = obj.get(name)
    if not isinstance(v, str) or (isinstance(v, _Num) and not numbers):
        return None
    v = v.strip(" ")
    return v or None


def _instant_us(raw: str) -> int | None:
    m = _TIME.match(raw)
    if not m:
        return None
    y, mo, d, h, mi, s, frac, zone = m.groups()
    try:
        local = datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), int((frac or "").ljust(6, "0")))
    except ValueError:
        return None
    if zone == "Z":
        offset = 0
    else:
        hh, mm = int(zone[1:3]), int(zone[-2:])
        if hh > 18 or mm > 59:
            return None
        offset = (hh * 60 + mm) * (-1 if zone[0] == "-" else 1)
    utc = local.replace(tzinfo=timezone.utc) - timedelta(minutes=offset)
    return (utc - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1)


def _round6(x: float) -> float:
    """Spark's ``round(x, 6)`` of a double: HALF_UP on its decimal text."""
    return float(Decimal(repr(x)).quantize(_SIX, rounding=ROUND_HALF_UP))


def parse_event(line: bytes, modified_ms: int, settings: Settings) -> dict | None:
    """One inbox line as silver would insert it (event_id, user_id, merchant_id, country,
    amount_base, ``_t`` µs), or None when silver would quarantine it, or might read it otherwise.

    ``modified_ms``: the file's modification time in ms (silver's arrival time for the age checks)."""
    if not line.strip() or len(line) > settings.max_record_bytes:
        return None
    try:
        text = line.decode("utf-8")
        obj = json.loads(text, parse_int=_Num, parse_float=_Num, parse_constant=_no_constant,
                         object_pairs_hook=_unique)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if "\ufffd" in text or "\ufeff" in text or not isinstance(obj, dict):
        return None
    if any(k not in EVENT_FIELDS and k.lower() in EVENT_FIELDS for k in obj):
        return None  # a field name in another case: Spark's reading depends on its settings
    ids = {c: _text(obj, c) for c in ("event_id", "user_id", "merchant_id")}
    amount, currency, country, when = (_text(obj, "amount", numbers=True), _text(obj, "currency"),
                                       _text(obj, "country"), _text(obj, "event_time"))
    if None in ids.values() or None in (amount, currency, country, when):
        return None
    if any(_CONTROL.search(v) or _SURROGATE.search(v) for v in ids.values()):
        return None
    if not (currency.isascii() and country.isascii()):
        return None
    currency, country = currency.upper(), country.upper()
    if currency not in FX_TO_USD or country not in ISO_COUNTRIES or not _NUMBER.match(amount):
        return None
    value = float(amount)
    if not (math.isfinite(value) and 0.0 < value <= MAX_AMOUNT):
        return None
    t = _instant_us(when)
    if t is None:
        return None
    lag = modified_ms / 1000.0 - t / _US
    if lag < -60.0 * settings.future_tolerance_minutes or lag > 86400.0 * settings.max_event_age_days:
        return None
    base = value * FX_TO_USD[currency]
    if not math.isfinite(base):
        return None
    return {**ids, "country": country, "amount_base": _round6(base), "_t": t, "_raw": text}


def parse_events(data: bytes, modified_ms: int, settings: Settings) -> tuple[list[dict], int]:
    """The events of one inbox file that silver would insert from it, one per event id (the smallest
    line wins, as silver's in-batch rule has it within a file), and how many lines were left out."""
    best: dict[str, dict] = {}
    lines = data.splitlines()
    for line in lines:
        row = parse_event(line, modified_ms, settings)
        if row is not None:
            held = best.get(row["event_id"])
            if held is None or row["_raw"] < held["_raw"]:
                best[row["event_id"]] = row
    rows = list(best.values())
    return rows, sum(1 for x in lines if x.strip()) - len(rows)


def silver_rows(rows: list[dict]) -> pa.Table:
    """``rows`` (:func:`parse_events`) as silver rows: :data:`lakehouse.transforms.features.ID_COLUMNS`
    and ``batch_id`` (-1: not in silver yet)."""
    from lakehouse.transforms.features import INSERTED_ARROW_SCHEMA

    t = np.array([r["_t"] for r in rows], dtype=np.int64)
    return pa.table({
        **{c: [r[c] for r in rows] for c in ("event_id", "user_id", "merchant_id", "country")},
        "event_time": t, "event_date": np.floor_divide(t, 86_400 * _US).astype(np.int32),
        "amount_base": [r["amount_base"] for r in rows], "batch_id": np.full(len(rows), -1, dtype=np.int64),
    }, schema=INSERTED_ARROW_SCHEMA)


def _silver_ids(spark, settings: Settings, ids: list[str]) -> set[str]:
    """Which of ``ids`` silver_transactions holds (one Spark query)."""
    from pyspark.sql import functions as F

    from lakehouse.io import delta

    if not ids:
        return set()
    silver = delta.read(spark, settings.table_path("silver_transactions"))
    return {r[0] for r in silver.where(F.col("event_id").isin(ids)).select("event_id").distinct().collect()}


def _close_entries(conn, settings: Settings, table, entries: list[str], in_silver: Callable[[list[str]], set[str]]
                   ) -> int:
    """Close the journal ``entries``: the rows silver holds are gold's, the others (orphans) are
    deleted (:func:`lakehouse.io.pg_mirror.resolve_provisional`); returns the rows deleted."""
    from lakehouse.io import pg_mirror

    if not entries:
        return 0
    present = in_silver(entries)
    return pg_mirror.resolve_provisional(conn, settings.pg_schema, table, entries,
                                         [e for e in entries if e not in present])


def resolve_journal(spark, settings: Settings) -> int | None:
    """Resolve every entry of the express journal against silver, without a lane: the rows silver
    holds are gold's (the mirror brings its values), the others are deleted. What a one-off mirror
    (``lakehouse mirror``, the end of ``lakehouse stream --mirror``) does, so Postgres converges to
    gold after a live job was killed and is not started live again. Returns the rows deleted (None:
    no journal). A lane live in another process loses the rows of files its stream has not processed
    yet: they come with the batch instead."""
    from lakehouse import mirror
    from lakehouse.io import delta, pg_mirror, postgres

    conn = postgres.connect(settings)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass(%s)", (f'"{settings.pg_schema}"."{pg_mirror.JOURNAL_TABLE}"',))
            exists = cur.fetchone()[0] is not None
        conn.commit()
        if not exists:
            return None
        entries = [e for e, _ in pg_mirror.journaled(conn, settings.pg_schema)]
        if not entries:
            return 0
        path = settings.table_path("gold_transaction_features")
        table = mirror.mirror_spec("gold_transaction_features", delta.read(spark, path).schema)
        deleted = _close_entries(conn, settings, table, entries, lambda ids: _silver_ids(spark, settings, ids))
        log.info("express journal: %d entries resolved, %d provisional rows deleted", len(entries), deleted)
        return deleted
    finally:
        conn.close()


class ExpressLane(threading.Thread):
    """The express lane (module docstring) of one stream's events inbox.

    :func:`lakehouse.streaming.run_streams` binds it to the stream's gold step (:meth:`bind`), starts it,
    tells it which files each events micro-batch processed (:meth:`processed`) and stops it.
    ``keep_published``: keep every provisional row published (the benchmark compares them with gold)."""

    def __init__(self, settings: Settings, report: Callable[[str], None] | None = None, interval: float = 0.2,
                 pause: float = 5.0, keep_published: bool = False):
        super().__init__(name="lakehouse-express", daemon=True)
        self.settings, self.interval, self.pause = settings, interval, pause
        self.report = report or (lambda msg: log.warning("%s", msg))
        self.keep_published = keep_published
        self.published_rows: list[pa.Table] = []
        self.stats = {"files": 0, "files_left_to_stream": 0, "rows_published": 0, "lines_left_out": 0,
                      "events_left_out": 0, "orphans_deleted": 0, "entries_resolved": 0,
                      # rounds that served files, and their seconds: computing features, inserting them
                      "rounds": 0, "compute_seconds": 0.0, "insert_seconds": 0.0, "slowest_round_seconds": 0.0,
                      # the look-back collected for the lane before the stream's first batch kept one
                      "snapshot_seconds": None}
        self.last_error: BaseException | None = None
        self._spark = self._gold = None
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self._seen: set[str] = set()  # inbox files looked at (or there at the start: the stream's alone)
        self._done: set[str] = set()  # files an events micro-batch processed
        self._journaled: set[str] = set()  # files with rows in the journal, not resolved yet
        self._pending: dict[str, pa.Table] = {}  # look-back rows of published files not processed yet
        # the event ids of the kept look-back the pending rows were last pruned against (:meth:`_kept_ids`)
        self._ids, self._ids_of = set(), None
        self._snapshot = None  # the look-back collected before the stream kept one (False: none or done)
        self._recovered = False
        self._conn = None
        self._table = None  # the MirrorTable of gold_transaction_features
        self._retry_at = 0.0

    # -- wiring ---------------------------------------------------------------------------------
    def bind(self, spark, gold) -> None:
        """Serve the features of ``gold`` (a :class:`lakehouse.gold.GoldStream`); the files in the inbox
        now are the stream's alone."""
        self._spark, self._gold = spark, gold
        inbox = self.settings.events_inbox
        if inbox.is_dir():
            self._seen.update(e.name for e in os.scandir(inbox))

    def prime(self) -> None:
        """Collect the look-back to serve from until the stream's first events batch keeps one
        (:meth:`_view`), before the stream starts: alone on the cores, a few seconds, where beside
        that batch it took 13 s on an empty history and the files landing meanwhile waited for it. A
        failure is left to the thread, which retries. (A look-back over ``features_driver_max_rows`` is
        not kept: its collection then delays the stream's start for nothing, once.)"""
        try:
            self._view()
        except Exception as exc:  # noqa: BLE001 -- a head start only
            from lakehouse.mirror import brief

            self.report(f"express: the look-back was not collected before the stream started ({brief(exc)}); "
                        "retrying beside it")

    def processed(self, files: Iterable[str]) -> None:
        """An events micro-batch has processed ``files`` (paths or URIs) and written their gold. The lane
        serves the inbox's top-level files, by name: a file of the same name in a folder under it
        (``2026/12/05/part-0.jsonl``) is not one of them."""
        inbox = os.path.realpath(self.settings.events_inbox)
        names = {file_name(f) for f in files if os.path.realpath(os.path.dirname(local_path(f))) == inbox}
        with self._lock:
            self._done |= names
            for n in names:
                self._pending.pop(n, None)

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> None:
        while not self._halt.is_set():
            if time.monotonic() >= self._retry_at:
                try:
                    self.step()
                    if self.last_error is not None:
                        self.report("express: serving new events ahead of the stream again")
                    self.last_error = None
                except Exception as exc:  # noqa: BLE001 -- a head start only: the stream and the mirror go on
                    self._close()
                    if self.last_error is None:
                        from lakehouse.mirror import brief

                        self.report(f"express: {brief(exc)}; new events reach Postgres with the stream's batches meanwhile "
                                    f"(retrying every {self.pause:.0f} s)")
                    self.last_error, self._retry_at = exc, time.monotonic() + self.pause
            self._halt.wait(self.interval)

    def stop(self, timeout: float = 60.0) -> None:
        """End the thread, resolving what the stream has processed meanwhile."""
        self._halt.set()
        if self.is_alive():
            self.join(timeout)
        if self._recovered:  # what the stream did not process is not gold's: Postgres is left equal to gold
            try:
                self._recover()
            except Exception as exc:  # noqa: BLE001 -- the next start resolves the journal
                self.report(f"express: the journal was not resolved at stop ({type(exc).__name__}); "
                            "the next start resolves it")
        self._close()

    def step(self) -> int:
        """One round: resolve the files the stream processed, then publish the files that landed;
        returns the rows published."""
        view = self._view()
        if view is None:
            self._skip_new_files()
            return 0
        if not self._recovered:
            self._recover()
        self._resolve()
        files = list(self._new_files())
        return self._publish(files) if files else 0

    # -- parts ----------------------------------------------------------------------------------
    def _view(self):
        """(kept look-back, watermark µs, features schema) of the stream's gold step; before its first
        events batch, a look-back collected once for the lane (:meth:`GoldStream.express_snapshot`);
        None while there is none (a stale look-back dropped, the Spark route)."""
        if self._gold is None:
            return None
        view = self._gold.express_view()
        if view is not None:
            self._snapshot = False  # the stream's own from now on
            return view
        if self._snapshot is None:
            started = time.monotonic()
            self._snapshot = self._gold.express_snapshot(self._spark) or False
            self.stats["snapshot_seconds"] = round(time.monotonic() - started, 3)
        return self._snapshot or None

    def _connection(self):
        from lakehouse import mirror
        from lakehouse.io import pg_mirror, postgres

        if self._table is None:
            _, _, schema = self._view()
            self._table = mirror.mirror_spec("gold_transaction_features", schema)
        if self._conn is None or self._conn.closed:
            self._conn = postgres.connect(self.settings)
            pg_mirror.ensure_schema(self._conn, self.settings.pg_schema, [self._table])
            pg_mirror.ensure_journal(self._conn, self.settings.pg_schema)
        return self._conn

    def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn = None

    def _inbox(self) -> list[os.DirEntry]:
        inbox = self.settings.events_inbox
        if not inbox.is_dir():
            return []
        return [e for e in os.scandir(inbox) if e.name not in self._seen and not e.name.startswith((".", "_"))
                and e.is_file()]

    def _skip_new_files(self) -> None:
        """Files landing while there is no look-back to serve them from are the stream's alone."""
        for e in self._inbox():
            self._seen.add(e.name)
            self.stats["files_left_to_stream"] += 1

    def _new_files(self):
        entries = sorted(self._inbox(), key=lambda e: (e.stat().st_mtime_ns, e.name))
        for e in entries:
            self._seen.add(e.name)
            with self._lock:
                done = e.name in self._done
            if done:  # the stream was first
                self.stats["files_left_to_stream"] += 1
                continue
            try:
                modified_ms = e.stat().st_mtime_ns // 1_000_000
                data = Path(e.path).read_bytes()
            except OSError:  # gone again: nothing to serve
                continue
            yield e.name, modified_ms, data

    def _publish(self, files: list[tuple[str, int, bytes]]) -> int:
        """Serve the files ``files`` (name, mtime in ms, content) that landed since the last round, in
        landing order: one feature computation for all of them (its cost is mostly the look-back's,
        whatever the number of targets), then one journaled insert per file. An event of a file sees
        the events of the files before it, as of its own time; it may see those of a later file of
        the round too, as gold will. Returns the rows inserted."""
        from lakehouse import gold as gold_mod
        from lakehouse.io import pg_mirror
        from lakehouse.transforms import features

        started = time.monotonic()
        kept, mark_us, _ = self._view()
        kept_ids = self._kept_ids(kept)
        with self._lock:
            pending = [p for p in self._pending.values() if p.num_rows]
        schema = kept.table.schema
        # ids of the pending files, then of the earlier files of this round as they are taken
        pending_ids = {i for p in pending for i in p["event_id"].to_pylist()}
        latest = max([mark_us or np.iinfo(np.int64).min, *[pc.max(p["_t"]).as_py() for p in pending]])
        reports = kept.reports if kept.reports is not None else pa.table(
            {"event_id": pa.array([], pa.string()), "_r": pa.array([], pa.int64())})
        served: list[tuple[str, pa.Table]] = []
        for name, modified_ms, data in files:
            rows, left_out = parse_events(data, modified_ms, self.settings)
            self.stats["lines_left_out"] += left_out
            if not rows:
                continue
            fresh = silver_rows(rows)
            keep = pa.array([not (i in kept_ids or i in pending_ids)
                             for i in fresh["event_id"].to_pylist()], pa.bool_())
            # Too late for the windows, by the watermark the stream may have by the batch that takes
            # this file: left to the stream (a too-late event's features see every event, on time or not).
            if latest != np.iinfo(np.int64).min:
                floor = latest - self.settings.allowed_lateness_minutes * 60 * _US
                keep = pc.and_(keep, pc.greater_equal(pc.cast(fresh["event_time"], pa.int64()), floor))
            # and events whose 30-day look-back reaches before the kept one (older than its first day)
            keep = pc.and_(keep, pc.greater(pc.cast(fresh["event_time"], pa.int64()),
                                            kept.lo_us + features.LOOKBACK_SECONDS * _US))
            fresh = fresh.filter(keep)
            self.stats["events_left_out"] += len(rows) - fresh.num_rows
            if not fresh.num_rows:
                continue
            earliest = datetime.fromtimestamp(pc.min(pc.cast(fresh["event_time"], pa.int64())).as_py()
                                              // 86_400_000_000 * 86_400, timezone.utc)
            added = features.lookback_of_inserted(fresh, earliest, reports)
            added = added.select(kept.table.column_names).cast(schema)
            served.append((name, added))
            pending_ids.update(added["event_id"].to_pylist())
            latest = max(latest, pc.max(added["_t"]).as_py())
        if not served:
            return 0
        table = pa.concat_tables([kept.table, *[p.select(kept.table.column_names).cast(schema) for p in pending],
                                  *[added for _, added in served]])
        n_added = sum(added.num_rows for _, added in served)
        rows_out = gold_mod.feature_rows(table, np.arange(table.num_rows - n_added, table.num_rows), alone=True)
        computed = time.monotonic()
        total, offset = 0, 0
        for name, added in served:
            mine = rows_out.slice(offset, added.num_rows)
            offset += added.num_rows
            inserted = pg_mirror.publish_provisional(self._connection(), self.settings.pg_schema, self._table,
                                                     mine, name)
            with self._lock:
                if name not in self._done:  # else processed while computed: resolved with the next round
                    self._pending[name] = added
                if inserted:
                    self._journaled.add(name)
            self.stats["files"] += 1
            self.stats["rows_published"] += len(inserted)
            total += len(inserted)
            if self.keep_published and inserted:
                self.published_rows.append(mine.filter(pc.is_in(mine["event_id"], value_set=pa.array(inserted))))
        done = time.monotonic()
        self.stats["rounds"] += 1
        self.stats["compute_seconds"] += computed - started
        self.stats["insert_seconds"] += done - computed
        self.stats["slowest_round_seconds"] = max(self.stats["slowest_round_seconds"], done - started)
        return total

    def _kept_ids(self, kept) -> set[str]:
        """The event ids of the look-back ``kept``, as a set built once per look-back (a ``pc.is_in``
        against a million ids hashes them again on every call: a third of a second each). A new
        look-back holds the stream's batches since the last: their rows leave the pending files."""
        if self._ids_of is not kept:
            ids = set(kept.table["event_id"].to_pylist())
            with self._lock:
                self._pending = {n: p.filter(pa.array([i not in ids for i in p["event_id"].to_pylist()], pa.bool_()))
                                 for n, p in self._pending.items()}
            self._ids, self._ids_of = ids, kept
        return self._ids

    def _in_silver(self, ids: list[str]) -> set[str]:
        """Which of ``ids`` silver holds: looked up in the kept look-back, the rest in silver itself."""
        view = self._view()
        found: set[str] = set()
        if view is not None and ids:
            kept_ids = self._kept_ids(view[0])
            found = {i for i in ids if i in kept_ids}
        return found | _silver_ids(self._spark, self.settings, [i for i in ids if i not in found])

    def _resolve(self) -> None:
        """Close the journal of the files the stream has processed (module docstring)."""
        from lakehouse.io import pg_mirror

        with self._lock:
            files = self._journaled & self._done
        if not files:
            return
        conn = self._connection()
        entries = [e for e, _ in pg_mirror.journaled(conn, self.settings.pg_schema, files)]
        self.stats["orphans_deleted"] += _close_entries(conn, self.settings, self._table, entries, self._in_silver)
        self.stats["entries_resolved"] += len(entries)
        with self._lock:
            self._journaled -= files

    def _recover(self) -> None:
        """Resolve the whole journal: at the first round, what an earlier lane left (a crash); at the
        stop, the files the stream did not process. The rows silver holds are gold's, the others are
        deleted (the stream serves their files)."""
        from lakehouse.io import pg_mirror

        conn = self._connection()
        entries = [e for e, _ in pg_mirror.journaled(conn, self.settings.pg_schema)]
        if entries:
            deleted = _close_entries(conn, self.settings, self._table, entries, self._in_silver)
            self.stats["orphans_deleted"] += deleted
            self.stats["entries_resolved"] += len(entries)
            (log.info if self._recovered else self.report)(
                f"express: {len(entries)} provisional rows {'left unprocessed at the stop' if self._recovered else 'left by an earlier run'} "
                f"resolved against silver ({deleted} deleted, the others are gold's)")
        with self._lock:
            self._journaled.clear()
        self._recovered = True
