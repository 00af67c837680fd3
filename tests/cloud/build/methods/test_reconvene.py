"""`reconvene`: sensitivity decisions, structured pruning of insensitive groups, the rectifier, the
composite model's fixed masks, and a portfolio built with it."""

import json

import pytest
import torch
from torch import nn

from cloud.build import portfolio, reference
from cloud.build.compaction import channels
from cloud.build.methods import reconvene, sensitivity
from cloud.build.store import PortfolioStore
from cloud.build.train import TrainConfig, train
from cloud.cli.main import main
from common import datasets, models, variant

KW28 = {"in_channels": 1, "input_size": 28, "num_classes": 10}


def _example(shape=(1, 28, 28)) -> torch.Tensor:
    return torch.randn(1, *shape, generator=torch.Generator().manual_seed(3))


def _weights(model: nn.Module) -> int:
    return sum(layer.weight.numel() for layer in models.prunable_layers(model).values())


@pytest.mark.parametrize(("arch", "width"), [("vgg11", 0.25), ("resnet20", 0.5), ("mobilenetv2", 0.5)])
def test_the_composite_model_stays_within_the_budget_and_runs(arch, width):
    torch.manual_seed(0)
    dense = models.build(arch, {**KW28, "width": width})
    pruned = reconvene.prune(dense, "synflow", 32.0, _example(), rounds=20, coverage=0.0)  # shrink every sparse group
    total = _weights(dense)
    assert pruned.remaining_weights == pytest.approx(total / 32, abs=1)
    # every insensitive group may round its channel count up by one filter per writer
    slack = sum(
        max(layer.weight[0].numel() for layer in models.prunable_layers(dense).values()) for _ in pruned.decisions
    )
    assert pruned.weights <= pruned.remaining_weights + slack
    assert models.count_params(pruned.model) < models.count_params(dense) / 8
    assert any(d.insensitive and d.kept < d.channels for d in pruned.decisions)
    out = pruned.model.eval()(torch.randn(4, 1, 28, 28))
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    for name, mask in pruned.masks.items():  # fixed masks name the composite model's own tensors
        assert mask.shape == pruned.model.state_dict()[name].shape
        assert not pruned.model.state_dict()[name][~mask].any()


def test_insensitive_groups_keep_what_their_budget_supports_by_score_mass():
    torch.manual_seed(0)
    net = _two_convs()
    masks = {
        "0.weight": torch.ones(8, 1, 3, 3, dtype=torch.bool),  # dense: sensitive
        "3.weight": torch.zeros(8, 8, 3, 3, dtype=torch.bool),
        "8.weight": torch.ones(10, 8, dtype=torch.bool),
    }
    masks["3.weight"][[1, 4, 6], :2] = True  # 3 filters x 2 inputs x 9 = 54 weights: 54 / 72 -> 1 channel
    scores = {name: torch.ones(m.shape) for name, m in masks.items()}
    scores["3.weight"][4] = 5.0  # channel 4 carries the most surviving score
    analysis = channels.analyse(channels.trace(net, torch.randn(1, 1, 8, 8), None))
    decisions, keep = sensitivity.decide(net, masks, scores, analysis, threshold=0.25, coverage=0.0)
    by_group = {d.group: d for d in decisions}
    assert not by_group["0"].insensitive and by_group["0"].kept == 8
    assert by_group["3"].insensitive and by_group["3"].kept == 1 and keep["3"].tolist() == [4]
    assert "keeps 1 of 8 channels, holding 0.33 of its surviving weights" in by_group["3"].reason
    # the one channel would hold a third of what the mask kept there: at the default it stays masked
    decisions, _ = sensitivity.decide(net, masks, scores, analysis, threshold=0.25)
    group = {d.group: d for d in decisions}["3"]
    assert not group.insensitive and "would hold less than 0.8" in group.reason


def _two_convs() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


def test_a_group_whose_surviving_weights_sit_in_few_channels_is_shrunk_to_them():
    net = _two_convs()
    masks = {
        "0.weight": torch.ones(8, 1, 3, 3, dtype=torch.bool),
        "3.weight": torch.zeros(8, 8, 3, 3, dtype=torch.bool),
        "8.weight": torch.ones(10, 8, dtype=torch.bool),
    }
    masks["3.weight"][4, :6] = True  # 54 weights, all in filter 4: the 1 channel they buy holds them all
    scores = {name: torch.ones(m.shape) for name, m in masks.items()}
    analysis = channels.analyse(channels.trace(net, torch.randn(1, 1, 8, 8), None))
    decisions, keep = sensitivity.decide(net, masks, scores, analysis, threshold=0.25)
    group = {d.group: d for d in decisions}["3"]
    assert group.insensitive and group.kept == 1 and keep["3"].tolist() == [4]
    assert "holding 1.00 of its surviving weights" in group.reason


