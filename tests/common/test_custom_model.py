"""Bring your own model: an import path `package.module:function` works wherever a zoo name does, and
an edge builds one only when the path is on its allow-list, refusing others before importing them."""

import sys
import textwrap
import uuid

import pytest
import torch
from helpers import random_batchnorm_statistics, spec_for

from common import models, variant
from common.registry import ImportPathError, UnknownNameError

NETS = """
import torch
from torch import nn

BUILT_WITH = []


def tiny_cnn(*, in_channels=1, num_classes=10, input_size=28, width=1.0):
    channels = max(1, int(round(16 * width)))
    return nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                         nn.ReLU(), nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1, bias=False),
                         nn.BatchNorm2d(2 * channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(2 * channels, num_classes))


def not_a_module(*, in_channels=1, num_classes=10, input_size=28, width=1.0):
    return {"in_channels": in_channels}


def needs_depth(*, in_channels, num_classes, input_size, width, depth):
    return tiny_cnn(in_channels=in_channels)


def positional(in_channels, num_classes, input_size, width, /):
    return tiny_cnn(in_channels=in_channels)


def fails(*, in_channels=1, num_classes=10, input_size=28, width=1.0):
    raise RuntimeError("out of ideas")


NOT_CALLABLE = 3
"""
KWARGS = {"in_channels": 1, "num_classes": 10, "input_size": 28, "width": 0.5}


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """A fresh, not yet imported package `pf_user_<random>` with `nets` (constructors) and `broken`
    (raises on import); returns its name. Removed from sys.modules afterwards."""
    name = f"pf_user_{uuid.uuid4().hex[:12]}"
    package = tmp_path / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(textwrap.dedent(NETS))
    (package / "broken.py").write_text("raise RuntimeError('broken on purpose')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[module]


def _imported(package: str) -> bool:
    return any(m == package or m.startswith(package + ".") for m in sys.modules)


def test_allowed_import_path_builds_like_a_zoo_name(user_package):
    path = f"{user_package}.nets:tiny_cnn"
    assert models.resolve(path, allowed=[path]) is sys.modules[f"{user_package}.nets"].tiny_cnn
    model = models.build(path, KWARGS, allowed=(path,))
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_cloud_build_config_accepts_an_import_path(user_package, tmp_path):
    from cloud.build import portfolio

    path = f"{user_package}.nets:tiny_cnn"
    assert portfolio.BuildConfig(out=tmp_path / "p", model=path).model == path
    with pytest.raises(ImportPathError, match="has no attribute 'nope'"):
        portfolio.BuildConfig(out=tmp_path / "p", model=f"{user_package}.nets:nope")


def test_variant_of_an_allowed_import_path_round_trips(user_package, tmp_path):
    path = f"{user_package}.nets:tiny_cnn"
    torch.manual_seed(0)
    model = models.build(path, KWARGS, allowed=(path,)).eval()
    random_batchnorm_statistics(model)
    file = tmp_path / "v.safetensors"
    sha = variant.save(model, spec_for(path, KWARGS), file)
    loaded = variant.load(file, expected_sha256=sha, allowed_models=(path, "other.pkg:net"))
    assert loaded.spec.arch == path
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))


@pytest.mark.parametrize("allowed", [(), ("other.pkg:net",), ("mobilenetv2",)])
def test_variant_of_an_import_path_not_allowed_is_refused_without_importing(user_package, allowed):
    path = f"{user_package}.nets:tiny_cnn"
    data = variant.encode(torch.nn.Linear(1, 1), spec_for(path, KWARGS))  # never built: refused first
    with pytest.raises(variant.VariantError, match=f"import path '{path}' is not allowed here"):
        variant.load_bytes(data, allowed_models=allowed)
    with pytest.raises(models.ModelNotAllowedError, match=path):
        models.resolve(path, allowed=allowed)
    assert not _imported(user_package)


