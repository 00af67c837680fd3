"""`prunefleet bench surgery`: prunefleet's surgery against a DNNShifter-style baseline, same run.

For each zoo model, briefly trained on Fashion-MNIST: global magnitude masks at each compression
(conv and linear weights / remaining), BatchNorm channels of fully pruned filters masked as the
shifter build does; then surgery. Reported per point: params and bytes sparse vs compact, conv and
linear weights removed by prunefleet and by the baseline (each with its max abs diff from its own
sparse model), surgery time (its equivalence check included), CPU latency of the masked sparse model
and of the compact one at batch 1 and 64, and the MACs ratio.
"""

from __future__ import annotations

import copy
import logging
import math
import statistics

import torch
from torch import nn

from bench.baseline import dnnshifter_prune
from cloud import masks as masking
from cloud import surgery
from cloud.train import TrainConfig, apply_masks, train
from common import datasets, models, variant
from common.profiling import measure_latency

log = logging.getLogger(__name__)
FULL = {"models": ("vgg11", "vgg16", "resnet20", "resnet56"), "compressions": (2, 4, 8, 16, 32, 64, 128, 256),
        "train_images": 2048, "iters": 10}
QUICK = {"models": ("vgg11", "resnet20"), "compressions": (4, 256), "train_images": 512, "iters": 5}


def weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in models.prunable_layers(model).values())


def macs(model: nn.Module, example_input: torch.Tensor) -> int:
    total = 0

    def count(module, _inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += output[0].numel() * module.weight[0].numel()
        elif isinstance(module, nn.Linear):
            total += module.weight.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(example_input[:1])
    for hook in hooks:
        hook.remove()
    return total


def _diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(x) - b(x)).abs().max())


def _sparse_pair(model: nn.Module, compression: float, pairs: dict) -> tuple[nn.Module, nn.Module]:
    """(prunefleet's sparse model with BatchNorm masks, the plain magnitude-pruned one)."""
    masks = masking.prune_global_magnitude(model, masking.dense_masks(model), 1.0 - 1.0 / compression)
    plain = copy.deepcopy(model).eval()
    apply_masks(plain, masks)
    ours = copy.deepcopy(model).eval()
    apply_masks(ours, masking.with_batchnorm_masks(masks, pairs))
    return ours, plain


def _latency(model: nn.Module, shape, batch: int, iters: int) -> float:
    return measure_latency(model, shape, batch, iters=iters, warmup=2).p50_ms


def measure_point(arch: str, model: nn.Module, compression: float, real: torch.Tensor, iters: int) -> dict:
    example, shape = real[:1], tuple(real.shape[1:])
    ours, plain = _sparse_pair(model, compression, masking.conv_batchnorm_pairs(model, example))
    compact, report = surgery.compact(ours, example, check_inputs=real)
    classifier = list(models.prunable_layers(plain).values())[-1]
    baseline = dnnshifter_prune(plain, example, classifier)
    spec = variant.VariantSpec(arch=arch, kwargs={}, input_shape=shape, num_classes=10, mean=(0.0,), std=(1.0,),
                               method="shifter", sparsity=1 - 1 / compression, accuracy=0.0)
    lat = {f"{who}_b{b}_ms": _latency(m, shape, b, iters) for who, m in (("sparse", ours), ("compact", compact))
           for b in (1, 64)}
    return {
        "model": arch, "compression": compression, "exact": report.max_abs_diff <= 1e-4 and report.argmax_agreement == 1,
        "max_abs_diff": report.max_abs_diff, "argmax_agreement": report.argmax_agreement,
        "params_sparse": models.count_params(ours), "params_compact": report.params_after,
        "bytes_sparse": len(variant.encode(ours, spec)), "bytes_compact": len(variant.encode(compact, spec)),
        "weights_removed": weights(ours) - weights(compact), "baseline_weights_removed": weights(plain) - weights(baseline),
        "baseline_max_abs_diff": _diff(plain, baseline, real), "channels_removed": report.channels_removed,
        "surgery_ms": report.seconds * 1e3, "macs_ratio": macs(ours, real) / macs(compact, real), **lat,
        "speedup_b1": lat["sparse_b1_ms"] / lat["compact_b1_ms"], "speedup_b64": lat["sparse_b64_ms"] / lat["compact_b64_ms"],
    }


def _trained(arch: str, data: datasets.Dataset, images: int) -> nn.Module:
    torch.manual_seed(0)
    model = models.build(arch, {"in_channels": 1, "input_size": 28, "num_classes": 10, "width": 1.0})
    train(model, data.info, data.train.subset(images, 0), TrainConfig(epochs=1, batch_size=64, progress=False),
          desc=arch)
    return model.eval()


def summarize(points: list[dict]) -> dict:
    top = max(p["compression"] for p in points)
    at_top = [p for p in points if p["compression"] == top]
    ratios = [p["weights_removed"] / max(p["baseline_weights_removed"], 1) for p in at_top]
    return {"all_exact": all(p["exact"] for p in points), "max_abs_diff": max(p["max_abs_diff"] for p in points),
            "best_params_ratio": max(p["params_sparse"] / p["params_compact"] for p in points),
            "params_ratio_vs_baseline": math.exp(statistics.fmean(math.log(max(r, 1e-9)) for r in ratios)),
            "baseline_max_abs_diff": max(p["baseline_max_abs_diff"] for p in points),
            "speedup_b1": statistics.median(p["speedup_b1"] for p in at_top),
            "speedup_b64": statistics.median(p["speedup_b64"] for p in at_top),
            "surgery_ms_max": max(p["surgery_ms"] for p in points), "highest_compression": top}


def run(quick: bool, data_dir=None) -> dict:
    plan = QUICK if quick else FULL
    data = datasets.load("fashion-mnist", data_dir)
    real = datasets.normalize(data.test.images[:256], data.info.mean, data.info.std)
    points = []
    for arch in plan["models"]:
        model = _trained(arch, data, plan["train_images"])
        for compression in plan["compressions"]:
            point = measure_point(arch, model, compression, real, plan["iters"])
            log.info("%s at %dx: %s", arch, compression, {k: round(v, 4) if isinstance(v, float) else v
                                                          for k, v in point.items()})
            points.append(point)
    return {"points": points, "summary": summarize(points), "plan": dict(plan)}
