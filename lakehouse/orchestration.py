"""What the nightly Airflow DAG needs besides the CLI: the date window of a run and the commands.

Kept out of the DAG file (which holds wiring only) and free of Spark/Airflow imports, so the DAG
parses fast and this is unit-tested on its own.

Window rule: a run backfills ``[date_from, date_to]`` (UTC dates, inclusive). Both default to the day
before the run's logical date: the nightly run after midnight backfills the day that just ended. A
user backfilling a range from the UI or CLI sets them as params (``-c '{"date_from": ...}'``).
"""

from __future__ import annotations

import os
import shlex
import sys
from datetime import date, datetime, timedelta, timezone

#: Longest range one run may backfill (a guard against a mistyped year).
MAX_RANGE_DAYS = 366


def backfill_window(date_from: str | None, date_to: str | None, anchor: date | datetime) -> dict[str, str]:
    """The run's ``{"date_from", "date_to"}`` (ISO dates).

    Args:
        date_from, date_to: the params as given (``None``/empty = default).
        anchor: the run's logical date (or, for a manual run without one, when it was triggered).

    Raises:
        ValueError: a param is not a date, the range is reversed, or longer than MAX_RANGE_DAYS.
    """
    if isinstance(anchor, datetime):  # its UTC date (a logical date in another zone, or naive = UTC)
        day = (anchor.astimezone(timezone.utc) if anchor.tzinfo else anchor).date()
    else:
        day = anchor
    yesterday = day - timedelta(days=1)

    def parse(name: str, value: str | None) -> date | None:
        if value in (None, ""):
            return None
        try:
            return date.fromisoformat(str(value))
        except ValueError:
            raise ValueError(f"param {name}={value!r} is not a date (YYYY-MM-DD)") from None

    lo, hi = parse("date_from", date_from), parse("date_to", date_to)
    lo, hi = lo or hi or yesterday, hi or (lo if lo and lo > yesterday else None) or yesterday
    if hi < lo:
        raise ValueError(f"date_to {hi} is before date_from {lo}")
    if (hi - lo).days + 1 > MAX_RANGE_DAYS:
        raise ValueError(f"{lo} .. {hi} spans more than {MAX_RANGE_DAYS} days; split it into several runs")
    return {"date_from": lo.isoformat(), "date_to": hi.isoformat()}


def lakehouse_command() -> str:
    """The ``lakehouse`` executable of the Python that runs the DAG (same venv), else the one on PATH."""
    exe = os.path.join(os.path.dirname(sys.executable), "lakehouse")
    return shlex.quote(exe) if os.access(exe, os.X_OK) else "lakehouse"


def spark_command() -> str:
    """Prefix of the commands that run Spark jobs: ``$LAKEHOUSE_SPARK_SUBMIT`` when the deployment sets it
    (e.g. ``spark-submit --master spark://... jobs/cli.py``, see docker-compose.yml), else the
    same ``lakehouse`` command (Spark in local mode). Expanded by bash when the task runs."""
    return "${LAKEHOUSE_SPARK_SUBMIT:-" + lakehouse_command() + "}"


def extra_args(text: str | None) -> str:
    """User-given extra CLI arguments (a param), re-quoted so they stay arguments, never shell code."""
    return " ".join(shlex.quote(a) for a in shlex.split(text or ""))
