"""PNG plots of the demo and cluster reports: the portfolio's accuracy-latency frontier (as the cloud
measured it and as each edge profiled it) and each edge's latency and variant over time. Drawn with
the parts in `cloud.localfleet.chart`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from cloud.build.store import Manifest, VariantEntry
from cloud.localfleet.chart import (
    Panel,
    Point,
    Series,
    _pyplot,
    dense_series,
    draw,
    in_x_order,
    machine_label,
    pareto,
    save,
    whisker,
)
from common.files import short_id

CLOUD_SOURCE = "cloud, p50 at batch 1"


def _cloud_point(entry: VariantEntry) -> Point:
    """A variant at the cloud's batch-1 latency, with its quartiles when the manifest holds them (older
    manifests hold the p50 alone)."""
    low, high = whisker(
        entry.latency_ms_b1, getattr(entry, "latency_ms_b1_q1", None), getattr(entry, "latency_ms_b1_q3", None)
    )
    return Point(entry.latency_ms_b1, 100 * entry.accuracy, entry.name, low, high)


def _source_series(label: str, points: dict[str, Point], dense: set[str], color: str, names: bool) -> list[Series]:
    """One latency source: its variants, its Pareto frontier as a step line, its dense model as a star."""
    front = tuple(Point(x, y) for x, y in pareto([(p.x, p.y) for p in points.values()]))
    variants = in_x_order(p for vid, p in points.items() if vid not in dense)
    return [
        Series(label, variants, linestyle="none", color=color, annotate=names),
        Series("", front, marker="", color=color, drawstyle="steps-post", alpha=0.6),
        *(dense_series(points[vid], color, label, annotate=names) for vid in dense if vid in points),
    ]


def frontier_panel(
    manifest: Manifest, on_device: Mapping[str, Mapping[str, float]] | None = None, machine: str = ""
) -> Panel:
    """Accuracy against latency for every variant, with the Pareto frontier of each latency source.

    Sources: the cloud's batch-1 p50 from the manifest (whiskers: its quartiles over rounds, where the
    manifest holds them) and, when given, each edge's own profile (`on_device[edge][variant_id]` in ms,
    one figure per variant, so no whisker). The dense variant (no sparsity) is each source's star.
    """
    accuracy = {v.variant_id: 100 * v.accuracy for v in manifest.variants}
    names = {v.variant_id: v.name for v in manifest.variants}
    sources = {CLOUD_SOURCE: {v.variant_id: _cloud_point(v) for v in manifest.variants}}
    for edge, latency in (on_device or {}).items():
        sources[f"{edge} (on device)"] = {
            vid: Point(ms, accuracy[vid], names[vid]) for vid, ms in latency.items() if vid in accuracy
        }
    dense = {v.variant_id for v in manifest.variants if v.sparsity == 0}
    series: list[Series] = []
    for index, (label, points) in enumerate(sources.items()):
        known = {vid: p for vid, p in points.items() if p.x > 0}
        if known:
            series += _source_series(label, known, dense, f"C{index}", names=label == CLOUD_SOURCE)
    spread = any(p.x_low is not None for p in sources[CLOUD_SOURCE].values())
    return Panel(
        title=f"{manifest.model} on {manifest.dataset}: {manifest.method} portfolio {short_id(manifest.portfolio_id)}"
        f"\ncloud latency measured on {machine}",
        xlabel="latency, ms (log scale)" + ("; cloud whiskers: quartiles over rounds" if spread else ""),
        ylabel="test accuracy, %",
        series=tuple(series),
        log_x=True,
    )


def frontier(path: Path, manifest: Manifest, on_device: Mapping[str, Mapping[str, float]] | None = None) -> None:
    """Draw `frontier_panel` to PATH. The cloud latencies are taken to come from this machine, with the
    build's torch threads: the demo and the local cluster build their portfolio where they run."""
    machine = machine_label(threads=manifest.settings.get("threads"))
    save(draw(frontier_panel(manifest, on_device, machine), size=(8, 5)), path, dpi=110)


def latency_timeline(
    path: Path,
    series: Mapping[str, Sequence[dict]],
    switches: Sequence[dict],
    slo_ms: float,
    order: Sequence[str],
    shaded: Sequence[tuple[float, float]] = (),
    xlabel: str = "seconds since the cluster started",
    title: str = "",
) -> None:
    """Per edge: p95 latency over time against the SLO, the active variant, and switch markers.

    `series[edge]` rows hold `t` (seconds), `p95_ms` (or None) and `variant` (a name from ORDER, or "");
    `switches` rows hold `t`, `edge` and `direction` ("down", "up" or "initial"); `shaded` spans
    (start, end) in seconds are tinted (the demo's heavy phase); `title` heads the figure.
    """
    rows = max(1, len(series))
    fig, axes = _pyplot().subplots(rows, 1, figsize=(11, 3.4 * rows), sharex=True, squeeze=False)
    for ax, (edge, edge_rows) in zip(axes[:, 0], series.items()):
        _edge_timeline(ax, edge, edge_rows, [e for e in switches if e["edge"] == edge], slo_ms, order)
        for start, end in shaded:
            ax.axvspan(start, end, alpha=0.06, color="red")
    axes[-1, 0].set_xlabel(
        f"{xlabel} (green: active variant, right axis; orange: switch down, purple: up"
        f"{'; shaded: heavy load' if shaded else ''})"
    )
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save(fig, path, dpi=110)


def _edge_timeline(ax, edge: str, rows: Sequence[dict], switches: Sequence[dict], slo_ms: float, order) -> None:
    t = [r["t"] for r in rows]
    ax.plot(
        t,
        [r["p95_ms"] if r["p95_ms"] is not None else math.nan for r in rows],
        color="tab:blue",
        label="p95 latency (client side)",
    )
    ax.axhline(slo_ms, color="tab:red", linestyle="--", label=f"SLO {slo_ms:.1f} ms")
    ax.set_ylabel("ms")
    ax.set_title(edge)
    right = ax.twinx()
    right.step(
        t,
        [order.index(r["variant"]) if r["variant"] in order else math.nan for r in rows],
        where="post",
        color="tab:green",
        alpha=0.8,
    )
    right.set_yticks(range(len(order)), list(order))
    right.set_ylim(-0.5, len(order) - 0.5)
    for event in switches:
        if event["direction"] in ("down", "up"):
            color = "tab:orange" if event["direction"] == "down" else "tab:purple"
            ax.axvline(event["t"], color=color, alpha=0.7, linewidth=1)
    ax.legend(loc="upper left", fontsize=8)
