"""The synthetic feed: determinism, record validity, scenario rates, labels, stream defects, summary.

Pure Python (no Spark): every check reads the files the generator wrote.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from lakehouse.generator import (
    MALFORMED_KINDS,
    SUMMARY_KEYS,
    GeneratorConfig,
    build_populations,
    generate_backlog,
    run_live,
    run_simulation,
)
from lakehouse.generator import writer
from lakehouse.reference import COUNTRY_CURRENCY, FRAUD_SCENARIOS, FX_TO_USD, ISO_COUNTRIES
from lakehouse.schemas import EVENT_FIELDS, LABEL_FIELDS

START = datetime(2026, 11, 1, tzinfo=timezone.utc)
#: Same pattern as lakehouse.quality.ISO_TS_WITH_OFFSET (not imported: that module needs Spark).
ISO_TS = re.compile(r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?(?:Z|z|[+-]\d{2}:?\d{2})$")
EVENT_NAME = re.compile(r"^events-(\d{8}T\d{6})-(\d+)-(\d{6})\.jsonl$")
LABEL_NAME = re.compile(r"^labels-(\d{8})T\d{6}-(\d+)-(\d{6})\.jsonl$")

SMALL = GeneratorConfig(seed=7, n_users=300, n_merchants=60, days=1.0, start=START, file_events=300,
                        file_minutes=30.0, malformed_rate=0.02, label_review_rate=0.02)


def ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def classify(line: str) -> str:
    """'valid', or the malformed kind the line shows."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return "broken_json"
    if not isinstance(rec, dict) or any(f not in rec for f in EVENT_FIELDS):
        return "missing_field"
    amount = rec["amount"]
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        return "wrong_type"
    return "valid"


