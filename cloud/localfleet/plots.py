"""PNG plots shared by the demo and cluster reports (matplotlib, imported only when plotting)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from cloud.build.store import Manifest


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (latency, accuracy) points no other point beats on both: faster and at least as accurate."""
    best, front = -math.inf, []
    for latency, accuracy in sorted(points, key=lambda p: (p[0], -p[1])):
        if accuracy > best:
            front.append((latency, accuracy))
            best = accuracy
    return front


def frontier(path: Path, manifest: Manifest, on_device: Mapping[str, Mapping[str, float]] | None = None) -> None:
    """Accuracy against latency for every variant, with the Pareto frontier of each latency source.

    Sources: the cloud's measurement at batch 1 (from the manifest) and, when given, each edge's own
    profile (`on_device[edge][variant_id]` in ms).
    """
    plt = _pyplot()
    sources = {"cloud, batch 1": {v.variant_id: v.latency_ms_b1 for v in manifest.variants}}
    sources.update({f"{edge} (on device)": dict(latency) for edge, latency in (on_device or {}).items()})
    accuracy = {v.variant_id: 100 * v.accuracy for v in manifest.variants}
    names = {v.variant_id: v.name for v in manifest.variants}
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, latency in sources.items():
        known = [(latency[vid], accuracy[vid], vid) for vid in latency if vid in accuracy and latency[vid] > 0]
        if not known:
            continue
        dots = ax.scatter([k[0] for k in known], [k[1] for k in known], label=label, zorder=3)
        front = pareto([(k[0], k[1]) for k in known])
        ax.step([f[0] for f in front], [f[1] for f in front], where="post", alpha=0.6, color=dots.get_facecolor()[0])
        if label.startswith("cloud"):
            for x, y, vid in known:
                ax.annotate(names[vid], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("latency, ms (log scale)")
    ax.set_ylabel("test accuracy, %")
    ax.set_title(f"portfolio {manifest.portfolio_id}: accuracy-latency frontier ({manifest.model})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def latency_timeline(
    path: Path,
    series: Mapping[str, Sequence[dict]],
    switches: Sequence[dict],
    slo_ms: float,
    order: Sequence[str],
    shaded: Sequence[tuple[float, float]] = (),
    xlabel: str = "seconds since the cluster started",
) -> None:
    """Per edge: p95 latency over time against the SLO, the active variant, and switch markers.

    `series[edge]` rows hold `t` (seconds), `p95_ms` (or None) and `variant` (a name from ORDER, or "");
    `switches` rows hold `t`, `edge` and `direction` ("down", "up" or "initial"); `shaded` spans
    (start, end) in seconds are tinted (the demo's heavy phase).
    """
    plt = _pyplot()
    fig, axes = plt.subplots(
        max(1, len(series)), 1, figsize=(11, 3.4 * max(1, len(series))), sharex=True, squeeze=False
    )
    for ax, (edge, rows) in zip(axes[:, 0], series.items()):
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
            if event["edge"] == edge and event["direction"] in ("down", "up"):
                ax.axvline(
                    event["t"],
                    color="tab:orange" if event["direction"] == "down" else "tab:purple",
                    alpha=0.7,
                    linewidth=1,
                )
        for start, end in shaded:
            ax.axvspan(start, end, alpha=0.06, color="red")
        ax.legend(loc="upper left", fontsize=8)
    axes[-1, 0].set_xlabel(
        f"{xlabel} (green: active variant, right axis; orange: switch down, purple: up"
        f"{'; shaded: heavy load' if shaded else ''})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
