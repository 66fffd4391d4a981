"""The driver's heap and what the driver route keeps in it: the look-back bound follows the heap
(lakehouse.spark.driver_rows_limit), and rows computed in the driver reach Spark's writes from a
Parquet file rather than from the heap (lakehouse.gold.staged)."""

from __future__ import annotations

import os
import time
from datetime import date, datetime, timezone

import pyarrow as pa
import pytest
from pyspark.sql.types import (BooleanType, DateType, DoubleType, LongType, StringType, StructField, StructType,
                               TimestampType)
from pyspark.testing import assertDataFrameEqual

from lakehouse.gold import staged
from lakehouse.spark import driver_heap_bytes, driver_rows_limit, memory_bytes
from tests.conftest import spark_settings


@pytest.mark.parametrize("size, expected", [
    ("4g", 4 * 1024 ** 3), ("4G", 4 * 1024 ** 3), ("4096m", 4 * 1024 ** 3), ("4096", 4 * 1024 ** 3),
    ("1t", 1024 ** 4), ("512k", 512 * 1024), ("2gb", 2 * 1024 ** 3),
])
def test_memory_sizes_read_as_spark_reads_them(size, expected):
    assert memory_bytes(size) == expected


@pytest.mark.parametrize("size", ["", "four gigs", "4.5g", "-1g", "4x"])
def test_a_size_spark_would_refuse_is_an_error(size):
    with pytest.raises(ValueError, match="not a memory size"):
        memory_bytes(size)


def test_the_look_back_bound_follows_the_drivers_heap(spark, tmp_path):
    settings = spark_settings(tmp_path)
    heap = driver_heap_bytes(spark)
    # The test session starts as every local job does, with LAKEHOUSE_DRIVER_MEMORY (4g): the bound stands.
    assert heap >= 0.9 * memory_bytes(settings.driver_memory)
    assert driver_rows_limit(spark, settings) == settings.features_driver_max_rows == 3_000_000
    # Sized for a driver sixteen times as large: a sixteenth of the rows, or about.
    sized_for_more = settings.replace(driver_memory=f"{16 * heap // 1024 ** 2}m")
    assert driver_rows_limit(spark, sized_for_more) == pytest.approx(3_000_000 / 16, rel=0.01)
    # A setting Spark would refuse leaves the bound as it is (the JVM started with something else).
    assert driver_rows_limit(spark, settings.replace(driver_memory="lots")) == 3_000_000


SCHEMA = StructType([
    StructField("event_id", StringType(), False),
    StructField("event_time", TimestampType(), True),
    StructField("event_date", DateType(), True),
    StructField("amount", DoubleType(), True),
    StructField("n", LongType(), True),
    StructField("first", BooleanType(), True),
])


def test_staged_rows_read_back_as_spark_makes_them_and_the_file_goes(spark, tmp_path):
    t0 = datetime(2026, 3, 29, 0, 59, 59, 999_999, tzinfo=timezone.utc)
    rows = pa.table({
        "event_id": ["a", "b", "c"],
        "event_time": pa.array([t0, None, datetime(2026, 10, 25, 1, 0, tzinfo=timezone.utc)],
                               pa.timestamp("us", tz="UTC")),
        "event_date": pa.array([date(2026, 3, 29), None, date(2026, 10, 25)], pa.date32()),
        "amount": [12.5, None, -0.0],
        "n": pa.array([1, None, 2 ** 62], pa.int64()),
        "first": [True, None, False],
    })
    folder = tmp_path / "staging"
    leftover = folder / "1-killed.parquet"  # a file a killed process left a day ago
    folder.mkdir()
    leftover.write_bytes(b"PAR1")
    os.utime(leftover, (time.time() - 90_000, time.time() - 90_000))
    with staged(spark, rows, SCHEMA, folder) as df:
        assert df.schema.names == SCHEMA.names
        assert [f.dataType for f in df.schema] == [f.dataType for f in SCHEMA]
        assertDataFrameEqual(df, spark.createDataFrame(rows, schema=SCHEMA))
        micros = {r["event_id"]: r["us"] for r in df.selectExpr("event_id", "unix_micros(event_time) AS us").collect()}
        assert micros == {"a": 1_774_745_999_999_999, "b": None, "c": 1_792_890_000_000_000}
        assert len(list(folder.glob("*.parquet"))) == 1
    assert list(folder.iterdir()) == []
