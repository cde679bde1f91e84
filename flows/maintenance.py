"""pause_ha / resume_ha: the HA manager's maintenance mode (no automatic failover) around work on
the hosts, where the HA manager has one (Patroni's pause; stolon has none, so it is refused)."""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.runbook import dry_run_done, holding, publish_plan
from tasks.errors import VerifyFailed
from tasks.ha import (
    MaintenanceState,
    ensure_ha_paused,
    is_ha_paused,
    wait_until_primary_accepts_writes,
    wait_until_replicas_streaming,
)
from tasks.planning.plan import ActionPlan
from tasks.planning.roles import maintenance_plan


def _plan(state: MaintenanceState, pause: bool) -> ActionPlan:
    return maintenance_plan(driver=state.driver, supported=state.supported, paused=state.paused, pause=pause,
                            members=list(state.members))


def _act_and_verify(cluster: str, runbook: str, plan: ActionPlan, pause: bool) -> dict:
    logger = get_run_logger()
    if plan.is_noop:
        return {"paused": pause, "changed": False}
    logger.info("3. Act: %s the HA manager on every member.", "pause" if pause else "resume")
    ensure_ha_paused(cluster, pause)
    logger.info("4. Verify: the flag read back%s.", "" if pause else "; a writable primary; every standby streaming")
    if is_ha_paused(cluster).paused != pause:
        raise VerifyFailed(f"the HA manager is {'not ' if pause else ''}paused after {runbook}")
    if not pause:
        wait_until_primary_accepts_writes(cluster)
        wait_until_replicas_streaming(cluster)
    logger.info("Done: %s.", "automatic failover is off until resume_ha" if pause else "automatic failover is on")
    return {"paused": pause, "changed": True}


@flow(name="pause_ha", persist_result=True)
def pause_ha(cluster: str = "lab", dry_run: bool = False) -> dict:
    """Maintenance mode on: the HA manager stops failing over and restarting PostgreSQL on its own
    while a DBA works on the hosts; switchover and failover refuse until resume_ha (or
    while_paused=True). 1. Pre-flight (read-only)  2. Plan (dry_run stops here)  3. Act  4. Verify."""
    get_run_logger().info("1. Pre-flight (read-only): the HA manager's maintenance mode and its members.")
    with holding(cluster, "pause_ha", dry_run=dry_run):
        state = is_ha_paused(cluster)
        plan = _plan(state, pause=True)
        publish_plan("pause_ha", cluster, plan, dry_run=dry_run)
        if dry_run:
            return dry_run_done({"paused": state.paused, "changed": False, "dry_run": True})
        return _act_and_verify(cluster, "pause_ha", plan, pause=True)


@flow(name="resume_ha", persist_result=True)
def resume_ha(cluster: str = "lab", dry_run: bool = False) -> dict:
    """Maintenance mode off: automatic failover on again; the plan names any member the HA manager
    will act on once resumed. 1. Pre-flight (read-only)  2. Plan (dry_run stops here)  3. Act  4. Verify."""
    get_run_logger().info("1. Pre-flight (read-only): the HA manager's maintenance mode and its members.")
    with holding(cluster, "resume_ha", dry_run=dry_run):
        state = is_ha_paused(cluster)
        plan = _plan(state, pause=False)
        publish_plan("resume_ha", cluster, plan, dry_run=dry_run)
        if dry_run:
            return dry_run_done({"paused": state.paused, "changed": False, "dry_run": True})
        return _act_and_verify(cluster, "resume_ha", plan, pause=False)
