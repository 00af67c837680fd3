"""Surgery: physically remove every provably dead channel of a sparse model, and prove nothing changed.

Per torch-pruning dependency group (the layers that lose a channel together: a conv, its BatchNorm, its
readers; across residual adds the whole stage), a channel is dead when (a) every reader (conv, or
linear after a flatten: all H*W features) has zero weights on it, or (b) every writer has a zero filter
and bias and every BatchNorm of the group maps zero to exactly zero. Groups with an op that may mix
channels or not keep zeros (concat, slice, other reshapes, channel reductions, constants added, model
outputs, layers run twice...) are left alone and reported. Removal repeats until nothing more is dead,
then the compact model is checked against the sparse one on real and random inputs; any difference is
a `SurgeryError` naming the groups. Mechanism only: it never decides what to prune beyond "provably dead".
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from common.models import count_params

OPTYPE = tp.ops.OPTYPE
LAYERS = (nn.Conv2d, nn.Linear)  # matched by exact class: a subclass may transform its weights
BATCHNORM = nn.modules.batchnorm._BatchNorm
# Autograd ops that act on each channel alone and map an all-zero channel to an all-zero channel.
ZERO_PRESERVING = frozenset({
    "ReluBackward0", "LeakyReluBackward0", "EluBackward0", "GeluBackward0", "SiluBackward0", "TanhBackward0",
    "HardswishBackward0", "MaxPool2DWithIndicesBackward0", "AvgPool2DBackward0", "AdaptiveAvgPool2DBackward0",
    "AdaptiveMaxPool2DBackward0", "CloneBackward0", "MulBackward0"})
SUMS = frozenset({"AddBackward0", "SubBackward0"})  # zero-preserving only when both operands are traced
REDUCTIONS = frozenset({"MeanBackward1", "SumBackward1"})  # fine unless they reduce over channels
CHECK_BATCH = 256


class SurgeryError(RuntimeError):
    """Surgery refused or failed; the message names the module or the layer groups involved."""


@dataclass(frozen=True)
class SurgeryReport:
    params_before: int
    params_after: int
    channels_before: int  # all channels of all groups (each root's out-channels)
    channels_removed: int
    removed_by_group: dict[str, int]  # group root module name -> channels removed
    max_abs_diff: float  # over real and random check inputs
    argmax_agreement: float  # share of check inputs with the same argmax (1.0 = all)
    seconds: float
    skipped_groups: dict[str, str] = field(default_factory=dict)  # group root -> why it was left alone


@dataclass(frozen=True)
class _Trace:
    graph: tp.DependencyGraph
    names: dict  # module -> qualified name
    outputs: frozenset  # autograd nodes of the model's outputs
    calls: dict  # conv/linear/BatchNorm -> forward calls during the trace
    classifier: nn.Module | None


@dataclass(frozen=True)
class _GroupPlan:
    name: str
    root: nn.Module
    handler: Callable
    dead: tuple[int, ...]


@dataclass(frozen=True)
class _Analysis:
    trace: _Trace
    plans: list[_GroupPlan]  # one per supported group (dead may be empty)
    skipped: dict[str, str]
    channels: int


def _traced_forward(model: nn.Module, example_input: torch.Tensor) -> tuple[tp.DependencyGraph, object, list]:
    """The dependency graph, the model's output, and the conv/linear/BatchNorm calls in order."""
    order: list[nn.Module] = []
    outputs: list = []

    def forward(module, x):
        outputs.append(module(x))
        return outputs[-1]

    hooks = [m.register_forward_hook(lambda module, _i, _o: order.append(module))
             for m in model.modules() if isinstance(m, (*LAYERS, BATCHNORM))]
    try:
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=example_input.detach(), forward_fn=forward, verbose=False)
    except Exception as err:  # tracing surfaces any model error; report it with the model's name
        raise SurgeryError(f"cannot trace {type(model).__name__} with input of shape "
                           f"{tuple(example_input.shape)}: {err}") from err
    finally:
        for hook in hooks:
            hook.remove()
    return graph, outputs[0], order


