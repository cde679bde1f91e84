"""tasks/runtime.py: which failures a step retries, and how steps are configured (no Prefect server).

The retry condition gets the state Prefect builds from a step's exception: `Failed(data=exc)`, as
the task engine's `can_retry` does. Only the error type decides; the message never does.
"""

from __future__ import annotations

from typing import Any

import pytest
from prefect.cache_policies import NO_CACHE
from prefect.states import Cancelled, Completed, Failed, State

from tasks.adapters.etcd import EtcdUnavailable, LockTimeout
from tasks.adapters.postgres import (
    AuthenticationFailed,
    DatabaseError,
    DatabaseUnavailable,
    UndefinedObject,
)
from tasks.adapters.remote import (
    HostKeyRejected,
    LoginRefused,
    RemoteError,
    RemoteTimeout,
    RemoteUnreachable,
    SudoRefused,
    UploadFailed,
)
from tasks.errors import LockLost, NotYet
from tasks.runtime import TRANSIENT_ERRORS, _retry_on_transient, once, step, wait_for


def failed(exc: BaseException) -> State:
    # What Prefect's task engine hands the condition for an exception a step raised.
    return Failed(data=exc, message=f"Task run encountered unexpected exception: {exc!r}")


class SubUnreachable(RemoteUnreachable):
    """A more precise kind of unreachable is still unreachable."""


class Unrelated(Exception):
    pass


class LostAndUnavailable(LockLost, EtcdUnavailable):
    """Were a lost lock ever also a transient kind, the loss decides."""


