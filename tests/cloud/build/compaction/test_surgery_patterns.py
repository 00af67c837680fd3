"""Surgery on the patterns torchvision's networks bring: readers of a concat that fold constants from several
groups (DenseNet), a layer that reads and writes the same group (EfficientNet's residual blocks without
expansion), and reshapes surgery does not prune through (ShuffleNet's channel shuffle)."""

import torch
from torch import nn

from cloud.build.compaction import surgery


def _kill(conv: nn.Conv2d, norm: nn.BatchNorm2d, channel: int) -> None:
    """A dead filter and its BatchNorm channel, as the pruning masks leave them: it emits exactly zero."""
    with torch.no_grad():
        conv.weight[channel] = 0
        norm.weight[channel] = norm.bias[channel] = 0


class DenseJoin(nn.Module):
    """Two branches concatenated in both orders, each concat normalized (zeros become constants) and read
    by a 1x1 conv: both groups' dead channels fold into both readers, and whichever group goes first,
    one reader loses a column before the other group's fold."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.b, self.bn_b = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.norms = nn.ModuleList([nn.BatchNorm2d(8), nn.BatchNorm2d(8)])
        self.reads = nn.ModuleList([nn.Conv2d(8, 6, 1), nn.Conv2d(8, 6, 1)])
        self.fc = nn.Linear(6, 10)

    def forward(self, x):
        a, b = self.bn_a(self.a(x)), self.bn_b(self.b(x))
        joins = (torch.cat([a, b], 1), torch.cat([b, a], 1))
        out = sum(read(torch.relu(norm(y))) for read, norm, y in zip(self.reads, self.norms, joins))
        return self.fc(out.mean((2, 3)))


def test_constants_from_several_groups_fold_into_the_readers_of_concats():
    torch.manual_seed(0)
    model = DenseJoin()
    with torch.no_grad():
        for norm in model.norms:  # a zero channel leaves each norm as a constant > 0
            norm.bias.uniform_(0.5, 1.0)
            norm.running_mean.uniform_(-1.0, -0.5)
    _kill(model.a, model.bn_a, 0)
    _kill(model.b, model.bn_b, 1)
    model.eval()
    compact, report = surgery.compact(model, torch.randn(1, 3, 8, 8))
    assert report.removed_by_group == {"a": 1, "b": 1} and report.folded == 4
    assert [read.in_channels for read in compact.reads] == [6, 6] and report.max_abs_diff <= 1e-5


class Shuffle(nn.Module):
    """A channel shuffle (a view to 5 dimensions and back) between two convs, and a prunable block after."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.b, self.bn_b = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.c, self.fc = nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 10)

    def forward(self, x):
        y = self.bn_a(self.a(x))
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.fc(self.c(torch.relu(self.bn_b(self.b(y)))).mean((2, 3)))


def test_a_channel_shuffle_is_traced_its_group_skipped_and_the_rest_compacted():
    torch.manual_seed(0)
    model = Shuffle()
    _kill(model.a, model.bn_a, 2)
    _kill(model.b, model.bn_b, 3)
    compact, report = surgery.compact(model.eval(), torch.randn(1, 3, 8, 8))
    assert "a" in report.skipped_groups and "reshape" in report.skipped_groups["a"]
    assert report.removed_by_group == {"b": 1} and compact.c.in_channels == 7


class ResidualBlock(nn.Module):
    """x -> depthwise -> BatchNorm -> ReLU -> 3x3 conv -> BatchNorm, added to x: the 3x3 conv reads the
    channels of x (through the depthwise conv) and writes them (through the add)."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.dw, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4)
        self.conv, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        x = self.bn0(self.stem(x))
        return self.fc((self.bn2(self.conv(torch.relu(self.bn1(self.dw(x))))) + x).mean((2, 3)))


def test_a_layer_reading_and_writing_the_group_is_asked_as_a_reader():
    torch.manual_seed(0)
    model = ResidualBlock()
    with torch.no_grad():
        model.bn1.bias.uniform_(0.5, 1.0)  # the dead channel reaches the 3x3 conv as a constant > 0
    _kill(model.stem, model.bn0, 1)
    _kill(model.conv, model.bn2, 1)  # the add's channel is zero: only the 3x3 conv's reading keeps it
    compact, report = surgery.compact(model.eval(), torch.randn(1, 3, 8, 8))
    assert report.channels_removed == 0 and compact.conv.in_channels == 4  # a constant into a padded conv


class PatchMerge(nn.Module):
    """Swin's patch merging: channels last, the four neighbours of each patch concatenated along the last
    dimension, then a linear layer."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.merge = nn.Linear(16, 10)

    def forward(self, x):
        y = self.bn_a(self.a(x)).permute(0, 2, 3, 1)
        y = torch.cat([y[:, 0::2, 0::2], y[:, 1::2, 0::2], y[:, 0::2, 1::2], y[:, 1::2, 1::2]], -1)
        return self.merge(y).mean((1, 2))


def test_a_concat_along_the_last_dimension_is_traced_and_its_group_skipped():
    torch.manual_seed(0)
    model = PatchMerge()
    _kill(model.a, model.bn_a, 0)
    compact, report = surgery.compact(model.eval(), torch.randn(1, 3, 8, 8))
    assert "a" in report.skipped_groups and report.channels_removed == 0
