"""Tables for rolling_upgrade's pure parts: Debian versions, apt's answers, what each host needs,
the readiness checks, the order and the plan (tasks/adapters/packages.py, tasks/planning/upgrade.py)."""

from __future__ import annotations

import pytest

from tasks.adapters.commands import CommandResult
from tasks.adapters.ha.base import ClusterView, Member
from tasks.adapters.packages import (
    PackageSpecError,
    PackageState,
    compare_versions,
    install_command,
    parse_policy,
    parse_unit_starts,
    upstream_version,
    validate_targets,
)
from tasks.planning.upgrade import (
    HostUpgrade,
    SettingsPlanError,
    host_upgrades,
    readiness_refusals,
    release_mix,
    upgrade_leftovers,
    upgrade_order,
    upgrade_plan,
)


@pytest.mark.parametrize("a, b, expected", [
    ("4.1.5-2", "4.0.7-3~deb13u1", 1),
    ("4.0.7-3~deb13u1", "4.0.7-3", -1),
    ("4.0.7-3", "4.0.7-3", 0),
    ("1.0~rc1", "1.0", -1),
    ("1.0", "1.0+b1", -1),
    ("1:1.0", "9.9", 1),
    ("2.55.1-1", "2.60.0-1", -1),
    ("2.9", "2.10", -1),
    ("1.0-1", "1.0-1.1", -1),
    ("1.0a", "1.0", 1),
    ("1.0", "1.0-0", 0),
    ("01.0", "1.0", 0),
    ("1.0-1~bpo12+1", "1.0-1", -1),
    ("2:1.0-1", "1:2.0-1", 1),
])
def test_compare_versions(a: str, b: str, expected: int) -> None:
    assert compare_versions(a, b) == expected
    assert compare_versions(b, a) == -expected


def test_upstream_version() -> None:
    assert upstream_version("4.1.5-2") == "4.1.5"
    assert upstream_version("1:2.3-1~bpo12+1") == "2.3"
    assert upstream_version("2.60.0") == "2.60.0"


@pytest.mark.parametrize("packages, field", [
    (None, "packages:"),
    ({}, "packages:"),
    ({"Patroni": "4.1.5-2"}, "'Patroni' is not a Debian package name"),
    ({"patroni": "latest"}, "packages.patroni: 'latest'"),
    ({"patroni": "4.1.5; rm -rf /"}, "packages.patroni"),
    ({"patroni": "4.1.5-"}, "packages.patroni"),
    ({"p": "1.0"}, "'p' is not a Debian package name"),
])
def test_validate_targets_names_the_field(packages, field: str) -> None:
    with pytest.raises(PackageSpecError, match=field.replace("(", r"\(")):
        validate_targets(packages)


def test_validate_targets_accepts_debian_versions() -> None:
    assert validate_targets({"patroni": "4.1.5-2", "libpq5": "1:15.10-0+deb12u1", "pgbackrest": "2.60.0"}) == {
        "patroni": "4.1.5-2", "libpq5": "1:15.10-0+deb12u1", "pgbackrest": "2.60.0"}


POLICY = """\
patroni:
  Installed: 4.0.7-3~deb13u1
  Candidate: 4.1.5-2
  Version table:
     4.1.5-2 500
        500 file:/srv/bouwsteen-apt ./ Packages
 *** 4.0.7-3~deb13u1 500
        500 file:/srv/bouwsteen-apt ./ Packages
        100 /var/lib/dpkg/status
pgbackrest:
  Installed: 2.55.1-1
  Candidate: 2.55.1-1
  Version table:
 *** 2.55.1-1 100
        100 /var/lib/dpkg/status
haproxy:
  Installed: (none)
  Candidate: 2.6.12-1+deb12u2
  Version table:
     2.6.12-1+deb12u2 500
        500 http://deb.debian.org/debian bookworm/main amd64 Packages
"""


def test_parse_policy() -> None:
    states = parse_policy(POLICY)
    assert states["patroni"] == PackageState("patroni", "4.0.7-3~deb13u1", "4.1.5-2", ("4.1.5-2", "4.0.7-3~deb13u1"))
    # Installed only from the status file: no source offers it any more.
    assert states["pgbackrest"] == PackageState("pgbackrest", "2.55.1-1", "2.55.1-1", ())
    assert states["haproxy"] == PackageState("haproxy", None, "2.6.12-1+deb12u2", ("2.6.12-1+deb12u2",))
    assert parse_policy("N: Unable to locate package nosuch\n") == {}


