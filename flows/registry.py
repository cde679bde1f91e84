"""Every runbook flow by the name DBAs, deployments and tickets use for it. Imported lazily, so
listing the names costs no Prefect import of every flow."""

from __future__ import annotations

import importlib

FLOWS = {
    "check_hosts": "flows.check_hosts:check_hosts",
    "build_cluster": "flows.build_cluster:build_cluster",
    "add_standby": "flows.add_standby:add_standby",
    "remove_member": "flows.members:remove_member",
    "replace_member": "flows.members:replace_member",
    "reinit_standby": "flows.members:reinit_standby",
    "backup_server_rollout": "flows.backup_server:backup_server_rollout",
    "scheduled_basebackup": "flows.basebackup:scheduled_basebackup",
    "restore_drill": "flows.restore_drill:restore_drill",
    "restore_cluster": "flows.restore_cluster:restore_cluster",
    "clone_cluster": "flows.restore_cluster:clone_cluster",
    "routing_rollout": "flows.routing:routing_rollout",
    "switchover": "flows.switchover:switchover",
    "failover": "flows.switchover:failover",
    "tab_job": "flows.tab_job:tab_job",
    "rotate_certificates": "flows.rotate_certificates:rotate_certificates",
    "change_settings": "flows.settings:change_settings",
    "rolling_upgrade": "flows.upgrade:rolling_upgrade",
    "pause_ha": "flows.maintenance:pause_ha",
    "resume_ha": "flows.maintenance:resume_ha",
}


def load_flow(name: str):
    if name not in FLOWS:
        raise SystemExit(f"unknown flow {name!r}; known flows: {', '.join(sorted(FLOWS))}")
    module_name, attr = FLOWS[name].split(":")
    return getattr(importlib.import_module(module_name), attr)
