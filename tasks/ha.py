"""Runbook steps through the HA manager: its view of the cluster, the primary, initialisation,
membership, and the waits that prove replication works (PostgreSQL settings: tasks/settings.py)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from blocks.inventory import HostSpec
from tasks.adapters.commands import cmd
from tasks.adapters.ha.base import ClusterView, HaStatusError
from tasks.adapters.postgres import (
    DatabaseUnavailable,
    Postgres,
    UndefinedObject,
)
from tasks.adapters.remote import RemoteError
from tasks.context import ClusterContext, context_for
from tasks.desired import archive_parameters, ha_driver
from tasks.errors import NoPrimary, NotYet, VerifyFailed
from tasks.hosts import cluster_secrets
from tasks.runtime import say, step, wait_for


def read_view(ctx: ClusterContext, hosts: list[HostSpec] | None = None) -> ClusterView:
    """The HA manager's view, asked on the first database host that can answer."""
    inv = ctx.inventory
    driver = ha_driver(inv)
    errors = []
    for host in hosts or inv.db_hosts:
        try:
            with ctx.remote(host) as remote:
                results = [remote.run(c, check=False) for c in driver.status_commands(inv)]
            return driver.parse_status(inv, results)
        except (RemoteError, HaStatusError) as exc:
            errors.append(f"{host.name}: {str(exc).splitlines()[0]}")
    raise HaStatusError("no database host could report the HA status: " + "; ".join(errors))


@dataclass(frozen=True)
class InitCheck:
    """is_cluster_initialized's answer, with the HA manager's view it was read from (an empty
    view when no host carries the HA configuration yet or the HA manager does not answer)."""

    ok: bool = field(init=False)  # the HA manager reports the cluster initialised
    view: ClusterView

    def __post_init__(self) -> None:
        object.__setattr__(self, "ok", self.view.initialized)

    def __bool__(self) -> bool:
        return self.ok


@step(retries=2)
def is_cluster_initialized(cluster: str, configured_hosts: list[str]) -> InitCheck:
    """Ask the HA manager (only on hosts that already carry its configuration)."""
    ctx = context_for(cluster)
    if not configured_hosts:
        say("No host carries the HA configuration yet: the cluster is not initialised.")
        return InitCheck(ClusterView(initialized=False))
    try:
        view = read_view(ctx, [ctx.inventory.host(h) for h in configured_hosts])
    except HaStatusError as exc:
        say(f"The HA manager does not answer yet ({str(exc)[:200]}); treating the cluster as not initialised.")
        return InitCheck(ClusterView(initialized=False))
    say(f"Cluster initialised: {view.initialized}; leader: {view.leader or 'none'}; "
        f"members: {', '.join(m.name + '=' + m.role for m in view.members) or 'none'}.")
    return InitCheck(view)


@step(retries=0)
def ensure_cluster_initialized(cluster: str, host: str) -> list[str]:
    """Start the HA manager on the first host and let it initialise the cluster (never retried).

    Returns the units it started."""
    ctx = context_for(cluster)
    inv = ctx.inventory
    driver = ha_driver(inv)
    secrets = cluster_secrets(ctx)
    units = [u.name for u in driver.host_units(inv, inv.host(host))]
    with ctx.remote(host) as remote:
        remote.run(cmd("systemctl", "daemon-reload", timeout=60))
        for unit in units:
            remote.run(cmd("systemctl", "enable", "--now", unit, timeout=120))
        for command in driver.bootstrap_commands(inv, secrets.db, archive_parameters(inv, secrets)):
            remote.run(command)
    say(f"{host}: HA manager started to initialise cluster {cluster}.")
    return units


def read_paused(ctx: ClusterContext) -> bool:
    """The HA manager's maintenance flag, asked on the first database host that can answer
    (always False where the HA manager has no maintenance mode)."""
    inv = ctx.inventory
    driver = ha_driver(inv)
    if not driver.has_maintenance_mode:
        return False
    errors = []
    for host in inv.db_hosts:
        try:
            with ctx.remote(host) as remote:
                return driver.is_paused(driver.parse_config(remote.run(driver.show_config_command(inv), check=False)))
        except (RemoteError, HaStatusError) as exc:
            errors.append(f"{host.name}: {str(exc).splitlines()[0]}")
    raise HaStatusError("no database host could report the HA manager's settings: " + "; ".join(errors))


