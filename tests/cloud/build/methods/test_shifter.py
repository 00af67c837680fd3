import pytest
import torch

from cloud.build.methods import masks as masking
from cloud.build.methods import shifter
from cloud.build.settings import SettingsError
from cloud.build.train import TrainConfig, apply_masks, evaluate, train
from common import models
from common.datasets import Dataset

KWARGS = {"in_channels": 1, "input_size": 28, "num_classes": 10, "width": 0.125}


def _tiny(data: Dataset, n: int = 1024) -> Dataset:
    return Dataset(data.info, data.train.subset(n, 0), data.val, data.test.subset(200, 0))


def test_global_magnitude_prunes_the_rate_of_survivors_and_keeps_the_largest():
    torch.manual_seed(0)
    model = models.build("vgg11", KWARGS)
    masks = masking.dense_masks(model)
    for level in range(1, 4):
        masks = masking.prune_global_magnitude(model, masks, 0.5)
        assert abs(masking.sparsity(masks) - (1 - 0.5**level)) < 1e-3
    state = model.state_dict()
    kept = torch.cat([state[n].abs()[m].flatten() for n, m in masks.items()])
    dropped = torch.cat([state[n].abs()[~m].flatten() for n, m in masks.items()])
    assert kept.min() >= dropped.max()


def test_fully_pruned_filters_take_their_batchnorm_channel_with_them():
    model = models.build("resnet20", KWARGS)
    pairs = masking.conv_batchnorm_pairs(model, torch.zeros(1, 1, 28, 28))
    assert pairs["conv1"] == "bn1" and pairs["layers.3.shortcut.0"] == "layers.3.shortcut.1"
    assert len(pairs) == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    masks = masking.dense_masks(model)
    masks["layers.0.conv1.weight"][1] = False
    masks = masking.with_batchnorm_masks(masks, pairs)
    assert not masks["layers.0.bn1.weight"][1] and not masks["layers.0.bn1.bias"][1]
    assert masks["layers.0.bn1.weight"].sum() == len(masks["layers.0.bn1.weight"]) - 1
    apply_masks(model, masks)
    model.eval()
    captured = {}
    model.layers[0].bn1.register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    model(torch.randn(2, 1, 28, 28))
    assert torch.count_nonzero(captured["out"][:, 1]) == 0


def test_masked_weights_stay_zero_through_training(fashion_mnist):
    data = _tiny(fashion_mnist)
    model = models.build("vgg11", KWARGS)
    masks = masking.prune_global_magnitude(model, masking.dense_masks(model), 0.8)
    apply_masks(model, masks)
    train(model, data.info, data.train, TrainConfig(epochs=1, progress=False), masks=masks)
    state = model.state_dict()
    assert all(torch.count_nonzero(state[n][~m]) == 0 for n, m in masks.items())


def test_imp_levels_rewind_and_resume(fashion_mnist, tmp_path):
    data = _tiny(fashion_mnist)
    config = shifter.ShifterConfig(levels=2, rate=0.5, rewind_iteration=1)
    train_config = TrainConfig(epochs=2, batch_size=64, progress=False)
    torch.manual_seed(0)
    first = list(shifter.run_imp(models.build("vgg11", KWARGS), data, train_config, config, tmp_path))
    assert [lv.level for lv in first] == [0, 1, 2]
    assert [round(masking.sparsity(lv.masks), 3) for lv in first] == [0.0, 0.5, 0.75]
    assert (tmp_path / "rewind.pt").exists() and not list(tmp_path.glob("*.train.pt"))
    # a rerun picks up every finished level from its checkpoint instead of training again
    (tmp_path / "level-2.pt").unlink()
    again = list(shifter.run_imp(models.build("vgg11", KWARGS), data, train_config, config, tmp_path))
    for a, b in zip(first[:2], again[:2]):
        assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    assert all(torch.equal(first[2].masks[k], again[2].masks[k]) for k in first[2].masks)
    model = models.build("vgg11", KWARGS)
    model.load_state_dict(again[2].state)
    assert evaluate(model, data.info, data.test) > 0.25  # chance is 0.1


def test_imp_from_trained_weights_keeps_them_as_level_0_and_fine_tunes_each_level(fashion_mnist, tmp_path, monkeypatch):
    data = _tiny(fashion_mnist, 256)
    torch.manual_seed(1)
    given = models.build("vgg11", KWARGS)
    state = {k: v.clone() for k, v in given.state_dict().items()}
    epochs = []
    trained_with = shifter.train

    def recording(model, info, split, config, **kwargs):
        epochs.append(config.epochs)
        return trained_with(model, info, split, config, **kwargs)

    monkeypatch.setattr(shifter, "train", recording)
    config = shifter.ShifterConfig(levels=2, rate=0.5, finetune_epochs=1)
    train_config = TrainConfig(epochs=3, batch_size=64, progress=False)
    found = list(shifter.run_imp(given, data, train_config, config, tmp_path, trained=True))
    assert epochs == [1, 1]  # no dense training; each pruning level fine-tunes for finetune_epochs
    assert all(torch.equal(found[0].state[k], state[k]) for k in state)  # level 0 is the given model
    rewind = torch.load(tmp_path / "rewind.pt", weights_only=True)["state"]
    assert all(torch.equal(rewind[k], state[k]) for k in state)  # and the rewind point
    assert [round(masking.sparsity(lv.masks), 3) for lv in found] == [0.0, 0.5, 0.75]
    fresh = models.build("vgg11", KWARGS)
    fresh.load_state_dict(state)
    level_1 = masking.prune_global_magnitude(fresh, masking.dense_masks(fresh), 0.5)
    assert all(torch.equal(level_1[k], found[1].masks[k]) for k in level_1)  # pruned from the given weights
    epochs.clear()
    again = list(shifter.run_imp(models.build("vgg11", KWARGS), data, train_config, config, tmp_path, trained=True))
    assert epochs == [] and all(torch.equal(again[2].state[k], found[2].state[k]) for k in state)  # resumed


def test_trained_weights_leave_no_dense_run_to_rewind_into(fashion_mnist, tmp_path):
    config = shifter.ShifterConfig(levels=1, rewind_iteration=5)
    with pytest.raises(SettingsError, match="--rewind-iteration 5 .* with --weights"):
        next(
            shifter.run_imp(
                models.build("vgg11", KWARGS), _tiny(fashion_mnist, 64), TrainConfig(), config, tmp_path, trained=True
            )
        )
