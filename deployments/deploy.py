"""Register bouwsteen's deployments, work pool, failure notification and automations. Idempotent.

Naming: one deployment per flow and cluster, named after the cluster, so the full name is
`<flow>/<cluster>` (`check_hosts/lab`, `switchover/prod`). Its `cluster` parameter defaults to
that cluster; every other parameter keeps the flow's default and its type, which the server
enforces (a bad value is refused with HTTP 409 before any run exists).

Code is not pushed or packaged anywhere: each deployment's pull step changes into this
repository checkout on the controller, where the process worker runs the entrypoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID

REPO = Path(__file__).resolve().parents[1]
WORK_POOL = "bouwsteen"
TIMEZONE = "Europe/Amsterdam"
# Every deployment carries this tag and so does every run of it: the automation matches on it,
# which keeps it correct when deployments for another cluster are added later.
DEPLOYMENT_TAG = "bouwsteen"
NOTIFY_BLOCK = "bouwsteen-failed-runs"
AUTOMATION_NAME = "bouwsteen: failed or crashed run"
# Runs the scheduler created carry this tag and no others do: an automation that reacts only to them
# can start a run without that run ever triggering it again (server/models/deployments.py).
AUTO_SCHEDULED_TAG = "auto-scheduled"
# After either, the cluster is on a new timeline or restored data: a new full backup at once, and a
# drill that proves it restores, instead of waiting for the nightly and the Sunday drill.
RECOVERY_FLOWS = ("failover", "restore_cluster")
# How Prefect's flow engine words the Failed state of a flow that raised (flow_engine.py,
# states.py format_exception); the flow raises BackupTooOld only when nothing else failed first.
FAILED_BY = "Flow run encountered an exception: {error}: "
# Nothing listens here by default; a site points it at its chat or ticket webhook.
DEFAULT_NOTIFY_URL = "http://127.0.0.1:9099/bouwsteen/failed-run"

JOBS_DIR = REPO / "deployments" / "jobs"


@dataclass(frozen=True)
class CronSpec:
    cron: str
    slug: str
    parameters: dict = field(default_factory=dict)


# Wall-clock times in Amsterdam, so a run stays at 01:00 local across daylight-saving changes.
# Basebackup first, the TAB purge after it, the weekly drill on the quiet Sunday morning. The
# nightly check_hosts fails weeks before a certificate expires (cluster.tls.alarm_within_days).
SCHEDULES: dict[str, list[CronSpec]] = {
    "check_hosts": [CronSpec("30 0 * * *", "nightly-check-hosts")],
    "scheduled_basebackup": [CronSpec("0 1 * * *", "nightly-basebackup")],
    "restore_drill": [CronSpec("0 3 * * 0", "weekly-restore-drill")],
    "tab_job": [CronSpec("30 2 * * *", "tab-purge_audit_log", {"job": "purge_audit_log"})],
}

NOTIFY_SUBJECT = "bouwsteen: {{ flow.name }}/{{ deployment.name }} {{ flow_run.state.name }}"
NOTIFY_BODY = """\
Flow run {{ flow_run.name }} ({{ flow_run.id }}) of deployment {{ flow.name }}/{{ deployment.name }} \
entered {{ flow_run.state.name }}.
Message: {{ flow_run.state.message }}
Parameters: {{ flow_run.parameters }}
Tags: {{ flow_run.tags }}
"""


@dataclass
class DeployResult:
    deployments: dict[str, UUID]  # "<flow>/<cluster>" -> id
    work_pool: str
    automation_id: UUID
    notify_url: str
    ticket_proxy: object | None = None  # ticket_proxy.ProxyHandle once its allow-list is rendered; None: none runs
    cluster_automations: dict[str, UUID] = field(default_factory=dict)  # name -> id


def entrypoint(flow_name: str) -> str:
    """flows.check_hosts:check_hosts -> flows/check_hosts.py:check_hosts (relative to the repo)."""
    from flows.registry import FLOWS

    module, attr = FLOWS[flow_name].split(":")
    return f"{module.replace('.', '/')}.py:{attr}"


def validate_cron(expression: str) -> str:
    """Five-field cron only: croniter also takes a sixth (seconds) field, which would silently
    turn a nightly job into one that fires every second of that minute."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(f"cron expression {expression!r}: expected 5 fields (minute hour day month weekday), "
                         f"got {len(fields)}")
    try:
        CronSchedule(cron=expression, timezone=TIMEZONE)
    except ValidationError as exc:
        reason = "; ".join(e["msg"] for e in exc.errors())
        raise ValueError(f"cron expression {expression!r}: {reason}") from None
    return expression


