"""Routing cluster, switchover and failover on the lab, with the availability probe through the VIP."""

from __future__ import annotations

import json
import threading
import time

import pytest
import yaml
from labtools import bouwsteen, cluster_state_digest, etcd_leader, lab_ssh

VIP = "172.29.66.100"


def primary_name(ctx) -> str:
    from tasks.ha import read_view

    return read_view(ctx).leader


def patronictl(lab, *args: str) -> str:
    return lab_ssh(lab, "pg1", "runuser -u postgres -- patronictl -c /etc/patroni/config.yml " + " ".join(args)).stdout


def detector(lab, router: str, path: str) -> tuple[int, object]:
    out = lab_ssh(lab, router, f"curl -s -m 3 -w '\\n%{{http_code}}' 'http://127.0.0.1:8080{path}'").stdout
    body, _, code = out.rpartition("\n")
    return int(code), json.loads(body) if body.strip() else None


def rw_up(lab, router: str) -> list[str]:
    csv = lab_ssh(lab, router, "curl -sf 'http://127.0.0.1:8404/stats;csv'").stdout.splitlines()
    header = csv[0].lstrip("# ").split(",")
    rows = [dict(zip(header, line.split(","))) for line in csv[1:] if line]
    return [r["svname"] for r in rows if r["pxname"] == "postgres_rw" and r["status"] == "UP"
            and r["svname"] not in ("FRONTEND", "BACKEND")]


def test_routing_rollout_dry_run_then_apply_then_noop(lab, cluster):
    from flows.routing import routing_rollout

    before = cluster_state_digest(lab, ("router1", "router2"))
    dry = routing_rollout(cluster="lab", dry_run=True, return_state=True)
    assert dry.is_completed(), dry.message
    assert any("haproxy" in r["plan"] for r in dry.result()["plan"])
    assert cluster_state_digest(lab, ("router1", "router2")) == before

    state = routing_rollout(cluster="lab", return_state=True)
    assert state.is_completed(), state.message
    again = routing_rollout(cluster="lab", return_state=True)
    assert again.is_completed(), again.message
    assert again.result()["changed"] is False


def test_vip_routes_rw_to_primary_and_ro_to_standby(lab, routed):
    from tasks.context import context_for
    from tasks.routing import through_vip

    ctx = context_for("lab", fresh=True)
    primary = primary_name(ctx)
    rw_recovery, rw_addr = through_vip(ctx, 5432)
    ro_recovery, ro_addr = through_vip(ctx, 5433)
    assert rw_recovery is False and ctx.inventory.host(primary).address.exploded == rw_addr
    assert ro_recovery is True and ro_addr != rw_addr


def test_router_keepalived_stopped_moves_the_vip(lab, routed):
    from tasks.context import context_for
    from tasks.routing import through_vip, vip_holders, wait_until_vip_held

    ctx = context_for("lab", fresh=True)
    holder = vip_holders(ctx)[0]
    other = "router2" if holder == "router1" else "router1"
    lab_ssh(lab, holder, "systemctl stop keepalived")
    try:
        assert wait_until_vip_held("lab", not_on=holder) == other
        assert through_vip(ctx, 5432)[0] is False
        assert through_vip(ctx, 5433)[0] is True
    finally:
        lab_ssh(lab, holder, "systemctl start keepalived")
    # Non-preempting: the VIP stays where it is now.
    time.sleep(3)
    assert vip_holders(ctx) == [other]


def test_vip_outside_the_subnet_is_refused(lab, registered, tmp_path):
    document = yaml.safe_load(lab.paths.inventory.read_text())
    document["cluster"]["routing"]["vip"] = "10.99.0.100"
    bad = tmp_path / "inventory.yaml"
    bad.write_text(yaml.safe_dump(document))
    result = bouwsteen("run", "routing_rollout", "--inventory", str(bad))
    assert result.returncode == 2
    assert "cluster.routing.vip" in result.stderr and "outside the hosts' subnet" in result.stderr


def test_detector_is_pgroute66_compatible(lab, routed):
    from tasks.context import context_for

    ctx = context_for("lab", fresh=True)
    primary = primary_name(ctx)
    assert detector(lab, "router1", "/v1/primary") == (200, primary)
    assert detector(lab, "router1", "/v1/primaries") == (200, [primary])
    code, standbys = detector(lab, "router1", "/v1/standbys?group=lab")
    assert code == 200 and primary not in standbys and len(standbys) >= 2
    assert detector(lab, "router1", f"/v1/{primary}/status") == (200, "primary")
    assert detector(lab, "router1", "/v1/nosuchhost/status") == (404, "invalid")
    assert detector(lab, "router1", f"/v1/primary/{primary}")[0] == 200
    assert detector(lab, "router1", f"/v1/primary/{standbys[0]}")[0] == 503


