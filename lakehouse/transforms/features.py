"""Fraud features from silver transactions and labels: pure DataFrame -> DataFrame transforms.

Two products:

* :func:`user_windows_5m` -- per-user aggregates over five-minute event-time windows sliding every
  minute (Spark's ``window(event_time, "5 minutes", "1 minute")``), for monitoring and marts.
* :func:`transaction_features` -- one feature row per transaction, every value computed *as of* the
  transaction's event time, for the model. The names are in :data:`FEATURE_COLUMNS`.

Rules of :func:`transaction_features` (``t`` is the target's event_time; all times UTC; timestamps
are compared at microsecond precision):

* **Trailing windows** are ``(t - W, t]`` on event time for W in 5m, 1h, 24h, 7d, 30d: open at the
  left (an event exactly W before ``t`` is *out*), closed at the right. The current transaction is in
  its own windows. **Ties**: transactions with the same event_time are all in each other's windows
  (range semantics on the timestamp), whatever their event_id. Nothing after ``t`` is ever used.
* **Order**: "previous"/"earlier" means earlier in ``(event_time, event_id)`` order, so of two
  transactions at the same instant the one with the smaller event_id comes first.
* **Look-back**: every feature depends only on transactions with event_time in ``(t - 30d, t]``.
  So a stream micro-batch (``targets`` a small slice, ``history`` the slice of silver covering the
  targets' 30-day look-back) gets exactly the values of a batch backfill (``targets == history``).
* ``user_tx_count_<w>``, ``user_amount_sum_<w>``: count and sum of amount_base (USD) of the user's
  transactions in ``(t - W, t]``.
* ``user_amount_ratio_30d``: amount_base / the user's mean amount_base over ``(t - 30d, t]`` (the
  current transaction included); null if that mean is null or zero.
* ``seconds_since_prev_user_tx``: seconds (double) since the user's previous transaction; 0.0 when
  the previous one has the same timestamp; null when there is none in the 30-day look-back.
* ``is_first_user_merchant`` / ``is_first_user_country``: no earlier transaction of this user at
  this merchant (in this country) within the 30-day look-back ``(t - 30d, t]``. "First" therefore
  means "first in 30 days", not "first ever".
* ``is_unusual_country``: the user has other transactions in ``(t - 30d, t]`` (the current one
  excluded, same-timestamp ones included) and none of them is in this country. False when the user
  has no other transaction in that window.
* ``is_night``: UTC hour in [0, 6). ``is_weekend``: Saturday or Sunday, UTC. (Computed from the epoch
  instant, so they do not depend on the session time zone.)
* ``merchant_tx_count_<w>``, ``merchant_amount_sum_<w>``, ``country_tx_count_<w>``,
  ``country_amount_sum_<w>``: as for the user, over the merchant's (country's) transactions.
* ``merchant_fraud_rate_<d>`` / ``country_fraud_rate_<d>`` for d in 1d, 7d, 30d: among the merchant's
  (country's) transactions with event_time in ``(t - d, t]`` (current one included in the
  denominator), the share that have a label with ``is_fraud = true`` **and** ``reported_at <= t``.
  Label-delay aware: a chargeback reported after ``t`` does not count at ``t``. A label without
  reported_at never counts; several fraud labels for one event count once (the earliest report).

Requirements on the inputs: ``history`` holds every transaction with event_time in the targets'
look-back (``(min(t) - 30d, max(t)]``), the targets included; event_id is unique in ``history``.
A target missing from ``history`` still gets its row, with null history-based features.

How (exact, no approximation, O(n log n)): a trailing count or sum over ``(t - W, t]`` is the
running total up to ``t`` minus the running total up to ``t - W`` -- two *running* window frames
(``RANGE BETWEEN UNBOUNDED PRECEDING AND <offset>``), which Spark evaluates incrementally in one pass
over the sorted key. (A sliding ``RANGE BETWEEN W PRECEDING AND CURRENT ROW`` frame is re-aggregated
row by row: quadratic in the rows per key, fatal for a country's 30 days.) Amounts are summed as
exact integers of micro-USD (``amount_base`` has 6 decimals), so the difference has no rounding
error and the result does not depend on how much history was read or in what order: the stream and
the backfill agree to the last bit. A fraud label ``f`` (event time ``e``, effective time
``g = max(e, reported_at)``) counts for a transaction of the same merchant at ``t`` iff
``g <= t < e + d``: an interval. So the fraud count at ``t`` is a running sum of +1 at ``g`` and -1
at ``e + d`` (both applied at ``t`` itself), one sort per merchant (country) for all three ``d``.
History is first pruned to the targets' keys and time span. For up to ``INLINE_KEYS_MAX_TARGETS``
targets their keys (and the too-late events in their look-back) are collected first, so the pruning
is a filter on literal values that each scan applies; the fraud reports are aggregated once per query.
Either costs a job, and saves one or two per part of the query that reads the history.

**Driver evaluation** (``mode="driver"``, what ``"auto"`` takes while the look-back holds at most
``DRIVER_MAX_ROWS`` rows: every stream micro-batch and any backfill of a laptop's data). In Spark, a
micro-batch's features cost a dozen to thirty small jobs (sorts and joins per key and window)
whatever its size: 3-6 s for 4 events over 300k rows of look-back on 2 cores. The driver evaluation collects
the look-back's rows once (Arrow) and answers the same rules by binary search over sorted arrays of
(key, time) with running integer totals (:mod:`lakehouse.transforms.driver_features`), then hands
the features back to Spark. Same arithmetic, same values to the bit (tested against both Spark
evaluations on random rows built to hit every edge, and by the stream/backfill parity gate). On a
cluster, a look-back larger than the driver should hold (``driver_max_rows``,
``LAKEHOUSE_FEATURES_DRIVER_MAX_ROWS``) is evaluated in Spark, as below.

**Sliced evaluation** (Spark, a short span of targets over a long look-back). Sorting a merchant's
or a country's whole 30-day look-back makes a micro-batch cost grow with the history, not with the
batch: a country's look-back is a large share of silver. When the targets span little event time (``[lo, hi]``, at most
``SLICE_MAX_SECONDS``), the merchant and country totals are split at ``a = lo - 1`` instead:
``total(t - W, t] = total(a - W, a] + total(a, t] - total(a - W, t - W]``. The first term is a plain
per-key aggregate (a scan, no sort); the other two are running sums over slices as wide as the span
(the span, and the span shifted back by ``W``), each read from its own days only. The fraud count at
``t`` is the labels counting at ``a`` plus the steps in ``(a, t]``. Every term is an exact integer, so
sliced and sorted evaluation agree to the bit (tested on random rows built to hit every edge). Slicing
has a larger fixed cost (more, smaller scans and joins), so it is used only when the look-back is
large against the targets (``SLICE_MIN_ROWS``, ``SLICE_MIN_RATIO``). The user features stay sorted: a
card holder's look-back is short.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from functools import reduce

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from lakehouse.transforms import driver_features

_US = 1_000_000
_DAY = 86_400
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

#: Trailing windows (suffix, seconds) of the count and sum features.
TRAILING_WINDOWS: tuple[tuple[str, int], ...] = (
    ("5m", 5 * 60), ("1h", 3_600), ("24h", _DAY), ("7d", 7 * _DAY), ("30d", 30 * _DAY),
)
#: Windows (suffix, seconds) of the merchant and country fraud rates.
FRAUD_RATE_WINDOWS: tuple[tuple[str, int], ...] = (("1d", _DAY), ("7d", 7 * _DAY), ("30d", 30 * _DAY))
#: How far back any feature looks: history must cover (t - LOOKBACK_SECONDS, t].
LOOKBACK_SECONDS = 30 * _DAY
#: When the merchant and country features are *sliced* (module docstring) rather than sorted: the
#: targets span at most SLICE_MAX_SECONDS of event time (a stream micro-batch), and their look-back
#: holds at least SLICE_MIN_ROWS rows and SLICE_MIN_RATIO times as many rows as there are targets.
#: Measured on 2 cores: 1,000 targets over 1M rows of look-back took 16.9 s sliced, 26.0 s sorted;
#: 300 over 10k rows 13.4 s sliced, 9.7 s sorted; 60k over 180k rows 23.7 s sliced, 16.2 s sorted.
SLICE_MAX_SECONDS = _DAY
#: Evaluation modes of :func:`transaction_features`.
MODES = ("auto", "driver", "sorted", "sliced")
#: ``"auto"`` evaluates in the driver when the look-back (history rows in the targets' span and the
#: 30 days before it, too-late events included) holds at most this many rows (the default of
#: ``driver_max_rows``): they are collected to the driver as Arrow (about 100 bytes a row).
DRIVER_MAX_ROWS = 3_000_000
SLICE_MIN_ROWS = 250_000
#: In Spark, the history is pruned to the targets' users, merchants and countries. Up to this many
#: targets their keys are collected first and the pruning is a filter on literal values; above it, a
#: semi-join with the targets (a broadcast per part of the query that reads the history). Measured on
#: 2 cores, 2,000 targets (some too late) over 300k rows, sorted: 23 jobs, 8.9 s collected against 84
#: jobs, 12.9 s joined; 4 targets: 13 to 30 jobs, 3 to 6 s, against 36 to 69 jobs, 4 to 11 s. The
#: literal lists lengthen the query's planning (2.3 s to 7.3 s at 2,000 targets), hence the bound.
INLINE_KEYS_MAX_TARGETS = 2_000
SLICE_MIN_RATIO = 20
_LOOKBACK_US = LOOKBACK_SECONDS * _US
_KEYS = ("user_id", "merchant_id", "country")
#: The per-key totals behind the merchant and country features (see :func:`_group_output`).
_TOTALS = (*[f"_{v}_{w}" for w, _ in TRAILING_WINDOWS for v in ("n", "a")], *[f"_d{d}" for d, _ in FRAUD_RATE_WINDOWS])


def _count_sum_names(prefix: str) -> list[str]:
    return [n for w, _ in TRAILING_WINDOWS for n in (f"{prefix}_tx_count_{w}", f"{prefix}_amount_sum_{w}")]


_USER_COLUMNS = (
    *_count_sum_names("user"),
    "user_amount_ratio_30d", "seconds_since_prev_user_tx",
    "is_first_user_merchant", "is_first_user_country", "is_unusual_country",
)
_TIME_COLUMNS = ("is_night", "is_weekend")
_MERCHANT_COLUMNS = (*_count_sum_names("merchant"), *[f"merchant_fraud_rate_{d}" for d, _ in FRAUD_RATE_WINDOWS])
_COUNTRY_COLUMNS = (*_count_sum_names("country"), *[f"country_fraud_rate_{d}" for d, _ in FRAUD_RATE_WINDOWS])

#: The feature columns of :func:`transaction_features`, in output order (the model's inputs).
FEATURE_COLUMNS: tuple[str, ...] = (*_USER_COLUMNS, *_TIME_COLUMNS, *_MERCHANT_COLUMNS, *_COUNTRY_COLUMNS)
#: The identifying columns that precede the features in :func:`transaction_features`.
ID_COLUMNS = ("event_id", "user_id", "merchant_id", "country", "event_time", "event_date", "amount_base")
#: Silver rows in the driver, as :func:`lookback_of_inserted` takes them: the ID_COLUMNS and ``batch_id``.
INSERTED_ARROW_SCHEMA = pa.schema([
    *[(c, pa.string()) for c in ("event_id", "user_id", "merchant_id", "country")],
    ("event_time", pa.timestamp("us", tz="UTC")), ("event_date", pa.date32()), ("amount_base", pa.float64()),
    ("batch_id", pa.int64()),
])

#: Columns of :func:`user_windows_5m`, in order.
USER_WINDOW_COLUMNS = (
    "user_id", "window_start", "window_end", "tx_count", "amount_sum", "amount_mean", "amount_max",
    "distinct_merchants", "distinct_countries",
)


def user_windows_5m(tx: DataFrame) -> DataFrame:
    """Per-user aggregates over five-minute event-time windows that slide every minute.

    Rules: windows are Spark's ``window(event_time, "5 minutes", "1 minute")``, half-open
    ``[window_start, window_end)`` and aligned to the minute (UTC), so an event at exactly 12:05:00
    is in the five windows starting 12:01 .. 12:05 and not in the one ending at 12:05. Only windows
    holding at least one of the user's events appear. Amounts are ``amount_base`` (USD), summed
    exactly (as micro-USD), so the result does not depend on the order of the rows.

    Returns one row per (user_id, window_start) with ``USER_WINDOW_COLUMNS``: tx_count,
    distinct_merchants, distinct_countries (long); amount_sum, amount_mean, amount_max (double).
    """
    return (
        tx.groupBy("user_id", F.window("event_time", "5 minutes", "1 minute").alias("w"))
        .agg(
            F.count(F.lit(1)).alias("tx_count"),
            usd_sum("amount_base").alias("amount_sum"),
            F.max("amount_base").cast("double").alias("amount_max"),
            # size(collect_set) rather than count_distinct: two distinct counts make Spark expand
            # every (event, window) row three times; a window's set holds a handful of values.
            F.size(F.collect_set("merchant_id")).cast("long").alias("distinct_merchants"),
            F.size(F.collect_set("country")).cast("long").alias("distinct_countries"),
        )
        .withColumn("amount_mean", F.try_divide(F.col("amount_sum"), F.col("tx_count").cast("double")))
        .select("user_id", F.col("w.start").alias("window_start"), F.col("w.end").alias("window_end"),
                *USER_WINDOW_COLUMNS[3:])
    )


def _running(keys: list[str], back_us: int = 0) -> Window:
    """Running frame over ``_t`` (event time in µs): every row with ``_t <= t - back_us`` (ties included)."""
    return Window.partitionBy(*keys).orderBy("_t").rangeBetween(Window.unboundedPreceding, -back_us)


def _trailing_total(column: str, keys: list[str], seconds: int) -> Column:
    """Sum of the long ``column`` over the key's rows in ``(t - seconds, t]``: the running total up to
    ``t`` minus the running total up to ``t - seconds`` (both incremental, see the module docstring)."""
    upto = lambda back: F.coalesce(F.sum(column).over(_running(keys, back)), F.lit(0))  # noqa: E731
    return (upto(0) - upto(seconds * _US)).cast("long")


def _micros(amount: Column) -> Column:
    """USD with 6 decimals as an exact long count of micro-USD (null stays null)."""
    return F.round(amount * F.lit(_US)).cast("long")


def _usd(micros: Column) -> Column:
    return (micros / F.lit(float(_US))).cast("double")


def usd_sum(column: str) -> Column:
    """Aggregate: the exact sum of a 6-decimal USD column (summed as micro-USD), as double."""
    return _usd(F.sum(_micros(F.col(column))))


def _in_lookback(prev_t: Column) -> Column:
    return prev_t.isNotNull() & (prev_t > F.col("_t") - F.lit(_LOOKBACK_US))


def span(targets: DataFrame) -> tuple[int, int, int]:
    """(count, earliest, latest event time in µs) of the targets; (0, 0, 0) when there are none."""
    n, lo, hi = targets.agg(F.count(F.lit(1)), F.min(F.unix_micros("event_time")),
                            F.max(F.unix_micros("event_time"))).first()
    return (0, 0, 0) if not n else (int(n), int(lo), int(hi))


def micros_of(moment: datetime) -> int:
    """µs since the epoch of an aware datetime, or of a naive one as collected from Spark (local time)."""
    return (moment.astimezone(timezone.utc) - _EPOCH) // timedelta(microseconds=1)


def instant(us: int) -> datetime:
    """The UTC datetime ``us`` µs after the epoch (the inverse of :func:`micros_of`)."""
    return _EPOCH + timedelta(microseconds=us)


def _day(us: int) -> date:
    return instant(us).date()


def _within(lo_us: int, hi_us: int, column: str = "_t") -> Column:
    """``lo_us < column <= hi_us`` (µs)."""
    return (F.col(column) > F.lit(lo_us)) & (F.col(column) <= F.lit(hi_us))


def _history_rows(history: DataFrame, lo_us: int, hi_us: int) -> DataFrame:
    """History rows with event time in ``(lo_us, hi_us]``, with ``_t`` (event time in µs), ``_n`` (1)
    and ``_a`` (amount in micro-USD). The bounds are plain literals on the stored columns, so a scan
    skips what lies outside: Delta the event_date partitions (a day wider on each side, whatever the
    session time zone) and, by the files' event_time statistics, the files of other hours (a stream
    writes files that each cover a short stretch of event time); a cached frame its other batches."""
    keep = ((F.col("event_date") >= F.lit(_day(lo_us) - timedelta(days=1)))
            & (F.col("event_date") <= F.lit(_day(hi_us) + timedelta(days=1)))
            & (F.col("event_time") > F.lit(instant(lo_us))) & (F.col("event_time") <= F.lit(instant(hi_us))))
    return history.where(keep).select(
        "event_id", "user_id", "merchant_id", "country", "amount_base",
        F.unix_micros("event_time").alias("_t"), F.lit(1).cast("long").alias("_n"),
        _micros(F.col("amount_base")).alias("_a"))


def _only_keys(hist: DataFrame, keys: DataFrame | dict[str, list[str]], key: str) -> DataFrame:
    """The rows of ``hist`` whose ``key`` is one of some targets': ``keys`` is either the targets
    (a semi-join) or their keys already collected (:func:`_collected_keys`), a filter the scan applies
    with no Spark job of its own."""
    if isinstance(keys, DataFrame):
        return hist.join(keys.select(key).distinct(), key, "left_semi")
    return hist.where(F.col(key).isin(keys[key]) if keys[key] else F.lit(False))


def _late_in(rows: DataFrame, late_ids: DataFrame) -> list[str] | None:
    """The event ids of ``rows`` that are in ``late_ids``, collected (one job); None when there are
    more than INLINE_KEYS_MAX_TARGETS."""
    got = (rows.join(late_ids.select("event_id"), "event_id", "left_semi").select("event_id")
           .limit(INLINE_KEYS_MAX_TARGETS + 1).collect())
    return None if len(got) > INLINE_KEYS_MAX_TARGETS else sorted(r[0] for r in got)


def _split_late(history: DataFrame, late: DataFrame | list[str]) -> tuple[DataFrame, DataFrame]:
    """``history`` split into what on-time targets see and the too-late events in it: ``late`` is
    either the too-late events' ids as a DataFrame (joins) or those in the look-back already
    collected (:func:`_late_in`), filters the scans apply."""
    if isinstance(late, DataFrame):
        ids = late.select("event_id")
        return history.join(ids, "event_id", "left_anti"), history.join(ids, "event_id", "left_semi")
    if not late:  # a late target missing from history (it still gets its row) sees no late event
        return history, history.where(F.lit(False))
    is_late = F.col("event_id").isin(late)
    return history.where(~is_late), history.where(is_late)


def _collected_keys(targets: DataFrame, late_ids: DataFrame | None
                    ) -> tuple[dict[str, list[str]], dict[str, list[str]], dict[str, list[str]] | None]:
    """The event ids, users, merchants and countries of ``targets`` (one Spark job), as
    :func:`_only_keys` takes them: of all of them, of the on-time ones and of those in ``late_ids``
    (None: none is)."""
    frame = targets.select("event_id", *_KEYS)
    if late_ids is not None:
        frame = frame.join(late_ids.distinct().select("event_id", F.lit(True).alias("_late")), "event_id", "left")
    got = frame.collect()
    late = [bool(late_ids is not None and r["_late"]) for r in got]
    pick = lambda which: {k: sorted({r[k] for r, x in zip(got, late) if which(x) and r[k] is not None})  # noqa: E731
                          for k in ("event_id", *_KEYS)}
    return pick(lambda x: True), pick(lambda x: not x), (pick(lambda x: x) if any(late) else None)


def _user_features(hist: DataFrame) -> DataFrame:
    by_user = Window.partitionBy("user_id").orderBy("_t", "event_id")
    by_merchant = Window.partitionBy("user_id", "merchant_id").orderBy("_t", "event_id")
    by_country = Window.partitionBy("user_id", "country").orderBy("_t", "event_id")
    cols: list[Column] = []
    for w, seconds in TRAILING_WINDOWS:
        cols += [_trailing_total("_n", ["user_id"], seconds).alias(f"user_tx_count_{w}"),
                 _usd(_trailing_total("_a", ["user_id"], seconds)).alias(f"user_amount_sum_{w}")]
    out = hist.select("*", *cols)
    mean_30d = F.try_divide(F.col("user_amount_sum_30d"), F.col("user_tx_count_30d").cast("double"))
    prev_t = F.lag("_t").over(by_user)
    same_country_30d = _trailing_total("_n", ["user_id", "country"], LOOKBACK_SECONDS)
    out = out.select(
        "*",
        F.try_divide(F.col("amount_base").cast("double"), mean_30d).alias("user_amount_ratio_30d"),
        F.when(_in_lookback(prev_t), (F.col("_t") - prev_t) / F.lit(float(_US)))
        .cast("double").alias("seconds_since_prev_user_tx"),
        (~_in_lookback(F.lag("_t").over(by_merchant))).alias("is_first_user_merchant"),
        (~_in_lookback(F.lag("_t").over(by_country))).alias("is_first_user_country"),
        ((F.col("user_tx_count_30d") > 1) & (same_country_30d == 1)).alias("is_unusual_country"),
    )
    return out.select("event_id", *_USER_COLUMNS)


def fraud_reports(labels: DataFrame) -> DataFrame:
    """One row per fraud-labelled event_id with the earliest report time in µs."""
    return (labels.where(F.col("is_fraud") & F.col("reported_at").isNotNull())
            .groupBy("event_id").agg(F.min(F.unix_micros("reported_at")).alias("_r")))


def _fraud_rows(rows: DataFrame, fraud_labels: DataFrame, key: str) -> DataFrame:
    """The fraud-labelled ``rows``: ``key``, ``_e`` (event µs) and ``_g`` (max(event, reported) µs)."""
    return rows.join(fraud_labels, "event_id").select(key, F.col("_t").alias("_e"), F.greatest("_t", "_r").alias("_g"))


def _counts_in(d_seconds: int) -> Column:
    """A fraud label counts somewhere in window ``d`` iff its effective time ``_g`` comes before
    ``_e + d``, when the event leaves the window."""
    return F.col("_g") < F.col("_e") + F.lit(d_seconds * _US)


def _fraud_steps(fraud: DataFrame, key: str) -> DataFrame:
    """The fraud labels as steps of the running fraud count of each window ``d``: +1 at ``_g``, -1 at
    ``_e + d`` (columns ``key``, ``_tau``, ``_d<d>``); a label that never counts in ``d`` adds nothing."""
    starts = fraud.select(key, F.col("_g").alias("_tau"),
                          *[_counts_in(s).cast("long").alias(f"_d{d}") for d, s in FRAUD_RATE_WINDOWS])
    ends = [fraud.where(_counts_in(s)).select(
        key, (F.col("_e") + F.lit(s * _US)).alias("_tau"),
        *[F.lit(-1 if other == d else 0).cast("long").alias(f"_d{other}") for other, _ in FRAUD_RATE_WINDOWS])
        for d, s in FRAUD_RATE_WINDOWS]
    return reduce(DataFrame.unionByName, ends, starts)


def _group_output(frame: DataFrame, prefix: str) -> DataFrame:
    """The ``prefix`` feature columns from the trailing totals ``_n_<w>``, ``_a_<w>`` (micro-USD) and
    ``_d<d>`` (fraud labels counting at ``t`` in fraud-rate window ``d``)."""
    cols: list[Column] = []
    for w, _ in TRAILING_WINDOWS:
        cols += [F.col(f"_n_{w}").alias(f"{prefix}_tx_count_{w}"),
                 _usd(F.col(f"_a_{w}")).alias(f"{prefix}_amount_sum_{w}")]
    out = frame.select("*", *cols)
    # The denominator is the trailing transaction count of the same span (1d = 24h, 7d, 30d).
    tx_count = {seconds: f"{prefix}_tx_count_{w}" for w, seconds in TRAILING_WINDOWS}
    out = out.select("*", *[F.try_divide(F.col(f"_d{d}").cast("double"), F.col(tx_count[seconds]))
                            .alias(f"{prefix}_fraud_rate_{d}") for d, seconds in FRAUD_RATE_WINDOWS])
    return out.select("event_id", *(c for c in FEATURE_COLUMNS if c.startswith(f"{prefix}_")))


def _group_totals(hist: DataFrame, fraud: DataFrame, key: str, probes: DataFrame | None = None) -> DataFrame:
    """Trailing totals per ``key`` (merchant or country) of every row of ``hist``, which covers their
    look-back, by sorting it: ``event_id`` and :data:`_TOTALS` (counts ``_n_<w>``, micro-USD sums
    ``_a_<w>``, fraud labels counting ``_d<d>``), to be turned into features by :func:`_group_output`.

    ``fraud`` holds the fraud-labelled history rows of ``hist``: key, ``_e`` (event µs), ``_g``
    (max(event, reported) µs); see :func:`_fraud_steps`. ``probes`` (rows shaped like ``hist``) get
    their totals over ``hist`` at their own time without adding to anybody's: the too-late targets,
    which are not in the history the on-time ones see.
    """
    deltas = [f"_d{d}" for d, _ in FRAUD_RATE_WINDOWS]
    zero = F.lit(0).cast("long")
    tx_rows = hist.select(key, "event_id", "_t", "_n", "_a", *[zero.alias(c) for c in deltas])
    if probes is not None:
        tx_rows = tx_rows.unionByName(probes.select(key, "event_id", "_t", zero.alias("_n"), zero.alias("_a"),
                                                    *[zero.alias(c) for c in deltas]))
    steps = _fraud_steps(fraud, key).select(
        key, F.lit(None).cast("string").alias("event_id"), F.col("_tau").alias("_t"),
        zero.alias("_n"), zero.alias("_a"), *deltas)
    cols: list[Column] = []
    for w, seconds in TRAILING_WINDOWS:
        cols += [_trailing_total("_n", [key], seconds).alias(f"_n_{w}"),
                 _trailing_total("_a", [key], seconds).alias(f"_a_{w}")]
    running = [F.sum(c).over(_running([key])).alias(c) for c in deltas]  # fraud counting as of t
    out = tx_rows.unionByName(steps).select("event_id", *cols, *running)
    return out.where(F.col("event_id").isNotNull()).select("event_id", *_TOTALS)


def _plus(totals: DataFrame, extra: DataFrame) -> DataFrame:
    """``totals`` with ``extra``'s totals (a few rows, by event_id) added where it has a row."""
    extra = extra.select("event_id", *[F.col(c).alias(f"_x{c}") for c in _TOTALS])
    return totals.join(F.broadcast(extra), "event_id", "left").select(
        "event_id", *[(F.col(c) + F.coalesce(F.col(f"_x{c}"), F.lit(0))).alias(c) for c in _TOTALS])


