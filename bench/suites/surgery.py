"""`prunefleet bench surgery`: prunefleet's surgery against a DNNShifter-style baseline, same run.

For each zoo model, briefly trained on Fashion-MNIST: global magnitude masks at each compression
(conv and linear weights / remaining), BatchNorm channels of fully pruned filters masked as the
shifter build does; then surgery. Reported per point: params and bytes sparse vs compact, conv and
linear weights removed by prunefleet and by the baseline (each with its max abs diff from its own
sparse model), surgery time (its equivalence check included), CPU latency of the masked sparse model
and of the compact one at batch 1 and 64, and the MACs ratio.

The check runs on CHECK_REAL test images and CHECK_RANDOM random inputs. How strong that is, is
measured too: at the highest compression, single live channels are removed from the compact model on
purpose (faults), and the report gives the share of check inputs that expose each fault.
"""

from __future__ import annotations

import copy
import logging
import math
import statistics

import torch
from torch import nn

from bench.baseline import dnnshifter_prune
from cloud.build.compaction import channels, surgery
from cloud.build.methods import masks as masking
from cloud.build.train import TrainConfig, apply_masks, train
from common import datasets, models, variant
from common.profiling import count_macs, measure_latency

log = logging.getLogger(__name__)
FULL = {
    "models": ("vgg11", "vgg16", "resnet20", "resnet56", "mobilenetv2"),
    "compressions": (2, 4, 8, 16, 32, 64, 128, 256),
    "train_images": 2048,
    "iters": 10,
    "faults": 12,
}
QUICK = {
    "models": ("vgg11", "resnet20", "mobilenetv2"),
    "compressions": (4, 256),
    "train_images": 512,
    "iters": 5,
    "faults": 4,
}
CHECK_REAL, CHECK_RANDOM = 16, 16
ATOL = 1e-4


def weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in models.prunable_layers(model).values())


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


