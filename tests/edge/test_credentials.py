"""The edge's certificate changing under a running process, with real gRPC servers and TLS on loopback:
files replaced through a journal, the InferenceService's TLS presenting the new certificate from its
next handshake while connections already open keep serving, channels to the cloud following it; and
the enrolment flags and time limit of the edge."""

import shutil
import socket
import ssl
import threading
import time
from concurrent import futures

import grpc
import pytest
from cryptography import x509
from helpers import hammering

from cloud.admin import certs
from common.security import Transport
from edge.cli import _parser as edge_parser
from edge.credentials import Credentials, RenewingTransport, install, recover, renew_at
from edge.enrolment import EnrolConfig, EnrolmentError, enrol, enrol_from_arguments, renewing

ECHO = "/test.Echo/Peer"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    keys = certs.init(tmp_path_factory.mktemp("certs"))
    keys["edge-c"] = certs.issue_holder(keys["cloud"].parent, "edge", "edge-c")
    return keys


def _serial(pem: bytes) -> int:
    return x509.load_pem_x509_certificate(pem).serial_number


def test_renewal_is_due_at_two_thirds_of_the_lifetime_from_issue(keys):
    root = keys["cloud"].parent
    _, _, cert = certs.issue_pems(root, "edge", "edge-t", days=3 / 86400 * 1000)  # 3000 s
    assert renew_at(cert) == pytest.approx(time.time() + 2000, abs=5)
    assert renew_at(cert, 0.5) == pytest.approx(time.time() + 1500, abs=5)


def test_a_journal_cut_short_keeps_the_old_pair_and_a_whole_one_is_finished(keys, tmp_path):
    old_key, old_cert = b"-----BEGIN PRIVATE KEY-----\nold\n", b"-----BEGIN CERTIFICATE-----\nold\n"
    (tmp_path / "key.pem").write_bytes(old_key)
    (tmp_path / "cert.pem").write_bytes(old_cert)
    (tmp_path / "next.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\nne")  # the crash came mid-journal
    assert not recover(tmp_path)
    assert (tmp_path / "key.pem").read_bytes() == old_key and not (tmp_path / "next.pem").exists()
    new_key, new_cert = b"-----BEGIN PRIVATE KEY-----\nnew\n", b"-----BEGIN CERTIFICATE-----\nnew\n"
    (tmp_path / "next.pem").write_bytes(new_key + new_cert)  # the crash came after the journal
    assert recover(tmp_path)
    assert (tmp_path / "key.pem").read_bytes() == new_key and (tmp_path / "cert.pem").read_bytes() == new_cert
    install(tmp_path, old_key, old_cert)
    assert (tmp_path / "cert.pem").read_bytes() == old_cert and not (tmp_path / "next.pem").exists()
    assert (tmp_path / "key.pem").stat().st_mode & 0o777 == 0o600


def _echo_server(credentials: grpc.ServerCredentials) -> tuple[grpc.Server, int]:
    """A real TLS server whose one method answers with the certificate the caller presented."""

    def peer(request, context):
        return context.auth_context()["x509_pem_cert"][0]

    handler = grpc.method_handlers_generic_handler("test.Echo", {"Peer": grpc.unary_unary_rpc_method_handler(peer)})
    server = grpc.server(futures.ThreadPoolExecutor(4), handlers=(handler,))
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, port


def _presented(port: int, client, tmp_path) -> bytes:
    """The certificate the server presents in a new TLS handshake (PEM)."""
    for name in ("cert.pem", "key.pem", "ca.pem"):
        (tmp_path / name).write_bytes((client / name).read_bytes())
    context = ssl.create_default_context(cafile=tmp_path / "ca.pem")
    context.check_hostname = False
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw) as tls:
            return ssl.DER_cert_to_PEM_cert(tls.getpeercert(binary_form=True)).encode()


