"""`prunefleet bench torchvision`: which of torchvision's classification networks surgery compacts.

For every classification model torchvision lists (quick: a handful), built as a portfolio build
builds it (`torchvision:NAME` through `common.models`: random weights, width 1, 3 input channels, 10
classes, 64x64 inputs or the smallest the network takes), BatchNorm given random affine parameters,
then made sparse the way a shifter build's masks make dead channels: whole filters masked, here the
half of each conv's filters with the smallest L1 norm (the classifier and grouped convs aside), and
their BatchNorm channels with them (`masks.with_batchnorm_masks`); BatchNorm statistics are then
recalibrated on random inputs. Surgery compacts that sparse model and checks the result against it.

Nothing is trained, so every figure is structural (parameters, channels, groups, the check's
difference); the check runs on random inputs, and `input_dependent` says whether the sparse model's
outputs still depend on them (a check on a constant network would prove little). Each model runs in
a process of its own under a memory and a time limit: a network that torch-pruning cannot trace
within them is reported (`not run`), and the run goes on; each record is kept in the work directory,
so an interrupted run resumes. Per model: the outcome (`passed`, `failed` with the error, or `not
run`), parameters before and after, channels removed, the groups surgery skipped and why, the
check's max abs difference and the seconds it all took.
"""

from __future__ import annotations

import json
import logging
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from cloud.build.compaction import surgery
from cloud.build.methods import masks as masking
from cloud.build.train import apply_masks
from common import models, vision_models
from common.files import atomic_write_json

log = logging.getLogger(__name__)
FULL = {"models": (), "size": 64, "classes": 10, "share": 0.5, "memory_gib": 14, "timeout_s": 1200}
QUICK = {
    **FULL,
    "models": ("resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x0_5"),
    "timeout_s": 600,
}
SMALLEST_SIZE = {"inception_v3": 75, "maxvit_t": 224, "vit_h_14": 70}  # the least square input each takes
CHECK_RANDOM = 16
BATCHNORM = nn.modules.batchnorm._BatchNorm


def _dense(name: str, size: int, classes: int) -> nn.Module:
    torch.manual_seed(0)
    arch = vision_models.PREFIX + name
    model = models.build(arch, models.zoo_kwargs((3, size, size), classes, None, arch), allowed=(arch,))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for norm in (m for m in model.modules() if isinstance(m, BATCHNORM) and m.weight is not None):
            norm.weight.copy_(torch.rand(norm.num_features, generator=generator) + 0.5)
            norm.bias.copy_(torch.rand(norm.num_features, generator=generator) - 0.5)
    return model.eval()


def filter_masks(model: nn.Module, share: float) -> masking.Masks:
    """Masks of the `share` of each conv's filters with the smallest L1 norm (grouped convs and the
    classifier, the last conv or linear layer, keep theirs)."""
    layers = models.prunable_layers(model)
    classifier = list(layers)[-1]
    masks = {}
    for name, layer in layers.items():
        if name == classifier or not isinstance(layer, nn.Conv2d) or layer.groups != 1:
            continue
        norms = layer.weight.detach().flatten(1).abs().sum(1)
        keep = torch.ones_like(layer.weight, dtype=torch.bool)
        keep[norms.argsort()[: int(len(norms) * share)]] = False
        masks[f"{name}.weight"] = keep
    return masks


def sparse_model(model: nn.Module, example: torch.Tensor, share: float) -> nn.Module:
    """`model` made sparse in place: filter masks and the BatchNorm masks that follow them, then
    BatchNorm statistics of the sparse model's own activations on random inputs."""
    masks = masking.with_batchnorm_masks(filter_masks(model, share), masking.conv_batchnorm_pairs(model, example))
    apply_masks(model, masks)
    norms = [m for m in model.modules() if isinstance(m, BATCHNORM) and m.track_running_stats]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over the calibration batch
    model.train()
    with torch.no_grad():
        model(torch.randn(16, *example.shape[1:], generator=torch.Generator().manual_seed(1)))
    for norm in norms:
        norm.momentum = 0.1
    return model.eval()


def reason_kind(reason: str) -> str:
    """A skip reason without the layer it names: torch-pruning's op labels become their autograd op,
    dotted module names LAYER."""
    text = re.sub(
        r"_([A-Za-z]+)_\d+\((\w*)\)", lambda m: m.group(2) if m.group(2) not in ("", "None") else m.group(1), reason
    )
    return re.sub(r"[\w-]+(?:\.[\w-]+)+", "LAYER", text)


