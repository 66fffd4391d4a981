"""The nightly model end to end on generated data: real Spark + Delta, a real MLflow sqlite store in a
temp folder, real sklearn models. One generated dataset for the module (the pipeline's own stream
and backfill build gold from the generator's files)."""

from __future__ import annotations

import json
import logging
import os
from datetime import date, datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest
from pyspark.sql import functions as F

from lakehouse import streaming
from lakehouse.config import Settings
from lakehouse.generator import GeneratorConfig, generate_backlog
from lakehouse.io import delta
from lakehouse.ml import dataset, model as model_mod, registry, scorer as scorer_mod, train
from lakehouse.reference import FRAUD_SCENARIOS
from lakehouse.transforms import features
from lakehouse.transforms.features import FEATURE_COLUMNS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

START = datetime(2026, 10, 1, tzinfo=timezone.utc)
DAYS = 18
USERS = 450
SPLIT = dataset.SplitConfig(train_days=5, gap_days=2, test_days=4, maturity_days=2)
CFG = train.TrainConfig(split=SPLIT)
REPORT_FILES = ("thresholds.csv", "threshold_report.md", "pr_curve.png", "score_distribution.png",
                "calibration.png")


def _settings(root, **extra) -> Settings:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAKEHOUSE_", "MLFLOW_"))}
    env.update({"LAKEHOUSE_DATA": str(root / "data"), "LAKEHOUSE_SHUFFLE_PARTITIONS": "2",
                "LAKEHOUSE_SPARK_MASTER": "local[2]", "LAKEHOUSE_STREAM_GOLD": "0", "LAKEHOUSE_STREAM_SCORING": "0",
                "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlruns' / 'mlflow.db'}", **extra})
    return Settings.from_env(env)


@pytest.fixture(scope="module")
def ml_settings(spark, tmp_path_factory) -> Settings:
    settings = _settings(tmp_path_factory.mktemp("ml"))
    generate_backlog(settings.events_inbox, settings.labels_inbox,
                     GeneratorConfig(seed=11, days=DAYS, n_users=USERS, start=START,
                                     file_minutes=None))  # a few large inbox files: a shorter stream
    streaming.run_streams(spark, settings, once=True)
    # gold_transaction_features with the pipeline's own feature function (the other gold tables,
    # which the model does not read, are left out to keep the test short)
    silver = delta.read(spark, settings.table_path("silver_transactions"))
    labels = delta.read(spark, settings.table_path("silver_labels"))
    (features.transaction_features(silver, silver, labels).write.format("delta").partitionBy("event_date")
     .save(str(settings.table_path("gold_transaction_features"))))
    return settings


@pytest.fixture(scope="module")
def champion(spark, ml_settings) -> train.TrainResult:
    return train.train(spark, ml_settings, CFG)


@pytest.fixture(scope="module")
def worse(spark, ml_settings, champion) -> train.TrainResult:
    """A deliberately weak model (one tree of depth 1) trained after a good champion exists."""
    cfg = train.TrainConfig(split=SPLIT, model_params={"max_iter": 1, "max_depth": 1, "early_stopping": False},
                            baseline=False)
    return train.train(spark, ml_settings, cfg)


def _client(settings):
    return registry.connect(settings)


