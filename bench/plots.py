"""PNG figures for benchmark results (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _finish(fig, ax, xlabel: str, log_x: bool, path: Path) -> Path:
    """Accuracy on y, the given x, grid and legend, saved."""
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def shifter_figures(points: list[dict], stem: Path) -> list[Path]:
    """Accuracy against params and against batch-32 latency, sparse vs compact, one marker per level."""
    paths = []
    for suffix, (sparse_key, compact_key, label, log_x) in {
        "accuracy-params": ("params_sparse", "params_compact", "parameters (as stored)", True),
        "accuracy-latency": ("sparse_b32_ms", "compact_b32_ms", "CPU latency at batch 32 (ms)", False),
    }.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, acc, name, marker in (
            (sparse_key, "sparse_accuracy", "sparse (masked)", "o"),
            (compact_key, "compact_accuracy", "compact (after surgery)", "s"),
        ):
            ax.plot([p[key] for p in points], [100 * p[acc] for p in points], marker=marker, label=name)
        for p in points:
            ax.annotate(
                f"L{p['level']}",
                (p[compact_key], 100 * p["compact_accuracy"]),
                fontsize=7,
                textcoords="offset points",
                xytext=(3, 3),
            )
        paths.append(_finish(fig, ax, label, log_x, stem.with_name(f"{stem.name}-{suffix}.png")))
    return paths


def reconvene_figures(points: list[dict], stem: Path) -> list[Path]:
    """Accuracy against params and against batch-32 latency: the unstructured PaI model (stored dense)
    and reconvene, one line per scorer, points labelled by compression."""
    paths = []
    for suffix, (keys, label, log_x) in {
        "accuracy-params": (("params_dense", "params_reconvene"), "parameters (as stored)", True),
        "accuracy-latency": (("unstructured_b32_ms", "reconvene_b32_ms"), "CPU latency at batch 32 (ms)", False),
    }.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        points = [p for p in points if "refused" not in p]
        for scorer in dict.fromkeys(p["scorer"] for p in points):
            mine = sorted((p for p in points if p["scorer"] == scorer), key=lambda p: p["compression"])
            (line,) = ax.plot(
                [p[keys[1]] for p in mine],
                [100 * p["acc_reconvene"] for p in mine],
                marker="s",
                label=f"reconvene {scorer}",
            )
            ax.plot(
                [p[keys[0]] for p in mine],
                [100 * p["acc_unstructured"] for p in mine],
                marker="o",
                linestyle="--",
                color=line.get_color(),
                alpha=0.6,
                label=f"unstructured {scorer}",
            )
            for p in mine:
                ax.annotate(
                    f"{p['compression']:g}x",
                    (p[keys[1]], 100 * p["acc_reconvene"]),
                    fontsize=7,
                    textcoords="offset points",
                    xytext=(3, 3),
                )
        paths.append(_finish(fig, ax, label, log_x, stem.with_name(f"{stem.name}-{suffix}.png")))
    return paths
