"""The frontier benchmark on a tiny plan: every registered method the plan names is built through the
real build, both baselines train for real over two seeds, everything is timed in one run; the result
holds what the plan asks for, its figures follow from its own measurements, and a rerun trains nothing."""

import dataclasses
import json

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from bench.__main__ import main
from bench.suites import frontier, frontier_builds, frontier_summary, frontier_train
from cloud.build.methods import METHODS

# structured is benchmarked here as soon as it is registered; the suite's own plans always name it
METHODS_HERE = tuple(m for m in frontier.METHODS if m in METHODS)
TINY = frontier.Plan(
    models=(frontier.ModelPlan("vgg11", 0.125, (4.0, 16.0)),),
    subset=256,
    dense_epochs=2,
    finetune_epochs=1,
    seeds=(0, 1),
    methods=METHODS_HERE,
    speedups=(1.05, 1.15),  # within what structured reaches on VGG-11 at width 1/8 (about 1.5x)
    shifter_rate=0.8,
    prune_ratios=(0.3, 0.6),
    width_multipliers=(0.7, 0.4),
    iters=(2, 1, 1),
    rounds=4,
    test_subset=1000,
)
ALL = (*METHODS_HERE, *frontier.BASELINES)


def _steps_taken(run) -> int:
    """Optimizer steps (any optimizer, anywhere in this process) while `run` runs."""
    steps = [0]
    handle = register_optimizer_step_post_hook(lambda *_: steps.__setitem__(0, steps[0] + 1))
    try:
        assert run() == 0
    finally:
        handle.remove()
    return steps[0]


def _finished(work) -> dict:
    """Every finished point and manifest under `work` (the plan marker aside) and when it was written."""
    return {str(p.relative_to(work)): p.stat().st_mtime_ns for p in work.rglob("*.json") if p.name != "plan.json"}


def test_a_tiny_frontier_benchmark_runs_end_to_end_and_resumes(tmp_path, monkeypatch, fashion_mnist):
    monkeypatch.setattr(frontier, "QUICK", TINY)
    out = tmp_path / "frontier.json"
    args = ["frontier", "--json", str(out), "--quick", "--threads", "1"]
    steps = _steps_taken(lambda: main(args))
    result = json.loads(out.read_text())
    measured = result["models"]["vgg11"]
    assert set(measured["methods"]) == set(ALL)
    dense = measured["dense"]
    assert [s["seed"] for s in dense["seeds"]] == [0, 1] and dense["accuracy"] == dense["seeds"][0]["accuracy"]
    assert dense["epochs"] == TINY.dense_epochs and dense["accuracy_sem_pp"] is not None
    for name, method in measured["methods"].items():
        assert len(method["variants"]) == TINY.variants, name  # every method's variants, the dense level left out
        for point in method["variants"]:
            for batch in TINY.batches:  # speedups from this run's own dense latency
                for served in ("", "ort_"):  # by torch, and by ONNX Runtime in the same rounds
                    ms = point[f"{served}b{batch}_ms"]
                    assert point[f"speedup_{served}b{batch}"] == dense[f"{served}b{batch}_ms"] / ms
                    assert point[f"{served}b{batch}_q1_ms"] <= ms <= point[f"{served}b{batch}_q3_ms"]
            assert point["macs"] < dense["macs"] or name not in frontier.BASELINES
            assert point["speedup_per_macs"] == point["speedup_b32"] / (dense["macs"] / point["macs"])
            assert point["speedup_per_macs_ort"] == point["speedup_ort_b32"] / (dense["macs"] / point["macs"])
        ort_fastest = max(method["variants"], key=lambda p: p["speedup_ort_b32"])
        assert method["figures"]["fastest_speedup_ort"] == ort_fastest["speedup_ort_b32"]
    assert measured["methods"]["shifter"]["dropped"] == ["vgg11-L0"]  # level 0 is the dense model as given
    for name in frontier.BASELINES:  # paired by seed with the dense model
        for point in measured["methods"][name]["variants"]:
            deltas = [100 * (s["accuracy"] - d["accuracy"]) for s, d in zip(point["seeds"], dense["seeds"])]
            assert point["acc_delta_pp"] == pytest.approx(sum(deltas) / 2)
            assert point["acc_delta_pp_sem"] == pytest.approx(abs(deltas[0] - deltas[1]) / 2)
    budget = {name: method["budget"]["epochs"] for name, method in measured["methods"].items()}
    equal = TINY.dense_epochs + TINY.variants * TINY.finetune_epochs
    assert budget["shifter"] == budget["torch-pruning"] == budget["narrow"] == budget["reconvene"] == equal
    assert budget["torch-pruning"] - measured["methods"]["torch-pruning"]["budget"]["dense_epochs"] == 2
    # what was counted is what ran: every seed of the dense model and the baselines, each method once
    spe = measured["methods"]["narrow"]["budget"]["steps_per_epoch"]
    k, seeds = TINY.variants, len(TINY.seeds)
    baselines = seeds * (TINY.dense_epochs + k * TINY.finetune_epochs + k * TINY.scratch_epochs)
    methods = k * TINY.finetune_epochs + k * TINY.scratch_epochs  # shifter and reconvene
    structured = measured["methods"].get("structured", {}).get("budget", {}).get("steps", 0)
    reference = measured["methods"]["reconvene"]["budget"]["excluded_epochs"]  # the build's own dense model
    assert steps == spe * (baselines + methods + reference) + structured
    summary = result["summary"]
    assert summary["by_model"]["vgg11"]["narrow"]["epochs"] == equal
    structured_figures = measured["methods"]["structured"]["figures"]
    assert summary["onnxruntime"] == {key: structured_figures[key] for key in frontier_summary.ORT_KEYS}
    assert (tmp_path / "frontier-vgg11.png").stat().st_size > 0
    finished = _finished(tmp_path / "frontier.work")
    assert {"vgg11/served-timing.json", "vgg11/dense-seed1.json", "vgg11/build-shifter.json"} <= set(finished)
    assert _steps_taken(lambda: main(args)) == 0  # a rerun resumes: nothing trains again
    assert _finished(tmp_path / "frontier.work") == finished  # nor measures or builds again
    assert json.loads(out.read_text())["models"] == result["models"]


