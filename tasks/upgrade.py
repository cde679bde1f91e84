"""Steps of rolling_upgrade: is the cluster fit to roll through, one host upgraded and back, and
every host on its targets afterwards. The order and the refusals are pure (tasks/planning/upgrade.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from blocks.inventory import HostSpec
from tasks.adapters.backup.base import BackupOutputError
from tasks.adapters.commands import cmd
from tasks.adapters.packages import (
    PackageState,
    install_command,
    parse_policy,
    parse_unit_starts,
    policy_command,
    refresh_command,
    unit_starts_command,
)
from tasks.adapters.postgres import DatabaseUnavailable, Postgres
from tasks.adapters.remote import RemoteError
from tasks.context import ClusterContext, context_for
from tasks.desired import backup_driver, ha_driver
from tasks.errors import NotYet
from tasks.ha import caught_up_standbys, read_paused, read_view
from tasks.hosts import desired_layers
from tasks.planning.backup import freshness_problem
from tasks.planning.plan import ActionPlan, PlannedCheck
from tasks.planning.roles import paused_refusals
from tasks.planning.upgrade import (
    HostUpgrade,
    SettingsPlanError,
    UpgradeStep,
    host_upgrades,
    readiness_refusals,
    release_mix,
    upgrade_leftovers,
    upgrade_order,
    upgrade_plan,
)
from tasks.runtime import say, step, wait_for


def package_states(ctx: ClusterContext, host: HostSpec, names: list[str], *, refresh: bool
                   ) -> dict[str, PackageState]:
    """apt's view of `names` on one host; `refresh` reads the package lists afresh first."""
    with ctx.remote(host) as remote:
        if refresh:
            remote.run(refresh_command())
        return parse_policy(remote.run(policy_command(names)).stdout)


def _backup_problem(ctx: ClusterContext, primary: HostSpec, max_age: timedelta) -> str | None:
    """Why the newest good backup is no fallback (None: it is), read from the primary."""
    driver = backup_driver(ctx.inventory)
    try:
        with ctx.remote(primary) as remote:
            backups = driver.parse_list(remote.run(driver.list_command(ctx.inventory), check=False))
    except (BackupOutputError, RemoteError) as exc:
        # A repository that cannot be listed (none made yet, the store away) holds no fallback.
        return f"the backups cannot be listed ({str(exc).splitlines()[0]})"
    return freshness_problem(backups, datetime.now(timezone.utc), max_age)


@dataclass(frozen=True)
class UpgradeCheck(PlannedCheck):
    """is_upgrade_safe's answer: the plan (with its refusals) and what it was made of."""

    primary: str | None
    upgrades: dict[str, HostUpgrade]
    order: tuple[UpgradeStep, ...]
    plan: ActionPlan
    # Members a run cut short left drained (build_cluster's file never drains one).
    drained: tuple[str, ...] = ()


