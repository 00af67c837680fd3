import torch

from cloud.build.methods import masks as masking
from cloud.build.methods import shifter
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
