"""The certificates of the process cluster (`cloud.localfleet.cluster`): one CA per cluster directory
and a certificate of its own for every edge.

    DIR/certs/   what `prunefleet certs init` writes: ca/, cloud/, operator/, edges/NAME/, clients/NAME/

The CA, the cloud's, the operator's certificate and the operator token are made once and kept across
`cluster up` runs of one directory, so an operator command set up for the cluster keeps working. Each
`up` issues every edge of the cluster a fresh certificate naming it (`certs issue edge NAME`) and the
load generator a fresh client certificate (`LOAD_CLIENT`): both are short-lived (`certs.EDGE_DAYS`),
and the cloud holds the CA (`--ca`) so that edges renew theirs over the link in a cluster left running.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cloud.admin import certs
from common import security

LOAD_CLIENT = "cluster-load"  # the client certificate the load generator calls edges with
KEPT = (  # what `certs init` wrote that later runs keep, and need every one of
    "ca/ca.key",
    f"ca/{security.CA}",
    f"cloud/{security.CERT}",
    f"cloud/{security.KEY}",
    f"cloud/{security.TOKEN}",
    f"cloud/{security.SIGNING_KEY}",
    f"operator/{security.CERT}",
    f"operator/{security.KEY}",
    f"operator/{security.TOKEN}",
)


@dataclass(frozen=True)
class ClusterCerts:
    """Where each holder's directory (what `--certs` takes) is under the cluster's `root`."""

    root: Path

    @property
    def ca(self) -> Path:
        return self.root / "ca"

    @property
    def cloud(self) -> Path:
        return self.root / "cloud"

    @property
    def operator(self) -> Path:
        return self.root / "operator"

    @property
    def client(self) -> Path:
        return self.root / certs.SUBDIRS["client"] / LOAD_CLIENT

    def edge(self, name: str) -> Path:
        return self.root / certs.SUBDIRS["edge"] / name

    def complete(self) -> bool:
        """True when the CA, the cloud's and the operator's files of an earlier run are all there."""
        return all((self.root / path).is_file() for path in KEPT)


def edge_hosts(host: str) -> tuple[str, ...]:
    """The DNS/IP names of the cluster's edge certificates: the defaults and the host edges serve on."""
    return tuple(dict.fromkeys((*certs.DEFAULT_HOSTS, host)))


def prepare(root: Path, edges: Sequence[str], host: str) -> ClusterCerts:
    """Make the CA, cloud and operator certificates unless a complete set is in `root` already (an
    incomplete one, left by an interrupted run, is replaced whole), then issue each edge of `edges`
    and the load generator a certificate; edges' carry `host`, the address clients reach them at."""
    found = ClusterCerts(Path(root))
    if not found.complete():
        certs.init(found.root, [h for h in edge_hosts(host) if h not in certs.DEFAULT_HOSTS], force=True)
    for name in edges:
        certs.issue_holder(found.root, "edge", name, edge_hosts(host))
    certs.issue_holder(found.root, "client", LOAD_CLIENT)
    return found
