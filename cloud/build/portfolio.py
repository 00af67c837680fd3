"""Build a portfolio: train, prune with a method, compact every sparse model, store the variants.

The build owns what every method shares: the data, the store and its resumable work directory, the
surgery that turns each sparse model into a compact variant (with its equivalence check), or the check
that a model the method made compact itself is what its file rebuilds (`cloud.build.derive`), the
portfolio's dense model every variant is compared with (`cloud.build.reference`), and measuring and
publishing the variants. What is pruned, and how, is the method's (`cloud.build.methods`): the build
hands it a `BuildContext` and the method's own settings, and takes the sparse models it yields.

Training and scoring run on the build's `--device` (`cloud.build.devices`), resolved and checked first,
before any data is loaded; everything after training (surgery, the equivalence check, accuracy of the
variants, timing, the files) runs on the CPU, as the edges do.

Every variant also gets its ONNX file by default (`--no-onnx` skips them; without the `onnx` extra a
build that would make them stops before any work, saying how to install it), and with `--int8` an
int8 member of its own (`cloud.build.artifacts`).
"""

from __future__ import annotations

import json
import logging
import math
import time

import torch
from tqdm import tqdm

from cloud.build import data as build_data
from cloud.build import derive, devices, distributed, reference, timing
from cloud.build.config import BuildConfig
from cloud.build.methods import METHODS
from cloud.build.methods.base import BuildContext, Method
from cloud.build.reference import Reference
from cloud.build.settings import SettingsError
from cloud.build.store import DenseEntry, Manifest, PortfolioStore, VariantEntry, served_portfolio_id
from cloud.build.timing import Member
from common import models
from common.files import atomic_write_json
from common.registry import lookup

log = logging.getLogger(__name__)


def select_levels(compressions: list[float], targets: tuple[float, ...]) -> set[int]:
    """Indices of the levels nearest (in log scale) to each target compression; all when no targets."""
    if not targets:
        return set(range(len(compressions)))
    return {min(range(len(compressions)), key=lambda i: (abs(math.log(compressions[i] / t)), i)) for t in targets}


# Settings added after builds were stored, each with what a build stored before it did: such a build
# resumes at that value and is refused at another. (One that changes what an old build did, such as a
# method's new default, is not listed: the build is refused and says which setting.)
SETTINGS_ADDED = {"test_subset": 0}


def changed_settings(config: BuildConfig) -> list[str]:
    """The settings in which the build started in `config.out` differs from `config` (none there: [])."""
    path = PortfolioStore(config.out).work_dir / "settings.json"
    if not path.exists():
        return []
    before, settings = {**SETTINGS_ADDED, **json.loads(path.read_text())}, config.settings()
    return sorted(k for k in settings.keys() | before.keys() if settings.get(k) != before.get(k))


def _check_settings(config: BuildConfig, store: PortfolioStore) -> None:
    """A resumed build must use the settings it started with."""
    changed = changed_settings(config)
    if changed:
        raise SettingsError(
            f"{store.root} holds a build with other settings ({', '.join(changed)}); "
            "use another --out or remove its work/ folder"
        )
    path = store.work_dir / "settings.json"
    if not path.exists():
        atomic_write_json(path, config.settings())


def _log(entry: VariantEntry) -> None:
    log.info(
        "%s (%s): sparsity %.1f%%, %d params, accuracy %.2f%% (sparse %.2f%%)",
        entry.name,
        entry.precision,
        100 * entry.sparsity,
        entry.params,
        100 * entry.accuracy,
        100 * entry.sparse_accuracy,
    )


def _levels(context: BuildContext, method: Method, dense_params: int) -> tuple[list[Member], Reference | None]:
    """The members made of the levels the method yields (those nearest the targets), and, for a
    method whose level 0 is the dense model, that level as the reference (kept or not). On rank 0
    only: the others train their shards and derive nothing."""
    config = context.config
    planned = method.planned_compressions(config.method_settings)
    keep = select_levels(planned, config.targets)
    main = distributed.is_main()
    members, dense = [], None
    levels = method.levels(context, config.method_settings)
    for sparse in tqdm(levels, desc=f"{method.name} portfolio", total=len(planned), unit="level", disable=not main):
        if not main:
            continue
        derived = derive.derive_variant(sparse, context, dense_params) if sparse.level in keep else []
        for member in derived:
            _log(member.entry)
        members.extend(derived)
        if method.dense_level and sparse.level == 0:
            known = derived[0].entry.sparse_accuracy if derived else None  # the dense model's accuracy, measured
            dense = reference.from_level(sparse, context, method.name, dense_params, known)
    return members, dense


def _derive(context: BuildContext, method: Method) -> tuple[list[VariantEntry], DenseEntry | None]:
    """The timed variants and the dense model they are compared with (nothing on ranks other than 0)."""
    dense_params = models.count_params(context.new_model())
    members, dense = _levels(context, method, dense_params)
    if not method.dense_level:
        dense = reference.trained(context)  # every torchrun process trains its shard
    if not distributed.is_main():
        return [], None
    if dense is None:
        raise reference.DenseReferenceError(
            f"method {method.name} says its level 0 is the dense model, but it yielded no level 0"
        )
    log.info(
        "dense model (%s): %d params, accuracy %.2f%%",
        dense.entry.source,
        dense.entry.params,
        100 * dense.entry.accuracy,
    )
    return timing.time_members(members, context.data.info.input_shape, (dense.entry, dense.served))


def _device(config: BuildConfig) -> torch.device:
    """The build's device on this machine (each torchrun process its own GPU); raises DeviceError for a
    GPU that is not there and refuses --amp off CUDA, both before any data is loaded."""
    device = devices.resolve(config.device, distributed.local_rank())
    if config.train.amp and device.type != "cuda":
        raise devices.DeviceError(f"mixed precision (--amp) needs a CUDA device; --device {config.device} is {device}")
    log.info("training and scoring on %s", device)
    return device


def build(config: BuildConfig) -> Manifest | None:
    """Run the whole build; resumable, and atomic in what it publishes (the manifest goes last).
    Under torchrun every process trains its shard and rank 0 alone derives and publishes (the others
    return None)."""
    device = _device(config)
    distributed.init_from_env(device)
    torch.set_num_threads(config.threads)
    store = PortfolioStore(config.out)
    context = BuildContext(config, build_data.for_build(config), store, device)
    build_data.check_model_input(config.model, context.new_model, context.data.info)
    with torch.random.fork_rng(devices=[]):
        for path in (config.weights, config.reference_weights):  # weights that do not fit are refused
            if path is not None:  # before the build writes anything
                context.trained_model(path)
    if distributed.is_main():
        _check_settings(config, store)
    distributed.barrier()
    entries, dense = _derive(context, lookup(METHODS, "method", config.method))
    if not distributed.is_main():
        return None
    manifest = Manifest(
        portfolio_id=served_portfolio_id(entries),
        model=config.model,
        dataset=config.dataset,
        method=config.method,
        created=time.time(),
        settings=config.settings(),
        variants=tuple(entries),
        dense=dense,
    )
    store.write_manifest(manifest)
    return manifest
