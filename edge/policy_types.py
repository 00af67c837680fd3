"""The values the switching policy (`edge.policy`) decides on and returns: its settings (`PolicyConfig`),
each variant as this device sees it (`Option`), a telemetry window (`Window`), the state carried from
one window to the next (`PolicyState`, with its `Ceiling`s) and the outcome (`Decision`). All frozen:
a decision never changes what it was given."""

from __future__ import annotations

from dataclasses import dataclass

from common import policy_contract as contract
from common.files import short_id
from common.policy_contract import ReasonCode

_DEFAULTS = contract.defaults()


@dataclass(frozen=True)
class PolicyConfig:
    """The policy an edge applies: the operator's settings, with defaults and ranges from the contract
    (`common.policy_contract`), plus what only the device knows (its memory budget)."""

    slo_ms: float = _DEFAULTS["slo_ms"]
    min_accuracy: float = _DEFAULTS["min_accuracy"]
    down_windows: int = _DEFAULTS["down_windows"]
    up_windows: int = _DEFAULTS["up_windows"]
    up_headroom: float = _DEFAULTS["up_headroom"]
    dwell_s: float = _DEFAULTS["dwell_s"]
    window_s: float = _DEFAULTS["window_s"]
    pinned_variant: str = _DEFAULTS["pinned_variant"]
    version: int = 0
    max_switches_per_minute: int = _DEFAULTS["max_switches_per_minute"]
    memory_budget_bytes: int = 0  # the device's budget (0 = none): bigger variants are no candidates

    def __post_init__(self) -> None:
        contract.check(self)
        if self.memory_budget_bytes < 0:
            raise ValueError("memory_budget_bytes must be >= 0")

    @classmethod
    def from_proto(cls, policy, window_s: float | None = None, memory_budget_bytes: int = 0) -> PolicyConfig:
        """From a coordinator_pb2.Policy, its unset fields filled as the contract says (`filled`): the
        same rule the coordinator applies. `window_s` is the edge's own telemetry window, used when the
        policy sets none. The memory budget is the device's own, not the coordinator's."""
        fallbacks = {} if window_s is None else {"window_s": window_s}
        settings = contract.filled(policy, **fallbacks)
        return cls(**settings, version=policy.version, memory_budget_bytes=memory_budget_bytes)


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
    """One telemetry window as the agent measured it, on the active variant."""

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
    """No step-up to a variant as slow as `p50_ms` while the rate is above `edge.policy.CEILING_RATE`
    x `rate` and the SLO at most `slo_ms`."""

    p50_ms: float  # profiled p50 of the variant left for being over the SLO
    rate: float  # requests per second when it was left
    slo_ms: float  # the SLO it missed
    at: float  # when


@dataclass(frozen=True)
class PolicyState:
    """What the policy carries from one window to the next."""

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
    """What to serve after a window, why, and the state to carry into the next one."""

    target: str  # the variant to serve; equal to the active one when staying
    reason: str  # in words, for the operator
    reason_code: ReasonCode  # the contract's code: STAY is not recorded, every other one is
    state: PolicyState
    switch: bool = False  # the variant changes
    predicted_p95_ms: float = 0.0  # the target's predicted p95 (0 when not predicted)

    @property
    def recorded(self) -> bool:
        """Worth an event: a switch, or a decision the operator should see (cap, unpin)."""
        return self.reason_code != ReasonCode.STAY
