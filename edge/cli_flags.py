"""`prunefleet-edge`'s flags: every argparse definition of `prunefleet-edge run`, grouped by what they
set (identity, serving, the two policy settings an agent needs before a policy arrives, trust), and
the parser they make. `edge.cli` parses them into the agent's settings and runs it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import policy_contract as contract
from common import security
from common.registry import ALLOW_ENV
from edge import backends, enrolment
from edge.config import AgentConfig

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


def _add_identity_flags(run: argparse.ArgumentParser) -> None:
    """Who this edge is, where its cloud is, where it serves and caches."""
    run.add_argument("--cloud", required=True, metavar="HOST:PORT", help="the coordinator and portfolio service")
    run.add_argument("--name", required=True, help="this edge's unique name")
    run.add_argument("--host", default="127.0.0.1", help="address to serve on")
    run.add_argument("--advertise-host", default="", help="host the coordinator and clients use (default: --host)")
    run.add_argument("--port", type=int, default=50061, help="InferenceService port; 0 picks a free one")
    run.add_argument("--metrics-port", type=int, default=9101, help="Prometheus port; 0 picks a free one")
    run.add_argument("--cache", type=Path, required=True, help="content-addressed variant cache directory")
    run.add_argument(
        "--cache-margin-mib",
        type=float,
        default=AgentConfig.cache_margin_mib,
        help="keep up to this many MiB of variant files no portfolio needs (the newest), for a quick way back",
    )
    run.add_argument(
        "--stale-part-s",
        type=float,
        default=AgentConfig.stale_part_s,
        help="delete a partial download not written for this long (a needed one is then fetched from zero)",
    )


def _add_serving_flags(run: argparse.ArgumentParser) -> None:
    """How inference runs: threads, batches, memory, queueing, model optimization."""
    run.add_argument("--threads", type=int, default=1, help="inference threads (and concurrent inferences)")
    run.add_argument("--batch", type=int, default=8, help="typical batch size, profiled on arrival")
    run.add_argument("--max-batch", type=int, default=256)
    run.add_argument(
        "--memory-budget-mib",
        type=float,
        default=0.0,
        help="keep at most this many MiB of variants in memory; the rest load on demand (0: all)",
    )
    run.add_argument(
        "--batch-delay-ms",
        type=float,
        default=0.0,
        help="micro-batching: a request waits at most this long for others to share a forward pass (0: off)",
    )
    run.add_argument(
        "--max-pending", type=int, default=256, help="Predicts in progress or queued; beyond, RESOURCE_EXHAUSTED"
    )
    run.add_argument(
        "--backend",
        choices=sorted(backends.BACKENDS),
        default=None,
        help="what serves the members: torch (variant files) or onnxruntime (every member's ONNX file, int8 "
        "included; imports no torch); default: torch where torch is installed, else onnxruntime",
    )
    run.add_argument(
        "--optimize-models",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="serve every variant with BatchNorm folded into its convolutions and in channels-last "
        "layout (default); --no-optimize-models serves them as loaded: slower inference, "
        "faster loads",
    )


def _policy_value(name: str):
    """An argparse `type` for the policy setting `name`: a value of its type within its range in the
    policy contract, else an error that argparse reports under the flag's name."""
    wanted = contract.setting(name)

    def parse(text: str):
        try:
            value = wanted.kind(text)
        except ValueError:
            kind = "an integer" if wanted.kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{name} must be {kind}, got {text!r}") from None
        found = wanted.problem(value)
        if found is not None:
            raise argparse.ArgumentTypeError(found)
        return value

    return parse


def _add_policy_flags(run: argparse.ArgumentParser) -> None:
    """The agent's own values of two policy settings, until the coordinator's policy sets them: defaults
    and ranges from the policy contract."""
    uses = {
        "window_s": "telemetry window until the policy sets one",
        "slo_ms": "latency histogram gets a bucket here (the coordinator's policy sets the SLO itself)",
    }
    for name, use in uses.items():
        known = contract.setting(name)
        unit = f" {known.unit}" if known.unit else ""
        run.add_argument(
            f"--{name.replace('_', '-')}",
            type=_policy_value(name),
            metavar=known.unit.upper() or "N",
            default=known.default,
            help=f"{use}; default {known.default:g}{unit}, {known.range_text}{unit}",
        )


def _add_trust_flags(run: argparse.ArgumentParser, environ) -> None:
    """What this edge trusts: its certificates, the cloud's signing key, import-path architectures."""
    run.add_argument(
        "--allow-model",
        action="append",
        dest="allow_models",
        metavar="PACKAGE.MODULE:FUNCTION",
        help="also build variants of this import-path architecture (repeatable; adds to the "
        f"comma-separated {ALLOW_ENV}); zoo architectures are always allowed; the onnxruntime backend builds none",
    )
    security.add_arguments(run, token=False, environ=environ)
    enrolment.add_arguments(run)
    run.add_argument(
        "--verify-key",
        type=Path,
        default=None,
        help="the cloud's Ed25519 public key (default: DIR/signing.pub of --certs)",
    )


def parser(environ=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunefleet-edge", description="The prunefleet edge agent.")
    parser.add_argument("--log-level", default="INFO", choices=LOG_LEVELS, type=str.upper)
    run = parser.add_subparsers(dest="command", required=True).add_parser("run", help="run an edge agent")
    _add_identity_flags(run)
    _add_serving_flags(run)
    _add_policy_flags(run)
    _add_trust_flags(run, environ)
    # the log level may also come after `run`; SUPPRESS keeps the top-level value when it does not
    run.add_argument("--log-level", default=argparse.SUPPRESS, choices=LOG_LEVELS, type=str.upper)
    return parser
