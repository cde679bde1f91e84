"""blocks/inventory.py: a valid inventory parses; every bad input names the source, the field and the reason."""

from __future__ import annotations

import copy
import ipaddress
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from blocks.inventory import (
    HaManager,
    Inventory,
    InventoryError,
    Role,
    UnknownHostError,
    load_inventory,
    parse_inventory,
)

SOURCE = "site-a.yml"


def valid_inventory() -> dict[str, Any]:
    """A fresh, valid inventory dict: 3 db hosts, a backup server, two routers."""
    return {
        "cluster": {
            "name": "lab",
            "network": "10.0.0.0/24",
            "routing": {"vip": "10.0.0.100"},
            "object_store": {
                "host": "backup1",
                "endpoint": "https://backup1.example:9000",
                "bucket": "bouwsteen",
            },
        },
        "hosts": [
            {"name": "pg1", "address": "10.0.0.11", "roles": ["db"]},
            {"name": "pg2", "address": "10.0.0.12", "roles": ["db"]},
            {"name": "pg3", "address": "10.0.0.13", "roles": ["db"]},
            {"name": "backup1", "address": "10.0.0.20", "roles": ["backup"]},
            {"name": "router1", "address": "10.0.0.31", "roles": ["router"]},
            {"name": "router2", "address": "10.0.0.32", "roles": ["router"]},
        ],
    }


def host_index(data: dict, name: str) -> int:
    return next(i for i, h in enumerate(data["hosts"]) if h["name"] == name)


def set_host(host: str, /, **fields: Any) -> Callable[[dict], None]:
    def mutate(data: dict) -> None:
        data["hosts"][host_index(data, host)].update(fields)
    return mutate


def set_cluster(*path: str, value: Any) -> Callable[[dict], None]:
    def mutate(data: dict) -> None:
        node = data["cluster"]
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return mutate


def drop_hosts(*names: str) -> Callable[[dict], None]:
    def mutate(data: dict) -> None:
        data["hosts"] = [h for h in data["hosts"] if h["name"] not in names]
    return mutate


def chain(*mutations: Callable[[dict], None]) -> Callable[[dict], None]:
    def mutate(data: dict) -> None:
        for m in mutations:
            m(data)
    return mutate


def add_top(key: str, value: Any) -> Callable[[dict], None]:
    def mutate(data: dict) -> None:
        data[key] = value
    return mutate


# ------------------------------------------------------------------------------ valid


def test_valid_inventory_parses() -> None:
    inv = parse_inventory(valid_inventory(), SOURCE)
    assert isinstance(inv, Inventory)
    assert inv.cluster.name == "lab"
    assert inv.cluster.network == ipaddress.IPv4Network("10.0.0.0/24")
    assert inv.cluster.ha_manager is HaManager.patroni
    assert [h.name for h in inv.hosts] == ["pg1", "pg2", "pg3", "backup1", "router1", "router2"]
    assert [h.name for h in inv.db_hosts] == ["pg1", "pg2", "pg3"]
    assert [h.name for h in inv.etcd_members] == ["pg1", "pg2", "pg3"]
    assert [h.name for h in inv.with_role(Role.router)] == ["router1", "router2"]
    assert inv.cluster.routing is not None and inv.cluster.routing.vip == ipaddress.IPv4Address("10.0.0.100")
    store = inv.cluster.object_store
    assert store is not None
    assert (store.host, store.endpoint_host, store.endpoint_port, store.bucket) == (
        "backup1", "backup1.example", 9000, "bouwsteen",
    )
    assert inv.host("pg2").address == ipaddress.IPv4Address("10.0.0.12")
    assert inv.cluster.postgres.data_dir == "/var/lib/postgresql/15/main"


def test_valid_inventory_helper_returns_independent_copies() -> None:
    a = valid_inventory()
    a["hosts"][0]["name"] = "changed"
    assert valid_inventory()["hosts"][0]["name"] == "pg1"


def test_unknown_host_lookup_names_the_cluster_and_hosts() -> None:
    inv = parse_inventory(valid_inventory(), SOURCE)
    with pytest.raises(UnknownHostError, match=r"unknown host 'pg9'; the inventory of cluster 'lab' has pg1, pg2"):
        inv.host("pg9")
    assert inv.find("pg9") is None


# ------------------------------------------------------------------------------ bad inputs

