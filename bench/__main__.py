"""`python -m bench SUITE --json PATH [--quick]` (what `prunefleet bench` runs)."""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

from common.errors import PrunefleetError
from common.files import atomic_write_json
from common.profiling import cpu_model
from common.registry import UnknownNameError, lookup

SUITES = {
    name: f"bench.suites.{name}"
    for name in (
        "surgery",
        "shifter",
        "reconvene",
        "switching",
        "policy",
        "transfer",
        "reliability",
        "data",
        "torchvision",
        "frontier",
        "backends",
    )
}
# What the suites import beyond an edge's install: module -> the distribution that provides it.
REQUIREMENTS = {
    "torch_pruning": "torch-pruning",
    "matplotlib": "matplotlib",
    "hypothesis": "hypothesis",
    "hyperframe": "hyperframe",
    "packaging": "packaging",
    "PIL": "Pillow",
    "torchvision": "torchvision",
}
INSTALL_HINT = "pip install 'prunefleet[bench]'"


def missing_requirements() -> list[str]:
    """The distributions the suites need that this environment cannot import."""
    missing = []
    for module, distribution in REQUIREMENTS.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(distribution)
    return missing


def _meta(args: argparse.Namespace, seconds: float) -> dict:
    """How and where a run ran: every result names its machine, since figures differ between CPUs."""
    return {
        "suite": args.suite,
        "quick": args.quick,
        "threads": args.threads,
        "seconds": seconds,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_model": cpu_model(),
            "torch": torch.__version__,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prunefleet bench", description=__doc__)
    parser.add_argument("suite", help=f"one of: {', '.join(SUITES)}")
    parser.add_argument("--json", type=Path, required=True, help="where to write the results")
    parser.add_argument("--quick", action="store_true", help="fewer models and points (minutes, for CI)")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated parts of a suite with parts (reliability: "
        "faults, fuzz, load, attacks); the others' finished results are kept",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    try:
        module = lookup(SUITES, "benchmark suite", args.suite)
    except UnknownNameError as err:
        print(f"prunefleet bench: error: {err}", file=sys.stderr)
        return 2
    missing = missing_requirements()
    if missing:
        print(
            f"prunefleet bench: error: the benchmarks need {', '.join(missing)}, which this environment "
            f"lacks; install them with: {INSTALL_HINT}",
            file=sys.stderr,
        )
        return 2
    suite = importlib.import_module(module)
    if args.only and "only" not in inspect.signature(suite.run).parameters:
        print(f"prunefleet bench: error: {args.suite} has no parts to choose with --only", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    started = time.time()
    stem = args.json.with_suffix("")
    try:
        parts = {"only": tuple(p for p in args.only.split(",") if p)} if args.only else {}
        result = suite.run(quick=args.quick, data_dir=args.data_dir, work=stem.with_name(f"{stem.name}.work"), **parts)
    except PrunefleetError as err:  # a refused plan, missing data, a work directory of another plan: no trace
        print(f"prunefleet bench {args.suite}: error: {err}", file=sys.stderr)
        return 2
    result["meta"] = _meta(args, time.time() - started)
    atomic_write_json(args.json, result)
    if hasattr(suite, "figures"):
        for path in suite.figures(result, stem):
            print(f"figure: {path}", file=sys.stderr)
    print(json.dumps(result["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
