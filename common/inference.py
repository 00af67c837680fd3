"""A model optimized for CPU serving: BatchNorm folded into its convolutions, channels-last layout.

`for_inference` folds every BatchNorm that follows a convolution into that convolution's weights
and bias (one pass over the activations less per layer) and moves the weights and every input to
channels-last memory layout, where PyTorch's CPU convolutions run on oneDNN. Both keep the
computation the same up to float32 rounding; together they make a model serve faster than as
loaded. The gain is largest on the small layers pruning leaves, whose time goes to memory passes more
than to arithmetic, and most of it comes from the layout, folding adding a smaller part (measured; the
figures are in docs/results.md). It is how an edge serves by default.

What to fold is seen in the check's reference pass (below): a BatchNorm folds into the convolution whose
output it reads when nothing else reads that output and neither runs twice. Forward hooks on the
layers and a torch function mode count the reads; both act on this model in this thread only, so
other variants keep serving while one loads (a tracer such as torch.fx's patches every module's call
in the process while it traces, so a concurrent request could fail). A model whose wiring
between layers depends on its input's values is folded as its wiring was for the check's input;
serve such a model with `--no-optimize-models`. The served model is then checked
against the model as loaded on a random input before it is used; if they differ (or the served model
fails, as one that views its input as contiguous does), the model is built again and served as
loaded, and the reason logged. The check runs at batch 1 only: both changes act on each sample
alike, and each new batch size costs oneDNN a compiled kernel per convolution that stays resident
(a second check at another batch size would add resident memory for every variant and raise the
memory peak of a load). Folding and the layout change both work in place (the layout a block of output
channels at a time), so a variant never holds a second copy of its weights while it is made ready.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from common.errors import PrunefleetError

log = logging.getLogger(__name__)
CHECK_BATCH = 1  # one pass: each new batch size would cost oneDNN a kernel per convolution, kept
ATOL, RTOL = 1e-4, 1e-3  # folding and oneDNN sum in another order than the original: float32 ulps apart


class ChannelsLast(nn.Module):
    """Runs `model` (its weights already channels-last) on its input in channels-last layout."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = _to_channels_last(model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last))


BLOCK_BYTES = 1 << 18  # the scratch of the in-place layout change: one block of output channels


@torch.no_grad()
def _to_channels_last(model: nn.Module) -> nn.Module:
    """`model` with its 4-d weights in channels-last layout, changed in place. Both layouts keep each
    output channel's values in the same span of memory ([O, I, kh, kw] and [O, kh, kw, I]), so a
    tensor is changed a block of output channels at a time through a copy of that block: the model
    never holds a second copy of a tensor, and the scratch is one block (a tensor-sized copy, even
    freed tensor by tensor, grows the heap by a large share of the model's own bytes)."""
    for tensor in (t for t in (*model.parameters(), *model.buffers()) if t.dim() == 4):
        _restride_in_place(tensor)
    return model


