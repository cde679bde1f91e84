"""tasks/desired.py: which layers each host gets, archive hook, driver selection."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from blocks.inventory import Inventory, parse_inventory
from tasks.adapters.backup.base import StoreSecrets
from tasks.adapters.backup.pgbackrest import PgBackRestDriver
from tasks.adapters.backup.walg import WalgDriver
from tasks.adapters.ha.base import DbSecrets
from tasks.adapters.ha.patroni import PatroniDriver
from tasks.adapters.ha.stolon import StolonDriver
from tasks.adapters.objectstore_server import ServerSecrets
from tasks.adapters.routing.config import RoutingSecrets, RoutingSpecError
from tasks.desired import ClusterSecrets, all_desired, archive_parameters, backup_driver, ha_driver

DB = DbSecrets(superuser="postgres", superuser_password="Su-pw-1", replication_user="replicator",
               replication_password="Repl-pw-2", rest_api_password="Rest-pw-3")
STORE = StoreSecrets(access_key_id="LABCLUSTER", secret_access_key="Store-secret-4",
                     ca_certificate="-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n")
SERVER = ServerSecrets("ADMINKEY01", "Admin-secret-5", "LABCLUSTER", "Store-secret-4",
                       "-----BEGIN CERTIFICATE-----\nSRV\n-----END CERTIFICATE-----\n",
                       "-----BEGIN PRIVATE KEY-----\nKEY\n-----END PRIVATE KEY-----\n")
ROUTING = RoutingSecrets(vrrp_password="Vrrp1234", monitor_user="bouwsteen_monitor", monitor_password="Mon-pw-6")

DB_HOSTS = ["pg1", "pg2", "pg3"]


def make_inventory(*, store: bool = True, routing: bool = True, server: str = "rclone", **cluster: Any) -> Inventory:
    base: dict[str, Any] = {"name": "lab", "network": "10.0.0.0/24", "admin_networks": ["10.0.0.1/32"]}
    if store:
        base["object_store"] = {"host": "backup1", "endpoint": "https://backup1.bouwsteen.lab:9000",
                                "bucket": "bouwsteen", "server": server}
    if routing:
        base["routing"] = {"vip": "10.0.0.100"}
    base.update(cluster)
    hosts = [{"name": n, "address": f"10.0.0.1{i}", "roles": ["db"]} for i, n in enumerate(DB_HOSTS, 1)]
    hosts += [
        {"name": "backup1", "address": "10.0.0.21", "roles": ["backup"]},
        {"name": "router1", "address": "10.0.0.31", "roles": ["router"]},
        {"name": "router2", "address": "10.0.0.32", "roles": ["router"]},
    ]
    return parse_inventory({"cluster": base, "hosts": hosts})


PATRONI = make_inventory()
STOLON = make_inventory(ha_manager="stolon", backup_tool="walg")


def kinds(layers: dict) -> dict[str, list[str]]:
    return {host: list(by_kind) for host, by_kind in layers.items()}


# ----------------------------------------------------------------------------- layers per host

DB_ONLY = {h: ["etcd", "db"] for h in DB_HOSTS}


@pytest.mark.parametrize("inv", [PATRONI, STOLON], ids=["patroni-pgbackrest", "stolon-walg"])
@pytest.mark.parametrize(
    ("store", "server", "routing", "expected"),
    [
        pytest.param(None, None, None, DB_ONLY, id="db-only"),
        pytest.param(STORE, None, None, DB_ONLY, id="store-without-server"),
        pytest.param(STORE, SERVER, None, {**DB_ONLY, "backup1": ["objectstore"]}, id="store-and-server"),
        pytest.param(None, SERVER, None, {**DB_ONLY, "backup1": ["objectstore"]}, id="server-only"),
        pytest.param(None, None, ROUTING, {**DB_ONLY, "router1": ["router"], "router2": ["router"]}, id="routing"),
        pytest.param(STORE, SERVER, ROUTING,
                     {**DB_ONLY, "backup1": ["objectstore"], "router1": ["router"], "router2": ["router"]}, id="all"),
    ],
)
def test_kinds_per_host(inv: Inventory, store, server, routing, expected: dict[str, list[str]]) -> None:
    layers = all_desired(inv, ClusterSecrets(db=DB, store=store, server=server, routing=routing))
    assert kinds(layers) == expected
    for host, by_kind in layers.items():
        for layer in by_kind.values():
            assert layer.host == host


@pytest.mark.parametrize(
    ("inv", "expected"),
    [
        pytest.param(make_inventory(store=False), {**DB_ONLY, "router1": ["router"], "router2": ["router"]},
                     id="no-object-store-in-inventory"),
        pytest.param(make_inventory(routing=False), {**DB_ONLY, "backup1": ["objectstore"]}, id="no-routing"),
        pytest.param(make_inventory(store=False, routing=False), DB_ONLY, id="neither"),
    ],
)
def test_secrets_without_inventory_section_add_nothing(inv: Inventory, expected: dict[str, list[str]]) -> None:
    layers = all_desired(inv, ClusterSecrets(db=DB, store=STORE, server=SERVER, routing=ROUTING))
    assert kinds(layers) == expected


def test_explicit_etcd_hosts_get_only_the_etcd_layer() -> None:
    inv = parse_inventory({
        "cluster": {"name": "lab", "network": "10.0.0.0/24"},
        "hosts": [
            {"name": "pg1", "address": "10.0.0.11", "roles": ["db"]},
            {"name": "pg2", "address": "10.0.0.12", "roles": ["db", "etcd"]},
            {"name": "e1", "address": "10.0.0.51", "roles": ["etcd"]},
            {"name": "e2", "address": "10.0.0.52", "roles": ["etcd"]},
        ],
    })
    layers = all_desired(inv, ClusterSecrets(db=DB, store=None))
    assert kinds(layers) == {"pg2": ["etcd", "db"], "e1": ["etcd"], "e2": ["etcd"], "pg1": ["db"]}


def test_layer_contents_patroni() -> None:
    layers = all_desired(PATRONI, ClusterSecrets(db=DB, store=STORE, server=SERVER, routing=ROUTING))
    etcd = layers["pg1"]["etcd"]
    assert etcd.packages == ("etcd-server", "etcd-client")
    assert [f.path for f in etcd.files] == ["/etc/bouwsteen/cluster.json", "/etc/default/etcd"]
    assert etcd.ports == {2379: {"etcd"}, 2380: {"etcd"}}
    db = layers["pg1"]["db"]
    assert db.packages == ("postgresql-15", "postgresql-contrib", "patroni", "haproxy", "pgbackrest")
    assert db.ports == {5432: {"postgres", "postmaster"}, 8008: {"patroni", "python3"}, 25432: {"haproxy"}}
    assert db.cluster_member is True and db.needs_data_dir is True
    etcd = layers["pg1"]["etcd"]
    assert etcd.cluster_member is True and etcd.needs_data_dir is False
    assert [u.name for u in db.units] == ["patroni.service", "haproxy.service"]
    assert db.files[0].path == "/etc/bouwsteen/cluster.json"
    assert json.loads(db.files[0].content) == {"cluster": "lab"}
    store = layers["backup1"]["objectstore"]
    assert store.ports == {9000: {"rclone"}}
    assert [u.name for u in store.units] == ["bouwsteen-s3.service"]
    router = layers["router1"]["router"]
    assert router.ports == {5432: {"haproxy"}, 5433: {"haproxy"}, 8080: {"python3", "bouwsteen-prim"}}
    assert [u.name for u in router.units] == ["bouwsteen-primary-detector.service", "haproxy.service",
                                              "keepalived.service"]
    assert {"haproxy", "keepalived"} <= set(router.packages)


def test_layer_contents_stolon() -> None:
    db = all_desired(STOLON, ClusterSecrets(db=DB, store=STORE))["pg2"]["db"]
    assert db.ports == {5432: {"postgres", "postmaster"}, 25432: {"stolon-keeper", "stolon-proxy", "postgres"}}
    assert "stolon" in db.packages and "patroni" not in db.packages
    assert [u.name for u in db.units] == ["stolon-keeper-lab.service", "stolon-sentinel-lab.service",
                                          "stolon-proxy-lab.service"]


@pytest.mark.parametrize(
    ("inv", "store", "backup_paths"),
    [
        (PATRONI, STORE, {"/etc/pgbackrest/pgbackrest.conf", "/etc/pgbackrest/object-store-ca.crt"}),
        (PATRONI, None, set()),
        (STOLON, STORE, {"/etc/wal-g/lab.json", "/etc/wal-g/lab-ca.crt"}),
        (STOLON, None, set()),
    ],
)
def test_backup_files_only_with_store_secrets(inv: Inventory, store, backup_paths: set[str]) -> None:
    db = all_desired(inv, ClusterSecrets(db=DB, store=store))["pg1"]["db"]
    paths = {f.path for f in db.files}
    assert paths & {"/etc/pgbackrest/pgbackrest.conf", "/etc/pgbackrest/object-store-ca.crt",
                    "/etc/wal-g/lab.json", "/etc/wal-g/lab-ca.crt"} == backup_paths
    # Packages follow the inventory (the object store is configured), not the secrets.
    assert ("pgbackrest" in db.packages or "wal-g-pg" in db.packages)


def test_secret_values_only_in_secret_files() -> None:
    layers = all_desired(PATRONI, ClusterSecrets(db=DB, store=STORE, server=SERVER, routing=ROUTING))
    values = ["Su-pw-1", "Repl-pw-2", "Rest-pw-3", "Store-secret-4", "Admin-secret-5", "Vrrp1234", "Mon-pw-6"]
    seen: set[str] = set()
    for by_kind in layers.values():
        for layer in by_kind.values():
            for f in layer.files:
                present = {v for v in values if v in f.content}
                if not f.secret:
                    assert not present, f"{layer.host}:{f.path} (not secret) holds {sorted(present)}"
                seen |= present
    # Monitor password is stored base64; every other value is in some secret file.
    assert seen == set(values) - {"Mon-pw-6"}


def test_bad_routing_secrets_refused() -> None:
    with pytest.raises(RoutingSpecError):
        all_desired(PATRONI, ClusterSecrets(db=DB, store=None, routing=RoutingSecrets("too-long-pw", "m", "p")))


def test_minio_objectstore_layer() -> None:
    inv = make_inventory(server="minio")
    layers = all_desired(inv, ClusterSecrets(db=DB, store=STORE, server=SERVER))
    store = layers["backup1"]["objectstore"]
    assert store.packages == ("minio",)
    assert "/etc/default/minio" in {f.path for f in store.files}


# ----------------------------------------------------------------------------- archive parameters


@pytest.mark.parametrize("inv", [PATRONI, STOLON, make_inventory(store=False)], ids=["patroni", "stolon", "no-store"])
def test_archive_parameters_empty_without_store_secrets(inv: Inventory) -> None:
    assert archive_parameters(inv, ClusterSecrets(db=DB, store=None)) == {}


def test_archive_parameters_empty_without_object_store_in_inventory() -> None:
    assert archive_parameters(make_inventory(store=False), ClusterSecrets(db=DB, store=STORE)) == {}


def test_archive_parameters_pgbackrest() -> None:
    assert archive_parameters(PATRONI, ClusterSecrets(db=DB, store=STORE)) == {
        "archive_mode": "on",
        "archive_command": "/usr/bin/timeout 15 pgbackrest --stanza=lab archive-push %p",
        "archive_timeout": "60",
    }


def test_archive_parameters_walg() -> None:
    params = archive_parameters(STOLON, ClusterSecrets(db=DB, store=STORE))
    assert params == WalgDriver().archive_parameters(STOLON)
    assert params["archive_mode"] == "on"
    assert params["archive_command"].endswith(" wal-push %p")
    assert "Store-secret-4" not in params["archive_command"]


@pytest.mark.parametrize(("store", "archived"), [(STORE, True), (None, False)])
def test_archive_parameters_reach_patroni_config(store, archived: bool) -> None:
    db = all_desired(PATRONI, ClusterSecrets(db=DB, store=store))["pg1"]["db"]
    config = next(f for f in db.files if f.path == "/etc/patroni/config.yml")
    parameters = yaml.safe_load(config.content)["bootstrap"]["dcs"]["postgresql"]["parameters"]
    expected = archive_parameters(PATRONI, ClusterSecrets(db=DB, store=STORE))
    assert ({k: parameters.get(k) for k in expected} == expected) is archived
    assert ("archive_command" in parameters) is archived


@pytest.mark.parametrize(("store", "archived"), [(STORE, True), (None, False)])
def test_archive_parameters_reach_stolon_spec(store, archived: bool) -> None:
    db = all_desired(STOLON, ClusterSecrets(db=DB, store=store))["pg1"]["db"]
    spec = next(f for f in db.files if f.path == "/etc/stolon/lab/cluster-spec.json")
    assert ("wal-push %p" in spec.content) is archived


# ----------------------------------------------------------------------------- driver selection


@pytest.mark.parametrize(
    ("cluster", "ha", "backup"),
    [
        ({}, PatroniDriver, PgBackRestDriver),
        ({"ha_manager": "patroni", "backup_tool": "walg"}, PatroniDriver, WalgDriver),
        ({"ha_manager": "stolon"}, StolonDriver, PgBackRestDriver),
        ({"ha_manager": "stolon", "backup_tool": "walg"}, StolonDriver, WalgDriver),
    ],
)
def test_driver_selection(cluster: dict, ha: type, backup: type) -> None:
    inv = make_inventory(**cluster)
    assert type(ha_driver(inv)) is ha
    assert type(backup_driver(inv)) is backup


# ----------------------------------------------------------------------------- the HA interface, both drivers


@pytest.mark.parametrize("inv", [PATRONI, STOLON], ids=["patroni", "stolon"])
def test_config_paths_are_files_the_driver_writes(inv: Inventory) -> None:
    driver = ha_driver(inv)
    written = {f.path for f in driver.host_files(inv, inv.host("pg1"), DB, {})}
    assert driver.config_paths(inv) and set(driver.config_paths(inv)) <= written


def test_patroni_membership_lives_in_the_per_host_files() -> None:
    assert ha_driver(PATRONI).membership_commands(PATRONI, {}) == []


def test_stolon_membership_patches_pghba_with_every_database_host() -> None:
    grown = make_inventory(ha_manager="stolon", backup_tool="walg")
    document = grown.model_dump(mode="json")
    document["hosts"].append({"name": "pg4", "address": "10.0.0.14", "roles": ["db"]})
    grown = parse_inventory(document)
    [command] = ha_driver(grown).membership_commands(grown, {})
    assert command.argv[0].endswith("/stolonctl") and "update" in command.argv and "--patch" in command.argv
    patch = json.loads(command.argv[command.argv.index("--patch") + 1])
    assert "initMode" not in patch
    assert "host replication all 10.0.0.14/32 md5" in patch["pgHBA"]
    assert all(f"10.0.0.1{i}/32" in " ".join(patch["pgHBA"]) for i in range(1, 5))
