"""Pruning-at-initialization scorers, each alone, with the properties their papers state."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from cloud.build.methods import scorers
from common import models

KWARGS = {"in_channels": 1, "input_size": 28, "num_classes": 10, "width": 0.125}


def _batches(n: int = 2, size: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 1, 28, 28, generator=gen), torch.randint(0, 10, (size,), generator=gen)) for _ in range(n)
    ]


def _total(masks) -> tuple[int, int]:
    return sum(int(m.sum()) for m in masks.values()), sum(m.numel() for m in masks.values())


@pytest.mark.parametrize("scorer", ["random", "magnitude", "snip", "grasp", "synflow"])
def test_each_scorer_reaches_the_compression_with_one_global_threshold(scorer):
    torch.manual_seed(0)
    model = models.build("vgg11", KWARGS)
    _, masks = scorers.score(model, scorer, 10.0, _batches(), input_shape=(1, 28, 28), rounds=10)
    kept, total = _total(masks)
    assert abs(kept - total / 10) <= 1 and set(masks) == {f"{n}.weight" for n in models.prunable_layers(model)}


def test_threshold_keeps_exactly_the_top_scores_across_layers():
    scores = {"a.weight": torch.tensor([0.1, 0.9, 0.5]), "b.weight": torch.tensor([[0.8, 0.2], [0.3, 0.7]])}
    masks = scorers.threshold(scores, 7 / 3)  # keep 3 of 7
    assert masks["a.weight"].tolist() == [False, True, False] and masks["b.weight"].tolist() == [
        [True, False],
        [False, True],
    ]


def test_synflow_scores_are_conserved_layer_by_layer():
    """Synaptic saliency conservation (Tanaka et al.): in a bias-free ReLU network every layer's SynFlow
    scores sum to the same R, the sum of the linearized network's outputs."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, bias=False),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, bias=False),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 10, bias=False),
    )
    scores, _ = scorers.synflow(net, 1.0, (1, 12, 12), rounds=1)
    sums = torch.tensor([float(s.double().sum()) for s in scores.values()])
    assert len(sums) == 3 and torch.allclose(sums, sums[0].expand(3), rtol=1e-5)


def _plain_synflow(model, compression, input_shape, rounds):
    """SynFlow as the paper states it, with no bookkeeping tricks: the reference for `scorers.synflow`.
    Its scores are over R, as the scorer's are: one scale for every weight, which ranks them the same."""
    net = scorers._linearized(model)
    weights = scorers._weights(net)
    magnitudes = {n: w.detach().clone() for n, w in weights.items()}
    masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    total = sum(w.numel() for w in weights.values())
    for k in range(1, rounds + 1):
        with torch.no_grad():
            for n, w in weights.items():
                w.copy_(magnitudes[n] * masks[n])
        net.zero_grad()
        flow = net(torch.ones(1, *input_shape, dtype=torch.float64)).sum()
        (flow / flow.detach()).backward()
        scores = {n: (w * w.grad).float() for n, w in weights.items()}
        keep = max(1, int(round(total / compression ** (k / rounds))))
        live = torch.cat([scores[n][masks[n]] for n in weights])
        if keep < live.numel():
            kth = live.sort(descending=True).values[keep - 1]
            masks = {n: masks[n] & (scores[n] >= kth) for n in weights}
    return scores, masks


@pytest.mark.parametrize("compression, rounds", [(50.0, 10), (8.0, 3)])
def test_synflow_matches_the_plain_algorithm(compression, rounds):
    torch.manual_seed(0)
    model = models.build("vgg11", KWARGS)
    scores, masks = scorers.synflow(model, compression, (1, 28, 28), rounds=rounds)
    want_scores, want_masks = _plain_synflow(model, compression, (1, 28, 28), rounds)
    assert list(masks) == list(want_masks)
    assert all(torch.equal(masks[n], want_masks[n]) for n in masks)
    assert all(torch.equal(scores[n], want_scores[n]) for n in scores)


def test_synflow_prunes_a_deep_network_at_full_width_whose_flow_overflows_float32():
    """ResNet-56 at width 1.0: R is about 4e50, past float32; scores over R stay finite and rank."""
    torch.manual_seed(0)
    model = models.build("resnet56", {**KWARGS, "width": 1.0})
    scores, masks = scorers.synflow(model, 4.0, (1, 28, 28), rounds=20)
    assert all(bool(torch.isfinite(s).all()) for s in scores.values())
    kept, total = _total(masks)
    assert abs(kept - total / 4) <= 1 and all(int(m.sum()) > 0 for m in masks.values())


