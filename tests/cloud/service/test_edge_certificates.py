"""Enrolment and renewal against a real cloud on loopback: bootstrap tokens (pre-approved, approved by
hand, single use, expiring, bound to a name), CSRs checked and never trusted beyond their key and name,
the enrolment port's bounds, and renewal on the mutual-TLS port by the edge's own certificate only."""

import argparse
import hashlib
import shutil
import sqlite3
import threading
import time
from contextlib import closing

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from helpers import variant_store as _store
from helpers import wait_for
from prometheus_client import CollectorRegistry

from bench.attacks.calls import code
from cloud.admin import certs, certs_enrol
from cloud.service import serve_command, server
from cloud.service.durations import parse_duration
from cloud.service.enrolment import STATE_FILE, EnrolmentConfig
from cloud.service.enrolment_store import EnrolmentStore
from common.identity import CLOUD_NAME, Identity, certificate_identity
from common.security import Transport
from edge.credentials import Credentials, RenewingTransport, renew_at
from edge.enrolment import EnrolConfig, EnrolmentError, RenewalConfig, Renewer, csr_pem, enrol
from protos import coordinator_pb2, coordinator_pb2_grpc, enrolment_pb2, enrolment_pb2_grpc

LIFETIME_S = 600.0


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return certs.init(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def cloud(keys, tmp_path_factory):
    root, run = keys["cloud"].parent, tmp_path_factory.mktemp("cloud")
    enrolment = EnrolmentConfig(
        ca_dir=root / "ca",
        state=keys["cloud"] / STATE_FILE,
        port=0,
        lifetime_s=LIFETIME_S,
        revoked=keys["cloud"] / "revoked",
        poll_s=0.2,
        rate_per_s=50.0,
        burst=60,
    )
    running = server.start(
        server.CloudConfig(
            store=_store(run / "store").root,
            transport=Transport.load(keys["cloud"], token=True),
            db=run / "fleet.sqlite",
            revoked=keys["cloud"] / "revoked",
            enrolment=enrolment,
        ),
        CollectorRegistry(),
    )
    yield running
    running.stop(0)


def _enrol_channel(keys, cloud) -> grpc.Channel:
    """TLS to the enrolment port, checking the cloud's certificate, presenting none."""
    ca = (keys["cloud"] / "ca.pem").read_bytes()
    return grpc.secure_channel(
        f"localhost:{cloud.enrol.port}",
        grpc.ssl_channel_credentials(root_certificates=ca),
        (("grpc.ssl_target_name_override", CLOUD_NAME),),
    )


def _enrol_stub(keys, cloud):
    return enrolment_pb2_grpc.EnrolmentServiceStub(_enrol_channel(keys, cloud))


def _token(keys, name=None, ttl_s=60.0):
    path = certs_enrol.make_token(keys["cloud"].parent, name, ttl_s)
    return path, path.read_text().strip()


def _edge_config(keys, cloud, name, token_file, directory):
    return EnrolConfig(f"localhost:{cloud.enrol.port}", name, token_file, directory, poll_s=0.1, timeout_s=30)


def test_a_pre_approved_token_enrols_its_edge_which_then_speaks_mutual_tls(keys, cloud, tmp_path):
    token_file, token = _token(keys, "edge-pre")
    with closing(sqlite3.connect(keys["cloud"] / STATE_FILE)) as db:  # the cloud keeps only its hash
        stored = [str(value) for row in db.execute("SELECT * FROM tokens") for value in row]
    assert hashlib.sha256(token.encode()).hexdigest() in stored
    assert not any(token.partition(".")[2] in value for value in stored)
    directory = tmp_path / "edge-pre"
    assert enrol(_edge_config(keys, cloud, "edge-pre", token_file, directory), threading.Event())
    assert (directory / "key.pem").stat().st_mode & 0o777 == 0o600
    assert {p.name for p in directory.iterdir()} == {"ca.pem", "cert.pem", "key.pem", "signing.pub"}
    transport = Transport.load(directory)
    assert transport.identity == Identity("edge", "edge-pre")
    cert = x509.load_pem_x509_certificate(transport.cert)
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds() == pytest.approx(
        LIFETIME_S + 300, abs=2
    )
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(transport.channel(f"localhost:{cloud.port}"))
    assert stub.Register(coordinator_pb2.RegisterRequest(edge="edge-pre"), timeout=5)
    # enrolled already: a second run finds the certificate and asks nothing (the token is spent anyway)
    assert not enrol(_edge_config(keys, cloud, "edge-pre", token_file, directory), threading.Event())


def test_an_unbound_token_waits_for_the_operator_to_approve(keys, cloud, tmp_path, capsys):
    from cloud.cli.main import main

    token_file, _ = _token(keys)
    outcome = {}
    config = _edge_config(keys, cloud, "edge-wait", token_file, tmp_path / "edge-wait")
    thread = threading.Thread(target=lambda: outcome.setdefault("enrolled", enrol(config, threading.Event())))
    thread.start()
    store = EnrolmentStore(keys["cloud"] / STATE_FILE, time.time)
    wait_for(lambda: any(r.name == "edge-wait" for r in store.pending()), 10, "the pending request")
    time.sleep(0.5)
    assert "enrolled" not in outcome and not (tmp_path / "edge-wait" / "cert.pem").exists()
    root = str(keys["cloud"].parent)
    capsys.readouterr()
    assert main(["certs", "pending", "--certs-dir", root]) == 0
    assert "edge-wait" in capsys.readouterr().out
    assert main(["certs", "approve", "edge-wait", "--certs-dir", root]) == 0
    thread.join(20)
    assert outcome == {"enrolled": True}
    assert Transport.load(tmp_path / "edge-wait").identity == Identity("edge", "edge-wait")
    assert main(["certs", "approve", "edge-wait", "--certs-dir", root]) == 1  # nothing pending any more


def _csr(name: str, key=None, builder=None) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = builder or x509.CertificateSigningRequestBuilder()
    csr = builder.subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def test_a_token_is_single_use_bound_to_its_name_and_expires(keys, cloud):
    stub = _enrol_stub(keys, cloud)
    _, token = _token(keys, "edge-once")
    key = ec.generate_private_key(ec.SECP256R1())
    first = stub.Enrol(enrolment_pb2.EnrolRequest(token=token, csr_pem=_csr("edge-once", key)), timeout=5)
    assert first.issued and certificate_identity(first.certificate_pem) == Identity("edge", "edge-once")
    again = stub.Enrol(enrolment_pb2.EnrolRequest(token=token, csr_pem=_csr("edge-once", key)), timeout=5)
    assert again.certificate_pem == first.certificate_pem  # the same key collects the same certificate

    def enrol(token, csr):
        return code(lambda: stub.Enrol(enrolment_pb2.EnrolRequest(token=token, csr_pem=csr), timeout=5))

    assert enrol(token, _csr("edge-once")) == grpc.StatusCode.PERMISSION_DENIED  # used, by another key
    _, bound = _token(keys, "edge-x")
    assert enrol(bound, _csr("edge-y")) == grpc.StatusCode.PERMISSION_DENIED  # bound to another name
    assert enrol(token[:-2] + "zz", _csr("edge-once")) == grpc.StatusCode.UNAUTHENTICATED  # a wrong secret
    assert enrol("", _csr("edge-once")) == grpc.StatusCode.INVALID_ARGUMENT
    store = EnrolmentStore(keys["cloud"] / STATE_FILE, lambda: time.time() - 3600)  # made an hour ago
    expired = store.create_token("edge-late", 60)
    assert enrol(expired, _csr("edge-late")) == grpc.StatusCode.UNAUTHENTICATED


def test_only_the_key_and_name_of_a_csr_reach_the_certificate(keys, cloud):
    stub = _enrol_stub(keys, cloud)
    greedy = x509.CertificateSigningRequestBuilder().add_extension(
        x509.SubjectAlternativeName(
            [x509.DNSName("evil.example"), x509.UniformResourceIdentifier("spiffe://prunefleet/operator/x")]
        ),
        critical=False,
    )
    greedy = greedy.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    _, token = _token(keys, "edge-greedy")
    reply = stub.Enrol(enrolment_pb2.EnrolRequest(token=token, csr_pem=_csr("edge-greedy", builder=greedy)), timeout=5)
    cert = x509.load_pem_x509_certificate(reply.certificate_pem)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://prunefleet/edge/edge-greedy"]
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    def enrol(csr):
        _, token = _token(keys)
        return code(lambda: stub.Enrol(enrolment_pb2.EnrolRequest(token=token, csr_pem=csr), timeout=5))

    assert enrol(b"not a csr") == grpc.StatusCode.INVALID_ARGUMENT
    assert enrol(_csr("../etc")) == grpc.StatusCode.INVALID_ARGUMENT
    assert enrol(_csr("edge-r", rsa.generate_private_key(65537, 1024))) == grpc.StatusCode.INVALID_ARGUMENT
    assert enrol(_csr("edge-e", ec.generate_private_key(ec.SECP521R1()))) == grpc.StatusCode.INVALID_ARGUMENT


def test_the_enrolment_port_bounds_messages_and_rates_and_serves_nothing_else(keys, cloud):
    stub = _enrol_stub(keys, cloud)
    big = enrolment_pb2.EnrolRequest(token="x" * 10, csr_pem=b"x" * (64 << 10))
    assert code(lambda: stub.Enrol(big, timeout=5)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    renew = enrolment_pb2.RenewRequest(csr_pem=_csr("edge-pre"))
    assert code(lambda: stub.Renew(renew, timeout=5)) == grpc.StatusCode.FAILED_PRECONDITION
    garbage = _enrol_channel(keys, cloud).unary_unary("/prunefleet.v1.EnrolmentService/Enrol")
    assert code(lambda: garbage(b"\xff\xff\xff", timeout=5)) == grpc.StatusCode.INVALID_ARGUMENT
    coordinator = coordinator_pb2_grpc.CoordinatorServiceStub(_enrol_channel(keys, cloud))
    register = coordinator_pb2.RegisterRequest(edge="edge-pre")
    assert code(lambda: coordinator.Register(register, timeout=5)) == grpc.StatusCode.UNIMPLEMENTED
    # 200 calls against 60 at once and 50 a second empty the bucket unless each takes over 14 ms (80 calls
    # never emptied it once each took over 6 ms, as they did in one full run of the suite)
    request = enrolment_pb2.EnrolRequest(token="0000.x", csr_pem=b"x")
    codes = [code(lambda: stub.Enrol(request, timeout=5)) for _ in range(200)]
    assert set(codes) == {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert codes[:50] == [grpc.StatusCode.INVALID_ARGUMENT] * 50  # within the burst
    time.sleep(1.5)  # refilled for whoever comes next


def _renew(directory, cloud, name):
    key = ec.generate_private_key(ec.SECP256R1())
    stub = enrolment_pb2_grpc.EnrolmentServiceStub(Transport.load(directory).channel(f"localhost:{cloud.port}"))
    return key, stub.Renew(enrolment_pb2.RenewRequest(csr_pem=csr_pem(key, name)), timeout=5)


def test_renewal_takes_the_edges_own_certificate_and_a_revoked_one_gets_nothing(keys, cloud, tmp_path):
    root = keys["cloud"].parent
    edge = certs.issue_holder(root, "edge", "edge-renew")
    key, reply = _renew(edge, cloud, "edge-renew")
    cert = x509.load_pem_x509_certificate(reply.certificate_pem)
    assert cert.public_key() == key.public_key()
    assert certificate_identity(reply.certificate_pem) == Identity("edge", "edge-renew")
    assert code(lambda: _renew(edge, cloud, "edge-other")) == grpc.StatusCode.PERMISSION_DENIED
    assert code(lambda: _renew(keys["client"], cloud, "default")) == grpc.StatusCode.PERMISSION_DENIED
    on_mtls = enrolment_pb2_grpc.EnrolmentServiceStub(Transport.load(edge).channel(f"localhost:{cloud.port}"))
    _, token = _token(keys, "edge-renew")
    enrol_there = enrolment_pb2.EnrolRequest(token=token, csr_pem=_csr("edge-renew"))
    assert code(lambda: on_mtls.Enrol(enrol_there, timeout=5)) == grpc.StatusCode.FAILED_PRECONDITION
    token_file, _ = _token(keys, "edge-renew")  # made before the revocation: never good afterwards
    time.sleep(0.01)
    certs.revoke(root, "edge", "edge-renew")
    wait_for(lambda: code(lambda: _renew(edge, cloud, "edge-renew")) == grpc.StatusCode.PERMISSION_DENIED, 5)
    with pytest.raises(EnrolmentError, match="PERMISSION_DENIED"):
        enrol(_edge_config(keys, cloud, "edge-renew", token_file, tmp_path / "again"), threading.Event())


def test_an_edge_renews_when_due_and_its_channels_move_to_the_new_certificate(keys, cloud, tmp_path):
    root, directory = keys["cloud"].parent, tmp_path / "edge-move"
    shutil.copytree(certs.issue_holder(root, "edge", "edge-move", days=300 / 86400), directory)
    held = Transport.load(directory)
    credentials = Credentials(held.ca, held.cert, held.key, directory, close_grace_s=0.2)
    transport, address = RenewingTransport.following(credentials), f"localhost:{cloud.port}"
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(transport.channel(address))
    assert stub.Register(coordinator_pb2.RegisterRequest(edge="edge-move"), timeout=5)
    renewer = Renewer(RenewalConfig(fraction=0.02), credentials, transport.channel(address), "edge-move")
    due = renew_at(held.cert, 0.02)
    stopping = threading.Event()
    threading.Thread(target=renewer.run, args=(stopping,), daemon=True).start()
    try:
        wait_for(lambda: renewer.renewed >= 1, 30, "a renewal")
        assert time.time() >= due - 1  # not before it was due
    finally:
        stopping.set()
    on_disk = Transport.load(directory)
    assert on_disk.cert != held.cert and on_disk.identity == Identity("edge", "edge-move")
    assert on_disk.cert == credentials.current()[1] and on_disk.key == credentials.current()[2]
    assert x509.load_pem_x509_certificate(on_disk.cert).not_valid_after_utc.timestamp() > time.time() + LIFETIME_S - 60
    time.sleep(0.5)  # the old channel is closed by now: this call goes over the new one
    assert stub.Register(coordinator_pb2.RegisterRequest(edge="edge-move"), timeout=5)


def test_the_serve_flags_make_the_enrolment_settings_and_bad_ones_name_their_setting(keys):
    parser = argparse.ArgumentParser()
    serve_command.add_arguments(parser, environ={})
    base = ["--store", ".", "--certs", str(keys["cloud"])]
    assert serve_command.config(parser.parse_args(base)).enrolment is None  # the CA stays offline unless asked
    config = serve_command.config(parser.parse_args([*base, "--enrol-port", "0", "--cert-lifetime", "90m"]))
    assert config.enrolment.ca_dir == keys["cloud"].parent / "ca" and config.enrolment.port == 0
    assert config.enrolment.lifetime_s == 5400 and config.enrolment.state == keys["cloud"] / STATE_FILE
    assert config.enrolment.revoked == keys["cloud"] / "revoked"
    renewal_only = serve_command.config(parser.parse_args([*base, "--ca", str(keys["cloud"].parent / "ca")]))
    assert renewal_only.enrolment.port is None
    assert parse_duration("2d") == 172800 and parse_duration("15") == 15
    for bad in ("-1h", "soon", "0", "inf"):
        with pytest.raises(ValueError, match="cert lifetime"):
            serve_command.config(parser.parse_args([*base, "--enrol-port", "0", f"--cert-lifetime={bad}"]))
    with pytest.raises(ValueError, match="cert lifetime"):
        serve_command.config(parser.parse_args([*base, "--enrol-port", "0", "--cert-lifetime", "5s"]))
    with pytest.raises(ValueError, match="enrol port"):
        serve_command.config(parser.parse_args([*base, "--enrol-port", "70000"]))


def test_certs_token_writes_a_bundle_for_the_edge_and_refuses_bad_names(keys, capsys):
    from cloud.cli.main import main

    root = keys["cloud"].parent
    assert main(["certs", "token", "--certs-dir", str(root), "--name", "edge-cli", "--ttl", "10m"]) == 0
    assert "pre-approved for edge edge-cli" in capsys.readouterr().out
    bundle = root / "bootstrap" / "edge-cli"
    assert {p.name for p in bundle.iterdir()} == {"ca.pem", "signing.pub", "token"}
    assert (bundle / "token").stat().st_mode & 0o777 == 0o600
    assert main(["certs", "token", "--certs-dir", str(root), "--name", "bad name"]) == 2
    assert main(["certs", "token", "--certs-dir", str(root), "--ttl", "1s"]) == 2
    assert "ttl" in capsys.readouterr().err


def test_an_edge_whose_certificate_expired_enrols_again_with_a_new_token(keys, cloud, tmp_path):
    directory = tmp_path / "edge-old"
    shutil.copytree(certs.issue_holder(keys["cloud"].parent, "edge", "edge-old", days=1 / 86400), directory)
    expired = (directory / "cert.pem").read_bytes()
    time.sleep(1.5)
    token_file, _ = _token(keys, "edge-old")
    assert enrol(_edge_config(keys, cloud, "edge-old", token_file, directory), threading.Event())
    renewed = Transport.load(directory)
    assert renewed.cert != expired and renewed.identity == Identity("edge", "edge-old")
    assert x509.load_pem_x509_certificate(renewed.cert).not_valid_after_utc.timestamp() > time.time() + 60