def _restride_in_place(tensor: torch.Tensor) -> None:
    data = tensor.data
    if data.stride() == _channels_last_strides(data):
        return
    data = data.contiguous()  # a copy only for a tensor that is neither layout (e.g. a view)
    # always restrided: strides alone can call a tensor with one input channel channels-last already
    restrided = torch.as_strided(data, data.shape, _channels_last_strides(data), data.storage_offset())
    per_channel = max(1, data[0].numel() * data.element_size())
    step = max(1, BLOCK_BYTES // per_channel)
    for start in range(0, data.shape[0], step):
        block = data[start : start + step].clone()
        restrided[start : start + step].copy_(block)
    tensor.data = restrided


def _channels_last_strides(tensor: torch.Tensor) -> tuple[int, ...]:
    _, channels, height, width = tensor.shape
    return (height * width * channels, 1, width * channels, channels)


def _leaves(value):
    """The values inside nested lists, tuples and dicts (an operation may take its tensors in a list)."""
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _leaves(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item)
    else:
        yield value


class _Watch(TorchFunctionMode):
    """During one forward pass in this thread (a torch function mode is thread-local: other threads'
    passes are neither seen nor touched), which BatchNorm read which convolution's output, and how
    many operations outside that BatchNorm read the output too (a shape query counts: when in doubt,
    nothing is folded)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.calls: Counter[nn.Module] = Counter()
        self.outputs: dict[int, tuple[torch.Tensor, nn.Module]] = {}  # id -> (output, its conv), kept alive
        self.reads: Counter[nn.Module] = Counter()  # conv -> operations outside a BatchNorm that took its output
        self.reader: dict[nn.Module, nn.Module] = {}  # conv -> a BatchNorm that took its output
        self._inside: nn.Module | None = None  # the BatchNorm running now, reading a conv's output
        self._hooks = []
        for module in model.modules():
            if type(module) is nn.Conv2d:
                self._hooks.append(module.register_forward_hook(self._produced))
            elif type(module) is nn.BatchNorm2d:
                self._hooks += [
                    module.register_forward_pre_hook(self._reading),
                    module.register_forward_hook(self._read),
                ]

    def _produced(self, conv, args, output) -> None:
        self.calls[conv] += 1
        self.outputs[id(output)] = (output, conv)

    def _reading(self, norm, args) -> None:
        self.calls[norm] += 1
        conv = self._conv_of(args[0] if args else None)
        if conv is not None:
            self.reader[conv], self._inside = norm, norm

    def _read(self, norm, args, output) -> None:
        self._inside = None

    def _conv_of(self, value) -> nn.Module | None:
        held = self.outputs.get(id(value))
        return held[1] if held is not None and held[0] is value else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for value in _leaves((args, kwargs)) if self._inside is None else ():
            conv = self._conv_of(value)
            if conv is not None:
                self.reads[conv] += 1
        return func(*args, **kwargs)

    def pairs(self) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
        """Each (conv, BatchNorm) where the BatchNorm was the only reader of the conv's output and both
        ran once: folding one into the other changes nothing else the model computes. Ends the watch:
        the hooks are removed and the outputs it held released."""
        for hook in self._hooks:
            hook.remove()
        self.outputs.clear()
        return [
            (conv, norm)
            for conv, norm in self.reader.items()
            if self.reads[conv] == 0 and self.calls[conv] == 1 and self.calls[norm] == 1 and norm.track_running_stats
        ]


def _fold_batchnorm(model: nn.Module, pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]]) -> nn.Module:
    """Fold each BatchNorm of `pairs` into its convolution, in place: the convolution's weights are
    scaled where they lie and the BatchNorm is replaced by an identity, so no second copy of the
    weights is made."""
    folded = {id(norm) for _, norm in pairs}
    for conv, norm in pairs:
        _fold_into(conv, norm)
    for parent in model.modules():
        for name, child in parent.named_children():
            if id(child) in folded:
                setattr(parent, name, nn.Identity())
    return model


@torch.no_grad()
def _fold_into(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    scale = norm.running_var.add(norm.eps).rsqrt()
    if norm.affine:
        scale = scale.mul_(norm.weight)
    shift = -norm.running_mean * scale
    if norm.affine:
        shift += norm.bias
    conv.weight.mul_(scale.view(-1, 1, 1, 1))
    if conv.bias is None:
        conv.bias = nn.Parameter(shift)
    else:
        conv.bias.mul_(scale).add_(shift)


class NotServableError(PrunefleetError, RuntimeError):
    """The model as served computes something else than the model as loaded."""


@dataclass(frozen=True)
class ServingPlan:
    """How a model's check decided to serve it: folded and channels-last, with the (convolution,
    BatchNorm) pairs folded by module name, or as loaded (`folds` None)."""

    folds: tuple[tuple[str, str], ...] | None


AS_LOADED = ServingPlan(None)


def for_inference(
    model: nn.Module, input_shape: tuple[int, ...], rebuild: Callable[[], nn.Module] | None = None
) -> nn.Module:
    """What to serve for `model`, in eval mode (see `checked_for_inference`)."""
    return checked_for_inference(model, input_shape, rebuild)[0]


def checked_for_inference(
    model: nn.Module, input_shape: tuple[int, ...], rebuild: Callable[[], nn.Module] | None = None
) -> tuple[nn.Module, ServingPlan]:
    """What to serve for `model`, in eval mode, and the plan its check decided on. `model` is taken
    over: folding changes it in place, so when the served model fails its check, the model is built
    again with `rebuild` and served as loaded (NotServableError without one)."""
    model = model.eval()
    names = {module: name for name, module in model.named_modules()}
    x = torch.randn(CHECK_BATCH, *input_shape, generator=torch.Generator().manual_seed(0))
    watch = _Watch(model)
    with torch.inference_mode(), watch:  # the check's reference pass also finds what to fold
        expected = model(x)
    pairs = watch.pairs()
    served = ChannelsLast(_fold_batchnorm(model, pairs)).eval()
    problem = _differs(served, x, expected)
    if problem is None:
        return served, ServingPlan(tuple((names[conv], names[norm]) for conv, norm in pairs))
    if rebuild is None:
        raise NotServableError(problem)
    log.warning("%s; serving the model as loaded", problem)
    return rebuild().eval(), AS_LOADED


def as_planned(model: nn.Module, plan: ServingPlan) -> nn.Module:
    """What to serve for `model`, made ready as `plan` says with no forward pass: for a model built
    from the very bytes whose check made the plan (an edge loading again, on demand, a variant it
    checked on arrival). No pass means no scratch for activations, so the load holds little more
    than the weights."""
    model = model.eval()
    if plan.folds is None:
        return model
    modules = dict(model.named_modules())
    return ChannelsLast(_fold_batchnorm(model, [(modules[conv], modules[norm]) for conv, norm in plan.folds])).eval()


def _differs(served: nn.Module, x: torch.Tensor, want: torch.Tensor) -> str | None:
    """How the served model's output on `x` differs from `want`, or None when they agree."""
    with torch.inference_mode():
        try:
            got = served(x)
        except Exception as err:
            return f"folded and channels-last, the model fails at batch {x.shape[0]}: {type(err).__name__}: {err}"
    if got.shape == want.shape and torch.allclose(got, want, atol=ATOL, rtol=RTOL):
        return None
    diff = (got - want).abs().max().item() if got.shape == want.shape else float("nan")
    return (
        f"folded and channels-last, the model differs from the model as loaded at batch "
        f"{x.shape[0]} (shapes {tuple(got.shape)} and {tuple(want.shape)}, max abs diff {diff:.3g})"
    )
