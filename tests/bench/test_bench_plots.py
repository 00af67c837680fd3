"""Benchmark figures: lines in latency order, the dense model a star apart from them, error bars from
seeds and whiskers from quartiles only where a result holds them, titles naming model, dataset and
machine, and a PNG per figure."""

import math
import statistics

import pytest

from bench import plots
from bench.suites import reconvene, shifter

PNG = b"\x89PNG\r\n\x1a\n"
META = {"machine": {"cpu_model": "Example CPU 9000", "cpus": 8, "torch_threads": 2}}


def _shifter_point(level: int, compact_ms: float, quartiles: bool) -> dict:
    point = {
        "level": level,
        "sparsity": 1 - 0.5**level,
        "sparse_accuracy": 0.9 - 0.01 * level,
        "compact_accuracy": 0.9 - 0.01 * level,
        "params_sparse": 100_000,
        "params_compact": 100_000 // 2**level,
        "sparse_b32_ms": 10.0,
        "compact_b32_ms": compact_ms,
    }
    if quartiles:
        point.update(compact_b32_q1_ms=0.9 * compact_ms, compact_b32_q3_ms=1.1 * compact_ms)
        point.update(sparse_b32_q1_ms=9.5, sparse_b32_q3_ms=10.5)
    return point


def _shifter_result(quartiles: bool = False) -> dict:
    # level 2 measured faster than level 3: joined in level order the line would double back
    latencies = [10.0, 7.0, 4.0, 5.0, 2.0]
    points = [_shifter_point(level, ms, quartiles) for level, ms in enumerate(latencies)]
    return {"points": points, "plan": {"model": "vgg11", "width": 0.5}, "meta": META}


def _reconvene_point(scorer: str, compression: float, ms: float, gaps: list[float]) -> dict:
    seeds = [
        {"seed": i, "acc_unstructured": 0.85 + 0.002 * i, "acc_reconvene": 0.85 + 0.002 * i - gap / 100}
        for i, gap in enumerate(gaps)
    ]
    return {
        "scorer": scorer,
        "compression": compression,
        "params_dense": 100_000,
        "params_reconvene": int(100_000 / compression),
        "acc_unstructured": statistics.mean(s["acc_unstructured"] for s in seeds),
        "acc_reconvene": statistics.mean(s["acc_reconvene"] for s in seeds),
        "acc_gap_pp": statistics.mean(gaps),
        "acc_gap_pp_sem": statistics.stdev(gaps) / math.sqrt(len(gaps)),
        "unstructured_b32_ms": 10.0,
        "reconvene_b32_ms": ms,
        "seeds": seeds,
    }


def _reconvene_result() -> dict:
    points = [
        _reconvene_point("synflow", 128, 4.0, [0.4, 0.9, 0.5]),
        _reconvene_point("synflow", 8, 6.0, [0.1, 0.3, 0.2]),
        _reconvene_point("synflow", 32, 7.0, [0.2, 0.2, 0.5]),  # more compressed, yet measured slower
        _reconvene_point("snip", 128, 3.0, [1.0, 1.5, 0.7]),
        {"scorer": "grasp", "compression": 512, "refused": "layer collapse"},
    ]
    return {"points": points, "plan": {"model": "vgg11", "width": 0.25}, "meta": META}


def _xs(series) -> list[float]:
    return [p.x for p in series.points]


def test_shifter_lines_run_in_latency_order_and_the_dense_model_is_a_star_apart():
    panels = plots.shifter_panels(_shifter_result())
    latency = panels["accuracy-latency"]
    compact = next(s for s in latency.series if s.label.startswith("compact"))
    assert _xs(compact) == [2.0, 4.0, 5.0, 7.0]
    assert [p.label for p in compact.points] == ["L4", "L2", "L3", "L1"]
    (dense,) = [s for s in latency.series if s.marker == "*"]
    assert dense.points[0].label == "dense" and dense.points[0].x == 10.0
    assert all("L0" not in [p.label for p in s.points] for s in latency.series)
    params = panels["accuracy-params"]
    assert all(_xs(s) == sorted(_xs(s)) for s in params.series) and params.log_x


