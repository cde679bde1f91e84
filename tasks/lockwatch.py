"""The locks this process holds for each cluster, so every step can check them before it acts.

`cluster_lock` and `pgquartz_lock` register what they hold here for the length of their `with`;
the step wrapper (`tasks/runtime.py`) calls `require_held(cluster)` before every step that may
change something, and a lost lock raises `LockLost` there, before the step's first command.

A plain process-wide registry keyed by cluster, not a context variable: steps run in the flow's
thread or in the task runner's worker threads (`.submit`), and all of them must see the lock.
The cluster lock lets one runbook at a time hold a cluster, so a process holds at most one
cluster lock per cluster; a TAB job's pgquartz lock in the same process is checked by that
cluster's steps too (stricter, never looser). No Prefect, no I/O.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Protocol


class Watched(Protocol):
    name: str

    def require(self) -> None:
        """Raise LockLost if the lock is no longer held."""


_held: dict[str, list[Watched]] = {}
_mutex = threading.Lock()


@contextlib.contextmanager
def watching(cluster: str, lock: Watched) -> Iterator[Watched]:
    """Steps of `cluster` check `lock` while the `with` lasts."""
    with _mutex:
        _held.setdefault(cluster, []).append(lock)
    try:
        yield lock
    finally:
        with _mutex:
            locks = _held.get(cluster, [])
            if lock in locks:
                locks.remove(lock)
            if not locks:
                _held.pop(cluster, None)


def held(cluster: str) -> list[Watched]:
    with _mutex:
        return list(_held.get(cluster, ()))


def require_held(cluster: str | None) -> None:
    """Raise LockLost if any lock held for `cluster` was lost (nothing held: nothing to check)."""
    if cluster is None:
        return
    for lock in held(cluster):
        lock.require()
