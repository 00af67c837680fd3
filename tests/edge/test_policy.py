"""The switching policy is a pure function: drive it with made-up windows and a made-up clock."""

from dataclasses import FrozenInstanceError, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common import policy_contract
from edge.policy import (
    Option,
    PolicyConfig,
    PolicyState,
    ReasonCode,
    Window,
    decide,
    frontier,
    initial_choice,
    predicted_p95,
    queue_ms,
)
from protos import coordinator_pb2

FAST = Option("a" * 64, accuracy=0.80, p50_ms=3.0, p95_ms=4.0, name="fast")
MID = Option("b" * 64, accuracy=0.85, p50_ms=8.0, p95_ms=10.0, name="mid")
SLOW = Option("c" * 64, accuracy=0.90, p50_ms=20.0, p95_ms=25.0, name="slow")
DOMINATED = Option("d" * 64, accuracy=0.84, p50_ms=9.0, p95_ms=12.0, name="dominated")  # slower than MID, less accurate
OPTIONS = [SLOW, DOMINATED, FAST, MID]
CONFIG = PolicyConfig(slo_ms=30.0, down_windows=2, up_windows=3, up_headroom=0.7, dwell_s=5.0)
BY_ID = {o.variant_id: o for o in OPTIONS}


def run(config, state, windows, start=100.0, step=1.0, options=OPTIONS):
    """Feed windows one per `step` seconds; a window is a p95 factor times the active variant's p95
    (the load), or a Window. Returns the switches [(time, decision)] and the final state."""
    switches, now = [], start
    for item in windows:
        now += step
        window = item if isinstance(item, Window) else Window(10, item * BY_ID[state.active].p95_ms)
        decision = decide(config, options, state, window, now)
        if decision.switch:
            switches.append((now, decision))
        state = decision.state
    return switches, state


def test_from_proto_takes_defaults_for_unset_fields():
    config = PolicyConfig.from_proto(coordinator_pb2.Policy())
    assert config == PolicyConfig()
    assert {name: getattr(config, name) for name in policy_contract.SETTINGS} == policy_contract.defaults()
    set_by_coordinator = PolicyConfig.from_proto(
        coordinator_pb2.Policy(slo_ms=20.0, dwell_s=0.0, version=4), window_s=0.5
    )
    assert set_by_coordinator.dwell_s == 0.0 and set_by_coordinator.window_s == 0.5
    assert set_by_coordinator.slo_ms == 20.0 and set_by_coordinator.version == 4


@pytest.mark.parametrize(
    "bad",
    [
        dict(max_switches_per_minute=0),
        dict(memory_budget_bytes=-1),
        dict(slo_ms=0),
        dict(up_headroom=1.5),
        dict(down_windows=0),
        dict(dwell_s=-1),
        dict(min_accuracy=2.0),
        dict(window_s=0),
        dict(window_s=61.0),
        dict(max_switches_per_minute=601),
        dict(slo_ms=float("nan")),
    ],
)
def test_config_is_validated(bad):
    with pytest.raises(ValueError):
        PolicyConfig(**bad)


def test_frontier_drops_variants_slower_and_not_more_accurate():
    assert frontier(CONFIG, OPTIONS) == [FAST, MID, SLOW]
    twin = Option("e" * 64, accuracy=0.80, p50_ms=5.0, p95_ms=6.0)  # slower than FAST, same accuracy
    assert twin not in frontier(CONFIG, OPTIONS + [twin])


def test_min_accuracy_filters_candidates_unless_none_qualifies():
    assert frontier(PolicyConfig(slo_ms=30.0, min_accuracy=0.82), OPTIONS) == [MID, SLOW]
    assert frontier(PolicyConfig(slo_ms=30.0, min_accuracy=0.99), OPTIONS) == [FAST, MID, SLOW]


def test_initial_choice_is_most_accurate_with_headroom_else_fastest():
    assert initial_choice(CONFIG, OPTIONS) == MID  # SLOW's 25 ms is over 30 * 0.7
    assert initial_choice(PolicyConfig(slo_ms=100.0), OPTIONS) == SLOW
    assert initial_choice(PolicyConfig(slo_ms=1.0), OPTIONS) == FAST
    assert initial_choice(PolicyConfig(slo_ms=30.0, min_accuracy=0.88), OPTIONS) == SLOW  # the only candidate


