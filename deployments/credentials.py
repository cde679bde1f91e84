"""The Prefect server's own secrets on the controller: its admin auth string, the ticket credential,
and the key that encrypts its block documents.

All three are files in `<PREFECT_HOME>/auth/` (0700 root, files 0600), generated once, the first
time a bouwsteen process needs them, and never changed afterwards. They reach the processes that
need them through the environment, never a command line (`/proc/*/cmdline` is public):

| file | who gets it | as |
|---|---|---|
| `admin-auth` (`admin:<random>`) | the server; every client of this project (CLI, worker, flow runs, tests, demo) | `PREFECT_SERVER_API_AUTH_STRING`; `PREFECT_API_AUTH_STRING` |
| `ticket-auth` (`ticket:<random>`) | the ticketing system, `bouwsteen ticket`; the ticket proxy holds only its salted hash | HTTP Basic auth at the ticket proxy |
| `encryption.key` (Fernet) | the server only | `PREFECT_SERVER_ENCRYPTION_KEY` |

Without `PREFECT_SERVER_ENCRYPTION_KEY` Prefect keeps the key in the database it encrypts
(`configuration` row `ENCRYPTION_KEY`), so a copy of the database is a copy of every secret.
`ensure_encryption_key` moves an existing database's key out on the first start (see its doc).
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from secrets import token_urlsafe

from tasks.errors import ServiceDidNotStart

AUTH_DIR = "auth"
ADMIN_FILE = "admin-auth"
TICKET_FILE = "ticket-auth"
KEY_FILE = "encryption.key"
ADMIN_USER = "admin"
TICKET_USER = "ticket"


def auth_dir(prefect_home: Path) -> Path:
    return prefect_home / AUTH_DIR


def new_auth_string(user: str) -> str:
    """`user:<43 url-safe characters>` (256 random bits): nothing to quote in a header or a file."""
    return f"{user}:{token_urlsafe(32)}"


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if stat.S_IMODE(path.stat().st_mode) != 0o700:
        os.chmod(path, 0o700)


def write_once(path: Path, content: str) -> str:
    """Create `path` (0600) with `content` unless it exists; return what the file holds.

    Atomic: the content goes to a private temporary file which is then hard-linked into place, so
    two processes starting at once agree on one value and nobody ever reads a half-written file.
    """
    _private_dir(path.parent)
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, content.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process was first: its value stands
        finally:
            tmp.unlink(missing_ok=True)
    return read_secret(path)


def read_secret(path: Path) -> str:
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        os.chmod(path, 0o600)  # never leave a secret readable by others, whoever loosened it
    value = path.read_text().strip()
    if not value or "\n" in value:
        raise ServiceDidNotStart(f"{path}: expected one line, found {'nothing' if not value else 'several lines'}")
    return value


def _auth_string(path: Path, user: str, create: bool) -> str | None:
    if not create and not path.exists():
        return None
    value = write_once(path, new_auth_string(user)) if create else read_secret(path)
    name, sep, password = value.partition(":")
    if not sep or not name or not password:
        raise ServiceDidNotStart(f"{path}: expected 'user:password' on one line")
    return value


def admin_auth_string(prefect_home: Path, *, create: bool = True) -> str | None:
    return _auth_string(auth_dir(prefect_home) / ADMIN_FILE, ADMIN_USER, create)


def ticket_auth_string(prefect_home: Path, *, create: bool = True) -> str | None:
    return _auth_string(auth_dir(prefect_home) / TICKET_FILE, TICKET_USER, create)


def password_digest(password: str, salt: str) -> str:
    """What the ticket proxy stores instead of the ticket password: sha256(salt ":" password), hex.
    The password is 256 random bits, so a fast hash loses nothing to guessing."""
    return hashlib.sha256(f"{salt}:{password}".encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# The encryption key, kept outside the database it protects


def database_url(prefect_home: Path, explicit: str | None = None) -> str | None:
    """The server's database as the server will see it, or None when it is configured in parts
    (PREFECT_SERVER_DATABASE_HOST, …) that this check does not assemble."""
    url = (explicit or os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL")
           or os.environ.get("PREFECT_SERVER_DATABASE_CONNECTION_URL"))
    if url:
        return url
    if any(k.startswith("PREFECT_SERVER_DATABASE_") and k.endswith(("_HOST", "_NAME", "_DRIVER")) for k in os.environ):
        return None
    return f"sqlite+aiosqlite:///{prefect_home}/prefect.db"


def sync_url(url: str) -> str:
    """The async driver Prefect needs → the sync one this check uses (both ship with Prefect/bouwsteen)."""
    return url.replace("+aiosqlite", "", 1).replace("+asyncpg", "+psycopg", 1)


@dataclass(frozen=True)
class StoredKeys:
    """What the database itself holds: the key in its configuration table, its block documents."""

    configured_key: str | None
    blocks: dict[str, str]  # "<block type>/<document name>" → encrypted data


def read_stored_keys(url: str) -> StoredKeys | None:
    """None when the database does not exist yet or has no Prefect tables (a fresh server)."""
    import sqlalchemy as sa

    if url.startswith("sqlite") and not Path(url.split("///", 1)[-1]).exists():
        return None
    engine = sa.create_engine(sync_url(url))
    try:
        with engine.connect() as conn:
            tables = set(sa.inspect(conn).get_table_names())
            if not {"configuration", "block_document"} <= tables:
                return None
            configuration = sa.table("configuration", sa.column("key"), sa.column("value", sa.JSON))
            documents = sa.table("block_document", sa.column("block_type_name"), sa.column("name"),
                                 sa.column("data", sa.JSON))
            row = conn.execute(sa.select(configuration.c.value).where(configuration.c.key == "ENCRYPTION_KEY")).first()
            rows = conn.execute(sa.select(documents.c.block_type_name, documents.c.name, documents.c.data))
            blocks = {f"{kind}/{name}": data for kind, name, data in rows if isinstance(data, str)}
    finally:
        engine.dispose()
    configured = row[0].get("fernet_key") if row and isinstance(row[0], dict) else None
    return StoredKeys(configured_key=configured, blocks=blocks)


def forget_configured_key(url: str) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(sync_url(url))
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM configuration WHERE key = 'ENCRYPTION_KEY'"))
    finally:
        engine.dispose()


def undecryptable(key: str, blocks: dict[str, str]) -> list[str]:
    from cryptography.fernet import Fernet, InvalidToken

    fernet = Fernet(key.encode())
    bad = []
    for name, data in blocks.items():
        try:
            fernet.decrypt(data.encode())
        except (InvalidToken, ValueError):
            bad.append(name)
    return sorted(bad)


def key_decision(file_key: str | None, stored: StoredKeys | None) -> tuple[str, str | None]:
    """Pure: which key the server starts with, and where it comes from.

    → ("file", None) use the existing file; ("seed", key) write `key` to the new file (the
    database's own key, so its blocks still decrypt); ("new", None) generate one.
    """
    if file_key is not None:
        return "file", None
    if stored is not None and stored.configured_key:
        return "seed", stored.configured_key
    return "new", None


def ensure_encryption_key(prefect_home: Path, database: str | None = None) -> str:
    """The server's Fernet key, from `<PREFECT_HOME>/auth/encryption.key`, checked against its database.

    - First start of a new server: a new key, in the file; Prefect never writes one to the database.
    - First start of an existing database (Prefect kept its key in the `configuration` table): the
      file is seeded with that key, so every block still decrypts, and the row is then deleted, so
      the database no longer carries its own key. Secrets saved before this migration sat beside
      their key in every earlier copy of the database: rotate them if such copies left the machine.
    - Every start: every block document must decrypt with the file's key, else the server is not
      started (Prefect itself would start and answer 500 on every block read).
    """
    from cryptography.fernet import Fernet

    path = auth_dir(prefect_home) / KEY_FILE
    url = database_url(prefect_home, database)
    if url is None:
        print("bouwsteen: the database is configured in parts (PREFECT_SERVER_DATABASE_HOST, …): the encryption "
              "key is not checked against it", file=sys.stderr)
    try:
        stored = read_stored_keys(url) if url else None
    except Exception as exc:  # noqa: BLE001 - an unreachable database is the server's own error to report
        stored = None
        print(f"bouwsteen: encryption key not checked against the database ({type(exc).__name__}: {exc})",
              file=sys.stderr)
    decision, seed = key_decision(read_secret(path) if path.exists() else None, stored)
    key = write_once(path, seed or Fernet.generate_key().decode()) if decision != "file" else read_secret(path)
    try:
        Fernet(key.encode())
    except ValueError:
        raise ServiceDidNotStart(f"{path}: not a Fernet key (32 url-safe base64-encoded bytes)") from None
    if stored is None:
        return key
    bad = undecryptable(key, stored.blocks)
    if bad:
        hint = ""
        if stored.configured_key and stored.configured_key != key and not undecryptable(stored.configured_key, stored.blocks):
            hint = (f" They decrypt with the key still stored in the database itself: move {path} away and start "
                    "again to adopt that key.")
        raise ServiceDidNotStart(
            f"{len(bad)} of {len(stored.blocks)} block documents of {url.split('@')[-1]} do not decrypt with the "
            f"key in {path} ({', '.join(bad[:5])}{', …' if len(bad) > 5 else ''}): this database was encrypted "
            f"with another key. Put back the key file that belongs to it, or re-register the blocks "
            f"(`bouwsteen blocks register`) on a fresh database.{hint}")
    if stored.configured_key:
        forget_configured_key(url)
    return key
