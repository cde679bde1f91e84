"""tab_job: run a PgQuartz job file (unchanged) as a Prefect flow, one task per step instance and check."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run

from blocks.inventory import SHIPPED_JOB_SOURCE
from flows.runbook import publish_plan
from tasks.context import context_for
from tasks.db_roles import ensure_job_role, is_job_role_safe, job_role_of
from tasks.errors import JobFailed, PreflightRefused
from tasks.locks import pgquartz_lock
from tasks.pgquartz import (
    JobFileError,
    JobSource,
    JobSourceError,
    check_job_name,
    choose_source,
    expand_matrix,
    job_action_plan,
    load_job,
    run_waves,
    step_waves,
)
from tasks.planning.job_role import connection_user_refusals, job_uses_sql
from tasks.planning.plan import ActionPlan
from tasks.tab import (
    checked_out,
    is_check_passed,
    job_file,
    run_step_instance,
    target_nodes,
)


@flow(name="tab_job", persist_result=True)
def tab_job(cluster: str = "lab", job: str = "purge_audit_log", source: str = SHIPPED_JOB_SOURCE,
            revision: str = "", fail_on_step_error: bool = True, dry_run: bool = False) -> dict:
    """1. Pre-flight (source and revision from the cluster's allow-list, job file valid, the job
    role safe, target nodes from the live cluster)  2. Plan (waves; dry_run stops here)  3. Act
    under pgquartz's own etcd lock  4. Verify: the job's checks.

    `source` names one of the cluster's job sources (`cluster.jobs.sources` in the inventory
    block, plus `shipped`: this repository's deployments/jobs); `revision` one of a git source's
    allowed revisions (empty: its first). A git source is cloned for this run only."""
    logger = get_run_logger()
    ctx = context_for(cluster, fresh=True)

    # ------------------------------------------------------------------ 1. pre-flight
    try:
        check_job_name(job)
        chosen = choose_source(ctx.inventory.cluster.jobs, cluster, source, revision)
    except JobSourceError as exc:
        raise PreflightRefused(str(exc), nothing="ran") from None
    with _checked_out(chosen) as directory:  # a clone is removed when the run ends, however it ends
        try:
            path = job_file(directory, job)
            definition = load_job(path)
        except (JobFileError, JobSourceError) as exc:
            raise PreflightRefused(str(exc), nothing="ran") from None
        uses_sql = job_uses_sql(definition)
        if uses_sql:
            role = job_role_of(ctx)
            refusals = connection_user_refusals(definition, role.user, role.member_of)
            if refusals:
                raise PreflightRefused(*refusals, nothing="ran")
        nodes = target_nodes(cluster, definition)
        if not nodes:
            raise PreflightRefused("no healthy node has the role(s) the job's connections need", nothing="ran")
        role_plan = is_job_role_safe(cluster) if uses_sql else None
        if role_plan is not None and not role_plan.ok:
            raise PreflightRefused(*role_plan.refusals, nothing="ran")
        waves = step_waves(definition)
        logger.info("1. Pre-flight: job %s from %s is valid; it runs on %s.", definition.name, path,
                    ", ".join(nodes))
        plan = job_action_plan(definition, nodes, definition.lock_prefix)
        if role_plan is not None:
            plan = ActionPlan(role_plan.actions("primary") + plan.actions, plan.refusals, plan.nothing_to_do,
                              plan.notes + ((f"SQL steps log in as {role_plan.user} ({role_plan.grants_text}), "
                                             "never as the superuser."),))
        publish_plan("tab_job", cluster, plan, dry_run=dry_run)
        if dry_run:
            return {"job": definition.name, "nodes": nodes, "waves": waves, "dry_run": True}

        # -------------------------------------------------------------- 3. act under the lock
        deadline = time.monotonic() + (definition.timeout or 24 * 3600)

        def run_batch(node: str, step_name: str, instances: list) -> list:
            futures = [run_step_instance.with_options(name=f"{step_name}{inst or ''}@{node}").submit(
                cluster, str(path), step_name, inst, node, deadline) for inst in instances]
            return [f.result() for f in futures]

        if uses_sql:
            ensure_job_role(cluster)
        # Like pgquartz: the lock covers the steps; checks run after it is released.
        with pgquartz_lock(cluster, definition, f"bouwsteen tab_job {flow_run.get_id()}"):
            logger.info("3. Act: holding pgquartz lock %s.", definition.lock_prefix)
            rows, results = run_waves(definition, nodes, run_batch, warn=logger.warning)

        # -------------------------------------------------------------- 4. verify
        logger.info("4. Verify: %d check(s).", len(definition.checks))
        verdicts = []
        for node in nodes:
            for index, check in enumerate(definition.checks):
                for inst in expand_matrix(check.matrix):
                    verdicts.append(is_check_passed.with_options(name=f"check {check.label}{inst or ''}@{node}")(
                        cluster, str(path), index, inst, node, deadline))
        create_table_artifact(key=f"tab-job-{cluster}-{definition.name.replace('_', '-')}",
                              table=rows + [{"node": v.node, "step": "check: " + v.check,
                                             "instance": str(v.instance or ""),
                                             "rc": "passed" if v.ok else "FAILED: " + v.reason} for v in verdicts],
                              description=f"TAB job {definition.name} on {cluster}")
        failed_checks = [v for v in verdicts if not v.ok]
        failed_steps = [name for name, result in results.items() if result.rc != 0]
        if failed_checks:
            raise JobFailed(f"job {definition.name}: {len(failed_checks)} check(s) failed: "
                            + "; ".join(f"{v.check}: {v.reason}" for v in failed_checks))
        if failed_steps and fail_on_step_error:
            raise JobFailed(f"job {definition.name}: step(s) failed: {', '.join(failed_steps)} "
                            "(pgquartz would exit 0 here; set fail_on_step_error=False for that)")
        logger.info("Done: job %s ran on %s; every check passed.", definition.name, ", ".join(nodes))
        return {"job": definition.name, "nodes": nodes, "steps": rows, "checks": [v.as_dict() for v in verdicts]}


@contextmanager
def _checked_out(chosen: JobSource) -> Iterator[Path]:
    """The source's folder for the run (a clone is removed afterwards); a source that cannot be
    read or cloned is a refusal, before anything ran."""
    with ExitStack() as stack:
        try:
            directory = stack.enter_context(checked_out(chosen))
        except JobSourceError as exc:
            raise PreflightRefused(str(exc), nothing="ran") from None
        yield directory
