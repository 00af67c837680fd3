"""Figures described first, drawn second (matplotlib, imported only when drawing).

A figure is a `Panel` of `Series` of `Point`s. The description is pure, so the properties a reader
relies on hold where it is made: a series' points are in x order (its line runs left to right and never
doubles back), a spread is a whisker or error bar around the value it belongs to, and the dense model is
a series of its own, a labelled star, never one more point of a line. The demo and cluster reports
(`cloud.localfleet.plots`) and the benchmark figures (`bench.plots`) draw with these parts.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from common.errors import PrunefleetError
from common.profiling import cpu_model

DENSE_LABEL = "dense"


class PlotError(PrunefleetError, ValueError):
    """A figure described with points it cannot draw truthfully."""


@dataclass(frozen=True)
class Point:
    """One model on a figure: x (a latency or a size), y (an accuracy, %), and the spread either holds:
    `x_low`..`x_high` the ends of a whisker (e.g. latency quartiles), `y_err` a standard error."""

    x: float
    y: float
    label: str = ""
    x_low: float | None = None
    x_high: float | None = None
    y_err: float | None = None

    def __post_init__(self) -> None:
        if (self.x_low is None) != (self.x_high is None):
            raise PlotError(f"{self.label or self}: a whisker needs both ends")
        if self.x_low is not None and not self.x_low <= self.x <= self.x_high:
            raise PlotError(f"{self.label or self}: whisker {self.x_low}..{self.x_high} does not hold {self.x}")
        if self.y_err is not None and not self.y_err >= 0:
            raise PlotError(f"{self.label or self}: a standard error cannot be {self.y_err}")


def in_x_order(points: Iterable[Point]) -> tuple[Point, ...]:
    """The points left to right (ties bottom to top): the order a line joins them in."""
    return tuple(sorted(points, key=lambda p: (p.x, p.y)))


def whisker(value: float, low: float | None, high: float | None) -> tuple[float | None, float | None]:
    """Whisker ends for `value`, or none when the data holds no spread that brackets it."""
    if low is None or high is None or not low <= value <= high:
        return None, None
    return low, high


@dataclass(frozen=True)
class Series:
    """Points drawn with one style and one legend entry; `label` "" keeps it out of the legend."""

    label: str
    points: tuple[Point, ...]
    marker: str = "o"
    linestyle: str = "-"  # "none": markers only
    color: str | None = None
    drawstyle: str = "default"  # "steps-post" for a frontier
    markersize: float = 5.0
    alpha: float = 1.0
    annotate: bool = False  # each point's label written beside it, offset by `label_offset` points
    label_offset: tuple[float, float] = (4, 4)

    def __post_init__(self) -> None:
        if any(b.x < a.x for a, b in zip(self.points, self.points[1:])):
            raise PlotError(f"{self.label}: points must come in x order (in_x_order), or the line doubles back")


def dense_series(point: Point, color: str = "black", source: str = "", annotate: bool = True) -> Series:
    """The dense model: a large star (labelled beside it unless `annotate` is off), apart from the pruned
    variants' lines; `source` names where its figures come from when a figure has several."""
    label = f"{DENSE_LABEL} model{f' ({source})' if source else ''}"
    dense = replace(point, label=DENSE_LABEL)  # labelled below left, where the variants' labels (above right) are not
    return Series(label, (dense,), "*", "none", color, markersize=15, annotate=annotate, label_offset=(-9, -12))


@dataclass(frozen=True)
class Panel:
    """One figure: titled, labelled axes, its series, and horizontal guide lines (y, legend label)."""

    title: str
    xlabel: str
    ylabel: str
    series: tuple[Series, ...]
    log_x: bool = False
    guides: tuple[tuple[float, str], ...] = ()


def machine_label(cpu: str | None = None, cpus: int | None = None, threads: int | None = None) -> str:
    """A machine as a title names it: CPU model, logical CPUs and (when known) torch threads; the CPU
    model and count default to this machine's."""
    cpus = cpus or os.cpu_count()
    parts = [cpu or cpu_model()]
    if cpus:
        parts.append(f"{cpus} logical CPU{'s' if cpus != 1 else ''}")
    if threads:
        parts.append(f"{threads} torch thread{'s' if threads != 1 else ''}")
    return ", ".join(parts)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _spread(values: Sequence[float | None]) -> list[float] | None:
    """Error lengths for matplotlib, NaN (nothing drawn) where a point has none; None when none has."""
    if all(v is None for v in values):
        return None
    return [math.nan if v is None else v for v in values]


def _draw_series(ax, series: Series) -> None:
    points = series.points
    lows = _spread([None if p.x_low is None else p.x - p.x_low for p in points])
    highs = _spread([None if p.x_high is None else p.x_high - p.x for p in points])
    container = ax.errorbar(
        [p.x for p in points],
        [p.y for p in points],
        xerr=None if lows is None else [lows, highs],
        yerr=_spread([p.y_err for p in points]),
        marker=series.marker or "none",
        markersize=series.markersize,
        linestyle=series.linestyle,
        drawstyle=series.drawstyle,
        color=series.color,
        alpha=series.alpha,
        capsize=2.5,
        elinewidth=0.8,
        label=series.label or "_nolegend_",
        zorder=2 if series.marker == "*" else 3,  # a variant as large as the dense model shows on its star
    )
    dx, dy = series.label_offset
    style = {"textcoords": "offset points", "xytext": (dx, dy), "ha": "right" if dx < 0 else "left", "fontsize": 7}
    style["bbox"] = {"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.7}  # legible over lines
    for p in points if series.annotate else ():
        if p.label:
            ax.annotate(p.label, (p.x, p.y), color=container.lines[0].get_color(), zorder=5, **style)


def draw(panel: Panel, size: tuple[float, float] = (7.5, 4.8)):
    """The panel as a matplotlib figure (not yet saved: `save` writes and closes it)."""
    fig, ax = _pyplot().subplots(figsize=size)
    for series in panel.series:
        _draw_series(ax, series)
    for y, label in panel.guides:
        ax.axhline(y, color="grey", linestyle="-" if y == 0 else ":", linewidth=1, label=label)
    if panel.log_x:
        ax.set_xscale("log")
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    ax.set_title(panel.title, fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def save(fig, path: Path, dpi: int = 120) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
    return path


def pareto(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (latency, accuracy) points no other point beats on both: faster and at least as accurate."""
    best, front = -math.inf, []
    for latency, accuracy in sorted(points, key=lambda p: (p[0], -p[1])):
        if accuracy > best:
            front.append((latency, accuracy))
            best = accuracy
    return front
