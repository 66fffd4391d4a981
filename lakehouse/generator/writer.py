"""JSON-lines text, built vectorised, and atomic file writes.

Lines are assembled with numpy string ufuncs on ``StringDType`` arrays from small lookup tables
(dates, times of day, ids), so a million lines take a second or two, with no per-record Python.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

import numpy as np

from lakehouse.generator.populations import (
    COUNTRIES,
    CURRENCIES,
    DAY_MS,
    DECIMALS,
    MINUTE_MS,
)

S = np.dtypes.StringDType()

_MASK64 = (1 << 64) - 1


def _add(*parts) -> np.ndarray:
    out = parts[0]
    for p in parts[1:]:
        out = np.strings.add(out, p)
    return out


@lru_cache(maxsize=1)
def _tables():
    hms = np.array([f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}" for s in range(86_400)], dtype=S)
    millis = np.array([f".{i:03d}" for i in range(1000)], dtype=S)
    frac = np.array([f".{i:02d}" for i in range(100)] + [""], dtype=S)
    return hms, millis, frac


def offset_text(minutes: int) -> str:
    if minutes == 0:
        return "Z"
    sign = "+" if minutes > 0 else "-"
    m = abs(minutes)
    return f"{sign}{m // 60:02d}:{m % 60:02d}"


def iso_times(t_ms: np.ndarray, offset_min: np.ndarray | None = None) -> np.ndarray:
    """ISO-8601 text of instants (ms since epoch), with millis; in UTC with ``Z``, or in local time
    with the given offset (minutes, 0 => ``Z``), which denotes the same instant."""
    t_ms = np.asarray(t_ms, dtype=np.int64)
    hms, millis, _ = _tables()
    if offset_min is None:
        local = t_ms
        suffix = "Z"
    else:
        offset_min = np.asarray(offset_min, dtype=np.int64)
        local = t_ms + offset_min * MINUTE_MS
        codes, inv = np.unique(offset_min, return_inverse=True)
        suffix = np.array([offset_text(int(c)) for c in codes], dtype=S)[inv]
    day = np.floor_divide(local, DAY_MS)
    rem = local - day * DAY_MS
    days, inv = np.unique(day, return_inverse=True)
    dates = np.array([datetime.fromtimestamp(int(d) * 86_400, tz=timezone.utc).strftime("%Y-%m-%dT")
                      for d in days], dtype=S)
    return _add(dates[inv], hms[rem // 1000], millis[rem % 1000], suffix)


def amount_text(minor: np.ndarray, currency: np.ndarray) -> np.ndarray:
    """JSON numbers: minor units as units with two decimals (none for zero-decimal currencies)."""
    _, _, frac = _tables()
    zero = DECIMALS[currency] == 0
    whole = np.where(zero, minor, minor // 100)
    cents = np.where(zero, 100, minor % 100)
    return np.strings.add(whole.astype(S), frac[cents])


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijection of uint64, so distinct inputs give distinct ids."""
    z = np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def namespace(*keys: int) -> int:
    """A 64-bit id namespace from integers (seed, start, chunk, ...)."""
    h = 0x243F6A8885A308D3
    for k in keys:
        h = int(mix64(np.array([(h ^ (int(k) & _MASK64)) & _MASK64], dtype=np.uint64))[0])
    return h


def event_ids(ns: int, index: np.ndarray) -> np.ndarray:
    """``e-`` + 16 hex digits, unique per index within a namespace (a bijection of ns + index)."""
    x = (np.asarray(index, dtype=np.uint64) + np.uint64(ns))
    hexed = mix64(x).astype(">u8").tobytes().hex()
    return np.strings.add("e-", np.frombuffer(hexed.encode("ascii"), dtype="S16").astype(S))


def event_lines(eid, user_seg, merchant_seg, amount, currency_country_seg, ts) -> np.ndarray:
    return _add('{"event_id":"', eid, user_seg, merchant_seg, amount, currency_country_seg, ts, '"}')


def user_segments(n_users: int) -> np.ndarray:
    return np.array([f'","user_id":"u{u:07d}","merchant_id":"' for u in range(n_users)], dtype=S)


def merchant_segments(n_merchants: int) -> np.ndarray:
    return np.array([f'm{m:05d}","amount":' for m in range(n_merchants)], dtype=S)


def currency_country_segments() -> np.ndarray:
    """Indexed by currency_code * len(COUNTRIES) + country_code."""
    return np.array([f',"currency":"{cur}","country":"{ctry}","event_time":"'
                     for cur in CURRENCIES for ctry in COUNTRIES], dtype=S)


def label_lines(eid: np.ndarray, scenario: np.ndarray, reported: np.ndarray, names) -> np.ndarray:
    seg = np.array([f'","is_fraud":{"false" if i == 0 else "true"},"scenario":"{n}","reported_at":"'
                    for i, n in enumerate(names)], dtype=S)
    return _add('{"event_id":"', eid, seg[scenario], reported, '"}')


def write_atomic(folder: Path, name: str, data: bytes, mtime_ns: int | None = None) -> Path:
    """Write ``folder/name`` atomically: a hidden temp file (ignored by Spark), fsync, rename.
    ``mtime_ns``: the modification time the file lands with (set before the rename, so no reader ever
    lists it with another); default now."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.tmp"
    final = folder / name
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if mtime_ns is not None:
            os.utime(tmp, ns=(mtime_ns, mtime_ns))
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


def fsync_dir(folder: Path) -> None:
    """Make the renames durable (best effort: not every platform can fsync a directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def jsonl(lines) -> bytes:
    """JSON-lines file content: every line followed by a newline, UTF-8."""
    lines = list(lines)
    return ("\n".join(lines) + "\n").encode("utf-8") if lines else b""


def stamp(t_ms: int, fmt: str = "%Y%m%dT%H%M%S") -> str:
    return datetime.fromtimestamp(int(t_ms) // 1000, tz=timezone.utc).strftime(fmt)


def iso_utc(t_ms: int) -> str:
    dt = datetime.fromtimestamp(int(t_ms) // 1000, tz=timezone.utc).replace(microsecond=(int(t_ms) % 1000) * 1000)
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")
