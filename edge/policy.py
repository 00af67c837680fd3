"""The switching policy as pure functions: no I/O, no clock; the caller passes time and measurements.

Objective: the most accurate variant whose p95 latency stays under the SLO. The edge predicts a
variant's p95 from its own on-device profile and the live window: the observed p95 scaled by the
ratio of profiled p95s (candidate / active); in an idle window, the profiled p95 itself. A variant
that the window's request rate would overload (utilization = rate x (profiled p50 + overhead) /
inference slots above `MAX_UTILIZATION`) is predicted to miss any SLO: scaling latencies says nothing
about a queue that would grow without bound, and without this a loaded edge would step up into
overload and flap.
A request costs more than its forward pass: decoding, gRPC and Python take the same time whatever the
variant. The window measures it (the serving process's CPU time per request, or the wall time a
request held a slot if that is more, less the active variant's profiled p50) and every utilization
counts it. Waits for the CPU and for Python's lock (a small model's pass is many short operators,
each taking it, while gRPC's threads want it too) cost no CPU time but hold the slot: in the policy
benchmark a variant whose CPU-time estimate left room fell behind with the device's CPU 41% busy.
With intra-op threads a forward pass uses more CPU than its latency, which only makes the CPU
estimate conservative.

Candidates are the variants at or above the accuracy floor (all of them if none is), reduced to the
Pareto frontier: a variant that is slower than another (at p50 and p95) and not more accurate is
never a candidate.

Constraints: a variant bigger than the memory budget (`memory_budget_bytes`, 0 = none) is never a
candidate; the accuracy floor is soft (all variants qualify when none reaches it).

A window also counts as over the SLO when its request rate keeps the active variant busy more than
`SATURATION` of the time (the same utilization): open-loop load beyond what a variant serves
grows a queue whose p95 crosses the SLO only later, with a backlog that then takes long to drain.
The gap between `MAX_UTILIZATION` (no step up beyond it) and `SATURATION` is hysteresis too.
Utilization counts requests, each at the profiled p50 of the typical batch plus the overhead; with
micro-batching, requests that share a pass cost less than that, so both guards are conservative there.

A step down goes to the most accurate candidate predicted under `slo * up_headroom`, the bound a step
up would need, else to the most accurate predicted under the SLO, else to the fastest: in the policy
benchmark, step downs to a variant predicted just under the SLO (23.2 ms against 27.9) were followed
by a second step down within seconds.

Hysteresis: stepping down needs `down_windows` consecutive windows over the SLO, and at least two
when the load does not explain them (`explained_by_load`): in the policy benchmark, single windows
whose p95 crossed the SLO by a millisecond or two at the steady phase's rate (a stall of the machine)
cost two switches each, down and back up a few seconds later. Stepping up needs
`up_windows` consecutive windows in which a more accurate candidate is predicted under
`slo * up_headroom`, busy at most `up_headroom` of the time (open-loop arrivals queue behind one
another long before a variant is fully busy), and leaving the device's CPU, with every process on it,
busy at most `up_headroom` of the time (other processes slow the agent down in ways its own CPU time
does not show: in the policy benchmark, the load generator on the same cores), and `dwell_s` seconds
since the last switch. A window in between resets both
counts, so load that hovers around the SLO never flaps. On top of that, at most
`max_switches_per_minute` step-ups happen in any 60 s; one held back by the cap is recorded once
("capped") and happens when the minute allows it, if it is still wanted. Step-downs protect the SLO
and are never held back: each one goes to a faster variant, so between two step-ups there are at most
as many as there are variants, and a minute holds at most (cap + 1) x variants switches.

Failed steps are remembered: a variant the edge left for being over the SLO at a request rate R sets
a ceiling for `CEILING_S` seconds: while the rate stays above `CEILING_RATE` x R and the SLO is no
looser, neither it nor any variant as slow (by profiled p50) is a step-up. A prediction that proved
wrong under this load is not tried again and again, each time costing a window of late requests. The
ceiling is lower when the step down skipped variants the window predicted over the bound it chose
under (the headroom, or the SLO): the fastest of them bounds it. The window under overload measures
what a request costs there; a calmer window on a faster variant a few seconds later may predict that
a skipped variant fits, but the load that overloaded the device has not changed (in the policy
benchmark, a step down from 4x to 256x was followed by a step up to 64x that fell behind 15 s later).

The operator's pin wins over everything; unpinning is recorded ("unpinned") and the policy resumes
from the pinned variant. Without telemetry (`window` is None: the window could not be read or is
stale) or without a profile of the active variant, the edge falls back to the smallest variant
("fallback"), the one least likely to miss the SLO or the memory budget. Pins, the initial choice
and fallbacks are neither capped nor counted towards the cap.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from common.files import short_id

MIN_SLO_MS, MAX_SLO_MS = 0.001, 3.6e6  # 1 us (the SLO bucket's resolution) to an hour
DEFAULTS = {
    "slo_ms": 50.0,
    "down_windows": 2,
    "up_windows": 3,
    "up_headroom": 0.7,
    "window_s": 1.0,
    "max_switches_per_minute": 6,
}
DEFAULT_DWELL_S = 5.0
STAY = "stay"
MAX_UTILIZATION = 0.85
SATURATION = 0.95  # the active variant busy this share of the time: a queue is building
QUEUE_ALARM = 1.0  # inferences in flight that would take this share of the SLO to serve: the last is late
CAPPED_CODES = ("headroom",)  # the switches the per-minute cap applies to: step-ups
CEILING_S = 60.0  # how long a variant left for being over the SLO bounds step-ups
CEILING_RATE = 0.8  # ... at request rates above this share of the rate it was left at


@dataclass(frozen=True)
class PolicyConfig:
    slo_ms: float = 50.0
    min_accuracy: float = 0.0
    down_windows: int = 2
    up_windows: int = 3
    up_headroom: float = 0.7
    dwell_s: float = DEFAULT_DWELL_S
    window_s: float = 1.0
    pinned_variant: str = ""
    version: int = 0
    max_switches_per_minute: int = 6
    memory_budget_bytes: int = 0  # the device's budget (0 = none): bigger variants are no candidates

    def __post_init__(self) -> None:
        if not MIN_SLO_MS <= self.slo_ms <= MAX_SLO_MS or self.window_s <= 0:
            raise ValueError(f"slo_ms must be in [{MIN_SLO_MS}, {MAX_SLO_MS:g}] and window_s positive")
        if not 0 < self.up_headroom <= 1 or not 0 <= self.min_accuracy <= 1:
            raise ValueError("up_headroom must be in (0, 1] and min_accuracy in [0, 1]")
        if self.down_windows < 1 or self.up_windows < 1 or self.dwell_s < 0:
            raise ValueError("down_windows and up_windows must be >= 1, dwell_s >= 0")
        if self.max_switches_per_minute < 1 or self.memory_budget_bytes < 0:
            raise ValueError("max_switches_per_minute must be >= 1 and memory_budget_bytes >= 0")

    @classmethod
    def from_proto(cls, policy, window_s: float = DEFAULTS["window_s"], memory_budget_bytes: int = 0) -> PolicyConfig:
        """From a coordinator_pb2.Policy. Fields left at 0 take the defaults (`window_s` when unset);
        `dwell_s` takes its default only when the whole policy is unset, since 0 s is a real choice.
        The memory budget is the device's own, not the coordinator's."""
        defaults = {**DEFAULTS, "window_s": window_s}
        values = {name: getattr(policy, name) or default for name, default in defaults.items()}
        dwell_s = policy.dwell_s if policy.slo_ms else policy.dwell_s or DEFAULT_DWELL_S
        return cls(
            min_accuracy=policy.min_accuracy,
            dwell_s=dwell_s,
            pinned_variant=policy.pinned_variant,
            version=policy.version,
            memory_budget_bytes=memory_budget_bytes,
            **values,
        )


@dataclass(frozen=True)
class Option:
    """One variant as this device sees it: accuracy from the portfolio, latency from its own profile
    at the agent's typical batch."""

    variant_id: str
    accuracy: float
    p50_ms: float
    p95_ms: float
    name: str = ""
    size_bytes: int = 0  # what holding it costs (0 = unknown)

    @property
    def label(self) -> str:
        return self.name or short_id(self.variant_id)


