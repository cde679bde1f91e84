"""pause_ha / resume_ha (issue 18) on the routed lab: Patroni's maintenance mode on and off, each
a second time a no-op, shown by check_hosts, and the role changes refused while it is on with
nothing changed."""

from __future__ import annotations

import yaml
from labtools import cluster_state_digest, lab_ssh, refused

SHOW_CONFIG = "runuser -u postgres -- patronictl -c /etc/patroni/config.yml show-config lab"


def _paused(lab, host: str) -> bool:
    return bool((yaml.safe_load(lab_ssh(lab, host, SHOW_CONFIG).stdout) or {}).get("pause"))


def _maintenance_artifact(state) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    (found,) = [a for a in artifacts if a.key == "ha-maintenance-lab"]
    return found.data


def test_pause_refuses_role_changes_until_resumed(lab, routed):
    from flows.check_hosts import check_hosts
    from flows.maintenance import pause_ha, resume_ha
    from flows.settings import change_settings
    from flows.switchover import failover, switchover
    from tasks.context import context_for
    from tasks.ha import primary_of

    ctx = context_for("lab", fresh=True)
    members = [h.name for h in ctx.inventory.db_hosts]
    primary = primary_of(ctx).name
    assert not _paused(lab, members[0])
    assert pause_ha(cluster="lab", dry_run=True) == {"paused": False, "changed": False, "dry_run": True}
    assert not _paused(lab, members[0]), "a dry run paused the cluster"

    before = cluster_state_digest(lab, members)
    try:
        assert pause_ha(cluster="lab") == {"paused": True, "changed": True}
        assert all(_paused(lab, h) for h in members)
        assert "Maintenance mode: on" in lab_ssh(lab, members[-1], SHOW_CONFIG.replace("show-config", "list")).stdout
        assert pause_ha(cluster="lab") == {"paused": True, "changed": False}

        shown = check_hosts(cluster="lab", return_state=True)
        assert shown.is_completed(), shown.message
        assert "PAUSED (maintenance mode)" in _maintenance_artifact(shown)

        refused(switchover(cluster="lab", return_state=True), "while_paused: the HA manager is paused",
                "run the switchover with while_paused=True")
        refused(failover(cluster="lab", return_state=True), "a healthy primary exists",
                "run the failover with while_paused=True")
        refused(change_settings(cluster="lab", parameters={"shared_buffers": "160MB"}, return_state=True),
                "run the change_settings with while_paused=True")
        # Pausing and the refusals touched no host: no file, no restarted unit, the same primary.
        assert cluster_state_digest(lab, members) == before
        assert primary_of(context_for("lab", fresh=True)).name == primary

        assert resume_ha(cluster="lab", dry_run=True) == {"paused": True, "changed": False, "dry_run": True}
        assert _paused(lab, members[0]), "a dry run resumed the cluster"
        assert resume_ha(cluster="lab") == {"paused": False, "changed": True}
    finally:
        # The rest of the suite needs automatic failover back, whatever failed above.
        if _paused(lab, members[0]):
            lab_ssh(lab, members[0], SHOW_CONFIG.replace("show-config lab", "resume --wait lab"), check=False)
    assert not any(_paused(lab, h) for h in members)
    assert resume_ha(cluster="lab") == {"paused": False, "changed": False}
    shown = check_hosts(cluster="lab", return_state=True)
    assert "automatic failover is on" in _maintenance_artifact(shown)
    assert primary_of(context_for("lab", fresh=True)).name == primary
