"""Pruning at initialization (PaI): score every conv and linear weight before training, keep the best.

A scorer maps a freshly initialized model (and, for the data-driven ones, a few labelled batches) to a
score per weight; higher means keep. `score` applies one global threshold over all scored
layers to reach a compression (total weights / remaining weights). The scorers, as published:
- `random`: uniform noise (a baseline).
- `magnitude`: |w|.
- `snip` (Lee et al., 2019): |w * dL/dw|, gradients summed over the batches.
- `grasp` (Wang et al., 2020): w * (H g), the Hessian-gradient product; GraSP removes the weights
  whose removal least reduces gradient flow, i.e. keeps the largest w * Hg (signed).
- `synflow` (Tanaka et al., 2020): data-free and iterative. The network's weights are replaced by their
  absolute values and run in float64 on an all-ones input; the score is |w * dR/dw| with R the sum of
  the outputs (kept over R, a scale common to every weight, so that it fits float32 however deep).
  Pruning proceeds over `rounds` rounds with an exponential density schedule, re-scoring the
  surviving weights each round, which avoids layer collapse.

The data-driven scorers and SynFlow run on the device they are given (the build's `--device`); scores
and masks always come back on the CPU, where the structure is decided.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F

from cloud.build.methods.masks import Masks
from common import datasets
from common.errors import PrunefleetError
from common.models import prunable_layers

Scores = dict[str, torch.Tensor]  # "layer.weight" -> score, same shape as the weight


class PaIError(PrunefleetError, ValueError):
    """A pruning-at-initialization request that cannot be met; the message says why."""


def _weights(model: nn.Module) -> dict[str, nn.Parameter]:
    return {f"{name}.weight": layer.weight for name, layer in prunable_layers(model).items()}


def random_scores(model: nn.Module, batches=(), seed: int = 0, **_) -> Scores:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.rand(w.shape, generator=gen) for name, w in _weights(model).items()}


def magnitude_scores(model: nn.Module, batches=(), **_) -> Scores:
    return {name: w.detach().abs().clone() for name, w in _weights(model).items()}


def _placed(model: nn.Module, batches: Iterable, device: torch.device | None) -> tuple[nn.Module, list]:
    """A training-mode copy of the model and the batches, both on `device` (default: the CPU)."""
    device = torch.device("cpu") if device is None else device
    return copy.deepcopy(model).to(device).train(), [(x.to(device), y.to(device)) for x, y in batches]


def snip_scores(model: nn.Module, batches: Iterable, device: torch.device | None = None, **_) -> Scores:
    model, batches = _placed(model, batches, device)
    weights = _weights(model)
    model.zero_grad(set_to_none=True)
    for inputs, labels in batches:
        F.cross_entropy(model(inputs), labels).backward()
    return {name: (w.detach() * w.grad).abs().cpu() for name, w in weights.items()}


def grasp_scores(model: nn.Module, batches: Iterable, device: torch.device | None = None, **_) -> Scores:
    model, batches = _placed(model, batches, device)
    weights = _weights(model)
    params = list(weights.values())
    grads = [torch.zeros_like(p) for p in params]
    for inputs, labels in batches:  # g, without a graph
        for total, g in zip(grads, torch.autograd.grad(F.cross_entropy(model(inputs), labels), params)):
            total += g
    hg = [torch.zeros_like(p) for p in params]
    for inputs, labels in batches:  # H g = d(g . dL/dw)/dw
        g_live = torch.autograd.grad(F.cross_entropy(model(inputs), labels), params, create_graph=True)
        z = sum((g.detach() * live).sum() for g, live in zip(grads, g_live))
        for total, h in zip(hg, torch.autograd.grad(z, params)):
            total += h
    return {name: (w.detach() * h).cpu() for (name, w), h in zip(weights.items(), hg)}


# On SynFlow's all-positive signals ReLU is the identity; saturating or curved activations are not, and
# would bend or zero the linearized network's gradients (ReLU6 clamps everything at 6), so they become
# the identity too. Activations called as functions inside `forward` cannot be swapped.
ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.ELU,
    nn.Mish,
)


def _swap_activations(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, ACTIVATIONS):
            setattr(module, name, nn.Identity())
        else:
            _swap_activations(child)


@torch.no_grad()
def _linearized(model: nn.Module) -> nn.Module:
    """SynFlow's network: a float64 copy in eval mode with every weight, bias and BatchNorm statistic
    replaced by its absolute value and the activations by the identity."""
    clone = copy.deepcopy(model).double().eval()
    for tensor in clone.state_dict().values():
        if tensor.is_floating_point():
            tensor.abs_()
    _swap_activations(clone)
    return clone


@torch.no_grad()
def _flat_buffers(weights: dict[str, nn.Parameter]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """One flat float64 buffer that the weights become views of, one flat score buffer and one flat
    mask beside it, and each layer's (score, mask) views into those."""
    total, device = sum(w.numel() for w in weights.values()), next(iter(weights.values())).device
    flat_weights = torch.empty(total, dtype=torch.float64, device=device)
    flat_scores = torch.empty(total, dtype=torch.float32, device=device)
    flat_mask = torch.ones(total, dtype=torch.bool, device=device)
    views, start = {}, 0
    for name, w in weights.items():
        part = slice(start, start + w.numel())
        flat_weights[part].view(w.shape).copy_(w)
        w.data = flat_weights[part].view(w.shape)  # the layer now reads the flat buffer
        views[name] = (flat_scores[part].view(w.shape), flat_mask[part].view(w.shape))
        start += w.numel()
    return flat_weights, flat_scores, flat_mask, views


