"""A real Spark start from plain Python: its scratch space (shuffle files, jar copies, native libraries)
goes to a folder of its own, which a kill -9 of the driver and its JVM leaves behind and the next
start removes; folders with a space in their name work; a start logs none of Spark's notices."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lakehouse.spark import SCRATCH_LOCK

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

# Starts Spark, runs a shuffle, prints its scratch folder and what Spark put there, then waits.
DRIVER = """
import os, sys, time
from pathlib import Path
from lakehouse.config import Settings
from lakehouse.spark import build_spark
spark = build_spark(Settings.from_env(os.environ), app_name="scratch-test")
assert spark.range(20000).repartition(3).distinct().count() == 20000
jvm = spark.sparkContext._jvm
local = jvm.org.apache.spark.util.Utils.getLocalDir(spark.sparkContext._jsc.sc().conf())
tmp = jvm.java.lang.System.getProperty("java.io.tmpdir")
print(Path(local).parent, tmp, ",".join(sorted(p.name.split("-")[0] for p in Path(tmp).iterdir())), sep="|",
      flush=True)
time.sleep(600)
"""


def test_a_killed_start_leaves_its_scratch_which_the_next_start_removes(tmp_path):
    temp, data = tmp_path / "t m p", tmp_path / "data dir"  # spaces on purpose
    temp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAKEHOUSE_") and k != "SPARK_LOCAL_DIRS"}
    env.update(TMPDIR=str(temp), LAKEHOUSE_DATA=str(data), LAKEHOUSE_SPARK_MASTER="local[2]",
               LAKEHOUSE_SHUFFLE_PARTITIONS="2", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline().strip()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its JVM: no shutdown hook runs
        proc.wait()
    assert line, "the Spark driver printed nothing"
    local, java_tmp, kinds = line.split("|")
    scratch = Path(local)
    assert scratch.parent == temp / f"lakehouse-spark-{os.getuid()}" and java_tmp == local
    assert {"blockmgr", "spark", SCRATCH_LOCK} <= set(kinds.split(","))
    time.sleep(1)
    assert scratch.exists() and any(scratch.glob("blockmgr-*/*")), "the kill left nothing behind to clean"
    then = time.time() - 3600  # older than the grace a just-created folder gets
    os.utime(scratch, (then, then))

    done = subprocess.run([sys.executable, "-m", "lakehouse.spark"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "is ready" in done.stdout
    # lakehouse/log4j2.properties and SPARK_LOCAL_IP: a start prints none of Spark's notices.
    for notice in ("default log4j profile", "loopback address", "native-hadoop", "Setting default log level"):
        assert notice not in done.stderr, done.stderr
    assert not scratch.exists()
    assert list(scratch.parent.iterdir()) == []  # and the normal exit removed its own folder
