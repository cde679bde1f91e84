"""Runbook steps for TAB jobs: PgQuartz job files run as Prefect tasks on the live cluster."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from prefect import get_run_logger

from tasks.adapters.commands import cmd
from tasks.adapters.postgres import DatabaseError, PgEndpoint, Postgres, pgsql
from tasks.context import context_for
from tasks.db_roles import job_role_of
from tasks.ha import read_view
from tasks.pgquartz import (
    GIT_ALLOWED_PROTOCOLS,
    ROLE_QUERY,
    Check,
    Command,
    InstanceResult,
    Job,
    JobSource,
    JobSourceError,
    Output,
    check_passed,
    clone_command,
    effective_role,
    format_sql_rows,
    instance_env,
    job_file,
    load_job,
    read_script,
    render_sql,
    role_problem,
    run_commands,
    split_batch,
)
from tasks.planning.job_role import set_role_target
from tasks.runtime import say, step

__all__ = ["JobSourceError", "checked_out", "job_file", "job_roles", "target_nodes", "run_command",
           "run_step_instance", "is_check_passed", "CheckVerdict", "job_endpoint"]

CLONE_TIMEOUT_S = 300


@contextmanager
def checked_out(source: JobSource) -> Iterator[Path]:
    """The folder of the source's job files for the length of the `with`: a directory as it is; a
    git source cloned (shallow, its one revision) into a fresh temporary folder that is removed
    afterwards, also when the clone or the run fails."""
    if source.git is None:
        directory = source.directory
        if directory is None or not directory.is_dir():
            raise JobSourceError(f"source: {source} is not a directory on this worker")
        yield directory
        return
    parent = Path(tempfile.mkdtemp(prefix="bouwsteen-jobs-"))
    try:
        target = parent / "checkout"
        # No prompt (a run has no terminal) and only the allowed transports, even for redirects.
        env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ALLOW_PROTOCOL": GIT_ALLOWED_PROTOCOLS}
        try:
            result = subprocess.run(clone_command(source, target), capture_output=True, text=True,
                                    timeout=CLONE_TIMEOUT_S, env=env, stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired:
            raise JobSourceError(f"source: git clone of {source} took over {CLONE_TIMEOUT_S} s") from None
        if result.returncode != 0:
            raise JobSourceError(f"source: git clone of {source} failed: {result.stderr.strip()[-300:]}")
        yield target
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def job_roles(job: Job) -> set[str]:
    return {effective_role(job, c) for s in job.steps.values() for c in s.commands if not c.is_shell} - {None}


def target_nodes(cluster: str, job: Job) -> list[str]:
    """Where the job runs, from the live cluster (not the inventory): the nodes whose role
    satisfies every connection's role, as pgquartz's role check would decide on each node."""
    ctx = context_for(cluster)
    view = read_view(ctx)
    roles = job_roles(job)
    nodes = []
    for member in view.members:
        if not member.healthy:
            continue
        role = "primary" if member.role == "primary" else "standby"
        if all(r in ("all", role) for r in roles):
            nodes.append(member.name)
    return nodes


def job_endpoint(ctx, node: str, job: Job, command: Command) -> tuple[PgEndpoint, str | None]:
    """Where a SQL command logs in, and the role it then SETs: always the job role (never the
    superuser), on the node's PostgreSQL, in the connection's database; the role is the
    connection's `user` when that is one of the job role's memberships. Raises JobSourceError
    for any other `user` (pre-flight refuses such a job; this holds if the file changed since)."""
    role = job_role_of(ctx)
    params = job.connections[command.type].conn_params
    target = set_role_target(params.get("user"), role.user)
    if target is not None and target not in role.member_of:
        raise JobSourceError(f"connections.{command.type}.conn_params.user: {target!r} is not a role jobs may act "
                             f"as ({', '.join(role.allowed)})")
    if role.password is None:
        raise JobSourceError(f"the database-credentials block {ctx.name!r} has no job_password")
    host = ctx.inventory.host(node)
    endpoint = PgEndpoint(host=host.name, address=str(host.address), port=ctx.inventory.cluster.postgres.port,
                          user=role.user, password=role.password, dbname=params.get("dbname", "postgres"),
                          tls=ctx.client_tls())
    return endpoint, target


def _sql(ctx, node: str, job: Job, command: Command, instance: dict, timeout_ms: int) -> tuple[int, list[str], str]:
    """One SQL command on a fresh connection, as pgquartz runs it: first the role check (on that
    connection, before every command), then its statement(s). Returns (rc, rows, error)."""
    try:
        endpoint, set_role = job_endpoint(ctx, node, job, command)
    except JobSourceError as exc:
        return 1, [], f"{node}: {exc}"
    text = read_script(job, command)
    statements = split_batch(text) if command.batch_mode else [text]
    lines: list[str] = []
    try:
        with Postgres(endpoint, statement_timeout_ms=timeout_ms) as pg:
            wanted_role = effective_role(job, command)
            if wanted_role not in (None, "all"):
                refused = role_problem(wanted_role, pg.scalar(ROLE_QUERY))
                if refused:
                    return 1, [], f"{node}: {refused}"
            if set_role is not None:
                # The login is the job role: RESET ROLE in the job's SQL returns to it, never higher.
                pg.query(pgsql.SQL("set role {}").format(pgsql.Identifier(set_role)))
            for statement in statements:
                query, args = render_sql(statement, instance)
                conn_ = pg.connect()
                with conn_.cursor() as cur:
                    cur.execute(query, args)
                    if cur.description:
                        lines += format_sql_rows([d.name for d in cur.description], cur.fetchall())
    except DatabaseError as exc:
        return 1, lines, str(exc)
    except psycopg.Error as exc:  # raised by the cursor itself, not through the adapter
        return 1, lines, str(exc).strip()
    return 0, lines, ""


def _shell(ctx, node: str, job: Job, command: Command, instance: dict, timeout_s: float) -> tuple[int, str, str]:
    text = read_script(job, command)
    env = instance_env(instance)
    # With a matrix pgquartz passes only the PGQ_INSTANCE_* variables; without one, the environment.
    argv = ["env", "-i", *[f"{k}={v}" for k, v in env.items()], "/bin/bash", "-c", text] if instance else \
        ["/bin/bash", "-c", text]
    with ctx.remote(node) as remote:
        result = remote.run(cmd(*argv, user="postgres", timeout=timeout_s, ok_codes=range(0, 256),
                                description=f"{command.label} on {node}"), check=False)
    return result.exit_code, result.stdout, result.stderr


def run_command(cluster: str, node: str, job: Job, command: Command, instance: dict,
                deadline: float) -> tuple[int, Output, str]:
    """(rc, stdout, stderr): shell stdout as text, SQL stdout as its rows (`format_sql_rows`)."""
    ctx = context_for(cluster)
    remaining = max(deadline - time.monotonic(), 1.0)
    if command.is_shell:
        return _shell(ctx, node, job, command, instance, remaining)
    return _sql(ctx, node, job, command, instance, int(remaining * 1000))


@dataclass(frozen=True)
class CheckVerdict:
    """One check instance on one node: `ok` is the verdict, `reason` says why ("ok" when it passed)."""

    check: str
    node: str
    ok: bool
    reason: str
    instance: Mapping[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.ok

    def as_dict(self) -> dict:
        """The flow's result and report keep their keys: check, instance, node, passed, reason."""
        return {"check": self.check, "instance": dict(self.instance), "node": self.node, "passed": self.ok,
                "reason": self.reason}


