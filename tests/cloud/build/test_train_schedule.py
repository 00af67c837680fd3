"""The step schedule counts optimizer steps: a one-epoch fine-tune drops its rate within its epoch, and
a resumed run trains on the rates the uninterrupted one did."""

import pytest
import torch

from cloud.build.schedule import StepSchedule
from cloud.build.train import TrainConfig, train
from common import models

KWARGS = {"in_channels": 1, "input_size": 28, "num_classes": 10, "width": 0.125}


def test_milestones_are_fractions_of_all_the_steps():
    assert StepSchedule(0.1, 0.1, (0.5, 0.75), 1, 10).milestones == [5, 8]  # round(7.5) == 8
    assert StepSchedule(0.1, 0.1, (0.5, 0.75), 4, 10).milestones == [20, 30]
    assert StepSchedule(0.1, 0.1, (0.01, 0.999), 1, 10).milestones == [1, 9]  # after the first, before the end
    assert StepSchedule(0.1, 0.1, (0.5,), 1, 1).milestones == []  # a single step has nothing to drop after
    schedule = StepSchedule(0.1, 0.5, (0.5, 0.75), 1, 10)
    assert [schedule.rate(step) for step in range(10)] == pytest.approx([0.1] * 5 + [0.05] * 3 + [0.025] * 2)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith("weight")}


def test_a_one_epoch_run_stops_moving_at_its_milestone_when_the_rate_drops_to_zero(fashion_mnist):
    images, seen = fashion_mnist.train.subset(64, 0), []  # 4 steps of 16
    config = TrainConfig(epochs=1, batch_size=16, milestones=(0.5,), gamma=0.0, progress=False)
    torch.manual_seed(0)
    train(
        models.build("vgg11", KWARGS), fashion_mnist.info, images, config, after_step=lambda m: seen.append(_weights(m))
    )
    moved = [any(not torch.equal(a[k], b[k]) for k in a) for a, b in zip(seen, seen[1:])]
    assert moved == [True, False, False]  # step 2 trained at the full rate; steps 3 and 4 at zero


class _Stop(Exception):
    pass


def test_a_resumed_run_trains_on_the_same_rates_as_an_uninterrupted_one(fashion_mnist, tmp_path):
    info, images = fashion_mnist.info, fashion_mnist.train.subset(64, 0)
    config = TrainConfig(epochs=2, batch_size=16, milestones=(0.3, 0.7), gamma=0.2, progress=False)
    torch.manual_seed(0)
    start = models.build("vgg11", KWARGS).state_dict()

    def model() -> torch.nn.Module:
        net = models.build("vgg11", KWARGS)
        net.load_state_dict(start)
        return net

    whole = _weights(train(model(), info, images, config))
    steps, checkpoint = [], tmp_path / "level.pt"

    def stop_in_the_second_epoch(_: torch.nn.Module) -> None:
        steps.append(1)
        if len(steps) == 6:  # after the checkpoint of epoch 1 (4 steps), before its milestone at step 6
            raise _Stop

    with pytest.raises(_Stop):
        train(model(), info, images, config, checkpoint=checkpoint, after_step=stop_in_the_second_epoch)
    resumed = _weights(train(model(), info, images, config, checkpoint=checkpoint))
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
