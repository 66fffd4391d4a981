"""kill -9 of a real streaming subprocess, several times, then restart: the tables must equal those of
an uninterrupted run. Nothing lost, nothing twice."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from lakehouse import streaming
from lakehouse.config import Settings
from lakehouse.io import delta
from tests.integration.inbox_data import write_feed

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_FILES = 2


def _env(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAKEHOUSE_")}
    env.update(LAKEHOUSE_DATA=str(root), LAKEHOUSE_MAX_FILES_PER_TRIGGER=str(MAX_FILES),
               LAKEHOUSE_SHUFFLE_PARTITIONS="2", LAKEHOUSE_SPARK_MASTER="local[2]", PYTHONUNBUFFERED="1",
               # ingestion only: gold's exactly-once under kill -9 is test_mirror_convergence's
               LAKEHOUSE_STREAM_GOLD="0")
    return env


def _commits(root: Path) -> int:
    return sum(1 for _ in (root / "delta").glob("*/*/_delta_log/*.json"))


def _start(root: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lakehouse.cli", "stream", "--once"],
        env=_env(root), stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )


def _kill_after_commits(proc: subprocess.Popen, root: Path, n: int, timeout: float = 240) -> bool:
    """SIGKILL the whole process group (Python driver and its JVM) once n more commits landed.
    Returns False if the process finished first."""
    target = _commits(root) + n
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        if _commits(root) >= target:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("the stream made no progress before the timeout")


def _read(spark, settings: Settings, name: str):
    df = delta.read(spark, settings.table_path(name))
    if "source_file" in df.columns:
        df = df.withColumn("source_file", F.element_at(F.split("source_file", "/"), -1))
    return df


def _snapshot(spark, settings: Settings) -> dict:
    """Every table's rows, without the micro-batch ids, and the data-quality counts summed per stream.

    A kill can land after Spark's file source logged the files of its next batch and before the offset
    log named that batch; the restart then plans one batch over those files and the next ones. The
    rows are the same, in fewer batches than an uninterrupted run makes (:func:`_whole_files_per_batch`
    checks the batches the killed run did make)."""
    def rows(name, cols):
        return sorted((tuple(r) for r in _read(spark, settings, name).select(*cols).collect()), key=repr)

    dq = _read(spark, settings, "silver_dq_batches")
    totals = {r["kind"]: tuple(r)[1:] for r in dq.groupBy("kind").agg(
        *[F.sum(c) for c in ("records_in", "inserted", "duplicates", "quarantined")],
        F.min(F.col("reconciled").cast("int"))).collect()}
    checks = sorted(tuple(r) for r in dq.select("kind", F.explode("check_failures").alias("check", "n"))
                    .groupBy("kind", "check").agg(F.sum("n")).collect())
    return {
        "silver": rows("silver_transactions", ["event_id", "user_id", "merchant_id", "amount", "currency",
                                               "amount_base", "country", "event_time", "source_file"]),
        "labels": rows("silver_labels", ["event_id", "is_fraud", "scenario", "reported_at"]),
        "quarantine": rows("silver_quarantine", ["kind", "record_key", "failed_checks", "raw", "source_file"]),
        "bronze": rows("bronze_events", ["raw", "source_file"]),
        "dq": totals,
        "checks": checks,
    }


def _whole_files_per_batch(spark, settings: Settings) -> None:
    """Each events file went into exactly one micro-batch; its silver and quarantine rows carry that
    batch's id, and the data-quality rows are those batches', each reconciled."""
    bronze = _read(spark, settings, "bronze_events").select("source_file", "batch_id").distinct()
    batch_of = {r["source_file"]: r["batch_id"] for r in bronze.collect()}
    assert len(batch_of) == bronze.count(), "a file's lines went into more than one batch"
    for name in ("silver_transactions", "silver_quarantine"):
        df = _read(spark, settings, name)
        if name == "silver_quarantine":
            df = df.where(F.col("kind") == "events")
        pairs = {(r["source_file"], r["batch_id"]) for r in df.select("source_file", "batch_id").distinct().collect()}
        assert pairs <= set(batch_of.items()), f"{name} rows carry another batch id than their file's"
    dq = _read(spark, settings, "silver_dq_batches").where(F.col("kind") == "events")
    assert sorted(r["batch_id"] for r in dq.collect()) == sorted(set(batch_of.values()))
    assert dq.where(~F.col("reconciled")).count() == 0


def test_kill_9_and_restart_equals_uninterrupted_run(spark, tmp_path):
    killed_root, clean_root = tmp_path / "killed", tmp_path / "clean"
    killed = Settings.from_env(_env(killed_root))
    expected = write_feed(killed.events_inbox, killed.labels_inbox, n_files=8, per_file=1000)
    clean = Settings.from_env(_env(clean_root))
    shutil.copytree(killed.inbox_dir, clean.inbox_dir)  # copy2 keeps the files' modification times

    log = tmp_path / "stream.log"
    rng = random.Random(11)
    kills = 0
    for attempt in range(12):
        proc = _start(killed_root, log)
        if kills >= 3:
            assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
            break
        # Kill after a varying number of table commits: lands mid-batch at different steps.
        if _kill_after_commits(proc, killed_root, n=rng.randint(1, 6)):
            kills += 1
        else:
            assert proc.returncode == 0, log.read_text()[-3000:]
            break
    assert kills >= 3, f"only {kills} kills landed before the stream finished"

    streaming.run_streams(spark, clean, once=True)
    got, want = _snapshot(spark, killed), _snapshot(spark, clean)
    for key in want:
        assert got[key] == want[key], f"{key} differs after {kills} kills"
    _whole_files_per_batch(spark, killed)
    ids = [r[0] for r in got["silver"]]
    assert len(ids) == len(set(ids)) == len(expected["valid_ids"])
    assert len(got["bronze"]) == expected["lines"]
    assert all(t[-1] == 1 for t in got["dq"].values())
