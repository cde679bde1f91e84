"""check_hosts: can we reach every host of a cluster, and what is on it? Read-only."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.adapters.ha.base import HaStatusError
from tasks.adapters.postgres import DatabaseUnavailable
from tasks.context import context_for
from tasks.errors import BouwsteenError, VerifyFailed
from tasks.ha import is_ha_paused
from tasks.hosts import HostFacts, is_host_reachable
from tasks.tls import is_certificate_far_from_expiry


@flow(name="check_hosts", persist_result=True)
def check_hosts(cluster: str = "lab") -> list[dict]:
    """1. Pre-flight: load the inventory. 2. Act: reach every host in parallel. 3. Certificates.
    4. The HA manager's maintenance mode. Report."""
    logger = get_run_logger()
    ctx = context_for(cluster, fresh=True)
    hosts = [h.name for h in ctx.inventory.hosts]
    logger.info("1. Pre-flight: %d hosts in cluster %s: %s.", len(hosts), cluster, ", ".join(hosts))

    logger.info("2. Reaching every host over SSH, in parallel.")
    futures = {name: is_host_reachable.submit(cluster, name) for name in hosts}
    rows: list[dict] = []
    unreachable: list[str] = []
    for name, future in futures.items():
        state = future.wait() or future.state
        if future.state.is_completed():
            rows.append(future.result().row())
            continue
        try:
            future.result()
        except BouwsteenError as exc:  # one line per host, the whole reason
            reason = ctx.masker(str(exc)).splitlines()[0]
        else:
            reason = str(state)
        logger.error("%s is unreachable: %s", name, reason)
        unreachable.append(name)
        spec = ctx.inventory.host(name)
        rows.append(HostFacts(host=name, address=str(spec.address), ok=False, error=reason).row())

    create_table_artifact(
        key=f"check-hosts-{cluster}",
        table=rows,
        description=f"check_hosts for cluster {cluster}: {len(rows) - len(unreachable)}/{len(rows)} hosts reachable",
    )
    if unreachable:
        raise VerifyFailed(f"{len(unreachable)} host(s) unreachable: {', '.join(unreachable)}")

    # With TLS on, an expiring certificate fails the nightly run weeks before it would stop a service.
    if ctx.inventory.cluster.tls.enabled:
        logger.info("3. Certificates: days to expiry of every certificate on every host.")
        checks = [f.result() for f in [is_certificate_far_from_expiry.submit(cluster, n) for n in hosts]]
        cert_rows = [r.row() for check in checks for r in check.rows]
        failing = [r for check in checks for r in check.failing]
        create_table_artifact(
            key=f"certificates-{cluster}", table=cert_rows,
            description=f"Certificates of {cluster}: {len(failing)} of {len(cert_rows)} below "
                        f"{ctx.inventory.cluster.tls.alarm_within_days} days",
        )
        if failing:
            raise VerifyFailed("certificates expiring: " + ", ".join(
                f"{r.host}:{r.path} ({r.days_left:.1f} days left)" for r in failing))
    # A pause forgotten after the work it was for leaves the cluster without automatic failover,
    # which nothing else shows: every check says so. A cluster not built yet has no HA manager to ask.
    logger.info("4. The HA manager's maintenance mode.")
    try:
        maintenance = is_ha_paused(cluster)
    except (HaStatusError, DatabaseUnavailable) as exc:
        ha = f"the HA manager does not answer ({ctx.masker(str(exc)).splitlines()[0][:200]})"
    else:
        ha = ("the HA manager is PAUSED (maintenance mode): no automatic failover until resume_ha"
              if maintenance.paused else "automatic failover is on")
    create_markdown_artifact(key=f"ha-maintenance-{cluster}", markdown=f"# HA manager of `{cluster}`\n\n{ha}.\n",
                             description=f"Maintenance mode of {cluster}: {ha}")
    logger.info("Done: all %d hosts answered%s; %s.", len(rows),
                ", every certificate far from expiry" if ctx.inventory.cluster.tls.enabled else "", ha)
    return rows
