"""The frontier and timeline plots: lines in latency order, the dense model a star of its own, quartile
whiskers where the manifest holds them, titles that name the model, dataset and machine, and PNGs."""

from dataclasses import dataclass

import pytest

from cloud.build.store import Manifest, VariantEntry
from cloud.localfleet import chart, plots
from common.profiling import cpu_model

PNG = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class QuartileEntry(VariantEntry):
    """An entry as a manifest with interleaved latency measurements records it."""

    latency_ms_b1_q1: float | None = None
    latency_ms_b1_q3: float | None = None


def _entry(level: int, accuracy: float, latency: float, quartiles: bool) -> VariantEntry:
    sparsity = 0.0 if level == 0 else 1 - 0.5**level
    fields = dict(
        variant_id=f"{level:064x}",
        name=f"vgg11-L{level}",
        level=level,
        method="shifter",
        arch="vgg11",
        params=10_000 // (level + 1),
        size_bytes=40_000 // (level + 1),
        accuracy=accuracy,
        sparse_accuracy=accuracy,
        sparsity=sparsity,
        compression=1 / (1 - sparsity),
        params_ratio=level + 1.0,
        latency_ms_b1=latency,
        latency_ms_b32=20 * latency,
    )
    if quartiles:
        return QuartileEntry(**fields, latency_ms_b1_q1=0.9 * latency, latency_ms_b1_q3=1.2 * latency)
    return VariantEntry(**fields)


def _manifest(quartiles: bool = True) -> Manifest:
    # level order is not latency order: L2 measured slower than L1, L3 fastest
    table = [(0, 0.91, 4.0), (1, 0.90, 2.0), (2, 0.88, 2.6), (3, 0.80, 1.1)]
    return Manifest(
        portfolio_id="ab" * 32,
        model="vgg11",
        dataset="fashion-mnist",
        method="shifter",
        created=0.0,
        settings={"threads": 2},
        variants=tuple(_entry(level, acc, ms, quartiles) for level, acc, ms in table),
    )


def _series(panel: chart.Panel, label: str) -> chart.Series:
    return next(s for s in panel.series if s.label == label)


def test_the_frontier_joins_variants_in_latency_order_and_stars_the_dense_model():
    panel = plots.frontier_panel(_manifest(), machine="Example CPU, 2 logical CPUs")
    variants = _series(panel, plots.CLOUD_SOURCE)
    assert [p.x for p in variants.points] == sorted(p.x for p in variants.points) == [1.1, 2.0, 2.6]
    assert "vgg11-L0" not in [p.label for p in variants.points]  # the dense model is not one more point
    (dense,) = [s for s in panel.series if s.marker == "*"]
    assert dense.points[0].label == chart.DENSE_LABEL and dense.points[0].x == 4.0
    front = next(s for s in panel.series if s.drawstyle == "steps-post")
    assert [(p.x, p.y) for p in front.points] == [(1.1, 80.0), (2.0, 90.0), (4.0, 91.0)]  # L2 is beaten by L1


def test_the_frontier_draws_quartile_whiskers_only_where_the_manifest_holds_them():
    whiskered = plots.frontier_panel(_manifest(quartiles=True), machine="m")
    assert all(p.x_low == pytest.approx(0.9 * p.x) for p in _series(whiskered, plots.CLOUD_SOURCE).points)
    assert "quartiles" in whiskered.xlabel
    older = plots.frontier_panel(_manifest(quartiles=False), machine="m")
    assert all(p.x_low is None and p.x_high is None for s in older.series for p in s.points)
    assert "quartiles" not in older.xlabel


def test_the_frontier_title_names_model_dataset_and_machine():
    panel = plots.frontier_panel(_manifest(), machine="Example CPU, 2 logical CPUs")
    assert "vgg11" in panel.title and "fashion-mnist" in panel.title and "Example CPU" in panel.title
    label = chart.machine_label(threads=3)
    assert cpu_model() in label and "3 torch threads" in label and "logical CPU" in label


def test_on_device_sources_get_their_own_ordered_series_and_star():
    manifest = _manifest()
    on_device = {"edge-1": {v.variant_id: 10.0 - v.level for v in manifest.variants}}
    panel = plots.frontier_panel(manifest, on_device, machine="m")
    edge = _series(panel, "edge-1 (on device)")
    assert [p.x for p in edge.points] == [7.0, 8.0, 9.0]
    assert len([s for s in panel.series if s.marker == "*"]) == 2


def test_the_drawn_line_runs_in_latency_order(tmp_path):
    fig = chart.draw(plots.frontier_panel(_manifest(), machine="m"))
    container = next(c for c in fig.axes[0].containers if c.get_label() == plots.CLOUD_SOURCE)
    xs = list(container.lines[0].get_xdata())
    assert xs == sorted(xs)
    assert chart.save(fig, tmp_path / "f.png").read_bytes()[:8] == PNG


def test_frontier_and_timeline_write_pngs(tmp_path):
    plots.frontier(tmp_path / "frontier.png", _manifest())
    rows = [{"t": t, "p95_ms": 5.0 + t % 3, "variant": "vgg11-L0" if t < 5 else "vgg11-L3"} for t in range(10)]
    switches = [{"t": 5, "edge": "e", "direction": "down"}]
    plots.latency_timeline(tmp_path / "t.png", {"e": rows}, switches, 6.0, ["vgg11-L3", "vgg11-L0"], title="t")
    for name in ("frontier.png", "t.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG


def test_a_series_out_of_x_order_or_a_whisker_missing_its_value_is_refused():
    a, b = chart.Point(1.0, 50.0), chart.Point(2.0, 60.0)
    with pytest.raises(chart.PlotError):
        chart.Series("zig-zag", (b, a))
    assert chart.Series("ordered", chart.in_x_order([b, a])).points == (a, b)
    with pytest.raises(chart.PlotError):
        chart.Point(1.0, 50.0, x_low=1.2, x_high=1.5)
    with pytest.raises(chart.PlotError):
        chart.Point(1.0, 50.0, x_low=0.5)
    with pytest.raises(chart.PlotError):
        chart.Point(1.0, 50.0, y_err=-0.1)
    assert chart.whisker(1.0, 1.1, 1.3) == (None, None) and chart.whisker(1.0, 0.8, 1.3) == (0.8, 1.3)
