"""Deployments, worker, failure automation, the ticket REST contract and credential, lock durability,
scale-out.

Only check_hosts and tab_job ever run here (read-only, or refused before touching anything), so
this module is safe on a lab that holds a built cluster. Schedules are registered paused: a
worker left running must never start a nightly backup in the middle of a test session.

Prefect is imported inside fixtures and tests only: the session fixtures point PREFECT_API_URL
(and PREFECT_API_AUTH_STRING) at the test server first, and Prefect reads its settings once, at
import. Direct calls to the server carry the admin auth string (`ADMIN`); ticket calls go to the
ticket proxy (BOUWSTEEN_TICKET_URL) with the ticket credential, as a ticket system's do.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from labtools import REPO, bouwsteen

WORKER = "test60-worker"
PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _port(url: str) -> int:
    return urlparse(url).port


def _free_port(candidates=range(4300, 4400)) -> int:
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 4300-4399")


def _wait(predicate, timeout: float, what: str, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f}s")
        time.sleep(poll)


class Receiver:
    """The webhook end of the failure notification: records every POST body."""

    def __init__(self):
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                received.append({"path": self.path, "body": body.decode(errors="replace")})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/bouwsteen/failed-run"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def deployed(registered, prefect_server, receiver):
    result = bouwsteen("deploy", "--cluster", "lab", "--paused-schedules", "--notify-url", receiver.url, timeout=180)
    assert result.returncode == 0, result.stderr + result.stdout
    return prefect_server.url


@pytest.fixture(scope="module")
def worker(deployed):
    from deployments.worker import start_worker, stop_worker

    handle = start_worker(WORKER, query_seconds=2)
    yield handle
    stop_worker(WORKER)


def _admin() -> tuple[str, str]:
    user, _, password = os.environ["PREFECT_API_AUTH_STRING"].partition(":")
    return user, password


def _ticket() -> tuple[str, str]:
    from deployments.tickets import ticket_auth

    user, _, password = ticket_auth().partition(":")
    return user, password


def _get(url: str, path: str) -> httpx.Response:
    return httpx.get(f"{url}{path}", auth=_admin(), timeout=30)


def _post(url: str, path: str, body: dict, auth=None) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, auth=auth or _admin(), timeout=30)


# ---------------------------------------------------------------------------------------------
# 1. Deployments, schedules, parameter validation


def test_deploy_registers_one_deployment_per_flow_with_amsterdam_schedules(deployed):
    from flows.registry import FLOWS

    url = deployed
    for flow_name in FLOWS:
        response = _get(url, f"/deployments/name/{flow_name}/lab")
        assert response.status_code == 200, f"{flow_name}/lab: {response.text}"
        d = response.json()
        assert d["work_pool_name"] == "bouwsteen"
        assert d["parameters"] == {"cluster": "lab"}
        assert d["enforce_parameter_schema"] is True
        assert "bouwsteen" in d["tags"]
        path, _, attr = d["entrypoint"].partition(":")
        assert not Path(path).is_absolute() and (REPO / path).is_file() and attr, d["entrypoint"]
        assert d["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]

    def schedules(flow_name):
        return [(s["schedule"], s["parameters"], s["active"])
                for s in _get(url, f"/deployments/name/{flow_name}/lab").json()["schedules"]]

    amsterdam = {"timezone": "Europe/Amsterdam", "day_or": True}
    assert schedules("scheduled_basebackup") == [({"cron": "0 1 * * *", **amsterdam}, {}, False)]
    assert schedules("restore_drill") == [({"cron": "0 3 * * 0", **amsterdam}, {}, False)]
    assert schedules("tab_job") == [({"cron": "30 2 * * *", **amsterdam}, {"job": "purge_audit_log"}, False)]
    assert schedules("check_hosts") == [({"cron": "30 0 * * *", **amsterdam}, {}, False)]
    assert schedules("rotate_certificates") == []
    assert _get(url, "/work_pools/bouwsteen").json()["type"] == "process"


def test_deploy_is_idempotent(deployed, receiver):
    from flows.registry import FLOWS

    url = deployed
    before = {f: _get(url, f"/deployments/name/{f}/lab").json()["id"] for f in FLOWS}
    result = bouwsteen("deploy", "--cluster", "lab", "--paused-schedules", "--notify-url", receiver.url, timeout=180)
    assert result.returncode == 0, result.stderr
    after = {f: _get(url, f"/deployments/name/{f}/lab").json() for f in FLOWS}
    assert {f: d["id"] for f, d in after.items()} == before
    assert len(after["tab_job"]["schedules"]) == 1
    automations = _post(url, "/automations/filter", {}).json()
    assert [a["name"] for a in automations].count("bouwsteen: failed or crashed run") == 1
    assert len(_post(url, "/work_pools/filter", {"work_pools": {"name": {"any_": ["bouwsteen"]}}}).json()) == 1


def test_bad_parameter_values_are_refused_by_the_server(deployed):
    url = deployed
    tag = f"test60-bad-{uuid.uuid4().hex[:8]}"
    tab = _get(url, "/deployments/name/tab_job/lab").json()
    check = _get(url, "/deployments/name/check_hosts/lab").json()
    # A job that does not exist keeps even a wrongly accepted run harmless: refused in pre-flight.
    for deployment, params in [
        (tab, {"job": "does_not_exist", "fail_on_step_error": "maybe"}),
        (check, {"cluster": 42}),
        (check, {"cluster": ["lab"]}),
    ]:
        response = _post(url, f"/deployments/{deployment['id']}/create_flow_run", {"parameters": params, "tags": [tag]})
        assert response.status_code in (409, 422), f"{params}: {response.status_code} {response.text}"
        assert "Validation failed" in response.text or "validation" in response.text.lower()
    # The server checks types, not names; the CLI wrapper refuses unknown names before any run exists.
    result = bouwsteen("ticket", "run", "check_hosts", "--deployment", "lab", "--ticket", tag,
                       "--param", "clustr=lab")
    assert result.returncode == 2 and "no parameter(s) clustr" in result.stderr, result.stderr
    runs = _post(url, "/flow_runs/filter", {"flow_runs": {"tags": {"all_": [tag]}}}).json()
    runs += _post(url, "/flow_runs/filter", {"flow_runs": {"tags": {"all_": [f"ticket:{tag}"]}}}).json()
    assert runs == []


# ---------------------------------------------------------------------------------------------
# 2. Ticket-triggered runs: the REST contract of deployments/TICKETS.md


def test_same_ticket_twice_makes_one_run_that_completes_with_a_readable_report(worker, deployed):
    from deployments import tickets

    url = os.environ["BOUWSTEEN_TICKET_URL"]  # the ticket proxy, with the ticket credential
    ticket = f"T60-{uuid.uuid4().hex[:8]}"
    deployment = tickets.find_deployment("check_hosts", "lab", base_url=url)
    first = tickets.create_run(deployment["id"], ticket, {"cluster": "lab"}, base_url=url)
    second = tickets.create_run(deployment["id"], ticket, {"cluster": "lab"}, base_url=url)
    assert first.created and not second.created
    assert first.id == second.id
    # ... and the CLI, a third retry of the same webhook, lands on the same run.
    result = bouwsteen("ticket", "run", "check_hosts", "--deployment", "lab", "--ticket", ticket)
    assert result.returncode == 0 and f"already had flow run {first.id}" in result.stdout, result.stdout + result.stderr
    by_tag = _post(url, "/flow_runs/filter", {"flow_runs": {"tags": {"all_": [f"ticket:{ticket}"]}}},
                   auth=_ticket()).json()
    assert [r["id"] for r in by_tag] == [first.id]

    run = tickets.wait_for_run(first.id, timeout=150, base_url=url)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert f"ticket:{ticket}" in run["tags"] and run["idempotency_key"] == ticket

    artifacts = tickets.read_artifacts(first.id, base_url=url)
    report = next(a for a in artifacts if a["key"] == "check-hosts-lab")
    rows = json.loads(report["data"])
    assert rows and all(r["reachable"] for r in rows), rows

    status = bouwsteen("ticket", "status", first.id)
    assert status.returncode == 0 and "Completed" in status.stdout and "check-hosts-lab" in status.stdout, status.stdout


# ---------------------------------------------------------------------------------------------
# 3. The automation: a failed run of a deployment notifies


def test_failed_run_notifies_through_the_automation(worker, deployed, receiver):
    from deployments import tickets

    url = os.environ["BOUWSTEEN_TICKET_URL"]
    ticket = f"T60-fail-{uuid.uuid4().hex[:8]}"
    deployment = tickets.find_deployment("tab_job", "lab", base_url=url)
    run = tickets.create_run(deployment["id"], ticket, {"job": "no_such_job"}, base_url=url)
    final = tickets.wait_for_run(run.id, timeout=150, base_url=url)
    assert final["state"]["type"] == "FAILED", final["state"]
    assert "PreflightRefused" in final["state"]["message"]

    def notified():
        return [m for m in receiver.received if run.id in m["body"]]

    messages = _wait(notified, 90, f"notification for failed run {run.id}")
    body = json.loads(messages[0]["body"])
    assert body["subject"] == "bouwsteen: tab_job/lab Failed"
    assert "no_such_job" in body["body"]
    assert len(messages) == 1


# ---------------------------------------------------------------------------------------------
# 3b. API access: the server wants its admin auth string; the ticket credential can only start and
#     follow allow-listed runbooks, through the ticket proxy


def test_ticket_credential_can_only_start_and_follow_allow_listed_runbooks(deployed):
    server, proxy = deployed, os.environ["BOUWSTEEN_TICKET_URL"]
    admin, ticket = _admin(), _ticket()
    everything = {"include_secrets": True}

    # The server itself: nothing without the admin auth string, not even with the ticket credential.
    assert httpx.post(f"{server}/block_documents/filter", json=everything, timeout=30).status_code == 401
    assert _post(server, "/block_documents/filter", everything, auth=ticket).status_code == 401
    assert _post(server, "/block_documents/filter", everything).status_code == 200
    assert httpx.get(f"{server}/health", timeout=30).status_code == 200
    # The proxy: the ticket credential only (the admin's is not taken there either).
    for auth in (None, admin, (ticket[0], "wrong")):
        assert httpx.get(f"{proxy}/deployments/name/check_hosts/lab", auth=auth, timeout=30).status_code == 401

    def call(method: str, path: str, body: dict | None = None) -> httpx.Response:
        # As the ticket client does (deployments/tickets.py): Prefect answers 503 for a busy
        # database, and a ticketing system retries that (the idempotency key keeps it one run).
        from deployments.tickets import RETRYABLE_STATUS

        for attempt in range(5):
            response = httpx.request(method, f"{proxy}{path}", json=body, auth=ticket, timeout=30)
            if response.status_code not in RETRYABLE_STATUS:
                break
            time.sleep(0.5 * 2**attempt)
        return response

    # What a ticket may start: the allow-list rendered after `bouwsteen deploy`.
    allowed = httpx.get(f"{proxy.removesuffix('/api')}/bouwsteen/allow-list", auth=ticket, timeout=30).json()
    assert {f"{f}/lab" for f in ("check_hosts", "switchover", "tab_job")} <= set(allowed["names"])
    check = call("GET", "/deployments/name/check_hosts/lab")
    assert check.status_code == 200, check.text
    switchover = call("GET", "/deployments/name/switchover/lab").json()
    assert call("GET", "/deployments/name/check_hosts/nosuchcluster").status_code == 403

    tag = f"T60-gate-{uuid.uuid4().hex[:8]}"
    run = call("POST", f"/deployments/{check.json()['id']}/create_flow_run",
               {"parameters": {"cluster": "lab"}, "tags": [f"ticket:{tag}"], "idempotency_key": tag})
    assert run.status_code == 201, run.text
    again = call("POST", f"/deployments/{check.json()['id']}/create_flow_run",
                 {"parameters": {}, "tags": [f"ticket:{tag}"], "idempotency_key": tag})
    assert again.status_code == 200 and again.json()["id"] == run.json()["id"]

    refused_runs = {
        "unknown parameter": ({"parameters": {"clustr": "lab"}}, 422, "clustr"),
        "other cluster": ({"parameters": {"cluster": "prod"}}, 403, "parameters.cluster"),
        "job variables": ({"parameters": {}, "job_variables": {"command": "id"}}, 403, "job_variables"),
        "schema check off": ({"enforce_parameter_schema": False}, 403, "enforce_parameter_schema"),
        "foreign tag": ({"tags": ["cluster:prod"]}, 422, "ticket:"),
    }
    for what, (body, status, named) in refused_runs.items():
        response = call("POST", f"/deployments/{switchover['id']}/create_flow_run",
                        {"tags": [f"ticket:{tag}-refused"], **body})
        assert response.status_code == status and named in response.json()["detail"], f"{what}: {response.text}"
    assert _post(server, "/flow_runs/filter", {"flow_runs": {"tags": {"all_": [f"ticket:{tag}-refused"]}}}).json() == []

    refused = [
        ("POST", "/block_documents/filter", everything), ("POST", "/block_documents/filter", {}),
        ("GET", "/block_types/slug/bouwsteen-ssh-credentials/block_documents/name/lab?include_secrets=true", None),
        ("POST", "/variables/filter", {}), ("POST", "/variables/", {"name": "x", "value": "y"}),
        ("PATCH", f"/deployments/{switchover['id']}", {"paused": True}),
        ("DELETE", f"/deployments/{switchover['id']}", None),
        ("POST", "/deployments/", {"name": "x", "flow_id": switchover["flow_id"]}),
        ("POST", f"/flow_runs/{run.json()['id']}/set_state", {"state": {"type": "CANCELLED"}}),
        ("DELETE", f"/flow_runs/{run.json()['id']}", None),
        ("GET", "/deployments/name/check_hosts%2Flab", None),  # not what the gate would have matched
    ]
    for method, path, body in refused:
        response = call(method, path, body)
        assert response.status_code == 403, f"{method} {path}: {response.status_code} {response.text}"
    assert _get(server, f"/deployments/{switchover['id']}").json()["paused"] is False

    # Following the run: read it, find it by ticket, read its artifacts.
    assert call("GET", f"/flow_runs/{run.json()['id']}").json()["idempotency_key"] == tag
    found = call("POST", "/flow_runs/filter", {"flow_runs": {"tags": {"all_": [f"ticket:{tag}"]}}})
    assert [r["id"] for r in found.json()] == [run.json()["id"]]
    assert call("POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run.json()["id"]]}}}).status_code == 200


# ---------------------------------------------------------------------------------------------
# 4. Per-cluster lock: a server restart while a (then killed) holder has the slot leaves it free

HOLDER = """
import pathlib, sys, time
from prefect import flow
from tasks.locks import cluster_lock

