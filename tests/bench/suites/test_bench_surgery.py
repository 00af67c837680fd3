"""The surgery benchmark and its DNNShifter-style baseline."""

import json

import torch

from bench.__main__ import main
from bench.baseline import dnnshifter_prune, fuse_batchnorm
from bench.suites import surgery
from bench.suites.surgery import summarize, weights
from common import models
from common.profiling import count_macs

X = torch.randn(8, 1, 28, 28)


def _model():
    torch.manual_seed(0)
    model = models.build("vgg11", {"width": 0.25}).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(0.1, 0.5)  # positive: a dead filter still emits a constant
    return model


def test_fusing_batchnorm_keeps_the_outputs():
    model = _model()
    with torch.no_grad():
        assert torch.allclose(model(X), fuse_batchnorm(model, X[:1])(X), atol=1e-4)


def test_the_baseline_drops_zero_filters_and_changes_the_outputs_when_bn_bias_is_positive():
    model = _model()
    with torch.no_grad():
        model.features[4].weight[:5] = 0
    pruned = dnnshifter_prune(model, X[:1], model.classifier)
    assert weights(pruned) < weights(model)
    with torch.no_grad():
        fusion_error = (model(X) - fuse_batchnorm(model, X[:1])(X)).abs().max()
        assert (model(X) - pruned(X)).abs().max() > 10 * fusion_error  # dropped biases, not rounding
    assert count_macs(pruned, X.shape[1:]) < count_macs(model, X.shape[1:])


def test_summary_aggregates_at_the_highest_compression():
    point = {
        "exact": True,
        "max_abs_diff": 0.0,
        "params_sparse": 100,
        "params_compact": 10,
        "weights_removed": 90,
        "baseline_weights_removed": 45,
        "baseline_max_abs_diff": 0.2,
        "speedup_b1": 2.0,
        "speedup_b64": 3.0,
        "surgery_ms": 5.0,
        "check_ms": 2.0,
        "model": "vgg11",
        "fault_exposure": None,
    }
    summary = summarize(
        [
            {**point, "compression": 4, "speedup_b64": 1.0},
            {**point, "compression": 256, "fault_exposure": {"shares": [1.0, 0.5, 0.0], "harmless": 2}},
        ]
    )
    assert summary["params_ratio_vs_baseline"] == 2.0 and summary["speedup_b64"] == 3.0
    assert summary["all_exact"] and summary["best_params_ratio"] == 10.0 and summary["highest_compression"] == 256
    assert (
        summary["check_faults"] == 3 and summary["check_faults_missed"] == 1 and summary["check_faults_harmless"] == 2
    )
    assert summary["check_fault_exposure_median"] == 0.5 and summary["surgery_ms_max_by_model"] == {"vgg11": 5.0}


def test_quick_benchmark_runs_from_the_cli_and_is_exact(tmp_path, monkeypatch):
    monkeypatch.setattr(surgery, "QUICK", {**surgery.QUICK, "train_images": 256, "iters": 2})
    out = tmp_path / "surgery.json"
    assert main(["surgery", "--json", str(out), "--quick"]) == 0
    result = json.loads(out.read_text())
    assert result["summary"]["all_exact"] and result["summary"]["highest_compression"] == 256
    assert {p["model"] for p in result["points"]} == {"vgg11", "resnet20", "mobilenetv2"}
    assert result["summary"]["check_faults"] > 0
    assert all(p["weights_removed"] >= p["baseline_weights_removed"] for p in result["points"])
