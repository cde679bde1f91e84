"""tasks/adapters/routing/config.py: HAProxy, keepalived and detector configuration, secrets handling."""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest
import yaml

from blocks.inventory import Inventory, parse_inventory
from tasks.desired import ha_driver
from tasks.adapters.routing.config import (
    DETECTOR_BIN,
    DETECTOR_CFG,
    DETECTOR_UNIT,
    HAPROXY_CFG,
    KEEPALIVED_CFG,
    ROUTER_CHECK,
    RoutingSecrets,
    RoutingSpecError,
    render_detector_config,
    render_haproxy,
    render_keepalived,
    router_files,
    router_units,
)

SECRETS = RoutingSecrets(vrrp_password="Vq7rXz2k", monitor_user="bouwsteen_monitor",
                         monitor_password="Mon-S3cret/pw+9")
DB = {"pg1": "10.0.0.11", "pg2": "10.0.0.12", "pg3": "10.0.0.13"}
ROUTERS = {"router1": "10.0.0.31", "router2": "10.0.0.32"}


def make_inventory(routing: dict[str, Any] | None = None, routers: dict[str, str] | None = None,
                   **cluster: Any) -> Inventory:
    hosts = [{"name": n, "address": a, "roles": ["db"]} for n, a in DB.items()]
    hosts += [{"name": n, "address": a, "roles": ["router"]} for n, a in (routers or ROUTERS).items()]
    base: dict[str, Any] = {
        "name": "lab",
        "network": "10.0.0.0/24",
        "routing": {"vip": "10.0.0.100", **(routing or {})},
        "admin_networks": ["10.0.0.1/32"],
    }
    base.update(cluster)
    return parse_inventory({"cluster": base, "hosts": hosts})


INV = make_inventory()
STOLON = make_inventory(ha_manager="stolon")


def haproxy_cfg(inv: Inventory, router: str) -> str:
    return render_haproxy(inv, inv.host(router), ha_driver(inv).rw_port(inv))


def section(text: str, header: str) -> list[str]:
    """The indented lines under `header` (up to the next blank line)."""
    lines = text.splitlines()
    start = lines.index(header) + 1
    out = []
    for line in lines[start:]:
        if not line.strip():
            break
        out.append(line.strip())
    return out


# ----------------------------------------------------------------------------- HAProxy, Patroni


@pytest.mark.parametrize("router", ["router1", "router2"])
def test_haproxy_patroni_rw_backend(router: str) -> None:
    rw = section(haproxy_cfg(INV, router), "backend postgres_rw")
    assert "option httpchk" in rw
    assert "http-check send meth GET uri-lf /v1/primary/%[srv_name]?group=lab" in rw
    assert "http-check expect status 200" in rw
    assert [line for line in rw if line.startswith("server ")] == [
        "server pg1 10.0.0.11:5432",
        "server pg2 10.0.0.12:5432",
        "server pg3 10.0.0.13:5432",
    ]
    default = next(line for line in rw if line.startswith("default-server "))
    assert "check port 8080 addr 127.0.0.1" in default
    assert "on-marked-down shutdown-sessions" in default
    assert not any(line.startswith("balance leastconn") for line in rw)


def test_haproxy_patroni_ro_backend() -> None:
    ro = section(haproxy_cfg(INV, "router1"), "backend postgres_ro")
    assert ro[0] == "balance leastconn"
    assert "http-check send meth GET uri-lf /v1/standby/%[srv_name]?group=lab" in ro
    assert not any("/v1/primary/" in line for line in ro)
    assert [line for line in ro if line.startswith("server ")] == [
        "server pg1 10.0.0.11:5432",
        "server pg2 10.0.0.12:5432",
        "server pg3 10.0.0.13:5432",
    ]


@pytest.mark.parametrize(
    ("cluster", "routing", "group", "pg_port", "detector"),
    [
        ({}, {}, "lab", 5432, 8080),
        ({"name": "prod-east"}, {"detector_port": 9090}, "prod-east", 5432, 9090),
        ({"postgres": {"port": 6432}}, {"rw_port": 5000, "ro_port": 5001}, "lab", 6432, 8080),
    ],
)
def test_haproxy_follows_inventory(cluster: dict, routing: dict, group: str, pg_port: int, detector: int) -> None:
    inv = make_inventory(routing, **cluster)
    text = haproxy_cfg(inv, "router1")
    assert f"    http-check send meth GET uri-lf /v1/primary/%[srv_name]?group={group}" in text.splitlines()
    assert f"    http-check send meth GET uri-lf /v1/standby/%[srv_name]?group={group}" in text.splitlines()
    assert text.count(f"check port {detector} addr 127.0.0.1") == 2
    for name, address in DB.items():
        assert text.count(f"    server {name} {address}:{pg_port}\n") == 2
    assert section(text, "frontend postgres_rw") == [f"bind :{inv.cluster.routing.rw_port}",  # type: ignore[union-attr]
                                                     "default_backend postgres_rw"]
    assert section(text, "frontend postgres_ro") == [f"bind :{inv.cluster.routing.ro_port}",  # type: ignore[union-attr]
                                                     "default_backend postgres_ro"]


