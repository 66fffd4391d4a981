"""Hand-made inbox files for the integration tests (independent of the generator)."""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta, timezone

from tests.conftest import write_lines

BASE = datetime(2026, 11, 20, tzinfo=timezone.utc)
#: Files are dated a day after the events, so no event is "in the future" of its file.
FILE_MTIME = (BASE + timedelta(days=3)).timestamp()


def event_line(i: int, **over) -> str:
    rec = dict(event_id=f"e{i:06d}", user_id=f"u{i % 50:03d}", merchant_id=f"m{i % 17:03d}",
               amount=round(5 + (i * 7.31) % 400, 2), currency=["EUR", "USD", "GBP", "JPY"][i % 4],
               country=["FR", "US", "GB", "JP"][i % 4],
               event_time=(BASE + timedelta(seconds=(37 * i) % 172_800)).strftime("%Y-%m-%dT%H:%M:%SZ"))
    rec.update(over)
    return json.dumps({k: v for k, v in rec.items() if v is not ...})


def label_line(i: int, **over) -> str:
    rec = dict(event_id=f"e{i:06d}", is_fraud=i % 3 != 0, scenario="card_testing" if i % 3 else "none",
               reported_at=(BASE + timedelta(days=1, seconds=i)).strftime("%Y-%m-%dT%H:%M:%SZ"))
    rec.update(over)
    return json.dumps(rec)


def write_feed(events_dir, labels_dir, n_files: int = 12, per_file: int = 1500, seed: int = 3) -> dict:
    """A feed with re-deliveries across and within files and a few malformed records.

    Returns the expected outcome: distinct valid event ids, counts of lines and bad lines.
    """
    rng = random.Random(seed)
    valid_ids: set[str] = set()
    lines_total = bad_total = 0
    seen: list[str] = []
    i = 0
    for f in range(n_files):
        lines = []
        for _ in range(per_file):
            roll = rng.random()
            if roll < 0.03 and seen:
                lines.append(rng.choice(seen))            # exact re-delivery
            elif roll < 0.04:
                lines.append(event_line(i)[:-7])           # truncated JSON
                bad_total += 1
                i += 1
            elif roll < 0.045:
                lines.append(event_line(i, amount="n/a"))  # wrong type
                bad_total += 1
                i += 1
            else:
                line = event_line(i)
                lines.append(line)
                seen.append(line)
                valid_ids.add(f"e{i:06d}")
                i += 1
        write_lines(events_dir, f"events-{f:04d}.jsonl", lines, mtime=FILE_MTIME + f)
        lines_total += len(lines)
    labels = [label_line(j) for j in range(0, i, 40)]
    write_lines(labels_dir, "labels-0000.jsonl", labels + labels[:5], mtime=FILE_MTIME)
    return {"valid_ids": valid_ids, "lines": lines_total, "bad": bad_total,
            "labels": len(labels), "label_lines": len(labels) + 5}
