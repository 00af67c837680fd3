"""The demo report: JSON with everything measured, a PNG timeline, and the verdict."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cloud.admin.operator_client import table
from cloud.build.store import Manifest
from cloud.localfleet import plots
from cloud.localfleet.loadgen import Phase, Sample
from common.files import atomic_write_json

STEP_COST_PP, STEP_CAPACITY, BACK_UNDER_S = 1.0, 3.0, 10.0  # what a step down must cost, buy, and how soon


@dataclass(frozen=True)
class Verdict:
    ok: bool
    text: str


def direction(event, accuracy: dict[str, float]) -> str:
    """A step down trades accuracy for speed; a step up takes accuracy back."""
    if not event.from_variant:
        return "initial"
    before, after = accuracy.get(event.from_variant, 0.0), accuracy.get(event.to_variant, 0.0)
    return "down" if after < before else "up" if after > before else "same"


def _steps(timeline: list[dict], edge: str) -> dict[str, int]:
    """Steps down, steps up, and steps up that came after the first step down (the recovery)."""
    mine = [e for e in timeline if e["edge"] == edge]
    first_down = next((e["t"] for e in mine if e["direction"] == "down"), None)
    return {
        "down": sum(e["direction"] == "down" for e in mine),
        "up": sum(e["direction"] == "up" for e in mine),
        "up_after_down": sum(e["direction"] == "up" and first_down is not None and e["t"] > first_down for e in mine),
    }


def per_second(samples: Sequence[Sample], edge: str) -> list[dict]:
    """Client-side p95 latency, throughput and the answering variant, per one-second bin."""
    rows: dict[int, list[Sample]] = {}
    for s in samples:
        if s.edge == edge:
            rows.setdefault(int(s.t), []).append(s)
    series = []
    for second in sorted(rows):
        bin_ = rows[second]
        ok = [s for s in bin_ if s.code == "OK"]
        variants = [s.variant_id for s in ok]
        series.append(
            {
                "t": second,
                "requests": len(bin_),
                "errors": len(bin_) - len(ok),
                "p95_ms": float(np.percentile([s.latency_ms for s in ok], 95)) if ok else None,
                "variant": max(set(variants), key=variants.count) if variants else "",
            }
        )
    return series


def switch_timeline(events, names: dict[str, str], accuracy: dict[str, float], started: float) -> list[dict]:
    """The coordinator's switch events (`ListEvents`) as the reports list them: seconds since `started`,
    the edge, the direction (by the variants' accuracies), the variants' names and the reason."""
    return [
        {
            "t": round(e.event.timestamp - started, 2),
            "edge": e.edge,
            "direction": direction(e.event, accuracy),
            "from": names.get(e.event.from_variant, ""),
            "to": names.get(e.event.to_variant, ""),
            "from_id": e.event.from_variant,
            "to_id": e.event.to_variant,
            "reason_code": e.event.reason_code,
            "reason": e.event.reason,
            "switch_us": e.event.switch_us,
        }
        for e in events
    ]


def heavy_span(phases: Sequence[Phase]) -> tuple[float, float]:
    """Seconds since the load started at which the first phase with more than one client begins and ends."""
    start = 0.0
    for phase in phases:
        if phase.clients > 1:
            return start, start + phase.seconds
        start += phase.seconds
    return start, start


def step_down(
    timeline: list[dict], rows: list[dict], edge: str, slo_ms: float, known: dict, span: tuple[float, float]
) -> dict | None:
    """What an edge's step down under the heavy load cost and bought: from the variant it served before
    its first step down in the heavy phase to the one it served when the phase ended, the test accuracy
    given up (points), the capacity gained (the edge's own p50 latency of the one over the other's, from
    `known["latency"]`) and how long after the first step down the clients' p95 came back under the SLO:
    the end of the first whole second after it whose p95 is under, None if none in the phase. None when
    the edge did not step down in the heavy phase."""
    mine = [e for e in timeline if e["edge"] == edge and span[0] <= e["t"] <= span[1]]
    downs = [e for e in mine if e["direction"] == "down"]
    if not downs:
        return None
    first, last = downs[0], mine[-1]
    accuracy, latency = known["accuracy"], known["latency"].get(edge, {})
    before, after = first["from_id"], last["to_id"]
    under = [r for r in rows if first["t"] <= r["t"] and r["t"] + 1 <= span[1] and r["p95_ms"] is not None]
    back = next((r["t"] + 1 - first["t"] for r in under if r["p95_ms"] <= slo_ms), None)
    return {
        "from": first["from"],
        "to": last["to"],
        "cost_pp": 100 * (accuracy.get(before, 0.0) - accuracy.get(after, 0.0)),
        "capacity": latency[before] / latency[after] if before in latency and after in latency else None,
        "back_under_slo_s": back,
        "under_slo_share": sum(r["p95_ms"] <= slo_ms for r in under) / len(under) if under else None,
    }


def worth_it(step: dict | None) -> bool:
    """The step down an operator takes: at most `STEP_COST_PP` points for at least `STEP_CAPACITY` times
    the capacity, the clients back under the SLO within `BACK_UNDER_S` seconds."""
    return (
        step is not None
        and step["cost_pp"] <= STEP_COST_PP
        and (step["capacity"] or 0.0) >= STEP_CAPACITY
        and step["back_under_slo_s"] is not None
        and step["back_under_slo_s"] <= BACK_UNDER_S
    )


def _plot(
    path: Path,
    series: dict[str, list[dict]],
    timeline: list[dict],
    slo_ms: float,
    names: dict[str, str],
    order: list[str],
    phases: Sequence[Phase],
    title: str,
) -> None:
    named = {edge: [{**r, "variant": names.get(r["variant"], "")} for r in rows] for edge, rows in series.items()}
    spans, start = [], 0.0
    for phase in phases:
        if phase.clients > 1:
            spans.append((start, start + phase.seconds))
        start += phase.seconds
    plots.latency_timeline(
        path, named, timeline, slo_ms, order, shaded=spans, xlabel="seconds since load started", title=title
    )


def write(run_dir: Path, manifest: Manifest, outcome: dict, phases: Sequence[Phase], edges: Sequence[str]) -> Verdict:
    names = outcome["names"]
    accuracy = {v.variant_id: v.accuracy for v in manifest.variants}
    order = [v.name for v in sorted(manifest.variants, key=lambda v: v.accuracy)]
    timeline = switch_timeline(outcome["events"], names, accuracy, outcome["started"])
    series = {edge: per_second(outcome["samples"], edge) for edge in edges}
    samples = outcome["samples"]
    failed = sum(1 for s in samples if s.code != "OK")
    checks = {edge: _steps(timeline, edge) for edge in edges}
    known = {"accuracy": accuracy, "latency": outcome.get("profiles", {})}
    span = heavy_span(phases)
    steps = {edge: step_down(timeline, series[edge], edge, outcome["slo_ms"], known, span) for edge in edges}
    recovered = all(c["down"] >= 1 and c["up_after_down"] >= 1 for c in checks.values())
    ok = recovered and all(worth_it(s) for s in steps.values()) and failed == 0
    atomic_write_json(
        run_dir / "report.json",
        {
            "portfolio": manifest.to_json(),
            "slo_ms": outcome["slo_ms"],
            "phases": [asdict(p) for p in phases],
            "switches": timeline,
            "per_second": series,
            "requests": len(samples),
            "failed_requests": failed,
            "checks": checks,
            "step_down": steps,
            "ok": ok,
        },
    )
    title = f"switching under load: {manifest.model} on {manifest.dataset}; edges on {plots.machine_label()}"
    _plot(run_dir / "timeline.png", series, timeline, outcome["slo_ms"], names, order, phases, title)
    plots.frontier(run_dir / "frontier.png", manifest)
    rows = [(f"{e['t']:.1f}s", e["edge"], e["direction"], e["from"] or "-", e["to"], e["reason"]) for e in timeline]
    lines = [
        "switch timeline (t = seconds since load started):",
        table(("t", "edge", "step", "from", "to", "reason"), rows),
        f"{len(samples)} requests, {failed} failed",
        f"report: {run_dir / 'report.json'}  plots: {run_dir / 'timeline.png'}, {run_dir / 'frontier.png'}",
    ]
    for edge, c in checks.items():
        verdict = "ok" if c["down"] and c["up_after_down"] else "MISSING a step down and a recovery"
        lines.append(f"{edge}: {c['down']} switch(es) down, {c['up_after_down']} back up after it -> {verdict}")
    for edge, step in steps.items():
        lines.append(f"{edge}: {_step_text(step)} -> {'ok' if worth_it(step) else 'NOT WORTH IT'}")
    return Verdict(ok, "\n".join(lines))


def _step_text(step: dict | None) -> str:
    if step is None:
        return "no step down under the heavy load"
    capacity = f"{step['capacity']:.2f}x the capacity" if step["capacity"] else "a capacity not profiled"
    back = f"{step['back_under_slo_s']:.0f} s" if step["back_under_slo_s"] is not None else "never"
    share = (
        f", under it in {100 * step['under_slo_share']:.0f}% of the phase's seconds after"
        if step["under_slo_share"] is not None
        else ""
    )
    return (
        f"heavy load: {step['from']} -> {step['to']}, {step['cost_pp']:.2f} points for {capacity} "
        f"(targets <= {STEP_COST_PP:g}, >= {STEP_CAPACITY:g}x); clients' p95 back under the SLO {back} after the "
        f"step down (target <= {BACK_UNDER_S:g} s){share}"
    )
