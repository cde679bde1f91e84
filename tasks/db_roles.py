"""Runbook steps on PostgreSQL's roles: the superuser's login, and the roles and database the
inventory names."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from blocks.prefect_blocks import ROLE_NAME
from tasks.adapters.postgres import (
    AuthenticationFailed,
    DatabaseUnavailable,
    Postgres,
    pgsql,
    scram_matches,
    scram_verifier,
)
from tasks.context import context_for
from tasks.ha import require_primary
from tasks.runtime import say, step


@dataclass(frozen=True)
class LoginCheck:
    """is_superuser_login_ok's answer: the login works wherever PostgreSQL already answers."""

    ok: bool = field(init=False)  # no refusals
    refusals: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "ok", not self.refusals)

    def __bool__(self) -> bool:
        return self.ok


@step(retries=1)
def is_superuser_login_ok(cluster: str, hosts: list[str]) -> LoginCheck:
    """With PostgreSQL already running, the block's superuser password must work (else refuse)."""
    ctx = context_for(cluster)
    refusals = []
    for name in hosts:
        spec = ctx.inventory.host(name)
        try:
            with Postgres(ctx.superuser_endpoint(spec)) as pg:
                pg.scalar("select 1")
                if ctx.inventory.cluster.tls.enabled:
                    # The login took the superuser's certificate, not the password: the block's
                    # password must still be this cluster's (Patroni and the keeper use it).
                    stored = pg.query_one("select rolpassword from pg_authid where rolname = current_user")
                    if not scram_matches(stored[0] if stored else None, ctx.db_secrets.superuser_password):
                        refusals.append(f"{name}: the superuser password in block {cluster!r} is wrong (it does "
                                        "not match the server's SCRAM verifier)")
        except AuthenticationFailed as exc:
            what = "certificate (cluster CA)" if ctx.inventory.cluster.tls.enabled else "password"
            refusals.append(f"{name}: the superuser {what} in block {cluster!r} is wrong ({exc})")
        except DatabaseUnavailable:
            continue  # not accepting connections yet: nothing to check
    say("Superuser login works where PostgreSQL runs." if not refusals else "; ".join(refusals))
    return LoginCheck(tuple(refusals))


def clone_login_sql(superuser: str, superuser_password: str, replication_user: str,
                    replication_password: str) -> str:
    """SQL that gives a cloned database the clone's own superuser and replication logins (a clone
    arrives with the source's): run on the restored copy before its HA manager, which logs in as
    both, starts. SCRAM verifiers only, never the passwords; a role the source lacks is created."""
    statements = []
    for role, password, attributes in ((superuser, superuser_password, "SUPERUSER LOGIN"),
                                       (replication_user, replication_password, "REPLICATION LOGIN")):
        if not re.fullmatch(ROLE_NAME, role):  # the block's own rule, again where it meets SQL text
            raise ValueError(f"role name {role!r}: not a plain PostgreSQL role name")
        verifier = scram_verifier(password)
        statements.append(
            "DO $clone$ BEGIN\n"
            f"  IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN\n"
            f"    ALTER ROLE \"{role}\" WITH {attributes} PASSWORD '{verifier}';\n"
            "  ELSE\n"
            f"    CREATE ROLE \"{role}\" WITH {attributes} PASSWORD '{verifier}';\n"
            "  END IF;\n"
            "END $clone$;\n")
    return "".join(statements)


@step
def ensure_roles(cluster: str) -> str:
    """Application and monitoring roles and the application database; passwords as SCRAM verifiers."""
    ctx = context_for(cluster)
    inv = ctx.inventory
    blocks = ctx.db_blocks
    assert blocks is not None
    primary = require_primary(ctx, "to create roles on")
    wanted = [
        (blocks.replication_user, blocks.replication_password.get_secret_value(), "REPLICATION"),
        (blocks.application_user, blocks.application_password.get_secret_value(), ""),
    ]
    if blocks.monitor_password is not None:
        wanted.append((blocks.monitor_user, blocks.monitor_password.get_secret_value(), ""))
    actions = []
    with Postgres(ctx.superuser_endpoint(primary)) as pg:
        for role, password, extra in wanted:
            stored = pg.query_one("select rolpassword from pg_authid where rolname = %s", [role])
            if stored is None:
                pg.query(pgsql.SQL("create role {} login " + extra + " password {}").format(
                    pgsql.Identifier(role), pgsql.Literal(scram_verifier(password))))
                actions.append(f"created role {role}")
            elif not scram_matches(stored[0], password):
                pg.query(pgsql.SQL("alter role {} password {}").format(
                    pgsql.Identifier(role), pgsql.Literal(scram_verifier(password))))
                actions.append(f"set password of {role}")
        database = inv.cluster.postgres.application_database
        if pg.scalar("select count(*) from pg_database where datname = %s", [database]) == 0:
            pg.query(pgsql.SQL("create database {} owner {}").format(
                pgsql.Identifier(database), pgsql.Identifier(blocks.application_user)))
            actions.append(f"created database {database}")
        if blocks.monitor_password is not None:
            # The primary detector's heartbeat (pgroute66's table; tasks/programs/primary_detector.py)
            # in the database it logs in to. Made here, so the monitor role needs no CREATE on public:
            # owned by the application role, the monitor role may only read and write its row.
            if pg.scalar("select to_regclass('public.pgr66_avc') is null"):
                pg.query("create table if not exists public.pgr66_avc (pgr66_avc timestamp)")
                pg.query("insert into public.pgr66_avc (pgr66_avc) values (clock_timestamp() at time zone 'UTC')")
                pg.query(pgsql.SQL("alter table public.pgr66_avc owner to {}").format(
                    pgsql.Identifier(blocks.application_user)))
                actions.append("created table public.pgr66_avc")
            if not pg.scalar("select bool_and(has_table_privilege(%s, 'public.pgr66_avc', p)) "
                             "from unnest(array['select', 'insert', 'update']) p", [blocks.monitor_user]):
                pg.query(pgsql.SQL("grant select, insert, update on public.pgr66_avc to {}").format(
                    pgsql.Identifier(blocks.monitor_user)))
                actions.append(f"granted select, insert, update on public.pgr66_avc to {blocks.monitor_user}")
    return say("; ".join(actions) + "." if actions else "Roles and application database already in place; nothing changed.")


