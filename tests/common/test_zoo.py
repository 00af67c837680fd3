"""The zoo: every architecture builds and runs for both input shapes; MobileNetV2 is what it claims
(depthwise convs, residual adds, ReLU6, no conv biases) and survives a variant round trip after
channels are removed across its depthwise convs."""

import operator

import pytest
import torch
from helpers import spec_for
from torch import fx, nn

from common import architectures, models, variant

ZOO = ["vgg11", "vgg16", "resnet20", "resnet56", "mobilenetv2"]
SHAPES = [(1, 28), (3, 32)]
DEPTHWISE_CONVS, RESIDUAL_ADDS = 14, 7  # one depthwise conv per block; adds where stride 1 and in == out


def _depthwise(model: nn.Module) -> list[nn.Conv2d]:
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
        and m.groups > 1
        and m.groups == m.in_channels == m.out_channels
        and m.weight.shape[1] == 1
    ]


def _adds(model: nn.Module) -> int:
    graph = fx.symbolic_trace(model).graph
    return sum(1 for node in graph.nodes if node.op == "call_function" and node.target in (operator.add, torch.add))


def test_the_zoo_lists_exactly_these_architectures():
    assert sorted(models.MODELS) == sorted(ZOO)


@pytest.mark.parametrize("channels, size", SHAPES)
@pytest.mark.parametrize("arch", ZOO)
def test_every_architecture_builds_and_runs_at_quarter_width(arch, channels, size):
    torch.manual_seed(0)
    model = models.build(arch, {"in_channels": channels, "num_classes": 7, "input_size": size, "width": 0.25})
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(3, channels, size, size))
    assert out.shape == (3, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize("channels, size", SHAPES)
def test_mobilenetv2_has_depthwise_convs_and_residual_adds(channels, size):
    model = models.build("mobilenetv2", {"in_channels": channels, "input_size": size, "width": 0.25})
    assert len(_depthwise(model)) == DEPTHWISE_CONVS
    assert _adds(model) == RESIDUAL_ADDS
    assert sum(isinstance(m, architectures.InvertedResidual) and m.residual for m in model.modules()) == RESIDUAL_ADDS
    assert any(isinstance(m, nn.ReLU6) for m in model.modules())
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("channels, size", SHAPES)
def test_mobilenetv2_keeps_a_sensible_map_and_stays_small(channels, size):
    model = models.build("mobilenetv2", {"in_channels": channels, "input_size": size, "width": 1.0}).eval()
    with torch.no_grad():
        features = model.head(model.blocks(model.stem(torch.zeros(1, channels, size, size))))
    assert tuple(features.shape[-2:]) == (4, 4)  # three downsamplings: 28 -> 4 and 32 -> 4
    assert models.count_params(model) < 2_000_000
    assert models.count_params(models.build("mobilenetv2", {"width": 0.5})) < 600_000


def _shrunk_mobilenetv2() -> tuple[nn.Module, dict]:
    """A consistent compact mobilenetv2: torch-pruning removes channels of every group (expand groups
    through their depthwise convs, and the residual chains), with BatchNorm statistics that matter."""
    import torch_pruning as tp

    torch.manual_seed(0)
    kwargs = {"in_channels": 3, "num_classes": 10, "input_size": 32, "width": 0.25}
    model = models.build("mobilenetv2", kwargs).eval()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, 3, 32, 32))
    for group in list(graph.get_all_groups(ignored_layers=[model.classifier])):
        n = len(group[0].idxs)
        if n > 2:
            graph.get_pruning_group(group[0].dep.target.module, group[0].dep.handler, list(range(0, n, 3))).prune()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.bias.uniform_(-0.5, 0.5)
    return model, kwargs


def test_shrunk_mobilenetv2_round_trips_through_a_variant_file(tmp_path):
    model, kwargs = _shrunk_mobilenetv2()
    base = models.build("mobilenetv2", kwargs)
    assert models.count_params(model) < models.count_params(base)
    shrunk = _depthwise(model)
    assert len(shrunk) == DEPTHWISE_CONVS
    assert any(c.out_channels < b.out_channels for c, b in zip(shrunk, _depthwise(base), strict=True))
    path = tmp_path / "v.safetensors"
    sha = variant.save(model, spec_for("mobilenetv2", kwargs), path)
    loaded = variant.load(path, expected_sha256=sha).model
    rebuilt = _depthwise(loaded)
    assert [c.out_channels for c in rebuilt] == [c.out_channels for c in shrunk]
    assert all(c.groups == c.in_channels == c.out_channels for c in rebuilt)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert models.count_params(loaded) == models.count_params(model)


def test_depthwise_conv_with_grouped_weights_in_the_file_is_refused():
    model, kwargs = _shrunk_mobilenetv2()
    conv = model.blocks[1].conv[3]  # depthwise in the base
    channels = conv.out_channels
    conv.weight = nn.Parameter(torch.randn(channels, 2, 3, 3))
    with pytest.raises(variant.VariantError, match="depthwise conv 'blocks.1.conv.3'"):
        variant.load_bytes(variant.encode(model, spec_for("mobilenetv2", kwargs)))
