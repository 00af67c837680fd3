"""The learning-rate step schedule of training, counted in optimizer steps.

`TrainConfig.milestones` are fractions of all the steps a training takes; the rate drops by `gamma`
after each. Counted in epochs (as `torch.optim.lr_scheduler.MultiStepLR` stepped once an epoch
counts them), a milestone of a one-epoch fine-tune falls at its end and never applies, and a short
fine-tune never anneals. The rate is a function of the step alone, so a resumed training sets it
from the step it resumes at, whatever rate the checkpoint's optimizer held.
"""

from __future__ import annotations

import bisect

import torch


class StepSchedule:
    """The rate of each optimizer step of a training of `epochs` epochs of `steps_per_epoch` steps, and
    the optimizer's rate kept at the rate of the step it is at (`done` steps taken)."""

    def __init__(
        self, lr: float, gamma: float, milestones: tuple[float, ...], epochs: int, steps_per_epoch: int, done: int = 0
    ) -> None:
        total = epochs * steps_per_epoch
        self.lr, self.gamma, self.done = lr, gamma, done
        # after the first step and before the last, so every milestone drops the rate of some step
        self.milestones = sorted({min(total - 1, max(1, round(m * total))) for m in milestones if total > 1})

    def rate(self, step: int) -> float:
        """The rate of step `step` (from 0): `lr` times `gamma` for every milestone passed."""
        return self.lr * self.gamma ** bisect.bisect_right(self.milestones, step)

    def apply(self, optimizer: torch.optim.Optimizer) -> None:
        """Set every parameter group of `optimizer` to the rate of the step it takes next."""
        for group in optimizer.param_groups:
            group["lr"] = self.rate(self.done)

    def advance(self, optimizer: torch.optim.Optimizer) -> None:
        """One step taken: the optimizer at the next one's rate."""
        self.done += 1
        self.apply(optimizer)
