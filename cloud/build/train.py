"""Training and evaluation with progress bars, seeds, resumable checkpoints, and masks kept applied.

Checkpoints are local files this process wrote itself; they are read back with
`torch.load(weights_only=True)` and nothing else.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from cloud.build import distributed
from cloud.build.settings import SettingsError
from common.datasets import DatasetInfo, Split, batches
from common.errors import PrunefleetError
from common.files import atomic_write_bytes

Masks = dict[str, torch.Tensor]


class MaskError(PrunefleetError, ValueError):
    """A mask that does not fit the model; the message names the tensor."""


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe (SGD with momentum and a step schedule); each field is a `portfolio build` flag."""

    epochs: int = field(default=2, metadata={"help": "training epochs (of every level that trains)"})
    batch_size: int = field(default=128, metadata={"help": "global batch, split over torchrun processes"})
    lr: float = field(default=0.05, metadata={"help": "learning rate"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=5e-4, metadata={"help": "L2 weight decay"})
    milestones: tuple[float, ...] = field(
        default=(0.5, 0.75),
        metadata={"help": "step schedule: fractions of the epochs where the rate drops by --gamma"},
    )
    gamma: float = field(default=0.1, metadata={"help": "factor of the learning rate at each milestone"})
    seed: int = field(default=0, metadata={"cli": False, "help": "data order; the build passes its own --seed"})
    progress: bool = field(default=True, metadata={"help": "progress bars while training"})

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size <= 0 or self.lr <= 0:
            raise SettingsError("epochs must be >= 0, batch_size and lr positive")
        if not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise SettingsError("momentum must be in [0, 1) and weight_decay >= 0")
        if any(not 0 < m < 1 for m in self.milestones):
            raise SettingsError(f"milestones are fractions in (0, 1), got {self.milestones}")


def check_masks(model: nn.Module, masks: Masks) -> None:
    """Every mask names a tensor of the model, has its shape, and is boolean (or 0/1 numbers)."""
    state = model.state_dict()
    for name, mask in masks.items():
        if name not in state:
            raise MaskError(f"mask {name!r} names no tensor of {type(model).__name__}")
        if not isinstance(mask, torch.Tensor) or mask.shape != state[name].shape:
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise MaskError(f"mask {name!r} has shape {shape}, the tensor {tuple(state[name].shape)}")
        if mask.dtype != torch.bool and (mask.is_complex() or not ((mask == 0) | (mask == 1)).all()):
            raise MaskError(f"mask {name!r} must be boolean or hold only 0 and 1, got dtype {mask.dtype}")


def apply_masks(model: nn.Module, masks: Masks | None) -> None:
    """Zero every masked entry in place: the sparse model is the dense shape times its mask."""
    if masks:
        check_masks(model, masks)
        _mask(model, masks)


def _mask(model: nn.Module, masks: Masks | None) -> None:
    if not masks:
        return
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name in masks:
                tensor.mul_(masks[name].to(tensor.dtype))


def _save_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, epoch: int) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _resume(path: Path | None, model: nn.Module, optimizer, scheduler) -> int:
    if path is None or not path.exists():
        return 0
    state = torch.load(path, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"])


def train(
    model: nn.Module,
    info: DatasetInfo,
    split: Split,
    config: TrainConfig,
    masks: Masks | None = None,
    checkpoint: Path | None = None,
    desc: str = "train",
    after_step: Callable[[nn.Module], None] | None = None,
) -> nn.Module:
    """SGD with momentum and a step schedule; masked entries stay zero. Resumes from `checkpoint`.
    Under torchrun, each process trains on its shard of every batch (DDP); only rank 0 writes the
    checkpoint and calls `after_step`."""
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    milestones = sorted({max(1, round(m * config.epochs)) for m in config.milestones})
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=config.gamma)
    start = _resume(checkpoint, model, optimizer, scheduler)
    apply_masks(model, masks)  # checks the masks once; the loop below reapplies them unchecked
    net, shard, main = distributed.wrap(model), (distributed.rank(), distributed.world()), distributed.is_main()
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(start, config.epochs):
        net.train()
        steps = tqdm(
            batches(split, info, config.batch_size, shuffle_seed=config.seed * 1000 + epoch, shard=shard, train=True),
            total=-(-len(split) // config.batch_size),
            desc=f"{desc} epoch {epoch + 1}/{config.epochs}",
            disable=not (config.progress and main),
            leave=False,
        )
        for inputs, labels in steps:
            loss = loss_fn(net(inputs), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            _mask(model, masks)
            if after_step is not None and main:
                after_step(model)
            steps.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        scheduler.step()
        if checkpoint is not None and main:
            _save_checkpoint(checkpoint, model, optimizer, scheduler, epoch + 1)
        distributed.barrier()
    model.eval()
    return model


@torch.inference_mode()
def predict_logits(model: nn.Module, info: DatasetInfo, split: Split, batch_size: int = 1000) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x) for x, _ in batches(split, info, batch_size)])


def evaluate(model: nn.Module, info: DatasetInfo, split: Split, batch_size: int = 1000) -> float:
    """Top-1 accuracy in [0, 1]."""
    if len(split) == 0:
        raise ValueError("cannot evaluate on an empty split")
    logits = predict_logits(model, info, split, batch_size)
    return float((logits.argmax(1) == split.labels).float().mean())
