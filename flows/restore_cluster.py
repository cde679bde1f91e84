"""restore_cluster: the cluster itself put back to a point in time from its backups, standbys,
routing and backups brought along (issue 17). The drill proves a backup restores; this runbook
uses one, behind a confirmation typed back."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field

from flows.runbook import dry_run_done, holding, publish_plan
from tasks.backup import (
    ensure_base_backup,
    is_archive_intact,
    is_backup_present,
    is_backup_source_found,
)
from tasks.context import context_for
from tasks.desired import ha_driver
from tasks.errors import BackupFailed, DrillFailed, PreflightRefused, VerifyFailed
from tasks.ha import (
    streaming_row,
    wait_until_primary_port_routes,
    wait_until_replicas_streaming,
)
from tasks.planning.backup import (
    BackupPlanError,
    DrillRecord,
    compare_markers,
    confirmation_refusal,
    drill_verdict,
    pick_restore_backup,
    plan_cluster_restore,
    room_to_keep_aside,
)
from tasks.restore import (
    aside_path,
    ensure_archive_current,
    ensure_data_kept_aside,
    ensure_ha_restored_cluster,
    ensure_ha_state_forgotten,
    ensure_kept_copy_removed,
    ensure_members_started,
    ensure_members_stopped,
    ensure_primary_restored,
    ensure_standbys_cloned_afresh,
    is_cluster_restorable,
    is_source_marked,
    restore_request,
)
from tasks.roles import wait_until_primary_is
from tasks.routing import is_routing_correct, vip_holders

# One line each, no control characters: what a DBA types back.
_TYPED = r"^[^\x00-\x1f\x7f]{0,200}$"


class RestoreConfirmation(RunInput):
    """Typed back by the DBA in the Prefect UI: the run goes ahead only when both match exactly."""

    confirm_cluster: str = Field(default="", pattern=_TYPED, description="the cluster's name, exactly")
    confirm_target: str = Field(default="", pattern=_TYPED, description="the target, exactly as the run was given it")


def drill_records(cluster: str, limit: int = 200) -> list[DrillRecord]:
    """Finished restore_drill runs of `cluster`, as the Prefect server recorded them; each names
    the backup it restored in a `backup:<name>` tag (restore_drill sets it once it has chosen)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["restore_drill"])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType.COMPLETED, StateType.FAILED, StateType.CRASHED]))),
            sort=FlowRunSort.END_TIME_DESC, limit=limit)
    return drill_records_of(runs, cluster)


def drill_records_of(runs, cluster: str) -> list[DrillRecord]:
    """The drills of `cluster` among finished flow runs (a dry run restored nothing, so it is no
    evidence either way)."""
    records = []
    for run in runs:
        parameters = run.parameters or {}
        if parameters.get("cluster", "lab") != cluster or parameters.get("dry_run") or run.end_time is None:
            continue
        backup = next((tag.split(":", 1)[1] for tag in run.tags if tag.startswith("backup:")), None)
        records.append(DrillRecord(backup=backup, finished=run.end_time,
                                   passed=run.state is not None and run.state.is_completed()))
    return records


def _confirmed(cluster: str, target: str, confirm_cluster: str, confirm_target: str,
               timeout_seconds: int, logger) -> None:
    """Confirmation as parameters (a ticket), else typed back in the UI while the run waits."""
    if not confirm_cluster and not confirm_target:
        logger.warning("2. Plan: restore_cluster replaces every member's data. Pausing until the cluster name "
                       "and the target are typed back in the Prefect UI.")
        try:
            typed = pause_flow_run(wait_for_input=RestoreConfirmation, timeout=timeout_seconds)
        except Exception as exc:  # FlowPauseTimeout, or a run that cannot pause (outside a deployment)
            raise PreflightRefused(f"confirm_cluster and confirm_target: not typed back ({type(exc).__name__})") from None
        confirm_cluster, confirm_target = typed.confirm_cluster, typed.confirm_target
    refusal = confirmation_refusal(cluster, target, confirm_cluster, confirm_target)
    if refusal:
        raise PreflightRefused(refusal)


