"""`prunefleet bench` names what to install when the benchmarks' dependencies are missing."""

import subprocess
import sys

import pytest

from bench.__main__ import INSTALL_HINT, REQUIREMENTS, SUITES


@pytest.mark.parametrize("module", sorted(REQUIREMENTS))
def test_a_missing_dependency_is_named_with_what_to_install(tmp_path, module):
    # `sys.modules[name] = None` makes every import of that module fail, as in an environment without it
    code = (
        f"import sys; sys.modules[{module!r}] = None; from bench.__main__ import main; "
        f"sys.exit(main(['surgery', '--json', {str(tmp_path / 'out.json')!r}]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert REQUIREMENTS[module] in done.stderr and INSTALL_HINT in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out.json").exists()


def test_an_unknown_suite_lists_the_known_ones(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "bench", "nosuch", "--json", str(tmp_path / "out.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert all(name in done.stderr for name in SUITES)


def test_every_suite_module_has_a_run_function():
    import importlib

    for module in SUITES.values():
        assert callable(importlib.import_module(module).run)
