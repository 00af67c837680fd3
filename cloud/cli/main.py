"""`prunefleet`: the operator and cloud CLI."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import grpc

from cloud.admin import certs_enrol, operator_client
from cloud.build.store import PortfolioStore
from cloud.cli import BUILD_HELP, cluster_commands, predict_command
from common import security
from common.errors import PrunefleetError
from common.escaping import escaped
from common.files import short_id
from common.policy_contract import SETTINGS as POLICY_SETTINGS


def _operator(parser, environ, name: str, help_text: str):
    """A command that talks to a running cloud: --cloud and the transport flags."""
    command = parser.add_parser(name, help=help_text)
    command.add_argument("--cloud", required=True, metavar="HOST:PORT")
    security.add_arguments(command, token=True, environ=environ)
    return command


def _add_serve(top, environ) -> None:
    """`cloud serve`: its flags are the server's own (`cloud.service.serve_command`)."""
    from cloud.service import serve_command

    serve = (
        top.add_parser("cloud", help="the cloud server")
        .add_subparsers(dest="action", required=True)
        .add_parser("serve", help="serve a portfolio and coordinate the fleet")
    )
    serve_command.add_arguments(serve, environ)


def _add_rollouts(top, environ) -> None:
    deploy = _operator(top, environ, "deploy", "send a portfolio to canary edges first, then to the rest")
    deploy.add_argument(
        "portfolio",
        help="a portfolio id, a store under the cloud's --portfolio-root (relative to it), or a store here to upload",
    )
    deploy.add_argument("--upload", action="store_true", help="upload the store here (default: the cloud has no root)")
    deploy.add_argument("--edges", default="", help="comma-separated edge names or patterns (default: every edge)")
    deploy.add_argument("--canary", type=int, default=1, help="edges that get it first, the earliest registered")
    deploy.add_argument("--canaries", default="", metavar="NAME[,NAME]", help="these edges get it first")
    deploy.add_argument("--min-slo-attainment", type=float, default=0.0, help="default 0.9")
    deploy.add_argument("--max-error-rate", type=float, default=0.0, help="default 0.05")
    deploy.add_argument("--min-windows", type=int, default=0, help="per canary edge before promoting (default 5)")
    deploy.add_argument("--adopt-timeout-s", type=float, default=0.0, help="default 300")
    rollback = _operator(top, environ, "rollback", "put every edge of a rollout back on its previous portfolio")
    rollback.add_argument("--rollout", type=int, default=0, help="rollout id (default: the latest)")
    rollback.add_argument("--reason", default="")


def _asks_for_build(argv: list[str]) -> bool:
    """Whether the command line is `portfolio build ...`: only then are the build's flags generated,
    which imports torch and every pruning method (about 2 s); the other commands start without them."""
    return "portfolio" in argv and "build" in argv[argv.index("portfolio") + 1 :]


def _add_portfolio(top, argv: list[str]) -> None:
    portfolio = top.add_parser("portfolio", help="build and inspect portfolios").add_subparsers(
        dest="action", required=True
    )
    if _asks_for_build(argv):
        from cloud.cli import build_command

        build_command.add_parser(portfolio)
    else:  # listed in --help; its own flags are generated when it is asked for
        portfolio.add_parser("build", help=BUILD_HELP)
    quantize = portfolio.add_parser("quantize", help="add to a portfolio the int8 members that build --int8 makes")
    quantize.add_argument("--store", type=Path, required=True)
    quantize.add_argument("--data-dir", type=Path, default=None, help="where the build's dataset is now, if moved")
    quantize.add_argument("--threads", type=int, default=0, help="CPU threads of the timing (0: the build's)")
    portfolio.add_parser("list", help="the members of a portfolio").add_argument("--store", type=Path, required=True)
    show = portfolio.add_parser("show", help="one member in full")
    show.add_argument("--store", type=Path, required=True)
    show.add_argument("id", help="member id, unique id prefix, or name")


