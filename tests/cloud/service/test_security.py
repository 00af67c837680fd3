"""Mutual TLS, the operator token and variant signatures against a real cloud server on loopback."""

import stat

import grpc
import pytest
from helpers import variant_store as _store
from prometheus_client import CollectorRegistry

from cloud.admin import certs
from cloud.service import server
from common.security import SecurityError, Signer, Transport, Verifier
from protos import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    portfolio_pb2,
    portfolio_pb2_grpc,
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return certs.init(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory):
    return certs.init(tmp_path_factory.mktemp("other"))


@pytest.fixture(scope="module")
def tls_cloud(keys, tmp_path_factory):
    root = tmp_path_factory.mktemp("tls")
    store = _store(root / "store")
    running = server.start(
        server.CloudConfig(
            store=store.root,
            transport=Transport.load(keys["cloud"], token=True),
            db=root / "fleet.sqlite",
            signing_key=keys["cloud"] / "signing.key",
        ),
        CollectorRegistry(),
    )
    yield store, f"localhost:{running.port}"
    running.stop(0)


def _fleet(transport: Transport, address: str):
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(transport.channel(address))
    return stub.GetFleet(coordinator_pb2.GetFleetRequest(), timeout=5)


def test_certs_init_writes_each_role_its_files_with_private_keys_0600(keys):
    for role, extra in (("cloud", {"token", "signing.key"}), ("edge", {"signing.pub"}), ("operator", {"token"})):
        assert {p.name for p in keys[role].iterdir()} == {"ca.pem", "cert.pem", "key.pem", *extra}
        assert stat.S_IMODE((keys[role] / "key.pem").stat().st_mode) == 0o600
    assert (keys["cloud"] / "token").read_text() == (keys["operator"] / "token").read_text()
    with pytest.raises(SecurityError, match="--force"):
        certs.init(keys["cloud"].parent)


def test_the_operator_with_certificate_and_token_is_served(keys, tls_cloud):
    store, address = tls_cloud
    fleet = _fleet(Transport.load(keys["operator"], token=True), address)
    assert fleet.portfolio_id == store.manifest().portfolio_id


@pytest.mark.parametrize("token", ["", "x" * 43])
def test_a_missing_or_wrong_token_is_unauthenticated(keys, tls_cloud, token):
    _, address = tls_cloud
    plain = Transport.load(keys["operator"])
    transport = Transport(plain.ca, plain.cert, plain.key, token)
    with pytest.raises(grpc.RpcError) as err:
        _fleet(transport, address)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for call in ("SetPolicy", "ListEvents", "Deploy", "Rollback", "ListRollouts", "Pin"):
        method = transport.channel(address).unary_unary(f"/prunefleet.v1.CoordinatorService/{call}")
        with pytest.raises(grpc.RpcError) as err:
            method(b"", timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, call


def test_edges_need_their_certificate_not_the_token(keys, tls_cloud):
    store, address = tls_cloud
    stub = portfolio_pb2_grpc.PortfolioServiceStub(Transport.load(keys["edge"]).channel(address))
    listed = stub.ListVariants(portfolio_pb2.ListVariantsRequest(), timeout=5)
    verifier = Verifier.load(keys["edge"] / "signing.pub")
    for info in listed.variants:
        verifier.check(info.variant_id, info.signature)  # every variant signed by the cloud's key
    assert len(listed.variants) == len(store.manifest().variants)


@pytest.mark.parametrize("client", ["other-ca", "no-cert", "plaintext"])
def test_a_client_without_a_certificate_from_our_ca_is_refused_at_the_handshake(keys, other_ca, tls_cloud, client):
    _, address = tls_cloud
    ours, theirs = Transport.load(keys["operator"], token=True), Transport.load(other_ca["operator"], token=True)
    if client == "other-ca":  # trusts our server, presents a certificate our CA never signed
        transport = Transport(ours.ca, theirs.cert, theirs.key, ours.token)
        channel = transport.channel(address)
    elif client == "no-cert":
        credentials = grpc.ssl_channel_credentials(root_certificates=ours.ca)
        channel = grpc.secure_channel(address, credentials)
    else:
        channel = Transport.plaintext(ours.token).channel(address)
    stub = portfolio_pb2_grpc.PortfolioServiceStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.ListVariants(portfolio_pb2.ListVariantsRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_signatures_verify_only_for_the_signed_id_and_key(keys, other_ca):
    signer, verifier = Signer.load(keys["cloud"] / "signing.key"), Verifier.load(keys["edge"] / "signing.pub")
    a, b = "a" * 64, "b" * 64
    verifier.check(a, signer.sign(a))
    with pytest.raises(SecurityError, match="unsigned"):
        verifier.check(a, b"")
    with pytest.raises(SecurityError, match="wrong signature"):
        verifier.check(b, signer.sign(a))
    with pytest.raises(SecurityError, match="wrong signature"):
        verifier.check(a, Signer.load(other_ca["cloud"] / "signing.key").sign(a))
    with pytest.raises(SecurityError, match="sha256"):
        signer.sign("../etc/passwd")


def test_tls_without_a_token_and_missing_files_are_refused_before_serving(keys, tmp_path):
    with pytest.raises(SecurityError, match="token"):
        server.CloudConfig(store=tmp_path, transport=Transport.load(keys["cloud"]))
    with pytest.raises(SecurityError, match="certs init"):
        Transport.load(tmp_path)
