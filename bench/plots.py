"""PNG figures of benchmark results.

Each figure is first described as a panel (`cloud.localfleet.chart.Panel`, pure data: the order of a
line's points and the whiskers are decided here and can be checked without looking at a picture), then
drawn by the same parts the demo's plots use. Every figure is titled with the model, the dataset and the
machine, because a latency means little without the CPU it ran on.

Latencies are p50s; a latency `{who}_b{batch}_ms` gets a whisker where the result also holds its
quartiles over rounds as `{who}_b{batch}_q1_ms` and `{who}_b{batch}_q3_ms`. An accuracy gets an error bar
where a point was trained from several seeds (listed under `seeds`): the standard error of the mean.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from cloud.localfleet.chart import Panel, Point, Series, dense_series, draw, in_x_order, machine_label, save, whisker

BENCH_DATASET = "Fashion-MNIST"  # what every suite trains on (bench.workdir.start), unless a result says otherwise
GAP_TOLERANCE_PP = 0.5  # the reconvene suite's summary counts points within this gap


def caption(result: dict) -> str:
    """Model (and width), dataset and machine of a result. The machine comes from the result's metadata
    where it names one, else from this process: figures are drawn by the run that measured them."""
    plan, machine = result.get("plan", {}), result.get("meta", {}).get("machine", {})
    width = f" at width {plan['width']:g}" if plan.get("width") else ""
    where = machine_label(machine.get("cpu_model"), machine.get("cpus"), machine.get("torch_threads"))
    return f"{plan.get('model', 'model')}{width} on {result.get('dataset', BENCH_DATASET)}; {where}"


def latency_point(point: dict, key: str, y: float, label: str = "", y_err: float | None = None) -> Point:
    """The p50 latency `{key}_ms` of a result point against Y, whiskered by its quartiles when present."""
    value = point[f"{key}_ms"]
    low, high = whisker(value, point.get(f"{key}_q1_ms"), point.get(f"{key}_q3_ms"))
    return Point(value, y, label, low, high, y_err)


def _at(point: dict, key: str, y: float, label: str = "", y_err: float | None = None) -> Point:
    """A result point at `key`: a parameter count as it is, a latency (`key` without `_ms`) as a p50."""
    if key.startswith("params"):
        return Point(point[key], y, label, y_err=y_err)
    return latency_point(point, key, y, label, y_err)


def latency_label(batch: int, series: tuple[Series, ...]) -> str:
    """The latency axis, saying what the figures are: p50s, and quartile whiskers only where drawn."""
    whiskered = any(p.x_low is not None for s in series for p in s.points)
    return f"CPU latency at batch {batch}, p50 (ms)" + ("; whiskers: quartiles over rounds" if whiskered else "")


def _standard_error(point: dict, key: str) -> float | None:
    """Standard error of the mean of `key` (a fraction, returned in percentage points) over the point's
    seeds; None for a single seed."""
    seeds = point.get("seeds", ())
    if len(seeds) < 2:
        return None
    return statistics.stdev(100 * s[key] for s in seeds) / math.sqrt(len(seeds))


def _seeds_note(points: list[dict]) -> str:
    """What the accuracies are when points hold several seeds, for the title (the axis has no room)."""
    seeds = max((len(p.get("seeds", ())) for p in points), default=0)
    return f": mean of {seeds} seeds, bars standard error" if seeds > 1 else ""


def shifter_panels(result: dict) -> dict[str, Panel]:
    """Accuracy against params and against batch-32 latency, sparse vs compact, each pruned level a point
    (labelled on the compact line); IMP's level 0, the trained dense model, is the star."""
    title = f"shifter: sparse vs compact per IMP level\n{caption(result)}"
    pruned = [p for p in result["points"] if p["level"] != 0]
    dense = next((p for p in result["points"] if p["level"] == 0), None)
    panels = {}
    for suffix, (sparse_x, compact_x) in {
        "accuracy-params": ("params_sparse", "params_compact"),
        "accuracy-latency": ("sparse_b32", "compact_b32"),
    }.items():
        series = (
            Series(
                "sparse (masked, stored dense)",
                in_x_order(_at(p, sparse_x, 100 * p["sparse_accuracy"]) for p in pruned),
                linestyle="--",
                alpha=0.7,
            ),
            Series(
                "compact (after surgery)",
                in_x_order(_at(p, compact_x, 100 * p["compact_accuracy"], f"L{p['level']}") for p in pruned),
                marker="s",
                annotate=True,
            ),
        ) + ((dense_series(_at(dense, sparse_x, 100 * dense["sparse_accuracy"])),) if dense else ())
        params = suffix == "accuracy-params"
        xlabel = "parameters as stored (log scale)" if params else latency_label(32, series)
        panels[suffix] = Panel(title, xlabel, "test accuracy, %", series, log_x=params)
    return panels


