"""Which columns the mirror sends in Postgres' binary COPY format, and as what (no Postgres needed).

A binary field must be exactly the type's receive format (an ``integer`` is 4 bytes, a ``bigint`` 8),
so a column goes binary only as the Arrow type of its Postgres column, cast without loss; any other
pairing sends the whole batch as CSV, whose text Postgres parses into whatever the column is.
The rows themselves are checked in Postgres by tests/integration/test_pg_mirror.py, both ways.
"""

from __future__ import annotations

import struct

import pyarrow as pa
import pytest

from lakehouse.io import pg_mirror
from lakehouse.io.pg_mirror import MirrorTable

TABLE = MirrorTable(name="t", columns=(("k", "text"), ("n", "integer"), ("x", "double precision"),
                                       ("at", "timestamptz"), ("d", "date"), ("ok", "boolean")), key=("k",))
PG_TYPES = {"k": "text", "n": "integer", "x": "double precision", "at": "timestamp with time zone",
            "d": "date", "ok": "boolean"}


def rows(**overrides) -> pa.Table:
    columns = {
        "k": pa.array(["a", "b"]),
        "n": pa.array([1, None], pa.int64()),
        "x": pa.array([1.5, float("nan")]),
        "at": pa.array([0, 86_400_000_000], pa.timestamp("us", tz="UTC")),
        "d": pa.array([0, None], pa.date32()),
        "ok": pa.array([True, None]),
    }
    return pa.table({**columns, **overrides})


@pytest.mark.parametrize("arr, pgtype, want", [
    (pa.array([1, 2], pa.int64()), "integer", pa.int32()),           # narrowed, nothing lost
    (pa.array([1, 2], pa.int32()), "bigint", pa.int64()),            # widened
    (pa.array([1, 2], pa.int16()), "smallint", pa.int16()),
    (pa.array([1.5]), "double precision", pa.float64()),
    (pa.array([1.5], pa.float32()), "real", pa.float32()),
    (pa.array(["a"]), "text", pa.string()),
    (pa.array(["a"], pa.large_string()), "text", pa.large_string()),  # kept: written as text as well
    (pa.array([0], pa.date64()), "date", pa.date32()),
    (pa.array([0], pa.timestamp("us")), "timestamp with time zone", pa.timestamp("us")),
    (pa.array([0], pa.timestamp("us")), "timestamp without time zone", pa.timestamp("us")),
    (pa.array([True]), "boolean", pa.bool_()),
    (pa.nulls(2, pa.string()), "bigint", pa.int64()),                # all null: any type holds it
])
def test_columns_that_pair_with_their_postgres_type_go_binary_as_it(arr, pgtype, want):
    out = pg_mirror._binary_column(arr, pgtype)
    assert out is not None and out.type == want
    assert out.to_pylist() == [None] * len(arr) if arr.null_count == len(arr) else out.to_pylist() == arr.to_pylist()


@pytest.mark.parametrize("arr, pgtype", [
    (pa.array([1 << 40], pa.int64()), "integer"),        # too large: Postgres refuses it, with its words
    (pa.array([1.5], pa.float32()), "double precision"),  # CSV prints the float32's digits: another double
    (pa.array([1.5]), "real"),
    (pa.array([1]), "double precision"),
    (pa.array([1.5]), "integer"),
    (pa.array(["1"]), "integer"),
    (pa.array([1]), "text"),
    (pa.array(['{"a": 1}']), "jsonb"),
    (pa.array([1]), "numeric"),
    (pa.array(["a"]), "character varying"),
    (pa.array([0], pa.timestamp("us")), "date"),
    (pa.array([1]), None),                                # a column Postgres does not have
])
def test_any_other_pairing_takes_the_csv_path(arr, pgtype):
    assert pg_mirror._binary_column(arr, pgtype) is None


def test_a_batch_goes_binary_only_when_every_column_pairs():
    data = pg_mirror._copy_data(rows(), TABLE, TABLE.column_names, "rows", with_ordinal=True, pg_types=PG_TYPES)
    assert data.format == "binary" and data.rows == 2
    raw = data.buf.getvalue()
    assert raw.startswith(b"PGCOPY\n\xff\r\n\x00") and raw.endswith(struct.pack(">h", -1))
    # one tuple: its field count (the columns and the ordinal), then the key's length and bytes
    first = raw[19:]
    assert struct.unpack(">h", first[:2])[0] == len(TABLE.column_names) + 1
    assert struct.unpack(">i", first[2:6])[0] == 1 and first[6:7] == b"a"

    csv = pg_mirror._copy_data(rows(), TABLE, TABLE.column_names, "rows", with_ordinal=False,
                               pg_types={**PG_TYPES, "ok": "jsonb"})
    assert csv.format == "csv"
    assert csv.buf.getvalue().decode().splitlines() == [
        '"a","1","1.5","1970-01-01 00:00:00.000000","1970-01-01","true"',
        '"b",,,"1970-01-02 00:00:00.000000",,',
    ]
    # no types known (a connection that is not UTF-8): CSV; no rows: nothing to send
    assert pg_mirror._copy_data(rows(), TABLE, TABLE.column_names, "rows", False, None).format == "csv"
    empty = pg_mirror._copy_data(rows().slice(0, 0), TABLE, TABLE.column_names, "rows", False, PG_TYPES)
    assert empty.rows == 0 and empty.buf.getvalue() == b""
