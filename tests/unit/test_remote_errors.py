"""What a failed remote command tells the DBA (pure: no connection is made)."""

from __future__ import annotations

from tasks.adapters.remote import RemoteError


def test_the_message_carries_both_stderr_and_stdout() -> None:
    # pgBackRest prints its errors on stdout; a chain's stderr may hold an earlier step's warning.
    err = RemoteError("restore1", "fetch backup", 64, stdout="ERROR: [047]: unable to write: No space left on device\n",
                      stderr="WARNING: earlier step\n")
    assert str(err) == ("restore1: `fetch backup` failed: exit code 64\n"
                        "WARNING: earlier step\nERROR: [047]: unable to write: No space left on device")


def test_a_silent_failure_names_the_exit_code_only() -> None:
    assert str(RemoteError("pg1", "false", 1)) == "pg1: `false` failed: exit code 1"


def test_only_the_tails_of_long_output_are_kept() -> None:
    err = RemoteError("pg1", "noisy", 2, stdout="x" * 100_000)
    assert len(str(err)) < 10_000 and str(err).endswith("x")