@dataclass(frozen=True)
class MaintenanceState:
    """is_ha_paused's answer: the HA manager's maintenance mode, and its members as it sees them."""

    ok: bool = field(init=False)  # paused
    supported: bool
    paused: bool
    driver: str
    members: tuple[tuple[str, str, bool], ...]  # (name, role, healthy)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ok", self.paused)

    def __bool__(self) -> bool:
        return self.ok


@step(retries=1)
def is_ha_paused(cluster: str) -> MaintenanceState:
    """Read-only: is the HA manager in maintenance mode (pause_ha), and how are its members."""
    ctx = context_for(cluster)
    driver = ha_driver(ctx.inventory)
    view = read_view(ctx)
    paused = read_paused(ctx)
    members = tuple((m.name, m.role, m.healthy) for m in view.members)
    if not driver.has_maintenance_mode:
        say(f"{driver.name} has no maintenance mode: automatic failover is always on.")
    else:
        say(f"{driver.name} is paused (maintenance mode): no automatic failover." if paused
            else f"{driver.name} is running: automatic failover is on.", warning=paused)
    return MaintenanceState(driver.has_maintenance_mode, paused, driver.name, members)


@step(retries=1)
def ensure_ha_paused(cluster: str, pause: bool) -> str:
    """The HA manager's maintenance mode on (`pause`) or off; read first, so a retry or a rerun
    changes nothing once it holds."""
    ctx = context_for(cluster)
    inv = ctx.inventory
    driver = ha_driver(inv)
    word = "paused" if pause else "resumed"
    if read_paused(ctx) == pause:
        return say(f"{driver.name} already is {word}; nothing changed.")
    host = primary_of(ctx) or inv.db_hosts[0]
    with ctx.remote(host) as remote:
        for command in driver.maintenance_commands(inv, pause):
            remote.run(command)
    if read_paused(ctx) != pause:
        raise VerifyFailed(f"{driver.name} reported success, but its settings do not say {word}")
    return say(f"{driver.name} {word} on every member: automatic failover is {'off' if pause else 'on again'}.")


def primary_of(ctx: ClusterContext) -> HostSpec | None:
    view = read_view(ctx)
    return ctx.inventory.host(view.leader) if view.leader else None


def require_primary(ctx: ClusterContext, purpose: str) -> HostSpec:
    """The primary, for a step that cannot do without one (`purpose` completes the error)."""
    primary = primary_of(ctx)
    if primary is None:
        raise NoPrimary(f"cluster {ctx.name} has no primary {purpose}")
    return primary


@step(retries=0)
def wait_until_primary_accepts_writes(cluster: str, timeout: float = 180) -> str:
    ctx = context_for(cluster)

    def writable() -> str | None:
        view = read_view(ctx)
        if view.leader is None:
            raise NotYet("no leader; members: " + (", ".join(f"{m.name} {m.state}" for m in view.members) or "none"))
        leader = ctx.inventory.host(view.leader)
        with Postgres(ctx.superuser_endpoint(leader)) as pg:
            return leader.name if pg.scalar("select not pg_is_in_recovery()") else None

    name = wait_for("a primary that accepts writes", writable, timeout=timeout, interval=2)
    return say(f"{name} is the primary and accepts writes.")


@step
def ensure_membership(cluster: str) -> str:
    """Tell the HA manager the inventory's database hosts, after one was added or removed."""
    ctx = context_for(cluster)
    inv = ctx.inventory
    driver = ha_driver(inv)
    commands = driver.membership_commands(inv, archive_parameters(inv, cluster_secrets(ctx)))
    if not commands:
        return say(f"{driver.name} takes its members from the files just written; nothing else to tell it.")
    primary = require_primary(ctx, "to tell the HA manager its members on")
    with ctx.remote(primary) as remote:
        for command in commands:
            remote.run(command)
    return say(f"{driver.name} now admits exactly {', '.join(h.name for h in inv.db_hosts)}.")


