"""Start, find and stop the process workers that run bouwsteen's deployments on this controller.

A worker runs every flow run in a fresh Python process from the repository checkout (the
deployments' pull step changes into it), with the same environment as the server, so flows
see the same PREFECT_HOME, API URL, admin auth string (PREFECT_API_AUTH_STRING) and no-analytics
settings as a `bouwsteen run`. The server's own secrets (its auth string setting and encryption
key) are never in a worker's or a flow run's environment.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from deployments.server import _prefect_bin, base_environment, prefect_home
from tasks.errors import ServiceDidNotStart

REPO = Path(__file__).resolve().parents[1]
WORK_POOL = "bouwsteen"
DEFAULT_WORKER = "bouwsteen-worker"


@dataclass
class WorkerHandle:
    name: str
    pid: int
    started: bool
    log: Path


def _pid_file(name: str) -> Path:
    return prefect_home() / f"worker-{name}.pid"


def worker_log(name: str = DEFAULT_WORKER) -> Path:
    return prefect_home() / f"worker-{name}.log"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited child of this very process) is not a worker any more.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def _is_our_worker(pid: int) -> bool:
    """Guard against a stale pid file whose number the kernel has since given to another process."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"worker" in cmdline and b"start" in cmdline and _alive(pid)


def running_worker(name: str = DEFAULT_WORKER) -> int | None:
    try:
        pid = int(_pid_file(name).read_text())
    except (OSError, ValueError):
        return None
    return pid if _is_our_worker(pid) else None


def environment_of(pid: int) -> dict[str, str] | None:
    """A process's environment as it was started (root reads any; None when unreadable)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def start_worker(name: str = DEFAULT_WORKER, *, pool: str = WORK_POOL, limit: int | None = None,
                 query_seconds: float | None = None, timeout: float = 60) -> WorkerHandle:
    """Start `prefect worker start --type process` detached unless this named worker runs. Idempotent.

    A running worker that was started with another API auth string (or none: before the server
    required one) could not reach the server any more; it is restarted."""
    home = prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    log_path = worker_log(name)
    env = {**os.environ, **base_environment()}
    pid = running_worker(name)
    if pid is not None:
        started_with = environment_of(pid)
        if started_with is None or started_with.get("PREFECT_API_AUTH_STRING") == env.get("PREFECT_API_AUTH_STRING"):
            return WorkerHandle(name=name, pid=pid, started=False, log=log_path)
        stop_worker(name)
    if query_seconds is not None:
        # Tests poll faster than the 10 s default so a run starts within a couple of seconds.
        env["PREFECT_WORKER_QUERY_SECONDS"] = str(query_seconds)
    argv = [_prefect_bin(), "worker", "start", "--pool", pool, "--type", "process", "--name", name]
    if limit is not None:
        argv += ["--limit", str(limit)]
    offset = log_path.stat().st_size if log_path.exists() else 0
    log = open(log_path, "ab")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=REPO,
                            start_new_session=True)
    log.close()
    _pid_file(name).write_text(str(proc.pid))
    # Ready once it has announced itself; a worker that cannot reach the API exits, and we say so.
    deadline = time.monotonic() + timeout
    while True:
        with open(log_path, "rb") as f:
            f.seek(offset)
            if b"started!" in f.read():
                break
        if proc.poll() is not None:
            _pid_file(name).unlink(missing_ok=True)
            raise ServiceDidNotStart(f"prefect worker {name} exited with {proc.returncode}; see {log_path}")
        if time.monotonic() > deadline:
            raise ServiceDidNotStart(f"prefect worker {name} did not start within {timeout:.0f}s; see {log_path}")
        time.sleep(0.3)
    return WorkerHandle(name=name, pid=proc.pid, started=True, log=log_path)


def stop_worker(name: str = DEFAULT_WORKER, timeout: float = 30) -> bool:
    """SIGTERM the worker's process group (its flow-run processes included); SIGKILL if it lingers."""
    pid = running_worker(name)
    _pid_file_path = _pid_file(name)
    if pid is None:
        _pid_file_path.unlink(missing_ok=True)
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            break
        time.sleep(0.2)
    _pid_file_path.unlink(missing_ok=True)
    return True


def worker_names() -> list[str]:
    """Every worker with a pid file under this PREFECT_HOME, running or not."""
    return sorted(p.name.removeprefix("worker-").removesuffix(".pid") for p in prefect_home().glob("worker-*.pid"))
