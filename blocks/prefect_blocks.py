"""Prefect blocks: where a cluster's inventory and credentials live on the Prefect server.

Every block document is named after the cluster. Secrets are `SecretStr` fields: Prefect stores
them encrypted and shows them masked in the UI and API.
"""

from __future__ import annotations

from typing import Any

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from blocks.inventory import Inventory


class ClusterInventory(Block):
    """Hosts, roles, versions and endpoints of one PostgreSQL building block."""

    _block_type_name = "Bouwsteen Cluster Inventory"
    _block_type_slug = "bouwsteen-cluster-inventory"
    _description = "Hosts, roles, versions and endpoints of one HA PostgreSQL cluster."

    inventory: Inventory


class SshCredentials(Block):
    """How the controller logs in to the cluster's hosts; host keys are always verified."""

    _block_type_name = "Bouwsteen SSH Credentials"
    _block_type_slug = "bouwsteen-ssh-credentials"

    user: str = "root"
    private_key: SecretStr = Field(description="OpenSSH private key (ed25519, ecdsa or rsa)")
    known_hosts: str = Field(description="known_hosts lines for every host; unknown or changed keys are refused")


class DatabaseCredentials(Block):
    """PostgreSQL roles the building block creates (scram-sha-256)."""

    _block_type_name = "Bouwsteen Database Credentials"
    _block_type_slug = "bouwsteen-database-credentials"

    superuser: str = "postgres"
    superuser_password: SecretStr
    replication_user: str = "replicator"
    replication_password: SecretStr
    application_user: str = "app"
    application_password: SecretStr
    monitor_user: str = Field(default="pgroute66", description="read-only role the primary detector logs in with")
    monitor_password: SecretStr | None = None
    rest_api_password: SecretStr | None = Field(default=None, description="Patroni REST API (user 'patroni')")


class ObjectStoreCredentials(Block):
    """The backup server's S3 endpoint: per-cluster access key, TLS material."""

    _block_type_name = "Bouwsteen Object Store Credentials"
    _block_type_slug = "bouwsteen-object-store-credentials"

    access_key_id: str
    secret_access_key: SecretStr
    admin_access_key_id: str = Field(description="used only by the backup server rollout to create buckets")
    admin_secret_access_key: SecretStr
    ca_certificate: str = Field(description="PEM of the CA that signed the object store's certificate")
    server_certificate: str = Field(description="PEM certificate chain the object store presents")
    server_private_key: SecretStr
    repository_cipher_pass: SecretStr | None = Field(
        default=None, description="encrypts the backup repository (pgBackRest repo1-cipher-pass)"
    )


class RoutingCredentials(Block):
    """Secrets of the routing cluster (keepalived VRRP authentication)."""

    _block_type_name = "Bouwsteen Routing Credentials"
    _block_type_slug = "bouwsteen-routing-credentials"

    vrrp_password: SecretStr = Field(description="VRRP PASS authentication, 1-8 letters or digits")


ALL_BLOCKS: tuple[type[Block], ...] = (
    ClusterInventory, SshCredentials, DatabaseCredentials, ObjectStoreCredentials, RoutingCredentials,
)


def secret_values(*blocks: Any) -> list[str]:
    """Every secret value in the given blocks, for masking logs and checking artifacts."""
    values: list[str] = []
    for block in blocks:
        if block is None:
            continue
        for name in type(block).model_fields:
            value = getattr(block, name)
            if isinstance(value, SecretStr):
                values.append(value.get_secret_value())
    return values
