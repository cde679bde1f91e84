"""backup_server_rollout: the object store on the backup server, a bucket and the cluster's prefix."""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.runbook import holding, publish_plan, snapshot_hosts
from tasks.backup import (
    ensure_bucket_and_prefix,
    ensure_object_store_access,
    ensure_object_store_prepared,
    is_object_store_working,
    wait_until_object_store_answers,
)
from tasks.context import context_for
from tasks.errors import PreflightRefused
from tasks.hosts import desired_layers, ensure_files, ensure_units
from tasks.planning.build import plan_build


@flow(name="backup_server_rollout", persist_result=True)
def backup_server_rollout(cluster: str = "lab", dry_run: bool = False) -> dict:
    """1. Pre-flight  2. Plan  3. Act (service, bucket, prefix)  4. Verify (put/get/delete round trip)."""
    logger = get_run_logger()
    ctx = context_for(cluster, fresh=True)
    inv = ctx.inventory
    store = inv.cluster.object_store

    # ------------------------------------------------------------------ 1. pre-flight
    if store is None:
        raise PreflightRefused(f"cluster.object_store is not set in the inventory of {cluster}")
    if ctx.store_block is None:
        raise PreflightRefused(f"no object-store-credentials block named {cluster!r}")
    logger.info("1. Pre-flight (read-only): %s object store on %s, bucket %s.", store.server, store.host, store.bucket)
    try:
        layer = desired_layers(ctx)[store.host]["objectstore"]
    except ValueError as exc:
        raise PreflightRefused(f"{exc}") from None
    snapshots, unreachable = snapshot_hosts(ctx, [store.host])

    # ------------------------------------------------------------------ 2. plan
    plan = plan_build(cluster, [layer], snapshots, initialized=True, bootstrap_candidates=[], unreachable=unreachable)
    publish_plan("backup_server_rollout", cluster, plan, dry_run=dry_run)
    if dry_run:
        return {"plan": plan.rows(), "changed": False}

    with holding(cluster, "backup_server_rollout"):
        # -------------------------------------------------------------- 3. act
        logger.info("3. Act: service account, data path, TLS, service, the cluster's user and policy (and the "
                    "restore host's read-only one), bucket and prefix.")
        ensure_object_store_prepared(cluster)
        changed = ensure_files(cluster, store.host, "objectstore")
        ensure_units(cluster, store.host, "objectstore", changed)
        wait_until_object_store_answers(cluster)
        # Before the prefix: its marker is written with the cluster's own key.
        access_changed = ensure_object_store_access(cluster)
        created = ensure_bucket_and_prefix(cluster)

        # -------------------------------------------------------------- 4. verify
        seconds = is_object_store_working(cluster).seconds
    changed_anything = not plan.is_noop or bool(created) or access_changed
    logger.info("Done: %s serves bucket %s over TLS; round trip %.2fs; %s.", store.host, store.bucket, seconds,
                "changes were applied" if changed_anything else "nothing was changed")
    return {"plan": plan.rows(), "changed": changed_anything, "round_trip_seconds": seconds}