def test_sustained_overload_steps_down_exactly_once():
    state = PolicyState(SLOW.variant_id, last_switch_at=0.0)
    switches, state = run(CONFIG, state, [1.6] * 20)  # p95 = 1.6 x profile: 40 ms on SLOW, 16 ms on MID
    assert len(switches) == 1
    when, decision = switches[0]
    assert when == 102.0  # the second window over the SLO
    assert decision.target == MID.variant_id and decision.reason_code == ReasonCode.SLO_VIOLATION
    assert decision.reason == "p95 40.0 ms over SLO 30.0 ms for 2 windows at 0.0 req/s; predicted 16.0 ms on mid"
    assert state.active == MID.variant_id


def test_overload_with_nothing_fitting_goes_to_the_fastest():
    switches, state = run(CONFIG, PolicyState(SLOW.variant_id), [10.0] * 4)
    assert [d.target for _, d in switches] == [FAST.variant_id] and "none fits" in switches[0][1].reason
    assert state.active == FAST.variant_id


def test_alternating_windows_around_the_slo_never_switch():
    config = PolicyConfig(slo_ms=30.0, down_windows=2, up_windows=2, dwell_s=0.0)
    switches, _ = run(config, PolicyState(SLOW.variant_id), [31 / 25, 29 / 25] * 50)
    assert switches == []


def test_alternating_windows_around_the_headroom_never_switch():
    config = PolicyConfig(slo_ms=30.0, up_windows=2, dwell_s=0.0)
    # on MID: 8 ms predicts 20 ms on SLOW (under 21 ms of headroom), 9 ms predicts 22.5 ms (not)
    windows = [Window(10, 8.0), Window(10, 9.0)] * 50
    switches, _ = run(config, PolicyState(MID.variant_id), windows)
    assert switches == []


def test_sustained_light_load_steps_up_after_up_windows_and_dwell():
    state = PolicyState(FAST.variant_id, last_switch_at=100.0)
    switches, state = run(CONFIG, state, [0.5] * 10)  # 2 ms on FAST predicts 12.5 ms on SLOW
    assert len(switches) == 1
    when, decision = switches[0]
    assert when == 105.0  # three windows of headroom came at 103, the dwell ends at 105
    assert decision.target == SLOW.variant_id and decision.reason_code == ReasonCode.HEADROOM
    assert "predicted 12.5 ms on slow" in decision.reason


def test_idle_windows_use_the_profiles():
    idle = [Window(0, 0.0)] * 10
    switches, state = run(CONFIG, PolicyState(FAST.variant_id, last_switch_at=100.0), idle)
    assert [d.target for _, d in switches] == [MID.variant_id]  # SLOW's profiled 25 ms leaves no headroom
    assert run(CONFIG, PolicyState(MID.variant_id), idle)[0] == []


def test_pinned_variant_wins_and_holds_under_overload():
    config = PolicyConfig(slo_ms=30.0, pinned_variant=SLOW.variant_id)
    switches, state = run(config, PolicyState(FAST.variant_id), [5.0] * 10)
    assert [(d.target, d.reason_code) for _, d in switches] == [(SLOW.variant_id, ReasonCode.PINNED)]
    assert state.active == SLOW.variant_id


def test_pin_to_a_variant_not_loaded_is_ignored():
    config = PolicyConfig(slo_ms=30.0, pinned_variant="f" * 64)
    switches, _ = run(config, PolicyState(SLOW.variant_id), [1.6] * 3)
    assert [d.reason_code for _, d in switches] == [ReasonCode.SLO_VIOLATION]


def test_min_accuracy_floor_holds_when_stepping_down():
    config = PolicyConfig(slo_ms=30.0, min_accuracy=0.82)
    switches, _ = run(config, PolicyState(SLOW.variant_id), [10.0] * 4)
    assert [d.target for _, d in switches] == [MID.variant_id]  # FAST would fit better but is below the floor


def test_an_active_variant_without_profile_falls_back_to_the_smallest():
    decision = decide(CONFIG, OPTIONS, PolicyState("9" * 64), Window(0, 0.0), 1.0)
    assert decision.switch and decision.reason_code == ReasonCode.FALLBACK and decision.target == FAST.variant_id
    first = decide(CONFIG, OPTIONS, PolicyState(""), Window(0, 0.0), 1.0)
    assert first.switch and first.reason_code == ReasonCode.INITIAL and first.target == MID.variant_id


