"""Runbook steps for role changes: switchover (planned) and failover (the primary is gone)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from tasks.adapters.ha.base import ClusterView, HaStatusError
from tasks.adapters.postgres import DatabaseUnavailable, Postgres, lsn_to_int
from tasks.context import context_for
from tasks.desired import ha_driver
from tasks.errors import NotYet
from tasks.ha import read_paused, read_view, replication_rows
from tasks.planning.roles import (
    CandidateState,
    paused_refusals,
    plan_failover,
    plan_switchover,
    refuse_decided_candidate,
)
from tasks.runtime import once, say, step, wait_for


@dataclass(frozen=True)
class SwitchoverCheck:
    """is_switchover_safe's answer: safe when nothing refuses it (also when already done)."""

    ok: bool = field(init=False)  # no refusals
    primary: str | None
    candidate: str | None
    refusals: tuple[str, ...]
    oldest_transaction_s: float
    already_done: bool  # the candidate already is the primary (a rerun after a killed run)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ok", not self.refusals)

    def __bool__(self) -> bool:
        return self.ok


@dataclass(frozen=True)
class FailoverCheck:
    """is_failover_needed's answer: a failover to `candidate` is called for when nothing refuses
    it (a live primary refuses unless forced; `needs_human` still asks a DBA first)."""

    ok: bool = field(init=False)  # no refusals
    primary: str | None  # None: no live primary, a failover is what is needed
    candidate: str | None
    refusals: tuple[str, ...]
    needs_human: bool  # promoting may lose data: a DBA decides
    reason: str
    lag_bytes: int | None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ok", not self.refusals)

    def __bool__(self) -> bool:
        return self.ok


def _candidate_states(cluster: str, view: ClusterView) -> tuple[str | None, list[CandidateState], dict]:
    """Per replica: reachable, streaming, lag, receive LSN — from PostgreSQL itself, one connection
    per member: the topology read from a live primary already carries each standby's status."""
    ctx = context_for(cluster)
    primary_alive = False
    links: dict = {}
    primary = view.leader
    if primary:
        try:
            primary_name, rows = replication_rows(ctx, view)
            primary_alive = primary_name == primary
            links = {r["host"]: r for r in rows}
        except (DatabaseUnavailable, HaStatusError):
            primary_alive = False
    states = []
    for member in view.members:
        if member.name == primary and primary_alive:
            continue
        link = links.get(member.name, {})
        if link:
            reachable = link["role"] != "down"
            in_recovery, receive = link["role"] == "standby", link["receive_lsn"]
        else:
            # No live primary to read the topology from (a failover): ask each member itself.
            try:
                with Postgres(ctx.superuser_endpoint(ctx.inventory.host(member.name)), statement_timeout_ms=3000) as pg:
                    in_recovery, receive = pg.query_one("select pg_is_in_recovery(), pg_last_wal_receive_lsn()::text")
                reachable = True
            except DatabaseUnavailable:
                in_recovery, receive, reachable = None, None, False
        states.append(CandidateState(
            name=member.name, reachable=reachable, in_recovery=bool(in_recovery),
            streaming=str(link.get("state", "")).startswith("streaming"),
            sync=str(link.get("state", "")).endswith("(sync)") or "sync" in member.state,
            lag_bytes=link.get("lag_bytes") if link else member.lag_bytes,
            receive_lsn=lsn_to_int(receive), ha_healthy=member.healthy,
        ))
    return primary if primary_alive else None, states, links


@step(retries=1)
def is_switchover_safe(cluster: str, candidate: str | None, max_lag_bytes: int,
                       max_transaction_age_s: float, while_paused: bool = False,
                       runbook: str = "switchover") -> SwitchoverCheck:
    """Read-only: who is primary, which standby takes over, and reasons to refuse."""
    ctx = context_for(cluster)
    view = read_view(ctx)
    paused = read_paused(ctx)
    primary, states, _ = _candidate_states(cluster, view)
    oldest = 0.0
    if primary:
        with Postgres(ctx.superuser_endpoint(ctx.inventory.host(primary))) as pg:
            oldest = pg.oldest_transaction_seconds()
    plan = plan_switchover(
        primary=primary, candidates=states, requested=candidate, known_hosts={h.name for h in ctx.inventory.db_hosts},
        max_lag_bytes=max_lag_bytes, oldest_transaction_s=oldest, max_transaction_age_s=max_transaction_age_s,
        synchronous=bool(ctx.inventory.cluster.postgres.synchronous_replication),
    )
    if not plan.already_done:
        plan = replace(plan, refusals=plan.refusals + paused_refusals(paused=paused, while_paused=while_paused,
                                                                      runbook=runbook))
    if plan.already_done:
        say(f"{primary} already is the primary: nothing to switch.")
    else:
        say(f"Switchover {primary} → {plan.candidate}: safe." if not plan.refusals else "Not safe: " + "; ".join(plan.refusals))
    return SwitchoverCheck(primary, plan.candidate, plan.refusals, round(oldest, 1), plan.already_done)


