"""tab_job: run a PgQuartz job file (unchanged) as a Prefect flow, one task per step instance and check."""

from __future__ import annotations

import os
import socket
import time

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run

from flows.runbook import publish_plan
from tasks.adapters import etcd_config
from tasks.adapters.etcd import Etcd, LockTimeout
from tasks.context import context_for
from tasks.errors import JobFailed, PreflightRefused
from tasks.pgquartz import (
    JobFileError,
    StepResult,
    WhenExpressionError,
    expand_matrix,
    job_action_plan,
    load_job,
    step_should_run,
    step_waves,
)
from tasks.tab import (
    DEFAULT_JOBS,
    JobSourceError,
    as_instance_result,
    fetch_job_source,
    is_check_passing,
    job_file,
    run_step_instance,
    target_nodes,
)

# pgquartz's etcd session uses the client's default TTL: a crashed holder frees the lock after it.
PGQUARTZ_LEASE_TTL = 60


@flow(name="tab_job", persist_result=True)
def tab_job(cluster: str = "lab", job: str = "purge_audit_log", source: str = str(DEFAULT_JOBS),
            revision: str = "main", fail_on_step_error: bool = True, dry_run: bool = False) -> dict:
    """1. Pre-flight (job file valid, target nodes from the live cluster)  2. Plan (waves; dry_run
    stops here)  3. Act under pgquartz's own etcd lock  4. Verify: the job's checks."""
    logger = get_run_logger()
    ctx = context_for(cluster, fresh=True)

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
    etcd = Etcd(etcd_config.client_endpoints(ctx.inventory), timeout=3)
    holder = f"bouwsteen tab_job {flow_run.get_id()} on {socket.gethostname()} pid {os.getpid()}"
    mutex = etcd.mutex(definition.lock_prefix, ttl=PGQUARTZ_LEASE_TTL, holder=holder)
    try:
        mutex.acquire(timeout=definition.etcd_config.lock_timeout)
    except LockTimeout as exc:
        raise JobFailed(f"job {definition.name}: {exc}") from None
    logger.info("3. Act: holding pgquartz lock %s.", definition.lock_prefix)
    deadline = time.monotonic() + (definition.timeout or 24 * 3600)
    rows: list[dict] = []
    results: dict[str, StepResult] = {}
    try:
        for node in nodes:
            for wave in waves:
                for step_name in wave:
                    spec = definition.steps[step_name]
                    try:
                        run_it = step_should_run(spec, results)
                    except WhenExpressionError as exc:
                        logger.warning("%s: when rule error (%s); skipped as pgquartz would.", step_name, exc)
                        run_it = False
                    if not run_it:
                        results[step_name] = StepResult()
                        rows.append({"node": node, "step": step_name, "instance": "", "rc": "skipped (when)"})
                        continue
                    instances = expand_matrix(spec.matrix)
                    futures = []
                    for i in range(0, len(instances), definition.parallel):
                        batch = [
                            run_step_instance.with_options(name=f"{step_name}{inst or ''}@{node}").submit(
                                cluster, str(path), step_name, inst, node, deadline)
                            for inst in instances[i:i + definition.parallel]
                        ]
                        futures += [f.result() for f in batch]
                    results[step_name] = StepResult([as_instance_result(r) for r in futures])
                    rows += [{"node": node, "step": step_name, "instance": str(r["instance"] or ""), "rc": r["rc"]}
                             for r in futures]
    finally:
        # Like pgquartz: the lock covers the steps; checks run after it is released.
        mutex.release()

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
