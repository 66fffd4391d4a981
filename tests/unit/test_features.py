"""Feature transforms on hand-made tiny frames: window edges, ties, look-back, label delay, and the
equivalence of a micro-batch (few targets, wide history) with a backfill (targets == history)."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import pytest

from pyspark.sql import Row
from pyspark.sql import functions as F
from pyspark.testing import assertDataFrameEqual, assertSchemaEqual

from lakehouse.transforms import features as features_module
from lakehouse.transforms.features import (
    FEATURE_COLUMNS,
    ID_COLUMNS,
    USER_WINDOW_COLUMNS,
    transaction_features,
    user_windows_5m,
)

TX_SCHEMA = ("event_id string, user_id string, merchant_id string, amount double, currency string, "
             "amount_base double, country string, event_time timestamp, event_date date")
LABEL_SCHEMA = "event_id string, is_fraud boolean, scenario string, reported_at timestamp"
WED = datetime(2026, 11, 4, tzinfo=timezone.utc)  # a Wednesday, 00:00 UTC


def at(day=0, hour=12, minute=0, second=0, micro=0) -> datetime:
    return WED + timedelta(days=day, hours=hour, minutes=minute, seconds=second, microseconds=micro)


def tx_frame(spark, rows):
    """rows: (event_id, user_id, merchant_id, country, amount_base, event_time)."""
    return spark.createDataFrame(
        [(e, u, m, a, "USD", a, c, t, t.date()) for e, u, m, c, a, t in rows], TX_SCHEMA)


def labels_frame(spark, rows=()):
    """rows: (event_id, is_fraud, reported_at)."""
    return spark.createDataFrame([(e, f, "card_testing" if f else "none", r) for e, f, r in rows], LABEL_SCHEMA)


def evaluated(df):
    """A DataFrame's schema and rows, run once: a feature plan takes seconds to run even on four rows,
    and comparing two DataFrames would run each again."""
    return df.schema, df.collect()


def assert_same(got, want):
    """Two :func:`evaluated` results: the same schema (nullability aside) and rows, to the bit."""
    assertSchemaEqual(got[0], want[0])
    assertDataFrameEqual(got[1], want[1], rtol=0, atol=0)


def features(spark, rows, labels=()):
    """Every row's features, evaluated sorted, sliced and in the driver (which must agree to the bit)."""
    tx, lab = tx_frame(spark, rows), labels_frame(spark, labels)
    out = evaluated(transaction_features(tx, tx, lab, mode="sorted"))
    for mode in ("sliced", "driver"):
        assert_same(evaluated(transaction_features(tx, tx, lab, mode=mode)), out)
    return {r["event_id"]: r for r in out[1]}


def test_user_windows_5m_half_open_edges(spark):
    # 12:05:00 sits exactly on a boundary: in the windows starting 12:01..12:05, not in [12:00, 12:05).
    tx = tx_frame(spark, [("a", "u1", "m1", "FR", 10.0, at(minute=5)),
                          ("b", "u1", "m2", "DE", 20.0, at(minute=3, second=30)),
                          ("c", "u2", "m1", "FR", 5.0, at(minute=7))])
    got = user_windows_5m(tx)
    assert tuple(got.columns) == USER_WINDOW_COLUMNS

    def w(user, start_minute, n, total, mx, merchants, countries):
        return Row(user_id=user, window_start=at(minute=start_minute), window_end=at(minute=start_minute + 5),
                   tx_count=n, amount_sum=total, amount_mean=total / n, amount_max=mx,
                   distinct_merchants=merchants, distinct_countries=countries)

    expected = [w("u1", s, 1, 20.0, 20.0, 1, 1) for s in (-1, 0)]            # b alone
    expected += [w("u1", s, 2, 30.0, 20.0, 2, 2) for s in (1, 2, 3)]         # a and b
    expected += [w("u1", s, 1, 10.0, 10.0, 1, 1) for s in (4, 5)]            # a alone
    expected += [w("u2", s, 1, 5.0, 5.0, 1, 1) for s in (3, 4, 5, 6, 7)]
    assertDataFrameEqual(got, spark.createDataFrame(expected, got.schema))
    assert [f.dataType.simpleString() for f in got.schema.fields][3:] == [
        "bigint", "double", "double", "double", "bigint", "bigint"]


