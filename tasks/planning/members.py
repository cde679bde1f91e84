"""Pure decisions for the member lifecycle (issue 16): may a member be removed, a dead one
replaced, a standby re-cloned, and what each run does. The flows read the inventory, the HA
manager's view and etcd's member list; these functions decide over that snapshot only."""

from __future__ import annotations

from dataclasses import dataclass

from blocks.inventory import Inventory, Role
from tasks.adapters.ha.base import ClusterView
from tasks.planning.plan import Action, ActionPlan


@dataclass(frozen=True)
class MemberSnapshot:
    """What pre-flight read: the HA manager's view, etcd's member names, and per database host
    whether it streams from the primary (pg_stat_replication on the primary)."""

    view: ClusterView
    etcd_members: tuple[str, ...] = ()
    streaming: tuple[str, ...] = ()


def etcd_refusal(before: Inventory, host: str) -> str | None:
    """An etcd member may only leave when an odd number of at least three stays: fewer cannot
    survive one more loss, and an even count survives no more losses than one member fewer."""
    members = [h.name for h in before.etcd_members]
    if host not in members:
        return None
    remaining = len(members) - 1
    if remaining >= 3 and remaining % 2 == 1:
        return None
    return (f"{host} is one of {len(members)} etcd members ({', '.join(members)}); without it {remaining} would "
            f"remain, which {'cannot survive one more loss' if remaining < 3 else 'survives no more losses than one fewer'}"
            f": replace it instead (replace_member {host} with a new host)")


def sync_refusal(before: Inventory, host: str) -> str | None:
    """In synchronous mode the HA manager promotes only a recorded synchronous standby: at least
    one standby must remain, or losing the primary means no failover at all."""
    if not before.cluster.postgres.synchronous_replication:
        return None
    remaining = [h.name for h in before.db_hosts if h.name != host]
    if len(remaining) >= 2:
        return None
    return (f"cluster.postgres.synchronous_replication is on and without {host} only "
            f"{', '.join(remaining) or 'no host'} would remain: synchronous mode needs one standby")


def plan_removal(before: Inventory, host: str, snap: MemberSnapshot) -> ActionPlan:
    """remove_member: refuse the primary and what breaks the inventory's promises; nothing to do
    when the host is neither a database host nor an etcd member nor known to either manager."""
    spec = before.find(host)
    if spec is None:
        return ActionPlan(refusals=(f"host: {host!r} is not in the inventory of cluster {before.cluster.name}",))
    in_inventory = spec.has(Role.db) or host in {h.name for h in before.etcd_members}
    known = snap.view.member(host) is not None or host in snap.etcd_members
    if not in_inventory and not known:
        return ActionPlan(nothing_to_do=f"{host} is no member of cluster {before.cluster.name}: nothing to remove.")
    refusals = []
    if snap.view.leader == host:
        refusals.append(f"{host} is the primary: switch over to another member first")
    elif snap.view.leader is None:
        refusals.append(f"cluster {before.cluster.name} has no primary: a member is only removed from a healthy cluster")
    refusals += [r for r in (sync_refusal(before, host), etcd_refusal(before, host)) if r]
    if refusals:
        return ActionPlan(refusals=tuple(refusals))
    actions = [Action(host, "stop and disable its database units; leave the HA manager; its replication slot dropped")]
    if host in snap.etcd_members:
        actions.append(Action(host, "etcd member remove; the remaining members' configuration rewritten"))
    actions.append(Action("cluster", f"pg_hba, HAProxy servers and backup-peer trust without {host}; "
                                     "the inventory block written back"))
    return ActionPlan(tuple(actions))


def plan_reinit(host: str, snap: MemberSnapshot, *, data_dir: str, force: bool = False) -> ActionPlan:
    """reinit_standby: the data directory of a standby that cannot stream is wiped and cloned
    again. Never the primary; a standby that streams only with `force` (it is healthy)."""
    member = snap.view.member(host)
    if member is None:
        return ActionPlan(refusals=(f"host: {host} is not a member the HA manager knows",))
    if snap.view.leader == host or member.role == "primary":
        return ActionPlan(refusals=(f"{host} is the primary: its data directory is never wiped",))
    if snap.view.leader is None:
        return ActionPlan(refusals=("the cluster has no primary to clone from",))
    if host in snap.streaming and not force:
        return ActionPlan(refusals=(f"{host} streams from {snap.view.leader}: re-cloning a healthy standby needs "
                                    "force=True",))
    return ActionPlan((Action(host, f"wipe {data_dir} and clone it again from {snap.view.leader} through the "
                                    "HA manager; it streams again"),),
                      notes=(f"The data directory {data_dir} on {host} is wiped.",))


def plan_replacement(before: Inventory, dead: str, new: str, snap: MemberSnapshot) -> ActionPlan:
    """replace_member: the dead host leaves without being asked, the new one takes its place in
    etcd (when the dead one was a member), the HA manager, routing and backups."""
    refusals = []
    for field, name in (("dead", dead), ("new", new)):
        if before.find(name) is None:
            refusals.append(f"{field}: {name!r} is not in the inventory of cluster {before.cluster.name}")
    if refusals:
        return ActionPlan(refusals=tuple(refusals))
    if dead == new:
        return ActionPlan(refusals=("new: the replacement must be another host than the dead one",))
    dead_spec, new_spec = before.host(dead), before.host(new)
    etcd_names = {h.name for h in before.etcd_members}
    if not dead_spec.has(Role.db) and dead not in etcd_names:
        if new_spec.has(Role.db):
            return ActionPlan(nothing_to_do=f"{new} already has {dead}'s place: nothing to replace.")
        refusals.append(f"dead: {dead} is no member of cluster {before.cluster.name}")
    busy = [r.value for r in new_spec.roles if r in (Role.router, Role.backup, Role.restore)]
    if busy:
        refusals.append(f"new: {new} has role(s) {', '.join(busy)}; a member needs a host of its own")
    if new_spec.has(Role.db) or new in etcd_names:
        refusals.append(f"new: {new} already is a member; remove it first or pick an unused host")
    dead_member = snap.view.member(dead)
    if snap.view.leader == dead:
        refusals.append(f"dead: {dead} is still the primary as the HA manager sees it: fail over first")
    elif dead_member is not None and dead_member.healthy:
        refusals.append(f"dead: the HA manager still counts {dead} healthy; a member that answers is removed with "
                        "remove_member (or wait until its HA key has expired)")
    elif snap.view.leader is None:
        refusals.append(f"cluster {before.cluster.name} has no primary to clone {new} from")
    if refusals:
        return ActionPlan(refusals=tuple(refusals))
    actions = [Action(dead, "removed without being reached: from the HA manager"
                            + (", from etcd's membership" if dead in etcd_names else ""))]
    if dead in etcd_names:
        actions.append(Action(new, "etcd member add, started with the existing cluster state"))
    actions.append(Action(new, f"cloned from {snap.view.leader} through the HA manager; streams; takes {dead}'s "
                               "place in routing and backups"))
    return ActionPlan(tuple(actions))