# ----------------------------------------------------------------------------- switchover


def _refused(state, needle: str) -> None:
    assert state.is_failed()
    with pytest.raises(Exception, match=needle):
        state.result()


def plan_artifacts(state) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    return [a for a in artifacts if a.type == "markdown" and "-plan-" in (a.key or "")]


def test_role_change_and_backup_dry_runs_publish_a_plan_and_change_nothing(lab, routed, backed_up):
    """Every changing runbook takes dry_run; these act on roles and data, so it is proven on the lab."""
    from flows.basebackup import scheduled_basebackup
    from flows.restore_drill import restore_drill
    from flows.switchover import switchover
    from tasks.backup import is_backup_present
    from tasks.context import context_for

    ctx = context_for("lab", fresh=True)
    primary = primary_name(ctx)
    backups = [b.name for b in is_backup_present("lab").backups]
    before = cluster_state_digest(lab, ("pg1", "pg2", "pg3", "restore1"))
    for flow_fn, params in ((switchover, {}), (scheduled_basebackup, {"force": True}), (restore_drill, {})):
        state = flow_fn(cluster="lab", dry_run=True, return_state=True, **params)
        assert state.is_completed(), state.message
        [plan] = plan_artifacts(state)
        assert "_dry_run: nothing was changed._" in plan.data
    assert primary_name(context_for("lab", fresh=True)) == primary
    assert [b.name for b in is_backup_present("lab").backups] == backups
    assert cluster_state_digest(lab, ("pg1", "pg2", "pg3", "restore1")) == before


def test_switchover_bad_candidates_are_refused(lab, routed):
    from flows.switchover import switchover

    before = cluster_state_digest(lab, ("pg1", "pg2", "pg3"))
    _refused(switchover(cluster="lab", candidate="pg9", return_state=True), "not a database host")
    _refused(switchover(cluster="lab", candidate="router1", return_state=True), "not a database host")
    lab_ssh(lab, "pg3", "systemctl stop patroni")
    try:
        _refused(switchover(cluster="lab", candidate="pg3", return_state=True), "pg3")
    finally:
        lab_ssh(lab, "pg3", "systemctl start patroni")
    assert cluster_state_digest(lab, ("pg1", "pg2"))["pg1"] == before["pg1"]


def test_second_runbook_on_the_cluster_is_refused(lab, routed):
    from prefect import flow

    from flows.switchover import switchover
    from tasks.locks import cluster_lock

    holding = threading.Event()
    release = threading.Event()

    @flow(name="hold-the-cluster")
    def hold() -> None:
        with cluster_lock("lab", "test holder"):
            holding.set()
            release.wait(120)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(60)
        _refused(switchover(cluster="lab", return_state=True), "busy")
    finally:
        release.set()
        holder.join(120)


def test_switchover_keeps_every_acknowledged_write(lab, routed):
    from flows.switchover import switchover
    from lab.avprobe import AvailabilityProbe
    from tasks.context import context_for

    ctx = context_for("lab", fresh=True)
    probe = AvailabilityProbe(ctx.application_endpoint(VIP, 5432), max_seconds=180).start()
    time.sleep(2)
    state = switchover(cluster="lab", return_state=True)
    time.sleep(2)
    report = probe.stop()
    assert state.is_completed(), state.message
    result = state.result()
    assert result["new_primary"] != result["old_primary"]
    assert [e["event"] for e in result["timeline"]][-1].startswith("rw through the VIP reaches")
    assert etcd_leader(lab) != result["new_primary"]
    assert probe.missing_acknowledged() == []
    assert len(report.acknowledged) > 20
    print(f"switchover write gap: {report.longest_gap():.2f}s")


def write_through(endpoint) -> tuple[bool, str]:
    """Insert a row where the endpoint leads; (in recovery, server address) of that server."""
    from tasks.adapters.postgres import Postgres

    with Postgres(endpoint, statement_timeout_ms=5000) as pg:
        pg.query("create table if not exists public.bouwsteen_port_writes "
                 "(id bigserial primary key, via text not null, at timestamptz not null default now())")
        pg.query("insert into public.bouwsteen_port_writes (via) values (%s)", [repr(endpoint)])
        return pg.serving()


