"""tasks/adapters/routing/config.py: HAProxy, keepalived and detector configuration, secrets handling."""

from __future__ import annotations

import base64
import copy
import dataclasses
import http.server
import json
import re
import subprocess
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from blocks.inventory import Inventory, Role, parse_inventory
from lab.manager import Lab
from lab.paths import LabPaths
from tasks.adapters.pki import HOST_CA
from tasks.adapters.routing.config import (
    DETECTOR_BIN,
    DETECTOR_CFG,
    DETECTOR_SOURCE,
    DETECTOR_UNIT,
    DETECTOR_UNIT_TEXT,
    HAPROXY_CFG,
    KEEPALIVED_CFG,
    PGROUTE66_PRIMARY_CHECK,
    PGROUTE66_STANDBY_CHECK,
    ROUTER_CHECK,
    RoutingSecrets,
    RoutingSpecError,
    render_detector_config,
    render_haproxy,
    render_keepalived,
    render_pgroute66_primary_check,
    render_pgroute66_standby_check,
    render_router_check,
    router_files,
    router_units,
)
from tasks.desired import ha_driver

SECRETS = RoutingSecrets(vrrp_password="Vq7rXz2k", monitor_user="bouwsteen_monitor",
                         monitor_password="Mon-S3cret/pw+9")
