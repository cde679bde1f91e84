"""Every runbook declares its policy, and every plan goes through the one Plan protocol."""

from __future__ import annotations

import inspect
from datetime import datetime, timezone

import pytest

from flows.registry import FLOWS, load_flow
from flows.runbook import POLICIES
from tasks.adapters.backup.base import BackupInfo
from tasks.planning.backup import BackupDecision, drill_plan
from tasks.planning.build import BuildPlan, HostPlan
from tasks.planning.plan import Action, ActionPlan, Plan
from tasks.planning.roles import failover_action_plan, switchover_action_plan
from tasks.reporting import plan_markdown


def test_every_flow_has_a_policy_and_every_policy_a_flow():
    assert set(POLICIES) == set(FLOWS)


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_a_changing_runbook_takes_dry_run_and_publishes_a_plan(name):
    flow = load_flow(name)
    source = inspect.getsource(flow.fn)
    if POLICIES[name].changes:
        assert "dry_run" in flow.parameters.properties, f"{name} changes things but takes no dry_run"
        assert flow.parameters.properties["dry_run"].get("default") is False
        assert "publish_plan(" in source, f"{name} publishes no plan artifact"
    else:
        assert "dry_run" not in flow.parameters.properties


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_the_declared_lock_is_the_one_taken(name):
    source = inspect.getsource(load_flow(name).fn)
    lock = POLICIES[name].lock
    assert ("cluster_lock(" in source) is False, "flows take the cluster lock through holding()"
    assert (f'holding(cluster, "{name}"' in source) is (lock == "cluster")
    if lock == "pgquartz":
        assert "pgquartz_lock(" in source


def test_only_the_build_and_the_backup_server_may_start_without_etcd():
    # Bare hosts have no etcd for the lock to live in; the build brings it up, the backup server's
    # rollout (run first on a new site) touches none of its hosts. Every other runbook refuses.
    assert {n: p.etcd for n, p in POLICIES.items() if p.etcd != "required"} == {
        "build_cluster": "once_up", "backup_server_rollout": "if_up"}
    assert all(p.lock == "cluster" for p in POLICIES.values() if p.etcd == "once_up")


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_a_build_takes_the_etcd_lock_once_etcd_is_up(name):
    source = inspect.getsource(load_flow(name).fn)
    if POLICIES[name].etcd != "once_up":
        assert "take_etcd_lock(" not in source
        return
    # Right after etcd first answers, before PostgreSQL and the HA manager are touched.
    taken = source.index("hold.take_etcd_lock()")
    first_db_change = source.index('ensure_files.submit(cluster, n, "db")')
    assert source.index("wait_until_etcd_healthy(cluster)") < taken < first_db_change
    assert 'holding(cluster, "build_cluster") as hold' in source


def backup(name: str, finished: str) -> BackupInfo:
    moment = datetime.fromisoformat(finished)
    return BackupInfo(name=name, kind="full", start_time=moment, finish_time=moment, error=False,
                      start_wal="000000010000000000000002", stop_wal="000000010000000000000002",
                      database_bytes=1, stored_bytes=1, source_host="pg2")


PLANS = {
    "build, no-op": BuildPlan(hosts=(HostPlan("pg1"),)),
    "action": ActionPlan((Action("pg2", "full base backup"),)),
    "action, nothing to do": ActionPlan(nothing_to_do="No backup tonight: inside the skip window."),
    "action, refused": ActionPlan(refusals=("pg3: not streaming",)),
}


@pytest.mark.parametrize("plan", PLANS.values(), ids=PLANS.keys())
def test_every_plan_is_a_plan(plan):
    assert isinstance(plan, Plan)
    md = plan_markdown("x", "lab", plan, dry_run=True)
    assert md.endswith("_dry_run: nothing was changed._\n")
    if plan.refusals:
        assert "**Refused — nothing will be changed:**" in md and plan.is_noop is False
    if plan.is_noop:
        assert plan.noop_summary in md


