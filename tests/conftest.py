"""Shared fixtures: one SparkSession per test process (starting one takes ~10 s on 2 cores; `make test`
runs two pytest-xdist workers, each with its own)."""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime
from pathlib import Path

import pytest

from lakehouse.config import Settings


# py4j says "Closing down clientserver connection" at INFO from a finalizer as the worker exits,
# after pytest closed the stream a test's logging handler writes to: a "--- Logging error ---" trace
# at the end of every run. Its INFO lines say nothing a test needs.
logging.getLogger("py4j").setLevel(logging.WARNING)

#: How this machine starts Spark (where the jars and the class-data sharing archive are kept, whether
#: the archive is mapped): the tests' session honours them, as every job's does.
SPARK_START_ENV = ("LAKEHOUSE_CACHE", "LAKEHOUSE_CDS")


def spark_settings(root: Path) -> Settings:
    """The settings the test process's SparkSession is built with, its data under ``root``."""
    env = {k: os.environ[k] for k in SPARK_START_ENV if k in os.environ}
    env.update(LAKEHOUSE_DATA=str(root), LAKEHOUSE_SPARK_MASTER="local[2]", LAKEHOUSE_SHUFFLE_PARTITIONS="2")
    return Settings.from_env(env)


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    from lakehouse.spark import build_spark

    session = build_spark(spark_settings(tmp_path_factory.mktemp("spark-session")), app_name="lakehouse-tests")
    yield session
    session.stop()


@pytest.fixture
def local_time_zone_new_york():
    """This test process in New York time (UTC-5, UTC-4 in summer) for the test. PySpark hands
    collected timestamps back in the process's local time zone (not the session's UTC), as naive
    datetimes (ambiguous in the hour the clocks go back), so code that forgets it goes wrong here."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "America/New_York"
    time.tzset()
    assert datetime.fromtimestamp(0).hour == 19  # 1969-12-31 19:00 local
    yield
    if before is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = before
    time.tzset()


@pytest.fixture
def settings(tmp_path) -> Settings:
    """Settings rooted in a fresh temporary data folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAKEHOUSE_")}
    # Gold per micro-batch is off unless a test asks for it (settings.replace(stream_gold=True)):
    # the ingestion tests do not need it, and it multiplies the work of every small batch.
    env.update(LAKEHOUSE_DATA=str(tmp_path / "data"), LAKEHOUSE_SHUFFLE_PARTITIONS="2",
               LAKEHOUSE_SPARK_MASTER="local[2]", LAKEHOUSE_STREAM_GOLD="0", LAKEHOUSE_STREAM_SCORING="0")
    return Settings.from_env(env)


def write_lines(folder: Path, name: str, lines: list[str | bytes], mtime: float | None = None) -> Path:
    """Write an inbox file atomically (temp name, then rename), as a producer would."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.tmp"
    data = b"".join((l if isinstance(l, bytes) else l.encode()) + b"\n" for l in lines)
    tmp.write_bytes(data)
    if mtime is not None:  # before the rename: a stream running beside never lists it with another
        os.utime(tmp, (mtime, mtime))
    final = folder / name
    os.replace(tmp, final)
    return final


def stop_postgres(settings: Settings) -> None:
    """Stop a test's embedded Postgres; if that fails, kill it rather than leak a server."""
    import signal

    from lakehouse.io import postgres

    try:
        postgres.stop(settings)
    finally:
        info = postgres._running_postmaster(settings)
        if info is not None:
            os.kill(info["pid"], signal.SIGKILL)


def pg_rows(settings: Settings, name: str, order: str):
    """Every row of ``<pg_schema>.<name>`` ordered by ``order``, as a pandas DataFrame."""
    import pandas as pd

    from lakehouse.io import postgres

    conn = postgres.connect(settings)
    try:
        with conn.cursor() as cur:
            cur.execute(f'select * from {settings.pg_schema}."{name}" order by {order}')
            return pd.DataFrame(cur.fetchall(), columns=[d[0] for d in cur.description])
    finally:
        conn.close()
