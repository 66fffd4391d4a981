"""Labelled fraud scenarios, injected into (or carved out of) the normal traffic.

Scenario codes: 0 is legitimate, ``i + 1`` is ``FRAUD_SCENARIOS[i]``.
"""

from __future__ import annotations

import numpy as np

from lakehouse.generator.populations import (
    COUNTRIES,
    COUNTRY_CURRENCY_CODE,
    HIGH_VALUE_CATEGORIES,
    HOUR_MS,
    MINUTE_MS,
    ONLINE_CATEGORIES,
    Block,
    Populations,
    WeightedPicker,
    local_time,
    make_block,
)
from lakehouse.reference import FRAUD_SCENARIOS

SCENARIO_CODE = {name: i + 1 for i, name in enumerate(FRAUD_SCENARIOS)}
#: Scenario name by code (0 = "none": a reviewed legitimate event).
SCENARIO_NAMES: tuple[str, ...] = ("none", *FRAUD_SCENARIOS)

#: Card testing: burst sizes, amounts (USD equivalent) and the longest burst.
CARD_TEST_SIZE = (5, 20)
CARD_TEST_USD = (0.5, 5.0)
CARD_TEST_MAX_SPAN_MS = 10 * MINUTE_MS
#: Account takeover: payments per incident, multiple of the typical amount, local hours.
ATO_SIZE = (1, 4)
ATO_MULTIPLE = (5.0, 20.0)
ATO_HOURS = (1.0, 5.0)
#: Compromised merchant: length of the compromise period.
COMPROMISE_HOURS = (6.0, 48.0)


