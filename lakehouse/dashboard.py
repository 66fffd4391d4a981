"""The risk dashboard: one self-contained HTML page over the dbt marts in Postgres.

Analysts open it in a browser; it needs no server beyond a static file (``lakehouse dashboard
--serve`` serves it on 127.0.0.1). Figures are matplotlib PNGs embedded as base64, so the page works
offline and can be mailed. Each panel is a ``<figure data-panel=... data-rows=N>``: ``N`` is the number
of mart rows behind it, 0 when the mart is missing or empty, in which case the panel says "no data
yet" instead of drawing an empty axis.

Panels: volume and fraud rate per day and per hour (``risk_monitoring_daily`` / ``_hourly``); the
riskiest merchants and countries of the latest day (``merchant_risk``, ``country_risk``); velocity
alerts (``user_velocity_alerts``); data quality (``data_quality_daily``); model performance
(``model_performance_daily``).
"""

from __future__ import annotations

import base64
import html
import io
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import pandas as pd

from lakehouse.config import Settings

TOP_N = 10


@dataclass(frozen=True)
class Panel:
    key: str
    title: str
    mart: str
    sql: str                      # {schema} is filled in; selects the rows the figure uses
    draw: Callable                # (pandas frame, matplotlib axes) -> None
    note: str = ""
    table: tuple[str, ...] = ()   # columns shown in a small table under the figure


# ---- drawing ------------------------------------------------------------------------------------

def _dates(s: pd.Series) -> pd.Series:
    return pd.to_datetime(s, utc=True).dt.tz_localize(None)


def _volume_and_fraud(df: pd.DataFrame, ax, x: str) -> None:
    t = _dates(df[x])
    width = 0.8 if x == "day" else 0.035
    ax.bar(t, df["n_transactions"].astype(float), width=width, color="#4c78a8", label="transactions")
    ax.set_ylabel("transactions")
    ax2 = ax.twinx()
    for col, color, label in (("fraud_rate_to_date", "#e45756", "fraud rate (labels to date)"),
                              ("alert_share", "#f58518", "alert share")):
        if col in df and df[col].notna().any():
            ax2.plot(t, df[col].astype(float) * 100, marker="o", color=color, label=label)
    ax2.set_ylabel("%")
    ax2.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper left", fontsize=8)


def _ranked(key: str) -> Callable:
    def draw(df: pd.DataFrame, ax) -> None:
        top = df.sort_values("risk_score", ascending=True)
        colors = top["risk_level"].map({"high": "#e45756", "medium": "#f58518"}).fillna("#4c78a8") \
            if "risk_level" in top else "#4c78a8"
        ax.barh(top[key].astype(str), top["risk_score"].astype(float), color=colors)
        ax.set_xlabel(f"risk score (day {top['day'].max()})")
    return draw


def _velocity(df: pd.DataFrame, ax) -> None:
    per_hour = (df.assign(hour=_dates(df["window_start_at"]).dt.floor("h"))
                .groupby(["hour", "alert_reason"]).size().unstack(fill_value=0))
    bottom = None
    for reason in per_hour.columns:
        ax.bar(per_hour.index, per_hour[reason], width=0.035, bottom=bottom, label=str(reason))
        bottom = per_hour[reason] if bottom is None else bottom + per_hour[reason]
    ax.set_ylabel("alerting 5-minute windows")
    ax.legend(fontsize=8)


def _quality(df: pd.DataFrame, ax) -> None:
    d = df.groupby("day")[["inserted", "duplicates", "quarantined"]].sum()
    t = _dates(pd.Series(d.index))
    bottom = None
    for col, color in (("inserted", "#54a24b"), ("duplicates", "#eeca3b"), ("quarantined", "#e45756")):
        vals = d[col].astype(float).to_numpy()
        ax.bar(t, vals, width=0.8, bottom=bottom, color=color, label=col)
        bottom = vals if bottom is None else bottom + vals
    ax.set_ylabel("records in")
    ax.legend(fontsize=8)


