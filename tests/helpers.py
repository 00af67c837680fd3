"""Helpers shared by the tests: polling, concurrent callers, variant specs and small real variant stores."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from cloud.build.store import Manifest, PortfolioStore, VariantEntry, portfolio_id
from common import models, variant
from common.variant import VariantSpec


def wait_for(predicate, timeout_s: float = 30.0, what: str = "condition", interval_s: float = 0.05):
    """Poll until `predicate` returns something truthy, and return it; fail naming `what`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def hammering(request: Callable[[], object], threads: int = 2) -> Iterator[list[Exception]]:
    """Call `request` over and over from `threads` threads while the block runs. Yields the list of
    what the calls raised, complete once the block has exited (the threads are joined by then)."""
    stop, failures = threading.Event(), []

    def loop():
        while not stop.is_set():
            try:
                request()
            except Exception as err:
                failures.append(err)

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for worker in workers:
        worker.start()
    try:
        yield failures
    finally:
        stop.set()
        for worker in workers:
            worker.join()


def spec_for(arch: str, kwargs: dict, accuracy: float = 0.5, method: str = "dense") -> VariantSpec:
    c, s = kwargs.get("in_channels", 1), kwargs.get("input_size", 28)
    return VariantSpec(
        arch=arch,
        kwargs=kwargs,
        input_shape=(c, s, s),
        num_classes=kwargs.get("num_classes", 10),
        mean=(0.5,) * c,
        std=(0.25,) * c,
        method=method,
        sparsity=0.0,
        accuracy=accuracy,
    )


def random_batchnorm_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """Running statistics away from their initial 0 and 1, so a round trip that drops them shows."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return model


def variant_store(root, widths: tuple[float, ...] = (0.25, 0.125)) -> PortfolioStore:
    """A store of real vgg11 variant files (untrained) at these widths; at 0.25 a file is over 1 MiB."""
    store = PortfolioStore(root)
    entries = []
    for level, width in enumerate(widths):
        kwargs = {"in_channels": 1, "input_size": 28, "num_classes": 10, "width": width}
        model = models.build("vgg11", kwargs)
        vid = store.put_variant(variant.encode(model, spec_for("vgg11", kwargs, accuracy=0.9 - level / 10)))
        entries.append(
            VariantEntry(
                vid,
                f"vgg11-L{level}",
                level,
                "shifter",
                "vgg11",
                models.count_params(model),
                store.variant_path(vid).stat().st_size,
                0.9 - level / 10,
                0.9,
                0.0,
                1.0,
                1.0,
                1.0,
                2.0,
            )
        )
    store.write_manifest(
        Manifest(
            portfolio_id([e.variant_id for e in entries]),
            "vgg11",
            "fashion-mnist",
            "shifter",
            time.time(),
            {},
            tuple(entries),
        )
    )
    return store
