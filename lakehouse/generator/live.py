"""Live mode: a feed in real time, one events file per second with event times around now.

Traffic is simulated ahead in short windows (the same simulation as the backlog, so fraud
scenarios and defects are the same) and each second the records whose delivery time has come are
written. Late events keep their delivery time and carry an older event_time; a re-delivery always
lands in a later file than the first delivery. Labels are written once their reported_at has
passed; those still in the future when the run ends are counted as withheld.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import numpy as np

from lakehouse.generator import writer
from lakehouse.generator.backlog import Progress
from lakehouse.generator.config import GeneratorConfig
from lakehouse.generator.defects import MALFORMED_KINDS
from lakehouse.generator.populations import build_populations
from lakehouse.generator.simulation import simulate
from lakehouse.reference import FRAUD_SCENARIOS

#: Re-deliveries in live mode come seconds, not hours, after the first delivery.
LIVE_DUP_DELAY_S = (2.0, 30.0)
#: Normal delivery lag in live mode: (mean, cap) in ms. Simulation starts one cap before the run,
#: so the first second already carries the full rate.
LIVE_LAG_MS = (800.0, 10_000)


class _Pool:
    """Everything simulated so far, as growing parallel arrays (global row numbers)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.deliver = np.zeros(0, np.int64)
        self.key = np.zeros(0, np.int64)
        self.valid = np.zeros(0, bool)
        self.kind = np.zeros(0, np.int8)
        self.late = np.zeros(0, bool)
        self.scenario = np.zeros(0, np.int8)
        self.released = np.zeros(0, np.int64)  # tick of first delivery; -1 not yet; -2 never
        self.dup_orig = np.zeros(0, np.int64)
        self.dup_deliver = np.zeros(0, np.int64)
        self.dup_key = np.zeros(0, np.int64)
        self.dup_released = np.zeros(0, bool)
        self.lab_orig = np.zeros(0, np.int64)
        self.lab_reported = np.zeros(0, np.int64)
        self.lab_lines: list[str] = []
        self.lab_written = np.zeros(0, bool)

    def add(self, sim, t0_ms: int) -> None:
        """Add a simulated window; records delivered before the run started are never written."""
        base = len(self.lines)
        cat = np.concatenate
        self.lines += sim.lines.tolist()
        self.deliver = cat([self.deliver, sim.deliver_ms])
        self.key = cat([self.key, sim.order_key])
        self.valid = cat([self.valid, sim.valid])
        self.kind = cat([self.kind, sim.malformed_kind])
        self.late = cat([self.late, sim.late])
        self.scenario = cat([self.scenario, sim.records.scenario])
        self.released = cat([self.released, np.where(sim.deliver_ms <= t0_ms, -2, -1)])
        self.dup_orig = cat([self.dup_orig, sim.dup_rows + base])
        self.dup_deliver = cat([self.dup_deliver, sim.dup_deliver_ms])
        self.dup_key = cat([self.dup_key, sim.dup_key])
        self.dup_released = cat([self.dup_released, np.zeros(len(sim.dup_rows), bool)])
        self.lab_orig = cat([self.lab_orig, sim.label_rows + base])
        self.lab_reported = cat([self.lab_reported, sim.label_reported_ms])
        self.lab_lines += sim.label_lines.tolist()
        self.lab_written = cat([self.lab_written, np.zeros(len(sim.label_rows), bool)])