def test_install_command_pins_every_version_and_keeps_configuration() -> None:
    line = install_command({"pgbackrest": "2.60.0-1", "patroni": "4.1.5-2"}).render()
    assert "patroni=4.1.5-2 pgbackrest=2.60.0-1" in line
    assert "--force-confold" in line and "--no-install-recommends" in line and "--allow-downgrades" not in line
    assert line.startswith("timeout ")


def test_parse_unit_starts_reads_blocks_in_any_order() -> None:
    result = CommandResult("ExecMainStartTimestampMonotonic=123\nId=patroni.service\n\n"
                              "Id=etcd.service\nExecMainStartTimestampMonotonic=0\n", "", 0)
    assert parse_unit_starts(result) == {"patroni.service": 123, "etcd.service": 0}


def state(name: str, installed: str | None, *available: str) -> PackageState:
    return PackageState(name, installed, available[0] if available else installed, tuple(available))


OLD, NEW = "4.0.7-3~deb13u1", "4.1.5-2"


@pytest.mark.parametrize("states, upgrades, refusals", [
    ({"pg1": {"patroni": state("patroni", OLD, NEW, OLD)}, "backup1": {"patroni": state("patroni", None, NEW)}},
     {"pg1": (("patroni", OLD, NEW),)}, []),
    ({"pg1": {"patroni": state("patroni", NEW, NEW)}}, {}, []),
    ({"pg1": {"patroni": state("patroni", OLD, OLD)}}, {},
     [f"packages.patroni: {NEW} is not available on pg1 (its sources offer {OLD})"]),
    ({"pg1": {"patroni": state("patroni", "4.2.0-1", NEW)}}, {},
     ["packages.patroni: pg1 runs 4.2.0-1, newer than 4.1.5-2; a rolling upgrade never downgrades"]),
    ({"pg1": {"patroni": state("patroni", None, NEW)}}, {},
     ["packages.patroni: not installed on any host of the cluster"]),
    ({"pg1": {}}, {}, ["packages.patroni: not installed on any host of the cluster"]),
], ids=["upgrades-where-installed", "already-done", "not-offered", "no-downgrade", "installed-nowhere",
        "unknown-to-apt"])
def test_host_upgrades(states, upgrades, refusals) -> None:
    found, refused = host_upgrades({"patroni": NEW}, states)
    assert {h: u.changes for h, u in found.items()} == upgrades
    assert refused == refusals


@pytest.mark.parametrize("kwargs, expected", [
    ({}, []),
    ({"caught_up": {"pg2": False, "pg3": True}}, ["pg2 lags more than max_lag_bytes=1024"]),
    ({"oldest_transaction_s": 900}, ["a transaction on the primary has been open 900s"]),
    ({"backup_problem": "there is no good backup at all"}, ["there is no good backup at all; take a backup first"]),
    ({"backup_problem": "there is no good backup at all", "force": True}, []),
])
def test_readiness_refusals(kwargs, expected) -> None:
    args = {"caught_up": {"pg2": True}, "max_lag_bytes": 1024, "oldest_transaction_s": 1.0,
            "max_transaction_age_s": 300.0, "backup_problem": None, "force": False, **kwargs}
    refusals = readiness_refusals(**args)
    assert len(refusals) == len(expected)
    assert all(r.startswith(e) for r, e in zip(refusals, expected))


def view(leader: str = "pg1", standbys: tuple[str, ...] = ("pg2", "pg3", "pg4"), down: tuple[str, ...] = ()):
    members = [Member(leader, "", "primary", True)] + [Member(s, "", "replica", s not in down, lag_bytes=0)
                                                        for s in standbys]
    return ClusterView(initialized=True, members=tuple(members), leader=leader)


ALL = {"pg2": True, "pg3": True, "pg4": True}


def ups(*hosts: str) -> dict[str, HostUpgrade]:
    return {h: HostUpgrade(h, (("patroni", OLD, NEW),)) for h in hosts}


