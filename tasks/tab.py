"""Runbook steps for TAB jobs: PgQuartz job files run as Prefect tasks on the live cluster."""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
from prefect import get_run_logger

from tasks.adapters.commands import cmd
from tasks.adapters.postgres import DatabaseError, Postgres, pgsql
from tasks.context import context_for
from tasks.errors import BouwsteenError
from tasks.ha import read_view
from tasks.pgquartz import (
    ROLE_QUERY,
    Check,
    Command,
    Job,
    Output,
    check_passed,
    effective_role,
    format_sql_rows,
    instance_env,
    load_job,
    read_script,
    render_sql,
    role_problem,
    run_commands,
    split_batch,
)
from tasks.runtime import say, step


class JobSourceError(BouwsteenError, ValueError):
    pass


def fetch_job_source(source: str, revision: str = "main") -> Path:
    """A directory as is; a git URL cloned (shallow, the given revision) into a temp directory."""
    if source.startswith(("http://", "https://", "ssh://", "git@", "file://")) or source.endswith(".git"):
        target = Path(tempfile.mkdtemp(prefix="bouwsteen-jobs-"))
        result = subprocess.run(["git", "clone", "--quiet", "--depth", "1", "--branch", revision, source, str(target)],
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise JobSourceError(f"source: git clone of {source} at {revision} failed: {result.stderr.strip()[-300:]}")
        return target
    path = Path(source)
    if not path.is_dir():
        raise JobSourceError(f"source: {source} is neither a directory nor a git URL")
    return path


def job_file(directory: Path, name: str) -> Path:
    for suffix in (".yml", ".yaml"):
        candidate = directory / f"{name}{suffix}"
        if candidate.exists():
            return candidate
    known = sorted(p.stem for p in directory.glob("*.y*ml"))
    raise JobSourceError(f"job: no job file {name}.yml in {directory} (found: {', '.join(known) or 'none'})")


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


def _sql(ctx, node: str, job: Job, command: Command, instance: dict, timeout_ms: int) -> tuple[int, list[str], str]:
    """One SQL command on a fresh connection, as pgquartz runs it: first the role check (on that
    connection, before every command), then its statement(s). Returns (rc, rows, error)."""
    conn = job.connections[command.type]
    host = ctx.inventory.host(node)
    params = conn.conn_params
    endpoint = ctx.superuser_endpoint(host, dbname=params.get("dbname", "postgres"))
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
            wanted_user = params.get("user")
            if wanted_user and wanted_user != endpoint.user:
                pg.query(pgsql.SQL("set role {}").format(pgsql.Identifier(wanted_user)))
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


@step(retries=0)
def run_step_instance(cluster: str, job_path: str, step_name: str, instance: dict, node: str, deadline: float) -> dict:
    """One matrix instance of a step on one node: its commands in order, stopping at the first
    failure; the output of a failed command is dropped, as pgquartz does (`run_commands`)."""
    job = load_job(job_path)
    logger = get_run_logger()

    def run(command: Command) -> tuple[int, Output, str]:
        code, stdout, stderr = run_command(cluster, node, job, command, instance, deadline)
        logger.info("%s: %s → rc %d%s", node, command.label, code, f" ({stderr.strip()[:200]})" if code else "")
        return code, stdout, stderr

    outcome = run_commands(job.steps[step_name].commands, run)
    say(f"{step_name}{instance or ''} on {node}: rc {outcome['rc']}.")
    return {"instance": instance, **outcome}


@step(retries=0)
def is_check_passing(cluster: str, job_path: str, index: int, instance: dict, node: str, deadline: float) -> dict:
    job = load_job(job_path)
    check: Check = job.checks[index]
    rc, stdout, stderr = run_command(cluster, node, job, check, instance, deadline)
    # pgquartz matches a shell check's stdout and stderr separately, a SQL check's rows only.
    passed, reason = check_passed(check, rc, stdout, stderr)
    say(f"check {check.label}{instance or ''} on {node}: {'passed' if passed else 'FAILED'} ({reason}).")
    return {"check": check.label, "instance": instance, "node": node, "passed": passed, "reason": reason}