def _group_totals_sliced(history: DataFrame, targets: DataFrame | dict[str, list[str]], fraud_labels: DataFrame,
                         key: str, lo: int, hi: int, probes: DataFrame | None = None) -> DataFrame:
    """As :func:`_group_totals`, for the rows in ``[lo, hi]`` of the targets' keys (and the
    ``probes``, which lie in that span), without sorting the look-back (the sliced evaluation,
    module docstring). With ``a = lo - 1``, for a row at ``t`` and a window ``W``::

        total(t - W, t] = total(a - W, a]  +  total(a, t]  -  total(a - W, t - W]

    The first term is an aggregate per key; the other two are running sums over two slices as wide as
    the span: the span itself, and the span shifted back by ``W`` (its rows placed at ``_t + W``, so
    "at or before t" means "at or before t - W"). The fraud count at ``t`` is the labels counting at
    ``a`` plus the steps in ``(a, t]``. Each slice reads only its own days of ``history``.
    """
    a = lo - 1
    rows = lambda x, y: _only_keys(_history_rows(history, x, y), targets, key)  # noqa: E731
    deltas = [f"_d{d}" for d, _ in FRAUD_RATE_WINDOWS]
    lefts = [f"_l{v}_{w}" for w, _ in TRAILING_WINDOWS for v in ("n", "a")]
    totals = ["_rn", "_ra", *lefts, *deltas]

    def piece(df: DataFrame, tau: Column, event_id: Column, given: dict[str, Column]) -> DataFrame:
        return df.select(key, event_id.alias("event_id"), tau.alias("_tau"),
                         *[given.get(c, F.lit(0)).cast("long").alias(c) for c in totals])

    none = F.lit(None).cast("string")
    fraud = _fraud_rows(rows(a - _LOOKBACK_US, hi), fraud_labels, key)
    pieces = [piece(rows(a, hi), F.col("_t"), F.col("event_id"), {"_rn": F.col("_n"), "_ra": F.col("_a")}),
              piece(_fraud_steps(fraud, key).where(_within(a, hi, "_tau")), F.col("_tau"), none,
                    {c: F.col(c) for c in deltas})]
    if probes is not None:  # totals at their time, adding nothing
        pieces.append(piece(probes, F.col("_t"), F.col("event_id"), {}))
    for w, s in TRAILING_WINDOWS:
        pieces.append(piece(rows(a - s * _US, hi - s * _US), F.col("_t") + F.lit(s * _US), none,
                            {f"_ln_{w}": F.col("_n"), f"_la_{w}": F.col("_a")}))
    running = Window.partitionBy(key).orderBy("_tau").rangeBetween(Window.unboundedPreceding, Window.currentRow)
    run = (reduce(DataFrame.unionByName, pieces)
           .select("event_id", key, *[F.sum(c).over(running).alias(c) for c in totals])
           .where(F.col("event_id").isNotNull()))
    base = rows(a - _LOOKBACK_US, a).groupBy(key).agg(
        *[F.sum(F.when(F.col("_t") > F.lit(a - s * _US), F.col(f"_{v}")).otherwise(F.lit(0))).alias(f"_b{v}_{w}")
          for w, s in TRAILING_WINDOWS for v in ("n", "a")])
    at_a = fraud.where(F.col("_g") <= F.lit(a)).groupBy(key).agg(
        *[F.sum((F.col("_e") + F.lit(s * _US) > F.lit(a)).cast("long")).alias(f"_b_d{d}")
          for d, s in FRAUD_RATE_WINDOWS])
    # Keys are never null in silver (quarantined), so plain equi-joins are exact here.
    out = run.join(base, key, "left").join(at_a, key, "left")
    zero = F.lit(0)
    return out.select(
        "event_id",
        *[(F.coalesce(F.col(f"_b{v}_{w}"), zero) + F.col(f"_r{v}") - F.col(f"_l{v}_{w}")).alias(f"_{v}_{w}")
          for w, _ in TRAILING_WINDOWS for v in ("n", "a")],
        *[(F.coalesce(F.col(f"_b{c}"), zero) + F.col(c)).alias(c) for c in deltas])