@step(retries=1)
def is_failover_needed(cluster: str, force: bool, max_lag_bytes: int, while_paused: bool = False) -> FailoverCheck:
    ctx = context_for(cluster)
    view = read_view(ctx)
    paused = read_paused(ctx)
    primary, states, _ = _candidate_states(cluster, view)
    plan = plan_failover(primary_alive=primary is not None, candidates=states, force=force, max_lag_bytes=max_lag_bytes)
    plan = replace(plan, refusals=plan.refusals + paused_refusals(paused=paused, while_paused=while_paused,
                                                                  runbook="failover"))
    if plan.refusals:
        say("No failover: " + "; ".join(plan.refusals))
    else:
        say(f"Failover to {plan.candidate} ({plan.reason})." if plan.candidate else "No failover: " + plan.reason)
    return FailoverCheck(primary, plan.candidate, plan.refusals, plan.needs_human, plan.reason, plan.candidate_lag)


@step(retries=1)
def is_decided_candidate_fit(cluster: str, candidate: str, force: bool) -> FailoverCheck:
    """Read-only, after a DBA's failover decision: may the candidate typed in the UI be promoted now?"""
    ctx = context_for(cluster)
    primary, states, _ = _candidate_states(cluster, read_view(ctx))
    refusals = refuse_decided_candidate(decided=candidate, primary_alive=primary is not None, force=force,
                                        candidates=states,
                                        known_hosts={h.name for h in ctx.inventory.db_hosts})
    lag = next((c.lag_bytes for c in states if c.name == candidate), None)
    say(f"The DBA's candidate {candidate} may be promoted." if not refusals
        else f"The DBA's candidate {candidate} is refused: " + "; ".join(refusals), warning=bool(refusals))
    return FailoverCheck(primary, candidate if not refusals else None, refusals, False,
                         "the DBA's decision", lag)


@once
def ensure_switchover(cluster: str, primary: str, candidate: str) -> str:
    """Ask the HA manager to hand the primary role to the candidate (never retried blindly)."""
    ctx = context_for(cluster)
    inv = ctx.inventory
    driver = ha_driver(inv)
    view = read_view(ctx)
    if view.leader != primary:
        raise HaStatusError(f"the primary changed from {primary} to {view.leader} since pre-flight; not switching")
    with ctx.remote(candidate) as remote:
        for command in driver.switchover_commands(inv, view, candidate):
            remote.run(command)
    return say(f"Switchover from {primary} to {candidate} requested through {driver.name}.")


@once
def ensure_failover(cluster: str, candidate: str) -> str:
    ctx = context_for(cluster)
    inv = ctx.inventory
    driver = ha_driver(inv)
    view = read_view(ctx, [inv.host(candidate)] + [h for h in inv.db_hosts if h.name != candidate])
    with ctx.remote(candidate) as remote:
        for command in driver.failover_commands(inv, view, candidate):
            remote.run(command)
    return say(f"Failover to {candidate} requested through {driver.name}.")


def expected_new_primary(cluster: str, candidate: str, old: str | None) -> str | None:
    """The new primary a role change waits for: the candidate, unless the HA manager elects one
    itself (stolon's sentinel; then any member but the old primary will do)."""
    if old is None or ha_driver(context_for(cluster).inventory).targets_candidate:
        return candidate
    return None


@step(retries=0)
def wait_until_primary_is(cluster: str, expected: str | None, not_host: str | None = None, timeout: float = 120) -> str:
    """PostgreSQL itself (not only the HA manager) must accept writes on the new primary."""
    ctx = context_for(cluster)

    def settled() -> str:
        view = read_view(ctx)
        leader = view.leader
        if leader is None or (expected and leader != expected) or leader == not_host:
            raise NotYet(f"leader {leader}")
        with Postgres(ctx.superuser_endpoint(ctx.inventory.host(leader)), statement_timeout_ms=3000) as pg:
            if pg.scalar("select pg_is_in_recovery()"):
                raise NotYet(f"{leader} still in recovery")
        return leader

    leader = wait_for("the new primary accepting writes", settled, timeout=timeout, interval=0.5)
    say(f"{leader} is the primary and accepts writes.")
    return leader


def now() -> float:
    return time.time()