@step(retries=1)
def is_upgrade_safe(cluster: str, targets: dict[str, str], *, max_lag_bytes: int, max_transaction_age_s: float,
                    max_backup_age_hours: float, force: bool, reboot: bool, approve_each_host: bool,
                    while_paused: bool) -> UpgradeCheck:
    """Read-only but for apt's package lists: what every host runs and is offered, whether the
    cluster is healthy and caught up, the oldest transaction, the newest good backup; the order."""
    ctx = context_for(cluster)
    inv = ctx.inventory
    refusals: list[str] = []
    states: dict[str, dict[str, PackageState]] = {}
    for host in inv.hosts:
        try:
            states[host.name] = package_states(ctx, host, sorted(targets), refresh=True)
        except RemoteError as exc:
            refusals.append(f"{host.name}: cannot read its packages ({str(exc).splitlines()[0]}); every host "
                            "must answer before a rolling upgrade starts")
    upgrades, unavailable = host_upgrades(targets, states)
    refusals += unavailable
    view = read_view(ctx)
    order: list[UpgradeStep] = []
    if upgrades and view.leader is None:
        refusals.append("the HA manager reports no primary; a rolling upgrade starts from a healthy cluster")
    elif upgrades:
        caught_up = caught_up_standbys(ctx, view, max_lag_bytes)
        primary = inv.host(view.leader)
        try:
            with Postgres(ctx.superuser_endpoint(primary)) as pg:
                oldest = pg.oldest_transaction_seconds()
        except DatabaseUnavailable as exc:
            refusals.append(f"{primary.name}: PostgreSQL does not answer ({str(exc).splitlines()[0]})")
            oldest = 0.0
        backup_problem = _backup_problem(ctx, primary, timedelta(hours=max_backup_age_hours))
        refusals += readiness_refusals(caught_up=caught_up, max_lag_bytes=max_lag_bytes, oldest_transaction_s=oldest,
                                       max_transaction_age_s=max_transaction_age_s, backup_problem=backup_problem,
                                       force=force)
        if view.leader in upgrades:
            refusals += paused_refusals(paused=read_paused(ctx), while_paused=while_paused, runbook="rolling_upgrade")
        try:
            order = upgrade_order(view, caught_up, upgrades)
        except SettingsPlanError as exc:
            refusals += exc.reasons
    if refusals:
        plan = ActionPlan(refusals=tuple(refusals))
        say("Refused: " + "; ".join(refusals), warning=True)
    else:
        plan = upgrade_plan(upgrades, order, primary=view.leader, db_hosts=[h.name for h in inv.db_hosts],
                            reboot=reboot, approve_each_host=approve_each_host, drain=ha_driver(inv).can_drain)
        say(plan.nothing_to_do if plan.is_noop else
            f"{len(upgrades)} host(s) to upgrade: " + "; ".join(f"{h}: {u.sentence()}" for h, u in upgrades.items()) + ".")
    return UpgradeCheck(view.leader, upgrades, tuple(order), plan, tuple(m.name for m in view.members if m.drained))


@dataclass(frozen=True)
class HostUpgraded:
    host: str
    installed: dict[str, str]
    restarted: tuple[str, ...]
    outcome: str


@step(retries=0)
def ensure_host_upgraded(cluster: str, host: str, targets: dict[str, str], reboot: bool = False) -> HostUpgraded:
    """apt installs the target versions of what the host has below them; then each unit whose
    package changed is restarted, unless the package's own maintainer script already did (a
    second restart would be a second outage). A PostgreSQL package restarts the member through
    the HA manager. Never retried: a half-run apt is read again on the next run, not repeated."""
    ctx = context_for(cluster)
    inv = ctx.inventory
    spec = inv.host(host)
    units = [u for layer in desired_layers(ctx).get(host, {}).values() for u in layer.units if u.package]
    with ctx.remote(spec) as remote:
        states = parse_policy(remote.run(policy_command(sorted(targets))).stdout)
        todo = {name: version for name, version in targets.items()
                if (s := states.get(name)) is not None and s.installed is not None and s.installed != version}
        if not todo:
            return HostUpgraded(host, {}, (), say(f"{host}: already runs {', '.join(f'{n} {v}' for n, v in targets.items() if n in states and states[n].installed)}; nothing installed."))
        changed_units = [u.name for u in units if u.package in todo]
        before = parse_unit_starts(remote.run(unit_starts_command(changed_units))) if changed_units else {}
        remote.run(install_command(todo))
        if reboot:
            # The connection drops with the host; the waits that follow reconnect until it is back.
            remote.run(cmd("systemctl", "reboot", "--no-block", timeout=30, description="reboot"))
            return HostUpgraded(host, todo, (), say(f"{host}: installed {_listed(todo)}; rebooting."))
        after = parse_unit_starts(remote.run(unit_starts_command(changed_units))) if changed_units else {}
        restarted = []
        for unit in changed_units:
            if after.get(unit, 0) == before.get(unit, 0) or after.get(unit, 0) == 0:
                remote.run(cmd("systemctl", "restart", unit, timeout=180))
                restarted.append(unit)
        by_package = [u for u in changed_units if u not in restarted]
        ha_restarted = any(u.package in todo for u in units if u.name in (*restarted, *by_package))
        if inv.cluster.postgres.package in todo and not ha_restarted and spec.name in {h.name for h in inv.db_hosts}:
            for command in ha_driver(inv).restart_commands(inv, host):
                remote.run(command)
            restarted.append("PostgreSQL (through the HA manager)")
    parts = [f"installed {_listed(todo)}"]
    if by_package:
        parts.append(f"its package restarted {', '.join(by_package)}")
    if restarted:
        parts.append(f"restarted {', '.join(restarted)}")
    return HostUpgraded(host, todo, tuple(restarted), say(f"{host}: {'; '.join(parts)}."))