# (id, mutation, field path, reason). The message must contain "<source>: <path>: ...<reason>" on one line.
BAD_INPUTS = [
    ("duplicate-host-name", set_host("pg2", name="pg1"), "hosts[1].name", "duplicate host 'pg1' (also hosts[0])"),
    ("duplicate-address", set_host("pg3", address="10.0.0.11"), "hosts[2].address",
     "duplicate address 10.0.0.11 (also hosts[0])"),
    ("unknown-role", set_host("backup1", roles=["backup", "witness"]), "hosts[3].roles[1]",
     "Input should be 'db', 'etcd', 'backup', 'router' or 'restore'"),
    ("role-listed-twice", set_host("pg1", roles=["db", "db"]), "hosts[0].roles", "a role is listed twice"),
    ("bad-ipv4-octet", set_host("pg1", address="10.0.0.256"), "hosts[0].address", "Input is not a valid IPv4 address"),
    ("bad-ipv4-name", set_host("pg2", address="pg2.example"), "hosts[1].address", "Input is not a valid IPv4 address"),
    ("ipv6-not-ipv4", set_host("pg3", address="fd00::13"), "hosts[2].address", "Input is not a valid IPv4 address"),
    ("bad-host-name", set_host("pg1", name="PG_1"), "hosts[0].name", "String should match pattern"),
    ("two-etcd-members-implicit", drop_hosts("pg3"), "hosts",
     "2 etcd member(s) (pg1, pg2); at least 3 are needed for a quorum that survives one loss"),
    ("two-etcd-members-explicit", chain(set_host("pg1", roles=["db", "etcd"]), set_host("backup1", roles=["backup", "etcd"])),
     "hosts", "2 etcd member(s) (pg1, backup1); at least 3 are needed"),
    ("no-db-host", chain(*(set_host(n, roles=["etcd"]) for n in ("pg1", "pg2", "pg3"))), "hosts",
     "no host has role 'db'"),
    ("vip-outside-subnet", set_cluster("routing", "vip", value="10.0.1.100"), "cluster.routing.vip",
     "10.0.1.100 is outside the hosts' subnet 10.0.0.0/24"),
    ("vip-equals-host-address", set_cluster("routing", "vip", value="10.0.0.12"), "cluster.routing.vip",
     "10.0.0.12 is already the address of a host"),
    ("routing-without-routers", drop_hosts("router1", "router2"), "cluster.routing",
     "set, but no host has role 'router'"),
    ("unknown-ha-manager", set_cluster("ha_manager", value="repmgr"), "cluster.ha_manager",
     "Input should be 'patroni' or 'stolon'"),
    ("unknown-backup-tool", set_cluster("backup_tool", value="barman"), "cluster.backup_tool",
     "Input should be 'pgbackrest' or 'walg'"),
    ("unknown-top-level-key", add_top("clusters", {}), "clusters", "Extra inputs are not permitted"),
    ("unknown-nested-key", set_cluster("postgres", "versoin", value=16), "cluster.postgres.versoin",
     "Extra inputs are not permitted"),
    ("unknown-host-key", set_host("pg1", role="db"), "hosts[0].role", "Extra inputs are not permitted"),
    ("host-outside-network", set_host("pg2", address="10.0.1.12"), "hosts[1].address",
     "10.0.1.12 is outside cluster.network 10.0.0.0/24"),
    ("object-store-on-db-host", set_cluster("object_store", "host", value="pg1"), "cluster.object_store.host",
     "'pg1' is not a host with role 'backup'"),
    ("object-store-unknown-host", set_cluster("object_store", "host", value="s3box"), "cluster.object_store.host",
     "'s3box' is not a host with role 'backup'"),
    ("object-store-http", set_cluster("object_store", "endpoint", value="http://backup1.example:9000"),
     "cluster.object_store.endpoint", "String should match pattern '^https://"),
    ("object-store-path-in-endpoint", set_cluster("object_store", "endpoint", value="https://backup1.example/bucket"),
     "cluster.object_store.endpoint", "String should match pattern '^https://"),
    ("cluster-name-uppercase", set_cluster("name", value="Lab"), "cluster.name", "String should match pattern"),
    ("cluster-name-underscore", set_cluster("name", value="lab_1"), "cluster.name", "String should match pattern"),
    ("cluster-name-leading-digit", set_cluster("name", value="1lab"), "cluster.name", "String should match pattern"),
    ("cluster-name-trailing-dash", set_cluster("name", value="lab-"), "cluster.name", "String should match pattern"),
    ("cluster-name-one-char", set_cluster("name", value="l"), "cluster.name", "String should match pattern"),
    ("patroni-timing", set_cluster("patroni", value={"ttl": 20, "loop_wait": 10, "retry_timeout": 10}),
     "cluster.patroni", "loop_wait (10) + 2 * retry_timeout (10) must not exceed ttl (20)"),
    ("patroni-timing-just-over", set_cluster("patroni", value={"ttl": 30, "loop_wait": 11, "retry_timeout": 10}),
     "cluster.patroni", "loop_wait (11) + 2 * retry_timeout (10) must not exceed ttl (30)"),
    ("patroni-ttl-too-small", set_cluster("patroni", value={"ttl": 19}), "cluster.patroni.ttl",
     "Input should be greater than or equal to 20"),
    ("etcd-port-clash", set_cluster("etcd", value={"client_port": 5432}), "cluster.etcd.client_port",
     "clashes with cluster.postgres.port"),
    ("postgres-version-too-old", set_cluster("postgres", value={"version": 11}), "cluster.postgres.version",
     "Input should be greater than or equal to 12"),
    ("no-hosts", add_top("hosts", []), "hosts", "List should have at least 1 item"),
    ("hosts-missing", lambda d: d.pop("hosts"), "hosts", "Field required"),
    ("bad-network", set_cluster("network", value="10.0.0.1/24"), "cluster.network",
     "Input is not a valid IPv4 network"),
    ("unknown-detector", set_cluster("routing", "detector", value="patroni"), "cluster.routing.detector",
     "Input should be 'bouwsteen' or 'pgroute66'"),
    ("pgroute66-settings-without-detector", set_cluster("routing", "pgroute66", value={"group": "lab"}),
     "cluster.routing", "pgroute66: set, but detector is 'bouwsteen'; add detector: pgroute66"),
    ("pgroute66-with-detector-port", chain(set_cluster("routing", "detector", value="pgroute66"),
                                           set_cluster("routing", "detector_port", value=9090)),
     "cluster.routing", "detector_port: the project's detector does not run with detector: pgroute66"),
    ("pgroute66-url-with-path", chain(set_cluster("routing", "detector", value="pgroute66"),
                                      set_cluster("routing", "pgroute66", "url", value="http://127.0.0.1:8080/v1")),
     "cluster.routing.pgroute66.url", "String should match pattern"),
    ("pgroute66-url-not-http", chain(set_cluster("routing", "detector", value="pgroute66"),
                                     set_cluster("routing", "pgroute66", "url", value="tcp://127.0.0.1:8080")),
     "cluster.routing.pgroute66.url", "String should match pattern"),
    ("pgroute66-url-quote", chain(set_cluster("routing", "detector", value="pgroute66"),
                                  set_cluster("routing", "pgroute66", "url", value="http://x'$(id):80")),
     "cluster.routing.pgroute66.url", "String should match pattern"),
    ("pgroute66-port-range", chain(set_cluster("routing", "detector", value="pgroute66"),
                                   set_cluster("routing", "pgroute66", "url", value="http://127.0.0.1:80800")),
     "cluster.routing.pgroute66", "url: port 80800 is out of range"),
    ("pgroute66-empty-group", chain(set_cluster("routing", "detector", value="pgroute66"),
                                    set_cluster("routing", "pgroute66", "group", value="")),
     "cluster.routing.pgroute66.group", "String should match pattern"),
    ("pgroute66-group-with-ampersand", chain(set_cluster("routing", "detector", value="pgroute66"),
                                             set_cluster("routing", "pgroute66", "group", value="a&group=b")),
     "cluster.routing.pgroute66.group", "String should match pattern"),
    ("pgroute66-ca-without-https", chain(set_cluster("routing", "detector", value="pgroute66"),
                                         set_cluster("routing", "pgroute66", "ca_file", value="/etc/ca.crt")),
     "cluster.routing.pgroute66", "ca_file: only with an https:// url"),
    ("pgroute66-server-key", chain(set_cluster("routing", "detector", value="pgroute66"),
                                   set_cluster("routing", "pgroute66", "server_key", value="fqdn")),
     "cluster.routing.pgroute66.server_key", "Input should be 'name' or 'address'"),
    ("pgroute66-unknown-key", chain(set_cluster("routing", "detector", value="pgroute66"),
                                    set_cluster("routing", "pgroute66", "host_groups", value={})),
     "cluster.routing.pgroute66.host_groups", "Extra inputs are not permitted"),
]


