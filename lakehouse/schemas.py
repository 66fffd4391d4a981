"""Explicit schemas for the inbox records and the tables built from them.

The inbox is JSON lines. Streams never infer a schema: each line is read as text (so bronze keeps it
exactly as received) and parsed with the *raw* schemas below, in which every field is a string. Typing
happens in silver with ``try_cast``, so a wrong type is a named expectation failure instead of a
silently nulled field.
"""

from __future__ import annotations

from pyspark.sql.types import (
    BooleanType,
    DoubleType,
    LongType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

#: Fields of a card-payment event, as the feed sends them.
EVENT_FIELDS: tuple[str, ...] = (
    "event_id",
    "user_id",
    "merchant_id",
    "amount",
    "currency",
    "country",
    "event_time",
)

#: Fields of a fraud label (a chargeback or a review outcome), as the feed sends them.
LABEL_FIELDS: tuple[str, ...] = ("event_id", "is_fraud", "scenario", "reported_at")

CORRUPT_COLUMN = "_corrupt_record"


def raw_schema(field_names: tuple[str, ...]) -> StructType:
    """All-string parse schema plus the corrupt-record column used to detect broken JSON."""
    return StructType(
        [StructField(name, StringType(), True) for name in field_names]
        + [StructField(CORRUPT_COLUMN, StringType(), True)]
    )


RAW_EVENT_SCHEMA = raw_schema(EVENT_FIELDS)
RAW_LABEL_SCHEMA = raw_schema(LABEL_FIELDS)

#: Typed event as it lands in silver (plus lineage columns added by the transform).
TYPED_EVENT_SCHEMA = StructType(
    [
        StructField("event_id", StringType(), False),
        StructField("user_id", StringType(), False),
        StructField("merchant_id", StringType(), False),
        StructField("amount", DoubleType(), False),
        StructField("currency", StringType(), False),
        StructField("amount_base", DoubleType(), False),
        StructField("country", StringType(), False),
        StructField("event_time", TimestampType(), False),
    ]
)

TYPED_LABEL_SCHEMA = StructType(
    [
        StructField("event_id", StringType(), False),
        StructField("is_fraud", BooleanType(), False),
        StructField("scenario", StringType(), True),
        StructField("reported_at", TimestampType(), False),
    ]
)

BATCH_ID_TYPE = LongType()
