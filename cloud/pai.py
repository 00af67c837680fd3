"""Pruning at initialization (PaI): score every conv and linear weight before training, keep the best.

A scorer maps a freshly initialized model (and, for the data-driven ones, a few labelled batches) to a
score per weight; higher means keep. `prune_at_init` applies one global threshold over all scored
layers to reach a compression (total weights / remaining weights). The scorers, as published:
- `random`: uniform noise (a baseline).
- `magnitude`: |w|.
- `snip` (Lee et al., 2019): |w * dL/dw|, gradients summed over the batches.
- `grasp` (Wang et al., 2020): w * (H g), the Hessian-gradient product; GraSP removes the weights
  whose removal least reduces gradient flow, i.e. keeps the largest w * Hg (signed).
- `synflow` (Tanaka et al., 2020): data-free and iterative. The network's weights are replaced by their
  absolute values and run in float64 on an all-ones input; the score is |w * dR/dw| with R the sum of
  the outputs. Pruning proceeds over `rounds` rounds with an exponential density schedule, re-scoring
  the surviving weights each round, which avoids layer collapse.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F

from cloud.masks import Masks
from cloud.train import apply_masks
from common.models import prunable_layers

Scores = dict[str, torch.Tensor]  # "layer.weight" -> score, same shape as the weight


def _weights(model: nn.Module) -> dict[str, nn.Parameter]:
    return {f"{name}.weight": layer.weight for name, layer in prunable_layers(model).items()}


def random_scores(model: nn.Module, batches=(), seed: int = 0, **_) -> Scores:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.rand(w.shape, generator=gen) for name, w in _weights(model).items()}


def magnitude_scores(model: nn.Module, batches=(), **_) -> Scores:
    return {name: w.detach().abs().clone() for name, w in _weights(model).items()}


def snip_scores(model: nn.Module, batches: Iterable, **_) -> Scores:
    model = copy.deepcopy(model).train()
    weights = _weights(model)
    model.zero_grad(set_to_none=True)
    for inputs, labels in batches:
        F.cross_entropy(model(inputs), labels).backward()
    return {name: (w.detach() * w.grad).abs() for name, w in weights.items()}


def grasp_scores(model: nn.Module, batches: Iterable, **_) -> Scores:
    model = copy.deepcopy(model).train()
    weights = _weights(model)
    params = list(weights.values())
    batches = list(batches)
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
    return {name: w.detach() * h for (name, w), h in zip(weights.items(), hg)}


@torch.no_grad()
def _linearized(model: nn.Module) -> nn.Module:
    clone = copy.deepcopy(model).double().eval()
    for tensor in clone.state_dict().values():
        if tensor.is_floating_point():
            tensor.abs_()
    return clone


def _synflow_once(model: nn.Module, masks: Masks, input_shape: tuple[int, ...]) -> Scores:
    net = _linearized(model)
    apply_masks(net, masks)
    weights = _weights(net)
    net.zero_grad(set_to_none=True)
    net(torch.ones(1, *input_shape, dtype=torch.float64)).sum().backward()
    return {name: (w.detach() * w.grad).abs().float() for name, w in weights.items()}


def synflow_masks(model: nn.Module, compression: float, input_shape: tuple[int, ...], rounds: int = 100) -> Masks:
    """Iterative SynFlow: density (1/compression)^(k/rounds) after round k, re-scored every round."""
    masks = {name: torch.ones_like(w, dtype=torch.bool) for name, w in _weights(model).items()}
    for k in range(1, rounds + 1):
        scores = _synflow_once(model, masks, input_shape)
        masks = threshold(scores, compression ** (k / rounds), masks)
    return masks


def threshold(scores: Scores, compression: float, masks: Masks | None = None) -> Masks:
    """Keep the top 1/compression of all weights by score, one global threshold; masked weights stay out."""
    if not compression >= 1.0:
        raise ValueError(f"compression must be >= 1, got {compression}")
    total = sum(s.numel() for s in scores.values())
    keep = max(1, int(round(total / compression)))
    flat = torch.cat([torch.where(masks[n], s, torch.full_like(s, -torch.inf)).flatten() if masks else s.flatten()
                      for n, s in scores.items()]).float()
    if keep >= flat.numel():
        return {n: (masks[n].clone() if masks else torch.ones_like(s, dtype=torch.bool)) for n, s in scores.items()}
    cut = torch.topk(flat, keep, sorted=True).values[-1]
    chosen = {n: s.float() >= cut for n, s in scores.items()}
    if masks:
        chosen = {n: m & masks[n] for n, m in chosen.items()}
    return chosen


SCORERS: dict[str, Callable[..., Scores]] = {
    "random": random_scores, "magnitude": magnitude_scores, "snip": snip_scores, "grasp": grasp_scores,
}


def prune_at_init(model: nn.Module, scorer: str, compression: float, batches: Iterable = (),
                  input_shape: tuple[int, ...] = (1, 28, 28), rounds: int = 100, seed: int = 0) -> Masks:
    """Masks over every conv and linear weight reaching `compression` with the named scorer."""
    if scorer == "synflow":
        return synflow_masks(model, compression, input_shape, rounds)
    if scorer not in SCORERS:
        known = ", ".join(sorted([*SCORERS, "synflow"]))
        raise KeyError(f"unknown scorer {scorer!r}; known: {known}")
    return threshold(SCORERS[scorer](model, batches, seed=seed), compression)


def layer_density(masks: Masks) -> dict[str, float]:
    return {name: float(m.float().mean()) for name, m in masks.items()}
