"""remove_member, replace_member and reinit_standby: a member leaves for good, a dead one is
replaced, a standby that cannot stream is cloned again; through the HA manager and etcd's own
membership, each safe to run again (issue 16)."""

from __future__ import annotations

from dataclasses import replace

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from blocks.inventory import Role
from blocks.register import save_inventory
from flows.runbook import holding, publish_plan
from tasks.clients import ensure_client_connection_report
from tasks.context import context_for
from tasks.desired import ha_driver
from tasks.errors import BouwsteenError, PreflightRefused, VerifyFailed
from tasks.etcd import wait_until_etcd_healthy
from tasks.ha import (
    streaming_row,
    wait_until_primary_port_routes,
    wait_until_replicas_streaming,
)
from tasks.hosts import (
    desired_layers,
    ensure_packages,
    is_host_answering,
    is_host_reachable,
)
from tasks.members import (
    cluster_follows_membership,
    ensure_etcd_member_added,
    ensure_etcd_member_joined,
    ensure_etcd_member_removed,
    ensure_etcd_stopped,
    ensure_member_forgotten,
    ensure_member_stopped,
    ensure_standby_reinitialized,
    etcd_files_follow,
    member_snapshot,
)
from tasks.planning.members import plan_reinit, plan_removal, plan_replacement


def _confirmed(host: str, confirm: str, what: str) -> None:
    """Wiping data is never a default: the DBA (or the ticket) types the host's name."""
    if confirm != host:
        raise PreflightRefused(f"confirm: {what}; set confirm to {host!r} to go ahead "
                               f"(given: {confirm!r})")


@flow(name="remove_member", persist_result=True)
def remove_member(cluster: str = "lab", host: str = "pg4", wipe: bool = False, confirm: str = "",
                  timeout_seconds: int = 600, dry_run: bool = False) -> dict:
    """1. Pre-flight  2. Plan  3. Act  4. Verify: `host` is no member any more; the rest streams."""
    logger = get_run_logger()
    ctx = context_for(cluster, fresh=True)
    inv = ctx.inventory

    # ------------------------------------------------------------------ 1. pre-flight
    logger.info("1. Pre-flight (read-only): remove %s from cluster %s.", host, cluster)
    snap = member_snapshot(cluster)
    plan = plan_removal(inv, host, snap)
    if not plan.refusals and not plan.is_noop:
        try:
            is_host_reachable(cluster, host)
        except BouwsteenError as exc:
            plan = replace(plan, actions=(), refusals=(f"host: {host} is unreachable ({str(exc).splitlines()[0]}): "
                                        "for a host that is gone use replace_member",))
    if wipe and not plan.refusals and not plan.is_noop:
        paths = ", ".join(ha_driver(inv).member_data_paths(inv))
        plan = replace(plan, notes=(*plan.notes, f"wipe=True: {paths} on {host} is deleted."))

    # ------------------------------------------------------------------ 2. plan
    publish_plan("remove_member", cluster, plan, dry_run=dry_run)
    if dry_run or plan.is_noop:
        return {"plan": plan.rows(), "changed": False}
    if wipe:
        _confirmed(host, confirm, f"wipe=True deletes {host}'s data directory")

    # ------------------------------------------------------------------ 3. act
    was_etcd = host in snap.etcd_members
    with holding(cluster, "remove_member"):
        spec = inv.host(host)
        if spec.has(Role.db) or host in {h.name for h in inv.etcd_members}:
            # The inventory is the desired state: from here on no flow treats the host as a member,
            # and a rerun after a failure still finds it through the HA manager or etcd.
            save_inventory(inv.without_member(host))
            inv = context_for(cluster, fresh=True).inventory
            logger.info("3. Act: inventory block of %s no longer lists %s as a member.", cluster, host)
        ensure_member_stopped(cluster, host, wipe=wipe)
        if was_etcd:
            ensure_etcd_member_removed(cluster, host)
            ensure_etcd_stopped(cluster, host)
            etcd_files_follow(cluster)
        ensure_member_forgotten(cluster, host)
        cluster_follows_membership(cluster)

        # ------------------------------------------------------------------ 4. verify
        logger.info("4. Verify: %s is gone; every remaining standby streams; etcd healthy; the primary port routes.",
                    host)
        rows = wait_until_replicas_streaming(cluster, timeout=timeout_seconds)
        wait_until_etcd_healthy(cluster)
        wait_until_primary_port_routes(cluster)
    if any(r["host"] == host for r in rows):
        raise VerifyFailed(f"{host} is still in the topology: {rows}")
    create_table_artifact(key=f"topology-{cluster}", table=rows, description=f"Topology after remove_member {host}")
    logger.info("Done: %s is no member of %s any more; %s stream from %s.", host, cluster,
                ", ".join(r["host"] for r in rows[1:]) or "no standbys", rows[0]["host"])
    return {"plan": plan.rows(), "changed": True, "topology": rows, "wiped": wipe}