def test_trailing_window_is_open_at_the_left_and_ties_count_each_other(spark):
    # Rule: windows are (t - W, t]. "a" is exactly 5 minutes before "b"/"c", so it is NOT in their
    # 5m window; "a2" one second later is. "b" and "c" share a timestamp: each counts the other.
    got = features(spark, [("a", "u1", "m1", "FR", 10.0, at()),
                           ("a2", "u1", "m1", "FR", 20.0, at(second=1)),
                           ("c", "u1", "m2", "FR", 40.0, at(minute=5)),
                           ("b", "u1", "m1", "FR", 30.0, at(minute=5))])
    count_5m = {k: r["user_tx_count_5m"] for k, r in got.items()}
    assert count_5m == {"a": 1, "a2": 2, "b": 3, "c": 3}
    assert {k: r["user_amount_sum_5m"] for k, r in got.items()} == {"a": 10.0, "a2": 30.0, "b": 90.0, "c": 90.0}
    assert {k: r["user_tx_count_1h"] for k, r in got.items()} == {"a": 1, "a2": 2, "b": 4, "c": 4}
    # Previous in (event_time, event_id) order: "c" follows "b" at the same instant.
    assert {k: r["seconds_since_prev_user_tx"] for k, r in got.items()} == {
        "a": None, "a2": 1.0, "b": 299.0, "c": 0.0}
    # Mean over (t - 30d, t], current included: b and c see all four (mean 25).
    assert {k: r["user_amount_ratio_30d"] for k, r in got.items()} == {"a": 1.0, "a2": 20.0 / 15.0, "b": 1.2, "c": 1.6}
    # The same rules for the merchant: m1 at 12:05 sees a2 and b, not a.
    assert got["b"]["merchant_tx_count_5m"] == 2 and got["b"]["merchant_amount_sum_5m"] == 50.0
    assert got["c"]["country_tx_count_5m"] == 3 and got["c"]["country_tx_count_24h"] == 4


def test_first_merchant_first_country_and_unusual_country(spark):
    got = features(spark, [("x1", "u1", "m1", "FR", 1.0, at(0)),
                           ("x2", "u1", "m2", "FR", 1.0, at(1)),
                           ("x3", "u1", "m1", "DE", 1.0, at(2)),
                           ("x4", "u1", "m1", "FR", 1.0, at(40)),   # 38 days later: outside the look-back
                           ("y1", "u2", "m1", "DE", 1.0, at(2, minute=1))])
    flags = {k: (r["is_first_user_merchant"], r["is_first_user_country"], r["is_unusual_country"])
             for k, r in got.items()}
    assert flags == {
        "x1": (True, True, False),     # no history: not unusual
        "x2": (True, False, False),    # new merchant, known country
        "x3": (False, True, True),     # known merchant, a country not seen in the last 30 days
        "x4": (True, True, False),     # "first" means first within the 30-day look-back
        "y1": (True, True, False),
    }
    assert got["x4"]["seconds_since_prev_user_tx"] is None
    assert got["x3"]["seconds_since_prev_user_tx"] == 86_400.0


def test_night_weekend_and_output_columns(spark):
    rows = [("s", "u1", "m1", "FR", 1.0, at(3, hour=5, minute=59, second=59)),  # Saturday 05:59:59
            ("u", "u1", "m1", "FR", 1.0, at(4, hour=6)),                          # Sunday 06:00
            ("m", "u1", "m1", "FR", 1.0, at(5, hour=0))]                          # Monday 00:00
    tx = tx_frame(spark, rows)
    out = transaction_features(tx, tx, labels_frame(spark))
    assert tuple(out.columns) == ID_COLUMNS + FEATURE_COLUMNS
    types = dict(out.dtypes)
    assert {c for c in FEATURE_COLUMNS if types[c] == "boolean"} == {
        "is_first_user_merchant", "is_first_user_country", "is_unusual_country", "is_night", "is_weekend"}
    assert all(types[c] == "bigint" for c in FEATURE_COLUMNS if "_tx_count_" in c)
    assert all(types[c] == "double" for c in FEATURE_COLUMNS if "_amount_" in c or "_rate_" in c or "seconds" in c)
    got = {r["event_id"]: (r["is_night"], r["is_weekend"]) for r in out.collect()}
    assert got == {"s": (True, True), "u": (False, True), "m": (True, False)}


def test_fraud_rate_counts_a_label_only_once_reported(spark):
    rows = [("f1", "u1", "m1", "FR", 1.0, at(hour=10)),              # fraud, reported at 11:00
            ("t1", "u2", "m1", "FR", 1.0, at(hour=10, minute=30)),   # before the report
            ("t2", "u3", "m1", "FR", 1.0, at(hour=11)),              # exactly at the report
            ("g1", "u4", "m2", "FR", 1.0, at(hour=11, minute=30)),   # another merchant, same country
            ("t3", "u5", "m1", "FR", 1.0, at(hour=12)),              # after the report
            ("t4", "u6", "m1", "FR", 1.0, at(1, hour=10))]           # exactly 1 day after f1
    labels = [("f1", True, at(hour=11)), ("t1", False, at(hour=10, minute=31))]
    got = features(spark, rows, labels)
    rate = {k: (r["merchant_fraud_rate_1d"], r["merchant_fraud_rate_7d"], r["merchant_fraud_rate_30d"])
            for k, r in got.items() if k != "g1"}
    assert rate == {
        "f1": (0.0, 0.0, 0.0),              # its own label is not known yet at its event time
        "t1": (0.0, 0.0, 0.0),              # reported after t1: must not count
        "t2": (1 / 3, 1 / 3, 1 / 3),        # reported_at == t counts
        "t3": (0.25, 0.25, 0.25),
        "t4": (0.0, 0.2, 0.2),              # f1 is exactly 1 day earlier: out of (t - 1d, t]
    }
    assert got["g1"]["merchant_fraud_rate_30d"] == 0.0
    assert got["t3"]["country_fraud_rate_1d"] == 0.2      # f1 among f1, t1, t2, g1, t3
    assert got["t1"]["country_fraud_rate_1d"] == 0.0
    assert got["t3"]["merchant_tx_count_1h"] == 1          # t2 at 11:00 is out of (11:00, 12:00]


