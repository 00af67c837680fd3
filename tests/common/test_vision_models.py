"""torchvision's classification networks as architectures: adapted to the constructor contract, compacted by
surgery with its check holding, rebuilt from the variant file alone, and never needed by a process that
serves only the zoo."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from bench.suites.torchvision import sparse_model
from cloud.build.compaction import surgery
from common import layer_shapes, models, variant, vision_models
from common.registry import UnknownNameError
from edge.loading import cache_loader
from edge.variants import VariantInfo


def _meta(arch: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return models.build(arch, kwargs)


def _stem(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def test_resnet18_takes_the_contracts_channels_classes_and_a_non_square_input():
    torch.manual_seed(0)
    gray = models.build("torchvision:resnet18", models.zoo_kwargs((1, 32, 48), 7, None, "torchvision:resnet18"))
    stem = _stem(gray)
    assert (stem.in_channels, stem.out_channels, stem.kernel_size, stem.stride, stem.padding) == (
        1,
        64,
        (7, 7),
        (2, 2),
        (3, 3),
    )
    assert gray.eval()(torch.randn(2, 1, 32, 48)).shape == (2, 7)
    color = _meta("torchvision:resnet18", in_channels=3, num_classes=1000)
    assert _stem(color).in_channels == 3 and color.fc.out_features == 1000


def test_width_goes_to_the_families_that_have_one_and_is_refused_elsewhere():
    full = models.count_params(_meta("torchvision:mobilenet_v2", width=1.0))
    assert models.count_params(_meta("torchvision:mobilenet_v2", width=0.5)) < full
    assert models.count_params(_meta("torchvision:mobilenet_v3_small", width=0.5)) < models.count_params(
        _meta("torchvision:mobilenet_v3_small")
    )
    # MNASNet's alpha is the name's times the width: mnasnet0_5 at width 2 is mnasnet1_0
    assert models.count_params(_meta("torchvision:mnasnet0_5", width=2.0)) == models.count_params(
        _meta("torchvision:mnasnet1_0")
    )
    with pytest.raises(vision_models.VisionModelError, match="width must be 1.0"):
        _meta("torchvision:resnet18", width=0.5)
    with pytest.raises(vision_models.VisionModelError, match="positive"):
        _meta("torchvision:mobilenet_v2", width=0.0)


def test_the_image_size_reaches_the_constructors_that_need_it():
    assert _meta("torchvision:vit_b_32", input_size=64).image_size == 64
    with pytest.raises(vision_models.VisionModelError, match="square"):
        _meta("torchvision:vit_b_32", input_size=[64, 96])
    with pytest.raises(ValueError, match="input_size"):
        _meta("torchvision:resnet18", input_size=[64, 0])


def test_default_width_and_stored_kwargs_keep_zoo_builds_as_they_were():
    assert models.default_width("torchvision:resnet18") == 1.0
    assert models.default_width("vgg11") == models.default_width("pkg.mod:fn") == 0.25
    before = {"in_channels": 1, "num_classes": 10, "input_size": 28, "width": 0.25}  # what builds stored so far
    assert json.dumps(models.zoo_kwargs((1, 28, 28), 10, None, "vgg11"), sort_keys=True) == json.dumps(
        before, sort_keys=True
    )
    assert models.zoo_kwargs((3, 32, 48), 10, 0.5)["input_size"] == [32, 48]


def test_the_zoo_vgg_takes_a_non_square_input():
    square = models.build("vgg11", models.zoo_kwargs((1, 28, 28), 10, 0.125))
    wide = models.build("vgg11", models.zoo_kwargs((1, 28, 56), 10, 0.125)).eval()
    assert wide(torch.randn(2, 1, 28, 56)).shape == (2, 10)
    assert wide.classifier.in_features == 3 * square.classifier.in_features  # last map 1x3 instead of 1x1


@pytest.mark.parametrize("name", ["torchvision:ResNet18", "torchvision:", "torchvision:os.system", "torchvision:a b"])
def test_malformed_names_are_refused_without_importing(name):
    with pytest.raises(UnknownNameError, match="malformed torchvision"):
        models.check_allowed(name)


def test_names_torchvision_does_not_classify_with_are_unknown():
    models.check_allowed("torchvision:fasterrcnn_resnet50_fpn")  # well-formed: judged only when built
    with pytest.raises(UnknownNameError, match="resnet18"):  # the known names are listed
        models.resolve("torchvision:fasterrcnn_resnet50_fpn")
    assert models.parse_allow_list(["torchvision:resnet18,vgg11"]) == ("torchvision:resnet18", "vgg11")


def test_a_regnet_builds_on_the_meta_device():
    model = _meta("torchvision:regnet_x_400mf", num_classes=10)
    assert all(p.is_meta for p in model.parameters())


def _compacted(arch: str, shape: tuple[int, int, int], width: float | None = None):
    torch.manual_seed(0)
    kwargs = models.zoo_kwargs(shape, 10, width, arch)
    model = sparse_model(models.build(arch, kwargs), torch.zeros(1, *shape), share=0.5)
    x = torch.randn(8, *shape, generator=torch.Generator().manual_seed(3))
    compact, report = surgery.compact(model, x[:1], check_inputs=x)
    spec = variant.VariantSpec(arch, kwargs, shape, 10, (0.5,) * shape[0], (0.25,) * shape[0], "shifter", 0.5, 0.0)
    return model, compact, report, spec, x


@pytest.mark.parametrize(
    ("arch", "shape", "width"),
    [("torchvision:resnet18", (1, 32, 48), None), ("torchvision:mobilenet_v2", (3, 32, 32), 0.5)],
)
def test_surgery_compacts_a_torchvision_model_and_the_file_alone_rebuilds_it(tmp_path, arch, shape, width):
    sparse, compact, report, spec, x = _compacted(arch, shape, width)
    with torch.no_grad():
        expected = compact(x)
        assert expected.std(0).max() > 0  # the check compared outputs that depend on the input
        assert (sparse(x) - expected).abs().max() <= 1e-4
    assert report.channels_removed > 0 and report.params_after < report.params_before
    data = variant.encode(compact, spec)
    rebuilt = variant.load_bytes(data).model
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), expected, atol=1e-5)
    path = tmp_path / "variant.safetensors"
    sha = variant.save(compact, spec, path)
    info = VariantInfo(sha, "v", 0.0, len(data), report.params_after)
    served = cache_loader(info, path)()  # as an edge loads it: verified, rebuilt, made ready to serve
    with torch.no_grad():
        assert torch.allclose(served.model(x), expected, atol=1e-4, rtol=1e-3)


def test_an_mnasnet_variant_rebuilds_without_torchs_version_records():
    torch.manual_seed(0)
    kwargs = models.zoo_kwargs((3, 32, 32), 10, 0.25, "torchvision:mnasnet0_5")
    model = models.build("torchvision:mnasnet0_5", kwargs).eval()
    spec = variant.VariantSpec(
        "torchvision:mnasnet0_5", kwargs, (3, 32, 32), 10, (0.5,) * 3, (0.25,) * 3, "dense", 0, 0
    )
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(variant.load_bytes(variant.encode(model, spec)).model(x), model(x))


def test_norm_layers_follow_their_stored_channels():
    group, layer, instance, prelu = (
        nn.GroupNorm(4, 32),
        nn.LayerNorm(32),
        nn.InstanceNorm2d(32, affine=True),
        nn.PReLU(32),
    )
    for module in (group, layer, instance, prelu):
        for name, tensor in list(module.named_parameters()):
            setattr(module, name, nn.Parameter(tensor[:8].clone()))
        layer_shapes.sync("m", module)
    assert (group.num_channels, layer.normalized_shape, instance.num_features, prelu.num_parameters) == (8, (8,), 8, 8)
    odd = nn.GroupNorm(4, 32)
    odd.weight, odd.bias = nn.Parameter(torch.ones(6)), nn.Parameter(torch.zeros(6))
    with pytest.raises(layer_shapes.LayerShapeError, match="do not divide"):
        layer_shapes.sync("odd", odd)


NO_TORCHVISION = textwrap.dedent(
    """
    import sys
    sys.modules["torchvision"] = None  # any import of torchvision now fails
    from pathlib import Path
    import torch
    import edge.cli
    from common import variant
    from edge.loading import cache_loader
    from edge.variants import VariantInfo
    zoo, zoo_sha, vision = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    served = cache_loader(VariantInfo(zoo_sha, "zoo", 0.0, zoo.stat().st_size, 0), zoo)()
    assert served.model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
    try:
        variant.load(vision)
    except variant.VariantError as err:
        print(err)
    """
)


def test_an_edge_without_torchvision_serves_the_zoo_and_says_what_a_torchvision_variant_needs(tmp_path):
    torch.manual_seed(0)
    zoo_kwargs = models.zoo_kwargs((1, 28, 28), 10, 0.125, "vgg11")
    zoo = tmp_path / "zoo.safetensors"
    zoo_sha = variant.save(models.build("vgg11", zoo_kwargs).eval(), spec_of("vgg11", zoo_kwargs, 1), zoo)
    vision_kwargs = models.zoo_kwargs((3, 32, 32), 10, 0.25, "torchvision:mnasnet0_5")
    vision = tmp_path / "vision.safetensors"
    model = models.build("torchvision:mnasnet0_5", vision_kwargs).eval()
    variant.save(model, spec_of("torchvision:mnasnet0_5", vision_kwargs, 3), vision)
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCHVISION, str(zoo), zoo_sha, str(vision)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout.strip() == "architecture torchvision:mnasnet0_5 needs torchvision: pip install 'prunefleet[vision]'"
    )


def spec_of(arch: str, kwargs: dict, channels: int) -> variant.VariantSpec:
    size = kwargs["input_size"]
    return variant.VariantSpec(
        arch, kwargs, (channels, size, size), 10, (0.5,) * channels, (0.25,) * channels, "dense", 0, 0
    )
