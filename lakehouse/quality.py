"""Expectations, declared once as Great Expectations suites, applied to every micro-batch.

Each check is a GX expectation with a name and a severity in its ``meta``, in the manner of Delta Live
Tables' ``expect`` (warn), ``expect_or_drop`` (quarantine) and ``expect_or_fail`` (fail). The suite
is the single declaration: the stream compiles each expectation into a Spark predicate (so a batch is
validated in one pass, at Spark speed) and GX itself validates the same suite in the tests, which
check that both agree row for row.

Checks run against a *validation frame* built by :mod:`lakehouse.transforms.silver`: the raw record's
structural facts (valid JSON, UTF-8, size, known fields) and its fields parsed and typed with
``try_cast``. Structural checks gate the field checks: a line that is not JSON fails
``record_is_valid_json`` alone, instead of also failing every not-null check.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import reduce
from typing import Iterable

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from lakehouse.config import Settings
from lakehouse.reference import FRAUD_SCENARIOS, FX_TO_USD, ISO_COUNTRIES

WARN, QUARANTINE, FAIL = "warn", "quarantine", "fail"
SEVERITIES = (WARN, QUARANTINE, FAIL)

#: The structural check a line that is not JSON fails (every kind's suite has it).
VALID_JSON = "record_is_valid_json"

#: ISO-8601 timestamp with an explicit offset or Z; a local time without offset is ambiguous.
ISO_TS_WITH_OFFSET = r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?(?:Z|z|[+-]\d{2}:?\d{2})$"
#: The check of the text fields silver keeps (ids, a label's scenario): no control character.
PRINTABLE = "text_has_no_control_characters"
#: Largest base-currency amount accepted without a warning (a review limit, not a rejection).
REVIEW_LIMIT_BASE = 50_000.0
#: Largest amount accepted at all: beyond it the value is corrupt, not a payment.
MAX_AMOUNT = 1e9


class ExpectationFailed(RuntimeError):
    """A check with severity ``fail`` failed: the batch is not written and the stream stops."""


@dataclass(frozen=True)
class Check:
    """One named expectation. ``structural`` checks gate the field checks."""

    name: str
    severity: str
    expectation: object  # a great_expectations expectation
    structural: bool = False

    @property
    def column(self) -> str:
        return self.expectation.column


def _expectations():
    import great_expectations as gx  # heavy import: only when a suite is built

    return gx.expectations


def preload() -> threading.Thread:
    """Import Great Expectations in a background thread and return it.

    The import takes about 5 s (2 cores), and a stream needs it for its first batch's checks. Started
    before the JVM, it runs while Spark starts, when this process only waits: a stream that starts
    has its checks that much sooner. An import the main thread asks for meanwhile waits for this one
    (Python's import lock), and an error here is raised again by that import."""
    def load() -> None:
        try:
            _expectations()
        except Exception:  # noqa: BLE001 -- the main thread's own import reports it
            pass

    thread = threading.Thread(target=load, name="lakehouse-gx-import", daemon=True)
    thread.start()
    return thread


def _check(name, severity, expectation, structural=False) -> Check:
    if severity not in SEVERITIES:
        raise ValueError(f"severity {severity!r} of check {name!r} is not one of {SEVERITIES}")
    expectation.meta = {**(expectation.meta or {}), "check": name, "severity": severity}
    return Check(name, severity, expectation, structural)


def _structural_checks(settings: Settings) -> list[Check]:
    E = _expectations()
    return [
        _check("record_is_valid_utf8", QUARANTINE,
               E.ExpectColumnValuesToBeInSet(column="is_valid_utf8", value_set=[True]), True),
        _check("record_within_size_limit", QUARANTINE,
               E.ExpectColumnValuesToBeBetween(column="raw_bytes", max_value=settings.max_record_bytes), True),
        _check(VALID_JSON, QUARANTINE,
               E.ExpectColumnValuesToBeInSet(column="is_valid_json", value_set=[True]), True),
        _check("record_has_known_fields", QUARANTINE,
               E.ExpectColumnValuesToBeInSet(column="has_known_fields", value_set=[True]), True),
        # A field named twice at the object's top level: which value was meant is unknown.
        _check("record_has_unique_fields", QUARANTINE,
               E.ExpectColumnValuesToBeInSet(column="has_unique_fields", value_set=[True]), True),
    ]


def _time_checks(settings: Settings, column: str, raw_column: str) -> list[Check]:
    E = _expectations()
    return [
        _check(f"{column}_not_null", QUARANTINE, E.ExpectColumnValuesToNotBeNull(column=raw_column)),
        # The pattern (ISO_TS_WITH_OFFSET) and a real date and time: the column says it was read.
        _check(f"{column}_is_iso8601_with_offset", QUARANTINE,
               E.ExpectColumnValuesToBeInSet(column=f"{column}_is_read", value_set=[True])),
        # Relative to the file's arrival (its modification time), not the wall clock, so a batch
        # replayed after a crash gets exactly the same verdicts.
        _check(f"{column}_not_in_future", QUARANTINE,
               E.ExpectColumnValuesToBeBetween(column="arrival_lag_seconds",
                                               min_value=-60.0 * settings.future_tolerance_minutes)),
        _check(f"{column}_not_too_old", QUARANTINE,
               E.ExpectColumnValuesToBeBetween(column="arrival_lag_seconds",
                                               max_value=86400.0 * settings.max_event_age_days)),
    ]


def event_checks(settings: Settings) -> list[Check]:
    """The expectation suite of card-payment events (silver_transactions)."""
    E = _expectations()
    ids = [
        _check(f"{c}_not_null", QUARANTINE, E.ExpectColumnValuesToNotBeNull(column=c))
        for c in ("event_id", "user_id", "merchant_id")
    ]
    return [
        *_structural_checks(settings),
        *ids,
        _check(PRINTABLE, QUARANTINE, E.ExpectColumnValuesToBeInSet(column="text_is_printable", value_set=[True])),
        _check("amount_not_null", QUARANTINE, E.ExpectColumnValuesToNotBeNull(column="amount_raw")),
        _check("amount_is_number", QUARANTINE,
               E.ExpectColumnValuesToBeInSet(column="amount_is_number", value_set=[True])),
        _check("amount_positive_and_finite", QUARANTINE,
               E.ExpectColumnValuesToBeBetween(column="amount", min_value=0.0, strict_min=True,
                                               max_value=MAX_AMOUNT)),
        _check("currency_not_null", QUARANTINE, E.ExpectColumnValuesToNotBeNull(column="currency")),
        _check("currency_known", QUARANTINE,
               E.ExpectColumnValuesToBeInSet(column="currency", value_set=sorted(FX_TO_USD))),
        _check("country_not_null", QUARANTINE, E.ExpectColumnValuesToNotBeNull(column="country")),
        _check("country_is_iso3166", QUARANTINE,
               E.ExpectColumnValuesToBeInSet(column="country", value_set=sorted(ISO_COUNTRIES))),
        *_time_checks(settings, "event_time", "event_time_raw"),
        _check("amount_below_review_limit", WARN,
               E.ExpectColumnValuesToBeBetween(column="amount_base", max_value=REVIEW_LIMIT_BASE)),
    ]


def label_checks(settings: Settings) -> list[Check]:
    """The expectation suite of fraud labels (silver_labels)."""
    E = _expectations()
    return [
        *_structural_checks(settings),
        _check("event_id_not_null", QUARANTINE, E.ExpectColumnValuesToNotBeNull(column="event_id")),
        _check(PRINTABLE, QUARANTINE, E.ExpectColumnValuesToBeInSet(column="text_is_printable", value_set=[True])),
        _check("is_fraud_not_null", QUARANTINE, E.ExpectColumnValuesToNotBeNull(column="is_fraud_raw")),
        _check("is_fraud_is_boolean", QUARANTINE,
               E.ExpectColumnValuesToBeInSet(column="is_fraud_raw", value_set=["true", "false"])),
        *_time_checks(settings, "reported_at", "reported_at_raw"),
        _check("scenario_known", WARN,
               E.ExpectColumnValuesToBeInSet(column="scenario", value_set=[*FRAUD_SCENARIOS, "none"])),
    ]


def checks_for(kind: str, settings: Settings) -> list[Check]:
    if kind == "events":
        return event_checks(settings)
    if kind == "labels":
        return label_checks(settings)
    raise ValueError(f"unknown record kind {kind!r}; expected 'events' or 'labels'")


def build_suite(kind: str, settings: Settings):
    """The checks of ``kind`` as a Great Expectations ExpectationSuite."""
    import great_expectations as gx

    return gx.ExpectationSuite(
        name=f"silver_{kind}", expectations=[c.expectation for c in checks_for(kind, settings)]
    )


# ---- compiling expectations into Spark predicates -------------------------------------------------

def failure_predicate(check: Check) -> Column:
    """A Spark column that is true where the row fails ``check``, with GX's null semantics.

    GX ignores nulls in every expectation except not-null, and so do these predicates.
    """
    e = check.expectation
    col = F.col(e.column)
    kind = type(e).__name__
    if kind == "ExpectColumnValuesToNotBeNull":
        return col.isNull()
    if kind == "ExpectColumnValuesToBeInSet":
        return col.isNotNull() & ~col.isin(list(e.value_set))
    if kind == "ExpectColumnValuesToMatchRegex":
        return col.isNotNull() & ~col.rlike(e.regex)
    if kind == "ExpectColumnValuesToBeBetween":
        ok = F.lit(True)
        if e.min_value is not None:
            ok = ok & ((col > e.min_value) if e.strict_min else (col >= e.min_value))
        if e.max_value is not None:
            ok = ok & ((col < e.max_value) if e.strict_max else (col <= e.max_value))
        return col.isNotNull() & ~ok
    raise NotImplementedError(f"expectation type {kind} of check {check.name!r} has no Spark form yet")


@dataclass(frozen=True)
class CompiledChecks:
    """A suite's Spark expressions, built once (:func:`compile_checks`) and applied to every micro-batch.

    They name columns only, so they fit any validation frame of the session; building them anew for
    each batch cost about 0.45 s of Python-to-JVM calls (a literal per value of the country set)."""

    structural_ok: Column
    failed: Column
    warned: Column
    fatal: Column


def compile_checks(checks: Iterable[Check]) -> CompiledChecks:
    """The expressions of :func:`apply_checks` for ``checks``. Field checks are evaluated only where
    every structural check passed."""
    checks = list(checks)
    structural_ok = reduce(
        lambda acc, c: acc & ~F.coalesce(failure_predicate(c), F.lit(False)),
        [c for c in checks if c.structural],
        F.lit(True),
    )

    def names(selected: list[Check]) -> Column:
        if not selected:
            return F.array().cast("array<string>")
        flagged = [
            F.when(
                (F.lit(True) if c.structural else F.col("_structural_ok"))
                & F.coalesce(failure_predicate(c), F.lit(False)),
                F.lit(c.name),
            )
            for c in selected
        ]
        return F.filter(F.array(*flagged), lambda x: x.isNotNull())

    return CompiledChecks(
        structural_ok=structural_ok,
        failed=names([c for c in checks if c.severity in (QUARANTINE, FAIL)]),
        warned=names([c for c in checks if c.severity == WARN]),
        fatal=names([c for c in checks if c.severity == FAIL]),
    )


def apply_checks(frame: DataFrame, checks: Iterable[Check] | CompiledChecks) -> DataFrame:
    """Add ``failed_checks`` (names of failed quarantine/fail checks), ``warned_checks`` and
    ``failed_fatal`` (names of failed fail-severity checks) to the validation frame. ``checks``: the
    suite, or its :func:`compile_checks` (what a stream applies to each batch)."""
    c = checks if isinstance(checks, CompiledChecks) else compile_checks(checks)
    return (frame.withColumn("_structural_ok", c.structural_ok)
            # one projection: each withColumn call analyses the whole plan again
            .withColumns({"failed_checks": c.failed, "warned_checks": c.warned, "failed_fatal": c.fatal})
            .drop("_structural_ok"))
