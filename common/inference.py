"""A model optimized for CPU serving: BatchNorm folded into its convolutions, channels-last layout.

`for_inference` folds every BatchNorm that follows a convolution into that convolution's weights
and bias (one pass over the activations less per layer) and moves the weights and every input to
channels-last memory layout, where PyTorch's CPU convolutions run on oneDNN. Both keep the
computation the same up to float32 rounding. On the shifter benchmark's VGG-11 a batch of 32 ran
1.4x (the dense model) to 1.8x (its 1024x compact variant) faster than as loaded (docs/results.md):
the gain is largest on the small layers pruning leaves, whose time went mostly to memory passes
rather than arithmetic.

Folding needs a model torch.fx can trace symbolically; a custom model whose control flow depends on
its input cannot be, and is then served without folding. Either way the served model is checked
against the model as loaded on random inputs at two batch sizes before it is used; if they differ,
the model is built again and served as loaded, and the reason logged. Folding works in place and the
layout change one tensor at a time, so a variant never holds a second copy of its weights while it is
made ready.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

import torch
from torch import fx, nn

log = logging.getLogger(__name__)
CHECK_BATCHES = (1, 3)
ATOL, RTOL = 1e-4, 1e-3  # folding and oneDNN sum in another order than the original: float32 ulps apart


class ChannelsLast(nn.Module):
    """Runs `model` (its weights already channels-last) on its input in channels-last layout."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last))


def _fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold each BatchNorm that only ever sees one convolution's output into that convolution, in
    place: the convolution's weights are scaled where they lie and the BatchNorm is replaced by an
    identity, so no second copy of the weights is made. torch.fx finds the pairs; a model it cannot
    trace is returned unchanged."""
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as err:  # noqa: BLE001 - a model fx cannot trace is served unfolded
        log.info("BatchNorm not folded (%s: %s)", type(err).__name__, err)
        return model
    modules = dict(model.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    for node in graph.nodes:
        source = node.args[0] if node.op == "call_module" and node.args else None
        if (not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1
                or calls[node.target] != 1 or calls[source.target] != 1):
            continue
        conv, norm = modules[source.target], modules[node.target]
        if type(conv) is nn.Conv2d and type(norm) is nn.BatchNorm2d and norm.track_running_stats:
            _fold_into(conv, norm)
            parent, _, name = node.target.rpartition(".")
            setattr(modules[parent], name, nn.Identity())
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
    generator = torch.Generator().manual_seed(0)
    checks = [torch.randn(batch, *input_shape, generator=generator) for batch in CHECK_BATCHES]
    with torch.inference_mode():
        expected = [model(x) for x in checks]
    served = ChannelsLast(_fold_batchnorm(model)).eval()
    problem = _differs(served, checks, expected)
    if problem is None:
        return served
    if rebuild is None:
        raise NotServableError(problem)
    log.warning("%s; serving the model as loaded", problem)
    return rebuild().eval()


def _differs(served: nn.Module, checks: list[torch.Tensor], expected: list[torch.Tensor]) -> str | None:
    """How the served model's outputs differ from the expected ones, or None when they agree."""
    with torch.inference_mode():
        for x, want in zip(checks, expected):
            try:
                got = served(x)
            except Exception as err:  # noqa: BLE001 - e.g. a custom model that views its input as contiguous
                return f"folded and channels-last, the model fails at batch {x.shape[0]}: {type(err).__name__}: {err}"
            if got.shape == want.shape and torch.allclose(got, want, atol=ATOL, rtol=RTOL):
                continue
            diff = (got - want).abs().max().item() if got.shape == want.shape else float("nan")
            return (f"folded and channels-last, the model differs from the model as loaded at batch "
                    f"{x.shape[0]} (shapes {tuple(got.shape)} and {tuple(want.shape)}, max abs diff {diff:.3g})")
    return None
