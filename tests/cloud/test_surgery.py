"""Surgery removes dead channels and changes no output (properties over zoo models and random masks)."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cloud import surgery
from common import models, variant
from conftest import spec_for

X = torch.zeros(1, 1, 28, 28)


def _build(arch: str, width: float = 0.25) -> nn.Module:
    torch.manual_seed(0)
    model = models.build(arch, {"in_channels": 1, "input_size": 28, "num_classes": 10, "width": width})
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # trained-looking statistics, nonzero biases
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def _bn_after(model: nn.Module) -> dict[nn.Module, nn.Module]:
    from cloud.masks import conv_batchnorm_pairs

    named = dict(model.named_modules())
    return {named[c]: named[b] for c, b in conv_batchnorm_pairs(model, X).items()}


def _kill_filters(model: nn.Module, share: float, seed: int, zero_bn: bool = True) -> None:
    """Zero whole filters (and, like the pruning masks, their BatchNorm affine parameters)."""
    gen = torch.Generator().manual_seed(seed)
    pairs = _bn_after(model)
    with torch.no_grad():
        for conv, bn in pairs.items():
            dead = torch.rand(conv.out_channels, generator=gen) < share
            conv.weight[dead] = 0
            if zero_bn:
                bn.weight[dead] = 0
                bn.bias[dead] = 0


def _zero_unstructured(model: nn.Module, share: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight[torch.rand(m.weight.shape, generator=gen) < share] = 0


def _assert_equal_outputs(a: nn.Module, b: nn.Module) -> None:
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert (ya - yb).abs().max() <= 1e-4
    assert torch.equal(ya.argmax(1), yb.argmax(1))


@pytest.mark.parametrize("arch", ["vgg11", "resnet20"])
def test_dead_filters_are_removed_exactly_and_survive_the_variant_file(arch):
    model = _build(arch)
    _kill_filters(model, 0.4, seed=1)
    _zero_unstructured(model, 0.5, seed=2)
    before = copy.deepcopy(model.state_dict())
    compact, report = surgery.compact(model, X, check_inputs=torch.randn(8, 1, 28, 28))
    assert report.params_after < report.params_before and report.channels_removed > 0
    assert report.max_abs_diff <= 1e-4 and report.argmax_agreement == 1.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # argument untouched
    _assert_equal_outputs(model, compact)
    rebuilt = variant.load_bytes(variant.encode(compact, spec_for(arch, {"width": 0.25}))).model
    _assert_equal_outputs(model, rebuilt)


def test_channels_read_by_nobody_are_removed():
    model = _build("vgg11")
    with torch.no_grad():
        model.features[4].weight[:, [1, 3]] = 0  # second conv ignores channels 1 and 3 of the first
    dead = surgery.find_dead_channels(model, X)
    assert dead["features.0"] == [1, 3]
    compact, _ = surgery.compact(model, X)
    assert compact.features[0].out_channels == model.features[0].out_channels - 2
    _assert_equal_outputs(model, compact)


def test_a_dead_filter_whose_batchnorm_emits_a_constant_is_kept():
    model = _build("vgg11")
    with torch.no_grad():
        model.features[0].weight[2] = 0  # BatchNorm bias stays nonzero: the channel emits a constant
        model.features[1].bias[2] = 0.3
    assert "features.0" not in surgery.find_dead_channels(model, X)
    compact, _ = surgery.compact(model, X)
    _assert_equal_outputs(model, compact)


def _stage_convs(model):
    """The convs that write into ResNet's second stage residual stream (block outputs + projection)."""
    return [model.layers[i].conv2 for i in (3, 4, 5)] + [model.layers[3].shortcut[0]], \
           [model.layers[i].bn2 for i in (3, 4, 5)] + [model.layers[3].shortcut[1]]


def test_a_residual_channel_goes_only_when_dead_in_every_member():
    model = _build("resnet20")
    convs, bns = _stage_convs(model)
    with torch.no_grad():
        for conv, bn in zip(convs, bns):
            conv.weight[0] = 0
            bn.weight[0] = bn.bias[0] = 0
        for conv, bn in zip(convs[:-1], bns[:-1]):  # channel 1 dead everywhere but the shortcut
            conv.weight[1] = 0
            bn.weight[1] = bn.bias[1] = 0
    dead = surgery.find_dead_channels(model, X)
    (stage_dead,) = [v for k, v in dead.items() if k.startswith(("layers.3.shortcut", "layers.3.conv2",
                                                                   "layers.4.conv2", "layers.5.conv2"))]
    assert stage_dead == [0]
    compact, _ = surgery.compact(model, X)
    assert compact.layers[3].shortcut[0].out_channels == model.layers[3].shortcut[0].out_channels - 1
    _assert_equal_outputs(model, compact)


def test_a_layer_with_every_channel_dead_still_gives_a_working_model():
    model = _build("vgg11")
    with torch.no_grad():
        model.features[8].weight.zero_()
        model.features[9].weight.zero_()
        model.features[9].bias.zero_()
    compact, _ = surgery.compact(model, X)
    assert compact.features[8].out_channels == 1
    _assert_equal_outputs(model, compact)


def test_an_input_that_does_not_fit_is_a_clear_error():
    with pytest.raises(surgery.SurgeryError, match="cannot trace VGG"):
        surgery.compact(_build("vgg11"), torch.zeros(1, 3, 28, 28))


def test_a_model_without_prunable_layers_is_refused():
    with pytest.raises(surgery.SurgeryError, match="no conv or linear"):
        surgery.compact(nn.Sequential(nn.ReLU()), X)


def test_an_op_that_breaks_zero_is_not_trusted():
    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.conv2(torch.sigmoid(self.conv1(x))).mean((2, 3)))

    model = Shifted().eval()
    with torch.no_grad():
        model.conv1.weight[1] = 0
        model.conv1.bias[1] = 0  # emits 0, but sigmoid(0) = 0.5 reaches conv2
    assert "conv1" not in surgery.find_dead_channels(model, X)
    _assert_equal_outputs(model, surgery.compact(model, X)[0])


@settings(max_examples=12, deadline=None)
@given(arch=st.sampled_from(["vgg11", "resnet20"]), width=st.sampled_from([0.125, 0.25]),
       filters=st.floats(0.0, 0.9), unstructured=st.floats(0.0, 0.99), zero_bn=st.booleans(),
       seed=st.integers(0, 10_000))
def test_random_masks_give_an_equal_compact_model(arch, width, filters, unstructured, zero_bn, seed):
    model = _build(arch, width)
    _kill_filters(model, filters, seed, zero_bn)
    _zero_unstructured(model, unstructured, seed + 1)
    compact, report = surgery.compact(model, X)
    assert report.params_after <= report.params_before
    _assert_equal_outputs(model, compact)