@flow(name="restore_cluster", persist_result=True)
def restore_cluster(cluster: str = "lab", target: str = "", backup: str | None = None, confirm_cluster: str = "",
                    confirm_target: str = "", confirm_timeout_seconds: int = 3600, timeout_seconds: int = 1800,
                    dry_run: bool = False) -> dict:
    """1. Pre-flight (read-only: backup and archive cover the target, the drill's evidence, every
    member answers)  2. Plan (what is lost; dry_run stops here), then the confirmation typed back
    3. Act (stop, keep aside, restore, the HA manager afresh, standbys cloned again, a full backup)
    4. Verify (marker rows, streaming, routing)."""
    logger = get_run_logger()
    ctx = context_for(cluster, fresh=True)
    inv = ctx.inventory
    ha = ha_driver(inv)
    now = datetime.now(timezone.utc)

    # ------------------------------------------------------------------ 1. pre-flight
    logger.info("1. Pre-flight (read-only): restore %s to %s from %s.", cluster, target or "?", backup or "the backup the target needs")
    if not target.strip():  # no default: the moment to go back to is the one thing a DBA must say
        raise PreflightRefused("target: give the moment to restore to (ISO-8601 with a zone) or 'latest'")
    target_time = restore_request(ctx, target, backup, now)
    site = is_cluster_restorable(cluster)
    refusals = list(site.refusals)
    chosen = None
    try:
        chosen = pick_restore_backup(is_backup_present(cluster).backups, target_time, backup)
    except BackupPlanError as exc:
        refusals.append(f"{exc}")
    warning = None
    if chosen is not None:
        refusal, warning = drill_verdict(drill_records(cluster), chosen.name, now)
        if refusal:
            refusals.append(refusal)
    archive = is_archive_intact(cluster) if site.primary_running else None
    if archive is not None and not archive.ok:
        refusals.append(f"archive: {archive.detail}")
    markers = is_source_marked(cluster, create=False).rows if site.primary_running else []

    # ------------------------------------------------------------------ 2. plan
    keep_aside = chosen is not None and room_to_keep_aside(site.free_bytes, chosen.database_bytes or site.data_bytes)
    plan = plan_cluster_restore(cluster, site.members, site.primary, chosen, target_time, now,  # type: ignore[arg-type]
                                keep_aside=keep_aside, refusals=refusals)  # no backup chosen comes with a refusal
    if warning and not plan.refusals:
        plan = replace(plan, notes=(*plan.notes, f"Warning: {warning}."))
    publish_plan("restore_cluster", cluster, plan, dry_run=dry_run)
    assert chosen is not None  # publish_plan refused the run otherwise
    for note in plan.notes:  # what is lost, first: the DBA reads it here before typing it back
        logger.warning("2. Plan: %s", note)
    if dry_run:
        return dry_run_done({"backup": chosen.name, "target": target, "plan": plan.rows(), "changed": False})

    with holding(cluster, "restore_cluster"):
        _confirmed(cluster, target, confirm_cluster, confirm_target, confirm_timeout_seconds, logger)
        target_iso = target_time.isoformat() if target_time else None
        stamp = now.strftime("%Y%m%dT%H%M%SZ")
        aside = aside_path(ha.pgdata(inv), stamp)
        primary = site.primary
        standbys = [m for m in site.members if m != primary]

        # -------------------------------------------------------------- 3. act
        logger.info("3. Act: restore %s onto %s to %s; the standbys cloned again from it.", chosen.name, primary,
                    target_iso or "the end of the archive")
        started = datetime.now(timezone.utc)
        ensure_archive_current(cluster)
        ensure_members_stopped(cluster, primary)
        if keep_aside:
            ensure_data_kept_aside(cluster, primary, aside)
        if ha.restores_itself:
            ensure_ha_restored_cluster(cluster, primary, chosen.name, target_iso)
            ensure_members_started(cluster, [primary, *standbys])
            new_primary = wait_until_primary_is(cluster, None, timeout=timeout_seconds)
        else:
            ensure_ha_state_forgotten(cluster)
            restored = ensure_primary_restored(cluster, primary, chosen.name, target_iso, timeout=timeout_seconds)
            ensure_members_started(cluster, [primary])
            new_primary = wait_until_primary_is(cluster, primary, timeout=timeout_seconds)
            logger.info("%s accepts writes after %.1fs (restore and recovery %.1fs).", new_primary,
                        (datetime.now(timezone.utc) - started).total_seconds(), restored.seconds)
            ensure_standbys_cloned_afresh(cluster, standbys)
        writable_s = (datetime.now(timezone.utc) - started).total_seconds()
        rows = wait_until_replicas_streaming(cluster, timeout=timeout_seconds)
        for host in standbys:
            streaming_row(rows, host)
        streaming_s = (datetime.now(timezone.utc) - started).total_seconds()

        # -------------------------------------------------------------- 4. verify
        logger.info("4. Verify: marker rows up to the target, every standby streaming, routing; then a full backup.")
        if markers:
            try:
                logger.info("%s.", compare_markers(markers, is_source_marked(cluster, create=False).rows, target_time, None))
            except DrillFailed as exc:
                raise VerifyFailed(f"the restored cluster's marker rows: {exc}") from None
        ports = wait_until_primary_port_routes(cluster)
        if ports.primary != new_primary:
            raise VerifyFailed(f"port {ports.port} of the database hosts leads to {ports.primary}, not {new_primary}")
        if inv.cluster.routing is not None and vip_holders(ctx):
            routes = is_routing_correct(cluster)
            if routes.rw != new_primary:
                raise VerifyFailed(f"rw through the VIP reaches {routes.rw}, not {new_primary}")
        # The new timeline has no base backup yet: until it has, a second restore could only
        # start from the old history.
        before = {b.name for b in is_backup_present(cluster).backups}
        source = is_backup_source_found(cluster)
        ensure_base_backup(cluster, source.source, source.primary)
        new = [b for b in is_backup_present(cluster).backups if b.name not in before]
        if len(new) != 1 or new[0].error:
            raise BackupFailed(f"restore_cluster: expected one new good backup of the new timeline, found {new}")
        if keep_aside:
            ensure_kept_copy_removed(cluster, primary, aside)
    row = {"backup": chosen.name, "target": target, "primary": new_primary, "kept_aside": keep_aside,
           "writable_s": round(writable_s, 1), "all_streaming_s": round(streaming_s, 1),
           "new_backup": new[0].name, "drill_warning": warning or ""}
    create_table_artifact(key=f"restore-cluster-{cluster}", table=[row], description=f"restore_cluster of {cluster}")
    create_table_artifact(key=f"topology-{cluster}", table=rows, description=f"Topology after restore_cluster of {cluster}")
    logger.info("Done: %s restored to %s from %s; %s is the primary, writable after %.1fs; every standby streams; "
                "new base backup %s.", cluster, target, chosen.name, new_primary, writable_s, new[0].name)
    return {**row, "topology": rows, "changed": True}
