"""The revocation list the cloud checks every caller against, reloaded while it serves.

`prunefleet certs revoke edge NAME` appends a line `IDENTITY-URI REVOKED-AT` (unix seconds) to the
cloud's `revoked` file (`--revoked`, default `revoked` in the cloud's `--certs` directory). A
certificate naming a revoked identity is refused when it was issued before the revocation (its
`not_valid_before` is set five minutes before issue, `ISSUE_SKEW_S`), so `certs issue` afterwards
gives the same name a certificate that works again. The cloud rereads the file whenever it changes
(checked every second) and ends the open streams of identities revoked since.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from cryptography import x509

from common.identity import Identity

log = logging.getLogger(__name__)
ISSUE_SKEW_S = 300.0  # `cloud.admin.certs` backdates not_valid_before by five minutes


def parse(text: str) -> dict[str, float]:
    """Identity URI -> the latest time it was revoked; lines that do not parse are skipped."""
    revoked: dict[str, float] = {}
    for line in text.splitlines():
        uri, _, at = line.strip().partition(" ")
        try:
            when = float(at)
        except ValueError:
            continue
        if Identity.parse(uri) is not None:
            revoked[uri] = max(when, revoked.get(uri, 0.0))
    return revoked


class Revocations:
    """What `path` revokes, as of its last reload (a missing file revokes nothing); thread-safe."""

    def __init__(self, path: Path | None):
        self._path, self._lock = path, threading.Lock()
        self._seen: tuple[float, int] | None = None
        self._revoked: dict[str, float] = {}

    def reload(self) -> set[str]:
        """Reread the file if it changed; the identity URIs newly revoked (or revoked again)."""
        if self._path is None:
            return set()
        try:
            stat = os.stat(self._path)
            seen = (stat.st_mtime, stat.st_size)
            if seen == self._seen:
                return set()
            revoked = parse(Path(self._path).read_text(errors="replace"))
        except FileNotFoundError:
            seen, revoked = None, {}
        with self._lock:
            fresh = {uri for uri, at in revoked.items() if self._revoked.get(uri) != at}
            self._seen, self._revoked = seen, revoked
        if fresh:
            log.warning("revoked: %s", ", ".join(sorted(fresh)))
        return fresh

    def refuses(self, caller: Identity, context) -> bool:
        """Whether the caller's certificate was issued before its identity was revoked."""
        with self._lock:
            revoked_at = self._revoked.get(caller.uri)
        if revoked_at is None:
            return False
        pem = (context.auth_context().get("x509_pem_cert") or [b""])[0]
        try:
            issued = x509.load_pem_x509_certificate(pem).not_valid_before_utc.timestamp() + ISSUE_SKEW_S
        except ValueError:
            return True
        return issued <= revoked_at
