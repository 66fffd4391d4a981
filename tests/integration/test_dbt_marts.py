"""The dbt marts, built by the real `dbt build` on a real embedded Postgres filled by the real stream
and mirror, checked against independent SQL on the mirrored tables (schema ``lakehouse``).

One scenario, in order (each step needs the previous one):
1. a generated feed of two days that are 36 days old (so their fraud labels have matured), plus a
   hand-made burst of payments by one user, streamed (silver + gold) and mirrored; `dbt build`;
2. mart contents against direct queries; the analyst role reads the marts and nothing else;
3. late data arrives (payments for the old days, chargebacks for old payments), is streamed and
   mirrored; the incremental `dbt build` picks it up although those days are outside the recent
   days it always recomputes;
4. rows of an old day are erased from silver and gold, and the mirror deletes them; the incremental build
   recomputes that day too, and equals a `--full-refresh` build.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pandas as pd
import psycopg2
import psycopg2.errors
import pytest
import yaml
from delta.tables import DeltaTable

from lakehouse import gold, mirror, streaming
from lakehouse.generator import GeneratorConfig, generate_backlog
from lakehouse.io import dbt, postgres
from lakehouse.marts import format_risk_summary, risk_summary
from tests.conftest import stop_postgres, write_lines

pytestmark = [pytest.mark.integration, pytest.mark.slow]

START = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=36)
INCREMENTAL_MARTS = {"risk_monitoring_daily": "day", "risk_monitoring_hourly": "hour_at",
                     "user_velocity_alerts": "user_id, window_start_at", "data_quality_daily": "day, kind",
                     "model_performance_daily": "day"}
TABLE_MARTS = {"merchant_risk": "merchant_id, day", "country_risk": "country, day"}


def _line(event_id: str, user: str, merchant: str, at: datetime, amount: float, country: str = "DE") -> str:
    return json.dumps(dict(event_id=event_id, user_id=user, merchant_id=merchant, amount=amount,
                           currency="EUR", country=country, event_time=at.strftime("%Y-%m-%dT%H:%M:%SZ")))


def _query(settings, sql: str, params=()) -> pd.DataFrame:
    conn = postgres.connect(settings)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return pd.DataFrame(cur.fetchall(), columns=[d[0] for d in cur.description])
    finally:
        conn.close()


def _build(settings, *extra: str) -> str:
    res = dbt.run(settings, ["build", *extra], capture=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    return res.stdout


def _ingest(spark, settings) -> None:
    streaming.run_streams(spark, settings, once=True)
    mirror.mirror_all(spark, settings)


def _mart(settings, name: str, order: str) -> pd.DataFrame:
    df = _query(settings, f"select * from marts.{name} order by {order}")
    return df.drop(columns=["inputs_mirrored_at"], errors="ignore")


@pytest.fixture
def pg(settings):
    settings = settings.replace(stream_gold=True)  # gold as production keeps it: per micro-batch
    postgres.start(settings)
    yield settings
    stop_postgres(settings)


def _check_against_sources(settings, gen: dict, extra_event_lines: int) -> None:
    # Daily volume, value and users: the mart against a direct aggregate of the mirrored payments.
    want = _query(settings, """
        select event_date as day, count(*) as n, sum(amount_base) as value, count(distinct user_id) as users
        from lakehouse.gold_transaction_features group by 1 order by 1""")
    got = _query(settings, """select day, n_transactions as n, amount_usd_sum as value, n_distinct_users as users
                              from marts.risk_monitoring_daily where n_transactions > 0 order by day""")
    assert len(want) >= 2
    pd.testing.assert_frame_equal(got, want, check_dtype=False)

    # Fraud rate on matured labels: the generated days are 36 days old, so they have matured.
    want = _query(settings, """
        select t.event_date as day, avg(case when l.is_fraud then 1.0 else 0.0 end)::float as rate
        from lakehouse.gold_transaction_features t left join lakehouse.silver_labels l using (event_id)
        where t.event_date <= current_date - 30 group by 1 order by 1""")
    got = _query(settings, """select day, fraud_rate_matured as rate from marts.risk_monitoring_daily
                              where is_matured and n_transactions > 0 order by day""")
    pd.testing.assert_frame_equal(got, want, check_dtype=False)

    # Busiest five-minute window per day, and the velocity alerts: the windows over the limits.
    want = _query(settings, """select (window_start at time zone 'UTC')::date as day, max(tx_count) as m
                               from lakehouse.gold_user_features_5m group by 1 order by 1""")
    got = _query(settings, """select day, tx_per_user_5m_max as m from marts.risk_monitoring_daily
                              where tx_per_user_5m_max is not null order by day""")
    pd.testing.assert_frame_equal(got, want, check_dtype=False)
    want = _query(settings, """select user_id, window_start from lakehouse.gold_user_features_5m
                               where tx_count > 4 or amount_sum > 3000 order by 1, 2""")
    got = _query(settings, "select user_id, window_start_at as window_start from marts.user_velocity_alerts "
                           "order by 1, 2")
    pd.testing.assert_frame_equal(got, want)
    assert "u_burst" in set(got["user_id"])

    # Data quality: every line the feed wrote was counted in, and the per-check failures add up.
    dq = _query(settings, "select kind, sum(records_in) as n, bool_and(is_reconciled) as ok "
                          "from marts.data_quality_daily group by 1").set_index("kind")
    assert dq.loc["events", "n"] == gen["lines_written"] + extra_event_lines
    assert dq.loc["events", "ok"]
    checks = _query(settings, """select f.key, sum(f.value::bigint) as n
                                 from marts.data_quality_daily, jsonb_each_text(failures_by_check) f group by 1""")
    src = _query(settings, """select f.key, sum(f.value::bigint) as n
                              from lakehouse.silver_dq_batches, jsonb_each_text(check_failures::jsonb) f
                              group by 1 having sum(f.value::bigint) > 0""")
    assert dict(zip(checks["key"], checks["n"])) == dict(zip(src["key"], src["n"]))
    assert gen["malformed"] == 0 or len(checks) > 0

    # Merchant risk volumes are gold's, and every flagged row explains itself.
    bad = _query(settings, """select count(*) as n from marts.merchant_risk r
                              join lakehouse.gold_merchant_risk_daily g using (merchant_id, day)
                              where r.tx_count <> g.tx_count""")
    assert bad["n"][0] == 0
    assert _query(settings, "select count(*) as n from marts.merchant_risk")["n"][0] == \
        _query(settings, "select count(*) as n from lakehouse.gold_merchant_risk_daily")["n"][0]


def _check_every_column_described(settings) -> None:
    """Every model in the database has a description, and so has each of its columns."""
    described: dict[str, dict] = {}
    for path in (dbt.project_dir() / "models").rglob("*.yml"):
        for model in (yaml.safe_load(path.read_text()) or {}).get("models", []):
            described[model["name"]] = model
    built = _query(settings, """select table_name, column_name from information_schema.columns
                                where table_schema in ('staging', 'marts')""")
    assert set(built["table_name"]) == set(described)
    for name, model in described.items():
        assert model.get("description"), name
        docs = {c["name"]: c.get("description") for c in model.get("columns", [])}
        for column in built.loc[built["table_name"] == name, "column_name"]:
            assert docs.get(column), f"{name}.{column} has no description"


def _score_everything(settings) -> None:
    """Scores as the scoring job leaves them in Postgres (the contract's risk_scores columns): this
    test trains no model, so it writes a deterministic score per payment, alert at 0.9."""
    conn = postgres.connect(settings)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("""
                create table if not exists lakehouse.risk_scores (
                    event_id text primary key, user_id text, merchant_id text, country text,
                    event_time timestamptz, event_date date, amount_base double precision, score double precision,
                    threshold double precision, is_alert boolean, model_name text, model_version text,
                    top_reasons text, scored_at timestamptz, mirrored_at timestamptz not null default now())""")
            cur.execute("""
                insert into lakehouse.risk_scores
                select event_id, user_id, merchant_id, country, event_time, event_date, amount_base, s, 0.9, s >= 0.9,
                       'fraud', '1', '[]', now()
                from (select *, (abs(hashtext(event_id)) % 1000) / 1000.0 as s
                      from lakehouse.gold_transaction_features) t
                on conflict (event_id) do nothing""")
    finally:
        conn.close()


def _check_model_performance(settings) -> None:
    want = _query(settings, """
        select s.event_date as day, count(*) as n_scored, count(*) filter (where s.is_alert) as n_alerts,
               (count(*) filter (where s.is_alert and l.is_fraud))::float
                   / nullif(count(*) filter (where s.is_alert), 0) as precision_to_date,
               (count(*) filter (where s.is_alert and l.is_fraud))::float
                   / nullif(count(*) filter (where l.is_fraud), 0) as recall_to_date
        from lakehouse.risk_scores s left join lakehouse.silver_labels l using (event_id)
        group by 1 order by 1""")
    got = _query(settings, """select day, n_scored, n_alerts, precision_to_date, recall_to_date
                              from marts.model_performance_daily order by day""")
    assert len(got) >= 2
    pd.testing.assert_frame_equal(got, want, check_dtype=False)
    shares = _query(settings, "select day, alert_share from marts.risk_monitoring_daily where n_transactions > 0 "
                              "order by day")
    assert shares["alert_share"].notna().all()
    matured = _query(settings, "select count(*) as n from marts.model_performance_daily "
                               "where is_matured and alert_precision is not null")
    assert matured["n"][0] >= 1


def test_dbt_marts_end_to_end(spark, pg, tmp_path):
    settings = pg
    gen = generate_backlog(settings.events_inbox, settings.labels_inbox,
                           GeneratorConfig(seed=11, days=2, n_users=120, start=START))
    # The burst's file lands after the backlog's, so its payments come after the backlog's last (an
    # older burst, arriving after two days of events, would be too late for the five-minute windows).
    t0 = START + timedelta(days=2, minutes=10)
    burst = [_line(f"burst{i}", "u_burst", "m_burst", t0 + timedelta(seconds=20 * i), 2.0 + i) for i in range(6)]
    write_lines(settings.events_inbox, "zz-burst.jsonl", burst)
    _ingest(spark, settings)
    out = _build(settings)
    assert "unit_test" in out.lower() or "unit test" in out.lower()

    _check_against_sources(settings, gen, extra_event_lines=len(burst))

    # The analyst role reads the marts and nothing else.
    conn = postgres.connect(settings)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("set role lakehouse_analyst")
            cur.execute("select count(*) from marts.risk_monitoring_daily")
            assert cur.fetchone()[0] > 0
            with pytest.raises(psycopg2.errors.InsufficientPrivilege):
                cur.execute("delete from marts.risk_monitoring_daily")
            for forbidden in ("lakehouse.gold_transaction_features", "staging.stg_transactions"):
                with pytest.raises(psycopg2.errors.InsufficientPrivilege):
                    cur.execute(f"select 1 from {forbidden} limit 1")
    finally:
        conn.close()

    _check_every_column_described(settings)

    # The summary the demo prints comes from the marts.
    summary = risk_summary(settings)
    assert summary["velocity"]["users"] >= 1
    assert summary["data_quality"]["records_in"] == gen["lines_written"] + len(burst)
    text = "\n".join(format_risk_summary(summary))
    assert "u_burst" in text and "data quality:" in text

    # Late data for the old (matured) days: payments, and chargebacks for payments already served.
    before = _mart(settings, "risk_monitoring_daily", "day")
    victims = _query(settings, """select t.event_id, t.event_time from lakehouse.gold_transaction_features t
                                  left join lakehouse.silver_labels l using (event_id)
                                  where l.event_id is null and t.user_id <> 'u_burst'
                                  order by t.event_id limit 15""")
    labels = [json.dumps(dict(event_id=e, is_fraud=True, scenario="account_takeover",
                              reported_at=(at + timedelta(days=5)).strftime("%Y-%m-%dT%H:%M:%SZ")))
              for e, at in zip(victims["event_id"], victims["event_time"])]
    write_lines(settings.labels_inbox, "zz-late-labels.jsonl", labels)
    # (a user, merchants and a country of their own: erasing them later changes no other payment's row)
    late = [_line(f"late{i}", "u_late", f"m_late{i % 2}", START + timedelta(hours=2, minutes=7 * i), 50.0 + i,
                  country="IS") for i in range(8)]
    write_lines(settings.events_inbox, "zz-late-events.jsonl", late)
    _ingest(spark, settings)
    _score_everything(settings)
    _build(settings)

    after = _mart(settings, "risk_monitoring_daily", "day")
    first = after["day"] == START.date()
    assert int(after.loc[first, "n_transactions"].iloc[0]) == int(before.loc[before["day"] == START.date(),
                                                                            "n_transactions"].iloc[0]) + len(late)
    assert (after["n_fraud_known"].sum() - before["n_fraud_known"].sum()) == len(labels)
    _check_against_sources(settings, gen, extra_event_lines=len(burst) + len(late))
    _check_model_performance(settings)

    # An erasure (a right-to-be-forgotten request): the late payments are deleted from silver and their
    # day's gold is backfilled without them; the mirror deletes their rows in Postgres, and the
    # incremental build recomputes their day, which is outside the recent days it always recomputes
    # and has no row left to mark it.
    DeltaTable.forPath(spark, str(settings.table_path("silver_transactions"))).delete("user_id = 'u_late'")
    gold.backfill(spark, settings, START.date(), START.date())
    mirror.mirror_all(spark, settings)
    assert _query(settings, "select count(*) as n from lakehouse.gold_transaction_features "
                            "where user_id = 'u_late'")["n"][0] == 0
    days = _query(settings, "select distinct event_date from lakehouse.gold_transaction_features "
                            "where mirrored_at > (select max(inputs_mirrored_at) from marts.risk_monitoring_daily)")
    assert START.date() not in set(days["event_date"])  # no row of the day left, or changed, to mark it
    # Without the margins that would recompute it anyway: the recent days (from START + 2 on), and the
    # rows mirrored up to 10 minutes before the last build (all of this test's).
    _build(settings, "--vars", "{lookback_days: 0, mirror_safety_minutes: 0}")
    erased = _mart(settings, "risk_monitoring_daily", "day")
    assert int(erased.loc[erased["day"] == START.date(), "n_transactions"].iloc[0]) == int(
        after.loc[first, "n_transactions"].iloc[0]) - len(late)

    incremental = {name: _mart(settings, name, order) for name, order in {**INCREMENTAL_MARTS, **TABLE_MARTS}.items()}
    _build(settings, "--full-refresh")
    for name, order in {**INCREMENTAL_MARTS, **TABLE_MARTS}.items():
        pd.testing.assert_frame_equal(incremental[name], _mart(settings, name, order), check_dtype=False,
                                      obj=name)


def test_a_dbt_user_that_may_not_create_the_analyst_role_is_told_how_to_fix_it(pg):
    """On a server of someone else's (``LAKEHOUSE_PG_DSN``), the dbt user may lack CREATEROLE. The build
    once failed in both hooks with Postgres' own words (and "role ... does not exist" from the second);
    now the run-start hook names the role, the user and the three fixes, once; each fix works."""
    admin = postgres.connect(pg)
    try:
        with admin.cursor() as cur:
            cur.execute("create role lh_dbt login; grant create on database lakehouse to lh_dbt;"
                        "grant usage on schema lakehouse to lh_dbt")
        admin.commit()
        parts = postgres.dsn_parts(postgres.resolve_dsn(pg))
        limited = pg.replace(pg_dsn=f"host={parts['host']} port={parts['port']} user=lh_dbt dbname=lakehouse")
        view = ["run", "--select", "stg_dq_batches"]

        res = dbt.run(limited, view, capture=True, timeout=600)
        assert res.returncode == 1, res.stdout[-3000:]
        assert "Completed with 1 error" in res.stdout, res.stdout[-3000:]
        assert ("the analyst role lakehouse_analyst does not exist and the dbt user lh_dbt may not create roles. "
                "Fix: create it once as an admin (CREATE ROLE lakehouse_analyst NOLOGIN;), or ALTER ROLE lh_dbt "
                "CREATEROLE;, or build without it: --vars '{analyst_role: \"\"}'") in res.stdout

        res = dbt.run(limited, [*view, "--vars", "{analyst_role: ''}"], capture=True, timeout=600)
        assert res.returncode == 0, res.stdout[-3000:]

        with admin.cursor() as cur:
            cur.execute("create role lakehouse_analyst nologin")
        admin.commit()
        res = dbt.run(limited, view, capture=True, timeout=600)
        assert res.returncode == 0, res.stdout[-3000:]
        with admin.cursor() as cur:
            cur.execute("select has_schema_privilege('lakehouse_analyst', 'marts', 'usage'), "
                        "has_schema_privilege('lakehouse_analyst', 'staging', 'usage')")
            assert cur.fetchone() == (True, False)
    finally:
        admin.close()
