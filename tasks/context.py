"""Load a cluster's inventory and credentials from Prefect blocks, inside a task.

Tasks receive only the cluster name and plain values; secrets are loaded here, where they are
used, so they never travel as task or flow parameters (which Prefect stores and shows).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

from blocks.inventory import HostSpec, Inventory
from blocks.prefect_blocks import (
    CertificateAuthority,
    ClusterInventory,
    DatabaseCredentials,
    ObjectStoreCredentials,
    RoutingCredentials,
    SshCredentials,
    secret_values,
)
from tasks.adapters import etcd_config, pki
from tasks.adapters.backup.base import StoreSecrets
from tasks.adapters.client_tls import ClientTls, controller_tls_files
from tasks.adapters.etcd import Etcd
from tasks.adapters.ha.base import DbSecrets
from tasks.adapters.objectstore_server import ServerSecrets
from tasks.adapters.pki import ClusterCA
from tasks.adapters.postgres import PgEndpoint
from tasks.adapters.remote import Masker, RemoteHost, SshAuth, SshTarget
from tasks.adapters.routing.config import RoutingSecrets


@dataclass(frozen=True)
class ClusterContext:
    inventory: Inventory
    ssh_user: str
    ssh_auth: SshAuth
    db_blocks: DatabaseCredentials | None
    store_block: ObjectStoreCredentials | None
    masker: Masker
    routing_block: RoutingCredentials | None = None
    ca_block: CertificateAuthority | None = None

    @property
    def name(self) -> str:
        return self.inventory.cluster.name

    def target(self, host: HostSpec) -> SshTarget:
        return SshTarget(
            host=host.name,
            address=str(host.address),
            port=host.ssh_port or self.inventory.ssh.port,
            user=host.ssh_user or self.ssh_user,
        )

    def remote(self, host: str | HostSpec) -> RemoteHost:
        spec = self.inventory.host(host) if isinstance(host, str) else host
        return RemoteHost(self.target(spec), self.ssh_auth, self.masker)

    @property
    def db_secrets(self) -> DbSecrets:
        if self.db_blocks is None:
            raise LookupError(f"no database-credentials block named {self.name!r}; run `bouwsteen blocks register`")
        b = self.db_blocks
        return DbSecrets(
            superuser=b.superuser,
            superuser_password=b.superuser_password.get_secret_value(),
            replication_user=b.replication_user,
            replication_password=b.replication_password.get_secret_value(),
            rest_api_password=b.rest_api_password.get_secret_value() if b.rest_api_password else None,
            application_user=b.application_user,
            monitor_user=b.monitor_user,
        )

    @property
    def cluster_ca(self) -> ClusterCA | None:
        """The cluster's issuing CA when TLS is on; LookupError naming the block when it is missing."""
        if not self.inventory.cluster.tls.enabled:
            return None
        if self.ca_block is None:
            raise LookupError(f"cluster.tls.enabled, but no certificate-authority block named {self.name!r}; "
                              "register the cluster's CA with `bouwsteen blocks register`")
        return _cluster_ca(self.ca_block.certificate, self.ca_block.private_key.get_secret_value(),
                           self.ca_block.also_trusted)

    def client_tls(self, role: str | None = None) -> ClientTls | None:
        """What the controller's libpq needs to verify the servers (and, for `role`, to present
        that role's client certificate); None with TLS off."""
        ca = self.cluster_ca
        if ca is None:
            return None
        return controller_tls_files(self.inventory, ca, role)

    def etcd(self, endpoints: list[str] | None = None, *, timeout: float = 3) -> Etcd:
        """The cluster's etcd (or `endpoints` of it), over TLS with the etcd client pair when TLS is on."""
        return Etcd(endpoints or etcd_config.client_endpoints(self.inventory), timeout=timeout,
                    tls=self.client_tls(pki.ETCD_CLIENT))

    def superuser_endpoint(self, host: HostSpec, *, port: int | None = None, dbname: str = "postgres") -> PgEndpoint:
        secrets = self.db_secrets
        return PgEndpoint(
            host=host.name, address=str(host.address), port=port or self.inventory.cluster.postgres.port,
            user=secrets.superuser, password=secrets.superuser_password, dbname=dbname,
            tls=self.client_tls(secrets.superuser),
        )

    def application_endpoint(self, address: str, port: int, *, name: str = "vip",
                             target_session_attrs: str | None = None) -> PgEndpoint:
        """`address` may list several hosts (comma-separated), as a multi-host client connects."""
        if self.db_blocks is None:
            raise LookupError(f"no database-credentials block named {self.name!r}")
        return PgEndpoint(
            host=name, address=address, port=port,
            user=self.db_blocks.application_user,
            password=self.db_blocks.application_password.get_secret_value(),
            dbname=self.inventory.cluster.postgres.application_database,
            target_session_attrs=target_session_attrs,
            tls=self.client_tls(),
        )

    @property
    def routing_secrets(self) -> RoutingSecrets | None:
        if self.routing_block is None or self.db_blocks is None:
            return None
        return RoutingSecrets(
            vrrp_password=self.routing_block.vrrp_password.get_secret_value(),
            monitor_user=self.db_blocks.monitor_user,
            monitor_password=self.db_blocks.monitor_password.get_secret_value() if self.db_blocks.monitor_password else "",
            ca_bundle_pem=self.cluster_ca.trust_bundle_pem if self.cluster_ca else None,
        )

    @property
    def server_secrets(self) -> ServerSecrets | None:
        if self.store_block is None:
            return None
        b = self.store_block
        return ServerSecrets(
            admin_access_key_id=b.admin_access_key_id,
            admin_secret_access_key=b.admin_secret_access_key.get_secret_value(),
            cluster_access_key_id=b.access_key_id,
            cluster_secret_access_key=b.secret_access_key.get_secret_value(),
            certificate_pem=b.server_certificate,
            private_key_pem=b.server_private_key.get_secret_value(),
            restore_access_key_id=b.restore_access_key_id,
            restore_secret_access_key=(b.restore_secret_access_key.get_secret_value()
                                       if b.restore_secret_access_key else None),
        )

    @property
    def store_secrets(self) -> StoreSecrets:
        if self.store_block is None:
            raise LookupError(f"no object-store-credentials block named {self.name!r}")
        b = self.store_block
        return StoreSecrets(
            access_key_id=b.access_key_id,
            secret_access_key=b.secret_access_key.get_secret_value(),
            ca_certificate=b.ca_certificate,
            cipher_pass=b.repository_cipher_pass.get_secret_value() if b.repository_cipher_pass else None,
        )

    @property
    def restore_store_secrets(self) -> StoreSecrets:
        """What the restore host reads the repository with: the restore key where one is registered
        (read-only where the server has per-key policies), else the cluster's own."""
        secrets = self.store_secrets
        b = self.store_block
        if b is None or b.restore_access_key_id is None or b.restore_secret_access_key is None:
            return secrets
        return replace(secrets, access_key_id=b.restore_access_key_id,
                       secret_access_key=b.restore_secret_access_key.get_secret_value())


