"""Runbook steps shared by build_cluster, add_standby and the role-change flows.

Each step opens its own connections (tasks get plain values), checks before it acts, and ends
with one sentence of outcome. Decisions come from the pure planners in `tasks.planning`.
"""

from __future__ import annotations

import time
import uuid

from blocks.inventory import HostSpec
from tasks.adapters import etcd_config
from tasks.adapters.commands import cmd
from tasks.adapters.etcd import Etcd, EtcdUnavailable
from tasks.adapters.ha.base import ClusterView, HaStatusError
from tasks.adapters.postgres import (
    AuthenticationFailed,
    DatabaseUnavailable,
    Postgres,
    UndefinedObject,
    pgsql,
    scram_matches,
    scram_verifier,
)
from tasks.adapters.probe import HostSnapshot, parse_probe, probe_command
from tasks.adapters.remote import RemoteError
from tasks.context import ClusterContext, context_for
from tasks.desired import ClusterSecrets, all_desired, archive_parameters, ha_driver
from tasks.errors import DeadlineExceeded, NoPrimary, NotYet, PreflightRefused
from tasks.planning.build import DesiredHost, plan_host, release_problem
from tasks.runtime import say, step


def cluster_secrets(ctx: ClusterContext) -> ClusterSecrets:
    store = ctx.store_secrets if ctx.store_block is not None else None
    return ClusterSecrets(db=ctx.db_secrets, store=store, server=ctx.server_secrets, routing=ctx.routing_secrets)


def desired_layers(ctx: ClusterContext) -> dict[str, dict[str, DesiredHost]]:
    return all_desired(ctx.inventory, cluster_secrets(ctx))


def _probe_args(ctx: ClusterContext, layers) -> dict:
    inv = ctx.inventory
    return {
        "files": [f.path for layer in layers for f in layer.files],
        "units": [u.name for layer in layers for u in layer.units],
        "packages": [p for layer in layers for p in layer.packages],
        "data_dir": inv.cluster.postgres.data_dir,
        "ports": sorted({p for layer in layers for p in layer.ports}),
        "tools": sorted({f.tool for layer in layers for f in layer.release_floors}),
    }


def snapshot(ctx: ClusterContext, host: HostSpec, layers) -> HostSnapshot:
    with ctx.remote(host) as remote:
        return parse_probe(host.name, remote.run(probe_command(**_probe_args(ctx, layers))))


def wait_for(what: str, probe, *, timeout: float, interval: float = 1.0):
    """Poll `probe` until it returns something truthy; raise with the last observation at the deadline."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = probe()
            if value:
                return value
            last = value
        except (NotYet, NoPrimary, RemoteError, DatabaseUnavailable, EtcdUnavailable, HaStatusError) as exc:
            last = exc
        if time.monotonic() > deadline:
            raise DeadlineExceeded(f"{what}: not reached within {timeout:.0f}s (last seen: {last})")
        time.sleep(interval)


# ------------------------------------------------------------------------------ pre-flight


@step(retries=2)
def is_host_ready(cluster: str, host: str, inventory: dict | None = None) -> HostSnapshot:
    """Read-only: probe the host for everything the plan compares against."""
    ctx = context_for(cluster, inventory=inventory)
    spec = ctx.inventory.host(host)
    wanted = list(desired_layers(ctx).get(host, {}).values())
    snap = snapshot(ctx, spec, wanted)
    say(f"{host}: {snap.os_pretty}, data directory {'empty' if snap.data_dir.is_empty else 'in use'}, "
        f"member of {snap.marker_cluster or 'no cluster'}.")
    return snap


def etcd_client(ctx: ClusterContext) -> Etcd:
    return Etcd(etcd_config.client_endpoints(ctx.inventory), timeout=3)


@step(retries=1)
def is_etcd_ours(cluster: str) -> list[str]:
    """Refusal reasons if etcd answers but holds another cluster's data or other members."""
    ctx = context_for(cluster)
    inv = ctx.inventory
    etcd = etcd_client(ctx)
    try:
        members = etcd.members()
    except EtcdUnavailable:
        say("etcd does not answer yet: nothing in it to conflict with.")
        return []
    refusals = []
    expected = {h.name for h in inv.etcd_members}
    found = {m.name for m in members if m.name}
    if found and not found <= expected:
        refusals.append(f"etcd: members {sorted(found)} are not this cluster's etcd hosts {sorted(expected)}")
    own = ha_driver(inv).etcd_prefix(inv)
    parent = own.rstrip("/").rsplit("/", 1)[0] + "/"
    foreign = sorted({k[len(parent):].split("/", 1)[0] for k in etcd.get_prefix(parent) if not k.startswith(own.rstrip("/"))})
    if foreign:
        refusals.append(f"etcd: prefix {parent} already holds other cluster(s): {', '.join(foreign)}")
    say("etcd belongs to this cluster." if not refusals else "etcd holds someone else's data: " + "; ".join(refusals))
    return refusals


