"""rolling_upgrade (issue 18) on the routed lab: Debian's Patroni 4.0.7 (trixie) to the newest 4.x
(sid's 4.1.5) from the lab's signed apt repository, on every host that has it, with one
switchover; bad and unavailable versions refused with nothing changed; a second run a no-op.
Last in the suite: every later test would otherwise run on the upgraded Patroni. test_97 leaves
the lab down (pg3 gone for good), so this module brings up a lab of its own from bare hosts."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
from labtools import cluster_state_digest, lab_ssh, refused

PATRONICTL = "runuser -u postgres -- patronictl -c /etc/patroni/config.yml"


@pytest.fixture(scope="module")
def fresh_cluster(lab, prefect_server):
    """Bare hosts on the installed Patroni: the backup server, the cluster with archiving, a good
    backup (the upgrade refuses to start without one of the last 26 hours) and routing; the lab
    down again afterwards, since it runs the upgraded Patroni."""
    from blocks.register import ClusterFiles, register_cluster
    from flows.backup_server import backup_server_rollout
    from flows.basebackup import scheduled_basebackup
    from flows.build_cluster import build_cluster
    from flows.routing import routing_rollout

    lab.down()
    lab.up(pip=str(Path(sys.executable).with_name("pip")))
    register_cluster(ClusterFiles.for_lab(lab.paths.lab))
    for state in (backup_server_rollout(cluster="lab", return_state=True),
                  build_cluster(cluster="lab", return_state=True),
                  scheduled_basebackup(cluster="lab", force=True, return_state=True),
                  routing_rollout(cluster="lab", return_state=True)):
        assert state.is_completed(), state.message
    yield "lab"
    lab.down()


def _installed(lab, host: str) -> str:
    return lab_ssh(lab, host, "dpkg-query -W -f='${Version}' patroni").stdout.strip()


def _declined_at_the_first_host(packages: dict) -> object:
    """A run with approve_each_host that pauses before its first host; the DBA says no."""
    from prefect.client.orchestration import get_client
    from prefect.flow_runs import resume_flow_run

    from flows.upgrade import rolling_upgrade

    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.setdefault(
        "state", rolling_upgrade(cluster="lab", packages=packages, approve_each_host=True, return_state=True)))
    runner.start()
    run_id = None
    deadline = time.monotonic() + 300
    with get_client(sync_client=True) as client:
        while run_id is None and time.monotonic() < deadline:
            # Only this flow's runs: an earlier test's paused run must not be answered here.
            paused = [r for r in client.read_flow_runs() if r.state and r.state.is_paused()]
            run_id = next((r.id for r in paused if client.read_flow(r.flow_id).name == "rolling_upgrade"), None)
            time.sleep(1)
    assert run_id is not None, "rolling_upgrade did not pause before its first host"
    resume_flow_run(run_id, run_input={"upgrade": False, "reason": "test: not tonight"})
    runner.join(300)
    return outcome["state"]


def test_rolling_upgrade_of_patroni(lab, fresh_cluster):
    from flows.upgrade import rolling_upgrade
    from lab.image import PATRONI_INSTALLED, PATRONI_UPGRADE
    from tasks.adapters.packages import upstream_version
    from tasks.context import context_for
    from tasks.ha import primary_of

    ctx = context_for("lab", fresh=True)
    members = [h.name for h in ctx.inventory.db_hosts]
    primary = primary_of(ctx).name
    assert {_installed(lab, h) for h in members} == {PATRONI_INSTALLED}
    before = cluster_state_digest(lab, members)

    bad = rolling_upgrade(cluster="lab", packages={"patroni": "newest"}, return_state=True)
    assert bad.is_failed() and "packages.patroni: 'newest' is not a Debian version" in bad.message, bad.message
    refused(rolling_upgrade(cluster="lab", packages={"patroni": "9.9.9-1"}, return_state=True),
            "packages.patroni: 9.9.9-1 is not available on")
    plan = rolling_upgrade(cluster="lab", packages={"patroni": PATRONI_UPGRADE}, dry_run=True)
    assert plan["dry_run"] and set(members) <= set(plan["hosts"]), plan
    declined = _declined_at_the_first_host({"patroni": PATRONI_UPGRADE})
    assert declined.is_failed() and "the DBA declined (test: not tonight)" in declined.message, declined.message
    assert "upgraded so far: none" in declined.message
    assert cluster_state_digest(lab, members) == before, "a refused, dry or declined run changed a host"
    assert {_installed(lab, h) for h in members} == {PATRONI_INSTALLED}
    assert primary_of(context_for("lab", fresh=True)).name == primary

    done = rolling_upgrade(cluster="lab", packages={"patroni": PATRONI_UPGRADE})
    assert done["changed"] and set(members) <= set(done["upgraded"]), done
    assert done["switchover"] and done["switchover"] != primary
    # The old primary went last, after the switchover, as a standby.
    assert [h for h in done["upgraded"] if h in members][-1] == primary
    assert {_installed(lab, h) for h in members} == {PATRONI_UPGRADE}
    # Running, not only installed: every member's REST API answers with the new release.
    running = lab_ssh(lab, members[0], f"{PATRONICTL} version lab").stdout
    assert running.count(f"Patroni {upstream_version(PATRONI_UPGRADE)}") == len(members), running
    assert all(row["state"].startswith("streaming") for row in done["topology"] if row["host"] != done["switchover"])

    again = rolling_upgrade(cluster="lab", packages={"patroni": PATRONI_UPGRADE})
    assert again["changed"] is False and again["hosts"] == {}, again
