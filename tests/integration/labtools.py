"""Helpers for integration tests: the lab's SSH, the CLI, and hashing a host's state."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

STATE_FILES = [
    "/etc/bouwsteen/cluster.json", "/etc/default/etcd", "/etc/patroni/config.yml",
    "/etc/pgbackrest/pgbackrest.conf", "/etc/haproxy/haproxy.cfg", "/etc/keepalived/keepalived.conf",
]


# The lab's etcd wants TLS and a client certificate: a database host's etcd client pair.
ETCDCTL = ("ETCDCTL_API=3 etcdctl --endpoints=https://127.0.0.1:2379 --cacert=/var/lib/postgresql/tls/ca.crt "
           "--cert=/var/lib/postgresql/tls/etcd-client.crt --key=/var/lib/postgresql/tls/etcd-client.key")


def lab_ssh(lab, host: str, command: str, check: bool = True) -> subprocess.CompletedProcess:
    from lab.topology import host_by_name

    result = subprocess.run(lab.ssh_argv(host_by_name(host)) + [command], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"{host}: {command!r} failed ({result.returncode}): {result.stderr}")
    return result


def etcd_leader(lab, via: str = "pg1") -> str:
    """The lab host whose etcd member is raft leader, as etcd itself reports it."""
    import json

    from lab.topology import DEFAULT_HOSTS

    rows = json.loads(lab_ssh(lab, via, f"{ETCDCTL} endpoint status --cluster -w json").stdout)
    leaders = {row["Endpoint"] for row in rows if row["Status"]["header"]["member_id"] == row["Status"]["leader"]}
    names = [h.name for h in DEFAULT_HOSTS for endpoint in leaders if f"//{h.address}:" in endpoint]
    assert len(names) == 1, f"etcd leaders: {leaders}"
    return names[0]


def bouwsteen(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """The CLI as a DBA runs it, against the test Prefect server."""
    return subprocess.run([str(Path(sys.executable).with_name("bouwsteen")), *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ}, cwd=REPO)


def host_state_digest(lab, host: str, data_dir: str = "/var/lib/postgresql/15/main") -> str:
    """Hash of the managed config files and the data directory listing: 'nothing changed' proof."""
    files = " ".join(STATE_FILES)
    command = (
        f"for f in {files}; do if [ -e $f ]; then sha256sum $f; stat -c '%U:%G %a' $f; else echo absent $f; fi; done; "
        f"ls -la --time-style=+%s {data_dir} 2>/dev/null | grep -v ' postmaster' | awk '{{print $1, $3, $4, $NF}}'; "
        "systemctl show -p MainPID etcd patroni haproxy keepalived 2>/dev/null"
    )
    return lab_ssh(lab, host, command).stdout


def cluster_state_digest(lab, hosts=("pg1", "pg2", "pg3", "pg4")) -> dict[str, str]:
    return {h: host_state_digest(lab, h) for h in hosts}


def refused(state, *needles: str) -> None:
    """A flow run refused: failed, and its exception's whole text names every needle."""
    assert state.is_failed(), "expected a refusal"
    message = state.message or ""
    try:
        state.result()
    except Exception as exc:  # the flow's own exception carries the whole text
        message = str(exc)
    for needle in needles:
        assert needle in message, message