def test_micro_batch_equals_backfill(spark):
    rows = [("o1", "u1", "m1", "FR", 50.0, at(-45)),                 # beyond every look-back
            ("e1", "u1", "m1", "FR", 10.0, at(-20)),
            ("e2", "u1", "m2", "DE", 20.0, at(-1, hour=23)),
            ("e3", "u2", "m1", "FR", 30.0, at(-1, hour=23)),
            ("e4", "u1", "m1", "FR", 40.0, at(0, hour=1)),
            ("e5", "u2", "m2", "DE", 15.0, at(0, hour=1)),            # tie with e4
            ("e6", "u1", "m1", "ES", 25.0, at(0, hour=1, minute=4)),
            ("e7", "u3", "m1", "FR", 5.0, at(0, hour=2))]
    labels = labels_frame(spark, [("e1", True, at(-19)), ("e3", True, at(0, hour=1, minute=30)),
                                  ("o1", True, at(-44)), ("e2", False, at(0))])
    history = tx_frame(spark, rows)
    targets = history.where("event_id in ('e5', 'e6', 'e7')")
    expected = evaluated(transaction_features(history, history, labels).where("event_id in ('e5', 'e6', 'e7')"))
    got = evaluated(transaction_features(targets, history, labels))
    assert_same(got, expected)
    # A history trimmed to the look-back gives the same values too, to the bit.
    narrow = history.where("event_id != 'o1'")
    assert_same(evaluated(transaction_features(targets, narrow, labels)), expected)
    row = {r["event_id"]: r for r in got[1]}
    assert row["e6"]["merchant_fraud_rate_30d"] == 0.25  # e1 of e1, e3, e4, e6 (e3 not reported at 01:04)
    assert row["e7"]["merchant_fraud_rate_30d"] == 0.4                   # e3 reported at 01:30 now counts


def test_amount_sums_are_exact_whatever_the_history(spark):
    """Sums are exact decimal sums (micro-USD integers), not float running sums: 0.1 + 0.2 + 0.3 is
    0.6, and a running total minus an older one leaves no rounding residue."""
    rows = [("a0", "u9", "m9", "FR", 1234567.123456, at(-2)),
            ("a1", "u9", "m9", "FR", 0.1, at(0, hour=1)),
            ("a2", "u9", "m9", "FR", 0.2, at(0, hour=1, minute=30)),
            ("a3", "u9", "m9", "FR", 0.3, at(0, hour=2))]
    history = tx_frame(spark, rows)
    got = {r["event_id"]: r for r in transaction_features(history, history, labels_frame(spark, [])).collect()}
    assert got["a3"]["user_amount_sum_24h"] == 0.6          # (0.1 + 0.2) + 0.3 == 0.6000000000000001 in floats
    assert got["a3"]["merchant_amount_sum_1h"] == 0.5       # a2 + a3; a1 is exactly 1 h before: out
    assert got["a3"]["user_amount_sum_7d"] == 1234567.723456
    windows = {r["window_start"]: r for r in user_windows_5m(history).collect()}
    assert {w["amount_sum"] for w in windows.values()} >= {0.1, 0.2, 0.3}


@pytest.mark.parametrize("seed, keys", [(1, "collected"), (2, "collected"), (1, "joined")])
def test_sliced_equals_sorted_on_random_edges_ties_and_labels(spark, seed, keys, monkeypatch):
    """The stream's sliced evaluation (edges of the look-back) against the sort of all of it, on
    random rows built to hit the edges: history rows exactly W before a target (and a microsecond
    either side) for every window, same-instant ties, labels reported before, at and after targets
    and just before the span, and events beyond the look-back. The history is pruned to the targets'
    keys by their values collected (few targets) or by a semi-join with them (many)."""
    if keys == "joined":
        monkeypatch.setattr(features_module, "INLINE_KEYS_MAX_TARGETS", 0)
    rng = random.Random(seed)
    lo = at(0, hour=10)  # the targets span [lo, lo + 50 min]
    windows = [timedelta(minutes=5), timedelta(hours=1), timedelta(days=1), timedelta(days=7), timedelta(days=30)]
    instants = [lo + timedelta(minutes=rng.randrange(0, 50), seconds=rng.choice([0, 0, 30])) for _ in range(14)]
    instants += [lo, lo]  # ties at the very start of the span
    past = [t - w + timedelta(microseconds=d) for t in instants[:6] for w in windows for d in (-1, 0, 1)]
    past += [lo - timedelta(minutes=rng.randrange(1, 60 * 24 * 32)) for _ in range(40)]
    rows = [(f"e{i:03d}", rng.choice(["u1", "u2", "u3"]), rng.choice(["m1", "m2", "m3"]), rng.choice(["FR", "DE"]),
             round(rng.uniform(1, 500), 2), t) for i, t in enumerate(sorted(instants) + past, 1)]
    n_targets = len(instants)
    labels = []
    for e, *_, t in rng.sample(rows, 30):
        reported = rng.choice([t, t + timedelta(minutes=rng.randrange(1, 90)), lo - timedelta(microseconds=1),
                               lo, t + timedelta(days=rng.randrange(0, 40)), t - timedelta(days=1)])
        labels.append((e, rng.random() < 0.8, reported))
    history, lab = tx_frame(spark, rows), labels_frame(spark, labels)
    targets = history.where(f"event_id <= 'e{n_targets:03d}'")
    sliced = evaluated(transaction_features(targets, history, lab, mode="sliced"))
    assert len(sliced[1]) == n_targets
    assert_same(sliced, evaluated(transaction_features(targets, history, lab, mode="sorted")))
    assert_same(evaluated(transaction_features(targets, history, lab, mode="driver")), sliced)
    # And both equal the backfill's rows (targets == history, sorted as its span is long).
    backfill = transaction_features(history, history, lab).where(f"event_id <= 'e{n_targets:03d}'")
    assert_same(sliced, evaluated(backfill))
    assert sum(r["merchant_fraud_rate_30d"] > 0 for r in sliced[1]) > 0  # labels do reach the targets


