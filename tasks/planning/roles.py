"""Pure decisions for role changes: which standby, and whether it is safe."""

from __future__ import annotations

from dataclasses import dataclass

from tasks.planning.plan import Action, ActionPlan


@dataclass(frozen=True)
class CandidateState:
    name: str
    reachable: bool
    in_recovery: bool
    streaming: bool
    sync: bool
    lag_bytes: int | None
    receive_lsn: int | None
    ha_healthy: bool


@dataclass(frozen=True)
class SwitchoverPlan:
    candidate: str | None
    refusals: tuple[str, ...]
    # The requested candidate already is the primary (e.g. a rerun after the flow was killed).
    already_done: bool = False


@dataclass(frozen=True)
class FailoverPlan:
    candidate: str | None
    refusals: tuple[str, ...]
    needs_human: bool
    reason: str
    candidate_lag: int | None = None


def switchover_action_plan(primary: str | None, candidate: str | None, refusals: list[str] | tuple[str, ...],
                           already_done: bool) -> ActionPlan:
    if already_done:
        return ActionPlan(refusals=tuple(refusals),
                          nothing_to_do=f"{candidate} already is the primary; only etcd's leader is kept off its host.")
    actions = (Action(f"{primary} → {candidate}", "switchover through the HA manager; etcd's leader off the new "
                                                  "primary's host; the old primary streams again"),)
    return ActionPlan(actions if not refusals else (), tuple(refusals))


def failover_action_plan(primary: str | None, candidate: str | None, refusals: list[str] | tuple[str, ...],
                         reason: str, needs_human: bool) -> ActionPlan:
    if refusals or candidate is None:
        return ActionPlan(refusals=tuple(refusals) or (f"no candidate: {reason}",))
    notes = ("Promoting may lose data: the run pauses for a DBA's decision in the Prefect UI.",) if needs_human else ()
    return ActionPlan((Action(candidate, f"promote ({reason}); etcd's leader off its host"),), notes=notes)


def _healthy(c: CandidateState) -> bool:
    return c.reachable and c.in_recovery and c.ha_healthy


def plan_switchover(
    *,
    primary: str | None,
    candidates: list[CandidateState],
    requested: str | None,
    known_hosts: set[str],
    max_lag_bytes: int,
    oldest_transaction_s: float,
    max_transaction_age_s: float,
    synchronous: bool,
) -> SwitchoverPlan:
    refusals: list[str] = []
    if primary is None:
        return SwitchoverPlan(None, ("no healthy primary: this is a failover, not a switchover",))
    if requested is not None and requested not in known_hosts:
        return SwitchoverPlan(None, (f"candidate: {requested!r} is not a database host of this cluster "
                                     f"({', '.join(sorted(known_hosts))})",))
    if requested == primary:
        return SwitchoverPlan(requested, (), already_done=True)
    pool = [c for c in candidates if c.name != primary]
    if requested is not None:
        chosen = next((c for c in pool if c.name == requested), None)
        if chosen is None:
            return SwitchoverPlan(None, (f"candidate: {requested} is not a member the HA manager knows",))
    else:
        eligible = [c for c in pool if _healthy(c) and c.streaming and c.lag_bytes is not None]
        if synchronous and any(c.sync for c in eligible):
            eligible = [c for c in eligible if c.sync]
        if not eligible:
            return SwitchoverPlan(None, ("no healthy streaming standby to switch over to",))
        chosen = min(eligible, key=lambda c: (c.lag_bytes, c.name))
    if not _healthy(chosen):
        refusals.append(f"candidate: {chosen.name} is not healthy (reachable={chosen.reachable}, "
                        f"in recovery={chosen.in_recovery}, HA manager healthy={chosen.ha_healthy})")
    elif not chosen.streaming:
        refusals.append(f"candidate: {chosen.name} is not streaming from {primary}")
    elif chosen.lag_bytes is None or chosen.lag_bytes > max_lag_bytes:
        refusals.append(f"candidate: {chosen.name} lags {chosen.lag_bytes} bytes, more than {max_lag_bytes}")
    if synchronous and not chosen.sync and any(c.sync for c in pool):
        refusals.append(f"candidate: {chosen.name} is not the synchronous standby; switching to it could lose commits")
    if oldest_transaction_s > max_transaction_age_s:
        refusals.append(f"a transaction on {primary} has been open {oldest_transaction_s:.0f}s "
                        f"(limit {max_transaction_age_s:.0f}s); it would be cut off")
    return SwitchoverPlan(chosen.name, tuple(refusals))