@step(retries=1)
def is_superuser_login_ok(cluster: str, hosts: list[str]) -> list[str]:
    """With PostgreSQL already running, the block's superuser password must work (else refuse)."""
    ctx = context_for(cluster)
    refusals = []
    for name in hosts:
        spec = ctx.inventory.host(name)
        try:
            with Postgres(ctx.superuser_endpoint(spec)) as pg:
                pg.scalar("select 1")
        except AuthenticationFailed as exc:
            refusals.append(f"{name}: the superuser password in block {cluster!r} is wrong ({exc})")
        except DatabaseUnavailable:
            continue  # not accepting connections yet: nothing to check
    say("Superuser login works where PostgreSQL runs." if not refusals else "; ".join(refusals))
    return refusals


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


@step(retries=2)
def is_cluster_initialized(cluster: str, configured_hosts: list[str]) -> ClusterView:
    """Ask the HA manager (only on hosts that already carry its configuration)."""
    ctx = context_for(cluster)
    if not configured_hosts:
        say("No host carries the HA configuration yet: the cluster is not initialised.")
        return ClusterView(initialized=False)
    try:
        view = read_view(ctx, [ctx.inventory.host(h) for h in configured_hosts])
    except HaStatusError as exc:
        say(f"The HA manager does not answer yet ({str(exc)[:200]}); treating the cluster as not initialised.")
        return ClusterView(initialized=False)
    say(f"Cluster initialised: {view.initialized}; leader: {view.leader or 'none'}; "
        f"members: {', '.join(m.name + '=' + m.role for m in view.members) or 'none'}.")
    return view


# ------------------------------------------------------------------------------ act


@step
def ensure_packages(cluster: str, host: str, packages: list[str]) -> str:
    """Install missing OS packages with apt (on lab hosts they are already there)."""
    ctx = context_for(cluster)
    with ctx.remote(host) as remote:
        result = remote.run(cmd("dpkg-query", "-W", "-f=${Package} ${db:Status-Abbrev}\n", *packages,
                                timeout=30, ok_codes=(0, 1)))
        installed = {line.split()[0] for line in result.stdout.splitlines() if line.split()[1:2] == ["ii"]}
        missing = [p for p in packages if p not in installed]
        if not missing:
            return say(f"{host}: all {len(packages)} packages present; nothing installed.")
        remote.run(cmd("apt-get", "update", "-qq", timeout=600))
        remote.run(cmd("apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing,
                       timeout=1800, env={"DEBIAN_FRONTEND": "noninteractive"}))
    # Pre-flight could only check releases already installed; what apt just chose is checked here
    # with the same host probe, before any configuration is written or a service started.
    layers = list(desired_layers(ctx).get(host, {}).values())
    floors = [floor for layer in layers for floor in layer.release_floors]
    tools = snapshot(ctx, ctx.inventory.host(host), layers).tools if floors else {}
    problems = [problem for floor in floors if (problem := release_problem(host, floor, tools.get(floor.tool)))]
    if problems:
        raise PreflightRefused("refused before configuring anything:\n" + "\n".join(problems))
    return say(f"{host}: installed {', '.join(missing)}.")


def _layer(ctx: ClusterContext, host: str, kind: str) -> DesiredHost:
    layers = desired_layers(ctx).get(host, {})
    if kind not in layers:
        raise ValueError(f"{host} has no {kind} layer in cluster {ctx.name} (roles: "
                         f"{', '.join(r.value for r in ctx.inventory.host(host).roles) or 'none'})")
    return layers[kind]


@step
def ensure_files(cluster: str, host: str, kind: str) -> list[str]:
    """Write the layer's files that differ (content, owner or mode); returns the changed paths."""
    ctx = context_for(cluster)
    layer = _layer(ctx, host, kind)
    changed = []
    with ctx.remote(host) as remote:
        for spec in layer.files:
            if remote.ensure_file(spec):
                changed.append(spec.path)
    if changed:
        say(f"{host}: wrote {', '.join(changed)}.")
    else:
        say(f"{host}: all {len(layer.files)} {kind} files already as wanted; none rewritten.")
    return changed


@step
def ensure_units(cluster: str, host: str, kind: str, changed: list[str], *, restart_changed: bool = True,
                 no_block: bool = False, already_started: list[str] | None = None) -> list[str]:
    """Start what is not running; restart or reload what reads a changed file. Nothing else.

    Returns the units it started, so a caller that restarts one host at a time can skip them.
    `no_block` lets members of a new etcd cluster start together (each waits for the others).
    """
    ctx = context_for(cluster)
    layer = _layer(ctx, host, kind)
    actions, started = [], []
    skip = set(already_started or [])
    with ctx.remote(host) as remote:
        if any(path.startswith("/etc/systemd/") for path in changed):
            remote.run(cmd("systemctl", "daemon-reload", timeout=60))
            actions.append("reloaded systemd")
        snap = parse_probe(host, remote.run(probe_command(**_probe_args(ctx, [layer]))))
        plan = plan_host(layer, snap)
        for unit in layer.units:
            if unit.name in skip:
                continue
            if unit.name in plan.start:
                extra = ["--no-block"] if no_block else []
                remote.run(cmd("systemctl", "enable", "--now", *extra, unit.name, timeout=120))
                actions.append(f"started {unit.name}")
                started.append(unit.name)
            elif restart_changed and set(changed) & set(unit.restart_on):
                remote.run(cmd("systemctl", "restart", unit.name, timeout=120))
                actions.append(f"restarted {unit.name}")
            elif restart_changed and set(changed) & set(unit.reload_on):
                remote.run(cmd("systemctl", "reload", unit.name, timeout=60))
                actions.append(f"reloaded {unit.name}")
    say(f"{host}: {', '.join(actions)}." if actions else f"{host}: {kind} services already running; none touched.")
    return started


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