def test_missing_telemetry_falls_back_to_the_smallest_even_when_capped():
    sized = [replace(SLOW, size_bytes=300), replace(MID, size_bytes=100), replace(FAST, size_bytes=200)]
    config = replace(CONFIG, max_switches_per_minute=1)
    state = PolicyState(SLOW.variant_id, recent_switches=(99.0,))
    decision = decide(config, sized, state, None, 100.0)
    assert decision.switch and decision.reason_code == ReasonCode.FALLBACK and decision.target == MID.variant_id
    assert "telemetry missing" in decision.reason
    again = decide(config, sized, decision.state, None, 101.0)
    assert not again.switch and not again.recorded  # already there: nothing to record


def test_the_cap_holds_back_step_ups_and_records_that_once_but_never_a_step_down():
    config = PolicyConfig(slo_ms=30.0, down_windows=1, up_windows=1, dwell_s=0.0, max_switches_per_minute=2)
    # overload and light load alternate every two windows: without the cap, a switch every other window
    windows = [5.0, 5.0, 0.2, 0.2] * 30
    switches, _ = run(config, PolicyState(SLOW.variant_id), windows)
    ups = [d for _, d in switches if d.reason_code == ReasonCode.HEADROOM]
    assert len(ups) <= 2 * (len(windows) // 60 + 1) and len(switches) <= (2 + 1) * 3 * (len(windows) // 60 + 1)
    state, now, decisions = PolicyState(SLOW.variant_id), 100.0, []
    for factor in [5.0, 0.2, 5.0, 0.2, 5.0, 0.2, 0.2]:
        now += 1.0
        window = Window(10, factor * BY_ID[state.active].p95_ms)  # no rate: no ceiling applies
        decision = decide(config, OPTIONS, state, window, now)
        decisions.append(decision)
        state = decision.state
    assert [d.reason_code for d in decisions] == [
        ReasonCode.SLO_VIOLATION,
        ReasonCode.HEADROOM,
        ReasonCode.SLO_VIOLATION,
        ReasonCode.HEADROOM,
        ReasonCode.SLO_VIOLATION,
        ReasonCode.CAPPED,
        ReasonCode.STAY,
    ]
    assert not decisions[5].switch and decisions[5].recorded and "cap 2" in decisions[5].reason
    later = decide(config, OPTIONS, state, Window(10, 0.2 * BY_ID[state.active].p95_ms), 165.0)
    assert later.switch and later.reason_code == ReasonCode.HEADROOM  # the minute has passed


def test_a_variant_left_over_the_slo_is_no_step_up_at_that_load_for_a_while():
    """The prediction said MID would fit at 100 req/s; it did not. Under the same load the policy
    stays on FAST instead of trying MID (or anything slower) again every few windows."""
    config = PolicyConfig(slo_ms=30.0, down_windows=1, up_windows=1, dwell_s=0.0)
    loaded = Window(requests=25, p95_ms=40.0, rate=100.0, slots=1)
    down = decide(config, OPTIONS, PolicyState(MID.variant_id), loaded, now=10.0)
    assert down.switch and down.target == FAST.variant_id and down.state.ceilings[0].rate == 100.0
    roomy = Window(requests=25, p95_ms=5.0, rate=85.0, slots=1)  # MID would look fine: 85 x 8 ms = 68% busy
    state = down.state
    for now in (11.0, 12.0, 13.0):
        decision = decide(config, OPTIONS, state, roomy, now)
        assert not decision.switch
        state = decision.state
    lighter = replace(roomy, rate=70.0)  # under 0.8 x 100 req/s: MID may be tried again
    assert decide(config, OPTIONS, state, lighter, 14.0).target == MID.variant_id
    assert decide(config, OPTIONS, state, roomy, 10.0 + 61.0).target == MID.variant_id  # and after a minute
    looser = replace(config, slo_ms=60.0)  # the operator relaxed the SLO: what failed under 30 ms may fit
    assert decide(looser, OPTIONS, state, roomy, 14.0).switch


def test_variants_a_step_down_skipped_as_over_the_slo_are_no_step_up_at_that_load_either():
    """Overloaded on SLOW, the window predicts MID over the SLO too, and the policy goes to FAST. On FAST
    a calmer window predicts MID fits; at the load that overloaded the device it is not tried."""
    config = PolicyConfig(slo_ms=30.0, down_windows=1, up_windows=1, dwell_s=0.0)
    loaded = Window(requests=25, p95_ms=100.0, rate=50.0, slots=1)  # MID: 100 x 10 / 25 = 40 ms
    down = decide(config, OPTIONS, PolicyState(SLOW.variant_id), loaded, now=10.0)
    assert down.target == FAST.variant_id and predicted_p95(MID, SLOW, loaded) == 40.0
    assert down.state.ceilings[0].p50_ms == MID.p50_ms
    calm = Window(requests=25, p95_ms=5.0, rate=50.0, slots=1)  # on FAST: MID predicted 12.5 ms, 40% busy
    state = down.state
    for now in (11.0, 12.0, 13.0):
        decision = decide(config, OPTIONS, state, calm, now)
        assert not decision.switch
        state = decision.state
    assert decide(config, OPTIONS, state, replace(calm, rate=35.0), 14.0).target == MID.variant_id  # lighter
    fits = Window(requests=25, p95_ms=28.0, rate=50.0, slots=1)  # MID predicted 11.2 ms: it fits
    assert decide(config, OPTIONS, PolicyState(SLOW.variant_id), fits, 10.0).state.ceilings[0].p50_ms == SLOW.p50_ms


def test_a_step_down_goes_where_it_leaves_the_headroom_a_step_up_would_need():
    """Over the SLO on SLOW, MID is predicted at 25 ms: under the 30 ms SLO but not under 0.7 x 30 ms.
    The policy goes to FAST (10 ms) rather than to a variant it would likely have to leave again; when
    nothing fits the headroom, the most accurate under the SLO still beats the fastest."""
    config = PolicyConfig(slo_ms=30.0, down_windows=1, up_windows=1, dwell_s=0.0)
    over = Window(requests=25, p95_ms=62.5, rate=40.0, slots=1)  # SLOW 80% busy: the load explains it
    assert predicted_p95(MID, SLOW, over) == 25.0 and predicted_p95(FAST, SLOW, over) == 10.0
    assert decide(config, OPTIONS, PolicyState(SLOW.variant_id), over, now=10.0).target == FAST.variant_id
    tight = [SLOW, MID, replace(FAST, p95_ms=9.0)]  # FAST predicted 22.5 ms: under the SLO only
    assert decide(config, tight, PolicyState(SLOW.variant_id), over, now=10.0).target == MID.variant_id


def test_a_window_over_the_slo_that_the_load_does_not_explain_needs_a_second_one():
    """At 10 req/s SLOW is busy 20% of the time: a p95 over the SLO is a stall of the device, and one
    such window is no reason to switch (down and, seconds later, back up). A second one is; so is one
    whose rate keeps the variant busy beyond the headroom, by its CPU time, not by the slot time a
    stall inflates."""
    config = PolicyConfig(slo_ms=30.0, down_windows=1, up_windows=1, dwell_s=0.0)
    stall = Window(requests=5, p95_ms=40.0, rate=10.0, slots=1, cpu_ms_per_request=21.0, slot_ms_per_request=90.0)
    first = decide(config, OPTIONS, PolicyState(SLOW.variant_id), stall, now=10.0)
    assert not first.switch and first.reason == "over the SLO, waiting"
    second = decide(config, OPTIONS, first.state, stall, now=10.5)
    assert second.switch and second.reason_code == ReasonCode.SLO_VIOLATION and "for 2 windows" in second.reason
    busy = replace(stall, rate=40.0)  # 40 x 21 ms: 84% busy
    assert decide(config, OPTIONS, PolicyState(SLOW.variant_id), busy, now=10.0).switch
    assert decide(config, OPTIONS, PolicyState(SLOW.variant_id), replace(stall, rate=0.0), now=10.0).switch  # unknown


def test_pin_and_unpin_are_recorded_once_each_and_the_policy_resumes():
    pinned = PolicyConfig(slo_ms=30.0, pinned_variant=SLOW.variant_id, max_switches_per_minute=1)
    on_slow = decide(pinned, OPTIONS, PolicyState(SLOW.variant_id), Window(10, 5.0), 1.0)
    assert on_slow.recorded and not on_slow.switch and on_slow.reason_code == ReasonCode.PINNED  # already there
    held = decide(pinned, OPTIONS, on_slow.state, Window(10, 100.0), 2.0)
    assert not held.recorded and held.target == SLOW.variant_id
    unpinned = decide(replace(pinned, pinned_variant=""), OPTIONS, held.state, Window(10, 100.0), 3.0)
    assert unpinned.reason_code == ReasonCode.UNPINNED and not unpinned.switch and unpinned.state.pinned == ""
    free = replace(pinned, pinned_variant="", down_windows=1)
    down = decide(free, OPTIONS, unpinned.state, Window(10, 100.0), 4.0)
    assert down.switch and down.reason_code == ReasonCode.SLO_VIOLATION


def test_variants_over_the_memory_budget_are_never_candidates():
    sized = [replace(SLOW, size_bytes=300), replace(MID, size_bytes=200), replace(FAST, size_bytes=100)]
    config = PolicyConfig(slo_ms=100.0, memory_budget_bytes=250)
    assert [o.variant_id for o in frontier(config, sized)] == [FAST.variant_id, MID.variant_id]
    assert initial_choice(config, sized).variant_id == MID.variant_id
    tiny = PolicyConfig(slo_ms=100.0, memory_budget_bytes=50)
    assert [o.variant_id for o in frontier(tiny, sized)] == [FAST.variant_id]  # nothing fits: the smallest


def test_decisions_are_values():
    state = PolicyState(SLOW.variant_id)
    decide(CONFIG, OPTIONS, state, Window(10, 40.0), 1.0)
    assert state == PolicyState(SLOW.variant_id)
    with pytest.raises(FrozenInstanceError):
        state.over_count = 3


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.floats(0.0, 100.0)), min_size=1, max_size=60),
    st.integers(1, 4),
    st.integers(1, 4),
)
def test_switches_are_always_separated_by_the_hysteresis(windows, down_windows, up_windows):
    config = PolicyConfig(slo_ms=30.0, down_windows=down_windows, up_windows=up_windows, dwell_s=0.0)
    switches, _ = run(config, PolicyState(MID.variant_id), [Window(r, p) for r, p in windows])
    times = [when for when, _ in switches]
    assert all(later - earlier >= min(down_windows, up_windows) for earlier, later in zip(times, times[1:]))
    assert all(d.target in {FAST.variant_id, MID.variant_id, SLOW.variant_id} for _, d in switches)


