"""Runbook steps on etcd, the consensus store: is it ours, is it healthy, where its leader is."""

from __future__ import annotations

from dataclasses import dataclass, field

from tasks.adapters import etcd_config
from tasks.adapters.etcd import Etcd, EtcdUnavailable
from tasks.context import ClusterContext, context_for
from tasks.desired import ha_driver
from tasks.ha import primary_of
from tasks.runtime import say, step, wait_for


def etcd_client(ctx: ClusterContext) -> Etcd:
    return ctx.etcd()


@dataclass(frozen=True)
class EtcdCheck:
    """is_etcd_ours's answer: etcd is ours (or empty, or not up yet) when nothing refuses it."""

    ok: bool = field(init=False)  # no refusals
    refusals: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "ok", not self.refusals)

    def __bool__(self) -> bool:
        return self.ok


@step(retries=1)
def is_etcd_ours(cluster: str) -> EtcdCheck:
    """Does etcd hold only this cluster's members and data? Refusals name what is someone else's."""
    ctx = context_for(cluster)
    inv = ctx.inventory
    etcd = etcd_client(ctx)
    try:
        members = etcd.members()
    except EtcdUnavailable:
        if inv.cluster.tls.enabled:
            plain = Etcd(etcd_config.client_endpoints(inv), timeout=3).answering_endpoints()
            if plain:
                # Its members advertise http:// peer URLs; restarted with TLS they could not reach each
                # other. Converting a running etcd needs a member-by-member peer URL update.
                refusal = (f"etcd on {', '.join(plain)} answers without TLS while cluster.tls.enabled: converting a "
                           "running etcd to TLS is not done by build_cluster (see the README)")
                say(refusal, warning=True)
                return EtcdCheck((refusal,))
        say("etcd does not answer yet: nothing in it to conflict with.")
        return EtcdCheck()
    refusals = []
    expected = {h.name for h in inv.etcd_members}
    found = {m.name for m in members if m.name}
    if found and not found <= expected:
        refusals.append(f"etcd: members {sorted(found)} are not this cluster's etcd hosts {sorted(expected)}")
    own = ha_driver(inv).etcd_prefix(inv)
    parent = own.rstrip("/").rsplit("/", 1)[0] + "/"
    foreign = etcd_config.foreign_clusters(etcd.get_prefix(parent), own)
    if foreign:
        refusals.append(f"etcd: prefix {parent} already holds other cluster(s): {', '.join(foreign)}")
    say("etcd belongs to this cluster." if not refusals else "etcd holds someone else's data: " + "; ".join(refusals))
    return EtcdCheck(tuple(refusals))


@step(retries=0)
def wait_until_etcd_healthy(cluster: str, timeout: float = 90) -> str:
    ctx = context_for(cluster)
    expected = {h.name for h in ctx.inventory.etcd_members}
    etcd = etcd_client(ctx)

    def healthy() -> bool:
        members = {m.name for m in etcd.members() if m.name and m.client_urls}
        return members == expected and all(etcd.endpoint_health().values())

    wait_for("etcd: every member up with a leader", healthy, timeout=timeout)
    return say(f"etcd is healthy: {len(expected)} members with a leader.")


@step
def ensure_etcd_leader_off_primary(cluster: str) -> str:
    """Where etcd runs on the database hosts, losing the primary's host must not also cost etcd its
    leader: the new etcd leader would renew every lease, and the HA manager's leader key would outlive
    the dead primary by an election on top of its TTL. Patroni's callback does this after every
    promotion; this step covers the bootstrap (no callback) and HA managers without callbacks."""
    ctx = context_for(cluster)
    inv = ctx.inventory
    primary = primary_of(ctx)
    if primary is None:
        return say("No primary right now; the etcd leader is left where it is.")
    if primary.name not in {m.name for m in inv.etcd_members}:
        return say(f"etcd does not run on the primary's host {primary.name}; nothing to place.")
    with ctx.remote(primary) as remote:
        result = remote.run(etcd_config.leader_away_command(inv, primary))
    outcome = (result.stdout.strip() or result.stderr.strip()).splitlines()[-1:] or ["no answer"]
    # Placement shortens a failover; it is not worth failing a runbook that otherwise succeeded.
    return say(outcome[0], warning=result.exit_code != 0)
