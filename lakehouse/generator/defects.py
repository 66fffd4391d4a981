"""Stream defects: malformed records, late deliveries, exact re-deliveries, out-of-order files.

Malformed records are extra records (their own event ids), never copies of valid events, so a
malformed line never shadows a valid event and never gets a label.
"""

from __future__ import annotations

import numpy as np

from lakehouse.generator.populations import MINUTE_MS
from lakehouse.schemas import EVENT_FIELDS

#: Kinds of malformed records, in code order.
MALFORMED_KINDS: tuple[str, ...] = ("broken_json", "wrong_type", "missing_field")

#: Non-numeric amounts of the "wrong_type" kind (strings that do not cast to a number, objects).
WRONG_AMOUNTS: tuple[str, ...] = (
    '"abc"', '"n/a"', '"12,50 EUR"', '"twelve"', '{"value":12.5,"currency":"EUR"}', '{"cents":1250}', "[12.5]",
)
#: Fields dropped by the "missing_field" kind, and how often each.
MISSING_FIELD_WEIGHTS = {"event_id": 0.3, "amount": 0.3, "user_id": 0.08, "merchant_id": 0.08,
                         "currency": 0.08, "country": 0.08, "event_time": 0.08}

#: Normal delivery lag: a fixed floor plus an exponential tail, capped.
LAG_FLOOR_MS = 200
LAG_MEAN_MS = 30_000
LAG_CAP_MS = 5 * MINUTE_MS


def delivery_lags(rng: np.random.Generator, n: int, mean_ms: float = LAG_MEAN_MS,
                  cap_ms: int = LAG_CAP_MS) -> np.ndarray:
    """Milliseconds from the payment to its delivery: a floor plus an exponential tail, capped."""
    return np.minimum(LAG_FLOOR_MS + rng.exponential(mean_ms, n).astype(np.int64), cap_ms)


def late_lags(rng: np.random.Generator, n: int, config) -> np.ndarray:
    lo, hi = config.late_min_minutes * MINUTE_MS, config.late_max_minutes * MINUTE_MS
    return rng.uniform(lo, hi, n).astype(np.int64)


def _json_object(pairs: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f'"{k}":{v}' for k, v in pairs) + "}"


def malformed_lines(rng: np.random.Generator, kinds: np.ndarray, fields: dict[str, np.ndarray]) -> list[str]:
    """Malformed lines, one per entry of ``kinds`` (codes into MALFORMED_KINDS).

    ``fields`` holds, per record, each event field's JSON value text (strings already quoted).
    A loop over the (few) malformed records only.
    """
    n = len(kinds)
    vals = {k: np.asarray(fields[k]).tolist() for k in EVENT_FIELDS}
    variant = rng.integers(0, 1 << 30, n)
    cut = rng.random(n)
    names = list(MISSING_FIELD_WEIGHTS)
    p = np.array(list(MISSING_FIELD_WEIGHTS.values()))
    drop = rng.choice(len(names), size=n, p=p / p.sum())
    out: list[str] = []
    for i in range(n):
        pairs = [(k, vals[k][i]) for k in EVENT_FIELDS]
        kind = MALFORMED_KINDS[int(kinds[i])]
        if kind == "broken_json":
            line = _json_object(pairs)
            v = variant[i] % 3
            if v == 0:    # truncated in transit: any proper prefix of an object is not JSON
                stop = int(len(line) // 3 + cut[i] * (len(line) - 2 - len(line) // 3))
                line = line[:stop]
            elif v == 1:  # single quotes around the keys
                line = "{" + ",".join(f"'{k}':{val}" for k, val in pairs) + "}"
            else:         # an unquoted string value (a lost quote)
                line = line.replace('"user_id":"', '"user_id":', 1)
        elif kind == "wrong_type":
            bad = WRONG_AMOUNTS[variant[i] % len(WRONG_AMOUNTS)]
            line = _json_object([(k, bad if k == "amount" else val) for k, val in pairs])
        else:
            gone = names[drop[i]]
            line = _json_object([(k, val) for k, val in pairs if k != gone])
        out.append(line)
    return out
