"""Pure transforms on tiny DataFrames: parsing, typing, expectations, deduplication."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from pyspark.sql import Row
from pyspark.testing import assertDataFrameEqual

from lakehouse import quality
from lakehouse.streaming import LINES_SCHEMA
from lakehouse.transforms.bronze import to_bronze
from lakehouse.transforms.silver import (
    event_validation_frame,
    label_validation_frame,
    quarantine_rows,
    silver_events,
    silver_labels,
)

ARRIVAL = datetime(2026, 11, 2, 0, 0, tzinfo=timezone.utc)


def event(**over):
    base = dict(event_id="e1", user_id="u1", merchant_id="m1", amount=12.5, currency="EUR",
                country="FR", event_time="2026-11-01T12:00:00Z")
    base.update(over)
    return json.dumps({k: v for k, v in base.items() if v is not ...}, ensure_ascii=False)


def checked_events(spark, settings, lines, source="f1.jsonl"):
    df = spark.createDataFrame([(l, source, ARRIVAL) for l in lines], LINES_SCHEMA)
    frame = event_validation_frame(to_bronze(df, 7, ARRIVAL))
    return quality.apply_checks(frame, quality.event_checks(settings))


def failures(spark, settings, lines):
    rows = checked_events(spark, settings, lines).select("raw", "failed_checks").collect()
    return {r["raw"]: sorted(r["failed_checks"]) for r in rows}


CASES = [
    (event(), []),
    (event(amount="abc"), ["amount_is_number"]),
    (event(amount={"x": 1}), ["amount_is_number"]),
    (event(amount=-3), ["amount_positive_and_finite"]),
    (event(amount=0), ["amount_positive_and_finite"]),
    (event(amount=...), ["amount_not_null"]),
    (event(event_id=...), ["event_id_not_null"]),
    (event(user_id="  "), ["user_id_not_null"]),
    (event(currency="XXX"), ["currency_known"]),
    (event(country="ZZ"), ["country_is_iso3166"]),
    (event(event_time="2026-11-01 12:00:00"), ["event_time_is_iso8601_with_offset"]),
    (event(event_time="yesterday"), ["event_time_is_iso8601_with_offset"]),
    (event(event_time="2026-11-02T00:06:00Z"), ["event_time_not_in_future"]),
    (event(event_time="2020-01-01T00:00:00Z"), ["event_time_not_too_old"]),
    ('{"event_id": "e1", "amount": 3', ["record_is_valid_json"]),
    ("", ["record_is_valid_json"]),
    ("[1, 2]", ["record_is_valid_json"]),
    ('{"sku": "A-1", "qty": 3}', ["record_has_known_fields"]),
    (event(user_id="u\ufffd"), ["record_is_valid_utf8"]),  # what an undecodable byte became
    # Half a surrogate pair: Spark would read "u?" for both (two ids made one); a whole pair is a character.
    (event(user_id="uX").replace("uX", "u\\ud800"), ["record_is_valid_utf8"]),
    (event(event_id="s", user_id="uX").replace("uX", "u\\udc00"), ["record_is_valid_utf8"]),
    (event(event_id="t", user_id="uX").replace("uX", "u\\ud83d\\ude00"), []),
    # The pattern's shape, but no such date or time: Spark reads none, so the format check fails.
    (event(event_time="2026-02-30T12:00:00Z"), ["event_time_is_iso8601_with_offset"]),
    (event(event_time="2026-11-01T24:00:00Z"), ["event_time_is_iso8601_with_offset"]),
    (event(event_time="2026-11-01T12:00:00+19:00"), ["event_time_is_iso8601_with_offset"]),
    # Postgres cannot store a NUL; an id with a control character is corrupt.
    (event(user_id="u\u0000x"), ["text_has_no_control_characters"]),
    (event(merchant_id="m\u0007"), ["text_has_no_control_characters"]),
    # One value per line: Spark's parser would read the first and drop the rest without a word.
    (event(event_id="a") + event(event_id="b"), ["record_is_valid_json"]),
    (event(event_id="c") + " junk", ["record_is_valid_json"]),
    (event(event_id="d") + ', {"x": 1}', ["record_is_valid_json"]),
    (json.dumps({"event_id": "f", "meta": {"tags": ["}{", {"k": "]"}]}, "user_id": "u1", "merchant_id": "m1",
                 "amount": 3, "currency": "EUR", "country": "FR", "event_time": "2026-11-01T12:00:00Z"}) + "}",
     ["record_is_valid_json"]),
    (event(event_id="i") + "] junk}", ["record_is_valid_json"]),  # a "]" would close the parse's array
    ('{"event_id": "j", "tags": [1, 2]} ] }', ["record_is_valid_json"]),
    ("[" + event(event_id="k") + "]", ["record_is_valid_json"]),  # an array is not a record
    # ... and what is one value, nested or with spaces after it, or after a byte-order mark, is one.
    (json.dumps({"event_id": "g", "meta": {"tags": ["}{", {"k": "]"}]}, "user_id": "u1", "merchant_id": "m1",
                 "amount": 3, "currency": "EUR", "country": "FR", "event_time": "2026-11-01T12:00:00Z"}) + " \t ",
     []),
    ("\ufeff" + event(event_id="h"), []),
    # A field given twice: Spark's parser keeps the last, which may not be the one meant.
    (event(event_id="dup").replace('"amount": 12.5', '"amount": 5, "amount": 7'), ["record_has_unique_fields"]),
    (event(event_id="dup2").replace('"event_id": "dup2"', '"event_id": "dup2", "event_id": "dup2"'),
     ["record_has_unique_fields"]),
    (event(event_id="dup3").replace('"amount": 12.5', '"amount": 12.5, "note": 1, "note": 2'),
     ["record_has_unique_fields"]),
    (event(event_id="dup6").replace('"amount": 12.5', '"amount": 12.5, "amount": 7}'), ["record_is_valid_json"]),
    # ... not a name repeated inside a nested value, nor one in another case.
    (event(event_id="dup4", meta={"amount": 1, "user_id": "x"}), []),
    (event(event_id="dup5").replace('"amount": 12.5', '"amount": 12.5, "Amount": 9'), []),
]


def test_each_bad_record_fails_exactly_its_check(spark, settings):
    got = failures(spark, settings, [line for line, _ in CASES])
    assert got == {line: expected for line, expected in CASES}


def test_checks_compiled_once_serve_every_batch_as_built_anew(spark, settings):
    # A stream compiles its suite once and applies it to each micro-batch's new frame.
    compiled = quality.compile_checks(quality.event_checks(settings))
    for batch, cases in enumerate((CASES[:9], CASES[9:])):
        df = spark.createDataFrame([(line, "f", ARRIVAL) for line, _ in cases], LINES_SCHEMA)
        frame = event_validation_frame(to_bronze(df, batch, ARRIVAL))
        got = quality.apply_checks(frame, compiled).select("raw", "failed_checks", "warned_checks", "failed_fatal")
        anew = quality.apply_checks(frame, quality.event_checks(settings)).select(got.columns)
        assert {r["raw"]: sorted(r["failed_checks"]) for r in got.collect()} == dict(cases)
        assertDataFrameEqual(got, anew)


def test_invalid_utf8_bytes_are_quarantined(spark, settings):
    # The text source hands over the file's bytes unchecked; build such a row the same way.
    raw = event(user_id="J\u00fcrgen").encode("latin-1")
    df = spark.createDataFrame([(bytearray(raw), "f", ARRIVAL)], "value binary, source_file string, file_modified_at timestamp")
    df = df.selectExpr("cast(value as string) as value", "source_file", "file_modified_at")
    checked = quality.apply_checks(event_validation_frame(to_bronze(df, 0, ARRIVAL)), quality.event_checks(settings))
    assert checked.select("failed_checks").first()[0] == ["record_is_valid_utf8"]


def test_oversized_record_is_quarantined_by_size(spark, settings):
    small = settings.replace(max_record_bytes=200)
    big = event(merchant_id="m" * 300)
    df = spark.createDataFrame([(big, "f", ARRIVAL), (event(), "f", ARRIVAL)], LINES_SCHEMA)
    checked = quality.apply_checks(event_validation_frame(to_bronze(df, 0, ARRIVAL)), quality.event_checks(small))
    assert sorted(map(sorted, [r[0] for r in checked.select("failed_checks").collect()])) == [
        [], ["record_within_size_limit"]]


def test_future_tolerance_is_relative_to_file_arrival(spark, settings):
    # 4 minutes after the file arrived is within the default 5-minute tolerance; 6 is not.
    got = failures(spark, settings, [event(event_id="a", event_time="2026-11-02T00:04:00Z"),
                                     event(event_id="b", event_time="2026-11-02T00:06:00Z")])
    assert sorted(got.values()) == [[], ["event_time_not_in_future"]]


def test_silver_types_converts_and_normalises(spark, settings):
    lines = [
        event(event_id="e1", amount="100", currency="usd", country="us", event_time="2026-11-01T10:00:00-05:00"),
        event(event_id="e2", amount=1000, currency="JPY", country="JP", event_time="2026-11-01T23:30:00.250+09:00"),
    ]
    got = silver_events(checked_events(spark, settings, lines)).select(
        "event_id", "amount", "currency", "amount_base", "country", "event_time", "event_date", "batch_id")
    expected = spark.createDataFrame([
        Row(event_id="e1", amount=100.0, currency="USD", amount_base=100.0, country="US",
            event_time=datetime(2026, 11, 1, 15, 0), event_date=datetime(2026, 11, 1).date(), batch_id=7),
        Row(event_id="e2", amount=1000.0, currency="JPY", amount_base=6.7, country="JP",
            event_time=datetime(2026, 11, 1, 14, 30, 0, 250000), event_date=datetime(2026, 11, 1).date(), batch_id=7),
    ], got.schema)
    assertDataFrameEqual(got, expected)


def test_every_time_form_the_pattern_admits_is_read_as_the_instant_it_names(spark, settings):
    # RFC 3339's lower-case t and z, and a time without seconds, which Spark's parser alone reads as none.
    times = {"a": "2026-11-01t10:00:00z", "b": "2026-11-01T10:00Z", "c": "2026-11-01 10:00+01:30",
             "d": "2026-11-01T10:00:00.5-0100"}
    checked = checked_events(spark, settings, [event(event_id=k, event_time=t) for k, t in times.items()])
    assert checked.where("size(failed_checks) > 0").count() == 0
    got = {r.event_id: r.event_time for r in silver_events(checked).collect()}
    assert got == {"a": datetime(2026, 11, 1, 10), "b": datetime(2026, 11, 1, 10),
                   "c": datetime(2026, 11, 1, 8, 30), "d": datetime(2026, 11, 1, 11, 0, 0, 500000)}


def test_duplicates_within_a_batch_keep_one_row(spark, settings):
    lines = [event(event_id="e1"), event(event_id="e1"), event(event_id="e2"), event(event_id="e1")]
    got = silver_events(checked_events(spark, settings, lines))
    assert sorted(r.event_id for r in got.collect()) == ["e1", "e2"]


def test_dedup_choice_is_deterministic_for_conflicting_copies(spark, settings):
    a, b = event(event_id="e1", amount=5), event(event_id="e1", amount=6)
    first = silver_events(checked_events(spark, settings, [a, b])).collect()
    second = silver_events(checked_events(spark, settings, [b, a])).collect()
    assert [r.amount for r in first] == [r.amount for r in second]


def test_the_first_file_to_arrive_wins_whatever_its_name(spark, settings):
    # Two deliveries of e1 with other amounts in one batch: the file the stream took first wins,
    # as it would in separate batches (its insert first), not the one whose name sorts first.
    from lakehouse.streaming import ranked

    a = checked_events(spark, settings, [event(event_id="e1", amount=5)], source="file:/in/z-early.jsonl")
    b = checked_events(spark, settings, [event(event_id="e1", amount=6), event(event_id="e2")],
                       source="file:///in/a-late.jsonl")
    lines, uris = a.unionByName(b), ["file:/in/z-early.jsonl", "file:///in/a-late.jsonl"]
    got = {r.event_id: r.amount for r in silver_events(ranked(lines, ["/in/z-early.jsonl", "/in/a-late.jsonl"],
                                                                 uris)).collect()}
    assert got == {"e1": 5.0, "e2": 12.5}
    # without the order of arrival (one file, or none known): the name decides
    assert {r.event_id: r.amount for r in silver_events(ranked(lines, [], uris)).collect()} == {"e1": 6.0, "e2": 12.5}


def test_quarantine_keeps_raw_text_and_check_names(spark, settings):
    lines = [event(event_id="ok"), event(event_id="bad", currency="XXX", country="ZZ"), "{oops"]
    q = quarantine_rows(checked_events(spark, settings, lines, source="inbox/x.jsonl"), "events")
    rows = {r["raw"]: r for r in q.collect()}
    assert set(rows) == {lines[1], "{oops"}
    assert sorted(rows[lines[1]]["failed_checks"]) == ["country_is_iso3166", "currency_known"]
    assert rows[lines[1]]["record_key"] == "bad"
    assert rows["{oops"]["kind"] == "events" and rows["{oops"]["source_file"] == "inbox/x.jsonl"
    assert rows["{oops"]["batch_id"] == 7
    # A check found in the driver (a line read unfinished) is added to the names of the lines it names.
    q = quarantine_rows(checked_events(spark, settings, lines, source="inbox/x.jsonl"), "events",
                        ("line_incomplete_when_read", [("inbox/x.jsonl", "{oops"), ("inbox/y.jsonl", lines[1])]))
    got = {r["raw"]: r["failed_checks"] for r in q.collect()}
    assert got == {"{oops": ["record_is_valid_json", "line_incomplete_when_read"],
                   lines[1]: rows[lines[1]]["failed_checks"]}


def test_warning_checks_do_not_quarantine(spark, settings):
    checked = checked_events(spark, settings, [event(amount=90_000, currency="USD")])
    row = checked.select("failed_checks", "warned_checks").first()
    assert row["failed_checks"] == [] and row["warned_checks"] == ["amount_below_review_limit"]


def test_labels_typed_deduplicated_earliest_report_wins(spark, settings):
    def label(**over):
        base = dict(event_id="e1", is_fraud=True, scenario="card_testing", reported_at="2026-11-01T10:00:00Z")
        base.update(over)
        return json.dumps({k: v for k, v in base.items() if v is not ...}, ensure_ascii=False)

    lines = [label(), label(reported_at="2026-10-30T10:00:00Z"), label(event_id="e2", is_fraud="maybe"),
             label(event_id="e3", is_fraud=False, scenario="none"), label(event_id=...),
             label(event_id="e4", scenario="card\u0000testing"),
             label(event_id="e5").replace('"is_fraud": true', '"is_fraud": true, "is_fraud": false')]
    df = spark.createDataFrame([(l, "l.jsonl", ARRIVAL) for l in lines], LINES_SCHEMA)
    checked = quality.apply_checks(label_validation_frame(to_bronze(df, 1, ARRIVAL)), quality.label_checks(settings))
    got = {r.event_id: (r.is_fraud, r.reported_at) for r in silver_labels(checked).collect()}
    assert got == {"e1": (True, datetime(2026, 10, 30, 10)), "e3": (False, datetime(2026, 11, 1, 10))}
    bad = sorted(sorted(r[0]) for r in quarantine_rows(checked, "labels").select("failed_checks").collect())
    assert bad == [["event_id_not_null"], ["is_fraud_is_boolean"], ["record_has_unique_fields"],
                   ["text_has_no_control_characters"]]


@pytest.mark.parametrize("kind", ["events", "labels"])
def test_severities_are_declared_for_every_check(settings, kind):
    checks = quality.checks_for(kind, settings)
    names = [c.name for c in checks]
    assert len(names) == len(set(names))
    assert all(c.severity in quality.SEVERITIES for c in checks)
    assert all(c.expectation.meta["check"] == c.name for c in checks)