# --------------------------------------------------------------------------- the TAB job role
# SQL steps of TAB jobs log in as this role, never as the superuser (tasks/planning/job_role.py).
# Imported here, with the steps they serve, so this section stays one block at the module's end.

from tasks.adapters.postgres import DatabaseError  # noqa: E402
from tasks.context import ClusterContext  # noqa: E402
from tasks.errors import PreflightRefused, VerifyFailed  # noqa: E402
from tasks.planning.job_role import (  # noqa: E402
    FACTS_MEMBERSHIP_QUERY,
    FACTS_REACH_QUERY,
    FACTS_ROLE_QUERY,
    JobRole,
    JobRoleFacts,
    JobRolePlan,
    RoleAttributes,
    change_statements,
    plan_job_role,
)


def job_role_of(ctx: ClusterContext) -> JobRole:
    """The job role of the cluster: login name and password from the database-credentials block,
    memberships from `cluster.jobs.member_of` (unset: the application role)."""
    blocks = ctx.db_blocks
    if blocks is None:
        raise LookupError(f"no database-credentials block named {ctx.name!r}; run `bouwsteen blocks register`")
    configured = ctx.inventory.cluster.jobs.member_of
    return JobRole(user=blocks.job_user,
                   password=blocks.job_password.get_secret_value() if blocks.job_password else None,
                   member_of=tuple(configured if configured is not None else [blocks.application_user]))


def _job_role_facts(pg: Postgres, role: JobRole, password: str) -> JobRoleFacts:
    row = pg.query_one(FACTS_ROLE_QUERY, [role.user])
    reach: dict[str, list[RoleAttributes]] = {}
    for wanted, *target in pg.query(FACTS_REACH_QUERY, [list(role.member_of)]):
        reach.setdefault(wanted, []).append(RoleAttributes(*target))
    return JobRoleFacts(
        role=None if row is None else RoleAttributes(row[0], *row[1:8]),
        password_ok=row is not None and scram_matches(row[8], password),
        member_of=tuple(r[0] for r in pg.query(FACTS_MEMBERSHIP_QUERY, [role.user])) if row is not None else (),
        reach={k: tuple(v) for k, v in reach.items()},
    )


def _no_password(cluster: str, role: JobRole) -> str:
    return (f"the database-credentials block {cluster!r} has no job_password: SQL steps log in as {role.user} "
            "with it (`bouwsteen blocks register` generates one, or set it in the block)")


@step(retries=1)
def is_job_role_safe(cluster: str) -> JobRolePlan:
    """Pre-flight, read-only: one snapshot of the job role on the primary and what `ensure_job_role`
    would change; `ok` is False (with the reasons) when the configured memberships are unsafe."""
    ctx = context_for(cluster)
    role = job_role_of(ctx)
    if role.password is None:
        plan = JobRolePlan(role.user, role.member_of, refusals=(_no_password(cluster, role),))
    else:
        with Postgres(ctx.superuser_endpoint(require_primary(ctx, "to read the job role on"))) as pg:
            plan = plan_job_role(role.user, role.member_of, _job_role_facts(pg, role, role.password))
    say(f"Job role {role.user}: {plan.summary}" if plan.ok else f"Job role {role.user} refused: {plan.summary}",
        warning=not plan.ok)
    return plan


@step
def ensure_job_role(cluster: str) -> str:
    """The job role as configured: LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION
    NOBYPASSRLS NOINHERIT, the block's password (as a SCRAM verifier), exactly the configured
    memberships; verified on a second snapshot. Idempotent."""
    ctx = context_for(cluster)
    role = job_role_of(ctx)
    if role.password is None:
        raise PreflightRefused(_no_password(cluster, role), nothing="ran")
    with Postgres(ctx.superuser_endpoint(require_primary(ctx, "to create the job role on"))) as pg:
        plan = plan_job_role(role.user, role.member_of, _job_role_facts(pg, role, role.password))
        if not plan.ok:
            raise PreflightRefused(*plan.refusals, nothing="ran")
        errors = []
        for change in plan.changes:
            for statement in change_statements(role.user, change, scram_verifier(role.password)):
                try:
                    pg.query(statement)
                except DatabaseError as exc:
                    # Another run (a second tab_job) may have made the same change a moment
                    # ago; the second snapshot below decides whether the role is as wanted.
                    errors.append(str(exc))
        after = plan_job_role(role.user, role.member_of, _job_role_facts(pg, role, role.password))
    if after.changes or not after.ok:
        raise VerifyFailed(f"job role {role.user} is still not as configured: {after.summary}"
                           + (f" ({'; '.join(errors)})" if errors else ""))
    return say(plan.summary)
