"""Every knob of the synthetic feed, in one frozen dataclass with defaults."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone

from lakehouse.reference import FRAUD_SCENARIOS


def _utc(ts: datetime) -> datetime:
    return ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts.astimezone(timezone.utc)


@dataclass(frozen=True)
class GeneratorConfig:
    """Configuration of the generator. Same config (including ``start``) => byte-identical files.

    Rates of the fraud scenarios are shares of all valid events; rates of the stream defects are
    shares of the valid events too (``malformed_rate`` adds that many extra, invalid lines).
    """

    seed: int = 42
    n_users: int = 2000
    n_merchants: int = 300
    #: Simulated span. The simulation runs over [start, start + days).
    days: float = 3.0
    #: Simulation start (UTC). None => today 00:00 UTC minus ``days`` (so it ends today 00:00 UTC).
    start: datetime | None = None
    #: If set, exactly this many distinct valid events instead of the days-driven volume.
    n_events: int | None = None

    # ---- fraud scenarios (share of valid events) --------------------------------------------
    card_testing_rate: float = 0.003
    account_takeover_rate: float = 0.002
    compromised_merchant_rate: float = 0.003
    high_amount_rate: float = 0.001
    #: Share of a compromised merchant's transactions in the compromise period that are fraud.
    compromised_share: float = 0.3

    # ---- stream defects -----------------------------------------------------------------------
    duplicate_rate: float = 0.02
    late_rate: float = 0.01
    malformed_rate: float = 0.005
    #: Records within a file are ordered by delivery time plus a uniform jitter of this many seconds.
    out_of_order_window_s: float = 120.0
    #: A late event arrives this many minutes after its event_time (uniform in the range).
    late_min_minutes: float = 15.0
    late_max_minutes: float = 360.0
    #: A re-delivery arrives this many seconds after the first delivery (and always in a later file).
    duplicate_delay_min_s: float = 60.0
    duplicate_delay_max_s: float = 3 * 3600.0

    # ---- files --------------------------------------------------------------------------------
    #: Most original lines per file (re-deliveries may add a few more).
    file_events: int = 5000
    #: A new file at least every this many minutes of simulated delivery time (None: count only).
    file_minutes: float | None = 60.0

    # ---- labels -------------------------------------------------------------------------------
    #: Share of legitimate events that get a reviewed label (is_fraud=false, scenario "none").
    label_review_rate: float = 0.002
    #: Chargeback delay: lognormal with this median (days) and sigma, capped at 30 days.
    chargeback_median_days: float = 4.0
    chargeback_sigma: float = 0.7
    #: Review delay: lognormal with this median (hours), within 1 hour .. 2 days.
    review_median_hours: float = 10.0

    # ---- realism --------------------------------------------------------------------------------
    #: Share of records whose event_time is written with the merchant country's UTC offset
    #: (same instant) instead of Z.
    offset_time_rate: float = 0.1
    #: Share of payments made in the card holder's home currency instead of the merchant's.
    dcc_rate: float = 0.03
    #: Share of a user's payments at one of their favourite merchants.
    favourite_share: float = 0.88
    #: Share of a user's favourite merchants in their home country.
    home_favourite_share: float = 0.85

    def __post_init__(self) -> None:
        if self.start is not None:
            if not isinstance(self.start, datetime):
                raise TypeError(f"start must be a datetime, got {type(self.start).__name__}")
            object.__setattr__(self, "start", _utc(self.start))
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.n_users < 1 or self.n_merchants < 1:
            raise ValueError("n_users and n_merchants must be at least 1")
        if not self.days > 0:
            raise ValueError(f"days must be positive, got {self.days}")
        if self.n_events is not None and self.n_events < 0:
            raise ValueError(f"n_events must be >= 0, got {self.n_events}")
        if self.file_events < 1:
            raise ValueError(f"file_events must be >= 1, got {self.file_events}")
        if self.file_minutes is not None and not self.file_minutes > 0:
            raise ValueError(f"file_minutes must be positive or None, got {self.file_minutes}")
        for f in fields(self):
            if f.name.endswith(("_rate", "_share")):
                value = getattr(self, f.name)
                if not 0.0 <= value <= 1.0:
                    raise ValueError(f"{f.name} must be within [0, 1], got {value}")
        if sum(self.fraud_rates.values()) > 0.5:
            raise ValueError("the fraud scenario rates add up to more than 0.5")
        if not 0 < self.late_min_minutes <= self.late_max_minutes:
            raise ValueError("need 0 < late_min_minutes <= late_max_minutes")
        if not 0 < self.duplicate_delay_min_s <= self.duplicate_delay_max_s:
            raise ValueError("need 0 < duplicate_delay_min_s <= duplicate_delay_max_s")
        if self.out_of_order_window_s < 0:
            raise ValueError("out_of_order_window_s must be >= 0")

    @property
    def fraud_rates(self) -> dict[str, float]:
        """Scenario name -> share of valid events, in FRAUD_SCENARIOS order."""
        return {name: float(getattr(self, f"{name}_rate")) for name in FRAUD_SCENARIOS}

    def resolved_start(self, now: datetime | None = None) -> datetime:
        """The simulation start: ``start``, or today 00:00 UTC minus ``days``."""
        if self.start is not None:
            return self.start
        now = _utc(now) if now is not None else datetime.now(timezone.utc)
        midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return midnight - timedelta(days=self.days)
