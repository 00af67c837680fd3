"""What the coordinator accepts from operators and edges: policies (unset fields filled and every range
checked, by the policy contract the edges apply too), and everything an edge sends (`Register` and every
report on `Connect`), by the bounds of `common.edge_input`, which edges check their reports by too.

The servicer refuses a bad `Register` with INVALID_ARGUMENT naming the field. A bad report on a
`Connect` stream ends that stream with INVALID_ARGUMENT naming the field (`body.field`), after the
reports before it on the stream were queued for storing; it is counted by kind in
`prunefleet_cloud_reports_refused_total` and logged, escaped. Nothing of it reaches the database, and
the other streams and RPCs carry on. An honest edge never sends such a report (its link fits and
checks every report by the same bounds), so a refusal means a peer that is broken or hostile.
"""

from __future__ import annotations

from common import policy_contract as contract
from common.edge_input import register_problem, report_problem  # noqa: F401  (the servicer's checks)
from common.policy_contract import PolicyContractError
from protos import coordinator_pb2

DEFAULT_POLICY = coordinator_pb2.Policy(**contract.defaults(), version=1)


class PolicyError(PolicyContractError):
    """A policy that cannot be applied; the message names the field."""


def validate_policy(policy: coordinator_pb2.Policy) -> coordinator_pb2.Policy:
    """Fill unset fields and check every range, both as the policy contract says (`common.policy_contract`),
    the same rules every edge applies to what it is sent. Returns a new policy; `version` is kept."""
    values = contract.filled(policy)
    found = contract.problem(values)
    if found is not None:
        raise PolicyError(found)
    merged = coordinator_pb2.Policy()
    merged.CopyFrom(policy)
    for name, value in values.items():
        setattr(merged, name, value)
    return merged