def reconvene_panels(result: dict) -> dict[str, Panel]:
    """Accuracy against params and against batch-32 latency, per scorer the unstructured PaI model (stored
    dense, dashed) and reconvene (points labelled by compression), and the accuracy gap between the two
    against compression. Accuracies are means over the seeds; latencies are the first seed's models'.
    The suite trains no dense model, so these figures have no dense star."""
    points = [p for p in result["points"] if "refused" not in p]
    title = f"reconvene vs unstructured pruning at init{_seeds_note(points)}\n{caption(result)}"
    scorers = list(dict.fromkeys(p["scorer"] for p in points))
    panels = {}
    for suffix, (unstructured_x, reconvene_x) in {
        "accuracy-params": ("params_dense", "params_reconvene"),
        "accuracy-latency": ("unstructured_b32", "reconvene_b32"),
    }.items():
        series: tuple[Series, ...] = ()
        for index, scorer in enumerate(scorers):
            mine = [p for p in points if p["scorer"] == scorer]
            unstructured = in_x_order(_trained(p, unstructured_x, "unstructured") for p in mine)
            ours = in_x_order(_trained(p, reconvene_x, "reconvene", f"{p['compression']:g}x") for p in mine)
            series += (
                Series(f"reconvene {scorer}", ours, marker="s", color=f"C{index}", annotate=True),
                Series(f"unstructured {scorer}", unstructured, linestyle="--", color=f"C{index}", alpha=0.6),
            )
        params = suffix == "accuracy-params"
        xlabel = "parameters as stored (log scale)" if params else latency_label(32, series)
        panels[suffix] = Panel(title, xlabel, "test accuracy, %", series, log_x=params)
    panels["gap-compression"] = _gap_panel(points, scorers, title)
    return panels


def _trained(point: dict, key: str, who: str, label: str = "") -> Point:
    """The unstructured or the reconvene model of a point: its mean accuracy over seeds, with the error."""
    return _at(point, key, 100 * point[f"acc_{who}"], label, _standard_error(point, f"acc_{who}"))


def _gap_panel(points: list[dict], scorers: list[str], title: str) -> Panel:
    """Unstructured minus reconvene accuracy per scorer against compression; the bars are the standard
    error of the gap paired by seed (`acc_gap_pp_sem`), which leaves out how far the training recipe
    itself moves between seeds."""
    series = tuple(
        Series(
            scorer,
            in_x_order(
                Point(p["compression"], p["acc_gap_pp"], f"{p['compression']:g}x", y_err=p.get("acc_gap_pp_sem"))
                for p in points
                if p["scorer"] == scorer
            ),
            color=f"C{index}",
        )
        for index, scorer in enumerate(scorers)
    )
    return Panel(
        title,
        "compression (conv and linear weights / remaining, log scale)",
        "accuracy gap, pp (unstructured - reconvene)",
        series,
        log_x=True,
        guides=((0.0, "no gap"), (GAP_TOLERANCE_PP, f"{GAP_TOLERANCE_PP:g} pp")),
    )


def write(panels: dict[str, Panel], stem: Path) -> list[Path]:
    """Each panel as STEM-SUFFIX.png beside the result's JSON."""
    return [save(draw(panel), stem.with_name(f"{stem.name}-{suffix}.png")) for suffix, panel in panels.items()]


def shifter_figures(result: dict, stem: Path) -> list[Path]:
    return write(shifter_panels(result), stem)


def reconvene_figures(result: dict, stem: Path) -> list[Path]:
    return write(reconvene_panels(result), stem)


FRONTIER_STYLES = {  # method -> (marker, line style), in drawing order; the subject method labelled
    "structured": ("s", "-"),
    "shifter": ("o", "-"),
    "reconvene": ("^", "-"),
    "torch-pruning": ("v", "--"),
    "narrow": ("D", "--"),
}


def frontier_panels(result: dict) -> dict[str, Panel]:
    """Per model, accuracy against served batch-32 latency: each method's variants joined in latency
    order (quartile whiskers; error bars where a variant trained from several seeds), the dense model
    a star (its bar: the standard error over its seeds), guides 0.5 and 1 point below it."""
    panels = {}
    for model, measured in result["models"].items():
        dense = measured["dense"]
        series = tuple(
            Series(
                name,
                in_x_order(
                    latency_point(p, "b32", 100 * p["accuracy"], p["label"], _standard_error(p, "accuracy"))
                    for p in method["variants"]
                ),
                marker=FRONTIER_STYLES.get(name, ("o", "-"))[0],
                linestyle=FRONTIER_STYLES.get(name, ("o", "-"))[1],
                color=f"C{index}",  # one colour per method in every figure
                annotate=name == "structured",
            )
            for index, name in enumerate(_frontier_order(measured["methods"]))
            if (method := measured["methods"][name])["variants"]  # a refused build has none: named in the title
        )
        star = latency_point(dense, "b32", 100 * dense["accuracy"], y_err=dense.get("accuracy_sem_pp"))
        series += (dense_series(star),)
        seeds = len(dense["seeds"])
        note = f"; baselines and dense bars: standard error over {seeds} seeds" if seeds > 1 else ""
        refused = [name for name, method in measured["methods"].items() if not method["variants"]]
        note += f"; no variants: {', '.join(refused)}" if refused else ""
        title = f"frontier: accuracy against served latency{note}\n{caption({**result, 'plan': measured})}"
        guides = tuple(
            (100 * dense["accuracy"] - pp, f"{pp:g} point{'s' if pp != 1 else ''} below dense") for pp in (0.5, 1.0)
        )
        panels[model] = Panel(title, latency_label(32, series), "test accuracy, %", series, guides=guides)
    return panels


def _frontier_order(methods: dict) -> list[str]:
    """The methods of a result in `FRONTIER_STYLES` order, any other after them by name."""
    known = [name for name in FRONTIER_STYLES if name in methods]
    return known + sorted(name for name in methods if name not in FRONTIER_STYLES)


def frontier_figures(result: dict, stem: Path) -> list[Path]:
    return write(frontier_panels(result), stem)