def test_training_catches_injected_scenarios_and_logs_everything(champion, ml_settings, tmp_path):
    m = champion.metrics
    assert m["fraud_rate"] > 0
    assert m["average_precision"] >= 10 * m["fraud_rate"], m
    assert m["roc_auc"] > 0.65
    assert 0 <= m["precision_at_100_per_day"] <= 1
    for name in FRAUD_SCENARIOS:               # every injected scenario is present and reported
        assert m[f"n_fraud_{name}"] > 0
        assert 0.0 <= m[f"recall_{name}"] <= 1.0
    assert champion.baseline_metrics is not None and champion.baseline_metrics["average_precision"] > 0
    assert champion.promoted and champion.reason == "no champion yet"

    client = _client(ml_settings)
    run = client.get_run(champion.run_id)
    logged = run.data.metrics
    for key in ("roc_auc", "average_precision", "precision_at_100_per_day", "brier", "ece",
                "precision_at_threshold", "recall_at_threshold", "baseline_average_precision", "psi_score",
                *[f"recall_{s}" for s in FRAUD_SCENARIOS]):
        assert key in logged, key
    assert logged["average_precision"] == pytest.approx(m["average_precision"])
    assert run.data.params["features_version"] == str(champion.snapshot["features_version"])
    assert run.data.tags["promotion_decision"] == "promoted"
    assert run.data.tags["promotion_reason"] == "no champion yet"
    # the baseline is logged beside the model, in a child run
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{champion.run_id}'")
    assert [c.data.params["model_kind"] for c in children] == ["logreg"]

    # registered, with a signature and an input example, and holding the champion alias
    mv = registry.champion_version(client)
    assert str(mv.version) == champion.model_version and mv.run_id == champion.run_id
    from mlflow.models import get_model_info

    info = get_model_info(f"models:/{registry.MODEL_NAME}/{mv.version}")
    assert [c.name for c in info.signature.inputs.inputs] == list(FEATURE_COLUMNS)
    assert info.saved_input_example_info is not None

    # the threshold report artifacts exist and agree with the logged metrics
    folder = client.download_artifacts(champion.run_id, "threshold_report", str(tmp_path))
    for name in REPORT_FILES:
        path = os.path.join(folder, name)
        assert os.path.getsize(path) > 0, name
    table = pd.read_csv(os.path.join(folder, "thresholds.csv"))
    chosen = table[table["candidate"] == "chosen"].iloc[0]
    assert chosen["threshold"] == pytest.approx(logged["threshold"])
    assert chosen["precision"] == pytest.approx(logged["precision_at_threshold"])
    assert chosen["recall"] == pytest.approx(logged["recall_at_threshold"])
    assert chosen["alerts"] == logged["alerts_at_threshold"]
    assert chosen["tp"] + chosen["fn"] == logged["n_test_fraud"]
    budget = table[table["candidate"].str.startswith("budget")].iloc[0]
    assert budget["alerts"] >= round(0.005 * logged["n_test"])
    cost = table[table["candidate"] == "cost-optimal"].iloc[0]
    assert cost["total_cost"] <= table["total_cost"].min() + 1e-6   # no candidate is cheaper
    assert "| chosen |" in open(os.path.join(folder, "threshold_report.md")).read()


def test_pinned_snapshot_rebuilds_the_same_training_set(spark, champion, ml_settings):
    client = _client(ml_settings)
    snap = registry.run_snapshot(client, champion.run_id)
    assert snap["train_hash"] == champion.train_hash
    pinned = dataset.Snapshot(snap["features_version"], snap["labels_version"])
    after_training = datetime.now(timezone.utc)

    # A label arrives afterwards (silver_labels gets a new version): the live training set changes.
    labels_path = ml_settings.table_path("silver_labels")
    train_fraud = (delta.read(spark, ml_settings.table_path("gold_transaction_features"))
                   .where(F.col("event_date") == F.lit(date.fromisoformat(champion.windows["train_start"])))
                   .join(delta.read(spark, labels_path).where("is_fraud"), "event_id").select("event_id").first())
    from delta.tables import DeltaTable

    DeltaTable.forPath(spark, str(labels_path)).delete(F.col("event_id") == F.lit(train_fraud["event_id"]))

    split = dataset.SplitConfig(train_days=snap["train_days"], gap_days=snap["gap_days"],
                                test_days=snap["test_days"], anchor_date=date.fromisoformat(snap["anchor_date"]))
    again = dataset.build(spark, ml_settings, split, pinned)
    assert again.train_hash == champion.train_hash
    assert again.test_hash == champion.test_hash
    by_time = dataset.resolve_snapshot(spark, ml_settings, as_of_timestamp=after_training)
    assert by_time == pinned
    latest = dataset.build(spark, ml_settings, split, dataset.resolve_snapshot(spark, ml_settings))
    assert latest.snapshot.labels_version > pinned.labels_version
    assert latest.train_hash != champion.train_hash      # the hash does see the change
    # and the pins are what maintenance must keep
    assert registry.pinned_versions(ml_settings) == {
        "gold_transaction_features": pinned.features_version, "silver_labels": pinned.labels_version}


