"""rotate_certificates: renew the cluster's certificates with the primary kept and quorum kept."""

from __future__ import annotations

from prefect import flow, get_run_logger

from blocks.register import save_inventory
from flows.runbook import holding, publish_plan
from tasks.context import context_for
from tasks.errors import PreflightRefused, VerifyFailed
from tasks.etcd import wait_until_etcd_healthy
from tasks.ha import (
    is_replication_working,
    wait_until_primary_port_routes,
    wait_until_replicas_streaming,
)
from tasks.hosts import desired_layers, ensure_files, ensure_units
from tasks.tls import (
    TRUST_BUNDLES,
    RotationPlan,
    ensure_certificates_presented,
    is_certificate_current,
    needs_new_generation,
    untrusted_issuer,
)


def _read_all(cluster: str, hosts: list[str], inventory: dict | None = None):
    return [f.result() for f in [is_certificate_current.submit(cluster, h, inventory=inventory) for h in hosts]]


def _apply(cluster: str, layers: dict[str, list[str]], only: list[str] | None) -> bool:
    """Write the layers' files (`only` these paths), then start/reload/restart what reads them:
    etcd members one at a time, each back in a healthy cluster before the next."""
    changed_any = False
    for host, kinds in layers.items():
        for kind in kinds:
            changed = ensure_files(cluster, host, kind, only=only)
            if not changed:
                continue
            changed_any = True
            ensure_units(cluster, host, kind, changed)
            if kind == "etcd":
                wait_until_etcd_healthy(cluster)
            elif kind == "db":
                # Under stolon a new etcd client pair restarts the keeper (and its PostgreSQL): the
                # next host only once every standby streams again.
                wait_until_replicas_streaming(cluster)
    return changed_any


@flow(name="rotate_certificates", persist_result=True)
def rotate_certificates(cluster: str = "lab", force: bool = False, within_days: int = 30,
                        dry_run: bool = False) -> dict:
    """1. Pre-flight: every certificate's issuer and expiry on every host, against what the CA issues now.
    2. Plan: what is renewed (a new period, a new CA, new names; `force` or an early expiry: new keys);
       refused when the issuing CA is not trusted everywhere yet (a roll-over's first run trusts it).
    3. Act: CA bundles everywhere first, then the pairs; reloads, etcd one member at a time.
    4. Verify: every service presents its new certificate; replication, etcd and routing still verify."""
    logger = get_run_logger()
    ctx = context_for(cluster, fresh=True)
    inv = ctx.inventory
    if not inv.cluster.tls.enabled:
        raise PreflightRefused(f"cluster.tls.enabled is false for {cluster}: there are no certificates to rotate")
    layers = {name: [k for k in kinds if k in ("etcd", "db", "router")] for name, kinds in desired_layers(ctx).items()}
    layers = {name: kinds for name, kinds in layers.items() if kinds}
    hosts = list(layers)

    # ------------------------------------------------------------------ 1. pre-flight
    logger.info("1. Pre-flight (read-only): the certificates on %s.", ", ".join(hosts))
    current = _read_all(cluster, hosts)
    untrusted = untrusted_issuer(current, ctx.cluster_ca.fingerprint)
    reason = needs_new_generation(current, force=force, within_days=within_days)
    target = None
    if reason is not None:
        target = inv.model_dump(mode="json")
        target["cluster"]["tls"]["generation"] = inv.cluster.tls.generation + 1
        current = _read_all(cluster, hosts, inventory=target)

    # ------------------------------------------------------------------ 2. plan
    plan = RotationPlan(files=tuple(f for h in current for f in h.files),
                        new_generation=inv.cluster.tls.generation + 1 if reason else None, generation_reason=reason,
                        refusals=(untrusted,) if untrusted else ())
    publish_plan("rotate_certificates", cluster, plan, dry_run=dry_run)
    if dry_run or plan.is_noop:
        return {"plan": plan.rows(), "changed": False, "replaced": 0, "hosts": 0}

    # ------------------------------------------------------------------ 3. act
    with holding(cluster, "rotate_certificates"):
        if target is not None:
            save_inventory(type(inv).model_validate(target))
            context_for(cluster, fresh=True)
        logger.info("3. Act: CA bundles on every host first, then the new pairs.")
        _apply(cluster, layers, only=list(TRUST_BUNDLES))
        _apply(cluster, layers, only=None)

        # ------------------------------------------------------------------ 4. verify
        logger.info("4. Verify: every service presents its new certificate; replication, etcd and routing verify.")
        for host in hosts:
            ensure_certificates_presented(cluster, host)
        wait_until_etcd_healthy(cluster)
        wait_until_replicas_streaming(cluster)
        is_replication_working(cluster)
        wait_until_primary_port_routes(cluster)
    left = _read_all(cluster, hosts)
    if not all(left):
        raise VerifyFailed("certificates still to replace after the rotation: "
                               + ", ".join(f"{f.host}:{f.path}" for h in left for f in h.files if f.action != "keep"))
    logger.info("Done: %d certificates replaced on %d hosts.", len(plan.changing), len({f.host for f in plan.changing}))
    return {"plan": plan.rows(), "changed": True, "replaced": len(plan.changing),
            "hosts": len({f.host for f in plan.changing})}