def _model(df: pd.DataFrame, ax) -> None:
    t = _dates(df["day"])
    ax.bar(t, df["n_alerts"].astype(float), width=0.8, color="#b279a2", label="alerts")
    ax.set_ylabel("alerts")
    ax2 = ax.twinx()
    for col, color in (("precision_to_date", "#4c78a8"), ("recall_to_date", "#54a24b")):
        if col in df and df[col].notna().any():
            ax2.plot(t, df[col].astype(float), marker="o", color=color, label=col.replace("_", " "))
    ax2.set_ylim(0, 1.05)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper left", fontsize=8)


PANELS: tuple[Panel, ...] = (
    Panel("volume_daily", "Volume and fraud rate per day", "risk_monitoring_daily",
          "select * from {schema}.risk_monitoring_daily order by day",
          lambda df, ax: _volume_and_fraud(df, ax, "day"),
          note="Fraud rate counts the labels reported so far; recent days are not matured yet."),
    Panel("volume_hourly", "Volume and fraud rate per hour (last 3 days)", "risk_monitoring_hourly",
          "select * from {schema}.risk_monitoring_hourly "
          "where hour_at >= (select max(hour_at) from {schema}.risk_monitoring_hourly) - interval '3 days' "
          "order by hour_at",
          lambda df, ax: _volume_and_fraud(df, ax, "hour_at")),
    Panel("merchants", f"Riskiest merchants (top {TOP_N}, latest day)", "merchant_risk",
          "select * from {schema}.merchant_risk where day = (select max(day) from {schema}.merchant_risk) "
          f"order by risk_score desc nulls last limit {TOP_N}",
          _ranked("merchant_id"), table=("merchant_id", "risk_level", "risk_reason", "tx_count", "fraud_rate_to_date")),
    Panel("countries", f"Riskiest countries (top {TOP_N}, latest day)", "country_risk",
          "select * from {schema}.country_risk where day = (select max(day) from {schema}.country_risk) "
          f"order by risk_score desc nulls last limit {TOP_N}",
          _ranked("country"), table=("country", "risk_level", "risk_reason", "tx_count", "fraud_rate_to_date")),
    Panel("velocity", "Velocity alerts (users over the 5-minute limits)", "user_velocity_alerts",
          "select * from {schema}.user_velocity_alerts order by window_start_at", _velocity,
          table=("user_id", "window_start_at", "tx_count", "amount_sum_usd", "alert_reason")),
    Panel("data_quality", "Data quality: what the stream received", "data_quality_daily",
          "select * from {schema}.data_quality_daily order by day, kind", _quality,
          table=("day", "kind", "records_in", "quarantined", "duplicates", "is_reconciled")),
    Panel("model", "Model performance: alerts, precision and recall", "model_performance_daily",
          "select * from {schema}.model_performance_daily order by day", _model,
          table=("day", "n_scored", "n_alerts", "alert_precision", "alert_recall", "model_versions")),
)


# ---- data -----------------------------------------------------------------------------------------

def load(settings: Settings, schema: str = "marts") -> dict[str, pd.DataFrame | str]:
    """Per panel key: the mart rows, or a string saying why there are none (missing mart, error)."""
    from psycopg2 import sql

    from lakehouse.io import postgres

    out: dict[str, pd.DataFrame | str] = {}
    conn = postgres.connect(settings, autocommit=True)
    try:
        with conn.cursor() as cur:
            for panel in PANELS:
                cur.execute("select to_regclass(%s)", (sql.Identifier(schema, panel.mart).as_string(conn),))
                if cur.fetchone()[0] is None:
                    out[panel.key] = f"mart {schema}.{panel.mart} does not exist yet (run `lakehouse dbt build`)"
                    continue
                cur.execute(panel.sql.format(schema=sql.Identifier(schema).as_string(conn)))
                out[panel.key] = pd.DataFrame(cur.fetchall(), columns=[d[0] for d in cur.description])
    finally:
        conn.close()
    return out


# ---- rendering ------------------------------------------------------------------------------------