def _flow_backward(net: nn.Module, ones: torch.Tensor) -> None:
    """dR/dw over R into every weight's grad: one scale for all scores ranks them alike, and fits float32,
    which R overflows on a deep network at full width (ResNet-56 at width 1.0: R ~ 4e50, scores inf)."""
    net.zero_grad(set_to_none=True)
    flow = net(ones).sum()
    (flow / flow.detach() if flow.detach() > 0 else flow).backward()


def synflow(
    model: nn.Module,
    compression: float,
    input_shape: tuple[int, ...],
    rounds: int = 100,
    device: torch.device | None = None,
) -> tuple[Scores, Masks]:
    """Iterative SynFlow: density (1/compression)^(k/rounds) after round k, re-scored every round, on
    `device` (default: the CPU). Returns the last round's scores and the final masks, on the CPU.

    The linearized float64 copy is made once, its weights views of one flat buffer, beside one flat
    score buffer and one flat mask (the layers' masks are views of it), so a round's bookkeeping is a
    few passes over flat buffers. A pruned weight is 0, so its score is 0 and every live score is >= 0:
    when the k-th largest score is above 0, "score >= it" keeps exactly the top k live weights and no
    pruned one, with no need to mark the pruned scores first."""
    if rounds < 1:
        raise ValueError(f"SynFlow needs at least one round, got {rounds}")
    net = _linearized(model).to(torch.device("cpu") if device is None else device)
    weights = _weights(net)
    flat_weights, flat_scores, flat_mask, views = _flat_buffers(weights)
    total = flat_weights.numel()
    ones = torch.ones(1, *input_shape, dtype=torch.float64, device=flat_weights.device)
    alive = total
    for k in range(1, rounds + 1):
        _flow_backward(net, ones)
        if k == 1 and not any(bool(w.grad.any()) for w in weights.values()):
            raise PaIError(
                f"SynFlow scores of {type(model).__name__} are all zero: its output does not depend on "
                "its weights on a positive input (an activation called as a function saturates?)"
            )
        with torch.no_grad():
            for name, w in weights.items():
                torch.mul(w, w.grad, out=views[name][0])  # both factors >= 0; pruned weights give 0
            keep = max(1, int(round(total / compression ** (k / rounds))))
            if keep >= alive:
                continue
            kth = _kth_largest(flat_scores, keep)
            if kth <= 0:  # ties at 0 among live weights: pruned ones must not be picked back up
                flat_scores.masked_fill_(~flat_mask, -torch.inf)
                kth = _kth_largest(flat_scores, keep)
            torch.ge(flat_scores, kth, out=flat_mask)
            flat_weights.masked_fill_(~flat_mask, 0.0)
            alive = int(torch.count_nonzero(flat_mask))
    flat_scores.clamp_(min=0)
    return (
        {name: view.to("cpu", copy=True) for name, (view, _) in views.items()},
        {name: mask.to("cpu", copy=True) for name, (_, mask) in views.items()},
    )


_EXACT_BELOW = 1 << 20  # select exactly over all scores below this many; else bracket with a sample first


