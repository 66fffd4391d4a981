"""Gold: point-in-time transaction features, five-minute user windows, daily merchant and country
risk, and the too-late events -- kept up to date by the stream, one micro-batch at a time
(:class:`GoldStream`), and recomputed for a date range by the batch backfill (:func:`backfill`).
Both call the same pure functions (:func:`gold_frames`, :func:`transaction_rows` and the transforms
they use), so they cannot drift: after a stream and a backfill over the same silver data, every gold
table holds the same rows (the parity test checks it row for row).

**Lateness** (the rule both paths share). The events stream's *watermark* before batch ``b`` is the
latest event time of the transactions inserted by batches ``< b`` (read from the data-quality rows,
so a replayed batch sees the same watermark). Inside a batch of several files it moves on file by
file, in the order the files arrived (the order the file source took them in: listing by listing,
each by modification time): a file's transactions are judged by the batch's watermark and the latest event time inserted
from the batch's files before it (:func:`file_marks`). Files listed with the same modification time
landed at the same time as far as anyone can tell: they do not judge each other, in one batch or split
between two (:meth:`GoldStream._tied_marks`). So which events are too late does not hang on
how the files were grouped into batches -- a backlog read in one batch, ``maxFilesPerTrigger``, a
crash after which Spark folds two listings into one batch -- only on the order they arrived in.
Lines of one inbox file never judge each other: the lines a writer added to a file after the stream
read it come in a copy the inbox watch makes, and the copy is judged by the files taken before it that
were written before its lines, the file it copies aside (:meth:`GoldStream._copy_marks`), as the
file would have been, read once and whole. A new transaction whose event time is more than
``allowed_lateness_minutes`` (default 10) before its watermark is **too late**:

* it is recorded in ``gold_too_late_events`` with the watermark, how late it was and why;
* it does **not** enter anybody else's features, nor any five-minute window (analysts' windows and
  the features the model was served stay as they were when the event should have counted);
* it still gets its own feature row, as of its own event time, from everything in silver (other
  too-late events included), and it counts in the daily merchant and country risk of its day.

A late event *within* the allowed lateness is a normal event: its windows and every later
transaction it touches (same user, merchant or country, up to 30 days on) are recomputed.

**What a micro-batch recomputes.** New transactions change the features of later transactions of
the same user, merchant or country (within the 30-day look-back, ties at the same instant included);
a new fraud label reported at ``r`` for an event at ``e`` changes the merchant and country fraud rates
of transactions in ``[max(e, r), e + 30d)``. The stream recomputes exactly those rows (a superset:
everything of the key from the earliest change on), then the five-minute windows of the users with
new on-time events, then the daily risk from the earliest touched day on (the trailing baselines of
the following 30 days depend on it). Each write is idempotent by (query app id, batch id).
While the look-back fits in the driver (``settings.features_driver_max_rows``, lowered to what the
driver's heap holds: :func:`lakehouse.spark.driver_rows_limit`), an events batch is
computed there from one collect of it (:func:`driver_batch`: the same rules, the same values);
beyond that, in Spark.

**The daily risk's cadence.** The daily risk is daily and not on the features' path, so the stream
rewrites it at most every ``settings.risk_refresh_seconds``: a batch inside the interval *owes* its
days (the earliest is kept on disk before the batch commits), and the next batch past the interval,
the idle stream, or its clean stop pays them; a restart after a crash reads what is owed. Its
``is_matured`` is judged by the calendar (a day matures 30 days after it, when its chargebacks have had
time to arrive), so once per UTC day the risk step also reaches back to the earliest day still flagged
young although it has matured.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import to_arrow_schema
from pyspark.sql.types import DoubleType, LongType, StringType, StructField, StructType, TimestampType, DateType

from lakehouse import damage
from lakehouse.config import Settings
from lakehouse.io import delta
from lakehouse.io import maintenance as mio
from lakehouse.io.paths import copy_origin, local_path, source_entries
from lakehouse.laps import Laps
from lakehouse.spark import driver_rows_limit
from lakehouse.transforms import driver_features, features
from lakehouse.transforms.features import instant, micros_of
from lakehouse.transforms import risk as risk_t

log = logging.getLogger(__name__)

#: Gold tables: partition column and key (the key is also the Postgres mirror's primary key).
GOLD_TABLES: dict[str, dict] = {
    "gold_transaction_features": {"partition": "event_date", "key": ("event_id",), "span": "event_time",
                                  "indexes": (("user_id", "event_time"), ("merchant_id", "event_time"),
                                              ("country", "event_time"), ("event_date",)),
                                  # The stream's upserts update rows all over the live day (a late event
                                  # reaches every later transaction of its merchant and country): with
                                  # deletion vectors they mark those rows deleted and append the new
                                  # ones, instead of rewriting the day's files, whose copy grows with the
                                  # day (measured at 1,000 events/s: 189k -> 271k rows copied and 7.4 ->
                                  # 9.3 s per upsert in five batches; flat 5.3-5.6 s with them). The
                                  # windows table measured no better with them, so it has none.
                                  "properties": {"delta.enableDeletionVectors": "true"}},
    "gold_user_features_5m": {"partition": "window_date", "key": ("user_id", "window_start"), "span": "window_start",
                              "indexes": (("window_start",), ("window_date",))},
    "gold_merchant_risk_daily": {"partition": "day", "key": ("merchant_id", "day"), "indexes": (("day",),)},
    "gold_country_risk_daily": {"partition": "day", "key": ("country", "day"), "indexes": (("day",),)},
    "gold_too_late_events": {"partition": "event_date", "key": ("event_id",),
                             "indexes": (("event_date",), ("detected_at",))},
}
#: The tables :func:`gold_frames` computes (the too-late table is written by the stream only).
COMPUTED_TABLES = ("gold_transaction_features", "gold_user_features_5m",
                   "gold_merchant_risk_daily", "gold_country_risk_daily")

TOO_LATE_SCHEMA = StructType([
    StructField("event_id", StringType(), False),
    StructField("user_id", StringType(), True),
    StructField("merchant_id", StringType(), True),
    StructField("country", StringType(), True),
    StructField("amount_base", DoubleType(), True),
    StructField("event_time", TimestampType(), True),
    StructField("event_date", DateType(), True),
    StructField("watermark", TimestampType(), True),
    StructField("lateness_seconds", DoubleType(), True),
    StructField("reason", StringType(), True),
    StructField("batch_id", LongType(), True),
    StructField("detected_at", TimestampType(), True),
])

_CDF = {"delta.enableChangeDataFeed": "true"}
_LOOKBACK = timedelta(seconds=features.LOOKBACK_SECONDS)
_RISK = (("merchant_id", "merchant"), ("country", "country"))
_EMPTY_LABELS = "event_id string, is_fraud boolean, scenario string, reported_at timestamp"


def _between(col: str, lo: date, hi: date):
    return (F.col(col) >= F.lit(lo)) & (F.col(col) <= F.lit(hi))


# ---- pure functions shared by the stream and the backfill ------------------------------------------

def transaction_rows(targets: DataFrame, history: DataFrame, labels: DataFrame, too_late_ids: DataFrame,
                     driver_max_rows: int = features.DRIVER_MAX_ROWS) -> DataFrame:
    """Point-in-time features of ``targets`` under the lateness rule (module docstring): an on-time
    target sees ``history`` without the too-late events; a too-late target sees all of ``history``.
    Evaluated in the driver up to ``driver_max_rows`` rows of look-back, else in Spark (same values)."""
    return features.transaction_features(targets, history, labels, late_ids=too_late_ids,
                                         driver_max_rows=driver_max_rows)


def window_rows(events: DataFrame, too_late_ids: DataFrame) -> DataFrame:
    """Five-minute user windows of ``events`` (too-late events left out), with ``window_date``."""
    clean = events.join(too_late_ids, "event_id", "left_anti")
    return features.user_windows_5m(clean).withColumn("window_date", F.to_date("window_start"))


def risk_rows(history: DataFrame, tx: DataFrame, labels: DataFrame, date_from: date, date_to: date,
              as_of: date) -> dict[str, DataFrame]:
    """Daily merchant and country risk of [date_from, date_to]; ``history`` must start 30 days earlier."""
    baseline_from = date_from - timedelta(days=30)
    hist = history.where(F.col("event_date") >= F.lit(baseline_from))
    return {f"gold_{prefix}_risk_daily": risk_t.risk_daily(hist, tx, labels, key, date_from, date_to,
                                                           baseline_from, as_of)
            for key, prefix in _RISK}


def gold_frames(silver: DataFrame, labels: DataFrame, too_late_ids: DataFrame, date_from: date,
                date_to: date, as_of: date | None = None,
                driver_max_rows: int = features.DRIVER_MAX_ROWS) -> dict[str, DataFrame]:
    """The gold rows of [date_from, date_to] (UTC dates), computed from silver. Pure."""
    history = silver.where(_between("event_date", date_from - _LOOKBACK - timedelta(days=1), date_to))
    targets = history.where(_between("event_date", date_from, date_to))
    tx = transaction_rows(targets, history, labels, too_late_ids, driver_max_rows)
    # A window starting on date_to can hold events of the next day's first minutes.
    window_events = silver.where(_between("event_date", date_from, date_to + timedelta(days=1)))
    windows = window_rows(window_events, too_late_ids).where(_between("window_date", date_from, date_to))
    risk = risk_rows(history, tx, labels, date_from, date_to, as_of or _today())
    return {"gold_transaction_features": tx, "gold_user_features_5m": windows, **risk}


def affected_rows(gold_tx: DataFrame, changes: DataFrame, keys: tuple[str, ...], since: date) -> DataFrame:
    """Rows of ``gold_tx`` whose features a change may alter: for each key column, the rows of a
    changed key value with ``event_time`` in ``[min(_lo), max(_hi) + 30d)`` of that value's changes.

    ``changes`` has the key columns plus ``_lo`` (earliest target time affected) and ``_hi`` (event time
    of the change, whose influence ends 30 days later); ``since`` is the earliest ``_lo`` date (prunes
    ``gold_tx`` by partition). Returns distinct ``ID_COLUMNS`` rows.
    """
    gold_tx = gold_tx.where(F.col("event_date") >= F.lit(since))
    out = None
    ids = list(features.ID_COLUMNS)
    for key in keys:
        bounds = changes.groupBy(key).agg(F.min("_lo").alias("_lo"), F.max("_hi").alias("_hi"))
        hit = (gold_tx.join(F.broadcast(bounds), key)
               .where((F.col("event_time") >= F.col("_lo"))
                      & (F.col("event_time") < F.col("_hi") + F.expr(f"INTERVAL {features.LOOKBACK_SECONDS} SECONDS")))
               .select(*ids))
        out = hit if out is None else out.unionByName(hit)
    return out.dropDuplicates(["event_id"])


@dataclass(frozen=True)
class DriverBatch:
    """What an events micro-batch writes to gold, computed in the driver (:func:`driver_batch`)."""

    features: pa.Table  # gold_transaction_features rows: the new and the affected transactions
    windows: pa.Table  # gold_user_features_5m rows holding new on-time events
    # Which rows are new to gold as far as the look-back can tell (a new transaction; a window of new
    # events only): written by an insert-only MERGE, the others by an upsert (GoldStream._write).
    features_new: np.ndarray
    windows_new: np.ndarray


@dataclass(frozen=True)
class _Kept:
    """An events batch's look-back, kept for the next (:meth:`GoldStream._kept_lookback`)."""

    table: pa.Table  # features.lookback_rows' rows with event time after lo_us
    lo_us: int
    version: int | None  # the silver_transactions version they reflect
    #: the earliest fraud report of every fraud-labelled event (event_id, _r µs), its event in silver
    #: or not yet: what the next batch's new rows take their ``_r`` from (:meth:`GoldStream._kept_lookback`)
    reports: pa.Table | None = None
    #: the silver_labels version the fraud reports reflect: a labels commit this object did not patch
    #: in (another process's labels stream) makes the kept look-back stale
    labels: int | None = None