def _by_the_rules(rows, labels, targets):
    """The module docstring's rules read literally, one target at a time over every row (quadratic,
    pure Python, sharing no code with the evaluations): what each feature must be."""
    def micros(t):
        return (t - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1)

    windows = {"5m": 300, "1h": 3_600, "24h": 86_400, "7d": 7 * 86_400, "30d": 30 * 86_400}
    reported = {}  # a fraud label counts from its earliest report
    for e, is_fraud, r in labels:
        if is_fraud:
            reported[e] = min(reported.get(e, r), r)
    out = {}
    for e, u, m, c, a, t in targets:
        now, row = micros(t), {}

        def within(x, seconds, now=now):  # (t - W, t]
            return now - seconds * 1_000_000 < micros(x[5]) <= now

        for prefix, i, key in (("user", 1, u), ("merchant", 2, m), ("country", 3, c)):
            same = [x for x in rows if x[i] == key]
            for name, seconds in windows.items():
                inside = [x for x in same if within(x, seconds)]
                row[f"{prefix}_tx_count_{name}"] = len(inside)
                row[f"{prefix}_amount_sum_{name}"] = sum(round(x[4] * 1_000_000) for x in inside) / 1_000_000
            for name in ("1d", "7d", "30d") if prefix != "user" else ():
                inside = [x for x in same if within(x, windows.get(name, 86_400))]
                fraud = sum(1 for x in inside if x[0] in reported and micros(reported[x[0]]) <= now)
                row[f"{prefix}_fraud_rate_{name}"] = fraud / len(inside)
        month = [x for x in rows if x[1] == u and within(x, windows["30d"])]
        mean = sum(round(x[4] * 1_000_000) for x in month) / 1_000_000 / len(month)
        row["user_amount_ratio_30d"] = a / mean
        earlier = [x for x in month if (micros(x[5]), x[0]) < (now, e)]
        prev = max(earlier, key=lambda x: (micros(x[5]), x[0]), default=None)
        row["seconds_since_prev_user_tx"] = None if prev is None else (now - micros(prev[5])) / 1_000_000
        row["is_first_user_merchant"] = not any(x[2] == m for x in earlier)
        row["is_first_user_country"] = not any(x[3] == c for x in earlier)
        others = [x for x in month if x[0] != e]
        row["is_unusual_country"] = bool(others) and not any(x[3] == c for x in others)
        row["is_night"], row["is_weekend"] = t.hour < 6, t.weekday() >= 5
        out[e] = row
    return out


