"""deployments/credentials.py: the server's admin auth string, the ticket credential and the
encryption key live in 0600 files outside the database, and an existing database's key moves out
of it on the first start, so its blocks still decrypt."""

from __future__ import annotations

import json
import sqlite3
import stat
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from deployments import credentials
from deployments.credentials import StoredKeys, key_decision
from tasks.errors import ServiceDidNotStart


@pytest.fixture(autouse=True)
def _default_database(monkeypatch):
    for name in ("PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL"):
        monkeypatch.delenv(name, raising=False)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_auth_strings_are_generated_once_into_private_files(tmp_path):
    admin = credentials.admin_auth_string(tmp_path)
    ticket = credentials.ticket_auth_string(tmp_path)
    assert admin.startswith("admin:") and ticket.startswith("ticket:")
    assert len(admin.partition(":")[2]) >= 43 and admin != ticket
    assert credentials.admin_auth_string(tmp_path) == admin  # never regenerated
    assert mode(tmp_path / "auth") == 0o700
    assert mode(tmp_path / "auth" / "admin-auth") == mode(tmp_path / "auth" / "ticket-auth") == 0o600
    assert list((tmp_path / "auth").glob(".*")) == []  # no temporary file left behind


def test_an_auth_string_is_not_created_where_only_read(tmp_path):
    assert credentials.admin_auth_string(tmp_path, create=False) is None
    assert not (tmp_path / "auth" / "admin-auth").exists()


def test_write_once_keeps_the_first_value_and_tightens_a_loosened_file(tmp_path):
    path = tmp_path / "auth" / "x"
    assert credentials.write_once(path, "first") == "first"
    assert credentials.write_once(path, "second") == "first"
    path.chmod(0o644)
    assert credentials.read_secret(path) == "first" and mode(path) == 0o600


@pytest.mark.parametrize("content", ["", "no-colon", ":nouser", "user:", "a:b\nc:d"])
def test_a_malformed_auth_file_is_refused_with_its_path(tmp_path, content):
    (tmp_path / "auth").mkdir(mode=0o700)
    (tmp_path / "auth" / "admin-auth").write_text(content)
    with pytest.raises(ServiceDidNotStart, match="admin-auth"):
        credentials.admin_auth_string(tmp_path)


def test_password_digest_is_salted_sha256():
    import hashlib

    assert credentials.password_digest("pw", "salt") == hashlib.sha256(b"salt:pw").hexdigest()
    assert credentials.password_digest("pw", "salt") != credentials.password_digest("pw", "other")


@pytest.mark.parametrize("file_key, stored, expected", [
    ("FILE", None, ("file", None)),
    ("FILE", StoredKeys("DB", {}), ("file", None)),
    (None, None, ("new", None)),
    (None, StoredKeys(None, {}), ("new", None)),
    (None, StoredKeys("DB", {"Secret/x": "…"}), ("seed", "DB")),
])
def test_key_decision(file_key, stored, expected):
    assert key_decision(file_key, stored) == expected


@pytest.mark.parametrize("url, expected", [
    ("sqlite+aiosqlite:////var/lib/x/prefect.db", "sqlite:////var/lib/x/prefect.db"),
    ("postgresql+asyncpg://u:p@h:5432/prefect", "postgresql+psycopg://u:p@h:5432/prefect"),
])
def test_sync_url(url, expected):
    assert credentials.sync_url(url) == expected


def test_database_url_defaults_to_the_homes_sqlite_file(tmp_path, monkeypatch):
    assert credentials.database_url(tmp_path) == f"sqlite+aiosqlite:///{tmp_path}/prefect.db"
    assert credentials.database_url(tmp_path, "postgresql+asyncpg://x") == "postgresql+asyncpg://x"
    monkeypatch.setenv("PREFECT_SERVER_DATABASE_HOST", "db.example")
    assert credentials.database_url(tmp_path) is None  # configured in parts: not checked