def replication_rows(ctx: ClusterContext, view: ClusterView | None = None) -> tuple[str, list[dict]]:
    """Topology as PostgreSQL itself reports it (not the HA manager's idea of it). `view`: the
    HA manager's view the caller already read, so its primary is not asked for twice."""
    if view is not None and view.leader:
        primary = ctx.inventory.host(view.leader)
    else:
        primary = require_primary(ctx, "to read the replication topology from")
    rows = []
    with Postgres(ctx.superuser_endpoint(primary)) as pg:
        status = pg.status()
        links = {r.application_name: r for r in pg.replicas()}
    rows.append({"host": primary.name, "role": "primary", "timeline": status.timeline, "lsn": status.lsn,
                 "receive_lsn": None, "state": "accepting writes", "lag_bytes": 0})
    for host in ctx.inventory.db_hosts:
        if host.name == primary.name:
            continue
        link = links.get(host.name)
        try:
            with Postgres(ctx.superuser_endpoint(host)) as pg:
                st = pg.status()
            role = "standby" if st.in_recovery else "primary (!)"
            timeline, lsn, received = st.timeline, st.lsn, st.receive_lsn
        except DatabaseUnavailable:
            role, timeline, lsn, received = "down", None, None, None
        rows.append({
            "host": host.name, "role": role, "timeline": timeline, "lsn": lsn, "receive_lsn": received,
            "state": f"{link.state} ({link.sync_state})" if link else "not streaming",
            "lag_bytes": link.lag_bytes if link else None,
        })
    return primary.name, rows


def caught_up_standbys(ctx: ClusterContext, view: ClusterView, max_lag_bytes: int) -> dict[str, bool]:
    """Each standby streaming from the primary (pg_stat_replication there): is its lag within the
    limit? A standby that does not stream has no entry; the rolling orders refuse it."""
    _, rows = replication_rows(ctx, view)
    return {r["host"]: (r["lag_bytes"] or 0) <= max_lag_bytes
            for r in rows if r["role"] == "standby" and str(r["state"]).startswith("streaming")}


def streaming_row(rows: list[dict], host: str) -> dict:
    """`host`'s row of the topology `wait_until_replicas_streaming` returned; VerifyFailed when it
    is missing or not streaming (a runbook's last word on the member it worked on)."""
    row = next((r for r in rows if r["host"] == host), None)
    if row is None or not str(row["state"]).startswith("streaming"):
        raise VerifyFailed(f"{host} is not streaming: {row}")
    return row


@step(retries=0)
def wait_until_replicas_streaming(cluster: str, max_lag_bytes: int = 16 * 1024 * 1024, timeout: float = 180,
                                  hosts: list[str] | None = None) -> list[dict]:
    ctx = context_for(cluster)
    expected = set(hosts or [h.name for h in ctx.inventory.db_hosts])
    # In synchronous mode the HA manager only promotes a standby it has recorded as synchronous;
    # until it has, losing the primary means no failover at all, so the cluster is not healthy yet.
    needs_sync = bool(ctx.inventory.cluster.postgres.synchronous_replication) and not hosts and len(expected) > 1

    def streaming() -> list[dict] | None:
        primary, rows = replication_rows(ctx)
        standbys = [r for r in rows if r["host"] != primary and r["host"] in expected]
        ok = all(r["state"].startswith("streaming") and (r["lag_bytes"] or 0) <= max_lag_bytes for r in standbys)
        if not ok or len(standbys) != len(expected - {primary}):
            return None
        unreadable = [r["host"] for r in standbys if r["role"] != "standby"]
        if unreadable:
            # After pg_rewind a standby must replay up to the source's insert position as it was
            # then; on an idle primary no record exists there yet, so the standby streams but never
            # becomes consistent. One committed transaction id (no table touched) writes it.
            with Postgres(ctx.superuser_endpoint(ctx.inventory.host(primary))) as pg:
                pg.scalar("select pg_current_xact_id()")
            raise NotYet(f"{', '.join(unreadable)} streaming but not yet accepting read-only connections")
        if needs_sync:
            promotable = {m.name for m in read_view(ctx).replicas if m.synchronous}
            if not any(r["host"] in promotable for r in standbys):
                raise NotYet("no standby recorded as synchronous by the HA manager yet")
        return rows

    rows = wait_for("every standby streaming" + (", one of them synchronous" if needs_sync else ""), streaming,
                    timeout=timeout, interval=2)
    standbys = [r["host"] for r in rows if r["role"] == "standby"]
    say(f"Exactly one primary ({rows[0]['host']}); streaming: {', '.join(standbys) or 'none'}.")
    return rows


