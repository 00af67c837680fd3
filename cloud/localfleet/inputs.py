"""What a portfolio is asked: inputs of its own shape, from the data it was built on.

The load generator, the demo, the process cluster and the benchmarks send the edges uint8 pixels
`[N, C, H, W]`; the edge normalizes them with the variant's own mean and std. The pixels are the head
of the test split of the dataset the manifest's build settings name (`dataset`, `data_dir`,
`input_size`), loaded the way the build loaded it, and must have the shape the variants' spec states.
Where that data is not on this host, seeded random pixels of the portfolio's shape stand in, and the
log says so. The input shape comes from a variant file's header (every variant of a portfolio shares
it); a load generator with no store at hand reads it from the header of a variant its cloud serves.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import numpy as np

from cloud.build import data
from cloud.build.store import FLOAT32, PortfolioStore, StoreError
from common import datasets
from common.datasets import DatasetError
from common.errors import PrunefleetError
from common.files import short_id
from common.security import Transport
from common.variant_spec import MAX_HEADER_BYTES, VariantError, VariantSpec, header_spec
from protos import portfolio_pb2, portfolio_pb2_grpc

log = logging.getLogger(__name__)
RPC_TIMEOUT_S = 10.0
_MISSING = (DatasetError, FileNotFoundError, NotADirectoryError)  # the data is not on this host


class InputsError(PrunefleetError, ValueError):
    """The portfolio's data does not fit its variants; the message names both shapes."""


def spec_from_prefix(prefix: bytes) -> VariantSpec | None:
    """The spec in a variant file's header, read from the file's first bytes; None until they hold
    the whole header (`common.variant_spec.header_spec`: no allow-list applies, nothing is built)."""
    return header_spec(prefix)


def input_shape(store: PortfolioStore) -> tuple[int, int, int]:
    """The input shape `[C, H, W]` of the portfolio's members, from its first variant file's header."""
    variants = [v for v in store.manifest().variants if v.precision == FLOAT32]
    if not variants:
        raise StoreError(f"the portfolio in {store.root} has no variants")
    with open(store.variant_path(variants[0].variant_id), "rb") as f:
        prefix = f.read(8)
        if len(prefix) == 8:
            prefix += f.read(min(struct.unpack("<Q", prefix)[0], MAX_HEADER_BYTES))
    spec = spec_from_prefix(prefix)
    if spec is None:
        raise VariantError(f"variant {short_id(variants[0].variant_id)} is shorter than its header")
    return tuple(spec.input_shape)


def random_inputs(shape: tuple[int, int, int], count: int, seed: int = 0) -> np.ndarray:
    """Seeded uniform random uint8 pixels `[count, C, H, W]`."""
    return np.random.default_rng(seed).integers(0, 256, (count, *shape), dtype=np.uint8)


def inputs_for(
    shape: tuple[int, int, int], settings: dict, count: int, *, seed: int = 0, data_dir: Path | None = None
) -> np.ndarray:
    """Up to `count` test images of the dataset a build's `settings` name, checked against `shape`;
    random pixels of `shape` (with a warning) when that data is not on this host. `data_dir` stands
    for the settings' own when the data lives elsewhere here."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    name = settings.get("dataset") or "fashion-mnist"
    where = data_dir or settings.get("data_dir")
    try:
        loaded = data.load(
            name,
            Path(where) if where else None,
            input_size=tuple(settings.get("input_size") or ()),
            seed=int(settings.get("seed") or 0),
            val_fraction=float(settings.get("val_fraction") or 0.1),
        )
        if len(loaded.test) == 0:
            raise DatasetError(f"{name} holds no test images")
    except _MISSING as err:
        log.warning(
            "the %s data this portfolio was built on is not on this host (%s); sending %d random inputs "
            "of its shape %s instead",
            name,
            err,
            count,
            "x".join(map(str, shape)),
        )
        return random_inputs(shape, count, seed)
    images = datasets.head(loaded.test, min(count, len(loaded.test))).numpy().copy()  # not a view of the split
    if tuple(images.shape[1:]) != tuple(shape):
        raise InputsError(
            f"the {name} test images are {tuple(images.shape[1:])} but the portfolio's variants take {tuple(shape)}"
        )
    return images


def portfolio_inputs(
    store: PortfolioStore | Path, count: int, *, seed: int = 0, data_dir: Path | None = None
) -> np.ndarray:
    """Up to `count` uint8 inputs `[N, C, H, W]` for the portfolio in `store`: the test images of the
    dataset it was built on, or random pixels of its shape when that data is not on this host."""
    store = store if isinstance(store, PortfolioStore) else PortfolioStore(store)
    manifest = store.manifest()
    settings = manifest.settings or {"dataset": manifest.dataset}
    return inputs_for(input_shape(store), settings, count, seed=seed, data_dir=data_dir)


def served_input_shape(cloud: str, transport: Transport) -> tuple[int, int, int]:
    """The input shape of the portfolio a cloud serves, from the header of its smallest variant: the
    first chunks of one FetchVariant stream, which is cancelled once the header is in."""
    stub = portfolio_pb2_grpc.PortfolioServiceStub(transport.channel(cloud))
    listing = stub.ListVariants(portfolio_pb2.ListVariantsRequest(), timeout=RPC_TIMEOUT_S)
    if not listing.variants:
        raise StoreError(f"the cloud at {cloud} serves no variants")
    smallest = min(listing.variants, key=lambda v: v.size_bytes)
    stream = stub.FetchVariant(portfolio_pb2.FetchVariantRequest(variant_id=smallest.variant_id), timeout=RPC_TIMEOUT_S)
    prefix = b""
    try:
        for chunk in stream:
            prefix += chunk.data
            spec = spec_from_prefix(prefix)
            if spec is not None:
                return tuple(spec.input_shape)
    finally:
        stream.cancel()
    raise VariantError(f"variant {short_id(smallest.variant_id)} ended before its header did")


def served_inputs(cloud: str, transport: Transport, count: int, seed: int = 0) -> np.ndarray:
    """Random pixels of the shape of the portfolio a cloud serves, for a load generator that has no
    store at hand (so no record of the data); the log says so."""
    shape = served_input_shape(cloud, transport)
    log.warning(
        "no portfolio store given: sending %d random inputs of the served portfolio's shape %s",
        count,
        "x".join(map(str, shape)),
    )
    return random_inputs(shape, count, seed)