def _trace(model: nn.Module, example_input: torch.Tensor, classifier: nn.Module | None) -> _Trace:
    if not any(isinstance(m, LAYERS) for m in model.modules()):
        raise SurgeryError(f"{type(model).__name__} has no conv or linear layer to prune")
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2:
        shape = getattr(example_input, "shape", example_input)
        raise SurgeryError(f"example input must be a batched tensor (N, C, ...), got {shape}")
    graph, out, order = _traced_forward(model, example_input)
    outputs = frozenset(t.grad_fn for t in tp.utils.flatten_as_list(out) if isinstance(t, torch.Tensor))
    if classifier is None:  # the layer that writes the logits, else the last conv/linear that ran
        layers = [m for m in order if isinstance(m, LAYERS)]
        writers = [m for m in layers if m in graph.module2node and graph.module2node[m].grad_fn in outputs]
        classifier = (writers or layers or [None])[-1]
    return _Trace(graph, {m: n for n, m in model.named_modules()}, outputs - {None}, Counter(order), classifier)


def _zero_preserving(node) -> bool:
    """Does this element-wise op keep channels apart and turn an all-zero channel into zeros?"""
    fn = node.grad_fn
    name = fn.name() if hasattr(fn, "name") else ""
    if name == "TBackward0":  # a linear layer's transposed weight, not an activation
        return not node.inputs and all(out.type == OPTYPE.LINEAR for out in node.outputs)
    if name in SUMS:  # a constant or untraced operand (x + 1, x + model input) would break zero
        return all(f is not None and f.name() != "AccumulateGrad" for f, _ in fn.next_functions)
    if name == "HardtanhBackward0":
        return fn._saved_min_val <= 0 <= fn._saved_max_val
    if name in REDUCTIONS:  # autograd stores negative dims as unsigned 64-bit ints
        ndim = len(fn._saved_self_sym_sizes)
        return ndim >= 2 and all((d - (1 << 64) if d >= 1 << 63 else d) % ndim != 1 for d in fn._saved_dim)
    return name in ZERO_PRESERVING


def _is_flatten(node) -> bool:
    """A view (N, C, ...) -> (N, C * ...) read only by linear layers, as torch-pruning maps it."""
    sizes = getattr(node.grad_fn, "_saved_self_sym_sizes", None)
    if sizes is None or len(sizes) < 2 or not node.outputs:
        return False
    features = int(torch.Size(sizes[1:]).numel())
    return all(out.type == OPTYPE.LINEAR and out.module.in_features == features for out in node.outputs)


