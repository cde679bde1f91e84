"""Keep etcd's raft leader off the PostgreSQL primary's host.

Why: where etcd runs on the database hosts (the building block's layout), losing the primary's
host can also cost etcd its leader. The new etcd leader then renews every lease to its full TTL,
so the HA manager's leader key outlives the dead primary by the election on top of the TTL
(measured in the lab: ~28 s write gaps instead of ~22 s). With the etcd leader elsewhere, one
host failure costs one of the two, never both.

Uploaded verbatim to every database host and run there, standard library only:

    python3 /usr/local/lib/bouwsteen/etcd_leader_away.py --member NAME --endpoints URL[,URL...] \
        [--cacert FILE --cert FILE --key FILE] [ACTION ROLE SCOPE]

Patroni runs it as an `on_start` / `on_role_change` callback (it appends action, role and scope;
any role but primary is a no-op), the flows run it on the primary after build and role changes.
It talks to etcd's JSON gateway (`/v3/...`). Prints one line; exit 0 when the leader is (now)
elsewhere or nothing can be done safely, 1 when a move was needed and failed, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import time
import urllib.request
from dataclasses import dataclass

REQUEST_TIMEOUT_S = 3.0
# https endpoints: verified against the cluster's CA, with this host's etcd client pair (main sets it).
TLS_CONTEXT: ssl.SSLContext | None = None
MOVE_DEADLINE_S = 10.0
PRIMARY_ROLES = ("primary", "master", "promoted")


@dataclass(frozen=True)
class EtcdMemberState:
    member_id: int
    name: str
    client_urls: tuple[str, ...]
    learner: bool = False
    reachable: bool = False
    raft_index: int = 0


@dataclass(frozen=True)
class LeaderMove:
    """What to do: `target` None means nothing (reason says why); otherwise move to it."""

    reason: str
    target: EtcdMemberState | None = None
    source: EtcdMemberState | None = None
    failed: bool = False


def plan_leader_move(members: list[EtcdMemberState], leader_id: int | None, primary: str) -> LeaderMove:
    """Pure decision: move etcd leadership off `primary`'s host, to the most caught-up healthy voter."""
    by_id = {m.member_id: m for m in members}
    own = next((m for m in members if m.name == primary), None)
    if own is None:
        return LeaderMove(f"{primary} runs no etcd member; nothing to move")
    if leader_id is None or leader_id not in by_id:
        return LeaderMove("etcd has no leader right now; leaving the election alone")
    if leader_id != own.member_id:
        return LeaderMove(f"the etcd leader is {by_id[leader_id].name}, not the primary's host {primary}")
    candidates = [m for m in members if m.member_id != own.member_id and m.reachable and not m.learner]
    if not candidates:
        return LeaderMove(f"the etcd leader is on the primary's host {primary}, but no other healthy voter can take "
                          "over", failed=True)
    target = max(candidates, key=lambda m: (m.raft_index, m.name))
    return LeaderMove(f"moving the etcd leader from the primary's host {primary} to {target.name}",
                      target=target, source=own)


# ---------------------------------------------------------------------------- I/O (etcd gateway)


