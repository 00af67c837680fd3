"""`python -m bench.load.fleet_sim`: many simulated edges in one process, speaking the real protocol.

    python -m bench.load.fleet_sim --cloud HOST:PORT --certs-dir DIR --prefix NAME --edges N --first I
                              --start-at UNIX --seconds S --out JSON [--ramp-s R]

Each simulated edge opens its own channel (its own TCP connection and mutual-TLS handshake, as a real
edge does), calls `Register`, then holds one `Connect` stream on which it sends one telemetry window a
second (a real `EdgeReport`) from `--start-at` for `--seconds` seconds, and reads what the coordinator
sends down. Registrations are spread over the ramp before `--start-at`; the edges' windows are spread
evenly over each second. A stream that fails is opened again after a short backoff (Register first),
as the edge's link does; windows a failed stream had taken are not sent again here, so any window the
coordinator loses shows up as missing. At the end every edge closes its side of the stream.

The JSON lists, per edge, the timestamps of the windows it sent (each is the window's key in the
coordinator's database), when its first directive arrived, and the errors it saw.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

import grpc

from cloud.admin import certs
from common.security import Transport
from common.wire import CHANNEL_OPTIONS
from protos import coordinator_pb2, coordinator_pb2_grpc

# every simulated edge gets its own connection, as separate devices would (gRPC would share one otherwise)
OPTIONS = CHANNEL_OPTIONS + (("grpc.use_local_subchannel_pool", 1),)


def _channel(certs_dir: Path, name: str, address: str) -> grpc.aio.Channel:
    """A connection of its own for the simulated edge `name`, with a certificate of its own (issued here,
    in memory, by the CA of `certs_dir`): the cloud accepts each edge's reports only under its name."""
    ca, key, cert = certs.issue_pems(certs_dir, "edge", name, days=1)
    credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    return grpc.aio.secure_channel(
        address, credentials, options=(*OPTIONS, *Transport.holding(ca, cert, key).name_options())
    )


class SimEdge:
    def __init__(self, name: str, stub, portfolio_id: str = ""):
        self.name, self.stub = name, stub
        self.windows: asyncio.Queue = asyncio.Queue()
        self.sent: list[float] = []
        self.errors: list[str] = []
        self.directives = 0
        self.finished = False  # every window is queued and the end of the stream after them
        self.connected_at = 0.0
        self.portfolio_id, self.policy_version = portfolio_id, 0

    async def _requests(self):
        while (report := await self.windows.get()) is not None:
            yield report

    async def _session(self) -> None:
        reply = await self.stub.Register(
            coordinator_pb2.RegisterRequest(
                edge=self.name, address="127.0.0.1:1", metrics_address="127.0.0.1:1", threads=1
            ),
            timeout=60,
        )
        self.portfolio_id, self.policy_version = reply.portfolio_id, reply.policy.version
        call = self.stub.Connect(self._requests())
        async for directive in call:
            self.directives += 1
            if not self.connected_at:
                self.connected_at = time.time()
            if directive.HasField("policy"):
                self.policy_version = directive.policy.version

    async def hold(self, until: float) -> None:
        """Keep a session up until the last window is sent and the stream closed."""
        attempt = 0
        while True:
            try:
                await self._session()
                return  # the stream ended because this edge closed its side
            except grpc.RpcError as err:
                self.errors.append(err.code().name)
            attempt += 1
            if (self.finished and self.windows.empty()) or time.time() > until + 30:
                return
            await asyncio.sleep(min(5.0, 0.2 * 2 ** min(attempt, 5)) * random.random())

    async def report(self, start_at: float, seconds: int) -> None:
        """One window a second; the window's end time is its key."""
        for i in range(seconds):
            await asyncio.sleep(max(0.0, start_at + i - time.time()))
            timestamp = time.time()
            self.windows.put_nowait(
                coordinator_pb2.EdgeReport(
                    edge=self.name,
                    telemetry=coordinator_pb2.Telemetry(
                        timestamp=timestamp,
                        active_variant="",
                        request_rate=10.0,
                        p50_ms=2.0,
                        p95_ms=4.0,
                        p99_ms=5.0,
                        requests=10,
                        portfolio_id=self.portfolio_id,
                        policy_version=self.policy_version,
                    ),
                )
            )
            self.sent.append(timestamp)
        self.finished = True
        self.windows.put_nowait(None)  # close our side: the coordinator ends the stream

    def result(self) -> dict:
        return {
            "sent": self.sent,
            "connected_at": self.connected_at,
            "errors": self.errors,
            "directives": self.directives,
        }


async def simulate(args) -> dict:
    names = [f"{args.prefix}-{args.first + i:05d}" for i in range(args.edges)]
    channels = [_channel(args.certs_dir, name, args.cloud) for name in names]
    edges = [
        SimEdge(name, coordinator_pb2_grpc.CoordinatorServiceStub(channel)) for name, channel in zip(names, channels)
    ]
    ramp_start = args.start_at - args.ramp_s
    tasks = []
    for i, edge in enumerate(edges):
        await asyncio.sleep(max(0.0, ramp_start + args.ramp_s * 0.8 * i / len(edges) - time.time()))
        tasks.append(asyncio.create_task(edge.hold(args.start_at + args.seconds)))
        offset = (args.first + i) / args.fleet  # spread the fleet's windows over each second
        tasks.append(asyncio.create_task(edge.report(args.start_at + offset, args.seconds)))
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=args.seconds + args.ramp_s + 120)
    for channel in channels:
        await channel.close()
    return {edge.name: edge.result() for edge in edges}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load.fleet_sim")
    parser.add_argument("--cloud", required=True)
    parser.add_argument("--certs-dir", type=Path, required=True, help="the directory of 'prunefleet certs init'")
    parser.add_argument("--prefix", default="sim")
    parser.add_argument("--edges", type=int, required=True)
    parser.add_argument("--first", type=int, default=0, help="index of this process's first edge in the fleet")
    parser.add_argument("--fleet", type=int, default=0, help="edges in the whole fleet (default --edges)")
    parser.add_argument("--start-at", type=float, required=True)
    parser.add_argument("--ramp-s", type=float, default=10.0)
    parser.add_argument("--seconds", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.fleet = args.fleet or args.edges
    result = asyncio.run(simulate(args))
    args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
