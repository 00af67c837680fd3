from cloud.localfleet.demo_report import _steps, heavy_span, step_down, worth_it
from cloud.localfleet.loadgen import Phase


def _event(t, direction, edge="e"):
    return {"t": t, "edge": edge, "direction": direction}


def test_a_recovery_is_an_up_step_after_the_first_down_step():
    timeline = [_event(1, "up"), _event(20, "down"), _event(25, "down"), _event(60, "up"), _event(3, "up", "other")]
    assert _steps(timeline, "e") == {"down": 2, "up": 2, "up_after_down": 1}
    assert _steps([_event(1, "up")], "e")["up_after_down"] == 0
    assert _steps([], "e") == {"down": 0, "up": 0, "up_after_down": 0}


def _switch(t, direction, src, dst, edge="e"):
    return {
        "t": t,
        "edge": edge,
        "direction": direction,
        "from": src.upper(),
        "to": dst.upper(),
        "from_id": src,
        "to_id": dst,
    }


PHASES = [Phase("light", 10, 1), Phase("heavy", 20, 4), Phase("light-again", 10, 1)]
KNOWN = {
    "accuracy": {"dense": 0.885, "3x": 0.879, "4x": 0.870},
    "latency": {"e": {"dense": 6.0, "3x": 2.0, "4x": 1.5}},
}


def _rows(p95s: dict[int, float]) -> list[dict]:
    return [{"t": t, "p95_ms": p} for t, p in sorted(p95s.items())]


def test_the_heavy_phase_is_the_first_with_more_than_one_client():
    assert heavy_span(PHASES) == (10.0, 30.0)
    assert heavy_span([Phase("light", 5, 1)]) == (5.0, 5.0)


def test_a_step_down_is_judged_from_before_the_first_step_to_the_end_of_the_phase():
    timeline = [
        _switch(2, "initial", "", "dense"),
        _switch(12.4, "down", "dense", "3x"),
        _switch(16, "down", "3x", "4x"),
        _switch(35, "up", "4x", "dense"),
    ]
    rows = _rows({11: 9.0, 12: 9.5, 13: 8.1, 14: 4.0, 15: 3.0, 16: 8.0, 20: 2.0, 31: 1.0})
    step = step_down(timeline, rows, "e", 5.0, KNOWN, heavy_span(PHASES))
    assert step["from"] == "DENSE" and step["to"] == "4X"  # where it stood when the heavy load ended
    assert abs(step["cost_pp"] - 1.5) < 1e-9 and step["capacity"] == 4.0
    assert abs(step["back_under_slo_s"] - 2.6) < 1e-9  # the second [14, 15) is the first whole one under
    assert step["under_slo_share"] == 3 / 5  # 13, 14, 15, 16, 20 (the second 31 is after the phase)
    assert not worth_it(step)  # 1.5 points is more than an operator gives for it
    shallow = step_down(timeline[:2], rows, "e", 5.0, KNOWN, heavy_span(PHASES))
    assert shallow["to"] == "3X" and abs(shallow["cost_pp"] - 0.6) < 1e-9 and worth_it(shallow)


def test_no_step_down_slow_recovery_or_unknown_latency_is_not_worth_it():
    span = heavy_span(PHASES)
    assert step_down([_switch(35, "down", "dense", "3x")], [], "e", 5.0, KNOWN, span) is None
    assert not worth_it(None)
    late = step_down([_switch(12, "down", "dense", "3x")], _rows({13: 9.0, 25: 4.0}), "e", 5.0, KNOWN, span)
    assert late["back_under_slo_s"] == 14 and not worth_it(late)  # 14 s is longer than the target
    never = step_down([_switch(12, "down", "dense", "3x")], _rows({13: 9.0}), "e", 5.0, KNOWN, span)
    assert never["back_under_slo_s"] is None and not worth_it(never)
    unknown = step_down(
        [_switch(12, "down", "dense", "3x")], _rows({13: 4.0}), "e", 5.0, {**KNOWN, "latency": {}}, span
    )
    assert unknown["capacity"] is None and not worth_it(unknown)
