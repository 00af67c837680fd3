"""The rules the layout states, checked: import contracts hold (and catch a break), and the product's
files and functions stay small enough to read."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("protos", "common", "cloud", "edge", "bench")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
MAX_FILE_LINES, MAX_FUNCTION_LINES = 300, 50


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _copy_of_the_tree(tmp_path: Path) -> Path:
    copy = tmp_path / "tree"
    copy.mkdir()
    shutil.copy(ROOT / "pyproject.toml", copy)
    for package in PRODUCT:
        shutil.copytree(ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def test_the_import_contracts_hold():
    done = _lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("cloud/build/store.py", "import edge", "Cloud and edge never import each other"),
        ("edge/link.py", "import cloud.service.server", "Cloud and edge never import each other"),
        ("common/files.py", "import cloud", "Layers point down"),
        ("cloud/service/server.py", "import cloud.localfleet.demo", "Layers point down"),
        ("edge/runtime.py", "import bench", "Nothing in the product imports the benchmarks"),
        ("edge/fetcher.py", "import torch_pruning", "An edge install needs no torch-pruning"),
        ("common/variant.py", "import torchvision", "Only common.vision_models imports torchvision"),
        ("edge/backends/ort.py", "import torch", "The ONNX Runtime edge imports no torch"),
        ("edge/runtime.py", "import common.variant", "The ONNX Runtime edge imports no torch"),
    ],
)
def test_a_forbidden_import_breaks_a_contract(tmp_path, module, line, contract):
    tree = _copy_of_the_tree(tmp_path)
    target = tree / module
    if not target.exists():  # the module moved: any module of the same package will do
        target = next(p for p in target.parent.glob("*.py") if p.name != "__init__.py")
    target.write_text(target.read_text() + f"\n{line}  # noqa\n")
    done = _lint_imports(tree)
    assert done.returncode != 0
    assert contract in done.stdout.replace("\n", " ")


def _product_files():
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "_pb2" not in path.name:
                yield path


def test_product_files_and_functions_stay_small():
    too_long = []
    for path in _product_files():
        source = path.read_text()
        if source.count("\n") > MAX_FILE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
    assert not too_long, "\n".join(too_long)


def test_every_test_directory_is_collected():
    """pytest skips directories matching `norecursedirs` (its default skips any `build`): a test
    directory that mirrors a package of that name would silently never run."""
    import fnmatch
    import tomllib

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["norecursedirs"]
    test_dirs = {p.parent for p in (ROOT / "tests").rglob("test_*.py")}
    skipped = [
        d for d in test_dirs for part in d.relative_to(ROOT).parts if any(fnmatch.fnmatch(part, p) for p in patterns)
    ]
    assert not skipped, f"never collected: {sorted(map(str, skipped))}"
    assert any(d.name == "build" for d in test_dirs)  # the case the default would have skipped
