"""The TAB job role (issue 14 item 3): SQL steps log in as a role without superuser whose
memberships are exactly what the cluster's configuration grants; its planner as tables."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from pydantic import SecretStr, ValidationError

from blocks import register
from blocks.prefect_blocks import DatabaseCredentials, secret_values
from tasks import db_roles, tab
from tasks.adapters.postgres import scram_verifier
from tasks.pgquartz import ROLE_QUERY, load_job
from tasks.planning.job_role import (
    JobRole,
    JobRoleFacts,
    RoleAttributes,
    RoleChange,
    change_statements,
    connection_user_refusals,
    job_uses_sql,
    plan_job_role,
    set_role_target,
)

SAMPLE_JOB = Path(__file__).resolve().parents[2] / "deployments" / "jobs" / "purge_audit_log.yml"
USER = "bouwsteen_job"
JOB_ROLE = RoleAttributes(USER, inherit=False, login=True)  # as ensure_job_role leaves it
APP = RoleAttributes("app", login=True)


def facts(role: RoleAttributes | None = JOB_ROLE, *, password_ok: bool = True, member_of: tuple[str, ...] = ("app",),
          **reach: tuple[RoleAttributes, ...]) -> JobRoleFacts:
    return JobRoleFacts(role=role, password_ok=password_ok, member_of=member_of, reach=reach or {"app": (APP,)})


# --------------------------------------------------------------------------- the plan


@pytest.mark.parametrize("snapshot, member_of, changes", [
    # a fresh cluster: create it, then grant the application role
    (facts(None, password_ok=False, member_of=()), ["app"], [("create", USER), ("grant", "app")]),
    # converged: a second run changes nothing
    (facts(), ["app"], []),
    # the block's password changed (or someone altered the role's)
    (facts(password_ok=False), ["app"], [("password", USER)]),
    # someone made it a superuser, or gave it CREATEDB, INHERIT or took LOGIN: back to the job role's attributes
    (facts(RoleAttributes(USER, superuser=True, inherit=False, login=True)), ["app"], [("attributes", USER)]),
    (facts(RoleAttributes(USER, createdb=True, inherit=False, login=True)), ["app"], [("attributes", USER)]),
    (facts(RoleAttributes(USER, inherit=True, login=True)), ["app"], [("attributes", USER)]),
    (facts(RoleAttributes(USER, inherit=False, login=False)), ["app"], [("attributes", USER)]),
    # memberships converge to exactly the configured ones
    (facts(member_of=("app", "pg_signal_backend")), ["app"], [("revoke", "pg_signal_backend")]),
    (facts(member_of=("app",), app=(APP,), pg_maintain=(RoleAttributes("pg_maintain"),)), ["app", "pg_maintain"],
     [("grant", "pg_maintain")]),
    (facts(member_of=("app",)), [], [("revoke", "app")]),
])
def test_the_job_role_converges(snapshot: JobRoleFacts, member_of: list[str], changes: list[tuple[str, str]]) -> None:
    plan = plan_job_role(USER, member_of, snapshot)
    assert plan.ok and bool(plan) and not plan.refusals
    assert [(c.kind, c.role) for c in plan.changes] == changes


def test_a_converged_role_says_so() -> None:
    assert plan_job_role(USER, ["app"], facts()).summary == \
        "Job role bouwsteen_job already in place (member of app); nothing changed."
    assert plan_job_role(USER, ["app"], facts(None, password_ok=False, member_of=())).summary == (
        "create role bouwsteen_job (LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS NOINHERIT) "
        "with the block's password; grant app to bouwsteen_job.")


POSTGRES = RoleAttributes("postgres", superuser=True, createrole=True, createdb=True, replication=True,
                          bypassrls=True, login=True)


@pytest.mark.parametrize("member_of, reach, reason", [
    (["app"], {}, "cluster.jobs.member_of: role 'app' does not exist on the primary"),
    (["postgres"], {"postgres": (POSTGRES,)},
     "cluster.jobs.member_of: role 'postgres' has SUPERUSER, CREATEROLE, REPLICATION, BYPASSRLS; a job that may "
     "SET ROLE postgres could do anything"),
    (["admins"], {"admins": (RoleAttributes("admins"), POSTGRES)},
     "role 'admins' has SUPERUSER, CREATEROLE, REPLICATION, BYPASSRLS (through its membership in 'postgres')"),
    (["replicator"], {"replicator": (RoleAttributes("replicator", replication=True, login=True),)},
     "role 'replicator' has REPLICATION"),
    (["owner"], {"owner": (RoleAttributes("owner", createrole=True),)}, "role 'owner' has CREATEROLE"),
    (["rls"], {"rls": (RoleAttributes("rls", bypassrls=True),)}, "role 'rls' has BYPASSRLS"),
    (["pg_write_server_files"], {"pg_write_server_files": (RoleAttributes("pg_write_server_files"),)},
     "has server file/program access"),
    (["etl"], {"etl": (RoleAttributes("etl"), RoleAttributes("pg_execute_server_program"))},
     "through its membership in 'pg_execute_server_program'"),
    ([USER], {USER: (JOB_ROLE,)}, "cluster.jobs.member_of: 'bouwsteen_job' is the job role itself"),
])
def test_memberships_that_reach_power_are_refused(member_of: list[str], reach: dict, reason: str) -> None:
    plan = plan_job_role(USER, member_of, JobRoleFacts(role=None, reach=reach))
    assert not plan.ok and not plan and plan.changes == ()
    assert any(reason in r for r in plan.refusals), plan.refusals


@pytest.mark.parametrize("kind, role, sql", [
    ("create", USER, "create role \"bouwsteen_job\" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION "
                     "NOBYPASSRLS NOINHERIT password 'SCRAM-SHA-256$v'"),
    ("attributes", USER, "alter role \"bouwsteen_job\" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION "
                         "NOBYPASSRLS NOINHERIT"),
    ("password", USER, "alter role \"bouwsteen_job\" password 'SCRAM-SHA-256$v'"),
    ("grant", "app", "grant \"app\" to \"bouwsteen_job\""),
    ("revoke", "pg_signal_backend", "revoke \"pg_signal_backend\" from \"bouwsteen_job\""),
])
def test_change_statements(kind: str, role: str, sql: str) -> None:
    (statement,) = change_statements(USER, RoleChange(kind, role, ""), "SCRAM-SHA-256$v")  # type: ignore[arg-type]
    assert statement.as_string(None) == sql


# --------------------------------------------------------------------------- the job's connections


@pytest.mark.parametrize("conn_user, target", [(None, None), ("", None), (USER, None), ("app", "app"),
                                               ("postgres", "postgres")])
def test_set_role_target(conn_user: str | None, target: str | None) -> None:
    assert set_role_target(conn_user, USER) == target


def _job(tmp_path: Path, user: str | None, *, shell_only: bool = False) -> Any:
    params = {"dbname": "app", **({"user": user} if user is not None else {})}
    command = {"type": "shell", "inline": "true"} if shell_only else {"type": "pg", "inline": "select 1"}
    data = {"parallel": 1, "connections": {"pg": {"role": "primary", "conn_params": params}},
            "steps": {"s": {"commands": [command]}}}
    path = tmp_path / "j.yml"
    path.write_text(yaml.safe_dump(data))
    return load_job(path)


@pytest.mark.parametrize("user, member_of, refused", [
    (None, ("app",), False), (USER, ("app",), False), ("app", ("app",), False), ("app", (), True),
    ("postgres", ("app",), True), ("replicator", ("app",), True), ("pg_write_server_files", ("app",), True),
])
def test_a_connection_acts_only_as_the_job_role_or_its_memberships(tmp_path: Path, user: str | None,
                                                                   member_of: tuple[str, ...], refused: bool) -> None:
    refusals = connection_user_refusals(_job(tmp_path, user), USER, member_of)
    assert bool(refusals) is refused
    if refused:
        assert refusals[0].endswith(f"connections.pg.conn_params.user: {user!r} is not a role jobs may act as; "
                                    f"SQL steps log in as {USER} and may act as "
                                    f"{', '.join((USER, *member_of))} (cluster.jobs.member_of)")


def test_the_shipped_job_acts_as_the_application_role() -> None:
    job = load_job(SAMPLE_JOB)
    assert job_uses_sql(job)
    assert {c.conn_params.get("user") for c in job.connections.values()} == {"app"}
    assert connection_user_refusals(job, USER, ("app",)) == []  # the default: member of the application role


def test_a_shell_only_job_needs_no_job_role(tmp_path: Path) -> None:
    assert not job_uses_sql(_job(tmp_path, None, shell_only=True))


# --------------------------------------------------------------------------- at run time: log in as the job role


class Recorder:
    def __init__(self) -> None:
        self.logins: list[Any] = []
        self.statements: list[str] = []

    def postgres(self, endpoint: Any, *, statement_timeout_ms: int) -> Any:
        rec = self
        rec.logins.append(endpoint)

        class Cursor:
            description = None

            def __enter__(self) -> Any:
                return self

            def __exit__(self, *exc: object) -> None:
                pass

            def execute(self, query: str, args: Any) -> None:
                rec.statements.append(query)

        class Pg:
            def __enter__(self) -> Any:
                return self

            def __exit__(self, *exc: object) -> None:
                pass

            def scalar(self, query: str) -> str:
                assert query == ROLE_QUERY
                return "primary"

            def query(self, statement: Any) -> list:
                rec.statements.append(statement.as_string(None) if hasattr(statement, "as_string") else statement)
                return []

            def connect(self) -> Any:
                return SimpleNamespace(cursor=Cursor)

        return Pg()


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder()
    inventory = SimpleNamespace(host=lambda name: SimpleNamespace(name=name, address="10.0.0.11"),
                                cluster=SimpleNamespace(postgres=SimpleNamespace(port=5432)))
    monkeypatch.setattr(tab, "context_for", lambda cluster: SimpleNamespace(name="lab", inventory=inventory,
                                                                               client_tls=lambda role=None: None))
    monkeypatch.setattr(tab, "job_role_of", lambda ctx: JobRole(USER, "job-pw", ("app",)))
    monkeypatch.setattr(tab, "Postgres", rec.postgres)
    monkeypatch.setattr(tab, "get_run_logger", lambda: logging.getLogger("tests.tab"))
    return rec


def test_sql_logs_in_as_the_job_role_and_sets_the_connections_role(tmp_path: Path, recorder: Recorder) -> None:
    job = _job(tmp_path, "app")
    rc, _, error = tab.run_command("lab", "pg1", job, job.steps["s"].commands[0], {}, time.monotonic() + 60)
    assert (rc, error) == (0, "")
    (login,) = recorder.logins
    assert (login.user, login.password, login.dbname, login.address, login.port) == \
        (USER, "job-pw", "app", "10.0.0.11", 5432)
    assert recorder.statements == ['set role "app"', "select 1"]


def test_a_connection_without_user_acts_as_the_job_role(tmp_path: Path, recorder: Recorder) -> None:
    job = _job(tmp_path, None)
    assert tab.run_command("lab", "pg1", job, job.steps["s"].commands[0], {}, time.monotonic() + 60)[0] == 0
    assert recorder.statements == ["select 1"] and recorder.logins[0].user == USER


def test_a_connection_user_refused_at_run_time_never_connects(tmp_path: Path, recorder: Recorder) -> None:
    # Pre-flight refuses such a job; a directory source edited during the run meets this.
    job = _job(tmp_path, "postgres")
    rc, rows, error = tab.run_command("lab", "pg1", job, job.steps["s"].commands[0], {}, time.monotonic() + 60)
    assert (rc, rows) == (1, []) and recorder.logins == []
    assert error == "pg1: connections.pg.conn_params.user: 'postgres' is not a role jobs may act as " \
                    "(bouwsteen_job, app)"


# --------------------------------------------------------------------------- where the role and password come from


def _blocks(**over: Any) -> DatabaseCredentials:
    fields: dict[str, Any] = {"superuser_password": SecretStr("s"), "replication_password": SecretStr("r"),
                              "application_password": SecretStr("a")}
    return DatabaseCredentials(**{**fields, **over})


def test_the_job_role_of_a_cluster() -> None:
    jobs = SimpleNamespace(member_of=None)
    ctx = SimpleNamespace(name="lab", db_blocks=_blocks(job_password=SecretStr("s3cret-job")),
                          inventory=SimpleNamespace(cluster=SimpleNamespace(jobs=jobs)))
    role = db_roles.job_role_of(ctx)
    assert (role.user, role.password, role.member_of) == ("bouwsteen_job", "s3cret-job", ("app",))
    assert "s3cret-job" not in repr(role)
    jobs.member_of = ["reporting", "pg_maintain"]
    assert db_roles.job_role_of(ctx).member_of == ("reporting", "pg_maintain")
    jobs.member_of = []
    assert db_roles.job_role_of(ctx).member_of == ()
    ctx.db_blocks = _blocks()
    assert db_roles.job_role_of(ctx).password is None


@pytest.mark.parametrize("field", ["superuser", "replication_user", "application_user", "monitor_user"])
def test_the_job_user_is_a_role_of_its_own(field: str) -> None:
    name = getattr(_blocks(), field)
    with pytest.raises(ValidationError, match=f"job_user: {name!r} is already the {field}"):
        _blocks(job_user=name)


@pytest.mark.parametrize("bad", ["Job", "job-role", "job role", "1job", "x" * 64])
def test_the_job_user_is_a_plain_role_name(bad: str) -> None:
    with pytest.raises(ValidationError, match="job_user"):
        _blocks(job_user=bad)


def test_the_job_password_is_a_masked_one_line_secret() -> None:
    blocks = _blocks(job_password=SecretStr("job-secret"))
    assert "job-secret" not in repr(blocks) and "job-secret" in secret_values(blocks)
    with pytest.raises(ValidationError, match="job_password"):
        _blocks(job_password=SecretStr("two\nlines"))


def test_registration_keeps_the_job_password(monkeypatch: pytest.MonkeyPatch) -> None:
    stored: list[Any] = [ValueError("Unable to find block document named lab")]

    def load(name: str, validate: bool = True) -> Any:
        if isinstance(stored[0], Exception):
            raise stored[0]
        return stored[0]

    monkeypatch.setattr(register.DatabaseCredentials, "load", staticmethod(load))
    assert register._job_password("lab", {"job_password": "given"}).get_secret_value() == "given"
    first = register._job_password("lab", {}).get_secret_value()  # no block yet: a new random one
    assert len(first) >= 32 and first != register._job_password("lab", {}).get_secret_value()
    stored[0] = _blocks(job_password=SecretStr("kept"))
    assert register._job_password("lab", {}).get_secret_value() == "kept"  # registering again changes nothing
    stored[0] = _blocks()
    assert register._job_password("lab", {}).get_secret_value() not in ("", "kept")
    stored[0] = ValueError("server unreachable")
    with pytest.raises(ValueError, match="server unreachable"):
        register._job_password("lab", {})


# --------------------------------------------------------------------------- the snapshot


class Catalog:
    """pg_authid / pg_auth_members / pg_has_role answers as the primary would give them."""

    def __init__(self, role: tuple | None, memberships: list[str], reach: list[tuple]) -> None:
        self.role, self.memberships, self.reach = role, memberships, reach

    def query_one(self, sql: str, params: list) -> tuple | None:
        assert "from pg_authid" in sql and params == [USER]
        return self.role

    def query(self, sql: str, params: list) -> list[tuple]:
        if "pg_has_role" in sql:
            assert params == [["app"]]
            return self.reach
        assert "pg_auth_members" in sql and params == [USER]
        return [(m,) for m in self.memberships]


def test_the_snapshot_reads_attributes_password_and_reach() -> None:
    role = JobRole(USER, "pw", ("app",))
    row = (USER, False, False, False, False, False, False, True, scram_verifier("pw"))
    reach = [("app", "app", False, False, False, False, False, True, True)]
    snapshot = db_roles._job_role_facts(Catalog(row, ["app"], reach), role, "pw")  # type: ignore[arg-type]
    assert snapshot == JobRoleFacts(role=JOB_ROLE, password_ok=True, member_of=("app",),
                                    reach={"app": (RoleAttributes("app", login=True),)})
    assert not plan_job_role(USER, ["app"], snapshot).changes
    missing = db_roles._job_role_facts(Catalog(None, [], reach), role, "pw")  # type: ignore[arg-type]
    assert missing.role is None and not missing.password_ok and missing.member_of == ()
    wrong = db_roles._job_role_facts(Catalog(row, ["app"], reach), role, "other")  # type: ignore[arg-type]
    assert not wrong.password_ok
