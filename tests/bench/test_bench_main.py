"""`prunefleet bench` names what to install when the benchmarks' dependencies are missing."""

import json
import subprocess
import sys

from bench.__main__ import INSTALL_HINT, REQUIREMENTS, SUITES, main


def test_a_missing_dependency_is_named_with_what_to_install(tmp_path):
    """Each requirement missing in turn, in one process (each would otherwise pay torch's import):
    `sys.modules[name] = None` makes every import of it fail, as in an environment without it; the
    module is put back before the next."""
    code = (
        "import contextlib, importlib, io, json, sys\n"
        "from bench.__main__ import main\n"
        "for module in sys.argv[2:]:\n"  # all present first: none is left half-imported by another's absence
        "    importlib.import_module(module)\n"
        "seen = {}\n"
        "for module in sys.argv[2:]:\n"
        "    kept, sys.modules[module] = sys.modules.get(module), None\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        code = main(['surgery', '--json', sys.argv[1]])\n"
        "    seen[module] = [code, err.getvalue()]\n"
        "    sys.modules[module] = kept\n"
        "print(json.dumps(seen))\n"
    )
    out = tmp_path / "out.json"
    done = subprocess.run(
        [sys.executable, "-c", code, str(out), *sorted(REQUIREMENTS)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert sorted(seen) == sorted(REQUIREMENTS)
    for module, (code, stderr) in seen.items():
        assert code == 2, (module, stderr)
        assert REQUIREMENTS[module] in stderr and INSTALL_HINT in stderr, (module, stderr)
        assert "Traceback" not in stderr
    assert not out.exists()


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


def _main(argv: list[str], capsys) -> tuple[int, str]:
    """`prunefleet bench ARGV` in this process: its exit code and what it printed to stderr."""
    try:
        code = main(argv)
    except SystemExit as exit_:  # refused by the parser
        code = exit_.code
    return code, capsys.readouterr().err


def test_a_suite_that_refuses_its_input_exits_2_naming_it_without_a_trace(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the suite's default work directory is relative
    empty = tmp_path / "no-data"
    empty.mkdir()
    out = tmp_path / "out.json"
    code, err = _main(["frontier", "--quick", "--json", str(out), "--data-dir", str(empty)], capsys)
    assert code == 2, err
    assert "prunefleet bench frontier: error: Fashion-MNIST file" in err and str(empty) in err
    assert "Traceback" not in err and not out.exists()


def test_only_is_refused_for_a_suite_without_parts(tmp_path, capsys):
    out = tmp_path / "out.json"
    code, err = _main(["surgery", "--only", "attacks", "--json", str(out)], capsys)
    assert code == 2 and "surgery has no parts to choose with --only" in err
    assert not out.exists()
