"""The edge's serving backends by name: `torch` (float32 variant files, eager PyTorch) and `onnxruntime`
(every member's ONNX file, int8 included, ONNX Runtime without torch). `edge.backends.base` says what
one offers.

The registry names modules, imported only when a backend is made (`create`), so an edge running the
ONNX Runtime backend never imports torch, and one running torch never needs onnxruntime. `default`
is torch where torch imports, else onnxruntime.
"""

from __future__ import annotations

import importlib

from common.registry import lookup
from edge.backends.base import Backend, BackendSettings

TORCH, ONNXRUNTIME = "torch", "onnxruntime"
BACKENDS = {  # name -> (module, class)
    TORCH: ("edge.backends.torch_backend", "TorchBackend"),
    ONNXRUNTIME: ("edge.backends.ort", "OrtBackend"),
}


def _module(name: str):
    module, _ = lookup(BACKENDS, "backend", name)
    return importlib.import_module(module)


def create(name: str, settings: BackendSettings) -> Backend:
    """The backend `name`, made with `settings` (its module imported now)."""
    return getattr(_module(name), BACKENDS[name][1])(settings)


def allowed_models(name: str, entries) -> tuple[str, ...]:
    """The import-path architectures backend `name` may build, from allow-list entries (flags and the
    environment): the torch backend's, checked; none for ONNX Runtime, which imports no architecture."""
    return _module(name).allowed(entries)


def start(name: str, threads: int) -> None:
    """Set up backend `name` for the process: the torch backend sizes torch's thread pool; ONNX Runtime
    sizes each session's own (`edge.backends.ort`)."""
    _module(name).start(threads)


def default() -> str:
    """torch where it imports, else onnxruntime (what `prunefleet-edge run` serves with unless told)."""
    try:
        importlib.import_module("torch")
    except ImportError:
        return ONNXRUNTIME
    return TORCH
