"""The value each channel of a dependency group carries through the group's ops, where it is a constant.

`cloud.build.compaction.channels` reads these values where the channels reach their readers to decide which channels
are dead. Per root channel of one torch-pruning group, `ChannelValues` propagates (known, value): a
writer (conv or linear) whose filter is all zero emits its bias, a constant; BatchNorm, depthwise
convs, the channel-wise ops in `UNARY` (activations, pools, spatial means) and residual adds (`SUMS`)
map constants to constants where that is exact; anything else is unknown. Also the small facts about
autograd nodes and layers that both modules ask (`fn_name`, `is_depthwise`, `by_root`, ...).
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn
from torch.nn import functional as F

OPTYPE = tp.ops.OPTYPE
LAYERS = (nn.Conv2d, nn.Linear)  # matched by exact class: a subclass may transform its weights
BATCHNORM = nn.modules.batchnorm._BatchNorm
# Channel-wise autograd ops, and how they map a constant channel (None: only zero maps to zero exactly).
UNARY = {
    "ReluBackward0": lambda fn, v: v.clamp(min=0),
    "HardtanhBackward0": lambda fn, v: v.clamp(float(fn._saved_min_val), float(fn._saved_max_val)),
    "LeakyReluBackward0": lambda fn, v: F.leaky_relu(v, float(fn._saved_negative_slope)),
    "SigmoidBackward0": lambda fn, v: torch.sigmoid(v),
    "TanhBackward0": lambda fn, v: torch.tanh(v),
    "SiluBackward0": lambda fn, v: F.silu(v),
    "HardswishBackward0": lambda fn, v: F.hardswish(v),
    "HardsigmoidBackward0": lambda fn, v: F.hardsigmoid(v),
    "GeluBackward0": lambda fn, v: F.gelu(v, approximate=str(fn._saved_approximate)),
    "CloneBackward0": lambda fn, v: v,
    "MaxPool2DWithIndicesBackward0": lambda fn, v: v,  # pads with -inf: a constant map stays constant
    "AdaptiveAvgPool2DBackward0": lambda fn, v: v,
    "AdaptiveMaxPool2DBackward0": lambda fn, v: v,
    "MeanBackward1": lambda fn, v: v,  # over spatial dims only (checked in `channels._unsupported`)
    "SumBackward1": None,
    "AvgPool2DBackward0": lambda fn, v: v if not (any(fn._saved_padding) and fn._saved_count_include_pad) else None,
}
SUMS = frozenset({"AddBackward0", "SubBackward0", "MulBackward0"})  # every operand must be traced


def fn_name(node) -> str:
    fn = node.grad_fn
    return fn.name() if hasattr(fn, "name") else ""


def is_weight_transpose(node) -> bool:
    """A linear layer's transposed weight (not data), as torch-pruning traces it."""
    return fn_name(node) == "TBackward0" and not node.inputs and all(o.type == OPTYPE.LINEAR for o in node.outputs)


def is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups == module.in_channels == module.out_channels > 1


def unpadded(conv: nn.Conv2d) -> bool:
    return conv.padding == "valid" or (not isinstance(conv.padding, str) and not any(conv.padding))


def by_root(item, channels: int) -> torch.Tensor:
    """The layer index of each root channel (for one-to-one items)."""
    order = torch.empty(channels, dtype=torch.long)
    order[torch.tensor(list(item.root_idxs), dtype=torch.long)] = torch.tensor(list(item.idxs), dtype=torch.long)
    return order


def nonzero_along(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Per index of `dim` (0 or 1): is any weight there nonzero, i.e. is the max or the min nonzero?
    Reducing dim 0 first for dim 1 is fast and makes no weight-sized temporaries; NaN counts as nonzero."""
    highs, lows = (weight.amax(dim=0), weight.amin(dim=0)) if dim == 1 else (weight, weight)
    return highs.reshape(len(highs), -1).amax(dim=1).ne(0) | lows.reshape(len(lows), -1).amin(dim=1).ne(0)


class ChannelValues:
    """Per node of one group: (known, value) per root channel; value is the channel's constant where known.
    `of(node)` computes a node from its inputs in the group, once; `unknown()` is what nothing is known of."""

    def __init__(self, group, graph: tp.DependencyGraph, channels: int):
        self.graph, self.channels = graph, channels
        self.out_items = {
            item.dep.target: item for item in group.items if graph.is_out_channel_pruning_fn(item.dep.handler)
        }
        self.writes = set(self.out_items)
        self.nodes = {item.dep.target for item in group.items}
        self.memo: dict = {}

    def unknown(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(self.channels, dtype=torch.bool), torch.zeros(self.channels, dtype=torch.float64)

    def inputs(self, node) -> list:
        return [n for n in node.inputs if n in self.nodes and not is_weight_transpose(n)]

    def of(self, node) -> tuple[torch.Tensor, torch.Tensor]:
        if node not in self.memo:
            self.memo[node] = self._compute(node)
        return self.memo[node]

    def _compute(self, node) -> tuple[torch.Tensor, torch.Tensor]:
        module = node.module
        if isinstance(module, LAYERS) and not is_depthwise(module):
            if node not in self.writes:
                return self.unknown()
            rows = by_root(self.out_items[node], self.channels)
            zero = ~nonzero_along(module.weight.detach(), 0)[rows]
            bias = module.bias.detach().double()[rows] if module.bias is not None else self.unknown()[1]
            return zero, bias * zero
        sources = [self.of(n) for n in self.inputs(node)]
        if len(sources) != 1 and not (node.type == OPTYPE.ELEMENTWISE and fn_name(node) in SUMS and sources):
            return self.unknown()
        if isinstance(module, BATCHNORM):
            (known, value), bn, rows = sources[0], module, by_root(self.out_items[node], self.channels)
            weight = bn.weight.detach().double()[rows] if bn.weight is not None else 1.0
            bias = bn.bias.detach().double()[rows] if bn.bias is not None else 0.0
            scale = weight / torch.sqrt(bn.running_var.double()[rows] + bn.eps)
            return known, (value - bn.running_mean.double()[rows]) * scale + bias
        if is_depthwise(module):
            (known, value), conv, rows = sources[0], module, by_root(self.out_items[node], self.channels)
            weight = conv.weight.detach().double().flatten(1)[rows]
            bias = conv.bias.detach().double()[rows] if conv.bias is not None else self.unknown()[1]
            blank = ~nonzero_along(conv.weight.detach(), 0)[rows]
            constant = known & (value.eq(0) | unpadded(conv))
            return blank | constant, torch.where(blank, bias, value * weight.sum(1) + bias)
        if node.type in (OPTYPE.RESHAPE, OPTYPE.CONCAT):  # a flatten, or this group's slice of a concat
            return sources[0]
        name = fn_name(node)
        if name in SUMS:
            if len(sources) != sum(f is not None for f, _ in node.grad_fn.next_functions):
                return self.unknown()  # an operand outside the group: its channels are not these
            known = torch.stack([k for k, _ in sources]).all(0)
            values = torch.stack([v for _, v in sources])
            if name == "AddBackward0":
                return known, values.sum(0)
            zeros = torch.stack([k & v.eq(0) for k, v in sources])  # x - x or x * 0: only zeros are certain
            certain = zeros.all(0) if name == "SubBackward0" else zeros.any(0)
            return certain, torch.zeros(self.channels, dtype=torch.float64)
        known, value = sources[0]
        rule = UNARY.get(name)
        mapped = rule(node.grad_fn, value) if rule is not None else None
        if mapped is None:
            return known & value.eq(0), torch.zeros(self.channels, dtype=torch.float64)
        return known, mapped