def _load_optional(block_class, name: str):
    try:
        return block_class.load(name, validate=True)
    except ValueError as exc:
        if "Unable to find block document" in str(exc):
            return None
        raise


def load_context(cluster: str) -> ClusterContext:
    inventory_block = _load_optional(ClusterInventory, cluster)
    if inventory_block is None:
        raise LookupError(f"no cluster-inventory block named {cluster!r}; register it with `bouwsteen blocks register`")
    ssh = _load_optional(SshCredentials, cluster)
    if ssh is None:
        raise LookupError(f"no ssh-credentials block named {cluster!r}; register it with `bouwsteen blocks register`")
    db = _load_optional(DatabaseCredentials, cluster)
    store = _load_optional(ObjectStoreCredentials, cluster)
    routing = _load_optional(RoutingCredentials, cluster)
    ca = _load_optional(CertificateAuthority, cluster)
    return ClusterContext(
        inventory=inventory_block.inventory,
        ssh_user=ssh.user,
        ssh_auth=SshAuth(private_key=ssh.private_key.get_secret_value(), known_hosts=ssh.known_hosts),
        db_blocks=db,
        store_block=store,
        masker=Masker(secret_values(ssh, db, store, routing, ca)),
        routing_block=routing,
        ca_block=ca,
    )


@lru_cache(maxsize=8)
def _cluster_ca(certificate: str, private_key: str, also_trusted: str) -> ClusterCA:
    # One object per CA: the issuing cache is keyed by it.
    return ClusterCA(certificate, private_key, also_trusted)


@lru_cache(maxsize=8)
def _cached(cluster: str) -> ClusterContext:
    return load_context(cluster)


def context_for(cluster: str, *, fresh: bool = False, inventory: dict | None = None) -> ClusterContext:
    """One load per worker process and cluster; `fresh=True` after a flow changed a block.

    `inventory` replaces the stored inventory for a what-if (e.g. planning add_standby before
    the block is updated); credentials still come from the blocks."""
    if fresh:
        _cached.cache_clear()
    ctx = _cached(cluster)
    if inventory is not None:
        ctx = replace(ctx, inventory=Inventory.model_validate(inventory))
    return ctx
