"""The one-command demo: lab, Prefect server and worker, blocks and deployments, every lifecycle flow.

Runs each flow as a deployment run picked up by the worker (what the nightly schedules and the
ticketing system do), in runbook order, and prints a summary. Safe to run again: the second time
every flow converges without changes (backups skip inside their window).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CLUSTER = "lab"
CLONE = "acc"  # lab/topology.py's second cluster, clone_cluster's target


@dataclass
class Row:
    flow: str
    state: str
    seconds: float
    figure: str


def _figure(flow: str, result) -> str:
    if not isinstance(result, dict | list):
        return ""
    if flow == "check_hosts":
        return f"{sum(1 for r in result if r['reachable'])}/{len(result)} hosts reachable"
    if flow == "build_cluster":
        topo = result.get("topology", [])
        return (f"primary {topo[0]['host']}, {len(topo) - 1} streaming; {result.get('via_port', '')}"
                if topo else "")
    if flow == "add_standby":
        return "pg4 streaming" + (" (no change)" if not result.get("changed") else "")
    if flow == "remove_member":
        topo = result.get("topology", [])
        if not result.get("changed") or not topo:
            return "pg4 no member (no change)"
        return (f"pg4 removed{' and wiped' if result.get('wiped') else ''}; primary {topo[0]['host']}, "
                f"{len(topo) - 1} streaming")
    if flow == "reinit_standby":
        row = next((r for r in result.get("topology", []) if r["host"] == "pg4"), None)
        return f"pg4 cloned again, {row['state']}" if row else ""
    if flow == "restore_cluster":
        return (f"{result.get('backup')} restored, {result.get('primary')} writable after {result.get('writable_s')}s, "
                f"every standby streaming after {result.get('all_streaming_s')}s")
    if flow == "clone_cluster":
        return (f"{result.get('cluster')} cloned from {result.get('source')}'s {result.get('backup')}, "
                f"{result.get('post_clone_sql')} post-clone SQL, primary {result.get('primary')}")
    if flow == "backup_server_rollout":
        return f"S3 round trip {result.get('round_trip_seconds', 0):.2f}s"
    if flow == "routing_rollout":
        return f"VIP on {result.get('vip_holder')}, rw→{result.get('rw')}, ro→{result.get('ro')}"
    if flow == "scheduled_basebackup":
        backup = result.get("backup")
        if backup:
            return f"{backup['name']} from {backup['host']}, {backup['size_mib']} MiB in {backup['duration_s']}s"
        return f"skipped: {result.get('decision', '')[:60]}"
    if flow == "restore_drill":
        return f"RTO {result.get('rto_s')}s ({result.get('btree_indexes_checked')} indexes amchecked)"
    if flow == "switchover":
        return (f"{result.get('old_primary')}→{result.get('new_primary')}, {result.get('write_gap', '')}; "
                f"{result.get('via_port', '')}")
    if flow == "change_settings":
        changed = ", ".join(f"{c['name']} {c['old']}→{c['new']}" for c in result.get("changes", []))
        return f"{changed}; restarted {', '.join(result.get('restarted', [])) or 'none'}, switchover to {result.get('switchover')}"
    if flow == "rolling_upgrade":
        targets = ", ".join(f"{n} {v}" for n, v in sorted(result.get("targets", {}).items()))
        return (f"{targets} on {', '.join(result.get('upgraded', [])) or 'no host (already)'}; "
                f"switchover to {result.get('switchover')}")
    if flow in ("pause_ha", "resume_ha"):
        return f"paused: {result.get('paused')}, changed: {result.get('changed')}"
    if flow == "rotate_certificates":
        return f"{result.get('replaced', 0)} certificates replaced on {result.get('hosts', 0)} hosts (new keys)"
    if flow == "tab_job":
        checks = result.get("checks", [])
        return f"{sum(c['passed'] for c in checks)}/{len(checks)} checks passed on {', '.join(result.get('nodes', []))}"
    return ""


def run_demo(skip: set[str] | None = None) -> int:
    skip = skip or set()
    from deployments.server import apply_environment, start_server, ui_url

    apply_environment()
    started = time.monotonic()
    print("== 1/4 lab: building the image if needed and booting 11 hosts", flush=True)
    from lab.manager import Lab

    lab = Lab()
    summary = lab.up(pip=str(Path(sys.executable).with_name("pip")))
    print(f"   lab up: image {summary['image_seconds']}s, boot {summary['boot_seconds']}s", flush=True)

    print("== 2/4 Prefect server, blocks, deployments and a worker", flush=True)
    start_server()
    print(f"   Prefect UI {ui_url()}: {login_hint()}", flush=True)
    from blocks.register import ClusterFiles, register_cluster

    register_cluster(ClusterFiles.for_lab(lab.paths.lab))
    register_cluster(ClusterFiles.for_lab(lab.paths.lab, CLONE))
    from deployments.deploy import deploy_all
    from deployments.worker import start_worker

    deploy_all(CLUSTER)
    deploy_all(CLONE, flows=["clone_cluster"], schedules_active=False)
    start_worker()

    print("== 3/4 lifecycle flows, each as a deployment run through the worker", flush=True)
    from prefect.deployments import run_deployment
    from prefect.exceptions import MissingResult

    plan = [
        ("check_hosts", {}),
        ("backup_server_rollout", {}),
        ("build_cluster", {}),
        ("add_standby", {"host": "pg4"}),
        ("routing_rollout", {}),
        ("scheduled_basebackup", {}),
        ("restore_drill", {}),
        ("switchover", {}),
        ("tab_job", {"job": "purge_audit_log"}),
        ("rotate_certificates", {"force": True}),
        # A reload-only parameter and one that needs a restart: rolled member by member with one
        # switchover.
        ("change_settings", {"parameters": {"work_mem": "32MB", "shared_buffers": "144MB"}}),
        # Maintenance mode around work on the hosts: automatic failover off, then on again.
        ("pause_ha", {}),
        ("resume_ha", {}),
        # Patroni upgraded host by host from the lab's apt repository: standbys, one switchover,
        # the routers and the backup server, the old primary last.
        ("rolling_upgrade", {"packages": {"patroni": "4.1.5-2"}}),
        # Day 2: a standby leaves for good (its data wiped) and is added back as a fresh one.
        ("remove_member", {"host": "pg4", "wipe": True, "confirm": "pg4"}),
        ("add_standby", {"host": "pg4"}),
        # A standby cloned again through the HA manager, as for one that cannot stream.
        ("reinit_standby", {"host": "pg4", "force": True, "confirm": "pg4"}),
        # The whole cluster restored in place from its backups (to the end of the archive: the
        # demo loses nothing), confirmed as a ticket would; its automation then backs up and drills.
        ("restore_cluster", {"target": "latest", "confirm_cluster": CLUSTER, "confirm_target": "latest"}),
        # "Refresh acceptance from production": the cluster's newest backup restored into `acc`
        # (three hosts of its own, built first), with SQL of the site's (anonymisation, here a
        # stamp) run on it before anyone can connect.
        ("clone_cluster", {"cluster": CLONE, "source": CLUSTER, "confirm_cluster": CLONE,
                           "post_clone_sql": ["create table public.acceptance_refresh as select now() as refreshed_at"]}),
    ]
    rows: list[Row] = []
    failed = False
    for flow_name, params in plan:
        if flow_name in skip:
            continue
        t0 = time.monotonic()
        probe = None
        if flow_name == "switchover":
            probe = _start_probe()
        cluster = params.get("cluster", CLUSTER)
        run = run_deployment(f"{flow_name}/{cluster}", parameters={"cluster": cluster, **params}, timeout=1800)
        seconds = time.monotonic() - t0
        state = run.state
        result = None
        if state is not None and state.is_completed():
            try:
                result = state.result()
            except (MissingResult, OSError):  # not persisted, or not in this storage: the figure is optional
                result = None
        if probe is not None:
            report = probe.stop()
            lost = probe.missing_acknowledged()
            if isinstance(result, dict):
                result["write_gap"] = f"write gap {report.longest_gap():.1f}s, {len(lost)} acknowledged writes lost"
        if isinstance(result, dict) and flow_name in ("build_cluster", "switchover"):
            result["via_port"] = _write_through_primary_port(PORT_CLIENT_HOST)
        name = state.name if state else "Unknown"
        rows.append(Row(flow_name, name, seconds, _figure(flow_name, result) if result is not None else ""))
        print(f"   {flow_name:22s} {name:10s} {seconds:6.1f}s  {rows[-1].figure}", flush=True)
        if state is None or not state.is_completed():
            failed = True
            break

    print("== 4/4 summary", flush=True)
    from deployments.credentials import TICKET_FILE, auth_dir
    from deployments.server import prefect_home
    from deployments.ticket_proxy import ticket_url

    width = max(len(r.flow) for r in rows) if rows else 10
    print(f"   {'flow':{width}s}  {'state':10s} {'seconds':>8s}  key figure")
    for r in rows:
        print(f"   {r.flow:{width}s}  {r.state:10s} {r.seconds:8.1f}  {r.figure}")
    print(f"   total {time.monotonic() - started:.0f}s")
    print(f"\nPrefect UI: {ui_url()}  (flow runs, logs, artifacts: plans, topology, backups, drills)")
    print(f"  log in: {login_hint()}")
    print(f"Tickets: {ticket_url()} with the ticket credential in {auth_dir(prefect_home()) / TICKET_FILE} "
          "(deployments/TICKETS.md)")
    print(f"Lab: `.venv/bin/bouwsteen lab status`; inventory {lab.paths.inventory}")
    return 1 if failed else 0


# A client that knows one database host only: its port to the primary leads wherever the primary is.
PORT_CLIENT_HOST = "pg3"


def _write_through_primary_port(host: str) -> str:
    from tasks.adapters.postgres import Postgres
    from tasks.clients import primary_port_endpoint
    from tasks.context import context_for

    ctx = context_for(CLUSTER, fresh=True)
    endpoint = primary_port_endpoint(ctx, host)
    names = {str(h.address): h.name for h in ctx.inventory.db_hosts}
    with Postgres(endpoint) as pg:
        pg.query("create table if not exists public.bouwsteen_demo_writes "
                 "(id bigserial primary key, at timestamptz not null default now())")
        pg.query("insert into public.bouwsteen_demo_writes default values")
        _, address = pg.serving()
    return f"a write via {host}:{endpoint.port} landed on {names.get(address, address)}"


def login_hint() -> str:
    from deployments.credentials import ADMIN_FILE, auth_dir
    from deployments.server import prefect_home

    return (f"paste the whole line of {auth_dir(prefect_home()) / ADMIN_FILE} (admin:…) into the login field "
            "(`cat` it as root)")


def _start_probe():
    from lab.avprobe import AvailabilityProbe
    from tasks.context import context_for

    ctx = context_for(CLUSTER, fresh=True)
    routing = ctx.inventory.cluster.routing
    if routing is None:
        return None
    return AvailabilityProbe(ctx.application_endpoint(str(routing.vip), routing.rw_port), max_seconds=600).start()


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    sys.exit(run_demo())
