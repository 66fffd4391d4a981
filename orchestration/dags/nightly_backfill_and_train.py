"""
# nightly_backfill_and_train

Every night at 00:30 UTC, for the day that just ended (or for the range given in the params):

1. **resolve_window**: the UTC date range of the run: the day before the logical date, unless
   `date_from` / `date_to` are set.
2. **backfill**: `lakehouse backfill --from D1 --to D2`: rebuild gold from silver for the range.
   Idempotent (Delta `replaceWhere`): a retry or a re-run leaves the same rows.
3. **train_evaluate_promote**: `lakehouse train`: train on a pinned gold snapshot, evaluate on a later
   window, log to MLflow, promote to champion only if it beats the current one.
4. **score**: `lakehouse score --from D1 --to D2`: champion scores for the range (`risk_scores`).
5. **mirror**: `lakehouse mirror`: apply the new gold and score versions to Postgres (exactly once).
6. **dbt_build**: `lakehouse dbt build`: staging views, marts and their tests in Postgres.
7. **maintain**: `lakehouse maintain`: OPTIMIZE (compaction) and VACUUM. It runs after training and the
   mirror, so the versions the registered models were trained on and the version the mirror will
   read next are pinned: VACUUM keeps them readable (retention = max(7 days, age of the oldest pin)).
8. **dq_summary**: `lakehouse dq-summary`: records in, inserted, duplicates, quarantined per
   expectation, reconciled batches, too-late events. Runs even when an earlier task failed.

Every task calls the same command a user would; this file holds wiring only. Spark tasks run
`$LAKEHOUSE_SPARK_SUBMIT` when set (spark-submit to a cluster, as in docker-compose.yml), else the
`lakehouse` command of this Python environment (Spark in local mode).

## Params

| param | default | meaning |
|---|---|---|
| `date_from`, `date_to` | the day before the logical date | UTC dates to backfill and score, inclusive |
| `train_args` | `""` | extra arguments for `lakehouse train` (e.g. smaller windows) |

A range from the CLI:
`airflow dags trigger nightly_backfill_and_train -c '{"date_from": "2026-11-01", "date_to": "2026-11-07"}'`
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from airflow.sdk import Param, TriggerRule, dag, task

from lakehouse.orchestration import extra_args, lakehouse_command, spark_command

LAKEHOUSE = lakehouse_command()  # CLI steps without Spark (dbt)
SPARK_JOB = spark_command()      # CLI steps that run Spark: local mode, or spark-submit to a cluster

default_args = {
    "owner": "lakehouse",
    # LAKEHOUSE_DAG_RETRIES overrides it (the DAG run test sets 0 so that a failure shows at once).
    "retries": int(os.environ.get("LAKEHOUSE_DAG_RETRIES", "2")),
    "retry_delay": timedelta(minutes=5),
    "retry_exponential_backoff": True,
    "execution_timeout": timedelta(hours=2),
}


@dag(
    dag_id="nightly_backfill_and_train",
    schedule="30 0 * * *",
    start_date=datetime(2026, 11, 1),
    catchup=False,
    max_active_runs=1,
    dagrun_timeout=timedelta(hours=8),
    default_args=default_args,
    tags=["lakehouse", "nightly", "gold", "ml", "dbt", "maintenance"],
    doc_md=__doc__,
    params={
        "date_from": Param(None, type=["null", "string"], format="date",
                           description="first UTC date to backfill (default: the day before the logical date)"),
        "date_to": Param(None, type=["null", "string"], format="date",
                         description="last UTC date to backfill (default: date_from, or the day before)"),
        "train_args": Param("", type="string",
                            description="extra arguments for `lakehouse train`, e.g. window sizes"),
    },
)
def nightly_backfill_and_train():
    @task(execution_timeout=timedelta(minutes=5))
    def resolve_window(params=None, logical_date=None, dag_run=None) -> dict:
        from lakehouse.orchestration import backfill_window

        anchor = logical_date or dag_run.run_after
        return backfill_window(params.get("date_from"), params.get("date_to"), anchor)

    @task.bash
    def backfill(window: dict) -> str:
        return f"{SPARK_JOB} backfill --from {window['date_from']} --to {window['date_to']}"

    @task.bash(execution_timeout=timedelta(hours=3))
    def train_evaluate_promote(params=None) -> str:
        return f"{SPARK_JOB} train {extra_args(params.get('train_args'))}".rstrip()

    @task.bash
    def score(window: dict) -> str:
        return f"{SPARK_JOB} score --from {window['date_from']} --to {window['date_to']}"

    @task.bash
    def mirror() -> str:
        return f"{SPARK_JOB} mirror"

    @task.bash
    def dbt_build() -> str:
        return f"{LAKEHOUSE} dbt build"

    @task.bash
    def maintain() -> str:
        return f"{SPARK_JOB} maintain"

    @task.bash(trigger_rule=TriggerRule.ALL_DONE, retries=0)
    def dq_summary(window: dict, ds=None) -> str:
        # Batches processed from the first backfilled day through the run's day.
        to = max(window["date_to"], ds or window["date_to"])
        return f"{SPARK_JOB} dq-summary --from {window['date_from']} --to {to} --json"

    window = resolve_window()
    loaded = backfill(window)
    scored = score(window)
    mirrored = mirror()
    loaded >> train_evaluate_promote() >> scored >> mirrored
    mirrored >> [dbt_build(), maintain()] >> dq_summary(window)


nightly_backfill_and_train()
