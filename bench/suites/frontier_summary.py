"""What the frontier suite's measurements say: per variant its accuracy delta and speedups against the
dense model, per method its budget and its figures, per model how `structured` compares, and the
summary, each target judged on the worst of the models.

Accuracy deltas are in points against the dense model, paired by seed: a baseline variant trained
from seed s is compared with the dense model of seed s, and its delta is the mean over seeds, with the
standard error of the paired deltas (`acc_delta_pp_sem`); a method's variants come from the first
seed's dense model and are compared with it. "Within 0.5 points" means at most 0.5 points below the
dense model (a more accurate variant is within). Speedups are the dense model's p50 over the
variant's, from the same interleaved run. Where no variant of a method is within a tolerance, its
figure is 1.0, the dense model alone, and a note says so.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass

SUBJECT = "structured"  # the method the targets are about
REFERENCE = "shifter"  # whose training epochs `train_epochs_ratio` compares with
BASELINES = ("torch-pruning", "narrow")
TOLERANCES = (("0_5pp", 0.5), ("1pp", 1.0))
# key -> (comparison, target); each is judged on the worst model: the lowest value for ">=" and ">",
# the highest for "<="
TARGETS = {
    "speedup_within_0_5pp": (">=", 4.0),
    "speedup_within_1pp": (">=", 5.0),
    "fastest_speedup": (">=", 8.0),
    "fastest_acc_delta_pp": (">=", -3.0),
    "speedup_per_macs": (">=", 0.8),
    "train_epochs_ratio": ("<=", 1.0),
    "speedup_within_0_5pp_vs_best_baseline": (">", 1.0),
    "speedup_within_1pp_vs_best_baseline": (">", 1.0),
}
_LATENCY = re.compile(r"(?:ort_)?b(\d+)_ms")
# the served speedup each set of figures reads: torch's (the edge's default, what the targets judge) and
# ONNX Runtime's (an `onnxruntime` edge), whose figures carry the `_ort` suffix
BACKENDS = (("", "speedup_b32"), ("_ort", "speedup_ort_b32"))
ORT_KEYS = ("speedup_within_0_5pp_ort", "speedup_within_1pp_ort", "fastest_speedup_ort", "speedup_per_macs_ort")


@dataclass(frozen=True)
class Spent:
    """What one method spent on one model: the optimizer steps and seconds of its own training, and
    whether it is charged the dense model's epochs too (it starts from the dense model)."""

    steps: int
    seconds: float
    from_dense: bool
    excluded_steps: int = 0  # counted but not the method's: a dense model the build trained to compare with


def spent(records: list[dict], from_dense: bool, steps_per_epoch: int) -> Spent:
    """The training of `records` (one build, or a baseline's variants of one seed), less the epochs of a
    dense model a build trained only to compare its variants with (`reference_epochs`)."""
    excluded = sum(r.get("reference_epochs", 0) for r in records) * steps_per_epoch
    steps = sum(r["steps"] for r in records)
    return Spent(steps - excluded, sum(r["seconds"] for r in records), from_dense, excluded)


def budget_rule(dense_epochs: int, finetune_epochs: int, variants: int) -> str:
    """How the budget was equalized, in words, for the result beside the counted epochs."""
    total = dense_epochs + variants * finetune_epochs
    return (
        f"every portfolio of {variants} variants gets {total} epochs over the same training subset: the methods "
        f"that start from the dense model (structured, shifter, torch-pruning) are charged its {dense_epochs} "
        f"epochs and fine-tune each variant for {finetune_epochs}; reconvene and the narrow models, which have "
        f"no dense model, train each variant for {total // variants}. Epochs are counted (optimizer steps over "
        "the steps of one epoch), so a method that spends otherwise shows it under its budget"
    )


def _sem(values: list[float]) -> float | None:
    """Standard error of the mean; None for a single value."""
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None


