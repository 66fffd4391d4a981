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

# Starts Spark, runs a shuffle, prints its scratch folder and what Spark put there, and a system
# property LAKEHOUSE_JAVA_OPTIONS set, then waits.
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
print(Path(local).parent, tmp, ",".join(sorted(p.name.split("-")[0] for p in Path(tmp).iterdir())),
      jvm.java.lang.System.getProperty("lakehouse.probe"), sep="|", flush=True)
time.sleep(600)
"""


def test_a_killed_start_leaves_its_scratch_which_the_next_start_removes(tmp_path):
    temp, data = tmp_path / "t m p", tmp_path / "data dir"  # spaces on purpose
    temp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAKEHOUSE_") and k != "SPARK_LOCAL_DIRS"}
    env.update(TMPDIR=str(temp), LAKEHOUSE_DATA=str(data), LAKEHOUSE_SPARK_MASTER="local[2]",
               LAKEHOUSE_SHUFFLE_PARTITIONS="2", PYTHONPATH=str(ROOT),
               LAKEHOUSE_JAVA_OPTIONS="-XX:TieredStopAtLevel=1 '-Dlakehouse.probe=a \"b\" c'")
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline().strip()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its JVM: no shutdown hook runs
        proc.wait()
    assert line, "the Spark driver printed nothing"
    local, java_tmp, kinds, probe = line.split("|")
    assert probe == 'a "b" c'  # LAKEHOUSE_JAVA_OPTIONS reached the JVM, quoted as the shell would
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


def test_java_options_java_refuses_are_named_with_the_setting():
    from lakehouse.spark import JavaMissing, check_java_options

    assert check_java_options("-XX:TieredStopAtLevel=1  -Dx=1") == ["-XX:TieredStopAtLevel=1", "-Dx=1"]
    with pytest.raises(JavaMissing, match=r"LAKEHOUSE_JAVA_OPTIONS='-XX:\+NoSuchFlag'.*Unrecognized VM option"):
        check_java_options("-XX:+NoSuchFlag")
    with pytest.raises(JavaMissing, match="not shell-quoted correctly"):
        check_java_options("'-Dx=unclosed")


def _jvm_counters(pid: int) -> dict[str, str]:
    from lakehouse.spark import _java

    jcmd = Path(_java()[0]).resolve().parent / "jcmd"
    if not jcmd.exists():
        pytest.skip(f"no jcmd beside {_java()[0]} (a JRE without the JDK tools)")
    out = subprocess.run([str(jcmd), str(pid), "PerfCounter.print"], capture_output=True, text=True, timeout=60).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_a_session_loads_most_of_its_classes_from_the_archive(spark, tmp_path):
    """`python -m lakehouse.spark` (make jars) archived the classes a session loads; a session started
    here maps that archive and takes most of its classes from it instead of loading them one by one."""
    from lakehouse.spark import cds_archive
    from tests.conftest import spark_settings

    settings = spark_settings(tmp_path)  # those the test process's session was built with
    if not settings.class_data_sharing:
        pytest.skip("LAKEHOUSE_CDS=0: class-data sharing is off")
    archive = cds_archive(settings)
    assert archive.is_file(), f"no class-data sharing archive at {archive}: `python -m lakehouse.spark` writes it"
    jvm = spark.sparkContext._jvm
    assert f"-XX:SharedArchiveFile={archive}" in list(
        jvm.java.lang.management.ManagementFactory.getRuntimeMXBean().getInputArguments())
    # A start maps about 9,800 classes from it; without it only the JDK's own archive is shared (about
    # 1,200 classes). The session has run other tests since, so the classes it loaded itself (generated
    # code among them) may outnumber the shared ones by now.
    counters = _jvm_counters(jvm.java.lang.ProcessHandle.current().pid())
    assert int(counters["java.cls.sharedLoadedClasses"]) > 5000, counters


def test_an_archive_cut_short_is_never_kept(tmp_path):
    """A JVM given a truncated archive crashes at start, so a dump is checked before it takes the
    name sessions map; a good one replaces the archives of other versions."""
    from lakehouse.spark import _java, install_cds_archive

    java = _java()[0]
    good, cut = tmp_path / "good.tmp", tmp_path / "cut.tmp"
    subprocess.run([java, f"-XX:ArchiveClassesAtExit={good}", "-Xlog:cds*=off", "-version"], check=True,
                   capture_output=True, timeout=120)
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    crashed = subprocess.run([java, f"-XX:SharedArchiveFile={cut}", "-Xlog:cds*=off", "-version"],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert crashed.returncode != 0, "a JVM started with half an archive"
    archive = tmp_path / "cds" / "spark-new.jsa"
    archive.parent.mkdir()
    (archive.parent / "spark-old.jsa").write_bytes(b"an archive of other versions")

    assert not install_cds_archive(cut, archive)
    assert not archive.exists() and not cut.exists() and (archive.parent / "spark-old.jsa").exists()
    assert install_cds_archive(good, archive)
    assert archive.is_file() and not good.exists() and list(archive.parent.iterdir()) == [archive]
