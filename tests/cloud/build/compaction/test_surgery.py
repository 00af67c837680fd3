"""Surgery removes exactly the provably dead channels and changes no output (zoo models, random masks)."""

import copy

import pytest
import torch
from helpers import spec_for
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from cloud.build.compaction import channels, surgery
from cloud.build.methods.masks import conv_batchnorm_pairs
from common import models, variant

X = torch.zeros(1, 1, 28, 28)


def _trained_looking(model: nn.Module, sample_shape=(1, 28, 28), seed: int = 0) -> nn.Module:
    """Random BatchNorm affine parameters, and statistics of the model's own activations on random
    inputs, as after training: every layer passes a signal on, so a wrong removal shows in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in norms:
            bn.weight.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
            bn.bias.copy_(torch.rand(bn.num_features, generator=gen) - 0.5)
        return _calibrated(model, sample_shape, gen)


def _calibrated(model: nn.Module, sample_shape, gen: torch.Generator | None = None) -> nn.Module:
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # a plain average over the calibration batch
    model.train()
    with torch.no_grad():
        model(torch.randn(64, *sample_shape, generator=gen))
    for bn in norms:
        bn.momentum = 0.1
    return model.eval()


def _build(arch: str, width: float = 0.25) -> nn.Module:
    torch.manual_seed(0)
    return _trained_looking(models.build(arch, {"in_channels": 1, "input_size": 28, "num_classes": 10, "width": width}))


def _mask(
    model: nn.Module,
    x: torch.Tensor,
    seed: int,
    filters: float = 0.3,
    reads: float = 0.2,
    unstructured: float = 0.5,
    zero_bn: bool = True,
) -> None:
    """Kill whole filters (and, like the pruning masks, their BatchNorm weight and bias), zero whole
    input slices of readers, and zero single weights at random."""
    gen = torch.Generator().manual_seed(seed)
    named = dict(model.named_modules())
    with torch.no_grad():
        for conv_name, bn_name in conv_batchnorm_pairs(model, x).items():
            dead = torch.rand(named[conv_name].out_channels, generator=gen) < filters
            named[conv_name].weight[dead] = 0
            if zero_bn:
                named[bn_name].weight[dead] = 0
                named[bn_name].bias[dead] = 0
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight[:, torch.rand(m.weight.shape[1], generator=gen) < reads] = 0
                m.weight[torch.rand(m.weight.shape, generator=gen) < unstructured] = 0
    _calibrated(model, x.shape[1:], gen)  # statistics of the sparse model, as training it would give


def _assert_same_outputs(a: nn.Module, b: nn.Module, sample_shape=(1, 28, 28)) -> None:
    """Equal outputs, compared in float64: random sparse models with BatchNorm over near-constant
    channels amplify float32 rounding until a model disagrees with itself between batch sizes."""
    x = torch.randn(16, *sample_shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    with torch.no_grad():
        ya, yb = copy.deepcopy(a).double()(x), copy.deepcopy(b).double()(x)
    assert (ya - yb).abs().max() <= 1e-4
    assert torch.equal(ya.argmax(1), yb.argmax(1))


def _well_conditioned(model: nn.Module, sample_shape) -> bool:
    """Does the model agree with itself between batch sizes and between float32 and float64? Random
    masks can leave a BatchNorm over a constant channel (running variance 0) that multiplies rounding
    by 1/sqrt(eps) per layer; such a model cannot be checked to 1e-4 by any rewrite (a folded bias is
    rounded to float32, and in float64 the constant no longer cancels its float32 running mean), and
    surgery refuses it (see test_an_ill_conditioned_model_is_refused_not_emitted)."""
    x = torch.randn(8, *sample_shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole, single = model(x), torch.cat([model(x[i : i + 1]) for i in range(len(x))])
        wide = copy.deepcopy(model).double()(x.double()).float()
    return float((whole - single).abs().max()) <= 1e-5 and float((whole - wide).abs().max()) <= 1e-5


def _out_channels(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


@pytest.mark.parametrize("arch", ["vgg11", "resnet20"])
def test_dead_channels_are_removed_exactly_and_survive_the_variant_file(arch):
    model = _build(arch)
    _mask(model, X, seed=1)
    compact, report = surgery.compact(model, X, check_inputs=torch.randn(8, 1, 28, 28))
    assert report.params_after < report.params_before == models.count_params(model)
    assert report.params_after == models.count_params(compact)
    assert 0 < report.channels_removed == sum(report.removed_by_group.values()) < report.channels_before
    assert report.max_abs_diff <= 1e-4 and report.argmax_agreement == 1.0 and not report.skipped_groups
    _assert_same_outputs(model, compact)
    assert surgery.find_dead_channels(compact, X) == {}  # nothing provably dead is left
    rebuilt = variant.load_bytes(variant.encode(compact, spec_for(arch, {"width": 0.25}))).model
    assert _out_channels(rebuilt) == _out_channels(compact)
    _assert_same_outputs(model, rebuilt)


def test_channels_nobody_reads_are_removed_also_through_a_flatten():
    torch.manual_seed(0)
    model = _trained_looking(models.VGG([8, "M", 12, "M"], 1, 10, 28, 1.0))  # ends in 12 x 7 x 7 features
    with torch.no_grad():
        model.features[4].weight[:, [1, 3]] = 0  # the second conv ignores channels 1 and 3 of the first
        model.classifier.weight.view(10, 12, 49)[:, 5] = 0  # the classifier ignores channel 5's 49 features
    assert surgery.find_dead_channels(model, X) == {"features.0": [1, 3], "features.4": [5]}
    compact, _ = surgery.compact(model, X)
    assert compact.features[0].out_channels == 6 and compact.classifier.in_features == 11 * 49
    _assert_same_outputs(model, compact)


@pytest.mark.parametrize(
    "weight, bias, mean, removable",
    [
        (0.0, 0.0, 0.3, True),
        (1.0, 0.0, 0.0, True),
        (1.0, 0.0, 0.3, True),  # emits 0, 0, a negative cut by ReLU
        (0.0, 0.3, 0.0, False),
        (1.0, 0.0, -0.3, False),
    ],
)  # emits a positive constant into a padded 3x3 conv
def test_a_dead_filter_goes_only_if_its_channel_emits_exactly_zero_after_relu(weight, bias, mean, removable):
    model = _build("vgg11")
    bn = model.features[1]
    with torch.no_grad():
        model.features[0].weight[2] = 0
        bn.weight[2], bn.bias[2], bn.running_mean[2] = weight, bias, mean
    assert ("features.0" in surgery.find_dead_channels(model, X)) == removable
    compact, _ = surgery.compact(model, X)
    assert compact.features[0].out_channels == model.features[0].out_channels - removable
    _assert_same_outputs(model, compact)


def test_constant_channels_fold_into_linear_readers_and_negative_ones_die_at_relu():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 13 * 13, 12),
        nn.BatchNorm1d(12),
        nn.ReLU(),
        nn.Linear(12, 10),
    ).eval()
    with torch.no_grad():
        model[0].weight[[1, 2]] = 0
        model[0].bias[1], model[0].bias[2] = 0.0, 0.5  # filter 2 emits 0.5 everywhere: a constant
        model[4].weight[[3, 4, 5]] = 0
        model[4].bias[[3, 4, 5]] = torch.tensor([0.0, 0.0, 0.0])
        model[5].running_mean[4] = 0.7  # BatchNorm1d emits -0.7 / std for hidden unit 4: ReLU zeroes it
        model[5].running_mean[5] = -0.7  # ... and +0.7 / std for unit 5: a constant the last layer absorbs
    assert surgery.find_dead_channels(model, X) == {"0": [1, 2], "4": [3, 4, 5]}
    compact, report = surgery.compact(model, X)
    assert compact[0].out_channels == 4 and compact[4].in_features == 4 * 169 and compact[4].out_features == 9
    assert report.folded == 2 and report.exact  # 169 features of channel 2 into layer 4; unit 5 into layer 7
    _assert_same_outputs(model, compact)


def test_a_constant_meeting_a_padded_conv_stays_unless_approximate():
    model = _Odd("sigmoid").eval()  # sigmoid(0) = 0.5 reaches conv2, a padded 3x3 conv
    with torch.no_grad():
        model.conv1.weight[1], model.conv1.bias[1] = 0, 0
    compact, report = surgery.compact(model, X)
    assert compact.conv1.out_channels == 4 and not report.skipped_groups and report.exact
    rough, report = surgery.compact(model, X, approximate=True)
    assert rough.conv1.out_channels == 3 and report.folded == report.inexact_folds == 1 and not report.exact
    assert 1e-4 < report.max_abs_diff < 1.0  # wrong only along the border, and said so


def _stage2_writers(model):
    """(conv, bn) pairs that write ResNet-20's second-stage residual stream: block outputs and projection."""
    blocks = [model.layers[i] for i in (3, 4, 5)]
    return [(b.conv2, b.bn2) for b in blocks] + [(blocks[0].shortcut[0], blocks[0].shortcut[1])]


