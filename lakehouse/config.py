"""One frozen Settings object, read from environment variables with defaults.

Every path the project uses is derived here from a single data root (``LAKEHOUSE_DATA``), so the
stream, the backfill, the CLI, the tests and the Airflow DAG all agree on where things live. Nothing
else in the package hard-codes a path or a DSN.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Mapping

#: Delta tables, by logical name -> (layer, folder). Paths are ``<data>/delta/<layer>/<folder>``.
TABLES: dict[str, tuple[str, str]] = {
    "bronze_events": ("bronze", "events"),
    "bronze_labels": ("bronze", "labels"),
    "silver_transactions": ("silver", "transactions"),
    "silver_labels": ("silver", "labels"),
    "silver_quarantine": ("silver", "quarantine"),
    "silver_dq_batches": ("silver", "dq_batches"),
    "gold_transaction_features": ("gold", "transaction_features"),
    "gold_user_features_5m": ("gold", "user_features_5m"),
    "gold_merchant_risk_daily": ("gold", "merchant_risk_daily"),
    "gold_country_risk_daily": ("gold", "country_risk_daily"),
    "gold_too_late_events": ("gold", "too_late_events"),
    "risk_scores": ("gold", "risk_scores"),
}

#: Streaming queries, each with its own checkpoint folder under ``<data>/checkpoints``.
QUERIES: tuple[str, ...] = ("events", "labels")


def _project_root() -> Path | None:
    """The source checkout this package runs from, if any (holds pyproject.toml)."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").exists() else None


def _default_cache() -> Path:
    root = _project_root()
    return (root / ".cache") if root else Path.home() / ".cache" / "lakehouse"


def _env_int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer; unset it or give a whole number") from None
    if value < minimum:
        raise ValueError(f"{name}={raw!r} is below {minimum}; unset it (default {default}) or give {minimum} or more")
    return value


def _env_float(env: Mapping[str, str], name: str, default: float, above_zero: bool = False) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number; unset it or give a number") from None
    if not (math.isfinite(value) and (value > 0 if above_zero else value >= 0)):
        raise ValueError(f"{name}={raw!r} is out of range; unset it (default {default:g}) or give a finite number "
                         f"{'above 0' if above_zero else 'of 0 or more'}")
    return value


def _env_flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={raw!r} is not a yes/no flag; use 1 or 0")