def measure(name: str, plan: dict) -> dict:
    """Build, sparsify and compact one network (in this process)."""
    start = time.perf_counter()
    size = max(plan["size"], SMALLEST_SIZE.get(name, 0))
    record = {"model": name, "input_size": size}
    model = sparse_model(_dense(name, size, plan["classes"]), torch.zeros(1, 3, size, size), plan["share"])
    probe = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        record["input_dependent"] = bool(model(probe).std(0).max() > 0)
    try:
        _, report = surgery.compact(model, probe[:1], random_checks=CHECK_RANDOM)
    except surgery.SurgeryError as err:
        return {**record, "outcome": "failed", "error": str(err)[:2000], "seconds": time.perf_counter() - start}
    return {
        **record,
        "outcome": "passed",
        "params_before": report.params_before,
        "params_after": report.params_after,
        "channels_before": report.channels_before,
        "channels_removed": report.channels_removed,
        "groups_skipped": report.skipped_groups,
        "max_abs_diff": report.max_abs_diff,
        "max_abs_diff_float64": report.max_abs_diff_float64,
        "argmax_agreement": report.argmax_agreement,
        "seconds": time.perf_counter() - start,
    }


def measure_in_child(name: str, plan: dict) -> dict:
    """`measure` in a process of its own, under the plan's memory and time limits."""
    start = time.perf_counter()
    command = [sys.executable, "-m", __name__, name, json.dumps({**plan, "threads": torch.get_num_threads()})]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=plan["timeout_s"])
    except subprocess.TimeoutExpired:
        limit = plan["timeout_s"]
        return {"model": name, "outcome": "not run", "error": f"over the {limit} s limit", "seconds": limit}
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    out_of_memory = "MemoryError" in tail or "can't allocate memory" in tail
    outcome = "not run" if out_of_memory or done.returncode < 0 else "failed"
    if outcome == "not run":
        tail = f"over the {plan['memory_gib']} GiB memory limit or killed ({tail})"
    return {"model": name, "outcome": outcome, "error": tail[:2000], "seconds": time.perf_counter() - start}


def summarize(records: list[dict]) -> dict:
    by_outcome = {o: [r["model"] for r in records if r["outcome"] == o] for o in ("passed", "failed", "not run")}
    kinds: dict[str, set[str]] = {}
    for record in records:
        for reason in record.get("groups_skipped", {}).values():
            kinds.setdefault(reason_kind(reason), set()).add(record["model"])
    passed = [r for r in records if r["outcome"] == "passed"]
    return {
        "models": len(records),
        "passed": by_outcome["passed"],
        "failed": {r["model"]: r["error"] for r in records if r["outcome"] == "failed"},
        "not_run": {r["model"]: r["error"] for r in records if r["outcome"] == "not run"},
        "compacted": [r["model"] for r in passed if r["channels_removed"]],
        "all_groups_skipped": [r["model"] for r in passed if not r["channels_removed"] and r["groups_skipped"]],
        "skipped_group_kinds": {k: sorted(v) for k, v in sorted(kinds.items())},
        "max_abs_diff": max((r["max_abs_diff"] for r in passed), default=None),
        "constant_outputs": [r["model"] for r in records if r.get("input_dependent") is False],
    }


def _resumed(work: Path | None, name: str, plan: dict) -> dict | None:
    """The record an interrupted run of the same plan left in `work`, if any."""
    path = work / f"{name}.json" if work is not None else None
    if path is None or not path.exists():
        return None
    kept = json.loads(path.read_text())
    return kept["record"] if kept.get("plan") == json.loads(json.dumps(plan)) else None


def run(quick: bool, data_dir=None, work: Path | None = None) -> dict:
    """Every network of the plan in turn; each record is kept in `work`, so a rerun resumes."""
    del data_dir  # random weights and inputs: nothing to read
    plan = dict(QUICK if quick else FULL)
    names = plan["models"] or tuple(vision_models.classification_models())
    records = []
    for name in names:
        record = _resumed(work, name, plan) or measure_in_child(name, plan)
        if work is not None:
            atomic_write_json(Path(work) / f"{name}.json", {"plan": plan, "record": record})
        removed = f"{record.get('channels_removed')}/{record.get('channels_before')} channels"
        log.info("%s: %s %s %s", name, record["outcome"], removed, record.get("error", ""))
        records.append(record)
    return {"records": records, "summary": summarize(records), "plan": {**plan, "models": list(names)}}


def _child(argv: list[str]) -> None:
    """`measure` one network in this process, its address space limited first, and print the record."""
    name, plan = argv[0], json.loads(argv[1])
    limit = int(plan["memory_gib"] * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    torch.set_num_threads(plan["threads"])
    print(json.dumps(measure(name, plan), default=float))


if __name__ == "__main__":
    _child(sys.argv[1:])
