"""build_cluster and add_standby on bare lab hosts, through the Prefect server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from labtools import REPO, cluster_state_digest, etcd_leader, lab_ssh, refused

DB = ["pg1", "pg2", "pg3"]


def patroni_members(lab) -> list[dict]:
    out = lab_ssh(lab, "pg1", "runuser -u postgres -- patronictl -c /etc/patroni/config.yml list -f json").stdout
    return json.loads(out)


def service_pids(lab, host: str) -> dict:
    out = lab_ssh(lab, host, "systemctl show -p MainPID --value etcd patroni; "
                             "head -1 /var/lib/postgresql/15/main/postmaster.pid").stdout.split()
    return {"etcd": out[0], "patroni": out[1], "postgres": out[2]}


def row_visible_everywhere(ctx, hosts: list[str]) -> None:
    from tasks.adapters.postgres import Postgres, UndefinedObject

    primary = next(h for h in ctx.inventory.db_hosts if h.name == hosts[0])
    token = f"test-{time.time_ns()}"
    with Postgres(ctx.superuser_endpoint(primary)) as pg:
        pg.query("create table if not exists public.build_check (token text)")
        pg.query("insert into public.build_check values (%s)", [token])
    for name in hosts[1:]:
        host = ctx.inventory.host(name)
        deadline = time.monotonic() + 60
        while True:
            with Postgres(ctx.superuser_endpoint(host)) as pg:
                try:
                    if pg.scalar("select count(*) from public.build_check where token = %s", [token]) == 1:
                        break
                except UndefinedObject:
                    pass  # the standby has not replayed the table's creation yet
            assert time.monotonic() < deadline, f"row not visible on {name}"
            time.sleep(0.2)


def test_build_cluster_dry_run_changes_nothing(lab, registered):
    from flows.build_cluster import build_cluster

    before = cluster_state_digest(lab, DB)
    state = build_cluster(cluster="lab", dry_run=True, return_state=True)
    assert state.is_completed(), state.message
    assert any("initialise" in r["plan"] for r in state.result()["plan"])
    assert cluster_state_digest(lab, DB) == before


def test_build_cluster_killed_mid_run_then_rerun_converges(lab, registered):
    """kill -9 of the flow's process while Patroni initialises; the rerun finishes the job."""
    env = {**os.environ}
    proc = subprocess.Popen([str(REPO / ".venv/bin/bouwsteen"), "run", "build_cluster", "--cluster", "lab"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
                            start_new_session=True)
    seen = []
    deadline = time.monotonic() + 300
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line)
        if "HA manager started to initialise" in line or time.monotonic() > deadline:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert any("HA manager started to initialise" in line for line in seen), "".join(seen[-20:])

    from flows.build_cluster import build_cluster

    state = build_cluster(cluster="lab", return_state=True)
    assert state.is_completed(), state.message
    members = patroni_members(lab)
    assert sorted(m["Role"] for m in members) == ["Leader", "Replica", "Replica"]
    assert all(m["State"] in ("running", "streaming") for m in members)


def test_cluster_has_one_leader_two_streaming_replicas_and_replicates(lab, cluster):
    from tasks.context import context_for
    from tasks.ha import replication_rows

    members = patroni_members(lab)
    leaders = [m["Member"] for m in members if m["Role"] == "Leader"]
    assert len(leaders) == 1
    assert sorted(m["Role"] for m in members if m["Role"] != "Leader") == ["Replica", "Replica"]
    ctx = context_for("lab", fresh=True)
    primary, rows = replication_rows(ctx)
    assert primary == leaders[0]
    assert sorted(r["state"] for r in rows if r["host"] != primary) == ["streaming (async)", "streaming (async)"]
    others = [h for h in DB if h != leaders[0]]
    row_visible_everywhere(ctx, [leaders[0], *others])
    # Losing the primary's host must not also cost etcd its leader (a failover ~6 s longer).
    assert etcd_leader(lab) in others