def plan_failover(*, primary_alive: bool, candidates: list[CandidateState], force: bool, max_lag_bytes: int) -> FailoverPlan:
    if primary_alive and not force:
        return FailoverPlan(None, ("a healthy primary exists; use switchover, or force=True",), False,
                            "the primary is healthy")
    reachable = [c for c in candidates if c.reachable and c.in_recovery and c.receive_lsn is not None]
    if not reachable:
        return FailoverPlan(None, ("no reachable standby to promote",), False, "nothing to promote")
    best = max(reachable, key=lambda c: (c.receive_lsn, c.ha_healthy, c.name))
    lag = best.lag_bytes
    if lag is None or lag > max_lag_bytes:
        return FailoverPlan(best.name, (), True,
                            f"the most advanced standby {best.name} lags {lag if lag is not None else 'an unknown number of'} "
                            f"bytes behind the last known primary position (limit {max_lag_bytes}): promoting it may lose data",
                            lag)
    return FailoverPlan(best.name, (), False, f"{best.name} is the most advanced standby", lag)


def refuse_decided_candidate(*, decided: str, primary_alive: bool, force: bool, candidates: list[CandidateState],
                             known_hosts: set[str]) -> tuple[str, ...]:
    """A candidate a DBA typed into the failover decision, checked on a fresh read as the
    pre-flight checks its own: a database host of this cluster, reachable, a standby; and the
    primary still gone unless the failover is forced (a pause may last an hour)."""
    if primary_alive and not force:
        return ("the primary is back and healthy since the decision was asked for; nothing is promoted",)
    if decided not in known_hosts:
        return (f"candidate: {decided!r} is not a database host of this cluster ({', '.join(sorted(known_hosts))})",)
    chosen = next((c for c in candidates if c.name == decided), None)
    if chosen is None:
        return (f"candidate: {decided} is not a standby the HA manager knows",)
    if not (chosen.reachable and chosen.in_recovery and chosen.receive_lsn is not None):
        return (f"candidate: {decided} cannot be promoted (reachable={chosen.reachable}, "
                f"in recovery={chosen.in_recovery})",)
    return ()


def paused_refusals(*, paused: bool, while_paused: bool, runbook: str) -> tuple[str, ...]:
    """A paused HA manager means someone is working on the hosts (pause_ha): a role change now
    would act under their feet, so it needs saying so (`while_paused=True`)."""
    if paused and not while_paused:
        return (f"while_paused: the HA manager is paused (maintenance mode, set by pause_ha); resume_ha "
                f"first, or run the {runbook} with while_paused=True",)
    return ()


def maintenance_plan(*, driver: str, supported: bool, paused: bool, pause: bool,
                     members: list[tuple[str, str, bool]]) -> ActionPlan:
    """pause_ha (`pause`) or resume_ha, given the HA manager's state now and its members as
    (name, role, healthy)."""
    if not supported:
        return ActionPlan(refusals=(f"{driver} has no maintenance mode: its failover cannot be paused; move "
                                    f"the primary away from a host before working on it (switchover)",))
    if paused == pause:
        return ActionPlan(nothing_to_do=f"The HA manager already is {'paused' if pause else 'running'}; nothing to do.")
    if pause:
        return ActionPlan((Action("cluster", f"pause {driver}: no automatic failover until resume_ha"),),
                          notes=("While paused, a primary that fails stays down until a DBA acts: a "
                                 "failover or switchover then needs while_paused=True.",))
    unhealthy = [name for name, _, healthy in members if not healthy]
    notes = (f"{driver} acts on what it finds once resumed: {', '.join(unhealthy)} "
             f"{'is' if len(unhealthy) == 1 else 'are'} not healthy now and may be restarted, "
             "re-cloned or failed over.",) if unhealthy else ()
    if not any(role == "primary" and healthy for _, role, healthy in members):
        notes += (f"No healthy primary now: once resumed, {driver} elects one (a failover).",)
    return ActionPlan((Action("cluster", f"resume {driver}: automatic failover on again"),), notes=notes)