def schedules_for(flow_name: str, *, active: bool = True) -> list:
    from prefect.schedules import Cron

    return [Cron(validate_cron(s.cron), timezone=TIMEZONE, active=active, parameters=s.parameters or None,
                 slug=s.slug)
            for s in SCHEDULES.get(flow_name, [])]


def ensure_work_pool(name: str = WORK_POOL) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return
        except ObjectNotFound:
            pass
        try:
            client.create_work_pool(WorkPoolCreate(
                name=name, type="process",
                description="bouwsteen flows, run by `bouwsteen worker start` in the repository checkout",
                base_job_template=ProcessWorker.get_default_base_job_template(),
            ))
        except ObjectAlreadyExists:
            pass  # another `bouwsteen deploy` created it in between


def ensure_notification_block(url: str) -> UUID:
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    block = CustomWebhookNotificationBlock(
        name=NOTIFY_BLOCK, url=url, method="POST",
        json_data={"subject": "{{subject}}", "body": "{{body}}", "source": "bouwsteen"},
        timeout=10,
    )
    return block.save(NOTIFY_BLOCK, overwrite=True)


def ensure_automation(block_document_id: UUID) -> UUID:
    """One automation for every deployment tagged `bouwsteen`: updated in place when it exists."""
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    automation = AutomationCore(
        name=AUTOMATION_NAME,
        description="Notify when any run of a bouwsteen deployment fails or crashes.",
        enabled=True,
        trigger=EventTrigger(
            expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{DEPLOYMENT_TAG}"},
            for_each={"prefect.resource.id"},
            posture=Posture.Reactive,
            threshold=1,
            within=0,
        ),
        actions=[SendNotification(block_document_id=block_document_id, subject=NOTIFY_SUBJECT, body=NOTIFY_BODY)],
    )
    return ensure_automations([automation])[AUTOMATION_NAME]


def _runs_of(*deployment_ids: UUID) -> dict:
    # The related resource the server attaches to every state event of a run of a deployment
    # (server/models/events.py, _flow_run_related_resources_from_orm); a list matches any of them.
    return {"prefect.resource.role": "deployment",
            "prefect.resource.id": [f"prefect.deployment.{d}" for d in deployment_ids]}


def _each_run_entering(state: str, related, *, message: str | None = None):
    """Fires once per flow run whose state event is `prefect.flow-run.<state>` with `related`."""
    from prefect.events.schemas.automations import EventTrigger, Posture

    match = {"prefect.resource.id": "prefect.flow-run.*"}
    if message is not None:
        match["prefect.state-message"] = message
    return EventTrigger(expect={f"prefect.flow-run.{state}"}, match=match, match_related=related,
                        for_each={"prefect.resource.id"}, posture=Posture.Reactive, threshold=1, within=0)


