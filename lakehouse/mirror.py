"""Mirror gold Delta tables into Postgres, exactly once, converging after any failure.

Each run reads the Delta versions the Postgres ledger has not applied yet: the change data feed
between the ledger's version and the latest one, netted per key (the last change wins; a key whose
last change is a delete is deleted), or the whole snapshot on the first run. The rows and the new
ledger version are committed in one Postgres transaction (:mod:`lakehouse.io.pg_mirror`), so a kill at
any moment leaves Postgres at some applied version, and the next run catches up from there. An
unreachable Postgres is retried with back-off.
"""

from __future__ import annotations

from typing import Callable

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import (BooleanType, DateType, DoubleType, FloatType, IntegerType, LongType,
                               StringType, StructType, TimestampType)

from lakehouse.config import Settings
from lakehouse.gold import GOLD_TABLES
from lakehouse.io import delta, pg_mirror

_PG_TYPES = {StringType: "text", DoubleType: "double precision", FloatType: "real", LongType: "bigint",
             IntegerType: "integer", BooleanType: "boolean", TimestampType: "timestamptz", DateType: "date"}


def mirror_spec(name: str, schema: StructType) -> pg_mirror.MirrorTable:
    """The Postgres table mirroring gold table ``name`` (its Delta schema mapped to Postgres types)."""
    spec = GOLD_TABLES[name]
    columns = []
    for f in schema.fields:
        pg_type = _PG_TYPES.get(type(f.dataType))
        if pg_type is None:
            raise TypeError(f"{name}.{f.name}: no Postgres type for {f.dataType.simpleString()}")
        columns.append((f.name, pg_type))
    return pg_mirror.MirrorTable(name=name, columns=tuple(columns), key=spec["key"], indexes=spec["indexes"])


def net_changes(cdf: DataFrame, key: tuple[str, ...]) -> tuple[DataFrame, DataFrame]:
    """(upserts, deletes) from a change data feed: per key, the last change by commit version; within
    one version an insert/post-image wins over a delete (an overwrite deletes then re-inserts)."""
    cdf = cdf.where(F.col("_change_type") != "update_preimage")
    rank = F.when(F.col("_change_type") == "delete", 0).otherwise(1)
    w = Window.partitionBy(*key).orderBy(F.desc("_commit_version"), F.desc(rank))
    last = cdf.withColumn("_rn", F.row_number().over(w)).where("_rn = 1")
    meta = ["_change_type", "_commit_version", "_commit_timestamp", "_rn"]
    upserts = last.where(F.col("_change_type") != "delete").drop(*meta)
    deletes = last.where(F.col("_change_type") == "delete").select(*key)
    return upserts, deletes


def mirror_table(spark: SparkSession, settings: Settings, name: str,
                 on_retry: Callable | None = None, attempts: int | None = 10) -> dict:
    """Bring the Postgres copy of gold table ``name`` to the latest Delta version."""
    path = settings.table_path(name)
    if not delta.is_delta_table(path):
        return {"table": name, "skipped": "no Delta table yet"}
    version = delta.table_version(spark, path)
    snapshot = delta.read(spark, path, version=version)
    table = mirror_spec(name, snapshot.schema)
    source = f"delta:{name}"

    def applied(conn) -> int | None:
        pg_mirror.ensure_schema(conn, settings.pg_schema, [table])
        return pg_mirror.applied_version(conn, settings.pg_schema, source, name)

    done = pg_mirror.with_retries(applied, settings, attempts=attempts, on_retry=on_retry)
    if done is not None and done >= version:
        return {"table": name, "version": version, "applied": done, "rows": 0}
    if done is None:
        upserts, deletes = snapshot, None
    else:
        cdf = (spark.read.format("delta").option("readChangeFeed", "true")
               .option("startingVersion", done + 1).option("endingVersion", version).load(str(path)))
        upserts, deletes = net_changes(cdf, table.key)
    rows = upserts.toPandas()
    gone = deletes.toPandas() if deletes is not None else None

    def apply(conn) -> int:
        return pg_mirror.upsert_batch(conn, settings.pg_schema, table, rows, source, version, deletes=gone)

    changed = pg_mirror.with_retries(apply, settings, attempts=attempts, on_retry=on_retry)
    return {"table": name, "version": version, "applied_before": done, "rows": changed,
            "deleted": 0 if gone is None else len(gone)}


def mirror_all(spark: SparkSession, settings: Settings, on_retry: Callable | None = None) -> list[dict]:
    return [mirror_table(spark, settings, name, on_retry=on_retry) for name in GOLD_TABLES]
