"""Bronze: every inbox record exactly as received, with its lineage.

The stream reads the inbox as text, one record per line, so a line that is not JSON, not UTF-8 or far
too large is still kept verbatim here. Bronze is append-only; nothing is parsed or dropped.
"""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

#: Columns of a bronze table, in order.
BRONZE_COLUMNS = ("raw", "raw_bytes", "source_file", "file_modified_at", "batch_id", "ingested_at")


def to_bronze(lines: DataFrame, batch_id: int, ingested_at) -> DataFrame:
    """Shape one micro-batch of inbox lines into bronze rows.

    Args:
        lines: columns ``value`` (the line's text), ``source_file`` and ``file_modified_at``.
        batch_id: the streaming micro-batch id (the unit of idempotency downstream).
        ingested_at: the processing time of the batch (a ``datetime``).
    """
    return lines.select(
        F.col("value").alias("raw"),
        F.octet_length("value").cast("long").alias("raw_bytes"),
        F.col("source_file"),
        F.col("file_modified_at"),
        F.lit(batch_id).cast("long").alias("batch_id"),
        F.lit(ingested_at).cast("timestamp").alias("ingested_at"),
    )
