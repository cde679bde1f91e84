"""Pure decisions for the TAB job role: the login role that jobs' SQL steps run as.

SQL steps never log in as the superuser. They log in as the job role (`DatabaseCredentials.
job_user`, default `bouwsteen_job`), which is

* LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS NOINHERIT, and
* a member of exactly the roles the cluster's configuration grants (`cluster.jobs.member_of`,
  default: the application role), none of which may lead to a superuser, CREATEROLE,
  REPLICATION, BYPASSRLS or the server's files and programs.

A job's connection names the role its SQL acts as in `conn_params.user`: the job role itself
(or no user), or one of those roles, which the runner then `SET ROLE`s to. `RESET ROLE` or a
`SET ROLE` in the job's own SQL can only ever land on the job role or those roles, because the
session user is the job role: PostgreSQL lets a session become only roles its login is a
member of. NOINHERIT keeps the granted roles' privileges off the bare job role.

The step (`tasks.db_roles`) reads one snapshot (`JobRoleFacts`) from the primary; `plan_job_role`
decides; `change_statements` renders what to run. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from psycopg import sql as pgsql

from tasks.pgquartz import Job
from tasks.planning.plan import Action

__all__ = [
    "JOB_ROLE_ATTRIBUTES", "SERVER_ACCESS_ROLES", "JobRole", "RoleAttributes", "JobRoleFacts", "RoleChange", "JobRolePlan",
    "plan_job_role", "change_statements", "connection_user_refusals", "set_role_target", "job_uses_sql",
    "FACTS_ROLE_QUERY", "FACTS_MEMBERSHIP_QUERY", "FACTS_REACH_QUERY",
]

# The job role's attributes, as ALTER ROLE takes them.
JOB_ROLE_ATTRIBUTES = ("LOGIN", "NOSUPERUSER", "NOCREATEDB", "NOCREATEROLE", "NOREPLICATION", "NOBYPASSRLS",
                       "NOINHERIT")
# Predefined roles that reach the server's files or run programs as the server's OS user: a job
# that may become one of them can become the superuser.
SERVER_ACCESS_ROLES = frozenset({"pg_execute_server_program", "pg_read_server_files", "pg_write_server_files"})

# The snapshot, read as the superuser on the primary (pg_authid holds the password verifier).
FACTS_ROLE_QUERY = ("select rolname, rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls, "
                    "rolinherit, rolcanlogin, rolpassword from pg_authid where rolname = %s")
FACTS_MEMBERSHIP_QUERY = ("select g.rolname from pg_auth_members m join pg_roles g on g.oid = m.roleid "
                          "join pg_roles u on u.oid = m.member where u.rolname = %s order by 1")
# Every role each wanted role can become (itself included), with the attributes that matter.
FACTS_REACH_QUERY = ("select r.rolname, g.rolname, g.rolsuper, g.rolcreaterole, g.rolcreatedb, g.rolreplication, "
                     "g.rolbypassrls, g.rolinherit, g.rolcanlogin from pg_roles r join pg_roles g "
                     "on pg_has_role(r.oid, g.oid, 'MEMBER') where r.rolname = any(%s) order by 1, 2")


@dataclass(frozen=True)
class JobRole:
    """Who SQL steps log in as: `user` with `password` (from the encrypted block, never shown),
    and the roles it is a member of, i.e. the roles a job's connection may act as."""

    user: str
    password: str | None = field(repr=False)
    member_of: tuple[str, ...] = ()

    @property
    def allowed(self) -> tuple[str, ...]:
        return (self.user, *self.member_of)


@dataclass(frozen=True)
class RoleAttributes:
    name: str
    superuser: bool = False
    createrole: bool = False
    createdb: bool = False
    replication: bool = False
    bypassrls: bool = False
    inherit: bool = True
    login: bool = False

    @property
    def powers(self) -> tuple[str, ...]:
        """What makes a role unfit for jobs to become: the attributes and predefined roles that
        lead to the superuser, other roles, replication, past row security or the server's OS."""
        found = tuple(word for word, has in (("SUPERUSER", self.superuser), ("CREATEROLE", self.createrole),
                                             ("REPLICATION", self.replication), ("BYPASSRLS", self.bypassrls))
                      if has)
        return found + (("server file/program access",) if self.name in SERVER_ACCESS_ROLES else ())

    @property
    def is_job_role_shaped(self) -> bool:
        return (self.login and not self.inherit and not self.createdb and not self.powers)


