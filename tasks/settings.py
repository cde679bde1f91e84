"""Runbook steps for PostgreSQL's settings through the HA manager: the cluster-wide settings
kept equal to the inventory (build_cluster), and change_settings' parameters read on every
member, written, reloaded, and restarted in turn where a parameter needs it."""

from __future__ import annotations

from dataclasses import dataclass

from tasks.adapters.ha.base import HaSettings
from tasks.adapters.postgres import DatabaseUnavailable, Postgres
from tasks.context import ClusterContext, context_for
from tasks.desired import archive_parameters, ha_driver
from tasks.errors import NotYet, VerifyFailed
from tasks.ha import caught_up_standbys, read_paused, read_view, require_primary
from tasks.hosts import cluster_secrets
from tasks.planning.plan import ActionPlan, PlannedCheck
from tasks.planning.roles import paused_refusals
from tasks.planning.settings import (
    SETTINGS_QUERY,
    RestartStep,
    SettingChange,
    SettingRow,
    SettingsPlanError,
    member_needs_restart,
    needs_restart,
    not_yet_in_effect,
    not_yet_reloaded,
    ownership_refusals,
    plan_cluster_settings,
    restart_order,
    settings_plan,
)
from tasks.runtime import say, step, wait_for


def member_settings(ctx: ClusterContext, host: str) -> dict[str, SettingRow]:
    """pg_settings of one member, read as the superuser (see SETTINGS_QUERY)."""
    with Postgres(ctx.superuser_endpoint(ctx.inventory.host(host)), statement_timeout_ms=5000) as pg:
        return {row.name: row for row in map(SettingRow.from_record, pg.query(SETTINGS_QUERY))}


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


@dataclass(frozen=True)
class SettingsCheck(PlannedCheck):
    """is_settings_change_valid's answer: the plan (with its refusals) and what it was made of."""

    primary: str | None
    changes: tuple[SettingChange, ...]
    order: tuple[RestartStep, ...]
    plan: ActionPlan


@step(retries=1)
def is_settings_change_valid(cluster: str, parameters: dict[str, str], max_lag_bytes: int,
                             while_paused: bool = False) -> SettingsCheck:
    """Read-only: every name and value checked against every member's pg_settings, what each
    change needs, and the rolling restart's order when one does."""
    ctx = context_for(cluster)
    inv = ctx.inventory
    view = read_view(ctx)
    refusals: list[str] = []
    if view.leader is None:
        refusals.append("the HA manager reports no primary; settings change on a healthy cluster only")
    rows_by_member: dict[str, dict[str, SettingRow]] = {}
    for host in inv.db_hosts:
        try:
            rows_by_member[host.name] = member_settings(ctx, host.name)
        except DatabaseUnavailable as exc:
            refusals.append(f"{host.name}: PostgreSQL does not answer ({str(exc).splitlines()[0]}); every member "
                            "must answer so its values can be checked")
    changes: list[SettingChange] = []
    order: list[RestartStep] = []
    if not refusals and view.leader is not None:
        primary_rows = rows_by_member[view.leader]
        managed = ha_driver(inv).managed_parameters(inv, archive_parameters(inv, cluster_secrets(ctx)))
        try:
            changes = plan_cluster_settings(parameters, rows_by_member, view.leader)
            refusals += ownership_refusals(parameters, primary_rows, managed, inv.cluster.postgres.parameters)
            if not refusals and needs_restart(changes):
                refusals += paused_refusals(paused=read_paused(ctx), while_paused=while_paused,
                                            runbook="change_settings")
            if not refusals and needs_restart(changes):
                order = restart_order(view, caught_up_standbys(ctx, view, max_lag_bytes))
        except SettingsPlanError as exc:
            refusals += exc.reasons
    plan = ActionPlan(refusals=tuple(refusals)) if refusals else settings_plan(changes, order)
    if plan.refusals:
        say("Refused: " + "; ".join(plan.refusals), warning=True)
    elif plan.is_noop:
        say(plan.nothing_to_do)
    else:
        say("Changes: " + "; ".join(f"{c.name} {c.old} → {c.new} ({c.needs})" for c in changes if c.needs != "nothing")
            + ".")
    return SettingsCheck(view.leader, tuple(changes), tuple(order), plan)