def test_a_method_that_is_not_registered_is_an_error_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(frontier, "QUICK", dataclasses.replace(TINY, methods=("no-such-method",)))
    with pytest.raises(frontier_builds.MethodMissingError, match="no-such-method.*registered: shifter"):
        frontier.run(quick=True, work=tmp_path / "work")
    assert not (tmp_path / "work").exists()


def _measured(accuracies: dict, spent_steps: dict | None = None) -> dict:
    """One model's result from made-up measurements: the dense model at 90% and 8 ms; each method's
    variants as (accuracy, ms at batch 32, MACs) against its 1000 MACs."""
    timing = {"dense": {"b32_ms": 8.0, "b32_q1_ms": 7.5, "b32_q3_ms": 8.5}}
    groups, spent = {}, {}
    for method, variants in accuracies.items():
        groups[method] = []
        for index, (accuracy, ms, macs) in enumerate(variants):
            key = f"{method}/{index}"
            groups[method].append({"key": key, "label": str(index), "accuracy": accuracy, "macs": macs, "params": 1})
            timing[key] = {"b32_ms": ms, "b32_q1_ms": ms, "b32_q3_ms": ms}
        steps = (spent_steps or {}).get(method, 2 * 2 * len(variants))  # 2 epochs per variant, 2 steps each
        spent[method] = frontier_summary.Spent(steps, 1.0, method != "narrow")
    dense = [{"seed": 0, "accuracy": 0.9, "params": 10, "macs": 1000, "steps": 8}]
    return frontier_summary.model_result("m", 1.0, dense, groups, spent, timing, steps_per_epoch=2)