@dataclass(frozen=True)
class JobRoleFacts:
    """One snapshot of the primary: the job role (None: it does not exist), whether the block's
    password is its password, the roles it is a direct member of, and for every wanted role the
    roles it can become (itself included; a wanted role that does not exist is absent)."""

    role: RoleAttributes | None = None
    password_ok: bool = False
    member_of: tuple[str, ...] = ()
    reach: Mapping[str, tuple[RoleAttributes, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class RoleChange:
    kind: Literal["create", "attributes", "password", "grant", "revoke"]
    role: str  # the job role, or the role granted / revoked
    sentence: str


@dataclass(frozen=True)
class JobRolePlan:
    """What to change on the job role; `ok` is False when the configuration must not be applied."""

    user: str
    member_of: tuple[str, ...]
    changes: tuple[RoleChange, ...] = ()
    refusals: tuple[str, ...] = ()
    ok: bool = field(init=False)  # no refusals

    def __post_init__(self) -> None:
        object.__setattr__(self, "ok", not self.refusals)

    def __bool__(self) -> bool:
        return self.ok

    @property
    def summary(self) -> str:
        if self.refusals:
            return "; ".join(self.refusals)
        if not self.changes:
            return f"Job role {self.user} already in place ({self.grants_text}); nothing changed."
        return "; ".join(c.sentence for c in self.changes) + "."

    @property
    def grants_text(self) -> str:
        return f"member of {', '.join(self.member_of)}" if self.member_of else "member of no role"

    def actions(self, where: str) -> tuple[Action, ...]:
        return tuple(Action(where, c.sentence) for c in self.changes)


def plan_job_role(user: str, member_of: Sequence[str], facts: JobRoleFacts) -> JobRolePlan:
    """Converge the job role to its attributes, its password and exactly `member_of`; refuse a
    membership that is missing on the server or that would let a job reach a powerful role."""
    wanted = tuple(dict.fromkeys(member_of))
    refusals: list[str] = []
    for role in wanted:
        if role == user:
            refusals.append(f"cluster.jobs.member_of: {role!r} is the job role itself")
            continue
        reach = facts.reach.get(role)
        if not reach:
            refusals.append(f"cluster.jobs.member_of: role {role!r} does not exist on the primary (create it, "
                            "or run build_cluster for the application role)")
            continue
        for target in reach:
            if target.powers:
                via = "" if target.name == role else f" (through its membership in {target.name!r})"
                refusals.append(f"cluster.jobs.member_of: role {role!r} has {', '.join(target.powers)}{via}; "
                                f"a job that may SET ROLE {role} could do anything: grant jobs a role without "
                                "SUPERUSER, CREATEROLE, REPLICATION, BYPASSRLS or server file/program access")
                break
    if refusals:
        return JobRolePlan(user, wanted, refusals=tuple(refusals))
    attributes = " ".join(JOB_ROLE_ATTRIBUTES)
    changes: list[RoleChange] = []
    if facts.role is None:
        changes.append(RoleChange("create", user, f"create role {user} ({attributes}) with the block's password"))
    else:
        if not facts.role.is_job_role_shaped:
            changes.append(RoleChange("attributes", user, f"set role {user} to {attributes}"))
        if not facts.password_ok:
            changes.append(RoleChange("password", user, f"set the password of {user} from the block"))
    current = set(facts.member_of) if facts.role is not None else set()
    for role in wanted:
        if role not in current:
            changes.append(RoleChange("grant", role, f"grant {role} to {user}"))
    for role in sorted(current - set(wanted)):
        changes.append(RoleChange("revoke", role, f"revoke {role} from {user} (not in cluster.jobs.member_of)"))
    return JobRolePlan(user, wanted, changes=tuple(changes))


def change_statements(user: str, change: RoleChange, verifier: str) -> list[pgsql.Composed]:
    """The SQL of one change; `verifier` is the password's SCRAM verifier (never the plaintext)."""
    job = pgsql.Identifier(user)
    attributes = pgsql.SQL(" ".join(JOB_ROLE_ATTRIBUTES))
    if change.kind == "create":
        return [pgsql.SQL("create role {} {} password {}").format(job, attributes, pgsql.Literal(verifier))]
    if change.kind == "attributes":
        return [pgsql.SQL("alter role {} {}").format(job, attributes)]
    if change.kind == "password":
        return [pgsql.SQL("alter role {} password {}").format(job, pgsql.Literal(verifier))]
    if change.kind == "grant":
        return [pgsql.SQL("grant {} to {}").format(pgsql.Identifier(change.role), job)]
    return [pgsql.SQL("revoke {} from {}").format(pgsql.Identifier(change.role), job)]


# --------------------------------------------------------------------------- the job's side


def job_uses_sql(job: Job) -> bool:
    """Whether any step command or check of the job is SQL (a shell-only job needs no job role)."""
    commands = [c for s in job.steps.values() for c in s.commands] + list(job.checks)
    return any(not c.is_shell for c in commands)


def set_role_target(conn_user: str | None, user: str) -> str | None:
    """The role to SET ROLE to after logging in as the job role `user`; None: act as the job role."""
    return conn_user if conn_user and conn_user != user else None


def connection_user_refusals(job: Job, user: str, member_of: Sequence[str]) -> list[str]:
    """Each connection of the job whose `conn_params.user` names a role jobs may not act as: only
    the job role itself and the roles of `member_of` are allowed (the superuser never is)."""
    allowed = [user, *member_of]
    refusals = []
    for name, conn in job.connections.items():
        wanted = conn.conn_params.get("user")
        if set_role_target(wanted, user) is not None and wanted not in allowed:
            refusals.append(f"{job.source}: connections.{name}.conn_params.user: {wanted!r} is not a role jobs may "
                            f"act as; SQL steps log in as {user} and may act as "
                            f"{', '.join(allowed)} (cluster.jobs.member_of)")
    return refusals
