"""Integration tests run the flows against the lab through a real Prefect server.

The session starts from bare hosts (`lab down`, then `lab up`), starts its own Prefect server on
a port of its own, registers the lab's blocks, and leaves the lab up for the next module; the
last module (test_99) takes it down and checks nothing is left behind.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TEST_PORT = 4210


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.lab)


@pytest.fixture(scope="session")
def prefect_server():
    home = Path(os.environ.get("BOUWSTEEN_HOME", "/var/lib/bouwsteen")) / "prefect-test"
    os.environ["BOUWSTEEN_PREFECT_HOME"] = str(home)
    os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{TEST_PORT}/api"
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
