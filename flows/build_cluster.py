"""build_cluster: from bare hosts to a running HA PostgreSQL cluster. Safe to run again."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from flows.runbook import holding, publish_plan, snapshot_hosts
from tasks.adapters.ha.base import HaSpecError
from tasks.backup import ensure_backup_hook
from tasks.clients import ensure_client_connection_report
from tasks.context import context_for
from tasks.db_roles import ensure_roles, is_superuser_login_ok
from tasks.desired import ha_driver
from tasks.errors import PreflightRefused
from tasks.etcd import (
    ensure_etcd_leader_off_primary,
    is_etcd_ours,
    wait_until_etcd_healthy,
)
from tasks.ha import (
    ensure_cluster_initialized,
    is_cluster_initialized,
    is_replication_working,
    wait_until_primary_accepts_writes,
    wait_until_primary_port_routes,
    wait_until_replicas_streaming,
)
from tasks.hosts import desired_layers, ensure_files, ensure_packages, ensure_units
from tasks.planning.build import plan_build
from tasks.settings import ensure_ha_settings


@flow(name="build_cluster", persist_result=True)
def build_cluster(cluster: str = "lab", dry_run: bool = False, adopt_existing: bool = False) -> dict:
    """Build (or converge) the cluster: etcd, the HA manager, PostgreSQL, roles.

    1. Pre-flight (read-only)  2. Plan (artifact; dry_run stops here)  3. Act  4. Verify.
    """
    logger = get_run_logger()
    ctx = context_for(cluster, fresh=True)
    inv = ctx.inventory

    # ------------------------------------------------------------------ 1. pre-flight
    logger.info("1. Pre-flight (read-only): %s with %s on %s.", cluster, inv.cluster.ha_manager.value,
                ", ".join(h.name for h in inv.db_hosts))
    try:
        ha_driver(inv).validate(inv)
    except HaSpecError as exc:
        raise PreflightRefused(f"{exc}") from None
    layers = {name: {k: v for k, v in kinds.items() if k in ("etcd", "db")}
              for name, kinds in desired_layers(ctx).items() if {"etcd", "db"} & set(kinds)}
    snapshots, unreachable = snapshot_hosts(ctx, list(layers))
    etcd_ours = is_etcd_ours(cluster)
    running_pg = [n for n, s in snapshots.items() if inv.cluster.postgres.port in s.listeners]
    login_ok = is_superuser_login_ok(cluster, running_pg)
    refusals = [*etcd_ours.refusals, *login_ok.refusals]
    ha_files = ha_driver(inv).config_paths(inv)
    configured = [n for n, s in snapshots.items() if any(s.files.get(p) for p in ha_files)]
    initialized = is_cluster_initialized(cluster, configured)

    # ------------------------------------------------------------------ 2. plan
    plan = plan_build(
        cluster, [layer for kinds in layers.values() for layer in kinds.values()], snapshots,
        initialized=initialized.ok, bootstrap_candidates=[h.name for h in inv.db_hosts],
        adopt_existing=adopt_existing, refusals=refusals, unreachable=unreachable,
    )
    publish_plan("build_cluster", cluster, plan, dry_run=dry_run)
    if dry_run:
        return {"plan": plan.rows(), "changed": False}

    # ------------------------------------------------------------------ 3. act
    # A killed earlier run leaves its lease behind for up to a minute; wait that out. On bare
    # hosts etcd is not there yet: the Prefect lock alone covers installing it (policy "once_up").
    with holding(cluster, "build_cluster") as hold:
        logger.info("3. Act: packages, etcd, HA manager, roles.")
        for name, kinds in layers.items():
            ensure_packages.submit(cluster, name, sorted({p for layer in kinds.values() for p in layer.packages})).result()
        etcd_hosts = [h.name for h in inv.etcd_members]
        etcd_changes = {n: f.result() for n, f in {n: ensure_files.submit(cluster, n, "etcd") for n in etcd_hosts}.items()}
        # A new etcd cluster only forms when its members start together ...
        started = {n: f.result() for n, f in {
            n: ensure_units.submit(cluster, n, "etcd", etcd_changes[n], restart_changed=False, no_block=True)
            for n in etcd_hosts}.items()}
        wait_until_etcd_healthy(cluster)
        hold.take_etcd_lock()  # from here on the etcd lock too (already held when etcd answered at first)
        # ... while a changed member is restarted one at a time, so quorum is never lost.
        for name in etcd_hosts:
            if etcd_changes[name] and not started[name]:
                ensure_units(cluster, name, "etcd", etcd_changes[name], already_started=started[name])
                wait_until_etcd_healthy(cluster)

        db_hosts = [h.name for h in inv.db_hosts]
        db_changes = {n: f.result() for n, f in {n: ensure_files.submit(cluster, n, "db") for n in db_hosts}.items()}
        initialized_on = []
        if plan.bootstrap_on:
            initialized_on = ensure_cluster_initialized(cluster, plan.bootstrap_on)
            wait_until_primary_accepts_writes(cluster)
        for future in [
            ensure_units.submit(cluster, n, "db", db_changes[n],
                                already_started=initialized_on if n == plan.bootstrap_on else None)
            for n in db_hosts
        ]:
            future.result()
        wait_until_primary_accepts_writes(cluster)
        ensure_ha_settings(cluster)
        ensure_roles(cluster)
        ensure_backup_hook(cluster)
        ensure_etcd_leader_off_primary(cluster)

        # ------------------------------------------------------------------ 4. verify
        logger.info("4. Verify: one primary, every standby streaming, a write visible everywhere, "
                    "every database host's port to the primary.")
        rows = wait_until_replicas_streaming(cluster)
        is_replication_working(cluster)
        wait_until_primary_port_routes(cluster)
    create_table_artifact(key=f"topology-{cluster}", table=rows, description=f"Topology of {cluster} after build_cluster")
    ensure_client_connection_report(cluster)
    changed = not plan.is_noop
    logger.info("Done: cluster %s is healthy; %s.", cluster,
                "changes were applied" if changed else "nothing was changed (second run is a no-op)")
    return {"plan": plan.rows(), "changed": changed, "topology": rows}
