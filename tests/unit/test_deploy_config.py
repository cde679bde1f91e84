"""Deployment wiring that needs no server: entrypoints, schedules, the CLI's new subcommands."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from uuid import UUID, uuid4

import pytest

from flows.runbook import DRY_RUN_STATE
from tasks.errors import BackupFailed, BackupTooOld

REPO = Path(__file__).resolve().parents[2]


def test_every_flow_has_a_repo_relative_entrypoint_that_names_the_flow():
    from deployments.deploy import entrypoint
    from flows.registry import FLOWS

    for name in FLOWS:
        path, _, attr = entrypoint(name).partition(":")
        assert not Path(path).is_absolute()
        assert f"def {attr}(" in (REPO / path).read_text(), entrypoint(name)


def test_schedules_are_amsterdam_wall_clock_and_tab_jobs_carry_their_job():
    from deployments.deploy import SCHEDULES, schedules_for
    from flows.registry import FLOWS

    assert set(SCHEDULES) <= set(FLOWS)
    basebackup, = schedules_for("scheduled_basebackup")
    assert (basebackup.cron, basebackup.timezone, basebackup.active) == ("0 1 * * *", "Europe/Amsterdam", True)
    drill, = schedules_for("restore_drill", active=False)
    assert (drill.cron, drill.active) == ("0 3 * * 0", False)
    for tab in schedules_for("tab_job"):
        assert tab.timezone == "Europe/Amsterdam"
        assert (REPO / "deployments" / "jobs" / f"{tab.parameters['job']}.yml").is_file()
    assert schedules_for("switchover") == []
    slugs = [s.slug for specs in SCHEDULES.values() for s in specs]
    assert len(slugs) == len(set(slugs))


@pytest.mark.parametrize("argv", [
    ["deploy", "--cluster", "prod", "--paused-schedules"],
    ["worker", "start", "--name", "w2", "--limit", "2"],
    ["worker", "stop"],
    ["worker", "stop", "--all"],
    ["ticket", "run", "switchover", "--deployment", "lab", "--ticket", "CHG-1", "--param", "candidate=pg2", "--wait"],
    ["ticket", "status", "6f1c0000-0000-0000-0000-000000000000"],
    ["ticket", "proxy", "start"],
    ["ticket", "proxy", "stop"],
])
def test_cli_parses_the_deployment_subcommands(argv):
    from bouwsteen.cli import build_parser

    args = build_parser().parse_args(argv)
    assert callable(args.handler)


def test_ticket_run_requires_deployment_and_ticket():
    from bouwsteen.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["ticket", "run", "check_hosts", "--ticket", "CHG-1"])


@pytest.mark.parametrize("cron", ["0 1 * * *", "30 2 * * *", "0 3 * * sun", "*/15 1-5 * jan mon-fri"])
def test_valid_cron_expressions_pass(cron):
    from deployments.deploy import validate_cron

    assert validate_cron(cron) == cron


@pytest.mark.parametrize("cron", ["61 1 * * *", "0 1 * *", "every night", "0 0 * * * *", "@daily", ""])
def test_invalid_cron_expressions_are_refused_with_the_expression(cron):
    from deployments.deploy import validate_cron

    with pytest.raises(ValueError, match="cron expression"):
        validate_cron(cron)


# ----------------------------------------------------------------------------- automations

LAB = {name: UUID(int=i) for i, name in enumerate(
    ["scheduled_basebackup/lab", "failover/lab", "restore_cluster/lab", "switchover/lab", "restore_drill/lab"], 1)}
PROD_BACKUP = UUID(int=99)
FRESHNESS = "bouwsteen: lab: forced backup after a freshness alarm"
RECOVERY = "bouwsteen: lab: backup and drill after failover or restore"


@pytest.mark.parametrize("deployed, expected", [
    ({}, {}),
    ({"failover/lab": LAB["failover/lab"]}, {}),  # nothing to run without the backup's deployment
    ({"scheduled_basebackup/lab": LAB["scheduled_basebackup/lab"]}, {FRESHNESS: []}),
    ({k: LAB[k] for k in ("scheduled_basebackup/lab", "failover/lab", "switchover/lab")},
     {RECOVERY: ["failover/lab"], FRESHNESS: []}),
    (LAB, {RECOVERY: ["failover/lab", "restore_cluster/lab"], FRESHNESS: []}),
])
def test_cluster_automations_follow_the_deployments_there_are(deployed, expected):
    from deployments.deploy import cluster_automations

    automations = cluster_automations("lab", deployed)
    assert [a.name for a in automations] == list(expected)
    for automation in automations:
        related = automation.trigger.match_related
        related = related if isinstance(related, list) else [related]
        if expected[automation.name]:
            assert related[0].root["prefect.resource.id"] == [f"prefect.deployment.{LAB[n]}"
                                                              for n in expected[automation.name]]
        action, = automation.actions
        assert action.deployment_id == LAB["scheduled_basebackup/lab"]
        assert action.parameters == ({"cluster": "lab", "force": True, "kind": "full", "then_drill": True}
                                     if automation.name == RECOVERY else {"cluster": "lab", "force": True})


def _run(deployment: str | UUID, tags: list[str], created_by: str | None = None):
    from prefect.server.schemas.core import CreatedBy

    deployment_id = deployment if isinstance(deployment, UUID) else LAB[deployment]
    flow = deployment.split("/")[0] if isinstance(deployment, str) else "scheduled_basebackup"
    return SimpleNamespace(
        id=uuid4(), name="brave-otter", run_count=1, tags=tags, flow_id=uuid4(), deployment_id=deployment_id,
        work_queue_id=None, parent_task_run_id=None,
        flow=SimpleNamespace(id=uuid4(), name=flow, tags=[]),
        deployment=SimpleNamespace(id=deployment_id, name="lab", tags=["bouwsteen", "cluster:lab"]),
        created_by=CreatedBy(id=UUID(int=100), type="AUTOMATION", display_value=created_by) if created_by else None)


@pytest.fixture
def fires(monkeypatch):
    """Whether the named automation, as the server reads and evaluates it, fires on the event the
    server's own code emits for `run` entering `state` (its two reads answered from the run)."""
    import asyncio
    from datetime import datetime, timezone

    from prefect.server.events.schemas.automations import AutomationCore
    from prefect.server.models.events import flow_run_state_change_event
    from prefect.server.schemas import states
    from prefect.states import format_exception

    from deployments.deploy import cluster_automations

    def check(name: str, run, state: str, error: Exception | None = None) -> bool:
        async def read_flow(session, flow_id):
            return run.flow

        async def read_deployment(session, deployment_id):
            return run.deployment

        monkeypatch.setattr("prefect.server.models.flows.read_flow", read_flow)
        monkeypatch.setattr("prefect.server.models.deployments.read_deployment", read_deployment)
        message = f"Flow run encountered an exception: {format_exception(error)}" if error else None
        event = asyncio.run(flow_run_state_change_event(
            session=None, occurred=datetime.now(timezone.utc), flow_run=run, initial_state_id=None,
            initial_state=None, validated_state_id=uuid4(),
            validated_state=(states.Completed(name=DRY_RUN_STATE, message="dry run: nothing changed")
                             if state == DRY_RUN_STATE else getattr(states, state)(message=message))))
        automation, = [a for a in cluster_automations("lab", LAB) if a.name == name]
        return AutomationCore.model_validate(automation.model_dump(mode="json")).trigger.covers(event.receive())

    return check


