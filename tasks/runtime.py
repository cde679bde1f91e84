"""How bouwsteen's Prefect tasks retry, cache and report.

Retries happen by error type only: network and "unavailable" errors are retried with backoff;
anything else (a refused login, a failed promote, a bad config, a command that timed out and
may have half-acted, a lost lock) fails at once. Side-effecting
tasks never cache.

Every step that may change something (any step but an `is_*` one, which only reads) first checks
the locks held for its cluster (`tasks/lockwatch.py`): a lost lock raises LockLost before the
step does anything.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from typing import Any, Callable

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from prefect.tasks import exponential_backoff

from tasks.adapters.etcd import EtcdUnavailable
from tasks.adapters.ha.base import HaStatusError
from tasks.adapters.postgres import DatabaseUnavailable
from tasks.adapters.remote import (
    HostKeyRejected,
    LoginRefused,
    RemoteError,
    RemoteUnreachable,
    SudoRefused,
    UploadFailed,
)
from tasks.errors import DeadlineExceeded, LockLost, NoPrimary, NotYet
from tasks.lockwatch import require_held

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (RemoteUnreachable, DatabaseUnavailable, EtcdUnavailable)
# Never retried, whatever they derive from: once the lock is lost, another holder may be acting.
NEVER_RETRIED: tuple[type[BaseException], ...] = (LockLost,)
# Remote failures no wait outlasts (a host key, a refused login, sudo rules, a refused upload):
# `wait_for` raises them at once instead of polling into them until its deadline.
PERMANENT_REMOTE_ERRORS: tuple[type[BaseException], ...] = (HostKeyRejected, LoginRefused, SudoRefused, UploadFailed)


def _retry_on_transient(task_obj, task_run, state) -> bool:
    try:
        state.result()
    except NEVER_RETRIED:
        return False
    except TRANSIENT_ERRORS:
        return True
    except BaseException:
        return False
    return False


def step(
    fn: Callable | None = None,
    *,
    name: str | None = None,
    retries: int = 3,
    timeout_seconds: float | None = None,
) -> Any:
    """A side-effecting runbook step: retried only on transient errors, never cached."""

    def wrap(func: Callable) -> Any:
        return task(
            checking_locks(func, name or func.__name__),
            name=name or func.__name__,
            retries=retries,
            retry_delay_seconds=exponential_backoff(backoff_factor=2),
            retry_jitter_factor=0.5,
            retry_condition_fn=_retry_on_transient,
            cache_policy=NO_CACHE,
            timeout_seconds=timeout_seconds,
        )

    return wrap(fn) if fn is not None else wrap


def checking_locks(func: Callable, name: str) -> Callable:
    """`func`, first checking the locks held for its `cluster` argument (LockLost when one was
    lost), unless it is an `is_*` step, which only reads. Signature, name and module stay
    `func`'s (Prefect reads the parameters through `__wrapped__`)."""
    if name.startswith("is_"):
        return func
    signature = inspect.signature(func)
    if "cluster" not in signature.parameters:
        return func

    @functools.wraps(func)
    def checked(*args: Any, **kwargs: Any) -> Any:
        require_held(signature.bind_partial(*args, **kwargs).arguments.get("cluster"))
        return func(*args, **kwargs)

    return checked


def once(fn: Callable | None = None, *, name: str | None = None, timeout_seconds: float | None = None) -> Any:
    """A step that must never be retried blindly (promote, rewind, restore)."""
    return step(fn, name=name, retries=0, timeout_seconds=timeout_seconds)


def say(sentence: str, *, warning: bool = False) -> str:
    """Log a step's one-sentence outcome and return it (tasks end with this).

    `warning`: the step went on, but a DBA should read this line. Outside a Prefect run (a plain
    script calling a step's `.fn`, as the overhead benchmark does) the sentence goes to the
    standard logger instead."""
    try:
        logger = get_run_logger()
    except MissingContextError:
        logger = logging.getLogger("bouwsteen")
    logger.log(logging.WARNING if warning else logging.INFO, sentence)
    return sentence


def wait_for(what: str, probe, *, timeout: float, interval: float = 1.0):
    """Poll `probe` until it returns something truthy; raise with the last observation at the deadline."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = probe()
            if value:
                return value
            last = value
        except PERMANENT_REMOTE_ERRORS:
            raise
        except (NotYet, NoPrimary, RemoteError, DatabaseUnavailable, EtcdUnavailable, HaStatusError) as exc:
            last = exc
        if time.monotonic() > deadline:
            raise DeadlineExceeded(f"{what}: not reached within {timeout:.0f}s (last seen: {last})")
        time.sleep(interval)


def with_progress(what: str, work: Callable[[], Any], poll: Callable[[], tuple[int, int] | None], *,
                  interval: float = 2.0) -> Any:
    """Run `work` (a long backup or restore) while its progress shows in the Prefect UI: `poll`
    answers (bytes done, bytes in all) from the tool or the disk, or None while it cannot say. The
    artifact appears once the work has run for `interval`; a poll that fails only skips a beat."""
    from concurrent.futures import ThreadPoolExecutor

    from tasks.planning.progress import progress_line

    started = time.monotonic()
    artifact = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bouwsteen-work") as pool:
        future = pool.submit(work)
        while True:
            try:
                return future.result(timeout=interval)
            except TimeoutError:
                pass
            try:
                seen = poll()
            except Exception:  # noqa: BLE001 - progress is a view; the work's own result decides
                seen = None
            if seen is None:
                continue
            done, total = seen
            percent, line = progress_line(what, done, total, time.monotonic() - started)
            if not _in_a_run():
                break  # outside a Prefect run: nothing to show it in
            try:
                artifact = _progress_artifact(artifact, percent, line)
            except Exception:  # noqa: BLE001 - a server hiccup costs a beat of the view, not the backup
                continue
        return future.result()


def _in_a_run() -> bool:
    from prefect.context import get_run_context

    try:
        get_run_context()  # outside a run an artifact would start a temporary server of its own
    except MissingContextError:
        return False
    return True


def _progress_artifact(artifact, percent: float, line: str):
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    if artifact is None:
        return create_progress_artifact(progress=percent, description=line)
    update_progress_artifact(artifact, progress=percent, description=line)
    return artifact