@step
def ensure_ha_settings(cluster: str) -> str:
    """Cluster-wide settings (DCS) equal to the inventory; only differences are applied."""
    ctx = context_for(cluster)
    inv = ctx.inventory
    driver = ha_driver(inv)
    primary = require_primary(ctx, "to read the cluster configuration from")
    with ctx.remote(primary) as remote:
        current = driver.parse_config(remote.run(driver.show_config_command(inv), check=False))
        drift = driver.settings_drift(inv, current, archive_parameters(inv, cluster_secrets(ctx)))
        commands = driver.settings_commands(inv, drift)
        for command in commands:
            remote.run(command)
    if not commands:
        return say("Cluster-wide settings already match the inventory; nothing changed.")
    changed = list(drift.postgres_parameters)
    if drift.synchronous_replication is not None:
        changed.append(f"synchronous_mode={drift.synchronous_replication}")
    return say(f"Applied cluster-wide settings: {', '.join(changed)}.")


@step
def ensure_roles(cluster: str) -> str:
    """Application and monitoring roles and the application database; passwords as SCRAM verifiers."""
    ctx = context_for(cluster)
    inv = ctx.inventory
    blocks = ctx.db_blocks
    assert blocks is not None
    primary = require_primary(ctx, "to create roles on")
    wanted = [
        (blocks.replication_user, blocks.replication_password.get_secret_value(), "REPLICATION"),
        (blocks.application_user, blocks.application_password.get_secret_value(), ""),
    ]
    if blocks.monitor_password is not None:
        wanted.append((blocks.monitor_user, blocks.monitor_password.get_secret_value(), ""))
    actions = []
    with Postgres(ctx.superuser_endpoint(primary)) as pg:
        for role, password, extra in wanted:
            stored = pg.query_one("select rolpassword from pg_authid where rolname = %s", [role])
            if stored is None:
                pg.query(pgsql.SQL("create role {} login " + extra + " password {}").format(
                    pgsql.Identifier(role), pgsql.Literal(scram_verifier(password))))
                actions.append(f"created role {role}")
            elif not scram_matches(stored[0], password):
                pg.query(pgsql.SQL("alter role {} password {}").format(
                    pgsql.Identifier(role), pgsql.Literal(scram_verifier(password))))
                actions.append(f"set password of {role}")
        database = inv.cluster.postgres.application_database
        if pg.scalar("select count(*) from pg_database where datname = %s", [database]) == 0:
            pg.query(pgsql.SQL("create database {} owner {}").format(
                pgsql.Identifier(database), pgsql.Identifier(blocks.application_user)))
            actions.append(f"created database {database}")
    return say("; ".join(actions) + "." if actions else "Roles and application database already in place; nothing changed.")


# ------------------------------------------------------------------------------ verify


def replication_rows(ctx: ClusterContext) -> tuple[str, list[dict]]:
    """Topology as PostgreSQL itself reports it (not the HA manager's idea of it)."""
    primary = require_primary(ctx, "to read the replication topology from")
    rows = []
    with Postgres(ctx.superuser_endpoint(primary)) as pg:
        status = pg.status()
        links = {r.application_name: r for r in pg.replicas()}
    rows.append({"host": primary.name, "role": "primary", "timeline": status.timeline, "lsn": status.lsn,
                 "state": "accepting writes", "lag_bytes": 0})
    for host in ctx.inventory.db_hosts:
        if host.name == primary.name:
            continue
        link = links.get(host.name)
        try:
            with Postgres(ctx.superuser_endpoint(host)) as pg:
                st = pg.status()
            role = "standby" if st.in_recovery else "primary (!)"
            timeline, lsn = st.timeline, st.lsn
        except DatabaseUnavailable:
            role, timeline, lsn = "down", None, None
        rows.append({
            "host": host.name, "role": role, "timeline": timeline, "lsn": lsn,
            "state": f"{link.state} ({link.sync_state})" if link else "not streaming",
            "lag_bytes": link.lag_bytes if link else None,
        })
    return primary.name, rows


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
def is_replication_working(cluster: str, timeout: float = 30) -> str:
    """A row written on the primary must be readable on every standby within the deadline."""
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
    return say(f"A row written on {primary.name} was read back on every standby within "
               f"{time.monotonic() - started:.1f}s.")
