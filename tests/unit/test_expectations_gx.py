"""The suite is declared once, as Great Expectations expectations. GX's own engine must agree with
the Spark predicates the stream compiles from it, check by check."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import great_expectations as gx

from lakehouse import quality
from lakehouse.streaming import LINES_SCHEMA
from lakehouse.transforms.bronze import to_bronze
from lakehouse.transforms.silver import event_validation_frame

ARRIVAL = datetime(2026, 11, 2, tzinfo=timezone.utc)


def _lines():
    good = dict(event_id="e", user_id="u", merchant_id="m", amount=5.0, currency="EUR", country="FR",
                event_time="2026-11-01T12:00:00Z")
    variants = [
        {}, {"amount": "abc"}, {"amount": -1}, {"currency": "XXX"}, {"country": "QQ"},
        {"event_time": "2026-11-01 12:00"}, {"event_time": "2030-01-01T00:00:00Z"},
        {"event_time": "2019-01-01T00:00:00Z"}, {"amount": 75_000, "currency": "USD"}, {"user_id": None},
        {"event_time": "2026-02-30T12:00:00Z"}, {"merchant_id": "m\u0000"},
    ]
    lines = []
    for i, v in enumerate(variants * 3):
        rec = {**good, **v, "event_id": f"e{i}"}
        lines.append(json.dumps({k: x for k, x in rec.items() if x is not None}))
    # A field given twice (json.dumps cannot write one).
    lines += [json.dumps({**good, "event_id": f"d{i}"}).replace('"amount": 5.0', '"amount": 5.0, "amount": 6')
              for i in range(3)]
    return lines


def test_gx_and_spark_agree_on_every_expectation(spark, settings):
    df = spark.createDataFrame([(l, "f", ARRIVAL) for l in _lines()], LINES_SCHEMA)
    frame = event_validation_frame(to_bronze(df, 0, ARRIVAL))
    checks = quality.event_checks(settings)
    checked = quality.apply_checks(frame, checks)
    spark_counts = {c.name: checked.where(quality.failure_predicate(c)).count() for c in checks}

    context = gx.get_context(mode="ephemeral")
    suite = context.suites.add(quality.build_suite("events", settings))
    pdf = frame.drop("file_modified_at", "ingested_at").toPandas()
    batch = (context.data_sources.add_pandas("p").add_dataframe_asset("events")
             .add_batch_definition_whole_dataframe("b").get_batch(batch_parameters={"dataframe": pdf}))
    result = batch.validate(suite)
    gx_counts = {r.expectation_config.meta["check"]: r.result.get("unexpected_count", 0) for r in result.results}

    assert gx_counts == spark_counts
    assert spark_counts["amount_is_number"] == 3 and spark_counts["currency_known"] == 3
    assert spark_counts["amount_below_review_limit"] == 3
    assert spark_counts["event_time_is_iso8601_with_offset"] == 6  # no offset; February 30
    assert spark_counts["text_has_no_control_characters"] == 3
    assert spark_counts["record_has_unique_fields"] == 3
