"""The simulation core shared by the backlog and the live mode.

:func:`simulate` produces, for a time window, every original record (valid events and malformed
records) with its JSON line and delivery time, the re-deliveries, and the labels. Writing them into
files is the caller's business (:mod:`backlog` groups by delivery time, :mod:`live` by wall clock).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lakehouse.generator import defects, scenarios, writer
from lakehouse.generator.config import GeneratorConfig
from lakehouse.generator.populations import (
    COUNTRIES,
    CURRENCIES,
    DAY_MS,
    HOUR_MS,
    UTC_OFFSET_MIN,
    Block,
    Populations,
    normal_traffic,
    to_minor_units,
)
from lakehouse.reference import FRAUD_SCENARIOS

S = writer.S


@dataclass
class Simulation:
    """Originals are sorted by event time; row ``i`` has event index ``i`` in the id namespace."""

    start_ms: int
    end_ms: int
    records: Block                # valid events and malformed records
    valid: np.ndarray             # bool
    malformed_kind: np.ndarray    # -1 for valid, else code into defects.MALFORMED_KINDS
    late: np.ndarray              # bool (valid events only)
    event_id: np.ndarray          # StringDType
    lines: np.ndarray             # StringDType, the line as delivered
    deliver_ms: np.ndarray        # int64 first delivery
    order_key: np.ndarray         # int64 delivery + out-of-order jitter
    dup_rows: np.ndarray          # rows re-delivered
    dup_deliver_ms: np.ndarray    # int64 re-delivery time
    dup_key: np.ndarray           # int64 re-delivery + jitter
    label_rows: np.ndarray        # rows labelled (sorted by reported_at)
    label_scenario: np.ndarray    # 0 = reviewed legitimate, else scenario code
    label_reported_ms: np.ndarray
    label_lines: np.ndarray       # StringDType

    @property
    def n_valid(self) -> int:
        return int(self.valid.sum())

    def fraud_by_scenario(self, mask: np.ndarray | None = None) -> dict[str, int]:
        sc = self.records.scenario[self.valid if mask is None else (self.valid & mask)]
        counts = np.bincount(sc, minlength=len(FRAUD_SCENARIOS) + 1)
        return {name: int(counts[i + 1]) for i, name in enumerate(FRAUD_SCENARIOS)}

    def malformed_by_kind(self, mask: np.ndarray | None = None) -> dict[str, int]:
        k = self.malformed_kind if mask is None else self.malformed_kind[mask]
        counts = np.bincount(k[k >= 0], minlength=len(defects.MALFORMED_KINDS))
        return {name: int(counts[i]) for i, name in enumerate(defects.MALFORMED_KINDS)}


def _targets(config: GeneratorConfig, total: float) -> dict[str, int]:
    return {name: int(round(rate * total)) for name, rate in config.fraud_rates.items()}


def simulate(config: GeneratorConfig, pops: Populations, start_ms: int, end_ms: int, *,
             n_events: int | None, rng: np.random.Generator, ns: int, backdate_late: bool = False,
             dup_delay_s: tuple[float, float] | None = None,
             lag_ms: tuple[float, int] = (defects.LAG_MEAN_MS, defects.LAG_CAP_MS)) -> Simulation:
    """Simulate [start_ms, end_ms): ``n_events`` valid events exactly, or (None) the volume implied
    by the users' transaction rates. ``backdate_late``: late events keep their delivery time and
    get an older event_time (live mode) instead of being delivered later (backlog mode).
    ``lag_ms``: (mean, cap) of the normal delivery lag."""
    span_days = (end_ms - start_ms) / DAY_MS
    inject = ("card_testing", "account_takeover", "high_amount")
    if n_events is None:
        n_norm = int(rng.poisson(float(pops.tx_per_day.sum()) * span_days))
        r_inj = sum(config.fraud_rates[s] for s in inject)
        total_est = n_norm / (1.0 - r_inj)
    else:
        total_est = float(n_events)
    targets = _targets(config, total_est)

    fraud_blocks = [
        scenarios.card_testing(rng, pops, targets["card_testing"], start_ms, end_ms),
        scenarios.account_takeover(rng, pops, targets["account_takeover"], start_ms, end_ms),
        scenarios.high_amount(rng, pops, targets["high_amount"], start_ms, end_ms),
    ]
    injected = Block.concat(fraud_blocks)
    if n_events is not None:
        if len(injected) > n_events:  # only for tiny targets: bursts overshoot
            injected = injected.take(np.arange(n_events))
        n_norm = n_events - len(injected)
    n_valid = n_norm + len(injected)
    n_bad = int(round(config.malformed_rate * n_valid))

    pool = normal_traffic(rng, pops, config, n_norm + n_bad, start_ms, end_ms)
    bad_mask = np.zeros(len(pool), dtype=bool)
    if n_bad:
        bad_mask[rng.choice(len(pool), n_bad, replace=False)] = True
    normal, bad = pool.take(~bad_mask), pool.take(bad_mask)
    scenarios.compromise_merchants(rng, pops, normal, targets["compromised_merchant"],
                                   config.compromised_share, start_ms, end_ms)

    recs = Block.concat([normal, injected, bad])
    valid = np.concatenate([np.ones(n_valid, dtype=bool), np.zeros(n_bad, dtype=bool)])
    kind = np.full(len(recs), -1, dtype=np.int8)
    kind[n_valid:] = rng.integers(0, len(defects.MALFORMED_KINDS), n_bad)
    order = np.argsort(recs.t_ms, kind="stable")
    recs, valid, kind = recs.take(order), valid[order], kind[order]
    n = len(recs)
    eid = writer.event_ids(ns, np.arange(n))

    # ---- delivery: normal lag, late events, out-of-order jitter ----------------------------------
    lag = defects.delivery_lags(rng, n, *lag_ms)
    late = valid & (rng.random(n) < config.late_rate)
    late_lag = defects.late_lags(rng, int(late.sum()), config)
    deliver = recs.t_ms + lag
    if backdate_late:
        recs.t_ms[late] = deliver[late] - late_lag
    else:
        deliver[late] = recs.t_ms[late] + late_lag
    window_ms = int(config.out_of_order_window_s * 1000)
    order_key = deliver + (rng.integers(0, window_ms + 1, n) if window_ms else 0)

    # ---- text ----------------------------------------------------------------------------------
    minor = to_minor_units(recs.usd, recs.currency)
    amount = writer.amount_text(minor, recs.currency)
    use_offset = rng.random(n) < config.offset_time_rate
    offset = np.where(use_offset, UTC_OFFSET_MIN[recs.country], 0)
    ts = writer.iso_times(recs.t_ms, offset)
    cc = recs.currency.astype(np.int64) * len(COUNTRIES) + recs.country
    lines = writer.event_lines(eid, writer.user_segments(pops.n_users)[recs.user],
                               writer.merchant_segments(pops.n_merchants)[recs.merchant], amount,
                               writer.currency_country_segments()[cc], ts)
    bad_rows = np.flatnonzero(~valid)
    if len(bad_rows):
        q = lambda a: np.strings.add(np.strings.add('"', a), '"')  # noqa: E731
        fields = {
            "event_id": q(eid[bad_rows]),
            "user_id": q(np.array([f"u{u:07d}" for u in recs.user[bad_rows]], dtype=S)),
            "merchant_id": q(np.array([f"m{m:05d}" for m in recs.merchant[bad_rows]], dtype=S)),
            "amount": amount[bad_rows],
            "currency": q(np.array(CURRENCIES, dtype=S)[recs.currency[bad_rows]]),
            "country": q(np.array(COUNTRIES, dtype=S)[recs.country[bad_rows]]),
            "event_time": q(ts[bad_rows]),
        }
        lines[bad_rows] = np.array(defects.malformed_lines(rng, kind[bad_rows], fields), dtype=S)

    # ---- re-deliveries -----------------------------------------------------------------------------
    valid_rows = np.flatnonzero(valid)
    n_dup = int(round(config.duplicate_rate * len(valid_rows)))
    dup_rows = np.sort(rng.choice(valid_rows, n_dup, replace=False)) if n_dup else np.zeros(0, np.int64)
    lo, hi = dup_delay_s or (config.duplicate_delay_min_s, config.duplicate_delay_max_s)
    dup_deliver = deliver[dup_rows] + rng.uniform(lo * 1000, hi * 1000, n_dup).astype(np.int64)
    dup_key = dup_deliver + (rng.integers(0, window_ms + 1, n_dup) if window_ms else 0)

    # ---- labels: chargebacks for fraud, reviews for a sample of legitimate events -------------------
    fraud = valid & (recs.scenario > 0)
    review = valid & (recs.scenario == 0) & (rng.random(n) < config.label_review_rate)
    chargeback = np.clip(rng.lognormal(np.log(config.chargeback_median_days * DAY_MS),
                                       config.chargeback_sigma, n), HOUR_MS, 30 * DAY_MS)
    reviewed = np.clip(rng.lognormal(np.log(config.review_median_hours * HOUR_MS), 0.7, n),
                       HOUR_MS, 2 * DAY_MS)
    delay = np.where(fraud, chargeback, reviewed).astype(np.int64)
    label_rows = np.flatnonzero(fraud | review)
    reported = recs.t_ms[label_rows] + delay[label_rows]
    by_time = np.argsort(reported, kind="stable")
    label_rows, reported = label_rows[by_time], reported[by_time]
    label_sc = recs.scenario[label_rows]
    label_text = writer.label_lines(eid[label_rows], label_sc, writer.iso_times(reported),
                                    scenarios.SCENARIO_NAMES)

    return Simulation(
        start_ms=start_ms, end_ms=end_ms, records=recs, valid=valid, malformed_kind=kind, late=late,
        event_id=eid, lines=lines, deliver_ms=deliver, order_key=order_key, dup_rows=dup_rows,
        dup_deliver_ms=dup_deliver, dup_key=dup_key, label_rows=label_rows, label_scenario=label_sc,
        label_reported_ms=reported, label_lines=label_text,
    )