@pytest.mark.parametrize(("router", "address"), list(ROUTERS.items()))
def test_haproxy_stats_bound_to_router_and_admin_only(router: str, address: str) -> None:
    stats = section(haproxy_cfg(INV, router), "frontend stats")
    assert [line for line in stats if line.startswith("bind ")] == [f"bind {address}:8404", "bind 127.0.0.1:8404"]
    assert "acl admin_net src 127.0.0.1/32 10.0.0.1/32" in stats
    assert "http-request deny unless admin_net" in stats
    assert "stats hide-version" in stats
    # Never bound to all addresses or to the VIP.
    assert not any(re.match(r"bind (:|0\.0\.0\.0:|10\.0\.0\.100:)", line) for line in stats)


@pytest.mark.parametrize(
    ("networks", "acl"),
    [
        (["10.0.0.1/32"], "acl admin_net src 127.0.0.1/32 10.0.0.1/32"),
        (["10.0.0.0/28", "192.168.5.0/24"], "acl admin_net src 127.0.0.1/32 10.0.0.0/28 192.168.5.0/24"),
        ([], "acl admin_net src 127.0.0.1/32 127.0.0.1/32"),
    ],
)
def test_haproxy_stats_acl(networks: list[str], acl: str) -> None:
    inv = make_inventory(admin_networks=networks)
    assert acl in section(haproxy_cfg(inv, "router1"), "frontend stats")


@pytest.mark.parametrize("inv", [INV, STOLON], ids=["patroni", "stolon"])
def test_haproxy_never_forks(inv: Inventory) -> None:
    text = haproxy_cfg(inv, "router1")
    assert "external-check" not in text
    assert "insecure-fork-wanted" not in text
    assert "lua" not in text.lower()


# ----------------------------------------------------------------------------- HAProxy, stolon


def test_haproxy_stolon_rw_goes_to_the_proxy_the_detector_names() -> None:
    # stolon-proxy keeps :25432 open with no master: only the detector can say a server is the one.
    text = haproxy_cfg(STOLON, "router1")
    rw = section(text, "backend postgres_rw")
    assert [line for line in rw if line.startswith("server ")] == [
        "server pg1 10.0.0.11:25432",
        "server pg2 10.0.0.12:25432",
        "server pg3 10.0.0.13:25432",
    ]
    assert "http-check send meth GET uri-lf /v1/primary/%[srv_name]?group=lab" in rw
    assert not any(line.startswith("balance first") for line in rw)
    ro = section(text, "backend postgres_ro")
    assert "http-check send meth GET uri-lf /v1/standby/%[srv_name]?group=lab" in ro
    assert [line for line in ro if line.startswith("server ")] == [
        "server pg1 10.0.0.11:5432",
        "server pg2 10.0.0.12:5432",
        "server pg3 10.0.0.13:5432",
    ]


def test_haproxy_stolon_proxy_port_from_inventory() -> None:
    inv = make_inventory(ha_manager="stolon", stolon={"proxy_port": 26000})
    rw = section(haproxy_cfg(inv, "router1"), "backend postgres_rw")
    assert [line for line in rw if line.startswith("server ")][0] == "server pg1 10.0.0.11:26000"


# ----------------------------------------------------------------------------- keepalived


def keepalived(inv: Inventory, router: str, secrets: RoutingSecrets = SECRETS) -> list[str]:
    return [line.strip() for line in render_keepalived(inv, inv.host(router), secrets).splitlines()]


@pytest.mark.parametrize(
    ("router", "priority", "src", "peers"),
    [
        ("router1", 100, "10.0.0.31", ["10.0.0.32"]),
        ("router2", 90, "10.0.0.32", ["10.0.0.31"]),
    ],
)
def test_keepalived_per_router(router: str, priority: int, src: str, peers: list[str]) -> None:
    text = render_keepalived(INV, INV.host(router), SECRETS)
    lines = [line.strip() for line in text.splitlines()]
    assert "state BACKUP" in lines
    assert "state MASTER" not in lines
    assert "nopreempt" in lines
    assert f"virtual_router_id {INV.cluster.virtual_router_id}" in lines
    assert f"priority {priority}" in lines
    assert f"router_id {router}" in lines
    assert f"unicast_src_ip {src}" in lines
    block = text.split("unicast_peer {\n", 1)[1].split("}", 1)[0]
    assert block.split() == peers
    assert "auth_type PASS" in lines
    assert "auth_pass Vq7rXz2k" in lines
    assert "10.0.0.100/24 dev eth0" in lines
    assert "interface eth0" in lines