def test_latency_whiskers_and_the_axis_label_follow_what_the_result_holds():
    bare = plots.shifter_panels(_shifter_result(quartiles=False))["accuracy-latency"]
    assert all(p.x_low is None for s in bare.series for p in s.points)
    assert "p50" in bare.xlabel and "quartiles" not in bare.xlabel
    whiskered = plots.shifter_panels(_shifter_result(quartiles=True))["accuracy-latency"]
    compact = next(s for s in whiskered.series if s.label.startswith("compact"))
    assert [(p.x_low, p.x_high) for p in compact.points][0] == (pytest.approx(1.8), pytest.approx(2.2))
    assert "quartiles" in whiskered.xlabel


def test_titles_name_the_model_the_dataset_and_the_machine():
    for panel in [
        *plots.shifter_panels(_shifter_result()).values(),
        *plots.reconvene_panels(_reconvene_result()).values(),
    ]:
        assert "vgg11" in panel.title and "Fashion-MNIST" in panel.title
        assert (
            "Example CPU 9000" in panel.title and "8 logical CPUs" in panel.title and "2 torch threads" in panel.title
        )


def test_reconvene_accuracies_carry_the_standard_error_over_seeds():
    panels = plots.reconvene_panels(_reconvene_result())
    latency = panels["accuracy-latency"]
    synflow = next(s for s in latency.series if s.label == "reconvene synflow")
    assert _xs(synflow) == [4.0, 6.0, 7.0]
    point = next(p for p in _reconvene_result()["points"] if p["compression"] == 128 and p["scorer"] == "synflow")
    expected = statistics.stdev(100 * s["acc_reconvene"] for s in point["seeds"]) / math.sqrt(3)
    assert synflow.points[0].label == "128x" and synflow.points[0].y_err == pytest.approx(expected)
    assert "standard error" in latency.title and "3 seeds" in latency.title
    assert not any(s.label.endswith("grasp") for s in latency.series)  # a refused point draws nothing


def test_the_reconvene_gap_figure_uses_the_paired_standard_error():
    gap = plots.reconvene_panels(_reconvene_result())["gap-compression"]
    synflow = next(s for s in gap.series if s.label == "synflow")
    assert _xs(synflow) == [8, 32, 128]
    assert synflow.points[-1].y_err == pytest.approx(statistics.stdev([0.4, 0.9, 0.5]) / math.sqrt(3))
    assert 0.0 in [y for y, _ in gap.guides]


def test_a_single_seed_draws_no_error_bars():
    result = _reconvene_result()
    result["points"] = [{k: v for k, v in p.items() if k not in ("seeds", "acc_gap_pp_sem")} for p in result["points"]]
    panels = plots.reconvene_panels(result)
    assert all(p.y_err is None for panel in panels.values() for s in panel.series for p in s.points)
    assert "standard error" not in panels["accuracy-latency"].title


def test_the_drawn_line_is_the_ordered_one(tmp_path):
    fig = plots.draw(plots.shifter_panels(_shifter_result(quartiles=True))["accuracy-latency"])
    container = next(c for c in fig.axes[0].containers if c.get_label().startswith("compact"))
    assert list(container.lines[0].get_xdata()) == [2.0, 4.0, 5.0, 7.0]
    assert plots.save(fig, tmp_path / "latency.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize(
    ("suite", "result", "suffixes"),
    [
        (shifter, _shifter_result(quartiles=True), ["accuracy-params", "accuracy-latency"]),
        (reconvene, _reconvene_result(), ["accuracy-params", "accuracy-latency", "gap-compression"]),
    ],
)
def test_each_suite_writes_a_png_per_figure(tmp_path, suite, result, suffixes):
    paths = suite.figures(result, tmp_path / "run")
    assert [p.name for p in paths] == [f"run-{suffix}.png" for suffix in suffixes]
    assert all(p.read_bytes()[:8] == PNG and p.stat().st_size > 1000 for p in paths)
