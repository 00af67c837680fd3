"""`prunefleet certs token|pending|approve`: the operator's side of edge enrolment.

    prunefleet certs token --certs-dir DIR [--name NAME] [--ttl 1h] [--out BUNDLE]
    prunefleet certs pending --certs-dir DIR
    prunefleet certs approve NAME|REQUEST-ID --certs-dir DIR

`token` makes a one-time bootstrap token and writes a bundle for the edge: BUNDLE/token (0600) beside
BUNDLE/ca.pem and BUNDLE/signing.pub (default BUNDLE: DIR/bootstrap/NAME, or DIR/bootstrap/TOKEN-ID
without a name). The cloud keeps only the token's hash, in DIR/cloud/enrolment.sqlite
(`cloud.service.enrolment_store`), where these commands and the cloud both find it. A token made with
`--name` is pre-approved for that edge only; one without leaves the edge's request pending until
`approve` (by the edge's name or the request id `pending` shows). The edge then runs with
`prunefleet-edge run --bootstrap-token BUNDLE/token --certs ITS-OWN-DIR`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ACTIONS = ("token", "pending", "approve")
DEFAULT_TTL = "1h"


def add_parsers(certs) -> None:
    """The three subcommands, on the `certs` subparsers of `prunefleet`."""
    token = certs.add_parser("token", help="a one-time bootstrap token an edge enrols with")
    token.add_argument("--certs-dir", type=Path, required=True, help="the directory of 'prunefleet certs init'")
    token.add_argument("--name", default=None, help="pre-approve this edge name (default: approve by hand)")
    token.add_argument("--ttl", default=DEFAULT_TTL, help="the token expires after this (90s, 15m, 1h, 2d)")
    token.add_argument("--out", type=Path, default=None, help="bundle directory (default DIR/bootstrap/NAME)")
    pending = certs.add_parser("pending", help="enrolment requests waiting for approval")
    pending.add_argument("--certs-dir", type=Path, required=True, help="the directory of 'prunefleet certs init'")
    approve = certs.add_parser("approve", help="approve the pending enrolment of an edge")
    approve.add_argument("name", help="the edge's name, or a request id from 'certs pending'")
    approve.add_argument("--certs-dir", type=Path, required=True, help="the directory of 'prunefleet certs init'")


def _store(directory: Path):
    from cloud.service.enrolment import STATE_FILE
    from cloud.service.enrolment_store import EnrolmentStore

    cloud = Path(directory) / "cloud"
    if not cloud.is_dir():
        from common.security import SecurityError

        raise SecurityError(f"{cloud} does not exist; run 'prunefleet certs init {directory}' first")
    return EnrolmentStore(cloud / STATE_FILE, time.time)


def _write(path: Path, data: bytes, secret: bool) -> None:
    from common.files import atomic_write_bytes

    atomic_write_bytes(path, data)
    os.chmod(path, 0o600 if secret else 0o644)


def make_token(directory: Path, name: str | None, ttl_s: float, out: Path | None = None) -> Path:
    """A bootstrap token (bound to `name` when given), written with the CA and the signing key's public
    half to a bundle directory; returns the token file."""
    from common import security
    from common.edge_input import edge_name_problem

    if name is not None and (problem := edge_name_problem(name)):
        raise security.SecurityError(problem)
    if not 10 <= ttl_s <= 30 * 86400:
        raise security.SecurityError(f"ttl must be 10 s to 30 days, got {ttl_s:g} s")
    directory = Path(directory)
    token = _store(directory).create_token(name, ttl_s)
    bundle = out or directory / "bootstrap" / (name or token.partition(".")[0])
    _write(bundle / security.CA, security.read_secret(directory / "ca" / security.CA), secret=False)
    _write(bundle / security.SIGNING_PUB, security.read_secret(directory / "ca" / security.SIGNING_PUB), False)
    _write(bundle / security.TOKEN, token.encode() + b"\n", secret=True)
    return bundle / security.TOKEN


def command(args) -> int:
    """Run `certs token|pending|approve` and print what it did."""
    from cloud.service.durations import parse_duration

    if args.action == "token":
        path = make_token(args.certs_dir, args.name, parse_duration(args.ttl, "ttl"), args.out)
        bound = f"pre-approved for edge {args.name}" if args.name else "approve with 'prunefleet certs approve NAME'"
        print(f"bootstrap token {path} (valid {args.ttl}, single use; {bound})")
        print(f"prunefleet-edge run --bootstrap-token {path} --certs DIR ...")
        return 0
    store = _store(args.certs_dir)
    if args.action == "pending":
        now = time.time()
        for request in store.pending():
            print(f"{request.id}  {request.name:32s}  key {request.key[:16]}  {now - request.created_at:6.0f} s ago")
        return 0
    approved = store.approve(args.name)
    print(f"approved {approved} pending request(s) of {args.name}")
    return 0 if approved else 1