def _kth_largest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of `flat`, exactly. Large inputs: a fixed-seed sample brackets the value
    in (low, high], one pass counts what lies above the bracket, and only the bracket is searched. When
    the value lies at or below `low` and `low` itself reaches the k-th place (a mass of ties at the
    bottom, such as pruned weights' scores, which the bracket leaves out), it is `low`. A full selection
    when the bracket misses."""
    n = flat.numel()
    if n <= _EXACT_BELOW:
        return torch.kthvalue(flat, n - k + 1).values
    sample = flat[torch.randint(n, (1 << 16,), generator=torch.Generator().manual_seed(0)).to(flat.device)]
    place = 1.0 - k / n  # the value's quantile
    quantiles = torch.tensor([max(0.0, place - 0.01), min(1.0, place + 0.01)], dtype=torch.float64, device=flat.device)
    low, high = torch.quantile(sample.double(), quantiles).to(flat.dtype)
    above = int(torch.count_nonzero(flat > high))
    band = flat[(flat > low) & (flat <= high)]
    if above < k <= above + band.numel():
        return torch.kthvalue(band, band.numel() - (k - above) + 1).values
    if k > above + band.numel() and int(torch.count_nonzero(flat >= low)) >= k:
        return low
    return torch.kthvalue(flat, n - k + 1).values


def threshold(scores: Scores, compression: float, masks: Masks | None = None) -> Masks:
    """Keep the top 1/compression of all weights by score, one global threshold; masked weights stay out."""
    if not compression >= 1.0:
        raise ValueError(f"compression must be >= 1, got {compression}")
    total = sum(s.numel() for s in scores.values())
    keep = max(1, int(round(total / compression)))
    flat = torch.cat(
        [
            torch.where(masks[n], s, torch.full_like(s, -torch.inf)).flatten() if masks else s.flatten()
            for n, s in scores.items()
        ]
    ).float()
    if keep >= flat.numel():
        return {n: (masks[n].clone() if masks else torch.ones_like(s, dtype=torch.bool)) for n, s in scores.items()}
    cut = _kth_largest(flat, keep)
    chosen = {n: s.float() >= cut for n, s in scores.items()}
    if masks:
        chosen = {n: m & masks[n] for n, m in chosen.items()}
    return chosen


SCORERS: dict[str, Callable[..., Scores]] = {
    "random": random_scores,
    "magnitude": magnitude_scores,
    "snip": snip_scores,
    "grasp": grasp_scores,
}
NEEDS_DATA = frozenset({"snip", "grasp"})


def scoring_batches(scorer: str, data: datasets.Dataset, count: int, batch_size: int, seed: int) -> list:
    """The first `count` shuffled labelled training batches a data-driven scorer scores with; none for
    the data-free ones."""
    if scorer not in NEEDS_DATA:
        return []
    stream = datasets.batches(data.train, data.info, batch_size, shuffle_seed=seed)
    return [batch for _, batch in zip(range(count), stream)]


def check_request(model: nn.Module, scorer: str, compression: float, batches) -> None:
    """Refuse, before any work, an unknown scorer, a data-driven scorer given no data, or a compression
    below 1 or beyond what the model can keep (one weight per scored layer)."""
    if scorer != "synflow" and scorer not in SCORERS:
        known = ", ".join(sorted([*SCORERS, "synflow"]))
        raise KeyError(f"unknown scorer {scorer!r}; known: {known}")
    if scorer in NEEDS_DATA and not batches:
        raise PaIError(f"scorer {scorer!r} scores with labelled batches and was given none")
    weights = _weights(model)
    total = sum(w.numel() for w in weights.values())
    if not 1.0 <= compression <= total / len(weights):
        raise PaIError(
            f"compression {compression:g} is out of reach: it must be at least 1 and at most "
            f"{total / len(weights):.4g} ({total} weights over {len(weights)} layers, one kept in each)"
        )


def score(
    model: nn.Module,
    scorer: str,
    compression: float,
    batches: Iterable = (),
    input_shape: tuple[int, ...] = (1, 28, 28),
    rounds: int = 100,
    seed: int = 0,
    device: torch.device | None = None,
) -> tuple[Scores, Masks]:
    """Scores (SynFlow: its last round's) and masks over every conv and linear weight reaching
    `compression` with the named scorer, computed on `device` (default: the CPU), returned on the CPU."""
    batches = list(batches)
    check_request(model, scorer, compression, batches)
    if scorer == "synflow":
        return synflow(model, compression, input_shape, rounds, device)
    scores = {name: s.cpu() for name, s in SCORERS[scorer](model, batches, seed=seed, device=device).items()}
    return scores, threshold(scores, compression)