@pytest.mark.parametrize(("mutate", "path", "reason"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_names_source_field_and_reason(mutate, path: str, reason: str) -> None:
    data = valid_inventory()
    mutate(data)
    with pytest.raises(InventoryError) as info:
        parse_inventory(data, SOURCE)
    message = str(info.value)
    prefix = f"{SOURCE}: {path}: "
    matching = [line for line in message.splitlines() if line.startswith(prefix) and reason in line]
    assert matching, f"no line starting with {prefix!r} containing {reason!r} in:\n{message}"


def test_every_error_line_starts_with_the_source() -> None:
    data = valid_inventory()
    set_host("pg1", address="10.0.0.999")(data)
    set_host("pg2", roles=["nope"])(data)
    set_cluster("ha_manager", value="x")(data)
    with pytest.raises(InventoryError) as info:
        parse_inventory(data, SOURCE)
    lines = str(info.value).splitlines()
    assert len(lines) == 3
    assert all(line.startswith(f"{SOURCE}: ") for line in lines)
    assert [line.split(": ")[1] for line in lines] == ["cluster.ha_manager", "hosts[0].address", "hosts[1].roles[0]"]


def test_default_source_name() -> None:
    data = valid_inventory()
    set_host("pg2", name="pg1")(data)
    with pytest.raises(InventoryError, match=r"^<inventory>: hosts\[1\]\.name: duplicate host 'pg1'"):
        parse_inventory(data)


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(set_cluster("patroni", value={"ttl": 20, "loop_wait": 2, "retry_timeout": 9}), id="timing-equal-ttl"),
        pytest.param(set_cluster("routing", "vip", value="10.0.0.254"), id="vip-inside"),
        pytest.param(set_cluster("object_store", "endpoint", value="https://backup1.example"), id="https-no-port"),
        pytest.param(set_cluster("object_store", "endpoint", value="https://backup1.example:9000/"), id="https-slash"),
        pytest.param(set_cluster("name", value="ab"), id="two-char-name"),
        pytest.param(lambda d: d["cluster"].pop("routing"), id="no-routing-no-router-needed"),
        pytest.param(chain(lambda d: d["cluster"].pop("object_store"), drop_hosts("backup1")), id="no-object-store"),
    ],
)
def test_boundary_inputs_are_accepted(mutate) -> None:
    data = valid_inventory()
    mutate(data)
    assert isinstance(parse_inventory(data, SOURCE), Inventory)


