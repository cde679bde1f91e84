"""Prefect blocks: where a cluster's inventory and credentials live on the Prefect server.

Every block document is named after the cluster. Secrets are `SecretStr` fields: Prefect stores
them encrypted and shows them masked in the UI and API.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from prefect.blocks.core import Block
from pydantic import AfterValidator, Field, SecretStr, field_validator, model_validator

from blocks.inventory import UNIX_USER, Inventory

# A PostgreSQL role name written unquoted in pg_hba.conf, .pgpass, Patroni/stolon configs and SQL.
ROLE_NAME = r"^[a-z_][a-z0-9_]{0,62}$"
# Access keys as the object store servers accept them (tasks/adapters/objectstore_server._KEY_SAFE).
ACCESS_KEY = r"^[A-Za-z0-9_.~+/=-]{3,128}$"
_ONE_LINE = re.compile(r"[^\x00-\x1f\x7f]+")
_TEXT = re.compile(r"[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*")  # lines: \n and \r allowed, no other control
_VRRP = re.compile(r"[A-Za-z0-9]{1,8}")


def _one_line_secret(value: SecretStr) -> SecretStr:
    # Never echo the value.
    if not _ONE_LINE.fullmatch(value.get_secret_value()):
        raise ValueError("is empty or holds a newline or another control character")
    return value


def _text(value: str) -> str:
    if not _TEXT.fullmatch(value):
        raise ValueError("holds a control character other than a line break")
    return value


def _text_secret(value: SecretStr) -> SecretStr:
    if not _TEXT.fullmatch(value.get_secret_value()):
        raise ValueError("holds a control character other than a line break")
    return value


def _pem(value: str) -> str:
    _text(value)
    if "-----BEGIN " not in value:
        raise ValueError("is not PEM (no '-----BEGIN ' line)")
    return value


def _vrrp(value: SecretStr) -> SecretStr:
    if not _VRRP.fullmatch(value.get_secret_value()):
        raise ValueError("must be 1-8 letters or digits (keepalived's PASS authentication)")
    return value


# Secret fields keep their plain `SecretStr` annotation (Prefect finds secret fields by it, an
# Annotated wrapper inside `| None` hides them); their checks are field validators below.
Text = Annotated[str, AfterValidator(_text)]
Pem = Annotated[str, AfterValidator(_pem)]
RoleName = Annotated[str, Field(pattern=ROLE_NAME)]


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

    user: str = Field(default="root", pattern=UNIX_USER)
    private_key: SecretStr = Field(description="OpenSSH private key (ed25519, ecdsa or rsa)")
    known_hosts: Text = Field(description="known_hosts lines for every host; unknown or changed keys are refused")

    _private_key_text = field_validator("private_key")(_text_secret)


class DatabaseCredentials(Block):
    """PostgreSQL roles the building block creates (scram-sha-256)."""

    _block_type_name = "Bouwsteen Database Credentials"
    _block_type_slug = "bouwsteen-database-credentials"

    superuser: RoleName = "postgres"
    superuser_password: SecretStr
    replication_user: RoleName = "replicator"
    replication_password: SecretStr
    application_user: RoleName = "app"
    application_password: SecretStr
    monitor_user: RoleName = Field(default="pgroute66", description="read-only role the primary detector logs in with")
    monitor_password: SecretStr | None = None
    rest_api_password: SecretStr | None = Field(default=None, description="Patroni REST API (user 'patroni')")
    job_user: RoleName = Field(default="bouwsteen_job", description="the login role TAB jobs' SQL steps run as "
                                                                    "(no superuser; see cluster.jobs.member_of)")
    job_password: SecretStr | None = Field(default=None, description="the job role's password; `bouwsteen blocks "
                                                                     "register` generates one if the secrets have none")

    @field_validator("superuser_password", "replication_password", "application_password", "monitor_password",
                     "rest_api_password", "job_password")
    @classmethod
    def _one_line(cls, value: SecretStr | None) -> SecretStr | None:
        return None if value is None else _one_line_secret(value)

    @model_validator(mode="after")
    def _job_user_is_its_own(self) -> "DatabaseCredentials":
        # The job role is created NOSUPERUSER and converged to exactly its memberships: it must
        # never be a role the cluster needs with other attributes.
        others = {"superuser": self.superuser, "replication_user": self.replication_user,
                  "application_user": self.application_user, "monitor_user": self.monitor_user}
        for field, name in others.items():
            if self.job_user == name:
                raise ValueError(f"job_user: {name!r} is already the {field}; the job role needs a name of its own")
        return self


class ObjectStoreCredentials(Block):
    """The backup server's S3 endpoint: per-cluster access key, TLS material."""

    _block_type_name = "Bouwsteen Object Store Credentials"
    _block_type_slug = "bouwsteen-object-store-credentials"

    access_key_id: str = Field(pattern=ACCESS_KEY)
    secret_access_key: SecretStr
    admin_access_key_id: str = Field(pattern=ACCESS_KEY, description="used only by the backup server rollout to create buckets")
    admin_secret_access_key: SecretStr
    ca_certificate: Pem = Field(description="PEM of the CA that signed the object store's certificate")
    server_certificate: Pem = Field(description="PEM certificate chain the object store presents")
    server_private_key: SecretStr
    repository_cipher_pass: SecretStr | None = Field(
        default=None, description="encrypts the backup repository (pgBackRest repo1-cipher-pass)"
    )
    restore_access_key_id: str | None = Field(
        default=None, pattern=ACCESS_KEY,
        description="the restore host's own key: read-only on the cluster's prefix where the server has per-key "
                    "policies (MinIO); unset: the restore host uses access_key_id",
    )
    restore_secret_access_key: SecretStr | None = None

    @field_validator("secret_access_key", "admin_secret_access_key", "repository_cipher_pass",
                     "restore_secret_access_key")
    @classmethod
    def _one_line(cls, value: SecretStr | None) -> SecretStr | None:
        return None if value is None else _one_line_secret(value)

    @model_validator(mode="after")
    def _restore_key(self) -> "ObjectStoreCredentials":
        if (self.restore_access_key_id is None) != (self.restore_secret_access_key is None):
            raise ValueError("restore_access_key_id and restore_secret_access_key: give both or neither")
        if self.restore_access_key_id in (self.access_key_id, self.admin_access_key_id):
            raise ValueError("restore_access_key_id: must be a key of its own (not the cluster's or the admin's)")
        return self

    _private_key_text = field_validator("server_private_key")(_text_secret)