def test_a_variant_the_request_rate_would_overload_is_never_a_step_up():
    """At 120 req/s one slot is busy 0.96 of the time on the largest variant: scaling its latency would
    look fine, but its queue would grow without bound, so the policy stays down."""
    big = Option("b" * 64, 0.9, p50_ms=8.0, p95_ms=9.0, name="big")
    small = Option("s" * 64, 0.8, p50_ms=3.0, p95_ms=3.5, name="small")
    config = PolicyConfig(slo_ms=40.0, up_windows=1, dwell_s=0.0)
    loaded = Window(requests=120, p95_ms=4.0, rate=120.0, slots=1)
    assert predicted_p95(big, small, loaded) == float("inf")
    decision = decide(config, [big, small], PolicyState(small.variant_id), loaded, now=10.0)
    assert not decision.switch
    light = Window(requests=20, p95_ms=4.0, rate=20.0, slots=1)
    decision = decide(config, [big, small], PolicyState(small.variant_id), light, now=10.0)
    assert decision.switch and decision.target == big.variant_id and decision.reason_code == ReasonCode.HEADROOM
    two_slots = Window(requests=120, p95_ms=4.0, rate=120.0, slots=2)
    assert predicted_p95(big, small, two_slots) < float("inf")


def test_a_saturated_variant_steps_down_before_its_p95_crosses_the_slo():
    """Open-loop load past what the active variant serves: p95 is still fine, but a queue is growing."""
    config = PolicyConfig(slo_ms=30.0, down_windows=2, dwell_s=0.0)
    saturating = Window(requests=50, p95_ms=12.0, rate=50.0, slots=1)  # 50 req/s x 20 ms = 100% busy on SLOW
    first = decide(config, OPTIONS, PolicyState(SLOW.variant_id), saturating, 1.0)
    assert not first.switch and first.state.over_count == 1
    second = decide(config, OPTIONS, first.state, saturating, 2.0)
    assert second.switch and second.reason_code == ReasonCode.SLO_VIOLATION and "saturated" in second.reason
    assert second.target == MID.variant_id  # 50 req/s x 8 ms = 40% busy on MID
    busy = Window(requests=45, p95_ms=12.0, rate=45.0, slots=1)  # 90%: under saturation, no step down
    calm = decide(config, OPTIONS, decide(config, OPTIONS, PolicyState(SLOW.variant_id), busy, 1.0).state, busy, 2.0)
    assert not calm.switch