def _add_certs(top) -> None:
    certs = top.add_parser("certs", help="certificates, token and signing key").add_subparsers(
        dest="action", required=True
    )
    init = certs.add_parser(
        "init", help="create a CA, the cloud's, operator's, a client's and one edge's certificates, a token, a key"
    )
    init.add_argument("dir", type=Path)
    init.add_argument(
        "--host",
        dest="hosts",
        action="append",
        default=[],
        help="a name or IP the cloud or an edge is reached by (repeatable; localhost and 127.0.0.1 always)",
    )
    init.add_argument("--force", action="store_true", help="replace an existing CA and every key")
    issue = certs.add_parser("issue", help="a key and short-lived certificate for one edge or client application")
    issue.add_argument("role", choices=("edge", "client"))
    issue.add_argument("name", help="the edge's --name, or the client application's name")
    issue.add_argument("--certs-dir", type=Path, required=True, help="the directory of 'prunefleet certs init'")
    issue.add_argument(
        "--host",
        dest="hosts",
        action="append",
        default=[],
        help="a name or IP the edge is reached by (repeatable; localhost and 127.0.0.1 always)",
    )
    issue.add_argument("--days", type=float, default=7.0, help="validity in days (default 7); reissue before")
    revoke = certs.add_parser("revoke", help="refuse every certificate issued so far to an edge or client")
    revoke.add_argument("role", choices=("edge", "client"))
    revoke.add_argument("name")
    revoke.add_argument("--certs-dir", type=Path, required=True, help="the directory of 'prunefleet certs init'")
    certs_enrol.add_parsers(certs)


def _add_fleet(top, environ) -> None:
    fleet = top.add_parser("fleet", help="the fleet as the coordinator sees it").add_subparsers(
        dest="action", required=True
    )
    _operator(fleet, environ, "status", "desired vs reported state per edge")
    events = _operator(fleet, environ, "events", "switch decisions with their reasons")
    events.add_argument("--edge", default="")
    events.add_argument("--limit", type=int, default=100)
    _operator(fleet, environ, "rollouts", "rollouts, newest first").add_argument("--limit", type=int, default=20)


def _add_policy(top, environ) -> None:
    policy = top.add_parser("policy", help="the switching policy").add_subparsers(dest="action", required=True)
    pin = _operator(policy, environ, "pin", "pin some edges to a variant (overrides the policy's pin for them)")
    pin.add_argument("variant", help="variant id ('' unpins)")
    pin.add_argument("--edges", required=True, help="comma-separated edge names or patterns")
    pset = _operator(policy, environ, "set", "change fields of the current policy")
    for setting in POLICY_SETTINGS.values():  # defaults and ranges as the policy contract states them
        if setting.kind is not str:
            flag = "--" + setting.name.replace("_", "-")
            pset.add_argument(flag, type=setting.kind, help=f"{setting.help} ({setting.described})")
    pset.add_argument("--pin", dest="pinned_variant", help=POLICY_SETTINGS["pinned_variant"].help)


def _add_bench_and_demo(top) -> None:
    bench = top.add_parser("bench", help="run a benchmark suite (python -m bench)", add_help=False)
    bench.add_argument("args", nargs=argparse.REMAINDER)
    demo = top.add_parser("demo", help="build a portfolio and run a two-edge cluster under changing load")
    demo.add_argument("--out", type=Path, default=Path("reports/demo"))
    demo.add_argument("--data-dir", type=Path, default=None)
    demo.add_argument("--quick", action="store_true", help="smaller model, data and phases (for tests)")