class RoutingCredentials(Block):
    """Secrets of the routing cluster (keepalived VRRP authentication)."""

    _block_type_name = "Bouwsteen Routing Credentials"
    _block_type_slug = "bouwsteen-routing-credentials"

    vrrp_password: SecretStr = Field(description="VRRP PASS authentication, 1-8 letters or digits")

    _vrrp_pass = field_validator("vrrp_password")(_vrrp)


class CertificateAuthority(Block):
    """The cluster's issuing CA from the site's PKI: every certificate of the cluster is issued
    from it (`tasks/adapters/pki.py`). During a CA roll-over the old CA stays in `also_trusted`."""

    _block_type_name = "Bouwsteen Certificate Authority"
    _block_type_slug = "bouwsteen-certificate-authority"

    certificate: Pem = Field(description="PEM certificate of the issuing CA (EC P-256/P-384 key, CA:TRUE)")
    private_key: SecretStr = Field(description="PEM private key of the issuing CA (unencrypted PKCS#8 or SEC1)")
    also_trusted: str = Field(default="", description="PEM certificates still trusted beside it (a CA roll-over)")

    _private_key_text = field_validator("private_key")(_text_secret)

    @field_validator("also_trusted")
    @classmethod
    def _pem_or_empty(cls, value: str) -> str:
        return value if not value.strip() else _pem(value)


ALL_BLOCKS: tuple[type[Block], ...] = (
    ClusterInventory, SshCredentials, DatabaseCredentials, ObjectStoreCredentials, RoutingCredentials,
    CertificateAuthority,
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