@dataclass(frozen=True)
class Window:
    requests: int
    p95_ms: float
    rate: float = 0.0  # requests per second that came in the window: answered, failed, or still in flight
    slots: int = 1  # concurrent inferences the device runs
    cpu_ms_per_request: float = 0.0  # the serving process's CPU time per answered request (0 = unknown)
    in_flight: int = 0  # inferences running or waiting for a slot when the window closed
    device_busy: float = 0.0  # share of the device's CPU in use over the window, every process (0 = unknown)
    cores: int = 1  # the device's CPU cores
    slot_ms_per_request: float = 0.0  # wall time each answered request held a slot (0 = unknown)


@dataclass(frozen=True)
class Ceiling:
    """No step-up to a variant as slow as `p50_ms` while the rate is above `CEILING_RATE` x `rate`
    and the SLO at most `slo_ms`."""

    p50_ms: float  # profiled p50 of the variant left for being over the SLO
    rate: float  # requests per second when it was left
    slo_ms: float  # the SLO it missed
    at: float  # when


@dataclass(frozen=True)
class PolicyState:
    active: str
    over_count: int = 0
    under_count: int = 0
    last_switch_at: float = 0.0
    recent_switches: tuple[float, ...] = ()  # times of the switches in the last minute
    pinned: str = ""  # the variant the operator pinned, while the pin holds
    capped: bool = False  # the last wanted switch was held back by the cap (recorded once)
    ceilings: tuple[Ceiling, ...] = ()  # from recent step-downs