def test_a_noisy_p95_does_not_hide_a_variant_with_a_clearly_faster_median():
    """A profile taken on a busy device can put the smallest variant's p95 above the next one's; its
    clearly faster median keeps it on the frontier."""
    bigger = Option("l4" * 32, accuracy=0.85, p50_ms=5.65, p95_ms=6.19, name="L4")
    smaller = Option("l5" * 32, accuracy=0.80, p50_ms=4.30, p95_ms=6.42, name="L5")
    assert frontier(CONFIG, [bigger, smaller]) == [smaller, bigger]
    loaded = Window(requests=40, p95_ms=100.0, rate=160.0, slots=1)  # L4 would be 90% busy, L5 69%
    state = PolicyState(bigger.variant_id, over_count=5)
    decision = decide(PolicyConfig(slo_ms=30.0, down_windows=1), [bigger, smaller], state, loaded, 10.0)
    assert decision.switch and decision.target == smaller.variant_id


def test_the_cost_of_serving_beyond_the_forward_pass_counts_in_every_utilization():
    """At 150 req/s with 4 ms of CPU per request on a 2.5 ms variant, a 4.3 ms variant looks 65% busy by
    its forward pass alone but costs 5.8 ms a request: 87% busy, too close to overload to step up to."""
    small = Option("s" * 64, 0.61, p50_ms=2.5, p95_ms=3.0, name="256x")
    mid = Option("m" * 64, 0.83, p50_ms=4.3, p95_ms=4.8, name="16x")
    config = PolicyConfig(slo_ms=38.0, up_windows=1, dwell_s=0.0)
    unknown = Window(requests=40, p95_ms=8.0, rate=150.0, slots=1)
    measured = replace(unknown, cpu_ms_per_request=4.0)
    assert predicted_p95(mid, small, unknown) < 38.0 * 0.7  # without the overhead it would step up
    assert predicted_p95(mid, small, measured) == float("inf")
    assert not decide(config, [mid, small], PolicyState(small.variant_id), measured, now=10.0).switch
    # on the bigger variant, the same load is past saturation: step down, though p95 is still fine
    busy = replace(measured, p95_ms=9.0, cpu_ms_per_request=6.5)
    down = decide(replace(config, down_windows=1), [mid, small], PolicyState(mid.variant_id), busy, now=10.0)
    assert down.switch and down.target == small.variant_id and "saturated" in down.reason