def test_a_residual_channel_goes_only_when_dead_in_every_writer():
    model = _build("resnet20")
    writers = _stage2_writers(model)
    with torch.no_grad():
        for i, (conv, bn) in enumerate(writers):  # channel 0 dead everywhere, channel 1 alive in the projection
            dead = [0, 1] if i < len(writers) - 1 else [0]
            conv.weight[dead] = 0
            bn.weight[dead] = bn.bias[dead] = 0
    (stage,) = [v for k, v in surgery.find_dead_channels(model, X).items() if k in _names(model, writers)]
    assert stage == [0]
    compact, _ = surgery.compact(model, X)
    assert all(compact.layers[i].conv2.out_channels == 7 for i in (3, 4, 5))
    _assert_same_outputs(model, compact)


def test_a_residual_channel_goes_only_when_every_reader_ignores_it():
    model = _build("resnet20")  # the last stage's stream is read by blocks 7 and 8 and by the classifier
    readers = [model.layers[7].conv1, model.layers[8].conv1, model.fc]
    with torch.no_grad():
        for layer in readers:
            layer.weight[:, 4] = 0
        for layer in readers[:-1]:  # channel 5: the classifier still reads it
            layer.weight[:, 5] = 0
    compact, report = surgery.compact(model, X)
    assert compact.fc.in_features == model.fc.in_features - 1 and report.channels_removed == 1
    _assert_same_outputs(model, compact)


