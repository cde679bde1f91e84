"""tab_job: run a PgQuartz job file (unchanged) as a Prefect flow, one task per step instance and check."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run

from flows.runbook import publish_plan
from tasks.context import context_for
from tasks.errors import JobFailed, PreflightRefused
from tasks.locks import pgquartz_lock
from tasks.pgquartz import (
    JobFileError,
    expand_matrix,
    job_action_plan,
    load_job,
    run_waves,
    step_waves,
)
from tasks.tab import (
    JobSourceError,
    fetch_job_source,
    is_check_passing,
    job_file,
    run_step_instance,
    target_nodes,
)

# The jobs this repository ships; a site names its own sources.
DEFAULT_JOBS = Path(__file__).resolve().parents[1] / "deployments" / "jobs"


@flow(name="tab_job", persist_result=True)
def tab_job(cluster: str = "lab", job: str = "purge_audit_log", source: str = str(DEFAULT_JOBS),
            revision: str = "main", fail_on_step_error: bool = True, dry_run: bool = False) -> dict:
    """1. Pre-flight (job file valid, target nodes from the live cluster)  2. Plan (waves; dry_run
    stops here)  3. Act under pgquartz's own etcd lock  4. Verify: the job's checks."""
    logger = get_run_logger()
    context_for(cluster, fresh=True)

    # ------------------------------------------------------------------ 1. pre-flight
    try:
        path = job_file(fetch_job_source(source, revision), job)
        definition = load_job(path)
    except (JobFileError, JobSourceError) as exc:
        raise PreflightRefused(str(exc), nothing="ran") from None
    nodes = target_nodes(cluster, definition)
    if not nodes:
        raise PreflightRefused("no healthy node has the role(s) the job's connections need", nothing="ran")
    waves = step_waves(definition)
    logger.info("1. Pre-flight: job %s from %s is valid; it runs on %s.", definition.name, path, ", ".join(nodes))
    publish_plan("tab_job", cluster, job_action_plan(definition, nodes, definition.lock_prefix), dry_run=dry_run)
    if dry_run:
        return {"job": definition.name, "nodes": nodes, "waves": waves, "dry_run": True}

    # ------------------------------------------------------------------ 3. act under the lock
    deadline = time.monotonic() + (definition.timeout or 24 * 3600)

    def run_batch(node: str, step_name: str, instances: list) -> list[dict]:
        futures = [run_step_instance.with_options(name=f"{step_name}{inst or ''}@{node}").submit(
            cluster, str(path), step_name, inst, node, deadline) for inst in instances]
        return [f.result() for f in futures]

    # Like pgquartz: the lock covers the steps; checks run after it is released.
    with pgquartz_lock(cluster, definition, f"bouwsteen tab_job {flow_run.get_id()}"):
        logger.info("3. Act: holding pgquartz lock %s.", definition.lock_prefix)
        rows, results = run_waves(definition, nodes, run_batch, warn=logger.warning)

    # ------------------------------------------------------------------ 4. verify
    logger.info("4. Verify: %d check(s).", len(definition.checks))
    verdicts = []
    for node in nodes:
        for index, check in enumerate(definition.checks):
            for inst in expand_matrix(check.matrix):
                verdicts.append(is_check_passing.with_options(name=f"check {check.label}{inst or ''}@{node}")(
                    cluster, str(path), index, inst, node, deadline))
    create_table_artifact(key=f"tab-job-{cluster}-{definition.name.replace('_', '-')}",
                          table=rows + [{"node": v["node"], "step": "check: " + v["check"], "instance": str(v["instance"] or ""),
                                         "rc": "passed" if v["passed"] else "FAILED: " + v["reason"]} for v in verdicts],
                          description=f"TAB job {definition.name} on {cluster}")
    failed_checks = [v for v in verdicts if not v["passed"]]
    failed_steps = [name for name, result in results.items() if result.rc != 0]
    if failed_checks:
        raise JobFailed(f"job {definition.name}: {len(failed_checks)} check(s) failed: "
                        + "; ".join(f"{v['check']}: {v['reason']}" for v in failed_checks))
    if failed_steps and fail_on_step_error:
        raise JobFailed(f"job {definition.name}: step(s) failed: {', '.join(failed_steps)} "
                        "(pgquartz would exit 0 here; set fail_on_step_error=False for that)")
    logger.info("Done: job %s ran on %s; every check passed.", definition.name, ", ".join(nodes))
    return {"job": definition.name, "nodes": nodes, "steps": rows, "checks": verdicts}
