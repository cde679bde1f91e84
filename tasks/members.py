"""Runbook steps of the member lifecycle (issue 16): a member stopped and forgotten by the HA
manager and etcd, a standby re-cloned, and the snapshot their plans decide over."""

from __future__ import annotations

from dataclasses import replace

from tasks.adapters import etcd_config
from tasks.adapters.commands import cmd
from tasks.adapters.etcd import EtcdUnavailable
from tasks.adapters.postgres import Postgres
from tasks.backup import ensure_backup_hook
from tasks.context import context_for
from tasks.desired import ha_driver
from tasks.errors import NotYet, PreflightRefused
from tasks.ha import ensure_membership, read_view, replication_rows, require_primary
from tasks.hosts import desired_layers, ensure_files, ensure_units
from tasks.planning.members import MemberSnapshot
from tasks.routing import routers, vip_holders, wait_until_router_routes
from tasks.runtime import once, say, step, wait_for


def member_snapshot(cluster: str) -> MemberSnapshot:
    """Read-only pre-flight: the HA manager's view, etcd's member names and who streams from the
    primary (PostgreSQL's own pg_stat_replication, not the HA manager's idea of it)."""
    ctx = context_for(cluster)
    view = read_view(ctx)
    try:
        etcd_members = tuple(m.name for m in ctx.etcd().members() if m.name)
    except EtcdUnavailable as exc:
        raise PreflightRefused(f"etcd does not answer, so its membership cannot be checked: {exc}") from None
    streaming: tuple[str, ...] = ()
    if view.leader:
        _, rows = replication_rows(ctx, view)
        streaming = tuple(r["host"] for r in rows[1:] if str(r["state"]).startswith("streaming"))
    say(f"Primary {view.leader or 'none'}; HA members {', '.join(m.name for m in view.members) or 'none'}; "
        f"etcd members {', '.join(etcd_members) or 'none'}; streaming {', '.join(streaming) or 'none'}.")
    return MemberSnapshot(view=view, etcd_members=etcd_members, streaming=streaming)


@step
def ensure_member_stopped(cluster: str, host: str, *, wipe: bool = False) -> str:
    """The member's HA units stopped and disabled (PostgreSQL stops with them); its data
    directory removed only when `wipe` was asked for."""
    ctx = context_for(cluster)
    inv = ctx.inventory
    driver = ha_driver(inv)
    units = [u.name for u in driver.host_units(inv, inv.host(host))]
    with ctx.remote(host) as remote:
        # Reverse start order: the proxy in front of PostgreSQL goes first, the keeper last.
        for unit in reversed(units):
            remote.run(cmd("systemctl", "disable", "--now", unit, timeout=180))
        if wipe:
            remote.run(cmd("rm", "-rf", "--", *driver.member_data_paths(inv), timeout=600))
    paths = ", ".join(driver.member_data_paths(inv))
    kept = f"{paths} wiped" if wipe else f"{paths} kept"
    return say(f"{host}: {', '.join(units)} stopped and disabled; {kept}.")


@step
def ensure_member_forgotten(cluster: str, host: str, timeout: float = 120) -> str:
    """The HA manager no longer lists `host`, and the primary keeps no replication slot for it."""
    ctx = context_for(cluster)
    inv = ctx.inventory
    driver = ha_driver(inv)
    primary = require_primary(ctx, f"to forget {host} on")
    commands = driver.member_removed_commands(inv, host)
    if commands and read_view(ctx).member(host) is not None:
        with ctx.remote(primary) as remote:
            for command in commands:
                remote.run(command)

    def gone() -> bool:
        if read_view(ctx).member(host) is not None:
            raise NotYet(f"{driver.name} still lists {host}")
        with Postgres(ctx.superuser_endpoint(primary)) as pg:
            if any(link.application_name == host for link in pg.replicas()):
                raise NotYet(f"{host} still streams from {primary.name}")
        return True

    wait_for(f"{driver.name} no longer listing {host}, and {host} not streaming", gone, timeout=timeout, interval=2)
    slot = driver.member_slot(inv, host)
    if not slot or not _slot_exists(ctx, primary, slot):
        return say(f"{driver.name} no longer lists {host}; the primary keeps no slot for it.")
    # The HA manager owns the slot: dropped by hand, it would be recreated while it is retained.
    with ctx.remote(primary) as remote:
        current = driver.parse_config(remote.run(driver.show_config_command(inv), check=False))
        stop_retaining, restore = driver.slot_retention_commands(inv, current)
        try:
            for command in stop_retaining:
                remote.run(command)
            wait_for(f"replication slot {slot} dropped on {primary.name}",
                     lambda: not _slot_exists(ctx, primary, slot), timeout=timeout, interval=2)
        finally:
            for command in restore:
                remote.run(command)
    return say(f"{driver.name} no longer lists {host}; its replication slot {slot} is gone from {primary.name}.")


def _slot_exists(ctx, primary, slot: str) -> bool:
    with Postgres(ctx.superuser_endpoint(primary)) as pg:
        return bool(pg.query("select 1 from pg_replication_slots where slot_name = %s", [slot]))


@step
def ensure_etcd_member_removed(cluster: str, host: str) -> str:
    """etcd's membership without `host` (asked of the members that stay, so a dead host is fine)."""
    ctx = context_for(cluster)
    etcd = ctx.etcd()
    member = next((m for m in etcd.members() if m.name == host), None)
    if member is None:
        return say(f"{host} is no etcd member; etcd's membership unchanged.")
    etcd.member_remove(member.id)
    return say(f"etcd member {host} (id {member.id:x}) removed; {len(etcd.members())} members remain.")


