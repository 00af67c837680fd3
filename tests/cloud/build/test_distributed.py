"""A portfolio built data-parallel under torchrun, 2 processes with gloo on CPU, on a tiny subset."""

import json
import subprocess
import sys
from pathlib import Path

from cloud.build.portfolio import select_levels
from cloud.build.store import PortfolioStore

BIN = Path(sys.executable).parent


def test_torchrun_with_two_processes_builds_the_same_kind_of_portfolio(tmp_path, fashion_mnist):
    out = tmp_path / "portfolio"
    command = [
        str(BIN / "torchrun"),
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "cloud.cli",
        "portfolio",
        "build",
        "--model",
        "vgg11",
        "--width",
        "0.125",
        "--subset",
        "2048",
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--levels",
        "2",
        "--rate",
        "0.5",
        "--threads",
        "1",
        "--targets",
        "1,4",
        "--out",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("written to") == 1  # rank 0 alone publishes
    manifest = PortfolioStore(out).manifest()
    assert [v.level for v in manifest.variants] == [0, 2]  # nearest to 1x and 4x
    assert all(abs(v.accuracy - v.sparse_accuracy) < 1e-9 for v in manifest.variants)
    assert manifest.variants[0].accuracy > 0.3 and 0 < manifest.variants[1].macs <= manifest.variants[0].macs
    assert manifest.dense.level == 0 and manifest.dense.accuracy == manifest.variants[0].sparse_accuracy
    assert manifest.variants[1].macs_ratio == manifest.dense.macs / manifest.variants[1].macs
    settings = json.loads((out / "work" / "settings.json").read_text())
    assert settings["train"]["batch_size"] == 64 and settings["targets"] == [1.0, 4.0]


def test_levels_nearest_the_targets_in_log_scale():
    compressions = [1.0, 1.25, 1.5625, 1.953, 2.44, 3.05, 3.81, 4.77]
    assert select_levels(compressions, ()) == set(range(8))
    assert select_levels(compressions, (1, 2, 4)) == {0, 3, 6}
    assert select_levels(compressions, (256,)) == {7}