@flow(name="reinit_standby", persist_result=True)
def reinit_standby(cluster: str = "lab", host: str = "pg4", force: bool = False, confirm: str = "",
                   max_lag_bytes: int = 16 * 1024 * 1024, timeout_seconds: int = 900,
                   dry_run: bool = False) -> dict:
    """1. Pre-flight  2. Plan  3. Act  4. Verify: the standby streams again, cloned afresh."""
    logger = get_run_logger()
    ctx = context_for(cluster, fresh=True)
    inv = ctx.inventory
    driver = ha_driver(inv)

    # ------------------------------------------------------------------ 1. pre-flight
    logger.info("1. Pre-flight (read-only): can %s be cloned again in cluster %s?", host, cluster)
    snap = member_snapshot(cluster)
    plan = plan_reinit(host, snap, data_dir=driver.pgdata(inv), force=force)

    # ------------------------------------------------------------------ 2. plan
    publish_plan("reinit_standby", cluster, plan, dry_run=dry_run)
    if dry_run:
        return {"plan": plan.rows(), "changed": False}
    _confirmed(host, confirm, f"reinit_standby wipes {driver.pgdata(inv)} on {host}")

    # ------------------------------------------------------------------ 3. act
    with holding(cluster, "reinit_standby"):
        ensure_standby_reinitialized(cluster, host)

        # ------------------------------------------------------------------ 4. verify
        logger.info("4. Verify: %s streams with lag under %d bytes.", host, max_lag_bytes)
        rows = wait_until_replicas_streaming(cluster, max_lag_bytes=max_lag_bytes, timeout=timeout_seconds)
    row = streaming_row(rows, host)
    create_table_artifact(key=f"topology-{cluster}", table=rows, description=f"Topology after reinit_standby {host}")
    logger.info("Done: %s was cloned again and streams from %s (lag %s bytes).", host, rows[0]["host"],
                row["lag_bytes"])
    return {"plan": plan.rows(), "changed": True, "topology": rows}


@flow(name="replace_member", persist_result=True)
def replace_member(cluster: str = "lab", dead: str = "pg3", new: str = "pg4", timeout_seconds: int = 900,
                   dry_run: bool = False) -> dict:
    """1. Pre-flight  2. Plan  3. Act  4. Verify: `new` streams in `dead`'s place; etcd has as many
    healthy members as before `dead` was lost."""
    logger = get_run_logger()
    ctx = context_for(cluster, fresh=True)
    inv = ctx.inventory

    # ------------------------------------------------------------------ 1. pre-flight
    logger.info("1. Pre-flight (read-only): replace %s, gone for good, with %s in cluster %s.", dead, new, cluster)
    snap = member_snapshot(cluster)
    plan = plan_replacement(inv, dead, new, snap)
    if not plan.refusals and not plan.is_noop:
        extra = []
        if is_host_answering(cluster, dead):
            extra.append(f"dead: {dead} answers over SSH: a host that is up leaves with remove_member")
        try:
            is_host_reachable(cluster, new)
        except BouwsteenError as exc:
            extra.append(f"new: {new} is unreachable ({str(exc).splitlines()[0]})")
        if extra:
            plan = replace(plan, actions=(), refusals=tuple(extra))

    # ------------------------------------------------------------------ 2. plan
    publish_plan("replace_member", cluster, plan, dry_run=dry_run)
    if dry_run or plan.is_noop:
        return {"plan": plan.rows(), "changed": False}

    # ------------------------------------------------------------------ 3. act
    was_etcd = dead in {h.name for h in inv.etcd_members}
    target = inv.replacing(dead, new)
    with holding(cluster, "replace_member"):
        # Packages before etcd loses a member: the window with two of two etcd members is short.
        layers = desired_layers(context_for(cluster, inventory=target.model_dump(mode="json")))
        ensure_packages(cluster, new, sorted({p for layer in layers[new].values() for p in layer.packages}))
        save_inventory(target)
        inv = context_for(cluster, fresh=True).inventory
        logger.info("3. Act: inventory block of %s lists %s in %s's place.", cluster, new, dead)
        ensure_member_forgotten(cluster, dead)
        if was_etcd:
            ensure_etcd_member_removed(cluster, dead)
            ensure_etcd_member_added(cluster, new)
            ensure_etcd_member_joined(cluster, new)
            wait_until_etcd_healthy(cluster)
            etcd_files_follow(cluster)
        cluster_follows_membership(cluster, joining=new)

        # ------------------------------------------------------------------ 4. verify
        logger.info("4. Verify: %s streams; etcd has every member healthy; the primary port routes.", new)
        rows = wait_until_replicas_streaming(cluster, timeout=timeout_seconds)
        wait_until_etcd_healthy(cluster)
        wait_until_primary_port_routes(cluster)
    streaming_row(rows, new)
    create_table_artifact(key=f"topology-{cluster}", table=rows, description=f"Topology after replace_member {dead}")
    ensure_client_connection_report(cluster)
    logger.info("Done: %s took %s's place and streams from %s; etcd has %d healthy members.", new, dead,
                rows[0]["host"], len(inv.etcd_members))
    return {"plan": plan.rows(), "changed": True, "topology": rows, "etcd_members": [h.name for h in inv.etcd_members]}