@step
def ensure_etcd_stopped(cluster: str, host: str) -> str:
    """etcd on a host that left the membership: stopped, disabled and its data removed, so a
    restart can never bring back a member the others removed."""
    ctx = context_for(cluster)
    inv = ctx.inventory
    with ctx.remote(host) as remote:
        for unit in etcd_config.member_units(inv):
            remote.run(cmd("systemctl", "disable", "--now", unit.name, timeout=120))
        remote.run(cmd("rm", "-rf", "--", etcd_config.data_dir(inv), timeout=120))
    return say(f"{host}: etcd stopped and disabled; its member data removed.")


@once
def ensure_standby_reinitialized(cluster: str, host: str) -> str:
    """Wipe a standby's data directory and clone it again through the HA manager; never retried
    (a second try could wipe a clone that was just about to succeed)."""
    ctx = context_for(cluster)
    inv = ctx.inventory
    driver = ha_driver(inv)
    view = read_view(ctx)
    commands = driver.reinit_commands(inv, view, host)
    with ctx.remote(host) as remote:
        for command in commands:
            remote.run(command)
    return say(f"{host}: {driver.pgdata(inv)} wiped and cloned again from {view.leader} through {driver.name}.")


@step
def ensure_etcd_member_added(cluster: str, host: str) -> str:
    """etcd announces `host` before it starts (`member add`), so it joins the existing cluster
    instead of founding one of its own. Idempotent: a member with its peer URL is left alone."""
    ctx = context_for(cluster)
    inv = ctx.inventory
    url = etcd_config.peer_url(inv, inv.host(host))
    etcd = ctx.etcd()
    members = etcd.members()
    if any(url in m.peer_urls for m in members):
        return say(f"etcd already counts {host} ({url}) as a member.")
    etcd.member_add([url])
    return say(f"etcd member {host} ({url}) added; {len(members) + 1} members, {host} not started yet.")


@step
def ensure_etcd_member_joined(cluster: str, host: str) -> str:
    """The announced member's first start, with the existing cluster state; its configuration
    then goes back to the desired one (etcd reads the initial state only on an empty data dir)."""
    ctx = context_for(cluster)
    inv = ctx.inventory
    spec = inv.host(host)
    url = etcd_config.peer_url(inv, spec)
    member = next((m for m in ctx.etcd().members() if url in m.peer_urls), None)
    if member is None:
        raise NotYet(f"etcd does not count {host} as a member yet (member add first)")
    if member.name:
        return say(f"etcd member {host} has started before; nothing to join.")
    layer = desired_layers(ctx)[host]["etcd"]
    joining = etcd_config.render_env(inv, spec, initial_state="existing")
    with ctx.remote(host) as remote:
        # Whatever etcd ran here before (the package's default member, an earlier cluster) must not
        # be what starts: the announced member's data dir is empty, or it is not that member.
        remote.run(cmd("systemctl", "stop", "etcd.service", timeout=120))
        remote.run(cmd("rm", "-rf", "--", etcd_config.data_dir(inv), timeout=120))
        for spec_file in layer.files:
            remote.ensure_file(replace(spec_file, content=joining) if spec_file.path == etcd_config.ENV_PATH
                               else spec_file)
        remote.run(cmd("systemctl", "enable", "etcd.service", timeout=60))
        remote.run(cmd("systemctl", "start", "etcd.service", timeout=180))

    def started() -> bool:
        found = next((m for m in ctx.etcd().members() if url in m.peer_urls), None)
        if found is None or not found.name or not found.client_urls:
            raise NotYet(f"etcd member {host} not started yet")
        return True

    wait_for(f"etcd member {host} started", started, timeout=120, interval=2)
    with ctx.remote(host) as remote:
        for spec_file in layer.files:
            remote.ensure_file(spec_file)
    return say(f"etcd member {host} joined the existing cluster.")


# ---------------------------------------------------------------- the rest of the cluster follows

def etcd_files_follow(cluster: str) -> None:
    """ETCD_INITIAL_CLUSTER is read only when a member bootstraps: the files follow the membership
    for the next bootstrap; the running members are not restarted for it."""
    for member in context_for(cluster).inventory.etcd_members:
        ensure_files(cluster, member.name, "etcd")


def cluster_follows_membership(cluster: str, joining: str | None = None) -> None:
    """Everything that names the database hosts, after the inventory's changed: the members'
    pg_hba (and Patroni's etcd hosts), the HA manager's admission, then the `joining` host
    (admitted before it asks to replicate), the routers' servers, backup-peer trust."""
    inv = context_for(cluster).inventory
    for member in inv.db_hosts:
        if member.name != joining:
            ensure_units(cluster, member.name, "db", ensure_files(cluster, member.name, "db"))
    ensure_membership(cluster)
    if joining is not None:
        ensure_units(cluster, joining, "db", ensure_files(cluster, joining, "db"))
    ctx = context_for(cluster)
    # Routers that routing_rollout has not set up yet are its job, not this one's.
    if inv.cluster.routing is not None and vip_holders(ctx):
        for router in routers(ctx):
            ensure_units(cluster, router.name, "router", ensure_files(cluster, router.name, "router"))
            wait_until_router_routes(cluster, router.name)
    ensure_backup_hook(cluster)
