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
History is first pruned to the targets' keys and time span, so a small micro-batch only sorts the
history it needs.
"""

from __future__ import annotations

from functools import reduce

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

_US = 1_000_000
_DAY = 86_400

#: Trailing windows (suffix, seconds) of the count and sum features.
TRAILING_WINDOWS: tuple[tuple[str, int], ...] = (
    ("5m", 5 * 60), ("1h", 3_600), ("24h", _DAY), ("7d", 7 * _DAY), ("30d", 30 * _DAY),
)
#: Windows (suffix, seconds) of the merchant and country fraud rates.
FRAUD_RATE_WINDOWS: tuple[tuple[str, int], ...] = (("1d", _DAY), ("7d", 7 * _DAY), ("30d", 30 * _DAY))
#: How far back any feature looks: history must cover (t - LOOKBACK_SECONDS, t].
LOOKBACK_SECONDS = 30 * _DAY
_LOOKBACK_US = LOOKBACK_SECONDS * _US


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


def _pruned_history(targets: DataFrame, history: DataFrame) -> DataFrame:
    """History rows in (min(t) - 30d, max(t)] of the targets, with ``_t`` = event time in µs."""
    hist = history.select("event_id", "user_id", "merchant_id", "country", "amount_base",
                          F.unix_micros("event_time").alias("_t"), F.lit(1).cast("long").alias("_n"),
                          _micros(F.col("amount_base")).alias("_a"))
    bounds = targets.agg(F.min(F.unix_micros("event_time")).alias("_lo"),
                         F.max(F.unix_micros("event_time")).alias("_hi"))
    cond = (F.col("_t") > F.col("_lo") - F.lit(_LOOKBACK_US)) & (F.col("_t") <= F.col("_hi"))
    return hist.join(F.broadcast(bounds), cond, "inner").drop("_lo", "_hi")


def _only_keys(hist: DataFrame, targets: DataFrame, key: str) -> DataFrame:
    return hist.join(targets.select(key).distinct(), key, "left_semi")


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


def _fraud_labels(labels: DataFrame) -> DataFrame:
    """One row per fraud-labelled event_id with the earliest report time in µs."""
    return (labels.where(F.col("is_fraud") & F.col("reported_at").isNotNull())
            .groupBy("event_id").agg(F.min(F.unix_micros("reported_at")).alias("_r")))


def _group_features(hist: DataFrame, fraud: DataFrame, key: str, prefix: str) -> DataFrame:
    """Trailing counts, sums and label-delay-aware fraud rates per ``key`` (merchant or country).

    ``fraud`` holds the fraud-labelled history rows of ``hist``: key, ``_e`` (event µs), ``_g``
    (max(event, reported) µs). Each contributes +1 at ``_g`` and -1 at ``_e + d`` to the running
    fraud count for window ``d`` (when ``_g < _e + d``; otherwise it never counts).
    """
    deltas = [f"_d{d}" for d, _ in FRAUD_RATE_WINDOWS]
    tx_rows = hist.select(key, "event_id", "_t", "_a", F.col("_n").alias("_is_tx"),
                          *[F.lit(0).alias(c) for c in deltas])
    none = [F.lit(None).cast("string").alias("event_id")]
    starts = fraud.select(
        key, *none, F.col("_g").alias("_t"), F.lit(0).cast("long").alias("_a"),
        F.lit(0).cast("long").alias("_is_tx"),
        *[(F.col("_g") < F.col("_e") + F.lit(s * _US)).cast("int").alias(f"_d{d}") for d, s in FRAUD_RATE_WINDOWS],
    )
    ends = [
        fraud.where(F.col("_g") < F.col("_e") + F.lit(s * _US)).select(
            key, *none, (F.col("_e") + F.lit(s * _US)).alias("_t"),
            F.lit(0).cast("long").alias("_a"), F.lit(0).cast("long").alias("_is_tx"),
            *[F.lit(-1 if other == d else 0).alias(f"_d{other}") for other, _ in FRAUD_RATE_WINDOWS],
        )
        for d, s in FRAUD_RATE_WINDOWS
    ]
    rows = reduce(DataFrame.unionByName, ends, tx_rows.unionByName(starts))

    cols: list[Column] = []
    for w, seconds in TRAILING_WINDOWS:
        cols += [_trailing_total("_is_tx", [key], seconds).alias(f"{prefix}_tx_count_{w}"),
                 _usd(_trailing_total("_a", [key], seconds)).alias(f"{prefix}_amount_sum_{w}")]
    cols += [F.sum(f"_d{d}").over(_running([key])).alias(f"_f{d}") for d, _ in FRAUD_RATE_WINDOWS]  # fraud as of t
    out = rows.select("*", *cols).where(F.col("_is_tx") == 1)
    # The denominator is the trailing transaction count of the same span (1d = 24h, 7d, 30d).
    tx_count = {seconds: f"{prefix}_tx_count_{w}" for w, seconds in TRAILING_WINDOWS}
    out = out.select("*", *[F.try_divide(F.col(f"_f{d}").cast("double"), F.col(tx_count[seconds]))
                            .alias(f"{prefix}_fraud_rate_{d}") for d, seconds in FRAUD_RATE_WINDOWS])
    return out.select("event_id", *(c for c in FEATURE_COLUMNS if c.startswith(f"{prefix}_")))


def _time_features() -> list[Column]:
    seconds = F.unix_seconds("event_time")
    hour = F.floor(F.pmod(seconds, F.lit(_DAY)) / 3_600)
    # 1970-01-01 was a Thursday: days since the epoch mod 7 is 2 on Saturdays, 3 on Sundays.
    weekday = F.pmod(F.floor(seconds / _DAY), F.lit(7))
    return [(hour < 6).alias("is_night"), weekday.isin(2, 3).alias("is_weekend")]


def transaction_features(targets: DataFrame, history: DataFrame, labels: DataFrame) -> DataFrame:
    """Features of each target transaction as of its own event time (rules: module docstring).

    Args:
        targets: silver transactions to compute features for (e.g. one micro-batch, or all of
            silver for a backfill). Must be contained in ``history``.
        history: silver transactions covering the targets' 30-day look-back, targets included;
            wider is fine (it is pruned to the targets' keys and time span).
        labels: silver labels (event_id, is_fraud, reported_at, ...).

    Returns:
        One row per target: ``ID_COLUMNS`` then ``FEATURE_COLUMNS``. Key: event_id. The values do
        not depend on how wide ``history`` is, so a micro-batch gets the same values as a backfill.
    """
    hist = _pruned_history(targets, history)
    fraud_labels = _fraud_labels(labels)

    user = _user_features(_only_keys(hist, targets, "user_id"))
    groups = []
    for key, prefix in (("merchant_id", "merchant"), ("country", "country")):
        keyed = _only_keys(hist, targets, key)
        fraud = keyed.join(fraud_labels, "event_id").select(
            key, F.col("_t").alias("_e"), F.greatest("_t", "_r").alias("_g"))
        groups.append(_group_features(keyed, fraud, key, prefix))

    out = targets.select(*ID_COLUMNS, *_time_features())
    for feats in (user, *groups):
        out = out.join(feats, "event_id", "left")
    return out.select(*ID_COLUMNS, *FEATURE_COLUMNS)
