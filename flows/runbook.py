"""What every runbook flow does the same way: probe hosts for pre-flight, publish and enforce a plan."""

from __future__ import annotations

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact

from tasks.adapters.probe import HostSnapshot
from tasks.cluster import is_host_ready
from tasks.context import ClusterContext
from tasks.errors import BouwsteenError, PreflightRefused
from tasks.planning.build import BuildPlan
from tasks.reporting import plan_markdown


def snapshot_hosts(ctx: ClusterContext, names: list[str], *, inventory: dict | None = None) -> dict[str, HostSnapshot]:
    """Probe the hosts in parallel (read-only); refuse naming every host that cannot be reached."""
    futures = {name: is_host_ready.submit(ctx.name, name, inventory=inventory) for name in names}
    snapshots, unreachable = {}, []
    for name, future in futures.items():
        try:
            snapshots[name] = future.result()
        except BouwsteenError as exc:  # one line per host: the whole reason, secrets masked
            unreachable.append(f"{name}: unreachable: {ctx.masker(str(exc)).splitlines()[0]}")
    if unreachable:
        raise PreflightRefused(*unreachable)
    return snapshots


def publish_plan(runbook: str, cluster: str, plan: BuildPlan, *, dry_run: bool) -> None:
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
        logger.info("2. Plan: nothing to change; every host already matches the inventory.")
    else:
        for row in plan.rows():
            logger.info("2. Plan: %s: %s", row["host"], row["plan"])
    if dry_run:
        logger.info("dry_run: stopping after the plan; nothing was changed.")
