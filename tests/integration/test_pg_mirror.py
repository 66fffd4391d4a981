"""The Postgres mirror against a real embedded server: upserts, idempotency, atomicity, outages.

Every test gets its own server in a tmp_path data root (initdb + start take ~1 s), stopped (or
killed) at teardown. No mocks: assertions read the tables back.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import threading
import time

import numpy as np
import pandas as pd
import psycopg2
import pyarrow as pa
import pytest

from lakehouse.config import Settings
from lakehouse.io import pg_mirror as mirror
from lakehouse.io import postgres as pg
from lakehouse.io.pg_mirror import MirrorTable
from tests.conftest import stop_postgres

pytestmark = pytest.mark.integration

SCHEMA = "lakehouse"
UTC = dt.timezone.utc

SCORES = MirrorTable(
    name="scores",
    columns=(("txn_id", "text"), ("card_id", "text"), ("amount", "double precision"),
             ("n_items", "bigint"), ("is_fraud", "boolean"), ("event_ts", "timestamptz"),
             ("note", "text")),
    key=("txn_id",),
    indexes=(("card_id",), ("card_id", "event_ts")),
)
COLS = SCORES.column_names


@pytest.fixture
def pg_settings(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAKEHOUSE_")}
    settings = Settings.from_env({**env, "LAKEHOUSE_DATA": str(tmp_path / "data")})
    pg.start(settings)
    yield settings
    stop_postgres(settings)


@pytest.fixture
def conn(pg_settings):
    c = pg.connect(pg_settings)
    mirror.ensure_schema(c, SCHEMA, [SCORES])
    yield c
    c.close()


@pytest.fixture
def copies(monkeypatch) -> list[str]:
    """The format of every COPY the mirror runs, in order."""
    seen: list[str] = []
    copy = mirror._copy

    def recorded(cur, target, columns, data):
        seen.append(data.format)
        return copy(cur, target, columns, data)

    monkeypatch.setattr(mirror, "_copy", recorded)
    return seen


@pytest.fixture(params=["binary", "csv"])
def copy_format(request, monkeypatch, copies) -> str:
    """Each test run twice: the rows COPYed in Postgres' binary format (every column of a type both
    sides write alike), and as CSV (the path a column of any other type takes)."""
    if request.param == "csv":
        monkeypatch.setattr(mirror, "_column_types", lambda cur, relation: None)
    yield request.param
    assert copies and set(copies) == {request.param}


def ts(text: str) -> pd.Timestamp:
    return pd.Timestamp(text, tz="UTC")


def frame(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(COLS))


def contents(conn, table: str = "scores") -> list[tuple]:
    with conn.cursor() as cur:
        cur.execute(f"SELECT * FROM {SCHEMA}.{table} ORDER BY 1")
        rows = cur.fetchall()
    conn.rollback()
    return rows


def ledger(conn) -> list[tuple]:
    with conn.cursor() as cur:
        cur.execute(f"SELECT source, table_name, version, rows FROM {SCHEMA}._mirror_ledger ORDER BY 1, 2")
        rows = cur.fetchall()
    conn.rollback()
    return rows


def as_db(row: tuple) -> tuple:
    """A frame row as psycopg2 returns it (None for NaN/NaT, aware datetimes)."""
    out = []
    for v in row:
        if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NaT:
            out.append(None)
        elif isinstance(v, pd.Timestamp):
            out.append(v.to_pydatetime())
        else:
            out.append(v)
    return tuple(out)


BATCH1 = [
    ("t1", "c1", 10.5, 1, False, ts("2024-01-01 10:00:00"), "first"),
    ("t2", "c1", 20.0, 2, True, ts("2024-01-01 10:01:00"), "second"),
    ("t3", "c2", 30.25, 3, False, ts("2024-01-01 10:02:00"), None),
]


def test_upsert_insert_update_and_replay_is_noop(conn):
    assert mirror.applied_version(conn, SCHEMA, "gold.scores", "scores") is None
    assert mirror.upsert_batch(conn, SCHEMA, SCORES, frame(BATCH1), "gold.scores", 1) == 3
    assert contents(conn) == [as_db(r) for r in BATCH1]
    assert ledger(conn) == [("gold.scores", "scores", 1, 3)]
    assert mirror.applied_version(conn, SCHEMA, "gold.scores", "scores") == 1

    batch2 = [
        BATCH1[0],                                                                 # unchanged
        ("t2", "c1", 21.0, 2, False, ts("2024-01-01 10:01:00"), "second, fixed"),  # changed
        ("t4", "c3", 40.0, None, None, ts("2024-01-01 10:03:00"), "new"),          # new
    ]
    # 2 rows written: the unchanged t1 is not rewritten (IS DISTINCT FROM), t3 is kept
    assert mirror.upsert_batch(conn, SCHEMA, SCORES, frame(batch2), "gold.scores", 2) == 2
    expected = [as_db(batch2[0]), as_db(batch2[1]), as_db(BATCH1[2]), as_db(batch2[2])]
    assert contents(conn) == expected
    assert ledger(conn) == [("gold.scores", "scores", 2, 2)]

    # the unchanged row really was not updated: its xmin (inserting transaction) is still batch 1's
    with conn.cursor() as cur:
        cur.execute(f"SELECT txn_id, xmin::text::bigint FROM {SCHEMA}.scores ORDER BY txn_id")
        xmin = dict(cur.fetchall())
    conn.rollback()
    assert xmin["t1"] == xmin["t3"] != xmin["t2"] == xmin["t4"]

    # re-applying version 2 or an older version: nothing happens
    clobber = frame([("t1", "zz", -1.0, 9, True, ts("2030-01-01"), "clobber")])
    assert mirror.upsert_batch(conn, SCHEMA, SCORES, clobber, "gold.scores", 2) == 0
    assert mirror.upsert_batch(conn, SCHEMA, SCORES, clobber, "gold.scores", 1) == 0
    assert contents(conn) == expected
    assert ledger(conn) == [("gold.scores", "scores", 2, 2)]

    # another source has its own ledger row for the same table
    assert mirror.upsert_batch(conn, SCHEMA, SCORES, clobber, "backfill", 1) == 1
    assert ledger(conn) == [("backfill", "scores", 1, 1), ("gold.scores", "scores", 2, 2)]
    assert contents(conn)[0] == as_db(clobber.iloc[0].tolist())


def test_rows_published_ahead_of_the_mirror_never_overwrite_a_newer_applied_version(conn):
    # Nothing applied yet: a writer's rows about to become version 1 are served at once, ledger untouched.
    assert mirror.publish_ahead(conn, SCHEMA, SCORES, frame(BATCH1), "gold.scores", before=0) == 3
    assert contents(conn) == [as_db(r) for r in BATCH1]
    assert ledger(conn) == []
    # The mirror then applies version 1 holding the same rows: nothing to rewrite, the ledger moves.
    assert mirror.upsert_batch(conn, SCHEMA, SCORES, frame(BATCH1), "gold.scores", 1) == 0
    assert ledger(conn) == [("gold.scores", "scores", 1, 0)]

    # Rows computed after version 1 (to become version 2) are published over version 1's.
    fixed = ("t2", "c1", 21.0, 2, False, ts("2024-01-01 10:01:00"), "fixed in version 2")
    assert mirror.publish_ahead(conn, SCHEMA, SCORES, frame([fixed]), "gold.scores", before=1) == 1
    assert contents(conn)[1] == as_db(fixed)
    assert ledger(conn) == [("gold.scores", "scores", 1, 0)]  # a write of the mirror's: not forgotten
    # The mirror applies version 3 (t2 changed again); rows computed before it arrive late: skipped.
    again = ("t2", "c1", 22.0, 2, True, ts("2024-01-01 10:01:00"), "version 3")
    assert mirror.upsert_batch(conn, SCHEMA, SCORES, frame([again]), "gold.scores", 3) == 1
    assert mirror.publish_ahead(conn, SCHEMA, SCORES, frame([fixed]), "gold.scores", before=1) is None
    assert mirror.publish_ahead(conn, SCHEMA, SCORES, frame([fixed]), "gold.scores", before=None) is None
    assert contents(conn)[1] == as_db(again)
    assert ledger(conn) == [("gold.scores", "scores", 3, 1)]


def test_a_source_created_again_replaces_the_rows_whatever_its_versions(conn):
    # Versions 1..5 of a Delta table whose id is "a", mirrored; the old ledger had no id at first.
    assert mirror.upsert_batch(conn, SCHEMA, SCORES, frame(BATCH1), "delta:scores", 4) == 3
    with conn.cursor() as cur:  # a ledger made before the ids were kept: read as None, then upgraded
        cur.execute(f"ALTER TABLE {SCHEMA}._mirror_ledger DROP COLUMN source_id")
    conn.commit()
    assert mirror.ledger_entry(conn, SCHEMA, "delta:scores", "scores") == (4, None)
    mirror.ensure_schema(conn, SCHEMA, [SCORES])
    assert mirror.upsert_batch(conn, SCHEMA, SCORES, frame(BATCH1[:1]), "delta:scores", 5, source_id="a") == 0
    assert mirror.ledger_entry(conn, SCHEMA, "delta:scores", "scores") == (5, "a")
    # The table is deleted and created again ("b"): its version 2 is older than the ledger's 5, and it
    # no longer holds t1 and t3. Its snapshot replaces the table's rows; the ledger starts anew.
    fresh = [("t2", "c1", 20.0, 2, True, ts("2024-01-01 10:01:00"), "second"),
             ("t9", "c9", 9.0, 9, False, ts("2024-01-02 00:00:00"), "only in b")]
    assert mirror.publish_ahead(conn, SCHEMA, SCORES, frame(fresh), "delta:scores", 5, source_id="b") is None
    assert mirror.upsert_batch(conn, SCHEMA, SCORES, frame(fresh), "delta:scores", 2, source_id="b") == 2
    assert contents(conn) == [as_db(r) for r in fresh]
    assert mirror.ledger_entry(conn, SCHEMA, "delta:scores", "scores") == (2, "b")
    # From then on, versions of "b" count as before; a writer that knows no id changes nothing.
    assert mirror.upsert_batch(conn, SCHEMA, SCORES, frame(BATCH1), "delta:scores", 2, source_id="b") == 0
    assert mirror.upsert_batch(conn, SCHEMA, SCORES, frame(BATCH1), "delta:scores", 1) == 0
    assert contents(conn) == [as_db(r) for r in fresh]


def test_a_write_outside_the_mirror_makes_the_ledger_forget_the_table(conn, pg_settings):
    # The ledger vouches that the table holds a version of its source; an INSERT, UPDATE or DELETE by
    # anything else (a person, a script) breaks that. A trigger deletes the table's entries in the
    # writer's transaction and warns the writer; the mirror's own writes leave them.
    events = MirrorTable(name="events", columns=(("event_id", "text"), ("note", "text")), key=("event_id",))
    mirror.ensure_schema(conn, SCHEMA, [events])
    mirror.ensure_journal(conn, SCHEMA)
    rows = pd.DataFrame({"event_id": ["e1", "e2"], "note": ["one", "two"]})
    assert mirror.upsert_batch(conn, SCHEMA, events, rows, "delta:events", 1) == 2
    provisional = pd.DataFrame({"event_id": ["e3"], "note": ["provisional"]})
    assert mirror.publish_provisional(conn, SCHEMA, events, provisional, "f.jsonl") == ["e3"]
    assert mirror.resolve_provisional(conn, SCHEMA, events, ["e3"], orphans=["e3"]) == 1
    assert mirror.publish_ahead(conn, SCHEMA, events, rows.assign(note="two, again"), "delta:events", 1) == 2
    assert ledger(conn) == [("delta:events", "events", 1, 2)]

    with conn.cursor() as cur:  # a foreign write rolled back forgets nothing
        cur.execute(f"DELETE FROM {SCHEMA}.events")
    conn.rollback()
    assert ledger(conn) == [("delta:events", "events", 1, 2)]
    version = 1
    for op, statement in (("DELETE", "DELETE FROM {}.events WHERE event_id = 'e1'"),
                          ("UPDATE", "UPDATE {}.events SET note = 'by hand'"),
                          ("INSERT", "INSERT INTO {}.events VALUES ('stray', 'by hand')")):
        version += 1
        assert mirror.upsert_batch(conn, SCHEMA, events, rows, "delta:events", version) >= 0
        assert mirror.upsert_batch(conn, SCHEMA, SCORES, frame(BATCH1), "delta:scores", version) >= 0
        del conn.notices[:]
        with conn.cursor() as cur:
            cur.execute(statement.format(SCHEMA))
        conn.commit()
        assert ledger(conn) == [("delta:scores", "scores", version, 3 if version == 2 else 0)], op
        assert [n.strip() for n in conn.notices] == [
            f"WARNING:  {SCHEMA}.events was written outside the lakehouse mirror ({op}): the mirror reloads it "
            "whole from its Delta table at its next round"], op
    # Changes read after the version the ledger held then are refused: it forgot the table since.
    with pytest.raises(mirror.LedgerForgotten, match="held version 4 when the changes after it were read"):
        mirror.upsert_batch(conn, SCHEMA, events, rows.iloc[:1], "delta:events", version + 1, since=version)
    # The next batch of a forgotten table is its whole source: equal rows stay as they are, the stray
    # row goes, and the ledger holds the version again.
    assert contents(conn, "events") == [("e1", "one"), ("e2", "two"), ("stray", "by hand")]
    assert mirror.upsert_batch(conn, SCHEMA, events, rows, "delta:events", version + 1, whole=True) == 0
    assert contents(conn, "events") == [("e1", "one"), ("e2", "two")]
    assert ledger(conn)[0] == ("delta:events", "events", version + 1, 0)

    # A write not committed yet when a batch starts: the batch waits for it (a shared advisory lock
    # the write's trigger took), then sees its rows. Otherwise the write would commit after the batch,
    # its forget finding no ledger entry to delete, and the stray row would stay under a new version.
    with conn.cursor() as cur:
        cur.execute(f"INSERT INTO {SCHEMA}.events VALUES ('late stray', 'by hand')")
    other = pg.connect(pg_settings)
    try:
        batch = threading.Thread(target=mirror.upsert_batch, kwargs={"whole": True},
                                 args=(other, SCHEMA, events, rows, "delta:events", version + 2))
        batch.start()
        batch.join(1.0)
        assert batch.is_alive()  # waiting for the write's transaction
        conn.commit()
        batch.join(30)
    finally:
        other.close()
    assert contents(conn, "events") == [("e1", "one"), ("e2", "two")]
    assert ledger(conn)[0] == ("delta:events", "events", version + 2, 0)

    # A trigger function an older release made (another body, no SECURITY DEFINER) is brought up to date.
    with conn.cursor() as cur:
        cur.execute(f"CREATE OR REPLACE FUNCTION {SCHEMA}._mirror_forget() RETURNS trigger LANGUAGE plpgsql "
                    "AS $$ BEGIN RETURN NULL; END $$")
    conn.commit()
    mirror.ensure_schema(conn, SCHEMA, [events])
    with conn.cursor() as cur:
        cur.execute("SELECT proname, prosecdef, position('DELETE FROM' in prosrc) > 0 FROM pg_proc "
                    "WHERE proname = ANY(%s) ORDER BY 1", (["_mirror_forget", "_mirror_foreign_write",
                                                            "_mirror_foreign_lock"],))
        assert cur.fetchall() == [("_mirror_foreign_lock", True, False), ("_mirror_foreign_write", True, True),
                                  ("_mirror_forget", True, True)]
    conn.rollback()


def test_duplicate_keys_in_one_batch_keep_the_last(conn, copy_format):
    rows = [
        ("t1", "c1", 1.0, 1, False, ts("2024-01-01"), "first t1"),
        ("t2", "c1", 2.0, 2, False, ts("2024-01-01"), "only t2"),
        ("t1", "c1", 3.0, 3, True, ts("2024-01-02"), "second t1"),
        ("t1", "c9", 4.0, 4, False, ts("2024-01-03"), "last t1"),
    ]
    assert mirror.upsert_batch(conn, SCHEMA, SCORES, frame(rows), "s", 1) == 2
    assert contents(conn) == [as_db(rows[3]), as_db(rows[1])]


def test_a_first_load_goes_straight_into_the_empty_table_and_still_keeps_the_last_row_of_a_key(conn):
    loaded = MirrorTable(name="loaded", columns=SCORES.columns, key=SCORES.key, indexes=SCORES.indexes,
                         loaded_at="mirrored_at")
    mirror.ensure_schema(conn, SCHEMA, [loaded])
    rows = [(f"t{i:05d}", f"c{i % 7}", i / 4, i, i % 3 == 0, ts("2024-01-01") + pd.Timedelta(seconds=i), f"n{i}")
            for i in range(5000)]
    # A NULL key fails the load (no fallback hides it), and leaves the table and the ledger empty.
    bad = frame(rows)
    bad.loc[4000, "txn_id"] = None
    with pytest.raises(psycopg2.errors.NotNullViolation):
        mirror.upsert_batch(conn, SCHEMA, loaded, bad, "s", 1)
    assert contents(conn, "loaded") == [] and ledger(conn) == []

    # A key repeated at the end of a first load: the last row of the key wins, as in a merge.
    again = ("t00002", "c9", -1.0, -1, True, ts("2025-01-01"), "last t00002")
    assert mirror.upsert_batch(conn, SCHEMA, loaded, frame(rows + [again]), "s", 1) == 5000
    got = {r[0]: r[:7] for r in contents(conn, "loaded")}
    assert len(got) == 5000 and got["t00002"] == as_db(again) and got["t04999"] == as_db(rows[4999])
    assert ledger(conn) == [("s", "loaded", 1, 5000)]

    # A rebuilt (emptied) table is loaded straight again; every row gets its mirrored_at.
    with conn.cursor() as cur:
        cur.execute(f"TRUNCATE {SCHEMA}.loaded")
    conn.commit()
    assert mirror.upsert_batch(conn, SCHEMA, loaded, frame(rows), "s", 2) == 5000
    assert sorted(r[:7] for r in contents(conn, "loaded")) == [as_db(r) for r in rows]
    with conn.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {SCHEMA}.loaded WHERE mirrored_at > now() - interval '1 hour'")
        assert cur.fetchone()[0] == 5000
    conn.rollback()
    # Then the table holds rows: the next batch merges (unchanged rows are not rewritten).
    assert mirror.upsert_batch(conn, SCHEMA, loaded, frame(rows[:10] + [again]), "s", 3) == 1


def _index_defs(conn, table: str) -> dict[str, str]:
    with conn.cursor() as cur:
        cur.execute("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = %s AND tablename = %s",
                    (SCHEMA, table))
        defs = dict(cur.fetchall())
        cur.execute("SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
                    "WHERE conrelid = %s::regclass", (f"{SCHEMA}.{table}",))
        defs.update({f"constraint {name}": d for name, d in cur.fetchall()})
    conn.rollback()
    return defs


def test_a_large_first_load_builds_the_indexes_after_the_copy(conn, pg_settings, monkeypatch, caplog):
    monkeypatch.setattr(mirror, "BULK_LOAD_ROWS", 1000)
    bulk = MirrorTable(name="bulk", columns=SCORES.columns, key=SCORES.key, indexes=SCORES.indexes,
                       loaded_at="mirrored_at")
    mirror.ensure_schema(conn, SCHEMA, [bulk])
    with conn.cursor() as cur:  # an index the mirror does not declare (an analyst's) is kept too
        cur.execute(f"CREATE UNIQUE INDEX bulk_note_uq ON {SCHEMA}.bulk (note)")
    conn.commit()
    indexes = _index_defs(conn, "bulk")
    assert {"bulk_pkey", "bulk_card_id_idx", "bulk_card_id_event_ts_idx", "bulk_note_uq",
            "constraint bulk_pkey"} <= set(indexes)
    rows = [(f"t{i:05d}", f"c{i % 7}", i / 4, i, i % 3 == 0, ts("2024-01-01") + pd.Timedelta(seconds=i), f"n{i}")
            for i in range(5000)]
    caplog.set_level("INFO", logger="lakehouse.io.pg_mirror")

    # A repeated key: the rebuilt primary key fails, the savepoint restores the table with its
    # indexes, and the rows are merged (the last row of the key wins).
    again = ("t00002", "c9", -1.0, -1, True, ts("2025-01-01"), "last t00002")
    assert mirror.upsert_batch(conn, SCHEMA, bulk, frame(rows + [again]), "s", 1) == 5000
    got = {r[0]: r[:7] for r in contents(conn, "bulk")}
    assert len(got) == 5000 and got["t00002"] == as_db(again)
    assert _index_defs(conn, "bulk") == indexes
    assert "indexes built after" not in caplog.text

    # An emptied table: the rows are copied first, then every index is built as it was.
    with conn.cursor() as cur:
        cur.execute(f"TRUNCATE {SCHEMA}.bulk")
    conn.commit()
    assert mirror.upsert_batch(conn, SCHEMA, bulk, frame(rows), "s", 2) == 5000
    assert "bulk: 4 indexes built after the first load of 5000 rows" in caplog.text
    assert sorted(r[:7] for r in contents(conn, "bulk")) == [as_db(r) for r in rows]
    assert _index_defs(conn, "bulk") == indexes
    with conn.cursor() as cur, pytest.raises(psycopg2.errors.UniqueViolation):
        cur.execute(f"INSERT INTO {SCHEMA}.bulk (txn_id) VALUES ('t00007')")
    conn.rollback()
    assert ledger(conn) == [("s", "bulk", 2, 5000)]

    # A reader holds the emptied table: the load does not wait for it past BULK_LOCK_TIMEOUT, and
    # copies with the indexes in place.
    with conn.cursor() as cur:
        cur.execute(f"TRUNCATE {SCHEMA}.bulk")
    conn.commit()
    monkeypatch.setattr(mirror, "BULK_LOCK_TIMEOUT", "200ms")
    reader = pg.connect(pg_settings)
    try:
        with reader.cursor() as cur:
            cur.execute(f"SELECT count(*) FROM {SCHEMA}.bulk")  # ACCESS SHARE, held until its transaction ends
        assert mirror.upsert_batch(conn, SCHEMA, bulk, frame(rows), "s", 3) == 5000
    finally:
        reader.close()
    assert "bulk: first load with its indexes in place (canceling statement due to lock timeout)" in caplog.text
    assert sorted(r[:7] for r in contents(conn, "bulk")) == [as_db(r) for r in rows]
    assert _index_defs(conn, "bulk") == indexes
    with conn.cursor() as cur:
        cur.execute("SHOW lock_timeout")
        assert cur.fetchone()[0] == "0"
    conn.rollback()


def test_values_round_trip_exactly(conn, copy_format):
    nasty = [
        'comma, "quotes", \'single\'',
        "line1\nline2\r\nline3\r",
        "\\.",                      # COPY's end-of-data marker, alone
        "before\n\\.\nafter",       # ... and alone on a line inside a value
        "",                         # empty string is not NULL
        "  padded  ",
        "tab\there; semi;colon",
        "unicode: ü é ß 中文 😀 \u2028",
        "NULL",
        "\\N",
        "back\\slash",
    ]
    floats = [0.1, 1 / 3, 1e-300, 1.7976931348623157e308, 5e-324, -0.0, float("inf"), -float("inf"),
              123456789.123456789, -2.5]
    stamps = [ts("2024-02-29 23:59:59.999999"), ts("1970-01-01"), ts("2099-12-31 00:00:00.000001"),
              pd.Timestamp("2024-06-01 12:00:00.5", tz="Europe/Paris"),  # another zone: same instant
              pd.Timestamp("2024-11-03 07:30:00.000250", tz="America/New_York")]
    rows = []
    for i in range(len(nasty)):
        rows.append((f"k{i:02d}", nasty[i], floats[i % len(floats)], i, [True, False][i % 2],
                     stamps[i % len(stamps)], nasty[-1 - i]))
    rows += [
        ("n1", None, np.nan, None, None, pd.NaT, None),       # every kind of null
        ("n2", "x", float("nan"), 7, True, None, "NaN"),
    ]
    df = frame(rows)
    df["n_items"] = df["n_items"].astype("float64")  # int column with missing values, as pandas makes it
    df["is_fraud"] = df["is_fraud"].astype("object")
    assert mirror.upsert_batch(conn, SCHEMA, SCORES, df, "s", 1) == len(rows)
    got = {r[0]: r for r in contents(conn)}
    assert len(got) == len(rows)
    for row in rows:
        want = as_db(row)
        have = got[row[0]]
        assert have[1] == want[1] and have[6] == want[6], row[0]          # text exact
        if want[2] is None:
            assert have[2] is None
        else:
            assert have[2] == want[2] and math.copysign(1, have[2]) == math.copysign(1, want[2])
        assert have[3] == want[3] and (have[3] is None or isinstance(have[3], int))
        assert have[4] is want[4]                                          # True/False/None
        assert have[5] == want[5]                                          # same instant
        if have[5] is not None:
            assert have[5].utcoffset() == dt.timedelta(0)
    assert got["n1"] == ("n1", None, None, None, None, None, None)
    assert got["n2"][2] is None and got["n2"][6] == "NaN"
    with conn.cursor() as cur:  # empty string and NULL stay distinct
        cur.execute(f"SELECT count(*) FILTER (WHERE card_id = ''), count(*) FILTER (WHERE card_id IS NULL) "
                    f"FROM {SCHEMA}.scores")
        assert cur.fetchone() == (1, 1)
    conn.rollback()


def test_pyarrow_table_input(conn, copy_format):
    table = pa.table({
        "note": pa.array(["a", None]),  # column order differs from the table's; extra column ignored
        "txn_id": pa.array(["p1", "p2"]),
        "card_id": pa.array(["c", "d"]).dictionary_encode(),
        "amount": pa.array([float("nan"), 1.5]),
        "n_items": pa.array([1, None], pa.int32()),
        "is_fraud": pa.array([True, None]),
        "event_ts": pa.array([1_700_000_000_123_456_789, None], pa.timestamp("ns", tz="UTC")),
        "extra": pa.array([1, 2]),
    })
    assert mirror.upsert_batch(conn, SCHEMA, SCORES, table, "arrow", 5) == 2
    assert contents(conn) == [
        ("p1", "c", None, 1, True, dt.datetime(2023, 11, 14, 22, 13, 20, 123456, tzinfo=UTC), "a"),
        ("p2", "d", 1.5, None, None, None, None),
    ]
    with pytest.raises(ValueError, match="lacks columns"):
        mirror.upsert_batch(conn, SCHEMA, SCORES, table.drop(["note"]), "arrow", 6)
    assert ledger(conn) == [("arrow", "scores", 5, 2)]


def test_deletes_by_key(conn, copy_format):
    mirror.upsert_batch(conn, SCHEMA, SCORES, frame(BATCH1), "s", 1)
    upd = frame([("t5", "c5", 5.0, 5, False, ts("2024-01-05"), "five")])
    n = mirror.upsert_batch(conn, SCHEMA, SCORES, upd, "s", 2,
                            deletes=pd.DataFrame({"txn_id": ["t1", "t3", "missing"]}))
    assert n == 1
    assert contents(conn) == [as_db(BATCH1[1]), as_db(upd.iloc[0].tolist())]
    # a delete-only batch (no rows) is recorded too, and its replay is a no-op
    empty = frame([])
    assert mirror.upsert_batch(conn, SCHEMA, SCORES, empty, "s", 3,
                               deletes=pd.DataFrame({"txn_id": ["t2"]})) == 0
    assert [r[0] for r in contents(conn)] == ["t5"]
    assert ledger(conn) == [("s", "scores", 3, 0)]
    mirror.upsert_batch(conn, SCHEMA, SCORES, frame(BATCH1), "s", 3, deletes=pd.DataFrame({"txn_id": ["t5"]}))
    assert [r[0] for r in contents(conn)] == ["t5"]


def test_rows_go_as_csv_where_the_binary_format_would_not_carry_them(conn, copies):
    # Binary COPY when every column's Arrow type pairs with the column's type in Postgres: text, integers,
    # floats of the same width, booleans, dates, timestamps (a first load, then a staged upsert and deletes).
    assert mirror.upsert_batch(conn, SCHEMA, SCORES, frame(BATCH1), "s", 1) == 3
    assert mirror.upsert_batch(conn, SCHEMA, SCORES, frame(BATCH1[:1]), "s", 2,
                               deletes=pd.DataFrame({"txn_id": ["t3"]})) == 0
    assert copies == ["binary", "binary", "binary"]

    # jsonb: CSV, its text cast by Postgres.
    copies.clear()
    notes = MirrorTable(name="notes", columns=(("id", "text"), ("tags", "jsonb"), ("n", "integer")), key=("id",))
    mirror.ensure_schema(conn, SCHEMA, [notes])
    assert mirror.upsert_batch(conn, SCHEMA, notes, pa.table({"id": ["a"], "tags": ['{"k": [1, 2]}'],
                                                              "n": pa.array([7], pa.int64())}), "j", 1) == 1
    assert copies == ["csv"] and contents(conn, "notes") == [("a", {"k": [1, 2]}, 7)]

    # An int64 too large for an integer column: CSV, so Postgres refuses it with its own words.
    copies.clear()
    with pytest.raises(psycopg2.errors.NumericValueOutOfRange, match="out of range for type integer"):
        mirror.upsert_batch(conn, SCHEMA, notes, pa.table({"id": ["b"], "tags": [None],
                                                           "n": pa.array([1 << 40], pa.int64())}), "j", 2)
    conn.rollback()
    assert copies == ["csv"] and contents(conn, "notes") == [("a", {"k": [1, 2]}, 7)]

    # A column a view keeps in another type than declared (numeric for bigint): CSV, parsed by Postgres.
    copies.clear()
    with conn.cursor() as cur:
        cur.execute(f"ALTER TABLE {SCHEMA}.scores ALTER COLUMN n_items TYPE numeric")
        cur.execute(f"CREATE VIEW {SCHEMA}.scores_view AS SELECT txn_id, n_items FROM {SCHEMA}.scores")
    conn.commit()
    mirror.ensure_schema(conn, SCHEMA, [SCORES])
    later = [("t1", "c1", 10.5, 41, False, ts("2024-01-01 10:00:00"), "first")]
    assert mirror.upsert_batch(conn, SCHEMA, SCORES, frame(later), "s", 3) == 1
    assert copies == ["csv"] and contents(conn)[0][3] == 41

    # A connection whose client encoding is not UTF-8 reads a binary COPY's text in it: CSV, which says UTF8.
    copies.clear()
    conn.set_client_encoding("LATIN1")
    assert mirror.upsert_batch(conn, SCHEMA, SCORES, frame([("t9", "c9", 1.0, 1, True, ts("2024-01-09"),
                                                                "caf\u00e9")]), "s", 4) == 1
    assert copies == ["csv"] and contents(conn)[-1][-1] == "caf\u00e9"


def deleted_days(conn) -> dict[tuple[str, dt.date], dt.datetime]:
    with conn.cursor() as cur:
        cur.execute(f"SELECT table_name, day, deleted_at FROM {SCHEMA}._mirror_deleted_days")
        rows = {(r[0], r[1]): r[2] for r in cur.fetchall()}
    conn.rollback()
    return rows


def test_every_delete_records_the_days_of_the_rows_it_removed(conn):
    # The days a deletion changed, for models that recompute the days whose rows changed: a deleted row
    # leaves nothing behind to say so. Each table says which days a row marks (here its UTC event day,
    # and for a note the day of the score it names, looked up in the schema).
    scores = MirrorTable(name="scores", columns=SCORES.columns, key=SCORES.key,
                         deleted_days=("o.event_ts AT TIME ZONE 'UTC'",))
    notes = MirrorTable(name="notes", columns=(("txn_id", "text"), ("text", "text")), key=("txn_id",),
                        deleted_days=("(SELECT s.event_ts AT TIME ZONE 'UTC' FROM {schema}.scores AS s "
                                      "WHERE s.txn_id = o.txn_id)",))
    mirror.ensure_schema(conn, SCHEMA, [scores, notes])
    rows = BATCH1 + [("t4", "c3", 1.0, 1, False, ts("2024-01-02 23:59:59.999999"), None),
                     ("t5", "c3", 1.0, 1, False, ts("2024-01-03 00:00:00"), None)]
    mirror.upsert_batch(conn, SCHEMA, scores, frame(rows), "s", 1)
    mirror.upsert_batch(conn, SCHEMA, notes, pd.DataFrame({"txn_id": ["t4", "gone"], "text": ["a", "b"]}), "n", 1)
    assert deleted_days(conn) == {}  # inserts and updates mark nothing here (their mirrored_at does)

    # the mirror's own deletes: by key (a change feed's deletes) ...
    mirror.upsert_batch(conn, SCHEMA, notes, pd.DataFrame(columns=["txn_id", "text"]), "n", 2,
                        deletes=pd.DataFrame({"txn_id": ["t4", "gone"]}))  # "gone" names no score: no day
    assert set(deleted_days(conn)) == {("notes", dt.date(2024, 1, 2))}
    mirror.upsert_batch(conn, SCHEMA, scores, frame([]), "s", 2, deletes=pd.DataFrame({"txn_id": ["t1", "t4"]}))
    assert set(deleted_days(conn)) == {("notes", dt.date(2024, 1, 2)), ("scores", dt.date(2024, 1, 1)),
                                       ("scores", dt.date(2024, 1, 2))}
    # ... and the rows a whole load does not hold; the day's record keeps the last delete's time
    before = deleted_days(conn)[("scores", dt.date(2024, 1, 2))]
    mirror.upsert_batch(conn, SCHEMA, scores, frame([BATCH1[1], rows[4]]), "s2", 1, whole=True)  # t3 goes
    after = deleted_days(conn)
    assert after[("scores", dt.date(2024, 1, 1))] > before and after[("scores", dt.date(2024, 1, 2))] == before
    assert [r[0] for r in contents(conn)] == ["t2", "t5"]

    # a DELETE by hand too (the mirror forgets the table and loads it whole again)
    with conn, conn.cursor() as cur:
        cur.execute(f"DELETE FROM {SCHEMA}.scores WHERE txn_id = 't5'")
    assert ("scores", dt.date(2024, 1, 3)) in deleted_days(conn)
    assert len(deleted_days(conn)) == 4

    # a TRUNCATE by hand: no transition table, so the days are read from the table before it is emptied
    mirror.upsert_batch(conn, SCHEMA, scores, frame([rows[2]]), "s3", 1)  # t3, 2024-01-01
    mirror.upsert_batch(conn, SCHEMA, notes, pd.DataFrame({"txn_id": ["t3"], "text": ["d"]}), "n", 5)
    before = deleted_days(conn)
    with conn, conn.cursor() as cur:
        cur.execute(f"TRUNCATE {SCHEMA}.notes, {SCHEMA}.scores")  # notes' day is looked up before scores empties
    after = deleted_days(conn)
    assert contents(conn) == [] and set(after) == set(before) | {("notes", dt.date(2024, 1, 1))}
    assert after[("scores", dt.date(2024, 1, 1))] > before[("scores", dt.date(2024, 1, 1))]
    assert after[("scores", dt.date(2024, 1, 2))] == before[("scores", dt.date(2024, 1, 2))]

    # a day looked up in a table that is gone is not known, and the delete goes on without it
    mirror.upsert_batch(conn, SCHEMA, notes, pd.DataFrame({"txn_id": ["t2"], "text": ["c"]}), "n", 3)
    with conn, conn.cursor() as cur:
        cur.execute(f"DROP TABLE {SCHEMA}.scores")
    mirror.upsert_batch(conn, SCHEMA, notes, pd.DataFrame(columns=["txn_id", "text"]), "n", 4,
                        deletes=pd.DataFrame({"txn_id": ["t2"]}))
    assert contents(conn, "notes") == [] and len(deleted_days(conn)) == 5


def test_a_column_the_table_lacks_is_added_and_its_rows_are_brought_whole(conn, caplog):
    # A source that gained a column (a new release's gold table), or a column someone dropped by hand:
    # the rows already in the table have no value in it, which no version after the ledger's brings.
    assert mirror.upsert_batch(conn, SCHEMA, SCORES, frame(BATCH1), "delta:scores", 1) == 3
    with conn.cursor() as cur:
        cur.execute(f"ALTER TABLE {SCHEMA}.scores DROP COLUMN note")
    conn.commit()
    mirror.ensure_schema(conn, SCHEMA, [SCORES])
    assert "scores lacked columns note after delta:scores version 1 was applied" in caplog.text
    assert ledger(conn) == [] and [r[6] for r in contents(conn)] == [None, None, None]
    # t3's note is null anyway: only t1 and t2 are rewritten
    assert mirror.upsert_batch(conn, SCHEMA, SCORES, frame(BATCH1), "delta:scores", 1, whole=True) == 2
    assert contents(conn) == [as_db(r) for r in BATCH1]
    mirror.ensure_schema(conn, SCHEMA, [SCORES])  # nothing lacking: the ledger stays
    assert ledger(conn) == [("delta:scores", "scores", 1, 2)]


def test_a_primary_key_dropped_by_hand_is_restored_and_the_table_loaded_whole(conn, caplog):
    # Every upsert names the key (ON CONFLICT), so without it each batch would fail, round after round;
    # and rows written meanwhile may hold a key twice, so the key cannot simply be added back.
    scores = MirrorTable(name="scores", columns=SCORES.columns, key=SCORES.key, indexes=SCORES.indexes,
                         deleted_days=("o.event_ts AT TIME ZONE 'UTC'",))

    def primary_key() -> list[tuple]:
        with conn.cursor() as cur:
            cur.execute("SELECT conname, array_agg(a.attname::text ORDER BY a.attname) FROM pg_constraint k "
                        "JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = ANY(k.conkey) "
                        "WHERE k.conrelid = %s::regclass AND k.contype = 'p' GROUP BY conname",
                        (f"{SCHEMA}.scores",))
            rows = cur.fetchall()
        conn.rollback()
        return rows

    assert primary_key() == [("scores_pkey", ["txn_id"])]
    for change in ("DROP CONSTRAINT scores_pkey", "DROP CONSTRAINT scores_pkey, ADD PRIMARY KEY (txn_id, card_id)"):
        assert mirror.upsert_batch(conn, SCHEMA, scores, frame(BATCH1), "delta:scores", 1, whole=True) >= 0
        with conn.cursor() as cur:
            cur.execute(f"ALTER TABLE {SCHEMA}.scores {change}")
            cur.execute(f"INSERT INTO {SCHEMA}.scores (txn_id, card_id) VALUES ('t1', 'c9')")  # t1 twice now
        conn.commit()
        caplog.clear()
        mirror.ensure_schema(conn, SCHEMA, [scores])
        assert "scores lost its primary key (txn_id)" in caplog.text and "loaded whole" in caplog.text, change
        assert primary_key() == [("scores_pkey", ["txn_id"])] and contents(conn) == [] and ledger(conn) == []
        assert set(deleted_days(conn)) == {("scores", dt.date(2024, 1, 1))}  # the marts hear of its rows' day
        assert mirror.upsert_batch(conn, SCHEMA, scores, frame(BATCH1), "delta:scores", 1, whole=True) == 3
        assert contents(conn) == [as_db(r) for r in BATCH1]
    caplog.clear()
    mirror.ensure_schema(conn, SCHEMA, [scores])  # keyed as declared: nothing happens
    assert "primary key" not in caplog.text and ledger(conn) == [("delta:scores", "scores", 1, 3)]


def test_a_column_type_changed_by_hand_is_put_back_and_the_table_loaded_whole(conn, caplog):
    # The rows are COPYed through a staging table LIKE the target: a double made integer rounds (or
    # fails) every value with a fraction, and a timestamp made text is served as a string.
    scores = MirrorTable(name="scores", columns=SCORES.columns, key=SCORES.key, indexes=SCORES.indexes,
                         loaded_at="mirrored_at", deleted_days=("o.event_ts AT TIME ZONE 'UTC'",))

    def types() -> dict[str, str]:
        with conn.cursor() as cur:
            cur.execute("SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = "
                        "%s::regclass AND attnum > 0 AND NOT attisdropped", (f"{SCHEMA}.scores",))
            rows = dict(cur.fetchall())
        conn.rollback()
        return rows

    def load() -> list[tuple]:
        assert mirror.upsert_batch(conn, SCHEMA, scores, frame(BATCH1), "delta:scores", 1, whole=True) >= 0
        rows = contents(conn)
        assert all(r[-1] is not None for r in rows)  # mirrored_at, by its default
        return [r[:-1] for r in rows]

    mirror.ensure_schema(conn, SCHEMA, [scores])
    declared = types()
    assert declared["amount"] == "double precision" and declared["mirrored_at"] == "timestamp with time zone"
    assert load() == [as_db(r) for r in BATCH1]
    with conn.cursor() as cur:
        cur.execute(f"ALTER TABLE {SCHEMA}.scores ALTER COLUMN amount TYPE integer, "
                    "ALTER COLUMN mirrored_at TYPE text")
    conn.commit()
    assert [r[2] for r in contents(conn)] == [10, 20, 30]  # 10.5 and 30.25 rounded
    caplog.clear()
    mirror.ensure_schema(conn, SCHEMA, [scores])
    assert "amount is integer, not double precision" in caplog.text and "loaded whole" in caplog.text
    assert "mirrored_at is text, not timestamptz" in caplog.text
    assert types() == declared and contents(conn) == [] and ledger(conn) == []
    assert set(deleted_days(conn)) == {("scores", dt.date(2024, 1, 1))}  # the marts hear of its rows' day
    assert load() == [as_db(r) for r in BATCH1]  # 10.5 again
    caplog.clear()
    mirror.ensure_schema(conn, SCHEMA, [scores])  # the declared types: nothing happens
    assert "scores" not in caplog.text and ledger(conn) == [("delta:scores", "scores", 1, 3)]

    # A column a view reads cannot change type: the table is left as it is, and the warning says why.
    with conn.cursor() as cur:
        cur.execute(f"ALTER TABLE {SCHEMA}.scores ALTER COLUMN n_items TYPE numeric")
        cur.execute(f"CREATE VIEW {SCHEMA}.scores_view AS SELECT txn_id, n_items FROM {SCHEMA}.scores")
    conn.commit()
    caplog.clear()
    mirror.ensure_schema(conn, SCHEMA, [scores])
    assert "n_items is numeric, not bigint" in caplog.text and f"{SCHEMA}.scores_view" in caplog.text
    assert types()["n_items"] == "numeric" and len(contents(conn)) == 3 and len(ledger(conn)) == 1


def test_composite_key_and_key_only_table(conn):
    windows = MirrorTable("card_windows", (("card_id", "text"), ("window_start", "timestamptz"),
                                           ("n", "integer"), ("total", "numeric(12,2)")),
                          key=("card_id", "window_start"))
    seen = MirrorTable("seen", (("id", "bigint"),), key=("id",))
    mirror.ensure_schema(conn, SCHEMA, [SCORES, windows, seen])
    w = pd.DataFrame({"card_id": ["a", "a", "b"], "window_start": [ts("2024-01-01 00:00"), ts("2024-01-01 00:05"),
                                                                    ts("2024-01-01 00:00")],
                      "n": [1, 2, 3], "total": [1.25, 2.5, 3.75]})
    assert mirror.upsert_batch(conn, SCHEMA, windows, w, "w", 1) == 3
    w2 = w.assign(n=[1, 20, 3])
    assert mirror.upsert_batch(conn, SCHEMA, windows, w2, "w", 2) == 1
    mirror.upsert_batch(conn, SCHEMA, windows, w.iloc[:0], "w", 3, deletes=w[["card_id", "window_start"]].iloc[:1])
    with conn.cursor() as cur:
        cur.execute(f"SELECT card_id, n, total::text FROM {SCHEMA}.card_windows ORDER BY 1, window_start")
        assert cur.fetchall() == [("a", 20, "2.50"), ("b", 3, "3.75")]
    conn.rollback()
    assert mirror.upsert_batch(conn, SCHEMA, seen, pd.DataFrame({"id": [3, 1, 3]}), "x", 1) == 2
    assert mirror.upsert_batch(conn, SCHEMA, seen, pd.DataFrame({"id": [1, 2]}), "x", 2) == 1  # DO NOTHING
    assert [r[0] for r in contents(conn, "seen")] == [1, 2, 3]


def test_schema_has_primary_key_indexes_and_ledger(conn):
    with conn.cursor() as cur:
        cur.execute("SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = %s "
                    "ORDER BY tablename, indexname", (SCHEMA,))
        idx = cur.fetchall()
    conn.rollback()
    defs = {(t, name): d for t, name, d in idx}
    assert defs[("scores", "scores_pkey")].startswith("CREATE UNIQUE INDEX scores_pkey")
    assert defs[("scores", "scores_pkey")].endswith("(txn_id)")
    assert defs[("scores", "scores_card_id_idx")].endswith("(card_id)")
    assert defs[("scores", "scores_card_id_event_ts_idx")].endswith("(card_id, event_ts)")
    assert defs[("_mirror_ledger", "_mirror_ledger_pkey")].endswith("(source, table_name)")
    with conn.cursor() as cur:
        cur.execute("SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = %s "
                    "AND table_name = '_mirror_ledger' ORDER BY ordinal_position", (SCHEMA,))
        assert cur.fetchall() == [("source", "text"), ("table_name", "text"), ("version", "bigint"),
                                  ("rows", "bigint"), ("applied_at", "timestamp with time zone"),
                                  ("source_id", "text")]
        cur.execute("SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
                    "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = 'lakehouse.scores'::regclass "
                    "AND i.indisprimary")
        assert cur.fetchall() == [("txn_id",)]
    conn.rollback()

    # idempotent, and a new declared column is added to the existing table
    wider = MirrorTable(SCORES.name, SCORES.columns + (("model", "text"),), SCORES.key, SCORES.indexes)
    mirror.upsert_batch(conn, SCHEMA, SCORES, frame(BATCH1), "s", 1)
    conn.autocommit = True  # ensure_schema works in autocommit mode too
    mirror.ensure_schema(conn, SCHEMA, [wider])
    mirror.ensure_schema(conn, SCHEMA, [wider])
    conn.autocommit = False
    assert [r[:7] for r in contents(conn)] == [as_db(r) for r in BATCH1]
    assert all(r[7] is None for r in contents(conn))


def test_failure_after_copy_changes_nothing(conn, monkeypatch):
    mirror.upsert_batch(conn, SCHEMA, SCORES, frame(BATCH1), "s", 1)
    before, before_ledger = contents(conn), ledger(conn)
    big = frame([(f"x{i}", "c", float(i), i, False, ts("2024-03-01"), "new") for i in range(1000)]
                + [("t1", "changed", 0.0, 0, True, ts("2024-03-01"), "changed")])

    # 1. the merge and deletes ran inside the transaction; then the ledger step fails
    def boom(*args, **kwargs):
        raise RuntimeError("crash between data and ledger")

    monkeypatch.setattr(mirror, "_record_version", boom)
    with pytest.raises(RuntimeError, match="crash between"):
        mirror.upsert_batch(conn, SCHEMA, SCORES, big, "s", 2, deletes=pd.DataFrame({"txn_id": ["t2"]}))
    monkeypatch.undo()
    assert contents(conn) == before and ledger(conn) == before_ledger
    assert conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE

    # 2. a database error: a NULL key (NOT NULL violation) in the middle of the batch
    bad = big.copy()
    bad.loc[500, "txn_id"] = None
    with pytest.raises(psycopg2.errors.NotNullViolation):
        mirror.upsert_batch(conn, SCHEMA, SCORES, bad, "s", 2)
    assert contents(conn) == before and ledger(conn) == before_ledger

    # 3. a conversion error while staging (a fractional value for a bigint column)
    bad2 = big.astype({"n_items": "float64"})
    bad2.loc[3, "n_items"] = 1.5
    with pytest.raises(ValueError, match="non-integer"):
        mirror.upsert_batch(conn, SCHEMA, SCORES, bad2, "s", 2)
    assert contents(conn) == before and ledger(conn) == before_ledger

    # the same batch then applies cleanly, once
    assert mirror.upsert_batch(conn, SCHEMA, SCORES, big, "s", 2, deletes=pd.DataFrame({"txn_id": ["t2"]})) == 1001
    assert len(contents(conn)) == 1002 and ledger(conn) == [("s", "scores", 2, 1001)]
    assert mirror.upsert_batch(conn, SCHEMA, SCORES, big, "s", 2) == 0


def test_connection_in_a_transaction_is_refused(conn):
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
    with pytest.raises(RuntimeError, match="transaction in progress"):
        mirror.upsert_batch(conn, SCHEMA, SCORES, frame(BATCH1), "s", 1)
    conn.rollback()
    assert contents(conn) == []


def test_with_retries_survives_an_outage(pg_settings):
    conn = pg.connect(pg_settings)
    mirror.ensure_schema(conn, SCHEMA, [SCORES])
    conn.close()

    retries: list[tuple[int, str, float]] = []

    def on_retry(attempt, exc, delay):
        retries.append((attempt, type(exc).__name__, delay))

    # down, with a finite budget: gives up and re-raises the last error
    pg.stop(pg_settings)
    t0 = time.monotonic()
    with pytest.raises(pg.PostgresUnavailable):
        mirror.with_retries(lambda c: None, pg_settings, attempts=3, backoff=0.05, on_retry=on_retry)
    assert [r[0] for r in retries] == [1, 2] and [r[2] for r in retries] == [0.05, 0.1]
    assert time.monotonic() - t0 < 5
    retries.clear()

    # down while the call starts; the server comes back after ~2 s; the batch lands exactly once
    calls = []

    def apply(c):
        calls.append(time.monotonic())
        return mirror.upsert_batch(c, SCHEMA, SCORES, frame(BATCH1), "s", 1)

    result: dict = {}

    def run():
        try:
            result["value"] = mirror.with_retries(apply, pg_settings, attempts=None, backoff=0.1,
                                                  max_backoff=0.4, on_retry=on_retry, deadline=30)
        except BaseException as exc:  # surfaced by the assertion below
            result["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    time.sleep(2)
    assert worker.is_alive() and "value" not in result
    pg.start(pg_settings)
    worker.join(timeout=20)
    assert not worker.is_alive()
    assert result.get("error") is None and result["value"] == 3
    assert len(retries) >= 2 and all(r[1] == "PostgresUnavailable" for r in retries)
    assert max(r[2] for r in retries) == 0.4  # back-off doubled, then capped
    assert len(calls) == 1  # fn only runs once a connection was made

    # a retry of an already-committed batch (lost acknowledgement) is a no-op
    assert mirror.with_retries(apply, pg_settings, attempts=2, backoff=0.01) == 0
    conn = pg.connect(pg_settings)
    try:
        assert contents(conn) == [as_db(r) for r in BATCH1]
        assert ledger(conn) == [("s", "scores", 1, 3)]
    finally:
        conn.close()


def test_with_retries_reconnects_after_a_lost_connection(pg_settings):
    """The first attempt's backend is terminated mid-call: the retry gets a fresh connection."""
    conn = pg.connect(pg_settings)
    mirror.ensure_schema(conn, SCHEMA, [SCORES])
    conn.close()
    retries = []
    pids = []

    def apply(c):
        pids.append(c.get_backend_pid())
        if len(pids) == 1:
            admin = pg.connect(pg_settings, autocommit=True)
            try:
                with admin.cursor() as cur:
                    cur.execute("SELECT pg_terminate_backend(%s, 5000)", (pids[0],))
            finally:
                admin.close()
        return mirror.upsert_batch(c, SCHEMA, SCORES, frame(BATCH1), "s", 1)

    assert mirror.with_retries(apply, pg_settings, attempts=3, backoff=0.01,
                               on_retry=lambda *a: retries.append(a)) == 3
    assert len(pids) == 2 and pids[0] != pids[1]
    assert len(retries) == 1 and isinstance(retries[0][1], psycopg2.OperationalError)

    # errors that are not about connectivity are not retried
    def broken(c):
        pids.append(c.get_backend_pid())
        with c.cursor() as cur:
            cur.execute("SELECT * FROM no_such_table")

    with pytest.raises(psycopg2.errors.UndefinedTable):
        mirror.with_retries(broken, pg_settings, attempts=5, backoff=0.01, on_retry=lambda *a: retries.append(a))
    assert len(retries) == 1


def test_mirror_table_validation():
    with pytest.raises(ValueError, match="key"):
        MirrorTable("t", (("a", "text"),), key=())
    with pytest.raises(ValueError, match="not among its columns"):
        MirrorTable("t", (("a", "text"),), key=("b",))
    with pytest.raises(ValueError, match="not among its columns"):
        MirrorTable("t", (("a", "text"),), key=("a",), indexes=(("zz",),))
    t = MirrorTable("t", [["a", "text"], ["b", "int"]], key="a", indexes=["b"])
    assert t.columns == (("a", "text"), ("b", "int")) and t.key == ("a",) and t.indexes == (("b",),)
    long = MirrorTable("x" * 40, (("a" * 30, "text"),), key=("a" * 30,), indexes=(("a" * 30,),))
    name = long.index_name(("a" * 30,))
    assert len(name) <= 63 and name.endswith("_idx")