@dataclass(frozen=True)
class Decision:
    target: str  # the variant to serve; equal to the active one when staying
    reason: str
    reason_code: str  # "stay" (not recorded), or "initial", "pinned", "unpinned", "slo_violation",
    #                   "headroom", "fallback", "capped" (recorded)
    state: PolicyState
    switch: bool = False  # the variant changes
    predicted_p95_ms: float = 0.0  # the target's predicted p95 (0 when not predicted)

    @property
    def recorded(self) -> bool:
        """Worth an event: a switch, or a decision the operator should see (cap, unpin)."""
        return self.reason_code != STAY


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


def overhead_ms(active: Option, window: Window) -> float:
    """What a request costs beyond the model's forward pass as profiled, as the window measured it: the
    larger of the process's CPU time per request (decoding, gRPC, Python) and the wall time a request
    held a slot (the forward pass as slowed by other processes and by waits for Python's lock, which
    cost no CPU time), less the active variant's profiled p50; never below 0. The same for every
    variant, since only the forward pass changes between them."""
    return max(0.0, window.cpu_ms_per_request - active.p50_ms, window.slot_ms_per_request - active.p50_ms)


def utilization(option: Option, active: Option, window: Window) -> float:
    """Share of the time `option` would be busy serving the window's request rate on its slots, each
    request costing its profiled p50 plus the overhead measured while `active` served."""
    return window.rate * (option.p50_ms + overhead_ms(active, window)) / 1e3 / max(window.slots, 1)


def device_busy(option: Option, active: Option, window: Window) -> float:
    """Share of the device's CPU that would be in use serving the window's rate on `option`: what was
    in use (every process) plus the forward passes' difference, one core each."""
    return window.device_busy + window.rate * (option.p50_ms - active.p50_ms) / 1e3 / max(window.cores, 1)


def queue_ms(option: Option, active: Option, window: Window) -> float:
    """How long the inferences in flight at the window's close would take `option` to serve on the
    device's slots, each costing its p50 plus the overhead measured on `active` (0 while no request
    waits for a slot)."""
    if window.in_flight <= window.slots:
        return 0.0
    return window.in_flight / max(window.slots, 1) * (option.p50_ms + overhead_ms(active, window))


def queued(config: PolicyConfig, active: Option, window: Window) -> bool:
    """The inferences in flight would take `active` at least `QUEUE_ALARM` of the SLO to serve."""
    return queue_ms(active, active, window) >= QUEUE_ALARM * config.slo_ms


def explained_by_load(config: PolicyConfig, active: Option, window: Window) -> bool:
    """The window's request rate keeps `active` busy more than `up_headroom` of the time, each request
    costing its profiled p50 plus the CPU time the window measured beyond it; or the rate is unknown
    (0), and the p95 alone decides. The wall time requests held the slot is left out here: a stall of
    the device (the process descheduled, a page fault storm) inflates it without any change in load."""
    if window.rate <= 0:
        return True
    cost_ms = active.p50_ms + max(0.0, window.cpu_ms_per_request - active.p50_ms)
    return window.rate * cost_ms / 1e3 / max(window.slots, 1) > config.up_headroom