def test_the_summary_judges_each_target_on_the_worst_model():
    good = _measured(
        {
            "structured": [(0.898, 1.6, 200), (0.885, 1.0, 100)],  # 5x within 0.5 points, 8x at -1.5
            "shifter": [(0.9, 4.0, 1000)],
            "torch-pruning": [(0.897, 4.0, 250)],
            "narrow": [(0.88, 2.0, 250)],  # 2 points below: nothing within either tolerance
        }
    )
    assert good["methods"]["structured"]["variants"][0]["acc_delta_pp"] == pytest.approx(-0.2)
    assert good["methods"]["narrow"]["figures"]["speedup_within_1pp"] == 1.0  # the dense model alone, stated
    assert "dense model alone" in good["methods"]["narrow"]["figures"]["notes"][0]
    worse = _measured(
        {
            "structured": [(0.85, 2.0, 400)],  # 4x, but 5 points below: nothing within 1 point
            "shifter": [(0.9, 4.0, 1000)],
            "torch-pruning": [(0.9, 4.0, 250)],
            "narrow": [(0.9, 4.0, 250)],
        },
        {"structured": 8, "shifter": 4},  # twice shifter's epochs per variant
    )
    summary = frontier_summary.summarize({"vgg": good, "resnet": worse})
    assert summary["speedup_within_0_5pp"] == 1.0 and summary["worst_model"]["speedup_within_0_5pp"] == "resnet"
    assert summary["fastest_speedup"] == 4.0 and summary["fastest_acc_delta_pp"] == pytest.approx(-5.0)
    assert summary["speedup_per_macs"] == pytest.approx(0.8)  # vgg's 5x at 5x fewer MACs is 1.0, its 8x 0.8
    assert summary["train_epochs_ratio"] == pytest.approx((4 + 4) / (4 + 2))  # 1 variant, 4 dense epochs each
    assert summary["speedup_within_0_5pp_vs_best_baseline"] == pytest.approx(1.0 / 2.0)
    assert good["versus"]["speedup_within_0_5pp_vs_best_baseline"] == pytest.approx(5.0 / 2.0)
    assert summary["targets"] == {
        "speedup_within_0_5pp >= 4": False,
        "speedup_within_1pp >= 5": False,
        "fastest_speedup >= 8": False,
        "fastest_acc_delta_pp >= -3": False,
        "speedup_per_macs >= 0.8": True,
        "train_epochs_ratio <= 1": False,
        "speedup_within_0_5pp_vs_best_baseline > 1": False,
        "speedup_within_1pp_vs_best_baseline > 1": False,
    }
    assert summary["by_model"]["vgg"]["narrow"] == {
        "speedup_within_0_5pp": 1.0,
        "speedup_within_1pp": 1.0,
        "epochs": 2.0,  # one variant, trained from scratch: no dense epochs charged
    }


def test_a_refused_subject_misses_its_targets_and_an_absent_one_is_not_judged():
    refused = _measured({"structured": [], "shifter": [(0.9, 4.0, 1000)], "narrow": [(0.9, 4.0, 250)]})
    refused["methods"]["structured"]["refused"] = "speedups: 8x is beyond m on this CPU"
    fine = _measured({"structured": [(0.9, 1.0, 100)], "shifter": [(0.9, 4.0, 1000)], "narrow": [(0.9, 4.0, 250)]})
    summary = frontier_summary.summarize({"a": fine, "b": refused})
    assert summary["fastest_speedup"] is None and summary["targets"]["fastest_speedup >= 8"] is False
    assert summary["speedup_within_0_5pp"] == 1.0 and summary["worst_model"]["speedup_within_0_5pp"] == "b"
    assert any("refused: speedups: 8x" in note for note in summary["notes"])
    absent = frontier_summary.summarize({"a": _measured({"shifter": [(0.9, 4.0, 1000)]})})
    assert absent["speedup_within_0_5pp"] is None and set(absent["targets"].values()) == {None}


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"prune_ratios": (0.3,)}, "prune_ratios"),
        ({"dense_epochs": 3}, "dense_epochs"),
        ({"methods": ("shifter", "narrow")}, "baselines"),
        ({"batches": (1, 8)}, "batches"),
        ({"width_multipliers": (0.7, 1.2)}, "width_multipliers"),
    ],
)
def test_a_plan_that_cannot_give_equal_budgets_is_refused_naming_the_setting(change, named):
    with pytest.raises(frontier.PlanError, match=named):
        dataclasses.replace(TINY, **change)


def test_a_build_killed_mid_way_is_charged_what_it_trained_before(tmp_path):
    """The count is on disk every few steps: a SIGKILL (no `finally`) loses fewer than FLUSH_STEPS."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1)
    n = 2 * frontier_train.FLUSH_STEPS + 5
    seen = {}

    def killed() -> dict:
        for _ in range(n):
            optimizer.step()
        seen.update(json.loads((tmp_path / "build-x.partial.json").read_text()))
        raise KeyboardInterrupt  # stands for the kill: the partial was written before it

    with pytest.raises(KeyboardInterrupt):
        frontier_train.counted(tmp_path, "build-x", killed)
    assert seen["steps"] == 2 * frontier_train.FLUSH_STEPS

    def resumed() -> dict:
        for _ in range(3):
            optimizer.step()
        return {"done": True}

    record = frontier_train.counted(tmp_path, "build-x", resumed)
    assert record["steps"] == n + 3 and record["done"] and not (tmp_path / "build-x.partial.json").exists()