TOO_OLD = BackupTooOld("cluster lab: the newest good backup 20250101-010000F is 30.0 h old, older than the 26 h limit")
NIGHTLY = ["auto-scheduled", "bouwsteen", "cluster:lab"]
BY_HAND = ["bouwsteen", "cluster:lab"]


@pytest.mark.parametrize("deployment, tags, created_by, state, error, expected", [
    ("scheduled_basebackup/lab", NIGHTLY, None, "Failed", TOO_OLD, True),
    # The forced run the automation started fails the same way: it must not start another.
    ("scheduled_basebackup/lab", BY_HAND, FRESHNESS, "Failed", TOO_OLD, False),
    ("scheduled_basebackup/lab", BY_HAND, RECOVERY, "Failed", TOO_OLD, False),
    ("scheduled_basebackup/lab", BY_HAND, None, "Failed", TOO_OLD, False),
    ("scheduled_basebackup/lab", NIGHTLY, None, "Failed", BackupFailed("the WAL archive is not intact"), False),
    ("scheduled_basebackup/lab", NIGHTLY, None, "Crashed", TOO_OLD, False),
    ("scheduled_basebackup/lab", NIGHTLY, None, "Completed", None, False),
    (PROD_BACKUP, NIGHTLY, None, "Failed", TOO_OLD, False),
    ("restore_drill/lab", NIGHTLY, None, "Failed", TOO_OLD, False),
])
def test_freshness_automation_retries_only_a_nightly_that_failed_on_freshness(fires, deployment, tags, created_by,
                                                                              state, error, expected):
    assert fires(FRESHNESS, _run(deployment, tags, created_by), state, error) is expected