def test_every_feature_equals_the_rules_read_literally(spark):
    """An independent check of the rules themselves (the tests above compare the evaluations with
    each other): random rows on the windows' edges (exactly W before a target, a microsecond either
    side), same-instant ties, a weekend night, and labels reported before, at, a microsecond after
    and days after the targets, some events labelled twice; every feature of every target against
    :func:`_by_the_rules`."""
    rng = random.Random(3)
    lo = at(3, hour=5, minute=40)  # Saturday 05:40 UTC: the targets cross 06:00 (night, weekend)
    instants = [lo + timedelta(minutes=rng.randrange(0, 50), seconds=rng.choice([0, 0, 30]),
                               microseconds=rng.choice([0, 0, 1, 999_999])) for _ in range(20)]
    instants += [lo, lo, instants[3]]  # ties
    edges = [timedelta(minutes=5), timedelta(hours=1), timedelta(days=1), timedelta(days=7), timedelta(days=30)]
    past = [t - w + timedelta(microseconds=d) for t in instants[:8] for w in edges for d in (-1, 0, 1)]
    past += [lo - timedelta(minutes=rng.randrange(1, 60 * 24 * 32)) for _ in range(60)]
    rows = [(f"e{i:03d}", rng.choice(["u1", "u2", "u3"]), rng.choice(["m1", "m2", "m3"]),
             rng.choice(["FR", "DE", "US"]), round(rng.uniform(0.01, 500), 2), t)
            for i, t in enumerate(sorted(instants) + past, 1)]
    rows[5] = (*rows[5][:3], "JP", *rows[5][4:])  # a country no other row of its user has
    labels = [(e, rng.random() < 0.8, rng.choice([t, t + timedelta(microseconds=1), t - timedelta(days=1),
                                                   t + timedelta(minutes=rng.randrange(1, 90)),
                                                   t + timedelta(days=rng.randrange(0, 40))]))
              for e, *_, t in rng.sample(rows, 50)]
    labels += [(e, True, r + timedelta(days=2)) for e, _, r in labels[:10]]  # a later second report
    targets = rows[:len(instants)]
    want = _by_the_rules(rows, labels, targets)
    history = tx_frame(spark, rows)
    got = {r["event_id"]: r.asDict() for r in transaction_features(
        history.where(f"event_id <= '{targets[-1][0]}'"), history, labels_frame(spark, labels)).collect()}
    assert sorted(got) == sorted(want)
    for e, features in want.items():
        for name, value in features.items():
            assert got[e][name] == pytest.approx(value, rel=1e-12), (e, name)
    # The random rows reach every kind of value (else the comparison proves little).
    assert {r["is_night"] for r in want.values()} == {True, False}
    assert any(0 < r["merchant_fraud_rate_1d"] < 1 for r in want.values())
    assert any(r["seconds_since_prev_user_tx"] == 0.0 for r in want.values())
    assert {r["is_unusual_country"] for r in want.values()} == {True, False}
    assert set(want["e001"]) == set(FEATURE_COLUMNS)


@pytest.mark.parametrize("mode, keys", [("sorted", "collected"), ("sliced", "collected"), ("driver", "collected"),
                                       ("sorted", "joined"), ("sliced", "joined")])
def test_late_events_are_seen_only_by_late_targets(spark, mode, keys, monkeypatch):
    """``late_ids`` (gold's too-late events) in one pass: an on-time target gets the features of the
    history without the late events, a late target those of all of it -- the same values, to the
    bit, as two separate computations. Late events are among the targets and in the earlier history,
    share users, merchants, countries and instants with on-time ones, and carry fraud labels. In
    Spark, with the targets' keys collected and with them joined."""
    if keys == "joined":
        monkeypatch.setattr(features_module, "INLINE_KEYS_MAX_TARGETS", 0)
    rng = random.Random(7)
    lo = at(0, hour=10)
    instants = [lo + timedelta(minutes=rng.randrange(0, 40), seconds=rng.choice([0, 0, 30])) for _ in range(16)]
    past = [lo - timedelta(minutes=rng.randrange(1, 60 * 24 * 31)) for _ in range(40)]
    past += [lo - timedelta(minutes=3), lo - timedelta(minutes=3)]  # a late and an on-time event at one instant
    rows = [(f"e{i:03d}", rng.choice(["u1", "u2"]), rng.choice(["m1", "m2"]), rng.choice(["FR", "DE"]),
             round(rng.uniform(1, 500), 2), t) for i, t in enumerate(sorted(instants) + past, 1)]
    n_targets = len(instants)
    late = {"e002", "e005", "e009", f"e{n_targets + 3:03d}", f"e{n_targets + 11:03d}", f"e{len(rows):03d}"}
    labels = [(e, True, t + timedelta(minutes=rng.choice([0, 1, 90]))) for e, *_, t in rows if e in late]
    labels += [(e, True, t) for e, *_, t in rng.sample(rows, 12) if e not in late]
    history, lab = tx_frame(spark, rows), labels_frame(spark, labels)
    targets = history.where(f"event_id <= 'e{n_targets:03d}'")
    late_ids = spark.createDataFrame([(e,) for e in sorted(late)], "event_id string")
    late_targets = targets.join(late_ids, "event_id", "left_semi")

    got = evaluated(transaction_features(targets, history, lab, mode=mode, late_ids=late_ids))
    assert len(got[1]) == n_targets
    on_time = transaction_features(targets.join(late_ids, "event_id", "left_anti"),
                                   history.join(late_ids, "event_id", "left_anti"), lab, mode=mode)
    expected = on_time.unionByName(transaction_features(late_targets, history, lab, mode=mode))
    assert_same(got, evaluated(expected))
    # The late events do change what the two kinds of target see (else the test proves nothing).
    blind = {r["event_id"]: r for r in transaction_features(targets, history, lab, mode=mode).collect()}
    mine = {r["event_id"]: r for r in got[1]}
    assert any(mine[e]["country_tx_count_30d"] != blind[e]["country_tx_count_30d"] for e in mine if e not in late)
    assert all(mine[e] == blind[e] for e in late & set(mine))


