"""The cluster report: the load generator's measurements, the coordinator's switches and on-device
profiles, and two plots (latency against the SLO per edge, the accuracy-latency frontier)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from cloud.admin import operator_client
from cloud.build.store import PortfolioStore
from cloud.localfleet import cluster, cluster_load, demo_report, plots
from cloud.localfleet.detached import Proc
from common.files import atomic_write_json, short_id

SETTLED_WINDOW_S = 30.0  # the variant an edge settled on: the one that answered most in this last stretch


def _settled(rows: list[dict]) -> str:
    if not rows:
        return ""
    last = rows[-1]["t"]
    recent = [r["variant"] for r in rows if r["t"] >= last - SETTLED_WINDOW_S and r["variant"]]
    return Counter(recent).most_common(1)[0][0] if recent else ""


def _series(directory: Path, edges: list[str], names: dict[str, str], started: float) -> dict[str, list[dict]]:
    rows = cluster_load.read(directory / "load.jsonl")
    return {
        edge: [
            {
                "t": round(r["t"] - started, 2),
                "p95_ms": r["p95_ms"],
                "requests": r["requests"],
                "errors": r["errors"],
                "variant": names.get(r["variant"], short_id(r["variant"])),
            }
            for r in rows
            if r["edge"] == edge
        ]
        for edge in edges
    }


def _switches(stub, started: float, names: dict[str, str], accuracy: dict[str, float]) -> list[dict]:
    """The coordinator's switch events since the cluster started, as the report lists them."""
    events = operator_client.events(stub, since=started)
    return demo_report.switch_timeline(events, names, accuracy, started)


def write(state: dict, procs: list[Proc]) -> tuple[Path, str]:
    """Write DIR/report/{report.json,latency.png,frontier.png}; the directory and a short summary."""
    directory, started = Path(state["dir"]), state["started"]
    out = directory / "report"
    out.mkdir(parents=True, exist_ok=True)
    cloud = next(p for p in procs if p.role == "cloud")
    edges = [p.name for p in procs if p.role == "edge"]
    manifest = PortfolioStore(state["portfolio"]).manifest()
    names = {v.variant_id: v.name for v in manifest.variants}
    accuracy = {v.variant_id: v.accuracy for v in manifest.variants}
    stub = operator_client.coordinator_stub(cloud.address, cluster.operator_transport(state))
    fleet = operator_client.fleet(stub)
    switches = _switches(stub, started, names, accuracy)
    series = _series(directory, edges, names, started)
    settled = {edge: _settled(rows) for edge, rows in series.items()}
    profiled = [e for e in fleet.edges if e.edge in edges and e.profiles]
    on_device = {e.edge: {p.variant_id: p.p95_ms_batch for p in e.profiles} for e in profiled}
    order = [v.name for v in sorted(manifest.variants, key=lambda v: v.accuracy)]
    title = f"switching under load: {manifest.model} on {manifest.dataset}; edges on {plots.machine_label()}"
    plots.latency_timeline(out / "latency.png", series, switches, fleet.policy.slo_ms, order, title=title)
    plots.frontier(
        out / "frontier.png",
        manifest,
        {f"{e.edge}, p95 at batch {e.profiles[0].batch}": on_device[e.edge] for e in profiled},
    )
    cpus = {p.name: p.cpus for p in procs if p.role == "edge"}
    atomic_write_json(
        out / "report.json",
        {
            "portfolio": manifest.to_json(),
            "slo_ms": fleet.policy.slo_ms,
            "edges": cpus,
            "settled": settled,
            "switches": switches,
            "per_second": series,
            "on_device_p95_ms": {edge: {names.get(k, k): v for k, v in p.items()} for edge, p in on_device.items()},
        },
    )
    lines = [
        f"{edge} ({cpus[edge]:g} CPU): settled on {settled[edge] or '-'}, "
        f"{sum(s['edge'] == edge and s['direction'] in ('down', 'up') for s in switches)} switch(es)"
        for edge in edges
    ]
    lines.append(f"report: {out / 'report.json'}  plots: {out / 'latency.png'}, {out / 'frontier.png'}")
    return out, "\n".join(lines)
