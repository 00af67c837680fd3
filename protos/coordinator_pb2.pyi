from protos import portfolio_pb2 as _portfolio_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Policy(_message.Message):
    __slots__ = ("slo_ms", "min_accuracy", "down_windows", "up_windows", "up_headroom", "dwell_s", "window_s", "pinned_variant", "version", "max_switches_per_minute")
    SLO_MS_FIELD_NUMBER: _ClassVar[int]
    MIN_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    DOWN_WINDOWS_FIELD_NUMBER: _ClassVar[int]
    UP_WINDOWS_FIELD_NUMBER: _ClassVar[int]
    UP_HEADROOM_FIELD_NUMBER: _ClassVar[int]
    DWELL_S_FIELD_NUMBER: _ClassVar[int]
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    PINNED_VARIANT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_SWITCHES_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    slo_ms: float
    min_accuracy: float
    down_windows: int
    up_windows: int
    up_headroom: float
    dwell_s: float
    window_s: float
    pinned_variant: str
    version: int
    max_switches_per_minute: int
    def __init__(self, slo_ms: _Optional[float] = ..., min_accuracy: _Optional[float] = ..., down_windows: _Optional[int] = ..., up_windows: _Optional[int] = ..., up_headroom: _Optional[float] = ..., dwell_s: _Optional[float] = ..., window_s: _Optional[float] = ..., pinned_variant: _Optional[str] = ..., version: _Optional[int] = ..., max_switches_per_minute: _Optional[int] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("edge", "address", "metrics_address", "threads")
    EDGE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    edge: str
    address: str
    metrics_address: str
    threads: int
    def __init__(self, edge: _Optional[str] = ..., address: _Optional[str] = ..., metrics_address: _Optional[str] = ..., threads: _Optional[int] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("policy", "variants", "portfolio_id", "portfolio")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    PORTFOLIO_ID_FIELD_NUMBER: _ClassVar[int]
    PORTFOLIO_FIELD_NUMBER: _ClassVar[int]
    policy: Policy
    variants: _containers.RepeatedCompositeFieldContainer[_portfolio_pb2.VariantInfo]
    portfolio_id: str
    portfolio: _portfolio_pb2.ListVariantsResponse
    def __init__(self, policy: _Optional[_Union[Policy, _Mapping]] = ..., variants: _Optional[_Iterable[_Union[_portfolio_pb2.VariantInfo, _Mapping]]] = ..., portfolio_id: _Optional[str] = ..., portfolio: _Optional[_Union[_portfolio_pb2.ListVariantsResponse, _Mapping]] = ...) -> None: ...

class VariantProfile(_message.Message):
    __slots__ = ("variant_id", "p50_ms_b1", "p95_ms_b1", "batch", "p50_ms_batch", "p95_ms_batch")
    VARIANT_ID_FIELD_NUMBER: _ClassVar[int]
    P50_MS_B1_FIELD_NUMBER: _ClassVar[int]
    P95_MS_B1_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    P50_MS_BATCH_FIELD_NUMBER: _ClassVar[int]
    P95_MS_BATCH_FIELD_NUMBER: _ClassVar[int]
    variant_id: str
    p50_ms_b1: float
    p95_ms_b1: float
    batch: int
    p50_ms_batch: float
    p95_ms_batch: float
    def __init__(self, variant_id: _Optional[str] = ..., p50_ms_b1: _Optional[float] = ..., p95_ms_b1: _Optional[float] = ..., batch: _Optional[int] = ..., p50_ms_batch: _Optional[float] = ..., p95_ms_batch: _Optional[float] = ...) -> None: ...

class Telemetry(_message.Message):
    __slots__ = ("timestamp", "active_variant", "request_rate", "p50_ms", "p95_ms", "p99_ms", "requests", "errors", "cpu_percent", "rss_bytes", "resident_variants", "portfolio_id", "policy_version")
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_VARIANT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_RATE_FIELD_NUMBER: _ClassVar[int]
    P50_MS_FIELD_NUMBER: _ClassVar[int]
    P95_MS_FIELD_NUMBER: _ClassVar[int]
    P99_MS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_VARIANTS_FIELD_NUMBER: _ClassVar[int]
    PORTFOLIO_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    timestamp: float
    active_variant: str
    request_rate: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    requests: int
    errors: int
    cpu_percent: float
    rss_bytes: int
    resident_variants: int
    portfolio_id: str
    policy_version: int
    def __init__(self, timestamp: _Optional[float] = ..., active_variant: _Optional[str] = ..., request_rate: _Optional[float] = ..., p50_ms: _Optional[float] = ..., p95_ms: _Optional[float] = ..., p99_ms: _Optional[float] = ..., requests: _Optional[int] = ..., errors: _Optional[int] = ..., cpu_percent: _Optional[float] = ..., rss_bytes: _Optional[int] = ..., resident_variants: _Optional[int] = ..., portfolio_id: _Optional[str] = ..., policy_version: _Optional[int] = ...) -> None: ...

class SwitchEvent(_message.Message):
    __slots__ = ("timestamp", "from_variant", "to_variant", "reason", "observed_p95_ms", "switch_us", "reason_code", "request_rate", "window_requests", "predicted_p95_ms", "slo_ms", "policy_version", "load_ms", "switched", "telemetry_missing")
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    FROM_VARIANT_FIELD_NUMBER: _ClassVar[int]
    TO_VARIANT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_P95_MS_FIELD_NUMBER: _ClassVar[int]
    SWITCH_US_FIELD_NUMBER: _ClassVar[int]
    REASON_CODE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_RATE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_P95_MS_FIELD_NUMBER: _ClassVar[int]
    SLO_MS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOAD_MS_FIELD_NUMBER: _ClassVar[int]
    SWITCHED_FIELD_NUMBER: _ClassVar[int]
    TELEMETRY_MISSING_FIELD_NUMBER: _ClassVar[int]
    timestamp: float
    from_variant: str
    to_variant: str
    reason: str
    observed_p95_ms: float
    switch_us: float
    reason_code: str
    request_rate: float
    window_requests: int
    predicted_p95_ms: float
    slo_ms: float
    policy_version: int
    load_ms: float
    switched: bool
    telemetry_missing: bool
    def __init__(self, timestamp: _Optional[float] = ..., from_variant: _Optional[str] = ..., to_variant: _Optional[str] = ..., reason: _Optional[str] = ..., observed_p95_ms: _Optional[float] = ..., switch_us: _Optional[float] = ..., reason_code: _Optional[str] = ..., request_rate: _Optional[float] = ..., window_requests: _Optional[int] = ..., predicted_p95_ms: _Optional[float] = ..., slo_ms: _Optional[float] = ..., policy_version: _Optional[int] = ..., load_ms: _Optional[float] = ..., switched: _Optional[bool] = ..., telemetry_missing: _Optional[bool] = ...) -> None: ...

class EdgeReport(_message.Message):
    __slots__ = ("edge", "telemetry", "switch", "profile")
    EDGE_FIELD_NUMBER: _ClassVar[int]
    TELEMETRY_FIELD_NUMBER: _ClassVar[int]
    SWITCH_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    edge: str
    telemetry: Telemetry
    switch: SwitchEvent
    profile: VariantProfile
    def __init__(self, edge: _Optional[str] = ..., telemetry: _Optional[_Union[Telemetry, _Mapping]] = ..., switch: _Optional[_Union[SwitchEvent, _Mapping]] = ..., profile: _Optional[_Union[VariantProfile, _Mapping]] = ...) -> None: ...

class Directive(_message.Message):
    __slots__ = ("policy", "portfolio")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    PORTFOLIO_FIELD_NUMBER: _ClassVar[int]
    policy: Policy
    portfolio: _portfolio_pb2.ListVariantsResponse
    def __init__(self, policy: _Optional[_Union[Policy, _Mapping]] = ..., portfolio: _Optional[_Union[_portfolio_pb2.ListVariantsResponse, _Mapping]] = ...) -> None: ...

class EdgeStatus(_message.Message):
    __slots__ = ("edge", "address", "metrics_address", "registered_at", "last_seen", "connected", "telemetry", "policy_version", "profiles", "desired_portfolio_id", "reported_portfolio_id", "desired_policy_version", "pinned_variant")
    EDGE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    TELEMETRY_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROFILES_FIELD_NUMBER: _ClassVar[int]
    DESIRED_PORTFOLIO_ID_FIELD_NUMBER: _ClassVar[int]
    REPORTED_PORTFOLIO_ID_FIELD_NUMBER: _ClassVar[int]
    DESIRED_POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    PINNED_VARIANT_FIELD_NUMBER: _ClassVar[int]
    edge: str
    address: str
    metrics_address: str
    registered_at: float
    last_seen: float
    connected: bool
    telemetry: Telemetry
    policy_version: int
    profiles: _containers.RepeatedCompositeFieldContainer[VariantProfile]
    desired_portfolio_id: str
    reported_portfolio_id: str
    desired_policy_version: int
    pinned_variant: str
    def __init__(self, edge: _Optional[str] = ..., address: _Optional[str] = ..., metrics_address: _Optional[str] = ..., registered_at: _Optional[float] = ..., last_seen: _Optional[float] = ..., connected: _Optional[bool] = ..., telemetry: _Optional[_Union[Telemetry, _Mapping]] = ..., policy_version: _Optional[int] = ..., profiles: _Optional[_Iterable[_Union[VariantProfile, _Mapping]]] = ..., desired_portfolio_id: _Optional[str] = ..., reported_portfolio_id: _Optional[str] = ..., desired_policy_version: _Optional[int] = ..., pinned_variant: _Optional[str] = ...) -> None: ...

class GetFleetRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class GetFleetResponse(_message.Message):
    __slots__ = ("edges", "policy", "portfolio_id", "next_page_token", "withdrawn_portfolios")
    EDGES_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    PORTFOLIO_ID_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    WITHDRAWN_PORTFOLIOS_FIELD_NUMBER: _ClassVar[int]
    edges: _containers.RepeatedCompositeFieldContainer[EdgeStatus]
    policy: Policy
    portfolio_id: str
    next_page_token: str
    withdrawn_portfolios: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, edges: _Optional[_Iterable[_Union[EdgeStatus, _Mapping]]] = ..., policy: _Optional[_Union[Policy, _Mapping]] = ..., portfolio_id: _Optional[str] = ..., next_page_token: _Optional[str] = ..., withdrawn_portfolios: _Optional[_Iterable[str]] = ...) -> None: ...

class SetPolicyRequest(_message.Message):
    __slots__ = ("policy",)
    POLICY_FIELD_NUMBER: _ClassVar[int]
    policy: Policy
    def __init__(self, policy: _Optional[_Union[Policy, _Mapping]] = ...) -> None: ...

class SetPolicyResponse(_message.Message):
    __slots__ = ("policy",)
    POLICY_FIELD_NUMBER: _ClassVar[int]
    policy: Policy
    def __init__(self, policy: _Optional[_Union[Policy, _Mapping]] = ...) -> None: ...

class PinRequest(_message.Message):
    __slots__ = ("edges", "variant_id")
    EDGES_FIELD_NUMBER: _ClassVar[int]
    VARIANT_ID_FIELD_NUMBER: _ClassVar[int]
    edges: str
    variant_id: str
    def __init__(self, edges: _Optional[str] = ..., variant_id: _Optional[str] = ...) -> None: ...

class PinResponse(_message.Message):
    __slots__ = ("edges", "policy")
    EDGES_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    edges: _containers.RepeatedScalarFieldContainer[str]
    policy: Policy
    def __init__(self, edges: _Optional[_Iterable[str]] = ..., policy: _Optional[_Union[Policy, _Mapping]] = ...) -> None: ...

class EdgeEvent(_message.Message):
    __slots__ = ("edge", "event")
    EDGE_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    edge: str
    event: SwitchEvent
    def __init__(self, edge: _Optional[str] = ..., event: _Optional[_Union[SwitchEvent, _Mapping]] = ...) -> None: ...

class ListEventsRequest(_message.Message):
    __slots__ = ("edge", "since", "limit", "page_size", "page_token")
    EDGE_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    edge: str
    since: float
    limit: int
    page_size: int
    page_token: str
    def __init__(self, edge: _Optional[str] = ..., since: _Optional[float] = ..., limit: _Optional[int] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListEventsResponse(_message.Message):
    __slots__ = ("events", "next_page_token")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[EdgeEvent]
    next_page_token: str
    def __init__(self, events: _Optional[_Iterable[_Union[EdgeEvent, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class RolloutThresholds(_message.Message):
    __slots__ = ("min_slo_attainment", "max_error_rate", "min_windows", "adopt_timeout_s")
    MIN_SLO_ATTAINMENT_FIELD_NUMBER: _ClassVar[int]
    MAX_ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    MIN_WINDOWS_FIELD_NUMBER: _ClassVar[int]
    ADOPT_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    min_slo_attainment: float
    max_error_rate: float
    min_windows: int
    adopt_timeout_s: float
    def __init__(self, min_slo_attainment: _Optional[float] = ..., max_error_rate: _Optional[float] = ..., min_windows: _Optional[int] = ..., adopt_timeout_s: _Optional[float] = ...) -> None: ...

class Rollout(_message.Message):
    __slots__ = ("id", "portfolio_id", "selector", "canary_edges", "edges", "state", "reason", "created_at", "updated_at", "thresholds", "previous_portfolio_id")
    ID_FIELD_NUMBER: _ClassVar[int]
    PORTFOLIO_ID_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    CANARY_EDGES_FIELD_NUMBER: _ClassVar[int]
    EDGES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_PORTFOLIO_ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    portfolio_id: str
    selector: str
    canary_edges: _containers.RepeatedScalarFieldContainer[str]
    edges: _containers.RepeatedScalarFieldContainer[str]
    state: str
    reason: str
    created_at: float
    updated_at: float
    thresholds: RolloutThresholds
    previous_portfolio_id: str
    def __init__(self, id: _Optional[int] = ..., portfolio_id: _Optional[str] = ..., selector: _Optional[str] = ..., canary_edges: _Optional[_Iterable[str]] = ..., edges: _Optional[_Iterable[str]] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., created_at: _Optional[float] = ..., updated_at: _Optional[float] = ..., thresholds: _Optional[_Union[RolloutThresholds, _Mapping]] = ..., previous_portfolio_id: _Optional[str] = ...) -> None: ...

class DeployRequest(_message.Message):
    __slots__ = ("portfolio", "edges", "canary", "thresholds", "canaries")
    PORTFOLIO_FIELD_NUMBER: _ClassVar[int]
    EDGES_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    CANARIES_FIELD_NUMBER: _ClassVar[int]
    portfolio: str
    edges: str
    canary: int
    thresholds: RolloutThresholds
    canaries: str
    def __init__(self, portfolio: _Optional[str] = ..., edges: _Optional[str] = ..., canary: _Optional[int] = ..., thresholds: _Optional[_Union[RolloutThresholds, _Mapping]] = ..., canaries: _Optional[str] = ...) -> None: ...

class UploadPiece(_message.Message):
    __slots__ = ("path", "size", "sha256", "data")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    path: str
    size: int
    sha256: str
    data: bytes
    def __init__(self, path: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadPortfolioResponse(_message.Message):
    __slots__ = ("portfolio_id", "bytes")
    PORTFOLIO_ID_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    portfolio_id: str
    bytes: int
    def __init__(self, portfolio_id: _Optional[str] = ..., bytes: _Optional[int] = ...) -> None: ...

class DeployResponse(_message.Message):
    __slots__ = ("rollout",)
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    rollout: Rollout
    def __init__(self, rollout: _Optional[_Union[Rollout, _Mapping]] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("rollout_id", "reason")
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    rollout_id: int
    reason: str
    def __init__(self, rollout_id: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class RollbackResponse(_message.Message):
    __slots__ = ("rollout",)
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    rollout: Rollout
    def __init__(self, rollout: _Optional[_Union[Rollout, _Mapping]] = ...) -> None: ...

class ListRolloutsRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class ListRolloutsResponse(_message.Message):
    __slots__ = ("rollouts",)
    ROLLOUTS_FIELD_NUMBER: _ClassVar[int]
    rollouts: _containers.RepeatedCompositeFieldContainer[Rollout]
    def __init__(self, rollouts: _Optional[_Iterable[_Union[Rollout, _Mapping]]] = ...) -> None: ...