def cluster_automations(cluster: str, deployments: dict[str, UUID]) -> list:
    """The automations that start `scheduled_basebackup/<cluster>` by themselves, for those of
    their deployments in `deployments` ("<flow>/<cluster>" -> id); none without the backup's."""
    from prefect.events.actions import RunDeployment
    from prefect.events.schemas.automations import AutomationCore

    from tasks.errors import BackupTooOld

    backup = deployments.get(f"scheduled_basebackup/{cluster}")
    if backup is None:
        return []
    automations = []
    recovery = [deployments[f"{name}/{cluster}"] for name in RECOVERY_FLOWS if f"{name}/{cluster}" in deployments]
    if recovery:
        automations.append(AutomationCore(
            name=f"bouwsteen: {cluster}: backup and drill after failover or restore",
            description=f"A forced base backup of {cluster}, then a restore drill, when a failover or "
                        f"restore_cluster run of {cluster} completes.",
            enabled=True,
            trigger=_each_run_entering("Completed", _runs_of(*recovery)),
            # A full: the new timeline's first backup should not lean on the old one's chain.
            actions=[RunDeployment(deployment_id=backup,
                                   parameters={"cluster": cluster, "force": True, "kind": "full", "then_drill": True})],
        ))
    automations.append(AutomationCore(
        name=f"bouwsteen: {cluster}: forced backup after a freshness alarm",
        description=f"One forced base backup of {cluster} when its nightly backup run fails the freshness "
                    f"check; the failure is paged as well.",
        enabled=True,
        # Parameters are not in the event: the nightly tag stands for "not forced", and the forced
        # run this starts lacks it, so its own failure cannot start another.
        trigger=_each_run_entering("Failed", [_runs_of(backup), {"prefect.resource.role": "tag",
                                                               "prefect.resource.id": f"prefect.tag.{AUTO_SCHEDULED_TAG}"}],
                                   message=FAILED_BY.format(error=BackupTooOld.__name__) + "*"),
        actions=[RunDeployment(deployment_id=backup, parameters={"cluster": cluster, "force": True})],
    ))
    return automations


def ensure_automations(automations: list) -> dict[str, UUID]:
    """Each automation by its name: created, or updated in place (name -> id)."""
    from prefect.client.orchestration import get_client

    ids = {}
    with get_client(sync_client=True) as client:
        for automation in automations:
            existing = client.read_automations_by_name(automation.name)
            if not existing:
                ids[automation.name] = client.create_automation(automation)
                continue
            keep, *duplicates = existing
            client.update_automation(keep.id, automation)
            for extra in duplicates:  # from a race between two deploys; one action per event
                client.delete_automation(extra.id)
            ids[automation.name] = keep.id
    return ids


def deploy_flow(flow_name: str, cluster: str, *, schedules_active: bool = True) -> UUID:
    from prefect import Flow

    flow = Flow.from_source(source=str(REPO), entrypoint=entrypoint(flow_name))
    deployment = flow.to_deployment(
        name=cluster,
        work_pool_name=WORK_POOL,
        parameters={"cluster": cluster},
        schedules=schedules_for(flow_name, active=schedules_active),
        tags=[DEPLOYMENT_TAG, f"cluster:{cluster}"],
        enforce_parameter_schema=True,
    )
    return deployment.apply()


def deploy_all(cluster: str = "lab", *, notify_url: str | None = None, schedules_active: bool = True,
               flows: list[str] | None = None) -> DeployResult:
    """Work pool, one deployment per flow for `cluster`, notification block, automations."""
    from flows.registry import FLOWS

    url = notify_url or os.environ.get("BOUWSTEEN_NOTIFY_URL") or DEFAULT_NOTIFY_URL
    ensure_work_pool()
    ids = {f"{name}/{cluster}": deploy_flow(name, cluster, schedules_active=schedules_active)
           for name in (flows or FLOWS)}
    automation_id = ensure_automation(ensure_notification_block(url))
    automations = ensure_automations(cluster_automations(cluster, ids))
    return DeployResult(deployments=ids, work_pool=WORK_POOL, automation_id=automation_id, notify_url=url,
                        ticket_proxy=refresh_ticket_proxy(), cluster_automations=automations)


def refresh_ticket_proxy():
    """The ticket proxy's allow-list rendered from every deployment on the server (all clusters),
    nginx reloaded; None when no proxy runs beside this PREFECT_HOME."""
    from deployments import ticket_proxy
    from deployments.server import client_auth_string, prefect_home

    auth = client_auth_string()
    return ticket_proxy.refresh(prefect_home(), auth) if auth else None
