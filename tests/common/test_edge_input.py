"""The bounds of what an edge sends, and the one escaping helper: every field is checked and named,
what an honest edge builds is made to fit, and no escaped text holds a control character."""

import io
import logging
import math

import pytest

from common import edge_input
from common.escaping import EscapeRecords, escaped, fitted
from protos import coordinator_pb2

VID, PID = "ab" * 32, "0123456789abcdef"


def _good(kind: str) -> coordinator_pb2.EdgeReport:
    bodies = {
        "telemetry": coordinator_pb2.Telemetry(
            timestamp=1.7e9, active_variant=VID, p95_ms=3.0, requests=10, portfolio_id=PID, rss_bytes=1 << 28
        ),
        "switch": coordinator_pb2.SwitchEvent(
            timestamp=1.7e9, from_variant=VID, to_variant=VID, reason="over the SLO", reason_code="slo_violation"
        ),
        "profile": coordinator_pb2.VariantProfile(variant_id=VID, p50_ms_b1=1.0, batch=8),
    }
    return coordinator_pb2.EdgeReport(edge="edge-1", **{kind: bodies[kind]})


@pytest.mark.parametrize("kind", ["telemetry", "switch", "profile"])
def test_a_report_an_edge_builds_passes(kind):
    assert edge_input.report_problem(_good(kind)) is None


BAD = [
    ("telemetry", "timestamp", math.nan, "finite"),
    ("telemetry", "timestamp", 1e300, "telemetry.timestamp"),
    ("telemetry", "p95_ms", -1.0, "telemetry.p95_ms"),
    ("telemetry", "requests", -5, "telemetry.requests"),
    ("telemetry", "active_variant", "../x", "telemetry.active_variant"),
    ("telemetry", "active_variant", "AB" * 32, "variant id"),
    ("telemetry", "portfolio_id", "p" * (5 << 20), "portfolio id"),
    ("switch", "reason", "x" * (5 << 20), "switch.reason"),
    ("switch", "reason", "fine\nFORGED log line", "printable"),
    ("switch", "reason", "\x1b[2J", "switch.reason"),
    ("switch", "reason_code", "Slo Violation", "reason code"),
    ("switch", "predicted_p95_ms", math.inf, "switch.predicted_p95_ms"),
    ("switch", "to_variant", VID + "0", "switch.to_variant"),
    ("profile", "variant_id", "", "profile.variant_id must be set"),
    ("profile", "variant_id", "v" * (5 << 20), "profile.variant_id"),
    ("profile", "batch", -1, "profile.batch"),
]


@pytest.mark.parametrize("kind, field, value, named", BAD, ids=[f"{k}.{f}-{i}" for i, (k, f, _, _) in enumerate(BAD)])
def test_each_bad_field_is_refused_naming_it_without_echoing_it_raw(kind, field, value, named):
    report = _good(kind)
    setattr(getattr(report, kind), field, value)
    problem = edge_input.report_problem(report)
    assert problem is not None and named in problem
    assert problem.isprintable() and len(problem) < 400  # quoted escaped and cut, never as sent


@pytest.mark.parametrize("name", ["", "a b", "x" * 129, "edge\n1", "../e"])
def test_names_outside_the_contract_are_refused_at_register_and_on_reports(name):
    assert "edge name" in edge_input.register_problem(coordinator_pb2.RegisterRequest(edge=name))
    report = _good("telemetry")
    report.edge = name
    assert "edge name" in edge_input.report_problem(report)


def test_register_bounds_addresses_and_threads():
    request = coordinator_pb2.RegisterRequest(edge="e", address="10.0.0.1:1", threads=2)
    assert edge_input.register_problem(request) is None
    assert "threads" in edge_input.register_problem(coordinator_pb2.RegisterRequest(edge="e", threads=10**6))
    problem = edge_input.register_problem(coordinator_pb2.RegisterRequest(edge="e", metrics_address="a\x00b"))
    assert "metrics_address" in problem and "\x00" not in problem


def test_fitted_makes_what_an_honest_edge_builds_pass_and_keeps_what_already_did():
    report = _good("switch")
    report.switch.reason = "portfolio changed; best\nfit \x1b[31mred" + "!" * 1000
    report.switch.predicted_p95_ms = math.inf  # the policy predicts an unservable load as infinite
    report.switch.observed_p95_ms = math.nan
    fit = edge_input.fitted(report)
    assert edge_input.report_problem(fit) is None
    assert fit.switch.reason.startswith("portfolio changed; best\\nfit \\x1b[31mred")
    assert fit.switch.reason.isprintable()
    assert len(fit.switch.reason) == edge_input.MAX_REASON
    assert (fit.switch.predicted_p95_ms, fit.switch.observed_p95_ms) == (edge_input.MAX_MS, 0.0)
    good = _good("telemetry")
    assert edge_input.fitted(good) == good


@pytest.mark.parametrize(
    "text, shown",
    [
        ("plain é 中文", "plain é 中文"),
        ("two\nlines", "two\\nlines"),
        ("\x1b[2Jclear", "\\x1b[2Jclear"),
        ("tab\there", "tab\\there"),
        ("\u202eevil", "\\u202eevil"),
        ("bell\x07\x7f", "bell\\x07\\x7f"),
    ],
)
def test_escaped_writes_every_unprintable_character_visibly_and_only_those(text, shown):
    assert escaped(text) == shown and escaped(shown) == shown
    assert fitted(text * 100, 20).isprintable() and len(fitted(text * 100, 20)) <= 20


def test_the_log_filter_keeps_a_record_on_one_line_and_an_exception_message_too():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(EscapeRecords())
    logger = logging.getLogger("test_edge_input.escape")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("edge %s said %s", "e1", "ok\nINFO forged line\x1b[31m")
        try:
            raise ValueError("bad\nINFO another forged line")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "WARNING edge e1 said ok\\nINFO forged line\\x1b[31m"
    assert not any(line.startswith("INFO") for line in lines) and "\x1b" not in stream.getvalue()
    assert lines[1] == "ERROR failed" and lines[2].startswith("Traceback")
    assert lines[-1] == "ValueError: bad\\nINFO another forged line"