def _time_features() -> list[Column]:
    seconds = F.unix_seconds("event_time")
    hour = F.floor(F.pmod(seconds, F.lit(_DAY)) / 3_600)
    # 1970-01-01 was a Thursday: days since the epoch mod 7 is 2 on Saturdays, 3 on Sundays.
    weekday = F.pmod(F.floor(seconds / _DAY), F.lit(7))
    return [(hour < 6).alias("is_night"), weekday.isin(2, 3).alias("is_weekend")]


def _driver_rows(rows: DataFrame, fraud_labels: DataFrame, late_ids: DataFrame | None,
                 extra: tuple[str, ...] = ()) -> DataFrame:
    """``rows`` (of :func:`_history_rows`) as :func:`driver_features.evaluate` reads them: with the
    earliest fraud report ``_r`` and the too-late flag ``_late``, plus the ``extra`` columns."""
    rows = rows.join(fraud_labels, "event_id", "left")
    late = F.lit(False)
    if late_ids is not None:
        rows = rows.join(late_ids.distinct().select("event_id", F.lit(True).alias("_late")), "event_id", "left")
        late = F.coalesce(F.col("_late"), F.lit(False))
    return rows.select("event_id", "user_id", "merchant_id", "country", "amount_base", "_t", "_a", "_r",
                       late.alias("_late"), *extra)