def _exposed(model: nn.Module, inputs: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        got = model(inputs)
    return ((got - expected).abs().amax(dim=1) > ATOL) | (got.argmax(1) != expected.argmax(1))


def fault_exposure(sparse: nn.Module, compact: nn.Module, real: torch.Tensor, faults: int, seed: int) -> dict:
    """How strong the check is. Remove one live channel of a supported group from `compact` at random;
    a fault that changes the outputs on none of 512 probe inputs (256 real, 256 random) is harmless on
    this data and is only counted; for the others, the share of the check's own inputs that expose it."""
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(real.shape[1:])
    check = torch.cat(
        [torch.randn(CHECK_RANDOM, *shape, generator=torch.Generator().manual_seed(0)), real[:CHECK_REAL]]
    )
    probe = torch.cat([torch.randn(256, *shape, generator=gen), real[-256:]])
    with torch.no_grad():
        check_expected, probe_expected = sparse(check), sparse(probe)
    shares, harmless = [], 0
    for _ in range(4 * faults):
        if len(shares) == faults:
            break
        broken = copy.deepcopy(compact).eval()
        trace = channels.trace(broken, check[:1], None)
        plans = [p for p in channels.analyse(trace).plans if len(p.root.weight) > 1]
        if not plans:
            break
        plan = plans[int(torch.randint(len(plans), (1,), generator=gen))]
        channel = int(torch.randint(len(plan.root.weight), (1,), generator=gen))
        trace.graph.get_pruning_group(plan.root, plan.handler, [channel]).prune()
        if not _exposed(broken, probe, probe_expected).any():
            harmless += 1
            continue
        shares.append(float(_exposed(broken, check, check_expected).float().mean()))
    return {"shares": shares, "harmless": harmless}


def measure_point(
    arch: str, model: nn.Module, compression: float, real: torch.Tensor, iters: int, faults: int = 0
) -> dict:
    example, shape = real[:1], tuple(real.shape[1:])
    ours, plain = _sparse_pair(model, compression, masking.conv_batchnorm_pairs(model, example))
    compact, report = surgery.compact(
        ours, example, check_inputs=real[:CHECK_REAL], random_checks=CHECK_RANDOM, atol=ATOL
    )
    classifier = list(models.prunable_layers(plain).values())[-1]
    baseline = dnnshifter_prune(plain, example, classifier)
    spec = variant.VariantSpec(
        arch=arch,
        kwargs={},
        input_shape=shape,
        num_classes=10,
        mean=(0.0,),
        std=(1.0,),
        method="shifter",
        sparsity=1 - 1 / compression,
        accuracy=0.0,
    )
    lat = {
        f"{who}_b{b}_ms": _latency(m, shape, b, iters)
        for who, m in (("sparse", ours), ("compact", compact))
        for b in (1, 64)
    }
    return {
        "model": arch,
        "compression": compression,
        "exact": report.exact,  # compact() returns only what its check passed
        "max_abs_diff": report.max_abs_diff,
        "argmax_agreement": report.argmax_agreement,
        "params_sparse": models.count_params(ours),
        "params_compact": report.params_after,
        "bytes_sparse": len(variant.encode(ours, spec)),
        "bytes_compact": len(variant.encode(compact, spec)),
        "weights_removed": weights(ours) - weights(compact),
        "baseline_weights_removed": weights(plain) - weights(baseline),
        "baseline_max_abs_diff": _diff(plain, baseline, real),
        "channels_removed": report.channels_removed,
        "surgery_ms": report.seconds * 1e3,
        "check_ms": report.check_seconds * 1e3,
        "folded": report.folded,
        "skipped_groups": len(report.skipped_groups),
        "macs_ratio": count_macs(ours, shape) / count_macs(compact, shape),
        **lat,
        "speedup_b1": lat["sparse_b1_ms"] / lat["compact_b1_ms"],
        "speedup_b64": lat["sparse_b64_ms"] / lat["compact_b64_ms"],
        "fault_exposure": fault_exposure(ours, compact, real, faults, seed=int(compression)) if faults else None,
    }


def _trained(arch: str, data: datasets.Dataset, images: int) -> nn.Module:
    torch.manual_seed(0)
    model = models.build(arch, {"in_channels": 1, "input_size": 28, "num_classes": 10, "width": 1.0})
    train(
        model, data.info, data.train.subset(images, 0), TrainConfig(epochs=1, batch_size=64, progress=False), desc=arch
    )
    return model.eval()


def summarize(points: list[dict]) -> dict:
    top = max(p["compression"] for p in points)
    at_top = [p for p in points if p["compression"] == top]
    ratios = [p["weights_removed"] / max(p["baseline_weights_removed"], 1) for p in at_top]
    names = list(dict.fromkeys(p["model"] for p in points))
    faults = [p["fault_exposure"] for p in points if p["fault_exposure"]]
    exposures = [e for f in faults for e in f["shares"]]
    return {
        "all_exact": all(p["exact"] for p in points),
        "max_abs_diff": max(p["max_abs_diff"] for p in points),
        "best_params_ratio": max(p["params_sparse"] / p["params_compact"] for p in points),
        "params_ratio_vs_baseline": math.exp(statistics.fmean(math.log(max(r, 1e-9)) for r in ratios)),
        "baseline_max_abs_diff": max(p["baseline_max_abs_diff"] for p in points),
        "speedup_b1": statistics.median(p["speedup_b1"] for p in at_top),
        "speedup_b64": statistics.median(p["speedup_b64"] for p in at_top),
        "surgery_ms_max": max(p["surgery_ms"] for p in points),
        "surgery_ms_max_by_model": {m: max(p["surgery_ms"] for p in points if p["model"] == m) for m in names},
        "check_ms_max": max(p["check_ms"] for p in points),
        "check_faults": len(exposures),
        "check_faults_missed": sum(e == 0 for e in exposures),
        "check_faults_harmless": sum(f["harmless"] for f in faults),
        "check_fault_exposure_median": statistics.median(exposures) if exposures else None,
        "highest_compression": top,
    }


def run(quick: bool, data_dir=None, work=None) -> dict:
    plan = QUICK if quick else FULL
    data = datasets.load("fashion-mnist", data_dir)
    real = datasets.normalize(data.test.images[:512], data.info.mean, data.info.std)  # check: the first 16
    points = []
    for arch in plan["models"]:
        model = _trained(arch, data, plan["train_images"])
        for compression in plan["compressions"]:
            faults = plan["faults"] if compression == max(plan["compressions"]) else 0
            point = measure_point(arch, model, compression, real, plan["iters"], faults)
            log.info(
                "%s at %dx: %s",
                arch,
                compression,
                {k: round(v, 4) if isinstance(v, float) else v for k, v in point.items()},
            )
            points.append(point)
    return {"points": points, "summary": summarize(points), "plan": dict(plan)}
