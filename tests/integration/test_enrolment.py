"""Enrolment, renewal over the link and revocation with a real cloud and a real edge process on loopback:
the edge enrols with a bootstrap token, renews its short-lived certificate before it expires and goes
on serving and reporting past the first certificate's expiry; once revoked, its stream is closed within
5 s, its renewal is refused and its old token enrols nothing."""

import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from helpers import variant_store as _store
from helpers import wait_for

from bench.attacks.calls import code
from cloud.admin import certs, certs_enrol, operator_client
from cloud.localfleet import commands, processes
from cloud.localfleet.cluster import free_port
from common.identity import CLOUD_NAME, Identity
from common.security import Transport
from edge.enrolment import csr_pem
from protos import enrolment_pb2, enrolment_pb2_grpc, inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.integration
LIFETIME_S = 20


def _connected(fleet_stub, name: str) -> bool:
    return any(e.edge == name and e.connected for e in operator_client.fleet(fleet_stub).edges)


def _not_after(path: Path) -> float:
    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc.timestamp()


def _start(tmp_path: Path, keys) -> tuple[processes.Child, processes.Child, int, Path]:
    store = _store(tmp_path / "store", widths=(0.25,))
    enrol_port = free_port("127.0.0.1")
    args = commands.cloud_args(store.root, db=tmp_path / "fleet.sqlite", certs=keys["cloud"])
    args += ["--enrol-port", str(enrol_port), "--cert-lifetime", f"{LIFETIME_S}s"]
    cloud = processes.start("cloud", args, tmp_path / "logs")
    token = certs_enrol.make_token(keys["cloud"].parent, "edge-e", ttl_s=600)
    extra = ["--bootstrap-token", str(token), "--enrol-cloud", f"127.0.0.1:{enrol_port}"]
    edge_dir = tmp_path / "edge-e"
    try:
        edge_args = commands.edge_args(cloud.address, "edge-e", cache=tmp_path / "cache", certs=edge_dir, extra=extra)
        edge = processes.start("edge-e", edge_args, tmp_path / "logs")
    except BaseException:
        cloud.stop()
        raise
    return cloud, edge, enrol_port, token


def test_an_edge_enrols_renews_over_the_link_and_is_refused_within_seconds_once_revoked(tmp_path):
    keys = certs.init(tmp_path / "certs")
    cloud, edge, enrol_port, token = _start(tmp_path, keys)
    cert_path = tmp_path / "edge-e" / "cert.pem"
    try:
        first = Transport.load(tmp_path / "edge-e")
        assert first.identity == Identity("edge", "edge-e")
        fleet = operator_client.coordinator_stub(cloud.address, Transport.load(keys["operator"], token=True))
        wait_for(lambda: _connected(fleet, "edge-e"), 30, "the enrolled edge on the link", 0.5)
        expiry = x509.load_pem_x509_certificate(first.cert).not_valid_after_utc.timestamp()
        wait_for(lambda: cert_path.read_bytes() != first.cert, LIFETIME_S, "a renewal", 0.5)
        time.sleep(max(0.0, expiry - time.time()) + 2)  # the first certificate has expired
        assert _not_after(cert_path) > time.time()
        client = inference_pb2_grpc.InferenceServiceStub(Transport.load(keys["client"]).channel(edge.address))
        assert client.Describe(inference_pb2.DescribeRequest(), timeout=10).variant_id  # a new TLS handshake
        wait_for(lambda: _connected(fleet, "edge-e"), 10, "the edge on the link with its new certificate", 0.5)

        certs.revoke(keys["cloud"].parent, "edge", "edge-e")
        revoked_at = time.monotonic()
        wait_for(lambda: not _connected(fleet, "edge-e"), 8, "the revoked edge's stream closed", 0.2)
        assert time.monotonic() - revoked_at < 5
        time.sleep(2)
        assert not _connected(fleet, "edge-e")  # and it cannot come back

        held = Transport.load(tmp_path / "edge-e")
        renew = enrolment_pb2_grpc.EnrolmentServiceStub(held.channel(cloud.address))
        request = enrolment_pb2.RenewRequest(csr_pem=csr_pem(ec.generate_private_key(ec.SECP256R1()), "edge-e"))
        assert code(lambda: renew.Renew(request, timeout=5)) == grpc.StatusCode.PERMISSION_DENIED
        channel = grpc.secure_channel(
            f"127.0.0.1:{enrol_port}",
            grpc.ssl_channel_credentials(root_certificates=held.ca),
            (("grpc.ssl_target_name_override", CLOUD_NAME),),
        )
        enrol = enrolment_pb2.EnrolRequest(
            token=token.read_text().strip(), csr_pem=csr_pem(ec.generate_private_key(ec.SECP256R1()), "edge-e")
        )
        again = enrolment_pb2_grpc.EnrolmentServiceStub(channel)
        assert code(lambda: again.Enrol(enrol, timeout=5)) == grpc.StatusCode.PERMISSION_DENIED
        # the edge's own renewal, due two thirds into its certificate's life, is refused too
        wait_for(lambda: "renewal failed: PERMISSION_DENIED" in edge.log_path.read_text(), LIFETIME_S, "a refusal", 0.5)
        assert "certificate renewed" in edge.log_path.read_text()
    finally:
        edge.stop()
        cloud.stop()
