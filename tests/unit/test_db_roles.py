"""tasks/db_roles.py ensure_roles: the primary detector's heartbeat table and the monitor role's grants."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import SecretStr

from tasks import db_roles
from tasks.adapters.postgres import scram_verifier

TABLE_MISSING = "select to_regclass('public.pgr66_avc') is null"
PRIVILEGES = ("select bool_and(has_table_privilege(%s, 'public.pgr66_avc', p)) "
              "from unnest(array['select', 'insert', 'update']) p")


class FakePg:
    """The primary as ensure_roles sees it: every role and the database exist already."""

    def __init__(self, *, table: bool, granted: bool) -> None:
        self.table, self.granted = table, granted
        self.statements: list[str] = []
        self.params: dict[str, Any] = {}

    def __enter__(self) -> FakePg:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def query(self, statement: Any, params: Any = None) -> list[tuple[Any, ...]]:
        text = statement if isinstance(statement, str) else statement.as_string(None)
        self.params[text] = params
        if text.startswith("select rolpassword"):
            return [(scram_verifier({"repl": "r", "app": "a", "pgroute66": "m"}[params[0]]),)]
        if text.startswith("select count(*) from pg_database"):
            return [(1,)]
        if text == TABLE_MISSING:
            return [(not self.table,)]
        if text == PRIVILEGES:
            return [(self.granted,)]
        self.statements.append(text)
        return []

    def query_one(self, statement: Any, params: Any = None) -> tuple[Any, ...] | None:
        rows = self.query(statement, params)
        return rows[0] if rows else None

    def scalar(self, statement: Any, params: Any = None) -> Any:
        row = self.query_one(statement, params)
        return row[0] if row else None


def _run(monkeypatch: pytest.MonkeyPatch, pg: FakePg, *, monitor: bool = True) -> str:
    blocks = SimpleNamespace(
        replication_user="repl", replication_password=SecretStr("r"),
        application_user="app", application_password=SecretStr("a"),
        monitor_user="pgroute66", monitor_password=SecretStr("m") if monitor else None,
    )
    ctx = SimpleNamespace(
        inventory=SimpleNamespace(cluster=SimpleNamespace(postgres=SimpleNamespace(application_database="app"))),
        db_blocks=blocks, superuser_endpoint=lambda host: "endpoint")
    monkeypatch.setattr(db_roles, "context_for", lambda cluster: ctx)
    monkeypatch.setattr(db_roles, "require_primary", lambda ctx, why: "pg1")
    monkeypatch.setattr(db_roles, "Postgres", lambda endpoint: pg)
    return db_roles.ensure_roles.fn("lab")


def test_the_heartbeat_table_is_made_for_the_detector_without_create_on_public(
        monkeypatch: pytest.MonkeyPatch) -> None:
    pg = FakePg(table=False, granted=False)
    said = _run(monkeypatch, pg)
    assert pg.statements == [
        "create table if not exists public.pgr66_avc (pgr66_avc timestamp)",
        "insert into public.pgr66_avc (pgr66_avc) values (clock_timestamp() at time zone 'UTC')",
        'alter table public.pgr66_avc owner to "app"',  # a non-superuser, not the monitor role
        'grant select, insert, update on public.pgr66_avc to "pgroute66"',
    ]
    assert pg.params[PRIVILEGES] == ["pgroute66"]
    assert said == ("created table public.pgr66_avc; "
                    "granted select, insert, update on public.pgr66_avc to pgroute66.")


@pytest.mark.parametrize(
    ("table", "granted", "statements"),
    [
        (True, True, []),
        (True, False, ['grant select, insert, update on public.pgr66_avc to "pgroute66"']),
    ],
)
def test_the_heartbeat_table_is_left_alone_when_in_place(monkeypatch: pytest.MonkeyPatch, table: bool,
                                                         granted: bool, statements: list[str]) -> None:
    pg = FakePg(table=table, granted=granted)
    said = _run(monkeypatch, pg)
    assert pg.statements == statements
    assert ("nothing changed" in said) is (not statements)


def test_no_heartbeat_table_without_a_monitor_role(monkeypatch: pytest.MonkeyPatch) -> None:
    pg = FakePg(table=False, granted=False)
    _run(monkeypatch, pg, monitor=False)
    assert pg.statements == [] and TABLE_MISSING not in pg.params


def test_a_clone_gets_its_own_logins_as_verifiers_only() -> None:
    from tasks.adapters.postgres import scram_matches
    from tasks.db_roles import clone_login_sql

    sql = clone_login_sql("postgres", "su-secret", "replicator", "repl-secret")
    assert "su-secret" not in sql and "repl-secret" not in sql
    verifiers = [line.split("PASSWORD '")[1].split("'")[0] for line in sql.splitlines() if "ALTER ROLE" in line]
    assert scram_matches(verifiers[0], "su-secret") and scram_matches(verifiers[1], "repl-secret")
    assert 'ALTER ROLE "postgres" WITH SUPERUSER LOGIN' in sql and 'CREATE ROLE "replicator" WITH REPLICATION LOGIN' in sql


def test_a_clone_login_refuses_a_role_name_that_is_not_plain() -> None:
    from tasks.db_roles import clone_login_sql

    with pytest.raises(ValueError, match="not a plain PostgreSQL role name"):
        clone_login_sql("postgres\"; drop table x; --", "a", "replicator", "b")
