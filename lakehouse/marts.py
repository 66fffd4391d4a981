"""The risk summary read from the dbt marts (schema ``marts``), for `lakehouse demo` and humans.

:func:`risk_summary` queries the marts built by `lakehouse dbt build` and returns plain data;
:func:`format_risk_summary` turns it into a few lines of text. The riskiest merchants and countries
are taken over the most recent days of data (their best-ranked flagged day each), so a quiet last
hour does not hide yesterday's spike.
"""

from __future__ import annotations

import re
import time
from typing import Callable


from lakehouse.config import Settings
from lakehouse.io import postgres

#: Schema of the marts (dbt/dbt_project.yml: +schema marts, generate_schema_name keeps it exact).
MARTS_SCHEMA = "marts"
_SEVERITY = "case risk_level when 'high' then 2 when 'elevated' then 1 else 0 end"


def _rows(cur, query: str, params=()) -> list[dict]:
    cur.execute(query, params)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]


def _top_risk(cur, table: str, key: str, days: int, limit: int) -> list[dict]:
    # Each key's worst flagged day among the last `days` days present in the mart.
    return _rows(cur, f"""
        with recent as (
            select * from {MARTS_SCHEMA}.{table}
            where day > (select max(day) from {MARTS_SCHEMA}.{table}) - %s and risk_level <> 'normal'
        ),
        worst as (
            select distinct on ({key}) *
            from recent
            order by {key}, {_SEVERITY} desc, risk_score desc, day desc
        )
        select {key} as key, day, risk_level, risk_reason, risk_score, tx_count, amount_sum_usd
        from worst
        order by {_SEVERITY} desc, risk_score desc, {key}
        limit %s""", (days, limit))


def risk_summary(settings: Settings, days: int = 7, limit: int = 5) -> dict:
    """The headline risk figures from the marts.

    Returns:
        ``merchants`` / ``countries``: up to ``limit`` flagged keys (their worst day in the last
        ``days`` days) with level, reason and score; ``velocity``: alerted windows, users and the top
        users; ``data_quality``: totals over all processing days; ``model``: alerts and precision, or
        None before any score.
    """
    conn = postgres.connect(settings)
    try:
        with conn.cursor() as cur:
            merchants = _top_risk(cur, "merchant_risk", "merchant_id", days, limit)
            countries = _top_risk(cur, "country_risk", "country", days, limit)
            velocity = _rows(cur, f"""
                select count(*) as windows, count(distinct user_id) as users,
                       count(*) filter (where is_count_exceeded) as count_windows,
                       count(*) filter (where is_amount_exceeded) as amount_windows
                from {MARTS_SCHEMA}.user_velocity_alerts""")[0]
            velocity["top_users"] = _rows(cur, f"""
                select distinct on (user_id) user_id, window_start_at, tx_count, amount_sum_usd, alert_reason
                from {MARTS_SCHEMA}.user_velocity_alerts
                order by user_id, tx_count desc, amount_sum_usd desc, window_start_at""")
            velocity["top_users"] = sorted(velocity["top_users"],
                                           key=lambda r: (-r["tx_count"], -r["amount_sum_usd"], r["user_id"]))[:limit]
            dq = _rows(cur, f"""
                select count(distinct day) as days, coalesce(sum(records_in), 0) as records_in,
                       coalesce(sum(inserted), 0) as inserted, coalesce(sum(duplicates), 0) as duplicates,
                       coalesce(sum(quarantined), 0) as quarantined, coalesce(sum(warned), 0) as warned,
                       coalesce(sum(too_late_events), 0) as too_late_events,
                       coalesce(bool_and(is_reconciled), true) as reconciled
                from {MARTS_SCHEMA}.data_quality_daily where kind = 'events'""")[0]
            checks = _rows(cur, f"""
                select f.key as check_name, sum(f.value::bigint) as failed
                from {MARTS_SCHEMA}.data_quality_daily, jsonb_each_text(failures_by_check) as f
                where kind = 'events' group by 1 order by 2 desc, 1 limit 3""")
            dq["top_failed_checks"] = {r["check_name"]: int(r["failed"]) for r in checks}
            model = _rows(cur, f"""
                select count(*) as days, sum(n_scored) as scored, sum(n_alerts) as alerts,
                       max(alert_budget) as budget, count(*) filter (where is_over_budget) as days_over_budget,
                       sum(n_true_positives)::float / nullif(sum(n_alerts), 0) as precision_to_date,
                       sum(n_true_positives)::float / nullif(sum(n_fraud_known), 0) as recall_to_date
                from {MARTS_SCHEMA}.model_performance_daily""")[0]
    finally:
        conn.close()
    return {"merchants": merchants, "countries": countries, "velocity": velocity, "data_quality": dq,
            "model": model if model["days"] else None}


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * float(x):.1f}%"