def test_the_server_presents_a_new_certificate_from_its_next_handshake_and_open_calls_go_on(keys, tmp_path):
    root = keys["cloud"].parent
    edge = Transport.load(keys["edge-c"])
    credentials = Credentials(edge.ca, edge.cert, edge.key)
    server, port = _echo_server(RenewingTransport.following(credentials).server_credentials())
    try:
        client = Transport.load(keys["client"]).channel(f"localhost:{port}")
        echo = client.unary_unary(ECHO)
        assert echo(b"", timeout=5) == Transport.load(keys["client"]).cert
        assert _serial(_presented(port, keys["client"], tmp_path)) == _serial(edge.cert)
        _, key, cert = certs.issue_pems(root, "edge", "edge-c")
        credentials.replace(cert, key)
        assert _serial(_presented(port, keys["client"], tmp_path)) == _serial(cert)  # a new handshake
        for _ in range(5):  # the connection opened before goes on, no call fails
            assert echo(b"", timeout=5)
        fresh = Transport.load(keys["operator"]).for_edges().channel(f"localhost:{port}")
        assert fresh.unary_unary(ECHO)(b"", timeout=5) == Transport.load(keys["operator"]).cert
        operator, served = Transport.load(keys["operator"]).for_edges(), []

        def new_connection():  # a handshake per call, racing the swaps
            with operator.channel(f"localhost:{port}") as channel:
                served.append(channel.unary_unary(ECHO)(b"", timeout=5))

        with hammering(lambda: served.append(echo(b"", timeout=5))) as failures, hammering(new_connection) as more:
            for _ in range(3):
                time.sleep(0.3)
                credentials.replace(*reversed(certs.issue_pems(root, "edge", "edge-c")[1:]))
            time.sleep(0.3)
        assert failures == [] and more == [] and len(served) > 20  # no call failed across three swaps
    finally:
        server.stop(0)


def test_channels_follow_the_certificate_and_the_old_one_is_closed(keys):
    root = keys["cloud"].parent
    edge = Transport.load(keys["edge-c"])
    credentials = Credentials(edge.ca, edge.cert, edge.key, close_grace_s=0.2)
    # the echo server holds the cloud's certificate, as the cloud an edge calls does
    server, port = _echo_server(Transport.load(keys["cloud"]).server_credentials())
    try:
        transport = RenewingTransport.following(credentials)
        channel = transport.channel(f"localhost:{port}", options=())
        echo = channel.unary_unary(ECHO)  # made once, as a stub makes it
        assert _serial(echo(b"", timeout=5)) == _serial(edge.cert)
        old = channel.current
        _, key, cert = certs.issue_pems(root, "edge", "edge-c")
        credentials.replace(cert, key)
        assert _serial(echo(b"", timeout=5)) == _serial(cert)
        time.sleep(0.5)
        with pytest.raises(ValueError):  # closed after the grace
            old.unary_unary(ECHO)(b"", timeout=5)
        assert _serial(echo.with_call(b"", timeout=5)[0]) == _serial(cert)
    finally:
        server.stop(0)


def test_enrolment_flags_need_a_directory_and_the_enrolment_port(tmp_path):
    base = ["run", "--cloud", "c:1", "--name", "edge-f", "--cache", str(tmp_path / "cache")]
    token = ["--bootstrap-token", str(tmp_path / "token")]
    for extra, problem in (
        (["--insecure"], "--certs DIR"),
        (["--certs", str(tmp_path / "mine")], "--enrol-cloud"),
    ):
        with pytest.raises(EnrolmentError, match=problem):
            enrol_from_arguments(edge_parser().parse_args([*base, *token, *extra]), threading.Event())
    plain = edge_parser().parse_args([*base, "--insecure"])
    enrol_from_arguments(plain, threading.Event())  # no token: nothing to do
    assert renewing(Transport.plaintext(), plain) == Transport.plaintext()


def test_an_edge_gives_up_enrolling_after_its_timeout_and_keeps_its_key_for_the_next_try(keys, tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "token").write_text("abcd1234.0123456789abcdefghij\n")
    shutil.copyfile(keys["cloud"] / "ca.pem", bundle / "ca.pem")
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{unused.getsockname()[1]}"  # nobody listens there
    config = EnrolConfig(address, "edge-g", bundle / "token", tmp_path / "mine", poll_s=0.1, timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(EnrolmentError, match="no certificate within"):
        enrol(config, threading.Event())
    assert time.monotonic() - started < 10
    key = tmp_path / "mine" / "enrol.key"
    assert key.stat().st_mode & 0o777 == 0o600 and not (tmp_path / "mine" / "cert.pem").exists()
    first = key.read_bytes()
    with pytest.raises(EnrolmentError):
        enrol(config, threading.Event())
    assert key.read_bytes() == first  # the same key asks again
