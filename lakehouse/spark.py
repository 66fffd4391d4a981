"""Build the SparkSession: Delta extension and catalog, the Delta jars, and local tuning.

Under ``spark-submit`` the JVM already exists with its master and packages, so only the SQL settings
are applied. Run from plain Python (the CLI, tests), the session gets the Delta jars through Spark's
resolver with a project-controlled Ivy cache, so only the very first start needs Maven Central.

Scratch space. Spark keeps its block manager (shuffle files, spilled caches), the jar copies a session
serves (about 9 MB) and PySpark's temporary files under its local dirs (``spark.local.dir``, by
default the JVM's ``java.io.tmpdir``), the JVM its native libraries too, and deletes them from a
JVM shutdown hook, which a ``kill -9`` or a crash never runs: every killed start left a ``/tmp/spark-*``
folder behind for good. A session started here gets a folder of its own under
``<tmp>/lakehouse-spark-<uid>/`` (:func:`scratch_dir`), locked by its process for as long as it lives
(``flock``, which the kernel releases however the process ends), and every start first removes the
folders whose lock is free: those of processes that are gone. ``SPARK_LOCAL_DIRS`` (Spark's own
setting, which wins over ``spark.local.dir``) turns this off; so does running under ``spark-submit``,
whose cluster manager owns the scratch space.
"""

from __future__ import annotations

import atexit
import fcntl
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

from lakehouse.config import Settings


log = logging.getLogger(__name__)

#: The driver's log4j2 configuration of a session started from Python (not under spark-submit).
LOG4J2_CONFIG = Path(__file__).with_name("log4j2.properties")
#: The lock file in each scratch folder; its ``flock`` is held by the folder's process.
SCRATCH_LOCK = ".lock"
#: A scratch folder younger than this is never removed: its process may not hold the lock yet.
SCRATCH_GRACE_SECONDS = 120.0

_scratch: tuple[Path, int] | None = None  # this process's scratch folder and the fd holding its lock


class JavaMissing(RuntimeError):
    """No usable Java runtime: Spark cannot start."""


def delta_package() -> str:
    """The Maven coordinate of the Delta jar matching the installed pyspark and delta-spark."""
    from importlib.metadata import version

    import pyspark

    spark_mm = ".".join(pyspark.__version__.split(".")[:2])
    return f"io.delta:delta-spark_{spark_mm}_2.13:{version('delta-spark')}"


@lru_cache(maxsize=1)
def java_version() -> int:
    """Major version of the Java that Spark will launch; raises JavaMissing with the fix."""
    java_home = os.environ.get("JAVA_HOME")
    java = os.path.join(java_home, "bin", "java") if java_home else shutil.which("java")
    if not java or not os.path.exists(java):
        where = f"JAVA_HOME={java_home} has no bin/java" if java_home else "no `java` on PATH"
        raise JavaMissing(
            f"Java 17+ is required by Spark but was not found ({where}). Install it "
            "(Debian/Ubuntu: `apt-get install openjdk-17-jre-headless`; macOS: `brew install openjdk@17`) "
            "or set JAVA_HOME to a JDK 17+ folder."
        )
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30).stderr
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise JavaMissing(f"`{java} -version` failed ({exc}); install Java 17+ or fix JAVA_HOME.") from None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not match:
        raise JavaMissing(f"could not read the Java version from `{java} -version`: {out.strip()[:200]}")
    major = int(match.group(1))
    if major == 1 and match.group(2):  # "1.8" style
        major = int(match.group(2))
    if major < 17:
        raise JavaMissing(
            f"Java {major} found at {java}, but Spark 4 needs Java 17 or newer. Install JDK 17+ and "
            "point JAVA_HOME at it."
        )
    return major


def as_utc(moment: datetime) -> datetime:
    """A timestamp collected from Spark (``collect``, ``first``), as an aware UTC datetime.

    PySpark returns TimestampType values as naive datetimes in the Python process's local time zone,
    whatever the session's; taking them for UTC (``replace(tzinfo=...)``) or their ``.date()`` is off
    by the process's UTC offset. Aware datetimes are converted."""
    return moment.astimezone(timezone.utc)