def _parser(environ=None, argv: list[str] | None = None) -> argparse.ArgumentParser:
    """Every subcommand, in the order `prunefleet --help` lists them (`portfolio build`'s flags only
    when `argv` asks for it; None: always)."""
    environ = environ or {}
    parser = argparse.ArgumentParser(prog="prunefleet", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    top = parser.add_subparsers(dest="command", required=True)
    _add_portfolio(top, ["portfolio", "build"] if argv is None else argv)
    _add_serve(top, environ)
    _add_certs(top)
    _add_fleet(top, environ)
    _add_rollouts(top, environ)
    _add_policy(top, environ)
    predict_command.add_parser(top, environ)
    _add_bench_and_demo(top)
    cluster_commands.add_parser(top, environ)
    return parser


def _portfolio(args) -> int:
    if args.action in ("build", "quantize"):
        from cloud.cli import build_command

        return build_command.run(args) if args.action == "build" else build_command.run_quantize(args)
    store = PortfolioStore(args.store)
    if args.action == "list":
        manifest = store.manifest()
        print(f"portfolio {manifest.portfolio_id}: {manifest.method} on {manifest.model} / {manifest.dataset}")
        print(operator_client.portfolio_table(manifest))
    else:
        print(json.dumps(store.describe(args.id), indent=2))  # the member, its files and the dense model
    return 0


def _bench(args) -> int:
    """Benchmarks import cloud and edge side by side; they run as their own program so `cloud` never
    imports `edge`."""
    return subprocess.call([sys.executable, "-m", "bench", *args.args])


def _dispatch(args) -> int:
    if args.command == "bench":
        return _bench(args)
    if args.command == "portfolio":
        return _portfolio(args)
    if args.command == "cluster":
        return cluster_commands.main(args)
    if args.command == "predict":
        return predict_command.run(args)
    if args.command == "demo":
        from cloud.localfleet import demo

        return demo.run(demo.DemoConfig(out=args.out, data_dir=args.data_dir, quick=args.quick))
    if args.command == "certs":
        from cloud.admin import certs

        return certs.command(args)
    if args.command == "cloud":
        return _serve(args)
    return _operate(args, security.from_arguments(args, token=True))


def _serve(args) -> int:
    from cloud.service import serve_command
    from cloud.service.server import serve

    serve(serve_command.config(args))
    return 0


def _operate(args, transport: security.Transport) -> int:
    if args.command == "fleet":
        if args.action == "status":
            print(operator_client.fleet_status(args.cloud, transport))
        elif args.action == "rollouts":
            print(operator_client.rollouts_table(args.cloud, transport, args.limit))
        else:
            print(operator_client.events_table(args.cloud, transport, args.edge, args.limit))
        return 0
    if args.command == "deploy":
        from cloud.admin import upload_client

        return upload_client.command(args, transport)
    if args.command == "rollback":
        print(operator_client.rollout_line(operator_client.rollback(args.cloud, transport, args.rollout, args.reason)))
        return 0
    if args.command == "policy" and args.action == "pin":
        reply = operator_client.pin(args.cloud, transport, args.edges, args.variant)
        what = f"pinned to {short_id(args.variant)}" if args.variant else "unpinned"
        print(escaped(f"policy v{reply.policy.version}: {what}: {', '.join(reply.edges)}"))
        return 0
    if args.command == "policy":
        changes = {name: getattr(args, name) for name in POLICY_SETTINGS}  # every setting the contract states
        policy = operator_client.set_policy(args.cloud, transport, **changes)
        pinned = escaped(policy.pinned_variant or "none")
        print(f"policy v{policy.version}: SLO p95 <= {policy.slo_ms:.1f} ms, pinned {pinned}")
        return 0
    raise AssertionError(f"unhandled command {args.command}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser(os.environ, argv)
    args, rest = parser.parse_known_args(argv)  # `bench` passes its options (--help included) through
    if rest and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "bench":
        args.args = [*args.args, *rest]
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr
    )
    try:
        return _dispatch(args)
    except (PrunefleetError, ValueError, OSError) as err:
        print(f"prunefleet: error: {err}", file=sys.stderr)
        return 2
    except grpc.RpcError as err:
        print(f"prunefleet: {err.code().name}: {escaped(err.details() or '')}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