def test_db_host_port_and_multi_host_uri_follow_a_switchover(lab, routed):
    """pg3:25432 leads to the primary wherever it is (and cuts its sessions when it moves); a
    psycopg client on the report's multi-host URI keeps writing across the switchover."""
    import psycopg

    from flows.switchover import switchover
    from lab.avprobe import AvailabilityProbe
    from tasks.clients import multi_host_endpoint, primary_port_endpoint
    from tasks.context import context_for

    ctx = context_for("lab", fresh=True)
    address = {h.name: str(h.address) for h in ctx.inventory.db_hosts}
    via_pg3 = primary_port_endpoint(ctx, "pg3")
    assert via_pg3.port == 25432
    before = primary_name(ctx)
    assert write_through(via_pg3) == (False, address[before])
    held = psycopg.connect(host=via_pg3.address, port=via_pg3.port, user=via_pg3.user, password=via_pg3.password,
                           dbname=via_pg3.dbname, connect_timeout=5, autocommit=True)
    probe = AvailabilityProbe(multi_host_endpoint(ctx), max_seconds=180).start()
    try:
        time.sleep(2)
        state = switchover(cluster="lab", return_state=True)
        time.sleep(3)
    finally:
        report = probe.stop()
    assert state.is_completed(), state.message
    after = state.result()["new_primary"]
    assert after != before
    assert any(e["event"].startswith("port 25432 of ") and e["event"].endswith(f"leads to {after}")
               for e in state.result()["timeline"])
    # Like stolon-proxy: a session through the port does not outlive the primary it led to.
    with pytest.raises(psycopg.OperationalError):
        held.execute("select 1")
    held.close()
    assert write_through(via_pg3) == (False, address[after])
    assert probe.missing_acknowledged() == []
    switched_at = max(a.sent for a in report.attempts if a.latency is None) if report.failures else 0
    assert any(a.sent > switched_at for a in report.acknowledged), "the multi-host client never wrote again"
    assert len(report.acknowledged) > 20
    print(f"multi-host URI write gap across a switchover: {report.longest_gap():.2f}s")


def test_client_connection_report_file_is_what_libpq_connects_with(lab, routed, monkeypatch):
    """The pg_service.conf the runbooks write: each section connects where its name says."""
    import psycopg

    from tasks.clients import service_file
    from tasks.context import context_for

    ctx = context_for("lab", fresh=True)
    path = service_file("lab")
    text = path.read_text()
    password = ctx.db_blocks.application_password.get_secret_value()
    assert password not in text and "password" not in text.lower().replace("no passwords here", "")
    monkeypatch.setenv("PGSERVICEFILE", str(path))
    names = {str(h.address): h.name for h in ctx.inventory.db_hosts}
    for service, in_recovery in (("lab", False), ("lab-ro", True), ("lab-vip", False), ("lab-vip-ro", True)):
        with psycopg.connect(f"service={service}", password=password) as conn:
            recovery, address = conn.execute("select pg_is_in_recovery(), host(inet_server_addr())").fetchone()
        assert recovery is in_recovery, f"service {service} reached {names.get(address, address)}"