def format_risk_summary(summary: dict) -> list[str]:
    """The summary as short text lines (what `lakehouse demo` prints at the end)."""
    lines = []
    for title, key in (("riskiest merchants", "merchants"), ("riskiest countries", "countries")):
        rows = summary[key]
        lines.append(f"{title}:" + ("" if rows else " none flagged"))
        for i, r in enumerate(rows, 1):
            lines.append(f"  {i}. {r['key']:<8} {r['day']}  {r['risk_level']:<8} {r['risk_reason']}")
    v = summary["velocity"]
    lines.append(f"velocity alerts: {v['windows']} five-minute windows, {v['users']} users "
                 f"({v['count_windows']} over the count limit, {v['amount_windows']} over the amount limit)")
    for r in v["top_users"]:
        lines.append(f"  {r['user_id']:<8} {r['tx_count']:>3} payments, {float(r['amount_sum_usd']):,.2f} USD "
                     f"from {r['window_start_at']:%Y-%m-%d %H:%M} ({r['alert_reason']})")
    dq = summary["data_quality"]
    checks = ", ".join(f"{k} {v}" for k, v in dq["top_failed_checks"].items()) or "none"
    lines.append(f"data quality: {dq['records_in']:,} records in, {dq['inserted']:,} inserted, "
                 f"{dq['duplicates']:,} duplicates, {dq['quarantined']:,} quarantined (top checks: {checks}), "
                 f"{dq['too_late_events']:,} too late; "
                 + ("every batch reconciled" if dq["reconciled"] else "NOT RECONCILED"))
    m = summary["model"]
    if m:
        lines.append(f"model: {m['alerts']:,} alerts on {m['scored']:,} scored payments over {m['days']} days "
                     f"(budget {m['budget']}/day, {m['days_over_budget']} days over); precision to date "
                     f"{_pct(m['precision_to_date'])}, recall to date {_pct(m['recall_to_date'])}")
    return lines


if __name__ == "__main__":  # python -m lakehouse.marts: print the summary of the current settings
    s = risk_summary(Settings.from_env())
    print("\n".join(format_risk_summary(s)))


def build_and_summarize(settings: Settings, say: Callable[[str], None]) -> bool:
    """The demo's dbt step: `dbt build` (progress through ``say``), then the risk summary lines.

    Returns True when the build (models and tests) passed and the summary was printed.
    """
    from lakehouse.io import dbt

    t0 = time.time()

    def progress(line: str) -> None:
        text = line.split("  ", 1)[-1].strip() if line[:2].isdigit() else line.strip()
        text = re.sub(r" \.{3,} ", " ", text)  # dbt's dotted leaders
        if ("OK created" in text and " marts." in text) or any(k in text for k in ("ERROR", "FAIL", "WARN", "Done.")):
            say("      " + text)

    res = dbt.run(settings, ["build"], echo=progress)
    if res.returncode != 0:
        say(f"      dbt build failed (exit {res.returncode}); see {settings.data_root / 'dbt' / 'logs'}")
        return False
    say(f"      built in {time.time() - t0:.1f}s")
    for line in format_risk_summary(risk_summary(settings)):
        say(line)
    return True
