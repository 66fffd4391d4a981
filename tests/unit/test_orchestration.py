"""The nightly run's date window and command helpers (pure)."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import pytest

from lakehouse.orchestration import backfill_window, extra_args, spark_command

RUN = datetime(2026, 11, 30, 0, 30, tzinfo=timezone.utc)


def test_default_is_the_day_before_the_logical_date():
    assert backfill_window(None, None, RUN) == {"date_from": "2026-11-29", "date_to": "2026-11-29"}
    assert backfill_window("", "", date(2026, 1, 1)) == {"date_from": "2025-12-31", "date_to": "2025-12-31"}
    # The same instant given in another zone (19:30 on the 29th in New York): still the UTC day before.
    new_york = RUN.astimezone(timezone(timedelta(hours=-5)))
    assert backfill_window(None, None, new_york) == {"date_from": "2026-11-29", "date_to": "2026-11-29"}


def test_ranges_from_params():
    assert backfill_window("2026-11-01", "2026-11-07", RUN) == {"date_from": "2026-11-01", "date_to": "2026-11-07"}
    assert backfill_window("2026-11-01", None, RUN) == {"date_from": "2026-11-01", "date_to": "2026-11-29"}
    assert backfill_window(None, "2026-11-03", RUN) == {"date_from": "2026-11-03", "date_to": "2026-11-03"}
    assert backfill_window("2026-11-30", None, RUN) == {"date_from": "2026-11-30", "date_to": "2026-11-30"}


@pytest.mark.parametrize("lo,hi,msg", [("2026-11-07", "2026-11-01", "before"), ("11/01/2026", None, "not a date"),
                                       ("2024-01-01", "2026-01-01", "split")])
def test_bad_ranges_are_refused(lo, hi, msg):
    with pytest.raises(ValueError, match=msg):
        backfill_window(lo, hi, RUN)


def test_extra_args_cannot_inject_shell():
    assert extra_args("--train-days 2 --gap-days 0") == "--train-days 2 --gap-days 0"
    assert extra_args("--x '; rm -rf /'") == "--x '; rm -rf /'"
    assert extra_args("$(id)") == "'$(id)'"
    assert extra_args(None) == ""


def test_spark_command_defers_to_the_deployment():
    assert spark_command().startswith("${LAKEHOUSE_SPARK_SUBMIT:-") and "lakehouse" in spark_command()