def test_no_step_up_to_a_variant_the_load_would_keep_busy_beyond_the_headroom():
    """By latency, and under the utilization that predicts overload, the slower variant looks fine at
    200 req/s; but it would be busy beyond the headroom, where open-loop arrivals queue behind one
    another, so the policy does not step up until the load is lighter."""
    small = Option("s" * 64, 0.61, p50_ms=2.46, p95_ms=2.90, name="256x")
    mid = Option("m" * 64, 0.78, p50_ms=3.07, p95_ms=3.58, name="64x")
    config = PolicyConfig(slo_ms=34.5, up_windows=1, up_headroom=0.7, dwell_s=0.0)
    busy = Window(requests=100, p95_ms=6.0, rate=200.0, slots=1, cpu_ms_per_request=3.1)  # 0.64 ms beyond p50
    assert predicted_p95(mid, small, busy) < 34.5 * 0.7  # by latency alone it would step up
    assert not decide(config, [mid, small], PolicyState(small.variant_id), busy, now=10.0).switch
    lighter = replace(busy, requests=60, rate=120.0)  # 45% busy on 64x
    up = decide(config, [mid, small], PolicyState(small.variant_id), lighter, now=10.0)
    assert up.switch and up.target == mid.variant_id and up.reason_code == ReasonCode.HEADROOM


def test_no_step_up_while_other_work_keeps_the_device_busy():
    """The agent's own CPU time does not show what other processes on the device take (a load generator
    on the same cores, say): a step up must also leave the whole device's CPU headroom."""
    small = Option("s" * 64, 0.61, p50_ms=2.46, p95_ms=2.90, name="256x")
    mid = Option("m" * 64, 0.78, p50_ms=3.07, p95_ms=3.58, name="64x")
    config = PolicyConfig(slo_ms=34.5, up_windows=1, up_headroom=0.7, dwell_s=0.0)
    light = Window(requests=60, p95_ms=4.0, rate=120.0, slots=1, cpu_ms_per_request=3.1, device_busy=0.3, cores=2)
    up = decide(config, [mid, small], PolicyState(small.variant_id), light, now=10.0)
    assert up.switch and up.target == mid.variant_id and "device 34% busy" in up.reason  # 0.3 + 120 x 0.61 ms / 2
    crowded = replace(light, device_busy=0.68)  # the same load, with the device busy with other work
    assert not decide(config, [mid, small], PolicyState(small.variant_id), crowded, now=10.0).switch