def _unsupported(item, trace: _Trace, channels: int) -> str | None:
    """Why this item makes its group unsafe to analyse or to prune, or None if it is fine."""
    node, handler = item.dep.target, item.dep.handler
    module, label = node.module, trace.names.get(node.module, repr(node.module))
    writes = trace.graph.is_out_channel_pruning_fn(handler)
    if node.grad_fn in trace.outputs and (writes or not isinstance(module, LAYERS)):
        return f"{label} is a model output"
    if node.type in (OPTYPE.CONV, OPTYPE.LINEAR, OPTYPE.BN):
        if type(module) not in LAYERS and not isinstance(module, BATCHNORM):
            return f"{label} is a {type(module).__name__}"
        if getattr(module, "groups", 1) != 1 or getattr(module, "transposed", False):
            return f"{label} is a grouped or transposed conv"
        if trace.calls.get(module, 0) != 1:
            return f"{label} runs {trace.calls.get(module, 0)} times"
        size = module.num_features if isinstance(module, BATCHNORM) else module.weight.shape[0 if writes else 1]
        if size % channels or len(item.idxs) != size or any(  # layer index i must belong to root i // block
                i // (size // channels) != r for i, r in zip(item.idxs, item.root_idxs)):
            return f"{label} does not map block-wise onto the group's channels"
        return None
    if node.type == OPTYPE.RESHAPE:
        return None if _is_flatten(node) else f"reshape {label} is not a flatten into linear layers"
    if node.type == OPTYPE.ELEMENTWISE:
        return None if _zero_preserving(node) else f"op {label} may mix channels or not keep zeros"
    return f"{node.type.name} op {label} is not supported"


def _nonzero_along(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Per index of `dim` (0 or 1): is any weight there nonzero, i.e. is the max or the min nonzero?
    Reducing dim 0 first for dim 1 is fast and makes no weight-sized temporaries; NaN counts as nonzero."""
    highs, lows = (weight.amax(dim=0), weight.amin(dim=0)) if dim == 1 else (weight, weight)
    return highs.reshape(len(highs), -1).amax(dim=1).ne(0) | lows.reshape(len(lows), -1).amin(dim=1).ne(0)


def _batchnorm_emits(bn: nn.Module) -> torch.Tensor:
    """Per channel: may the BatchNorm emit nonzero for a zero input? (bias - w * mean / std, exactly)"""
    zeros = torch.zeros(bn.num_features)
    bias = bn.bias.detach() if bn.bias is not None else zeros
    weight = bn.weight.detach() if bn.weight is not None else zeros + 1
    mean = bn.running_mean if bn.running_mean is not None else zeros
    return bias.ne(0) | (weight.ne(0) & mean.ne(0))


def _dead_channels(group, graph: tp.DependencyGraph, channels: int) -> torch.Tensor:
    """Dead root channels of a supported group (layer index i belongs to root i // block, checked)."""
    written = torch.zeros(channels, dtype=torch.bool)  # some writer or BatchNorm may emit nonzero
    read = torch.zeros(channels, dtype=torch.bool)  # some reader has a nonzero weight on it
    readers = 0
    for item in group.items:
        module = item.dep.target.module
        if isinstance(module, BATCHNORM):
            written |= _batchnorm_emits(module)
        elif isinstance(module, LAYERS):
            writes = graph.is_out_channel_pruning_fn(item.dep.handler)
            flags = _nonzero_along(module.weight.detach(), 0 if writes else 1)
            if writes and module.bias is not None:
                flags = flags | module.bias.detach().ne(0)
            if writes:
                written |= flags.view(channels, -1).any(dim=1)
            else:
                read |= flags.view(channels, -1).any(dim=1)
                readers += 1
    dead = ~written | (~read if readers else torch.zeros(channels, dtype=torch.bool))
    if dead.all():  # keep one so the network stays well-formed; it emits zero or is read as zero
        dead[0] = False
    return dead


def _analyse(model: nn.Module, example_input: torch.Tensor, classifier: nn.Module | None) -> _Analysis:
    trace = _trace(model, example_input, classifier)
    plans, skipped, total = [], {}, 0
    ignored = [trace.classifier] if trace.classifier is not None else []
    for group in trace.graph.get_all_groups(ignored_layers=ignored, root_module_types=LAYERS):
        root = group[0].dep.target.module
        name, channels = trace.names.get(root, repr(root)), len(group[0].idxs)
        total += channels
        reason = next(filter(None, (_unsupported(item, trace, channels) for item in group.items)), None)
        if reason is not None:
            skipped[name] = reason
            continue
        dead = _dead_channels(group, trace.graph, channels).nonzero().flatten().tolist()
        plans.append(_GroupPlan(name, root, group[0].dep.handler, tuple(dead)))
    return _Analysis(trace, plans, skipped, total)


def find_dead_channels(model: nn.Module, example_input: torch.Tensor,
                       classifier: nn.Module | None = None) -> dict[str, list[int]]:
    """Root module name -> dead channel indices (one pass), for groups that have any. Leaves the model
    as it was (tracing switches it to eval mode; the modes are restored)."""
    modes = {m: m.training for m in model.modules()}
    try:
        analysis = _analyse(model, example_input, classifier)
    finally:
        for module, mode in modes.items():
            module.training = mode
    return {p.name: list(p.dead) for p in analysis.plans if p.dead}


def _prune(analysis: _Analysis, only: str | None = None) -> dict[str, int]:
    removed = {}
    for plan in analysis.plans:
        if plan.dead and only in (None, plan.name):
            try:
                analysis.trace.graph.get_pruning_group(plan.root, plan.handler, list(plan.dead)).prune()
            except Exception as err:  # torch-pruning failed mid-way; the caller discards the copy
                raise SurgeryError(f"pruning group {plan.name!r} failed: {err}") from err
            removed[plan.name] = len(plan.dead)
    return removed


def _check_batches(example_input: torch.Tensor, check_inputs: torch.Tensor | None, random_checks: int) -> list:
    """Random inputs shaped like the (checked) example, fixed seed; then the caller's real inputs."""
    shape = tuple(example_input.shape[1:])
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(random_checks, *shape, generator=generator, dtype=example_input.dtype)]
    if check_inputs is not None and len(check_inputs):
        if tuple(check_inputs.shape[1:]) != shape:
            raise SurgeryError(f"check inputs have samples of shape {tuple(check_inputs.shape[1:])}, "
                               f"the example input {shape}")
        batches += list(check_inputs.split(CHECK_BATCH))
    return batches


@torch.no_grad()
def _outputs(model: nn.Module, batches: list, what: str) -> list[torch.Tensor]:
    try:
        outputs = [model(x) for x in batches]
    except Exception as err:  # whatever breaks the forward pass, name it
        raise SurgeryError(f"{what} does not run on the check inputs: {err}") from err
    if not all(isinstance(out, torch.Tensor) and out.dim() >= 2 for out in outputs):
        raise SurgeryError(f"{what} must return one (batch, classes) tensor of logits to be checked")
    return outputs


def _verify(model: nn.Module, batches: list, expected: list, atol: float, what: str) -> tuple[float, float]:
    """Max abs difference and share of equal argmax against the sparse outputs; raises past `atol`."""
    got = _outputs(model, batches, what)
    diff, same = float("inf"), 0
    if all(e.shape == g.shape for e, g in zip(expected, got)):
        diff = max(float((e - g).abs().max()) for e, g in zip(expected, got))
        same = sum(int((e.flatten(1).argmax(1) == g.flatten(1).argmax(1)).sum()) for e, g in zip(expected, got))
    agreement = same / sum(len(e) for e in expected)
    if not (diff <= atol and agreement == 1.0):  # written so that NaN fails
        raise SurgeryError(f"{what} differs from the sparse model (max abs diff {diff:.3g}, atol {atol:g}; "
                           f"argmax agreement {agreement:.4f})")
    return diff, agreement


def _counterpart(model: nn.Module, clone: nn.Module, module: nn.Module | None) -> nn.Module | None:
    """The module of `clone` at the place `module` has in `model`."""
    if module is None:
        return None
    name = next((n for n, m in model.named_modules() if m is module), None)
    if name is None:
        raise SurgeryError(f"classifier {type(module).__name__} is not a module of {type(model).__name__}")
    return dict(clone.named_modules())[name]


def _blame(model, example_input, classifier, batches, expected, atol, removed: dict[str, int]) -> list[str]:
    """The groups whose first-pass removal alone breaks equivalence (each tried on a fresh copy)."""
    culprits = []
    for name in removed:
        trial = copy.deepcopy(model).eval()
        try:
            _prune(_analyse(trial, example_input, _counterpart(model, trial, classifier)), only=name)
            _verify(trial, batches, expected, atol, f"group {name}")
        except SurgeryError:
            culprits.append(name)
    return culprits


def compact(model: nn.Module, example_input: torch.Tensor, check_inputs: torch.Tensor | None = None,
            atol: float = 1e-4, classifier: nn.Module | None = None, random_checks: int = 32
            ) -> tuple[nn.Module, SurgeryReport]:
    """A compact copy of `model` without its dead channels, checked equal to `model` on `check_inputs`
    and `random_checks` random inputs. `model` itself is never touched, not even its train/eval mode."""
    start = time.perf_counter()
    if not atol >= 0 or random_checks < 1:
        raise ValueError(f"need atol >= 0 and random_checks >= 1, got {atol} and {random_checks}")
    pruned = copy.deepcopy(model).eval()
    target = _counterpart(model, pruned, classifier)
    first = analysis = _analyse(pruned, example_input, target)
    batches = _check_batches(example_input, check_inputs, random_checks)
    expected = _outputs(pruned, batches, type(model).__name__)  # the sparse model, before surgery
    removed: dict[str, int] = {}
    while step := _prune(analysis):  # repeat: a removed reader can leave its own inputs unread
        removed = {name: removed.get(name, 0) + step.get(name, 0) for name in {**removed, **step}}
        if sum(removed.values()) >= first.channels:  # cannot happen unless pruning silently did nothing
            raise SurgeryError(f"removing dead channels does not converge: {removed}")
        analysis = _analyse(pruned, example_input, target)
    try:
        diff, agreement = _verify(pruned, batches, expected, atol, f"the model after pruning groups {removed}")
    except SurgeryError as err:
        culprits = _blame(model, example_input, classifier, batches, expected, atol, removed)
        raise SurgeryError(f"{err}; groups that break it alone: {culprits or 'none'}") from err
    return pruned, SurgeryReport(
        params_before=count_params(model), params_after=count_params(pruned), channels_before=first.channels,
        channels_removed=sum(removed.values()), removed_by_group=removed, max_abs_diff=diff,
        argmax_agreement=agreement, seconds=time.perf_counter() - start, skipped_groups=first.skipped)