def predicted_p95(candidate: Option, active: Option, window: Window) -> float:
    """The p95 `candidate` would show under this window's load, and no less than the time it would take
    to serve the inferences in flight."""
    if window.requests <= 0:
        return max(candidate.p95_ms, queue_ms(candidate, active, window))
    if utilization(candidate, active, window) > MAX_UTILIZATION:
        return float("inf")
    return max(window.p95_ms * candidate.p95_ms / max(active.p95_ms, 1e-9), queue_ms(candidate, active, window))


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
    reason_code: str,
    state: PolicyState,
    now: float,
    predicted: float = 0.0,
) -> Decision:
    """Switch to `target`, unless the per-minute cap holds a step-up back."""
    recent = _recent(state, now)
    if reason_code in CAPPED_CODES and len(recent) >= config.max_switches_per_minute:
        held = replace(state, recent_switches=recent, capped=True)
        if state.capped:
            return Decision(state.active, "switch held back by the cap, waiting", STAY, held)
        return Decision(
            state.active,
            f"wanted {target.label} ({reason}); held back: {len(recent)} step-ups in the "
            f"last minute, cap {config.max_switches_per_minute}",
            "capped",
            held,
            predicted_p95_ms=predicted,
        )
    counted = recent + (now,) if reason_code in CAPPED_CODES else recent
    ceilings = tuple(c for c in state.ceilings if now - c.at < CEILING_S)
    new_state = PolicyState(
        target.variant_id,
        last_switch_at=now,
        recent_switches=counted,
        pinned=target.variant_id if reason_code == "pinned" else "",
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
        return Decision(active.variant_id, "over the SLO, and no faster variant fits better", STAY, state)
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
    return _switched(config, target, reason, "slo_violation", state, now, predicted)


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
        return Decision(active.variant_id, "steady", STAY, replace(state, over_count=0, under_count=0, capped=False))
    state = replace(state, over_count=0, under_count=state.under_count + 1)
    if state.under_count < config.up_windows or now - state.last_switch_at < config.dwell_s:
        return Decision(active.variant_id, "headroom, waiting", STAY, state)
    target, predicted = best
    reason = (
        f"p95 {window.p95_ms:.1f} ms leaves headroom under SLO {config.slo_ms:.1f} ms for "
        f"{state.under_count} windows at {window.rate:.1f} req/s; predicted {predicted:.1f} ms on {target.label}, "
        f"device {device_busy(target, active, window):.0%} busy"
    )
    return _switched(config, target, reason, "headroom", state, now, predicted)


def _pin_or_unpin(config: PolicyConfig, by_id: dict[str, Option], state: PolicyState, now: float) -> Decision | None:
    pinned = by_id.get(config.pinned_variant)
    if pinned is not None:
        if state.active == pinned.variant_id:
            reason_code = "pinned" if state.pinned != pinned.variant_id else STAY
            return Decision(
                state.active,
                "pinned",
                reason_code,
                replace(state, over_count=0, under_count=0, pinned=pinned.variant_id),
            )
        return _switched(config, pinned, f"pinned by the operator to {pinned.label}", "pinned", state, now)
    if state.pinned:
        name = by_id[state.pinned].label if state.pinned in by_id else short_id(state.pinned)
        return Decision(
            state.active,
            f"unpinned by the operator from {name}; the policy decides again",
            "unpinned",
            replace(state, pinned="", over_count=0, under_count=0, capped=False),
        )
    return None


def _fallback(config: PolicyConfig, options: list[Option], state: PolicyState, why: str, now: float) -> Decision:
    target = smallest(options)
    if target.variant_id == state.active:
        return Decision(state.active, f"{why}; already on the smallest variant", STAY, state)
    return _switched(
        config,
        target,
        f"{why}; fell back to the smallest variant, {target.label}",
        "fallback",
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
        return Decision(state.active, "no variant to choose from", STAY, state)
    pin = _pin_or_unpin(config, by_id, state, now)
    if pin is not None:
        return pin
    active = by_id.get(state.active)
    if not state.active:
        choice = initial_choice(config, options)
        return _switched(
            config, choice, f"no active variant; chose {choice.label}", "initial", state, now, choice.p95_ms
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
        return Decision(active.variant_id, "over the SLO, waiting", STAY, state)
    return _step_up(config, candidates, active, window, state, now)