# ------------------------------------------------------------------------------ load_inventory


def write(tmp_path: Path, text: str, name: str = "inventory.yml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_load_inventory_from_file(tmp_path: Path) -> None:
    path = write(tmp_path, yaml.safe_dump(valid_inventory()))
    inv = load_inventory(path)
    assert inv == parse_inventory(valid_inventory())


def test_load_inventory_validation_error_names_the_file(tmp_path: Path) -> None:
    data = valid_inventory()
    set_host("pg3", address="10.0.0.11")(data)
    path = write(tmp_path, yaml.safe_dump(data))
    with pytest.raises(InventoryError) as info:
        load_inventory(str(path))
    assert str(info.value) == f"{path}: hosts[2].address: duplicate address 10.0.0.11 (also hosts[0])"


@pytest.mark.parametrize(
    ("text", "where", "problem"),
    [
        ("cluster:\n  name: lab\n\tnetwork: 10.0.0.0/24\nhosts: []\n", "line 3, column 1",
         "found character '\\t' that cannot start any token"),
        ("cluster:\n  name: lab\n  network: [10.0.0.0/24\nhosts: []\n", "line 4, column 6",
         "expected ',' or ']', but got ':'"),
        ("cluster: {name: lab\n", "line 2, column 1", "expected ',' or '}', but got '<stream end>'"),
    ],
    ids=["tab", "unclosed-list", "unclosed-flow-mapping"],
)
def test_load_inventory_yaml_syntax_error_gives_file_and_line(tmp_path: Path, text: str, where: str, problem: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(InventoryError) as info:
        load_inventory(path)
    assert str(info.value) == f"{path}: {where}: not valid YAML: {problem}"


@pytest.mark.parametrize("text", ["", "- pg1\n- pg2\n", "just text\n", "42\n", "null\n"],
                         ids=["empty", "list", "string", "int", "null"])
def test_load_inventory_non_mapping(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(InventoryError) as info:
        load_inventory(path)
    assert str(info.value) == f"{path}: expected a mapping with cluster, ssh and hosts"


def test_load_inventory_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yml"
    with pytest.raises(InventoryError) as info:
        load_inventory(path)
    assert str(info.value) == f"{path}: cannot read: No such file or directory"


def test_load_inventory_directory(tmp_path: Path) -> None:
    with pytest.raises(InventoryError) as info:
        load_inventory(tmp_path)
    assert str(info.value) == f"{tmp_path}: cannot read: Is a directory"


# ------------------------------------------------------------------------------ derived values


@pytest.mark.parametrize("name", ["lab", "prod", "ab", "x1", "a-very-long-cluster-name-0123456", "cluster-42"])
def test_virtual_router_id_stable_and_in_range(name: str) -> None:
    data = valid_inventory()
    data["cluster"]["name"] = name
    first = parse_inventory(data).cluster.virtual_router_id
    second = parse_inventory(copy.deepcopy(data)).cluster.virtual_router_id
    assert first == second
    assert isinstance(first, int)
    assert 1 <= first <= 255


def test_virtual_router_id_pinned_for_lab() -> None:
    # Changing the derivation would move every running cluster's VRRP id: pin one value.
    assert parse_inventory(valid_inventory()).cluster.virtual_router_id == 132


def test_virtual_router_id_differs_between_names() -> None:
    ids = set()
    for name in ("lab", "prod", "staging", "test", "acc"):
        data = valid_inventory()
        data["cluster"]["name"] = name
        ids.add(parse_inventory(data).cluster.virtual_router_id)
    assert len(ids) > 1


@pytest.mark.parametrize("explicit", [1, 7, 255])
def test_virtual_router_id_explicit_wins(explicit: int) -> None:
    data = valid_inventory()
    data["cluster"]["routing"]["virtual_router_id"] = explicit
    assert parse_inventory(data).cluster.virtual_router_id == explicit


@pytest.mark.parametrize("bad", [0, 256, -1])
def test_virtual_router_id_explicit_out_of_range(bad: int) -> None:
    data = valid_inventory()
    data["cluster"]["routing"]["virtual_router_id"] = bad
    with pytest.raises(InventoryError, match=r"site-a.yml: cluster\.routing\.virtual_router_id: Input should be"):
        parse_inventory(data, SOURCE)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        pytest.param(lambda d: None, ["pg1", "pg2", "pg3"], id="default-db-hosts"),
        pytest.param(chain(set_host("backup1", roles=["backup", "etcd"]), set_host("router1", roles=["router", "etcd"]),
                           set_host("router2", roles=["router", "etcd"])),
                     ["backup1", "router1", "router2"], id="explicit-etcd-wins"),
        pytest.param(chain(set_host("pg1", roles=["db", "etcd"]), set_host("pg2", roles=["db", "etcd"]),
                           set_host("backup1", roles=["backup", "etcd"])),
                     ["pg1", "pg2", "backup1"], id="explicit-mixed-excludes-pg3"),
    ],
)
def test_etcd_members(mutate, expected: list[str]) -> None:
    data = valid_inventory()
    mutate(data)
    assert [h.name for h in parse_inventory(data).etcd_members] == expected


def inventory_with_spare() -> Inventory:
    data = valid_inventory()
    data["hosts"].append({"name": "pg4", "address": "10.0.0.14", "roles": []})
    return parse_inventory(data)


@pytest.mark.parametrize(
    ("name", "roles_after"),
    [
        ("pg4", [Role.db]),
        ("pg1", [Role.db, Role.etcd]),  # already db: not listed twice; implicit etcd membership pinned
        ("backup1", [Role.backup, Role.db]),
    ],
)
def test_with_db_host_adds_db_role(name: str, roles_after: list[Role]) -> None:
    inv = inventory_with_spare()
    after = inv.with_db_host(name)
    assert after.host(name).roles == roles_after
    assert after.host(name).has(Role.db)
    # the original is untouched (frozen models, a new inventory is returned)
    assert inv.find("pg4") is not None and inv.host("pg4").roles == []
    # the former implicit etcd members get an explicit etcd role; everyone else keeps their roles
    for host in after.hosts:
        if host.name == name:
            continue
        before = inv.host(host.name).roles
        expected = before + [Role.etcd] if host.name in ("pg1", "pg2", "pg3") and Role.etcd not in before else before
        assert host.roles == expected, host.name
    assert after.cluster == inv.cluster


def test_with_db_host_db_hosts_order() -> None:
    after = inventory_with_spare().with_db_host("pg4")
    assert [h.name for h in after.db_hosts] == ["pg1", "pg2", "pg3", "pg4"]


def test_with_db_host_keeps_explicit_etcd_membership() -> None:
    data = valid_inventory()
    for name in ("pg1", "pg2", "pg3"):
        set_host(name, roles=["db", "etcd"])(data)
    data["hosts"].append({"name": "pg4", "address": "10.0.0.14", "roles": []})
    after = parse_inventory(data).with_db_host("pg4")
    assert [h.name for h in after.etcd_members] == ["pg1", "pg2", "pg3"]


def test_with_db_host_does_not_change_implicit_etcd_membership() -> None:
    inv = inventory_with_spare()
    after = inv.with_db_host("pg4")
    assert [h.name for h in after.etcd_members] == [h.name for h in inv.etcd_members] == ["pg1", "pg2", "pg3"]


# ------------------------------------------------------------------------------ routing.detector


def test_detector_defaults_to_the_projects_own() -> None:
    routing = parse_inventory(valid_inventory(), SOURCE).cluster.routing
    assert routing is not None
    assert (routing.detector, routing.pgroute66, routing.uses_pgroute66) == ("bouwsteen", None, False)
    assert routing.detector_port == 8080


@pytest.mark.parametrize(
    ("settings", "url", "port", "group", "server_key"),
    [
        (None, "http://127.0.0.1:8080", 8080, None, "name"),
        ({}, "http://127.0.0.1:8080", 8080, None, "name"),
        ({"url": "http://localhost:8081", "group": "pgcluster"}, "http://localhost:8081", 8081, "pgcluster", "name"),
        ({"url": "http://[::1]:9000", "server_key": "address"}, "http://[::1]:9000", 9000, None, "address"),
        ({"url": "https://router1.example", "ca_file": "/etc/pgroute66/ca.crt"}, "https://router1.example", 443,
         None, "name"),
        ({"url": "http://10.0.0.31"}, "http://10.0.0.31", 80, None, "name"),
    ],
)
def test_detector_pgroute66(settings: dict | None, url: str, port: int, group: str | None, server_key: str) -> None:
    data = valid_inventory()
    data["cluster"]["routing"]["detector"] = "pgroute66"
    if settings is not None:
        data["cluster"]["routing"]["pgroute66"] = settings
    routing = parse_inventory(data, SOURCE).cluster.routing
    assert routing is not None and routing.uses_pgroute66
    spec = routing.pgroute66_settings
    assert (spec.url, spec.port, spec.group, spec.server_key) == (url, port, group, server_key)


def test_detector_pgroute66_survives_a_dump_and_reload() -> None:
    """with_db_host dumps every field (detector_port too) and validates the result again."""
    data = valid_inventory()
    data["cluster"]["routing"].update(detector="pgroute66", pgroute66={"group": "lab"})
    data["hosts"].append({"name": "pg4", "address": "10.0.0.14", "roles": []})
    grown = parse_inventory(data, SOURCE).with_db_host("pg4")
    routing = grown.cluster.routing
    assert routing is not None and routing.detector == "pgroute66"
    assert routing.pgroute66_settings.group == "lab"
    assert [h.name for h in grown.db_hosts] == ["pg1", "pg2", "pg3", "pg4"]


# ------------------------------------------------------------------------------ rendered strings (issue 14, item 4)

# Strings that reach rendered files, units, pg_hba lines or commands: each injection is refused at
# load time, naming the field. (id, mutation, field path, reason)
ATTACKS = [
    ("region-newline", set_cluster("object_store", "region", value="eu\nrepo1-storage-verify-tls=n"),
     "cluster.object_store.region", "String should match pattern"),
    ("region-space", set_cluster("object_store", "region", value="eu west"),
     "cluster.object_store.region", "String should match pattern"),
    ("data-directory-newline", set_cluster("postgres", "data_directory", value="/x\ncmd-ssh=/tmp/evil"),
     "cluster.postgres.data_directory", "String should match pattern"),
    ("data-directory-trailing-newline", set_cluster("postgres", "data_directory", value="/srv/pg\n"),
     "cluster.postgres.data_directory", "String should match pattern"),
    ("data-directory-tab", set_cluster("postgres", "data_directory", value="/srv/\tpg"),
     "cluster.postgres.data_directory", "String should match pattern"),
    ("data-directory-relative", set_cluster("postgres", "data_directory", value="srv/pg"),
     "cluster.postgres.data_directory", "String should match pattern"),
    ("data-directory-dotdot", set_cluster("postgres", "data_directory", value="/srv/../etc"),
     "cluster.postgres.data_directory", "a '.' or '..' component is not allowed"),
    ("data-directory-root", set_cluster("postgres", "data_directory", value="/"),
     "cluster.postgres.data_directory", "String should match pattern"),
    ("data-directory-etc", set_cluster("postgres", "data_directory", value="/etc"),
     "cluster.postgres.data_directory", "/etc is a system folder"),
    ("data-directory-var-lib", set_cluster("postgres", "data_directory", value="/var/lib"),
     "cluster.postgres.data_directory", "/var/lib is a system folder"),
    ("data-directory-under-proc", set_cluster("postgres", "data_directory", value="/proc/1"),
     "cluster.postgres.data_directory", "/proc/1 is a system folder"),
    ("data-directory-quote", set_cluster("postgres", "data_directory", value="/srv/pg'$(id)"),
     "cluster.postgres.data_directory", "String should match pattern"),
    ("data-path-unit-injection",
     set_cluster("object_store", "data_path", value="/srv/s3\nExecStartPre=+/bin/sh -c 'id > /tmp/p'"),
     "cluster.object_store.data_path", "String should match pattern"),
    ("data-path-space", set_cluster("object_store", "data_path", value="/srv/s3 data"),
     "cluster.object_store.data_path", "String should match pattern"),
    ("data-path-srv", set_cluster("object_store", "data_path", value="/srv"),
     "cluster.object_store.data_path", "/srv is a system folder"),
    ("data-path-usr", set_cluster("object_store", "data_path", value="/usr"),
     "cluster.object_store.data_path", "/usr is a system folder"),
    ("host-ssh-user-newline", set_host("pg1", ssh_user="root\nProxyCommand sh"), "hosts[0].ssh_user",
     "String should match pattern"),
    ("host-ssh-user-option", set_host("pg1", ssh_user="-oProxyCommand=sh"), "hosts[0].ssh_user",
     "String should match pattern"),
    ("ssh-user-space", None, "ssh.user", "String should match pattern"),
    ("ssh-key-file-newline", None, "ssh.key_file", "String should match pattern"),
    ("ssh-known-hosts-dotdot", None, "ssh.known_hosts_file", "a '.' or '..' component is not allowed"),
    ("store-prefix-newline", set_cluster("stolon", "store_prefix", value="stolon\n--store-backend=x"),
     "cluster.stolon.store_prefix", "String should match pattern"),
    ("store-prefix-dotdot", set_cluster("stolon", "store_prefix", value="stolon/../other"),
     "cluster.stolon.store_prefix", "String should match pattern"),
    ("store-prefix-space", set_cluster("stolon", "store_prefix", value="stolon cluster"),
     "cluster.stolon.store_prefix", "String should match pattern"),
    ("etcd-prefix-dotdot", set_cluster("etcd", "prefix", value="/bouwsteen/../x"),
     "cluster.etcd.prefix", "String should match pattern"),
    ("guc-name-newline", set_cluster("postgres", "parameters", value={"work_mem = 1\narchive_command": "x"}),
     "cluster.postgres.parameters.work_mem = 1\narchive_command.[key]", "String should match pattern"),
    ("guc-value-newline", set_cluster("postgres", "parameters", value={"work_mem": "4MB\narchive_command = 'sh'"}),
     "cluster.postgres.parameters.work_mem", "String should match pattern"),
    ("guc-value-control", set_cluster("postgres", "parameters", value={"work_mem": "4MB\x1b"}),
     "cluster.postgres.parameters.work_mem", "String should match pattern"),
    ("endpoint-newline", set_cluster("object_store", "endpoint", value="https://backup1.example:9000\nx"),
     "cluster.object_store.endpoint", "String should match pattern"),
    ("endpoint-empty-label", set_cluster("object_store", "endpoint", value="https://backup1..example:9000"),
     "cluster.object_store.endpoint", "String should match pattern"),
    ("endpoint-port-range", set_cluster("object_store", "endpoint", value="https://backup1.example:99999"),
     "cluster.object_store.endpoint", "port 99999 is out of range 1-65535"),
    ("bucket-double-dot", set_cluster("object_store", "bucket", value="a..b"),
     "cluster.object_store.bucket", "two periods"),
    ("bucket-ip", set_cluster("object_store", "bucket", value="192.168.5.4"),
     "cluster.object_store.bucket", "must not look like an IP address"),
    ("bucket-xn", set_cluster("object_store", "bucket", value="xn--bucket"),
     "cluster.object_store.bucket", "S3 reserves this prefix or suffix"),
    ("bucket-uppercase", set_cluster("object_store", "bucket", value="Bouwsteen"),
     "cluster.object_store.bucket", "String should match pattern"),
    ("interface-dotdot", set_cluster("routing", "interface", value=".."),
     "cluster.routing.interface", "'.' and '..' are not interface names"),
    ("interface-newline", set_cluster("routing", "interface", value="eth0\n"),
     "cluster.routing.interface", "String should match pattern"),
    ("pgroute66-ca-dotdot", chain(set_cluster("routing", "detector", value="pgroute66"),
                                  set_cluster("routing", "pgroute66", "url", value="https://127.0.0.1:8443"),
                                  set_cluster("routing", "pgroute66", "ca_file", value="/etc/../root/ca.crt")),
     "cluster.routing.pgroute66.ca_file", "a '.' or '..' component is not allowed"),
    # Collisions and counts.
    ("db-host-is-router", set_host("pg1", roles=["db", "router"]), "hosts[0].roles", "is both 'db' and 'router'"),
    ("postgres-port-is-patroni-rest", set_cluster("patroni", "rest_port", value=5432), "cluster.patroni.rest_port",
     "5432 clashes with cluster.postgres.port"),
    ("patroni-proxy-is-postgres", set_cluster("patroni", "proxy_port", value=5432), "cluster.patroni.proxy_port",
     "5432 clashes with cluster.postgres.port"),
    ("patroni-proxy-is-rest", set_cluster("patroni", "proxy_port", value=8008), "cluster.patroni.proxy_port",
     "8008 clashes with cluster.patroni.rest_port"),
    ("etcd-client-is-peer", set_cluster("etcd", value={"client_port": 2380, "peer_port": 2380}),
     "cluster.etcd.peer_port", "2380 clashes with cluster.etcd.client_port"),
    ("etcd-peer-is-postgres", set_cluster("etcd", value={"peer_port": 5432}),
     "cluster.etcd.peer_port", "5432 clashes with cluster.postgres.port"),
    ("rw-port-is-stats", set_cluster("routing", "stats_port", value=5432), "cluster.routing.stats_port",
     "5432 clashes with cluster.routing.rw_port"),
    ("rw-port-is-ro", set_cluster("routing", "ro_port", value=5432), "cluster.routing.ro_port",
     "5432 clashes with cluster.routing.rw_port"),
    ("four-etcd-members", chain(*(set_host(n, roles=["db", "etcd"]) for n in ("pg1", "pg2", "pg3")),
                                set_host("backup1", roles=["backup", "etcd"])),
     "hosts", "4 etcd member(s) (pg1, pg2, pg3, backup1); an even count"),
]


def _set_ssh(**fields: Any) -> Callable[[dict], None]:
    def mutate(data: dict) -> None:
        data.setdefault("ssh", {}).update(fields)
    return mutate


_SSH_ATTACKS = {
    "ssh-user-space": _set_ssh(user="root -oProxyCommand=sh"),
    "ssh-key-file-newline": _set_ssh(key_file="/root/.ssh/id\nProxyCommand=sh"),
    "ssh-known-hosts-dotdot": _set_ssh(known_hosts_file="/var/lib/bouwsteen/../../etc/ssh/known"),
}
ATTACKS = [(i, _SSH_ATTACKS.get(i, m), p, r) for i, m, p, r in ATTACKS]


@pytest.mark.parametrize(("mutate", "path", "reason"), [c[1:] for c in ATTACKS], ids=[c[0] for c in ATTACKS])
def test_injection_and_collision_refused_naming_the_field(mutate, path: str, reason: str) -> None:
    data = valid_inventory()
    mutate(data)
    with pytest.raises(InventoryError) as info:
        parse_inventory(data, SOURCE)
    message = str(info.value)
    prefix = f"{SOURCE}: {path}: "
    assert message.startswith(f"{SOURCE}: ")
    assert prefix in message and reason in message.split(prefix, 1)[1], (
        f"no {prefix!r} followed by {reason!r} in:\n{message}")


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(set_cluster("object_store", "region", value="eu-west-1"), id="region-aws"),
        pytest.param(set_cluster("object_store", "region", value="garage_local"), id="region-underscore"),
        pytest.param(set_cluster("postgres", "data_directory", value="/srv/postgresql/15/main"), id="data-dir"),
        pytest.param(set_cluster("postgres", "data_directory", value="/usr/local/pgsql/data"), id="data-dir-usr-local"),
        pytest.param(set_cluster("postgres", "data_directory", value="/var/lib/postgresql/16/main"), id="data-dir-deb"),
        pytest.param(set_cluster("postgres", "data_directory", value="/data/pg.15@site+a"), id="data-dir-chars"),
        pytest.param(set_cluster("object_store", "data_path", value="/data/s3"), id="data-path"),
        pytest.param(set_host("pg1", ssh_user="deploy_user-1"), id="ssh-user"),
        pytest.param(_set_ssh(user="_svc", key_file="/var/lib/bouwsteen/lab/id_ed25519",
                              known_hosts_file="/var/lib/bouwsteen/lab/known_hosts"), id="ssh-files"),
        pytest.param(set_cluster("stolon", "store_prefix", value="/stolon/"), id="store-prefix-slashes"),
        pytest.param(set_cluster("stolon", "store_prefix", value="Site_A/stolon-1"), id="store-prefix"),
        pytest.param(set_cluster("postgres", "parameters", value={
            "work_mem": "64MB", "shared_preload_libraries": "pg_stat_statements,auto_explain",
            "auto_explain.log_min_duration": "250ms", "log_line_prefix": "%m [%p] %q%u@%d ",
            "search_path": '"$user", public', "empty": "",
        }), id="guc-parameters"),
        pytest.param(set_cluster("object_store", "bucket", value="bouwsteen.site-a"), id="bucket-dotted"),
        pytest.param(set_cluster("object_store", "endpoint", value="https://s3.eu-west-1.example.org:443/"),
                     id="endpoint-fqdn"),
        pytest.param(set_cluster("routing", "interface", value="bond0.100"), id="interface-vlan"),
        pytest.param(set_cluster("etcd", value={"client_port": 12379, "peer_port": 12380}), id="etcd-ports"),
        pytest.param(chain(*(set_host(n, roles=["db", "etcd"]) for n in ("pg1", "pg2", "pg3")),
                           lambda d: d["hosts"].extend([
                               {"name": "etcd4", "address": "10.0.0.44", "roles": ["etcd"]},
                               {"name": "etcd5", "address": "10.0.0.45", "roles": ["etcd"]}])), id="five-etcd"),
        pytest.param(set_cluster("ha_manager", value="stolon"), id="stolon-defaults"),
    ],
)
def test_valid_strings_are_accepted(mutate) -> None:
    data = valid_inventory()
    mutate(data)
    assert isinstance(parse_inventory(data, SOURCE), Inventory)


