"""A latency lookup table: every conv and linear layer of a model timed alone, over its channel counts.

The `structured` method spends its channel removals where they buy the most served time, so it needs
the time of each layer at every shape pruning can give it. Each layer is timed standalone at its real
input size and the serving batch, as an edge serves it (`common.inference.for_inference`): BatchNorm
folded into the conv (a conv with a bias) and channels-last layout, on this process's CPU threads. The
axes of a layer's table are the channel counts its input and output groups can take
(`channel_ladder`); an axis with more than `max_points` counts is sampled evenly and read between its
points by linear interpolation. Every entry is the least time of several runs in each of several passes
over the whole table (other work on the machine only adds time), and then no more than any larger
entry's: noise that slowed a smaller layer is pulled down to what a larger one took, never spread onto
the larger ones. Layers of the same shape share one table.

The table is a JSON file in the build's work directory: a resumed build reads it instead of timing
again, so the noise of a second timing cannot change a chain that is already under way.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from cloud.build.methods.topology import Link, Topology
from common.files import atomic_write_json
from common.profiling import cpu_model

FORMAT = "prunefleet.latency-table/1"
WARMUP = 2


def channel_ladder(channels: int, multiple: int, minimum: int) -> list[int]:
    """The channel counts a group of `channels` may be pruned to, largest first: its own count, every
    multiple of `multiple` below it (CPU kernels compute output channels in blocks: a count between
    two multiples costs about what the larger one does), then halvings of the smallest one down to
    `minimum`. A group of at most two blocks steps by a quarter block instead (4 channels of 16): on
    16 and 8, halving ResNet-56's first stage is its only cut; the latency table says which of the
    finer counts save time, and the allocation skips those that do not. A group at or below `minimum`
    stays as it is."""
    if channels <= minimum:
        return [channels]
    step = multiple if channels > 2 * multiple else max(1, multiple // 4)
    counts = {channels, *range(step, channels, step)}
    low = min(counts)
    while low // 2 >= minimum:
        low //= 2
        counts.add(low)
    return sorted((c for c in counts if c >= minimum or c == channels), reverse=True)


@dataclass(frozen=True)
class Shape:
    """What a layer's time depends on besides its channel counts."""

    kind: str  # conv, depthwise or linear
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()  # as the conv has it ('same', 'valid' or sizes)
    dilation: tuple[int, ...] = ()
    groups: int = 1
    size: tuple[int, ...] = ()  # input height and width (convs)


@dataclass(frozen=True)
class Table:
    """One shape's times (ms) over input counts (rows) and output counts (columns); a depthwise conv
    has one row (its input count is its output count)."""

    shape: Shape
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    ms: tuple[tuple[float, ...], ...]

    def at(self, cin: int, cout: int) -> float:
        row = [float(np.interp(cout, self.outputs, r)) for r in self.ms]
        return row[0] if len(row) == 1 else float(np.interp(cin, self.inputs, row))


def _sampled(axis: list[int], max_points: int) -> tuple[int, ...]:
    axis = sorted(set(axis))
    if len(axis) <= max_points:
        return tuple(axis)
    picks = np.linspace(0, len(axis) - 1, max_points).round().astype(int)
    return tuple(axis[i] for i in sorted(set(picks.tolist())))


def _layer(shape: Shape, cin: int, cout: int) -> nn.Module:
    if shape.kind == "linear":
        return nn.Linear(cin, cout)
    groups = cout if shape.kind == "depthwise" else shape.groups
    conv = nn.Conv2d(
        cout if shape.kind == "depthwise" else cin,
        cout,
        shape.kernel,
        stride=shape.stride,
        padding=shape.padding,
        dilation=shape.dilation,
        groups=groups,
    )
    return conv.to(memory_format=torch.channels_last)


@torch.inference_mode()
def time_layer(shape: Shape, cin: int, cout: int, batch: int, repeats: int) -> float:
    """The fastest of `repeats` forward passes (ms) of a fresh layer of this shape and these counts:
    other work on the machine only ever adds time, so the minimum is the layer's own."""
    layer = _layer(shape, cin, cout).eval()
    if shape.kind == "linear":
        x = torch.randn(batch, cin)
    else:
        channels = cout if shape.kind == "depthwise" else cin
        x = torch.randn(batch, channels, *shape.size).contiguous(memory_format=torch.channels_last)
    for _ in range(WARMUP):
        layer(x)
    fastest = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        layer(x)
        fastest = min(fastest, (time.perf_counter() - start) * 1e3)
    return fastest


def _monotone(ms: np.ndarray) -> np.ndarray:
    """Each time lowered to the least time of any entry at least as large in both counts: a time that
    noise pushed up is pulled back to what a larger layer took, never pushed onto the larger ones."""
    flipped = ms[::-1, ::-1]
    return np.minimum.accumulate(np.minimum.accumulate(flipped, axis=0), axis=1)[::-1, ::-1]


