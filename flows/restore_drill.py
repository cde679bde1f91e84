"""restore_drill: prove the backups restore — on the restore host, isolated, to a point in time."""

from __future__ import annotations

from datetime import datetime, timezone

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from flows.runbook import holding, publish_plan
from tasks.backup import is_backup_present
from tasks.context import context_for
from tasks.desired import backup_driver
from tasks.errors import DrillFailed, PreflightRefused
from tasks.planning.backup import (
    BackupPlanError,
    drill_plan,
    parse_target,
    pick_restore_backup,
)
from tasks.restore import (
    Marker,
    ensure_backup_restored,
    ensure_drill_torn_down,
    ensure_marker_row,
    ensure_restore_host_configured,
    is_restore_host_free,
    is_restored_copy_sound,
    is_source_marked,
    wait_until_recovered,
)


def _compare_markers(source: list[list[str]], restored: list[list[str]], target: datetime | None,
                     marker: Marker | None) -> str:
    """The restored copy must hold exactly the source's markers up to what it replayed."""
    restored_ids = {r[0] for r in restored}
    if target is None:
        if marker and str(marker.id) not in restored_ids:
            raise DrillFailed(f"marker {marker.id} written before the drill is missing: recovery stopped early")
        missing = [r[0] for r in source if r[0] not in restored_ids and (not marker or int(r[0]) <= int(marker.id))]
    else:
        cutoff = target.isoformat()
        after = [r for r in restored if datetime.fromisoformat(r[1]) > target]
        if after:
            raise DrillFailed(f"markers written after the target {cutoff} are present: {[r[0] for r in after]}")
        missing = [r[0] for r in source if datetime.fromisoformat(r[1]) <= target and r[0] not in restored_ids]
    if missing:
        raise DrillFailed(f"markers {missing} exist on the source before the target but not in the restored copy")
    # A row the source does not have, or has with another time, came from writes the source no
    # longer holds: the backup belongs to another history (a timeline abandoned by a failover).
    written = {r[0]: datetime.fromisoformat(r[1]) for r in source}
    foreign = [r[0] for r in restored if r[0] not in written or datetime.fromisoformat(r[1]) != written[r[0]]]
    if foreign:
        raise DrillFailed(f"markers {foreign} in the restored copy are not the source's (absent there, or written "
                          "at another time): the backup holds a history the source does not")
    return f"{len(restored)} marker row(s) match the source up to the target"


@flow(name="restore_drill", persist_result=True)
def restore_drill(cluster: str = "lab", target: str = "latest", backup: str | None = None, keep: bool = False,
                  replace_kept: bool = False, dry_run: bool = False) -> dict:
    """1. Pre-flight  2. Plan (which backup, which target; dry_run stops here)  3. Act (fetch, recover)
    4. Verify  5. Tear down."""
    logger = get_run_logger()
    ctx = context_for(cluster, fresh=True)
    inv = ctx.inventory
    now = datetime.now(timezone.utc)

    # ------------------------------------------------------------------ 1. pre-flight
    logger.info("1. Pre-flight (read-only): target %s, backup %s.", target, backup or "chosen by target")
    try:
        target_time = parse_target(target, now)
        if backup is not None:
            backup_driver(inv).validate_backup_name(backup)
    except ValueError as exc:
        raise PreflightRefused(f"{exc}") from None
    if inv.cluster.object_store is None or ctx.store_block is None:
        raise PreflightRefused(f"cluster {cluster} has no object store configured")
    # Refused parameters and configuration leave nothing to plan from; what the reads below
    # refuse goes into the plan, which is published before the run is refused.
    host_state = is_restore_host_free(cluster, replace_kept)
    backups = is_backup_present(cluster).backups
    refusals = list(host_state.refusals)
    chosen = None
    try:
        chosen = pick_restore_backup(backups, target_time, backup)
    except BackupPlanError as exc:
        refusals.append(f"{exc}")

    # ------------------------------------------------------------------ 2. plan
    plan = drill_plan(chosen, host_state.host, target_time, keep, refusals)
    publish_plan("restore_drill", cluster, plan, dry_run=dry_run)
    assert chosen is not None  # publish_plan refused the run otherwise
    if dry_run:
        return {"backup": chosen.name, "target": target, "plan": plan.rows()}

    with holding(cluster, "restore_drill"):
        # -------------------------------------------------------------- 3. act
        logger.info("3. Act: fetch and recover in isolation (no archiving, no replication, localhost only).")
        ensure_restore_host_configured(cluster)
        marker = ensure_marker_row(cluster) if target_time is None else None
        source_markers = is_source_marked(cluster).rows
        fetched = ensure_backup_restored(cluster, chosen.name, target_time.isoformat() if target_time else None)
        try:
            recovered = wait_until_recovered(cluster)

            # ---------------------------------------------------------- 4. verify
            logger.info("4. Verify: full read-through, amcheck, marker rows against the source.")
            sound = is_restored_copy_sound(cluster)
            last = recovered.last_replayed_commit
            markers = _compare_markers(source_markers, sound.restored_markers, target_time, marker)
            logger.info("%s.", markers)
        finally:
            if not keep:
                ensure_drill_torn_down(cluster)
    rto = fetched.seconds + recovered.seconds + sound.seconds
    behind = None
    if target_time is not None and last:
        behind = round((target_time - datetime.fromisoformat(last)).total_seconds(), 3)
    row = {
        "backup": chosen.name, "backup_host": chosen.source_host, "target": target,
        "last_replayed_commit": last, "seconds_before_target": behind,
        "fetch_s": round(fetched.seconds, 1), "recover_s": round(recovered.seconds, 1),
        # Until the copy answers queries as a primary: the RTO before verification.
        "ready_s": round(fetched.seconds + recovered.seconds, 2),
        "verify_s": round(sound.seconds, 1), "rto_s": round(rto, 1),
        "restored_mib": round(fetched.bytes / 2**20, 1), "databases": len(sound.databases),
        "btree_indexes_checked": sound.indexes_checked, "kept": keep,
    }
    create_table_artifact(key=f"restore-drill-{cluster}", table=[row], description=f"Restore drill of {cluster}")
    logger.info("Done: backup %s restores; RTO %.1fs (fetch %.1f, recover %.1f, verify %.1f).", chosen.name, rto,
                row["fetch_s"], row["recover_s"], row["verify_s"])
    return row
