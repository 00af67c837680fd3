from cloud.localfleet.demo_report import _steps


def _event(t, direction, edge="e"):
    return {"t": t, "edge": edge, "direction": direction}


def test_a_recovery_is_an_up_step_after_the_first_down_step():
    timeline = [_event(1, "up"), _event(20, "down"), _event(25, "down"), _event(60, "up"), _event(3, "up", "other")]
    assert _steps(timeline, "e") == {"down": 2, "up": 2, "up_after_down": 1}
    assert _steps([_event(1, "up")], "e")["up_after_down"] == 0
    assert _steps([], "e") == {"down": 0, "up": 0, "up_after_down": 0}
