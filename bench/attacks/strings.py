"""Oversized and control-character strings from an edge: in its Register (name, address), in a name
given to `prunefleet certs issue`, in reports (a switch reason carrying a newline and a forged log
line, escape sequences, profiles of 5 MB). Each must be refused or escaped: `GetFleet`, `prunefleet
fleet status` and `prunefleet fleet events` keep working, nothing reaches the operator's terminal raw
and the cloud's log gains no forged line."""

from __future__ import annotations

import time

from bench.attacks.arena import RPC_S, Arena, cli
from bench.attacks.calls import OK, Silence, code, refused, telemetry
from bench.attacks.records import Finding, Refusals
from protos import coordinator_pb2

FORGED = "FORGED-LOG-LINE cloud.service.coordinator edge edge-b registered"
ESCAPES = "\x1b[2J\x1b]0;owned\x07"  # clear the screen, retitle the terminal
BIG = 5 << 20


def _switch(reason: str) -> coordinator_pb2.EdgeReport:
    return coordinator_pb2.EdgeReport(
        edge="edge-a",
        switch=coordinator_pb2.SwitchEvent(
            timestamp=time.time(), from_variant="a" * 64, to_variant="b" * 64, reason=reason, reason_code="headroom"
        ),
    )


def _profile(variant_id: str) -> coordinator_pb2.EdgeReport:
    return coordinator_pb2.EdgeReport(
        edge="edge-a", profile=coordinator_pb2.VariantProfile(variant_id=variant_id, p50_ms_b1=1.0, p95_ms_b1=2.0)
    )


REGISTERS = {
    "a name with a newline and a forged log line": ("edge-a\n" + FORGED, "127.0.0.1:1"),
    "a name with escape sequences": (f"edge-a{ESCAPES}", "127.0.0.1:1"),
    "a name of 5 MB": ("e" * BIG, "127.0.0.1:1"),
    "an address with a newline and a forged log line": ("edge-a", f"127.0.0.1:1\n{FORGED}"),
    "an address with escape sequences": ("edge-a", f"127.0.0.1:1{ESCAPES}"),
    "an address of 5 MB": ("edge-a", "9" * BIG),
}
REPORTS = {
    "a switch reason with a newline and a forged log line": _switch(f"headroom\n{FORGED}"),
    "a switch reason with escape sequences": _switch(f"headroom{ESCAPES}"),
    "a switch reason of 5 MB": _switch("x" * BIG),
    "a profile of 5 MB": _profile("a" * BIG),
    "a second profile of 5 MB": _profile("b" * BIG),
}


def _clean(text: str) -> bool:
    """No control character but newline and tab, and no line that starts with the forged text."""
    return not any(c < " " and c not in "\n\t" for c in text) and not any(
        line.startswith(FORGED) for line in text.splitlines()
    )


def _operator_tools(arena: Arena, found: Refusals) -> None:
    status = code(lambda: arena.operator.GetFleet(coordinator_pb2.GetFleetRequest(), timeout=RPC_S))
    found.check("GetFleet afterwards", status == OK, status.name)
    operator = str(arena.holder("operator"))
    for action in ("status", "events"):
        result = cli("fleet", action, "--cloud", arena.cloud.address, "--certs", operator)
        found.check(
            f"prunefleet fleet {action} afterwards",
            result.returncode == 0 and _clean(result.stdout + result.stderr),
            f"exit {result.returncode}, {len(result.stdout.splitlines())} lines, "
            f"{'clean' if _clean(result.stdout + result.stderr) else 'control characters or a forged line'}",
        )
    log = arena.cloud.log_path.read_text(errors="replace")
    found.check("the cloud's log", _clean(log), "no forged line, no control character" if _clean(log) else "forged")


def hostile_strings(arena: Arena) -> Finding:
    found = Refusals()
    arena.register("edge-a")
    edge = arena.coordinator("edge-a")
    for label, (name, address) in REGISTERS.items():
        request = coordinator_pb2.RegisterRequest(edge=name, address=address)
        status = code(lambda request=request: edge.Register(request, timeout=RPC_S))
        found.check(f"Register with {label}", refused(status), status.name)
    issued = cli("certs", "issue", "edge", f"edge-x\n{FORGED}", "--certs-dir", str(arena.certs))
    found.check(
        "`prunefleet certs issue edge` of a name with a newline", issued.returncode != 0, f"exit {issued.returncode}"
    )
    silence = Silence(hold_s=RPC_S)
    try:
        for label, report in REPORTS.items():
            stream = edge.Connect(silence.stream(telemetry("edge-a"), report), timeout=RPC_S)
            status = code(lambda stream=stream: stream)
            found.check(f"Connect with {label}", refused(status), status.name)
    finally:
        silence.end()
    _operator_tools(arena, found)
    return found.finding()
