"""The switching policy as pure functions: no I/O, no clock; the caller passes time and measurements.

Objective: serve the most accurate variant whose p95 latency stays under the SLO. Candidates are the
variants within the device's memory budget and at or above the accuracy floor (both soft: when none
qualifies, the smallest, or all, are), reduced to the Pareto frontier: a variant slower than another
(at p50 and p95) and not more accurate is never a candidate. What a variant would do under the live
load is predicted from the device's own profile and the last window (`edge.policy_load`).

Hysteresis: stepping down needs `down_windows` consecutive windows over the SLO (p95 over it, the active
variant saturated, or a queue that takes the SLO to serve), and at least two when the load does not
explain them, since one late window at a calm rate is a stall of the device, not a reason to switch
down and back up. A step down goes to the most accurate candidate predicted under `slo * up_headroom`,
else under the SLO, else to the fastest: a variant predicted just under the SLO tends to need a second
step down. Stepping up needs `up_windows` consecutive windows in which a more accurate candidate is
predicted under `slo * up_headroom` and would leave itself and the device's CPU (every process on it)
busy at most `up_headroom` of the time, and `dwell_s` since the last switch. A window in between resets
both counts, so load that hovers around a threshold never flaps.

At most `max_switches_per_minute` step-ups (`CAPPED_CODES`) happen in any 60 s; one held back is
recorded once ("capped") and happens when the minute allows it, if still wanted. Step-downs protect the
SLO and are never held back: each goes to a faster variant, so a minute holds at most (cap + 1) x
variants switches.

A variant left for being over the SLO at request rate R sets a ceiling for `CEILING_S`: while the rate
stays above `CEILING_RATE` x R and the SLO is no looser, neither it nor any variant as slow (by profiled
p50) is a step-up, so a prediction proven wrong under this load is not retried at the cost of a window
of late requests each time. Variants the step down skipped as predicted over its bound lower the
ceiling: a calmer window on a faster variant says nothing new about the load that overloaded the device.

The operator's pin wins over everything; unpinning is recorded and the policy resumes from the pinned
variant. Without telemetry (`window` is None) or without a profile of the active variant, the edge
falls back to the smallest variant, the one least likely to miss the SLO or the memory budget. Pins,
the initial choice and fallbacks are neither capped nor counted towards the cap. The settings, their
defaults and ranges, and the reason codes are the contract's (`common.policy_contract`).
"""

from __future__ import annotations

from dataclasses import replace

from common.files import short_id
from common.policy_contract import CAPPED_CODES, ReasonCode
from edge.policy_load import (  # noqa: F401 (re-exported: part of this API)
    MAX_UTILIZATION,
    QUEUE_ALARM,
    SATURATION,
    device_busy,
    explained_by_load,
    overhead_ms,
    predicted_p95,
    queue_ms,
    queued,
    utilization,
)
from edge.policy_types import Ceiling, Decision, Option, PolicyConfig, PolicyState, Window

CEILING_S = 60.0  # how long a variant left for being over the SLO bounds step-ups
CEILING_RATE = 0.8  # ... at request rates above this share of the rate it was left at


def _dominates(a: Option, b: Option) -> bool:
    """`a` is at least as accurate as `b` and at least as fast at both p50 and p95, and better in one."""
    at_least = a.accuracy >= b.accuracy and a.p50_ms <= b.p50_ms and a.p95_ms <= b.p95_ms
    return at_least and (a.accuracy, -a.p50_ms, -a.p95_ms) != (b.accuracy, -b.p50_ms, -b.p95_ms)


def frontier(config: PolicyConfig, options: list[Option]) -> list[Option]:
    """Candidates, fastest (by p50) first: within the memory budget (the smallest if none is), above
    the accuracy floor (all if none is), and none dominated by another (at least as accurate and as
    fast at both p50 and p95). Both percentiles count, so one noisy p95 from a profile taken on a busy
    device cannot hide a variant whose median is clearly faster."""
    fitting = [o for o in options if not config.memory_budget_bytes or o.size_bytes <= config.memory_budget_bytes]
    fitting = fitting or [smallest(options)]
    eligible = [o for o in fitting if o.accuracy >= config.min_accuracy] or fitting
    kept = [o for o in eligible if not any(_dominates(other, o) for other in eligible)]
    return sorted(kept, key=lambda o: (o.p50_ms, o.p95_ms, -o.accuracy, o.variant_id))


def smallest(options: list[Option]) -> Option:
    """The fallback: least memory, then fastest."""
    return min(options, key=lambda o: (o.size_bytes, o.p95_ms, o.variant_id))


