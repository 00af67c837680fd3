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
    for entry in manifest.variants:
        assert entry.name in listed and entry.variant_id[:12] in listed
    entry = manifest.variants[-1]
    for key in (entry.name, entry.variant_id, entry.variant_id[:10]):
        shown = json.loads(_run("portfolio", "show", "--store", str(small_portfolio), key).stdout)
        assert shown["variant_id"] == entry.variant_id and Path(shown["path"]).is_file()


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