def test_synflow_keeps_pruned_weights_pruned_when_live_scores_tie_at_zero():
    """Pruning can cut every path through a live weight, so its score falls to 0 like a pruned one's.
    In this network (found by search) the last round's threshold is 0: only live weights may be kept
    at it, as the plain algorithm does."""
    torch.manual_seed(7)
    net = nn.Sequential(
        nn.Linear(3, 3, bias=False), nn.ReLU(), nn.Linear(3, 3, bias=False), nn.ReLU(), nn.Linear(3, 2, bias=False)
    )
    scores, masks = scorers.synflow(net, 2.0, (3,), rounds=6)
    want_scores, want_masks = _plain_synflow(net, 2.0, (3,), 6)
    assert all(torch.equal(masks[n], want_masks[n]) for n in masks)
    assert all(torch.equal(scores[n], want_scores[n]) for n in scores)
    assert any(bool(((s == 0) & m).any()) for s, m in zip(scores.values(), masks.values()))  # a live 0


def test_iterative_synflow_never_collapses_a_layer_at_high_compression():
    """Layer collapse (a whole layer pruned away) is what iterative SynFlow was built to avoid."""
    torch.manual_seed(0)
    model = models.build("vgg11", KWARGS)
    _, masks = scorers.synflow(model, 100.0, (1, 28, 28), rounds=20)
    assert all(int(m.sum()) > 0 for m in masks.values())
    kept, total = _total(masks)
    assert abs(kept - total / 100) <= 1


def test_snip_is_the_weight_times_its_summed_gradient():
    torch.manual_seed(0)
    model = models.build("vgg11", KWARGS)
    batches = _batches()
    scores = scorers.snip_scores(model, batches)
    clone = models.build("vgg11", KWARGS)
    clone.load_state_dict(model.state_dict())
    clone.train()
    loss = sum(F.cross_entropy(clone(x), y) for x, y in batches)
    grad = torch.autograd.grad(loss, clone.classifier.weight)[0]
    assert torch.allclose(scores["classifier.weight"], (clone.classifier.weight * grad).abs(), atol=1e-6)


def test_grasp_uses_the_hessian_gradient_product():
    """H g from double backprop matches a finite difference of the gradient along g."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.Tanh(), nn.Linear(8, 10)).double()
    batches = [(x.double(), y) for x, y in _batches(1, 8)]
    scores = scorers.grasp_scores(net, batches)
    params = [net[1].weight, net[3].weight]
    x, y = batches[0]

    def grads(shift: float, direction):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p += shift * d
        g = torch.autograd.grad(F.cross_entropy(net(x), y), params)
        with torch.no_grad():
            for p, d in zip(params, direction):
                p -= shift * d
        return g

    g = grads(0.0, [torch.zeros_like(p) for p in params])
    eps = 1e-5
    hg = [(a - b) / (2 * eps) for a, b in zip(grads(eps, g), grads(-eps, g))]
    assert torch.allclose(scores["3.weight"], params[1].detach() * hg[1], rtol=1e-4, atol=1e-9)


def test_an_unknown_scorer_lists_the_known_ones():
    with pytest.raises(KeyError, match="known: grasp, magnitude, random, snip, synflow"):
        scorers.score(models.build("vgg11", KWARGS), "oracle", 2.0)


@pytest.mark.parametrize("size", [1000, 3_000_000])
def test_the_kth_largest_is_exact_with_ties_and_masked_entries(size):
    gen = torch.Generator().manual_seed(1)
    flat = torch.randint(0, 5000, (size,), generator=gen).float()  # many ties
    flat[torch.randperm(size, generator=gen)[: size // 3]] = -torch.inf  # masked weights
    for k in (1, size // 7, size // 2, size - size // 3):
        assert scorers._kth_largest(flat, k) == flat.sort(descending=True).values[k - 1]


def test_the_kth_largest_is_exact_over_a_mass_of_ties_at_the_bottom():
    """SynFlow's scores late in its rounds: most are pruned weights' zeros, the rest positive."""
    size = 3_000_000
    gen = torch.Generator().manual_seed(2)
    flat = torch.rand(size, generator=gen)
    flat[torch.randperm(size, generator=gen)[: size * 7 // 10]] = 0.0
    live = size - size * 7 // 10
    for k in (1, live // 2, live - 100, live, live + 1, live + 5000, size):
        assert scorers._kth_largest(flat, k) == flat.sort(descending=True).values[k - 1], k


@pytest.mark.parametrize(
    ("scorer", "compression", "batches", "message"),
    [
        ("snip", 4.0, [], "given none"),
        ("grasp", 4.0, [], "given none"),
        ("synflow", 0.5, [], "at least 1"),
        ("magnitude", 1e9, [], "out of reach"),
    ],
)
def test_impossible_requests_are_refused_before_any_work(scorer, compression, batches, message):
    with pytest.raises(scorers.PaIError, match=message):
        scorers.score(models.build("vgg11", KWARGS), scorer, compression, batches)
