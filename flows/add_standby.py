"""add_standby: grow the cluster by one streaming standby. Safe to run again."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from blocks.inventory import Role, UnknownHostError
from blocks.register import save_inventory
from flows.runbook import holding, publish_plan, snapshot_hosts
from tasks.clients import ensure_client_connection_report
from tasks.context import context_for
from tasks.desired import ha_driver
from tasks.errors import PreflightRefused
from tasks.ha import (
    is_cluster_initialized,
    streaming_row,
    wait_until_primary_port_routes,
    wait_until_replicas_streaming,
)
from tasks.hosts import desired_layers, ensure_packages
from tasks.members import cluster_follows_membership
from tasks.planning.build import plan_build


def _versions_differ(new, reference, packages: list[str]) -> list[str]:
    return [
        f"{p}: {new.packages.get(p) or 'not installed'} on {new.host} vs {reference.packages.get(p)} on {reference.host}"
        for p in packages
        if new.packages.get(p) and new.packages.get(p) != reference.packages.get(p)
    ]


@flow(name="add_standby", persist_result=True)
def add_standby(cluster: str = "lab", host: str = "pg4", max_lag_bytes: int = 16 * 1024 * 1024,
                timeout_seconds: int = 600, dry_run: bool = False) -> dict:
    """1. Pre-flight  2. Plan  3. Act  4. Verify: the new host streams with lag under the threshold."""
    logger = get_run_logger()
    ctx = context_for(cluster, fresh=True)
    inv = ctx.inventory

    # ------------------------------------------------------------------ 1. pre-flight
    logger.info("1. Pre-flight (read-only): add %s to cluster %s.", host, cluster)
    try:
        spec = inv.host(host)
    except UnknownHostError as exc:
        raise PreflightRefused(f"{exc}") from None
    if spec.has(Role.router) or spec.has(Role.backup) or spec.has(Role.restore):
        raise PreflightRefused(f"{host} has role(s) "
                               f"{', '.join(r.value for r in spec.roles)}; a standby needs a host of its own")
    target_inv = inv.with_db_host(host)
    target = target_inv.model_dump(mode="json")
    # Refused parameters leave nothing to plan from; what the reads below refuse goes into the plan.
    initialized = is_cluster_initialized(cluster, [h.name for h in inv.db_hosts if h.name != host])
    view = initialized.view
    refusals = []
    if not initialized.ok or view.leader is None:
        refusals.append(f"cluster {cluster} has no primary ({view.leader=})")
    elif view.leader == host:
        refusals.append(f"{host} is the cluster's primary")
    names = [h.name for h in target_inv.db_hosts]
    snapshots, unreachable = snapshot_hosts(ctx, names, inventory=target)
    if not refusals and host in snapshots and view.leader in snapshots:
        refusals += _versions_differ(snapshots[host], snapshots[view.leader], ha_driver(inv).packages(inv))

    # ------------------------------------------------------------------ 2. plan
    layers = desired_layers(context_for(cluster, inventory=target))
    wanted = [layers[n]["db"] for n in names]  # database layers only: etcd stays as it is
    plan = plan_build(cluster, wanted, snapshots, initialized=True, bootstrap_candidates=[], refusals=refusals,
                      unreachable=unreachable)
    publish_plan("add_standby", cluster, plan, dry_run=dry_run)
    if dry_run:
        return {"plan": plan.rows(), "changed": False}

    # ------------------------------------------------------------------ 3. act
    with holding(cluster, "add_standby"):
        if not spec.has(Role.db):
            # The inventory is the desired state: from here on every flow treats the host as a member.
            save_inventory(target_inv)
            context_for(cluster, fresh=True)
            logger.info("3. Act: inventory block of %s now lists %s as a database host.", cluster, host)
        ensure_packages(cluster, host, list(wanted[names.index(host)].packages))
        # Existing members first: their pg_hba must admit the newcomer before it asks to replicate;
        # then the routers' read-only servers and the backup-peer trust name it too.
        cluster_follows_membership(cluster, joining=host)

        # ------------------------------------------------------------------ 4. verify
        logger.info("4. Verify: %s streams with lag under %d bytes; its port to the primary leads there.",
                    host, max_lag_bytes)
        rows = wait_until_replicas_streaming(cluster, max_lag_bytes=max_lag_bytes, timeout=timeout_seconds)
        wait_until_primary_port_routes(cluster)
    new_row = streaming_row(rows, host)
    create_table_artifact(key=f"topology-{cluster}", table=rows, description=f"Topology after add_standby {host}")
    ensure_client_connection_report(cluster)
    changed = not plan.is_noop or not spec.has(Role.db)
    logger.info("Done: %s streams from %s (lag %s bytes); %s.", host, rows[0]["host"], new_row["lag_bytes"],
                "changes were applied" if changed else "nothing was changed (second run is a no-op)")
    return {"plan": plan.rows(), "changed": changed, "topology": rows}