def test_error_lines_stay_one_line_per_error() -> None:
    """A newline in a refused value never breaks the file/field/reason line format."""
    data = valid_inventory()
    set_cluster("object_store", "region", value="eu\nrepo1-storage-verify-tls=n")(data)
    with pytest.raises(InventoryError) as info:
        parse_inventory(data, SOURCE)
    assert str(info.value).splitlines() == [
        f"{SOURCE}: cluster.object_store.region: String should match pattern '^[a-z0-9][a-z0-9_-]{{0,62}}$'"]


def test_lab_inventory_still_loads(tmp_path: Path) -> None:
    """The inventory `bouwsteen lab up` writes (lab/manager.py) passes the stricter checks, default home too."""
    from lab.manager import Lab
    from lab.paths import LabPaths

    for paths in (LabPaths.default(), LabPaths(Path("/var/lib/bouwsteen")), LabPaths(tmp_path)):
        document = Lab(paths=paths).inventory_document()
        inv = parse_inventory(document, str(paths.inventory))
        assert [h.name for h in inv.etcd_members] == ["pg1", "pg2", "pg3"]
        # As written to disk and read back.
        text = yaml.safe_dump(document, sort_keys=False)
        assert load_inventory(write(tmp_path, text, "lab.yaml")) == inv
        # And after add_standby grows the cluster by pg4.
        assert [h.name for h in inv.with_db_host("pg4").db_hosts] == ["pg1", "pg2", "pg3", "pg4"]


def test_the_labs_clone_target_is_a_cluster_of_its_own(tmp_path: Path) -> None:
    """`acc`, clone_cluster's target in the lab: its own hosts and etcd, the shared backup server;
    and the main cluster's inventory does not list the clone's hosts (no runbook of it touches them)."""
    from lab.manager import Lab
    from lab.paths import LabPaths
    from lab.topology import CLONE_CLUSTER_NAME
    from tasks.planning.backup import clone_refusals

    lab = Lab(paths=LabPaths(tmp_path))
    main = parse_inventory(lab.inventory_document())
    clone = parse_inventory(lab.inventory_document(CLONE_CLUSTER_NAME))
    assert clone.cluster.name == "acc" and clone.cluster.routing is None
    assert [h.name for h in clone.etcd_members] == ["acc1", "acc2", "acc3"]
    assert [h.name for h in clone.hosts] == ["backup1", "acc1", "acc2", "acc3"]
    assert not any(h.name.startswith("acc") for h in main.hosts)
    assert clone_refusals(main, clone) == []
    assert lab.inventory_path(CLONE_CLUSTER_NAME) == tmp_path / "lab" / "acc" / "inventory.yaml"
