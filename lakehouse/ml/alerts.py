"""The analysts' alerts view in Postgres: ``<schema>.risk_alerts`` over the mirrored ``risk_scores``.

One row per alerted transaction (``is_alert``), newest first when ordered by ``event_time``, with the
score, the threshold, how far above it the score is, the model version that raised it, the top
reasons as ``jsonb``, and the fraud label when one has arrived (if ``silver_labels`` is mirrored).
Create it after the mirror has created ``risk_scores``: :func:`ensure_alerts_view` does nothing (and
returns False) while that table does not exist, and is safe to call after every mirror run
(``create or replace``; the label columns come last, so adding them later is allowed).
"""

from __future__ import annotations

VIEW = "risk_alerts"

_SELECT = """
select
    r.event_id,
    r.event_time,
    r.event_date,
    r.user_id,
    r.merchant_id,
    r.country,
    r.amount_base,
    r.score,
    r.threshold,
    r.score - r.threshold as score_margin,
    r.model_name,
    r.model_version,
    r.top_reasons::jsonb as top_reasons,
    r.top_reasons::jsonb -> 0 ->> 'feature' as top_reason,
    r.scored_at{label_cols}
from {schema}.risk_scores as r{label_join}
where r.is_alert
"""


def alerts_view_sql(schema: str, with_labels: bool) -> str:
    label_cols = (",\n    l.is_fraud as label_is_fraud,\n    l.scenario as label_scenario,\n"
                  "    l.reported_at as label_reported_at") if with_labels else ""
    label_join = f"\nleft join {schema}.silver_labels as l on l.event_id = r.event_id" if with_labels else ""
    body = _SELECT.format(schema=schema, label_cols=label_cols, label_join=label_join)
    return f"create or replace view {schema}.{VIEW} as{body};"


def _exists(cur, schema: str, table: str) -> bool:
    cur.execute("select to_regclass(%s) is not null", (f"{schema}.{table}",))
    return bool(cur.fetchone()[0])


def ensure_alerts_view(conn, schema: str) -> bool:
    """(Re)create ``<schema>.risk_alerts``; False if ``<schema>.risk_scores`` does not exist yet."""
    try:
        with conn.cursor() as cur:
            if not _exists(cur, schema, "risk_scores"):
                conn.rollback()  # leave the connection outside any transaction
                return False
            cur.execute(alerts_view_sql(schema, with_labels=_exists(cur, schema, "silver_labels")))
        conn.commit()
        return True
    except Exception:
        conn.rollback()
        raise