def run_live(events_dir, labels_dir, config: GeneratorConfig, rate: float, duration_s: float,
             progress: Progress | None = None, *, clock: Callable[[], float] = time.time,
             sleep: Callable[[float], None] = time.sleep) -> dict:
    """Write about ``rate`` events per second for ``duration_s`` seconds, one file per second.

    ``clock`` (epoch seconds) and ``sleep`` can be replaced, e.g. to run without waiting in tests.
    """
    if not rate > 0:
        raise ValueError(f"rate must be positive, got {rate}")
    if not duration_s > 0:
        raise ValueError(f"duration_s must be positive, got {duration_s}")
    events_dir, labels_dir = Path(events_dir), Path(labels_dir)
    events_dir.mkdir(parents=True, exist_ok=True)
    labels_dir.mkdir(parents=True, exist_ok=True)
    pops = build_populations(config)
    rng = np.random.default_rng([config.seed, 2])
    t0 = clock()
    t0_ms = int(t0 * 1000)
    end_ms = t0_ms + int(duration_s * 1000)
    window_ms = int(max(10.0, min(60.0, 100_000 / rate)) * 1000)
    expected = int(round(rate * duration_s))

    pool = _Pool()
    next_chunk, chunk_no = t0_ms - LIVE_LAG_MS[1], 0
    files = label_files = lines_out = 0
    n_ticks = int(math.ceil(duration_s))
    if progress:
        progress(0, expected)
    interrupted = False
    last_ms = t0_ms
    try:
        for tick in range(1, n_ticks + 1):
            wait = t0 + min(tick, duration_s) - clock()
            if wait > 0:
                sleep(wait)
            now_ms = int(clock() * 1000)
            if tick == n_ticks:
                now_ms = min(now_ms, end_ms)
            while next_chunk <= now_ms:
                sim = simulate(config, pops, next_chunk, next_chunk + window_ms,
                               n_events=int(round(rate * window_ms / 1000)), rng=rng,
                               ns=writer.namespace(config.seed, t0_ms, chunk_no), backdate_late=True,
                               dup_delay_s=LIVE_DUP_DELAY_S, lag_ms=LIVE_LAG_MS)
                pool.add(sim, t0_ms)
                next_chunk += window_ms
                chunk_no += 1

            due = np.flatnonzero((pool.released == -1) & (pool.deliver <= now_ms))
            # a re-delivery only after a file holding the first delivery has been written
            due_dup = np.flatnonzero((~pool.dup_released) & (pool.dup_deliver <= now_ms)
                                     & (pool.released[pool.dup_orig] >= 0))
            rows = np.concatenate([due, pool.dup_orig[due_dup]])
            keys = np.concatenate([pool.key[due], pool.dup_key[due_dup]])
            if len(rows):
                text = [pool.lines[i] for i in rows[np.argsort(keys, kind="stable")]]
                name = f"events-{writer.stamp(now_ms)}-{config.seed}-{files:06d}.jsonl"
                writer.write_atomic(events_dir, name, writer.jsonl(text))
                # state changes only once the file is in place, so the summary matches the files
                pool.released[due] = tick
                pool.dup_released[due_dup] = True
                files += 1
                lines_out += len(text)

            lab_due = np.flatnonzero((~pool.lab_written) & (pool.lab_reported <= now_ms)
                                     & (pool.released[pool.lab_orig] >= 0))
            if len(lab_due):
                lab_due = lab_due[np.argsort(pool.lab_reported[lab_due], kind="stable")]
                name = f"labels-{writer.stamp(now_ms)}-{config.seed}-{label_files:06d}.jsonl"
                writer.write_atomic(labels_dir, name, writer.jsonl(pool.lab_lines[i] for i in lab_due))
                pool.lab_written[lab_due] = True
                label_files += 1
            last_ms = now_ms
            if progress:
                progress(lines_out, max(expected, lines_out))
    except KeyboardInterrupt:  # Ctrl-C ends a live run early; the summary covers what was written
        interrupted = True

    out = pool.released >= 0
    valid_out = out & pool.valid
    sc = np.bincount(pool.scenario[valid_out], minlength=len(FRAUD_SCENARIOS) + 1)
    fraud_by = {name: int(sc[i + 1]) for i, name in enumerate(FRAUD_SCENARIOS)}
    kinds = pool.kind[out & ~pool.valid]
    kc = np.bincount(kinds, minlength=len(MALFORMED_KINDS)) if len(kinds) else np.zeros(len(MALFORMED_KINDS), int)
    malformed_by = {name: int(kc[i]) for i, name in enumerate(MALFORMED_KINDS)}
    labelled_out = pool.released[pool.lab_orig] >= 0
    return {
        "mode": "live",
        "seed": config.seed,
        "start": writer.iso_utc(t0_ms),
        "end": writer.iso_utc(last_ms),
        "rate": rate,
        "duration_s": duration_s,
        "interrupted": interrupted,
        "events": int(valid_out.sum()),
        "lines_written": lines_out,
        "duplicates": int(pool.dup_released.sum()),
        "malformed": int(sum(malformed_by.values())),
        "malformed_by_kind": malformed_by,
        "late": int((pool.late & out).sum()),
        "fraud_events": int(sum(fraud_by.values())),
        "fraud_by_scenario": fraud_by,
        "labels_written": int(pool.lab_written.sum()),
        "labels_withheld": int((labelled_out & ~pool.lab_written).sum()),
        "files": files,
        "label_files": label_files,
        "events_dir": str(events_dir),
        "labels_dir": str(labels_dir),
    }