def under_spark_submit() -> bool:
    """True when this Python process was launched by spark-submit (the JVM gateway already exists)."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def _jar_manifest(settings: Settings):
    return settings.ivy_dir / f"resolved-{delta_package().replace(':', '_')}.txt"


def _cached_jars(settings: Settings) -> list[str]:
    """The jar files resolved by an earlier start, if they are all still there (skips Ivy)."""
    manifest = _jar_manifest(settings)
    if not manifest.exists():
        return []
    jars = [line.strip() for line in manifest.read_text().splitlines() if line.strip()]
    return jars if jars and all(os.path.exists(j) for j in jars) else []


def _remember_jars(settings: Settings, spark) -> None:
    manifest = _jar_manifest(settings)
    if manifest.exists():
        return
    # Keep Delta's own two jars only: its transitive pulls (older Jackson, Hadoop client, log4j)
    # duplicate what Spark already ships and could shadow it on the classpath.
    jars = [j.removeprefix("file://").removeprefix("file:")
            for j in spark.sparkContext.getConf().get("spark.jars", "").split(",")
            if os.path.basename(j).startswith(("io.delta_delta-spark", "io.delta_delta-storage"))]
    if jars and all(os.path.exists(j) for j in jars):
        tmp = manifest.with_suffix(".tmp")
        tmp.write_text("\n".join(jars) + "\n")
        os.replace(tmp, manifest)


def scratch_root() -> Path:
    """Where the scratch folders of the Spark sessions started here live (one per process)."""
    return Path(tempfile.gettempdir()) / f"lakehouse-spark-{os.getuid()}"


def _locked_by_someone(folder: Path) -> bool:
    """True when a live process holds the folder's lock; False when it is free (its process is gone)."""
    try:
        fd = os.open(folder / SCRATCH_LOCK, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the lock if it was taken here
    return False


def sweep_scratch(root: Path | None = None, grace_seconds: float = SCRATCH_GRACE_SECONDS) -> list[Path]:
    """Remove the scratch folders under ``root`` whose process is gone (their lock is free), except
    those younger than ``grace_seconds`` (a process that has just created its folder may not hold
    the lock yet). Returns the folders removed."""
    root = root or scratch_root()
    removed = []
    try:
        folders = [p for p in root.iterdir() if p.is_dir()]
    except FileNotFoundError:
        return removed
    now = time.time()
    for folder in folders:
        try:
            young = now - folder.stat().st_mtime < grace_seconds
        except FileNotFoundError:
            continue
        if young or _locked_by_someone(folder):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            removed.append(folder)
    if removed:
        log.info("removed %d Spark scratch folder(s) left by processes that are gone, under %s", len(removed), root)
    return removed


def scratch_dir(root: Path | None = None) -> Path:
    """This process's Spark scratch folder (the JVM's ``java.io.tmpdir``, hence Spark's local dirs),
    created and locked on the first call, after :func:`sweep_scratch` removed the folders of
    processes that are gone. The lock lasts as long as the process; a normal exit removes the folder."""
    global _scratch
    if _scratch is not None and _scratch[0].exists():
        return _scratch[0]
    root = root or scratch_root()
    root.mkdir(parents=True, exist_ok=True)
    sweep_scratch(root)
    folder = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root))
    fd = os.open(folder / SCRATCH_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh folder: nobody else can hold it
    _scratch = (folder, fd)
    atexit.register(shutil.rmtree, folder, True)
    return folder


def build_spark(settings: Settings, app_name: str = "lakehouse"):
    """Create (or return) the SparkSession configured for Delta and this machine.

    Args:
        settings: resolved Settings; its ``spark_master``, ``shuffle_partitions`` and ``ivy_dir``
            are used when the session is created here (not under spark-submit).
        app_name: shown in the Spark UI and logs.
    """
    from pyspark.sql import SparkSession

    sql_conf = {
        "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
        "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
        "spark.sql.shuffle.partitions": str(settings.shuffle_partitions),
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.adaptive.enabled": "true",
        # Delta: write statistics so MERGE and batch-id lookups can skip files, and do not let
        # auto-compaction rewrite files behind the stream's back.
        "spark.databricks.delta.schema.autoMerge.enabled": "false",
        # Log replay runs as a Spark job with 50 partitions by default: far too many for 2 cores.
        "spark.databricks.delta.snapshotPartitions": "2",
        "spark.databricks.delta.merge.repartitionBeforeWrite.enabled": "true",
        # The ingest MERGE's source (a deduplicated, cached micro-batch) is deterministic, so Delta
        # need not copy it aside before merging.
        "spark.databricks.delta.merge.materializeSource": "none",
        # A cached micro-batch is read back two or three times and then dropped: building it
        # uncompressed costs less than compressing it (1M validated lines: 9.5 -> 7.1 s, 2 cores).
        "spark.sql.inMemoryColumnarStorage.compressed": "false",
    }
    builder = SparkSession.builder.appName(app_name)
    if not under_spark_submit():
        # Python workers (pandas UDFs: model scoring) must run this interpreter, which has the
        # project's packages; Spark's default is whatever `python3` is first on PATH.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        # The driver binds to 127.0.0.1 (below); said here too, Spark does not warn at every start
        # that the host name resolves to a loopback address.
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        java_version()
        settings.ivy_dir.mkdir(parents=True, exist_ok=True)
        jars = _cached_jars(settings)
        builder = builder.config("spark.jars", ",".join(jars)) if jars else (
            builder.config("spark.jars.packages", delta_package())
            .config("spark.jars.ivy", str(settings.ivy_dir))
        )
        builder = (
            builder.master(settings.spark_master)
            .config("spark.driver.memory", settings.driver_memory)
            .config("spark.ui.enabled", "false")
            .config("spark.driver.bindAddress", "127.0.0.1")
            .config("spark.driver.host", "127.0.0.1")
            .config("spark.ui.showConsoleProgress", "false")
            .config("spark.sql.warehouse.dir", str(settings.data_root / "spark-warehouse"))
        )
        # Quoted: Spark splits the options as a shell would, and a folder may hold a space.
        java_options = [f'"-Dderby.system.home={settings.data_root / "derby"}"']
        if LOG4J2_CONFIG.exists():
            java_options.append(f'"-Dlog4j2.configurationFile={LOG4J2_CONFIG}"')
        if not os.environ.get("SPARK_LOCAL_DIRS"):
            # Spark's local dirs default to the JVM's temporary folder (spark.local.dir itself would
            # log, on every start, that a cluster manager overrides it).
            java_options.append(f'"-Djava.io.tmpdir={scratch_dir()}"')
        builder = builder.config("spark.driver.extraJavaOptions", " ".join(java_options))
    for key, value in sql_conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    if not under_spark_submit():
        _remember_jars(settings, spark)
    spark.sparkContext.setLogLevel(os.environ.get("LAKEHOUSE_SPARK_LOG_LEVEL", "ERROR"))
    return spark


if __name__ == "__main__":  # `python -m lakehouse.spark`: resolve and cache the Delta jars
    try:
        session = build_spark(Settings.from_env(), app_name="lakehouse-warmup")
    except JavaMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    session.range(1).count()
    print(f"Spark {session.version} with {delta_package()} is ready")
    session.stop()