def _names(model, pairs):
    names = {m: n for n, m in model.named_modules()}
    return {names[conv] for conv, _ in pairs}


def test_a_removed_reader_can_leave_its_inputs_unread():
    model = _build("vgg11")
    with torch.no_grad():
        model.features[8].weight[:, 5] = 0  # filter 5 of the second conv is read by nobody ...
        model.features[4].weight[:, 3] = 0  # ... and is the only reader of the first conv's channel 3
        model.features[4].weight[5, 3] = 1.0
    compact, report = surgery.compact(model, X)
    assert report.removed_by_group == {"features.4": 1, "features.0": 1}
    _assert_same_outputs(model, compact)


@pytest.mark.parametrize("arch", ["vgg11", "resnet20"])
def test_a_layer_with_every_channel_dead_still_gives_a_working_model(arch):
    model = _build(arch)
    writers = [(model.features[8], model.features[9])] if arch == "vgg11" else _stage2_writers(model)
    with torch.no_grad():
        for conv, bn in writers:
            conv.weight.zero_()
            bn.weight.zero_()
            bn.bias.zero_()
    compact, _ = surgery.compact(model, X)
    assert all(dict(compact.named_modules())[n].out_channels == 1 for n in _names(model, writers))
    _assert_same_outputs(model, compact)


def test_the_argument_is_never_modified():
    model = _build("resnet20")
    _mask(model, X, seed=3)
    model.train()
    before = copy.deepcopy(model.state_dict())
    params = [id(p) for p in model.parameters()]
    surgery.find_dead_channels(model, X)
    surgery.compact(model, X)
    assert all(m.training for m in model.modules())
    assert [id(p) for p in model.parameters()] == params
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_inputs_are_clear_errors():
    with pytest.raises(surgery.SurgeryError, match="cannot trace VGG with input of shape"):
        surgery.compact(_build("vgg11"), torch.zeros(1, 3, 28, 28))
    with pytest.raises(surgery.SurgeryError, match="check inputs have samples of shape"):
        surgery.compact(_build("vgg11"), X, check_inputs=torch.zeros(4, 1, 32, 32))
    with pytest.raises(surgery.SurgeryError, match="no conv or linear"):
        surgery.compact(nn.Sequential(nn.ReLU()), X)
    with pytest.raises(surgery.SurgeryError, match="classifier Linear is not a module of VGG"):
        surgery.compact(_build("vgg11"), X, classifier=nn.Linear(2, 2))


class _Odd(nn.Module):
    """conv1 feeds an op that surgery must not trust; conv2 is read plainly by the classifier."""

    def __init__(self, op: str):
        super().__init__()
        self.op = op
        self.conv1, self.side = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 4, 3, padding=1)
        self.conv2, self.fc = nn.Conv2d(8 if op == "cat" else 4, 4, 3, padding=1), nn.Linear(4, 2)

    def forward(self, x):
        h = self.conv1(x)
        h = {
            "sigmoid": torch.sigmoid(h),
            "softmax": torch.softmax(h, 1),
            "plus_one": h + 1,
            "channel_mean": h - h.mean(1, keepdim=True),
            "cat": torch.cat([h, self.side(x)], 1),
        }[self.op]
        return self.fc(self.conv2(h).mean((2, 3)))