def test_the_time_a_request_holds_a_slot_counts_when_it_is_more_than_its_cpu_time():
    """Waits for the CPU and for Python's lock cost no CPU time, but hold the slot: by CPU time alone the
    slower variant leaves room at this rate, by the time each request held the slot it does not."""
    small = Option("s" * 64, 0.61, p50_ms=0.92, p95_ms=1.04, name="256x")
    mid = Option("m" * 64, 0.78, p50_ms=1.39, p95_ms=1.50, name="64x")
    config = PolicyConfig(slo_ms=30.7, up_windows=1, up_headroom=0.7, dwell_s=0.0)
    by_cpu = Window(requests=115, p95_ms=4.3, rate=231.0, slots=1, cpu_ms_per_request=2.5)
    assert decide(config, [mid, small], PolicyState(small.variant_id), by_cpu, now=10.0).switch
    held = replace(by_cpu, slot_ms_per_request=2.9)  # 231 x (2.9 + 0.47) ms: 78% busy on 64x
    assert not decide(config, [mid, small], PolicyState(small.variant_id), held, now=10.0).switch


def test_pins_and_fallbacks_do_not_use_up_the_cap_on_automatic_switches():
    config = PolicyConfig(slo_ms=30.0, down_windows=1, up_windows=1, dwell_s=0.0, max_switches_per_minute=1)
    state, now = PolicyState(MID.variant_id), 100.0
    for pin in (SLOW, FAST, SLOW):  # the operator moves the edge around
        now += 1.0
        state = decide(replace(config, pinned_variant=pin.variant_id), OPTIONS, state, Window(10, 5.0), now).state
    now += 1.0
    state = decide(config, OPTIONS, state, Window(10, 5.0), now).state  # unpinned, on SLOW
    assert state.recent_switches == ()
    down = decide(config, OPTIONS, state, Window(10, 100.0), now + 1.0)  # to FAST: never capped
    up = decide(config, OPTIONS, down.state, Window(10, 0.1), now + 2.0)  # the one step-up the cap allows
    assert (down.reason_code, up.reason_code) == (ReasonCode.SLO_VIOLATION, ReasonCode.HEADROOM) and up.switch
    down = decide(config, OPTIONS, up.state, Window(10, 100.0), now + 3.0)
    held = decide(config, OPTIONS, down.state, Window(10, 0.1), now + 4.0)
    assert down.switch and not held.switch and held.reason_code == ReasonCode.CAPPED


def test_a_queue_that_takes_the_slo_to_serve_steps_down_before_any_answer_is_late():
    """At the start of a step up in load the answered requests are still on time (p95 under the SLO,
    rate at what was answered), but the inferences in flight would take the active variant the whole
    SLO to serve: the last of them will be late, so the policy steps down now."""
    config = PolicyConfig(slo_ms=30.0, down_windows=1, up_windows=1, dwell_s=0.0)
    on_time = Window(requests=10, p95_ms=12.0, rate=40.0, slots=1, in_flight=1)
    assert not decide(config, OPTIONS, PolicyState(SLOW.variant_id), on_time, now=10.0).switch  # no queue
    assert queue_ms(SLOW, SLOW, replace(on_time, in_flight=2)) == 40.0  # 2 x 20 ms on one slot
    queued = replace(on_time, in_flight=2)
    down = decide(config, OPTIONS, PolicyState(SLOW.variant_id), queued, now=10.0)
    assert down.switch and down.reason_code == ReasonCode.SLO_VIOLATION and "2 inferences in flight" in down.reason
    assert down.target == MID.variant_id  # the most accurate that serves the two within the SLO: 2 x 8 ms
    two_slots = replace(queued, slots=2)  # the same two run at once: no queue
    assert queue_ms(SLOW, SLOW, two_slots) == 0.0
    assert not decide(config, OPTIONS, PolicyState(SLOW.variant_id), two_slots, now=10.0).switch