def _listed(versions: dict[str, str]) -> str:
    return ", ".join(f"{name} {version}" for name, version in sorted(versions.items()))


@step(retries=2)
def ensure_member_drained(cluster: str, host: str, drained: bool = True) -> str:
    """Before a standby goes down: the HA manager neither promotes it nor keeps it synchronous
    (the primary's commits would wait for it); after it streams again: counted in again. Where
    the HA manager cannot do it at run time (stolon), says so and changes nothing."""
    ctx = context_for(cluster)
    inv = ctx.inventory
    driver = ha_driver(inv)
    if not driver.can_drain:
        return say(f"{host}: {driver.name} cannot leave a member out of promotion at run time; not drained.")

    def taken() -> bool:
        member = read_view(ctx).member(host)
        if member is None:
            raise NotYet(f"{host} is not in the HA manager's view")
        if member.drained != drained:
            raise NotYet(f"{host} does not show the new tags yet")
        if drained and member.synchronous:
            raise NotYet(f"{host} is still the synchronous standby")
        return True

    try:
        if taken():
            return say(f"{host}: already {'drained' if drained else 'counted in'}; nothing changed.")
    except NotYet:
        pass
    with ctx.remote(inv.host(host)) as remote:
        for command in driver.drain_commands(inv, inv.host(host), drained):
            remote.run(command)
    wait_for(f"{host}: {'drained' if drained else 'counted in again'}", taken, timeout=120)
    if drained:
        return say(f"{host}: {driver.name} will neither promote it nor choose it as synchronous.")
    return say(f"{host}: a candidate for promotion and the synchronous role again.")


@step(retries=0)
def wait_until_units_active(cluster: str, host: str, timeout: float = 180) -> str:
    """Every unit of the host's layers active again (a host without PostgreSQL: its services)."""
    ctx = context_for(cluster)
    names = [u.name for layer in desired_layers(ctx).get(host, {}).values() for u in layer.units]
    if not names:
        return say(f"{host}: runs no service of this cluster.")

    def active() -> bool:
        with ctx.remote(host) as remote:
            result = remote.run(cmd("systemctl", "is-active", *names, timeout=30, ok_codes=range(0, 256)))
        states = result.stdout.split()
        if states != ["active"] * len(names):
            raise NotYet(", ".join(f"{n} {s}" for n, s in zip(names, states) if s != "active"))
        return True

    wait_for(f"{host}: every service active", active, timeout=timeout)
    return say(f"{host}: {', '.join(names)} active.")


@dataclass(frozen=True)
class UpgradeOutcome:
    """is_upgrade_complete's answer: what is left (empty: done) and the versions per host."""

    ok: bool = field(init=False)
    problems: tuple[str, ...]
    rows: tuple[dict, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "ok", not self.problems)

    def __bool__(self) -> bool:
        return self.ok


@step(retries=1)
def is_upgrade_complete(cluster: str, targets: dict[str, str]) -> UpgradeOutcome:
    """Every host that has a requested package runs its target, and the backup tool runs one
    release everywhere (pgBackRest refuses to talk to another release of itself)."""
    ctx = context_for(cluster)
    inv = ctx.inventory
    driver = backup_driver(inv)
    states, releases, rows = {}, {}, []
    for host in inv.hosts:
        states[host.name] = package_states(ctx, host, sorted(targets), refresh=False)
        with ctx.remote(host) as remote:
            releases[host.name] = driver.parse_release(remote.run(driver.release_command()))
        rows.append({"host": host.name, **{n: (s.installed or "-") for n, s in sorted(states[host.name].items())},
                     driver.name: releases[host.name] or "-"})
    problems = upgrade_leftovers(targets, states)
    mix = release_mix(driver.name, releases)
    if mix:
        problems.append(mix)
    if problems:
        say("Not done: " + "; ".join(problems), warning=True)
    else:
        say(f"Every host runs {_listed(targets)}; {driver.name} "
            f"{next((r for r in releases.values() if r), 'is on no host')} wherever it is installed.")
    return UpgradeOutcome(tuple(problems), tuple(rows))


__all__ = ["HostUpgraded", "UpgradeCheck", "UpgradeOutcome", "ensure_host_upgraded",
           "ensure_member_drained", "is_upgrade_complete", "is_upgrade_safe", "package_states",
           "wait_until_units_active"]
