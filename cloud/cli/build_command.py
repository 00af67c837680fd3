"""`prunefleet portfolio build`: flags generated from the settings dataclasses, and the build they ask for;
and `prunefleet portfolio quantize`, which adds int8 members to a portfolio built without them.

The flags come in groups: the build's own (`BuildConfig`), the training recipe (`TrainConfig`) and one
group per registered pruning method (its settings dataclass), so a method registered in
`cloud.build.methods.METHODS` brings its flags along. No flag may mean two things: a clash between
groups stops the parser from being built. A method's flags apply only with that `--method`: given with
another, they are refused by name rather than silently ignored.
"""

from __future__ import annotations

import argparse
import dataclasses

from cloud.admin import operator_client
from cloud.build import portfolio, settings
from cloud.build.config import ONNX_PACKAGES, BuildConfig
from cloud.build.methods import METHODS
from cloud.build.settings import SettingsError
from cloud.build.train import TrainConfig
from cloud.cli import BUILD_HELP
from common.errors import PrunefleetError
from common.registry import lookup


class MissingExtraError(PrunefleetError, RuntimeError):
    """A command that needs an extra that is not installed; the message says how to install it."""


def add_parser(sub) -> argparse.ArgumentParser:
    """Add `build` to the `portfolio` subcommands; raises SettingsError when two groups share a flag."""
    parser = sub.add_parser(
        "build",
        help=BUILD_HELP,
        description="Train a model and derive a portfolio of pruned variants with one pruning method.",
    )
    taken = {"-h": "argparse", "--help": "argparse"}
    settings.add_arguments(parser.add_argument_group("build settings"), BuildConfig, "the build", taken)
    settings.add_arguments(parser.add_argument_group("training settings"), TrainConfig, "training", taken)
    for name, method in METHODS.items():
        group = parser.add_argument_group(f"{name} settings", f"{method.help}; with --method {name} only")
        settings.add_arguments(group, method.settings, f"method {name!r}", taken)
    return parser


def config_from_arguments(args: argparse.Namespace) -> BuildConfig:
    """The build's settings from parsed flags: the training seed is the build's `--seed`, and the method
    settings are the chosen method's (a flag of another method is an error that names both)."""
    common = settings.from_arguments(BuildConfig, args)
    method = lookup(METHODS, "method", common.method)
    for name, other in METHODS.items():
        foreign = settings.given(other.settings, args) if name != common.method else []
        if foreign:
            raise SettingsError(
                f"{', '.join(foreign)} {'is a setting' if len(foreign) == 1 else 'are settings'} of method "
                f"{name!r}, not of --method {common.method}"
            )
    return dataclasses.replace(
        common,
        train=settings.from_arguments(TrainConfig, args, seed=common.seed),
        method_settings=settings.from_arguments(method.settings, args),
    )


def run(args: argparse.Namespace) -> int:
    """Build the portfolio and print its table (on rank 0: under torchrun the other ranks print nothing)."""
    config = config_from_arguments(args)
    manifest = portfolio.build(config)
    if manifest is None:
        return 0
    print(operator_client.portfolio_table(manifest))
    print(f"portfolio {manifest.portfolio_id} written to {config.out}")
    return 0


def run_quantize(args: argparse.Namespace) -> int:
    """Add the missing int8 members to the portfolio in `--store` (`cloud.build.int8_members`) and
    print its table; says so when there was nothing to add."""
    try:
        from cloud.build import int8_members
    except ImportError as err:
        if err.name not in ONNX_PACKAGES:
            raise
        raise MissingExtraError(f"{err.name} is not installed: pip install 'prunefleet[onnx]'") from None
    settings = int8_members.QuantizeSettings(args.store, args.data_dir, args.threads)
    manifest, added = int8_members.add_int8(settings)
    print(operator_client.portfolio_table(manifest))
    if added:
        print(f"{added} int8 members added: portfolio {manifest.portfolio_id} written to {args.store}")
    else:
        print(f"every variant of portfolio {manifest.portfolio_id} has its int8 member: nothing changed")
    return 0
