"""Training and evaluation with progress bars, seeds, resumable checkpoints, and masks kept applied.

Both run on the device they are given (the build's `--device`): the model, every batch and the masks
go there, and a trained model comes back to the CPU, where surgery, the equivalence check and the
variant files work. Mixed precision (`amp`: autocast and a gradient scaler) is for CUDA only.

Checkpoints are local files this process wrote itself, saved from CPU copies so a build resumes on
another device; they are read back with `torch.load(weights_only=True, map_location="cpu")` and
nothing else. With a `Teacher`, the loss is knowledge distillation (`distillation_loss`): the teacher
runs on the same device, in eval mode and without gradients, on the same batches as the student.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cloud.build import distributed
from cloud.build.checkpoints import load_state, save_state
from cloud.build.schedule import StepSchedule
from cloud.build.settings import SettingsError
from common.datasets import DatasetInfo, Split, StreamSplit, batches
from common.errors import PrunefleetError

Masks = dict[str, torch.Tensor]

log = logging.getLogger(__name__)


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
        metadata={"help": "step schedule: fractions of all the optimizer steps where the rate drops by --gamma"},
    )
    gamma: float = field(default=0.1, metadata={"help": "factor of the learning rate at each milestone"})
    seed: int = field(default=0, metadata={"cli": False, "help": "data order; the build passes its own --seed"})
    progress: bool = field(default=True, metadata={"help": "progress bars while training"})
    amp: bool = field(
        default=False, metadata={"help": "mixed-precision training (autocast and gradient scaling); CUDA only"}
    )

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size <= 0 or self.lr <= 0:
            raise SettingsError("epochs must be >= 0, batch_size and lr positive")
        if not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise SettingsError("momentum must be in [0, 1) and weight_decay >= 0")
        if any(not 0 < m < 1 for m in self.milestones):
            raise SettingsError(f"milestones are fractions in (0, 1), got {self.milestones}")


@dataclass(frozen=True)
class Teacher:
    """Knowledge distillation from a trained `model` (Hinton et al.): `alpha` weighs its outputs,
    softened by `temperature`, against the labels (`distillation_loss`)."""

    model: nn.Module
    alpha: float = 0.5
    temperature: float = 4.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0 or not self.temperature > 0:
            raise SettingsError(f"alpha must be in [0, 1] and temperature > 0, got {self.alpha}, {self.temperature}")

    def loss(self, logits: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.model(inputs)
        return distillation_loss(logits, target, labels, self.alpha, self.temperature)


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, alpha: float, temperature: float
) -> torch.Tensor:
    """alpha * T^2 * KL(teacher || student) + (1 - alpha) * cross-entropy, both softmaxes at temperature
    T, KL averaged over the batch (T^2 keeps the soft gradients at the scale of the hard ones)."""
    hard, t = F.cross_entropy(student, labels), temperature
    if alpha == 0:
        return hard
    student_log, teacher_log = F.log_softmax(student.float() / t, 1), F.log_softmax(teacher.float() / t, 1)
    soft = F.kl_div(student_log, teacher_log, reduction="batchmean", log_target=True)
    return alpha * t * t * soft + (1 - alpha) * hard


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


def _save_checkpoint(path: Path, model: nn.Module, parts: dict, epoch: int) -> None:
    state = {"model": model.state_dict(), **{name: part.state_dict() for name, part in parts.items()}, "epoch": epoch}
    save_state(path, state)


def _resume(path: Path | None, model: nn.Module, parts: dict) -> int:
    """Load a checkpoint into the model and the optimizer (and scaler, when saved with one);
    the optimizer moves its state to the parameters' device itself. One of other shapes (another pruning
    of this model) is not loaded, even in part: training starts over and overwrites it."""
    if path is None or not path.exists():
        return 0
    state = load_state(path)
    if {k: v.shape for k, v in state["model"].items()} != {k: v.shape for k, v in model.state_dict().items()}:
        log.warning("checkpoint %s holds a model of other shapes than this one: training it from the start", path)
        return 0
    model.load_state_dict(state["model"])
    for name, part in parts.items():
        if name in state:
            part.load_state_dict(state[name])
    return int(state["epoch"])


def _on_device(
    config: TrainConfig, device: torch.device, masks: Masks | None, model: nn.Module, teacher: Teacher | None
) -> Masks | None:
    """Check what training on `device` needs; move the teacher there; the masks, checked once (they are
    reapplied unchecked after every step), on it."""
    if config.amp and device.type != "cuda":
        raise SettingsError(f"mixed precision (--amp) needs a CUDA device; this build trains on {device}")
    if teacher is not None:
        teacher.model.to(device).eval()
    if masks:
        check_masks(model, masks)
        masks = {name: mask.to(device) for name, mask in masks.items()}
    return masks


def _epoch(net: nn.Module, steps, parts: tuple, step_done: Callable[[], None], device: torch.device) -> None:
    """One pass over `steps` with `parts`: optimizer, scaler (a no-op unless enabled) and teacher (or None)."""
    optimizer, scaler, teacher = parts
    net.train()
    for inputs, labels in steps:
        inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=scaler.is_enabled()):
            logits = net(inputs)
            loss = teacher.loss(logits, inputs, labels) if teacher is not None else F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        step_done()
        steps.set_postfix(loss=f"{loss.item():.3f}", refresh=False)


def _optimizing(model: nn.Module, config: TrainConfig, device: torch.device) -> tuple:
    """The optimizer and the gradient scaler (a pass-through without amp) for a model already on `device`."""
    sgd = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return sgd, torch.amp.GradScaler(device.type, enabled=config.amp)


def train(
    model: nn.Module,
    info: DatasetInfo,
    split: Split | StreamSplit,
    config: TrainConfig,
    masks: Masks | None = None,
    checkpoint: Path | None = None,
    desc: str = "train",
    after_step: Callable[[nn.Module], None] | None = None,
    device: torch.device | None = None,
    workers: int | None = None,
    teacher: Teacher | None = None,
) -> nn.Module:
    """SGD with momentum and a step schedule (`StepSchedule`) on `device` (default: the CPU), masked entries
    kept zero, resumed from `checkpoint`, distilled from `teacher` if given (left on `device`); returned on
    the CPU in eval mode.
    Under torchrun each process trains on its shard of every batch (DDP); only rank 0 writes the checkpoint
    and calls `after_step` (model on `device`). A streamed split is read by `workers` DataLoader processes."""
    device = torch.device("cpu") if device is None else torch.device(device)
    masks = _on_device(config, device, masks, model, teacher)
    optimizer, scaler = _optimizing(model.to(device), config, device)
    parts = {"optimizer": optimizer, **({"scaler": scaler} if config.amp else {})}
    start = _resume(checkpoint, model, parts)
    _mask(model, masks)
    net, shard, main = distributed.wrap(model, device), (distributed.rank(), distributed.world()), distributed.is_main()
    per_epoch = -(-len(split) // config.batch_size)  # the steps of an epoch (a torchrun shard's: about as many)
    schedule = StepSchedule(config.lr, config.gamma, config.milestones, config.epochs, per_epoch, start * per_epoch)
    schedule.apply(optimizer)  # over a resumed optimizer's rate too

    def step_done() -> None:
        schedule.advance(optimizer)
        _mask(model, masks)
        if after_step is not None and main:
            after_step(model)

    for epoch in range(start, config.epochs):
        seed = config.seed * 1000 + epoch
        steps = tqdm(
            batches(split, info, config.batch_size, shuffle_seed=seed, shard=shard, train=True, workers=workers),
            total=per_epoch,
            desc=f"{desc} epoch {epoch + 1}/{config.epochs}",
            disable=not (config.progress and main),
            leave=False,
        )
        _epoch(net, steps, (optimizer, scaler, teacher), step_done, device)
        if checkpoint is not None and main:
            _save_checkpoint(checkpoint, model, parts, epoch + 1)
        distributed.barrier()
    return model.to("cpu").eval()


@torch.inference_mode()
def _outputs(
    model: nn.Module, info: DatasetInfo, split, batch_size: int, device: torch.device | None, workers: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits over `split` and the labels of the batches they came from, both on the CPU."""
    found = next(iter(model.parameters()), torch.empty(0)).device  # a model without parameters: the CPU
    device = found if device is None else torch.device(device)
    model.to(device).eval()
    logits, labels = [], []
    try:
        for x, y in batches(split, info, batch_size, workers=workers):
            logits.append(model(x.to(device)).float().cpu())
            labels.append(y)
    finally:
        model.to(found)
    return torch.cat(logits), torch.cat(labels)


def predict_logits(
    model: nn.Module,
    info: DatasetInfo,
    split: Split | StreamSplit,
    batch_size: int = 1000,
    device: torch.device | None = None,
    workers: int | None = None,
) -> torch.Tensor:
    """The model's logits over `split`, computed on `device` (default: where the model is) and
    returned on the CPU; the model is left on the device it was found on."""
    return _outputs(model, info, split, batch_size, device, workers)[0]


def evaluate(
    model: nn.Module,
    info: DatasetInfo,
    split: Split | StreamSplit,
    batch_size: int = 1000,
    device: torch.device | None = None,
    workers: int | None = None,
) -> float:
    """Top-1 accuracy in [0, 1], computed on `device` (default: where the model is); a streamed split
    is read by `workers` DataLoader processes (None: the split's own number)."""
    if len(split) == 0:
        raise ValueError("cannot evaluate on an empty split")
    logits, labels = _outputs(model, info, split, batch_size, device, workers)
    return float((logits.argmax(1) == labels).float().mean())