@step(retries=2)
def ensure_parameters_configured(cluster: str, parameters: dict[str, str]) -> str:
    """The values written into the HA manager's cluster-wide configuration (Patroni's dynamic
    configuration, stolon's pgParameters): every member reloads, and they survive a failover."""
    ctx = context_for(cluster)
    inv = ctx.inventory
    driver = ha_driver(inv)
    primary = require_primary(ctx, "to write the cluster configuration on")
    with ctx.remote(primary) as remote:
        for command in driver.settings_commands(inv, HaSettings(postgres_parameters=dict(parameters))):
            remote.run(command)
    return say(f"{driver.name}'s cluster configuration holds {', '.join(f'{k}={v}' for k, v in parameters.items())}.")


@step(retries=0)
def wait_until_settings_reloaded(cluster: str, parameters: dict[str, str], timeout: float = 120) -> str:
    """Every member has reloaded: it runs each new value that a reload brings, and marks the
    others pending a restart (in pg_settings, or in the HA manager's own flag for a parameter
    it passes on the command line)."""
    ctx = context_for(cluster)

    def reloaded() -> bool:
        view = read_view(ctx)
        for host in ctx.inventory.db_hosts:
            member = view.member(host.name)
            behind = not_yet_reloaded(parameters, member_settings(ctx, host.name),
                                      ha_pending=bool(member and member.pending_restart))
            if behind:
                raise NotYet(f"{host.name} has not reloaded {', '.join(behind)}")
        return True

    wait_for("every member reloaded", reloaded, timeout=timeout, interval=1)
    return say("Every member has reloaded the new configuration.")


@dataclass(frozen=True)
class MemberRestart:
    """ensure_member_restarted's outcome: whether `host` was restarted, and for which parameters."""

    host: str
    restarted: bool
    parameters: tuple[str, ...]  # the new values it did not run before (empty: not restarted)
    outcome: str  # the step's sentence, for the run's timeline


# Retried only on transient errors (a member that does not answer yet): a restart is no promote.
@step(retries=2)
def ensure_member_restarted(cluster: str, host: str, parameters: dict[str, str]) -> MemberRestart:
    """`host` (a standby) restarted through the HA manager, unless it already runs every new
    value (a rerun after a run cut short skips the members it restarted)."""
    ctx = context_for(cluster)
    inv = ctx.inventory
    behind = member_needs_restart(parameters, member_settings(ctx, host))
    if not behind:
        return MemberRestart(host, False, (), say(f"{host} already runs the new values; not restarted."))
    view = read_view(ctx)
    if view.leader == host:
        raise VerifyFailed(f"{host} is the primary; the rolling restart restarts standbys only")
    with ctx.remote(host) as remote:
        for command in ha_driver(inv).restart_commands(inv, host):
            remote.run(command)
    return MemberRestart(host, True, tuple(behind), say(f"{host} restarted for {', '.join(behind)}."))


@step(retries=1)
def is_primary_behind(cluster: str, parameters: dict[str, str]) -> bool:
    """Does the primary still run an old value of a parameter that needs a restart?"""
    ctx = context_for(cluster)
    primary = require_primary(ctx, "to read the running values of")
    return bool(member_needs_restart(parameters, member_settings(ctx, primary.name)))


@step(retries=0)
def wait_until_settings_in_effect(cluster: str, parameters: dict[str, str], timeout: float = 90) -> list[dict]:
    """Every member runs every requested value and none is left pending a restart; the table
    of members and values is the run's evidence."""
    ctx = context_for(cluster)

    def in_effect() -> list[dict]:
        view = read_view(ctx)
        table = []
        for host in ctx.inventory.db_hosts:
            member = view.member(host.name)
            rows = member_settings(ctx, host.name)
            behind = not_yet_in_effect(parameters, rows, ha_pending=bool(member and member.pending_restart))
            if behind:
                raise NotYet(f"{host.name}: {', '.join(behind)}")
            table.append({"host": host.name, "role": member.role if member else "unknown",
                          **{name: rows[name].setting for name in sorted(_names(parameters, rows))}})
        return table

    table = wait_for("every member running the new values", in_effect, timeout=timeout, interval=2)
    say(f"Every member ({', '.join(r['host'] for r in table)}) runs the new values; none is pending a restart.")
    return table


def _names(parameters: dict[str, str], rows: dict[str, SettingRow]) -> list[str]:
    lowered = {name.lower(): name for name in rows}
    return [lowered[p.lower()] for p in parameters if p.lower() in lowered]