@pytest.mark.parametrize("op", ["softmax", "plus_one", "channel_mean"])
def test_a_group_with_an_untrusted_op_is_left_alone(op):
    model = _Odd(op).eval()
    with torch.no_grad():
        model.conv1.weight[1] = 0
        model.conv1.bias[1] = 0  # emits 0, but what reaches conv2 depends on the other channels
    compact, report = surgery.compact(model, X)
    assert "conv1" in report.skipped_groups and compact.conv1.out_channels == 4
    _assert_same_outputs(model, compact)


def test_a_dead_channel_of_a_concatenated_branch_goes_from_the_concat_and_its_reader():
    model = _Odd("cat").eval()  # conv2 reads cat([conv1, side]): conv1 is channels 0-3, side 4-7
    with torch.no_grad():
        model.conv1.weight[1], model.conv1.bias[1] = 0, 0  # emits zero
        model.side.weight[2], model.side.bias[2] = 0, 0.7  # emits 0.7: conv2 is a padded 3x3, so it stays
        model.conv2.weight[:, 4 + 3] = 0  # conv2 ignores side's channel 3
    compact, report = surgery.compact(model, X)
    assert not report.skipped_groups and report.removed_by_group == {"conv1": 1, "side": 1}
    assert compact.conv1.out_channels == 3 and compact.side.out_channels == 3 and compact.conv2.in_channels == 6
    _assert_same_outputs(model, compact)


def test_a_wrong_claim_is_caught_and_names_the_group(monkeypatch):
    model = _build("vgg11")
    with torch.no_grad():
        model.features[0].weight[2] = 0  # its BatchNorm emits 0.5: not dead
        model.features[1].bias[2], model.features[1].running_mean[2] = 0.5, 0.0
    before = copy.deepcopy(model.state_dict())
    monkeypatch.setattr(channels, "_foldable", lambda module: True)  # wrong for features.4, a padded 3x3
    with pytest.raises(surgery.SurgeryError, match=r"differs from the sparse model.*alone: \['features.0'\]"):
        surgery.compact(model, X)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _random_zoo_model(kind: str, config: list, depth: int, width: float, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = {
        "vgg": lambda: models.VGG(config, 1, 10, 16, width),
        "resnet": lambda: models.ResNet(depth, 1, 10, width),
        "mobilenetv2": lambda: models.build("mobilenetv2", {"input_size": 16, "width": width / 4}),
    }[kind]()
    return _trained_looking(model, (1, 16, 16), seed)


@settings(max_examples=15, deadline=None)
@given(
    kind=st.sampled_from(["vgg", "resnet", "mobilenetv2"]),
    config=st.lists(st.sampled_from([4, 8, 16, "M"]), min_size=1, max_size=5),
    depth=st.sampled_from([8, 14]),
    width=st.sampled_from([0.25, 0.5, 1.0]),
    filters=st.floats(0.0, 1.0),
    reads=st.floats(0.0, 0.6),
    unstructured=st.floats(0.0, 0.99),
    zero_bn=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_random_masks_give_an_equal_compact_model(
    kind, config, depth, width, filters, reads, unstructured, zero_bn, seed
):
    if kind == "vgg" and not any(isinstance(c, int) for c in config):
        config = [8, *config]
    model = _random_zoo_model(kind, config, depth, width, seed)
    x = torch.zeros(1, 1, 16, 16)
    _mask(model, x, seed, filters, reads, unstructured, zero_bn)
    assume(_well_conditioned(model, (1, 16, 16)))
    compact, report = surgery.compact(model, x)
    assert report.params_after <= report.params_before and not report.skipped_groups
    assert surgery.find_dead_channels(compact, x) == {}
    _assert_same_outputs(model, compact, (1, 16, 16))


def test_an_ill_conditioned_model_is_refused_not_emitted():
    """A mobilenetv2 whose depthwise convs are all zero and whose BatchNorms were calibrated on the
    result: folding the constants is right to float32 rounding, which the BatchNorms downstream
    (running variance 0) amplify past the tolerance. Surgery says so instead of returning the model."""
    model = _random_zoo_model("mobilenetv2", [4], 8, 0.25, 0)
    x = torch.zeros(1, 1, 16, 16)
    _mask(model, x, 0, 0.0, 0.5, 0.0, False)
    assert not _well_conditioned(model, (1, 16, 16))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(surgery.SurgeryError, match=r"in float64 .*groups that break it alone: \['blocks"):
        surgery.compact(model, x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
