"""What each host of a cluster should look like, from the inventory and the credentials. Pure."""

from __future__ import annotations

from dataclasses import dataclass

from blocks.inventory import HostSpec, Inventory, Role
from tasks.adapters import etcd_config, pki
from tasks.adapters.backup.base import StoreSecrets
from tasks.adapters.backup.registry import backup_driver
from tasks.adapters.commands import ManagedFile
from tasks.adapters.ha.base import DbSecrets
from tasks.adapters.ha.registry import ha_driver
from tasks.adapters.objectstore_server import ServerSecrets, server_for
from tasks.adapters.pki import ClusterCA
from tasks.adapters.routing.config import RoutingSecrets, router_files, router_units
from tasks.planning.build import DesiredHost, ReleaseFloor, marker_file

# Who may legitimately listen on a port the cluster needs (process names as `ss` shows them).
POSTGRES = frozenset({"postgres", "postmaster"})
ETCD = frozenset({"etcd"})
HAPROXY = frozenset({"haproxy"})
DETECTOR = frozenset({"python3", "bouwsteen-prim"})

ETCD_PACKAGES = ("etcd-server", "etcd-client")
ROUTER_PACKAGES = ("haproxy", "keepalived", "python3-psycopg", "python3-yaml", "curl", "psmisc")


def stack_packages(inv: Inventory) -> list[str]:
    """Every OS package this cluster's building block installs somewhere (the host report's list)."""
    packages = [*ETCD_PACKAGES, *ha_driver(inv).packages(inv)]
    if inv.cluster.object_store is not None:
        packages += [*backup_driver(inv).packages(inv), *server_for(inv.cluster.object_store.server).packages()]
    if inv.cluster.routing is not None:
        packages += ROUTER_PACKAGES
    return list(dict.fromkeys([*packages, "openssh-server"]))


@dataclass(frozen=True)
class ClusterSecrets:
    db: DbSecrets
    store: StoreSecrets | None  # None until the object store's credentials are registered
    server: ServerSecrets | None = None  # what the backup server itself needs (TLS key, admin key)
    routing: RoutingSecrets | None = None
    ca: ClusterCA | None = None  # TLS on: the cluster's issuing CA


def archive_parameters(inv: Inventory, secrets: ClusterSecrets) -> dict[str, str]:
    """The hook where the backup driver switches WAL archiving on."""
    if inv.cluster.object_store is None or secrets.store is None:
        return {}
    return backup_driver(inv).archive_parameters(inv)


def etcd_member(inv: Inventory, host: HostSpec, ca: ClusterCA | None = None) -> DesiredHost:
    return DesiredHost(
        host=host.name,
        packages=ETCD_PACKAGES,
        files=(marker_file(inv.cluster.name), *etcd_config.member_files(inv, host, ca)),
        units=tuple(etcd_config.member_units(inv)),
        ports={inv.cluster.etcd.client_port: ETCD, inv.cluster.etcd.peer_port: ETCD},
        cluster_member=True,
    )


def db_files(inv: Inventory, host: HostSpec, secrets: ClusterSecrets) -> tuple[ManagedFile, ...]:
    files: list[ManagedFile] = [marker_file(inv.cluster.name), etcd_config.leader_away_file()]
    if inv.cluster.object_store is not None and secrets.store is not None:
        files += backup_driver(inv).host_files(inv, host, secrets.store, db_secrets=secrets.db)
    if inv.cluster.tls.enabled:
        if secrets.ca is None:
            raise LookupError("cluster.tls.enabled, but the cluster's CA is not registered")
        # Before the HA manager's files: PostgreSQL must find its pair when it starts with ssl on.
        files += pki.postgres_tls_files(inv, host, secrets.ca,
                                        (secrets.db.superuser, secrets.db.replication_user, pki.ETCD_CLIENT))
        files += ha_driver(inv).tls_files(inv, host, secrets.ca)
    files += ha_driver(inv).host_files(inv, host, secrets.db, archive_parameters(inv, secrets))
    return tuple(files)


def db_host(inv: Inventory, host: HostSpec, secrets: ClusterSecrets) -> DesiredHost:
    driver = ha_driver(inv)
    packages = list(driver.packages(inv))
    if inv.cluster.object_store is not None:
        packages += backup_driver(inv).packages(inv)
    ports = {inv.cluster.postgres.port: POSTGRES, **driver.listeners(inv)}
    return DesiredHost(
        host=host.name,
        packages=tuple(dict.fromkeys(packages)),
        files=db_files(inv, host, secrets),
        units=tuple(driver.host_units(inv, host)),
        ports=ports,
        cluster_member=True,
        needs_data_dir=True,
        release_floors=tuple(ReleaseFloor(*floor) for floor in driver.release_floors()),
    )


def object_store_host(inv: Inventory, secrets: ServerSecrets) -> DesiredHost:
    store = inv.cluster.object_store
    assert store is not None
    server = server_for(store.server)
    return DesiredHost(
        host=store.host,
        packages=tuple(server.packages()),
        files=tuple(server.host_files(inv, secrets)),
        units=tuple(server.units(inv)),
        ports={store.endpoint_port: server.processes},
    )


def all_desired(inv: Inventory, secrets: ClusterSecrets) -> dict[str, dict[str, DesiredHost]]:
    """Per host, its layers by kind, in apply order (etcd member before database host)."""
    layers: dict[str, dict[str, DesiredHost]] = {}
    for host in inv.etcd_members:
        layers.setdefault(host.name, {})["etcd"] = etcd_member(inv, host, secrets.ca)
    for host in inv.with_role(Role.db):
        layers.setdefault(host.name, {})["db"] = db_host(inv, host, secrets)
    if inv.cluster.object_store is not None and secrets.server is not None:
        layers.setdefault(inv.cluster.object_store.host, {})["objectstore"] = object_store_host(inv, secrets.server)
    if inv.cluster.routing is not None and secrets.routing is not None:
        for host in inv.with_role(Role.router):
            layers.setdefault(host.name, {})["router"] = router_host(inv, host, secrets.routing)
    return layers


def router_host(inv: Inventory, host: HostSpec, secrets: RoutingSecrets) -> DesiredHost:
    routing = inv.cluster.routing
    assert routing is not None
    return DesiredHost(
        host=host.name,
        packages=ROUTER_PACKAGES,
        files=tuple(router_files(inv, host, secrets, ha_driver(inv).rw_port(inv))),
        units=tuple(router_units(inv)),
        # An existing pgroute66 holds its own port; the project's detector only runs without it.
        ports={routing.rw_port: HAPROXY, routing.ro_port: HAPROXY,
               **({} if routing.uses_pgroute66 else {routing.detector_port: DETECTOR})},
    )