def lookback_start(earliest: datetime) -> int:
    """:func:`lookback_rows` holds the rows with event time after this (µs)."""
    return micros_of(earliest) - 1 - _LOOKBACK_US


def lookback_rows(silver: DataFrame, earliest: datetime, labels: DataFrame, late_ids: DataFrame) -> DataFrame:
    """Every row of ``silver`` that the features of a transaction at ``earliest`` or later may read
    (from 30 days before it on, with no end), as :func:`driver_features.evaluate` reads them, plus
    ``event_time``, ``event_date`` and ``batch_id``: what a stream micro-batch whose earliest event
    is at ``earliest`` needs to compute its gold in the driver."""
    lo = lookback_start(earliest)
    rows = silver.where((F.col("event_date") >= F.lit(_day(lo) - timedelta(days=1)))
                        & (F.col("event_time") > F.lit(instant(lo))))
    rows = rows.select(*ID_COLUMNS, "batch_id", F.unix_micros("event_time").alias("_t"),
                       _micros(F.col("amount_base")).alias("_a"))
    return _driver_rows(rows, fraud_reports(labels), late_ids, extra=("event_time", "event_date", "batch_id"))


def micros_half_up(amount: pa.ChunkedArray | pa.Array) -> pa.Array:
    """:func:`_micros` in numpy: ``round(amount * 10^6)`` as a long, rounding half away from zero as
    Spark rounds a double (``BigDecimal(x).setScale(0, HALF_UP)``); null stays null. Exact: the
    fraction of a double below 2^52 is exact, and at or above it the double is already whole."""
    x = pa.chunked_array([amount]) if isinstance(amount, pa.Array) else amount
    null = x.is_null().to_numpy(zero_copy_only=False)
    m = x.cast(pa.float64()).fill_null(0.0).to_numpy() * float(_US)
    whole = np.floor(np.abs(m))
    out = np.copysign(whole + (np.abs(m) - whole >= 0.5), m).astype(np.int64)
    return pa.array(out, mask=null)