def test_keepalived_priorities_differ_per_router() -> None:
    three = make_inventory(routers={"router1": "10.0.0.31", "router2": "10.0.0.32", "router3": "10.0.0.33"})
    priorities = []
    for router in ("router1", "router2", "router3"):
        lines = keepalived(three, router)
        priorities += [int(line.split()[1]) for line in lines if line.startswith("priority ")]
        block = render_keepalived(three, three.host(router), SECRETS).split("unicast_peer {\n", 1)[1].split("}", 1)[0]
        assert sorted(block.split()) == sorted(a for n, a in {"router1": "10.0.0.31", "router2": "10.0.0.32",
                                                               "router3": "10.0.0.33"}.items() if n != router)
    assert priorities == [100, 90, 80]


@pytest.mark.parametrize(
    ("routing", "cluster", "vrid", "vip_line", "interface"),
    [
        ({"virtual_router_id": 42}, {}, 42, "10.0.0.100/24 dev eth0", "eth0"),
        ({"virtual_router_id": 1, "interface": "ens18"}, {}, 1, "10.0.0.100/24 dev ens18", "ens18"),
        ({"vip": "10.0.0.200"}, {"network": "10.0.0.0/16"}, None, "10.0.0.200/16 dev eth0", "eth0"),
    ],
)
def test_keepalived_vrid_vip_prefix_interface(routing: dict, cluster: dict, vrid: int | None, vip_line: str,
                                              interface: str) -> None:
    inv = make_inventory(routing, **cluster)
    lines = keepalived(inv, "router1")
    expected_vrid = vrid if vrid is not None else inv.cluster.virtual_router_id
    assert 1 <= expected_vrid <= 255
    assert f"virtual_router_id {expected_vrid}" in lines
    assert vip_line in lines
    assert f"interface {interface}" in lines


def test_keepalived_vrid_stable_per_cluster_name() -> None:
    a, b = make_inventory(name="alpha"), make_inventory(name="alpha")
    assert a.cluster.virtual_router_id == b.cluster.virtual_router_id
    assert f"virtual_router_id {a.cluster.virtual_router_id}" in keepalived(a, "router1")


@pytest.mark.parametrize(("preempt", "has_nopreempt"), [(False, True), (True, False)])
def test_keepalived_preempt(preempt: bool, has_nopreempt: bool) -> None:
    lines = keepalived(make_inventory({"preempt": preempt}), "router1")
    assert ("nopreempt" in lines) is has_nopreempt
    assert "state BACKUP" in lines


def test_keepalived_instance_name_and_track_script() -> None:
    lines = keepalived(make_inventory(name="prod-east"), "router1")
    assert "vrrp_instance VI_prod_east {" in lines
    assert f'script "{ROUTER_CHECK}"' in lines
    assert "chk_router" in lines


# ----------------------------------------------------------------------------- detector config


@pytest.mark.parametrize("password", ["Mon-S3cret/pw+9", "p@ss wörd:\"'", "x"])
def test_detector_config(password: str) -> None:
    secrets = RoutingSecrets("Vq7rXz2k", "bouwsteen_monitor", password)
    text = render_detector_config(INV, secrets)
    assert text.startswith("# Managed by bouwsteen routing_rollout.\n")
    doc = yaml.safe_load(text)
    assert list(doc["hosts"]) == ["pg1", "pg2", "pg3"]
    for name, address in DB.items():
        entry = doc["hosts"][name]
        assert entry["host"] == address
        assert entry["port"] == 5432
        assert entry["user"] == "bouwsteen_monitor"
        assert entry["dbname"] == "postgres"
        assert base64.b64decode(entry["b64password"]).decode() == password
        assert "password" not in entry
    assert doc["groups"] == {"lab": ["pg1", "pg2", "pg3"]}
    assert doc["bind"] == "127.0.0.1"
    assert doc["port"] == 8080
    # The clear-text password never appears in the rendered file.
    if len(password) > 1:
        assert password not in text


def test_detector_config_follows_inventory() -> None:
    inv = make_inventory({"detector_port": 9191}, name="prod", postgres={"port": 6432})
    doc = yaml.safe_load(render_detector_config(inv, SECRETS))
    assert doc["port"] == 9191
    assert doc["groups"] == {"prod": ["pg1", "pg2", "pg3"]}
    assert {h["port"] for h in doc["hosts"].values()} == {6432}


# ----------------------------------------------------------------------------- RoutingSecrets.check


