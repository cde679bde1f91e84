"""The lab itself: real hosts, isolated, idempotent, recoverable; check_hosts through Prefect."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from labtools import REPO, bouwsteen, lab_ssh

HOSTS = ["pg1", "pg2", "pg3", "pg4", "backup1", "router1", "router2", "restore1"]  # cluster lab's inventory
MACHINES = [*HOSTS, "acc1", "acc2", "acc3"]  # and clone_cluster's target, cluster acc


def test_every_host_is_a_booted_machine(lab):
    for row in lab.status_dicts():
        assert row["state"] == "running" and row["ssh"], row
    out = lab_ssh(lab, "pg1", "hostname; ps -o comm= -p 1; systemctl is-system-running; ip -4 -o addr show eth0").stdout
    hostname, pid1, system_state, address = out.splitlines()[:4]
    assert hostname == "pg1"
    assert pid1 == "systemd"
    assert system_state in ("running", "degraded")
    assert "172.29.66.11/24" in address


def test_host_cannot_see_the_controller(lab):
    checkout = str(REPO)
    result = lab_ssh(lab, "pg1", f"test -e {checkout} || test -e /root/{os.path.basename(checkout)} && echo visible "
                                 f"|| echo hidden; ls /dev | grep -c -E '^(vd|sd|nvme)' || true")
    visible, disks = result.stdout.split()
    assert visible == "hidden"
    assert disks == "0"


def test_no_route_out_of_the_lab(lab):
    routes = lab_ssh(lab, "pg1", "ip route").stdout.strip().splitlines()
    assert routes == ["172.29.66.0/24 dev eth0 proto kernel scope link src 172.29.66.11"]
    assert open("/proc/sys/net/ipv4/conf/bwlab0/forwarding").read().strip() == "0"


def test_lab_up_is_idempotent_and_recovers_from_kill_9(lab):
    from lab.machine import Machine

    before = {m.host.name: m.init_pid() for m in lab.machines()}
    lab.up()
    assert {m.host.name: m.init_pid() for m in lab.machines()} == before, "a second lab up must not reboot hosts"

    for machine in lab.machines():
        for pid in machine.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 60
    while any(m.pids() for m in lab.machines()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(isinstance(m, Machine) and m.is_running() for m in lab.machines())
    summary = lab.up()
    assert set(summary["hosts"]) == set(MACHINES)
    assert all(row["state"] == "running" and row["ssh"] for row in lab.status_dicts())


def test_status_json_lists_every_host():
    result = bouwsteen("lab", "status", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == MACHINES
    assert all({"name", "address", "state"} <= set(r) for r in rows)


def test_check_hosts_through_prefect(registered, prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.check_hosts import check_hosts

    state = check_hosts(cluster="lab", return_state=True)
    assert state.is_completed(), state.message
    rows = state.result()
    assert sorted(r["host"] for r in rows) == sorted(HOSTS)
    assert all(r["reachable"] and r["hostname"] == r["host"] for r in rows)
    # pg3 is reached as the non-root login, every command through sudo; the others as root.
    logins = {r["host"]: (r["ssh_user"], r["sudo"]) for r in rows}
    assert logins == {h: (("bouwsteen", True) if h == "pg3" else ("root", False)) for h in HOSTS}, logins
    with get_client(sync_client=True) as client:
        run_id = state.state_details.flow_run_id
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    tables = {a.key: a for a in artifacts if a.type == "table"}
    assert len(json.loads(tables["check-hosts-lab"].data)) == 8
    # TLS is on in the lab: every certificate a host should have is listed, dated once installed.
    certificates = json.loads(tables["certificates-lab"].data)
    assert {r["host"] for r in certificates} == {"pg1", "pg2", "pg3", "router1", "router2"}


def test_changed_or_unknown_host_key_is_refused(lab):
    from tasks.adapters.commands import cmd
    from tasks.adapters.remote import HostKeyRejected, RemoteHost, SshAuth, SshTarget

    key = lab.paths.ssh_key.read_text()
    lines = lab.paths.known_hosts.read_text().splitlines()
    pg1_names = lines[0].split(" ", 1)[0]
    pg2_key = lines[1].split(" ", 1)[1]
    swapped = SshAuth(private_key=key, known_hosts=f"{pg1_names} {pg2_key}\n")
    with pytest.raises(HostKeyRejected, match="CHANGED"):
        RemoteHost(SshTarget("pg1", "172.29.66.11"), swapped).run(cmd("true"))
    unknown = SshAuth(private_key=key, known_hosts="\n".join(lines[1:]) + "\n")
    with pytest.raises(HostKeyRejected, match="not in known_hosts"):
        RemoteHost(SshTarget("pg1", "172.29.66.11"), unknown).run(cmd("true"))


def test_pg3_takes_the_flows_key_only_as_the_non_root_user(lab):
    from tasks.adapters.commands import ManagedFile, cmd
    from tasks.adapters.remote import LoginRefused, RemoteHost, SshAuth, SshTarget

    auth = SshAuth(private_key=lab.paths.ssh_key.read_text(), known_hosts=lab.paths.known_hosts.read_text())
    with pytest.raises(LoginRefused, match="refused the SSH key for user root"):
        RemoteHost(SshTarget("pg3", "172.29.66.13", user="root"), auth).run(cmd("true"))
    with RemoteHost(SshTarget("pg1", "172.29.66.11", user="root"), auth) as remote:
        assert remote.run(cmd("id", "-un")).stdout.strip() == "root"
    probe = "/etc/bouwsteen-lab-login-probe"
    with RemoteHost(SshTarget("pg3", "172.29.66.13", user="bouwsteen"), auth) as remote:
        assert remote.run(cmd("id", "-un"), as_login_user=True).stdout.strip() == "bouwsteen"
        assert remote.run(cmd("id", "-un")).stdout.strip() == "root"  # through sudo -n
        # An upload as the plain user: staged in its own folder over SFTP, installed by root.
        spec = ManagedFile(probe, "uploaded as bouwsteen\n", owner="postgres", mode=0o640)
        assert remote.ensure_file(spec) is True
        assert remote.file_state(probe) == (spec.sha256, "postgres:postgres", 0o640)
        assert remote.ensure_file(spec) is False
        assert remote.remove_file(probe)
    facts = lab_ssh(lab, "pg3", "stat -c '%U %a' /home/bouwsteen /home/bouwsteen/.bouwsteen-staging; "
                                "ls -A /home/bouwsteen/.bouwsteen-staging | wc -l; "
                                "stat -c '%U:%G %a' /etc/sudoers.d/bouwsteen; visudo -c >/dev/null && echo sudoers-ok; "
                                "cat /root/.ssh/authorized_keys").stdout.splitlines()
    assert facts[:5] == ["bouwsteen 700", "bouwsteen 700", "0", "root:root 440", "sudoers-ok"], facts
    flows_key = " ".join(Path(f"{lab.paths.ssh_key}.pub").read_text().split()[:2])
    assert not any(flows_key in line for line in facts[5:]), "the flows' key must not be a root key on pg3"


def test_malformed_inventory_is_refused_before_any_host_is_touched(lab, registered, tmp_path):
    import yaml

    document = yaml.safe_load(lab.paths.inventory.read_text())
    document["hosts"][3]["name"] = "pg1"
    bad = tmp_path / "inventory.yaml"
    bad.write_text(yaml.safe_dump(document))
    before = lab_ssh(lab, "pg1", "journalctl -u ssh --no-pager -o cat | grep -c Accepted || true").stdout
    result = bouwsteen("run", "check_hosts", "--inventory", str(bad))
    assert result.returncode == 2
    assert str(bad) in result.stderr and "hosts[3].name" in result.stderr and "duplicate host 'pg1'" in result.stderr
    after = lab_ssh(lab, "pg1", "journalctl -u ssh --no-pager -o cat | grep -c Accepted || true").stdout
    # Exactly one new login: this test's own before/after probe, none from the refused run.
    assert int(after) == int(before) + 1


def test_stop_start_isolate_heal(lab):
    lab.stop("restore1")
    assert next(r for r in lab.status_dicts() if r["name"] == "restore1")["state"] == "stopped"
    assert not lab_ssh(lab, "pg1", "ping -c1 -W1 172.29.66.41 >/dev/null && echo up || echo down").stdout.strip() == "up"
    lab.start("restore1")
    assert lab_ssh(lab, "restore1", "hostname").stdout.strip() == "restore1"
    lab.isolate("restore1")
    assert lab_ssh(lab, "pg1", "ping -c1 -W1 172.29.66.41 >/dev/null && echo up || echo down").stdout.strip() == "down"
    lab.heal("restore1")
    assert lab_ssh(lab, "pg1", "ping -c1 -W2 172.29.66.41 >/dev/null && echo up || echo down").stdout.strip() == "up"
