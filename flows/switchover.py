"""switchover (planned) and failover (the primary is gone): through the HA driver, verified end to end."""

from __future__ import annotations

from datetime import datetime, timezone

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field

from blocks.inventory import HOSTNAME
from flows.runbook import dry_run_done, holding, publish_plan
from tasks.context import context_for
from tasks.errors import DeadlineExceeded, PreflightRefused, VerifyFailed
from tasks.etcd import ensure_etcd_leader_off_primary
from tasks.ha import wait_until_primary_port_routes, wait_until_replicas_streaming
from tasks.members import ensure_standby_reinitialized
from tasks.planning.roles import failover_action_plan, switchover_action_plan
from tasks.roles import (
    ensure_failover,
    ensure_switchover,
    expected_new_primary,
    is_decided_candidate_fit,
    is_failover_needed,
    is_switchover_safe,
    wait_until_primary_is,
)
from tasks.routing import is_routing_correct, vip_holders


class FailoverDecision(RunInput):
    """What the DBA on call decides when promoting the best standby may lose data."""

    promote: bool = False
    candidate: str | None = Field(default=None, pattern=HOSTNAME, description="a database host of this cluster")
    # Goes to the timeline and the log; one line, no control characters.
    reason: str = Field(default="", max_length=500, pattern=r"^[^\x00-\x1f\x7f]*$")


