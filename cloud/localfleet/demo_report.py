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
            "reason_code": e.event.reason_code,
            "reason": e.event.reason,
            "switch_us": e.event.switch_us,
        }
        for e in events
    ]


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
    ok = all(c["down"] >= 1 and c["up_after_down"] >= 1 for c in checks.values()) and failed == 0
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
    return Verdict(ok, "\n".join(lines))
