"""`python -m cloud.build.gpu_check` (`make gpu-check`): does a build on CUDA work on this machine?

One small shifter build on `--device cuda` (vgg11 at width 1/8 on 2000 Fashion-MNIST images, one
epoch, two pruning levels), and the same with two processes under torchrun (NCCL, one GPU each) when
the machine has two GPUs. Every variant file those builds write is then loaded on the CPU as an edge
loads it (`common.variant.load`) and its test accuracy, evaluated again on the CPU, must be within
half a point of the accuracy its manifest states: what was trained on the GPU is what the edges get.
It takes a few minutes at most on a machine with a GPU. Without CUDA it stops at once with a message
and exit code 1, since there is nothing to check.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from cloud.build.store import PortfolioStore
from cloud.build.train import evaluate
from common import datasets, variant
from common.errors import PrunefleetError

TOLERANCE = 0.005  # half a point of accuracy
BUILD_FLAGS = ["--model", "vgg11", "--width", "0.125", "--subset", "2000", "--epochs", "1", "--levels", "2"]


class CheckFailed(PrunefleetError, RuntimeError):
    """One step of the check went wrong; the message says which and why."""


def build_command(out: Path, data_dir: Path | None, processes: int) -> list[str]:
    """The `portfolio build` on CUDA, run as its own program (under torchrun for several processes)."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    data = ["--data-dir", str(data_dir)] if data_dir else []
    return [
        *launcher,
        "-m",
        "cloud.cli",
        "portfolio",
        "build",
        "--device",
        "cuda",
        *BUILD_FLAGS,
        *data,
        "--out",
        str(out),
    ]


def run_build(out: Path, data_dir: Path | None, processes: int) -> None:
    command = build_command(out, data_dir, processes)
    print(f"gpu-check: building on CUDA with {processes} process{'es' if processes > 1 else ''}", flush=True)
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise CheckFailed(f"the build with {processes} process(es) exited {done.returncode}:\n{done.stderr[-3000:]}")


def check_variants(out: Path, data: datasets.Dataset) -> int:
    """Load every variant of the portfolio at `out` on the CPU and compare its test accuracy with the
    manifest's; returns how many were checked."""
    manifest = PortfolioStore(out).manifest()
    if not manifest.variants:
        raise CheckFailed(f"the build at {out} wrote no variant")
    for entry in manifest.variants:
        loaded = variant.load(PortfolioStore(out).variant_path(entry.variant_id), entry.variant_id)
        accuracy = evaluate(loaded.model, data.info, data.test, device=torch.device("cpu"))
        if abs(accuracy - entry.accuracy) > TOLERANCE:
            raise CheckFailed(
                f"variant {entry.name}: accuracy on the CPU {100 * accuracy:.2f}%, manifest says "
                f"{100 * entry.accuracy:.2f}% (more than {100 * TOLERANCE:.1f} points apart)"
            )
        print(f"gpu-check: {entry.name} accuracy {100 * accuracy:.2f}% on the CPU, as built", flush=True)
    return len(manifest.variants)


def run(work: Path, data_dir: Path | None) -> int:
    """Every step of the check; raises CheckFailed at the first that goes wrong."""
    if not torch.cuda.is_available():
        raise CheckFailed(
            "no CUDA GPU here (torch.cuda.is_available() is False"
            f"{'' if torch.version.cuda else '; this torch build has no CUDA support'}): "
            "run the GPU check on a machine with a GPU and a CUDA build of torch"
        )
    data = datasets.load("fashion-mnist", data_dir)
    runs = [1, 2] if torch.cuda.device_count() >= 2 else [1]
    checked = 0
    for processes in runs:
        out = work / f"portfolio-{processes}"
        run_build(out, data_dir, processes)
        checked += check_variants(out, data)
    if len(runs) == 1:
        print("gpu-check: one GPU only, the two-process torchrun build was skipped", flush=True)
    return checked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cloud.build.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="where Fashion-MNIST's files are")
    parser.add_argument("--work", type=Path, default=None, help="keep the portfolios here (default: a temporary one)")
    args = parser.parse_args(argv)
    try:
        if args.work is not None:
            checked = run(args.work, args.data_dir)
        else:
            with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
                checked = run(Path(work), args.data_dir)
    except PrunefleetError as err:
        print(f"gpu-check: FAILED: {err}", file=sys.stderr)
        return 1
    print(f"gpu-check: passed ({checked} variants built on CUDA match on the CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