@pytest.mark.parametrize("mode", ["sorted", "sliced"])
def test_a_late_target_missing_from_history_gets_its_row_both_ways(spark, mode, monkeypatch):
    """A too-late target that ``history`` does not hold (the contract allows it: it gets its row) is
    evaluated alike with the targets' keys collected and joined, beside an on-time one."""
    lo = at(0, hour=10)
    rows = [(f"e{i}", "u1", "m1", "FR", 10.0 + i, lo - timedelta(minutes=i)) for i in range(1, 6)]
    history = tx_frame(spark, rows)
    targets = history.where("event_id = 'e1'").unionByName(tx_frame(spark, [("x1", "u1", "m1", "FR", 7.0, lo)]))
    late_ids = spark.createDataFrame([("x1",)], "event_id string")
    lab = labels_frame(spark, [("e2", True, lo - timedelta(minutes=1))])
    collected = evaluated(transaction_features(targets, history, lab, mode=mode, late_ids=late_ids))
    monkeypatch.setattr(features_module, "INLINE_KEYS_MAX_TARGETS", 0)
    joined = evaluated(transaction_features(targets, history, lab, mode=mode, late_ids=late_ids))
    assert sorted(r["event_id"] for r in collected[1]) == ["e1", "x1"]
    assert_same(collected, joined)
    x1 = next(r for r in collected[1] if r["event_id"] == "x1")
    assert x1["merchant_tx_count_1h"] == 5  # the history's five, at its time; itself not in history


def test_mode_is_checked(spark):
    tx = tx_frame(spark, [("e1", "u1", "m1", "FR", 1.0, at())])
    with pytest.raises(ValueError, match="mode must be"):
        transaction_features(tx, tx, labels_frame(spark), mode="fast")


def test_driver_evaluation_ranks_times_when_keys_and_microseconds_do_not_fit(monkeypatch):
    """Many keys over a long span do not fit a key and a time in µs into one int64: the driver then
    codes times by rank, which must give the same features (no Spark here: arrays in, arrays out)."""
    import numpy as np

    from lakehouse.transforms import driver_features as drv
    from lakehouse.transforms.features import FRAUD_RATE_WINDOWS, LOOKBACK_SECONDS, TRAILING_WINDOWS

    rng = np.random.default_rng(3)
    n = 400
    t = np.sort(rng.integers(0, 40 * 86_400, n)) * 1_000_000 + 1_780_000_000_000_000
    t[0:-1:7] = t[1::7]  # ties
    user, merchant, country = rng.integers(0, 9, n), rng.integers(0, 5, n), rng.integers(0, 3, n)
    report = np.where(rng.random(n) < 0.3, t + rng.integers(-3_600, 20 * 86_400, n) * 1_000_000, drv.NO_REPORT)
    report[0] = t[0]  # a label at the earliest instant of all: the lowest rank
    a = rng.integers(1, 50_000_000, n)
    rows = drv.Rows(order=rng.permutation(n), user=user, merchant=merchant, country=country,
                    user_merchant=user * 5 + merchant, user_country=user * 3 + country, t=t, a=a,
                    amount=a / 1e6, report=report)
    at = np.flatnonzero(t > t[0] + 31 * 86_400 * 1_000_000)  # their look-back starts after the first row

    def evaluate():
        return drv.features(rows, at, TRAILING_WINDOWS, FRAUD_RATE_WINDOWS, LOOKBACK_SECONDS)

    exact = evaluate()
    monkeypatch.setattr(drv, "MAX_BITS", 30)
    assert drv._Axis(8, [t], int(t.min()) - 1, int(t.max()) + 1).ranks is not None  # the ranked path
    ranked = evaluate()
    for name, col in exact.items():
        assert np.array_equal(col.values, ranked[name].values, equal_nan=True), name
        assert (col.null is None and ranked[name].null is None) or np.array_equal(col.null, ranked[name].null), name
    assert exact["merchant_fraud_rate_30d"].values[-1] > 0 and exact["user_tx_count_30d"].values.max() > 10