def _dense(runs: list[dict], timed: dict, steps_per_epoch: int) -> dict:
    """The dense model: the first seed's (what the methods start from and what is timed), and the
    spread of its accuracy over the seeds."""
    first, accuracies = runs[0], [r["accuracy"] for r in runs]
    return {
        "seed": first["seed"],
        "accuracy": first["accuracy"],
        "accuracy_mean": statistics.fmean(accuracies),
        "accuracy_sem_pp": None if len(runs) < 2 else _sem([100 * a for a in accuracies]),
        "seeds": [{"seed": r["seed"], "accuracy": r["accuracy"]} for r in runs],
        "params": first["params"],
        "macs": first["macs"],
        "epochs": first["steps"] / steps_per_epoch,
        **timed,
    }


def _point(variant: dict, dense: dict, timed: dict) -> dict:
    """A variant with its delta (paired by seed), its speedups at every timed batch and against MACs."""
    by_seed = {s["seed"]: s["accuracy"] for s in dense["seeds"]}
    runs = variant.get("seeds") or [{"seed": dense["seed"], "accuracy": variant["accuracy"]}]
    deltas = [100 * (r["accuracy"] - by_seed[r["seed"]]) for r in runs]
    point = {**variant, **timed, "acc_delta_pp": statistics.fmean(deltas), "acc_delta_pp_sem": _sem(deltas)}
    for key in timed:
        if _LATENCY.fullmatch(key):
            point[f"speedup_{key[:-3]}"] = dense[key] / timed[key]
    point["macs_reduction"] = dense["macs"] / variant["macs"]
    for backend, speedup in BACKENDS:
        if speedup in point:
            point[f"speedup_per_macs{backend}"] = point[speedup] / point["macs_reduction"]
    return point


def method_figures(points: list[dict]) -> dict:
    """A method's figures on one model, per backend (`BACKENDS`): the best batch-32 speedup within each
    tolerance (1.0, the dense model alone, where no variant is within: said in `notes`), its fastest
    variant, and the lowest served speedup over MACs reduction."""
    figures: dict = {"notes": []}
    for backend, speedup in BACKENDS:
        if backend and not all(speedup in p for p in points):
            continue  # timed by torch alone
        for suffix, tolerance in TOLERANCES:
            within = [p for p in points if p["acc_delta_pp"] >= -tolerance]
            best = max(within, key=lambda p: p[speedup], default=None)
            figures[f"speedup_within_{suffix}{backend}"] = best[speedup] if best else 1.0
            figures[f"variant_within_{suffix}{backend}"] = best["label"] if best else None
            if best is None and not backend:
                figures["notes"].append(
                    f"no variant within {tolerance:g} points of the dense model: "
                    f"speedup_within_{suffix} 1.0 stands for the dense model alone"
                )
        fastest = max(points, key=lambda p: p[speedup], default=None)
        figures[f"fastest_speedup{backend}"] = fastest[speedup] if fastest else None
        figures[f"fastest_acc_delta_pp{backend}"] = fastest["acc_delta_pp"] if fastest else None
        figures[f"fastest_variant{backend}"] = fastest["label"] if fastest else None
        figures[f"speedup_per_macs{backend}"] = min((p[f"speedup_per_macs{backend}"] for p in points), default=None)
    return figures


def _budget(spent: Spent, dense_epochs: float, variants: int, steps_per_epoch: int) -> dict:
    own = spent.steps / steps_per_epoch
    charged = dense_epochs if spent.from_dense else 0.0
    return {
        "epochs": charged + own,
        "dense_epochs": charged,
        "variant_epochs": own,
        "variants": variants,
        "epochs_per_variant": own / variants if variants else None,
        "steps": spent.steps,
        "steps_per_epoch": steps_per_epoch,
        "excluded_epochs": spent.excluded_steps / steps_per_epoch,  # the build's own dense reference
        "seconds": spent.seconds,
    }


def _epochs_for(budget: dict, variants: int) -> float:
    """A method's epochs scaled to a portfolio of `variants` variants (the dense model's epochs once)."""
    return budget["dense_epochs"] + budget["epochs_per_variant"] * variants


