"""PostgreSQL over the network with psycopg: short timeouts, typed errors, no Prefect."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import psycopg
from psycopg import sql as pgsql

from tasks.adapters.client_tls import ClientTls
from tasks.errors import BouwsteenError

__all__ = [
    "PgEndpoint", "Postgres", "DatabaseUnavailable", "AuthenticationFailed", "DatabaseError", "UndefinedObject",
    "NodeStatus",
    "ReplicaLink", "pgsql", "lsn_to_int",
]


@dataclass(frozen=True, repr=False)
class PgEndpoint:
    host: str  # inventory name, for messages
    address: str
    port: int
    user: str
    password: str
    dbname: str = "postgres"
    connect_timeout: int = 5
    # With several comma-separated addresses: which session libpq keeps (client-side failover).
    target_session_attrs: str | None = None
    # The CA to verify the server against (sslmode=verify-full) and the role's client pair, if any.
    tls: ClientTls | None = None

    def __repr__(self) -> str:
        return f"PgEndpoint({self.user}@{self.host}:{self.port}/{self.dbname})"

    def libpq_extras(self) -> dict[str, str]:
        extras = {"target_session_attrs": self.target_session_attrs} if self.target_session_attrs else {}
        return {**extras, **(self.tls.libpq() if self.tls else {})}


class DatabaseUnavailable(BouwsteenError):
    """Could not connect or the connection broke: transient, worth retrying."""


class AuthenticationFailed(BouwsteenError):
    """The server refused the credentials: never retried, the block holds a wrong password."""


class DatabaseError(BouwsteenError):
    """A statement failed."""


class UndefinedObject(DatabaseError):
    """The statement names a table, schema or object this server does not have (yet): on a standby
    that has not replayed the DDL, a wait's "not yet", not a failure."""


# SQLSTATEs of a missing relation, schema or other object.
_UNDEFINED = (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName, psycopg.errors.UndefinedObject)


@dataclass(frozen=True)
class NodeStatus:
    host: str
    in_recovery: bool
    timeline: int
    lsn: str  # current WAL LSN on a primary, last replayed LSN on a standby
    receive_lsn: str | None
    server_version: int
    last_replay_time: str | None = None


@dataclass(frozen=True)
class ReplicaLink:
    application_name: str
    client_addr: str | None
    state: str
    sync_state: str
    lag_bytes: int | None


def lsn_to_int(lsn: str | None) -> int | None:
    if not lsn:
        return None
    high, low = lsn.split("/")
    return (int(high, 16) << 32) + int(low, 16)


