"""Gold backfill from silver and its Postgres mirror, with real Delta and a real embedded Postgres."""

from __future__ import annotations

from datetime import date

import pandas as pd
import pytest

from lakehouse import gold, mirror, streaming
from lakehouse.damage import DamagedTable
from lakehouse.io import delta, pg_mirror, postgres
from tests.conftest import pg_rows, stop_postgres, write_lines
from tests.integration.inbox_data import FILE_MTIME, event_line, label_line

pytestmark = pytest.mark.integration

DAY = date(2026, 11, 20)


@pytest.fixture
def pg(settings):
    postgres.start(settings)
    yield settings
    stop_postgres(settings)


def _gold(spark, settings, name):
    return delta.read(spark, settings.table_path(name))


def _assert_pg_equals_gold(spark, settings):
    for name, spec in gold.GOLD_TABLES.items():
        order = ", ".join(spec["key"])
        want = _gold(spark, settings, name).toPandas().sort_values(order.split(", ")).reset_index(drop=True)
        got = pg_rows(settings, name, order)[list(want.columns)]
        for col in want.columns:  # Postgres returns timestamptz as aware UTC; Delta as naive UTC
            if pd.api.types.is_datetime64_any_dtype(got[col]):
                got[col] = got[col].dt.tz_convert("UTC").dt.tz_localize(None)
            if str(want[col].dtype) == "object" and len(want) and isinstance(want[col].iloc[0], date):
                got[col] = pd.to_datetime(got[col]).dt.date
            if pd.api.types.is_float_dtype(want[col]):  # SQL NULL arrives as None, Spark's as NaN
                got[col] = pd.to_numeric(got[col]).astype("float64")
        pd.testing.assert_frame_equal(got.reset_index(drop=True), want, check_dtype=False)


def test_backfill_is_idempotent_and_mirror_converges(spark, pg):
    settings = pg
    # 300 payments on the 20th, then 50 on the 21st after the chargebacks below are reported.
    later = [event_line(1000 + i, event_time=f"2026-11-21T12:{i:02d}:00Z") for i in range(50)]
    write_lines(settings.events_inbox, "a.jsonl", [event_line(i) for i in range(300)] + later, mtime=FILE_MTIME)
    streaming.run_streams(spark, settings, once=True, kinds=("events",))

    written = gold.backfill(spark, settings, DAY, date(2026, 11, 21))
    assert written["gold_transaction_features"] == 350
    first = sorted(map(tuple, _gold(spark, settings, "gold_transaction_features").collect()), key=repr)
    gold.backfill(spark, settings, DAY, date(2026, 11, 21))  # twice: same rows
    assert sorted(map(tuple, _gold(spark, settings, "gold_transaction_features").collect()), key=repr) == first

    mirror.mirror_all(spark, settings)
    _assert_pg_equals_gold(spark, settings)
    again = mirror.mirror_all(spark, settings)  # nothing new: nothing written
    assert all(r.get("rows", 0) == 0 for r in again)

    # Labels arrive: fraud rates change; the backfill rewrites the range; the mirror applies only that.
    write_lines(settings.labels_inbox, "l.jsonl", [label_line(i) for i in range(0, 300, 7)], mtime=FILE_MTIME)
    streaming.run_streams(spark, settings, once=True, kinds=("labels",))
    gold.backfill(spark, settings, DAY, date(2026, 11, 21))
    result = {r["table"]: r for r in mirror.mirror_all(spark, settings)}
    assert result["gold_transaction_features"]["rows"] > 0
    assert result["gold_user_features_5m"]["rows"] == 0  # windows did not change
    assert result["gold_merchant_risk_daily"]["rows"] > 0  # fraud counts did
    _assert_pg_equals_gold(spark, settings)
    feats = pg_rows(settings, "gold_transaction_features", "event_id")
    # Reported on the 21st at 00:00-00:05: invisible to the payments of the 20th, visible after.
    assert feats[feats.event_date.astype(str) == "2026-11-20"]["merchant_fraud_rate_30d"].max() == 0
    assert feats[feats.event_date.astype(str) == "2026-11-21"]["merchant_fraud_rate_30d"].min() > 0

    # A power loss empties gold's newest commit file: the mirror refuses it, naming it, and applies
    # nothing (Delta's change feed would read it as no change and the ledger would skip it for good).
    path = settings.table_path("gold_transaction_features")
    applied = {r["table"]: r for r in mirror.mirror_all(spark, settings)}["gold_transaction_features"]["version"]
    gold.backfill(spark, settings, DAY, DAY)
    newest = path / "_delta_log" / f"{delta.table_version(path):020d}.json"
    content = newest.read_bytes()
    newest.write_bytes(b"")
    with pytest.raises(DamagedTable, match=rf"gold_transaction_features .*{newest.name}: it is empty"):
        mirror.mirror_all(spark, settings)
    conn = postgres.connect(settings)
    try:
        assert pg_mirror.applied_version(conn, settings.pg_schema, "delta:gold_transaction_features",
                                         "gold_transaction_features") == applied
    finally:
        conn.close()
    newest.write_bytes(content)  # restored from a backup
    mirror.mirror_all(spark, settings)
    _assert_pg_equals_gold(spark, settings)


def test_mirror_waits_for_postgres_and_catches_up(spark, pg):
    import threading
    import time

    settings = pg
    write_lines(settings.events_inbox, "a.jsonl", [event_line(i) for i in range(50)], mtime=FILE_MTIME)
    streaming.run_streams(spark, settings, once=True, kinds=("events",))
    gold.backfill(spark, settings, DAY, DAY)
    postgres.stop(settings)
    retries = []
    restart = threading.Timer(3.0, lambda: postgres.start(settings))
    restart.start()
    t0 = time.time()
    mirror.mirror_all(spark, settings, on_retry=lambda *a: retries.append(a))
    restart.join()
    assert retries and time.time() - t0 >= 2.5
    _assert_pg_equals_gold(spark, settings)