@pytest.mark.parametrize("deployment, created_by, state, expected", [
    ("failover/lab", None, "Completed", True),
    ("restore_cluster/lab", None, "Completed", True),
    ("failover/lab", None, "Failed", False),
    ("failover/lab", None, "Paused", False),
    # A dry run completes too, under its own state name: a plan is no failover.
    ("failover/lab", None, DRY_RUN_STATE, False),
    ("restore_cluster/lab", None, DRY_RUN_STATE, False),
    ("switchover/lab", None, "Completed", False),
    # What the automation starts completing (the backup, then the drill) must not start another.
    ("scheduled_basebackup/lab", RECOVERY, "Completed", False),
    ("restore_drill/lab", None, "Completed", False),
    (PROD_BACKUP, None, "Completed", False),
])
def test_recovery_automation_follows_a_completed_failover_or_restore(fires, deployment, created_by, state, expected):
    assert fires(RECOVERY, _run(deployment, BY_HAND, created_by), state) is expected


def test_the_freshness_match_is_worded_as_prefect_words_a_failed_flow():
    """Tripwire for a Prefect upgrade: the automation matches the flow engine's wording."""
    import inspect

    from prefect.flow_engine import FlowRunEngine

    from deployments.deploy import FAILED_BY

    assert f'"{FAILED_BY.split(" {")[0]}"' in inspect.getsource(FlowRunEngine.handle_exception)


def test_the_nightly_backup_is_not_forced():
    """The freshness automation treats the scheduler's runs as the unforced ones."""
    from deployments.deploy import SCHEDULES

    assert not any(spec.parameters.get("force") for spec in SCHEDULES["scheduled_basebackup"])


class _Client:
    def __init__(self, existing: dict[str, list[UUID]]):
        self.existing = {name: [SimpleNamespace(id=i) for i in ids] for name, ids in existing.items()}
        self.calls: list[tuple] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read_automations_by_name(self, name):
        return self.existing.get(name, [])

    def create_automation(self, automation):
        self.calls.append(("create", automation.name))
        return UUID(int=7)

    def update_automation(self, automation_id, automation):
        self.calls.append(("update", automation_id))

    def delete_automation(self, automation_id):
        self.calls.append(("delete", automation_id))


@pytest.mark.parametrize("existing, calls, ids", [
    ({}, [("create", FRESHNESS)], {FRESHNESS: UUID(int=7)}),
    ({FRESHNESS: [UUID(int=1)]}, [("update", UUID(int=1))], {FRESHNESS: UUID(int=1)}),
    ({FRESHNESS: [UUID(int=1), UUID(int=2)]}, [("update", UUID(int=1)), ("delete", UUID(int=2))],
     {FRESHNESS: UUID(int=1)}),
])
def test_ensure_automations_is_idempotent_by_name(monkeypatch, existing, calls, ids):
    from deployments.deploy import cluster_automations, ensure_automations

    client = _Client(existing)
    monkeypatch.setattr("prefect.client.orchestration.get_client", lambda sync_client: client)
    automations = cluster_automations("lab", {"scheduled_basebackup/lab": LAB["scheduled_basebackup/lab"]})
    assert ensure_automations(automations) == ids
    assert client.calls == calls
