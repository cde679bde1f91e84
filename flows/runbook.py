"""What every runbook flow does the same way: its declared policy (lock, plan, dry_run), probing
hosts for pre-flight, publishing and enforcing its plan."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Literal

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact

from tasks.adapters.probe import HostSnapshot
from tasks.context import ClusterContext
from tasks.errors import BouwsteenError, PreflightRefused
from tasks.hosts import is_host_ready
from tasks.locks import ClusterHold, EtcdPolicy, cluster_lock
from tasks.planning.plan import Plan
from tasks.reporting import plan_markdown


@dataclass(frozen=True)
class Policy:
    """How a runbook holds its cluster and shows what it will do.

    lock: "cluster" is the cluster lock (Prefect limit + etcd lease); "pgquartz" is a TAB job's own
    etcd lock, the one a cron-run pgquartz takes, so the two exclude each other (the job changes
    data, not the cluster); "none" is for a runbook that changes nothing.
    wait_seconds: how long a busy cluster is waited for before the run is refused.
    changes: the runbook changes something, so it takes `dry_run` and publishes a plan artifact.
    etcd: how the cluster lock treats an etcd that does not answer when the lock is taken:
    "required" refuses (LockUnavailable), since the Prefect lock alone does not exclude runs that
    bypass Prefect; "once_up" is for the runbook that builds etcd: it holds the Prefect lock alone
    until it has brought etcd up, then takes the etcd lock (`hold.take_etcd_lock()`) before it
    changes anything else; "if_up" takes the etcd lock when etcd answers and goes on with the
    Prefect lock alone when it does not, for a runbook that changes no host of the cluster's etcd
    (the backup server's rollout, which a site runs before its first build).
    """

    lock: Literal["cluster", "pgquartz", "none"]
    wait_seconds: float = 0
    changes: bool = True
    etcd: EtcdPolicy = "required"


# Role changes refuse at once when the cluster is busy (a DBA retries knowingly); builds and
# rollouts wait out a killed run's lease (one minute); the nightly backup and the weekly drill
# wait out each other. Only build_cluster may start without etcd: on bare hosts there is none yet;
# it takes the etcd lock once etcd is up, before PostgreSQL and the HA manager are touched. The
# backup server's rollout changes only the backup server, which a site sets up first: it takes the
# etcd lock when there is an etcd to take it in.
POLICIES: dict[str, Policy] = {
    "check_hosts": Policy("none", changes=False),
    "build_cluster": Policy("cluster", wait_seconds=120, etcd="once_up"),
    "add_standby": Policy("cluster", wait_seconds=120),
    "remove_member": Policy("cluster", wait_seconds=120),
    "replace_member": Policy("cluster", wait_seconds=120),
    "reinit_standby": Policy("cluster", wait_seconds=120),
    "backup_server_rollout": Policy("cluster", wait_seconds=120, etcd="if_up"),
    "routing_rollout": Policy("cluster", wait_seconds=120),
    "scheduled_basebackup": Policy("cluster", wait_seconds=900),
    "restore_drill": Policy("cluster", wait_seconds=900),
    "restore_cluster": Policy("cluster", wait_seconds=900),
    # The target cluster's lock (the source is only read); its first build takes it on its own.
    "clone_cluster": Policy("cluster", wait_seconds=900),
    "switchover": Policy("cluster"),
    "failover": Policy("cluster"),
    "tab_job": Policy("pgquartz"),
    "rotate_certificates": Policy("cluster", wait_seconds=120),
    "change_settings": Policy("cluster", wait_seconds=120),
    "rolling_upgrade": Policy("cluster", wait_seconds=120),
    # Like the role changes they guard, refused at once while another runbook works on the cluster.
    "pause_ha": Policy("cluster"),
    "resume_ha": Policy("cluster"),
}


class NotHeld:
    """What a dry run holds: nothing (it only reads)."""

    name = "no lock (dry run)"

    def require(self) -> None:
        pass

    def take_etcd_lock(self) -> None:
        pass


@contextlib.contextmanager
def holding(cluster: str, runbook: str, *, dry_run: bool = False) -> Iterator[ClusterHold | NotHeld]:
    """The cluster lock, as the runbook's policy declares it. A dry run only reads: it takes no
    lock, so it answers even while another runbook works on the cluster.

    While held, every step of the cluster that may change something checks the lock first and
    raises LockLost once its etcd lease is gone (tasks/locks.py); the `with` also fails with
    LockLost at its end if the lock was lost and no step noticed."""
    policy = POLICIES[runbook]
    if policy.lock != "cluster":
        raise ValueError(f"{runbook} does not take the cluster lock (policy: {policy.lock})")
    if dry_run:
        yield NotHeld()
        return
    with cluster_lock(cluster, runbook, wait_seconds=policy.wait_seconds, etcd=policy.etcd) as hold:
        yield hold


def snapshot_hosts(ctx: ClusterContext, names: list[str], *,
                   inventory: dict | None = None) -> tuple[dict[str, HostSnapshot], dict[str, str]]:
    """Probe the hosts in parallel (read-only): the snapshots of the hosts that answered, and a
    refusal for each that could not be reached, which the plan lists (`plan_build(unreachable=)`)."""
    futures = {name: is_host_ready.submit(ctx.name, name, inventory=inventory) for name in names}
    snapshots, unreachable = {}, {}
    for name, future in futures.items():
        try:
            snapshots[name] = future.result().snapshot
        except BouwsteenError as exc:  # one line per host: the whole reason, secrets masked
            unreachable[name] = f"{name}: unreachable: {ctx.masker(str(exc)).splitlines()[0]}"
    return snapshots, unreachable


def publish_plan(runbook: str, cluster: str, plan: Plan, *, dry_run: bool) -> None:
    """The plan as an artifact and in the log; refuse when pre-flight found a reason."""
    logger = get_run_logger()
    create_markdown_artifact(key=f"{runbook.replace('_', '-')}-plan-{cluster}",
                             markdown=plan_markdown(runbook, cluster, plan, dry_run),
                             description=f"{runbook} plan for {cluster}")
    if plan.refusals:
        for reason in plan.refusals:
            logger.error("Refused: %s", reason)
        raise PreflightRefused(*plan.refusals)
    if plan.is_noop:
        logger.info("2. Plan: %s", plan.noop_summary.replace("**", ""))
    else:
        for row in plan.rows():
            logger.info("2. Plan: %s: %s", row["host"], row["plan"])
    if dry_run:
        logger.info("dry_run: stopping after the plan; nothing was changed.")


def tag_run(tag: str) -> None:
    """Add `tag` to the running flow run: what later runs filter the server's records by (a
    restore_drill's `backup:<name>`, which restore_cluster reads as that backup's evidence)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    run_id = flow_run.get_id()
    if run_id is None:
        return
    with get_client(sync_client=True) as client:
        tags = client.read_flow_run(run_id).tags
        if tag not in tags:
            client.update_flow_run(run_id, tags=[*tags, tag])


# The name of a dry run's final state. Its type is COMPLETED (the run did all it was asked), but
# its state event is `prefect.flow-run.DryRun`, so automations that follow a completed role change
# or restore (deployments/deploy.py) never take a plan for the act.
DRY_RUN_STATE = "DryRun"


def dry_run_done(result: dict):
    """What a changing runbook returns after its plan when `dry_run` was asked."""
    from prefect.states import Completed

    return Completed(name=DRY_RUN_STATE, message="dry run: nothing changed", data=result)
