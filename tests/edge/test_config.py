"""The agent's own policy values (`--window-s`, `--slo-ms`) follow the policy contract: the same defaults,
the same ranges, and a value out of range stops the agent at start-up with a message naming the flag."""

import dataclasses
import math

import pytest

from common import policy_contract as contract
from common.policy_contract import PolicyContractError
from edge import cli
from edge.config import POLICY_SETTINGS, AgentConfig

BASE = ["run", "--cloud", "127.0.0.1:1", "--name", "e", "--cache", "cache", "--insecure"]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _outside(setting: contract.Setting) -> list[float]:
    """Values just beyond each bound of `setting`, plus values no bound lets through."""
    values = [math.nan, math.inf, -1.0]
    if setting.low is not None:
        values.append(setting.low / 2 if setting.low > 0 else setting.low - 1)
    if setting.high is not None:
        values.append(setting.high * 2)
    return values


OUT_OF_RANGE = [(name, value) for name in POLICY_SETTINGS for value in _outside(contract.setting(name))]


@pytest.mark.parametrize(("name", "value"), OUT_OF_RANGE)
def test_an_out_of_range_flag_stops_the_agent_naming_the_flag(name, value, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main([*BASE, _flag(name), str(value)])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {_flag(name)}:" in err and name in err
    if math.isfinite(value):
        assert contract.setting(name).range_text in err


@pytest.mark.parametrize("name", POLICY_SETTINGS)
def test_a_flag_that_is_no_number_is_refused_naming_the_flag(name, capsys):
    with pytest.raises(SystemExit):
        cli._parser({}).parse_args([*BASE, _flag(name), "soon"])
    assert f"argument {_flag(name)}:" in capsys.readouterr().err


@pytest.mark.parametrize("name", POLICY_SETTINGS)
def test_defaults_are_the_contracts_on_the_flags_and_the_config(name):
    args = cli._parser({}).parse_args(BASE)
    default = contract.setting(name).default
    assert getattr(args, name) == default
    assert getattr(cli._config(args), name) == default
    assert {f.name: f.default for f in dataclasses.fields(AgentConfig)}[name] == default


def test_the_help_states_the_contracts_defaults_and_ranges(capsys):
    with pytest.raises(SystemExit):
        cli._parser({}).parse_args(["run", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for name in POLICY_SETTINGS:
        setting = contract.setting(name)
        assert f"default {setting.default:g} {setting.unit}, {setting.range_text} {setting.unit}" in help_text


@pytest.mark.parametrize("name", POLICY_SETTINGS)
def test_every_bound_the_contract_allows_is_accepted(name):
    setting = contract.setting(name)
    for bound in (setting.low, setting.high):
        if bound is None or not setting.contains(bound):
            continue
        args = cli._parser({}).parse_args([*BASE, _flag(name), repr(bound)])
        assert getattr(cli._config(args), name) == bound


@pytest.mark.parametrize(("name", "value"), OUT_OF_RANGE)
def test_the_config_refuses_what_the_contract_refuses(name, value):
    with pytest.raises(PolicyContractError, match=name):
        AgentConfig(cloud="127.0.0.1:1", name="e", cache_dir="cache", **{name: value})
