"""restore_drill: prove the backups restore — on the restore host, isolated, to a point in time."""

from __future__ import annotations

from datetime import datetime, timezone

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from flows.runbook import holding, publish_plan, tag_run
from tasks.backup import is_backup_present
from tasks.context import context_for
from tasks.planning.backup import (
    BackupPlanError,
    compare_markers,
    drill_plan,
    pick_restore_backup,
)
from tasks.restore import (
    ensure_backup_restored,
    ensure_drill_torn_down,
    ensure_marker_row,
    ensure_restore_host_configured,
    is_restore_host_free,
    is_restored_copy_sound,
    is_source_marked,
    restore_request,
    wait_until_recovered,
)


@flow(name="restore_drill", persist_result=True)
def restore_drill(cluster: str = "lab", target: str = "latest", backup: str | None = None, keep: bool = False,
                  replace_kept: bool = False, dry_run: bool = False) -> dict:
    """1. Pre-flight  2. Plan (which backup, which target; dry_run stops here)  3. Act (fetch, recover)
    4. Verify  5. Tear down."""
    logger = get_run_logger()
    ctx = context_for(cluster, fresh=True)
    now = datetime.now(timezone.utc)

    # ------------------------------------------------------------------ 1. pre-flight
    logger.info("1. Pre-flight (read-only): target %s, backup %s.", target, backup or "chosen by target")
    target_time = restore_request(ctx, target, backup, now)
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
        tag_run(f"backup:{chosen.name}")  # restore_cluster reads its drills' verdicts by backup
        # -------------------------------------------------------------- 3. act
        logger.info("3. Act: fetch and recover in isolation (no archiving, no replication, localhost only).")
        ensure_restore_host_configured(cluster)
        marker = ensure_marker_row(cluster) if target_time is None else None
        source_markers = is_source_marked(cluster).rows
        fetched = ensure_backup_restored(cluster, chosen.name, target_time.isoformat() if target_time else None,
                                         chosen.database_bytes)
        try:
            recovered = wait_until_recovered(cluster)

            # ---------------------------------------------------------- 4. verify
            logger.info("4. Verify: full read-through, amcheck, marker rows against the source.")
            sound = is_restored_copy_sound(cluster)
            last = recovered.last_replayed_commit
            markers = compare_markers(source_markers, sound.restored_markers, target_time, marker)
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
