"""Real-time scoring with the champion model, and the gold ``risk_scores`` table.

Use from the stream's foreachBatch (after the gold features of the batch are written)::

    scorer = Scorer(spark, settings)        # cheap; no MLflow call until first use
    scores = scorer.score(features_df)      # gold_transaction_features rows -> risk_scores rows, or None
    if scores is not None:
        write_scores(spark, settings, scores, app_id, batch_id)   # idempotent MERGE on event_id

Champion pick-up: :meth:`Scorer.score` asks the registry which version holds the ``champion`` alias
at most every ``check_seconds`` (one cheap query), and loads the model (and its threshold and
feature medians) when the version changes, so a newly promoted model is used from the next
micro-batch on, without a restart. Every row records the model name and version that scored it.
With no champion yet, ``score`` returns None and logs "no champion model yet: scoring skipped" once.
If the registry cannot be reached, the model already loaded keeps scoring.

``risk_scores`` (gold, partitioned by event_date, change data feed on): one row per event_id. Writes
are a MERGE on event_id (re-scoring a transaction replaces its row); a stream write carries Delta's
transaction id (``txnAppId``/``txnVersion`` = the query's app id and batch id), so a replayed
micro-batch is skipped instead of written twice.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from lakehouse.config import Settings
from lakehouse.io import delta
from lakehouse.ml import registry
from lakehouse.transforms.scoring import RISK_SCORES_SCHEMA, score_features

log = logging.getLogger(__name__)
NO_CHAMPION = "no champion model yet: scoring skipped"
RISK_SCORES = "risk_scores"
RISK_SCORES_KEY = ("event_id",)
RISK_SCORES_PARTITION = "event_date"


@dataclass
class LoadedModel:
    name: str
    version: str
    run_id: str
    reference: dict
    broadcast: object

    @property
    def threshold(self) -> float:
        return float(self.reference["threshold"])


class Scorer:
    """Scores feature rows with the current champion (see module doc)."""

    def __init__(self, spark: SparkSession, settings: Settings, model_name: str = registry.MODEL_NAME,
                 check_seconds: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[str | None, str | None], None] | None = None):
        self.spark, self.settings, self.model_name = spark, settings, model_name
        self.check_seconds, self.clock, self.on_change = check_seconds, clock, on_change
        self._client = None
        self._checked_at: float | None = None
        self._loaded: LoadedModel | None = None
        self._said_none = False

    # ---- champion ---------------------------------------------------------------------------------
    def current(self) -> LoadedModel | None:
        """The champion model to score with, re-checked at most every ``check_seconds``."""
        now = self.clock()
        if self._checked_at is None or now - self._checked_at >= self.check_seconds:
            self._checked_at = now
            try:
                self._refresh()
            except Exception as exc:  # registry down: keep the model we have
                log.warning("model registry unavailable (%s); %s", exc,
                            f"still scoring with v{self._loaded.version}" if self._loaded else "not scoring")
        if self._loaded is None and not self._said_none:
            log.warning(NO_CHAMPION)
            self._said_none = True
        return self._loaded

    def _refresh(self) -> None:
        if self._client is None:
            self._client = registry.connect(self.settings)
        mv = registry.champion_version(self._client, self.model_name)
        version = str(mv.version) if mv is not None else None
        old = self._loaded.version if self._loaded else None
        if version == old:
            return
        if mv is None:
            self._drop()
        else:
            registry.connect(self.settings)  # load from this store, whatever another caller set
            model = registry.load_model(self.model_name, mv.version)
            reference = registry.load_reference(self.settings, mv.run_id)
            bc = self.spark.sparkContext.broadcast((model, reference))
            self._drop()
            self._loaded = LoadedModel(self.model_name, version, mv.run_id, reference, bc)
            self._said_none = False
            log.warning("scoring with %s v%s (threshold %.4f)", self.model_name, version, self._loaded.threshold)
        if self.on_change:
            self.on_change(old, version)

    def _drop(self) -> None:
        if self._loaded is not None:
            try:
                self._loaded.broadcast.unpersist()
            except Exception:
                pass
            self._loaded = None

    # ---- scoring ----------------------------------------------------------------------------------
    def score(self, features: DataFrame) -> DataFrame | None:
        """risk_scores rows for ``features`` (gold_transaction_features columns), or None when there
        is no champion. Lazy: the rows are computed when written."""
        loaded = self.current()
        if loaded is None:
            return None
        scored_at = datetime.now(timezone.utc)  # aware: a naive literal would be read as local time
        return score_features(features, loaded.broadcast, loaded.name, loaded.version, scored_at)


def ensure_risk_scores(spark: SparkSession, settings: Settings) -> str:
    path = settings.table_path(RISK_SCORES)
    delta.ensure_table(spark, path, RISK_SCORES_SCHEMA, partition_by=(RISK_SCORES_PARTITION,),
                       properties={"delta.enableChangeDataFeed": "true"})
    return str(path)


def write_scores(spark: SparkSession, settings: Settings, scores: DataFrame | None,
                 app_id: str | None = None, batch_id: int | None = None) -> int:
    """MERGE ``scores`` into gold risk_scores on event_id; returns the number of rows merged.

    With ``app_id``/``batch_id`` (a stream micro-batch) the MERGE is exactly-once per batch (Delta
    txnAppId/txnVersion); without them (batch re-scoring) it simply upserts. Pass the micro-batch's
    own session as ``spark`` in a foreachBatch.
    """
    if scores is None:
        return 0
    path = ensure_risk_scores(spark, settings)
    # Score once: a local checkpoint materialises the rows (the model runs one time) and gives the
    # MERGE a plain, deterministic source (Delta refuses a source cached while it merges).
    scores = (scores.select(*RISK_SCORES_SCHEMA.fieldNames()).dropDuplicates(list(RISK_SCORES_KEY))
              .localCheckpoint(eager=True))
    n = scores.count()
    if n == 0:
        return 0
    dates = [r[0] for r in scores.select(RISK_SCORES_PARTITION).distinct().collect()]
    prune = {RISK_SCORES_PARTITION: sorted(str(d) for d in dates if d is not None)}
    if app_id is not None and batch_id is not None:
        with delta.idempotent_dml(spark, app_id, batch_id):
            delta.merge_upsert(spark, scores, path, RISK_SCORES_KEY, prune)
    else:
        delta.merge_upsert(spark, scores, path, RISK_SCORES_KEY, prune)
    return n


def score_range(spark: SparkSession, settings: Settings, date_from, date_to, scorer: Scorer | None = None) -> dict:
    """Score gold_transaction_features of [date_from, date_to] with the champion and upsert the rows
    into risk_scores (batch re-scoring). Returns counts and the model used."""
    fpath = settings.table_path("gold_transaction_features")
    if not delta.is_delta_table(fpath):
        raise FileNotFoundError(f"no gold_transaction_features at {fpath}: run `lakehouse backfill` first")
    scorer = scorer or Scorer(spark, settings)
    feats = delta.read(spark, fpath).where(F.col("event_date").between(F.lit(date_from), F.lit(date_to)))
    scores = scorer.score(feats)
    if scores is None:
        return {"scored": 0, "alerts": 0, "model": None, "reason": NO_CHAMPION}
    n = write_scores(spark, settings, scores)
    loaded = scorer.current()
    alerts = (delta.read(spark, settings.table_path(RISK_SCORES))
              .where(F.col("event_date").between(F.lit(date_from), F.lit(date_to)))
              .where(F.col("is_alert") & (F.col("model_version") == loaded.version)).count())
    return {"scored": n, "alerts": alerts, "model": f"{loaded.name} v{loaded.version}",
            "threshold": loaded.threshold}
