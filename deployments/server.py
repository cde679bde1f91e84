"""Start, find and stop the local Prefect server (and workers) the demo and tests use.

Production points PREFECT_API_URL at the site's Prefect server instead; nothing else changes.
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
from tasks.errors import ServiceDidNotStart

DEFAULT_PORT = 4200


def prefect_home() -> Path:
    explicit = os.environ.get("BOUWSTEEN_PREFECT_HOME")
    return Path(explicit) if explicit else bouwsteen_home() / "prefect"


def api_url(port: int = DEFAULT_PORT) -> str:
    return os.environ.get("PREFECT_API_URL") or f"http://127.0.0.1:{port}/api"


def base_environment(port: int = DEFAULT_PORT) -> dict[str, str]:
    """Settings for every Prefect process of bouwsteen (server, worker, CLI)."""
    home = prefect_home()
    return {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url(port),
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


def start_server(port: int = DEFAULT_PORT, *, database_url: str | None = None, timeout: float = 90) -> ServerHandle:
    """Start `prefect server start` detached unless one already answers. Idempotent."""
    url = f"http://127.0.0.1:{port}/api"
    if is_healthy(url):
        return ServerHandle(url=url, pid=_read_pid(port), started=False)
    home = prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **base_environment(port), "PREFECT_API_URL": url}
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
    return ServerHandle(url=url, pid=proc.pid, started=True)


def _read_pid(port: int) -> int | None:
    path = prefect_home() / f"server-{port}.pid"
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def stop_server(port: int = DEFAULT_PORT, timeout: float = 20) -> bool:
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