def comparisons(methods: dict) -> dict:
    """How the subject method stands on one model: its training epochs over the reference method's for
    as many variants, and its within-tolerance speedups over the better baseline's."""
    subject = methods.get(SUBJECT)
    if subject is None:
        return {}
    out = {}
    if REFERENCE in methods and subject["budget"]["variants"]:
        n = subject["budget"]["variants"]
        out["train_epochs_ratio"] = _epochs_for(subject["budget"], n) / _epochs_for(methods[REFERENCE]["budget"], n)
    baselines = [methods[b]["figures"] for b in BASELINES if b in methods]
    for suffix, _ in TOLERANCES:
        key = f"speedup_within_{suffix}"
        if baselines:
            out[f"{key}_vs_best_baseline"] = subject["figures"][key] / max(f[key] for f in baselines)
    return out


def model_result(
    model: str, width: float, dense_runs: list[dict], groups: dict, spent: dict, timing: dict, steps_per_epoch: int
) -> dict:
    """One model's result: the dense model, every method's variants, budget and figures, and the
    subject method's comparisons (`versus`)."""
    dense = _dense(dense_runs, timing["dense"], steps_per_epoch)
    methods = {}
    for name, variants in groups.items():
        points = [_point(v, dense, timing[v["key"]]) for v in variants]
        methods[name] = {
            "variants": points,
            "budget": _budget(spent[name], dense["epochs"], len(points), steps_per_epoch),
            "figures": method_figures(points),
        }
    return {"model": model, "width": width, "dense": dense, "methods": methods, "versus": comparisons(methods)}


def _met(value: float | None, comparison: str, target: float, failed: bool) -> bool | None:
    """Whether `value` meets the target; without a value, False when the subject method made no variant
    to measure on some model (`failed`: refused, or none left), None when it was not benchmarked."""
    if value is None:
        return False if failed else None
    return {">=": value >= target, ">": value > target, "<=": value <= target}[comparison]


def _worst(values: dict, comparison: str) -> str | None:
    """The model with the worst value (None when some model has none)."""
    if not values or any(v is None for v in values.values()):
        return None
    return (max if comparison == "<=" else min)(values, key=values.get)


def _worst_value(values: dict) -> float | None:
    worst = _worst(values, ">=")
    return values[worst] if worst else None


def _notes(results: dict) -> list[str]:
    notes = []
    for model, result in results.items():
        if SUBJECT not in result["methods"]:
            notes.append(f"{model}: {SUBJECT} is not in this plan; its targets are not judged")
        for name, method in result["methods"].items():
            if method.get("refused"):
                notes.append(f"{model} {name}: the build refused: {method['refused']}")
            notes += [f"{model} {name}: {note}" for note in method["figures"]["notes"]]
    return notes


def summarize(results: dict) -> dict:
    """Each target key at its worst over the models (None where a model has no value for it), which
    model that was, whether the target is met, and the within-tolerance figures and epochs of every
    method on every model."""
    summary: dict = {"worst_model": {}, "targets": {}}
    failed = any(
        SUBJECT in r["methods"] and not r["methods"][SUBJECT]["variants"] for r in results.values()
    )  # refused, or left no variant: what the targets ask for was not delivered
    for key, (comparison, target) in TARGETS.items():
        values = {
            model: {**result["methods"].get(SUBJECT, {}).get("figures", {}), **result["versus"]}.get(key)
            for model, result in results.items()
        }
        worst = _worst(values, comparison)
        summary[key] = values[worst] if worst else None
        summary["worst_model"][key] = worst
        summary["targets"][f"{key} {comparison} {target:g}"] = _met(summary[key], comparison, target, failed)
    summary["onnxruntime"] = {  # the same figures served by ONNX Runtime: reported, not judged
        key: _worst_value(
            {model: r["methods"].get(SUBJECT, {}).get("figures", {}).get(key) for model, r in results.items()}
        )
        for key in ORT_KEYS
    }
    summary["notes"] = _notes(results)
    summary["by_model"] = {
        model: {
            name: {
                "speedup_within_0_5pp": method["figures"]["speedup_within_0_5pp"],
                "speedup_within_1pp": method["figures"]["speedup_within_1pp"],
                "epochs": method["budget"]["epochs"],
            }
            for name, method in result["methods"].items()
        }
        for model, result in results.items()
    }
    return summary
