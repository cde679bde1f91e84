"""Runbook steps on PostgreSQL's roles: the superuser's login, and the roles and database the
inventory names."""

from __future__ import annotations

from dataclasses import dataclass, field

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
        except AuthenticationFailed as exc:
            refusals.append(f"{name}: the superuser password in block {cluster!r} is wrong ({exc})")
        except DatabaseUnavailable:
            continue  # not accepting connections yet: nothing to check
    say("Superuser login works where PostgreSQL runs." if not refusals else "; ".join(refusals))
    return LoginCheck(tuple(refusals))


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
    return say("; ".join(actions) + "." if actions else "Roles and application database already in place; nothing changed.")