def test_a_snapshot_older_than_the_tables_keep_is_told_as_such_not_as_damage(spark, settings):
    # A run reproduced long after (--as-of-run of a model nobody registered): VACUUM removed the data
    # files of its features version, or log clean-up its commit. The table is whole; training must say
    # that this version is gone and what to do, not call the table damaged (whose fix is a rebuild).
    features_path = str(settings.table_path("gold_transaction_features"))
    ids = lambda n: spark.range(n).selectExpr("cast(id as string) as event_id")  # noqa: E731
    ids(10).repartition(2).write.format("delta").save(features_path)  # two files
    ids(5).write.format("delta").mode("overwrite").save(features_path)  # version 1: version 0's file removed
    dataset.check_retained(spark, "gold_transaction_features", features_path, 0)  # still on disk: fine
    spark.conf.set("spark.databricks.delta.retentionDurationCheck.enabled", "false")
    try:
        spark.sql(f"VACUUM delta.`{features_path}` RETAIN 0 HOURS")
    finally:
        spark.conf.unset("spark.databricks.delta.retentionDurationCheck.enabled")
    with pytest.raises(dataset.DatasetError, match=r"gold_transaction_features version 0 can no longer be read: "
                                                    r"VACUUM removed 2 of the 2 data files"):
        dataset.build(spark, settings, dataset.SplitConfig(), dataset.Snapshot(0, None))
    dataset.check_retained(spark, "gold_transaction_features", features_path, 1)  # the latest: fine

    labels_path = settings.table_path("silver_labels")
    ids(3).write.format("delta").option("delta.checkpointInterval", "2").save(str(labels_path))
    for _ in range(3):  # versions 1..3, a checkpoint at 2
        ids(3).write.format("delta").mode("append").save(str(labels_path))
    for version in range(2):  # what log clean-up leaves: the checkpoint and the commits from it on
        (labels_path / "_delta_log" / f"{version:020d}.json").unlink()
    with pytest.raises(dataset.DatasetError, match=r"silver_labels version 1 is gone: log clean-up removed its "
                                                    r"commit \(the log keeps the versions from 2 on"):
        dataset.check_retained(spark, "silver_labels", labels_path, 1)
    dataset.check_retained(spark, "silver_labels", labels_path, 2)  # the checkpoint's version reads
    with pytest.raises(dataset.DatasetError, match=r"any more: log clean-up removed the commits before version 2"):
        dataset.version_at(spark, labels_path, datetime(2026, 1, 1, tzinfo=timezone.utc))


def test_worse_model_is_not_promoted(worse, champion, ml_settings):
    assert worse.model_version != champion.model_version
    assert worse.metrics["average_precision"] < champion.metrics["average_precision"]
    # the gate scored the champion on the candidate's own test window, and the champion won there
    assert worse.champion_average_precision > worse.metrics["average_precision"]
    assert not worse.promoted
    client = _client(ml_settings)
    assert str(registry.champion_version(client).version) == champion.model_version
    run = client.get_run(worse.run_id)
    assert run.data.tags["promotion_decision"] == "rejected"
    assert f"champion v{champion.model_version}" in run.data.tags["promotion_reason"]
    tags = client.get_model_version(registry.MODEL_NAME, worse.model_version).tags
    assert tags["promotion_decision"] == "rejected"


