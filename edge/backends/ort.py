"""The ONNX Runtime backend: every member with an ONNX file (float32 variants' artifacts and int8
members), served by ONNX Runtime without torch (`edge.ort_model`). A member listed without an ONNX
file (a portfolio built with `--no-onnx`) is left out.

A loaded member is checked against the listing before it serves: the file must say it is that member
(a float32 file names the variant it came from; an int8 file is the member itself), of its precision.
It is warmed up by one forward pass. Holding a session costs several times its file: on VGG-11s at
widths 0.5 and 1 (files of 2.2 to 35 MiB, float32 and int8), a process grew by 2.6 to 3.2 times the
file's size per session opened and run (ONNX Runtime keeps the model's initializers beside the tensors
it serves from; disabling weight prepacking saved no more than 11% and cost int8 four times its
latency). So a member counts `HELD_PER_FILE_BYTE` times its file against the memory budget.

This module imports no torch: `prunefleet-edge run --backend onnxruntime` runs where torch is not
installed (an import-linter contract in pyproject.toml keeps it so).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from common.files import short_id
from common.onnx_format import INT8
from edge.backends.base import Artifact, BackendSettings
from edge.ort_model import OrtConfig, OrtModel, OrtModelError, open_file
from edge.variants import LoadedVariant, VariantInfo

NAME = "onnxruntime"
HELD_PER_FILE_BYTE = 3.2  # memory a session holds per byte of its ONNX file (measured: see the docstring)


def start(threads: int) -> None:
    """Nothing process-wide: each session gets its own intra-op threads (`OrtConfig.threads`)."""
    del threads


def allowed(entries) -> tuple[str, ...]:
    """An ONNX file is a graph, not code: nothing is imported to build it, so no architecture needs
    allowing. Given entries are ignored."""
    del entries
    return ()


def _check_member(ort: OrtModel, info: VariantInfo) -> None:
    """The file must say it is the listed member, of its precision."""
    own = ort.sha256 if ort.precision == INT8 else ort.variant_id
    if own != info.variant_id or ort.precision != info.precision:
        raise OrtModelError(
            f"ONNX file {short_id(ort.sha256)} is the {ort.precision} form of {short_id(own)}, "
            f"not the listed {info.precision} member {short_id(info.variant_id)}"
        )


def held_bytes(file_bytes: int) -> int:
    """What a session of an ONNX file of `file_bytes` holds in memory (see the module docstring)."""
    return math.ceil(HELD_PER_FILE_BYTE * file_bytes)


def ready(ort: OrtModel, info: VariantInfo) -> LoadedVariant:
    """A checked ONNX model as the runtime holds it, warmed up."""
    variant = LoadedVariant(
        info, ort, ort.spec, ort.forward, held_bytes(ort.size_bytes), ort.mean, ort.std, ort.precision, backend=NAME
    )
    variant.forward(np.zeros((1, *ort.spec.input_shape), dtype=np.float32))
    return variant


class OrtBackend:
    """Serves members' ONNX files with ONNX Runtime, `settings.threads` intra-op threads per session."""

    name = NAME

    def __init__(self, settings: BackendSettings):
        self.settings = settings
        self._config = OrtConfig(threads=settings.threads, max_batch=settings.max_batch)

    def artifact(self, info) -> Artifact | str:
        if not info.onnx_id:
            return "no ONNX file is listed for it (a portfolio built with --no-onnx)"
        return Artifact(info.onnx_id, info.onnx_size_bytes, info.onnx_signature, ".onnx")

    def held_bytes(self, artifact: Artifact) -> int:
        return held_bytes(artifact.size_bytes)

    def loader(self, info: VariantInfo, artifact: Artifact, path: Path) -> Callable[[], LoadedVariant]:
        def load() -> LoadedVariant:
            ort = open_file(path, self._config, expected_sha256=artifact.file_id)
            _check_member(ort, info)
            return ready(ort, info)

        return load