def _driver_windows(spark, tx):
    """``user_windows_5m`` of ``tx`` computed by :func:`driver_features.windows_5m`, as a DataFrame."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from lakehouse.transforms import driver_features as dv

    table = tx.select("user_id", "merchant_id", "country", "amount_base",
                      F.unix_micros("event_time").alias("_t"),
                      F.round(F.col("amount_base") * 1_000_000).cast("long").alias("_a")).toArrow()
    codes = {c: dv._codes(table[c]) for c in ("user_id", "merchant_id", "country")}
    nulls = {c: pc.is_null(table[c]).to_numpy(zero_copy_only=False) for c in ("merchant_id", "country", "_a")}
    w = dv.windows_5m(codes["user_id"], table["_t"].to_numpy(), pc.fill_null(table["_a"], 0).to_numpy(),
                      nulls["_a"], pc.fill_null(table["amount_base"], float("nan")).to_numpy(),
                      codes["merchant_id"], nulls["merchant_id"], codes["country"], nulls["country"])
    ts = pa.timestamp("us", tz="UTC")
    out = pa.table({
        "user_id": table["user_id"].take(w["row"]), "window_start": pa.array(w["start"], ts),
        "window_end": pa.array(w["start"] + 300_000_000, ts), "tx_count": pa.array(w["tx_count"]),
        **{c: pa.array(w[c], mask=w[f"{c}_null"]) for c in ("amount_sum", "amount_mean", "amount_max")},
        "distinct_merchants": pa.array(w["distinct_merchants"]), "distinct_countries": pa.array(w["distinct_countries"]),
    })
    assert len(np.unique(np.stack([codes["user_id"][w["row"]], w["start"]]), axis=1)[0]) == out.num_rows
    return spark.createDataFrame(out)


@pytest.mark.parametrize("seed", [5, 6])
def test_driver_windows_equal_spark_windows_on_random_edges(spark, seed):
    # The stream computes the five-minute windows in the driver, the backfill in Spark: the same
    # rows to the bit, with events on minute boundaries, ties, null merchants and null amounts.
    rng = random.Random(seed)
    rows = []
    for i in range(300):
        t = at(minute=rng.randrange(0, 40), second=rng.choice([0, 0, 0, 59, rng.randrange(60)]),
               micro=rng.choice([0, 0, 1, 999_999]))
        amount = rng.choice([None, 0.01, 19.99, 123.456789, float(rng.randrange(1, 10_000)) / 100])
        rows.append((f"e{i:04d}", f"u{rng.randrange(6)}", rng.choice([None, "m1", "m2", "m3"]),
                     rng.choice(["FR", "DE", None]), amount, t))
    tx = tx_frame(spark, rows)
    want = user_windows_5m(tx)
    assertDataFrameEqual(_driver_windows(spark, tx).select(*want.columns), want, rtol=0, atol=0)


def test_driver_batch_tells_the_rows_no_earlier_batch_wrote():
    # The stream writes what driver_batch marks new by an insert-only MERGE and the rest by an upsert:
    # new = the batch's transactions, and the windows holding none of the earlier batches' events;
    # a window without new events is left as it is.
    import numpy as np
    import pyarrow as pa

    from lakehouse import gold

    # (event_id, user, merchant, minute past 12:00, batch)
    rows = [("e1", "u1", "m1", 0, 0), ("e2", "u1", "m1", 2, 1), ("e3", "u1", "m2", 20, 1),
            ("e4", "u2", "m3", 10, 1), ("e5", "u3", "m2", 30, 0), ("e6", "u1", "m4", 10, 0)]
    t = np.array([int(at(minute=m).timestamp()) * 1_000_000 for _, _, _, m, _ in rows])
    table = pa.table({
        "event_id": [r[0] for r in rows], "user_id": [r[1] for r in rows], "merchant_id": [r[2] for r in rows],
        "country": ["FR"] * len(rows), "amount_base": [10.0] * len(rows), "_t": t, "_a": [10_000_000] * len(rows),
        "_r": pa.nulls(len(rows), pa.int64()), "_late": [False] * len(rows),
        "event_time": pa.array(t, pa.timestamp("us", tz="UTC")),
        "event_date": pa.array([WED.date()] * len(rows), pa.date32()), "batch_id": [r[4] for r in rows],
    })
    batch = gold.driver_batch(table, gold.new_rows(table, 1, [str(WED.date())]))
    fresh = dict(zip(batch.features["event_id"].to_pylist(), batch.features_new.tolist()))
    # e5 (12:30, batch 0) shares merchant m2 with e3 (12:20): affected, recomputed, already in gold
    assert fresh == {"e2": True, "e3": True, "e4": True, "e5": False, "e6": False}
    windows = {(u, s.strftime("%H:%M")): new for u, s, new in zip(
        batch.windows["user_id"].to_pylist(), batch.windows["window_start"].to_pylist(), batch.windows_new.tolist())}
    # u1's windows from 11:58 (a minute-aligned 4 min before 12:02) to 12:20: those holding 12:00 exist
    assert {k for k, new in windows.items() if not new} == {("u1", "11:58"), ("u1", "11:59"), ("u1", "12:00")}
    assert {("u1", "12:01"), ("u1", "12:02"), ("u1", "12:16"), ("u1", "12:20"), ("u2", "12:06"),
            ("u2", "12:10")} <= {k for k, new in windows.items() if new}
    assert ("u1", "12:03") not in windows  # no event in [12:03, 12:08)
    assert not {("u1", f"12:{m:02d}") for m in range(6, 11)} & set(windows)  # only e6 (12:10), not new


def test_micros_in_numpy_round_half_up_as_spark_does(spark):
    # amount_base * 10^6 rounded half away from zero to a long: at x.5 exactly, just under and over it,
    # beyond 2^52 (already whole), and null.
    from lakehouse.transforms.features import _micros, micros_half_up

    rng = random.Random(3)
    amounts = [2.5e-6, 0.5e-6, 1.5e-6, 12.3456785, 0.0000004999999, 0.0000005000001, 1e10 + 0.5e-6,
               4503599627.3704965, 9.9e11, None, 1e-7, 123.4567895]
    amounts += [round(rng.uniform(0.01, 5000), rng.choice([2, 6, 7, 9])) for _ in range(2000)]
    amounts += [(k + 0.5) / 1e6 for k in range(500)]
    df = spark.createDataFrame([(i, a) for i, a in enumerate(amounts)], "i long, amount_base double")
    want = [r[0] for r in df.orderBy("i").select(_micros(F.col("amount_base"))).collect()]
    import pyarrow as pa

    assert micros_half_up(pa.array(amounts, pa.float64())).to_pylist() == want


def test_the_lookback_of_inserted_rows_equals_spark_s(spark):
    # A micro-batch's new silver rows, turned into look-back rows in the driver, equal what
    # lookback_rows collects through Spark: µs times and amounts, the earliest fraud report of each
    # event (several reports, a non-fraud label, a report without a time, a label of another event),
    # and nothing older than the 30-day look-back.
    import pyarrow as pa

    from lakehouse.transforms.features import fraud_reports, lookback_of_inserted, lookback_rows

    earliest = at(day=31, hour=0)
    rows = [("e1", "u1", "m1", "FR", 12.3456785, at(day=31, hour=1, micro=7)),
            ("e2", "u2", None, "DE", 0.0000025, at(day=31, hour=2)),
            ("e3", "u1", "m2", None, 99.99, at(day=32, hour=23, minute=59, second=59, micro=999_999)),
            ("e4", "u3", "m1", "FR", 1.0, at(day=0, hour=23)),  # 32 days before: out of the look-back
            ("e5", "u3", "m3", "FR", 7.25, at(day=1, hour=0, micro=1))]  # the look-back's first µs
    silver = tx_frame(spark, rows).withColumn("batch_id", F.lit(7).cast("long"))
    labels = labels_frame(spark, [("e1", True, at(day=35)), ("e1", True, at(day=33)), ("e2", False, at(day=31)),
                                  ("e3", True, None), ("e5", True, at(day=31, hour=5)), ("e9", True, at(day=30))])
    late = spark.createDataFrame([], "event_id string")
    want = lookback_rows(silver, earliest, labels, late).toArrow().sort_by("event_id")

    inserted = silver.select(*ID_COLUMNS, "batch_id").toArrow()
    inserted = inserted.set_column(inserted.schema.get_field_index("event_date"), "event_date",
                                   inserted["event_date"].cast(pa.string()))  # as a commit's partition value
    got = lookback_of_inserted(inserted, earliest, fraud_reports(labels).toArrow()).sort_by("event_id")
    assert got.column_names == want.column_names
    assert got.cast(want.schema).equals(want)
    assert got["event_id"].to_pylist() == ["e1", "e2", "e3", "e5"]
    assert got["_r"].to_pylist()[0] == int(at(day=33).timestamp()) * 1_000_000


def test_each_file_of_a_batch_is_judged_by_the_watermark_of_the_files_before_it():
    from lakehouse import gold

    minute = 60_000_000
    files = ["/in/a.jsonl", "/in/b.jsonl", "/in/c.jsonl", "/in/d.jsonl"]
    # a moves the watermark to 30, b inserted nothing, c only older events (it never goes back)
    latest = {"/in/a.jsonl": 30 * minute, "/in/c.jsonl": 20 * minute, "/in/d.jsonl": 45 * minute}
    assert gold.file_marks(25 * minute, files, latest) == {
        "/in/a.jsonl": 25 * minute, "/in/b.jsonl": 30 * minute, "/in/c.jsonl": 30 * minute,
        "/in/d.jsonl": 30 * minute}
    # no watermark before the batch (the query's first): the first file has none, the next a's
    assert gold.file_marks(None, files[:2], latest) == {"/in/a.jsonl": None, "/in/b.jsonl": 30 * minute}
    # b and c landed in the same millisecond: neither judges the other; d is judged by both
    written = {"/in/a.jsonl": 1000, "/in/b.jsonl": 2000, "/in/c.jsonl": 2000, "/in/d.jsonl": 3000}
    latest_bc = latest | {"/in/b.jsonl": 50 * minute}
    assert gold.file_marks(25 * minute, files, latest_bc, written) == {
        "/in/a.jsonl": 25 * minute, "/in/b.jsonl": 30 * minute, "/in/c.jsonl": 30 * minute,
        "/in/d.jsonl": 50 * minute}
    assert gold.file_marks(25 * minute, files, latest_bc) == {
        "/in/a.jsonl": 25 * minute, "/in/b.jsonl": 30 * minute, "/in/c.jsonl": 50 * minute,
        "/in/d.jsonl": 50 * minute}


def test_files_listed_with_one_modification_time_come_in_the_order_of_their_names():
    from lakehouse.io.paths import in_arrival_order

    taken = [("/in/z.jsonl", 5), ("/in/c.jsonl", 7), ("/in/b.jsonl", 7), ("/in/a.jsonl", 3), ("/in/y.jsonl", 7)]
    # (a restart folded two listings into one batch: the second starts at a.jsonl)
    assert in_arrival_order(taken) == [("/in/z.jsonl", 5), ("/in/b.jsonl", 7), ("/in/c.jsonl", 7),
                                       ("/in/a.jsonl", 3), ("/in/y.jsonl", 7)]