def test_the_budget_counts_only_the_live_inputs_of_a_masked_group():
    """Surgery removes a masked group's dead channels, so a channel reading it costs only its live inputs."""
    net = _two_convs()
    masks = {
        "0.weight": torch.zeros(8, 1, 3, 3, dtype=torch.bool),
        "3.weight": torch.zeros(8, 8, 3, 3, dtype=torch.bool),
        "8.weight": torch.ones(10, 8, dtype=torch.bool),
    }
    masks["0.weight"][:4] = True  # density 0.5 (masked), channels 4 to 7 dead
    masks["3.weight"][[4, 6], :3] = True  # 54 weights over 4 live inputs of 9 each: 2 channels
    scores = {name: torch.ones(m.shape) for name, m in masks.items()}
    analysis = channels.analyse(channels.trace(net, torch.randn(1, 1, 8, 8), None))
    decisions, keep = sensitivity.decide(net, masks, scores, analysis, threshold=0.25)
    by_group = {d.group: d for d in decisions}
    assert not by_group["0"].insensitive
    assert by_group["3"].insensitive and by_group["3"].kept == 2 and keep["3"].tolist() == [4, 6]


def test_threshold_zero_is_the_unstructured_model_and_one_prunes_every_sparse_group():
    torch.manual_seed(0)
    dense = models.build("vgg11", {**KW28, "width": 0.25})
    none = reconvene.prune(dense, "magnitude", 8.0, _example(), threshold=0.0)
    assert not any(d.insensitive for d in none.decisions) and none.rectified == ()
    assert models.count_params(none.model) == models.count_params(dense)
    assert {n: m.tolist() for n, m in none.masks.items()} == {n: m.tolist() for n, m in none.unstructured.items()}
    every = reconvene.prune(dense, "magnitude", 8.0, _example(), threshold=1.0, coverage=0.0)
    assert all(d.insensitive for d in every.decisions if d.density < 1.0)


def test_the_rectifier_reinitializes_reshaped_layers_for_their_new_fan_in():
    torch.manual_seed(0)
    dense = models.build("vgg11", {**KW28, "width": 0.25})
    pruned = reconvene.prune(dense, "synflow", 64.0, _example(), rounds=20, coverage=0.0)
    layers = models.prunable_layers(pruned.model)
    assert pruned.rectified
    for name in pruned.rectified:
        weight = layers[name].weight.detach()
        fan_in = weight[0].numel()
        bound = 1 / fan_in**0.5  # PyTorch's default: kaiming_uniform(a=sqrt(5)) on the layer's new shape
        mask = pruned.masks.get(f"{name}.weight")
        live = weight[mask] if mask is not None else weight.flatten()
        assert live.abs().max() <= bound + 1e-6
        assert live.abs().max() >= 0.5 * bound or live.numel() < 8
    untouched = [n for n in layers if n not in pruned.rectified]
    for name in untouched:  # the scored initialization itself, under its mask (less any dead channels)
        expected = models.prunable_layers(dense)[name].weight.detach()
        mask = pruned.masks.get(f"{name}.weight")
        weight = layers[name].weight.detach()
        if weight.shape == expected.shape:
            assert torch.equal(weight, expected * (mask if mask is not None else 1))
        else:
            assert mask is not None and torch.isin(weight[mask], expected).all()


def test_residual_stages_lose_the_same_channels_in_every_member():
    torch.manual_seed(0)
    dense = models.build("resnet20", {**KW28, "width": 0.5})
    pruned = reconvene.prune(dense, "synflow", 32.0, _example(), threshold=0.25, rounds=20, coverage=0.0)
    stages = [d for d in pruned.decisions if len(d.writers) > 1 and d.insensitive and d.kept < d.channels]
    assert stages, "expected a residual stage to be pruned structurally at 32x"
    layers = models.prunable_layers(pruned.model)
    for stage in stages:
        assert {layers[w].weight.shape[0] for w in stage.writers} == {stage.kept}


