"""Register a cluster's blocks on the Prefect server: one command, idempotent."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from secrets import token_urlsafe

from pydantic import SecretStr

from blocks.inventory import Inventory, InventoryError, load_inventory
from blocks.prefect_blocks import (
    ALL_BLOCKS,
    CertificateAuthority,
    ClusterInventory,
    DatabaseCredentials,
    ObjectStoreCredentials,
    RoutingCredentials,
    SshCredentials,
)
from tasks.adapters.pki import ClusterCA


@dataclass(frozen=True)
class ClusterFiles:
    """Where a cluster's inventory and secrets come from on the controller (root-only files)."""

    inventory: Path
    ssh_key: Path
    known_hosts: Path
    secrets: Path  # JSON: superuser_password, replication_password, application_password, s3_* (s3_restore_* optional) …
    ca_certificate: Path | None = None
    store_certificate: Path | None = None
    store_private_key: Path | None = None
    # The cluster's issuing CA (cluster.tls): its certificate is `ca_certificate`.
    ca_private_key: Path | None = None
    # CA certificates trusted beside it during a roll-over (README: three runs of rotate_certificates).
    ca_also_trusted: Path | None = None

    @classmethod
    def for_lab(cls, lab_dir: Path, cluster: str | None = None) -> "ClusterFiles":
        """The lab's main cluster, or (`cluster`) another lab cluster: inventory and secrets of its
        own, the lab's keys, known hosts and CA."""
        own = lab_dir / cluster if cluster else lab_dir
        return cls(
            inventory=own / "inventory.yaml",
            ssh_key=lab_dir / "id_ed25519",
            known_hosts=lab_dir / "known_hosts",
            secrets=own / "secrets.json",
            ca_certificate=lab_dir / "pki" / "ca.crt",
            store_certificate=lab_dir / "pki" / "backup1.crt",
            store_private_key=lab_dir / "pki" / "backup1.key",
            ca_private_key=lab_dir / "pki" / "ca.key",
        )


def register_block_types() -> None:
    for block_class in ALL_BLOCKS:
        block_class.register_type_and_schema()


def save_inventory(inventory: Inventory) -> None:
    ClusterInventory(inventory=inventory).save(inventory.cluster.name, overwrite=True)


def _check_store_credentials(files: ClusterFiles, inventory: Inventory, secrets: dict) -> None:
    """The object-store server's own credential rules (MinIO: key lengths, no `=`/`,` in a
    user's key), checked before anything is saved rather than discovered on the server."""
    from tasks.adapters.objectstore_server import (
        ObjectStoreSpecError,
        ServerSecrets,
        server_for,
    )

    store = inventory.cluster.object_store
    assert store is not None
    try:
        server_for(store.server).validate_credentials(ServerSecrets(
            admin_access_key_id=secrets["s3_admin_access_key_id"],
            admin_secret_access_key=secrets["s3_admin_secret_access_key"],
            cluster_access_key_id=secrets["s3_access_key_id"],
            cluster_secret_access_key=secrets["s3_secret_access_key"],
            certificate_pem="", private_key_pem="",
            restore_access_key_id=secrets.get("s3_restore_access_key_id"),
            restore_secret_access_key=secrets.get("s3_restore_secret_access_key"),
        ))
    except ObjectStoreSpecError as exc:
        raise InventoryError(f"{files.secrets}: {exc}") from None


def _job_password(cluster: str, secrets: dict) -> SecretStr:
    """The TAB job role's password: the secrets file's `job_password`, else the one the block
    already holds, else a new random one. Only bouwsteen logs in as that role, so nobody needs to
    know it; `tab_job` sets it on the role (as a SCRAM verifier) before the job's SQL runs."""
    if secrets.get("job_password"):
        return SecretStr(secrets["job_password"])
    try:
        stored = DatabaseCredentials.load(cluster, validate=True)
    except ValueError as exc:
        if "Unable to find block document" not in str(exc):
            raise
        stored = None
    if stored is not None and stored.job_password is not None:
        return stored.job_password
    return SecretStr(token_urlsafe(24))


def register_cluster(files: ClusterFiles) -> Inventory:
    """Validate everything first (nothing is saved if any file is bad), then save every block."""
    inventory = load_inventory(files.inventory)
    secrets = json.loads(files.secrets.read_text())
    ssh_user = inventory.ssh.user
    blocks = [
        ClusterInventory(inventory=inventory),
        SshCredentials(
            user=ssh_user,
            private_key=SecretStr(files.ssh_key.read_text()),
            known_hosts=files.known_hosts.read_text(),
        ),
        DatabaseCredentials(
            superuser_password=SecretStr(secrets["superuser_password"]),
            replication_password=SecretStr(secrets["replication_password"]),
            application_password=SecretStr(secrets["application_password"]),
            monitor_password=SecretStr(secrets["monitor_password"]) if secrets.get("monitor_password") else None,
            rest_api_password=SecretStr(secrets["rest_api_password"]) if secrets.get("rest_api_password") else None,
            job_password=_job_password(inventory.cluster.name, secrets),
        ),
    ]
    if inventory.cluster.object_store is not None and files.ca_certificate and files.store_certificate:
        _check_store_credentials(files, inventory, secrets)
        blocks.append(
            ObjectStoreCredentials(
                access_key_id=secrets["s3_access_key_id"],
                secret_access_key=SecretStr(secrets["s3_secret_access_key"]),
                admin_access_key_id=secrets["s3_admin_access_key_id"],
                admin_secret_access_key=SecretStr(secrets["s3_admin_secret_access_key"]),
                ca_certificate=files.ca_certificate.read_text(),
                server_certificate=files.store_certificate.read_text(),
                server_private_key=SecretStr(files.store_private_key.read_text()),
                repository_cipher_pass=SecretStr(secrets["pgbackrest_cipher_pass"]) if secrets.get("pgbackrest_cipher_pass") else None,
                restore_access_key_id=secrets.get("s3_restore_access_key_id"),
                restore_secret_access_key=(SecretStr(secrets["s3_restore_secret_access_key"])
                                           if secrets.get("s3_restore_secret_access_key") else None),
            )
        )
    if inventory.cluster.tls.enabled:
        if not (files.ca_certificate and files.ca_private_key):
            raise ValueError(f"{files.inventory}: cluster.tls.enabled needs the cluster's issuing CA "
                             "(its certificate and private key files)")
        authority = CertificateAuthority(certificate=files.ca_certificate.read_text(),
                                         private_key=SecretStr(files.ca_private_key.read_text()),
                                         also_trusted=files.ca_also_trusted.read_text() if files.ca_also_trusted else "")
        # Refused here, before any block is saved, rather than by the first flow.
        ClusterCA(authority.certificate, authority.private_key.get_secret_value(), authority.also_trusted)
        blocks.append(authority)
    if inventory.cluster.routing is not None and secrets.get("vrrp_password"):
        blocks.append(RoutingCredentials(vrrp_password=SecretStr(secrets["vrrp_password"])))
    register_block_types()
    for block in blocks:
        block.save(inventory.cluster.name, overwrite=True)
    return inventory