def _groups_until(rng: np.random.Generator, target: int, lo: int, hi: int) -> np.ndarray:
    """Group sizes in [lo, hi] drawn until they add up to at least ``target`` (empty for 0)."""
    if target <= 0:
        return np.zeros(0, dtype=np.int64)
    sizes = rng.integers(lo, hi + 1, size=target // lo + 1)
    k = int(np.searchsorted(np.cumsum(sizes), target, side="left")) + 1
    return sizes[:k]


def _currency_of(country: np.ndarray) -> np.ndarray:
    return COUNTRY_CURRENCY_CODE[country]


def card_testing(rng, pops: Populations, target: int, start_ms: int, end_ms: int) -> Block:
    """Bursts of 5-20 small payments from one user within minutes, at various (mostly online) merchants."""
    sizes = _groups_until(rng, target, *CARD_TEST_SIZE)
    n_bursts, n = len(sizes), int(sizes.sum())
    burst = np.repeat(np.arange(n_bursts), sizes)
    user = rng.integers(0, pops.n_users, n_bursts)[burst]
    latest = max(start_ms, end_ms - CARD_TEST_MAX_SPAN_MS)
    t0 = rng.integers(start_ms, latest + 1, n_bursts)
    gaps = 1000 + rng.exponential(20_000.0, n).astype(np.int64)
    first = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if n_bursts else np.zeros(0, dtype=np.int64)
    gaps[first] = 0
    offs = np.cumsum(gaps)
    offs -= np.repeat(offs[first], sizes)  # offset from the burst's first payment
    offs = np.minimum(offs, CARD_TEST_MAX_SPAN_MS - 1)
    t = np.minimum(t0[burst] + offs, end_ms - 1)
    weights = pops.m_popularity * pops.m_risk * np.where(ONLINE_CATEGORIES[pops.m_category], 4.0, 1.0)
    merchant = WeightedPicker(weights, pops.m_country).global_pick(rng, n)
    usd = rng.uniform(*CARD_TEST_USD, n)
    country = pops.m_country[merchant]
    return make_block(user, merchant, usd, _currency_of(country), country, t,
                      SCENARIO_CODE["card_testing"])


def account_takeover(rng, pops: Populations, target: int, start_ms: int, end_ms: int) -> Block:
    """A few payments 5-20x the user's typical amount, abroad, at 01:00-05:00 home time."""
    sizes = _groups_until(rng, target, *ATO_SIZE)
    n_inc, n = len(sizes), int(sizes.sum())
    inc = np.repeat(np.arange(n_inc), sizes)
    victims = rng.integers(0, pops.n_users, n_inc)
    user = victims[inc]
    home = pops.home[user]

    hour = rng.uniform(*ATO_HOURS, n_inc)
    t0 = local_time(rng, pops, victims, hour, start_ms, end_ms)
    first = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if n_inc else np.zeros(0, dtype=np.int64)
    gaps = 30_000 + rng.exponential(6 * MINUTE_MS, n).astype(np.int64)
    gaps[first] = 0
    offs = np.cumsum(gaps)
    offs -= np.repeat(offs[first], sizes)
    t = np.minimum(t0[inc] + offs, end_ms - 1)

    # A merchant abroad: draw, and redraw those that landed in the victim's home country.
    weights = pops.m_popularity * np.where(HIGH_VALUE_CATEGORIES[pops.m_category], 3.0, 1.0)
    picker = WeightedPicker(weights, pops.m_country)
    merchant = picker.global_pick(rng, n)
    for _ in range(20):
        again = pops.m_country[merchant] == home
        if not again.any():
            break
        merchant[again] = picker.global_pick(rng, int(again.sum()))
    country = pops.m_country[merchant].astype(np.int64)
    # Only if every merchant is in the home country: the payment still comes from abroad.
    stuck = country == home
    if stuck.any():
        shift = rng.integers(1, len(COUNTRIES), int(stuck.sum()))
        country[stuck] = (home[stuck] + shift) % len(COUNTRIES)

    usd = np.exp(pops.log_typical_usd[user]) * rng.uniform(*ATO_MULTIPLE, n)
    return make_block(user, merchant, usd, _currency_of(country), country, t,
                      SCENARIO_CODE["account_takeover"])


def high_amount(rng, pops: Populations, target: int, start_ms: int, end_ms: int) -> Block:
    """Single payments at very high amounts (a few thousand USD equivalent and more)."""
    n = max(int(target), 0)
    user = rng.integers(0, pops.n_users, n)
    weights = pops.m_popularity * np.where(HIGH_VALUE_CATEGORIES[pops.m_category], 5.0, 0.5)
    merchant = WeightedPicker(weights, pops.m_country).global_pick(rng, n)
    usd = np.clip(rng.lognormal(np.log(6000.0), 0.5, n), 1500.0, 40_000.0)
    t = rng.integers(start_ms, end_ms, n)
    country = pops.m_country[merchant]
    return make_block(user, merchant, usd, _currency_of(country), country, t,
                      SCENARIO_CODE["high_amount"])


def compromise_merchants(rng, pops: Populations, block: Block, target: int, share: float,
                         start_ms: int, end_ms: int) -> int:
    """Mark (in place) ``target`` legitimate payments of compromised merchants as fraud.

    Each incident picks a merchant (weighted by risk and traffic) and a period of hours to two
    days; ``share`` of its payments in that period are fraud. Returns how many were marked.
    """
    if target <= 0 or len(block) == 0 or share <= 0:
        return 0
    code = SCENARIO_CODE["compromised_merchant"]
    order = np.lexsort((block.t_ms, block.merchant))
    m_sorted = block.merchant[order]
    t_sorted = block.t_ms[order]
    m_lo = np.searchsorted(m_sorted, np.arange(pops.n_merchants), side="left")
    m_hi = np.searchsorted(m_sorted, np.arange(pops.n_merchants), side="right")
    traffic = (m_hi - m_lo).astype(np.float64)
    weights = traffic * pops.m_risk
    if weights.sum() <= 0:
        return 0
    cum = np.cumsum(weights)
    marked = 0
    span = end_ms - start_ms
    for _ in range(10 * pops.n_merchants + 100):
        if marked >= target:
            break
        m = int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))
        m = min(m, pops.n_merchants - 1)
        dur = int(min(rng.uniform(*COMPROMISE_HOURS) * HOUR_MS, span))
        p0 = int(rng.integers(start_ms, end_ms - dur + 1))
        lo = m_lo[m] + np.searchsorted(t_sorted[m_lo[m]:m_hi[m]], p0, side="left")
        hi = m_lo[m] + np.searchsorted(t_sorted[m_lo[m]:m_hi[m]], p0 + dur, side="left")
        rows = order[lo:hi]
        rows = rows[block.scenario[rows] == 0]
        if len(rows) == 0:
            continue
        pick = rows[rng.random(len(rows)) < share]
        pick = pick[: target - marked]
        block.scenario[pick] = code
        marked += len(pick)
    return marked
