"""Synthetic card-payment feed: events and fraud labels as JSON-lines files in the inboxes.

Public API::

    GeneratorConfig                      every knob, with defaults
    generate_backlog(events_dir, labels_dir, config, progress=None) -> summary dict
    run_live(events_dir, labels_dir, config, rate, duration_s, progress=None) -> summary dict
    build_populations(config)            the simulated users and merchants (for inspection and tests)

Files: ``events-<YYYYMMDDTHHMMSS>-<seed>-<seq>.jsonl`` (time the file closed, in delivery order) and
``labels-<YYYYMMDDTHHMMSS>-<seed>-<seq>.jsonl`` (one reported date per file), each written under a
hidden temporary name and renamed into place.

Ground truth never appears in an event: fraud is only visible through the labels, which arrive
later (chargebacks after days, reviews after hours).
"""

from lakehouse.generator.backlog import generate_backlog, run_simulation
from lakehouse.generator.config import GeneratorConfig
from lakehouse.generator.defects import MALFORMED_KINDS
from lakehouse.generator.live import run_live
from lakehouse.generator.populations import CATEGORIES, build_populations

SUMMARY_KEYS: tuple[str, ...] = (
    "events", "lines_written", "duplicates", "malformed", "malformed_by_kind", "late", "fraud_events",
    "fraud_by_scenario", "labels_written", "labels_withheld", "files", "label_files", "start", "end",
    "seed",
)

__all__ = [
    "CATEGORIES",
    "MALFORMED_KINDS",
    "SUMMARY_KEYS",
    "GeneratorConfig",
    "build_populations",
    "generate_backlog",
    "run_live",
    "run_simulation",
]
