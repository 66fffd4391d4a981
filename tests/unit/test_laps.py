"""A batch's wall time counts its top-level steps once, not their dotted parts as well."""

from lakehouse.laps import Laps, wall_seconds


def test_wall_seconds_leaves_out_the_parts_of_a_step():
    seconds = {"validate": 1.0, "gold": 5.0, "gold.lookback": 1.5, "gold.features_merge": 2.0, "dq": 0.5}
    assert wall_seconds(seconds) == 6.5


def test_a_step_named_twice_adds_up():
    laps = Laps()
    laps("merge")
    laps("merge")
    assert set(laps.seconds) == {"merge"} and wall_seconds(laps.seconds) == laps.seconds["merge"] >= 0