def test_split_brain_routes_rw_nowhere(lab, routed):
    """Promote a standby behind Patroni's back (maintenance mode keeps Patroni from fixing it):
    the detector answers 409 and HAProxy takes every rw server out."""
    from tasks.context import context_for

    ctx = context_for("lab", fresh=True)
    primary = primary_name(ctx)
    rogue = next(h.name for h in ctx.inventory.db_hosts if h.name != primary)
    psql = "runuser -u postgres -- psql -XAt -h /var/run/postgresql -c "
    patronictl(lab, "pause", "--wait", "lab")
    try:
        # A promoted rogue would archive its new timeline's history into the cluster's repository,
        # poisoning it for every later restore; this test is about routing, so it must not archive.
        lab_ssh(lab, rogue, psql + "\"alter system set archive_command = ''\" && " + psql + "'select pg_reload_conf()'")
        lab_ssh(lab, rogue, "runuser -u postgres -- /usr/lib/postgresql/15/bin/pg_ctl -D /var/lib/postgresql/15/main promote -w")
        deadline = time.monotonic() + 60
        while detector(lab, "router1", "/v1/primary")[0] != 409:
            assert time.monotonic() < deadline, "the detector never saw two primaries"
            time.sleep(0.5)
        assert detector(lab, "router1", "/v1/primary") == (409, "")
        assert sorted(detector(lab, "router1", "/v1/primaries")[1]) == sorted([primary, rogue])
        deadline = time.monotonic() + 60
        while rw_up(lab, "router1") or rw_up(lab, "router2"):
            assert time.monotonic() < deadline, "HAProxy still routes rw during split brain"
            time.sleep(0.5)
        # Nor does port 25432 of any database host: it refuses every connection.
        from tasks.adapters.postgres import DatabaseUnavailable
        from tasks.clients import primary_port_endpoint

        for host in ctx.inventory.db_hosts:
            deadline = time.monotonic() + 60
            while True:
                try:
                    served = write_through(primary_port_endpoint(ctx, host.name))
                except DatabaseUnavailable:
                    break
                assert time.monotonic() < deadline, f"{host.name}:25432 still leads to {served} during split brain"
                time.sleep(0.5)
    finally:
        lab_ssh(lab, rogue, psql + "'alter system reset archive_command' && " + psql + "'select pg_reload_conf()'",
                check=False)
        patronictl(lab, "resume", "--wait", "lab")
    # The rogue diverged onto its own timeline: Patroni may rewind it; if it does not stream
    # within a minute, re-clone it as the runbook would.
    from tasks.ha import replication_rows, wait_until_replicas_streaming

    deadline = time.monotonic() + 60
    while True:
        _, rows = replication_rows(ctx)
        if any(r["host"] == rogue and str(r["state"]).startswith("streaming") for r in rows):
            break
        if time.monotonic() > deadline:
            patronictl(lab, "reinit", "--force", "--wait", "lab", rogue)
            break
        time.sleep(2)
    wait_until_replicas_streaming("lab", timeout=180)


def test_failover_refuses_while_the_primary_is_healthy(lab, routed):
    from flows.switchover import failover

    _refused(failover(cluster="lab", return_state=True), "healthy primary exists")


def _paused_failover(outcome: dict):
    """Start a forced failover that must pause for a decision; the paused run's id."""
    from prefect.client.orchestration import get_client

    from flows.switchover import failover

    runner = threading.Thread(target=lambda: outcome.setdefault(
        "state", failover(cluster="lab", force=True, max_data_loss_bytes=-1, return_state=True)))
    runner.start()
    deadline = time.monotonic() + 120
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            for run in client.read_flow_runs():
                if run.name and run.state and run.state.is_paused():
                    return runner, run.id
            time.sleep(1)
    raise AssertionError("failover did not pause for a decision")


def test_failover_decision_for_a_host_that_is_no_standby_is_refused(lab, routed, prefect_server):
    """The candidate a DBA types is checked afresh, like the pre-flight's: not a standby → nothing promoted."""
    from prefect.flow_runs import resume_flow_run

    from tasks.context import context_for

    ctx = context_for("lab", fresh=True)
    old = primary_name(ctx)
    outcome: dict = {}
    runner, run_id = _paused_failover(outcome)
    resume_flow_run(run_id, run_input={"promote": True, "candidate": old, "reason": "test: the primary itself"})
    runner.join(300)
    state = outcome["state"]
    assert state.is_failed()
    assert "refused, nothing changed" in state.message and f"candidate: {old} is not a standby" in state.message
    assert primary_name(context_for("lab", fresh=True)) == old


def test_failover_pauses_for_a_human_when_data_may_be_lost(lab, routed, prefect_server):
    """A negative loss threshold makes any candidate 'too far behind': the run must pause and
    promote only after a DBA answers in the UI (here: through the API)."""
    from prefect.client.orchestration import get_client
    from prefect.flow_runs import resume_flow_run

    from flows.switchover import failover
    from tasks.context import context_for

    ctx = context_for("lab", fresh=True)
    old = primary_name(ctx)
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.setdefault(
        "state", failover(cluster="lab", force=True, max_data_loss_bytes=-1, return_state=True)))
    runner.start()
    run_id = None
    deadline = time.monotonic() + 120
    with get_client(sync_client=True) as client:
        while run_id is None and time.monotonic() < deadline:
            for run in client.read_flow_runs():
                if run.name and run.state and run.state.is_paused():
                    run_id = run.id
            time.sleep(1)
        assert run_id is not None, "failover did not pause for a decision"
        candidate = next(h.name for h in ctx.inventory.db_hosts if h.name != old)
        resume_flow_run(run_id, run_input={"promote": True, "candidate": candidate, "reason": "test: accepted"})
    runner.join(300)
    state = outcome["state"]
    assert state.is_completed(), state.message
    assert state.result()["new_primary"] == candidate
    assert any("human decided: promote" in e["event"] for e in state.result()["timeline"])
