"""change_settings: PostgreSQL parameters changed on a running cluster through the HA manager,
reloaded, and where a parameter needs it restarted member by member with one switchover."""

from __future__ import annotations

from dataclasses import asdict

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from flows.runbook import dry_run_done, holding, publish_plan
from flows.switchover import Timeline, planned_switchover
from tasks.ha import wait_until_replicas_streaming
from tasks.settings import (
    ensure_member_restarted,
    ensure_parameters_configured,
    is_primary_behind,
    is_settings_change_valid,
    wait_until_settings_in_effect,
    wait_until_settings_reloaded,
)


@flow(name="change_settings", persist_result=True)
def change_settings(cluster: str = "lab", parameters: dict[str, str] | None = None, switch_back: bool = False,
                    max_lag_bytes: int = 1024 * 1024, max_transaction_age_seconds: float = 300,
                    while_paused: bool = False, dry_run: bool = False) -> dict:
    """1. Pre-flight (read-only)  2. Plan (dry_run stops here)  3. Act through the HA manager  4. Verify.

    `parameters`: {"work_mem": "64MB", ...}, values as in postgresql.conf. `switch_back`: after a
    rolling restart, the original primary becomes the primary again (one more switchover).
    `while_paused`: roll a restart through although the HA manager is paused (pause_ha), which
    is refused otherwise; a reload-only change needs no such word."""
    logger = get_run_logger()
    timeline = Timeline()
    parameters = dict(parameters or {})
    logger.info("1. Pre-flight (read-only): every name and value against pg_settings on every member.")
    with holding(cluster, "change_settings", dry_run=dry_run):
        check = is_settings_change_valid(cluster, parameters, max_lag_bytes, while_paused)
        publish_plan("change_settings", cluster, check.plan, dry_run=dry_run)
        todo = {c.name: c.value for c in check.changes if c.needs != "nothing"}
        summary = {"changes": [asdict(c) for c in check.changes], "primary": check.primary}
        if dry_run:
            return dry_run_done({**summary, "dry_run": True, "changed": False})
        if check.plan.is_noop:
            return {**summary, "changed": False, "restarted": [], "switchover": None}
        logger.info("3. Act: the values into the HA manager's configuration; every member reloads.")
        timeline(ensure_parameters_configured(cluster, todo))
        timeline(wait_until_settings_reloaded(cluster, todo))
        restarted: list[str] = []
        switched: str | None = None
        original = check.primary
        for action, host in check.order:
            if action == "switchover":
                if not is_primary_behind(cluster, todo):
                    timeline("the primary already runs the new values: no switchover")
                    break
                switched = planned_switchover(cluster, original, host, max_lag_bytes, max_transaction_age_seconds,
                                              while_paused, timeline, runbook="change_settings")
                continue
            restart = ensure_member_restarted(cluster, host, todo)
            timeline(restart.outcome)
            if restart.restarted:
                restarted.append(host)
            wait_until_replicas_streaming(cluster, max_lag_bytes=max_lag_bytes, hosts=[host], timeout=300)
            timeline(f"{host} streams again")
        if switch_back and switched and original:
            planned_switchover(cluster, switched, original, max_lag_bytes, max_transaction_age_seconds, while_paused,
                               timeline, runbook="change_settings")
        logger.info("4. Verify: every member runs the new values, none pending a restart.")
        table = wait_until_settings_in_effect(cluster, todo)
        rows = wait_until_replicas_streaming(cluster, max_lag_bytes=max_lag_bytes)
    create_table_artifact(key=f"change-settings-{cluster}", table=timeline.rows,
                          description=f"change_settings on {cluster}")
    create_table_artifact(key=f"settings-{cluster}", table=table, description=f"Values per member on {cluster}")
    logger.info("Done: %s in effect on every member.", ", ".join(todo))
    return {**summary, "changed": True, "restarted": restarted, "switchover": switched,
            "timeline": timeline.rows, "members": table, "topology": rows}
