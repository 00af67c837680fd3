"""Flags generated from a settings dataclass: every supported type round-trips, a flag left out keeps
the dataclass default, and a bad value is an argparse error that names the flag."""

import argparse
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from cloud.build import portfolio, settings
from cloud.build.methods.structured import StructuredConfig
from cloud.build.settings import SettingsError
from common.files import atomic_write_json


@dataclass(frozen=True)
class Example:
    out: Path = field(metadata={"help": "required: it has no default"})
    count: int = field(default=3, metadata={"help": "an int"})
    ratio: float = field(default=0.25, metadata={"help": "a float in (0, 1)"})
    name: str = field(default="plain", metadata={"help": "a str"})
    on: bool = field(default=True, metadata={"help": "a bool"})
    values: tuple[float, ...] = field(default=(1.0, 2.5), metadata={"help": "numbers"})
    names: tuple[str, ...] = field(default=(), metadata={"help": "names"})
    maybe: Path | None = field(default=None, metadata={"help": "an optional path"})
    rounds: int = field(default=7, metadata={"flag": "--other-rounds", "help": "a renamed flag"})
    hidden: int = field(default=0, metadata={"cli": False})

    def __post_init__(self) -> None:
        if not 0 < self.ratio < 1:
            raise SettingsError(f"ratio must be in (0, 1), got {self.ratio}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="example")
    settings.add_arguments(parser, Example, "the example")
    return parser


def test_every_supported_type_round_trips():
    args = _parser().parse_args(
        "--out o --count 5 --ratio 0.5 --name x --no-on --values 3,4.5 --names a,b --maybe m --other-rounds 9".split()
    )
    expected = Example(Path("o"), 5, 0.5, "x", False, (3.0, 4.5), ("a", "b"), Path("m"), 9)
    assert settings.from_arguments(Example, args) == expected


def test_flags_left_out_keep_the_defaults_and_fixed_values_win():
    args = _parser().parse_args(["--out", "o", "--count", "5"])
    assert settings.given(Example, args) == ["--out", "--count"]
    assert settings.from_arguments(Example, args) == Example(Path("o"), count=5)
    assert settings.from_arguments(Example, args, hidden=4, count=6) == Example(Path("o"), count=6, hidden=4)
    with pytest.raises(SettingsError, match="has no field nope"):
        settings.from_arguments(Example, args, nope=1)


def test_an_empty_list_flag_is_the_empty_tuple():
    args = _parser().parse_args(["--out", "o", "--values", ""])
    assert settings.from_arguments(Example, args).values == ()


def test_validation_stays_in_the_dataclass():
    args = _parser().parse_args(["--out", "o", "--ratio", "1.5"])
    with pytest.raises(SettingsError, match=r"ratio must be in \(0, 1\)"):
        settings.from_arguments(Example, args)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--out", "o", "--count", "x"], "argument --count: invalid int value: 'x'"),
        (["--out", "o", "--values", "1,a"], "argument --values: expected comma-separated numbers, got '1,a'"),
        (["--count", "1"], "the following arguments are required: --out"),
        (["--out", "o", "--hidden", "1"], "unrecognized arguments: --hidden"),
    ],
)
def test_bad_values_are_argparse_errors_naming_the_flag(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(argv)
    assert exit_info.value.code == 2 and needle in capsys.readouterr().err


def test_help_shows_the_help_text_and_the_default():
    text = " ".join(_parser().format_help().split())
    assert "--values VALUES,... numbers (default: 1,2.5)" in text
    assert "--other-rounds ROUNDS a renamed flag (default: 7)" in text
    assert "--on, --no-on a bool (default: True)" in text
    assert "required: it has no default (required)" in text and "--hidden" not in text


def test_a_field_without_help_or_of_an_unsupported_type_is_refused():
    @dataclass(frozen=True)
    class NoHelp:
        count: int = 1

    @dataclass(frozen=True)
    class Unsupported:
        table: dict = field(default_factory=dict, metadata={"help": "a mapping"})

    with pytest.raises(SettingsError, match="NoHelp.count has no help text"):
        settings.add_arguments(argparse.ArgumentParser(), NoHelp, "no help")
    with pytest.raises(SettingsError, match="Unsupported.table: no command-line flag for type"):
        settings.add_arguments(argparse.ArgumentParser(), Unsupported, "unsupported")


def test_a_flag_taken_by_another_owner_is_refused_with_both_named():
    taken = {}
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser, Example, "the example", taken)

    @dataclass(frozen=True)
    class Other:
        on: int = field(default=1, metadata={"flag": "--no-on", "help": "clashes with the bool's negative form"})

    with pytest.raises(SettingsError, match="flag --no-on of the other clashes with --no-on of the example"):
        settings.add_arguments(parser, Other, "the other", taken)


def test_a_store_names_the_settings_it_was_built_with_that_differ(tmp_path):
    config = portfolio.BuildConfig(out=tmp_path, method="structured", method_settings=StructuredConfig())
    assert portfolio.changed_settings(config) == []  # nothing built there yet
    before = config.settings()
    atomic_write_json(tmp_path / "work" / "settings.json", {**before, "subset": 123})
    assert portfolio.changed_settings(config) == ["subset"]
    atomic_write_json(tmp_path / "work" / "settings.json", before)
    assert portfolio.changed_settings(config) == []
    # a store made before --test-subset existed measured on the whole test split: it resumes at 0, not at 500
    older = {k: v for k, v in before.items() if k != "test_subset"}
    atomic_write_json(tmp_path / "work" / "settings.json", older)
    assert portfolio.changed_settings(config) == []
    assert portfolio.changed_settings(replace(config, test_subset=500)) == ["test_subset"]
