"""How the shape of every conv and linear layer follows the channel groups that pruning shrinks.

A channel group (torch-pruning's dependency group, as `cloud.build.compaction.channels.analyse` finds
and vets it: a conv with its BatchNorm, a residual stage, a depthwise conv with the conv that feeds
it, ...) loses channels together. A layer writes one group's channels (its output count is the
group's count), carries them (a depthwise conv: input and output count both the group's), or reads
them (its input count grows with the group's; after a flatten into a linear layer, by the features
per channel). Layers that touch no prunable group keep their counts. The latency table and the
latency-aware allocation read layer shapes from here for any counts of the groups.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from cloud.build.compaction import channels
from cloud.build.compaction.channel_values import LAYERS, is_depthwise


@dataclass(frozen=True)
class Link:
    """One conv or linear layer: the group it writes (or None, then `out_fixed` channels), the groups
    it reads with the input features per channel, and the input features from elsewhere."""

    name: str
    out_group: str | None
    out_fixed: int
    in_groups: tuple[tuple[str, int], ...]
    in_fixed: int
    depthwise: bool = False


@dataclass(frozen=True)
class Topology:
    """The prunable groups with their channel counts now, and every layer's `Link`."""

    groups: dict[str, int]
    links: dict[str, Link]

    def shape(self, name: str, counts: dict[str, int]) -> tuple[int, int]:
        """(input, output) counts of layer `name` when the groups have `counts` channels (a group not
        in `counts` keeps its count); a depthwise conv's input is 1 (per group)."""
        link = self.links[name]
        out = counts.get(link.out_group, self.groups.get(link.out_group, 0)) if link.out_group else link.out_fixed
        if link.depthwise:
            return 1, out
        return link.in_fixed + sum(per * counts.get(g, self.groups[g]) for g, per in link.in_groups), out

    def touching(self, group: str) -> list[str]:
        """The layers whose shape changes with `group`."""
        return [
            name
            for name, link in self.links.items()
            if link.out_group == group or any(g == group for g, _ in link.in_groups)
        ]


def _features(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.in_channels, module.out_channels


def build(analysis: channels.Analysis) -> Topology:
    """The topology of the model `analysis` traced: its supported groups, named by their root layer."""
    names, graph = analysis.trace.names, analysis.trace.graph
    groups: dict[str, int] = {}
    writes: dict[nn.Module, str] = {}
    reads: dict[nn.Module, dict[str, int]] = {}
    for plan in analysis.plans:
        count = len(plan.group[0].idxs)
        groups[plan.name] = count
        for item in plan.group.items:
            module = item.dep.target.module
            if type(module) not in LAYERS:
                continue
            if graph.is_out_channel_pruning_fn(item.dep.handler):
                writes[module] = plan.name
            elif not is_depthwise(module):
                reads.setdefault(module, {})[plan.name] = max(1, len(item.idxs) // count)
    links = {}
    for module, name in names.items():
        if type(module) not in LAYERS:
            continue
        total_in, total_out = _features(module)
        depthwise = is_depthwise(module) and module in writes
        read = tuple(reads.get(module, {}).items())
        fixed_in = total_in - sum(per * groups[g] for g, per in read)
        out = writes.get(module)
        links[name] = Link(name, out, 0 if out else total_out, () if depthwise else read, fixed_in, depthwise)
    return Topology(groups, links)


def counts_of(model: nn.Module, topology: Topology) -> dict[str, int]:
    """The channel count of every group of `topology` as `model` has it now (read from each group's
    first writer)."""
    modules = dict(model.named_modules())
    found = {}
    for name, link in topology.links.items():
        if link.out_group and link.out_group not in found:
            found[link.out_group] = _features(modules[name])[1]
    return found
