"""The model as served: every zoo architecture, folded and channels-last, computes what the model as
loaded computes at any batch size; a model that cannot be folded is served unfolded; one that would be
served wrongly is built again and served as loaded, or refused with a message that names the problem."""

import pytest
import torch
from helpers import hammering
from torch import nn

from common import inference, models
from common.inference import NotServableError, for_inference

ZOO = ["vgg11", "vgg16", "resnet20", "resnet56", "mobilenetv2"]


def _trained_looking(model: nn.Module, seed: int) -> nn.Module:
    """BatchNorm statistics and affine parameters away from their identity initialization, so that
    folding them changes the convolutions' weights."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(0.5 * torch.randn(n, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
            module.weight.data.copy_(1 + 0.3 * torch.randn(n, generator=generator))
            module.bias.data.copy_(0.3 * torch.randn(n, generator=generator))
    return model.eval()


def _pair(arch: str, channels: int, size: int) -> tuple[nn.Module, nn.Module]:
    """The same model twice: one to serve (taken over), one to compare with."""
    kwargs = {"in_channels": channels, "num_classes": 10, "input_size": size, "width": 0.25}
    torch.manual_seed(0)
    original = _trained_looking(models.build(arch, kwargs), seed=1)
    torch.manual_seed(0)
    return _trained_looking(models.build(arch, kwargs), seed=1), original


@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
@pytest.mark.parametrize("arch", ZOO)
def test_every_architecture_served_folded_and_channels_last_computes_the_same(arch, channels, size):
    model, original = _pair(arch, channels, size)
    convs = sum(isinstance(m, nn.Conv2d) for m in original.modules())
    served = for_inference(model, (channels, size, size))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in served.modules())  # every BatchNorm follows a conv
    served_convs = [m for m in served.modules() if isinstance(m, nn.Conv2d)]
    assert len(served_convs) == convs
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in served_convs)
    with torch.inference_mode():
        for batch in (1, 2, 17):
            x = torch.randn(batch, channels, size, size)
            torch.testing.assert_close(served(x), original(x), atol=1e-4, rtol=1e-3)


class _Branchy(nn.Module):
    """A convolution's output read by its BatchNorm and by a concatenation: folding would change the
    concatenation, so the BatchNorm stays; one conv and BatchNorm pair run twice (a shared block) stays too; control
    flow on the input's values does not matter."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.shared, self.shared_bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.last, self.last_bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        y = self.bn(y) + torch.cat([y, y], 1)[:, :4]  # read again, inside a list
        for _ in range(2):
            y = self.shared_bn(self.shared(y))
        y = self.last_bn(self.last(y))
        return y.flatten(1) if x.sum() > -1e9 else -y.flatten(1)


class _Contiguous(nn.Module):
    """Views its activations as contiguous: it fails in channels-last layout."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y.view(y.shape[0], -1)


@pytest.mark.parametrize("shape", [(64, 32, 3, 3), (37, 5, 3, 3), (16, 1, 3, 3), (8, 3, 1, 1), (5, 7, 2, 4)])
def test_weights_go_channels_last_in_place_block_by_block(shape, monkeypatch):
    monkeypatch.setattr(inference, "BLOCK_BYTES", 4 * 5 * 9 * 4)  # several blocks, the last one partial
    torch.manual_seed(0)
    conv = nn.Conv2d(shape[1], shape[0], shape[2:], bias=False)
    conv.weight.data = torch.randn(shape)
    values, where = conv.weight.detach().clone(), conv.weight.data_ptr()
    inference._to_channels_last(conv)
    assert conv.weight.data_ptr() == where  # the same memory: no second copy of the tensor
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert conv.weight.stride() == torch.empty(shape, memory_format=torch.channels_last).stride()
    assert torch.equal(conv.weight, values)
    inference._to_channels_last(conv)  # already channels-last: left as it is
    assert conv.weight.data_ptr() == where and torch.equal(conv.weight, values)


def test_only_a_batchnorm_that_alone_reads_a_convolution_run_once_is_folded():
    torch.manual_seed(0)
    model = _trained_looking(_Branchy(), seed=2)
    x = torch.randn(3, 1, 8, 8)
    with torch.inference_mode():
        want = model(x)
    served = for_inference(model, (1, 8, 8)).model
    assert isinstance(served.bn, nn.BatchNorm2d) and isinstance(served.shared_bn, nn.BatchNorm2d)
    assert isinstance(served.last_bn, nn.Identity)
    with torch.inference_mode():
        torch.testing.assert_close(served(x), want, atol=1e-4, rtol=1e-3)


def test_a_model_is_made_ready_while_other_threads_run_models():
    """Finding what to fold touches only the model being made ready: requests on other models in
    other threads meanwhile all succeed and compute what they did."""
    kwargs = {"in_channels": 1, "num_classes": 10, "input_size": 28, "width": 0.25}
    serving = _trained_looking(models.build("resnet20", kwargs), seed=3)
    x = torch.randn(2, 1, 28, 28)
    with torch.inference_mode():
        want = serving(x)
    answers = []

    def serve():
        with torch.inference_mode():
            answers.append(torch.equal(serving(x), want))

    with hammering(serve) as failures:
        for arch in ZOO:
            for_inference(_trained_looking(models.build(arch, kwargs), seed=4), (1, 28, 28))
    assert failures == [] and answers and all(answers)


def test_a_model_that_would_be_served_wrongly_is_refused_by_name_or_built_again():
    with pytest.raises(NotServableError, match="fails at batch 1: RuntimeError: view size"):
        for_inference(_Contiguous(), (1, 8, 8))
    rebuilt = []

    def rebuild() -> nn.Module:
        rebuilt.append(_Contiguous())
        return rebuilt[-1]

    served = for_inference(_Contiguous(), (1, 8, 8), rebuild)
    assert rebuilt == [served] and not served.training
    with torch.inference_mode():
        assert served(torch.randn(2, 1, 8, 8)).shape == (2, 256)
