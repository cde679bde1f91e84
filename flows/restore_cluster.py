"""restore_cluster: the cluster itself put back to a point in time from its backups, standbys,
routing and backups brought along (issue 17). The drill proves a backup restores; this runbook
uses one, behind a confirmation typed back. clone_cluster: another cluster (acceptance) made from
this one's backups, which it only reads."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field

from flows.runbook import dry_run_done, holding, publish_plan
from tasks.adapters.backup.base import BackupInfo
from tasks.backup import (
    ensure_backup_repository,
    ensure_base_backup,
    ensure_repository_retired,
    is_archive_intact,
    is_archiving_own,
    is_backup_present,
    is_backup_source_found,
)
from tasks.context import context_for
from tasks.db_roles import ensure_roles
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
    clone_refusals,
    compare_markers,
    confirmation_refusal,
    drill_verdict,
    pick_restore_backup,
    plan_clone,
    plan_cluster_restore,
    post_clone_sql_refusal,
    room_to_keep_aside,
)
from tasks.restore import (
    Marker,
    aside_path,
    ensure_archive_current,
    ensure_clone_restored,
    ensure_data_kept_aside,
    ensure_ha_restored_cluster,
    ensure_ha_state_forgotten,
    ensure_kept_copy_removed,
    ensure_members_started,
    ensure_members_stopped,
    ensure_primary_restored,
    ensure_standbys_cloned_afresh,
    is_clone_target_ready,
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


class CloneConfirmation(RunInput):
    """Typed back by the DBA in the Prefect UI: the clone replaces this cluster's data."""

    confirm_cluster: str = Field(default="", pattern=_TYPED, description="the name of the cluster cloned into, exactly")


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


def _one_new_backup(cluster: str, runbook: str) -> BackupInfo:
    """A full backup taken now, and it alone new in the repository, good."""
    before = {b.name for b in is_backup_present(cluster).backups}
    source = is_backup_source_found(cluster)
    ensure_base_backup(cluster, source.source, source.primary)
    new = [b for b in is_backup_present(cluster).backups if b.name not in before]
    if len(new) != 1 or new[0].error:
        raise BackupFailed(f"{runbook}: expected one new good backup in {cluster}'s repository, found {new}")
    return new[0]


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
            restored = ensure_primary_restored(cluster, primary, chosen.name, target_iso, timeout=timeout_seconds,
                                               size_bytes=chosen.database_bytes)
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
        new = _one_new_backup(cluster, "restore_cluster")
        if keep_aside:
            ensure_kept_copy_removed(cluster, primary, aside)
    row = {"backup": chosen.name, "target": target, "primary": new_primary, "kept_aside": keep_aside,
           "writable_s": round(writable_s, 1), "all_streaming_s": round(streaming_s, 1),
           "new_backup": new.name, "drill_warning": warning or ""}
    create_table_artifact(key=f"restore-cluster-{cluster}", table=[row], description=f"restore_cluster of {cluster}")
    create_table_artifact(key=f"topology-{cluster}", table=rows, description=f"Topology after restore_cluster of {cluster}")
    logger.info("Done: %s restored to %s from %s; %s is the primary, writable after %.1fs; every standby streams; "
                "new base backup %s.", cluster, target, chosen.name, new_primary, writable_s, new.name)
    return {**row, "topology": rows, "changed": True}


def _clone_confirmed(cluster: str, confirm_cluster: str, timeout_seconds: int, logger) -> None:
    """Confirmation as a parameter (a ticket), else typed back in the UI while the run waits."""
    if not confirm_cluster:
        logger.warning("2. Plan: clone_cluster replaces %s's data. Pausing until its name is typed back in the "
                       "Prefect UI.", cluster)
        try:
            typed = pause_flow_run(wait_for_input=CloneConfirmation, timeout=timeout_seconds)
        except Exception as exc:  # FlowPauseTimeout, or a run that cannot pause (outside a deployment)
            raise PreflightRefused(f"confirm_cluster: not typed back ({type(exc).__name__})") from None
        confirm_cluster = typed.confirm_cluster
    if confirm_cluster != cluster:
        raise PreflightRefused(f"confirm_cluster: {confirm_cluster!r} is not {cluster!r}; "
                               "nothing was changed")


