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

What is fetched and how it is built is the backend's (`edge.backends`, `AgentConfig.backend`): the
torch backend fetches variant files, the ONNX Runtime backend every member's ONNX file (int8 members
included). The members a backend cannot serve are left out of what the edge holds, so the policy is
never offered them; each is logged with the reason whenever a listing is synced and counted in
`prunefleet_edge_members_left_out`. Whatever the backend, the edge reports the portfolio it holds as
the listing's id (the hash of every member's id, as the cloud computes it) once it holds every member
its backend serves (`held_portfolio`), and as the hash of what it holds until then.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from common.errors import PrunefleetError
from common.files import portfolio_id, short_id
from common.security import Verifier
from edge import backends
from edge.backends.base import Artifact, Backend, BackendSettings, offer
from edge.cache import tidy
from edge.config import AgentConfig
from edge.fetcher import RetryConfig, fetch
from edge.link import Outbox
from edge.loading import Profile, budget_groups, variant_info
from edge.metrics import EdgeMetrics
from edge.profiler import profile_interleaved
from edge.runtime import Runtime
from edge.variants import VariantInfo
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
        backend: Backend | None = None,
    ):
        self.config, self.runtime, self.metrics = config, runtime, metrics
        self._portfolio, self._outbox, self._stopping = portfolio_stub, outbox, stopping
        self._verifier = verifier
        self.backend = backend or backends.create(
            config.backend,
            BackendSettings(config.threads, config.max_batch, config.optimize_models, config.allowed_models),
        )
        self._profiles: dict[str, Profile] = {}  # replaced, never changed in place: readers need no lock
        self._lock = threading.Lock()  # one portfolio change at a time
        self._desired: frozenset[str] = frozenset()  # the files of the portfolio the coordinator last named
        self._fetching: frozenset[str] = frozenset()  # the file being downloaded now, if any
        self._files: dict[str, str] = {}  # member id -> id of the file it is served from
        self._listed: tuple[str, frozenset[str]] = ("", frozenset())  # last listing: its id, what is servable
        self._tidying = threading.Lock()  # one pass over the cache at a time

    @property
    def profiles(self) -> dict[str, Profile]:
        """The on-device profile of each variant held, by variant id."""
        return self._profiles

    def busy(self) -> bool:
        """Is a sync in progress?"""
        return self._lock.locked()

    def servable(self, listing: Iterable) -> set[str]:
        """The ids of the members of `listing` this edge's backend serves."""
        return {info.variant_id for info, _ in offer(self.backend, listing).served}

    def held_portfolio(self) -> str:
        """The portfolio this edge holds, as it reports it: the last listing's id once every member of
        it the backend serves is held (and nothing else), else the hash of the members held."""
        held = set(self.runtime.variants())
        listing_id, servable = self._listed
        return listing_id if held and held == servable else portfolio_id(held)

    def _fetch(self, info: VariantInfo, artifact: Artifact) -> tuple[Path, float]:
        """Check the cloud's signature over the file (when this edge has its key), then fetch and verify
        it (sha256 = its id) into the cache; the seconds it took."""
        start = time.perf_counter()
        if self._verifier is not None:
            self._verifier.check(artifact.file_id, artifact.signature)  # before a byte is downloaded
        self._fetching = frozenset({artifact.file_id})
        try:
            path = self._download(artifact)
        finally:
            self._fetching = frozenset()
        return path, time.perf_counter() - start

    def _download(self, artifact: Artifact) -> Path:
        return fetch(
            self._portfolio,
            artifact.file_id,
            self.config.cache_dir,
            self.config.fetch_deadline_s,
            retry=RetryConfig(
                attempts=self.config.fetch_attempts,
                backoff_s=self.config.backoff_s,
                max_backoff_s=self.config.max_backoff_s,
            ),
            suffix=artifact.suffix,
        )

    def _profile_and_hold(self, fresh: list[tuple]) -> None:
        """Warm up and profile the new variants here (interleaved), then hold and announce them."""
        models = {ready.variant_id: (ready.forward, ready.spec.input_shape) for _, ready, _, _ in fresh}
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
        for info, artifact, path, fetch_s in group:
            loader = self.backend.loader(info, artifact, path)
            start = time.perf_counter()
            try:
                ready = loader()
            except (PrunefleetError, OSError, RuntimeError, ValueError) as err:
                log.error("variant %s refused: %s", short_id(info.variant_id), err)
                continue
            self._files = {**self._files, info.variant_id: artifact.file_id}
            fresh.append((info, ready, fetch_s + time.perf_counter() - start, loader))
        if fresh:
            self._profile_and_hold(fresh)

    def sync(self, variants: Iterable) -> None:
        """Fetch and load every member of the listing `variants` this edge's backend serves and does not
        hold yet, then profile them (as many at a time as the memory budget holds). A member that fails
        to fetch, verify or build is never loaded; one the backend cannot serve is left out."""
        variants = list(variants)
        offered = offer(self.backend, variants)
        with self._lock:
            self._desired = frozenset(artifact.file_id for _, artifact in offered.served)
            self._listed = (
                portfolio_id(info.variant_id for info in variants),
                frozenset(info.variant_id for info, _ in offered.served),
            )
            self._left_out(offered.left_out)
            self._sync(offered.served)
        self.tidy_cache()

    def _left_out(self, left_out: tuple) -> None:
        for info, reason in left_out:
            log.info("%s (%s) left out: %s", info.name or "member", short_id(info.variant_id), reason)
        self.metrics.left_out(self.backend.name, len(left_out))

    def _sync(self, served: tuple) -> None:
        """Fetch every member not held yet (the sync lock held), then load and profile them."""
        fetched, seen = [], set(self.runtime.variants())
        for listed, artifact in served:
            if self._stopping.is_set():
                return
            if listed.variant_id in seen:
                continue
            seen.add(listed.variant_id)
            info = variant_info(listed, self.backend.held_bytes(artifact))
            try:
                fetched.append((info, artifact, *self._fetch(info, artifact)))
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
            self._files = {k: v for k, v in self._files.items() if k != variant_id}
            self.metrics.evicted(variant_id, self.runtime.resident_bytes())
            log.info("dropped %s: no longer in the portfolio", short_id(variant_id))
        self.memory_changed(())
        self.tidy_cache()

    def tidy_cache(self) -> list[Path]:
        """Delete from the cache what neither the held variants nor the portfolio last named need
        (beyond the margin), and stale partial downloads; the paths deleted. A failure is logged."""
        with self._tidying:
            needed = {self._files.get(k, k) for k in self.runtime.variants()} | self._desired
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