@pytest.mark.parametrize("upgrades, steps", [
    (ups("pg1", "pg2", "pg3", "pg4"),
     [("upgrade", "pg3"), ("upgrade", "pg4"), ("upgrade", "pg2"), ("switchover", "pg2"), ("upgrade", "pg1")]),
    (ups("pg1", "pg2", "pg3", "pg4", "backup1"),
     [("upgrade", "pg3"), ("upgrade", "pg4"), ("upgrade", "pg2"), ("switchover", "pg2"), ("upgrade", "backup1"),
      ("upgrade", "pg1")]),
    # A rerun after the old primary failed: only it is left, and it is still the primary.
    (ups("pg1"), [("switchover", "pg2"), ("upgrade", "pg1")]),
    # A rerun after the switchover: the new primary runs the target, the old one (a standby) does not.
    (ups("pg3", "backup1"), [("upgrade", "pg3"), ("upgrade", "backup1")]),
    (ups("backup1"), [("upgrade", "backup1")]),
    ({}, []),
], ids=["whole-cluster", "with-backup-server", "only-primary-left", "after-switchover", "backup-only", "nothing"])
def test_upgrade_order(upgrades, steps) -> None:
    assert upgrade_order(view(), ALL, upgrades) == steps


def test_upgrade_order_refuses_an_unhealthy_cluster() -> None:
    with pytest.raises(SettingsPlanError, match="pg3 does not stream"):
        upgrade_order(view(), {"pg2": True, "pg4": True}, ups("pg2"))


def test_upgrade_plan() -> None:
    upgrades = ups("pg1", "pg2", "backup1")
    order = upgrade_order(view(standbys=("pg2",)), {"pg2": True}, upgrades)
    plan = upgrade_plan(upgrades, order, primary="pg1", db_hosts=["pg1", "pg2"], reboot=False,
                        approve_each_host=True)
    assert plan.rows() == [
        {"host": "pg2", "plan": "after approval in the Prefect UI: standby: upgrade patroni 4.0.7-3~deb13u1 → 4.1.5-2; "
                                "restart the services whose package changed; wait until it streams and is caught up"},
        {"host": "pg2", "plan": "switchover from pg1 to the best caught-up standby of that moment (now pg2)"},
        {"host": "backup1", "plan": "after approval in the Prefect UI: no PostgreSQL: upgrade patroni 4.0.7-3~deb13u1 "
                                    "→ 4.1.5-2; restart the services whose package changed; wait until its services run"},
        {"host": "pg1", "plan": "after approval in the Prefect UI: the former primary, now a standby: upgrade patroni "
                                "4.0.7-3~deb13u1 → 4.1.5-2; restart the services whose package changed; "
                                "wait until it streams again"},
    ]
    assert upgrade_plan({}, [], primary="pg1", db_hosts=[], reboot=False, approve_each_host=False).is_noop
    drained = upgrade_plan(upgrades, order, primary="pg1", db_hosts=["pg1", "pg2"], reboot=True,
                           approve_each_host=False, drain=True).rows()
    assert drained[0] == {"host": "pg2", "plan": "standby: drain it (not promoted, not synchronous); upgrade patroni "
                                                 "4.0.7-3~deb13u1 → 4.1.5-2; reboot it; wait until it streams and is "
                                                 "caught up; count it in again"}
    assert "drain" not in drained[2]["plan"]  # backup1 runs no PostgreSQL


def test_upgrade_leftovers_and_release_mix() -> None:
    states = {"pg1": {"patroni": state("patroni", NEW)}, "pg2": {"patroni": state("patroni", OLD)},
              "backup1": {"patroni": state("patroni", None)}}
    assert upgrade_leftovers({"patroni": NEW}, states) == [f"pg2: patroni is {OLD}, not {NEW}"]
    assert release_mix("pgBackRest", {"pg1": "2.55.1", "pg2": "2.55.1", "backup1": None}) is None
    assert release_mix("pgBackRest", {"pg1": "2.60.0", "pg2": "2.55.1", "backup1": "2.55.1"}) == (
        "pgBackRest runs different releases: 2.55.1 on backup1, pg2; 2.60.0 on pg1")


@pytest.mark.parametrize("driver, stdout, code, release", [
    ("pgbackrest", "pgBackRest 2.55.1\n", 0, "2.55.1"),
    ("pgbackrest", "", 127, None),
    ("walg", "wal-g version v3.0.5\t2a1b3c4\t2024.12.30_10:12:23\tPostgreSQL\n", 0, "3.0.5"),
    ("walg", "", 127, None),
])
def test_backup_tool_releases(driver: str, stdout: str, code: int, release: str | None) -> None:
    from tasks.adapters.backup.pgbackrest import PgBackRestDriver
    from tasks.adapters.backup.walg import WalgDriver

    tool = {"pgbackrest": PgBackRestDriver, "walg": WalgDriver}[driver]()
    assert tool.release_command().ok_codes == (0, 127)
    assert tool.parse_release(CommandResult(stdout, "", code)) == release
