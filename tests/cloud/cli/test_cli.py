"""The `prunefleet` CLI as users run it: console script, exit codes, tables."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cloud.build.store import PortfolioStore

PRUNEFLEET = str(Path(sys.executable).parent / "prunefleet")


def _run(*args, check=True):
    result = subprocess.run([PRUNEFLEET, *args], capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_portfolio_list_and_show(small_portfolio):
    manifest = PortfolioStore(small_portfolio).manifest()
    listed = _run("portfolio", "list", "--store", str(small_portfolio)).stdout
    assert manifest.portfolio_id in listed
    lines = listed.splitlines()
    assert max(len(line) for line in lines) <= 120
    assert lines[3].startswith("* vgg11-dense ")  # after the title, the header and its rule: the dense model first
    assert lines[3].split()[2:4] == ["fp32", "torch"]
    assert lines[-2].startswith("runs: ") and lines[-1].startswith("* the dense model (level 0 of shifter)")
    rows = iter(lines[4:-2])
    for entry in manifest.variants:  # each variant as torch serves it, then its ONNX file under ONNX Runtime
        torch_row, ort_row = next(rows), next(rows)
        assert torch_row.split()[:4] == [entry.name, "fp32", "torch", entry.variant_id[:12]]
        assert f"{entry.acc_delta_pp:+.2f}pp" in torch_row and torch_row.endswith(f"{entry.speedup_b32:.2f}x")
        assert ort_row.split()[:4] == [entry.name, "fp32", "ort", entry.onnx_id[:12]]
        assert ort_row.split()[-2:] == [f"{entry.ort_latency_ms_b32:.2f}", f"{entry.ort_speedup_b32:.2f}x"]
    assert next(rows, None) is None
    entry = manifest.variants[-1]
    for key in (entry.name, entry.variant_id, entry.variant_id[:10]):
        shown = json.loads(_run("portfolio", "show", "--store", str(small_portfolio), key).stdout)
        assert shown["variant_id"] == entry.variant_id and Path(shown["path"]).is_file()
    assert Path(shown["onnx_path"]).name == f"{entry.onnx_id}.onnx" and Path(shown["onnx_path"]).is_file()
    assert (shown["acc_delta_pp"], shown["speedup_b32"], shown["macs_ratio"]) == (
        entry.acc_delta_pp,
        entry.speedup_b32,
        entry.macs_ratio,
    )
    assert shown["dense"]["accuracy"] == manifest.dense.accuracy == manifest.variants[0].sparse_accuracy


def test_a_manifest_written_before_the_dense_model_and_onnx_files_still_lists_and_shows(small_portfolio, tmp_path):
    raw = json.loads((small_portfolio / "manifest.json").read_text())
    del raw["dense"]
    for entry in raw["variants"]:
        for key in ("acc_delta_pp", "speedup_b1", "speedup_b32", "macs_ratio", "precision", "backend", "parent"):
            del entry[key]
        for key in [k for k in entry if k.startswith(("onnx", "ort_"))]:
            del entry[key]
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    listed = _run("portfolio", "list", "--store", str(tmp_path)).stdout.splitlines()
    assert listed[-1].startswith("no dense model in this manifest")
    rows = listed[3:-2]
    assert [row.split()[:3] for row in rows] == [[v["name"], "fp32", "torch"] for v in raw["variants"]]
    assert all(row.endswith(" -") for row in rows)  # no speedup to show
    shown = json.loads(_run("portfolio", "show", "--store", str(tmp_path), raw["variants"][0]["name"]).stdout)
    assert (
        shown["dense"] is None and shown["acc_delta_pp"] is None and shown["accuracy"] == raw["variants"][0]["accuracy"]
    )
    assert (shown["precision"], shown["backend"], shown["onnx_id"], shown["onnx_path"]) == (
        "float32",
        "torch",
        None,
        None,
    )


def test_unknown_variant_and_missing_store_are_clear_errors(small_portfolio, tmp_path):
    result = _run("portfolio", "show", "--store", str(small_portfolio), "nope", check=False)
    assert result.returncode == 2 and "matches no variant" in result.stderr
    result = _run("portfolio", "list", "--store", str(tmp_path), check=False)
    assert result.returncode == 2 and "no portfolio" in result.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--model", "alexnet"], "unknown architecture 'alexnet'; known:"),
        (["--method", "magic"], "unknown method 'magic'; known:"),
        (["--rate", "1.5"], "rate must be in (0, 1)"),
    ],
)
def test_bad_build_arguments_fail_before_any_work(tmp_path, args, needle):
    result = _run("portfolio", "build", "--out", str(tmp_path / "p"), *args, check=False)
    assert result.returncode == 2 and needle in result.stderr
    assert not (tmp_path / "p" / "manifest.json").exists()


def test_missing_dataset_says_how_to_get_it(tmp_path):
    result = _run("portfolio", "build", "--out", str(tmp_path / "p"), "--data-dir", str(tmp_path), check=False)
    assert result.returncode == 2 and "apt-get install dataset-fashion-mnist" in result.stderr


def test_only_portfolio_build_imports_torch():
    """The operator commands and the cloud server start without torch; `portfolio build` has its flags."""
    probe = (
        "import sys; from cloud.cli import main; "
        "main._parser({}, sys.argv[1:]).parse_known_args(sys.argv[1:]); print('torch' in sys.modules)"
    )
    for argv in (
        ["fleet", "status", "--cloud", "c:1"],
        ["cloud", "serve", "--store", "s"],
        ["portfolio", "list", "--store", "s"],
    ):
        shown = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=60)
        assert shown.stdout.strip() == "False", (argv, shown.stderr)
    listed = _run("--help").stdout + _run("portfolio", "--help").stdout
    assert "train a model and derive a portfolio" in listed
    assert "--levels" in _run("portfolio", "build", "--help").stdout