@pytest.mark.parametrize(
    ("exc", "retried"),
    [
        # transient: could not connect, or the connection broke
        (RemoteUnreachable("pg1", "ssh", None, reason="connection refused"), True),
        (SubUnreachable("pg1", "ssh", None, reason="no route to host"), True),
        (DatabaseUnavailable("pg1:5432: connection refused"), True),
        (EtcdUnavailable("etcd get: no endpoint answered"), True),
        # everything else fails at once
        (RemoteError("pg1", "patronictl switchover", 1), False),  # the command itself failed
        (RemoteTimeout("pg1", "pg_rewind", None, reason="timed out"), False),  # may have half-acted
        (HostKeyRejected("pg1", "ssh", None, reason="host key differs"), False),
        (SudoRefused("pg3", "systemctl", 1, reason="a password is required"), False),  # sudo rules, not the network
        (UploadFailed("pg3", "upload /etc/x", None, reason="Permission denied"), False),
        (LoginRefused("pg3", "ssh", None, reason="refused the SSH key for user root"), False),
        (AuthenticationFailed("password authentication failed"), False),
        (DatabaseError("duplicate key"), False),
        (UndefinedObject("relation does not exist"), False),
        (LockTimeout("lock /bouwsteen/locks/lab/ still held"), False),
        # another holder may be acting now: never retried, whatever it derives from
        (LockLost("the cluster lock of lab", "2027-01-15T08:00:00+00:00", "lease 1 has expired"), False),
        (LostAndUnavailable("the cluster lock of lab", "2027-01-15T08:00:00+00:00", "etcd gone"), False),
        (ConnectionRefusedError("refused"), False),  # only the project's own transient types count
        (TimeoutError("timed out"), False),
        (OSError("disk full"), False),
        (ValueError("bad config"), False),
        (Unrelated("unavailable"), False),  # the wording does not make an error transient
        (RuntimeError("wrapped"), False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_only_transient_error_types_are_retried(exc: BaseException, retried: bool) -> None:
    assert _retry_on_transient(None, None, failed(exc)) is retried


def test_a_transient_error_raised_from_another_is_not_retried() -> None:
    # The type of the error the step raised decides, not its cause.
    try:
        try:
            raise DatabaseUnavailable("pg1:5432: connection refused")
        except DatabaseUnavailable as cause:
            raise RuntimeError("promote failed") from cause
    except RuntimeError as exc:
        outer = exc
    assert _retry_on_transient(None, None, failed(outer)) is False


@pytest.mark.parametrize(
    "state",
    [
        Completed(data="done"),
        Completed(data=None),
        Failed(message="step returned a failed state"),  # no exception: FailedRun, not transient
        Failed(data="not an exception"),
        Cancelled(),
    ],
    ids=["completed", "completed-none", "failed-without-data", "failed-with-text", "cancelled"],
)
def test_other_states_are_not_retried(state: State) -> None:
    assert _retry_on_transient(None, None, state) is False


class StandIn:
    """Anything with result(): the condition asks for the result and nothing else."""

    def __init__(self, outcome: Any) -> None:
        self.outcome = outcome
        self.asked = 0

    def result(self) -> Any:
        self.asked += 1
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


@pytest.mark.parametrize(
    ("outcome", "retried"),
    [
        (EtcdUnavailable("no endpoint answered"), True),
        (ValueError("bad"), False),
        (KeyboardInterrupt(), False),  # a BaseException is never retried either
        ({"ok": True}, False),
    ],
    ids=["transient", "other", "base-exception", "result"],
)
def test_the_condition_only_looks_at_the_result(outcome: Any, retried: bool) -> None:
    state = StandIn(outcome)
    assert _retry_on_transient(object(), object(), state) is retried
    assert state.asked == 1


def test_transient_errors_are_exactly_the_three_unavailable_types() -> None:
    assert set(TRANSIENT_ERRORS) == {RemoteUnreachable, DatabaseUnavailable, EtcdUnavailable}


def _plain() -> None:
    pass


@pytest.mark.parametrize(
    ("make", "name", "retries", "delays", "timeout"),
    [
        (lambda: step(_plain), "_plain", 3, [2, 4, 8], None),
        (lambda: step(name="named", timeout_seconds=5)(_plain), "named", 3, [2, 4, 8], 5.0),
        (lambda: step(retries=1)(_plain), "_plain", 1, [2], None),
        (lambda: step(retries=0)(_plain), "_plain", 0, [], None),
        (lambda: once(_plain), "_plain", 0, [], None),  # promote, rewind, restore: never retried
        (lambda: once(name="promote", timeout_seconds=60)(_plain), "promote", 0, [], 60.0),
    ],
    ids=["step", "step-named", "step-1-retry", "step-no-retry", "once", "once-named"],
)
def test_steps_retry_with_backoff_and_never_cache(make: Any, name: str, retries: int, delays: list[int],
                                                  timeout: float | None) -> None:
    task = make()
    assert task.name == name
    assert task.retries == retries
    assert task.retry_delay_seconds == delays  # exponential: 2, 4, 8 s
    assert task.retry_jitter_factor == 0.5
    assert task.retry_condition_fn is _retry_on_transient
    assert task.cache_policy is NO_CACHE
    assert task.timeout_seconds == timeout
    assert task.fn is _plain


# --------------------------------------------------------------------------- wait_for


class FakeTime:
    """The clock wait_for reads, moved only by its own sleeps: no test waits for real."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def fake_time(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    import tasks.runtime

    clock = FakeTime()
    monkeypatch.setattr(tasks.runtime, "time", clock)
    return clock


def answers(*results: Any):
    """A probe that answers with each result in turn (an exception instance is raised)."""
    queue = list(results)

    def probe() -> Any:
        result = queue.pop(0)
        if isinstance(result, BaseException):
            raise result
        return result

    return probe


@pytest.mark.parametrize("results, value, sleeps", [
    (["ready"], "ready", []),
    ([None, NotYet("still recovering"), "ready"], "ready", [2, 2]),
    ([DatabaseUnavailable("pg2: refused"), EtcdUnavailable("no endpoint"), 0, "ready"], "ready", [2, 2, 2]),
])
def test_wait_for_polls_until_truthy(fake_time: FakeTime, results: list, value: str, sleeps: list) -> None:
    from tasks.runtime import wait_for

    assert wait_for("the thing", answers(*results), timeout=60, interval=2) == value
    assert fake_time.sleeps == sleeps


def test_wait_for_names_the_last_observation_at_the_deadline(fake_time: FakeTime) -> None:
    from tasks.errors import DeadlineExceeded
    from tasks.runtime import wait_for

    probe = answers(*[NotYet(f"look {i}") for i in range(20)])
    with pytest.raises(DeadlineExceeded, match=r"the thing: not reached within 5s \(last seen: look 3\)"):
        wait_for("the thing", probe, timeout=5, interval=2)


def test_wait_for_does_not_swallow_what_is_no_waiting_matter(fake_time: FakeTime) -> None:
    from tasks.adapters.postgres import AuthenticationFailed
    from tasks.runtime import wait_for

    with pytest.raises(AuthenticationFailed):
        wait_for("the thing", answers(AuthenticationFailed("wrong password")), timeout=60)
    assert fake_time.sleeps == []


@pytest.mark.parametrize("error", [
    HostKeyRejected("pg3", "ssh", None, reason="host key differs"),
    LoginRefused("pg3", "ssh", None, reason="refused the SSH key for user root"),
    SudoRefused("pg3", "patronictl list", 1, reason="a password is required"),
    UploadFailed("pg3", "upload /etc/x", None, reason="Permission denied"),
], ids=lambda e: type(e).__name__)
def test_a_wait_does_not_poll_into_a_permanent_remote_failure(error: RemoteError) -> None:
    calls = []

    def probe():
        calls.append(1)
        raise error

    with pytest.raises(type(error)):
        wait_for("patroni up", probe, timeout=30, interval=0.01)
    assert calls == [1]


def test_a_wait_still_polls_through_a_failing_command() -> None:
    answers = iter([RemoteError("pg1", "patronictl list", 1), RemoteUnreachable("pg1", "ssh", None), "up"])

    def probe():
        answer = next(answers)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    assert wait_for("patroni up", probe, timeout=30, interval=0.01) == "up"
