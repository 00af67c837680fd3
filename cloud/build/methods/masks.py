"""Unstructured masks: global magnitude pruning, and BatchNorm channels of fully pruned filters.

A mask maps a state-dict name to a 0/1 tensor of the same shape. When magnitude pruning removes a
conv's whole filter, the BatchNorm channel right after it is masked too (weight and bias), so the
sparse model itself emits exactly zero there and the surgery can remove the channel without changing
a single output. The sparse model, whose accuracy is reported, is trained with those masks.
"""

from __future__ import annotations

import torch
from torch import nn

from common.models import prunable_layers

Masks = dict[str, torch.Tensor]


def dense_masks(model: nn.Module, ignore: tuple[str, ...] = ()) -> Masks:
    return {
        f"{name}.weight": torch.ones_like(layer.weight, dtype=torch.bool)
        for name, layer in prunable_layers(model).items()
        if name not in ignore
    }


def prune_global_magnitude(model: nn.Module, masks: Masks, rate: float) -> Masks:
    """Remove `rate` of the surviving weights, ranked by |w| over all masked layers at once."""
    if not 0.0 < rate < 1.0:
        raise ValueError(f"rate must be in (0, 1), got {rate}")
    state = model.state_dict()
    weight_names = [n for n in masks if n.endswith(".weight") and state[n].dim() in (2, 4)]
    surviving = torch.cat([state[n].abs()[masks[n].bool()].flatten() for n in weight_names])
    k = int(rate * surviving.numel())
    if k == 0:
        return dict(masks)
    threshold = torch.kthvalue(surviving, k).values
    new_masks = dict(masks)
    for name in weight_names:
        new_masks[name] = masks[name].bool() & (state[name].abs() > threshold)
    return new_masks


def conv_batchnorm_pairs(model: nn.Module, example_input: torch.Tensor) -> dict[str, str]:
    """conv name -> name of the BatchNorm that reads the conv's output directly (traced once). Each conv
    output is held until the pass ends: a freed tensor's id may be reused by another tensor."""
    produced: dict[int, tuple[str, torch.Tensor]] = {}
    pairs: dict[str, str] = {}
    names = {m: n for n, m in model.named_modules()}
    hooks = []

    def after_conv(module, _inputs, output):
        produced[id(output)] = (names[module], output)

    def before_bn(module, inputs):
        source = produced.get(id(inputs[0]))
        if source is not None:
            pairs[source[0]] = names[module]

    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(after_conv))
        elif isinstance(module, nn.BatchNorm2d):
            hooks.append(module.register_forward_pre_hook(before_bn))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return pairs


def with_batchnorm_masks(masks: Masks, pairs: dict[str, str]) -> Masks:
    """Add BatchNorm weight and bias masks that follow each conv's fully pruned filters."""
    out = dict(masks)
    for conv, bn in pairs.items():
        weight_mask = masks.get(f"{conv}.weight")
        if weight_mask is None:
            continue
        alive = weight_mask.flatten(1).any(dim=1)
        out[f"{bn}.weight"] = alive.clone()
        out[f"{bn}.bias"] = alive.clone()
    return out


def sparsity(masks: Masks) -> float:
    """Share of masked conv/linear weights (BatchNorm masks are not counted)."""
    weights = [m for n, m in masks.items() if m.dim() in (2, 4)]
    total = sum(m.numel() for m in weights)
    return 1.0 - sum(int(m.sum()) for m in weights) / total if total else 0.0
