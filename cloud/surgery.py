"""Surgery: physically remove every provably dead channel of a sparse model, and prove nothing changed.

Channels are analysed per torch-pruning dependency group (all layers that must lose a channel
together: a conv, its BatchNorm, the convs that read it, and across residual adds every member of the
stage). A root channel of a group is dead when either
  (a) every consumer (a conv or linear reading the channel) has all-zero weights on it, or
  (b) every producer (a conv or linear writing it) has an all-zero filter and bias, every BatchNorm of
      the group then emits exactly zero, and every other op of the group maps zero to zero.
Groups with an op whose channel semantics are not certain are left alone. The compact model is then
compared with the sparse one on real and random inputs; any difference beyond `atol` or any changed
argmax is an error naming the pruned groups, and nothing is returned.
Surgery is mechanism only: it never decides what to prune beyond "provably dead".
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from common.models import count_params

OPTYPE = tp.ops.OPTYPE
# Element-wise ops that map an all-zero channel to an all-zero channel.
ZERO_PRESERVING = ("ReluBackward", "AddBackward", "SubBackward", "MulBackward", "MaxPool2DWithIndicesBackward",
                   "AvgPool2DBackward", "AdaptiveAvgPool2DBackward", "MeanBackward", "TBackward",
                   "CloneBackward", "HardtanhBackward", "ViewBackward", "ReshapeAliasBackward")
SUPPORTED = {OPTYPE.CONV, OPTYPE.BN, OPTYPE.LINEAR, OPTYPE.ELEMENTWISE, OPTYPE.RESHAPE}


class SurgeryError(RuntimeError):
    """Surgery refused or failed; the message names the module or the layer groups involved."""


@dataclass(frozen=True)
class SurgeryReport:
    params_before: int
    params_after: int
    channels_before: int
    channels_removed: int
    removed_by_group: dict[str, int] = field(default_factory=dict)
    max_abs_diff: float = 0.0
    argmax_agreement: float = 1.0
    seconds: float = 0.0


@dataclass(frozen=True)
class _GroupPlan:
    name: str
    root: nn.Module
    handler: object
    channels: int
    dead: list[int]


def _alive_per_root(per_layer_alive: torch.Tensor, root_idxs: list[int], channels: int) -> torch.Tensor:
    """A root channel is alive if any layer index mapped to it is alive."""
    counts = torch.zeros(channels).index_add_(0, torch.as_tensor(root_idxs), per_layer_alive.float())
    return counts > 0


def _producer_alive(module: nn.Module, idxs: list[int]) -> torch.Tensor:
    weight = module.weight.detach()[idxs].flatten(1)
    alive = weight.ne(0).any(dim=1)
    if module.bias is not None:
        alive |= module.bias.detach()[idxs].ne(0)
    return alive


def _consumer_reads(module: nn.Module, idxs: list[int]) -> torch.Tensor:
    weight = module.weight.detach()
    return weight[:, idxs].transpose(0, 1).flatten(1).ne(0).any(dim=1)


def _batchnorm_emits_nonzero(bn: nn.Module, idxs: list[int]) -> torch.Tensor:
    """What the BatchNorm emits for an all-zero input channel, is it anything but exactly zero."""
    mean = bn.running_mean.detach()[idxs] if bn.running_mean is not None else torch.zeros(len(idxs))
    var = bn.running_var.detach()[idxs] if bn.running_var is not None else torch.ones(len(idxs))
    weight = bn.weight.detach()[idxs] if bn.weight is not None else torch.ones(len(idxs))
    bias = bn.bias.detach()[idxs] if bn.bias is not None else torch.zeros(len(idxs))
    return (bias - weight * mean / torch.sqrt(var + bn.eps)).ne(0)


def _unsupported(item) -> str | None:
    target = item.dep.target
    if target.type not in SUPPORTED:
        return target.type.name
    if target.type == OPTYPE.ELEMENTWISE and not any(n in repr(target.module) for n in ZERO_PRESERVING):
        return repr(target.module)
    if isinstance(target.module, nn.Conv2d) and target.module.groups != 1:
        return f"grouped conv {target.name}"
    return None


def _plan_group(graph: tp.DependencyGraph, group, names: dict) -> _GroupPlan | None:
    root_item = group[0]
    channels = len(root_item.idxs)
    producers_alive = torch.zeros(channels, dtype=torch.bool)
    consumers_read = torch.zeros(channels, dtype=torch.bool)
    for item in group.items:
        if _unsupported(item):
            return None
        module, handler = item.dep.target.module, item.dep.handler
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            if graph.is_out_channel_pruning_fn(handler):
                alive = _producer_alive(module, item.idxs)
                producers_alive |= _alive_per_root(alive, item.root_idxs, channels)
            elif graph.is_in_channel_pruning_fn(handler):
                consumers_read |= _alive_per_root(_consumer_reads(module, item.idxs), item.root_idxs, channels)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            emits = _batchnorm_emits_nonzero(module, item.idxs)
            producers_alive |= _alive_per_root(emits, item.root_idxs, channels)
    dead = (~producers_alive) | (~consumers_read)
    if not dead.any():
        return None
    if dead.all():  # keep one channel so the network stays well-formed; it emits or is read as zero
        dead[0] = False
    root = root_item.dep.target.module
    return _GroupPlan(names.get(root, "?"), root, root_item.dep.handler, channels, dead.nonzero().flatten().tolist())


def _classifier(model: nn.Module) -> nn.Module:
    linears = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not linears:
        raise SurgeryError(f"{type(model).__name__} has no conv or linear layer to prune")
    return linears[-1]


def _graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
    except Exception as err:  # tracing surfaces any model error; report it with the model's name
        raise SurgeryError(f"cannot trace {type(model).__name__} with input of shape "
                           f"{tuple(example_input.shape)}: {err}") from err


def plan(model: nn.Module, example_input: torch.Tensor, classifier: nn.Module | None = None
         ) -> tuple[tp.DependencyGraph, list[_GroupPlan], int]:
    """Dependency graph, the groups that have dead channels, and the count of all prunable channels."""
    classifier = classifier or _classifier(model)
    graph = _graph(model, example_input)
    names = {m: n for n, m in model.named_modules()}
    plans, total = [], 0
    for group in graph.get_all_groups(ignored_layers=[classifier], root_module_types=(nn.Conv2d, nn.Linear)):
        total += len(group[0].idxs)
        group_plan = _plan_group(graph, group, names)
        if group_plan is not None:
            plans.append(group_plan)
    return graph, plans, total


def find_dead_channels(model: nn.Module, example_input: torch.Tensor) -> dict[str, list[int]]:
    """Root module name -> dead channel indices. Does not modify the model."""
    model = copy.deepcopy(model).eval()
    _, plans, _ = plan(model, example_input)
    return {p.name: p.dead for p in plans}


@torch.no_grad()
def _compare(sparse: nn.Module, compact: nn.Module, inputs: torch.Tensor) -> tuple[float, float]:
    expected, got = sparse(inputs), compact(inputs)
    diff = float((expected - got).abs().max())
    agreement = float((expected.argmax(1) == got.argmax(1)).float().mean())
    return diff, agreement


def compact(model: nn.Module, example_input: torch.Tensor, check_inputs: torch.Tensor | None = None,
            atol: float = 1e-4, classifier: nn.Module | None = None, random_checks: int = 32
            ) -> tuple[nn.Module, SurgeryReport]:
    """A compact copy of `model` without its dead channels, checked equal to `model`."""
    start = time.perf_counter()
    was_training = model.training
    sparse = model.eval()
    pruned = copy.deepcopy(model).eval()
    try:
        return _compact_checked(sparse, pruned, example_input, check_inputs, atol, classifier, random_checks, start)
    finally:
        model.train(was_training)


def _compact_checked(sparse, pruned, example_input, check_inputs, atol, classifier, random_checks, start):
    model = sparse
    if classifier is not None:
        classifier = dict(pruned.named_modules())[{m: n for n, m in model.named_modules()}[classifier]]
    graph, plans, total = plan(pruned, example_input, classifier)
    for group_plan in plans:
        graph.get_pruning_group(group_plan.root, group_plan.handler, group_plan.dead).prune()
    generator = torch.Generator().manual_seed(0)
    random_inputs = torch.randn(random_checks, *example_input.shape[1:], generator=generator)
    checks = [random_inputs] + ([check_inputs] if check_inputs is not None else [])
    try:
        results = [_compare(sparse, pruned, x) for x in checks]
    except RuntimeError as err:
        raise SurgeryError(f"compact model does not run after pruning groups {[p.name for p in plans]}: {err}") from err
    diff, agreement = max(r[0] for r in results), min(r[1] for r in results)
    if diff > atol or agreement < 1.0:
        removed = {p.name: len(p.dead) for p in plans}
        raise SurgeryError(f"compact model differs from the sparse one (max abs diff {diff:.3g}, argmax "
                           f"agreement {agreement:.4f}) after pruning groups {removed}")
    removed = {p.name: len(p.dead) for p in plans}
    return pruned, SurgeryReport(count_params(model), count_params(pruned), total, sum(removed.values()),
                                 removed, diff, agreement, time.perf_counter() - start)
