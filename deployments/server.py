"""Start, find and stop the local Prefect server (and workers) the demo and tests use.

The server requires its admin auth string (HTTP Basic, `PREFECT_SERVER_API_AUTH_STRING`) on every
call but `/api/health`, and encrypts block documents with a key kept outside its database
(`PREFECT_SERVER_ENCRYPTION_KEY`); both come from files in `<PREFECT_HOME>/auth/`
(deployments/credentials.py) and reach the server through its environment only. Every client
process of bouwsteen gets the auth string as `PREFECT_API_AUTH_STRING` (`base_environment`).
Beside the server runs the ticket proxy (deployments/ticket_proxy.py), the only entry for
ticketing systems.

Production points PREFECT_API_URL (and PREFECT_API_AUTH_STRING) at the site's Prefect server
instead; nothing else changes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bouwsteen.home import bouwsteen_home
from deployments import credentials
from tasks.errors import ServiceDidNotStart

DEFAULT_PORT = 4200


def prefect_home() -> Path:
    explicit = os.environ.get("BOUWSTEEN_PREFECT_HOME")
    return Path(explicit) if explicit else bouwsteen_home() / "prefect"


def api_url(port: int = DEFAULT_PORT) -> str:
    return os.environ.get("PREFECT_API_URL") or f"http://127.0.0.1:{port}/api"


def client_auth_string() -> str | None:
    """PREFECT_API_AUTH_STRING if set (a site's own server), else the local server's admin auth
    string (created on first use); None for a user who may not read the root-only file."""
    explicit = os.environ.get("PREFECT_API_AUTH_STRING")
    if explicit:
        return explicit
    try:
        return credentials.admin_auth_string(prefect_home())
    except PermissionError:
        return None


def base_environment(port: int = DEFAULT_PORT) -> dict[str, str]:
    """Settings for every Prefect process of bouwsteen (server, worker, CLI)."""
    home = prefect_home()
    auth = client_auth_string()
    return {
        **({"PREFECT_API_AUTH_STRING": auth} if auth else {}),
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url(port),
        # A client that somehow has no API URL fails instead of starting an ephemeral server on
        # the same database, which would have neither the server's auth string nor its key.
        "PREFECT_SERVER_EPHEMERAL_ENABLED": "false",
        # Nothing leaves this machine: no analytics, no update checks.
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        # Global concurrency leases survive a server restart instead of leaking the slot.
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
        "PREFECT_LOGGING_LEVEL": os.environ.get("PREFECT_LOGGING_LEVEL", "INFO"),
        "PREFECT_UI_API_URL": api_url(port),
    }


def apply_environment(port: int = DEFAULT_PORT) -> None:
    for key, value in base_environment(port).items():
        os.environ.setdefault(key, value)


def is_healthy(url: str | None = None, timeout: float = 2.0) -> bool:
    try:
        return httpx.get(f"{url or api_url()}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class ServerHandle:
    url: str
    pid: int | None
    started: bool


def _prefect_bin() -> str:
    candidate = Path(sys.executable).with_name("prefect")
    return str(candidate) if candidate.exists() else "prefect"


def auth_check(url: str, auth_string: str, timeout: float = 5.0) -> str:
    """How a running server treats credentials: "ok" (refuses anonymous calls, takes ours),
    "open" (answers without any: started without an auth string) or "other" (refuses ours)."""
    probe = f"{url}/admin/version"
    if httpx.get(probe, timeout=timeout).status_code != 401:
        return "open"
    user, _, password = auth_string.partition(":")
    return "ok" if httpx.get(probe, auth=(user, password), timeout=timeout).status_code == 200 else "other"


def start_server(port: int = DEFAULT_PORT, *, database_url: str | None = None, timeout: float = 90,
                 ticket_proxy: bool = True) -> ServerHandle:
    """Start `prefect server start` detached unless one already answers, then the ticket proxy
    in front of it (`ticket_proxy=False`: none). Idempotent.

    A server of ours still running without authentication (started before bouwsteen required
    it) or with another auth string is restarted; anyone else's is refused."""
    url = f"http://127.0.0.1:{port}/api"
    home = prefect_home()
    # The home holds the database, the logs and the persisted task results (plans, error texts,
    # host names): root's alone, whoever created or loosened it.
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(home, 0o700)
    admin = credentials.admin_auth_string(home)
    if is_healthy(url):
        verdict = auth_check(url, admin)
        if verdict == "ok":
            if ticket_proxy:
                _start_ticket_proxy(url, admin, port)
            return ServerHandle(url=url, pid=_read_pid(port), started=False)
        if _read_pid(port) is None or not stop_server(port):
            what = "without authentication" if verdict == "open" else "with another auth string"
            raise ServiceDidNotStart(f"a Prefect server that is not ours answers on port {port} {what}; stop it first")
    key = credentials.ensure_encryption_key(home, database_url)
    env = {**os.environ, **base_environment(port), "PREFECT_API_URL": url, "PREFECT_API_AUTH_STRING": admin,
           # Only the server process gets these two, and only through its environment.
           "PREFECT_SERVER_API_AUTH_STRING": admin, "PREFECT_SERVER_ENCRYPTION_KEY": key}
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    log = open(home / f"server-{port}.log", "ab")
    proc = subprocess.Popen(
        [_prefect_bin(), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True,
    )
    (home / f"server-{port}.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + timeout
    while not is_healthy(url):
        if proc.poll() is not None:
            raise ServiceDidNotStart(f"prefect server exited with {proc.returncode}; see {home / f'server-{port}.log'}")
        if time.monotonic() > deadline:
            raise ServiceDidNotStart(f"prefect server did not answer within {timeout:.0f}s; see {home / f'server-{port}.log'}")
        time.sleep(0.5)
    if ticket_proxy:
        _start_ticket_proxy(url, admin, port)
    return ServerHandle(url=url, pid=proc.pid, started=True)


def _start_ticket_proxy(url: str, admin: str, port: int) -> None:
    from deployments import ticket_proxy

    ticket_proxy.ensure_running(prefect_home(), upstream=url, admin_auth=admin,
                                listen=ticket_proxy.listen_address(port))


def _read_pid(port: int) -> int | None:
    path = prefect_home() / f"server-{port}.pid"
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def stop_server(port: int = DEFAULT_PORT, timeout: float = 20) -> bool:
    """Stop our server on `port` and the ticket proxy in front of it."""
    from deployments import ticket_proxy

    ticket_proxy.stop(prefect_home(), upstream_port=port)
    pid = _read_pid(port)
    if pid is None:
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.killpg(pid, signal.SIGKILL)
    (prefect_home() / f"server-{port}.pid").unlink(missing_ok=True)
    return True


def ui_url(port: int = DEFAULT_PORT) -> str:
    return api_url(port).removesuffix("/").removesuffix("/api")