def initial_choice(config: PolicyConfig, options: list[Option]) -> Option:
    """Before any traffic: the most accurate candidate whose profiled p95 leaves headroom, else the fastest."""
    if not options:
        raise ValueError("no variant to choose from")
    candidates = frontier(config, options)
    fitting = [o for o in candidates if o.p95_ms <= config.slo_ms * config.up_headroom]
    return max(fitting, key=lambda o: o.accuracy) if fitting else candidates[0]


def _best_under(candidates: list[Option], active: Option, window: Window, bound_ms: float):
    """The most accurate candidate predicted under `bound_ms`, with its prediction; None if none fits."""
    predictions = [(o, predicted_p95(o, active, window)) for o in candidates]
    fitting = [(o, p) for o, p in predictions if p <= bound_ms]
    return max(fitting, key=lambda pair: pair[0].accuracy) if fitting else None


def _recent(state: PolicyState, now: float) -> tuple[float, ...]:
    return tuple(t for t in state.recent_switches if now - t < 60.0)


def _switched(
    config: PolicyConfig,
    target: Option,
    reason: str,
    reason_code: ReasonCode,
    state: PolicyState,
    now: float,
    predicted: float = 0.0,
) -> Decision:
    """Switch to `target`, unless the per-minute cap holds a step-up back."""
    recent = _recent(state, now)
    if reason_code in CAPPED_CODES and len(recent) >= config.max_switches_per_minute:
        held = replace(state, recent_switches=recent, capped=True)
        if state.capped:
            return Decision(state.active, "switch held back by the cap, waiting", ReasonCode.STAY, held)
        return Decision(
            state.active,
            f"wanted {target.label} ({reason}); held back: {len(recent)} step-ups in the "
            f"last minute, cap {config.max_switches_per_minute}",
            ReasonCode.CAPPED,
            held,
            predicted_p95_ms=predicted,
        )
    counted = recent + (now,) if reason_code in CAPPED_CODES else recent
    ceilings = tuple(c for c in state.ceilings if now - c.at < CEILING_S)
    new_state = PolicyState(
        target.variant_id,
        last_switch_at=now,
        recent_switches=counted,
        pinned=target.variant_id if reason_code == ReasonCode.PINNED else "",
        ceilings=ceilings,
    )
    return Decision(
        target.variant_id,
        reason,
        reason_code,
        new_state,
        switch=target.variant_id != state.active,
        predicted_p95_ms=predicted,
    )


def _step_down(
    config: PolicyConfig, candidates: list[Option], active: Option, window: Window, state: PolicyState, now: float
) -> Decision:
    # with the headroom a step up needs if one fits it: a step down to a variant predicted just under
    # the SLO tends to need a second one, and each costs late requests while its window fills
    bound = config.slo_ms * config.up_headroom
    best = _best_under(candidates, active, window, bound)
    if best is None:
        bound = config.slo_ms
        best = _best_under(candidates, active, window, bound)
    target, predicted = best or (candidates[0], predicted_p95(candidates[0], active, window))
    if target.variant_id == active.variant_id:
        return Decision(active.variant_id, "over the SLO, and no faster variant fits better", ReasonCode.STAY, state)
    outlook = f"predicted {predicted:.1f} ms on {target.label}" if best else f"none fits: the fastest, {target.label}"
    if window.p95_ms > config.slo_ms:
        why = f"p95 {window.p95_ms:.1f} ms over SLO {config.slo_ms:.1f} ms"
    elif queued(config, active, window):
        why = (
            f"{window.in_flight} inferences in flight take {active.label} "
            f"{queue_ms(active, active, window):.1f} ms to serve (queue)"
        )
    else:
        why = f"{window.rate:.1f} req/s keep {active.label} {utilization(active, active, window):.0%} busy (saturated)"
    reason = f"{why} for {state.over_count} windows at {window.rate:.1f} req/s; {outlook}"
    # the variant left, and every one this window predicts over the bound the target was chosen under,
    # is no step-up at this load
    missed = [o.p50_ms for o in candidates if o.p50_ms > target.p50_ms and predicted_p95(o, active, window) > bound]
    ceiling = Ceiling(min([active.p50_ms, *missed]), window.rate, config.slo_ms, now)
    state = replace(state, ceilings=state.ceilings + (ceiling,))
    return _switched(config, target, reason, ReasonCode.SLO_VIOLATION, state, now, predicted)