#: No fraud reports, as Arrow (:func:`features.fraud_reports`' columns).
_NO_REPORTS = pa.table({"event_id": pa.array([], pa.string()), "_r": pa.array([], pa.int64())})


def new_rows(table: pa.Table, batch_id: int, dates: list[str]) -> np.ndarray:
    """Indices of the rows of ``table`` the events batch ``batch_id`` inserted (partitions ``dates``)."""
    is_new = pc.and_(pc.equal(table["batch_id"], batch_id),
                     pc.is_in(pc.cast(table["event_date"], pa.string()), value_set=pa.array(dates, pa.string())))
    return np.flatnonzero(is_new.to_numpy(zero_copy_only=False))


def inserted_by(silver: DataFrame, batch_id: int, dates: list[str]) -> DataFrame:
    """The rows of silver_transactions events batch ``batch_id`` inserted (into partitions ``dates``)."""
    return silver.where(F.col("event_date").isin(dates) & (F.col("batch_id") == batch_id))


#: No watermark yet (µs), in an int64 array of watermarks.
NO_MARK = np.iinfo(np.int64).min


def file_marks(mark: int | None, files: list[str], latest: dict[str, int],
               written: dict[str, int] | None = None) -> dict[str, int | None]:
    """The watermark (µs; None: none yet) each file of an events batch is judged by: ``mark``, the
    watermark before the batch, moved on by the latest event time the batch inserted from each file
    before it. ``files``: the batch's files in the order they arrived; ``latest``: the latest event
    time (µs) inserted from each file (a file that inserted nothing is absent). ``written``: the
    files' modification times (ms) as listed: files that follow each other with the same one landed
    at the same time as far as anyone can tell, so they do not judge each other (each is judged by
    the files before them all)."""
    written = written or {}
    out: dict[str, int | None] = {}
    running = mark
    # runs of one listed time (a file without one is a run of its own: keyed by its path)
    for _, run in itertools.groupby(files, key=lambda f: written.get(f, f)):
        run = list(run)
        out |= dict.fromkeys(run, running)
        for f in run:
            if f in latest:
                running = latest[f] if running is None else max(running, latest[f])
    return out


