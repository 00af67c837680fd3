"""Attacks (part of `prunefleet bench reliability`): the fleet's own members, and whoever holds one of
its certificates, trying to do harm, each against real processes on loopback with the certificates
`prunefleet certs init` and `prunefleet certs issue edge|client NAME` write.

    python -m bench.attacks.run --json PATH [--quick] [--only NAME,...]   this part alone

Each attack (`ATTACKS`, in order) is one function of the arena (`bench.attacks.arena`) and gives one
record (`bench.attacks.records`): its name, what it tried, what should happen, what happened, whether
it was refused, and how long it took. The summary: `attacks_tried` and `attacks_refused`; the target
is every attack refused. An attack whose refusal needs work not built yet says so in `pending` and
counts as not refused until that work lands.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from bench.attacks import crowd, deploys, edges, flood, identity, replay, spy, strings
from bench.attacks.arena import BIND_TIMEOUT_S, Arena
from bench.attacks.records import Attack, attempt, summarize
from common.files import atomic_write_json

_ATTACKS = (
    Attack(
        "impersonation",
        "with edge-a's certificate: Register as edge-b at another address, Connect with reports naming "
        "edge-b (first, and after binding as edge-a), and download with a client certificate and with a "
        "certificate naming edge-b from another CA",
        "PERMISSION_DENIED for every call under another name or role (a stranger's CA fails the "
        "handshake); edge-b's registered address unchanged",
        identity.impersonation,
    ),
    Attack(
        "canary_name",
        'Register the name "-" (sorts before every real name) with edge-a\'s certificate, then '
        "`prunefleet deploy STORE` without --edges",
        'the Register is PERMISSION_DENIED and the canary is one of the real edges, never "-"',
        identity.canary_name,
    ),
    Attack(
        "canary_newcomer",
        f"`prunefleet certs issue edge {identity.NEWCOMER}` (a name sorting before every other), the newcomer "
        "registers under its own certificate just before a deploy without --edges or --canaries",
        "the canary is one of the edges registered before it, never the newcomer",
        identity.canary_newcomer,
    ),
    Attack(
        "edge_cert_as_cloud",
        "a real `prunefleet cloud serve` holding edge-b's certificate (with the operator token and signing "
        "key copied in) called by `prunefleet fleet status`, a real edge agent and an edge's channel",
        "no handshake completes: the operator's and the edge's channels expect the cloud's certificate",
        identity.edge_cert_as_cloud,
    ),
    Attack(
        "wrong_role_calls",
        "Deploy, SetPolicy, Pin and Rollback with edge-a's and a client's certificate carrying the operator "
        "token; Register with a client certificate; Describe at a real edge with an edge certificate",
        "PERMISSION_DENIED for each; the policy unchanged",
        identity.wrong_role_calls,
    ),
    Attack(
        "spy_sees_no_token",
        "edge-b registers a spy Predict server (holding edge-b's certificate) as its address; `prunefleet "
        "cluster load`, the demo's load generator and `prunefleet predict` are all given the operator's "
        "certificate directory",
        "the spy sees each tool's calls and no `authorization` metadata in any",
        spy.spy_sees_no_token,
    ),
    Attack(
        "idle_stream_flood",
        f"{flood.STREAMS} Connect streams (the cloud's --max-rpcs is {flood.MAX_RPCS}), each with an edge "
        "certificate of its own, that never report, while the operator deploys, lists rollouts and rolls back",
        "the operator's calls succeed; streams past the fleet's pool are RESOURCE_EXHAUSTED; every idle stream "
        f"is closed DEADLINE_EXCEEDED within the cloud's --bind-timeout ({BIND_TIMEOUT_S:g} s), measured",
        flood.idle_stream_flood,
    ),
    Attack(
        "hostile_strings",
        "edge-a registers names and addresses with a newline and a forged log line, escape sequences, 5 MB; "
        "`certs issue edge` of a name with a newline; reports switch reasons of the same kinds and two profiles "
        "of 5 MB",
        "each refused (PERMISSION_DENIED for a name not the certificate's, INVALID_ARGUMENT, the CLI's exit 2); "
        "GetFleet, `prunefleet fleet status` and `fleet events` keep working and print no control character; "
        "no forged line and no control character in the cloud's log",
        strings.hostile_strings,
    ),
    Attack(
        "ten_thousand_edges",
        f"{crowd.FULL_EDGES} edges (quick: {crowd.QUICK_EDGES}), each with its own certificate and connection, "
        f"register and report {crowd.PROFILES} profiles and a window each through Register and Connect; "
        "`prunefleet fleet status` reads them back",
        "every report stored; `fleet status` lists every edge (GetFleet in pages under the message limit) and "
        "paged GetFleet gives each edge its ten profiles",
        crowd.ten_thousand_edges,
    ),
    Attack(
        "deploy_path_escape",
        "deploy stores outside the cloud's portfolio root: by `..` (absolute and relative), by an absolute "
        "path, through a symlink in the root, and as a store in the root whose files are symlinks out of it",
        "each deploy refused (INVALID_ARGUMENT, PERMISSION_DENIED, FAILED_PRECONDITION or NOT_FOUND)",
        deploys.path_escape,
    ),
    Attack(
        "claimed_portfolio_id",
        "deploy a store in the root whose manifest claims the current portfolio's id over other files",
        "refused, or deployed under the id recomputed from its files; the current listing unchanged",
        deploys.claimed_portfolio_id,
    ),
    Attack(
        "manifest_list",
        "deploy a store in the root whose manifest.json holds a list",
        "INVALID_ARGUMENT naming the manifest (never UNKNOWN)",
        deploys.manifest_list,
    ),
    Attack(
        "revoked_certificate",
        "`prunefleet certs issue edge edge-r`, edge-r registers and holds a bound Connect stream, then "
        "`prunefleet certs revoke edge edge-r`",
        f"the open stream ends PERMISSION_DENIED within {edges.REVOKED_BOUND_S:g} s of the revoke command "
        "(measured); Register and ListVariants with the certificate PERMISSION_DENIED",
        edges.revoked_certificate,
    ),
    Attack(
        "two_agents_one_cache",
        "a second real edge agent (edge-b) started on the cache directory of a running one (edge-c)",
        "the second exits at once with an error; the first keeps serving; no .part file left",
        edges.two_agents_one_cache,
    ),
    Attack(
        "replayed_listing",
        "edge-c holds a newer portfolio; a server holding the cloud's TLS certificate (not its signing key) "
        "replays the older portfolio's signed listing to the restarted edge (Register) and the serving edge "
        "(Connect), sends the held listing with a member's accuracy raised, and one signed by the cloud's key "
        "that expired an hour ago",
        "each listing refused and counted by its reason (older_version twice, bad_signature, expired); every "
        "window of the edge names the held portfolio, none the older one",
        replay.replayed_listing,
    ),
)
ATTACKS = {attack.name: attack for attack in _ATTACKS}


def run(quick: bool, data_dir=None, work: Path | None = None, only: tuple[str, ...] = ()) -> dict:
    work = Path(work or "runs/bench-attacks.work").resolve()
    chosen = [ATTACKS[name] for name in (only or ATTACKS)]
    arena = Arena(work / "run", quick)
    try:
        records = [attempt(attack, arena) for attack in chosen]
    finally:
        arena.close()
    return {"quick": quick, "attacks": records, "summary": summarize(records)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.attacks.run", description=__doc__)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="", help=f"comma-separated attacks of: {', '.join(ATTACKS)}")
    args = parser.parse_args(argv)
    only = tuple(name for name in args.only.split(",") if name)
    unknown = [name for name in only if name not in ATTACKS]
    if unknown:
        parser.error(f"no attack {', '.join(unknown)}; known: {', '.join(ATTACKS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    result = run(args.quick, work=args.json.with_suffix(".work"), only=only)
    atomic_write_json(args.json, result)
    for record in result["attacks"]:
        print(
            f"{record['name']:24s} {'refused' if record['refused'] else 'NOT REFUSED':12s} {record['seconds']:6.1f} s"
        )
    print(json.dumps(result["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
