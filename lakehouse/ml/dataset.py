"""The training set: a pinned snapshot of gold features and silver labels, split by time with a label
delay, and a content hash that proves a rebuild is identical.

Snapshot. Training reads ``gold_transaction_features`` and ``silver_labels`` at fixed Delta versions
(:class:`Snapshot`): the latest ones, the ones given (``--as-of-version F:L``), or the ones current
at a timestamp (``--as-of-timestamp``, resolved to versions from each table's history). The versions
are logged to MLflow, so the same training set can be rebuilt later; :func:`content_hash` of the
train and test frames is logged beside them and checked by the tests.

Split (the delay-aware protocol of Dal Pozzolo et al., as in the "Reproducible Machine Learning for
Credit Card Fraud Detection" handbook), on UTC event dates, all windows inclusive::

    [ train: train_days ][ gap: gap_days ][ test: test_days ] ... maturity_days ... newest event date
                                          ^ cut-off = test start 00:00 UTC, when the model "goes live"

* **Anchor**: the test window ends at the anchor date, by default the newest event date in the
  snapshot minus ``maturity_days`` (chargebacks take days: the labels of the test window are treated
  as matured, i.e. complete enough to evaluate on).
* **Train labels known at training time**: a train transaction is fraud only if its fraud label was
  reported at or before the cut-off. Unlabelled transactions, and fraud reported later, are
  negatives, as a model trained at the cut-off would have seen them.
* **Gap** ("delay period"): its transactions are used neither for training nor for testing: at the
  cut-off most of their labels are not known yet, and they would bias the training set.
* **Test labels**: every fraud label in the snapshot (the test set is judged with hindsight).
* **Known compromised cards**: a test transaction is removed from evaluation if its user already
  had a fraud label reported before the start of the transaction's day (the card was blocked, so
  the model would not be judged on it). This holds for the whole test window, day by day, and so
  includes every card known compromised before the test window starts.
* The newest day of the snapshot is kept apart (``latest``) for drift monitoring, without labels.

Spark does the joins and filters; the (small) result is collected with ``toPandas``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from lakehouse import damage
from lakehouse.config import Settings
from lakehouse.io import delta
from lakehouse.spark import as_utc
from lakehouse.transforms.features import FEATURE_COLUMNS, ID_COLUMNS

LABEL_COLUMNS = ("is_fraud", "scenario", "reported_at")


class DatasetError(ValueError):
    """The snapshot cannot give the requested training set (no table, too little history ...)."""


@dataclass(frozen=True)
class SplitConfig:
    train_days: int = 7
    gap_days: int = 7
    test_days: int = 7
    maturity_days: int = 7
    #: Last day of the test window; None = newest event date - maturity_days.
    anchor_date: date | None = None

    def __post_init__(self) -> None:
        if self.train_days < 1 or self.test_days < 1:
            raise DatasetError("train and test windows need at least one day")
        if self.gap_days < 0 or self.maturity_days < 0:
            raise DatasetError("gap and maturity days cannot be negative")


@dataclass(frozen=True)
class Windows:
    train_start: date
    train_end: date
    test_start: date
    test_end: date
    latest_date: date

    @property
    def cutoff(self) -> datetime:
        """Labels reported at or before this instant are known to the model (test start, UTC)."""
        return datetime.combine(self.test_start, time(0), tzinfo=timezone.utc)

    @property
    def test_days(self) -> int:
        return (self.test_end - self.test_start).days + 1

    def as_params(self) -> dict[str, str]:
        return {**{k: str(v) for k, v in asdict(self).items()}, "label_cutoff": self.cutoff.isoformat()}


@dataclass(frozen=True)
class Snapshot:
    features_version: int
    labels_version: int | None

    def as_params(self) -> dict[str, str]:
        return {"features_version": str(self.features_version),
                "labels_version": "none" if self.labels_version is None else str(self.labels_version)}


@dataclass
class TrainingSet:
    snapshot: Snapshot
    windows: Windows
    train: pd.DataFrame       # ID_COLUMNS + FEATURE_COLUMNS + is_fraud (known at the cut-off)
    test: pd.DataFrame        # ... + is_fraud (all labels), scenario; known compromised removed
    latest: pd.DataFrame      # rows of the newest day (drift), no labels
    test_removed_known_compromised: int

    @property
    def train_hash(self) -> str:
        return content_hash(self.train)

    @property
    def test_hash(self) -> str:
        return content_hash(self.test)

    def summary(self) -> dict:
        return {
            "n_train": len(self.train), "n_train_fraud": int(self.train["is_fraud"].sum()),
            "n_test": len(self.test), "n_test_fraud": int(self.test["is_fraud"].sum()),
            "n_test_removed_known_compromised": self.test_removed_known_compromised,
        }


def parse_as_of_version(text: str) -> tuple[int, int | None]:
    """``"F:L"`` (features and labels versions) or ``"F"`` -> (F, L or None = latest labels)."""
    parts = text.split(":")
    try:
        if len(parts) == 1:
            return int(parts[0]), None
        if len(parts) == 2:
            return int(parts[0]), int(parts[1])
    except ValueError:
        pass
    raise DatasetError(f"--as-of-version {text!r}: give FEATURES_VERSION:LABELS_VERSION, e.g. 12:7")


def version_at(spark: SparkSession, path, ts: datetime) -> int:
    """The table version that was current at ``ts`` (the newest commit at or before it)."""
    from delta.tables import DeltaTable

    ts = ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)
    rows = DeltaTable.forPath(spark, str(path)).history().select("version", "timestamp").collect()
    ok = [r["version"] for r in rows if as_utc(r["timestamp"]) <= ts]
    if not ok:
        oldest = min((r["version"] for r in rows), default=None)
        if oldest:  # the log keeps no commit before it: log clean-up removed them
            raise DatasetError(f"{path} has no version at or before {ts.isoformat()} any more: log clean-up "
                               f"removed the commits before version {oldest} (delta.logRetentionDuration). "
                               f"{_RETAINED_HINT}")
        raise DatasetError(f"{path} has no version at or before {ts.isoformat()}")
    return max(ok)


def resolve_snapshot(spark: SparkSession, settings: Settings, as_of_version: tuple[int, int | None] | None = None,
                     as_of_timestamp: datetime | None = None) -> Snapshot:
    fpath, lpath = settings.table_path("gold_transaction_features"), settings.table_path("silver_labels")
    if not delta.is_delta_table(fpath):
        raise DatasetError(f"no gold_transaction_features at {fpath}: run `lakehouse backfill` first")
    has_labels = delta.is_delta_table(lpath)
    if as_of_timestamp is not None:
        return Snapshot(version_at(spark, fpath, as_of_timestamp),
                        version_at(spark, lpath, as_of_timestamp) if has_labels else None)
    latest_f = delta.table_version(fpath)
    latest_l = delta.table_version(lpath) if has_labels else None
    if as_of_version is None:
        return Snapshot(latest_f, latest_l)
    f, lab = as_of_version
    if f > latest_f:
        raise DatasetError(f"gold_transaction_features has no version {f} (latest {latest_f})")
    if lab is not None and (latest_l is None or lab > latest_l):
        raise DatasetError(f"silver_labels has no version {lab} (latest {latest_l})")
    return Snapshot(f, lab if lab is not None else latest_l)


def choose_windows(first_date: date, latest_date: date, cfg: SplitConfig) -> Windows:
    test_end = cfg.anchor_date or (latest_date - timedelta(days=cfg.maturity_days))
    test_start = test_end - timedelta(days=cfg.test_days - 1)
    train_end = test_start - timedelta(days=cfg.gap_days + 1)
    train_start = train_end - timedelta(days=cfg.train_days - 1)
    if test_end > latest_date:
        raise DatasetError(f"anchor {test_end} is after the newest event date {latest_date}")
    if train_start < first_date:
        need = cfg.train_days + cfg.gap_days + cfg.test_days + (0 if cfg.anchor_date else cfg.maturity_days)
        raise DatasetError(
            f"not enough history: the train window would start {train_start}, before the first event date "
            f"{first_date} (the split needs {need} days); generate more days or shorten "
            "--train-days/--gap-days/--test-days")
    return Windows(train_start, train_end, test_start, test_end, latest_date)


#: What to do about a snapshot older than what its tables keep.
_RETAINED_HINT = ("Train on a version the table still holds: the latest (the default), or a newer one with "
                  "--as-of-timestamp / --as-of-version. `lakehouse maintain` keeps the versions that registered "
                  "models (and the champion) were trained on: register a model whose training set must stay "
                  "reproducible.")


def check_retained(spark: SparkSession, name: str, path, version: int) -> None:
    """Raise :class:`DatasetError` when version ``version`` of table ``name`` is older than what the
    table keeps: log clean-up removed its commit (``delta.logRetentionDuration``), or VACUUM removed
    data files it reads (it was older than the retention and no model pinned it). Without this, the
    read failed as a damaged table, whose fix (rebuild the table) is wrong: the table is whole, only
    that old version is gone. The latest version is not looked at; an older one costs a log replay
    (no data is read) and a ``stat`` per file."""
    from lakehouse.io.paths import local_path

    if version >= (delta.table_version(path) or 0):
        return
    kept = delta.cleaned_before(path, version)
    if kept is not None and not any((Path(path) / "_delta_log").glob(f"{version:020d}.checkpoint*")):
        raise DatasetError(f"{name} version {version} is gone: log clean-up removed its commit (the log keeps "
                           f"the versions from {kept} on; delta.logRetentionDuration). {_RETAINED_HINT}")
    uris = delta.read(spark, path, version=version).inputFiles()
    gone = [u for u in uris if u.startswith("file:") and not os.path.exists(local_path(u))]
    if gone:
        raise DatasetError(f"{name} version {version} can no longer be read: VACUUM removed {len(gone)} of the "
                           f"{len(uris)} data files it reads (e.g. {local_path(gone[0])}), as it was older than "
                           f"the table's retention. {_RETAINED_HINT}")


def build(spark: SparkSession, settings: Settings, cfg: SplitConfig, snapshot: Snapshot) -> TrainingSet:
    """Read the snapshot, split it and collect train, test and latest-day frames (see module doc)."""
    for name, version in (("gold_transaction_features", snapshot.features_version),
                          ("silver_labels", snapshot.labels_version)):
        if version is not None:  # an emptied commit would drop rows from the snapshot without a word
            check_retained(spark, name, settings.table_path(name), version)
            damaged = damage.check_log(name, settings.table_path(name), until=version)
            if damaged is not None:
                raise damaged
    feats = delta.read(spark, settings.table_path("gold_transaction_features"), version=snapshot.features_version)
    if snapshot.labels_version is None:
        labels = spark.createDataFrame([], "event_id string, scenario string, reported_at timestamp")
    else:
        labels = (delta.read(spark, settings.table_path("silver_labels"), version=snapshot.labels_version)
                  .where(F.col("is_fraud")).select("event_id", "scenario", "reported_at"))
    bounds = feats.agg(F.min("event_date").alias("lo"), F.max("event_date").alias("hi")).first()
    if bounds["hi"] is None:
        raise DatasetError("gold_transaction_features is empty at this version")
    windows = choose_windows(bounds["lo"], bounds["hi"], cfg)

    # When each user was first known compromised (earliest fraud report over all their events).
    first_report = (labels.join(feats.select("event_id", "user_id"), "event_id")
                    .groupBy("user_id").agg(F.min("reported_at").alias("first_fraud_report_at")))
    in_use = ((F.col("event_date").between(F.lit(windows.train_start), F.lit(windows.train_end)))
              | (F.col("event_date").between(F.lit(windows.test_start), F.lit(windows.test_end)))
              | (F.col("event_date") == F.lit(windows.latest_date)))
    rows = (feats.where(in_use).select(*ID_COLUMNS, *FEATURE_COLUMNS)
            .join(labels, "event_id", "left")
            .join(first_report, "user_id", "left")
            .select(*ID_COLUMNS, *FEATURE_COLUMNS, "scenario", "reported_at", "first_fraud_report_at")
            .toPandas())
    rows["event_date"] = pd.to_datetime(rows["event_date"]).dt.date
    for col in ("event_time", "reported_at", "first_fraud_report_at"):
        rows[col] = pd.to_datetime(rows[col])  # naive UTC (the session time zone is UTC)
    labelled = rows["reported_at"].notna()

    cutoff = pd.Timestamp(windows.cutoff.replace(tzinfo=None))
    train = rows[(rows["event_date"] >= windows.train_start) & (rows["event_date"] <= windows.train_end)].copy()
    train["is_fraud"] = labelled[train.index] & (train["reported_at"] <= cutoff)

    test = rows[(rows["event_date"] >= windows.test_start) & (rows["event_date"] <= windows.test_end)].copy()
    test["is_fraud"] = labelled[test.index]
    day_start = pd.to_datetime(test["event_date"].astype(str))
    known = test["first_fraud_report_at"].notna() & (test["first_fraud_report_at"] < day_start)
    removed = int(known.sum())
    test = test[~known]
    test["scenario"] = test["scenario"].where(test["is_fraud"], "none")

    latest = rows[rows["event_date"] == windows.latest_date][list(ID_COLUMNS) + list(FEATURE_COLUMNS)]
    keep_train = [*ID_COLUMNS, *FEATURE_COLUMNS, "is_fraud"]
    keep_test = [*ID_COLUMNS, *FEATURE_COLUMNS, "is_fraud", "scenario"]
    return TrainingSet(
        snapshot=snapshot, windows=windows,
        train=_canonical(train[keep_train]), test=_canonical(test[keep_test]),
        latest=_canonical(latest), test_removed_known_compromised=removed,
    )


def _canonical(df: pd.DataFrame) -> pd.DataFrame:
    """Rows in event_id order with a fresh index, so equal content means equal frames."""
    return df.sort_values("event_id", kind="mergesort").reset_index(drop=True)


def content_hash(df: pd.DataFrame) -> str:
    """SHA-256 over the column names and every value (row order as given; frames are canonical)."""
    h = hashlib.sha256()
    h.update("\x1f".join(df.columns).encode())
    for col in df.columns:
        values = df[col]
        if values.dtype == object:  # dates, strings: hash their text
            values = values.astype(str)
        h.update(pd.util.hash_pandas_object(values, index=False).to_numpy(dtype=np.uint64).tobytes())
    return h.hexdigest()
