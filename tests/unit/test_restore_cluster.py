"""flows/restore_cluster.py's pure parts: which drill runs are evidence for which backup, and the
confirmation a DBA types back in the UI."""

from __future__ import annotations

from datetime import datetime, timezone
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from flows.restore_cluster import RestoreConfirmation, drill_records_of
from tasks.planning.backup import DrillRecord

AT = datetime(2026, 12, 3, 4, 0, tzinfo=timezone.utc)


def run(parameters: dict, tags: list[str], completed: bool = True, end_time: datetime | None = AT):
    return SimpleNamespace(parameters=parameters, tags=tags, end_time=end_time,
                           state=SimpleNamespace(is_completed=lambda: completed))


@pytest.mark.parametrize(("runs", "records"), [
    ([run({"cluster": "lab"}, ["backup:20261203-010000F"])], [DrillRecord("20261203-010000F", AT, True)]),
    ([run({"cluster": "lab"}, ["bouwsteen", "backup:20261203-010000F"], completed=False)],
     [DrillRecord("20261203-010000F", AT, False)]),
    # Failed before it chose a backup: no tag, no evidence about any backup.
    ([run({"cluster": "lab"}, [], completed=False)], [DrillRecord(None, AT, False)]),
    ([run({}, ["backup:20261203-010000F"])], [DrillRecord("20261203-010000F", AT, True)]),  # the default cluster
    ([run({"cluster": "prod"}, ["backup:20261203-010000F"])], []),
    ([run({"cluster": "lab", "dry_run": True}, ["backup:20261203-010000F"])], []),
    ([run({"cluster": "lab"}, ["backup:20261203-010000F"], end_time=None)], []),
], ids=["passed", "failed", "failed-early", "default-cluster", "other-cluster", "dry-run", "unfinished"])
def test_drill_runs_become_records_of_their_backup(runs, records) -> None:
    assert drill_records_of(runs, "lab") == records


@pytest.mark.parametrize("typed", ["lab\nyes", "lab\x00", "x" * 201])
def test_a_typed_confirmation_is_one_short_line(typed: str) -> None:
    with pytest.raises(ValidationError):
        RestoreConfirmation(confirm_cluster=typed, confirm_target="latest")


def test_a_typed_confirmation_keeps_what_was_typed() -> None:
    typed = RestoreConfirmation(confirm_cluster="lab", confirm_target="2026-12-03T14:02:00+00:00")
    assert (typed.confirm_cluster, typed.confirm_target) == ("lab", "2026-12-03T14:02:00+00:00")
