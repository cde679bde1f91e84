"""Routing cluster files: HAProxy, keepalived and the primary detector. Pure rendering.

Why HTTP checks against our detector instead of pgroute66's `external-check` scripts: HAProxy
2.2+ can put the server's own name into the check URI (`uri-lf ...%[srv_name]`), so each server
asks "am I the one primary?" over HTTP. No shell is forked per check (no `insecure-fork-wanted`,
which also opens HAProxy to forking from Lua), checks are cheap enough to run every second, and
the detector answers from one parallel, cached scan with a timeout per query.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

import yaml

from blocks.inventory import HostSpec, Inventory, Role
from tasks.adapters.commands import ManagedFile, Unit
from tasks.errors import BouwsteenError

HAPROXY_CFG = "/etc/haproxy/haproxy.cfg"
KEEPALIVED_CFG = "/etc/keepalived/keepalived.conf"
DETECTOR_BIN = "/usr/local/lib/bouwsteen/primary_detector.py"
DETECTOR_CFG = "/etc/bouwsteen/primary-detector.yaml"
DETECTOR_UNIT = "bouwsteen-primary-detector.service"
DETECTOR_USER = "bouwsteen-detector"
ROUTER_CHECK = "/usr/local/lib/bouwsteen/check-router"
DETECTOR_SOURCE = Path(__file__).parents[2] / "programs" / "primary_detector.py"


class RoutingSpecError(BouwsteenError, ValueError):
    pass


@dataclass(frozen=True)
class RoutingSecrets:
    vrrp_password: str  # VRRP PASS authentication: at most 8 characters
    monitor_user: str
    monitor_password: str

    def check(self) -> None:
        # keepalived keeps 8 bytes of auth_pass: count bytes, allow ASCII letters and digits only.
        if not self.vrrp_password or len(self.vrrp_password.encode()) > 8 or not (
                self.vrrp_password.isascii() and self.vrrp_password.isalnum()):
            raise RoutingSpecError("routing credentials: vrrp_password must be 1-8 letters or digits (VRRP PASS)")
        if not self.monitor_password:
            raise RoutingSpecError("database credentials: monitor_password is needed by the primary detector")


def render_haproxy(inv: Inventory, router: HostSpec, rw_port: int) -> str:
    """`rw_port`: the port on each database host that leads to the primary (the HA driver's)."""
    routing = inv.cluster.routing
    assert routing is not None
    db = inv.db_hosts
    group = inv.cluster.name
    detector = routing.detector_port
    admin = " ".join(str(n) for n in inv.cluster.admin_networks) or "127.0.0.1/32"
    lines = [
        "# Managed by bouwsteen routing_rollout; validated with `haproxy -c` before every reload.",
        "global",
        "    log /dev/log local0",
        "    maxconn 4096",
        "    user haproxy",
        "    group haproxy",
        # expose-fd listeners: a reload hands the listening sockets over, no connection is refused.
        "    stats socket /run/haproxy/admin.sock mode 660 level admin expose-fd listeners",
        "",
        "defaults",
        "    mode tcp",
        "    log global",
        "    option tcplog",
        "    option dontlognull",
        "    timeout connect 3s",
        "    timeout client 30m",
        "    timeout server 30m",
        "    timeout check 2s",
        "    retries 2",
        "",
        "frontend postgres_rw",
        f"    bind :{routing.rw_port}",
        "    default_backend postgres_rw",
        "",
        "frontend postgres_ro",
        f"    bind :{routing.ro_port}",
        "    default_backend postgres_ro",
        "",
        "backend postgres_rw",
    ]
    # The detector decides for every HA manager: stolon-proxy keeps its port open with no master
    # (it closes each connection), so a TCP check there would stay UP while nothing can write.
    lines += [
        "    option httpchk",
        f"    http-check send meth GET uri-lf /v1/primary/%[srv_name]?group={group}",
        "    http-check expect status 200",
        # Split brain: the detector answers 503 for every server, so rw goes nowhere. One 200 is
        # enough to route (rise 1): the detector only says it when its scan saw exactly one primary,
        # and a second check would add half a second to every failover's write gap.
        f"    default-server inter 1s fastinter 500ms downinter 500ms fall 2 rise 1 on-marked-down shutdown-sessions "
        f"check port {detector} addr 127.0.0.1 maxconn 1000",
    ]
    lines += [f"    server {h.name} {h.address}:{rw_port}" for h in db]
    lines += [
        "",
        "backend postgres_ro",
        "    balance leastconn",
        "    option httpchk",
        f"    http-check send meth GET uri-lf /v1/standby/%[srv_name]?group={group}",
        "    http-check expect status 200",
        f"    default-server inter 2s fastinter 1s fall 2 rise 2 on-marked-down shutdown-sessions "
        f"check port {detector} addr 127.0.0.1 maxconn 1000",
    ]
    lines += [f"    server {h.name} {h.address}:{inv.cluster.postgres.port}" for h in db]
    lines += [
        "",
        "frontend stats",
        "    mode http",
        f"    bind {router.address}:{routing.stats_port}",
        f"    bind 127.0.0.1:{routing.stats_port}",
        f"    acl admin_net src 127.0.0.1/32 {admin}",
        "    http-request deny unless admin_net",
        "    stats enable",
        "    stats uri /stats",
        "    stats refresh 5s",
        "    stats hide-version",
        "",
    ]
    return "\n".join(lines)


def render_keepalived(inv: Inventory, router: HostSpec, secrets: RoutingSecrets) -> str:
    routing = inv.cluster.routing
    assert routing is not None
    routers = inv.with_role(Role.router)
    priority = 100 - 10 * [r.name for r in routers].index(router.name)
    prefix = inv.cluster.network.prefixlen
    return f"""# Managed by bouwsteen routing_rollout.
global_defs {{
    router_id {router.name}
    script_user root
    enable_script_security
}}

vrrp_script chk_router {{
    # HAProxy alive and the primary detector answering; otherwise this router gives the VIP up.
    script "{ROUTER_CHECK}"
    interval 1
    timeout 2
    fall 2
    rise 2
}}

vrrp_instance VI_{inv.cluster.name.replace('-', '_')} {{
    state BACKUP
    interface {routing.interface}
    virtual_router_id {inv.cluster.virtual_router_id}
    priority {priority}
    advert_int 1
{"    nopreempt" if not routing.preempt else ""}
    authentication {{
        auth_type PASS
        auth_pass {secrets.vrrp_password}
    }}
    unicast_src_ip {router.address}
    unicast_peer {{
{chr(10).join(f"        {r.address}" for r in routers if r.name != router.name)}
    }}
    virtual_ipaddress {{
        {routing.vip}/{prefix} dev {routing.interface}
    }}
    track_script {{
        chk_router
    }}
}}
"""


def render_detector_config(inv: Inventory, secrets: RoutingSecrets) -> str:
    routing = inv.cluster.routing
    assert routing is not None
    password = base64.b64encode(secrets.monitor_password.encode()).decode()
    hosts = {
        h.name: {
            "host": str(h.address), "port": inv.cluster.postgres.port, "user": secrets.monitor_user,
            "dbname": "postgres", "connect_timeout": 2, "b64password": password,
        }
        for h in inv.db_hosts
    }
    document = {
        "hosts": hosts,
        "groups": {inv.cluster.name: [h.name for h in inv.db_hosts]},
        "bind": "127.0.0.1",
        "port": routing.detector_port,
        "query_timeout": 1.0,
        "cache_ms": 200,
        "max_standby_lag_bytes": 16 * 1024 * 1024,
    }
    return "# Managed by bouwsteen routing_rollout.\n" + yaml.safe_dump(document, sort_keys=False)


def render_router_check(inv: Inventory) -> str:
    routing = inv.cluster.routing
    assert routing is not None
    return f"""#!/bin/sh
# keepalived track script: the router is fit to hold the VIP when HAProxy runs and the primary
# detector answers. Written by bouwsteen routing_rollout.
/usr/bin/killall -0 haproxy 2>/dev/null || exit 1
exec /usr/bin/curl -sf -m 1 -o /dev/null http://127.0.0.1:{routing.detector_port}/healthz
"""


DETECTOR_UNIT_TEXT = f"""# Managed by bouwsteen routing_rollout.
[Unit]
Description=bouwsteen primary detector (pgroute66-compatible API for HAProxy checks)
After=network-online.target

[Service]
User={DETECTOR_USER}
Group={DETECTOR_USER}
ExecStart=/usr/bin/python3 {DETECTOR_BIN} -c {DETECTOR_CFG}
Restart=always
RestartSec=1
NoNewPrivileges=yes

[Install]
WantedBy=multi-user.target
"""


def router_files(inv: Inventory, router: HostSpec, secrets: RoutingSecrets, rw_port: int) -> list[ManagedFile]:
    secrets.check()
    return [
        ManagedFile(DETECTOR_BIN, DETECTOR_SOURCE.read_text(), owner="root", mode=0o755),
        ManagedFile(DETECTOR_CFG, render_detector_config(inv, secrets), owner=DETECTOR_USER, mode=0o600, secret=True),
        ManagedFile(f"/etc/systemd/system/{DETECTOR_UNIT}", DETECTOR_UNIT_TEXT, owner="root", mode=0o644),
        ManagedFile(HAPROXY_CFG, render_haproxy(inv, router, rw_port), owner="root", mode=0o644),
        ManagedFile(ROUTER_CHECK, render_router_check(inv), owner="root", mode=0o755),
        ManagedFile(KEEPALIVED_CFG, render_keepalived(inv, router, secrets), owner="root", mode=0o600, secret=True),
    ]


def router_units() -> list[Unit]:
    return [
        Unit(DETECTOR_UNIT, restart_on=(DETECTOR_BIN, DETECTOR_CFG, f"/etc/systemd/system/{DETECTOR_UNIT}")),
        # HAProxy reloads seamlessly (master-worker, sockets handed over); the unit checks the config first.
        Unit("haproxy.service", reload_on=(HAPROXY_CFG,)),
        Unit("keepalived.service", reload_on=(KEEPALIVED_CFG, ROUTER_CHECK)),
    ]