def prefect_db(path: Path, key: str | None, secrets: dict[str, dict]) -> None:
    """The two tables of a Prefect database this check reads, as Prefect writes them."""
    with sqlite3.connect(path) as db:
        db.execute("create table configuration (id text, key text unique, value json)")
        db.execute("create table block_document (id text, name text, block_type_name text, data json)")
        if key:
            db.execute("insert into configuration values ('1', 'ENCRYPTION_KEY', ?)", [json.dumps({"fernet_key": key})])
        for name, data in secrets.items():
            blob = Fernet(key.encode()).encrypt(json.dumps(data).encode()).decode()
            db.execute("insert into block_document values (?, ?, 'Secret', ?)", [name, name, json.dumps(blob)])


def configured(path: Path) -> list:
    with sqlite3.connect(path) as db:
        return db.execute("select key from configuration").fetchall()


def test_a_new_server_gets_a_new_key_in_a_file(tmp_path):
    key = credentials.ensure_encryption_key(tmp_path)
    Fernet(key.encode())
    assert (tmp_path / "auth" / "encryption.key").read_text() == key
    assert mode(tmp_path / "auth" / "encryption.key") == 0o600
    assert credentials.ensure_encryption_key(tmp_path) == key


def test_an_existing_database_key_is_moved_out_and_its_blocks_still_decrypt(tmp_path):
    old = Fernet.generate_key().decode()
    prefect_db(tmp_path / "prefect.db", old, {"ssh": {"private_key": "k"}, "db": {"password": "p"}})
    assert credentials.ensure_encryption_key(tmp_path) == old
    assert (tmp_path / "auth" / "encryption.key").read_text() == old
    assert configured(tmp_path / "prefect.db") == []  # the database no longer holds its own key
    assert credentials.ensure_encryption_key(tmp_path) == old  # the next start: the file, checked


def test_a_key_that_does_not_decrypt_the_blocks_refuses_to_start_naming_file_and_blocks(tmp_path):
    old = Fernet.generate_key().decode()
    prefect_db(tmp_path / "prefect.db", old, {"ssh": {"private_key": "k"}})
    credentials.write_once(tmp_path / "auth" / "encryption.key", Fernet.generate_key().decode())
    with pytest.raises(ServiceDidNotStart) as refused:
        credentials.ensure_encryption_key(tmp_path)
    message = str(refused.value)
    assert "1 of 1 block documents" in message and "Secret/ssh" in message and "encryption.key" in message
    assert "still stored in the database itself" in message  # the way out: adopt the database's key
    assert configured(tmp_path / "prefect.db") == [("ENCRYPTION_KEY",)]  # nothing deleted on a refusal


def test_a_key_file_that_is_not_a_fernet_key_is_refused(tmp_path):
    credentials.write_once(tmp_path / "auth" / "encryption.key", "not-a-key")
    with pytest.raises(ServiceDidNotStart, match="not a Fernet key"):
        credentials.ensure_encryption_key(tmp_path)


def test_every_client_process_gets_the_admin_auth_string_and_never_the_servers_secrets(tmp_path, monkeypatch):
    from deployments.server import base_environment

    monkeypatch.setenv("BOUWSTEEN_PREFECT_HOME", str(tmp_path))
    monkeypatch.delenv("PREFECT_API_AUTH_STRING", raising=False)
    env = base_environment()
    assert env["PREFECT_API_AUTH_STRING"] == (tmp_path / "auth" / "admin-auth").read_text()
    assert not [k for k in env if k.startswith("PREFECT_SERVER_API_AUTH") or "ENCRYPTION" in k]
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", "site:their-own")  # a site's own server
    assert base_environment()["PREFECT_API_AUTH_STRING"] == "site:their-own"


def test_the_ticket_cli_takes_its_credential_from_the_environment_or_the_file(tmp_path, monkeypatch):
    from deployments.tickets import TicketError, ticket_auth

    monkeypatch.setenv("BOUWSTEEN_PREFECT_HOME", str(tmp_path))
    monkeypatch.delenv("BOUWSTEEN_TICKET_AUTH", raising=False)
    with pytest.raises(TicketError, match="ticket-auth"):
        ticket_auth()  # never generated by a client: only the server side creates it
    written = credentials.ticket_auth_string(tmp_path)
    assert ticket_auth() == written
    monkeypatch.setenv("BOUWSTEEN_TICKET_AUTH", "ticket:from-env")
    assert ticket_auth() == "ticket:from-env"