def test_scorer_without_champion_scores_nothing_and_says_so_once(spark, ml_settings, tmp_path, caplog):
    empty = ml_settings.replace(mlflow_tracking_uri=f"sqlite:///{tmp_path / 'empty' / 'mlflow.db'}")
    scorer = scorer_mod.Scorer(spark, empty, check_seconds=0)
    feats = delta.read(spark, ml_settings.table_path("gold_transaction_features")).limit(10)
    with caplog.at_level(logging.WARNING, logger="lakehouse.ml.scorer"):
        assert scorer.score(feats) is None
        assert scorer.score(feats) is None
    assert [r.getMessage() for r in caplog.records].count(scorer_mod.NO_CHAMPION) == 1
    assert scorer_mod.write_scores(spark, empty, None, "app", 0) == 0


def test_scorer_writes_risk_scores_idempotently_and_follows_the_champion(spark, ml_settings, champion, worse,
                                                                          local_time_zone_new_york):
    client = _client(ml_settings)
    scorer = scorer_mod.Scorer(spark, ml_settings, check_seconds=0)
    day = date.fromisoformat(champion.windows["latest_date"])
    feats = (delta.read(spark, ml_settings.table_path("gold_transaction_features"))
             .where(F.col("event_date") == F.lit(day)).orderBy("event_id").limit(300).persist())
    n = feats.count()
    assert scorer_mod.write_scores(spark, ml_settings, scorer.score(feats), "test-scoring", 0) == n
    path = ml_settings.table_path("risk_scores")
    version = delta.table_version(path)
    # a replayed micro-batch (same app id and batch id) writes nothing
    scorer_mod.write_scores(spark, ml_settings, scorer.score(feats), "test-scoring", 0)
    assert delta.table_version(path) == version
    rows = delta.read(spark, path).toPandas().sort_values("event_id").reset_index(drop=True)
    assert len(rows) == n and rows["event_id"].is_unique
    # scored_at is now in UTC, even with the process in another time zone
    now = pd.Timestamp.now(tz="UTC").tz_localize(None)
    assert (abs(rows["scored_at"] - now) < pd.Timedelta(minutes=10)).all()
    assert set(rows["model_version"]) == {champion.model_version}
    assert set(rows["model_name"]) == {registry.MODEL_NAME}
    assert np.allclose(rows["threshold"], champion.threshold)
    assert (rows["is_alert"] == (rows["score"] >= rows["threshold"])).all()
    # the scores are the champion's probabilities for these feature rows
    model = registry.load_model(registry.MODEL_NAME, champion.model_version)
    want = model_mod.predict(model, feats.toPandas().sort_values("event_id").reset_index(drop=True))
    assert np.allclose(rows["score"], want, atol=1e-9)
    for text in rows["top_reasons"]:
        reasons = json.loads(text)
        assert len(reasons) <= 3 and all(r["feature"] in FEATURE_COLUMNS for r in reasons)
        sizes = [abs(r["contribution"]) for r in reasons]
        assert sizes == sorted(sizes, reverse=True)
    assert sum(len(json.loads(t)) for t in rows["top_reasons"]) > 0
    cdf = spark.read.format("delta").option("readChangeFeed", "true").option("startingVersion", 0).load(str(path))
    assert cdf.where("_change_type = 'insert'").count() == n

    # The champion changes: the scorer picks the new version up without being rebuilt.
    client.set_registered_model_alias(registry.MODEL_NAME, registry.CHAMPION, worse.model_version)
    try:
        scorer_mod.write_scores(spark, ml_settings, scorer.score(feats), "test-scoring", 1)
        rows = delta.read(spark, path).toPandas()
        assert len(rows) == n and set(rows["model_version"]) == {worse.model_version}
    finally:
        client.set_registered_model_alias(registry.MODEL_NAME, registry.CHAMPION, champion.model_version)
    feats.unpersist()