@flow(name="clone_cluster", persist_result=True)
def clone_cluster(cluster: str = "", source: str = "", target: str = "latest", backup: str | None = None,
                  post_clone_sql: list[str] | None = None, confirm_cluster: str = "",
                  confirm_timeout_seconds: int = 3600, timeout_seconds: int = 1800, dry_run: bool = False) -> dict:
    """1. Pre-flight (read-only: the inventories keep the clusters apart, the source's backup
    covers the target, the target's members answer)  2. Plan (what the target loses; dry_run
    stops here), then the target cluster's name typed back  3. Act (build the target if it is
    not, restore the source's backup onto its first member, its own logins and the post-clone SQL
    before it opens, standbys cloned, its own repository and a full backup there)  4. Verify
    (marker rows, streaming, the target's port routing)."""
    logger = get_run_logger()
    now = datetime.now(timezone.utc)

    # ------------------------------------------------------------------ 1. pre-flight
    logger.info("1. Pre-flight (read-only): clone %s at %s into %s.", source, target or "?", cluster or "?")
    if not cluster.strip():
        raise PreflightRefused("cluster: name the registered cluster to clone into")
    if not source.strip():  # no default: which cluster's data leaves for another is for a DBA to say
        raise PreflightRefused("source: name the cluster whose backups are cloned")
    statements = list(post_clone_sql or [])
    refusal = post_clone_sql_refusal(statements)
    if refusal:
        raise PreflightRefused(refusal)
    source_ctx, target_ctx = context_for(source, fresh=True), context_for(cluster, fresh=True)
    if not target.strip():
        raise PreflightRefused("target: give the moment to clone (ISO-8601 with a zone) or 'latest'")
    target_time = restore_request(source_ctx, target, backup, now)
    refusals = clone_refusals(source_ctx.inventory, target_ctx.inventory)
    if target_ctx.store_block is None:
        refusals.append(f"cluster: no object-store credentials block {cluster!r} for its own repository")
    site = is_clone_target_ready(cluster)
    refusals += site.refusals
    chosen, warning = None, None
    try:
        chosen = pick_restore_backup(is_backup_present(source).backups, target_time, backup)
    except BackupPlanError as exc:
        refusals.append(f"{exc}")
    if chosen is not None:
        refusal, warning = drill_verdict(drill_records(source), chosen.name, now)
        if refusal:
            refusals.append(refusal)
    markers = is_source_marked(source, create=False).rows

    # ------------------------------------------------------------------ 2. plan
    plan = plan_clone(source, cluster, site.members, site.primary, chosen, target_time,  # type: ignore[arg-type]
                      holds_data=site.holds_data, built=site.built, post_sql=len(statements), refusals=refusals)
    if warning and not plan.refusals:
        plan = replace(plan, notes=(*plan.notes, f"Warning: {warning}."))
    publish_plan("clone_cluster", cluster, plan, dry_run=dry_run)
    assert chosen is not None  # publish_plan refused the run otherwise
    for note in plan.notes:
        logger.warning("2. Plan: %s", note)
    if dry_run:
        return dry_run_done({"source": source, "backup": chosen.name, "target": target, "plan": plan.rows(),
                             "changed": False})
    _clone_confirmed(cluster, confirm_cluster, confirm_timeout_seconds, logger)

    # ------------------------------------------------------------------ 3. act
    started = datetime.now(timezone.utc)
    if not site.built:
        from flows.build_cluster import build_cluster

        logger.info("3. Act: %s is not built yet: build_cluster first.", cluster)
        build_cluster(cluster=cluster)
        site = is_clone_target_ready(cluster)
    with holding(cluster, "clone_cluster"):
        target_iso = target_time.isoformat() if target_time else None
        primary = site.primary
        standbys = [m for m in site.members if m != primary]
        logger.info("3. Act: %s's %s onto %s of %s, to %s; its standbys cloned from it.", source, chosen.name,
                    primary, cluster, target_iso or "the end of the archive")
        ensure_archive_current(source)
        ensure_members_stopped(cluster, primary)
        ensure_ha_state_forgotten(cluster)
        ensure_repository_retired(cluster, primary)
        ensure_clone_restored(cluster, source, primary, chosen.name, target_iso, statements,
                              timeout=timeout_seconds, size_bytes=chosen.database_bytes)
        ensure_members_started(cluster, [primary])
        new_primary = wait_until_primary_is(cluster, primary, timeout=timeout_seconds)
        writable_s = (datetime.now(timezone.utc) - started).total_seconds()
        ensure_standbys_cloned_afresh(cluster, standbys)
        rows = wait_until_replicas_streaming(cluster, timeout=timeout_seconds)
        for host in standbys:
            streaming_row(rows, host)
        ensure_roles(cluster)
        ensure_backup_repository(cluster)
        new = _one_new_backup(cluster, "clone_cluster")

        # -------------------------------------------------------------- 4. verify
        logger.info("4. Verify: %s's marker rows up to the target, every standby streaming, the port routing.", source)
        if markers:
            # The source runs on and may gain rows (its own drill, say) that the archive's end
            # brings into the clone: compared with the source as it is now, and every row it had
            # before this run must be there.
            before = Marker(int(markers[-1][0]), markers[-1][1])
            try:
                logger.info("%s.", compare_markers(is_source_marked(source, create=False).rows,
                                                   is_source_marked(cluster, create=False).rows, target_time,
                                                   before if target_time is None else None))
            except DrillFailed as exc:
                raise VerifyFailed(f"the clone's marker rows: {exc}") from None
        ports = wait_until_primary_port_routes(cluster)
        if ports.primary != new_primary:
            raise VerifyFailed(f"port {ports.port} of {cluster}'s hosts leads to {ports.primary}, not {new_primary}")
        is_archiving_own(cluster)
    row = {"source": source, "backup": chosen.name, "target": target, "cluster": cluster,
           "primary": new_primary, "post_clone_sql": len(statements), "writable_s": round(writable_s, 1),
           "new_backup": new.name, "drill_warning": warning or ""}
    create_table_artifact(key=f"clone-cluster-{cluster}", table=[row],
                          description=f"clone_cluster of {source} into {cluster}")
    create_table_artifact(key=f"topology-{cluster}", table=rows,
                          description=f"Topology of {cluster} after clone_cluster")
    logger.info("Done: %s is a clone of %s at %s (backup %s); %s is its primary; every standby streams; its own "
                "backup %s.", cluster, source, target, chosen.name, new_primary, new.name)
    return {**row, "topology": rows, "changed": True}
