"""A model optimized for CPU serving: BatchNorm folded into its convolutions, channels-last layout.

`for_inference` folds every BatchNorm that follows a convolution into that convolution's weights
and bias (one pass over the activations less per layer) and moves the weights and every input to
channels-last memory layout, where PyTorch's CPU convolutions run on oneDNN. Both keep the
computation the same up to float32 rounding. On the shifter benchmark's VGG-11 a batch of 32 ran
1.4x (the dense model) to 1.8x (its 1024x compact variant) faster than as loaded (docs/results.md):
the gain is largest on the small layers pruning leaves, whose time went mostly to memory passes
rather than arithmetic. Most of it is the layout: folding alone gained 1.04x to 1.08x. It is how an
edge serves by default.

What to fold is seen in the check's reference pass (below): a BatchNorm folds into the convolution whose
output it reads when nothing else reads that output and neither runs twice. Forward hooks on the
layers and a torch function mode count the reads; both act on this model in this thread only, so
other variants keep serving while one loads (torch.fx's tracer, used at first, patches every module's
call in the process while it traces, and a concurrent request then failed). A model whose wiring
between layers depends on its input's values is folded as its wiring was for the check's input;
serve such a model with `--no-optimize-models`. The served model is then checked
against the model as loaded on a random input before it is used; if they differ (or the served model
fails, as one that views its input as contiguous does), the model is built again and served as
loaded, and the reason logged. The check runs at batch 1 only: both changes act on each sample
alike, and each new batch size costs oneDNN a compiled kernel per convolution that stays resident
(a second check at batch 3 added 1.1 MB over five VGG-16 variants of 20 MB and doubled the memory
peak of a load). Folding works in place and the layout change one tensor at a time, so a variant
never holds a second copy of its weights while it is made ready.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

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


@torch.no_grad()
def _to_channels_last(model: nn.Module) -> nn.Module:
    """`model` with its 4-d weights in channels-last layout, changed one tensor at a time, largest
    first: each new tensor then fits where a larger one was freed, so the heap grows by about the
    largest tensor, not by the whole model (the allocator keeps freed memory for reuse)."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.dim() == 4]
    for tensor in sorted(tensors, key=torch.Tensor.numel, reverse=True):
        # always restrided: `contiguous` would keep the strides of a tensor with one input channel
        tensor.data = torch.empty_like(tensor, memory_format=torch.channels_last).copy_(tensor)
    return model


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
                self._hooks += [module.register_forward_pre_hook(self._reading),
                                module.register_forward_hook(self._read)]

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
        return [(conv, norm) for conv, norm in self.reader.items()
                if self.reads[conv] == 0 and self.calls[conv] == 1 and self.calls[norm] == 1
                and norm.track_running_stats]


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


class NotServableError(RuntimeError):
    """The model as served computes something else than the model as loaded."""


def for_inference(model: nn.Module, input_shape: tuple[int, ...],
                  rebuild: Callable[[], nn.Module] | None = None) -> nn.Module:
    """What to serve for `model`, in eval mode. `model` is taken over: folding changes it in place, so
    when the served model fails its check, the model is built again with `rebuild` and served as
    loaded (NotServableError without one)."""
    model = model.eval()
    x = torch.randn(CHECK_BATCH, *input_shape, generator=torch.Generator().manual_seed(0))
    watch = _Watch(model)
    with torch.inference_mode(), watch:  # the check's reference pass also finds what to fold
        expected = model(x)
    served = ChannelsLast(_fold_batchnorm(model, watch.pairs())).eval()
    problem = _differs(served, x, expected)
    if problem is None:
        return served
    if rebuild is None:
        raise NotServableError(problem)
    log.warning("%s; serving the model as loaded", problem)
    return rebuild().eval()


def _differs(served: nn.Module, x: torch.Tensor, want: torch.Tensor) -> str | None:
    """How the served model's output on `x` differs from `want`, or None when they agree."""
    with torch.inference_mode():
        try:
            got = served(x)
        except Exception as err:  # noqa: BLE001 - e.g. a custom model that views its input as contiguous
            return f"folded and channels-last, the model fails at batch {x.shape[0]}: {type(err).__name__}: {err}"
    if got.shape == want.shape and torch.allclose(got, want, atol=ATOL, rtol=RTOL):
        return None
    diff = (got - want).abs().max().item() if got.shape == want.shape else float("nan")
    return (f"folded and channels-last, the model differs from the model as loaded at batch "
            f"{x.shape[0]} (shapes {tuple(got.shape)} and {tuple(want.shape)}, max abs diff {diff:.3g})")
