"""`shifter`: iterative magnitude pruning with lottery-ticket rewinding (after DNNShifter).

Level 0 trains the dense model. Each further level prunes `rate` of the surviving conv and linear
weights by global magnitude, rewinds the survivors to their values at iteration `rewind_iteration`
and retrains them for `finetune_epochs`. Started from trained weights (`--weights`), level 0 is the
user's model as given, not trained, and the survivors of every level rewind to those weights before
they are fine-tuned. Every finished level is a checkpoint (`work/level-L.pt`), and an interrupted build
resumes at the last finished level (and inside a level at the last finished epoch). Under torchrun
each level trains data-parallel and rank 0 writes the checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from cloud.build import distributed
from cloud.build.methods import masks as masking
from cloud.build.methods.base import BuildContext, Method, SparseModel
from cloud.build.settings import SettingsError
from cloud.build.train import Masks, TrainConfig, apply_masks, load_state, save_state, train
from common.datasets import Dataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShifterConfig:
    """The settings of `shifter`; each field is a `portfolio build` flag."""

    levels: int = field(default=3, metadata={"help": "pruning levels after the dense model (level 0)"})
    rate: float = field(default=0.2, metadata={"help": "share of the surviving weights pruned per level"})
    rewind_iteration: int = field(
        default=0,
        metadata={"help": "rewind the survivors to their weights after this many training steps (0: initialization)"},
    )
    ignore: tuple[str, ...] = field(
        default=(), metadata={"help": "comma-separated layer names never pruned, e.g. features.0,classifier"}
    )
    finetune_epochs: int = field(
        default=0,
        metadata={
            "help": "epochs each pruning level retrains its rewound survivors (0: --epochs); with --weights, "
            "the fine-tuning budget per level"
        },
    )

    def __post_init__(self) -> None:
        if self.levels < 0:
            raise SettingsError(f"levels must be >= 0, got {self.levels}")
        if not 0.0 < self.rate < 1.0:
            raise SettingsError(f"rate must be in (0, 1), got {self.rate}")
        if self.rewind_iteration < 0:
            raise SettingsError(f"rewind_iteration must be >= 0, got {self.rewind_iteration}")
        if self.finetune_epochs < 0:
            raise SettingsError(f"finetune_epochs must be >= 0, got {self.finetune_epochs}")


def check_weights(settings: ShifterConfig) -> None:
    """With `--weights` the survivors rewind to the given weights: no dense run to rewind into."""
    if settings.rewind_iteration:
        raise SettingsError(
            f"--rewind-iteration {settings.rewind_iteration} rewinds into the dense model's training; with "
            "--weights the dense model is not trained and the survivors rewind to the given weights (leave it at 0)"
        )


@dataclass(frozen=True)
class Level:
    level: int
    state: dict[str, torch.Tensor]  # trained weights, masks already applied
    masks: Masks


class _RewindCapture:
    """Keeps a copy of the weights after `iteration` optimizer steps of the dense run."""

    def __init__(self, iteration: int, path: Path):
        self.iteration, self.path, self.steps = iteration, path, 0

    def __call__(self, model: nn.Module) -> None:
        self.steps += 1
        if self.steps == self.iteration and not self.path.exists():
            save_state(self.path, {"state": model.state_dict()})


def _train_dense(
    model: nn.Module,
    data: Dataset,
    train_config: TrainConfig,
    config: ShifterConfig,
    work: Path,
    device: torch.device,
    trained: bool = False,
) -> None:
    """Level 0: train the dense model, keeping its rewind point; a `trained` one is its own rewind point."""
    rewind_path = work / "rewind.pt"
    if config.rewind_iteration == 0 and not rewind_path.exists() and distributed.is_main():
        save_state(rewind_path, {"state": model.state_dict()})
    if trained:
        distributed.barrier()
        return
    capture = _RewindCapture(config.rewind_iteration, rewind_path) if config.rewind_iteration else None
    train(
        model,
        data.info,
        data.train,
        train_config,
        checkpoint=work / "level-0.train.pt",
        desc="level 0 (dense)",
        after_step=capture,
        device=device,
    )
    distributed.barrier()
    if not rewind_path.exists():
        raise ValueError(f"rewind_iteration {config.rewind_iteration} is beyond the dense run's steps")


def run_imp(
    model: nn.Module,
    data: Dataset,
    train_config: TrainConfig,
    config: ShifterConfig,
    work: Path,
    device: torch.device | None = None,
    trained: bool = False,
) -> Iterator[Level]:
    """Yield every level (0 = dense), training what is not checkpointed yet on `device` (default: the
    CPU); every level's state and masks are on the CPU. A `trained` model is level 0 as it is."""
    if trained:
        check_weights(config)
    work.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, *data.info.input_shape)
    pairs = masking.conv_batchnorm_pairs(model, example)
    masks = masking.dense_masks(model, config.ignore)
    finetune = replace(train_config, epochs=config.finetune_epochs or train_config.epochs)
    for level in range(config.levels + 1):
        done = work / f"level-{level}.pt"
        if done.exists():
            saved = load_state(done)
            model.load_state_dict(saved["state"])
            masks = saved["masks"]
            log.info("level %d: resumed from %s", level, done)
            yield Level(level, saved["state"], masks)
            continue
        if level == 0:
            _train_dense(model, data, train_config, config, work, device, trained)
        else:
            masks = masking.with_batchnorm_masks(masking.prune_global_magnitude(model, masks, config.rate), pairs)
            model.load_state_dict(load_state(work / "rewind.pt")["state"])
            apply_masks(model, masks)
            train(
                model,
                data.info,
                data.train,
                finetune,
                masks=masks,
                checkpoint=work / f"level-{level}.train.pt",
                desc=f"level {level} (sparsity {masking.sparsity(masks):.1%})",
                device=device,
            )
        state = {k: v.clone() for k, v in model.state_dict().items()}
        if distributed.is_main():  # under torchrun every process holds the same state; one writes it
            save_state(done, {"state": state, "masks": masks})
            (work / f"level-{level}.train.pt").unlink(missing_ok=True)
        distributed.barrier()
        yield Level(level, state, masks)


def levels(context: BuildContext, settings: ShifterConfig) -> Iterator[SparseModel]:
    """Every level of IMP as a sparse model of the dense shape; its compression follows from its masks.
    With `--weights` the dense model is the user's (refused before any work unless it fits)."""
    torch.manual_seed(context.config.seed)
    trained = context.trained_model()
    model = context.new_model() if trained is None else trained
    config, work, device = context.config, context.work_dir, context.device
    for level in run_imp(model, context.data, config.train, settings, work, device, trained is not None):
        sparse = context.new_model()
        sparse.load_state_dict(level.state)
        yield SparseModel(level.level, sparse.eval(), level.masks)


def planned_compressions(settings: ShifterConfig) -> list[float]:
    """Every level keeps 1 - rate of the weights that survived the one before."""
    return [(1.0 - settings.rate) ** -level for level in range(settings.levels + 1)]


METHOD = Method(
    name="shifter",
    help="iterative magnitude pruning with rewinding; each level compacted structurally (after DNNShifter)",
    settings=ShifterConfig,
    levels=levels,
    planned_compressions=planned_compressions,
    weights_refusal=None,
    check_weights=check_weights,
    dense_level=True,
)
