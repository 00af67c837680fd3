"""The device a build trains, evaluates and scores on: `auto`, `cpu`, `cuda` or `cuda:N`.

`resolve` turns the `--device` text into a `torch.device` and refuses, with what was asked and what
this machine has, a GPU that is not there, so a build fails before it loads data or trains anything.
Under torchrun each process takes the GPU of its `LOCAL_RANK` (`auto` and `cuda`); an explicit
`cuda:N` is taken as written, which suits one process. Only training, evaluation during training and
pruning-at-init scoring run there: surgery, the equivalence check, timing and variant files stay on
the CPU, where the edges run the variants.
"""

from __future__ import annotations

import re

import torch

from common.errors import PrunefleetError

ACCEPTED = "auto, cpu, cuda or cuda:N (N a GPU index)"
_FORM = re.compile(r"auto|cpu|cuda(:\d+)?")


class DeviceError(PrunefleetError, ValueError):
    """A device that is malformed or absent from this machine; the message says what was asked and
    what the machine has."""


def check_form(text: str) -> None:
    """Refuse text that names no device form at all (nothing about this machine is looked at)."""
    if not isinstance(text, str) or not _FORM.fullmatch(text):
        raise DeviceError(f"device {text!r} is not one of {ACCEPTED}")


def available() -> str:
    """What this machine offers, in words, for messages."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return "this machine has no CUDA GPU (or this torch build has no CUDA support); use --device cpu or auto"
    return f"this machine has {count} CUDA GPU{'s' if count > 1 else ''} (cuda:0..cuda:{count - 1})"


def resolve(text: str, local_rank: int | None = None) -> torch.device:
    """The device `text` asks for on this machine. `auto`: `cuda:LOCAL_RANK` (or `cuda:0` outside
    torchrun) when CUDA is available, else the CPU. `cuda`: the same GPU, required. `cuda:N`: that GPU.
    Raises DeviceError when the form is wrong or the GPU is absent."""
    check_form(text)
    if text == "cpu":
        return torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if text == "auto" and count == 0:
        return torch.device("cpu")
    index = int(text.split(":")[1]) if ":" in text else (local_rank or 0)
    if index >= count:
        asked = f"{text!r}" + (
            f" (cuda:{index}, for local rank {local_rank})" if local_rank is not None and ":" not in text else ""
        )
        raise DeviceError(f"device {asked} was asked for, but {available()}")
    return torch.device("cuda", index)
