"""Tables for the member lifecycle's pure decisions (tasks/planning/members.py)."""

from __future__ import annotations

import pytest

from blocks.inventory import Inventory, parse_inventory
from tasks.adapters.ha.base import ClusterView, Member
from tasks.planning.members import (
    MemberSnapshot,
    plan_reinit,
    plan_removal,
    plan_replacement,
)


def inventory(roles: dict[str, list[str]], *, sync: bool = False) -> Inventory:
    hosts = [{"name": name, "address": f"172.29.66.{11 + i}", "roles": r} for i, (name, r) in enumerate(roles.items())]
    return parse_inventory({"cluster": {"name": "lab", "network": "172.29.66.0/24",
                                        "postgres": {"synchronous_replication": sync}},
                            "hosts": hosts})


FOUR = {"pg1": ["db", "etcd"], "pg2": ["db", "etcd"], "pg3": ["db", "etcd"], "pg4": ["db"]}
SPARE = {"pg1": ["db", "etcd"], "pg2": ["db", "etcd"], "pg3": ["db", "etcd"], "pg4": []}


def snap(leader: str | None = "pg1", members=("pg1", "pg2", "pg3", "pg4"), etcd=("pg1", "pg2", "pg3"),
         streaming=("pg2", "pg3", "pg4"), down=()) -> MemberSnapshot:
    view = ClusterView(initialized=True, leader=leader, members=tuple(
        Member(m, "", "primary" if m == leader else "replica", m not in down) for m in members))
    return MemberSnapshot(view, tuple(etcd), tuple(streaming))


@pytest.mark.parametrize("roles, host, state, sync, refused", [
    (FOUR, "pg4", snap(), False, None),
    (FOUR, "pg1", snap(), False, "is the primary"),
    (FOUR, "pg3", snap(), False, "replace it instead"),
    (FOUR, "pg4", snap(leader=None), False, "has no primary"),
    ({"pg1": ["db", "etcd"], "pg2": ["db", "etcd"], "pg3": ["etcd"]}, "pg2", snap(members=("pg1", "pg2")), True,
     "synchronous mode needs one standby"),
    (FOUR, "pg9", snap(), False, "not in the inventory"),
])
def test_removal_refusals(roles, host, state, sync, refused) -> None:
    plan = plan_removal(inventory(roles, sync=sync), host, state)
    if refused is None:
        assert not plan.refusals and plan.actions
    else:
        assert any(refused in r for r in plan.refusals), plan.refusals


def test_removal_rerun_is_a_noop() -> None:
    plan = plan_removal(inventory(SPARE), "pg4", snap(members=("pg1", "pg2", "pg3"), streaming=("pg2", "pg3")))
    assert plan.is_noop and "nothing to remove" in plan.noop_summary


@pytest.mark.parametrize("host, state, force, refused", [
    ("pg2", snap(streaming=("pg3", "pg4")), False, None),
    ("pg2", snap(), False, "needs force=True"),
    ("pg2", snap(), True, None),
    ("pg1", snap(), True, "is the primary"),
    ("pg9", snap(), True, "not a member"),
    ("pg2", snap(leader=None), True, "no primary"),
])
def test_reinit_refusals(host, state, force, refused) -> None:
    plan = plan_reinit(host, state, data_dir="/var/lib/postgresql/15/main", force=force)
    if refused is None:
        assert not plan.refusals and "/var/lib/postgresql/15/main" in plan.actions[0].plan
    else:
        assert any(refused in r for r in plan.refusals), plan.refusals


@pytest.mark.parametrize("dead, new, state, refused", [
    ("pg3", "pg4", snap(members=("pg1", "pg2", "pg3"), down=("pg3",)), None),
    ("pg3", "pg4", snap(members=("pg1", "pg2")), None),
    ("pg3", "pg4", snap(members=("pg1", "pg2", "pg3")), "still counts pg3 healthy"),
    ("pg3", "pg3", snap(), "another host"),
    ("pg1", "pg4", snap(), "fail over first"),
    ("pg3", "pg9", snap(), "new: 'pg9'"),
])
def test_replacement_refusals(dead, new, state, refused) -> None:
    plan = plan_replacement(inventory(SPARE), dead, new, state)
    if refused is None:
        assert not plan.refusals and any("etcd member add" in a.plan for a in plan.actions)
    else:
        assert any(refused in r for r in plan.refusals), plan.refusals


def test_replacing_a_member_with_a_member_is_refused() -> None:
    plan = plan_replacement(inventory(FOUR), "pg3", "pg4", snap())
    assert any("already is a member" in r for r in plan.refusals)


# ----------------------------------------------------------------------------- the inventory written back

def _roles(inv: Inventory) -> dict[str, list[str]]:
    return {h.name: sorted(r.value for r in h.roles) for h in inv.hosts}


@pytest.mark.parametrize("roles, change, expected", [
    (FOUR, lambda inv: inv.without_member("pg4"), {**FOUR, "pg4": []}),
    # Implicit etcd members (every db host) are pinned before one of them leaves the db role.
    ({"pg1": ["db"], "pg2": ["db"], "pg3": ["db"], "pg4": ["db", "etcd"], "pg5": ["etcd"], "pg6": ["etcd"]},
     lambda inv: inv.without_member("pg1"),
     {"pg1": [], "pg2": ["db"], "pg3": ["db"], "pg4": ["db", "etcd"], "pg5": ["etcd"], "pg6": ["etcd"]}),
    (SPARE, lambda inv: inv.replacing("pg3", "pg4"),
     {"pg1": ["db", "etcd"], "pg2": ["db", "etcd"], "pg3": [], "pg4": ["db", "etcd"]}),
    ({**SPARE, "pg5": ["db"]}, lambda inv: inv.replacing("pg5", "pg4"), {**SPARE, "pg4": ["db"], "pg5": []}),
    ({"pg1": ["db"], "pg2": ["db"], "pg3": ["db"], "pg4": []}, lambda inv: inv.replacing("pg3", "pg4"),
     {"pg1": ["db", "etcd"], "pg2": ["db", "etcd"], "pg3": [], "pg4": ["db", "etcd"]}),
])
def test_membership_changes_keep_the_host_and_pin_etcd(roles, change, expected) -> None:
    after = change(inventory(roles))
    assert _roles(after) == {name: sorted(r) for name, r in expected.items()}


def test_removing_an_etcd_member_the_quorum_needs_is_refused_by_the_inventory_too() -> None:
    with pytest.raises(ValueError, match="at least 3 are needed"):
        inventory(FOUR).without_member("pg3")


@pytest.mark.parametrize("rows, host, ok", [
    ([{"host": "pg1", "state": "accepting writes"}, {"host": "pg4", "state": "streaming (async)"}], "pg4", True),
    ([{"host": "pg1", "state": "accepting writes"}, {"host": "pg4", "state": "not streaming"}], "pg4", False),
    ([{"host": "pg1", "state": "accepting writes"}], "pg4", False),
])
def test_a_runbooks_last_word_is_its_members_streaming_row(rows, host, ok) -> None:
    from tasks.errors import VerifyFailed
    from tasks.ha import streaming_row

    if ok:
        assert streaming_row(rows, host)["host"] == host
    else:
        with pytest.raises(VerifyFailed, match=f"{host} is not streaming"):
            streaming_row(rows, host)
