"""The risk dashboard rendered from marts in a real Postgres and loaded in a real headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from datetime import date, datetime, timedelta, timezone

import pytest

from lakehouse import dashboard
from lakehouse.io import postgres
from tests.conftest import stop_postgres

pytestmark = pytest.mark.integration

DAY = date(2026, 11, 20)


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:  # .ci/run installs it (Debian: apt-get install chromium)
        pytest.fail("chromium is not installed: apt-get install -y --no-install-recommends chromium")
    return exe


def browser_dom(html_path, tmp_path) -> str:
    """The DOM after the page loaded and ran its script, as headless Chromium sees it."""
    res = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=5000",
         "--dump-dom", html_path.as_uri()],
        capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def figures(dom: str) -> dict[str, dict]:
    out = {}
    for tag in re.findall(r"<figure\b[^>]*>", dom):
        attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', tag))
        out[attrs["data-panel"]] = attrs
    return out


def _create_marts(settings) -> None:
    """Small marts with the dbt marts' names and the columns the dashboard reads; the model
    performance mart is left out on purpose (a deployment where no model has scored yet)."""
    conn = postgres.connect(settings, autocommit=True)
    t0 = datetime(2026, 11, 18, tzinfo=timezone.utc)
    with conn.cursor() as cur:
        cur.execute("create schema if not exists marts")
        cur.execute("create table marts.risk_monitoring_daily (day date, n_transactions bigint, "
                    "fraud_rate_to_date double precision, alert_share double precision)")
        cur.executemany("insert into marts.risk_monitoring_daily values (%s, %s, %s, %s)",
                        [(DAY - timedelta(days=i), 1000 + 50 * i, 0.01 * i, 0.02) for i in range(5)])
        cur.execute("create table marts.risk_monitoring_hourly (hour_at timestamptz, day date, n_transactions bigint, "
                    "fraud_rate_to_date double precision, alert_share double precision)")
        cur.executemany("insert into marts.risk_monitoring_hourly values (%s, %s, %s, %s, %s)",
                        [(t0 + timedelta(hours=h), (t0 + timedelta(hours=h)).date(), 40 + h % 24, 0.01, 0.02)
                         for h in range(72)])
        for key, name in (("merchant_id", "merchant_risk"), ("country", "country_risk")):
            cur.execute(f"create table marts.{name} ({key} text, day date, risk_score double precision, "
                        "risk_level text, risk_reason text, tx_count bigint, fraud_rate_to_date double precision)")
            cur.executemany(f"insert into marts.{name} values (%s, %s, %s, %s, %s, %s, %s)",
                            [(f"k{i:02d}", DAY, i / 15, "high" if i > 12 else "low", "volume spike", 10 * i, 0.01)
                             for i in range(15)])
        cur.execute("create table marts.user_velocity_alerts (user_id text, window_start_at timestamptz, "
                    "tx_count bigint, amount_sum_usd double precision, alert_reason text)")
        cur.executemany("insert into marts.user_velocity_alerts values (%s, %s, %s, %s, %s)",
                        [(f"u{i}", t0 + timedelta(minutes=37 * i), 9, 120.0, "count" if i % 2 else "amount")
                         for i in range(12)])
        cur.execute("create table marts.data_quality_daily (day date, kind text, records_in bigint, "
                    "inserted bigint, duplicates bigint, quarantined bigint, is_reconciled boolean)")
        cur.executemany("insert into marts.data_quality_daily values (%s, %s, %s, %s, %s, %s, %s)",
                        [(DAY - timedelta(days=i), k, 1000, 950, 30, 20, True) for i in range(3)
                         for k in ("events", "labels")])
    conn.close()


@pytest.fixture
def pg(settings):
    postgres.start(settings)
    yield settings
    stop_postgres(settings)


def test_dashboard_shows_data_in_a_real_browser(pg, tmp_path):
    _create_marts(pg)
    target = tmp_path / "dashboard.html"
    report = dashboard.write(pg, target)
    rows = {p["key"]: p["rows"] for p in report["panels"]}
    assert rows == {"volume_daily": 5, "volume_hourly": 72, "merchants": 10, "countries": 10, "velocity": 12,
                    "data_quality": 6, "model": 0}

    figs = figures(browser_dom(target, tmp_path))
    assert set(figs) == set(rows)
    for key, n in rows.items():
        assert int(figs[key]["data-rows"]) == n, key
        if n:  # the browser decoded a real image for every panel with data
            assert int(figs[key]["data-img-width"]) >= 600 and int(figs[key]["data-img-height"]) >= 200, key
        else:
            assert "data-img-width" not in figs[key] and "empty" in figs[key]["class"]


def test_dashboard_without_marts_says_no_data_yet(pg, tmp_path):
    target = tmp_path / "empty.html"
    report = dashboard.write(pg, target)
    assert all(p["rows"] == 0 and "does not exist yet" in p["reason"] for p in report["panels"])
    dom = browser_dom(target, tmp_path)
    assert dom.count("no data yet") == len(dashboard.PANELS)
    assert "<img" not in dom
