"""`prunefleet deploy`: name a store on the cloud host, or upload one from here, and start its rollout.

A deploy by path names a store under the cloud's `--portfolio-root` (relative to it). A cloud started
without a root refuses that (FAILED_PRECONDITION, trailing metadata `DEPLOY_BY_PATH: off`); when PATH
is then a store directory here, it is uploaded instead (`UploadPortfolio`) and deployed by the id the
cloud computed. `--upload` uploads without asking first. An upload sends manifest.json and every
member file it lists (their ONNX files included), each in pieces of `CHUNK_BYTES` with its size and
sha256; the cloud checks them all and keeps nothing of an upload that fails, which is sent again whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc

from cloud.admin.operator_client import RPC_TIMEOUT_S, coordinator_stub, rollout_line
from cloud.build.store import PortfolioStore
from cloud.service.deploys import DEPLOY_BY_PATH
from cloud.service.store_checks import member_files
from common.escaping import escaped
from common.files import sha256_file
from common.security import Transport
from common.wire import CHUNK_BYTES
from protos import coordinator_pb2

UPLOAD_TIMEOUT_S = 3600.0  # an upload of gigabytes over a slow link; the cloud bounds what it takes


def _file_pieces(path: Path, name: str) -> Iterator[coordinator_pb2.UploadPiece]:
    size, digest = path.stat().st_size, sha256_file(path)
    with open(path, "rb") as f:
        first = f.read(CHUNK_BYTES)
        yield coordinator_pb2.UploadPiece(path=name, size=size, sha256=digest, data=first)
        while block := f.read(CHUNK_BYTES):
            yield coordinator_pb2.UploadPiece(data=block)


def pieces(directory: Path) -> Iterator[coordinator_pb2.UploadPiece]:
    """The pieces that upload the store in `directory`: its manifest, then every member file."""
    store = PortfolioStore(directory)
    files = [(path, str(path.relative_to(store.root))) for path, _, _ in member_files(store, store.manifest())]
    for path, name in [(store.manifest_path, "manifest.json"), *dict(files).items()]:
        yield from _file_pieces(path, name)


def upload(address: str, transport: Transport, directory: Path) -> coordinator_pb2.UploadPortfolioResponse:
    """Upload the store in `directory`; the cloud's answer names the portfolio id it computed."""
    PortfolioStore(directory).manifest()  # a store here at all, before anything is sent
    stub = coordinator_stub(address, transport)
    return stub.UploadPortfolio(pieces(Path(directory)), timeout=UPLOAD_TIMEOUT_S)


def _by_path_is_off(err: grpc.RpcError) -> bool:
    metadata = err.trailing_metadata() or () if hasattr(err, "trailing_metadata") else ()
    return err.code() == grpc.StatusCode.FAILED_PRECONDITION and (DEPLOY_BY_PATH, "off") in tuple(metadata)


def deploy(
    address: str, transport: Transport, request: coordinator_pb2.DeployRequest, upload_first: bool = False
) -> tuple[coordinator_pb2.Rollout, coordinator_pb2.UploadPortfolioResponse | None]:
    """Start the rollout `request` asks for: its `portfolio` an id or a path under the cloud's root, or
    a store here, uploaded first when `upload_first` or when the cloud deploys no path. The rollout,
    and the upload's answer if there was one."""
    stub, uploaded = coordinator_stub(address, transport), None
    if not upload_first:
        try:
            return stub.Deploy(request, timeout=RPC_TIMEOUT_S * 6).rollout, None
        except grpc.RpcError as err:
            if not _by_path_is_off(err) or not PortfolioStore(Path(request.portfolio)).exists():
                raise
    uploaded = upload(address, transport, Path(request.portfolio))
    named = coordinator_pb2.DeployRequest()
    named.CopyFrom(request)
    named.portfolio = uploaded.portfolio_id
    return stub.Deploy(named, timeout=RPC_TIMEOUT_S * 6).rollout, uploaded


def command(args, transport: Transport) -> int:
    """`prunefleet deploy` with its parsed flags: prints the upload, if any, and the rollout."""
    thresholds = coordinator_pb2.RolloutThresholds(
        min_slo_attainment=args.min_slo_attainment,
        max_error_rate=args.max_error_rate,
        min_windows=args.min_windows,
        adopt_timeout_s=args.adopt_timeout_s,
    )
    request = coordinator_pb2.DeployRequest(
        portfolio=args.portfolio, edges=args.edges, canary=args.canary, canaries=args.canaries, thresholds=thresholds
    )
    rollout, uploaded = deploy(args.cloud, transport, request, args.upload)
    if uploaded is not None:
        print(f"uploaded portfolio {escaped(uploaded.portfolio_id)} ({uploaded.bytes} bytes)")
    print(rollout_line(rollout))
    return 0
