"""rolling_upgrade: OS packages (the HA manager, the backup tool, PostgreSQL's minor release, etcd,
HAProxy) upgraded on a running cluster host by host, with no more downtime than one switchover."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field

from flows.runbook import dry_run_done, holding, publish_plan
from flows.switchover import Timeline, planned_switchover
from tasks.adapters.packages import validate_targets
from tasks.context import context_for
from tasks.desired import ha_driver
from tasks.errors import BouwsteenError, PreflightRefused, UpgradeStopped, VerifyFailed
from tasks.etcd import wait_until_etcd_healthy
from tasks.ha import wait_until_replicas_streaming
from tasks.upgrade import (
    ensure_host_upgraded,
    ensure_member_drained,
    is_upgrade_complete,
    is_upgrade_safe,
    wait_until_units_active,
)


class HostApproval(RunInput):
    """Asked before each host when approve_each_host=True."""

    upgrade: bool = Field(description="True: upgrade the next host now. False: stop here; the hosts done so "
                                      "far stay upgraded and the cluster keeps serving.")
    reason: str = Field(default="", description="A word for the run's log (a ticket, what you checked).")


def _left(order, host: str) -> str:
    """The hosts from `host` on that the run did not upgrade."""
    steps = [h for action, h in order if action == "upgrade"]
    return ", ".join(steps[steps.index(host):])


@flow(name="rolling_upgrade", persist_result=True)
def rolling_upgrade(cluster: str = "lab", packages: dict[str, str] | None = None, reboot: bool = False,
                    force: bool = False, approve_each_host: bool = False, max_lag_bytes: int = 1024 * 1024,
                    max_transaction_age_seconds: float = 300, max_backup_age_hours: float = 26,
                    while_paused: bool = False, approval_timeout_seconds: int = 3600,
                    dry_run: bool = False) -> dict:
    """1. Pre-flight (read-only)  2. Plan (dry_run stops here)  3. Act host by host  4. Verify.

    `packages`: {"patroni": "4.1.5-2", "pgbackrest": "2.55.1-1"}, exact Debian versions; each is
    upgraded only where it is installed. `force`: start without a good backup newer than
    `max_backup_age_hours`. `approve_each_host`: pause before every host for a DBA's word in
    the Prefect UI. `reboot`: reboot each host after its packages instead of restarting services.
    `while_paused`: roll through although the HA manager is paused (pause_ha)."""
    logger = get_run_logger()
    timeline = Timeline()
    targets = validate_targets(packages)
    context_for(cluster, fresh=True)  # the inventory as stored now, not as an earlier run left it cached
    logger.info("1. Pre-flight: every host's installed and offered versions (apt's lists refreshed), lag, "
                "the oldest transaction, the newest good backup.")
    with holding(cluster, "rolling_upgrade", dry_run=dry_run):
        check = is_upgrade_safe(cluster, targets, max_lag_bytes=max_lag_bytes,
                                max_transaction_age_s=max_transaction_age_seconds,
                                max_backup_age_hours=max_backup_age_hours, force=force, reboot=reboot,
                                approve_each_host=approve_each_host, while_paused=while_paused)
        publish_plan("rolling_upgrade", cluster, check.plan, dry_run=dry_run)
        summary = {"targets": targets, "primary": check.primary,
                   "hosts": {host: upgrade.targets for host, upgrade in check.upgrades.items()}}
        if dry_run:
            return dry_run_done({**summary, "dry_run": True, "changed": False})
        if check.plan.is_noop:
            # A run cut short may have left a member drained; its packages are done already.
            left = list(check.drained)
            for host in left:
                ensure_member_drained(cluster, host, drained=False)
            return {**summary, "changed": bool(left), "upgraded": [], "switchover": None, "counted_in": left}
        inv = context_for(cluster).inventory
        db_hosts = {h.name for h in inv.db_hosts}
        etcd_hosts = {h.name for h in inv.etcd_members}
        drains = ha_driver(inv).can_drain
        logger.info("3. Act: one host at a time; a switchover before the primary's turn.")
        upgraded: list[str] = []
        switched: str | None = None
        for action, host in check.order:
            if action == "switchover":
                # Every standby runs the new packages by now, and draining moved the synchronous
                # role around: the candidate is the best one at this moment, not the planned one.
                switched = planned_switchover(cluster, check.primary, None, max_lag_bytes, max_transaction_age_seconds,
                                              while_paused, timeline, runbook="rolling_upgrade")
                continue
            if approve_each_host:
                timeline(f"paused for approval before {host}")
                answer = pause_flow_run(wait_for_input=HostApproval.with_initial_data(upgrade=True),
                                        timeout=approval_timeout_seconds)
                if answer is None or not answer.upgrade:
                    why = (f"stopped before {host}: the DBA declined ({answer.reason if answer else 'no answer'}); "
                           f"upgraded so far: {', '.join(upgraded) or 'none'}")
                    if not upgraded and switched is None:
                        raise PreflightRefused(why)
                    raise UpgradeStopped(f"{why}; the cluster serves; left: {_left(check.order, host)}")
                timeline(f"approved: {host} ({answer.reason or 'no reason given'})")
            try:
                if host in db_hosts and drains:
                    timeline(ensure_member_drained(cluster, host, drained=True))
                timeline(ensure_host_upgraded(cluster, host, targets, reboot).outcome)
                if host in db_hosts:
                    wait_until_replicas_streaming(cluster, max_lag_bytes=max_lag_bytes, hosts=[host],
                                                  timeout=900 if reboot else 300)
                    timeline(f"{host} streams and is caught up")
                    if drains:
                        timeline(ensure_member_drained(cluster, host, drained=False))
                else:
                    wait_until_units_active(cluster, host, timeout=900 if reboot else 180)
                if host in etcd_hosts:
                    timeline(wait_until_etcd_healthy(cluster))
            except BouwsteenError as exc:
                # The hosts not yet touched still serve (the primary's turn comes after a switchover).
                # A failed host stays drained: the HA manager must not promote it. A rerun counts it in.
                held_out = f" and {host} left out of promotion" if host in db_hosts and drains else ""
                raise UpgradeStopped(f"{host}: the upgrade failed ({str(exc).splitlines()[0]}); the run stops here "
                                     f"with the cluster serving{held_out}. Upgraded: {', '.join(upgraded) or 'none'}; "
                                     f"left: {_left(check.order, host)}") from exc
            upgraded.append(host)
        logger.info("4. Verify: every host on its target versions, one backup tool release everywhere, "
                    "every standby streaming.")
        outcome = is_upgrade_complete(cluster, targets)
        if not outcome:
            raise VerifyFailed("; ".join(outcome.problems))
        rows = list(outcome.rows)
        topology = wait_until_replicas_streaming(cluster, max_lag_bytes=max_lag_bytes)
    create_table_artifact(key=f"rolling-upgrade-{cluster}", table=timeline.rows,
                          description=f"rolling_upgrade on {cluster}")
    create_table_artifact(key=f"packages-{cluster}", table=rows, description=f"Package versions per host on {cluster}")
    logger.info("Done: %s on every host that has them.", ", ".join(f"{n} {v}" for n, v in sorted(targets.items())))
    return {**summary, "changed": True, "upgraded": upgraded, "switchover": switched, "timeline": timeline.rows,
            "packages": rows, "topology": topology}