LAB_SECRETS = dataclasses.replace(SECRETS, ca_bundle_pem="-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
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
    # rw goes through each database host's port to the primary (HAProxy there under Patroni).
    assert [line for line in rw if line.startswith("server ")] == [
        "server pg1 10.0.0.11:25432",
        "server pg2 10.0.0.12:25432",
        "server pg3 10.0.0.13:25432",
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
        assert text.count(f"    server {name} {address}:{pg_port}\n") == 1  # ro: PostgreSQL itself
        assert text.count(f"    server {name} {address}:25432\n") == 1  # rw: the port to the primary
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
        ("router1", 250, "10.0.0.31", ["10.0.0.32"]),
        ("router2", 240, "10.0.0.32", ["10.0.0.31"]),
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
    assert priorities == [250, 240, 230]


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


# ----------------------------------------------------------------------------- the lab, unchanged

# What the lab rendered before the detector became an inventory option (commit a2e9de6), with the
# SECRETS above: the default detector must keep every router file byte for byte.
LAB_HAPROXY_ROUTER1 = """\
# Managed by bouwsteen routing_rollout; validated with `haproxy -c` before every reload.
global
    log /dev/log local0
    maxconn 4096
    user haproxy
    group haproxy
    stats socket /run/haproxy/admin.sock mode 660 level admin expose-fd listeners

defaults
    mode tcp
    log global
    option tcplog
    option dontlognull
    timeout connect 3s
    timeout client 30m
    timeout server 30m
    timeout check 2s
    retries 2

frontend postgres_rw
    bind :5432
    default_backend postgres_rw

frontend postgres_ro
    bind :5433
    default_backend postgres_ro

backend postgres_rw
    retries 0
    option httpchk
    http-check send meth GET uri-lf /v1/primary/%[srv_name]?group=lab
    http-check expect status 200
    default-server inter 1s fastinter 500ms downinter 250ms fall 2 rise 1 on-marked-down shutdown-sessions check port 8080 addr 127.0.0.1 maxconn 1000
    server pg1 172.29.66.11:25432
    server pg2 172.29.66.12:25432
    server pg3 172.29.66.13:25432

backend postgres_ro
    balance leastconn
    option httpchk
    http-check send meth GET uri-lf /v1/standby/%[srv_name]?group=lab
    http-check expect status 200
    default-server inter 2s fastinter 1s fall 2 rise 2 on-marked-down shutdown-sessions check port 8080 addr 127.0.0.1 maxconn 1000
    server pg1 172.29.66.11:5432
    server pg2 172.29.66.12:5432
    server pg3 172.29.66.13:5432

frontend stats
    mode http
    bind 172.29.66.31:8404
    bind 127.0.0.1:8404
    acl admin_net src 127.0.0.1/32 172.29.66.1/32
    http-request deny unless admin_net
    stats enable
    stats uri /stats
    stats refresh 5s
    stats hide-version
"""

LAB_KEEPALIVED_ROUTER1 = """\
# Managed by bouwsteen routing_rollout.
global_defs {
    router_id router1
    script_user root
    enable_script_security
}

vrrp_script chk_router {
    # HAProxy alive and the primary detector answering; otherwise this router gives the VIP up.
    script "/usr/local/lib/bouwsteen/check-router"
    interval 1
    timeout 2
    fall 2
    rise 2
}

vrrp_instance VI_lab {
    state BACKUP
    interface eth0
    virtual_router_id 132
    priority 250
    advert_int 1
    nopreempt
    authentication {
        auth_type PASS
        auth_pass Vq7rXz2k
    }
    unicast_src_ip 172.29.66.31
    unicast_peer {
        172.29.66.32
    }
    virtual_ipaddress {
        172.29.66.100/24 dev eth0
    }
    track_script {
        chk_router
    }
}
"""

LAB_DETECTOR_CONFIG = """\
# Managed by bouwsteen routing_rollout.
hosts:
  pg1:
    host: 172.29.66.11
    port: 5432
    user: bouwsteen_monitor
    dbname: postgres
    connect_timeout: 2
    b64password: TW9uLVMzY3JldC9wdys5
    sslmode: verify-full
    sslrootcert: /etc/bouwsteen/tls/ca.crt
  pg2:
    host: 172.29.66.12
    port: 5432
    user: bouwsteen_monitor
    dbname: postgres
    connect_timeout: 2
    b64password: TW9uLVMzY3JldC9wdys5
    sslmode: verify-full
    sslrootcert: /etc/bouwsteen/tls/ca.crt
  pg3:
    host: 172.29.66.13
    port: 5432
    user: bouwsteen_monitor
    dbname: postgres
    connect_timeout: 2
    b64password: TW9uLVMzY3JldC9wdys5
    sslmode: verify-full
    sslrootcert: /etc/bouwsteen/tls/ca.crt
groups:
  lab:
  - pg1
  - pg2
  - pg3
bind: 127.0.0.1
port: 8080
query_timeout: 1.0
cache_ms: 200
max_standby_lag_bytes: 16777216
max_standby_staleness_seconds: 10
"""

LAB_ROUTER_CHECK = """\
#!/bin/sh
# keepalived track script: the router is fit to hold the VIP when HAProxy runs and the primary
# detector answers. Written by bouwsteen routing_rollout.
/usr/bin/killall -0 haproxy 2>/dev/null || exit 1
exec /usr/bin/curl -sf -m 1 -o /dev/null http://127.0.0.1:8080/healthz
"""

LAB_DETECTOR_UNIT = """\
# Managed by bouwsteen routing_rollout.
[Unit]
Description=bouwsteen primary detector (pgroute66-compatible API for HAProxy checks)
After=network-online.target

[Service]
User=bouwsteen-detector
Group=bouwsteen-detector
ExecStart=/usr/bin/python3 /usr/local/lib/bouwsteen/primary_detector.py -c /etc/bouwsteen/primary-detector.yaml
Restart=always
RestartSec=1
NoNewPrivileges=yes

[Install]
WantedBy=multi-user.target
"""

LAB_KEEPALIVED_ROUTER2 = """\
# Managed by bouwsteen routing_rollout.
global_defs {
    router_id router2
    script_user root
    enable_script_security
}

vrrp_script chk_router {
    # HAProxy alive and the primary detector answering; otherwise this router gives the VIP up.
    script "/usr/local/lib/bouwsteen/check-router"
    interval 1
    timeout 2
    fall 2
    rise 2
}

vrrp_instance VI_lab {
    state BACKUP
    interface eth0
    virtual_router_id 132
    priority 240
    advert_int 1
    nopreempt
    authentication {
        auth_type PASS
        auth_pass Vq7rXz2k
    }
    unicast_src_ip 172.29.66.32
    unicast_peer {
        172.29.66.31
    }
    virtual_ipaddress {
        172.29.66.100/24 dev eth0
    }
    track_script {
        chk_router
    }
}
"""


def lab_inventory(tmp_path: Path) -> Inventory:
    return parse_inventory(Lab(LabPaths(tmp_path)).inventory_document())


def test_lab_renders_byte_identical_router_files(tmp_path: Path) -> None:
    inv = lab_inventory(tmp_path)
    assert inv.cluster.routing is not None and inv.cluster.routing.detector == "bouwsteen"
    expected = {
        "router1": {HAPROXY_CFG: LAB_HAPROXY_ROUTER1, KEEPALIVED_CFG: LAB_KEEPALIVED_ROUTER1},
        "router2": {HAPROXY_CFG: LAB_HAPROXY_ROUTER1.replace("    bind 172.29.66.31:8404\n", "    bind 172.29.66.32:8404\n"),
                    KEEPALIVED_CFG: LAB_KEEPALIVED_ROUTER2},
    }
    assert [r.name for r in inv.with_role(Role.router)] == list(expected)
    for router, texts in expected.items():
        files = router_files(inv, inv.host(router), LAB_SECRETS, ha_driver(inv).rw_port(inv))
        assert [(f.path, f.owner, f.mode, f.secret) for f in files] == [
            (HOST_CA, "root", 0o644, False),  # the lab runs with TLS on: the detector verifies the servers
            (DETECTOR_BIN, "root", 0o755, False),
            (DETECTOR_CFG, "bouwsteen-detector", 0o600, True),
            (f"/etc/systemd/system/{DETECTOR_UNIT}", "root", 0o644, False),
            (HAPROXY_CFG, "root", 0o644, False),
            (ROUTER_CHECK, "root", 0o755, False),
            (KEEPALIVED_CFG, "root", 0o600, True),
        ]
        by_path = {f.path: f.content for f in files}
        assert by_path[HAPROXY_CFG] == texts[HAPROXY_CFG]
        assert by_path[KEEPALIVED_CFG] == texts[KEEPALIVED_CFG]
        assert by_path[DETECTOR_CFG] == LAB_DETECTOR_CONFIG
        assert by_path[ROUTER_CHECK] == LAB_ROUTER_CHECK
        assert by_path[f"/etc/systemd/system/{DETECTOR_UNIT}"] == LAB_DETECTOR_UNIT
        assert by_path[DETECTOR_BIN] == DETECTOR_SOURCE.read_text()  # the program, uploaded as is
    assert [u.name for u in router_units(inv)] == [DETECTOR_UNIT, "haproxy.service", "keepalived.service"]
    # With TLS on a new CA bundle restarts the detector too (it verifies the servers against it).
    assert router_units(inv)[0].restart_on == (*router_units()[0].restart_on, HOST_CA)
    assert router_units(inv)[1:] == router_units()[1:]


def test_detector_bouwsteen_spelled_out_renders_the_same(tmp_path: Path) -> None:
    doc = Lab(LabPaths(tmp_path)).inventory_document()
    explicit = copy.deepcopy(doc)
    explicit["cluster"]["routing"]["detector"] = "bouwsteen"
    a, b = parse_inventory(doc), parse_inventory(explicit)
    for router in ("router1", "router2"):
        assert router_files(a, a.host(router), LAB_SECRETS, 5432) == router_files(b, b.host(router), LAB_SECRETS, 5432)


# ----------------------------------------------------------------------------- detector: pgroute66

PGR66_SECRETS = RoutingSecrets(vrrp_password="Vq7rXz2k", monitor_user="pgroute66", monitor_password="")


def pgroute66_inventory(settings: dict[str, Any] | None = None, **cluster: Any) -> Inventory:
    routing: dict[str, Any] = {"detector": "pgroute66"}
    if settings is not None:
        routing["pgroute66"] = settings
    return make_inventory(routing, **cluster)


PGR66 = pgroute66_inventory({"group": "lab"})


def test_pgroute66_haproxy_uses_external_checks() -> None:
    text = haproxy_cfg(PGR66, "router1")
    assert section(text, "global")[-2:] == ["external-check", "insecure-fork-wanted"]
    assert section(text, "backend postgres_rw") == [
        "retries 0",
        "option external-check",
        f"external-check command {PGROUTE66_PRIMARY_CHECK}",
        "default-server inter 2s downinter 1s fall 2 rise 1 on-marked-down shutdown-sessions check maxconn 1000",
        "server pg1 10.0.0.11:25432",
        "server pg2 10.0.0.12:25432",
        "server pg3 10.0.0.13:25432",
    ]
    assert section(text, "backend postgres_ro") == [
        "balance leastconn",
        "option external-check",
        f"external-check command {PGROUTE66_STANDBY_CHECK}",
        "default-server inter 2s fall 2 rise 2 on-marked-down shutdown-sessions check maxconn 1000",
        "server pg1 10.0.0.11:5432",
        "server pg2 10.0.0.12:5432",
        "server pg3 10.0.0.13:5432",
    ]
    # None of the project's detector routes (pgroute66 has no /v1/primary/<srv>, no /healthz).
    assert "httpchk" not in text and "/v1/" not in text and "8080" not in text
    # Frontends, defaults and stats are the detector's: only the checks differ.
    ours = haproxy_cfg(INV, "router1")
    for header in ("defaults", "frontend postgres_rw", "frontend postgres_ro", "frontend stats"):
        assert section(text, header) == section(ours, header)
    assert section(text, "global")[:-2] == section(ours, "global")


def test_pgroute66_haproxy_stolon_rw_port() -> None:
    inv = pgroute66_inventory(ha_manager="stolon")
    rw = section(haproxy_cfg(inv, "router1"), "backend postgres_rw")
    assert next(line for line in rw if line.startswith("server ")) == "server pg1 10.0.0.11:25432"


def test_pgroute66_primary_check_script() -> None:
    assert render_pgroute66_primary_check(PGR66) == """\
#!/bin/sh
# HAProxy external check of backend postgres_rw, pgroute66's own check style: passes when
# pgroute66 names this server as the one primary. GET /v1/primary answers 200 "<name>" (a JSON
# string) for exactly one primary, 404 "" for none, 409 "" for two or more: split brain sends rw
# nowhere. HAProxy runs this as its own user, environment cleared. Per check: HAProxy forks and
# execs this shell, the shell forks once and that child execs curl. Written by bouwsteen routing_rollout.
answer=$(/usr/bin/curl -sf -m 1.5 'http://127.0.0.1:8080/v1/primary?group=lab') || exit 1
[ "$answer" = "\\"$HAPROXY_SERVER_NAME\\"" ]
"""


def test_pgroute66_standby_check_script() -> None:
    assert render_pgroute66_standby_check(PGR66) == """\
#!/bin/sh
# HAProxy external check of backend postgres_ro, pgroute66's own check style: passes when
# pgroute66 lists this server among the standbys. GET /v1/standbys answers 200 with a JSON array of
# names (null when there is none). The name is matched with its quotes, so db1 does not pass on
# "db10". HAProxy runs this as its own user, environment cleared. Per check: HAProxy forks and
# execs this shell, the shell forks once and that child execs curl. Written by bouwsteen routing_rollout.
answer=$(/usr/bin/curl -sf -m 1.5 'http://127.0.0.1:8080/v1/standbys?group=lab') || exit 1
case "$answer" in
    *"\\"$HAPROXY_SERVER_NAME\\""*) exit 0 ;;
esac
exit 1
"""


def test_pgroute66_router_check_script() -> None:
    assert render_router_check(PGR66) == """\
#!/bin/sh
# keepalived track script: the router is fit to hold the VIP when HAProxy runs and pgroute66
# answers. pgroute66 has no health route; for a host name it does not know, /v1/<name>/status
# answers 404 "invalid" at once, without a database query. Written by bouwsteen routing_rollout.
/usr/bin/killall -0 haproxy 2>/dev/null || exit 1
answer=$(/usr/bin/curl -s -m 1 'http://127.0.0.1:8080/v1/_bouwsteen_router_check/status') || exit 1
[ "$answer" = '"invalid"' ]
"""
    assert "/healthz" not in render_router_check(PGR66)


def curl_lines(inv: Inventory) -> list[str]:
    return [line for text in (render_pgroute66_primary_check(inv), render_pgroute66_standby_check(inv),
                              render_router_check(inv))
            for line in text.splitlines() if "/usr/bin/curl" in line]


@pytest.mark.parametrize(
    ("settings", "primary", "standbys", "liveness"),
    [
        # No group: no ?group= at all, pgroute66's "all" (PgVillage's role renders no groups:).
        (None, "'http://127.0.0.1:8080/v1/primary'", "'http://127.0.0.1:8080/v1/standbys'",
         "'http://127.0.0.1:8080/v1/_bouwsteen_router_check/status'"),
        ({}, "'http://127.0.0.1:8080/v1/primary'", "'http://127.0.0.1:8080/v1/standbys'",
         "'http://127.0.0.1:8080/v1/_bouwsteen_router_check/status'"),
        ({"url": "http://localhost:8081", "group": "pgcluster"}, "'http://localhost:8081/v1/primary?group=pgcluster'",
         "'http://localhost:8081/v1/standbys?group=pgcluster'", "'http://localhost:8081/v1/_bouwsteen_router_check/status'"),
        ({"url": "https://router.example:8443", "ca_file": "/etc/pgroute66/ca.crt"},
         "--cacert /etc/pgroute66/ca.crt 'https://router.example:8443/v1/primary'",
         "--cacert /etc/pgroute66/ca.crt 'https://router.example:8443/v1/standbys'",
         "--cacert /etc/pgroute66/ca.crt 'https://router.example:8443/v1/_bouwsteen_router_check/status'"),
    ],
)
def test_pgroute66_url_and_group(settings: dict[str, Any] | None, primary: str, standbys: str, liveness: str) -> None:
    inv = pgroute66_inventory(settings)
    assert curl_lines(inv) == [
        f"answer=$(/usr/bin/curl -sf -m 1.5 {primary}) || exit 1",
        f"answer=$(/usr/bin/curl -sf -m 1.5 {standbys}) || exit 1",
        f"answer=$(/usr/bin/curl -s -m 1 {liveness}) || exit 1",
    ]


def test_pgroute66_keyed_by_address() -> None:
    """Older PgVillage configs key hosts: by IP address; the scripts then compare the server's."""
    inv = pgroute66_inventory({"server_key": "address"})
    primary, standby = render_pgroute66_primary_check(inv), render_pgroute66_standby_check(inv)
    assert '[ "$answer" = "\\"$HAPROXY_SERVER_ADDR\\"" ]' in primary.splitlines()
    assert '    *"\\"$HAPROXY_SERVER_ADDR\\""*) exit 0 ;;' in standby.splitlines()
    assert "HAPROXY_SERVER_NAME" not in primary + standby


class FakePgroute66:
    """An HTTP server answering like pgroute66 (gin's IndentedJSON bodies, its status codes)."""

    def __init__(self, roles: dict[str, str]) -> None:
        self.roles = roles  # host name -> "primary" | "standby"; every host is in group "lab"
        self.paths: list[str] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # name fixed by BaseHTTPRequestHandler
                fake.paths.append(self.path)
                url = urllib.parse.urlsplit(self.path)
                group = urllib.parse.parse_qs(url.query, keep_blank_values=True).get("group", ["all"])[0]
                hosts = sorted(fake.roles) if group in ("all", "lab") else []
                primaries = [h for h in hosts if fake.roles[h] == "primary"]
                standbys = [h for h in hosts if fake.roles[h] == "standby"]
                parts = url.path.split("/")
                if url.path == "/v1/primary":
                    status, body = (200, primaries[0]) if len(primaries) == 1 else (409 if primaries else 404, "")
                elif url.path == "/v1/standbys":
                    status, body = 200, standbys or None
                elif len(parts) == 4 and parts[3] == "status":
                    status, body = (200, fake.roles[parts[2]]) if parts[2] in fake.roles else (404, "invalid")
                else:
                    status, body = 404, None
                data = json.dumps(body, indent=4).encode() if body is not None or url.path == "/v1/standbys" \
                    else b"404 page not found"
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def fake_pgroute66() -> Iterator[FakePgroute66]:
    fake = FakePgroute66({})
    try:
        yield fake
    finally:
        fake.close()


def run_check(tmp_path: Path, text: str, server: str, address: str = "10.0.0.99") -> int:
    """A check script as HAProxy runs it: exec'd directly, environment cleared, its four arguments."""
    script = tmp_path / "check"
    script.write_text(text)
    script.chmod(0o755)
    env = {"HAPROXY_PROXY_NAME": "postgres_rw", "HAPROXY_SERVER_NAME": server, "HAPROXY_SERVER_ADDR": address,
           "HAPROXY_SERVER_PORT": "5432", "PATH": ""}
    return subprocess.run([str(script), "NOT_USED", "NOT_USED", address, "5432"], env=env, timeout=30,
                          check=False).returncode


needs_sh_and_curl = pytest.mark.skipif(not (Path("/bin/sh").exists() and Path("/usr/bin/curl").exists()),
                                       reason="needs /bin/sh and /usr/bin/curl, as on a router")


@needs_sh_and_curl
@pytest.mark.parametrize(
    ("roles", "group", "up_rw", "up_ro"),
    [
        ({"pg1": "standby", "pg2": "primary", "pg3": "standby"}, "lab", ["pg2"], ["pg1", "pg3"]),
        ({"pg1": "standby", "pg2": "primary", "pg3": "standby"}, None, ["pg2"], ["pg1", "pg3"]),
        # db1 must not pass on "db10": the names are compared with their quotes
        ({"pg1": "primary", "pg10": "standby", "pg3": "standby"}, "lab", ["pg1"], ["pg3", "pg10"]),
        ({"pg1": "primary", "pg2": "primary", "pg3": "standby"}, "lab", [], ["pg3"]),  # split brain: 409
        ({"pg1": "standby", "pg2": "standby"}, "lab", [], ["pg1", "pg2"]),  # no primary: 404
        ({"pg1": "primary", "pg2": "standby"}, "nope", [], []),  # undefined group: nothing, standbys null
    ],
)
def test_pgroute66_check_scripts_against_pgroute66_answers(
        tmp_path: Path, fake_pgroute66: FakePgroute66, roles: dict[str, str], group: str | None,
        up_rw: list[str], up_ro: list[str]) -> None:
    fake_pgroute66.roles = roles
    inv = pgroute66_inventory({"url": fake_pgroute66.url, **({"group": group} if group else {})})
    names = ["pg1", "pg2", "pg3", "pg10", "pg", "g1"]
    primary, standby = render_pgroute66_primary_check(inv), render_pgroute66_standby_check(inv)
    assert [n for n in names if run_check(tmp_path, primary, n) == 0] == up_rw
    assert [n for n in names if run_check(tmp_path, standby, n) == 0] == up_ro
    query = f"?group={group}" if group else ""
    assert set(fake_pgroute66.paths) == {f"/v1/primary{query}", f"/v1/standbys{query}"}


@needs_sh_and_curl
def test_pgroute66_check_scripts_keyed_by_address(tmp_path: Path, fake_pgroute66: FakePgroute66) -> None:
    fake_pgroute66.roles = {"10.0.0.11": "primary", "10.0.0.12": "standby"}
    inv = pgroute66_inventory({"url": fake_pgroute66.url, "server_key": "address"})
    primary, standby = render_pgroute66_primary_check(inv), render_pgroute66_standby_check(inv)
    assert run_check(tmp_path, primary, "pg1", "10.0.0.11") == 0
    assert run_check(tmp_path, primary, "pg2", "10.0.0.12") != 0
    assert run_check(tmp_path, standby, "pg2", "10.0.0.12") == 0
    assert run_check(tmp_path, standby, "pg1", "10.0.0.1") != 0  # no prefix match on "10.0.0.11"


@needs_sh_and_curl
def test_pgroute66_checks_fail_when_pgroute66_is_down(tmp_path: Path) -> None:
    fake = FakePgroute66({"pg1": "primary", "pg2": "standby"})
    inv = pgroute66_inventory({"url": fake.url})
    fake.close()
    assert run_check(tmp_path, render_pgroute66_primary_check(inv), "pg1") != 0
    assert run_check(tmp_path, render_pgroute66_standby_check(inv), "pg2") != 0
    liveness = render_router_check(inv).replace("/usr/bin/killall -0 haproxy 2>/dev/null || exit 1\n", "")
    assert run_check(tmp_path, liveness, "-") != 0


@needs_sh_and_curl
def test_pgroute66_router_check_sees_pgroute66_without_a_database_query(
        tmp_path: Path, fake_pgroute66: FakePgroute66) -> None:
    fake_pgroute66.roles = {"pg1": "primary"}
    inv = pgroute66_inventory({"url": fake_pgroute66.url})
    text = render_router_check(inv)
    killall = "/usr/bin/killall -0 haproxy 2>/dev/null || exit 1\n"
    assert killall in text  # HAProxy must run too; not tested here (no HAProxy on this machine)
    assert run_check(tmp_path, text.replace(killall, ""), "-") == 0
    assert fake_pgroute66.paths == ["/v1/_bouwsteen_router_check/status"]


@pytest.mark.parametrize("router", ["router1", "router2"])
def test_pgroute66_router_files(router: str) -> None:
    files = router_files(PGR66, PGR66.host(router), PGR66_SECRETS, 25432)
    assert [(f.path, f.owner, f.mode, f.secret) for f in files] == [
        (PGROUTE66_PRIMARY_CHECK, "root", 0o755, False),
        (PGROUTE66_STANDBY_CHECK, "root", 0o755, False),
        (HAPROXY_CFG, "root", 0o644, False),
        (ROUTER_CHECK, "root", 0o755, False),
        (KEEPALIVED_CFG, "root", 0o600, True),
    ]
    by_path = {f.path: f.content for f in files}
    assert by_path[HAPROXY_CFG] == haproxy_cfg(PGR66, router)
    assert by_path[ROUTER_CHECK] == render_router_check(PGR66)
    # keepalived itself is the same: it runs the router check, which now asks pgroute66.
    assert by_path[KEEPALIVED_CFG] == render_keepalived(INV, INV.host(router), SECRETS)
    assert all(DETECTOR_UNIT_TEXT != f.content for f in files)


def test_pgroute66_needs_no_monitor_password_but_a_vrrp_password() -> None:
    router_files(PGR66, PGR66.host("router1"), PGR66_SECRETS, 5432)  # no monitor password: fine
    with pytest.raises(RoutingSpecError, match="vrrp_password"):
        router_files(PGR66, PGR66.host("router1"), RoutingSecrets("too-long-pw", "m", ""), 5432)
    with pytest.raises(RoutingSpecError, match="monitor_password"):
        router_files(INV, INV.host("router1"), PGR66_SECRETS, 5432)


def test_pgroute66_router_units_leave_out_the_detector() -> None:
    units = router_units(PGR66)
    assert [u.name for u in units] == ["haproxy.service", "keepalived.service"]
    assert units == router_units(INV)[1:]
