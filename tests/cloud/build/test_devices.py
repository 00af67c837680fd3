"""The build's device on a machine without CUDA: every `--device` form resolved or refused, refusals
before any work, the same portfolio on `cpu` as on `auto`, training on the device it is given, and the
GPU check refusing to pretend."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cloud.build import devices, distributed
from cloud.build.config import BuildConfig
from cloud.build.methods import scorers, shifter
from cloud.build.settings import SettingsError
from cloud.build.store import PortfolioStore
from cloud.build.train import TrainConfig, train
from cloud.cli.main import main
from common import models

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA does")

TINY = ["--model", "vgg11", "--width", "0.125", "--subset", "300", "--epochs", "1", "--levels", "1"]
TINY += ["--check-images", "32", "--threads", "2", "--no-progress"]


@no_cuda
def test_auto_is_the_cpu_and_cpu_is_the_cpu():
    assert devices.resolve("auto") == torch.device("cpu")
    assert devices.resolve("auto", local_rank=1) == torch.device("cpu")
    assert devices.resolve("cpu") == torch.device("cpu")


@no_cuda
@pytest.mark.parametrize("text", ["cuda", "cuda:0", "cuda:3"])
def test_a_gpu_that_is_not_there_is_refused_with_what_was_asked_and_what_there_is(text):
    with pytest.raises(devices.DeviceError) as caught:
        devices.resolve(text)
    message = str(caught.value)
    assert repr(text) in message and "no CUDA GPU" in message
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("text", ["", "gpu", "CUDA", "cuda:", "cuda:-1", "cuda:x", "cpu:0", " cpu", "mps"])
def test_malformed_devices_are_refused_naming_the_accepted_forms(text):
    with pytest.raises(devices.DeviceError, match="auto, cpu, cuda or cuda:N"):
        devices.resolve(text)
    with pytest.raises(devices.DeviceError, match="auto, cpu, cuda or cuda:N"):
        BuildConfig(out=Path("unused"), device=text)


def test_the_backend_follows_the_build_device_not_the_machine():
    assert distributed.backend(torch.device("cpu")) == "gloo"
    assert distributed.backend(torch.device("cuda", 1)) == "nccl"


def test_amp_on_the_cpu_is_refused_by_the_settings_and_by_training(fashion_mnist):
    with pytest.raises(SettingsError, match="--amp"):
        BuildConfig(out=Path("unused"), device="cpu", train=TrainConfig(amp=True))
    model = models.build("vgg11", models.zoo_kwargs((1, 28, 28), 10, 0.125))
    with pytest.raises(SettingsError, match="CUDA"):
        train(model, fashion_mnist.info, fashion_mnist.train.subset(64, 0), TrainConfig(amp=True), device="cpu")


@no_cuda
def test_amp_through_the_cli_is_refused_on_cpu_and_on_auto_here(tmp_path, capsys):
    for device in ("cpu", "auto"):
        out = tmp_path / device
        assert main(["portfolio", "build", *TINY, "--device", device, "--amp", "--out", str(out)]) == 2
        assert "--amp" in capsys.readouterr().err
        assert not list(out.glob("variants/*"))


@no_cuda
def test_build_on_cuda_fails_before_any_work_with_the_message_on_stderr(tmp_path, capsys):
    out = tmp_path / "portfolio"
    assert main(["portfolio", "build", *TINY, "--device", "cuda", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "prunefleet: error:" in err and "'cuda'" in err and "no CUDA GPU" in err
    assert not list(out.glob("variants/*")) and not (out / "manifest.json").exists()
    assert not list(out.glob("work/*.pt"))  # nothing trained


def test_train_leaves_every_parameter_on_the_device_it_was_given(fashion_mnist):
    torch.manual_seed(0)
    model = models.build("vgg11", models.zoo_kwargs((1, 28, 28), 10, 0.125))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = TrainConfig(epochs=1, batch_size=64, progress=False)
    trained = train(model, fashion_mnist.info, fashion_mnist.train.subset(128, 0), config, device=torch.device("cpu"))
    assert trained is model and not model.training
    assert all(p.device == torch.device("cpu") for p in model.parameters())
    assert all(b.device == torch.device("cpu") for b in model.buffers())
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())  # it did train


@pytest.mark.parametrize("scorer", ["snip", "grasp", "synflow"])
def test_scoring_on_a_given_device_returns_cpu_scores_equal_to_the_default(scorer, fashion_mnist):
    torch.manual_seed(0)
    model = models.build("vgg11", models.zoo_kwargs((1, 28, 28), 10, 0.125))
    batches = scorers.scoring_batches(scorer, fashion_mnist, 2, 16, seed=0)
    default = scorers.score(model, scorer, 4.0, batches, (1, 28, 28), rounds=3)
    placed = scorers.score(model, scorer, 4.0, batches, (1, 28, 28), rounds=3, device=torch.device("cpu"))
    for want, got in zip(default, placed):
        assert want.keys() == got.keys()
        assert all(t.device.type == "cpu" and torch.equal(want[n], t) for n, t in got.items())


@no_cuda
def test_cpu_and_auto_build_the_same_portfolio_here(tmp_path, fashion_mnist):
    ids = {}
    for device in ("cpu", None):
        out = tmp_path / str(device)
        chosen = ["--device", device] if device else []
        assert main(["portfolio", "build", *TINY, *chosen, "--out", str(out)]) == 0
        manifest = PortfolioStore(out).manifest()
        assert [v.level for v in manifest.variants] == [0, 1]
        ids[device] = [v.variant_id for v in manifest.variants]
    assert ids["cpu"] == ids[None]


def test_a_resumed_build_does_not_depend_on_the_device_setting():
    base = BuildConfig(out=Path("unused"), method="shifter", method_settings=shifter.ShifterConfig(levels=1))
    assert base.settings() == BuildConfig(**{**base.__dict__, "device": "cuda:1"}).settings()
    assert "device" not in base.settings()


@no_cuda
def test_the_gpu_check_fails_fast_and_says_why():
    done = subprocess.run([sys.executable, "-m", "cloud.build.gpu_check"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "no CUDA GPU" in done.stderr and "FAILED" in done.stderr