def lookback_of_inserted(rows: pa.Table, earliest: datetime, reports: pa.Table) -> pa.Table:
    """:func:`lookback_rows` of rows already in the driver: silver rows just inserted (``rows``: the
    :data:`ID_COLUMNS` and ``batch_id`` as Arrow, ``event_date`` as a date or its ISO string), none of
    them too late yet, with ``reports`` the earliest fraud report of each fraud-labelled event
    (``event_id``, ``_r`` in µs: :func:`fraud_reports`). The same rows and values, with no Spark job."""
    t = pc.cast(rows["event_time"], pa.timestamp("us", tz="UTC")).cast(pa.int64())
    rows = rows.filter(pc.greater(t, lookback_start(earliest)))
    t = pc.cast(rows["event_time"], pa.timestamp("us", tz="UTC")).cast(pa.int64())
    at = pc.index_in(rows["event_id"], value_set=reports["event_id"])
    return pa.table({
        **{c: rows[c] for c in ("event_id", "user_id", "merchant_id", "country", "amount_base")},
        "_t": t, "_a": micros_half_up(rows["amount_base"]),
        "_r": pc.take(reports["_r"], at).cast(pa.int64()),
        "_late": pa.array(np.zeros(rows.num_rows, dtype=bool)),
        "event_time": rows["event_time"], "event_date": rows["event_date"].cast(pa.date32()),
        "batch_id": rows["batch_id"],
    })