@step(retries=0)
def is_replication_working(cluster: str, timeout: float = 30) -> bool:
    """A row written on the primary must be readable on every standby within the deadline: True,
    else DeadlineExceeded names the standby that did not show it (NoPrimary without a primary)."""
    ctx = context_for(cluster)
    primary = require_primary(ctx, "to write the canary row on")
    token = uuid.uuid4().hex
    with Postgres(ctx.superuser_endpoint(primary)) as pg:
        pg.query("create schema if not exists bouwsteen")
        pg.query("create table if not exists bouwsteen.canary (id int primary key, token text not null, "
                 "written_at timestamptz not null default now())")
        pg.query("insert into bouwsteen.canary (id, token) values (1, %s) "
                 "on conflict (id) do update set token = excluded.token, written_at = now()", [token])
    started = time.monotonic()
    for host in ctx.inventory.db_hosts:
        if host.name == primary.name:
            continue

        def seen(host=host) -> bool:
            with Postgres(ctx.superuser_endpoint(host)) as pg:
                try:
                    return pg.scalar("select token from bouwsteen.canary where id = 1") == token
                except UndefinedObject as exc:
                    # The table's DDL is committed on the primary; a standby still replaying up
                    # to it has no such table yet.
                    raise NotYet(f"{host.name} has not replayed the canary table yet ({exc})") from None

        wait_for(f"canary row on {host.name}", seen, timeout=timeout, interval=0.2)
    say(f"A row written on {primary.name} was read back on every standby within "
        f"{time.monotonic() - started:.1f}s.")
    return True


@dataclass(frozen=True)
class PrimaryPortRoutes:
    primary: str
    port: int
    through: tuple[str, ...]  # every database host whose port led to the primary


@step(retries=0)
def wait_until_primary_port_routes(cluster: str, timeout: float = 60) -> PrimaryPortRoutes:
    """The port to the primary (stolon-proxy, or HAProxy under Patroni) of every database host the
    HA manager counts healthy leads to the primary, logged in as the application user as a client
    would. A host that is down (a failover's old primary) routes nobody, so it is not asked."""
    ctx = context_for(cluster)
    inv = ctx.inventory
    port = ha_driver(inv).rw_port(inv)

    def every_host_leads_to_primary() -> PrimaryPortRoutes:
        view = read_view(ctx)
        if view.leader is None:
            raise NotYet("the HA manager names no primary")
        primary = inv.host(view.leader)
        healthy = [h for h in inv.db_hosts if (m := view.member(h.name)) is not None and m.healthy]
        for host in healthy:
            endpoint = ctx.application_endpoint(str(host.address), port, name=host.name)
            try:
                with Postgres(endpoint, statement_timeout_ms=3000) as pg:
                    in_recovery, address = pg.serving()
            except DatabaseUnavailable as exc:
                raise NotYet(str(exc)) from None
            if in_recovery or address != str(primary.address):
                raise NotYet(f"{host.name}:{port} leads to {address} (in recovery: {in_recovery}), "
                             f"not the primary {primary.name}")
        return PrimaryPortRoutes(primary.name, port, tuple(h.name for h in healthy))

    routes = wait_for(f"port {port} of every database host leading to the primary", every_host_leads_to_primary,
                      timeout=timeout, interval=0.5)
    say(f"Port {port} of {', '.join(routes.through)} leads to the primary {routes.primary}.")
    return routes
