"""Small helpers the attacks share: a call's status code, streams that never report, and a certificate
from a stranger's CA."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc
from cryptography.hazmat.primitives import serialization

from cloud.admin import certs
from common.identity import Identity
from protos import coordinator_pb2

OK = grpc.StatusCode.OK
DENIED = grpc.StatusCode.PERMISSION_DENIED


def code(call: Callable[[], object]) -> grpc.StatusCode:
    """The status code `call` ends with (OK when it returns)."""
    try:
        result = call()
        if hasattr(result, "__next__"):  # a server stream: read it to its end
            for _ in result:
                pass
    except grpc.RpcError as err:
        return err.code()
    return OK


def refused(status: grpc.StatusCode) -> bool:
    """A refusal the caller can act on: any status but OK, and not an error of the server itself."""
    return status not in (OK, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)


def telemetry(edge: str) -> coordinator_pb2.EdgeReport:
    return coordinator_pb2.EdgeReport(edge=edge, telemetry=coordinator_pb2.Telemetry(timestamp=time.time()))


class Silence:
    """Request streams that send the given reports and then nothing until `end` (or `hold_s`)."""

    def __init__(self, hold_s: float = 120.0):
        self._ended, self._hold_s = threading.Event(), hold_s

    def stream(self, *reports):
        yield from reports
        self._ended.wait(self._hold_s)

    def end(self) -> None:
        self._ended.set()


def stranger_holder(name: str) -> tuple[bytes, bytes, bytes]:
    """(CA, key, certificate) PEMs of a certificate naming edge `name`, signed by a CA of the
    attacker's own: right in every field but the signature chain."""
    ca_key, ca_cert = certs.make_ca("prunefleet CA")
    key, cert = certs.issue(ca_key, ca_cert, Identity("edge", name), certs.DEFAULT_HOSTS, days=1)
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return ca_cert.public_bytes(pem), key_pem, cert.public_bytes(pem)