class Postgres:
    def __init__(self, endpoint: PgEndpoint, *, statement_timeout_ms: int = 15000, autocommit: bool = True):
        self.endpoint = endpoint
        self.statement_timeout_ms = statement_timeout_ms
        self.autocommit = autocommit
        self._conn: psycopg.Connection | None = None

    def __enter__(self) -> "Postgres":
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def connect(self) -> psycopg.Connection:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        ep = self.endpoint
        try:
            self._conn = psycopg.connect(
                host=ep.address, port=ep.port, user=ep.user, password=ep.password, dbname=ep.dbname,
                connect_timeout=ep.connect_timeout, application_name="bouwsteen",
                options=f"-c statement_timeout={self.statement_timeout_ms}",
                autocommit=self.autocommit, **ep.libpq_extras(),
            )
        except psycopg.OperationalError as exc:
            text = str(exc).replace(ep.password, "********") if ep.password else str(exc)
            if ("password authentication failed" in text or "no pg_hba.conf entry" in text
                    or "certificate authentication failed" in text):
                raise AuthenticationFailed(f"{ep.host}:{ep.port}: login as {ep.user} refused: {text.strip()}") from None
            raise DatabaseUnavailable(f"{ep.host}:{ep.port}: cannot connect: {text.strip()}") from None
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def query(self, statement: str | pgsql.Composable, params: Sequence[Any] | dict | None = None) -> list[tuple]:
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(statement, params)
                return cur.fetchall() if cur.description else []
        except psycopg.OperationalError as exc:
            self.close()
            raise DatabaseUnavailable(f"{self.endpoint.host}: connection lost: {str(exc).strip()}") from None
        except _UNDEFINED as exc:
            raise UndefinedObject(f"{self.endpoint.host}: {str(exc).strip()}") from None
        except psycopg.Error as exc:
            raise DatabaseError(f"{self.endpoint.host}: {str(exc).strip()}") from None

    def query_one(self, statement: str | pgsql.Composable, params: Sequence[Any] | dict | None = None) -> tuple | None:
        rows = self.query(statement, params)
        return rows[0] if rows else None

    def scalar(self, statement: str | pgsql.Composable, params: Sequence[Any] | dict | None = None) -> Any:
        row = self.query_one(statement, params)
        return row[0] if row else None

    # ---------------------------------------------------------------- facts

    def serving(self) -> tuple[bool, str]:
        """(in recovery, the server's own address): which PostgreSQL a proxied port led to."""
        row = self.query_one("select pg_is_in_recovery(), inet_server_addr()::text")
        assert row is not None
        return bool(row[0]), str(row[1]).split("/")[0]

    def status(self) -> NodeStatus:
        row = self.query_one(
            """
            select pg_is_in_recovery(),
                   case when pg_is_in_recovery() then pg_last_wal_replay_lsn()::text
                        else pg_current_wal_lsn()::text end,
                   pg_last_wal_receive_lsn()::text,
                   current_setting('server_version_num')::int,
                   (select timeline_id from pg_control_checkpoint()),
                   pg_last_xact_replay_timestamp()::text
            """
        )
        assert row is not None
        in_recovery, lsn, receive_lsn, version, checkpoint_tli, replay_ts = row
        timeline = checkpoint_tli
        if in_recovery:
            received = self.query_one("select received_tli from pg_stat_wal_receiver")
            if received and received[0]:
                timeline = received[0]
        else:
            # pg_control_checkpoint lags a promotion until the next checkpoint; the WAL file name does not.
            walfile = self.scalar("select pg_walfile_name(pg_current_wal_lsn())")
            timeline = int(walfile[:8], 16)
        return NodeStatus(
            host=self.endpoint.host, in_recovery=in_recovery, timeline=timeline, lsn=lsn,
            receive_lsn=receive_lsn, server_version=version, last_replay_time=replay_ts,
        )

    def replicas(self) -> list[ReplicaLink]:
        rows = self.query(
            """
            select application_name, client_addr::text, state, sync_state,
                   pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint
              from pg_stat_replication
            """
        )
        return [ReplicaLink(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    def oldest_transaction_seconds(self) -> float:
        value = self.scalar(
            """
            select coalesce(max(extract(epoch from clock_timestamp() - xact_start)), 0)
              from pg_stat_activity
             where xact_start is not null and pid <> pg_backend_pid() and backend_type = 'client backend'
            """
        )
        return float(value or 0)


# ---------------------------------------------------------------- SCRAM verifiers
# The server only ever sees a verifier, never a plaintext password: nothing can leak a password
# into the server log or pg_stat_statements, and checking the stored one needs no login.

import base64 as _b64
import hashlib as _hashlib
import hmac as _hmac
import os as _os


def _scram_keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    salted = _hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = _hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = _hashlib.sha256(client_key).digest()
    server_key = _hmac.new(salted, b"Server Key", "sha256").digest()
    return stored_key, server_key


def scram_verifier(password: str, *, salt: bytes | None = None, iterations: int = 4096) -> str:
    salt = salt if salt is not None else _os.urandom(16)
    stored, server = _scram_keys(password, salt, iterations)
    enc = lambda b: _b64.b64encode(b).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{enc(salt)}${enc(stored)}:{enc(server)}"


def scram_matches(verifier: str | None, password: str) -> bool:
    """Does `password` match a stored SCRAM-SHA-256 verifier (pg_authid.rolpassword)?"""
    if not verifier or not verifier.startswith("SCRAM-SHA-256$"):
        return False
    try:
        _, params, keys = verifier.split("$")
        iterations, salt = params.split(":")
        stored, server = (_b64.b64decode(k, validate=True) for k in keys.split(":"))
        want_stored, want_server = _scram_keys(password, _b64.b64decode(salt, validate=True), int(iterations))
    except ValueError:  # binascii.Error is a ValueError: a malformed verifier never matches
        return False
    return _hmac.compare_digest(want_stored, stored) and _hmac.compare_digest(want_server, server)
