"""Long stages say up front how long the rest will take."""

from dcube.utils.runtime import Pace, about


def test_about_says_durations_as_people_do():
    assert about(20) == "under a minute" and about(420) == "about 7 min" and about(9000) == "about 2.5 h"


def test_pace_speaks_once_after_the_first_units_and_times_from_the_second(capsys, monkeypatch):
    import time

    clock = iter([100.0, 108.0])  # read after unit 1 and after unit 3: units 2 and 3 took 4 s each
    monkeypatch.setattr(time, "time", lambda: next(clock))
    pace = Pace("step 1", done=0, total=300, unit="steps", after=3)
    for done in range(1, 6):
        pace.tick(done)
    out = capsys.readouterr().out
    assert out.count("[step 1]") == 1 and "297 more steps: about 20 min" in out and "(4.00 s each)" in out