@flow(name="lock_holder")
def lock_holder(cluster: str, marker: str):
    with cluster_lock(cluster, "lock durability test"):
        pathlib.Path(marker).write_text("held")
        time.sleep(600)

lock_holder(sys.argv[1], sys.argv[2])
"""


def test_cluster_lock_is_not_left_taken_by_a_server_restart(registered, prefect_server, tmp_path):
    from prefect import flow
    from prefect.client.orchestration import get_client

    from blocks.prefect_blocks import CertificateAuthority, ClusterInventory, SshCredentials
    from deployments.server import prefect_home, start_server, stop_server
    from tasks.locks import cluster_lock, limit_name

    cluster = "locktest"
    # The lab's inventory under another name: a lock of its own (Prefect limit and etcd key),
    # so the lab's real cluster lock is never touched. The CA: its etcd speaks TLS with a client pair.
    for block_class in (ClusterInventory, SshCredentials, CertificateAuthority):
        block_class.load("lab").save(cluster, overwrite=True)

    def active_slots() -> int:
        with get_client(sync_client=True) as client:
            return client.read_global_concurrency_limit_by_name(limit_name(cluster)).active_slots

    marker = tmp_path / "held"
    log = open(tmp_path / "holder.log", "wb")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, cluster, str(marker)], cwd=REPO, env={**os.environ},
                              stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    port = _port(prefect_server.url)
    try:
        _wait(lambda: marker.exists() or holder.poll() is not None, 90, "holder takes the cluster lock", poll=0.5)
        assert marker.exists(), (tmp_path / "holder.log").read_text()
        assert active_slots() == 1
        leases = [p for p in (prefect_home() / "concurrency_leases").glob("*.json") if p.name != "expirations.json"]
        assert leases, "no lease on disk: the server does not use the filesystem lease storage"

        stop_server(port)
        os.killpg(holder.pid, signal.SIGKILL)  # dies holding the slot; it can never release it
        holder.wait(timeout=10)
        killed = time.monotonic()
        start_server(port)

        # Lease of 60 s (cluster_lock) + the repossessor's 15 s loop, counted from the last renewal.
        _wait(lambda: active_slots() == 0, 120, "the dead holder's slot is given back")
        freed_after = time.monotonic() - killed
    finally:
        if holder.poll() is None:
            os.killpg(holder.pid, signal.SIGKILL)
            holder.wait()
        log.close()

    @flow(name="lock_second_holder")
    def second_holder() -> str:
        with cluster_lock(cluster, "after restart", wait_seconds=30):
            return "held"

    state = second_holder(return_state=True)
    assert state.is_completed(), state.message
    assert active_slots() == 0
    print(f"slot free {freed_after:.0f}s after the holder was killed")


# ---------------------------------------------------------------------------------------------
# 5. Scale-out: the Prefect server on PostgreSQL, two workers sharing the runs


class ThrowawayPostgres:
    """initdb + pg_ctl as the postgres user in a temp dir, on 127.0.0.1 only, password auth."""

    def __init__(self):
        self.port = _free_port(range(55432, 55532))
        self.password = uuid.uuid4().hex
        self.dir = Path(tempfile.mkdtemp(prefix="bouwsteen-pg-", dir="/tmp"))
        self.data = self.dir / "data"
        self.url = f"postgresql+asyncpg://prefect:{self.password}@127.0.0.1:{self.port}/prefect"

    def _as_postgres(self, *argv: str, timeout: float = 60) -> None:
        result = subprocess.run(["runuser", "-u", "postgres", "--", *argv], capture_output=True, text=True,
                                stdin=subprocess.DEVNULL, timeout=timeout, cwd=self.dir)
        assert result.returncode == 0, f"{argv[0]}: {result.stdout}{result.stderr}"

    def start(self) -> None:
        pwfile = self.dir / "pw"
        pwfile.write_text(self.password + "\n")
        shutil.chown(self.dir, "postgres", "postgres")
        shutil.chown(pwfile, "postgres", "postgres")
        os.chmod(pwfile, 0o600)
        self._as_postgres(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "prefect", "--pwfile", str(pwfile),
                          "--auth=scram-sha-256", "--no-locale", "-E", "UTF8", timeout=120)
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "postgres.log"),
                          "-w", "-t", "60", "-o",
                          f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c max_connections=200",
                          "start")
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user="prefect", password=self.password,
                             dbname="postgres", autocommit=True) as conn:
            conn.execute("create database prefect")

    def query(self, sql: str, params=None):
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user="prefect", password=self.password,
                             dbname="prefect") as conn:
            return conn.execute(sql, params).fetchall()

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(self.data),
                            "-m", "fast", "-w", "-t", "60", "stop"], capture_output=True, timeout=90)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_scale_out_server_on_postgresql_with_two_workers(registered, monkeypatch):
    from deployments import tickets
    from deployments.credentials import admin_auth_string
    from deployments.server import start_server, stop_server
    from deployments.worker import start_worker, stop_worker, worker_log

    if not (PG_BIN / "initdb").exists():
        pytest.fail(f"{PG_BIN / 'initdb'} missing: install postgresql-15 (run.sh does)")
    pg = ThrowawayPostgres()
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    home = Path(tempfile.mkdtemp(prefix="bouwsteen-prefect-pg-"))
    # This server, its CLI calls and its workers get their own PREFECT_HOME and API URL; the
    # session's test server and its workers are left alone.
    monkeypatch.setenv("BOUWSTEEN_PREFECT_HOME", str(home))
    monkeypatch.setenv("PREFECT_API_URL", url)
    monkeypatch.setenv("PREFECT_UI_API_URL", url)
    # ... and its own admin auth string (its tickets go straight to it with that; no ticket proxy).
    admin = admin_auth_string(home)
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", admin)
    workers = ["scale-a", "scale-b"]
    try:
        pg.start()
        start_server(port, database_url=pg.url, timeout=150, ticket_proxy=False)
        assert pg.query("select count(*) from information_schema.tables where table_name = 'flow_run'")[0][0] == 1

        for args in (("blocks", "register", "--lab"), ("deploy", "--cluster", "lab", "--paused-schedules")):
            result = bouwsteen(*args, timeout=180)
            assert result.returncode == 0, f"bouwsteen {' '.join(args)}: {result.stderr}{result.stdout}"
        # One run at a time per worker: the four runs have to be spread over both.
        for name in workers:
            start_worker(name, limit=1, query_seconds=2)

        deployment = tickets.find_deployment("check_hosts", "lab", base_url=url, auth=admin)
        run_ids = [tickets.create_run(deployment["id"], f"scale-{uuid.uuid4().hex[:8]}", base_url=url, auth=admin).id
                   for _ in range(4)]
        deadline = time.monotonic() + 180
        finals = [tickets.wait_for_run(r, timeout=max(deadline - time.monotonic(), 1), base_url=url, auth=admin)
                  for r in run_ids]
        assert [f["state"]["type"] for f in finals] == ["COMPLETED"] * 4, [f["state"] for f in finals]

        taken = {name: [r for r in run_ids if r in worker_log(name).read_text()] for name in workers}
        assert all(taken.values()), f"a worker took no run: {taken}"
        # A worker may log a run the other one took (it saw it first and let it go): every run by
        # someone, which is what spreading needs; the server says who ran it.
        assert set(sum(taken.values(), [])) == set(run_ids), taken
        stored = pg.query("select count(*) from flow_run where id = any(%s::uuid[])", [run_ids])[0][0]
        assert stored == 4
    finally:
        for name in workers:
            stop_worker(name)
        stop_server(port)
        pg.stop()
        shutil.rmtree(home, ignore_errors=True)
