"""The express lane's Python reading of an inbox line (lakehouse.express.parse_event): what silver
would insert, and None for anything silver quarantines or might read otherwise."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from lakehouse.config import Settings
from lakehouse.express import parse_event, parse_events
from lakehouse.io.paths import file_name

MTIME_MS = int(datetime(2026, 11, 21, tzinfo=timezone.utc).timestamp() * 1000)
SETTINGS = Settings.from_env({"LAKEHOUSE_DATA": "/tmp/unused"})


def line(**over) -> bytes:
    rec = {"event_id": "e1", "user_id": "u1", "merchant_id": "m1", "amount": 12.5, "currency": "EUR",
           "country": "FR", "event_time": "2026-11-20T10:00:00Z"}
    rec.update(over)
    return json.dumps({k: v for k, v in rec.items() if v is not ...}).encode()


def test_a_valid_event_is_read_as_silver_types_it():
    row = parse_event(line(amount="  12.5", currency="eur", country="fr", user_id=" u1 ",
                           event_time="2026-11-20 11:30:00.123456+01:30"), MTIME_MS, SETTINGS)
    assert row["user_id"] == "u1" and row["country"] == "FR"
    assert row["amount_base"] == round(12.5 * 1.08, 6)  # EUR at the reference rate
    assert row["_t"] == int(datetime(2026, 11, 20, 10, 0, 0, 123456, tzinfo=timezone.utc).timestamp() * 10**6)
    # an offset without a colon, and a negative one
    assert parse_event(line(event_time="2026-11-20T05:00:00-0500"), MTIME_MS, SETTINGS)["_t"] == \
        parse_event(line(), MTIME_MS, SETTINGS)["_t"]


@pytest.mark.parametrize("raw", [
    b"", b"   ", b"{not json", b"[1, 2]", b'"text"', line()[:-3],
    line(event_id=...), line(event_id="  "), line(user_id=None), line(merchant_id=""),
    line(amount="n/a"), line(amount="12,50"), line(amount=0), line(amount=-3), line(amount="1e400"),
    line(amount=2e9), line(amount={"value": 1}), line(amount=[12.5]), line(amount=True),
    line(currency="XXX"), line(currency=...), line(country="ZZ"), line(country="FRA"),
    line(event_time="2026-11-20"), line(event_time="12345"), line(event_time="2026-11-20T10:00:00"),
    line(event_time="2026-02-30T10:00:00Z"), line(event_time="2026-11-20T10:00:00.1234567Z"),
    line(event_time="2026-11-20T10:00Z"), line(event_time="2026-11-20T10:00:00+25:00"),
    line(event_time="2027-01-01T00:00:00Z"),  # in the future of its file
    line(event_time="2020-01-01T00:00:00Z"),  # older than a year
    line(event_id=123),  # a number where silver reads the text Spark makes of it: left to the stream
    line(Event_id="e2"),  # a field name in another case
    b'{"event_id": "e1", "event_id": "e2", "user_id": "u1"}',  # a duplicate key
    line(amount=float("nan")).replace(b"NaN", b"NaN"),
    line(user_id="caf\u00e9").replace(b"\\u00e9", "\u00e9".encode("latin-1")),  # not UTF-8
    line(user_id="x").replace(b'"x"', '"\ufffd"'.encode()),  # what the text source makes of a bad byte
    line(user_id="u\u0000"), line(merchant_id="m\u0085"),  # a control character in an id
    line(user_id="u\ud800"),  # half a surrogate pair
    line() + b" " + line(event_id="e2"),  # two values on one line
])
def test_what_silver_quarantines_or_might_read_otherwise_is_left_to_the_stream(raw):
    assert parse_event(raw, MTIME_MS, SETTINGS) is None


def test_a_record_over_the_size_limit_is_left_out():
    big = line(note="x" * 500)
    assert parse_event(big, MTIME_MS, SETTINGS) is not None
    assert parse_event(big, MTIME_MS, SETTINGS.replace(max_record_bytes=300)) is None


def test_a_file_keeps_one_row_per_event_the_smallest_line_as_silver_does():
    data = b"\n".join([line(amount=20), line(amount=10), line(event_id="e2"), b"broken", b""]) + b"\r\n"
    rows, left_out = parse_events(data, MTIME_MS, SETTINGS)
    assert sorted(r["event_id"] for r in rows) == ["e1", "e2"]
    e1 = next(r for r in rows if r["event_id"] == "e1")
    assert e1["_raw"] == min(line(amount=20), line(amount=10)).decode()
    assert left_out == 2  # the broken line and the second delivery of e1 (the blank line is no record)


def test_file_names_from_spark_uris_and_paths():
    assert file_name("file:///data/inbox/events/events-1%202.jsonl") == "events-1 2.jsonl"
    assert file_name("file:/data/inbox/events/e.jsonl") == "e.jsonl"
    assert file_name("/data/inbox/events/e.jsonl") == "e.jsonl"