@dataclass(frozen=True)
class Settings:
    """Resolved configuration. Build it with :meth:`from_env`; derive variants with :meth:`with_data_root`."""

    data_root: Path
    cache_dir: Path
    pg_dsn: str | None = None
    pg_schema: str = "lakehouse"
    spark_master: str = "local[*]"
    shuffle_partitions: int = 4
    driver_memory: str = "4g"
    #: Streaming: how many inbox files one micro-batch takes at most, and the trigger interval.
    max_files_per_trigger: int = 400
    trigger_seconds: float = 2.0
    #: Expectations: how far in the future an event may be relative to its file's arrival, how old
    #: it may be, and the largest record (bytes of raw text) that is parsed at all.
    future_tolerance_minutes: int = 5
    max_event_age_days: int = 365
    max_record_bytes: int = 100_000
    #: Silver: a re-delivered event (same event_id) is recognised among the events dated up to this
    #: many days either side of its own date, so a re-delivery whose event_time was corrected across
    #: midnight is a duplicate, not a second row. The silver MERGE reads those dates' event ids.
    redelivery_days: int = 1
    #: Gold: lateness accepted by the five-minute windows.
    allowed_lateness_minutes: int = 10
    #: Gold in the stream: the daily merchant and country risk is rewritten at most this often
    #: (seconds; 0 = every micro-batch), and when the stream stops or idles past it.
    risk_refresh_seconds: float = 300.0
    #: Gold features: computed in the driver (numpy over the look-back collected as Arrow) while the
    #: look-back holds at most this many rows, else in Spark; 0 = always in Spark. Lower it for a
    #: small driver (a row takes about 100 bytes there).
    features_driver_max_rows: int = 3_000_000
    #: Whether the stream keeps gold up to date per micro-batch (else only `lakehouse backfill` does).
    stream_gold: bool = True
    #: Whether the stream scores each new transaction with the champion model (needs stream_gold).
    stream_scoring: bool = True
    #: Whether `lakehouse stream --mirror` runs the express lane beside the live stream: provisional
    #: features in Postgres a moment after a file lands, replaced by gold's (lakehouse.express).
    express: bool = True
    #: Whether Spark sessions started from Python map the class-data sharing archive of
    #: ``<cache_dir>/cds`` (lakehouse.spark), and ``python -m lakehouse.spark`` makes one.
    class_data_sharing: bool = True
    #: Extra options for the driver JVM of sessions started from Python (shell-quoted, as
    #: ``spark.driver.extraJavaOptions`` takes them); under spark-submit, ``--driver-java-options``.
    java_options: str = ""
    mlflow_tracking_uri: str = ""

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        data_root = Path(env.get("LAKEHOUSE_DATA") or "./data").expanduser().resolve()
        cache_dir = Path(env.get("LAKEHOUSE_CACHE") or _default_cache()).expanduser().resolve()
        root = _project_root() or Path.cwd()
        mlflow_uri = env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
        return cls(
            data_root=data_root,
            cache_dir=cache_dir,
            pg_dsn=env.get("LAKEHOUSE_PG_DSN") or None,
            pg_schema=env.get("LAKEHOUSE_PG_SCHEMA") or "lakehouse",
            spark_master=env.get("LAKEHOUSE_SPARK_MASTER") or "local[*]",
            shuffle_partitions=_env_int(env, "LAKEHOUSE_SHUFFLE_PARTITIONS", 4, minimum=1),
            driver_memory=env.get("LAKEHOUSE_DRIVER_MEMORY") or "4g",
            max_files_per_trigger=_env_int(env, "LAKEHOUSE_MAX_FILES_PER_TRIGGER", 400, minimum=1),
            trigger_seconds=_env_float(env, "LAKEHOUSE_TRIGGER_SECONDS", 2.0, above_zero=True),
            future_tolerance_minutes=_env_int(env, "LAKEHOUSE_FUTURE_TOLERANCE_MINUTES", 5),
            max_event_age_days=_env_int(env, "LAKEHOUSE_MAX_EVENT_AGE_DAYS", 365, minimum=1),
            max_record_bytes=_env_int(env, "LAKEHOUSE_MAX_RECORD_BYTES", 100_000, minimum=1),
            redelivery_days=_env_int(env, "LAKEHOUSE_REDELIVERY_DAYS", 1),
            allowed_lateness_minutes=_env_int(env, "LAKEHOUSE_ALLOWED_LATENESS_MINUTES", 10),
            risk_refresh_seconds=_env_float(env, "LAKEHOUSE_RISK_REFRESH_SECONDS", 300.0),
            features_driver_max_rows=_env_int(env, "LAKEHOUSE_FEATURES_DRIVER_MAX_ROWS", 3_000_000),
            stream_gold=_env_flag(env, "LAKEHOUSE_STREAM_GOLD", True),
            stream_scoring=_env_flag(env, "LAKEHOUSE_STREAM_SCORING", True),
            express=_env_flag(env, "LAKEHOUSE_EXPRESS", True),
            class_data_sharing=_env_flag(env, "LAKEHOUSE_CDS", True),
            java_options=env.get("LAKEHOUSE_JAVA_OPTIONS") or "",
            mlflow_tracking_uri=mlflow_uri,
        )

    def with_data_root(self, data_root: Path | str) -> "Settings":
        return replace(self, data_root=Path(data_root).expanduser().resolve())

    def replace(self, **changes) -> "Settings":
        return replace(self, **changes)

    # ---- derived paths ------------------------------------------------------------------------
    @property
    def inbox_dir(self) -> Path:
        return self.data_root / "inbox"

    @property
    def events_inbox(self) -> Path:
        return self.inbox_dir / "events"

    @property
    def labels_inbox(self) -> Path:
        return self.inbox_dir / "labels"

    @property
    def delta_root(self) -> Path:
        return self.data_root / "delta"

    @property
    def checkpoint_root(self) -> Path:
        return self.data_root / "checkpoints"

    @property
    def staging_dir(self) -> Path:
        """Where rows computed in the driver wait, as Parquet, for the Spark write that reads them."""
        return self.data_root / "staging"

    @property
    def pg_data_dir(self) -> Path:
        return self.data_root / "postgres"

    @property
    def ivy_dir(self) -> Path:
        """Where Spark's resolver caches the Delta jars, so later runs start offline."""
        return self.cache_dir / "ivy"

    def table_path(self, name: str) -> Path:
        try:
            layer, folder = TABLES[name]
        except KeyError:
            raise KeyError(f"unknown table {name!r}; known: {', '.join(TABLES)}") from None
        return self.delta_root / layer / folder

    def checkpoint(self, query: str) -> Path:
        if query not in QUERIES:
            raise KeyError(f"unknown query {query!r}; known: {', '.join(QUERIES)}")
        return self.checkpoint_root / query

    def table_paths(self) -> dict[str, str]:
        return {name: str(self.table_path(name)) for name in TABLES}

    def as_dict(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = str(value) if isinstance(value, Path) else value
        out.update(
            events_inbox=str(self.events_inbox),
            labels_inbox=str(self.labels_inbox),
            delta_root=str(self.delta_root),
            checkpoint_root=str(self.checkpoint_root),
            pg_data_dir=str(self.pg_data_dir),
            ivy_dir=str(self.ivy_dir),
            checkpoints={q: str(self.checkpoint(q)) for q in QUERIES},
            tables=self.table_paths(),
        )
        return out
