"""A batch's wall time counts its top-level steps once, not their dotted parts as well."""

from lakehouse import laps as laps_module
from lakehouse.laps import Laps, wall_seconds


def test_wall_seconds_leaves_out_the_parts_of_a_step():
    seconds = {"validate": 1.0, "gold": 5.0, "gold.lookback": 1.5, "gold.features_merge": 2.0, "dq": 0.5}
    assert wall_seconds(seconds) == 6.5


def test_a_step_named_twice_adds_up(monkeypatch):
    clock = iter([10.0, 11.0, 13.5, 14.0])  # start, merge ends, merge ends again, dq ends
    monkeypatch.setattr(laps_module.time, "perf_counter", lambda: next(clock))
    laps = Laps()
    laps("merge")
    laps("merge")
    laps("dq")
    assert laps.seconds == {"merge": 3.5, "dq": 0.5}
    assert wall_seconds(laps.seconds) == 4.0