def _post(url: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(
        url.rstrip("/") + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S, context=TLS_CONTEXT) as response:
        return json.loads(response.read() or b"{}")


def parse_member_list(doc: dict) -> list[dict]:
    """The gateway encodes uint64 ids as strings; names and URLs may be absent for unstarted members."""
    return [
        {"member_id": int(m["ID"]), "name": m.get("name", ""), "client_urls": tuple(m.get("clientURLs", [])),
         "learner": bool(m.get("isLearner", False))}
        for m in doc.get("members", [])
    ]


def parse_status(doc: dict) -> tuple[int, int | None, int]:
    """(member id, leader id or None, raft index) from one `maintenance/status` answer."""
    leader = int(doc.get("leader", 0) or 0)
    return int(doc["header"]["member_id"]), (leader or None), int(doc.get("raftIndex", 0) or 0)


def read_cluster(endpoints: list[str]) -> tuple[list[EtcdMemberState], int | None]:
    listed: list[dict] | None = None
    for url in endpoints:
        try:
            listed = parse_member_list(_post(url, "/v3/cluster/member/list", {}))
            break
        except (OSError, ValueError, KeyError):
            continue
    if listed is None:
        raise ConnectionError(f"no etcd endpoint answered ({', '.join(endpoints)})")
    statuses: dict[int, tuple[int | None, int]] = {}
    for member in listed:
        for url in member["client_urls"]:
            try:
                member_id, leader, index = parse_status(_post(url, "/v3/maintenance/status", {}))
            except (OSError, ValueError, KeyError):
                continue
            statuses[member_id] = (leader, index)
            break
    leaders = {leader for leader, _ in statuses.values() if leader}
    leader_id = leaders.pop() if len(leaders) == 1 else None
    members = [
        EtcdMemberState(m["member_id"], m["name"], m["client_urls"], m["learner"], m["member_id"] in statuses,
                        statuses.get(m["member_id"], (None, 0))[1])
        for m in listed
    ]
    return members, leader_id


def move_leader(move: LeaderMove) -> None:
    """The request must reach the current leader; then wait until the cluster reports the new one."""
    assert move.target is not None and move.source is not None
    errors = []
    for url in move.source.client_urls:
        try:
            _post(url, "/v3/maintenance/transfer-leadership", {"targetID": str(move.target.member_id)})
            break
        except (OSError, ValueError) as exc:
            errors.append(f"{url}: {exc}")
    else:
        raise ConnectionError("transfer-leadership failed: " + "; ".join(errors))
    deadline = time.monotonic() + MOVE_DEADLINE_S
    while time.monotonic() < deadline:
        for url in move.target.client_urls:
            try:
                _, leader, _ = parse_status(_post(url, "/v3/maintenance/status", {}))
            except (OSError, ValueError, KeyError):
                continue
            if leader == move.target.member_id:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{move.target.name} did not become etcd leader within {MOVE_DEADLINE_S:g}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Move etcd's leader off this PostgreSQL primary's host.")
    parser.add_argument("--member", required=True, help="this host's etcd member name (= inventory host name)")
    parser.add_argument("--endpoints", required=True, help="comma-separated etcd client URLs")
    parser.add_argument("--cacert", help="CA bundle the etcd members' certificates are verified against")
    parser.add_argument("--cert", help="client certificate etcd asks for")
    parser.add_argument("--key", help="its private key")
    parser.add_argument("callback", nargs="*", help="Patroni's ACTION ROLE SCOPE, when run as its callback")
    args = parser.parse_args(argv)
    if len(args.callback) >= 2 and args.callback[1] not in PRIMARY_ROLES:
        return 0
    global TLS_CONTEXT
    if args.cacert:
        try:
            TLS_CONTEXT = ssl.create_default_context(cafile=args.cacert)
            if args.cert and args.key:
                TLS_CONTEXT.load_cert_chain(args.cert, args.key)
        except OSError as exc:  # a missing or unreadable file (ssl.SSLError is an OSError too)
            print(f"etcd leader placement failed: TLS files {args.cacert}, {args.cert}, {args.key}: {exc}",
                  file=sys.stderr, flush=True)
            return 1
    endpoints = [e for e in args.endpoints.split(",") if e]
    try:
        members, leader_id = read_cluster(endpoints)
        move = plan_leader_move(members, leader_id, args.member)
        if move.target is not None:
            move_leader(move)
            print(f"{move.reason}: done.", flush=True)
            return 0
    except (ConnectionError, TimeoutError, OSError) as exc:
        print(f"etcd leader placement failed: {exc}", file=sys.stderr, flush=True)
        return 1
    print(f"{move.reason}.", flush=True)
    return 1 if move.failed else 0


if __name__ == "__main__":
    sys.exit(main())