@pytest.mark.parametrize("vrrp", ["a", "Ab3", "12345678", "ABCDEFGH", "Vq7rXz2k"])
def test_routing_secrets_accepted(vrrp: str) -> None:
    RoutingSecrets(vrrp, "mon", "pw").check()


@pytest.mark.parametrize(
    ("vrrp", "monitor", "message"),
    [
        ("", "pw", "routing credentials: vrrp_password must be 1-8 letters or digits (VRRP PASS)"),
        ("123456789", "pw", "routing credentials: vrrp_password must be 1-8 letters or digits (VRRP PASS)"),
        ("abc-def", "pw", "routing credentials: vrrp_password must be 1-8 letters or digits (VRRP PASS)"),
        ("abc def", "pw", "routing credentials: vrrp_password must be 1-8 letters or digits (VRRP PASS)"),
        ("pass\n", "pw", "routing credentials: vrrp_password must be 1-8 letters or digits (VRRP PASS)"),
        ("a}b", "pw", "routing credentials: vrrp_password must be 1-8 letters or digits (VRRP PASS)"),
        ("Vq7rXz2k", "", "database credentials: monitor_password is needed by the primary detector"),
    ],
)
def test_routing_secrets_refused(vrrp: str, monitor: str, message: str) -> None:
    secrets = RoutingSecrets(vrrp, "mon", monitor)
    with pytest.raises(RoutingSpecError) as info:
        secrets.check()
    assert str(info.value) == message
    if vrrp:
        assert vrrp not in str(info.value)
    with pytest.raises(RoutingSpecError):
        router_files(INV, INV.host("router1"), secrets, 5432)


@pytest.mark.parametrize("vrrp", ["pässwört", "１２３４５"])
def test_routing_secrets_vrrp_password_must_be_8_ascii_bytes(vrrp: str) -> None:
    with pytest.raises(RoutingSpecError):
        RoutingSecrets(vrrp, "mon", "pw").check()


# ----------------------------------------------------------------------------- router_files


@pytest.mark.parametrize("inv", [INV, STOLON], ids=["patroni", "stolon"])
@pytest.mark.parametrize("router", ["router1", "router2"])
def test_router_files_secret_flags(inv: Inventory, router: str) -> None:
    files = {f.path: f for f in router_files(inv, inv.host(router), SECRETS, ha_driver(inv).rw_port(inv))}
    assert set(files) == {DETECTOR_BIN, DETECTOR_CFG, f"/etc/systemd/system/{DETECTOR_UNIT}", HAPROXY_CFG,
                          ROUTER_CHECK, KEEPALIVED_CFG}
    assert {p for p, f in files.items() if f.secret} == {DETECTOR_CFG, KEEPALIVED_CFG}
    for path in (DETECTOR_CFG, KEEPALIVED_CFG):
        assert files[path].mode == 0o600
    assert files[DETECTOR_CFG].owner == "bouwsteen-detector"
    assert files[KEEPALIVED_CFG].owner == "root"
    assert files[HAPROXY_CFG].content == haproxy_cfg(inv, router)
    assert files[KEEPALIVED_CFG].content == render_keepalived(inv, inv.host(router), SECRETS)
    assert files[DETECTOR_CFG].content == render_detector_config(inv, SECRETS)
    for path in (DETECTOR_BIN, ROUTER_CHECK):
        assert files[path].mode == 0o755


@pytest.mark.parametrize("router", ["router1", "router2"])
def test_no_secret_in_non_secret_files(router: str) -> None:
    secret_values = [
        SECRETS.vrrp_password,
        SECRETS.monitor_password,
        base64.b64encode(SECRETS.monitor_password.encode()).decode(),
    ]
    files = router_files(INV, INV.host(router), SECRETS, 5432)
    public = [f for f in files if not f.secret]
    assert len(public) == 4
    for f in public:
        for value in secret_values:
            assert value not in f.content, f"{f.path} contains a secret"
    # ...and the secret files really carry them (the check above is not vacuous).
    secret_text = "".join(f.content for f in files if f.secret)
    for value in (secret_values[0], secret_values[2]):
        assert value in secret_text


def test_router_units_restart_and_reload() -> None:
    units = {u.name: u for u in router_units()}
    assert list(units) == [DETECTOR_UNIT, "haproxy.service", "keepalived.service"]
    assert units[DETECTOR_UNIT].restart_on == (DETECTOR_BIN, DETECTOR_CFG, f"/etc/systemd/system/{DETECTOR_UNIT}")
    assert units["haproxy.service"].reload_on == (HAPROXY_CFG,)
    assert units["haproxy.service"].restart_on == ()
    assert units["keepalived.service"].reload_on == (KEEPALIVED_CFG, ROUTER_CHECK)