class Inbox:
    """Everything in an events and a labels folder, parsed once."""

    def __init__(self, events_dir: Path, labels_dir: Path):
        self.event_files = sorted(p.name for p in events_dir.iterdir()) if events_dir.exists() else []
        self.label_files = sorted(p.name for p in labels_dir.iterdir()) if labels_dir.exists() else []
        self.lines: list[tuple[int, str]] = []  # (file number in delivery order, text)
        for i, name in enumerate(self.event_files):
            data = (events_dir / name).read_bytes()
            assert data.endswith(b"\n") and b"\r" not in data
            self.lines += [(i, line) for line in data.decode("utf-8").split("\n")[:-1]]
        self.kinds = [classify(line) for _, line in self.lines]
        self.events: dict[str, dict] = {}
        self.first_file: dict[str, int] = {}
        for (f, line), kind in zip(self.lines, self.kinds):
            if kind == "valid":
                rec = json.loads(line)
                self.events.setdefault(rec["event_id"], rec)
                self.first_file.setdefault(rec["event_id"], f)
        self.labels: list[tuple[str, dict]] = []
        for name in self.label_files:
            for line in (labels_dir / name).read_text("utf-8").splitlines():
                self.labels.append((name, json.loads(line)))

    def close_time(self, file_no: int) -> datetime:
        stamp = EVENT_NAME.match(self.event_files[file_no]).group(1)
        return datetime.strptime(stamp, "%Y%m%dT%H%M%S").replace(tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    summary = generate_backlog(root / "events", root / "labels", SMALL)
    return summary, Inbox(root / "events", root / "labels"), root


@pytest.fixture(scope="module")
def fraudy(tmp_path_factory):
    """More events and fraud, and chargebacks within hours, so most fraud labels are written."""
    config = GeneratorConfig(seed=11, n_users=400, n_merchants=80, days=1.0, start=START, n_events=40_000,
                             card_testing_rate=0.01, account_takeover_rate=0.006,
                             compromised_merchant_rate=0.008, high_amount_rate=0.004,
                             chargeback_median_days=0.05, file_minutes=5.0)
    root = tmp_path_factory.mktemp("fraudy")
    summary = generate_backlog(root / "events", root / "labels", config)
    return config, summary, Inbox(root / "events", root / "labels")


# ---- determinism ----------------------------------------------------------------------------------

def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_same_config_gives_byte_identical_files(tmp_path, small):
    summary, _, root = small
    again = generate_backlog(tmp_path / "events", tmp_path / "labels", SMALL)
    assert _snapshot(tmp_path / "events") == _snapshot(root / "events")
    assert _snapshot(tmp_path / "labels") == _snapshot(root / "labels")
    ignore = {"events_dir", "labels_dir", "generated_at", "elapsed_s"}
    assert {k: v for k, v in again.items() if k not in ignore} == \
        {k: v for k, v in summary.items() if k not in ignore}


def test_different_seed_gives_different_data(tmp_path, small):
    _, inbox, root = small
    generate_backlog(tmp_path / "events", tmp_path / "labels", GeneratorConfig(**{**SMALL.__dict__, "seed": 8}))
    other = Inbox(tmp_path / "events", tmp_path / "labels")
    assert other.event_files and set(other.event_files).isdisjoint(inbox.event_files)
    assert set(other.events).isdisjoint(inbox.events)
    assert [line for _, line in other.lines[:50]] != [line for _, line in inbox.lines[:50]]


def test_default_start_ends_today_midnight():
    config = GeneratorConfig(days=2.0)
    now = datetime(2026, 11, 29, 15, 30, tzinfo=timezone.utc)
    assert config.resolved_start(now) == datetime(2026, 11, 27, tzinfo=timezone.utc)
    assert GeneratorConfig(start=datetime(2026, 1, 1, 12)).start == datetime(2026, 1, 1, 12, tzinfo=timezone.utc)


@pytest.mark.parametrize("bad", [dict(duplicate_rate=1.5), dict(card_testing_rate=-0.1), dict(days=0),
                                 dict(n_users=0), dict(file_events=0), dict(seed=-1),
                                 dict(card_testing_rate=0.3, high_amount_rate=0.3)])
def test_invalid_config_is_rejected(bad):
    with pytest.raises(ValueError):
        GeneratorConfig(**bad)


# ---- records --------------------------------------------------------------------------------------

def test_summary_has_every_key(small):
    summary, _, _ = small
    assert set(SUMMARY_KEYS) <= set(summary)
    assert set(summary["fraud_by_scenario"]) == set(FRAUD_SCENARIOS)
    assert set(summary["malformed_by_kind"]) == set(MALFORMED_KINDS)
    assert summary["start"] == "2026-11-01T00:00:00.000Z" and summary["end"] == "2026-11-02T00:00:00.000Z"
    assert summary["seed"] == 7
    json.dumps(summary)  # serialisable as is


def test_every_valid_line_is_a_complete_event(small):
    summary, inbox, _ = small
    start, end = ts(summary["start"]), ts(summary["end"])
    amount_text = re.compile(r'"amount":(\d+)(\.\d{2})?,')
    offsets = Counter()
    for (_, line), kind in zip(inbox.lines, inbox.kinds):
        if kind != "valid":
            continue
        rec = json.loads(line)
        assert tuple(rec) == EVENT_FIELDS  # and nothing else: no ground truth in the event
        assert re.fullmatch(r"e-[0-9a-f]{16}", rec["event_id"])
        assert re.fullmatch(r"u\d{7}", rec["user_id"]) and re.fullmatch(r"m\d{5}", rec["merchant_id"])
        assert rec["currency"] in FX_TO_USD and rec["country"] in ISO_COUNTRIES
        assert rec["country"] in COUNTRY_CURRENCY
        assert rec["amount"] > 0
        whole, cents = amount_text.search(line).groups()
        assert (cents is None) == (rec["currency"] == "JPY")
        assert ISO_TS.match(rec["event_time"])
        t = ts(rec["event_time"])
        assert start <= t < end
        offsets[rec["event_time"][-6:] if not rec["event_time"].endswith("Z") else "Z"] += 1
    valid = sum(k == "valid" for k in inbox.kinds)
    assert offsets["Z"] > 0.8 * valid
    assert sum(v for k, v in offsets.items() if k != "Z") > 0.03 * valid  # +01:00, -05:00, +05:30 ...


def test_offset_times_are_the_same_instant():
    assert writer.iso_times(np.array([0, 1_790_000_000_123]), np.array([0, 120])).tolist() == [
        "1970-01-01T00:00:00.000Z", "2026-09-21T16:13:20.123+02:00"]
    assert ts("2026-09-21T16:13:20.123+02:00") == datetime(2026, 9, 21, 14, 13, 20, 123000, tzinfo=timezone.utc)
    assert writer.iso_times(np.array([0]), np.array([-330])).tolist() == ["1969-12-31T18:30:00.000-05:30"]


def test_amounts_are_realistic_in_each_currency(small):
    _, inbox, _ = small
    usd = [e["amount"] * FX_TO_USD[e["currency"]] for e in inbox.events.values()]
    assert 5 < float(np.median(usd)) < 150
    mostly_local = sum(COUNTRY_CURRENCY[e["country"]] == e["currency"] for e in inbox.events.values())
    assert mostly_local > 0.9 * len(inbox.events)


def test_event_ids_are_unique_per_event(small):
    _, inbox, _ = small
    by_id = defaultdict(set)
    for (_, line), kind in zip(inbox.lines, inbox.kinds):
        if kind == "valid":
            by_id[json.loads(line)["event_id"]].add(line)
    assert all(len(v) == 1 for v in by_id.values())  # one id never names two different events


# ---- summary reconciliation -------------------------------------------------------------------------

def test_summary_reconciles_with_files(small):
    summary, inbox, _ = small
    kinds = Counter(inbox.kinds)
    valid_lines = kinds["valid"]
    assert summary["lines_written"] == len(inbox.lines)
    assert summary["events"] == len(inbox.events)
    assert summary["duplicates"] == valid_lines - len(inbox.events)
    assert summary["malformed_by_kind"] == {k: kinds[k] for k in MALFORMED_KINDS}
    assert summary["malformed"] == sum(kinds[k] for k in MALFORMED_KINDS)
    assert summary["lines_written"] == summary["events"] + summary["duplicates"] + summary["malformed"]
    assert summary["files"] == len(inbox.event_files)
    assert summary["label_files"] == len(inbox.label_files)
    assert summary["labels_written"] == len(inbox.labels)
    assert all(v > 0 for v in summary["malformed_by_kind"].values())
    assert summary["duplicates"] == round(SMALL.duplicate_rate * summary["events"])
    assert summary["malformed"] == round(SMALL.malformed_rate * summary["events"])


def test_default_fraud_share(small):
    summary, _, _ = small
    assert 0.005 <= summary["fraud_events"] / summary["events"] <= 0.02
    assert summary["fraud_events"] == sum(summary["fraud_by_scenario"].values())


def test_file_names_sort_in_delivery_order(small):
    _, inbox, _ = small
    seqs = [int(EVENT_NAME.match(n).group(3)) for n in inbox.event_files]
    assert seqs == list(range(len(seqs)))
    closes = [inbox.close_time(i) for i in range(len(seqs))]
    assert closes == sorted(closes)
    assert all(LABEL_NAME.match(n) for n in inbox.label_files)


def test_no_temp_files_are_left(small):
    _, _, root = small
    for folder in (root / "events", root / "labels"):
        assert not [p for p in os.listdir(folder) if p.startswith((".", "_"))]


def test_write_atomic_cleans_up_on_failure(tmp_path, monkeypatch):
    writer.write_atomic(tmp_path, "a.jsonl", b"x\n")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        writer.write_atomic(tmp_path, "b.jsonl", b"y\n")
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl"]


def test_progress_reaches_total(tmp_path):
    calls = []
    config = GeneratorConfig(seed=3, n_users=50, n_merchants=20, days=0.5, start=START, file_events=100)
    summary = generate_backlog(tmp_path / "e", tmp_path / "l", config, progress=lambda d, t: calls.append((d, t)))
    assert calls[0][0] == 0 and calls[-1][0] == calls[-1][1] == summary["lines_written"] + summary["labels_written"]
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


# ---- stream defects ---------------------------------------------------------------------------------

def test_duplicates_are_exact_copies_in_a_later_file(small):
    summary, inbox, _ = small
    seen: dict[str, int] = {}
    redelivered = 0
    for (f, line), kind in zip(inbox.lines, inbox.kinds):
        if kind != "valid":
            continue
        if line in seen:
            assert f > seen[line], "a re-delivery must come in a later file"
            redelivered += 1
        else:
            seen[line] = f
    assert redelivered == summary["duplicates"] > 0


def test_malformed_lines_are_not_events_and_have_no_labels(small):
    _, inbox, _ = small
    bad_ids = set()
    for (_, line), kind in zip(inbox.lines, inbox.kinds):
        if kind != "valid":
            m = re.search(r"e-[0-9a-f]{16}", line)
            if m:
                bad_ids.add(m.group(0))
    assert bad_ids and bad_ids.isdisjoint(inbox.events)
    assert bad_ids.isdisjoint(rec["event_id"] for _, rec in inbox.labels)
    wrong = [json.loads(line)["amount"] for (_, line), k in zip(inbox.lines, inbox.kinds) if k == "wrong_type"]
    assert any(isinstance(a, str) for a in wrong) and any(isinstance(a, (dict, list)) for a in wrong)
    for a in wrong:  # never a number in disguise: the silver try_cast must fail
        if isinstance(a, str):
            with pytest.raises(ValueError):
                float(a)


def test_records_within_a_file_are_out_of_order(small):
    _, inbox, _ = small
    by_file = defaultdict(list)
    for (f, line), kind in zip(inbox.lines, inbox.kinds):
        if kind == "valid":
            by_file[f].append(ts(json.loads(line)["event_time"]))
    unsorted = sum(times != sorted(times) for times in by_file.values())
    assert unsorted > len(by_file) / 2


def test_late_events_count_and_lateness(fraudy):
    config, summary, inbox = fraudy
    # With 5-minute files, an on-time event's file closes < 10 min after it; a late one >= 15 min.
    late = [eid for eid, rec in inbox.events.items()
            if inbox.close_time(inbox.first_file[eid]) - ts(rec["event_time"]) >= timedelta(minutes=12)]
    assert len(late) == summary["late"]
    expected = config.late_rate * summary["events"]
    assert abs(summary["late"] - expected) < 4 * np.sqrt(expected)
    assert all(inbox.close_time(inbox.first_file[eid]) - ts(inbox.events[eid]["event_time"])
               <= timedelta(hours=6, minutes=5) for eid in late)


# ---- fraud scenarios ----------------------------------------------------------------------------------

def test_exact_event_count(tmp_path):
    config = GeneratorConfig(seed=5, n_users=500, n_merchants=100, days=2.0, start=START, n_events=200_000,
                             file_events=20_000)
    summary = generate_backlog(tmp_path / "e", tmp_path / "l", config)
    assert summary["events"] == 200_000
    ids = set()
    lines = 0
    for p in (tmp_path / "e").iterdir():
        for line in p.read_text().splitlines():
            lines += 1
            if classify(line) == "valid":
                ids.add(json.loads(line)["event_id"])
    assert lines == summary["lines_written"]
    assert len(ids) == 200_000
    for name, rate in config.fraud_rates.items():
        assert summary["fraud_by_scenario"][name] == pytest.approx(rate * 200_000, rel=0.05)


def test_scenario_rates_match_config(fraudy):
    config, summary, _ = fraudy
    for name, rate in config.fraud_rates.items():
        assert summary["fraud_by_scenario"][name] / summary["events"] == pytest.approx(rate, rel=0.1), name


def _fraud_events(inbox: Inbox, scenario: str) -> list[dict]:
    return [inbox.events[rec["event_id"]] for _, rec in inbox.labels if rec["scenario"] == scenario]


def test_labels_cover_only_valid_events_and_come_after_them(fraudy, small):
    for summary, inbox in ((fraudy[1], fraudy[2]), (small[0], small[1])):
        end = ts(summary["end"])
        ids = [rec["event_id"] for _, rec in inbox.labels]
        assert len(ids) == len(set(ids))
        for name, rec in inbox.labels:
            assert tuple(rec) == LABEL_FIELDS
            assert rec["event_id"] in inbox.events
            assert ISO_TS.match(rec["reported_at"]) and rec["reported_at"].endswith("Z")
            reported = ts(rec["reported_at"])
            assert ts(inbox.events[rec["event_id"]]["event_time"]) <= reported <= end
            assert LABEL_NAME.match(name).group(1) == reported.strftime("%Y%m%d")  # grouped by date
            if rec["is_fraud"] is True:
                assert rec["scenario"] in FRAUD_SCENARIOS
            else:
                assert rec["is_fraud"] is False and rec["scenario"] == "none"
        fraud_labels = sum(rec["is_fraud"] for _, rec in inbox.labels)
        assert fraud_labels <= summary["fraud_events"]
        assert 0 < sum(not rec["is_fraud"] for _, rec in inbox.labels)
    # default chargebacks (median 4 days) over one simulated day: most are still to come
    assert small[0]["labels_withheld"] > small[0]["labels_written"] / 2
    # fast chargebacks: most fraud is labelled by the end
    assert sum(rec["is_fraud"] for _, rec in fraudy[2].labels) > 0.6 * fraudy[1]["fraud_events"]


def test_labels_delays_are_realistic():
    config = GeneratorConfig(seed=2, n_users=300, n_merchants=50, days=2.0, start=START, n_events=30_000,
                             card_testing_rate=0.02)
    sim = run_simulation(config)
    delay_days = (sim.label_reported_ms - sim.records.t_ms[sim.label_rows]) / 86_400_000
    fraud = sim.label_scenario > 0
    assert 3 <= np.median(delay_days[fraud]) <= 5
    assert delay_days[fraud].max() <= 30
    assert (delay_days[~fraud] <= 2).all() and (delay_days[~fraud] >= 1 / 24).all()


def test_card_testing_bursts_are_small_and_within_minutes(fraudy):
    config, _, inbox = fraudy
    rows = _fraud_events(inbox, "card_testing")
    assert len(rows) > 100
    by_user = defaultdict(list)
    for e in rows:
        usd = e["amount"] * FX_TO_USD[e["currency"]]
        assert 0.45 <= usd <= 5.05
        by_user[e["user_id"]].append(e)
    spans, sizes = [], []
    for events in by_user.values():
        events.sort(key=lambda e: ts(e["event_time"]))
        burst = [events[0]]
        for e in events[1:] + [None]:
            if e is not None and ts(e["event_time"]) - ts(burst[-1]["event_time"]) < timedelta(minutes=10):
                burst.append(e)
                continue
            spans.append(ts(burst[-1]["event_time"]) - ts(burst[0]["event_time"]))
            sizes.append(len(burst))
            assert len({x["merchant_id"] for x in burst}) >= min(len(burst), 2)  # various merchants
            if e is not None:
                burst = [e]
    assert max(spans) <= timedelta(minutes=10)
    assert np.median(sizes) >= 5


def test_card_testing_bursts_have_5_to_20_payments():
    sim = run_simulation(GeneratorConfig(seed=4, n_users=2000, n_merchants=100, days=1.0, start=START,
                                         n_events=20_000, card_testing_rate=0.02))
    code = FRAUD_SCENARIOS.index("card_testing") + 1
    ct = sim.valid & (sim.records.scenario == code)
    users, t = sim.records.user[ct], sim.records.t_ms[ct]
    order = np.lexsort((t, users))
    users, t = users[order], t[order]
    new = np.concatenate([[True], (users[1:] != users[:-1]) | (np.diff(t) > 10 * 60_000)])
    sizes = np.diff(np.concatenate([np.flatnonzero(new), [len(t)]]))
    assert sizes.min() >= 5 and sizes.max() <= 40  # 5-20, unless one user was hit twice in a row


def test_account_takeover_comes_from_abroad_at_night(fraudy):
    config, _, inbox = fraudy
    users = build_populations(config).users_frame().set_index("user_id")
    rows = _fraud_events(inbox, "account_takeover")
    assert len(rows) > 50
    for e in rows:
        u = users.loc[e["user_id"]]
        assert e["country"] != u.home_country
        ratio = e["amount"] * FX_TO_USD[e["currency"]] / u.typical_amount_usd
        assert 4.5 <= ratio <= 21
    sim = run_simulation(config)
    code = FRAUD_SCENARIOS.index("account_takeover") + 1
    from lakehouse.generator.populations import UTC_OFFSET_MIN
    ato = sim.valid & (sim.records.scenario == code)
    home = build_populations(config).home[sim.records.user[ato]]
    local_hour = ((sim.records.t_ms[ato] // 60_000 + UTC_OFFSET_MIN[home]) % 1440) / 60
    assert np.mean((local_hour >= 1) & (local_hour < 6)) > 0.9


def test_compromised_merchant_fraud_is_concentrated(fraudy):
    _, _, inbox = fraudy
    rows = _fraud_events(inbox, "compromised_merchant")
    assert len(rows) > 50
    merchants = Counter(e["merchant_id"] for e in rows)
    assert merchants.most_common(1)[0][1] >= 10  # a few merchants carry it, not spread thin


def test_high_amount_is_high(fraudy):
    _, _, inbox = fraudy
    rows = _fraud_events(inbox, "high_amount")
    assert rows and all(e["amount"] * FX_TO_USD[e["currency"]] >= 1000 for e in rows)


# ---- live mode ----------------------------------------------------------------------------------------

class FakeClock:
    def __init__(self, t: float):
        self.t = t

    def clock(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def test_live_mode_writes_a_file_per_second_and_reconciles(tmp_path):
    clock = FakeClock(datetime(2026, 11, 29, 12, tzinfo=timezone.utc).timestamp())
    config = GeneratorConfig(seed=9, n_users=300, n_merchants=50, duplicate_rate=0.05, malformed_rate=0.02)
    summary = run_live(tmp_path / "e", tmp_path / "l", config, rate=200, duration_s=30,
                       clock=clock.clock, sleep=clock.sleep)
    inbox = Inbox(tmp_path / "e", tmp_path / "l")
    assert summary["files"] == len(inbox.event_files) == 30
    assert summary["lines_written"] == len(inbox.lines)
    assert summary["events"] == len(inbox.events) == pytest.approx(200 * 30, rel=0.1)
    kinds = Counter(inbox.kinds)
    assert summary["malformed_by_kind"] == {k: kinds[k] for k in MALFORMED_KINDS}
    assert summary["duplicates"] == kinds["valid"] - len(inbox.events) > 0
    assert summary["lines_written"] == summary["events"] + summary["duplicates"] + summary["malformed"]
    seen: dict[str, int] = {}
    for (f, line), kind in zip(inbox.lines, inbox.kinds):
        if kind == "valid":
            if line in seen:
                assert f > seen[line]
            seen.setdefault(line, f)
            # never in the future of the file that carries it
            assert ts(json.loads(line)["event_time"]) <= inbox.close_time(f) + timedelta(seconds=1)
    assert summary["labels_withheld"] > 0 and summary["labels_written"] == len(inbox.labels)
    assert not [p for p in os.listdir(tmp_path / "e") if p.startswith(".")]


def test_live_mode_stops_cleanly_on_ctrl_c(tmp_path):
    clock = FakeClock(datetime(2026, 11, 29, 12, tzinfo=timezone.utc).timestamp())
    calls = []

    def sleep(s: float) -> None:
        calls.append(s)
        if len(calls) == 5:
            raise KeyboardInterrupt
        clock.sleep(s)

    summary = run_live(tmp_path / "e", tmp_path / "l", GeneratorConfig(seed=1, n_users=100, n_merchants=20),
                       rate=100, duration_s=60, clock=clock.clock, sleep=sleep)
    inbox = Inbox(tmp_path / "e", tmp_path / "l")
    assert summary["interrupted"] is True
    assert summary["files"] == len(inbox.event_files) == 4
    assert summary["lines_written"] == len(inbox.lines)
    assert summary["events"] == len(inbox.events)