@step(retries=0)
def run_step_instance(cluster: str, job_path: str, step_name: str, instance: dict, node: str,
                      deadline: float) -> InstanceResult:
    """One matrix instance of a step on one node: its commands in order, stopping at the first
    failure; the output of a failed command is dropped, as pgquartz does (`run_commands`)."""
    job = load_job(job_path)
    logger = get_run_logger()

    def run(command: Command) -> tuple[int, Output, str]:
        code, stdout, stderr = run_command(cluster, node, job, command, instance, deadline)
        logger.info("%s: %s → rc %d%s", node, command.label, code, f" ({stderr.strip()[:200]})" if code else "")
        return code, stdout, stderr

    outcome = run_commands(job.steps[step_name].commands, run, instance)
    say(f"{step_name}{instance or ''} on {node}: rc {outcome.rc}.")
    return outcome


@step(retries=0)
def is_check_passed(cluster: str, job_path: str, index: int, instance: dict, node: str,
                    deadline: float) -> CheckVerdict:
    job = load_job(job_path)
    check: Check = job.checks[index]
    rc, stdout, stderr = run_command(cluster, node, job, check, instance, deadline)
    # pgquartz matches a shell check's stdout and stderr separately, a SQL check's rows only.
    passed, reason = check_passed(check, rc, stdout, stderr)
    say(f"check {check.label}{instance or ''} on {node}: {'passed' if passed else 'FAILED'} ({reason}).")
    return CheckVerdict(check=check.label, node=node, ok=passed, reason=reason, instance=dict(instance))
