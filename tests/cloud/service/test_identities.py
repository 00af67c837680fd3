"""Per-edge identities and roles that cannot be confused, against real gRPC servers on loopback with
real certificates: every edge speaks only for itself, each role is only itself, the operator token
never leaves for an edge, and idle edge streams cannot lock the operator out."""

import threading
import time
from concurrent import futures

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from helpers import variant_store as _store
from prometheus_client import CollectorRegistry

from bench.attacks.calls import code
from cloud.admin import certs, predict_client
from cloud.localfleet import cluster_load
from cloud.service import server
from cloud.service.deploys import DeployConfig
from common.identity import CLOUD_NAME, Identity, certificate_identity
from common.security import SecurityError, Transport
from protos import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    inference_pb2_grpc,
    portfolio_pb2,
    portfolio_pb2_grpc,
)

DENIED = grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    keys = certs.init(tmp_path_factory.mktemp("certs"))
    for name in ("edge-a", "edge-b"):
        keys[name] = certs.issue_holder(keys["cloud"].parent, "edge", name)
    return keys


def _start(root, transport: Transport, **settings) -> server.CloudServer:
    store = _store(root / "store")
    return server.start(
        server.CloudConfig(store=store.root, transport=transport, db=root / "fleet.sqlite", **settings),
        CollectorRegistry(),
    )


@pytest.fixture(scope="module")
def cloud(keys, tmp_path_factory):
    running = _start(tmp_path_factory.mktemp("cloud"), Transport.load(keys["cloud"], token=True), bind_timeout_s=1.0)
    yield f"localhost:{running.port}"
    running.stop(0)


def _coordinator(directory, address, token=False):
    return coordinator_pb2_grpc.CoordinatorServiceStub(Transport.load(directory, token=token).channel(address))


def _x509(directory) -> x509.Certificate:
    return x509.load_pem_x509_certificate((directory / "cert.pem").read_bytes())


