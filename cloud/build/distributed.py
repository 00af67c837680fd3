"""Data-parallel training under `torchrun`: one process per worker, gloo on CPU, nccl with CUDA.

`torchrun --nproc-per-node N -m cloud.cli portfolio build ...` starts N copies of the build. Each
trains on its shard of every batch under DistributedDataParallel; only the main process (rank 0)
writes checkpoints, variants and the manifest, and the others wait for it at each barrier. Outside
torchrun (no WORLD_SIZE in the environment) everything here is a no-op and the build runs alone.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


def init_from_env(timeout_s: float = 1800.0) -> bool:
    """Join the process group torchrun describes; False when not under torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return True


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def wrap(model: nn.Module) -> nn.Module:
    """The model as the training loop should call it: under DDP when there are several processes
    (gradients averaged across them; parameters broadcast from rank 0 at wrap time)."""
    if world() == 1:
        return model
    return nn.parallel.DistributedDataParallel(model, broadcast_buffers=True)
