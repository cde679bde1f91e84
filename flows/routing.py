"""routing_rollout: keepalived VIP, HAProxy rw/ro, and the primary detector on the routers."""

from __future__ import annotations

from prefect import flow, get_run_logger

from blocks.inventory import Role
from flows.runbook import holding, publish_plan, snapshot_hosts
from tasks.clients import ensure_client_connection_report
from tasks.context import context_for
from tasks.errors import PreflightRefused
from tasks.hosts import desired_layers, ensure_files, ensure_packages, ensure_units
from tasks.planning.build import plan_build
from tasks.routing import (
    ensure_router_prepared,
    is_haproxy_config_valid,
    is_routing_correct,
    vip_holders,
    wait_until_router_routes,
    wait_until_vip_held,
)


@flow(name="routing_rollout", persist_result=True)
def routing_rollout(cluster: str = "lab", dry_run: bool = False) -> dict:
    """1. Pre-flight  2. Plan  3. Act, one router at a time  4. Verify through the VIP."""
    logger = get_run_logger()
    ctx = context_for(cluster, fresh=True)
    inv = ctx.inventory
    routing = inv.cluster.routing

    # ------------------------------------------------------------------ 1. pre-flight
    if routing is None:
        raise PreflightRefused(f"cluster.routing is not set for {cluster}")
    if ctx.routing_secrets is None:
        raise PreflightRefused(f"no routing-credentials block named {cluster!r}")
    try:
        ctx.routing_secrets.check()
        layers = {h.name: desired_layers(ctx)[h.name]["router"] for h in inv.with_role(Role.router)}
    except ValueError as exc:
        raise PreflightRefused(f"{exc}") from None
    logger.info("1. Pre-flight (read-only): VIP %s on %s.", routing.vip, ", ".join(layers))
    snapshots, unreachable = snapshot_hosts(ctx, list(layers))

    # ------------------------------------------------------------------ 2. plan
    plan = plan_build(cluster, list(layers.values()), snapshots, initialized=True, bootstrap_candidates=[],
                      unreachable=unreachable)
    publish_plan("routing_rollout", cluster, plan, dry_run=dry_run)
    if dry_run:
        return {"plan": plan.rows(), "changed": False}

    # ------------------------------------------------------------------ 3. act
    with holding(cluster, "routing_rollout"):
        # One router at a time, and the VIP confirmed before the next: the other keeps serving.
        holders = vip_holders(ctx)
        order = sorted(layers, key=lambda n: n in holders)
        for name in order:
            logger.info("3. Act: %s.", name)
            ensure_packages(cluster, name, list(layers[name].packages))
            ensure_router_prepared(cluster, name)
            is_haproxy_config_valid(cluster, name)
            changed = ensure_files(cluster, name, "router")
            ensure_units(cluster, name, "router", changed)
            wait_until_router_routes(cluster, name)
            wait_until_vip_held(cluster)

        # ------------------------------------------------------------------ 4. verify
        logger.info("4. Verify: exactly one VIP holder; rw and ro through the VIP.")
        holder = wait_until_vip_held(cluster)
        routes = is_routing_correct(cluster)
    ensure_client_connection_report(cluster)
    changed = not plan.is_noop
    logger.info("Done: VIP %s on %s; rw → %s, ro → %s; %s.", routing.vip, holder, routes.rw, routes.ro,
                "changes were applied" if changed else "nothing was changed")
    return {"plan": plan.rows(), "changed": changed, "vip_holder": holder, "rw": routes.rw, "ro": routes.ro}
