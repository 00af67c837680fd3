"""Which channels of a sparse model are provably dead, and what folding makes their removal exact.

Over torch-pruning dependency groups (the layers that lose a channel together: a conv, its BatchNorm,
activations, a depthwise conv, its readers; across residual adds the whole stage), each channel's value is
propagated through the group's ops (`cloud.build.compaction.channel_values`): a writer (conv or linear)
whose filter is all zero emits its bias, a constant; BatchNorm, activations, pooling, depthwise convs and
residual adds map constants to constants where that is exact; anything else is unknown. A channel is
removable when every reader (a conv or linear layer taking it as input) either has zero weights on it, or
receives exactly zero, or receives a constant it can absorb exactly into its bias (a linear layer, incl.
after a flatten; an unpadded 1x1 conv). A constant that meets a padded conv is not foldable exactly (the
zero padding at the border sees something else): the channel stays unless folding is approximate.

A concat along channels is followed through: each branch's group reaches the readers' slice of it.
Groups whose ops may mix channels or are not understood (slices, other reshapes, reductions over
channels, grouped convs, model outputs, layers run twice...) are left alone and reported. The graph
comes from `cloud.build.compaction.tracing`, which keeps such ops opaque to torch-pruning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from cloud.build.compaction.channel_values import (
    BATCHNORM,
    LAYERS,
    OPTYPE,
    SUMS,
    UNARY,
    ChannelValues,
    by_root,
    fn_name,
    is_depthwise,
    is_weight_transpose,
    nonzero_along,
    unpadded,
)
from cloud.build.compaction.tracing import SurgeryError, Trace, trace

__all__ = ["Analysis", "Fold", "GroupPlan", "Members", "SurgeryError", "Trace", "analyse", "members", "trace"]


@dataclass(frozen=True)
class Fold:
    """Add `value` times the reader's weights on `columns` (its input indices of one root channel) to
    the reader's bias."""

    reader: nn.Module
    columns: tuple[int, ...]
    value: float
    exact: bool


@dataclass(frozen=True)
class GroupPlan:
    name: str
    root: nn.Module
    handler: object
    dead: tuple[int, ...]
    folds: tuple[Fold, ...] = ()
    group: object = None  # the torch-pruning group over all channels, valid until something is pruned


@dataclass(frozen=True)
class Analysis:
    trace: Trace
    plans: list[GroupPlan]  # one per supported group (dead may be empty)
    skipped: dict[str, str] = field(default_factory=dict)  # group root -> why it was left alone
    channels: int = 0


def _elementwise_ok(node) -> bool:
    fn, name = node.grad_fn, fn_name(node)
    if is_weight_transpose(node):
        return True
    if name in SUMS:  # a constant or untraced operand (x + 1, x + model input) is not a channel of the group
        return getattr(fn, "_saved_alpha", 1) == 1 and all(
            f is not None and f.name() != "AccumulateGrad" for f, _ in fn.next_functions
        )
    if name in ("MeanBackward1", "SumBackward1"):  # autograd stores negative dims as unsigned 64-bit ints
        ndim = len(fn._saved_self_sym_sizes)
        return ndim >= 2 and all((d - (1 << 64) if d >= 1 << 63 else d) % ndim != 1 for d in fn._saved_dim)
    return name in UNARY


def _unsupported(item, trace: Trace, channels: int) -> str | None:
    """Why this item makes its group unsafe to analyse or to prune, or None if it is fine."""
    node, handler = item.dep.target, item.dep.handler
    module, label = node.module, trace.names.get(node.module, repr(node.module))
    kind = trace.opaque.get(node, node.type)  # what an op made opaque was (see `tracing`)
    writes = trace.graph.is_out_channel_pruning_fn(handler)
    if node.grad_fn in trace.outputs and (writes or not isinstance(module, LAYERS)):
        return f"{label} is a model output"
    if node.type in (OPTYPE.CONV, OPTYPE.DEPTHWISE_CONV, OPTYPE.LINEAR, OPTYPE.BN):
        if type(module) not in LAYERS and not isinstance(module, BATCHNORM):
            return f"{label} is a {type(module).__name__}"
        if getattr(module, "transposed", False) or (getattr(module, "groups", 1) != 1 and not is_depthwise(module)):
            return f"{label} is a grouped (not depthwise) or transposed conv"
        if isinstance(module, BATCHNORM) and module.running_mean is None:
            return f"{label} normalizes with batch statistics"
        if trace.calls.get(module, 0) != 1:
            return f"{label} runs {trace.calls.get(module, 0)} times"
        if isinstance(module, BATCHNORM) or is_depthwise(module):
            size = module.num_features if isinstance(module, BATCHNORM) else module.out_channels
        else:
            size = module.weight.shape[0 if writes else 1]
        return (
            None
            if _maps_onto(item, size, channels, one_each=writes)
            else (f"{label} does not map onto the group's channels one to one (or, reading, one to many)")
        )
    if kind == OPTYPE.CONCAT:
        dim = getattr(node.grad_fn, "_saved_dim", None)
        return None if dim == 1 else f"concat {label} is not along channels"
    if kind == OPTYPE.RESHAPE:
        return None if node in trace.flattens else f"reshape {label} is not a flatten into linear layers"
    if kind == OPTYPE.ELEMENTWISE:
        return None if _elementwise_ok(node) else f"op {label} may mix channels or its effect is unknown"
    return f"{kind.name} op {label} is not supported"


