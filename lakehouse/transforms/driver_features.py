"""The point-in-time feature rules of :mod:`lakehouse.transforms.features`, evaluated with numpy on
arrays in the driver: the ``"driver"`` mode of :func:`~lakehouse.transforms.features.transaction_features`.

A stream micro-batch has few targets and a look-back of at most a few million rows. Evaluated in
Spark, its features cost about a hundred small jobs (sorts, broadcasts, joins per key and per
window), whatever the batch's size. Here the same rules are answered by binary search over sorted
arrays: about 2 s for a few thousand targets over a million rows of look-back, 8 s for a million
targets (2 cores).

Same rules, same arithmetic, so the same values to the bit (tested against the sorted and sliced
Spark evaluations on random rows built to hit every edge):

* a trailing total over ``(t - W, t]`` is the running total up to ``t`` minus the running total up to
  ``t - W`` (both with ties at the same instant), on exact integers (counts, micro-USD);
* "previous" is in ``(event_time, event_id)`` order;
* a fraud label of an event at ``e``, effective at ``g = max(e, reported)``, counts at ``t`` in window
  ``d`` iff ``g <= t < e + d``;
* doubles are made the way Spark makes them (a long divided by a double), and a division by zero is
  null, as ``try_divide``.

Rows are keyed by small integer codes, and times are microseconds. Everything is pure: arrays in,
arrays out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_US = 1_000_000
#: Bits of an int64 code of (key, time); times are ranked when a key and a time in µs do not fit.
MAX_BITS = 62
#: A row without a fraud label with a report time.
NO_REPORT = np.iinfo(np.int64).max


@dataclass(frozen=True)
class Rows:
    """The history rows, one entry per transaction (parallel arrays).

    ``order`` ranks event_id (ties at one instant are ordered by it) among the rows of the targets'
    users at least (:func:`_rows`: only those are compared, by :func:`_neighbours`, whose groups all
    refine the user); ``user``, ``merchant``, ``country`` are integer codes of the keys, and
    ``user_merchant``, ``user_country`` of the pairs, for the rows of the targets' users at least (the
    other rows share a code no target has); ``t`` the event
    time in µs; ``a`` amount_base in micro-USD (0 where null); ``amount`` amount_base (NaN where null);
    ``report`` the earliest report time (µs) of a fraud label of the event, or :data:`NO_REPORT`.
    """

    order: np.ndarray
    user: np.ndarray
    merchant: np.ndarray
    country: np.ndarray
    user_merchant: np.ndarray
    user_country: np.ndarray
    t: np.ndarray
    a: np.ndarray
    amount: np.ndarray
    report: np.ndarray

    def take(self, keep: np.ndarray) -> "Rows":
        return Rows(**{name: getattr(self, name)[keep] for name in self.__dataclass_fields__})


@dataclass
class Column:
    """A feature column: values and the mask of nulls (None: no nulls)."""

    values: np.ndarray
    null: np.ndarray | None = None


class _Axis:
    """Sortable int64 codes of (key, time) pairs: ``key << bits | (time - t0)``, with times clamped
    to ``[t0, t1]``. Every stored time is above ``t0`` and every asked time at most ``t1``, so clamping
    changes no answer. When keys and times do not fit in 62 bits, times are replaced by their rank
    among ``times`` (all the times that will be stored or asked), which keeps their order."""

    def __init__(self, max_key: int, times: list[np.ndarray], t0: int, t1: int):
        self.t0, self.t1 = t0, t1
        self.bits = max(int(t1 - t0).bit_length(), 1)
        self.ranks = None
        if int(max_key).bit_length() + self.bits > MAX_BITS:
            self.ranks = _unique(np.clip(np.concatenate([np.array([t0, t1]), *times]), t0, t1))
            self.bits = max(len(self.ranks).bit_length(), 1)

    def __call__(self, key: np.ndarray, t: np.ndarray) -> np.ndarray:
        t = np.clip(t, self.t0, self.t1)
        t = t - self.t0 if self.ranks is None else np.searchsorted(self.ranks, t)
        return (key.astype(np.int64) << self.bits) + t


class _Key:
    """One key (user, merchant or country): its :class:`_Axis` and the targets' places on it.
    Lookups go in the targets' (key, time) order, so the binary searches walk the stored codes
    forward instead of jumping about them (several times faster on a million targets)."""

    def __init__(self, rows_key: np.ndarray, key_at: np.ndarray, t_at: np.ndarray, times: list[np.ndarray],
                 t0: int, t1: int):
        self.axis = _Axis(int(rows_key.max()), times, t0, t1)
        self.order = np.argsort(self.axis(key_at, t_at), kind="stable")
        self.sorted_key, self.sorted_t = key_at[self.order], t_at[self.order]

    def stored(self, key: np.ndarray, t: np.ndarray, values: tuple[np.ndarray, ...] = ()):
        """Stored rows of this key at times ``t``: sorted codes and the running totals of ``values``
        (with a leading 0), to be read by :meth:`upto`."""
        codes = self.axis(key, t)
        order = np.argsort(codes, kind="stable")
        return codes[order], [np.concatenate(([0], np.cumsum(v[order], dtype=np.int64))) for v in values]

    def upto(self, codes: np.ndarray, back_us: int | None = 0) -> np.ndarray:
        """For each target: how many stored ``codes`` have its key and a time <= its time - ``back_us``
        (None: before any time), plus the number of codes of smaller keys -- an offset that cancels
        in a difference of two lookups of one target."""
        t = np.full_like(self.sorted_t, self.axis.t0) if back_us is None else self.sorted_t - back_us
        out = np.empty(len(t), dtype=np.int64)
        out[self.order] = np.searchsorted(codes, self.axis(self.sorted_key, t), side="right")
        return out

    def trailing(self, stored, seconds: int) -> list[np.ndarray]:
        """Count and sums of the stored rows of the target's key in ``(t - seconds, t]``."""
        codes, cums = stored
        hi, lo = self.upto(codes), self.upto(codes, seconds * _US)
        return [hi - lo] + [cum[hi] - cum[lo] for cum in cums]

    def count(self, codes: np.ndarray) -> np.ndarray:
        """How many stored ``codes`` have the target's key and a time <= its time."""
        return self.upto(codes) - self.upto(codes, None)


