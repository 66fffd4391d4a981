"""Backlog mode: simulate a past period and write it to the inboxes as the feed would have delivered it.

Event files group lines by delivery (arrival) time: a new file every ``file_minutes`` of simulated
time or every ``file_events`` original lines, whichever comes first. Names sort in delivery order:
``events-<YYYYMMDDTHHMMSS>-<seed>-<seq>.jsonl`` (the time is when the file closed). A re-delivery
always lands in a later file than the first delivery. Label files group labels by reported date,
``labels-<YYYYMMDDTHHMMSS>-<seed>-<seq>.jsonl``; only labels reported by the simulation end are
written, the others are counted as withheld.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from lakehouse.generator import writer
from lakehouse.generator.config import GeneratorConfig
from lakehouse.generator.populations import DAY_MS, MINUTE_MS, build_populations
from lakehouse.generator.simulation import Simulation, simulate

Progress = Callable[[int, int], None]


def _ms(ts: datetime) -> int:
    return int(round(ts.timestamp() * 1000))


def simulation_window(config: GeneratorConfig, now: datetime | None = None) -> tuple[int, int]:
    start = config.resolved_start(now)
    start_ms = _ms(start)
    return start_ms, start_ms + int(round(config.days * DAY_MS))


def run_simulation(config: GeneratorConfig, now: datetime | None = None) -> Simulation:
    """The backlog simulation for ``config`` (deterministic given the resolved start)."""
    start_ms, end_ms = simulation_window(config, now)
    pops = build_populations(config)
    rng = np.random.default_rng([config.seed, 1])
    ns = writer.namespace(config.seed, start_ms, 0)
    return simulate(config, pops, start_ms, end_ms, n_events=config.n_events, rng=rng, ns=ns)


def _runs(n: int, group: np.ndarray, size: int) -> np.ndarray:
    """File number of each of ``n`` sorted items: a new file when ``group`` changes or every ``size``."""
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.concatenate([[True], group[1:] != group[:-1]])
    run_first = np.flatnonzero(starts)[np.cumsum(starts) - 1]
    pos = np.arange(n) - run_first
    return np.cumsum(pos % size == 0) - 1


def plan_event_files(sim: Simulation, config: GeneratorConfig):
    """(line rows in write order, file boundaries, file close times).

    Rows index ``concat(originals, re-deliveries)``."""
    n = len(sim.deliver_ms)
    first = np.argsort(sim.deliver_ms, kind="stable")
    d_sorted = sim.deliver_ms[first]
    if config.file_minutes:
        bucket = np.floor_divide(d_sorted - sim.start_ms, int(config.file_minutes * MINUTE_MS))
    else:
        bucket = np.zeros(n, dtype=np.int64)
    file_sorted = _runs(n, bucket, config.file_events)
    n_files = int(file_sorted[-1]) + 1 if n else 0
    last_of_file = np.concatenate([np.flatnonzero(np.diff(file_sorted)), [n - 1]]) if n else np.zeros(0, int)
    file_end = d_sorted[last_of_file]
    file_of = np.empty(n, dtype=np.int64)
    file_of[first] = file_sorted

    dup_file = np.searchsorted(file_end, sim.dup_deliver_ms, side="left")
    dup_file = np.maximum(dup_file, file_of[sim.dup_rows] + 1)
    overflow = dup_file >= n_files
    close = list(file_end.tolist())
    if overflow.any():  # re-deliveries after the last file: one more file
        dup_file[overflow] = n_files
        close.append(max(int(sim.dup_deliver_ms[overflow].max()), close[-1] if close else 0))
        n_files += 1

    files = np.concatenate([file_of, dup_file])
    keys = np.concatenate([sim.order_key, sim.dup_key])
    rows = np.lexsort((np.arange(len(files)), keys, files))
    bounds = np.searchsorted(files[rows], np.arange(n_files + 1), side="left")
    return rows, bounds, close


def generate_backlog(events_dir, labels_dir, config: GeneratorConfig, progress: Progress | None = None) -> dict:
    """Write a simulated backlog to ``events_dir`` and ``labels_dir``; return the summary."""
    t_start = time.monotonic()
    events_dir, labels_dir = Path(events_dir), Path(labels_dir)
    sim = run_simulation(config)
    summary = write_simulation(sim, events_dir, labels_dir, config, progress)
    summary["elapsed_s"] = round(time.monotonic() - t_start, 3)
    return summary


def write_simulation(sim: Simulation, events_dir: Path, labels_dir: Path, config: GeneratorConfig,
                     progress: Progress | None = None) -> dict:
    events_dir.mkdir(parents=True, exist_ok=True)
    labels_dir.mkdir(parents=True, exist_ok=True)
    rows, bounds, close = plan_event_files(sim, config)
    all_lines = np.concatenate([sim.lines, sim.lines[sim.dup_rows]])
    text = all_lines[rows].tolist()

    label_ok = sim.label_reported_ms <= sim.end_ms
    label_text = sim.label_lines[label_ok].tolist()
    label_day = sim.label_reported_ms[label_ok] // DAY_MS
    label_file = _runs(len(label_text), label_day, config.file_events)
    n_label_files = int(label_file[-1]) + 1 if len(label_file) else 0
    label_bounds = np.searchsorted(label_file, np.arange(n_label_files + 1), side="left")
    reported_ok = sim.label_reported_ms[label_ok]

    total = len(text) + len(label_text)
    done = 0
    if progress:
        progress(0, total)
    for f in range(len(bounds) - 1):
        a, b = int(bounds[f]), int(bounds[f + 1])
        name = f"events-{writer.stamp(close[f])}-{config.seed}-{f:06d}.jsonl"
        writer.write_atomic(events_dir, name, writer.jsonl(text[a:b]))
        done += b - a
        if progress:
            progress(done, total)
    for f in range(n_label_files):
        a, b = int(label_bounds[f]), int(label_bounds[f + 1])
        name = f"labels-{writer.stamp(reported_ok[b - 1])}-{config.seed}-{f:06d}.jsonl"
        writer.write_atomic(labels_dir, name, writer.jsonl(label_text[a:b]))
        done += b - a
        if progress:
            progress(done, total)
    if len(bounds) > 1:
        writer.fsync_dir(events_dir)
    if n_label_files:
        writer.fsync_dir(labels_dir)

    fraud_by = sim.fraud_by_scenario()
    malformed_by = sim.malformed_by_kind()
    return {
        "mode": "backlog",
        "seed": config.seed,
        "start": writer.iso_utc(sim.start_ms),
        "end": writer.iso_utc(sim.end_ms),
        "events": sim.n_valid,
        "lines_written": len(text),
        "duplicates": int(len(sim.dup_rows)),
        "malformed": int(sum(malformed_by.values())),
        "malformed_by_kind": malformed_by,
        "late": int(sim.late.sum()),
        "fraud_events": int(sum(fraud_by.values())),
        "fraud_by_scenario": fraud_by,
        "labels_written": len(label_text),
        "labels_withheld": int((~label_ok).sum()),
        "files": len(bounds) - 1,
        "label_files": n_label_files,
        "events_dir": str(events_dir),
        "labels_dir": str(labels_dir),
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }
