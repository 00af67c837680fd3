"""How an operator's deploy names the portfolio it sends, and what the cloud checks before a rollout starts.

A `Deploy` names either a portfolio id the cloud already serves (the store it started with, one
uploaded, one deployed before), or a store directory under the portfolio root the cloud was started
with (`prunefleet cloud serve --portfolio-root DIR`), relative to the root or absolute inside it.
The path is resolved and must stay under the root (`cloud.service.store_checks`); without a root a
deploy by path is refused FAILED_PRECONDITION, with trailing metadata `DEPLOY_BY_PATH: off` so the
CLI can upload the store instead (`UploadPortfolio`, written into the uploads directory,
`cloud.service.uploads`). The store the cloud was started with (`--store`) is named by whoever starts
the cloud, not by a deploy: it may lie anywhere, in the root or not, is checked like every store, and
is deployed by its id.

Every store is checked and hashed here, before the rollouts' lock is taken: a rollback or the
canary verdict never waits for a large deploy to be hashed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError

from cloud.build.store import StoreError
from cloud.service.catalog import MAX_VALIDITY_S, MIN_VALIDITY_S, VALIDITY_S, Catalog
from cloud.service.rollout import RolloutConflict, RolloutError, Rollouts
from cloud.service.store_checks import StoreLimits, path_problem, resolve_under
from cloud.service.uploads import UploadError, Uploads
from protos import coordinator_pb2

DEPLOY_BY_PATH = "prunefleet-deploy-by-path"  # trailing metadata of the refusal when the cloud has no root
MAX_PORTFOLIO_CHARS = 4096
_PORTFOLIO_ID = re.compile(r"[0-9a-f]{16}")


@dataclass(frozen=True)
class DeployConfig:
    """Where deployed stores may come from, how large they may be, and how long the listings that
    announce them are valid (`cloud.service.catalog`; edges refuse a listing past it)."""

    portfolio_root: Path | None = None  # deploy by path names a store under it; None: by path is refused
    uploads_dir: Path | None = None  # where uploaded stores go; None: uploads are refused
    max_upload_bytes: int = 4 << 30  # one upload, manifest and every member file
    limits: StoreLimits = field(default_factory=StoreLimits)
    listing_validity_s: float = VALIDITY_S  # issued again when half of it has passed

    def __post_init__(self) -> None:
        if self.portfolio_root is not None and not Path(self.portfolio_root).is_dir():
            raise ValueError(f"portfolio_root {self.portfolio_root} is not a directory")
        if not 1 << 20 <= self.max_upload_bytes <= 1 << 44:
            raise ValueError(f"max_upload_bytes must be in [1 MiB, 16 TiB], got {self.max_upload_bytes}")
        if not MIN_VALIDITY_S <= self.listing_validity_s <= MAX_VALIDITY_S:
            raise ValueError(
                f"listing validity must be in [{MIN_VALIDITY_S:g} s, {MAX_VALIDITY_S / 86400:g} d], "
                f"got {self.listing_validity_s:g} s"
            )


class Deploys:
    """The Deploy and UploadPortfolio calls of the coordinator, from request to status code."""

    def __init__(self, catalog: Catalog, rollouts: Rollouts, config: DeployConfig, clock: Callable[[], float]):
        self._catalog, self._rollouts, self._config, self._clock = catalog, rollouts, config, clock
        self.uploads = None
        if config.uploads_dir is not None:
            self.uploads = Uploads(config.uploads_dir, config.limits, config.max_upload_bytes)
            self.uploads.clear_staging()

    def portfolio_id(self, portfolio: str, context) -> str:
        """The id of the portfolio a deploy names, its store checked and catalogued first if it is a
        path; aborts the call with the status that names the problem otherwise."""
        if self._catalog.known(portfolio):
            return portfolio
        if problem := path_problem(portfolio):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"portfolio {portfolio[:200]!r} cannot be: {problem}")
        root = self._config.portfolio_root
        if root is None and _PORTFOLIO_ID.fullmatch(portfolio):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"portfolio {portfolio} is not known to this cloud")
        if root is None:
            context.set_trailing_metadata(((DEPLOY_BY_PATH, "off"),))
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "no rollout from a path: this cloud was started without --portfolio-root DIR (start it with one "
                "to deploy stores under DIR), or upload the store: prunefleet deploy PATH --upload",
            )
        try:
            return self._catalog.add(resolve_under(root, portfolio)).portfolio_id
        except StoreError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot deploy portfolio {portfolio[:200]!r}: {err}")

    def deploy(self, request: coordinator_pb2.DeployRequest, context) -> coordinator_pb2.DeployResponse:
        began = self._clock()
        if any(len(text) > MAX_PORTFOLIO_CHARS for text in (request.portfolio, request.edges, request.canaries)):
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"portfolio, edges and canaries must be at most {MAX_PORTFOLIO_CHARS} characters",
            )
        named = _named(request, self.portfolio_id(request.portfolio, context))
        try:
            return coordinator_pb2.DeployResponse(rollout=self._rollouts.deploy(named, began))
        except RolloutConflict as err:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
        except RolloutError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))

    def upload(self, pieces, context) -> coordinator_pb2.UploadPortfolioResponse:
        if self.uploads is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this cloud takes no uploads (no uploads directory)")
        try:
            directory, size = self.uploads.receive(pieces)
            manifest = self._catalog.add(directory)
        except (UploadError, StoreError) as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"upload refused: {err}")
        except DecodeError as err:  # a piece that does not parse (gRPC parses a request stream's pieces itself)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"upload refused: a piece is no UploadPiece: {err}")
        return coordinator_pb2.UploadPortfolioResponse(portfolio_id=manifest.portfolio_id, bytes=size)


def _named(request: coordinator_pb2.DeployRequest, portfolio_id: str) -> coordinator_pb2.DeployRequest:
    """The request, naming the portfolio by its id."""
    named = coordinator_pb2.DeployRequest()
    named.CopyFrom(request)
    named.portfolio = portfolio_id
    return named
