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

Class-data sharing. A fresh driver JVM loads about 23,000 classes (Spark, Scala, Hadoop, Delta) before
its first Delta read, and loading them took 8-9 s of its first 20 s on 2 cores. ``python -m
lakehouse.spark`` (run once by ``make install``/``make dev``) runs a small Delta workload with the
JVM's ``-XX:ArchiveClassesAtExit`` and keeps the archive under ``<cache>/cds/``, named after the
pyspark, Delta and Java it was made with; every later session started here maps it
(``-XX:SharedArchiveFile``) and loads most of those classes from it (:func:`cds_archive`).
``LAKEHOUSE_CDS=0`` turns it off; under ``spark-submit`` the cluster's JVMs are left as they are.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import logging
import os
import re
import shlex
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
def _java() -> tuple[str, str]:
    """The Java that Spark will launch and what its ``-version`` prints; raises JavaMissing with the fix."""
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
    return java, out


def java_version() -> int:
    """Major version of the Java that Spark will launch; raises JavaMissing with the fix."""
    java, out = _java()
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


@lru_cache(maxsize=8)
def check_java_options(options: str) -> list[str]:
    """``options`` (``LAKEHOUSE_JAVA_OPTIONS``) as Spark's ``extraJavaOptions`` takes them, once the
    JVM has started with them: a JVM that refuses an option would otherwise end Spark's start in a
    gateway error that names neither the option nor the setting."""
    try:
        words = shlex.split(options)
    except ValueError as exc:
        raise JavaMissing(f"LAKEHOUSE_JAVA_OPTIONS={options!r} is not shell-quoted correctly ({exc}); "
                          "fix the quoting or unset it.") from None
    java, _ = _java()
    res = subprocess.run([java, *words, "-version"], capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        said = next((line for line in (res.stderr + res.stdout).splitlines()
                     if line.strip() and not line.startswith("NOTE: Picked up")), "no output")
        raise JavaMissing(f"LAKEHOUSE_JAVA_OPTIONS={options!r}: Java does not start with these options "
                          f"({said.strip()}); fix or unset it.")
    return [shlex.quote(word) for word in words]  # Spark splits them as a POSIX shell would


def memory_bytes(size: str) -> int:
    """A JVM memory size as Spark takes it (``4g``, ``512m``, ``1t``; a bare number is MiB) in bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)b?\s*", size.lower())
    if match is None:
        raise ValueError(f"not a memory size: {size!r} (say 4g or 4096m)")
    return int(match.group(1)) * 1024 ** "kmgt".index(match.group(2) or "m") * 1024


def driver_heap_bytes(spark) -> int:
    """The driver JVM's largest heap (what ``--driver-memory`` or ``LAKEHOUSE_DRIVER_MEMORY`` gave it)."""
    return int(spark.sparkContext._jvm.java.lang.Runtime.getRuntime().maxMemory())


def _heap_share(spark, settings: Settings) -> float:
    """The driver's heap as a share of the ``LAKEHOUSE_DRIVER_MEMORY`` the settings are sized for (at
    most 1; 1 when that setting is not a size Spark takes)."""
    try:
        wanted = memory_bytes(settings.driver_memory)
    except ValueError:
        return 1.0
    heap = driver_heap_bytes(spark)
    return 1.0 if heap >= 0.9 * wanted else heap / wanted  # a JVM reports a little under -Xmx


def driver_rows_limit(spark, settings: Settings) -> int:
    """The most look-back rows the driver route may collect. ``settings.features_driver_max_rows``
    (3M) fits a driver of ``LAKEHOUSE_DRIVER_MEMORY`` (4g, what a local start gives it); a driver
    with less heap gets a bound as much smaller, and computes a larger look-back's features in Spark
    instead of failing to collect it (spark-submit's default driver of 1g: 750k rows; with the 3M
    bound, a 1M-event catch-up failed there with ``TaskResultLost``)."""
    return int(settings.features_driver_max_rows * _heap_share(spark, settings))


def _check_driver_heap(spark, settings: Settings) -> None:
    """Under spark-submit the driver's heap is spark-submit's to set (its default is 1g): say so,
    once, when it is smaller than the ``LAKEHOUSE_DRIVER_MEMORY`` a local start would give it."""
    if _heap_share(spark, settings) < 1.0:
        log.warning("lakehouse: the driver has %.1f GiB of heap, less than the %s it is sized for "
                    "(LAKEHOUSE_DRIVER_MEMORY); pass --driver-memory %s to spark-submit. Until then "
                    "look-backs of over %s rows are computed in Spark, more slowly.",
                    driver_heap_bytes(spark) / 1024 ** 3, settings.driver_memory, settings.driver_memory,
                    f"{driver_rows_limit(spark, settings):,}")


def cds_archive(settings: Settings) -> Path:
    """Where the class-data sharing archive of this pyspark, Delta and Java is (or would be) kept.

    An archive only fits the JVM build and the class path it was made with (a JVM given another
    one ignores it), so its name carries the pyspark and delta-spark versions and a digest of the
    Java binary and its version."""
    from importlib.metadata import version

    import pyspark

    java, out = _java()
    digest = hashlib.sha1(f"{os.path.realpath(java)}\n{out}".encode()).hexdigest()[:12]
    return settings.cache_dir / "cds" / f"spark-{pyspark.__version__}-delta-{version('delta-spark')}-{digest}.jsa"


def install_cds_archive(dumped: Path, archive: Path) -> bool:
    """Keep the archive a JVM ``dumped`` at exit as ``archive``, if a JVM can start with it: a
    truncated archive (a dump cut short by a full disk or a kill) crashes every JVM given it, so it
    is checked before it takes the name later sessions use. Returns whether it was kept."""
    java, _ = _java()
    try:
        ok = dumped.is_file() and dumped.stat().st_size > 0 and subprocess.run(
            [java, f"-XX:SharedArchiveFile={dumped}", "-Xlog:cds*=off", f"-XX:ErrorFile={os.devnull}",
             "-XX:-CreateCoredumpOnCrash", "-version"],
            capture_output=True, timeout=60).returncode == 0  # a crash leaves no hs_err_pid*.log behind
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        dumped.unlink(missing_ok=True)
        return False
    for old in archive.parent.glob("*.jsa"):  # archives of other versions: no session maps them again
        if old != archive:
            old.unlink(missing_ok=True)
    os.replace(dumped, archive)
    return True


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


def build_spark(settings: Settings, app_name: str = "lakehouse", cds_dump: Path | None = None):
    """Create (or return) the SparkSession configured for Delta and this machine.

    Args:
        settings: resolved Settings; its ``spark_master``, ``shuffle_partitions`` and ``ivy_dir``
            are used when the session is created here (not under spark-submit).
        app_name: shown in the Spark UI and logs.
        cds_dump: the JVM writes the classes it loaded to this file when it exits (a class-data
            sharing archive; see the module doc), instead of mapping the kept one.
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
        # Generated code is cached by its source; a micro-batch's queries (ingest, silver MERGE, gold,
        # the risk) generate a few hundred classes, more than the default 100 entries, so every batch
        # compiled them again: 49 small batches in one JVM, 7,100 compilations against 968 with 2,000
        # (100-200 a batch against 6-17). Each entry is one class of a few kilobytes.
        "spark.sql.codegen.cache.maxEntries": "2000",
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
        # Quiet: the dump lists every class it skips, and a JVM that cannot use the archive (say, the
        # class path changed) starts without it.
        if cds_dump is not None:
            java_options += [f'"-XX:ArchiveClassesAtExit={cds_dump}"', '"-Xlog:cds*=off"']
        elif settings.class_data_sharing and (archive := cds_archive(settings)).is_file():
            java_options += [f'"-XX:SharedArchiveFile={archive}"', '"-Xlog:cds*=off"']
        if settings.java_options:
            java_options += check_java_options(settings.java_options)
        builder = builder.config("spark.driver.extraJavaOptions", " ".join(java_options))
    for key, value in sql_conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    if not under_spark_submit():
        _remember_jars(settings, spark)
    else:
        _check_driver_heap(spark, settings)
    spark.sparkContext.setLogLevel(os.environ.get("LAKEHOUSE_SPARK_LOG_LEVEL", "ERROR"))
    return spark


def _warm_up(spark, folder: Path) -> None:
    """A small run of what the jobs do: JSON read, Delta write, MERGE, change feed and time travel,
    a foreachBatch stream, Arrow collects; so that the classes they need are loaded (and archived)."""
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    inbox, path = folder / "inbox", str(folder / "table")
    inbox.mkdir(parents=True)
    (inbox / "a.jsonl").write_text('{"id": 1, "k": "a", "t": "2026-01-01T00:00:00Z", "x": 1.5}\n'
                                   '{"id": 2, "k": "b", "t": "2026-01-01T00:01:00Z", "x": 2.5}\n')
    rows = spark.read.json(str(inbox)).withColumn("t", F.to_timestamp("t")).withColumn("d", F.to_date("t"))
    rows.write.format("delta").partitionBy("d").save(path)
    spark.sql(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES ('delta.enableChangeDataFeed' = 'true')")
    (DeltaTable.forPath(spark, path).alias("t").merge(rows.withColumn("x", F.col("x") * 2).alias("s"), "t.id = s.id")
     .whenMatchedUpdateAll().whenNotMatchedInsertAll().execute())
    spark.read.format("delta").option("readChangeFeed", "true").option("startingVersion", 1).load(path).toArrow()
    spark.read.format("delta").option("versionAsOf", 0).load(path).groupBy("k").agg(F.sum("x")).toPandas()
    DeltaTable.forPath(spark, path).history().collect()
    (spark.readStream.text(str(inbox)).writeStream.option("checkpointLocation", str(folder / "checkpoint"))
     .foreachBatch(lambda df, batch_id: df.count()).trigger(availableNow=True).start().awaitTermination())


def _main(argv: list[str] | None = None) -> int:
    """`python -m lakehouse.spark`: resolve and cache the Delta jars, and archive the classes a
    session loads (class-data sharing, see the module doc) unless that archive exists already."""
    import argparse

    from pyspark import SparkContext

    argparse.ArgumentParser(
        prog="python -m lakehouse.spark",
        description="Start Spark once from Python: resolve the Delta jars into the Ivy cache "
                    "($LAKEHOUSE_CACHE/ivy, Maven Central on the first run only) and, unless it exists or "
                    "LAKEHOUSE_CDS=0, archive the classes a session loads ($LAKEHOUSE_CACHE/cds, about 200 MB, "
                    "about a minute) so that later sessions start faster. `make install` and `make dev` run it.",
    ).parse_args(argv)
    try:
        settings = Settings.from_env()
        archive = cds_archive(settings) if settings.class_data_sharing else None
        dump = None
        if archive is not None and not archive.is_file():
            archive.parent.mkdir(parents=True, exist_ok=True)
            dump = archive.with_name(f"{archive.stem}.{os.getpid()}.tmp")
        session = build_spark(settings, app_name="lakehouse-warmup", cds_dump=dump)
    except (JavaMissing, ValueError) as exc:  # ValueError: a malformed LAKEHOUSE_* setting
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if dump is None:
        session.range(1).count()
        print(f"Spark {session.version} with {delta_package()} is ready")
        session.stop()
        return 0
    print("running a small Delta workload to archive the classes Spark loads (once; faster starts) ...")
    folder = Path(tempfile.mkdtemp(prefix="lakehouse-warmup-"))
    try:
        _warm_up(session, folder)
    finally:
        version = session.version
        gateway = getattr(SparkContext._gateway, "proc", None)
        session.stop()
        if gateway is not None:  # the JVM exits when its stdin closes, and writes the archive then
            gateway.stdin.close()
            gateway.wait(timeout=600)
        shutil.rmtree(folder, ignore_errors=True)
    kept = install_cds_archive(dump, archive)
    print(f"Spark {version} with {delta_package()} is ready; class-data sharing archive "
          + (f"kept: {archive} ({archive.stat().st_size / 1e6:.0f} MB)" if kept else
             "not kept (the JVM could not start with it); sessions start without one"))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
