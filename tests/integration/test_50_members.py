"""remove_member and reinit_standby (issue 16) on the routed lab, under a writer through the VIP:
a standby leaves and comes back, a damaged standby is cloned again, and the primary never moves."""

from __future__ import annotations

import time

import pytest
from labtools import lab_ssh, refused

from lab.topology import VIP

PGDATA = "/var/lib/postgresql/15/main"
PSQL = "runuser -u postgres -- psql -XAt -h /var/run/postgresql -c "


@pytest.fixture(scope="module")
def four_members(routed):
    """pg4 a streaming standby, as test_20 leaves it (a no-op then; run alone, this adds it)."""
    from flows.add_standby import add_standby

    add_standby(cluster="lab", host="pg4")
    return routed


def _writer(ctx, seconds: float):
    from lab.avprobe import AvailabilityProbe

    probe = AvailabilityProbe(ctx.application_endpoint(str(VIP), 5432), max_seconds=seconds).start()
    time.sleep(2)
    return probe


def _no_write_missed(probe, what: str) -> None:
    time.sleep(2)
    report = probe.stop()
    # The primary never moves, so no write may fail at all, not merely none be lost.
    assert report.failures == 0, f"{what}: {report.failures} writes failed"
    assert probe.missing_acknowledged() == []
    print(f"{what}: {len(report.acknowledged)} writes, 0 failed, longest gap {report.longest_gap():.2f}s")


def test_remove_member_then_add_it_back(lab, four_members):
    from flows.add_standby import add_standby
    from flows.members import remove_member
    from tasks.context import context_for
    from tasks.ha import primary_of

    ctx = context_for("lab", fresh=True)
    primary = primary_of(ctx).name
    assert primary != "pg4", "the lab's earlier tests leave pg4 a standby"

    plan = remove_member(cluster="lab", host="pg4", dry_run=True)
    assert [r["host"] for r in plan["plan"]] == ["pg4", "cluster"], plan
    refused(remove_member(cluster="lab", host=primary, return_state=True), "is the primary")
    refused(remove_member(cluster="lab", host="pg4", wipe=True, return_state=True), "confirm:")
    assert lab_ssh(lab, "pg4", "systemctl is-active patroni").stdout.strip() == "active", "a refusal changed pg4"

    probe = _writer(ctx, 600)
    done = remove_member(cluster="lab", host="pg4", wipe=True, confirm="pg4")
    _no_write_missed(probe, "remove_member pg4")
    assert done["changed"] and done["wiped"], done
    assert [r["host"] for r in done["topology"]][0] == primary
    assert "pg4" not in {r["host"] for r in done["topology"]}

    ctx = context_for("lab", fresh=True)
    assert ctx.inventory.host("pg4").roles == [], "pg4 still has roles in the inventory block"
    assert lab_ssh(lab, "pg4", "systemctl is-enabled patroni", check=False).stdout.strip() == "disabled"
    assert lab_ssh(lab, "pg4", f"test -e {PGDATA}", check=False).returncode != 0, "wipe=True kept the data"
    assert "pg4" not in lab_ssh(lab, "router1", "cat /etc/haproxy/haproxy.cfg").stdout
    assert "pg4" not in lab_ssh(lab, primary, "cat /var/lib/postgresql/.ssh/authorized_keys", check=False).stdout
    slots = lab_ssh(lab, primary, PSQL + "'select slot_name from pg_replication_slots'").stdout.split()
    assert "pg4" not in slots, slots

    again = remove_member(cluster="lab", host="pg4")
    assert again["changed"] is False and again["plan"] == [], again

    back = add_standby(cluster="lab", host="pg4")
    assert back["changed"], back
    assert primary_of(context_for("lab", fresh=True)).name == primary, "the primary moved"


def test_reinit_standby_clones_a_damaged_standby_again(lab, four_members):
    from flows.members import reinit_standby
    from tasks.context import context_for
    from tasks.ha import primary_of

    ctx = context_for("lab", fresh=True)
    primary = primary_of(ctx).name
    refused(reinit_standby(cluster="lab", host=primary, return_state=True), "is the primary")
    refused(reinit_standby(cluster="lab", host="pg4", return_state=True), "force=True")
    plan = reinit_standby(cluster="lab", host="pg4", force=True, dry_run=True)
    assert plan["plan"][0]["host"] == "pg4" and PGDATA in plan["plan"][0]["plan"], plan

    # A damaged data directory: PostgreSQL cannot start on it, so pg4 stops streaming.
    lab_ssh(lab, "pg4", f"systemctl stop patroni && rm -f {PGDATA}/global/pg_control && systemctl start patroni")
    deadline = time.monotonic() + 120
    while "pg4" in lab_ssh(lab, primary, PSQL + "'select application_name from pg_stat_replication'").stdout.split():
        assert time.monotonic() < deadline, "pg4 still streams without its pg_control"
        time.sleep(1)
    refused(reinit_standby(cluster="lab", host="pg4", return_state=True), "confirm:")

    probe = _writer(ctx, 900)
    done = reinit_standby(cluster="lab", host="pg4", confirm="pg4")
    _no_write_missed(probe, "reinit_standby pg4")
    row = next(r for r in done["topology"] if r["host"] == "pg4")
    assert row["state"].startswith("streaming"), done
    assert lab_ssh(lab, "pg4", f"test -s {PGDATA}/global/pg_control", check=False).returncode == 0
    assert primary_of(context_for("lab", fresh=True)).name == primary, "the primary moved"