@pytest.mark.parametrize(
    "path",
    [
        "nets",
        "pkg.nets",
        "pkg:nets:tiny",
        "pkg..nets:tiny",
        ".pkg:tiny",
        "pkg.:tiny",
        "pkg:tiny.cnn",
        "pkg:",
        ":tiny",
        "pkg :tiny",
        " pkg:tiny",
        "pkg:tiny\n",
        "1pkg:tiny",
        "pkg:1tiny",
        "my-pkg:tiny",
        "pkg/nets:tiny",
        "class.nets:tiny",
        "pkg:def",
        "pkg:tiny()",
        "péché:tiny",
        "pkg:" + "x" * 300,
    ],
)
def test_malformed_import_paths_are_refused_even_when_listed(path):
    with pytest.raises((ImportPathError, UnknownNameError)):
        models.resolve(path, allowed=(path,))
    with pytest.raises((ImportPathError, UnknownNameError)):
        models.build(path, KWARGS, allowed=(path,))
    if ":" in path and path == path.strip():  # allow-list entries are stripped of blanks around them
        with pytest.raises(ImportPathError, match="import path"):
            models.parse_allow_list([path])


def test_unknown_name_lists_the_zoo_and_mentions_import_paths():
    with pytest.raises(UnknownNameError, match=r"unknown architecture 'alexnet'; known: .*mobilenetv2.*import path"):
        models.resolve("alexnet")


def test_missing_module_or_attribute_is_a_clear_error(user_package):
    missing = f"{user_package}_absent.nets:tiny_cnn"
    with pytest.raises(ImportPathError, match=f"cannot import '{missing}': no module named '{user_package}_absent'"):
        models.resolve(missing, allowed=[missing])
    with pytest.raises(ImportPathError, match="has no attribute 'nope'"):
        models.resolve(f"{user_package}.nets:nope", allowed=[f"{user_package}.nets:nope"])
    broken = f"{user_package}.broken:tiny_cnn"
    with pytest.raises(ImportPathError, match="RuntimeError: broken on purpose"):
        models.resolve(broken, allowed=[broken])


@pytest.mark.parametrize(
    "function, message",
    [
        ("not_a_module", "returned dict, not a torch.nn.Module"),
        ("needs_depth", "must accept the keyword arguments"),
        ("positional", "must accept the keyword arguments"),
        ("NOT_CALLABLE", "is not callable"),
        ("fails", "RuntimeError: out of ideas"),
    ],
)
def test_constructor_that_breaks_the_contract_is_a_clear_error(user_package, function, message):
    path = f"{user_package}.nets:{function}"
    with pytest.raises(models.ConstructorError, match=message):
        models.build(path, KWARGS, allowed=[path])
    data = variant.encode(torch.nn.Linear(1, 1), spec_for(path, KWARGS))
    with pytest.raises(variant.VariantError, match=message):
        variant.load_bytes(data, allowed_models=[path])


def test_allow_list_merges_flags_and_the_environment_variable():
    from edge import cli

    args = cli._parser().parse_args(
        [
            "run",
            "--cloud",
            "c:1",
            "--name",
            "e",
            "--cache",
            "/tmp/c",
            "--allow-model",
            "a.b:c",
            "--allow-model",
            "d:e,vgg11",
        ]
    )
    environ = {models.ALLOW_ENV: " x.y:z , a.b:c,,"}
    assert cli.allowed_models(args, environ) == ("a.b:c", "d:e", "vgg11", "x.y:z")
    assert (
        cli.allowed_models(cli._parser().parse_args(["run", "--cloud", "c:1", "--name", "e", "--cache", "c"]), {}) == ()
    )
    with pytest.raises(ImportPathError, match="malformed import path 'x y:z'"):
        cli.allowed_models(args, {models.ALLOW_ENV: "x y:z"})


def test_edge_refuses_to_start_with_a_malformed_allowed_path(tmp_path, capsys, monkeypatch):
    from edge import cli

    monkeypatch.setenv(models.ALLOW_ENV, "good.path:net,bad path:net")
    code = cli.main(["run", "--cloud", "127.0.0.1:1", "--name", "e", "--cache", str(tmp_path / "c")])
    assert code == 2 and "malformed import path 'bad path:net'" in capsys.readouterr().err