def _driver_features(targets: DataFrame, history: DataFrame, late_ids: DataFrame | None,
                     fraud_labels: DataFrame, window: tuple[int, int]) -> DataFrame:
    """:func:`transaction_features` evaluated in the driver (``mode="driver"``): the look-back's rows
    are collected once, as Arrow, :func:`driver_features.evaluate` answers every feature from them,
    and only the features come back to Spark."""
    table = _driver_rows(_history_rows(history, *window), fraud_labels, late_ids).toArrow()
    names = [c for c in FEATURE_COLUMNS if c not in _TIME_COLUMNS]
    feats = driver_features.evaluate(table, targets.select("event_id").toArrow()["event_id"], names,
                                     TRAILING_WINDOWS, FRAUD_RATE_WINDOWS, LOOKBACK_SECONDS)
    out = targets.select(*ID_COLUMNS, *_time_features()).join(
        targets.sparkSession.createDataFrame(feats), "event_id", "left")
    return out.select(*ID_COLUMNS, *FEATURE_COLUMNS)


def transaction_features(targets: DataFrame, history: DataFrame, labels: DataFrame,
                         mode: str = "auto", late_ids: DataFrame | None = None,
                         driver_max_rows: int = DRIVER_MAX_ROWS) -> DataFrame:
    """Features of each target transaction as of its own event time (rules: module docstring).

    Args:
        targets: silver transactions to compute features for (e.g. one micro-batch, or all of
            silver for a backfill). Must be contained in ``history``.
        history: silver transactions covering the targets' 30-day look-back, targets included;
            wider is fine (it is pruned to the targets' keys and time span).
        labels: silver labels (event_id, is_fraud, reported_at, ...).
        mode: how the features are evaluated (module docstring): ``"driver"`` collects the look-back
            to the driver and answers them with numpy; in Spark, ``"sorted"`` sorts the merchants'
            and countries' whole look-back, ``"sliced"`` reads only its edges. ``"auto"`` takes the
            driver up to ``driver_max_rows`` rows of look-back, then picks between the other two by
            ``SLICE_MAX_SECONDS``, ``SLICE_MIN_ROWS`` and ``SLICE_MIN_RATIO``. All give the same values.
        late_ids: event ids (column ``event_id``) of events that only targets among them see: a
            target in ``late_ids`` sees all of ``history``, any other target sees ``history``
            without them (gold's too-late events). The merchant and country totals of a late target
            are the totals over the other events, evaluated at its time in the same pass as the
            on-time targets', plus those over the few late events; its user features are a second,
            small pass over its user's events.
        driver_max_rows: the most rows of look-back ``"auto"`` collects to the driver (0: never).

    Returns:
        One row per target: ``ID_COLUMNS`` then ``FEATURE_COLUMNS``. Key: event_id. The values do
        not depend on how wide ``history`` is, so a micro-batch gets the same values as a backfill.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    n, lo, hi = span(targets)  # no targets: an empty result of the right shape
    # From one µs before the earliest target's look-back: the sliced totals split at lo - 1.
    window = (lo - 1 - _LOOKBACK_US, hi)
    rows = None
    if mode == "auto" and n:
        rows = _history_rows(history, *window).count()
        mode = "driver" if 0 < rows <= driver_max_rows else "auto"
    fraud_labels = fraud_reports(labels)
    if mode == "driver" and n:
        return _driver_features(targets, history, late_ids, fraud_labels, window)
    if n:  # read by every part of the query: aggregated once (one job), not once per part
        fraud_labels = fraud_labels.localCheckpoint()
    # The history is pruned to the targets' keys and split by late_ids: for a few targets by values
    # collected first (filters the scans apply), else by joins (a broadcast per part of the query).
    late_of = None  # keeps the rows of the late targets
    seen, late_history = history, None  # seen: what the on-time targets see
    if 0 < n <= INLINE_KEYS_MAX_TARGETS:
        all_keys, on_time_keys, late_keys = _collected_keys(targets, late_ids)
        if late_ids is not None:  # by joins if the look-back holds too many of the too-late events
            late_seen = _late_in(_history_rows(history, *window), late_ids)
            seen, late_history = _split_late(history, late_ids if late_seen is None else late_seen)
        if late_keys is not None:
            late_of = lambda df: df.where(F.col("event_id").isin(late_keys["event_id"]))  # noqa: E731
    else:
        all_keys = on_time_keys = late_keys = targets
        if late_ids is not None:
            late_ids = late_ids.select("event_id")
            seen, late_history = _split_late(history, late_ids)
            late_keys = targets.join(late_ids, "event_id", "left_semi")
            if n and not late_keys.isEmpty():
                on_time_keys = targets.join(late_ids, "event_id", "left_anti")
                late_of = lambda df: df.join(late_keys.select("event_id"), "event_id", "left_semi")  # noqa: E731
    hist = _history_rows(seen, *window)
    sliced = mode == "sliced" or (mode == "auto" and n > 0 and hi - lo <= SLICE_MAX_SECONDS * _US
                                  and rows >= max(SLICE_MIN_ROWS, SLICE_MIN_RATIO * n))

    users = _user_features(_only_keys(hist, on_time_keys, "user_id"))
    probes = late_rows = None
    if late_of is not None:
        users = users.unionByName(late_of(_user_features(_only_keys(_history_rows(history, *window), late_keys,
                                                                    "user_id"))))
        probes = _history_rows(late_of(targets), lo - 1, hi)
        late_rows = _history_rows(late_history, *window)
    parts = [users]
    for key, prefix in (("merchant_id", "merchant"), ("country", "country")):
        if sliced:
            totals = _group_totals_sliced(seen, all_keys, fraud_labels, key, lo, hi, probes)
        else:
            keyed = _only_keys(hist, all_keys, key)
            totals = _group_totals(keyed, _fraud_rows(keyed, fraud_labels, key), key, probes)
        if late_of is not None:  # what the late targets see on top: the late events
            keyed = _only_keys(late_rows, late_keys, key)
            totals = _plus(totals, late_of(_group_totals(keyed, _fraud_rows(keyed, fraud_labels, key), key)))
        parts.append(_group_output(totals, prefix))

    out = targets.select(*ID_COLUMNS, *_time_features())
    for feats in parts:
        out = out.join(feats, "event_id", "left")
    return out.select(*ID_COLUMNS, *FEATURE_COLUMNS)
