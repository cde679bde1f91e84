"""tasks/planning/backup.py: source choice, skip/run decision, freshness, retention, restore targets."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from tasks.adapters.backup.base import BackupInfo
from tasks.planning.backup import (
    BackupDecision,
    BackupPlanError,
    DrillRecord,
    SourceCandidate,
    choose_source,
    clone_refusals,
    confirmation_refusal,
    decide_backup,
    drill_verdict,
    expected_after_retention,
    freshness_problem,
    newest_good,
    parse_target,
    pick_restore_backup,
    plan_clone,
    plan_cluster_restore,
    post_clone_sql_refusal,
    room_to_keep_aside,
)

UTC = timezone.utc
NOW = datetime(2026, 3, 10, 12, 0, 0, tzinfo=UTC)


def backup(name: str, finish_hours_ago: float, *, kind: str = "full", error: bool = False,
           duration_min: float = 10) -> BackupInfo:
    finish = NOW - timedelta(hours=finish_hours_ago)
    return BackupInfo(name=name, kind=kind, start_time=finish - timedelta(minutes=duration_min),  # type: ignore[arg-type]
                      finish_time=finish, error=error)


def src(host: str, role: str = "replica", streaming: bool = True, lag: int | None = 0) -> SourceCandidate:
    return SourceCandidate(host=host, role=role, streaming=streaming, lag_bytes=lag)


# ----------------------------------------------------------------------------- choose_source


@pytest.mark.parametrize(
    ("candidates", "expected"),
    [
        pytest.param([src("pg1", "primary"), src("pg2", lag=10), src("pg3", lag=5)], "pg3", id="least-lag-standby"),
        pytest.param([src("pg1", "primary"), src("pg3", lag=5), src("pg2", lag=5)], "pg2", id="tie-by-name"),
        pytest.param([src("pg1", "primary"), src("pg2", lag=100), src("pg3", lag=101)], "pg2", id="at-limit-ok"),
        pytest.param([src("pg1", "primary"), src("pg2", lag=101)], "pg1", id="over-limit-falls-back-to-primary"),
        pytest.param([src("pg1", "primary"), src("pg2", streaming=False)], "pg1", id="not-streaming"),
        pytest.param([src("pg1", "primary"), src("pg2", lag=None)], "pg1", id="unknown-lag"),
        pytest.param([src("pg2", lag=200), src("pg1", "primary", lag=0)], "pg1", id="primary-order-independent"),
        pytest.param([src("pg2", lag=7)], "pg2", id="standby-without-primary"),
        pytest.param([src("pg1", "primary", streaming=False, lag=None)], "pg1", id="primary-alone"),
    ],
)
def test_choose_source(candidates: list[SourceCandidate], expected: str) -> None:
    assert choose_source(candidates, max_lag_bytes=100).host == expected


@pytest.mark.parametrize(
    "candidates",
    [[], [src("pg2", streaming=False)], [src("pg2", lag=101), src("pg3", lag=None)], [src("pg2", role="unknown")]],
)
def test_choose_source_nothing_usable(candidates: list[SourceCandidate]) -> None:
    with pytest.raises(BackupPlanError, match=r"^no primary and no streaming standby to take a backup from$"):
        choose_source(candidates, max_lag_bytes=100)


# ----------------------------------------------------------------------------- decide_backup

WINDOW = timedelta(hours=20)


@pytest.mark.parametrize(
    ("backups", "force", "expected"),
    [
        pytest.param([backup("b1", 1)], True, BackupDecision(True, "pg2", "forced"), id="force-inside-window"),
        pytest.param([], True, BackupDecision(True, "pg2", "forced"), id="force-no-backups"),
        pytest.param([backup("b1", 2.5)], False,
                     BackupDecision(False, None, "backup b1 is 2.5 h old, inside the 20.0 h skip window"),
                     id="skip-window"),
        pytest.param([backup("old", 30), backup("new", 2.5), backup("bad", 0.5, error=True)], False,
                     BackupDecision(False, None, "backup new is 2.5 h old, inside the 20.0 h skip window"),
                     id="skip-uses-newest-good"),
        pytest.param([], False, BackupDecision(True, "pg2", "no good backup exists yet"), id="no-backup"),
        pytest.param([backup("bad", 1, error=True)], False, BackupDecision(True, "pg2", "no good backup exists yet"),
                     id="only-error-backups"),
        pytest.param([backup("b1", 26)], False, BackupDecision(True, "pg2", "newest good backup b1 is 26.0 h old"),
                     id="stale"),
        pytest.param([backup("b1", 20)], False, BackupDecision(True, "pg2", "newest good backup b1 is 20.0 h old"),
                     id="exactly-window-runs"),
    ],
)
def test_decide_backup(backups: list[BackupInfo], force: bool, expected: BackupDecision) -> None:
    decided = decide_backup(backups, NOW, skip_window=WINDOW, force=force, source="pg2")
    assert (decided.run, decided.source, decided.reason) == (expected.run, expected.source, expected.reason)


def test_newest_good_ignores_errors_and_list_order() -> None:
    items = [backup("b3", 1, error=True), backup("b2", 5), backup("b1", 50)]
    assert newest_good(items).name == "b2"  # type: ignore[union-attr]
    assert newest_good([backup("x", 1, error=True)]) is None
    assert newest_good([]) is None


# ----------------------------------------------------------------------------- freshness_problem

LIMIT = timedelta(hours=26)


@pytest.mark.parametrize(
    ("backups", "expected"),
    [
        ([], "there is no good backup at all"),
        ([backup("bad", 1, error=True)], "there is no good backup at all"),
        ([backup("b1", 1)], None),
        ([backup("b1", 26)], None),
        ([backup("b1", 27)], "the newest good backup b1 is 27.0 h old, older than the 26.0 h limit"),
        ([backup("b1", 40), backup("b2", 30), backup("bad", 1, error=True)],
         "the newest good backup b2 is 30.0 h old, older than the 26.0 h limit"),
        ([backup("b1", 40), backup("b2", 3)], None),
    ],
)
def test_freshness_problem(backups: list[BackupInfo], expected: str | None) -> None:
    assert freshness_problem(backups, NOW, LIMIT) == expected


# ----------------------------------------------------------------------------- expected_after_retention

HISTORY = [
    backup("f1", 100),
    backup("d1", 90, kind="diff"),
    backup("f2", 80),
    backup("i1", 70, kind="incr"),
    backup("f3", 60, error=True),
    backup("f4", 40),
    backup("f5", 20),
]


@pytest.mark.parametrize(
    ("keep", "expected"),
    [
        (1, ["f5"]),
        (2, ["f4", "f5"]),
        (3, ["f2", "i1", "f4", "f5"]),  # i1 builds on f2, which stays
        (4, ["f1", "d1", "f2", "i1", "f4", "f5"]),
        (10, ["f1", "d1", "f2", "i1", "f4", "f5"]),
    ],
)
def test_expected_after_retention(keep: int, expected: list[str]) -> None:
    assert [b.name for b in expected_after_retention(HISTORY, keep)] == expected
    assert [b.name for b in expected_after_retention(list(reversed(HISTORY)), keep)] == expected


def test_expected_after_retention_empty() -> None:
    assert expected_after_retention([], 3) == []


def test_retention_never_leaves_an_orphan() -> None:
    # Expiring f1 takes d1 with it; f2's incrementals stay with f2.
    chain = [backup("f1", 200), backup("d1", 190, kind="diff"), backup("f2", 100), backup("i1", 90, kind="incr"),
             backup("i2", 80, kind="incr")]
    assert [b.name for b in expected_after_retention(chain, 1)] == ["f2", "i1", "i2"]


# ----------------------------------------------------------------------------- full nights and incrementals

SUNDAY = datetime(2026, 3, 8, 1, 0, tzinfo=UTC)  # NOW is a Tuesday
assert SUNDAY.weekday() == 6 and NOW.weekday() == 1


@pytest.mark.parametrize(("backups", "now", "kind", "why"), [
    pytest.param([], NOW, "full", "no good full backup", id="first-backup"),
    pytest.param([backup("f1", 30, error=True)], NOW, "full", "no good full backup", id="only-a-broken-full"),
    pytest.param([backup("f1", 30)], NOW, "incr", "incremental on full backup f1", id="weeknight"),
    pytest.param([backup("f1", 60), backup("i1", 30, kind="incr")], NOW, "incr", "on full backup f1",
                 id="chain-grows"),
    pytest.param([backup("f1", 24 * 7)], NOW, "full", "is 168.0 h old", id="full-nights-missed"),
    pytest.param([backup("f1", 24 * 7 - 1)], NOW, "incr", "on full backup f1", id="a-week-less-an-hour"),
    pytest.param([backup("f1", 30)], SUNDAY, "full", "Sunday is a full night", id="sunday"),
])
def test_tonights_kind(backups, now, kind, why) -> None:
    from tasks.planning.backup import backup_kind

    found, reason = backup_kind(backups, now, frozenset({6}))
    assert found == kind and why in reason, reason


@pytest.mark.parametrize(("backups", "asked", "kind"), [
    ([backup("f1", 30)], "full", "full"),
    ([backup("f1", 30)], "incr", "incr"),
    ([], "incr", "full"),  # nothing to build on
])
def test_a_kind_asked_for_overrides_the_schedule(backups, asked, kind) -> None:
    from tasks.planning.backup import backup_kind

    assert backup_kind(backups, SUNDAY if asked == "incr" else NOW, frozenset({6}), asked)[0] == kind


def test_every_night_full_when_every_day_is_a_full_night() -> None:
    decided = decide_backup([backup("f1", 30)], NOW, skip_window=WINDOW, force=False, source="pg2")
    assert decided.kind == "full" and "Tuesday is a full night" in decided.plan(7).rows()[0]["plan"]


def test_an_incremental_plan_says_what_it_builds_on() -> None:
    decided = decide_backup([backup("f1", 30)], NOW, skip_window=WINDOW, force=False, source="pg2",
                            full_on=frozenset({6}))
    assert decided.kind == "incr"
    assert "incremental base backup" in decided.plan(7).rows()[0]["plan"]
    assert "on full backup f1" in decided.plan(7).rows()[0]["plan"]


@pytest.mark.parametrize(("names", "days", "refused"), [
    (["sunday"], {6}, None),
    (["Monday", " friday "], {0, 4}, None),
    ([], set(), None),
    (["sundag"], None, "full_on[0]: 'sundag' is not a day name"),
    ("sunday", None, "full_on: give a list of day names"),
])
def test_full_nights_by_name(names, days, refused) -> None:
    from tasks.planning.backup import full_weekdays

    if refused is None:
        assert full_weekdays(names) == frozenset(days)
    else:
        with pytest.raises(BackupPlanError, match=refused.replace("[", r"\[").replace("]", r"\]")):
            full_weekdays(names)


# ----------------------------------------------------------------------------- parse_target


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("latest", None),
        ("  LATEST ", None),
        ("Latest", None),
        ("2026-03-10T10:15:00+01:00", datetime(2026, 3, 10, 9, 15, tzinfo=UTC)),
        ("2026-03-10T10:15:00Z", datetime(2026, 3, 10, 10, 15, tzinfo=UTC)),
        (" 2026-03-10T10:15:00.250000Z ", datetime(2026, 3, 10, 10, 15, 0, 250000, tzinfo=UTC)),
        ("2026-03-10T12:00:00+00:00", NOW),  # exactly now is not the future
        ("2026-03-10 06:59:59-05:00", datetime(2026, 3, 10, 11, 59, 59, tzinfo=UTC)),  # space separator, west of UTC
        ("2026-03-10 07:00:00-05:00", NOW),
        ("2026-03-10T12:30:00+01:00", datetime(2026, 3, 10, 11, 30, tzinfo=UTC)),  # later wall clock, earlier instant
    ],
)
def test_parse_target_ok(text: str, expected: datetime | None) -> None:
    got = parse_target(text, NOW)
    assert got == expected
    if got is not None:
        assert got.tzinfo is not None


def test_parse_target_keeps_the_given_offset() -> None:
    got = parse_target("2026-03-10T10:15:00+01:00", NOW)
    assert got is not None and got.utcoffset() == timedelta(hours=1)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("2026-03-10T10:15:00", "target: '2026-03-10T10:15:00' has no time zone; add one (e.g. +01:00 or Z)"),
        ("2026-03-10", "target: '2026-03-10' has no time zone; add one (e.g. +01:00 or Z)"),
        ("2026-03-10T12:00:01Z", "target: 2026-03-10T12:00:01+00:00 is in the future (now 2026-03-10T12:00:00+00:00)"),
        ("2027-01-01T00:00:00+01:00",
         "target: 2027-01-01T00:00:00+01:00 is in the future (now 2026-03-10T12:00:00+00:00)"),
        ("yesterday", "target: 'yesterday' is neither 'latest' nor an ISO-8601 time (like 2026-11-27T10:15:00+01:00)"),
        ("", "target: '' is neither 'latest' nor an ISO-8601 time (like 2026-11-27T10:15:00+01:00)"),
        ("2026-13-01T00:00:00Z",
         "target: '2026-13-01T00:00:00Z' is neither 'latest' nor an ISO-8601 time (like 2026-11-27T10:15:00+01:00)"),
        ("latest please",
         "target: 'latest please' is neither 'latest' nor an ISO-8601 time (like 2026-11-27T10:15:00+01:00)"),
    ],
)
def test_parse_target_refused(text: str, message: str) -> None:
    with pytest.raises(BackupPlanError) as info:
        parse_target(text, NOW)
    assert str(info.value) == message


# ----------------------------------------------------------------------------- pick_restore_backup

RESTORE = [
    backup("b3", 10),
    backup("b1", 50),
    backup("bad", 5, error=True),
    backup("b2", 30),
]


def at(hours_ago: float) -> datetime:
    return NOW - timedelta(hours=hours_ago)


@pytest.mark.parametrize(
    ("target", "named", "expected"),
    [
        pytest.param(None, None, "b3", id="latest"),
        pytest.param(None, "b1", "b1", id="named-latest"),
        pytest.param(at(40), "b1", "b1", id="named-target-after"),
        pytest.param(at(50), "b1", "b1", id="named-target-equals-finish"),
        pytest.param(at(1), "b2", "b2", id="named-target-after-newer-backup"),
        pytest.param(at(40), None, "b1", id="target-between-b1-b2"),
        pytest.param(at(30), None, "b2", id="target-at-b2-finish"),
        pytest.param(at(20), None, "b2", id="target-between-b2-b3"),
        pytest.param(at(1), None, "b3", id="target-after-all"),
        pytest.param(at(6), None, "b3", id="error-backup-never-chosen"),
    ],
)
def test_pick_restore_backup(target: datetime | None, named: str | None, expected: str) -> None:
    assert pick_restore_backup(RESTORE, target, named).name == expected


@pytest.mark.parametrize(
    ("backups", "target", "named", "message"),
    [
        pytest.param([], None, None, "backup: the repository has no good backup to restore", id="none"),
        pytest.param([backup("bad", 1, error=True)], None, None,
                     "backup: the repository has no good backup to restore", id="only-error"),
        pytest.param(RESTORE, None, "b9", "backup: 'b9' is not among the good backups (b1, b2, b3)",
                     id="named-missing"),
        pytest.param(RESTORE, None, "bad", "backup: 'bad' is not among the good backups (b1, b2, b3)",
                     id="named-error-backup"),
        pytest.param(RESTORE, at(31), "b2",
                     f"target: {at(31).isoformat()} precedes the end of backup b2 ({at(30).isoformat()}); "
                     "recovery cannot stop before a backup is consistent", id="target-before-named-finish"),
        pytest.param(RESTORE, at(51),
                     None, f"target: {at(51).isoformat()} precedes the oldest backup's end ({at(50).isoformat()}); "
                     "nothing can be restored to that time", id="target-before-oldest"),
    ],
)
def test_pick_restore_backup_refused(backups: list[BackupInfo], target: datetime | None, named: str | None,
                                     message: str) -> None:
    with pytest.raises(BackupPlanError) as info:
        pick_restore_backup(backups, target, named)
    assert str(info.value) == message


# ----------------------------------------------------------------------------- restore_cluster (issue 17)

def drill(name: str | None, days_ago: float, passed: bool = True) -> DrillRecord:
    return DrillRecord(name, NOW - timedelta(days=days_ago), passed)


@pytest.mark.parametrize("records, refused, warned", [
    ([drill("b1", 1)], None, None),
    ([drill("b1", 2), drill("b1", 1, passed=False)], "failed", None),
    ([drill("b1", 2, passed=False), drill("b1", 1)], None, None),
    ([drill("b1", 9)], None, "last 8 days"),
    ([drill("b2", 1)], None, "no restore drill of b1"),
    ([drill(None, 1, passed=False)], None, "no restore drill of b1"),
    ([], None, "no restore drill of b1"),
])
def test_drill_verdict(records, refused, warned) -> None:
    refusal, warning = drill_verdict(records, "b1", NOW)
    assert (refusal is None) == (refused is None) and (refused is None or refused in refusal), refusal
    assert (warning is None) == (warned is None) and (warned is None or warned in warning), warning


@pytest.mark.parametrize("given_cluster, given_target, wrong", [
    ("prod", "2026-03-10T11:02:00+00:00", None),
    ("", "", "confirm_cluster and confirm_target"),
    ("prod", "2026-03-10T11:02:00Z", "confirm_target"),
    ("Prod", "2026-03-10T11:02:00+00:00", "confirm_cluster"),
])
def test_confirmation_is_typed_back_exactly(given_cluster, given_target, wrong) -> None:
    refusal = confirmation_refusal("prod", "2026-03-10T11:02:00+00:00", given_cluster, given_target)
    assert (refusal is None) == (wrong is None)
    assert wrong is None or refusal.startswith(wrong + ":"), refusal


@pytest.mark.parametrize(("ago", "said"), [(timedelta(seconds=20), "0 min"), (timedelta(minutes=119), "119 min"),
                                           (timedelta(hours=2), "2.0 h"), (timedelta(hours=30), "30.0 h")])
def test_the_loss_is_said_in_minutes_then_hours(ago: timedelta, said: str) -> None:
    plan = plan_cluster_restore("prod", ["pg1"], "pg1", backup("b1", 40), NOW - ago, NOW, keep_aside=True)
    assert f"({said} of writes up to now)" in plan.remarks()[0]


def test_cluster_restore_plan_says_first_what_is_lost() -> None:
    target = NOW - timedelta(minutes=58)
    plan = plan_cluster_restore("prod", ["pg1", "pg2", "pg3"], "pg2", backup("b1", 5), target, NOW, keep_aside=True)
    assert plan.remarks()[0].startswith("Lost: every change committed on pg1, pg2, pg3 after ")
    assert "(58 min of writes up to now)" in plan.remarks()[0]
    hosts = [a.host for a in plan.actions]
    assert hosts == ["pg1", "pg2", "pg3", "pg2", "pg1", "pg3", "cluster"], hosts
    assert "aside (renamed)" in plan.actions[3].plan and "b1" in plan.actions[3].plan


def test_cluster_restore_plan_without_room_to_keep_the_data_says_so() -> None:
    plan = plan_cluster_restore("prod", ["pg1", "pg2"], "pg1", backup("b1", 5), None, NOW, keep_aside=False)
    assert any("overwritten, not kept aside" in n for n in plan.remarks())
    assert "end of the archive" in plan.actions[2].plan


def test_cluster_restore_plan_refused_has_no_actions() -> None:
    plan = plan_cluster_restore("prod", ["pg1"], "pg1", backup("b1", 5), None, NOW, keep_aside=True,
                                refusals=("backup: nope",))
    assert plan.refusals == ("backup: nope",) and not plan.actions


def _inventory(name: str, hosts: dict[str, tuple[str, list[str]]], *, version: int = 15, tool: str = "pgbackrest",
               ha: str = "patroni"):
    from blocks.inventory import parse_inventory

    return parse_inventory({
        "cluster": {"name": name, "network": "172.29.66.0/24", "postgres": {"version": version}, "backup_tool": tool,
                    "ha_manager": ha,
                    "object_store": {"host": "backup1", "endpoint": "https://backup1.lab:9000", "bucket": "pgbackups"}},
        "hosts": [{"name": h, "address": a, "roles": r} for h, (a, r) in hosts.items()]})


SOURCE = {"pg1": ("172.29.66.11", ["db"]), "pg2": ("172.29.66.12", ["db"]), "pg3": ("172.29.66.13", ["db"]),
          "backup1": ("172.29.66.20", ["backup"])}
CLONE = {"ac1": ("172.29.66.31", ["db"]), "ac2": ("172.29.66.32", ["db"]), "ac3": ("172.29.66.33", ["db"]),
         "backup1": ("172.29.66.20", ["backup"])}


@pytest.mark.parametrize("target, refused", [
    (_inventory("acc", CLONE), None),
    (_inventory("prod", CLONE), "is the source cluster itself"),
    (_inventory("acc", {**CLONE, "ac3": ("172.29.66.13", ["db"])}), "host ac3 (172.29.66.13) is also pg3"),
    (_inventory("acc", {**{k: v for k, v in CLONE.items() if k != "ac3"}, "pg3": ("172.29.66.13", ["db"])}),
     "host pg3 (172.29.66.13) is also pg3"),
    (_inventory("acc", CLONE, version=16), "PostgreSQL 16 cannot restore a backup of PostgreSQL 15"),
    (_inventory("acc", CLONE, tool="walg"), "walg cannot read prod's pgbackrest backups"),
    (_inventory("acc", CLONE, ha="stolon"), "clones into Patroni clusters only"),
])
def test_a_clone_shares_nothing_the_source_writes_to(target, refused) -> None:
    refusals = clone_refusals(_inventory("prod", SOURCE), target)
    if refused is None:
        assert refusals == []
    else:
        assert any(refused in r for r in refusals), refusals


@pytest.mark.parametrize(("free", "restored", "keeps"), [
    (10 * 2**30, 2**30, True),  # plenty
    (2**30 + 256 * 2**20, 2**30, True),  # the floor, exactly
    (2**30 + 256 * 2**20 - 1, 2**30, False),
    (110 * 2**30, 100 * 2**30, True),  # 10 % over the floor at this size
    (110 * 2**30 - 1, 100 * 2**30, False),
    (0, 0, False),  # an empty filesystem still needs the floor for WAL
])
def test_the_primary_is_kept_aside_only_where_the_restored_copy_fits_beside_it(free: int, restored: int,
                                                                                  keeps: bool) -> None:
    assert room_to_keep_aside(free, restored) is keeps


# ----------------------------------------------------------------------------- clone_cluster


@pytest.mark.parametrize(("statements", "refused"), [
    ([], None),
    (["update customers set email = 'x'"], None),
    ([" \n"], "post_clone_sql[0]: empty"),
    (["select 1", "select '\x00'"], "post_clone_sql[1]: contains a NUL byte"),
    (["x" * (64 * 1024 + 1)], "longer than 64 KiB"),
    ("update t set a = 1", "give a list of SQL texts"),
    ([1], "give a list of SQL texts"),
])
def test_post_clone_sql_is_refused_before_anything_runs(statements, refused) -> None:
    found = post_clone_sql_refusal(statements)
    assert found is None if refused is None else (found is not None and refused in found), found


def test_clone_plan_of_a_bare_target_builds_first_and_loses_nothing() -> None:
    plan = plan_clone("prod", "acc", ["ac1", "ac2", "ac3"], "ac1", backup("b1", 5), None,
                      holds_data=False, built=False, post_sql=2)
    hosts = [a.host for a in plan.actions]
    assert hosts == ["acc", "ac1", "ac2", "ac3", "acc", "ac1", "ac2", "ac3", "acc"], hosts
    assert "build_cluster first" in plan.actions[0].plan
    assert "emptied" in plan.actions[4].plan
    assert "prod's b1" in plan.actions[5].plan and "2 post-clone SQL" in plan.actions[5].plan
    assert "restore key" in plan.actions[5].plan and "archiving off" in plan.actions[5].plan
    assert plan.remarks()[0] == "acc holds no database yet: nothing is lost."


def test_clone_plan_of_a_built_target_says_first_what_it_loses() -> None:
    target = NOW - timedelta(hours=1)
    plan = plan_clone("prod", "acc", ["ac1", "ac2"], "ac2", backup("b1", 5), target,
                      holds_data=True, built=True, post_sql=0)
    assert [a.host for a in plan.actions] == ["ac1", "ac2", "acc", "ac2", "ac1", "acc"]
    assert plan.remarks()[0].startswith("Lost: acc's current data on ac1, ac2, and the backups and WAL")
    assert target.isoformat() in plan.actions[3].plan and "post-clone" not in plan.actions[3].plan


def test_clone_plan_refused_has_no_actions() -> None:
    plan = plan_clone("prod", "acc", ["ac1"], "ac1", backup("b1", 5), None, holds_data=False, built=False,
                      post_sql=0, refusals=("target_cluster: nope",))
    assert plan.refusals == ("target_cluster: nope",) and not plan.actions


@pytest.mark.parametrize(("cores", "on_primary", "processes"), [
    (1, False, 1), (2, False, 2), (8, False, 8), (64, False, 16),
    (1, True, 1), (2, True, 1), (8, True, 4), (64, True, 16),
])
def test_parallel_copy_follows_the_hosts_cores(cores, on_primary, processes) -> None:
    from tasks.planning.backup import copy_processes

    assert copy_processes(cores, on_primary=on_primary) == processes