def test_scoring_inside_the_stream_follows_the_champion(spark, ml_settings, champion, worse, tmp_path):
    """The ingestion stream (run_streams, gold per micro-batch, scoring on) scores every new
    transaction with the champion; when the champion changes, later batches use the new version
    without a restart."""
    import threading
    import time

    client = _client(ml_settings)
    live = _settings(tmp_path, LAKEHOUSE_STREAM_GOLD="1", LAKEHOUSE_STREAM_SCORING="1",
                     LAKEHOUSE_TRIGGER_SECONDS="1").replace(mlflow_tracking_uri=ml_settings.mlflow_tracking_uri)
    t1 = START + timedelta(days=DAYS)

    def drop(seed, start):
        generate_backlog(live.events_inbox, live.labels_inbox,
                         GeneratorConfig(seed=seed, days=0.05, n_users=400, start=start, file_minutes=None,
                                         duplicate_rate=0.0, late_rate=0.0, malformed_rate=0.0))

    def scored() -> tuple[pd.DataFrame, int]:
        from pyspark.errors import AnalysisException

        empty = pd.DataFrame(columns=["event_id", "model_version", "event_time"])
        try:  # the stream may be creating the tables right now
            gold_n = delta.read(spark, live.table_path("gold_transaction_features")).count()
            rows = delta.read(spark, live.table_path("risk_scores")).select(*empty.columns).toPandas()
        except AnalysisException:
            return empty, 0
        return rows, gold_n

    def wait_until(predicate, timeout=400.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            rows, gold_n = scored()
            if predicate(rows, gold_n):
                return rows, gold_n
            time.sleep(2)
        raise AssertionError(f"timed out: {len(rows)} scores, {gold_n} gold rows")

    drop(21, t1)
    stop = threading.Event()
    errors = []

    def run():
        try:
            streaming.run_streams(spark, live, once=False, stop_event=stop)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        rows, first_n = wait_until(lambda r, g: g > 0 and len(r) == g)
        assert set(rows["model_version"]) == {champion.model_version}
        client.set_registered_model_alias(registry.MODEL_NAME, registry.CHAMPION, worse.model_version)
        time.sleep(11)  # the scorer looks at the alias at most every 10 s
        drop(22, t1 + timedelta(hours=2))
        rows, gold_n = wait_until(lambda r, g: g > first_n and len(r) == g)
    finally:
        stop.set()
        thread.join(timeout=180)
        client.set_registered_model_alias(registry.MODEL_NAME, registry.CHAMPION, champion.model_version)
    assert not errors, errors
    assert rows["event_id"].is_unique
    cut = pd.Timestamp(t1 + timedelta(hours=2)).tz_convert(None)
    by_drop = rows.assign(second=pd.to_datetime(rows["event_time"]) >= cut).groupby("second")["model_version"]
    assert by_drop.agg(lambda v: set(v)).to_dict() == {False: {champion.model_version}, True: {worse.model_version}}


def test_alerts_view_over_mirrored_risk_scores(spark, ml_settings, champion):
    from lakehouse.io import pg_mirror, postgres
    from lakehouse.ml import alerts
    from tests.conftest import stop_postgres

    lo, hi = (date.fromisoformat(champion.windows[k]) for k in ("test_start", "test_end"))
    result = scorer_mod.score_range(spark, ml_settings, lo, hi)
    assert result["scored"] > 0 and result["model"] == f"{registry.MODEL_NAME} v{champion.model_version}"
    path = ml_settings.table_path("risk_scores")
    scores = delta.read(spark, path).where(F.col("event_date").between(F.lit(lo), F.lit(hi))).toPandas()
    assert result["alerts"] == int(scores["is_alert"].sum()) > 0
    pg_types = {"string": "text", "double": "double precision", "boolean": "boolean", "timestamp": "timestamptz",
                "date": "date"}
    table = pg_mirror.MirrorTable(
        name="risk_scores", key=("event_id",),
        columns=tuple((f.name, pg_types[f.dataType.simpleString()]) for f in delta.read(spark, path).schema.fields))
    schema = ml_settings.pg_schema
    postgres.start(ml_settings)
    try:
        conn = postgres.connect(ml_settings)
        try:
            pg_mirror.ensure_schema(conn, schema, [])
            assert alerts.ensure_alerts_view(conn, schema) is False      # no risk_scores yet: no view
            pg_mirror.ensure_schema(conn, schema, [table])
            pg_mirror.upsert_batch(conn, schema, table, scores, "delta:risk_scores", 1)
            assert alerts.ensure_alerts_view(conn, schema) is True
            assert alerts.ensure_alerts_view(conn, schema) is True       # idempotent
            with conn.cursor() as cur:
                cur.execute(f"select event_id, score, threshold, score_margin, model_version, top_reason, "
                            f"top_reasons from {schema}.risk_alerts order by event_id")
                got = cur.fetchall()
        finally:
            conn.close()
    finally:
        stop_postgres(ml_settings)
    want = scores[scores["is_alert"]].sort_values("event_id")
    assert [r[0] for r in got] == list(want["event_id"])
    for (event_id, score, thr, margin, version, top, reasons), (_, row) in zip(got, want.iterrows()):
        assert score >= thr and margin == pytest.approx(score - thr)
        assert version == row["model_version"]
        assert reasons == json.loads(row["top_reasons"])             # jsonb comes back parsed
        assert top == (reasons[0]["feature"] if reasons else None)


def test_scoring_inside_a_real_stream_follows_the_champion(spark, ml_settings, champion, worse, tmp_path):
    """A Structured Streaming query over gold_transaction_features scores each micro-batch in
    foreachBatch; the champion changes after the first batch and the next batches use the new
    version, without restarting the query."""
    client = _client(ml_settings)
    out = ml_settings.with_data_root(tmp_path / "stream")
    feats_path = ml_settings.table_path("gold_transaction_features")
    scorer = scorer_mod.Scorer(spark, ml_settings, check_seconds=0)
    # the stream's source: one day of gold features, arriving as three commits of one file each
    day = champion.windows["latest_date"]
    day_rows = delta.read(spark, feats_path).where(F.col("event_date") == F.lit(date.fromisoformat(day)))
    source_path = tmp_path / "features_feed"
    for part in range(3):
        (day_rows.where(F.abs(F.hash("event_id")) % 3 == part).coalesce(1)
         .write.format("delta").mode("append").save(str(source_path)))
    want = day_rows.count()
    seen: list[tuple[int, int, str | None]] = []

    def on_batch(batch_df, batch_id):
        scores = scorer.score(batch_df)
        n = scorer_mod.write_scores(batch_df.sparkSession, out, scores, "test-stream", batch_id)
        seen.append((batch_id, n, scorer.current().version))
        if len(seen) == 1:  # promote another version while the stream runs
            client.set_registered_model_alias(registry.MODEL_NAME, registry.CHAMPION, worse.model_version)

    source = spark.readStream.format("delta").option("maxFilesPerTrigger", 1).load(str(source_path))
    try:
        query = (source.writeStream.foreachBatch(on_batch).trigger(availableNow=True)
                 .option("checkpointLocation", str(tmp_path / "ckpt")).start())
        query.awaitTermination(600)
    finally:
        client.set_registered_model_alias(registry.MODEL_NAME, registry.CHAMPION, champion.model_version)
    assert query.exception() is None
    assert len(seen) == 3 and all(n > 0 for _, n, _ in seen), seen
    assert [v for _, _, v in seen] == [champion.model_version, worse.model_version, worse.model_version]
    rows = delta.read(spark, out.table_path("risk_scores")).toPandas()
    assert len(rows) == want == sum(n for _, n, _ in seen) and rows["event_id"].is_unique
    versions = rows.groupby("model_version").size().to_dict()
    assert versions == {champion.model_version: seen[0][1], worse.model_version: want - seen[0][1]}
    # every micro-batch's MERGE carries the stream's transaction id (a replay would be skipped)
    from delta.tables import DeltaTable

    tags = [r["userMetadata"] for r in DeltaTable.forPath(spark, str(out.table_path("risk_scores")))
            .history().collect() if r["operation"] == "MERGE"]
    assert sorted(tags) == [f"test-stream#{b}" for b, _, _ in seen]
