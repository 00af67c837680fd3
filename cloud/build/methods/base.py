"""What a pruning method is to the build: a name, its settings and a generator of sparse models.

A method is one module that defines its settings dataclass (every field with help text, so the
`portfolio build` flags follow from it, see `cloud.build.settings`) and a `Method`, plus one line in
the `METHODS` registry (`cloud.build.methods`). The build owns everything else: training data, the
store, compaction of each sparse model into a variant, the equivalence check, measuring and
publishing. A method never decides how a variant is stored, and the build never looks at a method's
settings.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from common import models
from common.datasets import Dataset
from common.errors import PrunefleetError

if TYPE_CHECKING:
    from cloud.build.portfolio import BuildConfig
    from cloud.build.store import PortfolioStore

_NAME = re.compile(r"[a-z][a-z0-9-]*")


class MethodError(PrunefleetError, ValueError):
    """A method defined wrongly (its name, help or settings type); the message names the method."""


@dataclass(frozen=True)
class SparseModel:
    """What a pruning method hands to the portfolio: a trained sparse model and where it came from."""

    level: int
    model: nn.Module
    masks: dict[str, torch.Tensor]
    compression: float | None = None  # against the dense model; None: from the masks (same shape)
    name: str | None = None


@dataclass(frozen=True)
class BuildContext:
    """What a method gets from the build: its common settings (architecture, width, seed, training
    recipe), the data, the store whose work directory keeps the method's resumable checkpoints, and
    the device it trains and scores on (resolved from `--device`; the sparse models it yields are
    on the CPU)."""

    config: BuildConfig
    data: Dataset
    store: PortfolioStore
    device: torch.device = torch.device("cpu")

    @property
    def work_dir(self) -> Path:
        return self.store.work_dir

    def model_kwargs(self) -> dict:
        """Constructor arguments of the build's architecture for this dataset and width."""
        info = self.data.info
        return models.zoo_kwargs(info.input_shape, info.num_classes, self.config.width)

    def new_model(self) -> nn.Module:
        """A freshly initialized dense model of the build's architecture (from torch's current seed)."""
        return models.build(self.config.model, self.model_kwargs(), allowed=(self.config.model,))


@dataclass(frozen=True)
class Method:
    """A pruning method: `levels(context, settings)` yields the sparse models one per level, in level
    order; `planned_compressions(settings)` says what each level will reach before any work, so the
    build can show progress and keep only the levels nearest its `--targets`."""

    name: str
    help: str  # one line, shown in `prunefleet portfolio build --help`
    settings: type  # a frozen dataclass; its fields are the method's flags
    levels: Callable[[BuildContext, Any], Iterator[SparseModel]]
    planned_compressions: Callable[[Any], list[float]]

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise MethodError(f"method name {self.name!r} must be lowercase letters, digits and dashes")
        if not self.help or "\n" in self.help:
            raise MethodError(f"method {self.name!r} needs a one-line help")
        if not (isinstance(self.settings, type) and dataclasses.is_dataclass(self.settings)):
            raise MethodError(f"the settings of method {self.name!r} must be a dataclass, got {self.settings!r}")
