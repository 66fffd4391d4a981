"""Where a micro-batch spends its time: seconds per named step, for the progress line and the bench."""

from __future__ import annotations

import time


class Laps:
    """Call with a step's name when the step ends; ``seconds`` maps each step to its seconds (a step
    named twice adds up)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def __call__(self, step: str) -> None:
        now = time.perf_counter()
        self.seconds[step] = round(self.seconds.get(step, 0.0) + now - self._t, 3)
        self._t = now


def wall_seconds(seconds: dict[str, float]) -> float:
    """A batch's wall time from its ``Laps.seconds``: the top-level steps (a dotted name such as
    ``gold.merge`` is a part of a step, already counted in it)."""
    return round(sum(v for k, v in seconds.items() if "." not in k), 3)
