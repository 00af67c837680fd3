"""`prunefleet-edge`: the edge agent.

    prunefleet-edge run --cloud HOST:PORT --name NAME --port PORT --metrics-port PORT --cache DIR
                        (--certs DIR | --insecure) [--verify-key PEM] [--cache-margin-mib MIB] [--stale-part-s S]
                        [--memory-budget-mib MIB] [--batch-delay-ms MS] [--max-pending N]
                        [--window-s S] [--slo-ms MS] [--allow-model package.module:function ...]
                        [--bootstrap-token FILE --enrol-cloud HOST:PORT] [--no-renew]
                        [--backend torch|onnxruntime]

`--window-s` and `--slo-ms` are the agent's own values of two policy settings until the coordinator's
policy sets them; their defaults and ranges are the policy contract's (`common.policy_contract`), and a
value out of range is refused at start-up, naming the flag.

With `--certs DIR` (this edge's own directory, `prunefleet certs issue edge NAME`, whose certificate
must name `--name`) the agent speaks mutual TLS to the cloud (and accepts only the cloud's certificate
as the cloud), serves its InferenceService over mutual TLS to client and operator certificates only,
and refuses variants not signed by the key in DIR/signing.pub (or `--verify-key`); `--bootstrap-token` enrols
it first, and it renews its certificate over the link (`edge.enrolment`). `--insecure` is
plaintext, without identities; variants are then checked only when `--verify-key` is given.

Zoo architectures are always built. A variant whose architecture is an import path is refused, before
anything is imported, unless the path is allowed: `--allow-model PATH` (repeatable) plus the
comma-separated paths in the environment variable PRUNEFLEET_ALLOW_MODELS (read when `main` runs).

`--backend` picks what serves the members (`edge.backends`): `torch` serves the float32 variant files,
`onnxruntime` every member's ONNX file, int8 members included, and never imports torch (nor builds an
architecture: an ONNX file is a graph, so the allow-list does not apply). Without the flag the agent
serves with torch where torch imports, else with ONNX Runtime.

One agent uses a cache directory at a time: a second one given the same `--cache` exits at once with
an error naming the directory and the pid of the agent holding it (`edge.cache`).

The agent's parts are wired in `edge.node`; the flags are defined in `edge.cli_flags`; this module
parses them and runs the loops.
Once the agent serves, it prints one line to stdout:
`prunefleet-edge NAME serving on HOST:PORT metrics on HOST:MPORT` (the bound ports; 0 picks free ones).
Logs go to stderr, every line escaped (`common.escaping`): what the cloud sends cannot forge one.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

from common import security
from common.errors import PrunefleetError
from common.escaping import escape_logs
from common.registry import ALLOW_ENV
from edge import backends, enrolment
from edge.agent import Agent, initial_portfolio
from edge.cli_flags import parser as _parser
from edge.config import AgentConfig
from edge.link import Link
from edge.node import STOP_GRACE_S, assemble

log = logging.getLogger("edge")


def allowed_models(args, environ) -> tuple[str, ...]:
    """The import paths this edge may build: `--allow-model` flags and `PRUNEFLEET_ALLOW_MODELS`."""
    entries = [environ.get(ALLOW_ENV, ""), *(args.allow_models or ())]
    return backends.allowed_models(args.backend or backends.default(), entries)


def verify_key(args) -> Path | None:
    if args.verify_key is not None:
        return args.verify_key
    return None if args.insecure or args.certs is None else args.certs / security.SIGNING_PUB


def _config(args, allowed: tuple[str, ...] = ()) -> AgentConfig:
    return AgentConfig(
        allowed_models=allowed,
        verify_key=verify_key(args),
        cloud=args.cloud,
        name=args.name,
        cache_dir=args.cache,
        host=args.host,
        advertise_host=args.advertise_host,
        port=args.port,
        metrics_port=args.metrics_port,
        threads=args.threads,
        batch=args.batch,
        max_batch=args.max_batch,
        window_s=args.window_s,
        slo_ms=args.slo_ms,
        memory_budget_mib=args.memory_budget_mib,
        batch_delay_ms=args.batch_delay_ms,
        max_pending=args.max_pending,
        optimize_models=args.optimize_models,
        backend=args.backend or backends.default(),
        cache_margin_mib=args.cache_margin_mib,
        stale_part_s=args.stale_part_s,
    )


def _serve(agent: Agent, link: Link, banner: str) -> None:
    threads = [
        threading.Thread(target=agent.decision_loop, daemon=True, name="decide"),
        threading.Thread(target=link.run, args=(agent,), daemon=True, name="link"),
    ]
    for thread in threads:
        thread.start()
    print(banner, flush=True)
    while not agent.stopping.wait(0.5):
        pass
    log.info("shutting down")
    for thread in threads:
        thread.join(timeout=STOP_GRACE_S)


def check_identity(transport: security.Transport, name: str) -> None:
    """With TLS the certificate must be this edge's own: the cloud refuses any other name."""
    identity = transport.identity
    if not transport.insecure and (identity is None or identity.role != "edge" or identity.name != name):
        held = identity.uri if identity else "no prunefleet identity"
        raise security.SecurityError(
            f"--certs holds a certificate of {held}, not of edge '{name}'; "
            f"make one with 'prunefleet certs issue edge {name} --certs-dir DIR'"
        )


def run(config: AgentConfig, stopping: threading.Event, transport: security.Transport) -> int:
    backends.start(config.backend, config.threads)
    log.info("serving with the %s backend", config.backend)
    node = assemble(config, stopping, transport)
    renewal = enrolment.start_renewal(transport, config.cloud, config.name, stopping)
    try:
        if initial_portfolio(node.agent, node.link):
            node.agent.start_serving()
            _serve(node.agent, node.link, node.banner())
    finally:
        node.close()
        renewal.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser(os.environ).parse_args(argv)
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    escape_logs()
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        allowed = allowed_models(args, os.environ)
        if allowed:
            log.info("import-path architectures allowed: %s", ", ".join(allowed))
        enrolment.enrol_from_arguments(args, stopping)
        transport = security.from_arguments(args, token=False)
        check_identity(transport, args.name)
        transport = enrolment.renewing(transport, args)
        log.info("speaking %s to %s", "plaintext (--insecure)" if transport.insecure else "mutual TLS", args.cloud)
        return run(_config(args, allowed), stopping, transport)
    except (PrunefleetError, ValueError, OSError) as err:
        print(f"prunefleet-edge: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
