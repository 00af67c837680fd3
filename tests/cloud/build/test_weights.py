"""Starting a build from trained weights (`portfolio build --weights FILE`): every accepted form reads
to the same state, level 0 is the given model with exactly its accuracy, and bad weights are refused
by name: another architecture or width, a foreign file, non-tensors, a file over the bound, a method
that prunes at initialization, a resumed build with other weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cloud.build import weights
from cloud.build.config import BuildConfig
from cloud.build.methods import shifter
from cloud.build.settings import SettingsError
from cloud.build.store import PortfolioStore
from cloud.build.train import TrainConfig, evaluate, train
from cloud.cli.main import main
from common import datasets, models, variant
from common.variant import VariantSpec

SHAPE = (1, 28, 28)
FORMS = ("safetensors", "variant", "torch")


def _kwargs(width: float = 0.125) -> dict:
    return models.zoo_kwargs(SHAPE, 10, width)


def _write_idx(path: Path, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(bytes([0, 0, 8, array.ndim]) + dims + array.tobytes())


@pytest.fixture(scope="module")
def small_data(fashion_mnist, tmp_path_factory) -> Path:
    """A data directory of real Fashion-MNIST images, few enough for builds in seconds."""
    root = tmp_path_factory.mktemp("fashion-mnist")
    for prefix, split, n in (("train", fashion_mnist.train, 600), ("t10k", fashion_mnist.test, 500)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte", split.images[:n, 0].numpy())
        _write_idx(root / f"{prefix}-labels-idx1-ubyte", split.labels[:n].numpy())
    return root


@pytest.fixture(scope="module")
def trained(small_data) -> torch.nn.Module:
    """vgg11 at width 1/8 trained for a few steps on real images."""
    data = datasets.load("fashion-mnist", small_data)
    torch.manual_seed(3)
    model = models.build("vgg11", _kwargs())
    return train(model, data.info, data.train.subset(256, 0), TrainConfig(epochs=1, batch_size=32, progress=False))


def _save(model: torch.nn.Module, form: str, path: Path, wrap: str = "") -> Path:
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if form == "safetensors":
        save_file(state, path, metadata={"format": "pt"})
    elif form == "variant":
        spec = VariantSpec("vgg11", _kwargs(), SHAPE, 10, (0.286,), (0.353,), "dense", 0.0, 0.5)
        path.write_bytes(variant.encode(model, spec))
    else:
        torch.save({wrap: state, "epoch": 3} if wrap else state, path)
    return path


def _build(out: Path, data_dir: Path, *extra: str) -> int:
    threads = torch.get_num_threads()
    argv = ["portfolio", "build", "--out", str(out), "--data-dir", str(data_dir), "--model", "vgg11"]
    argv += ["--width", "0.125", "--subset", "128", "--batch-size", "64", "--check-images", "16", "--levels", "1"]
    try:
        return main([*argv, "--finetune-epochs", "1", "--no-progress", "--threads", "1", "--device", "cpu", *extra])
    finally:
        torch.set_num_threads(threads)


def test_every_form_reads_to_the_model_state(trained, tmp_path):
    expected = trained.state_dict()
    files = {form: _save(trained, form, tmp_path / f"w.{form}") for form in FORMS}
    files |= {
        f"torch:{wrap}": _save(trained, "torch", tmp_path / f"w.{wrap}", wrap) for wrap in ("state_dict", "model")
    }
    ddp = {f"module.{k}": v for k, v in expected.items()}  # how DistributedDataParallel names them
    torch.save(ddp, tmp_path / "ddp.pt")
    files["ddp"] = tmp_path / "ddp.pt"
    for name, path in files.items():
        found = weights.read(path)
        assert found.form == name.split(":")[0].replace("ddp", "torch"), name
        assert found.state.keys() == expected.keys() and all(torch.equal(found.state[k], expected[k]) for k in expected)
        model = models.build("vgg11", _kwargs())
        weights.fit(model, found, "vgg11", _kwargs())
        assert all(torch.equal(model.state_dict()[k], expected[k]) for k in expected)


@pytest.mark.parametrize("form", FORMS)
def test_level_0_is_the_given_model_with_its_accuracy(trained, small_data, tmp_path, form):
    path = _save(trained, form, tmp_path / f"weights.{form}")
    assert _build(tmp_path / "p", small_data, "--weights", str(path)) == 0
    manifest = PortfolioStore(tmp_path / "p").manifest()
    data = datasets.load("fashion-mnist", small_data)
    level_0 = next(v for v in manifest.variants if v.level == 0)
    assert level_0.accuracy == level_0.sparse_accuracy == evaluate(trained, data.info, data.test)
    served = variant.load(PortfolioStore(tmp_path / "p").variant_path(level_0.variant_id)).model
    images = datasets.normalize(data.test.images[:64], data.info.mean, data.info.std)
    with torch.no_grad():
        assert torch.allclose(served(images), trained.eval()(images), atol=1e-4)
    assert [v.level for v in manifest.variants] == [0, 1] and manifest.variants[1].sparsity > 0.15
    assert manifest.settings["weights"] == weights.fingerprint(path)
    # the given model is the dense model every variant is compared with
    assert manifest.dense.source == "level 0 of shifter (the given --weights)" and not manifest.dense.trained_by_build
    assert manifest.dense.accuracy == level_0.accuracy and manifest.dense.params == models.count_params(trained)


def test_weights_of_another_architecture_or_width_name_the_keys(tmp_path, small_data, capsys):
    vgg = models.build("vgg11", _kwargs(0.25))
    resnet = models.build("resnet20", _kwargs(0.25)).state_dict()
    with pytest.raises(weights.WeightsError) as missed:
        weights.load_into(vgg, resnet)
    message = str(missed.value)
    for kind in ("missing", "unexpected"):
        assert f" {kind} (" in message
    assert f"{len(vgg.state_dict())} missing" in message and f"{len(resnet)} unexpected" in message
    assert "features.0.weight" in message and "conv1.weight" in message and "more)" in message
    with pytest.raises(
        weights.WeightsError, match=r"mis-shaped \(features.0.weight: \[32, 1, 3, 3\] in the file, \[16, "
    ):
        weights.load_into(vgg, models.build("vgg11", _kwargs(0.5)).state_dict())
    # through the CLI: refused before any training, exit code 2
    path = _save(models.build("vgg11", _kwargs(0.5)), "safetensors", tmp_path / "wide.safetensors")
    assert _build(tmp_path / "p", small_data, "--weights", str(path)) == 2
    assert (
        "mis-shaped (features.0.weight: [32, 1, 3, 3] in the file, [8, 1, 3, 3] in the model" in capsys.readouterr().err
    )
    assert not list((tmp_path / "p" / "work").glob("*.pt"))


def test_a_variant_of_other_settings_is_refused(trained, tmp_path):
    found = weights.read(_save(trained, "variant", tmp_path / "v.safetensors"))
    with pytest.raises(
        weights.WeightsError, match="a variant of vgg11 with .*this build is vgg11 with .*'width': 0.25"
    ):
        weights.check_variant(found, "vgg11", _kwargs(0.25))
    with pytest.raises(weights.WeightsError, match="this build is resnet20"):
        weights.check_variant(found, "resnet20", _kwargs())


def test_files_that_are_not_weights_are_refused(tmp_path):
    cases = {
        "text.pt": (b"a text file, not weights\n", "neither a safetensors file, a variant file nor a torch checkpoint"),
        "empty.pt": (b"", "neither a safetensors file"),
        "broken.safetensors": (b"\x09\x00\x00\x00\x00\x00\x00\x00{not json", "not a well-formed safetensors file"),
        "pickle.pt": (b"\x80\x02\x40" + bytes(8), r"torch checkpoint of tensors \(Unsupported operand 64\)"),
    }
    for name, (data, needle) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(weights.WeightsError, match=needle):
            weights.read(tmp_path / name)
    torch.save({"features.0.weight": torch.zeros(2), "epoch_count": 3, "note": "hi"}, tmp_path / "mixed.pt")
    with pytest.raises(weights.WeightsError, match=r"2 entries are not named tensors: 'epoch_count' \(int\), 'note'"):
        weights.read(tmp_path / "mixed.pt")
    torch.save({"w": torch.tensor([1.0, float("nan")])}, tmp_path / "nan.pt")
    with pytest.raises(weights.WeightsError, match="NaN or infinite values: w"):
        weights.read(tmp_path / "nan.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(weights.WeightsError, match="holds a list, not a state dict"):
        weights.read(tmp_path / "list.pt")
    torch.save({"w": torch.zeros(1), "when": Path("x")}, tmp_path / "object.pt")  # no class runs on reading
    with pytest.raises(weights.WeightsError, match=r"\(Unsupported global: GLOBAL pathlib\."):
        weights.read(tmp_path / "object.pt")


def test_a_file_over_the_bound_is_refused_before_reading(tmp_path):
    torch.save({"w": torch.zeros(256)}, tmp_path / "big.pt")
    with pytest.raises(weights.WeightsError, match=r"big.pt is \d+ bytes, over the limit of 1000 bytes"):
        weights.read(tmp_path / "big.pt", max_bytes=1000)
    with pytest.raises(weights.WeightsError, match="cannot be read"):
        weights.read(tmp_path / "absent.pt")
    assert weights.MAX_WEIGHTS_BYTES == 1 << 30


def test_reconvene_refuses_weights_by_definition(trained, tmp_path, capsys):
    path = _save(trained, "safetensors", tmp_path / "w.safetensors")
    assert (
        main(["portfolio", "build", "--out", str(tmp_path / "p"), "--method", "reconvene", "--weights", str(path)]) == 2
    )
    assert "reconvene prunes at initialization by definition" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
    with pytest.raises(SettingsError, match="--rewind-iteration 10 .* with --weights"):
        BuildConfig(out=tmp_path / "p", weights=path, method_settings=shifter.ShifterConfig(rewind_iteration=10))


def test_a_resumed_build_takes_the_same_weights_wherever_they_are(trained, small_data, tmp_path, capsys):
    path = _save(trained, "safetensors", tmp_path / "w.safetensors")
    moved = shutil.copy(path, tmp_path / "moved.safetensors")
    assert BuildConfig(out=tmp_path, weights=path).settings() == BuildConfig(out=tmp_path, weights=moved).settings()
    assert _build(tmp_path / "p", small_data, "--weights", str(path)) == 0
    other = models.build("vgg11", _kwargs())
    assert _build(tmp_path / "p", small_data, "--weights", str(_save(other, "torch", tmp_path / "other.pt"))) == 2
    assert "holds a build with other settings (weights)" in capsys.readouterr().err
    recorded = json.loads((tmp_path / "p" / "work" / "settings.json").read_text())
    assert recorded["weights"] == weights.fingerprint(path) and str(tmp_path) not in json.dumps(recorded)
