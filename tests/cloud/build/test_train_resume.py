"""Training resumes from its checkpoint, and only from one made for the model it trains."""

import torch

from cloud.build.train import TrainConfig, load_state, train
from common import models

KWARGS = {"in_channels": 1, "input_size": 28, "num_classes": 10}


def test_a_checkpoint_of_another_pruning_is_not_loaded_and_training_starts_over(fashion_mnist, tmp_path):
    info, checkpoint, images = fashion_mnist.info, tmp_path / "level.pt", fashion_mnist.train.subset(64, 0)

    def _data():
        return images

    config = TrainConfig(epochs=1, batch_size=32, progress=False)
    torch.manual_seed(0)
    train(models.build("vgg11", {**KWARGS, "width": 0.125}), info, _data(), config, checkpoint=checkpoint)
    assert load_state(checkpoint)["epoch"] == 1
    torch.manual_seed(1)
    other = models.build("vgg11", {**KWARGS, "width": 0.0625})  # the same level, pruned otherwise
    untouched = {k: v.clone() for k, v in other.state_dict().items()}
    trained = train(other, info, _data(), TrainConfig(epochs=0, batch_size=32, progress=False), checkpoint=checkpoint)
    assert all(torch.equal(v, untouched[k]) for k, v in trained.state_dict().items())  # nothing of it loaded
    again = train(models.build("vgg11", {**KWARGS, "width": 0.0625}), info, _data(), config, checkpoint=checkpoint)
    assert load_state(checkpoint)["epoch"] == 1 and again is not None  # trained from the start, checkpoint replaced
    shapes = {k: v.shape for k, v in load_state(checkpoint)["model"].items()}
    assert shapes == {k: v.shape for k, v in again.state_dict().items()}
