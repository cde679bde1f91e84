"""The lab as a whole: `up`, `down`, `status`, and power/network faults per host."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from lab import image as lab_image
from lab.machine import (
    LAB_CGROUP,
    LabError,
    Machine,
    cgroup_root,
    delete_bridge,
    ensure_bridge,
    run,
)
from lab.paths import LabPaths
from lab.pki import LabCA
from lab.topology import (
    BRIDGE,
    CLONE_CLUSTER_NAME,
    CLUSTER_NAME,
    CLUSTERS,
    CONTROLLER_ADDRESS,
    DEFAULT_HOSTS,
    DOMAIN,
    SUBNET,
    VIP,
    LabHost,
    cluster_hosts,
    host_by_name,
)

REQUIRED_TOOLS = ["ip", "nsenter", "unshare", "setpriv", "ssh", "ssh-keygen", "debootstrap", "chroot"]


@dataclass
class HostStatus:
    name: str
    address: str
    roles: list[str]
    state: str  # running | stopped | isolated | absent
    ssh: bool


class Lab:
    def __init__(self, paths: LabPaths | None = None, hosts: tuple[LabHost, ...] = DEFAULT_HOSTS, *,
                 tls: bool = True):
        self.paths = paths or LabPaths.default()
        self.hosts = hosts
        self.tls = tls  # False only for the benchmark's TLS-off baseline

    # ------------------------------------------------------------ helpers

    def machine(self, name: str, image: Path | None = None) -> Machine:
        return Machine(host_by_name(name), self.paths, image)

    def machines(self, image: Path | None = None) -> list[Machine]:
        return [Machine(h, self.paths, image) for h in self.hosts]

    @staticmethod
    def preflight() -> None:
        if os.geteuid() != 0:
            raise LabError("the lab needs root (namespaces, mounts, a bridge)")
        missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
        if missing:
            raise LabError(f"missing tools on the controller: {', '.join(missing)}")

    def _ensure_ssh_key(self, key: Path, comment: str) -> str:
        if not key.exists():
            key.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(key.parent, 0o700)
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)])
        return Path(f"{key}.pub").read_text()

    def ssh_argv(self, host: LabHost, *, connect_timeout: int = 5) -> list[str]:
        """root on `host` with the lab's own tooling key (`lab ssh`, the tests' helpers, waiting for
        boot). The flows never use it: they log in with the registered key, as the inventory's
        user, which on a host with `ssh_user` is that non-root user (root refuses their key)."""
        return [
            "ssh",
            "-i", str(self.paths.tool_key),
            "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={self.paths.known_hosts}",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes",
            "-o", f"ConnectTimeout={connect_timeout}",
            "-o", "LogLevel=ERROR",
            f"root@{host.address}",
        ]

    # ------------------------------------------------------------ up / down

    def up(self, *, pip: str | None = None, log=print) -> dict:
        self.preflight()
        started = time.monotonic()
        image = lab_image.build_image(self.paths, pip=pip)
        image_ready = time.monotonic()
        flows_key = self._ensure_ssh_key(self.paths.ssh_key, "bouwsteen-lab")
        tool_key = self._ensure_ssh_key(self.paths.tool_key, "bouwsteen-lab-tools")
        ensure_bridge()

        def bring_up(machine: Machine) -> None:
            machine.ensure_disk(flows_key, tool_key)
            machine.ensure_network()
            if not machine.is_isolated():
                machine.link_up(True)
            machine.boot()

        machines = self.machines(image)
        with ThreadPoolExecutor(max_workers=len(machines)) as pool:
            list(pool.map(bring_up, machines))
        self.write_known_hosts()
        with ThreadPoolExecutor(max_workers=len(machines)) as pool:
            list(pool.map(lambda m: m.wait_for_ssh(90), machines))
        states = self._wait_systemd(machines)
        self.write_secrets()
        self.write_pki()
        self.write_inventory()
        summary = {
            "image": str(image),
            "image_seconds": round(image_ready - started, 1),
            "boot_seconds": round(time.monotonic() - image_ready, 1),
            "hosts": states,
            "inventory": str(self.paths.inventory),
            "known_hosts": str(self.paths.known_hosts),
        }
        self.paths.state_file.write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def _wait_systemd(self, machines: list[Machine]) -> dict[str, str]:
        def wait(machine: Machine) -> tuple[str, str]:
            argv = self.ssh_argv(machine.host) + ["timeout 60 systemctl is-system-running --wait"]
            result = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
            return machine.host.name, (result.stdout.strip() or result.stderr.strip())

        with ThreadPoolExecutor(max_workers=len(machines)) as pool:
            return dict(pool.map(wait, machines))

    def down(self) -> None:
        self.preflight()

        def tear_down(machine: Machine) -> None:
            machine.poweroff(timeout=10)
            machine.delete_network()
            machine.wipe_disk()

        with ThreadPoolExecutor(max_workers=len(self.hosts)) as pool:
            list(pool.map(tear_down, self.machines()))
        self._remove_strays()
        delete_bridge()
        for path in (self.paths.inventory, self.paths.known_hosts, self.paths.state_file, self.paths.lab / "secrets.json"):
            path.unlink(missing_ok=True)
        shutil.rmtree(self.paths.lab / "pki", ignore_errors=True)
        shutil.rmtree(self.paths.cluster_dir(CLONE_CLUSTER_NAME), ignore_errors=True)

    def _remove_strays(self) -> None:
        """Leftovers that do not belong to a known host name (an older topology, a killed run)."""
        for netns in Path("/run/netns").glob("bwlab-*") if Path("/run/netns").exists() else []:
            run(["ip", "netns", "del", netns.name], check=False)
        for link in Path("/sys/class/net").iterdir():
            if link.name.startswith(("bwl-", "bwp-")):
                run(["ip", "link", "del", link.name], check=False)
        root = cgroup_root() / LAB_CGROUP
        if root.exists():
            for child in root.iterdir():
                if child.is_dir():
                    leftover = Machine(LabHost(child.name, VIP), self.paths)
                    leftover.kill_all()
            try:
                root.rmdir()
            except OSError:
                pass
        if self.paths.hosts.exists():
            for stale in self.paths.hosts.iterdir():
                if str(stale) in Path("/proc/self/mounts").read_text():
                    run(["umount", "-R", "-l", str(stale / "merged")], check=False)
                shutil.rmtree(stale, ignore_errors=True)

    # ------------------------------------------------------------ status

    def status(self) -> list[HostStatus]:
        result = []
        for machine in self.machines():
            running = machine.is_running()
            isolated = machine.is_isolated()
            if running and isolated:
                state = "isolated"
            elif running:
                state = "running"
            elif machine.dir.exists():
                state = "stopped"
            else:
                state = "absent"
            result.append(
                HostStatus(
                    name=machine.host.name,
                    address=str(machine.host.address),
                    roles=list(machine.host.roles),
                    state=state,
                    ssh=running and not isolated and _port_open(str(machine.host.address), 22),
                )
            )
        return result

    def status_dicts(self) -> list[dict]:
        return [asdict(s) for s in self.status()]

    # ------------------------------------------------------------ faults

    def stop(self, name: str) -> None:
        """Power off: systemd goes down and the address stops answering (packets are dropped)."""
        machine = self.machine(name)
        machine.poweroff()
        machine.link_up(False)

    def kill(self, name: str) -> None:
        """Pull the plug: no orderly shutdown, the address goes silent at once."""
        machine = self.machine(name)
        machine.link_up(False)
        machine.kill_all()

    def start(self, name: str) -> None:
        image = lab_image.build_image(self.paths)
        machine = self.machine(name, image)
        machine.ensure_network()
        machine.link_up(True)
        machine.boot()
        machine.wait_for_ssh(60)
        self._wait_systemd([machine])

    def isolate(self, name: str) -> None:
        machine = self.machine(name)
        if not machine.is_running():
            raise LabError(f"{name} is not running")
        machine.link_up(False)

    def heal(self, name: str) -> None:
        self.machine(name).link_up(True)

    # ------------------------------------------------------------ files for the controller

    def write_known_hosts(self) -> None:
        lines = []
        for machine in self.machines():
            host = machine.host
            lines.append(f"{host.name},{host.fqdn},{host.address} {machine.host_public_key()}")
        path = self.paths.known_hosts
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o644)

    def secrets_path(self, cluster: str = CLUSTER_NAME) -> Path:
        if cluster == CLUSTER_NAME:
            return self.paths.lab / "secrets.json"
        return self.paths.cluster_dir(cluster) / "secrets.json"

    def inventory_path(self, cluster: str = CLUSTER_NAME) -> Path:
        if cluster == CLUSTER_NAME:
            return self.paths.inventory
        return self.paths.cluster_dir(cluster) / "inventory.yaml"

    def write_secrets(self) -> dict:
        """Per-lab passwords and keys, generated once; root-only on the controller. The clone's
        target cluster has database passwords and a repository cipher of its own; it reaches the
        shared object store with the same keys (rclone serve s3 has one set of keys for all)."""
        values = self._write_secrets(self.secrets_path(), self._new_secrets())
        own = {k: v for k, v in self._new_secrets().items() if not k.startswith("s3_") and k != "vrrp_password"}
        shared = {k: v for k, v in values.items() if k.startswith("s3_")}
        directory = self.paths.cluster_dir(CLONE_CLUSTER_NAME)
        directory.mkdir(mode=0o700, exist_ok=True)
        self._write_secrets(self.secrets_path(CLONE_CLUSTER_NAME), {**own, **shared})
        return values

    @staticmethod
    def _write_secrets(path: Path, values: dict) -> dict:
        existing = json.loads(path.read_text()) if path.exists() else {}
        if existing and set(values) <= set(existing):
            return existing
        values.update(existing)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(values, fh, indent=2)
        return values

    @staticmethod
    def _new_secrets() -> dict:
        return {
            "superuser_password": secrets.token_urlsafe(18),
            "replication_password": secrets.token_urlsafe(18),
            "application_password": secrets.token_urlsafe(18),
            "s3_access_key_id": "lab" + secrets.token_hex(6),
            "s3_secret_access_key": secrets.token_urlsafe(24),
            "s3_admin_access_key_id": "admin" + secrets.token_hex(6),
            "s3_admin_secret_access_key": secrets.token_urlsafe(24),
            # The restore host's own key (read-only on MinIO; rclone serves it with full access).
            "s3_restore_access_key_id": "restore" + secrets.token_hex(6),
            "s3_restore_secret_access_key": secrets.token_urlsafe(24),
            "vrrp_password": secrets.token_hex(4),
            "pgbackrest_cipher_pass": secrets.token_urlsafe(24),
            "monitor_password": secrets.token_urlsafe(18),
            "rest_api_password": secrets.token_urlsafe(18),
        }

    @property
    def ca(self) -> "LabCA":
        return LabCA(self.paths.lab / "pki")

    def write_pki(self) -> None:
        """The lab CA and the object store's certificate (site PKI in production)."""
        store = host_by_name("backup1")
        self.ca.ensure_server_files("backup1", store.fqdn, [store.fqdn, store.name], [str(store.address)])

    def inventory_document(self, cluster: str = CLUSTER_NAME) -> dict:
        if cluster == CLONE_CLUSTER_NAME:
            return self._clone_inventory_document()
        return {
            "cluster": {
                "name": CLUSTER_NAME,
                "network": str(SUBNET),
                "postgres": {"version": 15, "port": 5432},
                "ha_manager": "patroni",
                "backup_tool": "pgbackrest",
                "object_store": {
                    "host": "backup1",
                    "endpoint": f"https://backup1.{DOMAIN}:9000",
                    "bucket": "bouwsteen",
                    "server": "rclone",
                },
                "routing": {"vip": str(VIP)},
                "admin_networks": [f"{CONTROLLER_ADDRESS}/32"],
                # Certificates from the lab's CA, registered as the cluster's issuing CA.
                "tls": {"enabled": self.tls},
            },
            "ssh": {
                "user": "root",
                "port": 22,
                "key_file": str(self.paths.ssh_key),
                "known_hosts_file": str(self.paths.known_hosts),
            },
            "hosts": [
                {"name": h.name, "address": str(h.address), "roles": list(h.roles),
                 **({"ssh_user": h.ssh_user} if h.ssh_user else {})}
                for h in cluster_hosts(CLUSTER_NAME, self.hosts)
            ],
        }

    def _clone_inventory_document(self) -> dict:
        """The acceptance cluster clone_cluster restores the lab cluster into: three hosts of its
        own (etcd on them too), the shared backup server, no routing and no restore host."""
        main = self.inventory_document()
        cluster = {k: v for k, v in main["cluster"].items() if k not in ("routing",)}
        return {
            "cluster": {**cluster, "name": CLONE_CLUSTER_NAME},
            "ssh": main["ssh"],
            "hosts": [
                {"name": h.name, "address": str(h.address), "roles": list(h.roles),
                 **({"ssh_user": h.ssh_user} if h.ssh_user else {})}
                for h in cluster_hosts(CLONE_CLUSTER_NAME, self.hosts)
            ],
        }

    def write_inventory(self) -> None:
        header = (
            "# Written by `bouwsteen lab up` for the lab's isolated bridge "
            f"{BRIDGE} ({SUBNET}).\n# For real hosts, write your own file of this shape.\n"
        )
        for cluster in CLUSTERS:
            path = self.inventory_path(cluster)
            path.parent.mkdir(mode=0o700, exist_ok=True)
            path.write_text(header + yaml.safe_dump(self.inventory_document(cluster), sort_keys=False))


def _port_open(address: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False