def _unique(x: np.ndarray) -> np.ndarray:
    """``np.unique(x)`` of an integer array (sorted distinct values), by a sort. numpy 2.x answers a
    plain ``np.unique`` with a hash table and then sorts: about 5 s for five million int64 on these
    machines, against a few hundredths of a second for the sort (the window keys come nearly sorted)."""
    x = np.sort(x)
    return x[np.concatenate(([True], x[1:] != x[:-1]))] if len(x) else x


def _usd(micros: np.ndarray) -> np.ndarray:
    return micros.astype(np.float64) / float(_US)


def _try_divide(num: np.ndarray, num_null: np.ndarray | None, den: np.ndarray) -> Column:
    """``try_divide(num, den)`` on doubles: null when either is null (NaN den) or den is zero."""
    den = den.astype(np.float64)
    null = (den == 0) | np.isnan(den)
    if num_null is not None:
        null |= num_null
    with np.errstate(divide="ignore", invalid="ignore"):
        return Column(np.where(null, np.nan, num.astype(np.float64) / np.where(null, 1.0, den)), null)


def _rows_of(group: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Indices of the rows whose ``group`` (integer codes) is the group of one of the rows ``at``."""
    of_targets = np.zeros(int(group.max()) + 1, dtype=bool)
    of_targets[group[at]] = True
    return np.flatnonzero(of_targets[group])


def _neighbours(rows: Rows, group: np.ndarray, at: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For the rows ``at``, in (time, event_id) order within ``group``: the time of the previous row
    of the group, whether there is one, and whether the next row of the group has the same time.
    Only the rows of the targets' groups are sorted: all of them for a catch-up's million targets, a
    few thousand for a live batch's over a million rows of look-back."""
    sub = _rows_of(group, at)
    order = sub[np.lexsort((rows.order[sub], rows.t[sub], group[sub]))]
    position = np.empty(len(group), dtype=np.int64)  # set for the rows of ``sub`` only
    position[order] = np.arange(len(order))
    p = position[at]
    prev, after = order[np.maximum(p - 1, 0)], order[np.minimum(p + 1, len(order) - 1)]
    has_prev = (p > 0) & (group[prev] == group[at])
    tie_after = (p < len(order) - 1) & (group[after] == group[at]) & (rows.t[after] == rows.t[at])
    return rows.t[prev], has_prev, tie_after


def features(rows: Rows, at: np.ndarray, windows: tuple[tuple[str, int], ...],
             fraud_windows: tuple[tuple[str, int], ...], lookback_seconds: int) -> dict[str, Column]:
    """The features of the rows ``at`` (indices into ``rows``), each as of its own time, from
    ``rows`` (which hold their whole look-back). Names as in ``features.FEATURE_COLUMNS``."""
    t_at = rows.t[at]
    longest = max(s for _, s in windows + fraud_windows)
    t0 = int(min(rows.t.min(), t_at.min() - longest * _US)) - 1
    t1 = int(t_at.max()) + 1
    labelled = rows.report != NO_REPORT
    e = rows.t[labelled]
    g = np.maximum(e, rows.report[labelled])
    times = [t_at - s * _US for _, s in windows] + [t_at, rows.t, g] + [e + s * _US for _, s in fraud_windows]
    lookback = lookback_seconds * _US
    out: dict[str, Column] = {}

    # -- trailing counts and sums of the user, the merchant and the country ----------------------------
    # Only the rows of the targets' keys are stored: the others would shift both ends of a difference
    # alike (:meth:`_Key.upto`). A live batch's or the express lane's users hold a few percent of the rows.
    places: dict[str, _Key] = {}
    for prefix, key in (("user", rows.user), ("merchant", rows.merchant), ("country", rows.country)):
        place = places[prefix] = _Key(key, key[at], t_at, times, t0, t1)
        mine = _rows_of(key, at)
        tx = (place.stored(key, rows.t, (rows.a,)) if len(mine) > len(key) // 2 else
              place.stored(key[mine], rows.t[mine], (rows.a[mine],)))
        for w, seconds in windows:
            n, a = place.trailing(tx, seconds)
            out[f"{prefix}_tx_count_{w}"], out[f"{prefix}_amount_sum_{w}"] = Column(n), Column(_usd(a))

    # -- the rest of the user's ------------------------------------------------------------------------
    n30, sum30 = out[f"user_tx_count_{windows[-1][0]}"].values, out[f"user_amount_sum_{windows[-1][0]}"].values
    mean = _try_divide(sum30, None, n30)
    amount = rows.amount[at]
    out["user_amount_ratio_30d"] = _try_divide(amount, np.isnan(amount) | mean.null,
                                               np.where(mean.null, 0.0, mean.values))
    prev_t, has, _ = _neighbours(rows, rows.user, at)
    recent = has & (prev_t > t_at - lookback)
    out["seconds_since_prev_user_tx"] = Column(np.where(recent, (t_at - prev_t) / float(_US), np.nan), ~recent)
    prev_t, has, _ = _neighbours(rows, rows.user_merchant, at)
    out["is_first_user_merchant"] = Column(~(has & (prev_t > t_at - lookback)))
    prev_t, has, tie_after = _neighbours(rows, rows.user_country, at)
    first_in_country = ~(has & (prev_t > t_at - lookback))
    out["is_first_user_country"] = Column(first_in_country)
    # Alone in its country over (t - 30d, t]: no recent earlier row there, no tie after it.
    out["is_unusual_country"] = Column((n30 > 1) & first_in_country & ~tie_after)

    # -- merchant and country fraud rates ----------------------------------------------------------------
    tx_count = {seconds: w for w, seconds in windows}
    for prefix, key in (("merchant", rows.merchant), ("country", rows.country)):
        place, key_l = places[prefix], key[labelled]
        for d, seconds in fraud_windows:
            counts = g < e + seconds * _US  # else the label never counts in this window
            started = place.count(place.stored(key_l[counts], g[counts])[0])
            ended = place.count(place.stored(key_l[counts], e[counts] + seconds * _US)[0])
            out[f"{prefix}_fraud_rate_{d}"] = _try_divide(started - ended, None,
                                                          out[f"{prefix}_tx_count_{tx_count[seconds]}"].values)
    return out


# ---- Arrow in, Arrow out ------------------------------------------------------------------------------

def _arrow_type(name: str) -> pa.DataType:
    """A feature's type, by its name: flags are booleans, counts longs, everything else doubles."""
    if name.startswith("is_"):
        return pa.bool_()
    return pa.int64() if "_tx_count_" in name else pa.float64()


def _codes(column: pa.ChunkedArray) -> np.ndarray:
    """Dense int64 codes of a column (nulls get a code of their own, as in Spark's partitions)."""
    return pc.dictionary_encode(column, null_encoding="encode").combine_chunks().indices.to_numpy().astype(np.int64)


def _pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dense codes of the pairs (a, b)."""
    return np.unique(a * (int(b.max()) + 1) + b, return_inverse=True)[1].astype(np.int64)


def key_codes(table: pa.Table) -> list[np.ndarray]:
    """The integer codes of user_id, merchant_id and country (:func:`_codes`) of ``table``'s rows."""
    return [_codes(table[c]) for c in ("user_id", "merchant_id", "country")]


def _rows(table: pa.Table, keys: list[np.ndarray] | None = None, at: np.ndarray | None = None) -> Rows:
    """The :class:`Rows` of ``table``; with the targets ``at``, event ids are ranked among the rows of
    their users only (sorting a million ids costs about 0.3 s; a live batch's users hold a few
    thousand rows), the other rows' ``order`` left 0."""
    user, merchant, country = keys if keys is not None else key_codes(table)
    order = np.zeros(table.num_rows, dtype=np.int64)
    of_users = np.arange(table.num_rows) if at is None else _rows_of(user, at)
    everyone = len(of_users) == table.num_rows
    ids = table["event_id"] if everyone else table["event_id"].take(of_users)
    # UTF-8 byte order, as Spark; a stable sort, so equal ids keep the rows' order
    order[of_users[pc.sort_indices(ids).to_numpy()]] = np.arange(len(of_users))

    def pairs(other: np.ndarray) -> np.ndarray:
        """Codes of (user, other) for the rows of the targets' users, the only ones :func:`_neighbours`
        compares (its groups refine the user); the other rows share one code that no target has."""
        if everyone:
            return _pairs(user, other)
        codes = np.full(table.num_rows, len(of_users), dtype=np.int64)
        codes[of_users] = _pairs(user[of_users], other[of_users])
        return codes

    return Rows(order=order, user=user, merchant=merchant, country=country,
                user_merchant=pairs(merchant), user_country=pairs(country),
                t=table["_t"].to_numpy().astype(np.int64),
                a=pc.fill_null(table["_a"], 0).to_numpy().astype(np.int64),
                amount=pc.fill_null(pc.cast(table["amount_base"], pa.float64()), float("nan")).to_numpy(),
                report=pc.fill_null(table["_r"], NO_REPORT).to_numpy().astype(np.int64))


def evaluate(table: pa.Table, wanted: pa.ChunkedArray, names: list[str], windows: tuple[tuple[str, int], ...],
             fraud_windows: tuple[tuple[str, int], ...], lookback_seconds: int,
             keys: list[np.ndarray] | None = None, at: np.ndarray | None = None) -> pa.Table:
    """The features ``names`` of the events ``wanted`` (event ids) from the history ``table``: one row
    per transaction of their look-back, with event_id, user_id, merchant_id, country, amount_base,
    ``_t`` (event time, µs), ``_a`` (amount_base, micro-USD), ``_r`` (earliest report of a fraud
    label, µs, or null) and ``_late`` (a too-late event: only late targets see it). Returns
    event_id and ``names``, one row per wanted event found in ``table`` (the others have no history
    row to be computed from). ``keys``: :func:`key_codes` of ``table``, if the caller has them.
    ``at``: the rows of ``table`` holding ``wanted``, in its order, when the caller knows them (the
    ids then unique in ``table``): no lookup of the ids among the table's."""
    if at is not None:
        found = np.ones(len(at), dtype=bool)
        at = np.asarray(at, dtype=np.int64)
    else:
        wanted = pc.unique(wanted)
        where = pc.index_in(wanted, value_set=table["event_id"])
        found = pc.is_valid(where).to_numpy(zero_copy_only=False)
        at = pc.fill_null(where, 0).to_numpy().astype(np.int64)[found]
    values = {c: np.zeros(len(at), dtype=_arrow_type(c).to_pandas_dtype()) for c in names}
    nulls = {c: np.zeros(len(at), dtype=bool) for c in names}
    if len(at):
        everything = _rows(table, keys, at)
        late = table["_late"].to_numpy(zero_copy_only=False).astype(bool)
        # An on-time target sees the history without the late events; a late one sees all of it.
        for kept, mine in ((~late, ~late[at]), (np.ones_like(late), late[at])):
            if not mine.any():
                continue
            position = np.cumsum(kept) - 1  # row index -> index among the kept rows
            got = features(everything.take(kept), position[at[mine]], windows, fraud_windows, lookback_seconds)
            for c in names:
                values[c][mine] = got[c].values
                if got[c].null is not None:
                    nulls[c][mine] = got[c].null
    return pa.table({"event_id": pc.filter(wanted, pa.array(found)),
                     **{c: pa.array(values[c], type=_arrow_type(c), mask=nulls[c]) for c in names}})


# ---- what a stream micro-batch changes, and the five-minute windows --------------------------------------

def affected(t: np.ndarray, keys: list[np.ndarray], changed: np.ndarray, lookback_seconds: int) -> np.ndarray:
    """Which rows a change may alter (the rule of ``gold.affected_rows``): for each key, the rows of a
    changed key value with time in ``[min t, max t + lookback)`` of that value's changed rows.
    ``t`` times in µs, ``keys`` integer codes per row, ``changed`` indices of the changed rows."""
    hit = np.zeros(len(t), dtype=bool)
    if not len(changed):
        return hit
    for key in keys:
        size = int(key.max()) + 1
        lo = np.full(size, np.iinfo(np.int64).max)
        hi = np.full(size, np.iinfo(np.int64).min)
        np.minimum.at(lo, key[changed], t[changed])
        np.maximum.at(hi, key[changed], t[changed])
        hit |= (t >= lo[key]) & (t < hi[key] + lookback_seconds * _US)  # an unchanged key: lo > hi
    return hit


_MINUTE = 60 * _US
_SLIDES = 5  # a five-minute window sliding every minute: each event is in five windows


def windows_5m(user: np.ndarray, t: np.ndarray, a: np.ndarray, a_null: np.ndarray, amount: np.ndarray,
               merchant: np.ndarray, merchant_null: np.ndarray, country: np.ndarray, country_null: np.ndarray,
               flag: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """``features.user_windows_5m`` of the given rows, the same values to the bit: per user and
    minute-aligned ``[start, start + 5 min)`` holding at least one row, the count, the exact sum of
    micro-USD ``a`` (null when all null), its mean, the max of ``amount`` (NaN where null; NaN above
    everything, as Spark), and the distinct non-null merchants and countries (integer codes).

    Returns parallel arrays: ``row`` (a row of the window's user), ``start`` (µs), ``tx_count``,
    ``amount_sum``, ``amount_mean``, ``amount_max``, their null masks (``*_null``),
    ``distinct_merchants``, ``distinct_countries``, and, when ``flag`` (per row) is given, whether
    any and whether all of the window's rows have it (``flag_any``, ``flag_all``).
    """
    n = len(t)
    minute = np.floor_divide(t, _MINUTE)
    rows = np.tile(np.arange(n), _SLIDES)
    start = np.concatenate([minute - k for k in range(_SLIDES)])
    base = int(start.min()) if n else 0
    span = int(start.max()) - base + 1 if n else 1
    group = user[rows].astype(np.int64) * span + (start - base)
    order = np.argsort(group, kind="stable")
    group, rows, start = group[order], rows[order], start[order]
    first = np.flatnonzero(np.concatenate(([True], group[1:] != group[:-1]))) if n else np.array([], np.int64)
    count = np.diff(np.append(first, len(group)))
    a_rows, null_rows = np.where(a_null, 0, a)[rows], a_null[rows]
    valued = count - np.add.reduceat(null_rows.astype(np.int64), first) if n else count
    micros = np.add.reduceat(a_rows, first) if n else np.zeros(0, np.int64)
    biggest = np.maximum.reduceat(np.where(a_null, -np.inf, amount)[rows], first) if n else np.zeros(0)
    sum_null = valued == 0
    amount_sum = micros.astype(np.float64) / float(_US)
    which = np.repeat(np.arange(len(first)), count)

    def distinct(code: np.ndarray, null: np.ndarray) -> np.ndarray:
        keep = ~null[rows]
        pairs = _unique(which[keep] * (int(code.max()) + 1 if n else 1) + code[rows][keep])
        return np.bincount(pairs // (int(code.max()) + 1 if n else 1), minlength=len(first)).astype(np.int64)

    flags = {}
    if flag is not None:
        flags = {"flag_any": np.logical_or.reduceat(flag[rows], first) if n else np.zeros(0, bool),
                 "flag_all": np.logical_and.reduceat(flag[rows], first) if n else np.zeros(0, bool)}
    return {
        "row": rows[first], "start": start[first] * _MINUTE, "tx_count": count.astype(np.int64),
        "amount_sum": np.where(sum_null, np.nan, amount_sum), "amount_sum_null": sum_null,
        "amount_mean": np.where(sum_null, np.nan, amount_sum / np.maximum(count, 1).astype(np.float64)),
        "amount_mean_null": sum_null,
        "amount_max": np.where(biggest == -np.inf, np.nan, biggest), "amount_max_null": biggest == -np.inf,
        "distinct_merchants": distinct(merchant, merchant_null),
        "distinct_countries": distinct(country, country_null),
        **flags,
    }
