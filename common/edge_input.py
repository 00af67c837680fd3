"""What an edge may send the coordinator: the bound of every field of `Register` and of every report on
`Connect`, stated once, for both sides.

The coordinator checks each message here before it touches the database (`register_problem`,
`report_problem`: the first problem, naming the field, or None), and an edge passes every report
through `fitted` and the same check before it sends it, so an honest edge never sends what the
coordinator refuses. The rules:

- ids are their exact form: a variant id 64 lowercase hex digits (its sha256), a portfolio id 16;
  where a field may be unset, "" is allowed;
- names, addresses and reasons are bounded in characters and printable (no newline, escape sequence
  or other control character), an edge's name letters, digits, '-', '_' and '.';
- numbers are finite and within a stated range (a timestamp is unix seconds up to the year 2100);
- no message an edge sends has a repeated field; what repeats is the reports themselves, and what
  the coordinator keeps of them per edge is bounded by its retention settings.

`fitted` makes a report of an honest edge conform where it can: a text escaped and cut to its
bound, a number clamped into its range (an unbounded prediction becomes the largest latency).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from common.escaping import fitted as fitted_text
from protos import coordinator_pb2

MAX_EDGE_NAME = 128
MAX_ADDRESS = 256
MAX_REASON = 512
MAX_THREADS = 4096
MAX_MS = 1e9  # any latency, SLO or load time, in milliseconds
MAX_RATE = 1e9  # requests per second
MAX_COUNT = 10**12  # requests and errors in a window
MAX_TIMESTAMP = 4_102_444_800.0  # 2100-01-01, unix seconds
MAX_CPU_PERCENT = 1e6
MAX_RSS_BYTES = 1 << 50
MAX_VARIANTS = 4096  # variants resident at once
MAX_BATCH = 1 << 20
MAX_VERSION = 1 << 62
MAX_SWITCH_US = 1e12
_EDGE_NAME = re.compile(rf"[\w.-]{{1,{MAX_EDGE_NAME}}}")


@dataclass(frozen=True)
class Number:
    """A finite number in [low, high]."""

    low: float
    high: float

    def problem(self, name: str, value: float) -> str | None:
        if isinstance(value, float) and not math.isfinite(value):
            return f"{name} must be finite and in [{self.low:g}, {self.high:g}], got {value}"
        if not self.low <= value <= self.high:
            return f"{name} must be in [{self.low:g}, {self.high:g}], got {value:g}"
        return None

    def fit(self, value: float):
        if isinstance(value, float) and math.isnan(value):
            return type(value)(self.low)
        return type(value)(min(max(value, self.low), self.high))


@dataclass(frozen=True)
class Text:
    """Printable text of at most `max_chars` characters, of an exact form when `form` is given."""

    max_chars: int
    form: re.Pattern | None = None
    described: str = ""  # the form in words
    required: bool = False

    def problem(self, name: str, value: str) -> str | None:
        if not value:
            return f"{name} must be set" if self.required else None
        if self.form is not None:
            if self.form.fullmatch(value):
                return None
            return f"{name} must be {self.described} ('' when unset), got '{fitted_text(value, 80)}'"
        if len(value) > self.max_chars or not value.isprintable():
            got = f"{len(value)} characters: '{fitted_text(value, 40)}'"
            return f"{name} must be at most {self.max_chars} printable characters, got {got}"
        return None

    def fit(self, value: str) -> str:
        if self.form is not None:
            return value if self.form.fullmatch(value) else ("" if not self.required else value)
        return fitted_text(value, self.max_chars)


VARIANT_ID = Text(64, re.compile(r"[0-9a-f]{64}"), "a variant id (64 lowercase hex digits)")
PORTFOLIO_ID = Text(16, re.compile(r"[0-9a-f]{16}"), "a portfolio id (16 lowercase hex digits)")
REASON_CODE = Text(32, re.compile(r"[a-z0-9_]{1,32}"), "a reason code (1-32 of a-z, 0-9 and '_')")
ADDRESS = Text(MAX_ADDRESS)
REASON = Text(MAX_REASON)
TIMESTAMP = Number(0.0, MAX_TIMESTAMP)
MS = Number(0.0, MAX_MS)
RATE = Number(0.0, MAX_RATE)
COUNT = Number(0, MAX_COUNT)
VERSION = Number(0, MAX_VERSION)

# Every field of every message an edge sends, with its rule: the one statement of the bounds.
REGISTER = {"address": ADDRESS, "metrics_address": ADDRESS, "threads": Number(0, MAX_THREADS)}
TELEMETRY = {
    "timestamp": TIMESTAMP,
    "active_variant": VARIANT_ID,
    "request_rate": RATE,
    "p50_ms": MS,
    "p95_ms": MS,
    "p99_ms": MS,
    "requests": COUNT,
    "errors": COUNT,
    "cpu_percent": Number(0.0, MAX_CPU_PERCENT),
    "rss_bytes": Number(0, MAX_RSS_BYTES),
    "resident_variants": Number(0, MAX_VARIANTS),
    "portfolio_id": PORTFOLIO_ID,
    "policy_version": VERSION,
}
SWITCH = {
    "timestamp": TIMESTAMP,
    "from_variant": VARIANT_ID,
    "to_variant": VARIANT_ID,
    "reason": REASON,
    "observed_p95_ms": MS,
    "switch_us": Number(0.0, MAX_SWITCH_US),
    "reason_code": REASON_CODE,
    "request_rate": RATE,
    "window_requests": COUNT,
    "predicted_p95_ms": MS,
    "slo_ms": MS,
    "policy_version": VERSION,
    "load_ms": MS,
}
PROFILE = {
    "variant_id": Text(64, VARIANT_ID.form, VARIANT_ID.described, required=True),
    "p50_ms_b1": MS,
    "p95_ms_b1": MS,
    "batch": Number(0, MAX_BATCH),
    "p50_ms_batch": MS,
    "p95_ms_batch": MS,
}
BODIES = {"telemetry": TELEMETRY, "switch": SWITCH, "profile": PROFILE}


def edge_name_problem(name: str) -> str | None:
    """The edge's name: 1-128 letters, digits, '-', '_' or '.'."""
    if _EDGE_NAME.fullmatch(name):
        return None
    allowed = f"1-{MAX_EDGE_NAME} characters of letters, digits, '-', '_' or '.'"
    return f"edge name must be {allowed}, got '{fitted_text(name, 80)}'"


