"""A DNNShifter-style structural step, as its public code does it, for comparison in the same run.

Fuse each BatchNorm into the conv before it, then drop every output filter whose fused weights are all
zero, but only where the conv is the channel's single producer (channels on residual paths are never
touched). Dropping a filter also drops its fused bias, so whenever that bias is nonzero the outputs
change: the comparison reports that error next to prunefleet's.
"""

from __future__ import annotations

import copy

import torch
import torch_pruning as tp
from torch import nn

from cloud.build.methods.masks import conv_batchnorm_pairs


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    bias = bn.bias.detach() - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias.detach() * scale
    conv.weight = nn.Parameter(conv.weight.detach() * scale.view(-1, 1, 1, 1))
    conv.bias = nn.Parameter(bias)


def fuse_batchnorm(model: nn.Module, example_input: torch.Tensor) -> nn.Module:
    fused = copy.deepcopy(model).eval()
    named = dict(fused.named_modules())
    for conv_name, bn_name in conv_batchnorm_pairs(fused, example_input).items():
        _fold(named[conv_name], named[bn_name])
        parent_name, _, child = bn_name.rpartition(".")
        setattr(named[parent_name] if parent_name else fused, child, nn.Identity())
    return fused


def _single_producer(graph: tp.DependencyGraph, group) -> nn.Conv2d | None:
    producers = [
        item.dep.target.module
        for item in group.items
        if graph.is_out_channel_pruning_fn(item.dep.handler)
        and isinstance(item.dep.target.module, (nn.Conv2d, nn.Linear))
    ]
    return producers[0] if len(producers) == 1 and isinstance(producers[0], nn.Conv2d) else None


def dnnshifter_prune(model: nn.Module, example_input: torch.Tensor, classifier: nn.Module) -> nn.Module:
    """Fused copy of `model` with all-zero output filters of single-producer convs removed."""
    fused = fuse_batchnorm(model, example_input)
    classifier = dict(fused.named_modules())[{m: n for n, m in model.named_modules()}[classifier]]
    graph = tp.DependencyGraph().build_dependency(fused, example_inputs=example_input)
    plans = []
    for group in graph.get_all_groups(ignored_layers=[classifier], root_module_types=(nn.Conv2d,)):
        conv = _single_producer(graph, group)
        if conv is None:
            continue
        zero = conv.weight.detach().flatten(1).eq(0).all(dim=1)
        if zero.all():
            zero[0] = False
        if zero.any():
            plans.append((conv, zero.nonzero().flatten().tolist()))
    for conv, idxs in plans:
        graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs).prune()
    return fused
