"""The policy contract between the coordinator and its edges, stated once.

An operator sets the switching policy on the coordinator (`Policy` in `protos/coordinator.proto`);
the coordinator fills what was left unset and refuses what is out of range (`cloud.service.validation`),
then hands it to every edge, which applies it on its own measurements (`edge.policy`). Both sides read
the defaults, the ranges and the rule for unset fields from here, so a policy the coordinator accepts
is one every edge applies, and an edge never runs on a value the coordinator would have refused.

The reason codes an edge reports with each decision (`ReasonCode`) are part of the same contract: they
travel as the `reason_code` string of a `SwitchEvent` and label the edge's switch counter.
"""

from __future__ import annotations

import enum
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

from common.errors import PrunefleetError
from common.registry import lookup


class PolicyContractError(PrunefleetError, ValueError):
    """A policy setting out of its range or of the wrong type; the message names the setting."""


@dataclass(frozen=True)
class Setting:
    """One operator-settable policy setting: its default and the range it must lie in. A bound of None
    is no bound; `low_open`/`high_open` make a bound exclusive. Numbers must also be finite.
    `zero_means_default`: 0 (the protobuf default, what an operator who did not set it sends) stands
    for the default, since 0 is no usable value for it."""

    name: str
    default: float | int | str
    help: str
    unit: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    zero_means_default: bool = False

    def __post_init__(self) -> None:
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"{self.name}: low bound {self.low} above high bound {self.high}")
        found = self.problem(self.default)
        if found is not None:
            raise ValueError(f"the default of {found}")

    @property
    def kind(self) -> type:
        """The value's type, as the proto field holds it: float, int or str."""
        return type(self.default)

    @property
    def range_text(self) -> str:
        """The range in words an operator reads: `in [0.1, 60]`, `in (0, 1]`, `>= 1`."""
        if self.low is not None and self.high is not None:
            opening, closing = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {opening}{self.low:g}, {self.high:g}{closing}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return "any string" if self.kind is str else "any finite number"

    @property
    def described(self) -> str:
        """Default and range in one line, for help texts."""
        unit = f" {self.unit}" if self.unit else ""
        default = repr(self.default) if self.kind is str else f"{self.default:g}{unit}"
        zero = "; 0 = the default" if self.zero_means_default else ""
        return f"default {default}; {self.range_text}{unit if self.kind is not str else ''}{zero}"

    def contains(self, value: float) -> bool:
        """`value` lies within the bounds (a number, not checked for type or finiteness here)."""
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def problem(self, value: object) -> str | None:
        """What is wrong with `value` for this setting, naming it; None if it is fine."""
        if self.kind is str:
            return None if isinstance(value, str) else f"{self.name} must be a string, got {value!r}"
        wanted = numbers.Integral if self.kind is int else numbers.Real
        if isinstance(value, bool) or not isinstance(value, wanted):
            return f"{self.name} must be {'an integer' if self.kind is int else 'a number'}, got {value!r}"
        if not math.isfinite(value):
            return f"{self.name} must be finite, got {value!r}"
        if not self.contains(value):
            return f"{self.name} must be {self.range_text}, got {value!r}"
        return None


_SETTINGS = (
    Setting("slo_ms", 50.0, "p95 latency objective per request", "ms", low=0.001, high=3.6e6, zero_means_default=True),
    Setting("min_accuracy", 0.0, "never pick a variant below this accuracy, 0 for no floor", low=0.0, high=1.0),
    Setting("down_windows", 2, "consecutive windows over the SLO before stepping down", low=1, zero_means_default=True),
    Setting("up_windows", 3, "consecutive windows with headroom before stepping up", low=1, zero_means_default=True),
    Setting(
        "up_headroom",
        0.7,
        "step up only if the predicted p95 is under slo_ms x up_headroom",
        low=0.0,
        high=1.0,
        low_open=True,
        zero_means_default=True,
    ),
    # 0 s is a real dwell: it takes its default only when the whole policy is unset (see `filled`)
    Setting("dwell_s", 5.0, "minimum seconds on a variant before stepping up again, 0 for none", "s", low=0.0),
    Setting("window_s", 1.0, "telemetry window the edges decide on", "s", low=0.1, high=60.0, zero_means_default=True),
    Setting(
        "max_switches_per_minute",
        6,
        "cap on step-ups in any 60 s; step-downs, which protect the SLO, are never held back",
        low=1,
        high=600,
        zero_means_default=True,
    ),
    Setting("pinned_variant", "", "serve only this variant id ('' unpins)"),
)
SETTINGS: dict[str, Setting] = {s.name: s for s in _SETTINGS}
ZERO_MEANS_DEFAULT = frozenset(s.name for s in _SETTINGS if s.zero_means_default)