class Timeline:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def __call__(self, event: str) -> None:
        self.rows.append({"at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "event": event})


def planned_switchover(cluster: str, primary: str, candidate: str | None, max_lag_bytes: int,
                       max_transaction_age_seconds: float, while_paused: bool, timeline: Timeline, *,
                       runbook: str) -> str:
    """One planned switchover inside a rolling runbook (change_settings, rolling_upgrade), checked
    afresh just before (lag, open transactions, a pause); returns the new primary once the old
    one streams from it. `candidate` None: the best caught-up standby of this moment."""
    check = is_switchover_safe(cluster, candidate, max_lag_bytes, max_transaction_age_seconds, while_paused,
                               runbook=runbook)
    candidate = check.candidate
    if check.already_done:
        return candidate
    if not check:
        raise PreflightRefused(*check.refusals)
    ensure_switchover(cluster, primary, candidate)
    # stolon's sentinel elects the new master itself: any member but the old primary will do.
    new = wait_until_primary_is(cluster, expected_new_primary(cluster, candidate, primary), not_host=primary)
    timeline(f"switchover {primary} → {new}")
    timeline(ensure_etcd_leader_off_primary(cluster))
    # The old primary shuts down and rejoins as a standby: restarted before it streams, it would
    # be restarted mid-rejoin (or not be reachable to read at all).
    wait_until_replicas_streaming(cluster, max_lag_bytes=max_lag_bytes, hosts=[primary], timeout=300)
    timeline(f"{primary} streams from {new}")
    return new


def _verify(cluster: str, new_primary: str, old_primary: str | None, timeline: Timeline, logger) -> list[dict]:
    """New primary writable; the old one streaming again (rejoined if it cannot); rw via the VIP."""
    ctx = context_for(cluster)
    try:
        rows = wait_until_replicas_streaming(cluster, timeout=90)
    except DeadlineExceeded:
        if old_primary is None:
            raise
        logger.warning("%s does not stream yet (pg_rewind could not bring it back): re-cloning it.", old_primary)
        timeline(f"re-clone {old_primary}")
        ensure_standby_reinitialized(cluster, old_primary)
        rows = wait_until_replicas_streaming(cluster, timeout=300)
    timeline("every standby streaming" + (f", {old_primary} included" if old_primary else ""))
    ports = wait_until_primary_port_routes(cluster)
    if ports.primary != new_primary:
        raise VerifyFailed(f"port {ports.port} of the database hosts leads to {ports.primary}, not {new_primary}")
    timeline(f"port {ports.port} of {', '.join(ports.through)} leads to {new_primary}")
    if ctx.inventory.cluster.routing is not None and vip_holders(ctx):
        routes = is_routing_correct(cluster)
        if routes.rw != new_primary:
            raise VerifyFailed(f"rw through the VIP reaches {routes.rw}, not {new_primary}")
        timeline(f"rw through the VIP reaches {new_primary}")
    return rows


@flow(name="switchover", persist_result=True)
def switchover(cluster: str = "lab", candidate: str | None = None, max_lag_bytes: int = 1024 * 1024,
               max_transaction_age_seconds: float = 300, while_paused: bool = False, dry_run: bool = False) -> dict:
    """1. Pre-flight (read-only)  2. Plan (dry_run stops here)  3. Act through the HA driver  4. Verify.

    `while_paused`: switch over although the HA manager is paused (pause_ha), which is refused
    otherwise: someone is working on the hosts."""
    logger = get_run_logger()
    timeline = Timeline()
    context_for(cluster, fresh=True)
    logger.info("1. Pre-flight (read-only): candidate health, lag, open transactions, routing.")
    # Pre-flight runs under the lock: nothing may change the roles between the check and the act.
    with holding(cluster, "switchover", dry_run=dry_run):
        check = is_switchover_safe(cluster, candidate, max_lag_bytes, max_transaction_age_seconds, while_paused)
        old, new = check.primary, check.candidate
        publish_plan("switchover", cluster, switchover_action_plan(old, new, check.refusals, check.already_done),
                     dry_run=dry_run)
        if dry_run:
            return {"old_primary": old, "new_primary": new, "dry_run": True}
        if check.already_done:
            timeline(f"{new} already primary")
            old = None
            logger.info("3. Act: only keep etcd's leader off the primary's host.")
        else:
            timeline(f"pre-flight passed: {old} → {new}")
            logger.info("3. Act: switchover through the HA manager, then etcd's leader off the new primary's host.")
            ensure_switchover(cluster, old, new)
            timeline("switchover requested")
        new = wait_until_primary_is(cluster, expected_new_primary(cluster, new, old), not_host=old)
        timeline(f"{new} accepts writes")
        timeline(ensure_etcd_leader_off_primary(cluster))
        logger.info("4. Verify: standbys streaming (the old primary among them), rw through the VIP.")
        rows = _verify(cluster, new, old, timeline, logger)
    create_table_artifact(key=f"switchover-{cluster}", table=timeline.rows,
                          description=f"Switchover {old} → {new} on {cluster}")
    create_table_artifact(key=f"topology-{cluster}", table=rows, description=f"Topology after switchover on {cluster}")
    logger.info("Done: %s is the primary; %s streams from it.", new, old)
    return {"old_primary": old, "new_primary": new, "timeline": timeline.rows, "topology": rows}


@flow(name="failover", persist_result=True)
def failover(cluster: str = "lab", force: bool = False, max_data_loss_bytes: int = 1024 * 1024,
             decision_timeout_seconds: int = 3600, while_paused: bool = False, dry_run: bool = False) -> dict:
    """For a dead primary: promote the most advanced standby; ask a human when that may lose data.
    `while_paused`: although the HA manager is paused (pause_ha), which is refused otherwise.

    1. Pre-flight (read-only)  2. Plan (dry_run stops here)  3. Act  4. Verify."""
    logger = get_run_logger()
    timeline = Timeline()
    context_for(cluster, fresh=True)
    logger.info("1. Pre-flight (read-only): is the primary really gone; which standby is most advanced.")
    with holding(cluster, "failover", dry_run=dry_run):
        check = is_failover_needed(cluster, force, max_data_loss_bytes, while_paused)
        candidate = check.candidate
        publish_plan("failover", cluster, failover_action_plan(check.primary, candidate, check.refusals,
                                                               check.reason, check.needs_human), dry_run=dry_run)
        if dry_run:
            return dry_run_done({"old_primary": check.primary, "new_primary": candidate, "dry_run": True})
        timeline(f"pre-flight: {check.reason}")
        if check.needs_human:
            logger.warning("2. Plan: %s. Pausing for a decision in the Prefect UI.", check.reason)
            timeline("paused for a human decision")
            decision = pause_flow_run(wait_for_input=FailoverDecision.with_initial_data(
                candidate=candidate, reason=""), timeout=decision_timeout_seconds)
            if decision is None or not decision.promote:
                timeline("human decided: do not promote")
                raise PreflightRefused(f"not promoted: the DBA declined ({decision.reason if decision else 'no answer'})")
            candidate = decision.candidate or candidate
            timeline(f"human decided: promote {candidate} ({decision.reason})")
            # Typed by a human, an hour may have passed: checked afresh, like the pre-flight's.
            fit = is_decided_candidate_fit(cluster, candidate, force)
            if not fit:
                timeline(f"decided candidate refused: {'; '.join(fit.refusals)}")
                raise PreflightRefused(*fit.refusals)
        logger.info("3. Act: failover to %s through the HA manager, then etcd's leader off its host.", candidate)
        ensure_failover(cluster, candidate)
        timeline("failover requested")
        new = wait_until_primary_is(cluster, expected_new_primary(cluster, candidate, check.primary), not_host=check.primary)
        timeline(f"{new} accepts writes")
        timeline(ensure_etcd_leader_off_primary(cluster))
        logger.info("4. Verify: standbys streaming, rw through the VIP.")
        rows = _verify(cluster, new, check.primary, timeline, logger)
    create_table_artifact(key=f"failover-{cluster}", table=timeline.rows, description=f"Failover to {new} on {cluster}")
    logger.info("Done: %s is the primary.", new)
    return {"old_primary": check.primary, "new_primary": new, "timeline": timeline.rows, "topology": rows}
