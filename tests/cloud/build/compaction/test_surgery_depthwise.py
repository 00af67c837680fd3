"""Surgery through depthwise convs and inverted residuals, with constants folded exactly."""

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_surgery import (
    _assert_same_outputs,
    _mask,
    _trained_looking,
    _well_conditioned,
)
from torch import nn

from cloud.build.compaction import surgery

X = torch.zeros(1, 1, 16, 16)


class _Inverted(nn.Module):
    """1x1 expand + BN + ReLU6, 3x3 depthwise + BN + ReLU6, 1x1 projection + BN, residual add."""

    def __init__(self, channels: int, expand: int):
        super().__init__()
        hidden = channels * expand
        self.expand = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()
        )
        self.project = nn.Sequential(nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        return x + self.project(self.depthwise(self.expand(x)))


class _TinyMobile(nn.Module):
    def __init__(self, width: int = 8, blocks: int = 2, expand: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU6())
        self.blocks = nn.Sequential(*[_Inverted(width, expand) for _ in range(blocks)])
        self.head = nn.Sequential(
            nn.Conv2d(width, 2 * width, 1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU6(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x):
        return self.fc(self.head(self.blocks(self.stem(x))))


def _model(seed: int = 0, **kwargs) -> _TinyMobile:
    torch.manual_seed(seed)
    return _trained_looking(_TinyMobile(**kwargs), (1, 16, 16), seed)


def test_a_channel_whose_depthwise_filter_is_zero_goes_with_its_expand_filter():
    model = _model()
    block = model.blocks[0]
    with torch.no_grad():
        block.depthwise[0].weight[[2, 5]] = 0  # the depthwise conv emits zero on 2 and 5 ...
        block.depthwise[1].weight[[2, 5]] = block.depthwise[1].bias[[2, 5]] = 0  # ... and its BatchNorm too
    assert list(surgery.find_dead_channels(model, X).values()) == [[2, 5]]  # one group: expand, depthwise
    compact, report = surgery.compact(model, X)
    assert compact.blocks[0].depthwise[0].groups == compact.blocks[0].depthwise[0].out_channels == 22
    assert compact.blocks[0].expand[0].out_channels == 22 and compact.blocks[0].project[0].in_channels == 22
    assert report.exact and report.folded == 0
    _assert_same_outputs(model, compact, (1, 16, 16))


def test_a_constant_out_of_a_depthwise_conv_folds_into_the_unpadded_projection():
    model = _model()
    block = model.blocks[1]
    with torch.no_grad():
        block.depthwise[0].weight[4] = 0
        block.depthwise[1].bias[4], block.depthwise[1].running_mean[4] = 0.8, 0.0  # BN emits 0.8 everywhere,
        # ReLU6 keeps it, the unpadded 1x1 projection absorbs it into its bias
    compact, report = surgery.compact(model, X)
    assert compact.blocks[1].depthwise[0].out_channels == 23 and report.folded == 1 and report.exact
    assert compact.blocks[1].project[0].bias is not None  # the fold gave the projection a bias
    _assert_same_outputs(model, compact, (1, 16, 16))


def test_an_expand_channel_that_is_constant_stays_because_the_depthwise_conv_is_padded():
    model = _model()
    block = model.blocks[0]
    with torch.no_grad():
        block.expand[0].weight[7] = 0
        block.expand[1].bias[7], block.expand[1].running_mean[7] = 0.5, 0.0  # 0.5 meets a padded 3x3
    compact, report = surgery.compact(model, X)
    assert compact.blocks[0].expand[0].out_channels == 24 and report.channels_removed == 0
    rough, report = surgery.compact(model, X, approximate=True)
    assert report.channels_removed == 0  # a depthwise conv is not a reader: nothing to fold into


def test_residual_stream_channel_dead_in_every_writer_goes_through_all_blocks():
    model = _model()
    writers = [(model.stem[0], model.stem[1])] + [(b.project[0], b.project[1]) for b in model.blocks]
    with torch.no_grad():
        for conv, bn in writers:
            conv.weight[3] = 0
            bn.weight[3] = bn.bias[3] = 0
    compact, _ = surgery.compact(model, X)
    assert compact.stem[0].out_channels == 7 and all(b.project[0].out_channels == 7 for b in compact.blocks)
    assert compact.head[0].in_channels == 7
    _assert_same_outputs(model, compact, (1, 16, 16))


@settings(max_examples=10, deadline=None)
@given(
    width=st.sampled_from([4, 8]),
    blocks=st.integers(1, 3),
    expand=st.sampled_from([1, 2, 4]),
    filters=st.floats(0.0, 0.9),
    reads=st.floats(0.0, 0.5),
    unstructured=st.floats(0.0, 0.95),
    zero_bn=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_random_masks_on_inverted_residual_nets_give_an_equal_compact_model(
    width, blocks, expand, filters, reads, unstructured, zero_bn, seed
):
    model = _model(seed, width=width, blocks=blocks, expand=expand)
    _mask(model, X, seed, filters, reads, unstructured, zero_bn)
    assume(_well_conditioned(model, (1, 16, 16)))
    compact, report = surgery.compact(model, X)
    assert report.params_after <= report.params_before and report.exact
    assert surgery.find_dead_channels(compact, X) == {}
    _assert_same_outputs(model, compact, (1, 16, 16))
