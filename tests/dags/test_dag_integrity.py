"""The nightly DAG imports cleanly and carries its operating contract: retries, timeouts, tags,
params, schedule, and tasks that call the `lakehouse` CLI."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tests.dags.conftest import DAGS_FOLDER

DAG_ID = "nightly_backfill_and_train"


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS_FOLDER))


@pytest.fixture(scope="module")
def dag(dagbag):
    return dagbag.dags[DAG_ID]


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}
    assert list(dagbag.dags) == [DAG_ID]


def test_schedule_and_run_policy(dag):
    assert dag.catchup is False and dag.max_active_runs == 1
    assert "30 0 * * *" in str(dag.timetable)
    assert dag.doc_md and "maintain" in dag.doc_md and "date_from" in dag.doc_md
    assert {"lakehouse", "nightly"} <= set(dag.tags)


def test_every_task_has_retries_and_a_timeout(dag):
    for t in dag.tasks:
        assert t.execution_timeout is not None and t.execution_timeout <= timedelta(hours=3), t.task_id
        if t.task_id != "dq_summary":  # the summary reports; it is not worth retrying
            assert t.retries >= 2 and t.retry_delay >= timedelta(minutes=1), t.task_id


def test_params_allow_a_date_range(dag):
    params = dag.params
    assert {"date_from", "date_to", "train_args"} <= set(params.keys())
    assert params["date_from"] is None and params["date_to"] is None
    params.validate()  # defaults are valid


def test_graph(dag):
    up = {t.task_id: set(t.upstream_task_ids) for t in dag.tasks}
    assert set(up) == {"resolve_window", "backfill", "train_evaluate_promote", "score", "mirror", "dbt_build",
                       "maintain", "dq_summary"}
    assert up["backfill"] == {"resolve_window"}
    assert up["train_evaluate_promote"] == {"backfill"}
    assert "train_evaluate_promote" in up["score"]
    assert up["mirror"] == {"score"}
    assert up["dbt_build"] == {"mirror"}
    # maintenance comes after training and the mirror have recorded what they still need
    assert up["maintain"] == {"mirror"}
    assert {"dbt_build", "maintain"} <= up["dq_summary"]
    assert str(dag.get_task("dq_summary").trigger_rule) in ("all_done", "TriggerRule.ALL_DONE")


def test_no_business_logic_in_the_dag_file():
    """Tasks shell out to the CLI; the file imports nothing of Spark, pandas or the pipeline's internals."""
    source = (DAGS_FOLDER / f"{DAG_ID}.py").read_text()
    for forbidden in ("pyspark", "pandas", "psycopg2", "lakehouse.gold", "lakehouse.ml", "sklearn", "mlflow"):
        assert forbidden not in source.split('"""', 2)[-1], forbidden
    for command in ("backfill --from", "train", "score --from", "mirror", "dbt build", "maintain", "dq-summary"):
        assert command in source
