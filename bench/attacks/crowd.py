"""Ten thousand edges with ten profiles each, written through the real report path and read through
`prunefleet fleet status`.

Each edge is what a real one is to the cloud: a certificate of its own (issued here from the CA of
`prunefleet certs init`, as `certs issue edge` does, in memory), its own connection and mutual-TLS
handshake, a `Register`, and one `Connect` stream carrying its ten on-device profiles and a telemetry
window, which the coordinator checks, binds to the certificate's name and stores with its report
writer, as it does every edge's. Only the agent's model loading and profiling are skipped: they
produce these messages and nothing else the cloud sees. `SEEDING_CONCURRENCY` edges are in flight at
once. The cloud is its own process with a fleet pool large enough for them; quick mode writes fewer
edges (`QUICK_EDGES`) and says so in the record.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections import Counter
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from bench.attacks.arena import Arena, cli
from bench.attacks.records import Finding, Refusals
from cloud.admin import certs, operator_client
from common.identity import Identity
from common.security import Transport
from common.wire import CHANNEL_OPTIONS
from protos import coordinator_pb2, coordinator_pb2_grpc

FULL_EDGES, QUICK_EDGES, PROFILES = 10_000, 500, 10
SEEDING_CONCURRENCY = 64
SEED_TIMEOUT_S = 600.0
ATTEMPTS = 4
RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
VARIANTS = tuple(hashlib.sha256(str(i).encode()).hexdigest() for i in range(PROFILES))


def _pems(certs_dir: Path):
    """A function issuing (CA, key, certificate) PEMs for an edge name, the CA read once."""
    ca_key = serialization.load_pem_private_key((certs_dir / "ca" / "ca.key").read_bytes(), None)
    ca_pem = (certs_dir / "ca" / "ca.pem").read_bytes()
    ca_cert = x509.load_pem_x509_certificate(ca_pem)
    pem = serialization.Encoding.PEM

    def issue(name: str) -> tuple[bytes, bytes, bytes]:
        key, cert = certs.issue(ca_key, ca_cert, Identity("edge", name), certs.DEFAULT_HOSTS, days=1)
        key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        return ca_pem, key_pem, cert.public_bytes(pem)

    return issue


def _reports(name: str) -> list[coordinator_pb2.EdgeReport]:
    profiles = [
        coordinator_pb2.EdgeReport(
            edge=name,
            profile=coordinator_pb2.VariantProfile(
                variant_id=v, p50_ms_b1=1.0 + i, p95_ms_b1=2.0 + i, batch=8, p50_ms_batch=4.0, p95_ms_batch=6.0
            ),
        )
        for i, v in enumerate(VARIANTS)
    ]
    window = coordinator_pb2.Telemetry(timestamp=time.time(), request_rate=1.0, p50_ms=1.0, p95_ms=2.0, requests=1)
    return [*profiles, coordinator_pb2.EdgeReport(edge=name, telemetry=window)]


async def _session(name: str, address: str, pems: tuple[bytes, bytes, bytes]) -> None:
    ca, key, cert = pems
    transport = Transport.holding(ca, cert, key)
    credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    options = (*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1), *transport.name_options())
    async with grpc.aio.secure_channel(address, credentials, options=options) as channel:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        await stub.Register(coordinator_pb2.RegisterRequest(edge=name, address="127.0.0.1:1"), timeout=60)
        async for _ in stub.Connect(iter(_reports(name)), timeout=60):
            pass  # the coordinator ends the stream once our side is closed


async def _edge(name: str, address: str, issue, gate: asyncio.Semaphore, retries: Counter) -> str:
    """One edge's registration and reports, tried again after a refusal to retry as an agent's link
    does; "" when they went through, else the last status code."""
    async with gate:
        pems = issue(name)
        for attempt in range(ATTEMPTS):
            try:
                await _session(name, address, pems)
                return ""
            except grpc.RpcError as err:
                if err.code() not in RETRIED or attempt == ATTEMPTS - 1:
                    return err.code().name
                retries[err.code().name] += 1
                await asyncio.sleep(0.2 * 2**attempt)
    return "unreachable"


async def _seed(names: list[str], address: str, issue, retries: Counter) -> list[str]:
    gate = asyncio.Semaphore(SEEDING_CONCURRENCY)
    return await asyncio.wait_for(
        asyncio.gather(*(_edge(n, address, issue, gate, retries) for n in names)), timeout=SEED_TIMEOUT_S
    )


def _read_back(arena: Arena, address: str, names: list[str], found: Refusals) -> None:
    started = time.monotonic()
    result = cli("fleet", "status", "--cloud", address, "--certs", str(arena.holder("operator")), timeout_s=300)
    seconds = time.monotonic() - started
    listed = set(re.findall(r"^(crowd-\d{5})\s", result.stdout, re.M))
    found.measured.update({"fleet_status_s": round(seconds, 2), "fleet_status_edges": len(listed)})
    found.check(
        "prunefleet fleet status",
        result.returncode == 0 and listed == set(names),
        f"exit {result.returncode}, {len(listed)} of {len(names)} edges listed in {seconds:.1f} s",
    )
    stub = operator_client.coordinator_stub(address, arena.transport("operator", token=True))
    whole = operator_client.fleet(stub)
    profiles = {e.edge: len(e.profiles) for e in whole.edges}
    complete = sum(profiles.get(n) == PROFILES for n in names)
    found.check("every edge's profiles through paged GetFleet", complete == len(names), f"{complete} complete")


def ten_thousand_edges(arena: Arena) -> Finding:
    found = Refusals()
    edges = QUICK_EDGES if arena.quick else FULL_EDGES
    names = [f"crowd-{i:05d}" for i in range(edges)]
    cloud = arena.start_cloud("crowd-cloud", arena.holder("cloud"), ["--max-rpcs", str(4 * SEEDING_CONCURRENCY)])
    try:
        started = time.monotonic()
        retries: Counter = Counter()
        errors = asyncio.run(_seed(names, cloud.address, _pems(arena.certs), retries))
        seeded = time.monotonic() - started
        failed = [e for e in errors if e]
        found.measured.update(seed_failure_codes=dict(Counter(failed)), seed_retries=dict(retries))
        found.measured = {
            **found.measured,
            "edges": edges,
            "profiles_per_edge": PROFILES,
            "quick": arena.quick,
            "seed_s": round(seeded, 1),
            "seed_failures": len(failed),
        }
        found.check("writing them", not failed, f"{edges - len(failed)} of {edges} written in {seeded:.1f} s")
        _read_back(arena, cloud.address, names, found)
    finally:
        arena.stop(cloud)
    return found.finding()