def _maps_onto(item, size: int, channels: int, one_each: bool) -> bool:
    """Every layer index of the item is distinct and inside the layer; every root channel has one layer
    index (`one_each`: writers, BatchNorms, depthwise convs) or at least one (readers, e.g. the H*W
    features of a flatten, or the slice of a concat)."""
    idxs, roots = list(item.idxs), list(item.root_idxs)
    if len(idxs) != len(roots) or len(set(idxs)) != len(idxs) or any(not 0 <= i < size for i in idxs):
        return False
    if set(roots) != set(range(channels)):
        return False
    return len(idxs) == channels if one_each else True


def _any_per_root(item, flags: torch.Tensor, channels: int) -> torch.Tensor:
    """Per root channel: is any of its layer indices flagged?"""
    roots = torch.tensor(list(item.root_idxs), dtype=torch.long)
    hits = flags[torch.tensor(list(item.idxs), dtype=torch.long)].long()
    return torch.zeros(channels, dtype=torch.long).index_add_(0, roots, hits) > 0


def _columns(item, channel: int) -> tuple[int, ...]:
    return tuple(i for i, r in zip(item.idxs, item.root_idxs) if r == channel)


def _foldable(module: nn.Module) -> bool:
    """Can this reader absorb a constant input channel into its bias exactly?"""
    if isinstance(module, nn.Linear):
        return True
    return module.groups == 1 and tuple(module.kernel_size) == (1, 1) and unpadded(module)


def plan_group(group, graph: tp.DependencyGraph, channels: int, approximate: bool) -> tuple[list[int], list[Fold]]:
    """Dead root channels of a supported group and the folds their removal needs."""
    values = ChannelValues(group, graph, channels)
    removable = torch.ones(channels, dtype=torch.bool)
    pending = []  # (reader, channels it would fold, their values, exactly?)
    readers = 0
    for item in group.items:
        node, module = item.dep.target, item.dep.target.module
        if not isinstance(module, LAYERS) or is_depthwise(module) or graph.is_out_channel_pruning_fn(item.dep.handler):
            continue  # not a reader (a layer whose input and output are both the group's is read here too)
        readers += 1
        unread = ~_any_per_root(item, nonzero_along(module.weight.detach(), 1), channels)
        sources = [values.of(n) for n in values.inputs(node)]
        known, value = sources[0] if len(sources) == 1 else values.unknown()
        zero = known & value.eq(0)
        constant = known & ~zero & ~unread
        fits = _foldable(module)
        removable &= unread | zero | (constant if (fits or approximate) else torch.zeros_like(constant))
        pending.append((item, constant, value, fits))
    if not readers:
        return [], []
    if removable.all():  # keep one so the network stays well-formed
        removable[0] = False
    dead = removable.nonzero().flatten().tolist()
    folds = [
        Fold(item.dep.target.module, _columns(item, c), float(value[c]), fits)
        for item, constant, value, fits in pending
        for c in dead
        if constant[c]
    ]
    return dead, folds


def analyse(trace: Trace, approximate: bool = False) -> Analysis:
    plans, skipped, total = [], {}, 0
    ignored = [trace.classifier] if trace.classifier is not None else []
    tp.dependency.index_mapping.update_index_mapping(trace.graph)
    for group in trace.graph.get_all_groups(ignored_layers=ignored, root_module_types=LAYERS):
        root = group[0].dep.target.module
        name, channels = trace.names.get(root, repr(root)), len(group[0].idxs)
        total += channels
        reason = next(filter(None, (_unsupported(item, trace, channels) for item in group.items)), None)
        if reason is not None:
            skipped[name] = reason
            continue
        dead, folds = plan_group(group, trace.graph, channels, approximate)
        plans.append(GroupPlan(name, root, group[0].dep.handler, tuple(dead), tuple(folds), group))
    return Analysis(trace, plans, skipped, total)


@dataclass(frozen=True)
class Members:
    """The layers of one group, with the layer index of each root channel where it is one to one."""

    channels: int
    writers: tuple[tuple[nn.Module, torch.Tensor], ...]  # convs and linears writing the channels
    carriers: tuple[tuple[nn.Module, torch.Tensor], ...]  # BatchNorms and depthwise convs passing them on
    readers: tuple[nn.Module, ...]  # convs and linears taking them as input


def members(plan: GroupPlan, graph: tp.DependencyGraph) -> Members:
    """Who writes, carries and reads the channels of a supported group (from `analyse`, before pruning)."""
    channels = len(plan.group[0].idxs)
    writers, carriers, readers = [], [], []
    for item in plan.group.items:
        module, writes = item.dep.target.module, graph.is_out_channel_pruning_fn(item.dep.handler)
        if writes and (isinstance(module, BATCHNORM) or is_depthwise(module)):
            carriers.append((module, by_root(item, channels)))
        elif writes and isinstance(module, LAYERS):
            writers.append((module, by_root(item, channels)))
        elif isinstance(module, LAYERS) and not is_depthwise(module):
            readers.append(module)
    return Members(channels, tuple(writers), tuple(carriers), tuple(dict.fromkeys(readers)))


@torch.no_grad()
def apply_fold(fold: Fold) -> None:
    """Add the constant's contribution to the reader's bias (created if the reader has none)."""
    reader = fold.reader
    if reader.bias is None:
        reader.bias = nn.Parameter(torch.zeros(reader.weight.shape[0], dtype=reader.weight.dtype))
    reader.bias += fold.value * reader.weight[:, list(fold.columns)].flatten(1).sum(1)