def feature_rows(table: pa.Table, at: np.ndarray, keys: list[np.ndarray] | None = None,
                 alone: bool = False) -> pa.Table:
    """The gold_transaction_features rows of the look-back rows ``at`` of ``table``
    (:func:`features.lookback_rows`' columns; their event ids unique), each as of its own event time
    from the rows of ``table`` (:func:`driver_features.evaluate`), in the order of ``at``. ``keys``:
    :func:`driver_features.key_codes` of ``table``, when the caller has them already. ``alone``: no
    other row of ``table`` has the event id of a row of ``at`` (the express lane's new events), so
    they need not be looked up among the table's ids."""
    ids = table["event_id"].take(at)
    names = [c for c in features.FEATURE_COLUMNS if c not in ("is_night", "is_weekend")]
    got = driver_features.evaluate(table.select(["event_id", "user_id", "merchant_id", "country", "amount_base",
                                                 "_t", "_a", "_r", "_late"]),
                                   ids, names, features.TRAILING_WINDOWS, features.FRAUD_RATE_WINDOWS,
                                   features.LOOKBACK_SECONDS, keys=keys, at=at if alone else None)
    assert got["event_id"].equals(ids), "driver features came back in another order"
    seconds = np.floor_divide(table["_t"].to_numpy().astype(np.int64)[at], 1_000_000)
    columns = {c: table[c].take(at) for c in features.ID_COLUMNS} | {c: got[c] for c in names}
    columns["is_night"] = pa.array((seconds % 86_400) // 3_600 < 6)
    columns["is_weekend"] = pa.array(np.isin(np.floor_divide(seconds, 86_400) % 7, (2, 3)))
    return pa.table({c: columns[c] for c in (*features.ID_COLUMNS, *features.FEATURE_COLUMNS)})


def driver_batch(table: pa.Table, new: np.ndarray) -> DriverBatch:
    """The gold rows an events batch changes, from its look-back ``table``
    (:func:`features.lookback_rows`), by the rules the Spark route follows (module docstring): the
    batch's transactions (the rows ``new``: :func:`new_rows`) and the transactions they affect
    (:func:`affected_rows`' rule; too-late events only affect too-late rows) get their features
    (:func:`driver_features.evaluate`), and the five-minute windows that hold the on-time ones
    (:func:`driver_features.windows_5m`; the others are as earlier batches wrote them).
    Pure: Arrow in, Arrow out, the same values as the Spark route to the bit; the masks
    ``features_new`` and ``windows_new`` say which rows no earlier batch can have written."""
    minute, day = 60_000_000, 86_400_000_000
    lookback = features.LOOKBACK_SECONDS
    t = table["_t"].to_numpy().astype(np.int64)
    late = table["_late"].to_numpy(zero_copy_only=False).astype(bool)
    keys = driver_features.key_codes(table)
    on_time, late_new = new[~late[new]], new[late[new]]
    hit = driver_features.affected(t, keys, on_time, lookback)
    if len(late_new):
        hit |= late & driver_features.affected(t, keys, late_new, lookback)
    hit[new] = True
    is_new = np.zeros(len(t), dtype=bool)
    is_new[new] = True
    at = np.flatnonzero(hit)
    ids = table["event_id"].take(at)
    if len(pc.unique(ids)) != len(ids):  # one event_id on two dates: one row (a MERGE source key is unique)
        at = at[np.sort(pc.index_in(pc.unique(ids), value_set=ids).to_numpy())]
    rows = feature_rows(table, at, keys)

    # Five-minute windows: each user with new on-time events, from the minute four minutes before
    # the earliest of them to the latest; the events of [that start, the latest + 5 min), too-late
    # events left out; the windows holding a new on-time event.
    user = keys[0]
    lo = np.full(int(user.max()) + 1, np.iinfo(np.int64).max)
    hi = np.full(int(user.max()) + 1, np.iinfo(np.int64).min)
    np.minimum.at(lo, user[on_time], np.floor_divide(t[on_time], minute) * minute - 4 * minute)
    np.maximum.at(hi, user[on_time], t[on_time])
    scope = np.flatnonzero(~late & (t >= lo[user]) & (t < hi[user] + 5 * minute))
    a = table["_a"]
    null = {c: pc.is_null(table[c]).to_numpy(zero_copy_only=False)[scope] for c in ("merchant_id", "country")}
    w = driver_features.windows_5m(
        user[scope], t[scope], pc.fill_null(a, 0).to_numpy().astype(np.int64)[scope],
        pc.is_null(a).to_numpy(zero_copy_only=False)[scope],
        pc.fill_null(pc.cast(table["amount_base"], pa.float64()), float("nan")).to_numpy()[scope],
        keys[1][scope], null["merchant_id"], keys[2][scope], null["country"], flag=is_new[scope])
    of = scope[w["row"]]
    # (a window without new events is as the earlier batches wrote it: left out)
    keep = (w["start"] >= lo[user[of]]) & (w["start"] <= hi[user[of]]) & w["flag_any"]
    start = w["start"][keep]
    ts = pa.timestamp("us", tz="UTC")
    windows = pa.table({
        "user_id": table["user_id"].take(of[keep]),
        "window_start": pa.array(start, ts), "window_end": pa.array(start + 5 * minute, ts),
        "tx_count": pa.array(w["tx_count"][keep]),
        **{c: pa.array(w[c][keep], mask=w[f"{c}_null"][keep]) for c in ("amount_sum", "amount_mean", "amount_max")},
        "distinct_merchants": pa.array(w["distinct_merchants"][keep]),
        "distinct_countries": pa.array(w["distinct_countries"][keep]),
        "window_date": pa.array(np.floor_divide(start, day).astype("int32"), pa.date32()),
    })
    return DriverBatch(rows, windows, features_new=is_new[at], windows_new=w["flag_all"][keep])


def _split_write(n_new: int, n_known: int) -> bool:
    """Whether an events batch writes its ``n_new`` new rows of a gold table by an insert-only MERGE
    and its ``n_known`` others by an upsert, rather than all by one upsert. An upsert joins its
    source with every column of the target's partitions and rewrites the files it matches; an
    insert-only MERGE reads the keys and appends. Each MERGE also costs about a second however small
    (2 cores). Measured (2 cores): 60-90k new transactions and 3k affected ones, 9 s split against
    12-13 s in one upsert; 31k new windows and 72k known ones, 7.8 s against 6.8 s; 1,000 new and
    50 known, 2.8 s against 2.0 s. So: split when nothing is known, or when the new rows are many
    and outnumber the known ones well."""
    return n_new > 0 and (n_known == 0 or (n_new >= 10_000 and n_new >= 4 * n_known))


@contextmanager
def staged(spark: SparkSession, rows: pa.Table, schema: StructType, folder: Path) -> Iterator[DataFrame]:
    """``rows`` (computed in the driver) as a DataFrame of ``schema`` that Spark reads from a Parquet
    file under ``folder``, removed on exit. ``spark.createDataFrame`` would hold every row in the
    driver's heap for as long as the write runs (a 700k-event batch's feature rows did not fit in
    spark-submit's default 1g); a file is read by the tasks a batch at a time, and on a cluster by
    the executors (``LAKEHOUSE_DATA`` is shared storage). Files a killed process left are removed
    by a later call once a day old."""
    folder.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for old in folder.glob("*.parquet"):
        with contextlib.suppress(OSError):
            if now - old.stat().st_mtime > 86_400:
                old.unlink()
    file = folder / f"{os.getpid()}-{uuid.uuid4().hex}.parquet"
    # The Arrow types Spark itself casts to in createDataFrame (timestamps in UTC).
    pq.write_table(rows.cast(to_arrow_schema(schema, timezone="UTC")), file, compression="none",
                   row_group_size=131_072)  # row groups: the splits the tasks read side by side
    try:
        yield spark.read.schema(schema).parquet(str(file))
    finally:
        with contextlib.suppress(OSError):
            file.unlink()


def _today() -> date:
    return datetime.now(timezone.utc).date()


def _risk_silver_days(first_day: date, last_day: date) -> tuple[date, date]:
    """The silver days the daily risk of [first_day, last_day] reads: its trailing baselines reach
    back 30 days (:func:`risk_rows`), one more for the session time zone."""
    return first_day - timedelta(days=31), last_day


# ---- I/O helpers ------------------------------------------------------------------------------------

def ensure_gold_tables(spark: SparkSession, settings: Settings, schemas: dict[str, StructType]) -> None:
    """Create the gold tables that are missing, and give an existing one the properties its spec
    declares (``GOLD_TABLES[..]["properties"]``) when it was created before them."""
    for name, schema in schemas.items():
        spec, path = GOLD_TABLES[name], settings.table_path(name)
        own = spec.get("properties", {})
        created = delta.ensure_table(spark, path, schema, partition_by=(spec["partition"],), properties=_CDF | own)
        if own and not created:  # (a table created just now has them)
            mio.ensure_properties(spark, path, own)


def _labels(spark: SparkSession, settings: Settings) -> DataFrame:
    path = settings.table_path("silver_labels")
    return delta.read(spark, path) if delta.is_delta_table(path) else spark.createDataFrame([], _EMPTY_LABELS)


def too_late_ids(spark: SparkSession, settings: Settings) -> DataFrame:
    path = settings.table_path("gold_too_late_events")
    if not delta.is_delta_table(path):
        return spark.createDataFrame([], "event_id string")
    return delta.read(spark, path).select("event_id")


def _schemas_of(spark: SparkSession, settings: Settings) -> dict[str, StructType]:
    """Gold schemas: those of the tables when every one exists (a restart), else derived from the
    transforms on empty inputs, so they cannot drift. Deriving analyses the whole gold plan, 5-10 s
    on 2 cores; a table's schema is in the snapshot its first MERGE loads anyway."""
    if all(delta.table_version(settings.table_path(name)) is not None for name in GOLD_TABLES):
        return {name: delta.read(spark, settings.table_path(name)).schema for name in GOLD_TABLES}
    return _derived_schemas(spark, settings)


#: Gold schemas derived in this process, by the JSON of the silver schema they were derived from.
_DERIVED_SCHEMAS: dict[str, dict[str, StructType]] = {}


def _derived_schemas(spark: SparkSession, settings: Settings) -> dict[str, StructType]:
    """Gold schemas, derived from the transforms on empty inputs. :func:`gold_frames` is pure and its
    other inputs are constants, so the derivation is done once per process and silver schema."""
    silver = delta.read(spark, settings.table_path("silver_transactions")).limit(0)
    key = silver.schema.json()
    if key not in _DERIVED_SCHEMAS:
        frames = gold_frames(silver, spark.createDataFrame([], _EMPTY_LABELS),
                             spark.createDataFrame([], "event_id string"), date(2000, 1, 1), date(2000, 1, 1))
        _DERIVED_SCHEMAS[key] = ({name: df.schema for name, df in frames.items()}
                                 | {"gold_too_late_events": TOO_LATE_SCHEMA})
    return dict(_DERIVED_SCHEMAS[key])


# ---- batch backfill ---------------------------------------------------------------------------------

def backfill(spark: SparkSession, settings: Settings, date_from: date, date_to: date) -> dict[str, int]:
    """Recompute and replace the gold rows of [date_from, date_to]; returns rows written per table.

    Only rows dated in the range are written: rows dated after it that look back into it (trailing
    windows, risk baselines) and the five-minute windows dated the day before ``date_from`` that hold
    its first minutes' events keep their values. Carrying a change of silver forward takes a range
    from the day before the first changed day through the last day."""
    if date_to < date_from:
        raise ValueError(f"--to {date_to} is before --from {date_from}")
    silver_path = settings.table_path("silver_transactions")
    if not delta.is_delta_table(silver_path):
        raise FileNotFoundError(f"no silver table at {silver_path}: run `lakehouse stream --once` first")
    damage.check_tables(settings, ("silver_transactions", "silver_labels", "gold_too_late_events"))
    ensure_gold_tables(spark, settings, _schemas_of(spark, settings))
    silver = delta.read(spark, silver_path)
    late = too_late_ids(spark, settings).persist()
    written = {}
    try:
        for name, df in gold_frames(silver, _labels(spark, settings), late, date_from, date_to,
                                    driver_max_rows=driver_rows_limit(spark, settings)).items():
            spec = GOLD_TABLES[name]
            df = df.persist()
            written[name] = df.count()
            (df.write.format("delta").mode("overwrite")
             .option("replaceWhere", f"{spec['partition']} >= '{date_from}' AND {spec['partition']} <= '{date_to}'")
             .save(str(settings.table_path(name))))
            df.unpersist()
    finally:
        late.unpersist()
    return written


# ---- the stream's incremental gold ------------------------------------------------------------------

class GoldStream:
    """Updates gold after each micro-batch of the events and labels streams (module docstring).

    The two streams run in one driver and both rewrite gold rows, so their gold steps take turns
    (one lock): each step reads the latest silver, labels and gold, and writes before the other reads.

    Args:
        on_features: called with the feature rows of the transactions new in an events batch (for
            scoring), and the batch's app id and id.
        publish: called as ``publish(table, rows, spark_schema, version_before)`` with the rows an
            events batch computed in the driver is about to write to a gold table, before its MERGE
            (:class:`lakehouse.mirror.Publisher`: Postgres serves them ahead of the mirror).
    """

    _lock = threading.Lock()

    def __init__(self, settings: Settings,
                 on_features: Callable[[DataFrame, str, int], None] | None = None,
                 publish: Callable[[str, pa.Table, StructType, int | None], None] | None = None):
        self.settings = settings
        self.on_features = on_features
        self.publish = publish
        self._ready = False
        self._schemas: dict[str, StructType] = {}
        # Whether an events batch's gold is computed in the driver (:meth:`_events_in_driver`); off
        # for the rest of the run once the look-back outgrows settings.features_driver_max_rows.
        self._in_driver = settings.features_driver_max_rows > 0
        self._max_rows: int | None = None  # the bound on the driver's heap (:meth:`_driver_max_rows`)
        self._mark: tuple[str, int, int] | None = None  # (app id, batch id, watermark µs after it)
        self._written: dict[str, int] = {}  # the events batch's files' modification times (ms) as listed
        self._kept: _Kept | None = None  # the last events batch's look-back (:meth:`_kept_lookback`)
        self._maturity_checked: date | None = None  # the UTC day stale matured flags were last fixed
        self._risk_from = self._owed_risk()  # the earliest day whose daily risk is owed, if any
        # time.monotonic() of the last risk refresh. The interval starts with the stream: its first batch
        # owes its days like any other, so a (re)started stream's first features are not held up
        # by the daily risk, which follows within the interval, or as soon as the stream idles or stops.
        self._risk_at = time.monotonic()

    def _path(self, name: str) -> str:
        return str(self.settings.table_path(name))

    def forget(self) -> None:
        """Drop what this object keeps of the tables between batches (the look-back, the watermark),
        so the next batch reads them again, as a restarted stream's first does: before a batch runs
        again after one of its writes lost a commit race."""
        with self._lock:
            self._kept, self._mark = None, None

    def _driver_max_rows(self, spark: SparkSession) -> int:
        """The most look-back rows the driver route collects (:func:`lakehouse.spark.driver_rows_limit`)."""
        if self._max_rows is None:
            self._max_rows = driver_rows_limit(spark, self.settings)
        return self._max_rows

    def _ensure(self, spark: SparkSession) -> None:
        if not self._ready:
            self._schemas = _schemas_of(spark, self.settings)
            ensure_gold_tables(spark, self.settings, self._schemas)
            self._ready = True

    def watermark(self, spark: SparkSession, app_id: str, batch_id: int) -> datetime | None:
        """Latest event time (UTC) inserted by the events batches before ``batch_id`` of this query."""
        dq = delta.read(spark, self._path("silver_dq_batches"))
        if "max_event_time" not in dq.columns:
            return None
        # Read as µs: a collected timestamp is a naive local time, ambiguous in a DST fold.
        us = (dq.where((F.col("kind") == "events") & (F.col("app_id") == app_id) & (F.col("batch_id") < batch_id))
              .agg(F.max(F.unix_micros("max_event_time"))).first()[0])
        return None if us is None else instant(us)

    # -- events ------------------------------------------------------------------------------------
    def after_events(self, spark: SparkSession, app_id: str, batch_id: int, dates: list[str],
                     files: list[str] | None = None, written: dict[str, int] | None = None) -> dict:
        """Gold for the transactions batch ``batch_id`` inserted into silver (partitions ``dates``):
        in the driver (:meth:`_events_in_driver`) while its look-back fits there, else in Spark.
        ``files``: the batch's inbox files (local paths) in the order they arrived, for the watermark
        inside the batch (:func:`file_marks`); None or one file: the batch's watermark for all.
        ``written``: their modification times (ms) as listed (files landed at the same time do not
        judge each other).

        Returns ``max_event_time`` (of the new transactions), ``too_late``, ``recomputed``.
        """
        laps = Laps()
        with self._lock:
            laps("wait")
            self._ensure(spark)
            silver = delta.read(spark, self._path("silver_transactions"))
            files = list(files or [])
            self._written = dict(written or {})
            done = (self._events_in_driver(spark, silver, app_id, batch_id, dates, files, laps)
                    if self._in_driver else None)
            if done is None:
                done = self._events_in_spark(spark, silver, app_id, batch_id, dates, files, laps)
            new_ids, result = done
            if result["max_event_time"] is not None:  # the next batch's watermark, without a read
                latest, before = micros_of(result["max_event_time"]), self._mark_for(app_id, batch_id)
                self._mark = (app_id, batch_id, latest if before is None else max(before, latest))
            if new_ids:
                self._scored(spark, new_ids, dates, app_id, batch_id, laps)
            return result | {"seconds": laps.seconds}

    def express_view(self) -> tuple[_Kept, int | None, StructType] | None:
        """What the express lane (:mod:`lakehouse.express`) computes provisional features from: the
        look-back kept after the last events batch, the watermark after it (µs; None before any
        event) and the schema of gold_transaction_features; None while there is no kept look-back
        (before the first events batch, after a stale one was dropped, in the Spark route)."""
        kept, mark = self._kept, self._mark
        if kept is None or not self._in_driver or "gold_transaction_features" not in self._schemas:
            return None
        return kept, (mark[2] if mark is not None else None), self._schemas["gold_transaction_features"]

    def express_snapshot(self, spark: SparkSession) -> tuple[_Kept, int | None, StructType] | None:
        """:meth:`express_view` before this stream's first events batch has kept a look-back: silver
        from 30 days before the day before the watermark (the latest event time the events batches
        inserted; today, UTC, before any) on, collected as a batch of that day collects it, and that
        watermark. Read only (the gold tables may not exist yet); None when silver does not exist yet
        or the look-back is too large for the driver."""
        limit = self._driver_max_rows(spark)
        if not self._in_driver or not delta.is_delta_table(self._path("silver_transactions")):
            return None
        schemas = self._schemas or _schemas_of(spark, self.settings)
        if all(not delta.is_delta_table(p) or delta.never_written(p)
               for p in map(self._path, ("silver_transactions", "silver_labels", "silver_dq_batches"))):
            # Nothing ingested yet (a new deployment): the look-back is empty, made without a Spark job.
            # In a JVM that has run none, the jobs over the empty tables took 10-15 s on 2 cores, and
            # every event landing meanwhile waited for them.
            earliest = datetime.combine(_today(), datetime.min.time(), timezone.utc)
            table = features.lookback_of_inserted(features.INSERTED_ARROW_SCHEMA.empty_table(), earliest, _NO_REPORTS)
            return _Kept(table, features.lookback_start(earliest), None, _NO_REPORTS, None), None, \
                schemas["gold_transaction_features"]
        mark = None
        if delta.is_delta_table(self._path("silver_dq_batches")):
            dq = delta.read(spark, self._path("silver_dq_batches"))
            if "max_event_time" in dq.columns:
                mark = dq.where(F.col("kind") == "events").agg(F.max(F.unix_micros("max_event_time"))).first()[0]
        day = _today() if mark is None else instant(mark).date() - timedelta(days=1)
        earliest = datetime.combine(day, datetime.min.time(), timezone.utc)
        labels = self._fraud_only_labels(spark)
        table = features.lookback_rows(delta.read(spark, self._path("silver_transactions")), earliest, labels,
                                       too_late_ids(spark, self.settings)).limit(limit + 1).toArrow()
        if table.num_rows > limit:
            return None
        kept = _Kept(table, features.lookback_start(earliest), None, features.fraud_reports(labels).toArrow(), None)
        return kept, mark, schemas["gold_transaction_features"]

    def _mark_for(self, app_id: str, batch_id: int) -> int | None:
        """The watermark (µs) before ``batch_id`` as kept by this object, if it knows it: it saw the
        query's earlier batches (a batch that inserted nothing does not move the watermark)."""
        if self._mark is not None and self._mark[0] == app_id and self._mark[1] < batch_id:
            return self._mark[2]
        return None

    def _watermark_us(self, spark, app_id: str, batch_id: int) -> int | None:
        """The watermark (µs) before ``batch_id``: kept from the batches before, else read (:meth:`watermark`)."""
        kept = self._mark_for(app_id, batch_id)
        if kept is not None:
            return kept
        mark = self.watermark(spark, app_id, batch_id)
        if mark is None:
            return None
        self._mark = (app_id, batch_id - 1, micros_of(mark))  # the watermark after the batches before
        return self._mark[2]

    def _events_in_spark(self, spark, silver: DataFrame, app_id: str, batch_id: int, dates: list[str],
                         files: list[str], laps: Laps):
        """:meth:`after_events` in Spark (a look-back too large for the driver). Returns the new
        transactions' ids and the result."""
        with_files = inserted_by(silver, batch_id, dates).select(*features.ID_COLUMNS, "source_file").persist()
        new = with_files.select(*features.ID_COLUMNS)
        try:
            n, lo_us, hi_us = features.span(new)
            if not n:
                return [], {"max_event_time": None, "too_late": 0, "recomputed": 0}
            mark = self._watermark_us(spark, app_id, batch_id)
            judged = new
            copies = self._copy_marks(spark, silver, batch_id, files, lo_us)
            tied = self._tied_marks(silver, batch_id, files, lo_us)
            if len(files) > 1 or copies or tied:  # each file by its own watermark (file_marks, ...)
                latest = {r[0]: r[1] for r in with_files.groupBy("source_file")
                          .agg(F.max(F.unix_micros("event_time"))).collect()}
                by_path = file_marks(mark, files, {local_path(f): t for f, t in latest.items()},
                                     self._written) | tied | copies
                marks = {f: m for f in latest if (m := by_path.get(local_path(f), mark)) is not None}
                mark = max(marks.values()) if marks else None
                if marks:
                    known = spark.createDataFrame(list(marks.items()), "source_file string, _mark long")
                    judged = with_files.join(F.broadcast(known), "source_file", "left")
            n_late = (self._record_too_late(spark, judged, instant(lo_us), mark, app_id, batch_id)
                      if mark is not None else 0)
            laps("too_late")
            late_ids = too_late_ids(spark, self.settings)
            on_time = new.join(late_ids, "event_id", "left_anti")
            late_new = new.join(late_ids, "event_id", "left_semi")
            gold_tx = delta.read(spark, self._path("gold_transaction_features"))
            changes = lambda df: df.select("user_id", "merchant_id", "country",  # noqa: E731
                                           F.col("event_time").alias("_lo"), F.col("event_time").alias("_hi"))
            keys, since = ("user_id", "merchant_id", "country"), instant(lo_us).date()
            affected = [affected_rows(gold_tx, changes(on_time), keys, since)]
            if n_late:  # too-late events change only too-late rows
                affected.append(affected_rows(gold_tx.join(late_ids, "event_id", "left_semi"),
                                              changes(late_new), keys, since))
            targets = new
            for df in affected:
                targets = targets.unionByName(df)
            recomputed = self._recompute(spark, targets.dropDuplicates(["event_id"]), late_ids, app_id,
                                         batch_id, extra_days=(), laps=laps)
            self._windows(spark, silver, on_time, late_ids, app_id, batch_id)
            laps("windows")
            ids = [r[0] for r in new.select("event_id").collect()]
            return ids, {"max_event_time": instant(hi_us), "too_late": n_late, "recomputed": recomputed}
        finally:
            with_files.unpersist()

    def _scored(self, spark, new_ids: list[str], dates: list[str], app_id: str, batch_id: int, laps: Laps) -> None:
        """Hand the new transactions' feature rows to ``on_features`` (scoring), if set."""
        if self.on_features is not None:
            # A fresh, shallow plan (a Delta scan and a local list of ids): the scorer's
            # pandas UDF and checkpoint must not drag the batch's cached lineage along.
            ids = spark.createDataFrame([(i,) for i in new_ids], "event_id string")
            new_features = (delta.read(spark, self._path("gold_transaction_features"))
                            .where(F.col("event_date").isin(dates))
                            .join(F.broadcast(ids), "event_id", "left_semi"))
            self.on_features(new_features, app_id, batch_id)
            laps("score")

    # -- an events batch in the driver ---------------------------------------------------------------
    def _events_in_driver(self, spark, silver: DataFrame, app_id: str, batch_id: int, dates: list[str],
                          files: list[str], laps: Laps):
        """:meth:`after_events` in the driver: the look-back of the batch's earliest day is collected
        once (:func:`features.lookback_rows`); the batch's new transactions are found in it, the
        too-late ones recorded, and :func:`driver_batch` computes the same rows as the Spark route,
        written by the same MERGEs. Returns the new transactions' ids and the result, or None
        when the look-back holds more than :meth:`_driver_max_rows` rows (nothing is
        written then, and later batches go to Spark directly)."""
        first_day = date.fromisoformat(min(dates))  # no new transaction is earlier
        earliest = datetime.combine(first_day, datetime.min.time(), timezone.utc)
        lookback_from = features.lookback_start(earliest)
        limit = self._driver_max_rows(spark)
        silver_version = delta.table_version(self._path("silver_transactions"))
        labels_version = delta.table_version(self._path("silver_labels"))  # before the labels are read
        table = self._kept_lookback(spark, silver, earliest, silver_version, labels_version, app_id, batch_id,
                                    dates)
        # Collected, and a batch that inserts rows pays the daily risk now if it is due: then one scan
        # of silver and of the labels into memory serves the look-back and the risk (its baselines
        # reach back 31 days from the earliest touched day; the look-back reads from 32 days before
        # first_day).
        shared = table is None and self._risk_due()
        since = first_day - timedelta(days=33)
        source, labels = silver, self._fraud_only_labels(spark)
        if shared:
            source = (silver.where(F.col("event_date") >= F.lit(since)).select(*features.ID_COLUMNS, "batch_id")
                      .persist(StorageLevel.MEMORY_AND_DISK))
            labels = labels.persist(StorageLevel.MEMORY_AND_DISK)
        try:
            reports = self._kept.reports if self._kept is not None else None
            if table is None:
                table = features.lookback_rows(source, earliest, labels, too_late_ids(spark, self.settings)
                                               ).limit(limit + 1).toArrow()
                reports = features.fraud_reports(labels).toArrow()
            if table.num_rows > limit:
                log.info("gold: the look-back holds more than %d rows (LAKEHOUSE_FEATURES_DRIVER_MAX_ROWS); "
                         "events batches are computed in Spark from now on", limit)
                self._in_driver, self._kept = False, None
                return None
            laps("lookback")
            new = new_rows(table, batch_id, dates)
            if not len(new):
                self._kept = _Kept(table, lookback_from, silver_version, reports, labels_version)
                return [], {"max_event_time": None, "too_late": 0, "recomputed": 0}
            t = table["_t"].to_numpy()
            lo_us, hi_us = int(t[new].min()), int(t[new].max())
            mark = self._watermark_us(spark, app_id, batch_id)
            marks = self._row_marks(spark, silver, silver_version, table, new, mark, files, app_id, batch_id, dates)
            has = marks != NO_MARK
            late_at = np.flatnonzero(has & (t[new] < np.where(has, marks, 0)
                                            - self.settings.allowed_lateness_minutes * 60_000_000))
            late = new[late_at]
            if len(late):
                flags = table["_late"].to_numpy(zero_copy_only=False).copy()
                flags[late] = True
                table = table.set_column(table.schema.get_field_index("_late"), "_late", pa.array(flags))
            batch = driver_batch(table, new)
            laps("affected")
            if self.publish is not None:
                self._publish_ahead({"gold_transaction_features": batch.features,
                                     "gold_user_features_5m": batch.windows}, app_id, batch_id)
            n_late = 0
            if len(late):  # recorded after the rows are published: the features need only the flags
                rows = table.take(late).select(list(features.ID_COLUMNS)).append_column(
                    "_mark", pa.array(marks[late_at], pa.int64()))
                schema = StructType([*silver.select(*features.ID_COLUMNS).schema.fields,
                                     StructField("_mark", LongType(), True)])
                n_late = self._record_too_late(spark, spark.createDataFrame(rows, schema=schema), instant(lo_us),
                                               int(marks[late_at].max()), app_id, batch_id, known=len(late))
            laps("too_late")
            # The two tables at once: each write is idempotent on its own, and neither reads the other.
            # Measured (2 cores): a few hundred rows on an idle machine, 1.0-1.3 s against 1.4-1.5 s one
            # after the other; no gain when the cores are busy anyway (20k transactions a batch beside the
            # express lane and the mirror, 12.1 s against 12.5 s; 1M transactions and 4.77M windows,
            # 27.3 s against 27.7 s).
            delta.in_parallel(spark, *(
                lambda session, name=name, rows=rows, is_new=is_new: self._write(session, name, rows, is_new,
                                                                                 app_id, batch_id)
                for name, rows, is_new in (("gold_transaction_features", batch.features, batch.features_new),
                                           ("gold_user_features_5m", batch.windows, batch.windows_new))
                if rows.num_rows))
            laps("writes")
            risk = self._risk_plan(spark, [instant(lo_us).date()])
            if risk:
                lo_day, hi_day = _risk_silver_days(risk[0], risk[1])
                if shared and lo_day >= since:
                    self._risk(spark, source.where(_between("event_date", lo_day, hi_day)).select(*features.ID_COLUMNS),
                               labels, *risk, app_id, batch_id)
                else:
                    self._risk_from_silver(spark, *risk, app_id, batch_id)
                laps("risk")
            ids = table["event_id"].take(new).to_pylist()
            self._kept = _Kept(table, lookback_from, silver_version, reports, labels_version)
            return ids, {"max_event_time": instant(hi_us), "too_late": n_late, "recomputed": batch.features.num_rows}
        finally:
            if shared:
                source.unpersist()
                labels.unpersist()

    def _row_marks(self, spark, silver: DataFrame, version: int | None, table: pa.Table, new: np.ndarray,
                   mark: int | None, files: list[str], app_id: str, batch_id: int, dates: list[str]) -> np.ndarray:
        """The watermark (µs) each new row (``new``: indices into the look-back ``table``) is judged by:
        ``mark`` for all of a batch of one file, else its file's (:func:`file_marks`), a copy's its own
        (:meth:`_copy_marks`); NO_MARK: none."""
        batch_mark = NO_MARK if mark is None else mark
        if not len(new):
            return np.full(0, batch_mark, dtype=np.int64)
        lo_us = int(table["_t"].to_numpy()[new].min())
        copies = self._copy_marks(spark, silver, batch_id, files, lo_us)
        tied = self._tied_marks(silver, batch_id, files, lo_us)
        if len(files) < 2 and not tied:
            if files and files[0] in copies:  # a batch of one copy
                batch_mark = NO_MARK if copies[files[0]] is None else copies[files[0]]
            return np.full(len(new), batch_mark, dtype=np.int64)
        sources = self._sources_of_new(spark, silver, version, app_id, batch_id, dates)
        at = pc.index_in(table["event_id"].take(pa.array(new)), value_set=sources["event_id"])
        uris = pc.take(sources["source_file"], at)
        distinct = [u for u in pc.unique(uris).to_pylist() if u is not None]
        which = pc.index_in(uris, value_set=pa.array(distinct, pa.string())).fill_null(-1).to_numpy()
        t, known = table["_t"].to_numpy()[new], which >= 0
        most = np.full(len(distinct), NO_MARK, dtype=np.int64)
        np.maximum.at(most, which[known], t[known])
        latest = {local_path(u): int(most[k]) for k, u in enumerate(distinct)}
        by_path = file_marks(mark, files, latest, self._written) | tied | copies
        per_file = np.array([NO_MARK if (m := by_path.get(local_path(u), mark)) is None else m for u in distinct]
                            + [batch_mark], dtype=np.int64)
        return per_file[which]  # -1 (a row whose file is unknown): the last, the batch's watermark

    def _tied_marks(self, silver: DataFrame, batch_id: int, files: list[str], lo_us: int) -> dict[str, int | None]:
        """The watermark (µs; None: none) of the events batch's first files when they have the
        modification time of the last files of the batch before (files landed at the same time,
        which ``maxFilesPerTrigger`` or a restart split between two batches): the latest event time
        inserted by earlier batches from files other than those, as :func:`file_marks` judges files
        tied inside one batch. Empty otherwise (the usual case: a look at the file source's log of
        the batch before, no Spark job). Silver is read from the day before ``lo_us`` on, as in
        :meth:`_copy_marks`."""
        at = self._written.get(files[0]) if files else None
        if at is None or at < 0:
            return {}
        checkpoint, tied, q = self.settings.checkpoint("events"), set(), batch_id - 1
        while q >= 0 and (entries := source_entries(checkpoint, q)):
            run = list(itertools.takewhile(lambda e: e[1] == at, reversed(entries)))
            tied |= {path for path, _ in run}
            if len(run) < len(entries):
                break
            q -= 1
        if not tied:
            return {}
        day = instant(lo_us).date() - timedelta(days=1)
        latest = silver.where((F.col("event_date") >= F.lit(day)) & (F.col("batch_id") < batch_id)) \
            .groupBy("source_file").agg(F.max(F.unix_micros("event_time"))).collect()
        mark = max((r[1] for r in latest if r[0] and local_path(r[0]) not in tied), default=None)
        return {f: mark for f in itertools.takewhile(lambda f: self._written.get(f) == at, files)}

    def _copy_marks(self, spark, silver: DataFrame, batch_id: int, files: list[str], lo_us: int
                    ) -> dict[str, int | None]:
        """The watermark (µs; None: none) of each copy among the events batch's ``files`` (local paths,
        in the order taken): the copies the inbox watch made of files written to after they were read
        (``<stem>.changed-<mtime_ms><suffix>``, :func:`paths.copy_origin`). Lines of one inbox file never
        judge each other, in however many reads and copies they come, and a copy's lines arrived when
        they were written, not when the watch noticed them. So a copy is judged by the latest event time
        inserted from the files taken before it whose modification time is before the copy's (a file
        listed with the same time landed with its lines: they do not judge each other, as in
        :func:`file_marks`), other than the file it copies and that file's other copies: as the file
        would have been, had it been read once, whole, with its lines. Without this the lines a writer finished after a read were
        judged by the file's own first lines, and by the files that landed before the watch copied them.

        The files taken after a copy's lines were written are found in the file source's log, back to
        the batch that took the file it copies (the files taken before that were listed, so written,
        before those lines), or as far back as the log still holds its batches' own entries (Spark
        folds older ones into its compacted entries and deletes them): a file taken before that and
        written after the copy's lines still counts, as it did before copies had their own mark.
        Silver is read from the day before ``lo_us`` (the batch's earliest new event time) on: rows
        before that cannot make any of the batch's rows too late. Empty when the batch holds no copy;
        costs one Spark job when it does."""
        copies = {f: origin for f in files if (origin := copy_origin(f)) is not None}
        if not copies:
            return {}
        checkpoint = self.settings.checkpoint("events")
        written = self._written or dict(source_entries(checkpoint, batch_id) or [])  # as listed
        family = lambda path, original: path == original or (copy_origin(path) or ("",))[0] == original  # noqa: E731
        unseen: dict[str, set[str]] = {}  # per copy: the files whose rows it must not see
        for at, copy in enumerate(files):
            if copy not in copies:
                continue
            original, ms = copies[copy]
            out = set(files[at:]) | {f for f in files[:at] if written.get(f, -1) >= ms}
            q = -1 if any(family(f, original) for f in files[:at]) else batch_id - 1
            while q >= 0 and (entries := source_entries(checkpoint, q)) is not None:
                out |= {path for path, listed in entries if listed >= ms}
                if any(family(path, original) for path, _ in entries):
                    break
                q -= 1
            unseen[copy] = out
        day = instant(lo_us).date() - timedelta(days=1)
        latest = [(local_path(r[0]), r[1]) for r in
                  silver.where((F.col("event_date") >= F.lit(day)) & (F.col("batch_id") <= batch_id))
                  .groupBy("source_file").agg(F.max(F.unix_micros("event_time"))).collect() if r[0]]
        return {copy: max((t for path, t in latest
                           if path not in unseen[copy] and not family(path, copies[copy][0])), default=None)
                for copy in copies}

    def _sources_of_new(self, spark, silver: DataFrame, version: int | None, app_id: str, batch_id: int,
                        dates: list[str]) -> pa.Table:
        """``event_id`` and ``source_file`` of the transactions events batch ``batch_id`` inserted:
        read by pyarrow from the files of its insert, when that is silver's ``version``; else by Spark."""
        path = self._path("silver_transactions")
        info = delta.commit_info(path, version) if version is not None else None
        if info is not None and info.get("userMetadata") == delta.commit_tag(app_id, batch_id):
            rows = delta.inserted_rows(path, version, ("event_id", "source_file", "batch_id"))
            if rows is not None and rows.num_rows:
                rows = rows.filter(pc.equal(rows["batch_id"], batch_id))
                return pa.table({"event_id": rows["event_id"].cast(pa.string()),
                                 "source_file": rows["source_file"].cast(pa.string())})
        rows = inserted_by(silver, batch_id, dates).select("event_id", "source_file").toArrow()
        return pa.table({"event_id": rows["event_id"].cast(pa.string()),
                         "source_file": rows["source_file"].cast(pa.string())})

    def _kept_lookback(self, spark, silver: DataFrame, earliest: datetime, silver_version: int | None,
                       labels_version: int | None, app_id: str, batch_id: int, dates: list[str]) -> pa.Table | None:
        """The look-back of an events batch (:func:`features.lookback_rows` from ``earliest``) from the
        one kept after the previous batch, when that is still silver as it was then plus this batch's
        rows: the only silver commit since is this batch's own insert, and the look-back starts no
        earlier. Then only the new rows are collected, and the kept rows that fell out of the look-back
        dropped. Fraud reports the labels stream brought in the meantime were patched in
        (:meth:`_patch_reports`); too-late flags were set by the batch that found them. Else None, and
        None too when silver_labels is no longer at the kept version (``labels_version``, read by the
        caller once, before any labels are read): labels this object did not patch in.

        The new rows are read by pyarrow from the files the insert's commit lists, their fraud reports
        taken from the kept ones (:func:`features.lookback_of_inserted`): no Spark job. Should that
        commit be more than a plain insert, or the batch have recorded too-late events already (a
        replay), they are collected by Spark."""
        kept, lo = self._kept, features.lookback_start(earliest)
        if (kept is None or silver_version is None or silver_version != kept.version + 1 or lo < kept.lo_us
                or labels_version != kept.labels):
            return None
        path = self._path("silver_transactions")
        info = delta.commit_info(path, silver_version)
        if info is None or info.get("userMetadata") != delta.commit_tag(app_id, batch_id):
            return None
        added = None
        if kept.reports is not None and delta.commit_metrics(self._path("gold_too_late_events"), app_id,
                                                             batch_id) is None:
            inserted = delta.inserted_rows(path, silver_version, (*features.ID_COLUMNS, "batch_id"))
            if inserted is not None and not inserted.num_rows:
                added = kept.table.schema.empty_table()
            elif inserted is not None:
                inserted = inserted.filter(pc.equal(inserted["batch_id"], batch_id))
                added = features.lookback_of_inserted(inserted, earliest, kept.reports)
        if added is None:
            added = features.lookback_rows(inserted_by(silver, batch_id, dates),
                                           earliest, self._fraud_only_labels(spark), too_late_ids(spark, self.settings)
                                           ).toArrow()
        if pc.any(pc.is_in(kept.table["event_id"], value_set=added["event_id"])).as_py():
            return None  # rows of this batch id already kept (not a plain insert): collect afresh
        rows = kept.table.filter(pc.greater(kept.table["_t"], lo))
        return pa.concat_tables([rows, added.select(rows.column_names).cast(rows.schema)])

    def _patch_reports(self, reports: pa.Table, app_id: str, batch_id: int) -> None:
        """Bring the kept look-back's earliest fraud report ``_r`` up to date with a labels batch's
        fraud labels (``event_id``, ``_r`` in µs): labels are only ever added, so the earliest report
        of an event is the smaller of the kept one and the new ones. The reports kept for events not
        in silver yet are brought up to date the same way."""
        if self._kept is None:
            return
        # The labels batch's own commit (``app_id``, ``batch_id``) must be the only one since the
        # look-back was kept (or have been read with it): else another process wrote labels this
        # object never saw, and the look-back goes (the next events batch collects it afresh).
        path = self._path("silver_labels")
        now, before = delta.table_version(path), self._kept.labels
        own = now is not None and (delta.commit_info(path, now) or {}).get("userMetadata") == delta.commit_tag(
            app_id, batch_id)
        if now is None or before is None or not (now == before or (now == before + 1 and own)):
            self._kept = None
            return
        table, known = self._kept.table, self._kept.reports
        if not reports.num_rows:
            self._kept = _Kept(table, self._kept.lo_us, self._kept.version, known, now)
            return
        earliest = reports.group_by("event_id").aggregate([("_r", "min")])
        at = pc.index_in(table["event_id"], value_set=earliest["event_id"])
        r = pc.min_element_wise(table["_r"], pc.take(earliest["_r_min"], at), skip_nulls=True)
        table = table.set_column(table.schema.get_field_index("_r"), "_r", r.cast(table.schema.field("_r").type))
        if known is not None:
            both = pa.concat_tables([known, pa.table({"event_id": earliest["event_id"], "_r": earliest["_r_min"]}
                                                     ).cast(known.schema)])
            merged = both.group_by("event_id").aggregate([("_r", "min")])
            known = pa.table({"event_id": merged["event_id"], "_r": merged["_r_min"]}).cast(known.schema)
        self._kept = _Kept(table, self._kept.lo_us, self._kept.version, known, now)

    def _publish_ahead(self, tables: dict[str, pa.Table], app_id: str, batch_id: int) -> None:
        """Hand the rows about to be written to ``publish``, with each table's version before them;
        not those of a replayed batch whose writes committed before the crash (:meth:`_write` skips
        them, so the rows in Delta are the first run's: the mirror serves those)."""
        for name, rows in tables.items():
            path = self._path(name)
            if not rows.num_rows or any(delta.commit_metrics(path, txn, batch_id) is not None
                                        for txn in (app_id, f"{app_id}+new")):
                continue
            self.publish(name, rows, self._schemas[name], delta.table_version(path))

    def _write(self, spark, name: str, rows: pa.Table, new: np.ndarray, app_id: str, batch_id: int) -> None:
        """Write a driver batch's ``rows`` of the gold table ``name``, exactly once per batch.

        One upsert MERGE, unless the ``new`` rows (no earlier batch can have written them) are worth
        an insert-only MERGE of their own (:func:`_split_write`), which reads only the target's keys
        and rewrites no file; the other rows are upserted then. Should a row taken for new be there
        after all (say a backfill wrote it first), the insert leaves it be and every row is
        upserted. The two MERGEs carry their own transaction ids (Delta skips a second write with
        the same one)."""
        spec = GOLD_TABLES[name]
        path, keys, part = self._path(name), spec["key"], spec["partition"]

        def merge(merge_fn, part_rows: pa.Table, txn_app: str) -> None:
            days = sorted(pc.unique(pc.cast(part_rows[part], pa.string())).to_pylist())
            # The key fixes the span column (a transaction's time, a window's start): a row can match
            # only inside the rows' own span, so Delta skips the day's files outside it.
            span = pc.min_max(part_rows[spec["span"]].cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())).as_py()
            with staged(spark, part_rows, self._schemas[name], self.settings.staging_dir) as df, \
                    delta.idempotent_dml(spark, txn_app, batch_id):
                merge_fn(spark, df, path, keys, {part: days},
                         {spec["span"]: (instant(span["min"]), instant(span["max"]))})

        n_new = int(new.sum())
        known = rows
        if _split_write(n_new, rows.num_rows - n_new):
            merge(delta.merge_insert_new, rows.filter(pa.array(new)), f"{app_id}+new")
            inserted = delta.rows_committed(path, f"{app_id}+new", batch_id, "numTargetRowsInserted")
            if inserted is not None and inserted == n_new:
                known = rows.filter(pa.array(~new))
        if known.num_rows:
            merge(delta.merge_upsert, known, app_id)

    def _record_too_late(self, spark, new: DataFrame, earliest: datetime, mark: int, app_id: str,
                         batch_id: int, known: int | None = None) -> int:
        """Record the events of ``new`` (earliest event time ``earliest``) too late for their watermark:
        the column ``_mark`` (µs; null: none) where ``new`` has one (a batch of several files:
        :func:`file_marks`), else ``mark`` (µs), which is also the latest watermark of any row.
        ``known``: how many they are, when the caller found them already (the driver route): then
        they are appended without being counted first."""
        lateness = self.settings.allowed_lateness_minutes
        if micros_of(earliest) >= mark - lateness * 60_000_000:  # nothing can be too late: no scan
            return 0
        m = F.col("_mark") if "_mark" in new.columns else F.lit(mark)
        late = new.where(F.unix_micros("event_time") < m - F.lit(lateness * 60_000_000))
        seconds = (m - F.unix_micros("event_time")) / 1e6
        watermark = F.timestamp_micros(m)
        rows = late.select(
            "event_id", "user_id", "merchant_id", "country", "amount_base", "event_time", "event_date",
            watermark.alias("watermark"), seconds.cast("double").alias("lateness_seconds"),
            F.format_string(f"event_time is %.0f s before the watermark %s (the latest event time of the "
                            f"transactions that arrived before it); the allowed lateness is {lateness} min", seconds,
                            F.date_format(watermark, "yyyy-MM-dd HH:mm:ss")).alias("reason"),
            F.lit(batch_id).cast("long").alias("batch_id"), F.current_timestamp().alias("detected_at"),
        )
        if known is not None:
            if known:
                delta.append_once(rows, self._path("gold_too_late_events"), app_id, batch_id)
            return known
        rows = rows.persist()
        try:
            n = rows.count()
            if n:
                delta.append_once(rows, self._path("gold_too_late_events"), app_id, batch_id)
            return n
        finally:
            rows.unpersist()

    # -- labels ------------------------------------------------------------------------------------
    def after_labels(self, spark: SparkSession, app_id: str, batch_id: int) -> dict:
        """Gold after the labels batch ``batch_id``: the merchant and country fraud rates of the
        transactions its fraud labels reach, and the daily risk of the labelled days."""
        laps = Laps()
        with self._lock:
            laps("wait")
            self._ensure(spark)
            labels = delta.read(spark, self._path("silver_labels"))
            silver = delta.read(spark, self._path("silver_transactions"))
            batch = labels.where((F.col("batch_id") == batch_id) & F.col("is_fraud"))
            if self._kept is not None:  # its events in silver or not: the next batches' may be among them
                self._patch_reports(batch.where(F.col("reported_at").isNotNull())
                                    .select("event_id", F.unix_micros("reported_at").alias("_r")).toArrow(),
                                    app_id, batch_id)
            fraud = (batch.select("event_id", "reported_at")
                     .join(silver.select("event_id", "merchant_id", "country", "event_time", "event_date"),
                           "event_id").persist())
            try:
                days = [r[0] for r in fraud.select("event_date").distinct().collect()]
                if not days:
                    return {"recomputed": 0, "seconds": laps.seconds}
                since = min(date.fromisoformat(str(d)) for d in days)
                targets = None  # no gold row yet (a new table): none to recompute, no job to say so
                if not delta.never_written(self._path("gold_transaction_features")):
                    gold_tx = delta.read(spark, self._path("gold_transaction_features"))
                    changes = fraud.select("merchant_id", "country",
                                           F.greatest("event_time", "reported_at").alias("_lo"),
                                           F.col("event_time").alias("_hi"))
                    targets = affected_rows(gold_tx, changes, ("merchant_id", "country"), since)
                recomputed = self._recompute(spark, targets, too_late_ids(spark, self.settings), app_id,
                                             batch_id, extra_days=days, laps=laps)
                return {"recomputed": recomputed, "seconds": laps.seconds}
            finally:
                fraud.unpersist()

    # -- shared steps --------------------------------------------------------------------------------
    def _recompute(self, spark, targets: DataFrame | None, late_ids: DataFrame, app_id: str, batch_id: int,
                   extra_days, laps: Laps) -> int:
        """Recompute and upsert the features of ``targets`` (None: there are none), then the daily
        risk from the earliest touched day on. Returns the number of feature rows recomputed."""
        if targets is not None:
            targets = targets.persist()
        try:
            laps("affected")
            per_day = ({} if targets is None else
                       {r["event_date"]: r["count"] for r in targets.groupBy("event_date").count().collect()})
            n, days = sum(per_day.values()), sorted(per_day)
            touched = [date.fromisoformat(str(d)) for d in extra_days]
            spans = []  # (first, last) silver days read
            if n:
                feature_days = (days[0] - _LOOKBACK - timedelta(days=1), days[-1])
                spans.append(feature_days)
                touched.append(days[0])
            risk = self._risk_plan(spark, touched)
            if risk:
                spans.append(_risk_silver_days(risk[0], risk[1]))
            if not spans:
                return 0
            # The look-back is read by a dozen parts of the feature query (each key's totals, the
            # fraud rows, the slices, the too-late targets' user pass) and by the daily risk: one
            # scan into memory, of the columns they use, instead of one per part.
            history = self._silver_ids(spark, min(s[0] for s in spans), max(s[1] for s in spans)).persist(
                StorageLevel.MEMORY_AND_DISK)
            labels = self._fraud_only_labels(spark).persist(StorageLevel.MEMORY_AND_DISK)
            try:
                if n:
                    # Materialized first: the MERGE source reads the target table and cached frames.
                    tx = transaction_rows(targets, history.where(_between("event_date", *feature_days)),
                                          labels, late_ids, self._driver_max_rows(spark)
                                          ).localCheckpoint()
                    laps("features")
                    with delta.idempotent_dml(spark, app_id, batch_id):
                        delta.merge_upsert(spark, tx, self._path("gold_transaction_features"), ("event_id",),
                                           {"event_date": [str(d) for d in days]})
                    laps("features_merge")
                if risk:
                    self._risk(spark, history, labels, *risk, app_id, batch_id)
                    laps("risk")
            finally:
                history.unpersist()
                labels.unpersist()
            return int(n)
        finally:
            if targets is not None:
                targets.unpersist()

    def _risk_plan(self, spark, touched: list[date]) -> tuple[date, date, date] | None:
        """The daily risk to rewrite now, after a batch that touched the days ``touched``, as
        :meth:`_risk_days`; or None. The daily risk is rewritten at most every
        settings.risk_refresh_seconds (it is daily and not on the features' path); until then the
        touched days are owed."""
        owed = min((d for d in (*touched, self._risk_from) if d is not None), default=None)
        if owed is None:
            return None
        if self._risk_due():
            return self._risk_days(spark, owed)
        self._owe_risk(owed)
        return None

    def _silver_ids(self, spark, first_day: date, last_day: date) -> DataFrame:
        """The silver columns the features and the daily risk read (``ID_COLUMNS``), of those days."""
        return (delta.read(spark, self._path("silver_transactions"))
                .where(_between("event_date", first_day, last_day)).select(*features.ID_COLUMNS))

    def _fraud_only_labels(self, spark) -> DataFrame:
        """The fraud labels, the only ones the features and the daily risk count."""
        return _labels(spark, self.settings).where(F.col("is_fraud")).select("event_id", "is_fraud", "reported_at")

    # -- the daily risk's cadence ---------------------------------------------------------------------
    @property
    def _owed_path(self):
        return self.settings.checkpoint_root / "gold_risk_owed.json"

    def _owed_risk(self) -> date | None:
        try:
            return date.fromisoformat(json.loads(self._owed_path.read_text())["from"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:  # written atomically, so only by hand
            raise RuntimeError(
                f"{self._owed_path} is unreadable ({exc!r}); it names the earliest day whose daily risk "
                'the stream owes, as {"from": "YYYY-MM-DD"}. Write the earliest day that may be stale '
                "there, or delete it and run `lakehouse backfill --from DATE --to DATE` over those days."
            ) from exc

    def _owe_risk(self, first_day: date) -> None:
        """Defer the daily risk from ``first_day`` on. Written to disk before the batch commits, so a
        restart after a crash still pays it (a superset: paying twice rewrites the same rows)."""
        if self._risk_from is not None and self._risk_from <= first_day:
            return
        self._owed_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._owed_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"from": first_day.isoformat()}))
        os.replace(tmp, self._owed_path)
        self._risk_from = first_day

    def _risk_paid(self) -> None:
        self._risk_from, self._risk_at = None, time.monotonic()
        self._owed_path.unlink(missing_ok=True)

    def _risk_due(self) -> bool:
        return time.monotonic() - self._risk_at >= self.settings.risk_refresh_seconds

    def flush_risk(self, spark: SparkSession, force: bool = True) -> bool:
        """Rewrite the owed daily risk now (``force``), or only if its refresh interval has passed and
        no batch is running. The stream calls it when it stops and while it idles. Returns whether
        it ran. Not tied to a batch: the rows are a pure function of silver and gold, so running it
        again rewrites the same rows."""
        if self._risk_from is None or not self._lock.acquire(blocking=force):
            return False
        try:
            if self._risk_from is None or not (force or self._risk_due()):
                return False
            self._ensure(spark)
            self._risk_from_silver(spark, *self._risk_days(spark, self._risk_from))
            return True
        finally:
            self._lock.release()

    def _stale_maturity(self, spark, today: date) -> date | None:
        """The earliest day whose risk rows still say ``is_matured = false`` although the day is now
        ``MATURITY_DAYS`` old (the flag is judged by the calendar, and the stream rewrites a day only
        when something touches it). Asked once per UTC day; None when nothing is stale."""
        if self._maturity_checked == today:
            return None
        cutoff = today - timedelta(days=risk_t.MATURITY_DAYS)
        paths = [self._path(f"gold_{prefix}_risk_daily") for _, prefix in _RISK]
        stale = [delta.read(spark, path).where(~F.col("is_matured") & (F.col("day") <= F.lit(cutoff)))
                 .agg(F.min("day")).first()[0]
                 for path in paths if not delta.never_written(path)]  # a new table: no row to ask about
        return min((d for d in stale if d is not None), default=None)

    def _risk_days(self, spark, first_day: date) -> tuple[date, date, date]:
        """(first, last, today): the days of daily risk to rewrite when ``first_day`` is the earliest
        touched one -- it and the next 31 (whose trailing baselines include it), from the earliest day
        whose matured flag is stale if that is earlier -- and the day ``is_matured`` is judged by."""
        today = _today()
        stale = self._stale_maturity(spark, today)
        first_day = stale if stale is not None and stale < first_day else first_day
        return first_day, first_day + timedelta(days=31), today

    def _risk_from_silver(self, spark, first_day: date, last_day: date, today: date, app_id: str | None = None,
                          batch_id: int | None = None) -> None:
        """:meth:`_risk` on the silver days it reads, scanned once (its parts read them several times)."""
        history = self._silver_ids(spark, *_risk_silver_days(first_day, last_day)).persist(
            StorageLevel.MEMORY_AND_DISK)
        try:
            self._risk(spark, history, self._fraud_only_labels(spark), first_day, last_day, today, app_id, batch_id)
        finally:
            history.unpersist()

    def _risk(self, spark, history: DataFrame, labels: DataFrame, first_day: date, last_day: date,
              today: date, app_id: str | None = None, batch_id: int | None = None) -> None:
        """Rewrite the daily risk of [first_day, last_day] (see :meth:`_risk_days`), once per
        (``app_id``, ``batch_id``) when given; ``history`` holds at least the silver days of
        :func:`_risk_silver_days`, ``labels`` the fraud labels. Pays what was owed."""
        tx = delta.read(spark, self._path("gold_transaction_features")).where(
            _between("event_date", first_day, last_day))
        frames = risk_rows(history.where(_between("event_date", *_risk_silver_days(first_day, last_day))),
                           tx, labels, first_day, last_day, today)
        # Merchant and country at once (the writer's options carry the transaction id, not the session).
        delta.in_parallel(spark, *(
            lambda _session, name=name, df=df: delta.replace_range_once(
                df, self._path(name), f"day >= '{first_day}' AND day <= '{last_day}'", app_id, batch_id)
            for name, df in frames.items()))
        self._maturity_checked = today
        self._risk_paid()

    def _windows(self, spark, silver: DataFrame, on_time: DataFrame, late_ids: DataFrame, app_id: str,
                 batch_id: int) -> None:
        """Recompute the five-minute windows holding the new on-time events, per user."""
        bounds = (on_time.groupBy("user_id")
                  .agg((F.date_trunc("minute", F.min("event_time")) - F.expr("INTERVAL 4 MINUTES")).alias("_lo"),
                       F.max("event_time").alias("_hi"))).persist()
        try:
            # UTC dates from Spark (a collected timestamp is a naive local time)
            first_day, last_day = bounds.agg(F.to_date(F.min("_lo")),
                                             F.to_date(F.max("_hi") + F.expr("INTERVAL 5 MINUTES"))).first()
            if first_day is None:
                return
            events = (silver.where(_between("event_date", first_day, last_day))
                      .join(F.broadcast(bounds), "user_id")
                      .where((F.col("event_time") >= F.col("_lo"))
                             & (F.col("event_time") < F.col("_hi") + F.expr("INTERVAL 5 MINUTES"))))
            windows = (window_rows(events.drop("_lo", "_hi"), late_ids)
                       .join(F.broadcast(bounds), "user_id")
                       .where((F.col("window_start") >= F.col("_lo")) & (F.col("window_start") <= F.col("_hi")))
                       .drop("_lo", "_hi")).localCheckpoint()
            days = [str(first_day + timedelta(days=i)) for i in range((last_day - first_day).days + 1)]
            with delta.idempotent_dml(spark, app_id, batch_id):
                delta.merge_upsert(spark, windows, self._path("gold_user_features_5m"),
                                   ("user_id", "window_start"), {"window_date": days})
        finally:
            bounds.unpersist()