def setting(name: str) -> Setting:
    """The setting called `name`; a miss lists the known ones."""
    return lookup(SETTINGS, "policy setting", name)


def defaults() -> dict[str, float | int | str]:
    """Every setting at its default."""
    return {name: s.default for name, s in SETTINGS.items()}


def _read(values: Mapping | object, name: str) -> object:
    """A setting's value from a mapping (missing = unset) or an object with attributes (a proto)."""
    if isinstance(values, Mapping):
        return values.get(name, SETTINGS[name].kind())
    return getattr(values, name)


def is_unset(values: Mapping | object) -> bool:
    """No setting is set at all: every one at its zero value (an empty `Policy`)."""
    return all(_read(values, name) == s.kind() for name, s in SETTINGS.items())


def filled(values: Mapping | object, **fallbacks: float | int | str) -> dict[str, object]:
    """Every setting's value, with the unset ones at their defaults: a setting in `ZERO_MEANS_DEFAULT`
    whose value is 0 takes its default, and an entirely unset policy takes every default (the one way
    `dwell_s` gets its default, since 0 s is a real dwell). `fallbacks` replace defaults (an edge
    keeps its own telemetry window when the policy sets none). Values are not checked: see `problem`."""
    for name in fallbacks:
        setting(name)  # a misspelt fallback is an error, not a silently ignored one
    base = {**defaults(), **fallbacks}
    unset = is_unset(values)
    out = {}
    for name, s in SETTINGS.items():
        value = _read(values, name)
        out[name] = base[name] if unset or (s.zero_means_default and value == 0) else value
    return out


def problem(values: Mapping | object) -> str | None:
    """The first setting out of its range or of the wrong type, named in words; None if all are fine.
    Reads `values` as they are (fill them first with `filled` where 0 means unset)."""
    return next((found for name, s in SETTINGS.items() if (found := s.problem(_read(values, name)))), None)


def check(values: Mapping | object) -> None:
    """Raise `PolicyContractError` naming the first setting out of its range (see `problem`)."""
    found = problem(values)
    if found is not None:
        raise PolicyContractError(found)


class ReasonCode(enum.StrEnum):
    """Why an edge decided what it did. Each member equals its string, which is what the wire (the
    `reason_code` of a `SwitchEvent`) and the `reason` label of the edge's switch counter carry."""

    STAY = "stay"  # kept the active variant, nothing to record
    INITIAL = "initial"  # the first choice, before any traffic
    PORTFOLIO = "portfolio"  # the active variant left the portfolio: the best fit of the new one
    PINNED = "pinned"  # the operator's pin
    UNPINNED = "unpinned"  # the pin was lifted: the policy decides again (recorded, no switch)
    SLO_VIOLATION = "slo_violation"  # a step down: over the SLO, saturated or queued
    HEADROOM = "headroom"  # a step up: a more accurate variant is predicted to fit
    CAPPED = "capped"  # a step up held back by `max_switches_per_minute` (recorded once, no switch)
    FALLBACK = "fallback"  # no telemetry or no profile of the active variant: the smallest variant


CAPPED_CODES: frozenset[ReasonCode] = frozenset({ReasonCode.HEADROOM})  # what the per-minute cap applies to
