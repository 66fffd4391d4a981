"""A real `airflow dags test nightly_backfill_and_train <date>` against the embedded Postgres, a
temporary MLflow store and a small generated dataset; then the data is checked where each task
left it: gold in Delta, its mirror in Postgres, the dbt marts, an MLflow run, the maintenance
properties, the data-quality summary, and the dashboard over the marts."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from lakehouse import streaming
from lakehouse.config import Settings
from lakehouse.generator import GeneratorConfig, generate_backlog
from lakehouse.io import delta, postgres
from lakehouse.io import maintenance as mio
from tests.conftest import stop_postgres
from tests.dags.conftest import DAGS_FOLDER, ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DAG_ID = "nightly_backfill_and_train"
TRAIN_ARGS = "--train-days 1 --gap-days 0 --test-days 1 --maturity-days 0 --no-baseline"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("dagrun")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LAKEHOUSE_", "AIRFLOW", "MLFLOW_"))}
    base.update(
        LAKEHOUSE_DATA=str(root / "data"), LAKEHOUSE_SPARK_MASTER="local[2]", LAKEHOUSE_SHUFFLE_PARTITIONS="2",
        LAKEHOUSE_DRIVER_MEMORY="1g", MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow' / 'mlflow.db'}",
        AIRFLOW_HOME=str(root / "airflow"), AIRFLOW__CORE__DAGS_FOLDER=str(DAGS_FOLDER),
        AIRFLOW__CORE__LOAD_EXAMPLES="false", AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT="120",
        LAKEHOUSE_DAG_RETRIES="0",  # a failing task fails the test now, not after the retry delays
        PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    )
    (root / "mlflow").mkdir()
    return base


def airflow(env, *args, timeout=600):
    return subprocess.run([str(Path(sys.executable).parent / "airflow"), *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_nightly_dag_runs_green_and_leaves_the_data(spark, env):
    settings = Settings.from_env(env)
    today = datetime.now(timezone.utc).date()
    first, last = today - timedelta(days=2), today - timedelta(days=1)

    # A small world: 2 simulated days ending today 00:00 UTC, streamed to silver as the feed would be;
    # fraud is made common and chargebacks fast, so a one-day train and test window both have labels.
    generate_backlog(settings.events_inbox, settings.labels_inbox,
                     GeneratorConfig(seed=11, days=2, n_users=150, n_merchants=30, card_testing_rate=0.02,
                                     account_takeover_rate=0.01, compromised_merchant_rate=0.02,
                                     high_amount_rate=0.01, chargeback_median_days=0.2, chargeback_sigma=0.3))
    streaming.run_streams(spark, settings.replace(stream_gold=False), once=True)
    postgres.start(settings)
    try:
        migrate = airflow(env, "db", "migrate")
        assert migrate.returncode == 0, migrate.stderr[-3000:]
        conf = {"date_from": first.isoformat(), "date_to": last.isoformat(), "train_args": TRAIN_ARGS}
        run = airflow(env, "dags", "test", DAG_ID, today.isoformat(), "-c", json.dumps(conf), timeout=1800)
        log = run.stdout + run.stderr
        states = _task_states(Path(env["AIRFLOW_HOME"]))
        not_green = {task: state for task, state in states.items() if state != "success"}
        if run.returncode != 0 or not_green:  # pytest.fail: the whole message, not a truncated repr
            pytest.fail(f"airflow dags test rc={run.returncode}, tasks not green: {not_green}\n{log[-8000:]}")
        assert set(states) == {"resolve_window", "backfill", "train_evaluate_promote", "score", "mirror",
                               "dbt_build", "maintain", "dq_summary"}

        # backfill: gold for every event of the range; mirror: the same rows in Postgres.
        silver = delta.read(spark, settings.table_path("silver_transactions")) \
            .where(f"event_date between '{first}' and '{last}'").count()
        gold = delta.read(spark, settings.table_path("gold_transaction_features"))
        assert silver > 100 and gold.where(f"event_date between '{first}' and '{last}'").count() == silver
        assert _pg(settings, "select count(*) from lakehouse.gold_transaction_features "
                             "where event_date between %s and %s", (first, last)) == silver
        # score + mirror: every transaction of the range has a risk score in Postgres.
        assert _pg(settings, "select count(*) from lakehouse.risk_scores where event_date between %s and %s",
                   (first, last)) == silver
        # dbt build: the daily mart covers the range.
        assert _pg(settings, "select count(distinct day) from marts.risk_monitoring_daily "
                             "where day between %s and %s", (first, last)) == 2
        # train: a finished MLflow run in the temporary store.
        with sqlite3.connect(env["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///")) as db:
            assert db.execute("select count(*) from runs where status = 'FINISHED'").fetchone()[0] >= 1
        # maintain: the log retention that keeps pinned versions reachable is on every table it touched.
        props = mio.detail(spark, settings.table_path("silver_transactions"))["properties"]
        assert props.get("delta.logRetentionDuration") == "interval 30 days"
        # dq-summary: its JSON (the task's last output line) reconciles with the stream.
        summary = _xcom(Path(env["AIRFLOW_HOME"]), "dq_summary")
        assert summary["all_reconciled"] and summary["streams"]["events"]["records_in"] > silver

        # The dashboard over the real marts has data in its main panels.
        from lakehouse import dashboard

        report = dashboard.write(settings, Path(env["LAKEHOUSE_DATA"]) / "dashboard.html")
        rows = {p["key"]: p["rows"] for p in report["panels"]}
        assert rows["volume_daily"] >= 2 and rows["merchants"] > 0 and rows["countries"] > 0
        assert rows["data_quality"] > 0 and rows["model"] > 0
    finally:
        stop_postgres(settings)


def _pg(settings, query, params=()):
    conn = postgres.connect(settings)
    try:
        with conn.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchone()[0]
    finally:
        conn.close()


def _airflow_db(home: Path) -> sqlite3.Connection:
    return sqlite3.connect(home / "airflow.db")


def _task_states(home: Path) -> dict[str, str]:
    with _airflow_db(home) as db:
        rows = db.execute("select task_id, state from task_instance where dag_id = ?", (DAG_ID,)).fetchall()
    return dict(rows)


def _xcom(home: Path, task_id: str):
    with _airflow_db(home) as db:
        row = db.execute("select value from xcom where dag_id = ? and task_id = ? and key = 'return_value'",
                         (DAG_ID, task_id)).fetchone()
    assert row is not None, f"no XCom from {task_id}"
    value = json.loads(row[0]) if isinstance(row[0], (str, bytes)) else row[0]
    return json.loads(value) if isinstance(value, str) else value
