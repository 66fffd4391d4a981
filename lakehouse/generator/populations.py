"""Card holders and merchants, and the normal (legitimate) traffic between them.

Everything is vectorised with numpy: a user or merchant is a row index into parallel arrays.
Countries and currencies are small integer codes into :data:`COUNTRIES` and :data:`CURRENCIES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from lakehouse.reference import COUNTRY_CURRENCY, FX_TO_USD

if TYPE_CHECKING:
    import pandas as pd

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
MINUTE_MS = 60_000

#: Countries the generator populates (codes index into this tuple).
COUNTRIES: tuple[str, ...] = tuple(COUNTRY_CURRENCY)
#: Currencies (codes index into this tuple).
CURRENCIES: tuple[str, ...] = tuple(sorted(FX_TO_USD))
#: Currency code each country pays in.
COUNTRY_CURRENCY_CODE = np.array([CURRENCIES.index(COUNTRY_CURRENCY[c]) for c in COUNTRIES], dtype=np.int16)
#: USD per unit, by currency code.
FX = np.array([FX_TO_USD[c] for c in CURRENCIES], dtype=np.float64)
#: Minor-unit decimals by currency code (JPY has none).
ZERO_DECIMAL = frozenset({"JPY"})
DECIMALS = np.array([0 if c in ZERO_DECIMAL else 2 for c in CURRENCIES], dtype=np.int8)

#: Standard-time UTC offset of each populated country, in minutes (no DST: "local-ish").
_UTC_OFFSET_MIN = {
    "US": -300, "CA": -300, "MX": -360, "BR": -180, "GB": 0, "IE": 0, "FR": 60, "DE": 60, "ES": 60,
    "IT": 60, "NL": 60, "BE": 60, "PT": 0, "AT": 60, "CH": 60, "SE": 60, "NO": 60, "DK": 60,
    "PL": 60, "JP": 540, "AU": 600, "SG": 480, "IN": 330, "ZA": 120,
}
UTC_OFFSET_MIN = np.array([_UTC_OFFSET_MIN[c] for c in COUNTRIES], dtype=np.int64)

#: Relative share of card holders (and merchants) per country: skewed, US-heavy.
_HOME_WEIGHT = {
    "US": 30, "GB": 8, "DE": 8, "FR": 7, "ES": 4, "IT": 4, "NL": 3, "BE": 1.5, "PT": 1, "AT": 1,
    "IE": 1, "CH": 1.5, "SE": 1.5, "NO": 1, "DK": 1, "PL": 2, "CA": 4, "MX": 3, "BR": 4, "JP": 5,
    "AU": 3, "SG": 1, "IN": 4, "ZA": 1.5,
}
HOME_WEIGHT = np.array([_HOME_WEIGHT[c] for c in COUNTRIES], dtype=np.float64)
HOME_WEIGHT /= HOME_WEIGHT.sum()

#: Merchant categories: (share of merchants, amount multiplier, base risk).
_CATEGORIES: dict[str, tuple[float, float, float]] = {
    "grocery": (0.20, 1.0, 0.2),
    "fuel": (0.09, 1.3, 0.3),
    "restaurants": (0.17, 0.9, 0.3),
    "clothing": (0.08, 2.0, 0.5),
    "electronics": (0.06, 4.0, 1.5),
    "travel": (0.05, 6.0, 1.5),
    "online_retail": (0.12, 1.5, 1.2),
    "gaming": (0.05, 0.6, 2.0),
    "pharmacy": (0.06, 0.8, 0.2),
    "subscriptions": (0.05, 0.5, 0.8),
    "jewelry": (0.02, 8.0, 2.5),
    "entertainment": (0.05, 1.2, 0.6),
}
CATEGORIES: tuple[str, ...] = tuple(_CATEGORIES)
CATEGORY_SHARE = np.array([v[0] for v in _CATEGORIES.values()])
CATEGORY_SHARE /= CATEGORY_SHARE.sum()
CATEGORY_AMOUNT = np.array([v[1] for v in _CATEGORIES.values()])
CATEGORY_RISK = np.array([v[2] for v in _CATEGORIES.values()])
#: Categories card testers favour (card-not-present, instant authorisation).
ONLINE_CATEGORIES = np.array([c in ("online_retail", "gaming", "subscriptions", "electronics") for c in CATEGORIES])
#: Categories worth a large fraudulent purchase (resellable goods, tickets).
HIGH_VALUE_CATEGORIES = np.array([c in ("electronics", "travel", "jewelry", "online_retail") for c in CATEGORIES])

MAX_FAVOURITES = 10


@dataclass(frozen=True)
class Populations:
    """Users and merchants as parallel arrays (row index = id number)."""

    # users
    home: np.ndarray            # country code
    log_typical_usd: np.ndarray  # mean of log(amount in USD)
    amount_sigma: np.ndarray    # spread of log(amount)
    tx_per_day: np.ndarray
    peak_hour: np.ndarray       # local hour of most activity
    hour_spread: np.ndarray     # hours
    favourites: np.ndarray      # (n_users, MAX_FAVOURITES) merchant rows; first n_favourites valid
    n_favourites: np.ndarray
    # merchants
    m_country: np.ndarray
    m_category: np.ndarray
    m_risk: np.ndarray
    m_popularity: np.ndarray

    @property
    def n_users(self) -> int:
        return len(self.home)

    @property
    def n_merchants(self) -> int:
        return len(self.m_country)

    def users_frame(self) -> "pd.DataFrame":
        """One row per user: user_id, home_country, typical amount, tx/day, active hours, favourites."""
        import pandas as pd

        return pd.DataFrame({
            "user_id": user_ids(np.arange(self.n_users)),
            "home_country": np.array(COUNTRIES)[self.home],
            "typical_amount_usd": np.exp(self.log_typical_usd).round(2),
            "amount_sigma": self.amount_sigma,
            "tx_per_day": self.tx_per_day,
            "peak_hour": self.peak_hour,
            "hour_spread": self.hour_spread,
            "favourite_merchants": [list(merchant_ids(f[:k])) for f, k in zip(self.favourites, self.n_favourites)],
        })

    def merchants_frame(self) -> "pd.DataFrame":
        """One row per merchant: merchant_id, country, category, base_risk, popularity."""
        import pandas as pd

        return pd.DataFrame({
            "merchant_id": merchant_ids(np.arange(self.n_merchants)),
            "country": np.array(COUNTRIES)[self.m_country],
            "category": np.array(CATEGORIES)[self.m_category],
            "base_risk": self.m_risk.round(4),
            "popularity": self.m_popularity.round(4),
        })


def user_ids(rows: np.ndarray) -> np.ndarray:
    return np.array([f"u{int(r):07d}" for r in rows], dtype=object)


def merchant_ids(rows: np.ndarray) -> np.ndarray:
    return np.array([f"m{int(r):05d}" for r in rows], dtype=object)


class WeightedPicker:
    """Draw merchants with given weights, globally or within one country, vectorised."""

    def __init__(self, weights: np.ndarray, m_country: np.ndarray):
        self.order = np.argsort(m_country, kind="stable")
        w = np.asarray(weights, dtype=np.float64)[self.order]
        self.cum = np.cumsum(w)
        self.total = float(self.cum[-1]) if len(self.cum) else 0.0
        sorted_country = m_country[self.order]
        codes = np.arange(len(COUNTRIES))
        first = np.searchsorted(sorted_country, codes, side="left")
        last = np.searchsorted(sorted_country, codes, side="right")
        cum0 = np.concatenate([[0.0], self.cum])
        self.lo = cum0[first]
        self.hi = cum0[last]

    def _at(self, u: np.ndarray) -> np.ndarray:
        idx = np.searchsorted(self.cum, u, side="right")
        return self.order[np.minimum(idx, len(self.order) - 1)]

    def global_pick(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self._at(rng.random(n) * self.total)

    def in_country(self, rng: np.random.Generator, country: np.ndarray) -> np.ndarray:
        """A merchant of each given country (any merchant where the country has none)."""
        lo, hi = self.lo[country], self.hi[country]
        u = rng.random(len(country))
        out = self._at(lo + u * (hi - lo))
        empty = hi <= lo
        if empty.any():
            out[empty] = self.global_pick(rng, int(empty.sum()))
        return out


def build_populations(config) -> Populations:
    """Users and merchants for ``config`` (depends only on seed, n_users and n_merchants)."""
    rng = np.random.default_rng(config.seed)
    n_m, n_u = config.n_merchants, config.n_users

    # merchants
    m_country = rng.choice(len(COUNTRIES), size=n_m, p=HOME_WEIGHT).astype(np.int16)
    m_category = rng.choice(len(CATEGORIES), size=n_m, p=CATEGORY_SHARE).astype(np.int16)
    m_risk = np.clip(CATEGORY_RISK[m_category] * rng.lognormal(0.0, 0.4, n_m), 0.02, 10.0)
    m_popularity = rng.lognormal(0.0, 1.0, n_m)

    # users
    home = rng.choice(len(COUNTRIES), size=n_u, p=HOME_WEIGHT).astype(np.int16)
    log_typical = np.log(np.clip(rng.lognormal(np.log(30.0), 0.55, n_u), 3.0, 600.0))
    sigma = rng.uniform(0.35, 0.9, n_u)
    tx_per_day = np.clip(rng.gamma(2.0, 1.5, n_u), 0.2, 25.0)
    peak = np.mod(rng.normal(14.5, 3.0, n_u), 24.0)
    spread = rng.uniform(2.0, 4.5, n_u)

    picker = WeightedPicker(m_popularity, m_country)
    n_fav = rng.integers(3, MAX_FAVOURITES + 1, n_u)
    slots = n_u * MAX_FAVOURITES
    slot_home = np.repeat(home, MAX_FAVOURITES)
    at_home = rng.random(slots) < config.home_favourite_share
    fav = np.empty(slots, dtype=np.int64)
    fav[at_home] = picker.in_country(rng, slot_home[at_home])
    fav[~at_home] = picker.global_pick(rng, int((~at_home).sum()))
    return Populations(
        home=home, log_typical_usd=log_typical, amount_sigma=sigma, tx_per_day=tx_per_day,
        peak_hour=peak, hour_spread=spread, favourites=fav.reshape(n_u, MAX_FAVOURITES).astype(np.int32),
        n_favourites=n_fav, m_country=m_country, m_category=m_category, m_risk=m_risk,
        m_popularity=m_popularity,
    )


@dataclass
class Block:
    """A block of generated payment records (parallel arrays)."""

    user: np.ndarray
    merchant: np.ndarray
    usd: np.ndarray
    currency: np.ndarray
    country: np.ndarray
    t_ms: np.ndarray
    scenario: np.ndarray  # 0 = legitimate, i+1 = FRAUD_SCENARIOS[i]

    def __len__(self) -> int:
        return len(self.user)

    @classmethod
    def concat(cls, blocks: list["Block"]) -> "Block":
        return cls(**{k: np.concatenate([getattr(b, k) for b in blocks]) for k in cls.__dataclass_fields__})

    def take(self, idx: np.ndarray) -> "Block":
        return Block(**{k: getattr(self, k)[idx] for k in self.__dataclass_fields__})


def make_block(user, merchant, usd, currency, country, t_ms, scenario: int) -> Block:
    n = len(user)
    return Block(
        user=np.asarray(user, dtype=np.int32), merchant=np.asarray(merchant, dtype=np.int32),
        usd=np.asarray(usd, dtype=np.float64), currency=np.asarray(currency, dtype=np.int16),
        country=np.asarray(country, dtype=np.int16), t_ms=np.asarray(t_ms, dtype=np.int64),
        scenario=np.full(n, scenario, dtype=np.int8),
    )


def wrap_time(t_ms: np.ndarray, start_ms: int, end_ms: int) -> np.ndarray:
    """Fold times into [start, end)."""
    return start_ms + np.mod(t_ms - start_ms, end_ms - start_ms)


def local_time(rng, pops: Populations, user: np.ndarray, local_hour: np.ndarray, start_ms: int,
               end_ms: int) -> np.ndarray:
    """An instant in [start, end) at the given local hour of each user's home country, on a random day."""
    n = len(user)
    first_midnight = (start_ms // DAY_MS) * DAY_MS
    n_days = int(-(-(end_ms - first_midnight) // DAY_MS)) + 1
    day = rng.integers(0, n_days, n)
    t = first_midnight + day * DAY_MS + (local_hour * HOUR_MS).astype(np.int64) \
        - UTC_OFFSET_MIN[pops.home[user]] * MINUTE_MS
    return wrap_time(t, start_ms, end_ms)


def normal_traffic(rng: np.random.Generator, pops: Populations, config, n: int, start_ms: int,
                   end_ms: int) -> Block:
    """``n`` legitimate payments: users by their activity, times from their active hours, merchants
    mostly from their favourites, amounts from their profile."""
    p = pops.tx_per_day / pops.tx_per_day.sum()
    counts = rng.multinomial(n, p)
    user = np.repeat(np.arange(pops.n_users, dtype=np.int32), counts)

    hour = np.mod(pops.peak_hour[user] + pops.hour_spread[user] * rng.standard_normal(n), 24.0)
    t = local_time(rng, pops, user, hour, start_ms, end_ms)

    use_fav = rng.random(n) < config.favourite_share
    slot = np.floor(pops.n_favourites[user] * rng.random(n) ** 1.6).astype(np.int64)
    merchant = pops.favourites[user, slot].astype(np.int64)
    picker = WeightedPicker(pops.m_popularity, pops.m_country)
    n_other = int((~use_fav).sum())
    merchant[~use_fav] = picker.global_pick(rng, n_other)

    usd = np.exp(pops.log_typical_usd[user] + pops.amount_sigma[user] * rng.standard_normal(n))
    usd = np.clip(usd * CATEGORY_AMOUNT[pops.m_category[merchant]], 0.5, 20_000.0)
    country = pops.m_country[merchant]
    currency = COUNTRY_CURRENCY_CODE[country].copy()
    dcc = rng.random(n) < config.dcc_rate
    currency[dcc] = COUNTRY_CURRENCY_CODE[pops.home[user[dcc]]]
    return make_block(user, merchant, usd, currency, country, t, 0)


def to_minor_units(usd: np.ndarray, currency: np.ndarray) -> np.ndarray:
    """Amount in minor units of the currency (cents; yen), at least one unit."""
    local = usd / FX[currency]
    scale = np.where(DECIMALS[currency] == 0, 1.0, 100.0)
    return np.maximum(np.rint(local * scale), 1).astype(np.int64)
