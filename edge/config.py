"""The edge agent's settings: one frozen dataclass, validated on construction, built from the flags of
`prunefleet-edge run` (`edge.cli`) and read by the agent (`edge.agent`) and its portfolio sync
(`edge.portfolio_sync`).

Two settings are the agent's own values of policy settings, held until the coordinator's policy
arrives: the telemetry window (`window_s`) and the SLO the latency histogram first gets a bucket at
(`slo_ms`). Their defaults and ranges are the policy contract's (`common.policy_contract`), so an edge
never starts on a value the coordinator would refuse. So is its name and the address it registers
(`common.edge_input`): the coordinator would refuse them too.

The cache directory holds the variant files the held and desired portfolios need, plus the files of
variants no longer needed, the most recently fetched first, up to `cache_margin_mib` (a rollback to
them then needs no download); a partial download untouched for `stale_part_s` is deleted
(`edge.cache`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.edge_input import MAX_ADDRESS, edge_name_problem
from common.policy_contract import PolicyContractError, setting
from edge.backends import BACKENDS, TORCH

POLICY_SETTINGS = ("window_s", "slo_ms")  # the agent's own values of these, checked by the policy contract


@dataclass(frozen=True)
class AgentConfig:
    cloud: str  # host:port of the coordinator and portfolio service
    name: str
    cache_dir: Path
    host: str = "127.0.0.1"  # address to bind
    advertise_host: str = ""  # how the coordinator and clients reach this edge; defaults to `host`
    port: int = 0  # 0 picks a free port
    metrics_port: int = 0
    threads: int = 1  # inference threads, and concurrent inferences
    batch: int = 8  # the typical batch, profiled on arrival
    max_batch: int = 256
    window_s: float = setting("window_s").default  # telemetry window until the policy sets one
    workers: int = 16  # gRPC server threads
    profile_iters: int = 30
    fetch_deadline_s: float = 300.0
    fetch_attempts: int = 5
    slo_ms: float = setting("slo_ms").default  # the latency histogram's first SLO bucket; the policy sets the SLO
    backoff_s: float = 0.5  # reconnect and re-register: exponential backoff with full jitter from here
    max_backoff_s: float = 10.0
    allowed_models: tuple[str, ...] = ()  # import-path architectures this edge may build (zoo: always)
    verify_key: Path | None = None  # the cloud's Ed25519 public key: refuse unsigned or wrongly signed variants
    memory_budget_mib: float = 0.0  # resident model bytes; the rest load on demand (0 = hold all)
    batch_delay_ms: float = 0.0  # micro-batching: longest a request waits for others (0 = off)
    max_pending: int = 256  # Predicts in progress or queued; beyond, RESOURCE_EXHAUSTED
    optimize_models: bool = True  # serve variants folded and channels-last (common.inference); False: as loaded
    cache_margin_mib: float = 64.0  # variant files no portfolio needs kept in the cache, newest first
    stale_part_s: float = 3600.0  # a partial download not written for this long is deleted
    backend: str = TORCH  # what serves the members (edge.backends): torch, or onnxruntime (no torch imported)

    def __post_init__(self) -> None:
        if not self.cloud or not self.name:
            raise ValueError("cloud and name must be set")
        if found := edge_name_problem(self.name):
            raise ValueError(found)
        if len(self.public_host) > MAX_ADDRESS - 6 or not self.public_host.isprintable():
            raise ValueError(f"host and advertise_host must be at most {MAX_ADDRESS - 6} printable characters")
        if self.cache_margin_mib < 0 or self.stale_part_s <= 0:
            raise ValueError("cache_margin_mib must be >= 0 and stale_part_s positive")
        if self.threads < 1 or self.workers < 2 or self.profile_iters < 1 or self.fetch_attempts < 1:
            raise ValueError("threads and fetch_attempts must be >= 1, workers >= 2 and profile_iters >= 1")
        if not 1 <= self.batch <= self.max_batch:
            raise ValueError(f"batch must be in [1, max_batch={self.max_batch}]")
        if not 0 <= self.port <= 65535 or not 0 <= self.metrics_port <= 65535:
            raise ValueError("ports must be in [0, 65535]")
        if self.fetch_deadline_s <= 0:
            raise ValueError("fetch_deadline_s must be positive")
        for name in POLICY_SETTINGS:
            found = setting(name).problem(getattr(self, name))
            if found is not None:
                raise PolicyContractError(found)
        if not 0 <= self.backoff_s <= self.max_backoff_s:
            raise ValueError("backoff_s must be in [0, max_backoff_s]")
        if self.memory_budget_mib < 0 or not 0 <= self.batch_delay_ms <= 1000 or self.max_pending < 1:
            raise ValueError("memory_budget_mib must be >= 0, batch_delay_ms in [0, 1000], max_pending >= 1")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")

    @property
    def memory_budget_bytes(self) -> int:
        return int(self.memory_budget_mib * (1 << 20))

    @property
    def public_host(self) -> str:
        return self.advertise_host or self.host

    @property
    def cache_margin_bytes(self) -> int:
        return int(self.cache_margin_mib * (1 << 20))
