"""build_cluster's work as a plain script: the same steps and remote commands, no Prefect engine.

Each step's undecorated function (`.fn`) is called in runbook order; no task runs, no states, no
locks, no artifacts. The overhead benchmark divides the flow's wall time by this script's.
"""

from __future__ import annotations

import time

from tasks import db_roles, etcd, ha, hosts, settings
from tasks.backup import (
    ensure_backup_peer_trust,
    ensure_backup_repository,
    is_object_store_reachable,
)
from tasks.context import context_for


def plain_build(cluster: str) -> float:
    started = time.monotonic()
    ctx = context_for(cluster, fresh=True)
    inv = ctx.inventory
    layers = {n: {k: v for k, v in kinds.items() if k in ("etcd", "db")}
              for n, kinds in hosts.desired_layers(ctx).items() if {"etcd", "db"} & set(kinds)}
    snapshots = {n: hosts.is_host_ready.fn(cluster, n).snapshot for n in layers}
    etcd.is_etcd_ours.fn(cluster)
    db_roles.is_superuser_login_ok.fn(cluster, [])
    initialized = ha.is_cluster_initialized.fn(cluster, [])
    for name, kinds in layers.items():
        hosts.ensure_packages.fn(cluster, name, sorted({p for layer in kinds.values() for p in layer.packages}))
    etcd_hosts = [h.name for h in inv.etcd_members]
    changes = {n: hosts.ensure_files.fn(cluster, n, "etcd") for n in etcd_hosts}
    for name in etcd_hosts:
        hosts.ensure_units.fn(cluster, name, "etcd", changes[name], restart_changed=False, no_block=True)
    etcd.wait_until_etcd_healthy.fn(cluster)
    db = [h.name for h in inv.db_hosts]
    db_changes = {n: hosts.ensure_files.fn(cluster, n, "db") for n in db}
    started_units: list[str] = []
    if not initialized.ok:
        bootstrap = next((n for n in db if not snapshots[n].data_dir.is_empty), db[0])
        started_units = ha.ensure_cluster_initialized.fn(cluster, bootstrap)
        ha.wait_until_primary_accepts_writes.fn(cluster)
    else:
        bootstrap = None
    for name in db:
        hosts.ensure_units.fn(cluster, name, "db", db_changes[name],
                              already_started=started_units if name == bootstrap else None)
    ha.wait_until_primary_accepts_writes.fn(cluster)
    settings.ensure_ha_settings.fn(cluster)
    db_roles.ensure_roles.fn(cluster)
    if inv.cluster.object_store is not None and ctx.store_block is not None:
        ensure_backup_peer_trust.fn(cluster)
        if is_object_store_reachable.fn(cluster):
            ensure_backup_repository.fn(cluster)
    ha.wait_until_replicas_streaming.fn(cluster)
    ha.is_replication_working.fn(cluster)
    return time.monotonic() - started
