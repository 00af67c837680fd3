"""Checkpoints a build writes and reads back: local files this process wrote itself, saved from CPU
copies so that a run on a GPU resumes anywhere, and read with `weights_only=True`."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from common.files import atomic_write_bytes


def on_cpu(value):
    """A copy of a state dict (nested dicts, lists and tuples of tensors and plain values) on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: on_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(on_cpu(item) for item in value)
    return value


def save_state(path: Path, state: dict) -> None:
    """Write a checkpoint atomically, from CPU copies: the weights of a GPU run resume anywhere."""
    buffer = io.BytesIO()
    torch.save(on_cpu(state), buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_state(path: Path) -> dict:
    """A checkpoint this build wrote (a local, trusted file), onto the CPU."""
    return torch.load(path, weights_only=True, map_location="cpu")
