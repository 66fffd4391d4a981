"""A job from jobs/ run through the real spark-submit (local[2]), as on a cluster but local."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lakehouse.config import Settings
from lakehouse.io import delta
from lakehouse.spark import _cached_jars, delta_package
from tests.conftest import write_lines
from tests.integration.inbox_data import FILE_MTIME, event_line

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def spark_submit_args(settings: Settings) -> list[str]:
    """spark-submit with the Delta jars: the cached ones when `make jars` ran, else --packages (Maven)."""
    exe = Path(sys.executable).parent / "spark-submit"
    jars = _cached_jars(settings)
    deps = ["--jars", ",".join(jars)] if jars else \
        ["--packages", delta_package(), "--conf", f"spark.jars.ivy={settings.ivy_dir}"]
    return [str(exe), "--master", "local[2]", "--conf", "spark.ui.enabled=false",
            "--conf", "spark.driver.host=127.0.0.1", "--conf", "spark.driver.bindAddress=127.0.0.1",
            "--conf", "spark.sql.shuffle.partitions=2", *deps]


def test_stream_job_runs_under_spark_submit(spark, settings):
    lines = [event_line(i) for i in range(120)] + [event_line(7), '{"event_id": ']
    write_lines(settings.events_inbox, "feed.jsonl", lines, mtime=FILE_MTIME)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAKEHOUSE_")}
    # The driver and the Python workers must be this environment's interpreter (it has lakehouse).
    env.update(LAKEHOUSE_DATA=str(settings.data_root), PYSPARK_PYTHON=sys.executable,
               PYSPARK_DRIVER_PYTHON=sys.executable, LAKEHOUSE_STREAM_GOLD="0")
    # spark-submit's default driver (1g), less than the 4g lakehouse is sized for: the job says how to
    # give it more, and computes larger look-backs in Spark meanwhile (a quarter of the bound).
    res = subprocess.run([*spark_submit_args(settings), "--driver-memory", "1g", str(ROOT / "jobs" / "stream.py"),
                          "--once", "--only", "events"], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    told = [line for line in (res.stdout + res.stderr).splitlines() if "pass --driver-memory 4g" in line]
    assert len(told) == 1 and "over 750,000 rows are computed in Spark" in told[0], told

    silver = delta.read(spark, settings.table_path("silver_transactions"))
    assert silver.count() == 120 and silver.select("event_id").distinct().count() == 120
    dq = delta.read(spark, settings.table_path("silver_dq_batches")).collect()
    assert sum(r["records_in"] for r in dq) == 122
    assert sum(r["duplicates"] for r in dq) == 1 and sum(r["quarantined"] for r in dq) == 1
    assert all(r["reconciled"] for r in dq)