def test_second_build_changes_nothing_and_keeps_pids(lab, cluster):
    from flows.build_cluster import build_cluster

    pids = {h: service_pids(lab, h) for h in DB}
    before = cluster_state_digest(lab, DB)
    state = build_cluster(cluster="lab", return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["changed"] is False
    assert all(r["plan"] == "no change" for r in result["plan"])
    assert {h: service_pids(lab, h) for h in DB} == pids
    assert cluster_state_digest(lab, DB) == before


# ----------------------------------------------------------------------------- bad input


def test_unknown_host_is_refused(lab, registered):
    from flows.add_standby import add_standby

    before = cluster_state_digest(lab)
    refused(add_standby(cluster="lab", host="pg9", return_state=True), "unknown host 'pg9'")
    assert cluster_state_digest(lab) == before


def test_host_of_another_cluster_is_refused(lab, cluster):
    from flows.add_standby import add_standby

    lab_ssh(lab, "pg4", "mkdir -p /etc/bouwsteen && echo '{\"cluster\": \"other\"}' > /etc/bouwsteen/cluster.json")
    try:
        before = cluster_state_digest(lab)
        refused(add_standby(cluster="lab", host="pg4", return_state=True),
                 "pg4: already belongs to cluster 'other'")
        assert cluster_state_digest(lab) == before
    finally:
        lab_ssh(lab, "pg4", "rm -f /etc/bouwsteen/cluster.json")


def test_unreachable_host_is_refused(lab, cluster):
    from flows.add_standby import add_standby

    before = cluster_state_digest(lab, DB)
    lab.isolate("pg4")
    try:
        refused(add_standby(cluster="lab", host="pg4", return_state=True), "pg4: unreachable")
    finally:
        lab.heal("pg4")
    assert cluster_state_digest(lab, DB) == before


def test_wrong_superuser_password_is_refused(lab, cluster):
    from pydantic import SecretStr

    from blocks.prefect_blocks import DatabaseCredentials
    from flows.build_cluster import build_cluster

    good = DatabaseCredentials.load("lab")
    wrong = good.model_copy(update={"superuser_password": SecretStr("not-the-password")})
    wrong.save("lab", overwrite=True)
    try:
        before = cluster_state_digest(lab, DB)
        refused(build_cluster(cluster="lab", return_state=True), "superuser password in block 'lab' is wrong")
        assert cluster_state_digest(lab, DB) == before
    finally:
        good.save("lab", overwrite=True)


def test_invalid_stolon_spec_field_is_refused(lab, registered):
    from blocks.inventory import load_inventory
    from blocks.prefect_blocks import (
        ClusterInventory,
        DatabaseCredentials,
        SshCredentials,
    )
    from flows.build_cluster import build_cluster

    document = load_inventory(lab.paths.inventory).model_dump(mode="json")
    document["cluster"]["name"] = "lab-stolon"
    document["cluster"]["ha_manager"] = "stolon"
    document["cluster"]["stolon"] = {"cluster_spec": {"failIntervall": "20s"}}
    from blocks.inventory import parse_inventory

    ClusterInventory(inventory=parse_inventory(document)).save("lab-stolon", overwrite=True)
    SshCredentials.load("lab").save("lab-stolon", overwrite=True)
    DatabaseCredentials.load("lab").save("lab-stolon", overwrite=True)
    before = cluster_state_digest(lab, DB)
    refused(build_cluster(cluster="lab-stolon", return_state=True), "failIntervall")
    assert cluster_state_digest(lab, DB) == before


# ----------------------------------------------------------------------------- add_standby


def test_add_standby_streams_and_second_run_is_noop(lab, cluster):
    from flows.add_standby import add_standby
    from tasks.context import context_for

    state = add_standby(cluster="lab", host="pg4", return_state=True)
    assert state.is_completed(), state.message
    pg4 = next(r for r in state.result()["topology"] if r["host"] == "pg4")
    assert pg4["state"].startswith("streaming")
    inv = context_for("lab", fresh=True).inventory
    assert "pg4" in [h.name for h in inv.db_hosts]
    assert [h.name for h in inv.etcd_members] == DB, "a standby joins etcd as a client, not a member"

    before = cluster_state_digest(lab)
    again = add_standby(cluster="lab", host="pg4", return_state=True)
    assert again.is_completed(), again.message
    assert again.result()["changed"] is False
    assert cluster_state_digest(lab) == before
    members = patroni_members(lab)
    assert len(members) == 4


def test_check_hosts_cli_exit_code(lab, registered):
    result = subprocess.run([sys.executable, "-m", "bouwsteen.cli", "run", "check_hosts", "--cluster", "lab"],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "check_hosts: Completed" in result.stdout