def _under_ceiling(
    config: PolicyConfig, option: Option, active: Option, state: PolicyState, window: Window, now: float
) -> bool:
    """`option` may be stepped up to: no recent ceiling at this rate and SLO covers it."""
    return option.variant_id == active.variant_id or not any(
        now - c.at < CEILING_S
        and window.rate > CEILING_RATE * c.rate
        and config.slo_ms <= c.slo_ms
        and option.p50_ms >= c.p50_ms
        for c in state.ceilings
    )


def _step_up(
    config: PolicyConfig, candidates: list[Option], active: Option, window: Window, state: PolicyState, now: float
) -> Decision:
    allowed = [
        o
        for o in candidates
        if _under_ceiling(config, o, active, state, window, now)
        and (o is active or max(utilization(o, active, window), device_busy(o, active, window)) <= config.up_headroom)
    ]
    best = _best_under(allowed, active, window, config.slo_ms * config.up_headroom)
    if best is None or best[0].accuracy <= active.accuracy:
        return Decision(
            active.variant_id, "steady", ReasonCode.STAY, replace(state, over_count=0, under_count=0, capped=False)
        )
    state = replace(state, over_count=0, under_count=state.under_count + 1)
    if state.under_count < config.up_windows or now - state.last_switch_at < config.dwell_s:
        return Decision(active.variant_id, "headroom, waiting", ReasonCode.STAY, state)
    target, predicted = best
    reason = (
        f"p95 {window.p95_ms:.1f} ms leaves headroom under SLO {config.slo_ms:.1f} ms for "
        f"{state.under_count} windows at {window.rate:.1f} req/s; predicted {predicted:.1f} ms on {target.label}, "
        f"device {device_busy(target, active, window):.0%} busy"
    )
    return _switched(config, target, reason, ReasonCode.HEADROOM, state, now, predicted)


def _pin_or_unpin(config: PolicyConfig, by_id: dict[str, Option], state: PolicyState, now: float) -> Decision | None:
    pinned = by_id.get(config.pinned_variant)
    if pinned is not None:
        if state.active == pinned.variant_id:
            reason_code = ReasonCode.PINNED if state.pinned != pinned.variant_id else ReasonCode.STAY
            return Decision(
                state.active,
                "pinned",
                reason_code,
                replace(state, over_count=0, under_count=0, pinned=pinned.variant_id),
            )
        return _switched(config, pinned, f"pinned by the operator to {pinned.label}", ReasonCode.PINNED, state, now)
    if state.pinned:
        name = by_id[state.pinned].label if state.pinned in by_id else short_id(state.pinned)
        return Decision(
            state.active,
            f"unpinned by the operator from {name}; the policy decides again",
            ReasonCode.UNPINNED,
            replace(state, pinned="", over_count=0, under_count=0, capped=False),
        )
    return None


def _fallback(config: PolicyConfig, options: list[Option], state: PolicyState, why: str, now: float) -> Decision:
    target = smallest(options)
    if target.variant_id == state.active:
        return Decision(state.active, f"{why}; already on the smallest variant", ReasonCode.STAY, state)
    return _switched(
        config,
        target,
        f"{why}; fell back to the smallest variant, {target.label}",
        ReasonCode.FALLBACK,
        state,
        now,
        target.p95_ms,
    )


def decide(
    config: PolicyConfig, options: list[Option], state: PolicyState, window: Window | None, now: float
) -> Decision:
    """What to serve after this window, and the state to carry into the next one. `window` is None
    when telemetry is missing."""
    by_id = {o.variant_id: o for o in options}
    if not options:
        return Decision(state.active, "no variant to choose from", ReasonCode.STAY, state)
    pin = _pin_or_unpin(config, by_id, state, now)
    if pin is not None:
        return pin
    active = by_id.get(state.active)
    if not state.active:
        choice = initial_choice(config, options)
        return _switched(
            config, choice, f"no active variant; chose {choice.label}", ReasonCode.INITIAL, state, now, choice.p95_ms
        )
    if active is None:
        return _fallback(config, options, state, f"active variant {short_id(state.active)} has no profile", now)
    if window is None:
        return _fallback(config, options, state, "telemetry missing", now)
    candidates = frontier(config, options)
    saturated = utilization(active, active, window) > SATURATION
    if queued(config, active, window) or (window.requests > 0 and (window.p95_ms > config.slo_ms or saturated)):
        state = replace(state, over_count=state.over_count + 1, under_count=0)
        needed = config.down_windows if explained_by_load(config, active, window) else max(config.down_windows, 2)
        if state.over_count >= needed:
            return _step_down(config, candidates, active, window, state, now)
        return Decision(active.variant_id, "over the SLO, waiting", ReasonCode.STAY, state)
    return _step_up(config, candidates, active, window, state, now)