def test_fixed_masks_survive_training(fashion_mnist):
    data = datasets.Dataset(
        fashion_mnist.info, fashion_mnist.train.subset(256, 0), fashion_mnist.val, fashion_mnist.test
    )
    torch.manual_seed(0)
    pruned = reconvene.prune(models.build("vgg11", {**KW28, "width": 0.125}), "synflow", 16.0, _example(), rounds=10)
    trained = train(
        pruned.model, data.info, data.train, TrainConfig(epochs=1, batch_size=64, progress=False), masks=pruned.masks
    )
    state = trained.state_dict()
    assert pruned.masks and all(not state[name][~mask].any() for name, mask in pruned.masks.items())


def test_layer_collapse_is_refused_before_training():
    torch.manual_seed(0)
    dense = models.build("vgg11", {**KW28, "width": 0.25})
    with torch.no_grad():
        dense.features[4].weight.mul_(1e-6)  # magnitude ranks this whole layer last
    with pytest.raises(reconvene.ReconveneError, match="layer features.4 .*layer collapse"):
        reconvene.prune(dense, "magnitude", 8.0, _example())


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--compressions", "0.5"], "compressions must be >= 1"),
        (["--compressions", "1e9"], "out of reach"),
        (["--scorer", "oracle"], "unknown scorer 'oracle'"),
        (["--sensitivity-coverage", "1.5"], "coverage is a share in [0, 1]"),
    ],
)
def test_bad_reconvene_requests_fail_before_any_training(tmp_path, capsys, args, needle):
    argv = ["portfolio", "build", "--method", "reconvene", "--subset", "64", "--out", str(tmp_path / "p"), *args]
    try:
        code = main(argv)
    except SystemExit as exit_:  # refused by the parser
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and needle in err, err
    assert not list((tmp_path / "p").glob("work/reconvene-*.pt"))


def test_a_reconvene_portfolio_builds_and_its_variants_load_as_any_other(tmp_path, fashion_mnist):
    config = portfolio.BuildConfig(
        out=tmp_path / "p",
        method="reconvene",
        model="vgg11",
        width=0.125,
        subset=512,
        check_images=32,
        train=TrainConfig(epochs=1, batch_size=64, progress=False),
        method_settings=reconvene.ReconveneConfig(scorer="snip", compressions=(2.0, 16.0), score_batches=2),
    )
    manifest = portfolio.build(config)
    assert [round(v.compression, 6) for v in manifest.variants] == [2.0, 16.0]
    assert [v.name for v in manifest.variants] == ["vgg11-snip-2x", "vgg11-snip-16x"]
    assert manifest.method == "reconvene" and manifest.variants[1].params < manifest.variants[0].params
    store = PortfolioStore(tmp_path / "p")
    images = datasets.normalize(fashion_mnist.test.images[:8], fashion_mnist.info.mean, fashion_mnist.info.std)
    for entry in manifest.variants:
        assert entry.accuracy == entry.sparse_accuracy  # surgery of the trained composite model is exact
        loaded = variant.load(store.variant_path(entry.variant_id), entry.variant_id)
        assert loaded.spec.method == "reconvene" and models.count_params(loaded.model) == entry.params
        assert loaded.model(images).shape == (8, 10)
    decisions = json.loads((tmp_path / "p" / "work" / "reconvene-decisions.json").read_text())
    assert [d["compression"] for d in decisions] == [2.0, 16.0]
    assert all(
        {"group", "density", "kept", "channels", "insensitive", "reason"} <= set(g) for g in decisions[1]["groups"]
    )
    settings = json.loads((tmp_path / "p" / "work" / "settings.json").read_text())
    assert settings["method"] == "reconvene" and settings["method_settings"]["scorer"] == "snip"
    # no level of reconvene is dense: the build trained the dense architecture to compare with
    dense = manifest.dense
    assert (dense.trained_by_build, dense.epochs, dense.level) == (True, 1, None)
    assert dense.params == models.count_params(models.build("vgg11", models.zoo_kwargs((1, 28, 28), 10, 0.125)))
    assert (tmp_path / "p" / "work" / reference.CHECKPOINT).is_file()
    for entry in manifest.variants:
        assert entry.acc_delta_pp == pytest.approx(100 * (entry.accuracy - dense.accuracy))
        assert entry.speedup_b32 == dense.latency_ms_b32 / entry.latency_ms_b32
        assert entry.macs_ratio == dense.macs / entry.macs
    assert manifest.variants[1].macs_ratio > 1
