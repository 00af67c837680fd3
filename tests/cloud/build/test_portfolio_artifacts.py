"""A portfolio's ONNX artifacts and int8 members, built for real on Fashion-MNIST: every variant's ONNX
file is its variant under ONNX Runtime, int8 members are members of their own with measured accuracy,
`portfolio quantize` adds to a built portfolio what `--int8` would have, and an ONNX file that differs
from its variant stops the build by name."""

import json
import shutil
import subprocess
import sys
import textwrap
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cloud.build import int8_members, onnx_export, portfolio, quantize
from cloud.build.methods import shifter
from cloud.build.settings import SettingsError
from cloud.build.store import INT8, ONNXRUNTIME, TORCH, PortfolioStore
from cloud.build.train import TrainConfig
from common import datasets, onnx_format, variant
from common.files import portfolio_id, sha256_file
from edge import ort_model

ROOT = Path(__file__).resolve().parents[3]
TRAIN = TrainConfig(epochs=1, batch_size=32, lr=0.02, progress=False)


def _config(out: Path, **changes) -> portfolio.BuildConfig:
    """vgg11 at width 1/8 on 800 training images: level 0 and one level pruned by half."""
    settings = dict(
        out=out,
        model="vgg11",
        width=0.125,
        subset=800,
        threads=1,
        check_images=32,
        calibration_images=128,
        train=TRAIN,
        method_settings=shifter.ShifterConfig(levels=1, rate=0.5),
    )
    return portfolio.BuildConfig(**{**settings, **changes})


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A portfolio built with --int8."""
    out = tmp_path_factory.mktemp("int8") / "p"
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    try:
        portfolio.build(_config(out, int8=True))
    finally:
        torch.set_num_threads(threads)
    return out


def test_every_variant_has_both_artifacts_and_its_onnx_file_is_the_variant(built, fashion_mnist):
    store = PortfolioStore(built)
    manifest = store.manifest()
    floats = [e for e in manifest.variants if e.precision == "float32"]
    assert [e.name for e in floats] == ["vgg11-L0", "vgg11-L1"]
    images = datasets.head(fashion_mnist.test, 200).numpy()
    for entry in floats:
        assert sha256_file(store.variant_path(entry.variant_id)) == entry.variant_id
        assert sha256_file(store.onnx_path(entry.onnx_id)) == entry.onnx_id
        assert entry.onnx_bytes == store.onnx_path(entry.onnx_id).stat().st_size and entry.backend == TORCH
        held = variant.load(store.variant_path(entry.variant_id), entry.variant_id)
        served = ort_model.open_file(store.onnx_path(entry.onnx_id), expected_sha256=entry.onnx_id)  # as an edge
        assert (served.variant_id, served.precision, served.spec) == (entry.variant_id, "float32", held.spec)
        with torch.inference_mode():
            want = held.model(datasets.normalize(torch.from_numpy(images), held.spec.mean, held.spec.std)).numpy()
        got = served.run(images)
        assert np.abs(got - want).max() <= 1e-4 and (got.argmax(1) == want.argmax(1)).all()
        assert entry.onnx_max_abs_diff <= 1e-4
    dense = manifest.dense
    assert sha256_file(store.variant_path(dense.variant_id)) == dense.variant_id  # stored to be timed again


def test_int8_members_have_their_own_ids_measured_accuracy_and_parent(built, fashion_mnist):
    store = PortfolioStore(built)
    manifest = store.manifest()
    by_id = {e.variant_id: e for e in manifest.variants}
    int8 = [e for e in manifest.variants if e.precision == INT8]
    assert [e.name for e in int8] == ["vgg11-L0-int8", "vgg11-L1-int8"]
    # the id is that of every member the cloud lists, the int8 ONNX members included
    assert manifest.portfolio_id == portfolio_id(by_id)
    for entry in int8:
        path, parent = store.member_path(entry), by_id[entry.parent]
        assert path.suffix == ".onnx" and sha256_file(path) == entry.variant_id == entry.onnx_id
        assert (entry.size_bytes, entry.backend) == (path.stat().st_size, ONNXRUNTIME)
        assert entry.size_bytes < 0.4 * parent.onnx_bytes
        data = path.read_bytes()
        meta = onnx_format.described(onnx_export.metadata(data))
        assert (meta.precision, meta.variant, meta.parent) == ("int8", parent.variant_id, parent.onnx_id)
        assert entry.accuracy == quantize.accuracy(data, fashion_mnist.test) == meta.spec.accuracy  # full test split
        assert abs(entry.accuracy - parent.accuracy) <= 0.02 and entry.accuracy > 0.3  # trained, and int8 kept it
        assert (entry.params, entry.macs, entry.level, entry.sparsity) == (
            parent.params,
            parent.macs,
            parent.level,
            parent.sparsity,
        )
        assert entry.ort_latency_ms_b1 is None and entry.onnx_max_abs_diff is None


def test_every_figure_comes_from_the_same_rounds_and_says_its_backend(built):
    manifest = PortfolioStore(built).manifest()
    dense = manifest.dense
    for entry in manifest.variants:
        assert entry.speedup_b32 == dense.latency_ms_b32 / entry.latency_ms_b32  # its own backend's figure
        assert entry.acc_delta_pp == pytest.approx(100 * (entry.accuracy - dense.accuracy))
        assert entry.latency_ms_b1_q1 <= entry.latency_ms_b1 <= entry.latency_ms_b1_q3
        if entry.precision == "float32":  # torch's figures, and its ONNX file's under ONNX Runtime
            assert entry.ort_speedup_b1 == dense.latency_ms_b1 / entry.ort_latency_ms_b1
            assert entry.ort_latency_ms_b32_q1 <= entry.ort_latency_ms_b32 <= entry.ort_latency_ms_b32_q3


def test_the_cloud_checks_every_file_and_lists_every_member_of_an_int8_portfolio(built, tmp_path):
    """The cloud lists every member, float32 and int8 (each edge takes those its backend serves), under the
    id of all of them, after checking every member's file; a damaged int8 file is refused."""
    import time

    from cloud.service.catalog import Catalog
    from cloud.service.fleet_db import FleetDB

    manifest = PortfolioStore(built).manifest()
    members = [e.variant_id for e in manifest.variants]
    assert any(e.precision == INT8 for e in manifest.variants)
    served = Catalog(FleetDB(tmp_path / "fleet.sqlite", clock=time.time)).add(built)
    assert sorted(e.variant_id for e in served.variants) == sorted(members)
    assert served.portfolio_id == manifest.portfolio_id == portfolio_id(members)
    shutil.copytree(built, tmp_path / "p")
    damaged = PortfolioStore(tmp_path / "p")
    int8 = next(e for e in manifest.variants if e.precision == INT8)
    with open(damaged.member_path(int8), "r+b") as f:
        f.seek(100)
        f.write(b"\xff")
    with pytest.raises(LookupError, match="does not hash to its id"):
        Catalog(FleetDB(tmp_path / "fleet2.sqlite", clock=time.time)).add(tmp_path / "p")


