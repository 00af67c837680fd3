"""Bringing a portfolio onto this edge, and taking off what left it.

`PortfolioSync.sync` takes each variant the coordinator names that is not held yet: checks the cloud's
signature (when this edge has its key) before a byte is downloaded, fetches it into the cache and
verifies it (sha256 = variant id), builds it, profiles it here (interleaved with the others that
arrived with it) and hands it to the runtime, as many at a time as the memory budget holds. A variant
that fails to fetch, verify or build is logged by id and never loaded; the others carry on. It keeps
the on-device profile of every variant held (the policy's options are built from them) and reports
each new one up. `drop` removes variants that left the portfolio; `memory_changed` logs evictions and
updates the memory metrics. One sync runs at a time. After a sync and after a drop the cache on disk
is tidied (`edge.cache.tidy`): it keeps the files of the variants held and of the portfolio the
coordinator last named, plus the configured margin, and no partial download of another variant.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from common.errors import PrunefleetError
from common.files import short_id
from common.security import Verifier
from edge.cache import tidy
from edge.config import AgentConfig
from edge.fetcher import RetryConfig, fetch
from edge.link import Outbox
from edge.loading import Profile, budget_groups, cache_loader, variant_info
from edge.metrics import EdgeMetrics
from edge.profiler import profile_interleaved
from edge.runtime import Runtime
from edge.variants import LoadedVariant
from protos import coordinator_pb2

log = logging.getLogger(__name__)


class PortfolioSync:
    """The variants of a portfolio, from the cloud's listing into the runtime, with their profiles."""

    def __init__(
        self,
        config: AgentConfig,
        runtime: Runtime,
        metrics: EdgeMetrics,
        portfolio_stub,
        outbox: Outbox,
        stopping: threading.Event,
        verifier: Verifier | None = None,
    ):
        self.config, self.runtime, self.metrics = config, runtime, metrics
        self._portfolio, self._outbox, self._stopping = portfolio_stub, outbox, stopping
        self._verifier = verifier
        self._profiles: dict[str, Profile] = {}  # replaced, never changed in place: readers need no lock
        self._lock = threading.Lock()  # one portfolio change at a time
        self._desired: frozenset[str] = frozenset()  # the variants of the portfolio the coordinator last named
        self._fetching: frozenset[str] = frozenset()  # the variant being downloaded now, if any
        self._tidying = threading.Lock()  # one pass over the cache at a time

    @property
    def profiles(self) -> dict[str, Profile]:
        """The on-device profile of each variant held, by variant id."""
        return self._profiles

    def busy(self) -> bool:
        """Is a sync in progress?"""
        return self._lock.locked()

    def _fetch(self, info) -> tuple[Path, float]:
        """Check the cloud's signature (when this edge has its key), then fetch and verify (sha256 =
        variant id) one variant into the cache; the seconds it took."""
        start = time.perf_counter()
        if self._verifier is not None:
            self._verifier.check(info.variant_id, info.signature)  # before a byte is downloaded
        self._fetching = frozenset({info.variant_id})
        try:
            path = self._download(info)
        finally:
            self._fetching = frozenset()
        return path, time.perf_counter() - start

    def _download(self, info) -> Path:
        return fetch(
            self._portfolio,
            info.variant_id,
            self.config.cache_dir,
            self.config.fetch_deadline_s,
            retry=RetryConfig(
                attempts=self.config.fetch_attempts,
                backoff_s=self.config.backoff_s,
                max_backoff_s=self.config.max_backoff_s,
            ),
        )

    def _loader(self, info, path: Path) -> Callable[[], LoadedVariant]:
        return cache_loader(variant_info(info), path, self.config.allowed_models, self.config.optimize_models)

    def _profile_and_hold(self, fresh: list[tuple]) -> None:
        """Warm up and profile the new variants here (interleaved), then hold and announce them."""
        models = {ready.variant_id: (ready.model, ready.spec.input_shape) for _, ready, _, _ in fresh}
        iters = self.config.profile_iters
        b1 = profile_interleaved(models, 1, iters)
        typical = profile_interleaved(models, self.config.batch, iters)
        for info, ready, load_s, loader in fresh:
            profile = Profile(info.variant_id, b1[info.variant_id], typical[info.variant_id])
            self._profiles = {**self._profiles, info.variant_id: profile}
            evicted = self.runtime.add(ready, loader)
            self.metrics.loaded(info.variant_id, load_s, self.runtime.resident_bytes(), "arrival")
            self.memory_changed(evicted)
            self._outbox.report(coordinator_pb2.EdgeReport(edge=self.config.name, profile=profile.to_proto()))
            log.info(
                "loaded %s (%s) in %.2f s: p95 %.2f ms at batch 1, %.2f ms at batch %d",
                info.name,
                short_id(info.variant_id),
                load_s,
                profile.b1.p95_ms,
                profile.batch.p95_ms,
                self.config.batch,
            )

    def memory_changed(self, evicted: tuple[str, ...]) -> None:
        for variant_id in evicted:
            log.info(
                "evicted %s from memory (budget %.1f MiB); it loads again on demand",
                short_id(variant_id),
                self.config.memory_budget_mib,
            )
        self.metrics.memory(self.runtime.resident(), self.runtime.resident_bytes(), len(evicted))

    def _load_group(self, group: list[tuple]) -> None:
        fresh = []
        for info, path, fetch_s in group:
            loader = self._loader(info, path)
            start = time.perf_counter()
            try:
                ready = loader()
            except (PrunefleetError, OSError, RuntimeError, ValueError) as err:
                log.error("variant %s refused: %s", short_id(info.variant_id), err)
                continue
            fresh.append((info, ready, fetch_s + time.perf_counter() - start, loader))
        if fresh:
            self._profile_and_hold(fresh)

    def sync(self, variants: Iterable) -> None:
        """Fetch and load every variant not held yet, then profile them (as many at a time as the memory
        budget holds). A variant that fails to fetch, verify or build is never loaded."""
        variants = list(variants)
        with self._lock:
            self._desired = frozenset(info.variant_id for info in variants)
            self._sync(variants)
        self.tidy_cache()

    def _sync(self, variants: list) -> None:
        """Fetch every variant not held yet (the sync lock held), then load and profile them."""
        fetched, seen = [], set(self.runtime.variants())
        for info in variants:
            if self._stopping.is_set():
                return
            if info.variant_id in seen:
                continue
            seen.add(info.variant_id)
            try:
                fetched.append((info, *self._fetch(info)))
            except (PrunefleetError, OSError, RuntimeError, ValueError) as err:
                log.error("variant %s refused: %s", short_id(info.variant_id), err)
        for group in budget_groups(fetched, self.config.memory_budget_bytes):
            if not self._stopping.is_set():
                self._load_group(group)

    def forget_profiles(self, leaving: set[str]) -> None:
        """Stop offering these variants to the policy (before the agent moves off one of them)."""
        self._profiles = {k: v for k, v in self._profiles.items() if k not in leaving}

    def drop(self, leaving: set[str]) -> None:
        """Remove variants that left the portfolio from memory (the active one must have moved off)."""
        for variant_id in leaving:
            self.runtime.remove(variant_id)
            self.metrics.evicted(variant_id, self.runtime.resident_bytes())
            log.info("dropped %s: no longer in the portfolio", short_id(variant_id))
        self.memory_changed(())
        self.tidy_cache()

    def tidy_cache(self) -> list[Path]:
        """Delete from the cache what neither the held variants nor the portfolio last named need
        (beyond the margin), and stale partial downloads; the paths deleted. A failure is logged."""
        with self._tidying:
            needed = set(self.runtime.variants()) | self._desired
            try:
                return tidy(
                    self.config.cache_dir,
                    needed,
                    self.config.cache_margin_bytes,
                    self.config.stale_part_s,
                    time.time(),
                    writing=self._fetching,
                )
            except OSError as err:
                log.error("tidying the cache %s failed: %s", self.config.cache_dir, err)
                return []
