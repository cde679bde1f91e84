"""tasks/planning/progress.py and tasks/runtime.with_progress outside a Prefect run."""

from __future__ import annotations

import time

import pytest

from tasks.planning.progress import progress_line


@pytest.mark.parametrize(("done", "total", "elapsed", "percent", "line"), [
    (0, 2**30, 5, 0.0, "backup: 0 of 1024 MiB (0 %)"),
    (2**29, 2**30, 10, 50.0, "backup: 512 of 1024 MiB (50 %), about 10 s left"),
    (2**28, 2**30, 60, 25.0, "backup: 256 of 1024 MiB (25 %), about 3 min left"),
    (2**20, 2**40, 3600, 0.0, "backup: 1 of 1048576 MiB (0 %), about 1048575.0 h left"),
    (2**31, 2**30, 10, 100.0, "backup: 1024 of 1024 MiB (100 %)"),  # a tool that counts past its estimate
    (2**20, 0, 1, 0.0, "backup: 1 MiB done, size unknown"),
])
def test_progress_line(done, total, elapsed, percent, line) -> None:
    assert progress_line("backup", done, total, elapsed) == (percent, line)


def test_work_outside_a_run_returns_its_result_and_polls_only_while_it_runs() -> None:
    from tasks.runtime import with_progress

    polls = []

    def poll():
        polls.append(time.monotonic())
        return (1, 2)

    assert with_progress("x", lambda: (time.sleep(0.3), "done")[1], poll, interval=0.05) == "done"
    assert len(polls) <= 1  # outside a Prefect run the first progress ends the polling


def test_a_failing_poll_never_fails_the_work() -> None:
    from tasks.runtime import with_progress

    def poll():
        raise OSError("ssh hiccup")

    assert with_progress("x", lambda: (time.sleep(0.2), 7)[1], poll, interval=0.05) == 7


def test_the_works_own_error_is_raised() -> None:
    from tasks.runtime import with_progress

    def work():
        raise ValueError("backup failed")

    with pytest.raises(ValueError, match="backup failed"):
        with_progress("x", work, lambda: None, interval=0.05)