def _as_built_without_int8(source: Path, target: Path, onnx: bool) -> None:
    """A copy of the store as a build without --int8 (and, with onnx False, before ONNX files) left it."""
    shutil.copytree(source, target)
    shutil.rmtree(target / "work")
    raw = json.loads((target / "manifest.json").read_text())
    raw["variants"] = [v for v in raw["variants"] if v["precision"] == "float32"]
    for entry in raw["variants"] if not onnx else ():
        for key in [k for k in entry if k.startswith(("onnx", "ort_")) or k in ("precision", "backend", "parent")]:
            del entry[key]
    for path in (target / "variants").glob("*.onnx") if not onnx else ():
        path.unlink()
    (target / "manifest.json").write_text(json.dumps(raw))


def test_quantize_adds_what_int8_builds_and_a_rerun_changes_nothing(built, tmp_path):
    want = PortfolioStore(built).manifest()
    _as_built_without_int8(built, tmp_path / "p", onnx=False)
    store = PortfolioStore(tmp_path / "p")
    assert [e.onnx_id for e in store.manifest().variants] == [None, None]  # an old manifest still loads
    manifest, added = int8_members.add_int8(int8_members.QuantizeSettings(store.root))
    assert added == 2
    ids = [(e.name, e.variant_id, e.onnx_id, e.parent, e.accuracy) for e in manifest.variants]
    assert ids == [(e.name, e.variant_id, e.onnx_id, e.parent, e.accuracy) for e in want.variants]
    assert manifest.portfolio_id == want.portfolio_id and store.manifest() == manifest
    assert all(store.member_path(e).is_file() for e in manifest.variants)
    written = store.manifest_path.read_bytes()
    rerun = subprocess.run(
        [str(Path(sys.executable).parent / "prunefleet"), "portfolio", "quantize", "--store", str(store.root)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert "has its int8 member: nothing changed" in rerun.stdout and "vgg11-L1-int8  int8 ort" in rerun.stdout
    assert store.manifest_path.read_bytes() == written  # not even timed again


def test_an_interrupted_quantize_resumes_to_the_same_members(built, tmp_path):
    _as_built_without_int8(built, tmp_path / "p", onnx=True)
    store = PortfolioStore(tmp_path / "p")
    before = store.manifest_path.read_bytes()
    first, _ = int8_members.add_int8(int8_members.QuantizeSettings(store.root, threads=1))
    store.manifest_path.write_bytes(before)  # stopped before its manifest was written: files and record stay
    record = json.loads((store.work_dir / "int8.json").read_text())
    assert sorted(record.values()) == sorted(e.variant_id for e in first.variants if e.precision == INT8)
    again, added = int8_members.add_int8(int8_members.QuantizeSettings(store.root, threads=1))
    assert added == 2 and [e.variant_id for e in again.variants] == [e.variant_id for e in first.variants]


def test_a_resumed_build_without_onnx_keeps_its_variant_ids_and_makes_no_onnx(built, tmp_path):
    shutil.copytree(built, tmp_path / "p")  # its training checkpoints resume: nothing trains again
    threads = torch.get_num_threads()
    try:
        manifest = portfolio.build(_config(tmp_path / "p", onnx=False))
    finally:
        torch.set_num_threads(threads)
    floats = [e for e in PortfolioStore(built).manifest().variants if e.precision == "float32"]
    assert [e.variant_id for e in manifest.variants] == [e.variant_id for e in floats]
    assert all(e.onnx_id is None and e.ort_latency_ms_b1 is None for e in manifest.variants)
    assert manifest.portfolio_id == portfolio_id(e.variant_id for e in floats)


DIVERGENT = """
import torch
from torch import nn


class Divergent(nn.Module):
    def __init__(self, in_channels, num_classes, width):
        super().__init__()
        channels = max(1, round(16 * width))
        self.features = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1), nn.BatchNorm2d(channels),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x):
        logits = self.classifier(self.features(x))
        if torch.onnx.is_in_onnx_export():  # what the exporter records is not what the model computes
            logits = logits + 0.5
        return logits


def divergent(*, in_channels=1, num_classes=10, input_size=28, width=1.0):
    return Divergent(in_channels, num_classes, width)
"""


def test_an_onnx_file_that_differs_from_its_variant_stops_the_build_by_name(tmp_path, monkeypatch):
    package = f"pf_onnx_{uuid.uuid4().hex[:12]}"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / package / "nets.py").write_text(textwrap.dedent(DIVERGENT))
    monkeypatch.syspath_prepend(str(tmp_path))
    config = _config(tmp_path / "p", model=f"{package}.nets:divergent", width=1.0, subset=128)
    config = replace(config, method_settings=shifter.ShifterConfig(levels=0))
    threads = torch.get_num_threads()
    try:
        with pytest.raises(onnx_export.ExportError, match=r"nets:divergent-L0 float32 \(.*max abs diff 0\.5"):
            portfolio.build(config)
    finally:
        torch.set_num_threads(threads)
    assert not (tmp_path / "p" / "manifest.json").exists()  # nothing published
    assert not list((tmp_path / "p" / "variants").glob("*.onnx"))


BUILD_WITHOUT_ONNXRUNTIME = """
import sys
sys.modules["onnxruntime"] = None  # as where the onnx extra is not installed
from pathlib import Path
from cloud.build import portfolio
from cloud.build.settings import SettingsError
assert not portfolio.BuildConfig(out=Path("p"), onnx=False).onnx
try:
    portfolio.BuildConfig(out=Path("p"))
except SettingsError as err:
    print(err)
"""


def test_artifact_settings_are_checked_before_any_work():
    with pytest.raises(SettingsError, match="--int8 .* cannot go with --no-onnx"):
        portfolio.BuildConfig(out=Path("p"), int8=True, onnx=False)
    with pytest.raises(SettingsError, match="calibration_images"):
        portfolio.BuildConfig(out=Path("p"), calibration_images=0)
    assert portfolio.BuildConfig(out=Path("p")).onnx  # on by default
    said = subprocess.run(
        [sys.executable, "-c", BUILD_WITHOUT_ONNXRUNTIME],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=120,
    ).stdout
    assert "onnxruntime is not installed" in said and "pip install 'prunefleet[onnx]'" in said and "--no-onnx" in said
