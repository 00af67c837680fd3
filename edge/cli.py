"""`prunefleet-edge`: the edge agent."""

from __future__ import annotations

import argparse
import logging
import random
import signal
import sys
import threading
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server

from edge.agent import Agent, AgentConfig, initial_portfolio, set_threads
from edge.metrics import EdgeMetrics
from edge.runtime import Runtime
from edge.server import InferenceServicer, make_server
from edge.telemetry import ProcessStats, RequestWindow

log = logging.getLogger("edge")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunefleet-edge", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    run = parser.add_subparsers(dest="command", required=True).add_parser("run", help="run an edge agent")
    run.add_argument("--cloud", required=True, metavar="HOST:PORT")
    run.add_argument("--name", required=True)
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, default=50061, help="0 picks a free port")
    run.add_argument("--metrics-port", type=int, default=9101, help="0 picks a free port")
    run.add_argument("--cache", type=Path, required=True)
    run.add_argument("--threads", type=int, default=1, help="inference threads (and concurrent inferences)")
    run.add_argument("--batch", type=int, default=8, help="typical batch size, profiled on arrival")
    run.add_argument("--max-batch", type=int, default=256)
    return parser


def run(args) -> int:
    config = AgentConfig(cloud=args.cloud, name=args.name, cache_dir=args.cache, host=args.host, port=args.port,
                         metrics_port=args.metrics_port, threads=args.threads, batch=args.batch,
                         max_batch=args.max_batch)
    set_threads(config.threads)
    registry = CollectorRegistry()
    metrics = EdgeMetrics(registry, config.name, slo_s=0.05)
    http, _ = start_http_server(config.metrics_port, config.host, registry=registry)
    runtime = Runtime(slots=config.threads, max_batch=config.max_batch)
    window = RequestWindow(time.monotonic())
    server, port, health = make_server(InferenceServicer(runtime, window, metrics), config.host, config.port,
                                       config.workers)
    address, metrics_address = f"{config.host}:{port}", f"{config.host}:{http.server_port}"
    agent = Agent(config, runtime, metrics, window, ProcessStats(), health, address, metrics_address)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: agent.stopping.set())
    rng = random.Random()
    initial_portfolio(agent, rng)
    if agent.stopping.is_set():
        server.stop(0)
        return 0
    agent.start_serving()
    threads = [threading.Thread(target=agent.decision_loop, daemon=True, name="decide"),
               threading.Thread(target=agent.link_loop, args=(rng,), daemon=True, name="link")]
    for thread in threads:
        thread.start()
    print(f"prunefleet-edge {config.name} serving on {address} metrics on {metrics_address}", flush=True)
    agent.stopping.wait()
    log.info("shutting down")
    server.stop(2.0).wait()
    agent.close()
    http.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    try:
        return run(args)
    except (ValueError, OSError) as err:
        print(f"prunefleet-edge: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
