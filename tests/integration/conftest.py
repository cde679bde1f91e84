"""Integration tests run the flows against the lab through a real Prefect server.

The session starts from bare hosts (`lab down`, then `lab up`), starts its own Prefect server on
a port of its own (with its admin auth string and encryption key from `<its PREFECT_HOME>/auth/`,
and the ticket proxy on the next port), registers the lab's blocks, and leaves the lab up for the
next module; the last module (test_99) takes it down and checks nothing is left behind.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from bouwsteen.home import bouwsteen_home

REPO = Path(__file__).resolve().parents[2]
TEST_PORT = 4210
TICKET_PORT = TEST_PORT + 1  # the ticket proxy start_server puts in front of it


def _point_prefect_at_the_test_server() -> Path:
    """Before any test module imports Prefect (they do at collection): Prefect reads its settings
    once, at import. Set later, an in-process client would find no API URL and quietly start an
    ephemeral server on the same database, without the server's encryption key or auth string.
    Without an API URL Prefect must fail instead of starting one."""
    home = bouwsteen_home() / "prefect-test"
    os.environ["BOUWSTEEN_PREFECT_HOME"] = str(home)
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{TEST_PORT}/api"
    os.environ["PREFECT_SERVER_EPHEMERAL_ENABLED"] = "false"
    os.environ["BOUWSTEEN_TICKET_URL"] = f"http://127.0.0.1:{TICKET_PORT}/api"
    os.environ.pop("BOUWSTEEN_TICKET_LISTEN", None)
    os.environ.pop("BOUWSTEEN_TICKET_AUTH", None)
    from deployments.credentials import admin_auth_string

    # Every client of this session (Prefect, the CLI it starts, workers, flow runs) uses the test
    # server's own admin auth string.
    os.environ["PREFECT_API_AUTH_STRING"] = admin_auth_string(home)
    return home


TEST_HOME = _point_prefect_at_the_test_server()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.lab)


@pytest.fixture(scope="session")
def prefect_server():
    home = TEST_HOME
    from deployments.server import apply_environment, start_server, stop_server

    stop_server(TEST_PORT)
    apply_environment(TEST_PORT)
    # A fresh database per session: runs and artifacts of earlier sessions must not satisfy a test.
    for leftover in home.glob("*.db*"):
        leftover.unlink()
    handle = start_server(TEST_PORT)
    yield handle
    stop_server(TEST_PORT)


@pytest.fixture(scope="session")
def lab():
    from lab.manager import Lab

    the_lab = Lab()
    if os.environ.get("BOUWSTEEN_REUSE_LAB") != "1":
        the_lab.down()
    the_lab.up(pip=str(Path(sys.executable).with_name("pip")))
    return the_lab


@pytest.fixture(scope="session")
def registered(lab, prefect_server):
    from blocks.register import ClusterFiles, register_cluster

    register_cluster(ClusterFiles.for_lab(lab.paths.lab))
    return "lab"


# Each lab test names what it needs as one of these, so it passes when run alone by its node id (a
# fresh lab) as well as in the suite. Every one runs an idempotent runbook: in the suite, after the
# module that exercises that runbook, it changes nothing and costs one no-op run per session.


def _completed(state):
    assert state.is_completed(), state.message
    return state.result()


@pytest.fixture(scope="session")
def cluster(registered):
    """The cluster built and healthy."""
    from flows.build_cluster import build_cluster

    _completed(build_cluster(cluster=registered, return_state=True))
    return registered


@pytest.fixture(scope="session")
def object_store(registered):
    """The backup server's object store rolled out (bucket, prefix, TLS)."""
    from flows.backup_server import backup_server_rollout

    _completed(backup_server_rollout(cluster=registered, return_state=True))
    return registered


@pytest.fixture(scope="session")
def archiving(object_store):
    """The cluster built once the object store exists: archiving on, the stanza created."""
    from flows.build_cluster import build_cluster

    _completed(build_cluster(cluster=object_store, return_state=True))
    return object_store


@pytest.fixture(scope="session")
def backed_up(archiving):
    """At least one good base backup in the repository."""
    from flows.basebackup import scheduled_basebackup
    from tasks.backup import is_backup_present

    if not is_backup_present(archiving).ok:
        _completed(scheduled_basebackup(cluster=archiving, force=True, return_state=True))
    return archiving


@pytest.fixture(scope="session")
def routed(cluster):
    """The routing cluster rolled out: the VIP, HAProxy rw/ro and the primary detector."""
    from flows.routing import routing_rollout

    _completed(routing_rollout(cluster=cluster, return_state=True))
    return cluster