@dataclass(frozen=True)
class LatencyTable:
    """Per layer name, the index of its table in `tables`; predicted time = the sum over layers."""

    batch: int
    threads: int
    cpu: str
    layers: dict[str, int]
    tables: tuple[Table, ...]

    def layer_ms(self, name: str, cin: int, cout: int) -> float:
        return self.tables[self.layers[name]].at(cin, cout)

    def predict(self, topology: Topology, counts: dict[str, int]) -> float:
        """Predicted milliseconds of the model whose groups have `counts` channels (layers unknown to
        the table, none for the model it was built on, count nothing)."""
        return sum(self.layer_ms(name, *topology.shape(name, counts)) for name in topology.links if name in self.layers)

    def save(self, path: Path) -> None:
        atomic_write_json(path, {"format": FORMAT, **asdict(self)})

    @classmethod
    def load(cls, path: Path) -> LatencyTable:
        raw = json.loads(Path(path).read_text())
        if raw.pop("format", None) != FORMAT:
            raise ValueError(f"{path} is not a latency table ({FORMAT})")
        tables = tuple(
            Table(
                Shape(**{k: tuple(v) if isinstance(v, list) else v for k, v in t["shape"].items()}),
                tuple(t["inputs"]),
                tuple(t["outputs"]),
                tuple(tuple(r) for r in t["ms"]),
            )
            for t in raw.pop("tables")
        )
        return cls(tables=tables, **raw)


def _axes(link: Link, topology: Topology, ladder: Callable[[int], list[int]], max_points: int) -> tuple:
    """The input and output counts a layer can take as its groups are pruned."""
    outputs = ladder(topology.groups[link.out_group]) if link.out_group else [link.out_fixed]
    if link.depthwise:
        return (1,), _sampled(outputs, max_points)
    if len(link.in_groups) == 1:
        group, per = link.in_groups[0]
        inputs = [link.in_fixed + per * c for c in ladder(topology.groups[group])]
    else:  # several groups (a concat) or none: sampled over the total
        total = link.in_fixed + sum(per * topology.groups[g] for g, per in link.in_groups)
        inputs = ladder(total) if link.in_groups else [total]
    return _sampled(inputs, max_points), _sampled(outputs, max_points)


def build(
    topology: Topology,
    shapes: dict[str, Shape],
    ladder: Callable[[int], list[int]],
    batch: int,
    rounds: int = 3,
    repeats: int = 3,
    max_points: int = 12,
    progress: bool = True,
) -> LatencyTable:
    """Time every layer of `topology` (whose `shapes` come from `layer_shapes`) over its axes: every
    entry in each of `rounds` passes over the whole table, keeping its least time, so a burst of load
    elsewhere on the machine lands on one pass of an entry, not on all of them."""
    keys: dict[tuple, int] = {}
    layers: dict[str, int] = {}
    for name, link in topology.links.items():
        inputs, outputs = _axes(link, topology, ladder, max_points)
        layers[name] = keys.setdefault((shapes[name], inputs, outputs), len(keys))
    ordered = list(keys)
    grids = [np.full((len(i), len(o)), np.inf) for _, i, o in ordered]
    entries = [(k, i, j) for k, (_, ins, outs) in enumerate(ordered) for i in range(len(ins)) for j in range(len(outs))]
    bar = tqdm(total=rounds * len(entries), desc="latency table", disable=not progress, leave=False)
    for _ in range(rounds):
        for k, i, j in entries:
            shape, inputs, outputs = ordered[k]
            grids[k][i, j] = min(grids[k][i, j], time_layer(shape, inputs[i], outputs[j], batch, repeats))
            bar.update()
    bar.close()
    tables = tuple(
        Table(shape, inputs, outputs, tuple(tuple(round(float(v), 5) for v in row) for row in _monotone(grid)))
        for (shape, inputs, outputs), grid in zip(ordered, grids)
    )
    return LatencyTable(batch, torch.get_num_threads(), cpu_model(), layers, tables)


def layer_shapes(model: nn.Module, example: torch.Tensor, names: dict[nn.Module, str]) -> dict[str, Shape]:
    """The `Shape` of every conv and linear layer named in `names`, from one forward pass of `example`."""
    found: dict[str, Shape] = {}

    def record(module: nn.Module, args: tuple, _output) -> None:
        if isinstance(module, nn.Linear):
            found[names[module]] = Shape("linear")
            return
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        found[names[module]] = Shape(
            "depthwise" if depthwise else "conv",
            tuple(module.kernel_size),
            tuple(module.stride),
            module.padding if isinstance(module.padding, str) else tuple(module.padding),
            tuple(module.dilation),
            1 if depthwise else module.groups,
            tuple(args[0].shape[2:]),
        )

    hooks = [m.register_forward_hook(record) for m in names if type(m) in (nn.Conv2d, nn.Linear)]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for hook in hooks:
            hook.remove()
    return found