def _fields_problem(message, rules: dict, prefix: str = "") -> str | None:
    for name, rule in rules.items():
        found = rule.problem(prefix + name, getattr(message, name))
        if found is not None:
            return found
    return None


def register_problem(request: coordinator_pb2.RegisterRequest) -> str | None:
    """What makes a Register request unacceptable (naming the field), or None."""
    return edge_name_problem(request.edge) or _fields_problem(request, REGISTER)


def report_problem(report: coordinator_pb2.EdgeReport) -> str | None:
    """What makes a report unacceptable, naming the field as `body.field` (`telemetry.p95_ms`), or None."""
    found = edge_name_problem(report.edge)
    kind = report.WhichOneof("body")
    if found is None and kind is not None:
        found = _fields_problem(getattr(report, kind), BODIES[kind], f"{kind}.")
    return found


def fitted(report: coordinator_pb2.EdgeReport) -> coordinator_pb2.EdgeReport:
    """A copy of `report` with every text escaped and cut to its bound and every number clamped into
    its range; ids of the wrong form become "" where they may be unset. Check it with `report_problem`."""
    copy = coordinator_pb2.EdgeReport()
    copy.CopyFrom(report)
    kind = copy.WhichOneof("body")
    if kind is not None:
        body = getattr(copy, kind)
        for name, rule in BODIES[kind].items():
            setattr(body, name, rule.fit(getattr(body, name)))
    return copy
