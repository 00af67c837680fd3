"""The switching policy as pure functions: no I/O, no clock; the caller passes time and measurements.

Objective: the most accurate variant whose p95 latency stays under the SLO. The edge predicts a
variant's latency from its own on-device profile and the live window: a variant that the current
request rate would overload (utilization over `max_utilization`) is out; otherwise its p95 is the
observed p95 scaled by the ratio of profiled service times. Hysteresis: stepping down needs
`down_windows` consecutive windows over the SLO; stepping up needs `up_windows` consecutive windows
with headroom (predicted p95 under slo * up_headroom) and `dwell_s` on the current variant.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

MAX_UTILIZATION = 0.85
DEFAULTS = {"down_windows": 2, "up_windows": 3, "up_headroom": 0.7, "dwell_s": 5.0, "window_s": 1.0}


@dataclass(frozen=True)
class PolicyConfig:
    slo_ms: float = 50.0
    min_accuracy: float = 0.0
    down_windows: int = 2
    up_windows: int = 3
    up_headroom: float = 0.7
    dwell_s: float = 5.0
    window_s: float = 1.0
    pinned_variant: str = ""
    version: int = 0

    def __post_init__(self) -> None:
        if self.slo_ms <= 0 or self.window_s <= 0 or not 0 < self.up_headroom <= 1:
            raise ValueError("slo_ms and window_s must be positive and up_headroom in (0, 1]")
        if self.down_windows < 1 or self.up_windows < 1 or self.dwell_s < 0:
            raise ValueError("down_windows and up_windows must be >= 1, dwell_s >= 0")

    @classmethod
    def from_proto(cls, policy) -> PolicyConfig:
        """From a coordinator_pb2.Policy; zero fields that cannot be zero take the defaults."""
        values = {name: getattr(policy, name) or default for name, default in DEFAULTS.items()}
        return cls(slo_ms=policy.slo_ms or 50.0, min_accuracy=policy.min_accuracy, dwell_s=policy.dwell_s,
                   pinned_variant=policy.pinned_variant, version=policy.version,
                   **{k: v for k, v in values.items() if k != "dwell_s"})


@dataclass(frozen=True)
class Option:
    """One variant as this device sees it: accuracy from the portfolio, latency from its own profile."""

    variant_id: str
    name: str
    accuracy: float
    service_ms: float  # profiled p50 at the agent's typical batch
    p95_ms: float  # profiled p95 at the typical batch


@dataclass(frozen=True)
class Window:
    requests: int
    rate: float  # requests per second
    p95_ms: float


@dataclass(frozen=True)
class PolicyState:
    active: str
    over_count: int = 0
    under_count: int = 0
    last_switch_at: float = 0.0


@dataclass(frozen=True)
class Decision:
    target: str  # variant id to serve; equal to state.active when staying
    reason: str
    reason_code: str  # "stay", "pinned", "slo_violation", "headroom"
    state: PolicyState

    @property
    def switch(self) -> bool:
        return self.reason_code not in ("stay",)


def frontier(config: PolicyConfig, options: list[Option]) -> list[Option]:
    """Candidates above the accuracy floor, without any variant that is slower and not more accurate."""
    eligible = [o for o in options if o.accuracy >= config.min_accuracy] or list(options)
    by_speed = sorted(eligible, key=lambda o: (o.service_ms, -o.accuracy))
    kept: list[Option] = []
    for option in by_speed:
        if not kept or option.accuracy > kept[-1].accuracy:
            kept.append(option)
    return kept


def predicted_p95(candidate: Option, active: Option, window: Window, slots: int) -> float:
    """Predicted p95 of `candidate` under the window's load; infinite when it would be overloaded."""
    if window.requests == 0:
        return candidate.p95_ms
    if window.rate * candidate.service_ms / 1e3 / slots > MAX_UTILIZATION:
        return float("inf")
    return window.p95_ms * candidate.service_ms / max(active.service_ms, 1e-6)


def initial_choice(config: PolicyConfig, options: list[Option]) -> Option:
    """Before any traffic: the most accurate variant whose profiled p95 leaves headroom, else the fastest."""
    candidates = frontier(config, options)
    fitting = [o for o in candidates if o.p95_ms <= config.slo_ms * config.up_headroom]
    return max(fitting, key=lambda o: o.accuracy) if fitting else candidates[0]


def _best_under(candidates: list[Option], active: Option, window: Window, slots: int, bound_ms: float):
    fitting = [(o, predicted_p95(o, active, window, slots)) for o in candidates]
    fitting = [(o, p) for o, p in fitting if p <= bound_ms]
    return max(fitting, key=lambda pair: pair[0].accuracy) if fitting else None


def _step_down(config, candidates, active, window, slots, state, now) -> Decision:
    best = _best_under(candidates, active, window, slots, config.slo_ms)
    target, predicted = best if best else (candidates[0], predicted_p95(candidates[0], active, window, slots))
    if target.variant_id == active.variant_id:
        return Decision(active.variant_id, "over the SLO but no faster variant", "stay", state)
    outlook = f"predicted {predicted:.1f} ms on {target.name}" if best else f"no variant fits; fastest is {target.name}"
    reason = (f"p95 {window.p95_ms:.1f} ms over SLO {config.slo_ms:.1f} ms for {state.over_count} windows at "
              f"{window.rate:.1f} req/s; {outlook}")
    return Decision(target.variant_id, reason, "slo_violation", PolicyState(target.variant_id, last_switch_at=now))


def decide(config: PolicyConfig, options: list[Option], state: PolicyState, window: Window, slots: int,
           now: float) -> Decision:
    """What to serve after this window."""
    by_id = {o.variant_id: o for o in options}
    if config.pinned_variant in by_id:
        if state.active == config.pinned_variant:
            return Decision(state.active, "pinned", "stay", state)
        return Decision(config.pinned_variant, "pinned by the operator", "pinned",
                        PolicyState(config.pinned_variant, last_switch_at=now))
    active = by_id[state.active]
    candidates = frontier(config, options)
    if window.requests > 0 and window.p95_ms > config.slo_ms:
        state = replace(state, over_count=state.over_count + 1, under_count=0)
        if state.over_count >= config.down_windows:
            return _step_down(config, candidates, active, window, slots, state, now)
        return Decision(active.variant_id, "over the SLO, waiting", "stay", state)
    best = _best_under(candidates, active, window, slots, config.slo_ms * config.up_headroom)
    if best is None or best[0].accuracy <= active.accuracy:
        return Decision(active.variant_id, "steady", "stay", replace(state, over_count=0, under_count=0))
    state = replace(state, over_count=0, under_count=state.under_count + 1)
    if state.under_count < config.up_windows or now - state.last_switch_at < config.dwell_s:
        return Decision(active.variant_id, "headroom, waiting", "stay", state)
    target, predicted = best
    reason = (f"p95 {window.p95_ms:.1f} ms leaves headroom under SLO {config.slo_ms:.1f} ms for "
              f"{state.under_count} windows at {window.rate:.1f} req/s; predicted {predicted:.1f} ms on {target.name}")
    return Decision(target.variant_id, reason, "headroom", PolicyState(target.variant_id, last_switch_at=now))