def _figure_png(panel: Panel, df: pd.DataFrame) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=100)
    try:
        panel.draw(df, ax)
        fig.autofmt_xdate()
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _table(df: pd.DataFrame, columns: tuple[str, ...], limit: int = 10) -> str:
    cols = [c for c in columns if c in df.columns]
    if not cols:
        return ""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = []
    for _, row in df[cols].head(limit).iterrows():
        cells = []
        for c in cols:
            v = row[c]
            text = f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))
            cells.append(f"<td>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;background:#fafafa;color:#222}
h1{font-size:22px;margin:0 0 4px} .sub{color:#666;font-size:13px;margin-bottom:18px}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(620px,1fr));gap:16px}
figure{background:#fff;border:1px solid #ddd;border-radius:6px;margin:0;padding:12px}
figure img{width:100%;height:auto} figcaption{font-size:12px;color:#555;margin-top:6px}
figure.empty .nodata{height:160px;display:flex;align-items:center;justify-content:center;color:#999;
  border:2px dashed #ddd;border-radius:6px;font-size:15px}
table{border-collapse:collapse;font-size:12px;margin-top:8px;width:100%}
th,td{border-bottom:1px solid #eee;padding:3px 6px;text-align:left}
"""


def render(data: dict[str, pd.DataFrame | str], title: str = "Fraud and risk dashboard",
           generated_at: datetime | None = None) -> tuple[str, list[dict]]:
    """(HTML page, panel summaries) from :func:`load`'s result."""
    generated_at = generated_at or datetime.now(timezone.utc)
    figures, panels = [], []
    for panel in PANELS:
        value = data.get(panel.key, "not loaded")
        rows = len(value) if isinstance(value, pd.DataFrame) else 0
        reason = value if isinstance(value, str) else ("the mart is empty" if rows == 0 else "")
        if rows:
            try:
                png = _figure_png(panel, value)
            except (KeyError, ValueError, TypeError) as exc:  # a mart without the expected columns
                rows, reason = 0, f"cannot draw {panel.mart}: {exc!r}"
        if rows:
            body = (f'<img alt="{html.escape(panel.title)}" src="data:image/png;base64,{png}">'
                    + _table(value, panel.table)
                    + f"<figcaption>{rows:,} rows of {html.escape(panel.mart)}. {html.escape(panel.note)}"
                      "</figcaption>")
            figures.append(f'<figure data-panel="{panel.key}" data-mart="{panel.mart}" data-rows="{rows}">'
                           f"<h2 style='font-size:15px;margin:0 0 6px'>{html.escape(panel.title)}</h2>{body}</figure>")
        else:
            figures.append(f'<figure class="empty" data-panel="{panel.key}" data-mart="{panel.mart}" data-rows="0">'
                           f"<h2 style='font-size:15px;margin:0 0 6px'>{html.escape(panel.title)}</h2>"
                           f'<div class="nodata">no data yet</div><figcaption>{html.escape(reason)}</figcaption>'
                           "</figure>")
        panels.append({"key": panel.key, "title": panel.title, "mart": panel.mart, "rows": rows,
                       "reason": reason or None})
    page = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f"<div class='sub'>Generated {generated_at:%Y-%m-%d %H:%M} UTC from the dbt marts. "
        f"{sum(1 for p in panels if p['rows'])} of {len(panels)} panels have data.</div>"
        f"<div class='grid'>{''.join(figures)}</div>"
        # Record on each figure the size the browser decoded its image at (checked by the tests).
        "<script>window.addEventListener('load',()=>document.querySelectorAll('figure img').forEach("
        "i=>{i.closest('figure').dataset.imgWidth=i.naturalWidth;i.closest('figure').dataset.imgHeight="
        "i.naturalHeight;}));</script></body></html>"
    )
    return page, panels


def write(settings: Settings, target: Path | str, schema: str = "marts") -> dict:
    """Load the marts, render the page and write it atomically to ``target``; returns the panel summary."""
    target = Path(target)
    page, panels = render(load(settings, schema))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, target)
    return {"path": str(target), "panels": panels}


def serve(target: Path | str, port: int = 8050, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve the page's folder on http://127.0.0.1:port (loopback only) until interrupted."""
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    target = Path(target)
    handler = partial(SimpleHTTPRequestHandler, directory=str(target.parent))
    with ThreadingHTTPServer(("127.0.0.1", port), handler) as server:
        if on_ready:
            on_ready(f"http://127.0.0.1:{server.server_address[1]}/{target.name}")
        server.serve_forever()
