"""scheduled_basebackup: the nightly backup, from a standby, full on the full nights and incremental
on the others, with retention of whole chains and a freshness alarm."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from flows.runbook import holding, publish_plan
from tasks.adapters.backup.base import BACKUP_KINDS
from tasks.backup import (
    ensure_backup_repository,
    ensure_base_backup,
    ensure_retention,
    is_archive_intact,
    is_backup_present,
    is_backup_source_found,
)
from tasks.context import context_for
from tasks.errors import BackupFailed, BackupTooOld, PreflightRefused
from tasks.planning.backup import (
    BackupPlanError,
    decide_backup,
    freshness_problem,
    full_weekdays,
    newest_good,
)


@flow(name="scheduled_basebackup", persist_result=True)
def scheduled_basebackup(cluster: str = "lab", force: bool = False, skip_window_hours: float = 23,
                         freshness_limit_hours: float = 26, keep_full: int | None = None,
                         full_on: list[str] | None = None, kind: str = "auto", then_drill: bool = False,
                         dry_run: bool = False) -> dict:
    """1. Pre-flight (source, existing backups)  2. Plan (skip or run; dry_run stops here)
    3. Act (backup, retention)  4. Verify (listed, WAL archived)  — and always: fail loudly when the
    newest good backup is stale."""
    logger = get_run_logger()
    ctx = context_for(cluster, fresh=True)
    inv = ctx.inventory
    if inv.cluster.object_store is None:
        raise PreflightRefused(f"cluster {cluster} has no object store in its inventory")
    if keep_full is not None and keep_full < 1:
        raise PreflightRefused(f"keep_full must be at least 1, got {keep_full}")
    keep = keep_full if keep_full is not None else inv.cluster.backup_retention_full
    try:
        # The full nights (UTC); the others back up incrementally. Default: full on Sunday.
        full_nights = full_weekdays(["sunday"] if full_on is None else full_on)
    except BackupPlanError as exc:
        raise PreflightRefused(f"{exc}") from None
    if kind not in ("auto", *BACKUP_KINDS):
        raise PreflightRefused(f"kind: {kind!r} is not one of auto, {', '.join(BACKUP_KINDS)}")
    report: dict = {"cluster": cluster, "ran": False}
    error: BaseException | None = None
    with holding(cluster, "scheduled_basebackup", dry_run=dry_run):
        try:
            logger.info("1. Pre-flight (read-only): backups in the repository and a source host.")
            if not dry_run:
                ensure_backup_repository(cluster)  # stanza-create: idempotent, and needed to list
            before = is_backup_present(cluster).backups
            source = is_backup_source_found(cluster)
            decision = decide_backup(before, datetime.now(timezone.utc), skip_window=timedelta(hours=skip_window_hours),
                                     force=force, source=source.source, full_on=full_nights, asked=kind)
            publish_plan("scheduled_basebackup", cluster, decision.plan(keep), dry_run=dry_run)
            report["decision"] = decision.reason
            if decision.run and not dry_run:
                logger.info("3. Act: %s base backup on %s (%s), then retention (keep %d full with their chains).",
                            decision.kind, decision.source, decision.kind_reason, keep)
                seconds = ensure_base_backup(cluster, source.source, source.primary, decision.kind)
                after = is_backup_present(cluster).backups
                new = [b for b in after if b.name not in {x.name for x in before}]
                if len(new) != 1 or new[0].error:
                    raise BackupFailed(f"expected one new good backup in the list, found {[(b.name, b.error) for b in new]}")
                backup = new[0]
                logger.info("4. Verify: %s is listed; WAL from %s on is archived.", backup.name, backup.start_wal)
                archive = is_archive_intact(cluster)
                if not archive.ok:
                    raise BackupFailed(f"backup {backup.name} was taken but the WAL archive is not intact: {archive.detail}")
                ensure_retention(cluster, keep)
                row = {
                    "name": backup.name, "kind": backup.kind, "based_on": decision.kind_reason,
                    "host": backup.source_host or decision.source,
                    "size_mib": round((backup.database_bytes or 0) / 2**20, 1),
                    "stored_mib": round((backup.stored_bytes or 0) / 2**20, 1),
                    "duration_s": round(seconds, 1),
                    "throughput_mib_s": round((backup.database_bytes or 0) / 2**20 / seconds, 1) if seconds else None,
                    "wal_range": f"{backup.start_wal} – {backup.stop_wal}",
                }
                create_table_artifact(key=f"basebackup-{cluster}", table=[row], description=f"Nightly base backup of {cluster}")
                report.update(ran=True, backup=row)
        except BaseException as exc:  # the freshness check below must run whatever happened
            error = exc
    final = None
    try:
        final = is_backup_present(cluster).backups
    except Exception as exc:
        logger.error("Cannot list backups to check their freshness: %s", ctx.masker(str(exc)).splitlines()[0])
    problem = (freshness_problem(final, datetime.now(timezone.utc), timedelta(hours=freshness_limit_hours))
               if final is not None else "the backup list cannot be read")
    if problem:
        logger.error("BACKUP FRESHNESS ALARM for %s: %s.", cluster, problem)
    if error is not None:
        raise error
    if problem:
        raise BackupTooOld(f"cluster {cluster}: {problem}")
    newest = newest_good(final)
    report["newest_good"] = newest.name if newest else None
    report["kept"] = [b.name for b in final]
    if then_drill and report["ran"]:
        report["drill"] = _drill_started(cluster, logger)
    logger.info("Done: newest good backup %s; %d in the repository.", report["newest_good"], len(final))
    return report



def _drill_started(cluster: str, logger) -> str:
    """A new timeline's first base backup (after a failover or restore_cluster, started by their
    automation) is drilled at once rather than at the next weekly drill. Started, not awaited: the
    drill takes the cluster lock this run has just released, and reports on its own."""
    from prefect.deployments import run_deployment

    try:
        run = run_deployment(name=f"restore_drill/{cluster}", parameters={"cluster": cluster}, timeout=0,
                             as_subflow=False)
    except Exception as exc:  # no deployment (a run outside `bouwsteen deploy`): the backup still stands
        logger.warning("then_drill: restore_drill/%s could not be started (%s); run it by hand.", cluster,
                       str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return f"not started: {type(exc).__name__}"
    logger.info("then_drill: restore_drill/%s started as flow run %s.", cluster, run.name)
    return f"started: {run.id}"
