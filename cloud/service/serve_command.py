"""The flags of `prunefleet cloud serve`, and the `CloudConfig` they make.

Kept beside the server they configure, so a setting and its flag are added in one package; the
command line (`cloud.cli.main`) adds them to its `cloud serve` parser and hands the parsed flags back.
Retention flags state what the fleet database keeps (`cloud.service.retention`). The server module
itself is imported only by `config`, so the other commands' start-up does not pay for it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from cloud.service.durations import parse_duration
from cloud.service.report_pace import PaceConfig
from cloud.service.retention import RetentionConfig
from common import security

if TYPE_CHECKING:
    from cloud.service.server import CloudConfig

_RETENTION = RetentionConfig()


def _add_retention(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group("retention", "what the fleet database keeps, by the coordinator's clock")
    group.add_argument(
        "--keep-profiles",
        type=int,
        default=_RETENTION.keep_profiles,
        help="on-device profiles kept per edge, the newest (default %(default)s)",
    )
    group.add_argument(
        "--event-retention-days",
        type=float,
        default=_RETENTION.event_retention_days,
        help="switch events older than this are deleted (default %(default)s)",
    )
    group.add_argument(
        "--max-events",
        type=int,
        default=_RETENTION.max_events,
        help="and beyond this many, the oldest are deleted (default %(default)s)",
    )
    group.add_argument(
        "--edge-retention-days",
        type=float,
        default=_RETENTION.edge_retention_days,
        help="an edge not seen for this long, not connected and in no canary rollout goes (default %(default)s)",
    )


def _add_enrolment(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group("edge certificates", "enrolment and renewal (cloud.service.enrolment)")
    group.add_argument(
        "--enrol-port",
        type=int,
        default=None,
        help="serve EnrolmentService.Enrol on this port (TLS, no client certificate; 0 picks one)",
    )
    group.add_argument(
        "--ca",
        type=Path,
        default=None,
        help="the CA directory the cloud signs edge certificates with, enabling renewal "
        "(default with --enrol-port: the 'ca' directory beside --certs)",
    )
    group.add_argument("--cert-lifetime", default="7d", help="lifetime of the certificates it signs (default 7d)")
    group.add_argument(
        "--edge-hosts", nargs="*", default=["localhost", "127.0.0.1"], help="DNS/IP names of edge certificates"
    )


def _enrolment(args: argparse.Namespace):
    from cloud.service.enrolment import STATE_FILE, EnrolmentConfig

    ca = args.ca
    if ca is None and args.enrol_port is not None and args.certs is not None:
        ca = Path(args.certs).parent / "ca"
    if ca is None or args.insecure:
        return None
    return EnrolmentConfig(
        ca_dir=ca,
        state=Path(args.certs or ca) / STATE_FILE,
        port=args.enrol_port,
        lifetime_s=parse_duration(args.cert_lifetime, "cert lifetime"),
        edge_hosts=tuple(args.edge_hosts),
        revoked=_revoked(args),
    )


def _add_deploys(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group("deploys", "where the stores operators deploy come from (cloud.service.deploys)")
    group.add_argument(
        "--portfolio-root",
        type=Path,
        default=None,
        metavar="DIR",
        help="'prunefleet deploy PATH' names a store under DIR (nothing outside it); without it only uploads",
    )
    group.add_argument(
        "--uploads-dir", type=Path, default=None, metavar="DIR", help="uploaded stores (default: 'uploads' beside --db)"
    )
    group.add_argument("--max-upload-mib", type=float, default=4096, help="largest upload (default %(default)s)")
    group.add_argument(
        "--listing-validity",
        default="7d",
        help="how long a signed portfolio listing is valid; issued again when half has passed (default 7d)",
    )


def _deploys(args: argparse.Namespace):
    from cloud.service.deploys import DeployConfig

    database = args.db or args.store / "fleet.sqlite"
    return DeployConfig(
        portfolio_root=args.portfolio_root,
        uploads_dir=args.uploads_dir or Path(database).parent / "uploads",
        max_upload_bytes=int(args.max_upload_mib * (1 << 20)),
        listing_validity_s=parse_duration(args.listing_validity, "listing validity"),
    )


def add_arguments(serve: argparse.ArgumentParser, environ) -> None:
    """Every flag of `prunefleet cloud serve`."""
    serve.add_argument("--store", type=Path, required=True)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    serve.add_argument("--metrics-port", type=int, default=None)
    serve.add_argument("--db", type=Path, default=None, help="SQLite file (default STORE/fleet.sqlite)")
    serve.add_argument(
        "--workers", type=int, default=64, help="threads for unary RPCs and blocking reads (edge streams need none)"
    )
    serve.add_argument(
        "--max-rpcs",
        type=int,
        default=10_000,  # server.MAX_RPCS (the server is imported only when serving)
        help="RPCs at once, one per connected edge included, operator calls not; beyond, RESOURCE_EXHAUSTED",
    )
    serve.add_argument(
        "--operator-rpcs", type=int, default=64, help="operator calls at once, in slots edges can never take"
    )
    serve.add_argument(
        "--signing-key",
        type=Path,
        default=None,
        help="Ed25519 key that signs variants (default: DIR/signing.key of --certs)",
    )
    serve.add_argument(
        "--revoked",
        type=Path,
        default=None,
        help="revocation list of 'prunefleet certs revoke', reread when it changes (default: DIR/revoked of --certs)",
    )
    serve.add_argument(
        "--report-rate", type=float, default=50.0, help="reports a second read from each edge (default %(default)s)"
    )
    serve.add_argument("--report-burst", type=int, default=200, help="reports read at once first (default %(default)s)")
    serve.add_argument(
        "--bind-timeout",
        type=float,
        default=10.0,  # server.BIND_TIMEOUT_S
        help="seconds an edge stream may stay open without its first report before it is closed (default %(default)s)",
    )
    _add_retention(serve)
    _add_deploys(serve)
    _add_enrolment(serve)
    security.add_arguments(serve, token=True, environ=environ)


def _revoked(args: argparse.Namespace) -> Path | None:
    if args.revoked is not None or args.insecure or args.certs is None:
        return args.revoked
    return args.certs / "revoked"


def config(args: argparse.Namespace) -> CloudConfig:
    """The cloud's settings from the parsed flags; a bad value raises naming its setting."""
    from cloud.service.server import CloudConfig

    transport = security.from_arguments(args, token=True)
    signing_key = args.signing_key
    if signing_key is None and args.certs is not None and not args.insecure:
        signing_key = args.certs / security.SIGNING_KEY
    return CloudConfig(
        store=args.store,
        transport=transport,
        signing_key=signing_key,
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        db=args.db,
        workers=args.workers,
        max_rpcs=args.max_rpcs,
        operator_rpcs=args.operator_rpcs,
        revoked=_revoked(args),
        enrolment=_enrolment(args),
        deploys=_deploys(args),
        pace=PaceConfig(args.report_rate, args.report_burst),
        bind_timeout_s=args.bind_timeout,
        retention=RetentionConfig(
            keep_profiles=args.keep_profiles,
            event_retention_days=args.event_retention_days,
            max_events=args.max_events,
            edge_retention_days=args.edge_retention_days,
        ),
    )
