"""Masks that do not fit the model are refused with the tensor's name, before anything changes."""

import pytest
import torch

from cloud.build.methods.masks import dense_masks
from cloud.build.train import MaskError, apply_masks
from common import models


def _model():
    return models.build("vgg11", {"in_channels": 1, "input_size": 28, "num_classes": 10, "width": 0.125})


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: {**m, "nope.weight": torch.ones(3, dtype=torch.bool)}, "'nope.weight' names no tensor"),
        (lambda m: {**m, "features.0.weight": torch.ones(2, 2, dtype=torch.bool)}, "'features.0.weight' has shape"),
        (
            lambda m: {**m, "features.0.weight": torch.full_like(m["features.0.weight"], 0.5, dtype=torch.float32)},
            "must be boolean or hold only 0 and 1",
        ),
    ],
)
def test_a_mask_that_does_not_fit_is_refused_and_nothing_changes(change, message):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = {k: torch.zeros_like(v) for k, v in dense_masks(model).items()}
    with pytest.raises(MaskError, match=message):
        apply_masks(model, change(masks))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_zero_one_float_masks_are_accepted():
    model = _model()
    masks = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in dense_masks(model).items()}
    apply_masks(model, masks)
    assert all(float(model.state_dict()[k].abs().sum()) == 0 for k in masks)
