"""Tracing a model into torch-pruning's dependency graph, with the ops surgery never prunes through kept opaque.

torch-pruning follows channels through reshapes, splits, slices, expands and concats with index
mappings it infers from the traced shapes. Surgery supports none of these but the flatten into linear
layers and the concat along channels (`cloud.build.compaction.channels` leaves every group that
reaches another alone), and the inference goes wrong on such ops in common networks: a channel
shuffle's view divides by zero (ShuffleNetV2), chained windowing reshapes multiply the index lists
until memory runs out and a concat along the last dimension has no channel count (Swin). So, once the
graph is built, every such op is retyped an element-wise op without index mapping: groups still
reach it, and `Trace.opaque` records what it was, so that the group is reported and left alone.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from cloud.build.compaction.channel_values import BATCHNORM, LAYERS, OPTYPE
from common.errors import PrunefleetError

OPAQUE_TYPES = frozenset({OPTYPE.RESHAPE, OPTYPE.SPLIT, OPTYPE.UNBIND, OPTYPE.SLICE, OPTYPE.EXPAND})


class SurgeryError(PrunefleetError, RuntimeError):
    """Surgery refused or failed; the message names the module or the layer groups involved."""


@dataclass(frozen=True)
class Trace:
    graph: tp.DependencyGraph
    names: dict  # module -> qualified name
    outputs: frozenset  # autograd nodes of the model's outputs
    calls: dict  # conv/linear/BatchNorm -> forward calls during the trace
    flattens: frozenset  # reshape nodes that flatten (N, C, ...) into linear layers' inputs
    classifier: nn.Module | None
    opaque: dict  # node -> its op type before it was made opaque (see the module's docstring)


def is_flatten(node) -> bool:
    """A view (N, C, ...) -> (N, C * ...) read only by linear layers (judged at trace time)."""
    sizes = getattr(node.grad_fn, "_saved_self_sym_sizes", None)
    if sizes is None or len(sizes) < 2 or not node.outputs:
        return False
    features = int(torch.Size(sizes[1:]).numel())
    return all(out.type == OPTYPE.LINEAR and out.module.in_features == features for out in node.outputs)


class _Graph(tp.DependencyGraph):
    """torch-pruning's graph with the ops of `OPAQUE_TYPES` (flattens into linear layers aside) retyped
    element-wise before any index mapping is inferred; `opaque` holds their original types."""

    def __init__(self) -> None:
        super().__init__()
        self.opaque: dict = {}

    def _build_dependency(self, module2node) -> None:
        super()._build_dependency(module2node)
        for node in module2node.values():
            if node.type in OPAQUE_TYPES and not (node.type == OPTYPE.RESHAPE and is_flatten(node)):
                self.opaque[node] = node.type
            elif node.type == OPTYPE.CONCAT and getattr(node.grad_fn, "_saved_dim", None) != 1:
                self.opaque[node] = node.type  # e.g. Swin's patch merging: a concat along the last dim
        for node in self.opaque:
            node.type = OPTYPE.ELEMENTWISE


def trace(model: nn.Module, example_input: torch.Tensor, classifier: nn.Module | None) -> Trace:
    """Build the dependency graph once; it stays valid while groups are pruned."""
    if not any(isinstance(m, LAYERS) for m in model.modules()):
        raise SurgeryError(f"{type(model).__name__} has no conv or linear layer to prune")
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2:
        shape = getattr(example_input, "shape", example_input)
        raise SurgeryError(f"example input must be a batched tensor (N, C, ...), got {shape}")
    order: list[nn.Module] = []
    results: list = []

    def forward(module, x):
        results.append(module(x))
        return results[-1]

    hooks = [
        m.register_forward_hook(lambda module, _i, _o: order.append(module))
        for m in model.modules()
        if isinstance(m, (*LAYERS, BATCHNORM))
    ]
    try:
        with torch.enable_grad():
            graph = _Graph().build_dependency(
                model, example_inputs=example_input.detach(), forward_fn=forward, verbose=False
            )
    except Exception as err:  # tracing surfaces any model error; report it with the model's name
        raise SurgeryError(
            f"cannot trace {type(model).__name__} with input of shape {tuple(example_input.shape)}: {err}"
        ) from err
    finally:
        for hook in hooks:
            hook.remove()
    outputs = frozenset(t.grad_fn for t in tp.utils.flatten_as_list(results[0]) if isinstance(t, torch.Tensor))
    if classifier is None:  # the layer that writes the logits, else the last conv/linear that ran
        layers = [m for m in order if isinstance(m, LAYERS)]
        writers = [m for m in layers if m in graph.module2node and graph.module2node[m].grad_fn in outputs]
        classifier = (writers or layers or [None])[-1]
    flattens = frozenset(
        node for node in graph.module2node.values() if node.type == OPTYPE.RESHAPE and is_flatten(node)
    )
    names = {m: n for n, m in model.named_modules()}
    return Trace(graph, names, outputs - {None}, Counter(order), flattens, classifier, dict(graph.opaque))
