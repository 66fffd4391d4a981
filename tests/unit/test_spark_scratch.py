"""Spark's scratch folders (lakehouse.spark.scratch_dir / sweep_scratch): one per process, locked while
it lives, removed by the next start once the process is gone, however it ended. Plain Python
processes stand in for the driver here; tests/integration/test_spark_start.py kills a real one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lakehouse.spark import SCRATCH_LOCK, sweep_scratch

HOLD = ("import sys, time; from pathlib import Path; from lakehouse.spark import scratch_dir; "
        "print(scratch_dir(Path(sys.argv[1])), flush=True); time.sleep(float(sys.argv[2]))")


def _hold(root: Path, seconds: float = 120) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root), str(seconds)], stdout=subprocess.PIPE,
                            text=True)
    return proc, Path(proc.stdout.readline().strip())


def _age(folder: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(folder, (then, then))


def test_a_live_process_keeps_its_folder_and_a_killed_ones_is_removed(tmp_path):
    proc, folder = _hold(tmp_path)
    try:
        assert folder.parent == tmp_path and (folder / SCRATCH_LOCK).exists()
        (folder / "blockmgr-1").mkdir()
        (folder / "blockmgr-1" / "shuffle_0_0_0.data").write_bytes(b"x" * 1000)
        _age(folder, 3600)
        assert sweep_scratch(tmp_path) == []  # locked: its process is alive, however old the folder
        assert folder.exists()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert sweep_scratch(tmp_path) == [folder]
        assert not folder.exists()
    finally:
        proc.kill()
        proc.wait()


def test_a_young_unlocked_folder_is_left_for_its_process_to_lock(tmp_path):
    young, old = tmp_path / "1-young", tmp_path / "2-old"
    for folder in (young, old):
        folder.mkdir()
        (folder / "spark-1").mkdir()
    _age(old, 600)
    assert sweep_scratch(tmp_path, grace_seconds=120) == [old]
    assert young.exists() and not old.exists()


def test_a_normal_exit_removes_its_own_folder(tmp_path):
    proc, folder = _hold(tmp_path, seconds=0)
    assert proc.wait() == 0
    assert not folder.exists() and list(tmp_path.iterdir()) == []


def test_a_start_keeps_the_folders_of_processes_still_running(tmp_path):
    first, folder = _hold(tmp_path)
    try:
        _age(folder, 3600)
        second, other = _hold(tmp_path)  # its start sweeps the root
        try:
            assert folder.exists() and other.exists() and other != folder
        finally:
            second.kill()
            second.wait()
    finally:
        first.kill()
        first.wait()
