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

from cloud.build import weights
from cloud.build.settings import SettingsError
from common import models
from common.datasets import Dataset
from common.errors import PrunefleetError

if TYPE_CHECKING:
    from cloud.build.config import BuildConfig
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
    # True: `model` is already the variant (channels physically removed and then trained, `masks`
    # empty, `compression` given), so there is no sparse parent to compact; the build checks instead
    # that the stored file rebuilds this model exactly.
    compact: bool = False

    def __post_init__(self) -> None:
        if self.compact and (self.masks or self.compression is None):
            what = self.name or f"level {self.level}"
            raise MethodError(f"compact model {what} must come with its compression and without masks")


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
        return models.zoo_kwargs(info.input_shape, info.num_classes, self.config.width, self.config.model)

    def new_model(self) -> nn.Module:
        """A freshly initialized dense model of the build's architecture (from torch's current seed)."""
        return models.build(self.config.model, self.model_kwargs(), allowed=(self.config.model,))

    def trained_model(self, path: Path | None = None) -> nn.Module | None:
        """The dense model holding the user's trained weights (`path`, default `--weights`), refused
        with a `WeightsError` unless they fit the build's architecture; None without them."""
        path = self.config.weights if path is None else path
        if path is None:
            return None
        trained = weights.read(path)
        model = self.new_model()
        weights.fit(model, trained, self.config.model, self.model_kwargs())
        return model


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
    # Starting from trained weights (`--weights`): None when the method can (its dense model is then
    # the user's, `BuildContext.trained_model`), else why it cannot: the message `--weights` gets.
    weights_refusal: str | None = "it cannot start from trained weights"
    # When it can: settings that do not combine with `--weights` raise SettingsError naming them.
    check_weights: Callable[[Any], None] | None = None
    # True when level 0 is the dense model (trained, or the user's `--weights`): the build compares
    # every variant with it, even when `--targets` leaves it out of the portfolio. False: the build
    # trains the dense architecture itself, with its own recipe and seed, to compare with.
    dense_level: bool = False

    def refuse_weights(self, settings: Any) -> None:
        """Raise SettingsError when this method cannot start from trained weights with `settings`."""
        if self.weights_refusal is not None:
            raise SettingsError(f"--weights with --method {self.name}: {self.weights_refusal}")
        if self.check_weights is not None:
            self.check_weights(settings)

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise MethodError(f"method name {self.name!r} must be lowercase letters, digits and dashes")
        if not self.help or "\n" in self.help:
            raise MethodError(f"method {self.name!r} needs a one-line help")
        if not (isinstance(self.settings, type) and dataclasses.is_dataclass(self.settings)):
            raise MethodError(f"the settings of method {self.name!r} must be a dataclass, got {self.settings!r}")
        if self.weights_refusal is not None and (not self.weights_refusal or "\n" in self.weights_refusal):
            raise MethodError(f"method {self.name!r}: weights_refusal is None or a one-line message")
