"""Data-parallel training under `torchrun`: one process per worker, gloo on CPU, nccl with CUDA.

The backend follows the build's device (`--device`, see `cloud.build.devices`), never what the machine
happens to have: a CPU build on a GPU machine still uses gloo, since NCCL moves only CUDA tensors.

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


def backend(device: torch.device) -> str:
    """The collective backend for a build on `device`: nccl for CUDA, gloo for everything else."""
    return "nccl" if device.type == "cuda" else "gloo"


def local_rank() -> int | None:
    """This process's index on its machine under torchrun (`LOCAL_RANK`); None outside torchrun."""
    value = os.environ.get("LOCAL_RANK")
    return int(value) if value is not None else None


def init_from_env(device: torch.device, timeout_s: float = 1800.0) -> bool:
    """Join the process group torchrun describes, with the backend `device` needs (on CUDA, this
    process's GPU is made current first, as NCCL expects); False when not under torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend(device), timeout=timedelta(seconds=timeout_s))
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


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The model (already on `device`) as the training loop should call it: under DDP when there are
    several processes (gradients averaged across them; parameters broadcast from rank 0 at wrap time),
    bound to its GPU on CUDA and to no device id on the CPU."""
    if world() == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=True)
