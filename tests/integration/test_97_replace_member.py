"""replace_member (issue 16): pg3, a database host and an etcd member, is lost for good and pg4
takes its place. The last module before the lab goes down: pg3 never comes back."""

from __future__ import annotations

import time

import pytest
from labtools import lab_ssh

from lab.topology import VIP


@pytest.fixture(scope="module", autouse=True)
def lab_down_afterwards(lab):
    """pg3 is gone for good, its etcd data naming a member the others removed: whatever runs on
    this lab next (the demo, another session) starts from bare hosts instead."""
    yield
    lab.down()


def _wait(what: str, probe, timeout: float) -> None:
    """Poll until `probe` says yes; an error on the way (a host just killed) is a no."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if probe():
                return
        except Exception as exc:  # noqa: BLE001 - any failure to answer is "not yet"
            last = exc
        else:
            last = None
        assert time.monotonic() < deadline, f"{what} within {timeout:.0f}s (last error: {last})"
        time.sleep(2)


def _etcd_names_and_health(ctx) -> tuple[list[str], dict[str, bool]]:
    etcd = ctx.etcd()
    return sorted(m.name for m in etcd.members()), etcd.endpoint_health()


def test_a_dead_etcd_member_is_replaced_and_etcd_survives_the_next_loss(lab, routed):
    from flows.add_standby import add_standby
    from flows.members import remove_member, replace_member
    from flows.switchover import switchover
    from lab.avprobe import AvailabilityProbe
    from tasks.context import context_for
    from tasks.ha import primary_of, read_view

    add_standby(cluster="lab", host="pg4")  # a no-op after test_50; run alone, pg4 first joins
    ctx = context_for("lab", fresh=True)
    if primary_of(ctx).name == "pg3":
        switchover(cluster="lab", candidate="pg1")
    # pg4 becomes the spare host a site keeps for the day a member dies.
    remove_member(cluster="lab", host="pg4", wipe=True, confirm="pg4")
    ctx = context_for("lab", fresh=True)
    primary = primary_of(ctx).name
    assert [h.name for h in ctx.inventory.etcd_members] == ["pg1", "pg2", "pg3"]

    probe = AvailabilityProbe(ctx.application_endpoint(str(VIP), 5432), max_seconds=900).start()
    time.sleep(2)
    lab.kill("pg3")
    # Until its HA key expires the HA manager still counts pg3 healthy; replace_member refuses then.
    _wait("the HA manager counting pg3 unhealthy",
          lambda: (m := read_view(ctx).member("pg3")) is None or not m.healthy, timeout=180)

    plan = replace_member(cluster="lab", dead="pg3", new="pg4", dry_run=True)
    assert [r["host"] for r in plan["plan"]] == ["pg3", "pg4", "pg4"], plan
    done = replace_member(cluster="lab", dead="pg3", new="pg4")
    time.sleep(2)
    report = probe.stop()
    assert probe.missing_acknowledged() == []
    print(f"replace_member pg3 → pg4: {len(report.acknowledged)} writes, {report.failures} failed, "
          f"longest gap {report.longest_gap():.2f}s; errors: {sorted({a.error[:120] for a in report.attempts if a.error})}")
    assert done["etcd_members"] == ["pg1", "pg2", "pg4"], done
    assert next(r for r in done["topology"] if r["host"] == "pg4")["state"].startswith("streaming")

    ctx = context_for("lab", fresh=True)
    names, health = _etcd_names_and_health(ctx)
    assert names == ["pg1", "pg2", "pg4"] and all(health.values()), (names, health)
    assert primary_of(ctx).name == primary, "the primary moved"
    assert "pg3" not in lab_ssh(lab, "router1", "cat /etc/haproxy/haproxy.cfg").stdout
    assert "pg4" in lab_ssh(lab, "router1", "cat /etc/haproxy/haproxy.cfg").stdout
    env = lab_ssh(lab, "pg4", "cat /etc/default/etcd").stdout
    assert "ETCD_INITIAL_CLUSTER_STATE=new" in env and "pg3=" not in env, "pg4's etcd file is not the desired one"

    again = replace_member(cluster="lab", dead="pg3", new="pg4")
    assert again["changed"] is False, again

    # Three members again: losing any one more keeps a quorum, a leader and a primary.
    victim = next(name for name in ("pg1", "pg2", "pg4") if name != primary)
    lab.kill(victim)
    try:
        etcd = ctx.etcd()
        _wait("an etcd leader among the two left", lambda: sum(etcd.endpoint_health().values()) == 2, timeout=60)
        _wait("a primary", lambda: read_view(ctx).leader == primary, timeout=60)
    finally:
        lab.start(victim)
    from tasks.etcd import wait_until_etcd_healthy

    wait_until_etcd_healthy.fn("lab", timeout=300)