def test_action_plan_markdown():
    plan = ActionPlan((Action("pg1 → pg2", "switchover"),), notes=("Pauses for a DBA.",))
    lines = plan_markdown("switchover", "lab", plan, dry_run=False).splitlines()
    assert lines[:4] == ["# switchover plan for cluster `lab`", "", "| host | plan |", "|---|---|"]
    assert "| pg1 → pg2 | switchover |" in lines and lines[-1] == "Pauses for a DBA."
    nothing = plan_markdown("scheduled_basebackup", "lab", ActionPlan(nothing_to_do="Skip."), dry_run=False)
    assert "| host |" not in nothing and "Skip." in nothing


@pytest.mark.parametrize("decision, noop, text", [
    (BackupDecision(True, "pg2", "forced"), False, "full base backup (forced), then keep the newest 2 full backup(s)"),
    (BackupDecision(False, None, "backup X is 1.0 h old, inside the 23.0 h skip window"), True,
     "No backup tonight: backup X is 1.0 h old, inside the 23.0 h skip window."),
])
def test_backup_plan(decision, noop, text):
    plan = decision.plan(2)
    assert plan.is_noop is noop
    assert text in (plan.noop_summary if noop else plan.rows()[0]["plan"])


def test_drill_plan_names_backup_host_and_target():
    chosen = backup("20261130-010000F", "2026-11-30T01:05:00+00:00")
    latest = drill_plan(chosen, "restore1", None, keep=False).rows()
    assert latest == [{"host": "restore1", "plan": "restore 20261130-010000F (finished 2026-11-30T01:05:00+00:00), "
                                                    "recover to the end of the archive (after a fresh marker row) in "
                                                    "isolation, verify, then tear it down"}]
    target = datetime(2026, 11, 30, 2, 0, tzinfo=timezone.utc)
    assert "recover to 2026-11-30T02:00:00+00:00" in drill_plan(chosen, "restore1", target, keep=True).rows()[0]["plan"]


@pytest.mark.parametrize("chosen", [backup("20261130-010000F", "2026-11-30T01:05:00+00:00"), None],
                         ids=["backup chosen", "no backup to restore"])
def test_drill_plan_refused_by_preflight_is_published_with_its_refusals(chosen):
    refusals = ["restore1: an earlier drill is still there (running in /var/lib/postgresql/16/main); inspect it, "
                "then pass replace_kept=True", "backup: the repository has no good backup to restore"]
    plan = drill_plan(chosen, "restore1", None, keep=False, refusals=refusals)
    assert plan.refusals == tuple(refusals) and plan.rows() == [] and not plan.is_noop
    md = plan_markdown("restore_drill", "lab", plan, dry_run=False)
    assert "**Refused — nothing will be changed:**" in md and all(f"- {r}" in md for r in refusals)


def test_drill_plan_without_a_backup_needs_a_refusal():
    with pytest.raises(ValueError, match="no backup chosen"):
        drill_plan(None, "restore1", None, keep=False)


@pytest.mark.parametrize("args, rows, refusals, noop", [
    (("pg1", "pg2", [], False), [{"host": "pg1 → pg2", "plan": "switchover through the HA manager; etcd's leader off "
                                                               "the new primary's host; the old primary streams again"}],
     (), False),
    (("pg1", "pg1", [], True), [], (), True),
    (("pg1", None, ["candidate: 'pg9' is not a database host"], False), [],
     ("candidate: 'pg9' is not a database host",), False),
])
def test_switchover_plan(args, rows, refusals, noop):
    plan = switchover_action_plan(*args)
    assert (plan.rows(), plan.refusals, plan.is_noop) == (rows, refusals, noop)


@pytest.mark.parametrize("args, refusals, notes", [
    ((None, "pg2", [], "primary gone; pg2 is most advanced", False), (), ()),
    ((None, "pg2", [], "pg2 is 5 MiB behind", True), (),
     ("Promoting may lose data: the run pauses for a DBA's decision in the Prefect UI.",)),
    (("pg1", None, ["a healthy primary exists (pg1)"], "", False), ("a healthy primary exists (pg1)",), ()),
    ((None, None, [], "no standby is reachable", False), ("no candidate: no standby is reachable",), ()),
])
def test_failover_plan(args, refusals, notes):
    plan = failover_action_plan(*args)
    assert plan.refusals == refusals and plan.notes == notes
    assert plan.is_noop is False