def test_each_role_names_itself_and_has_only_its_key_usages(keys):
    usages = {
        role: set(_x509(keys[role]).extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        for role in ("cloud", "operator", "client", "edge-a")
    }
    server_auth, client_auth = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
    assert usages == {
        "cloud": {server_auth},
        "operator": {client_auth},
        "client": {client_auth},
        "edge-a": {server_auth, client_auth},
    }
    assert certificate_identity((keys["edge-a"] / "cert.pem").read_bytes()) == Identity("edge", "edge-a")
    assert certificate_identity((keys["client"] / "cert.pem").read_bytes()) == Identity("client", "default")
    cloud_names = _x509(keys["cloud"]).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert CLOUD_NAME in cloud_names.get_values_for_type(x509.DNSName)
    edge = _x509(keys["edge-a"])
    days = (edge.not_valid_after_utc - edge.not_valid_before_utc).total_seconds() / 86400
    assert 7 <= days <= 7.01  # short-lived: 7 days (and the five minutes of clock skew allowed before)
    short = _x509(certs.issue_holder(keys["cloud"].parent, "client", "app", days=0.5))
    assert (short.not_valid_after_utc - short.not_valid_before_utc).total_seconds() < 86400
    with pytest.raises(SecurityError, match="edge name"):
        certs.issue_holder(keys["cloud"].parent, "edge", "../etc")


def test_an_edge_registers_and_reports_only_under_its_own_name(keys, cloud):
    mine = _coordinator(keys["edge-a"], cloud)
    assert code(lambda: mine.Register(coordinator_pb2.RegisterRequest(edge="edge-a"), timeout=5)) == grpc.StatusCode.OK
    for name in ("edge-b", "-", "edge-a2"):
        forged = coordinator_pb2.RegisterRequest(edge=name, address="evil:1")
        err = code(lambda forged=forged: mine.Register(forged, timeout=5))
        assert err == DENIED, name
    assert _coordinator(keys["edge-b"], cloud).Register(coordinator_pb2.RegisterRequest(edge="edge-b"), timeout=5)

    def report(edge):
        return coordinator_pb2.EdgeReport(edge=edge, telemetry=coordinator_pb2.Telemetry(timestamp=time.time()))

    # edge-b is registered, but edge-a's certificate cannot report for it, neither first nor after binding
    for sent in ([report("edge-b")], [report("edge-a"), report("edge-b")]):
        call = mine.Connect(iter(sent), timeout=5)
        assert code(lambda call=call: list(call)) == DENIED


def test_downloads_and_listings_take_an_edge_or_operator_certificate_only(keys, cloud):
    def listing(directory):
        stub = portfolio_pb2_grpc.PortfolioServiceStub(Transport.load(directory).channel(cloud))
        return code(lambda: stub.ListVariants(portfolio_pb2.ListVariantsRequest(), timeout=5))

    assert listing(keys["edge-a"]) == grpc.StatusCode.OK
    assert listing(keys["operator"]) == grpc.StatusCode.OK
    client = Transport.load(keys["client"])
    stub = portfolio_pb2_grpc.PortfolioServiceStub(Transport.holding(client.ca, client.cert, client.key).channel(cloud))
    fetch = stub.FetchVariant(portfolio_pb2.FetchVariantRequest(variant_id="a" * 64), timeout=5)
    assert code(lambda: list(fetch)) == DENIED
    registering = coordinator_pb2_grpc.CoordinatorServiceStub(
        Transport.load(keys["operator"], token=True).channel(cloud)
    )
    assert code(lambda: registering.Register(coordinator_pb2.RegisterRequest(edge="x"), timeout=5)) == DENIED


def test_operator_methods_need_the_operator_certificate_as_well_as_the_token(keys, cloud):
    token = Transport.load(keys["operator"], token=True).token
    for role in ("edge-a", "client"):
        held = Transport.load(keys[role])
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(
            Transport(held.ca, held.cert, held.key, token, CLOUD_NAME).channel(cloud)
        )
        assert code(lambda stub=stub: stub.GetFleet(coordinator_pb2.GetFleetRequest(), timeout=5)) == DENIED, role
        pin = coordinator_pb2.PinRequest(edges="edge-b", variant_id="")
        assert code(lambda stub=stub, pin=pin: stub.Pin(pin, timeout=5)) == DENIED, role
    operator = _coordinator(keys["operator"], cloud, token=True)
    assert operator.GetFleet(coordinator_pb2.GetFleetRequest(), timeout=5).portfolio_id


def test_a_server_holding_an_edge_certificate_is_refused_as_the_cloud(keys, tmp_path):
    token = Transport.load(keys["operator"], token=True).token
    held = Transport.load(keys["edge-b"])
    impostor = _start(tmp_path, Transport(held.ca, held.cert, held.key, token))
    try:
        address = f"localhost:{impostor.port}"
        operator = _coordinator(keys["operator"], address, token=True)
        assert (
            code(lambda: operator.GetFleet(coordinator_pb2.GetFleetRequest(), timeout=5)) == grpc.StatusCode.UNAVAILABLE
        )
        edge = _coordinator(keys["edge-a"], address)
        register = coordinator_pb2.RegisterRequest(edge="edge-a")
        assert code(lambda: edge.Register(register, timeout=5)) == grpc.StatusCode.UNAVAILABLE
    finally:
        impostor.stop(0)


class Spy(inference_pb2_grpc.InferenceServiceServicer):
    """A Predict server holding an edge certificate that records what callers send it."""

    def __init__(self):
        self.metadata: list[dict] = []

    def _record(self, context):
        self.metadata.append(dict(context.invocation_metadata()))
        context.abort(grpc.StatusCode.UNAVAILABLE, "a spy")

    def Predict(self, request, context):
        self._record(context)

    def Describe(self, request, context):
        self._record(context)


@pytest.fixture
def spy(keys):
    spy, grpc_server = Spy(), grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(spy, grpc_server)
    port = grpc_server.add_secure_port("127.0.0.1:0", Transport.load(keys["edge-b"]).server_credentials())
    grpc_server.start()
    yield spy, f"127.0.0.1:{port}"
    grpc_server.stop(0)


def test_the_operator_token_never_goes_to_an_edge(keys, cloud, spy, tmp_path):
    spy, address = spy
    operator = Transport.load(keys["operator"], token=True)  # the worst case: tools handed the operator's
    edge_b = _coordinator(keys["edge-b"], cloud)
    edge_b.Register(coordinator_pb2.RegisterRequest(edge="edge-b", address=address), timeout=5)
    stop = threading.Event()
    config = cluster_load.LoadConfig(cloud=cloud, clients=1, batch=1, round_s=0.5, images=4)
    load = threading.Thread(target=cluster_load.run, args=(config, stop, operator), daemon=True)
    load.start()
    deadline = time.monotonic() + 30
    while not spy.metadata and time.monotonic() < deadline:
        time.sleep(0.1)
    stop.set()
    load.join(30)
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    with pytest.raises((grpc.RpcError, ValueError)):
        predict_client.classify(address, operator, [str(image)])
    assert len(spy.metadata) >= 1
    assert all("authorization" not in sent for sent in spy.metadata)


@pytest.fixture
def never():
    """Request streams that send nothing until the test ends."""
    ended = threading.Event()

    def silent():
        ended.wait(60)
        yield from ()

    yield silent
    ended.set()


def test_one_stream_per_edge_and_a_stream_that_never_binds_is_closed(keys, cloud, never):
    edge = _coordinator(keys["edge-a"], cloud)
    edge.Register(coordinator_pb2.RegisterRequest(edge="edge-a"), timeout=5)
    older = edge.Connect(never(), timeout=10)
    next(older)  # the first directive: the stream is open
    newer = edge.Connect(never(), timeout=10)
    next(newer)
    assert code(lambda: list(older)) == grpc.StatusCode.ABORTED  # replaced by the newer one
    started = time.monotonic()
    assert code(lambda: list(newer)) == grpc.StatusCode.DEADLINE_EXCEEDED  # no report within bind_timeout_s
    assert time.monotonic() - started < 8
    assert "no report" in (newer.details() or "")


def test_idle_edge_streams_cannot_lock_the_operator_out(tmp_path, never):
    """Eight Connect streams that never report fill `max_rpcs` 8; the operator still lists and rolls back."""
    deploys = DeployConfig(portfolio_root=tmp_path)
    running = _start(tmp_path / "c", Transport.plaintext(), workers=4, max_rpcs=8, bind_timeout_s=60, deploys=deploys)
    address = f"127.0.0.1:{running.port}"
    try:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(Transport.plaintext().channel(address))
        stub.Register(coordinator_pb2.RegisterRequest(edge="edge-1"), timeout=5)
        second = _store(tmp_path / "second", widths=(0.125,))
        rollout = stub.Deploy(coordinator_pb2.DeployRequest(portfolio=str(second.root)), timeout=5).rollout
        channels = [grpc.insecure_channel(address, options=(("grpc.use_local_subchannel_pool", 1),)) for _ in range(8)]
        idle = [coordinator_pb2_grpc.CoordinatorServiceStub(c).Connect(never(), timeout=30) for c in channels]
        for stream in idle:
            next(stream)
        extra = stub.Connect(never(), timeout=5)
        assert code(lambda: next(extra)) == grpc.StatusCode.RESOURCE_EXHAUSTED  # the fleet's pool is full
        listed = stub.ListRollouts(coordinator_pb2.ListRolloutsRequest(), timeout=5).rollouts
        assert rollout.id in [r.id for r in listed]
        back = stub.Rollback(coordinator_pb2.RollbackRequest(rollout_id=rollout.id), timeout=5).rollout
        assert back.id == rollout.id and back.state != rollout.state
        for stream in idle:
            stream.cancel()
    finally:
        running.stop(0)


def test_certs_commands_issue_and_revoke_by_name(keys, capsys):
    from cloud.cli.main import main

    root = keys["cloud"].parent
    assert main(["certs", "issue", "edge", "edge-cli", "--certs-dir", str(root), "--days", "2"]) == 0
    holder = root / "edges" / "edge-cli"
    assert {p.name for p in holder.iterdir()} == {"ca.pem", "cert.pem", "key.pem", "signing.pub"}
    assert Transport.load(holder).identity == Identity("edge", "edge-cli")
    assert main(["certs", "issue", "client", "app", "--certs-dir", str(root)]) == 0
    assert Transport.load(root / "clients" / "app").identity == Identity("client", "app")
    assert main(["certs", "issue", "edge", "bad name", "--certs-dir", str(root)]) == 2
    assert "edge name" in capsys.readouterr().err
    assert main(["certs", "revoke", "client", "app", "--certs-dir", str(root)]) == 0
    assert "spiffe://prunefleet/client/app " in (root / "cloud" / "revoked").read_text()


def test_a_revoked_edge_is_refused_within_seconds_whatever_it_holds(keys, tmp_path):
    root = keys["cloud"].parent
    edge = certs.issue_holder(root, "edge", "edge-r")
    running = _start(tmp_path, Transport.load(keys["cloud"], token=True), revoked=root / "cloud" / "revoked")
    address = f"localhost:{running.port}"
    try:
        stub = _coordinator(edge, address)
        assert stub.Register(coordinator_pb2.RegisterRequest(edge="edge-r"), timeout=5)
        reports = threading.Event()

        def stream():
            yield coordinator_pb2.EdgeReport(edge="edge-r", telemetry=coordinator_pb2.Telemetry(timestamp=time.time()))
            reports.wait(30)

        connected = stub.Connect(stream(), timeout=30)
        next(connected)  # bound and served
        certs.revoke(root, "edge", "edge-r")
        started = time.monotonic()
        assert code(lambda: list(connected)) == DENIED  # the open stream ends
        assert time.monotonic() - started < 5
        assert code(lambda: stub.Register(coordinator_pb2.RegisterRequest(edge="edge-r"), timeout=5)) == DENIED
        other = _coordinator(keys["edge-a"], address)  # other edges are not affected
        assert other.Register(coordinator_pb2.RegisterRequest(edge="edge-a"), timeout=5)
        time.sleep(1.1)  # certificates carry whole seconds: one issued after the revocation works again
        again = _coordinator(certs.issue_holder(root, "edge", "edge-r"), address)
        assert again.Register(coordinator_pb2.RegisterRequest(edge="edge-r"), timeout=5)
        reports.set()
    finally:
        running.stop(0)


@pytest.mark.parametrize(
    "uri, identity",
    [
        ("spiffe://prunefleet/cloud", Identity("cloud")),
        ("spiffe://prunefleet/edge/edge-a", Identity("edge", "edge-a")),
        ("spiffe://prunefleet/client/app", Identity("client", "app")),
        ("spiffe://prunefleet/edge", None),  # an edge without a name
        ("spiffe://prunefleet/cloud/x", None),  # the cloud has no name
        ("spiffe://prunefleet/edge/a/b", None),
        ("spiffe://prunefleet/admin/x", None),  # no such role
        ("spiffe://other/edge/edge-a", None),  # another trust domain
    ],
)
def test_identities_parse_only_our_roles_and_names(uri, identity):
    assert Identity.parse(uri) == identity
    if identity is not None:
        assert identity.uri == uri
