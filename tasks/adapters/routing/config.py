"""Routing cluster files: HAProxy, keepalived and the primary detector. Pure rendering.

Why HTTP checks against our detector instead of pgroute66's `external-check` scripts: HAProxy
2.2+ can put the server's own name into the check URI (`uri-lf ...%[srv_name]`), so each server
asks "am I the one primary?" over HTTP. No shell is forked per check (no `insecure-fork-wanted`,
which also opens HAProxy to forking from Lua), checks are cheap enough to run every second, and
the detector answers from one parallel, cached scan with a timeout per query.

A site that keeps PgVillage's pgroute66 (`routing.detector: pgroute66`) gets pgroute66's own check
style instead: HAProxy `external-check` scripts that ask `/v1/primary` and `/v1/standbys` and
compare the answer with the server (pgroute66 has no per-server routes and no health route).
Nothing of the project's detector is deployed then.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

import yaml

from blocks.inventory import HostSpec, Inventory, Pgroute66Spec, Role
from tasks.adapters import haproxy, pki
from tasks.adapters.commands import ManagedFile, Unit
from tasks.adapters.haproxy import HAPROXY_CFG, HAPROXY_UNIT
from tasks.errors import BouwsteenError

KEEPALIVED_CFG = "/etc/keepalived/keepalived.conf"
DETECTOR_BIN = "/usr/local/lib/bouwsteen/primary_detector.py"
DETECTOR_CFG = "/etc/bouwsteen/primary-detector.yaml"
DETECTOR_UNIT = "bouwsteen-primary-detector.service"
DETECTOR_USER = "bouwsteen-detector"
ROUTER_CHECK = "/usr/local/lib/bouwsteen/check-router"
# detector: pgroute66 — HAProxy external checks (HAProxy execs them as its own user, PATH empty).
PGROUTE66_PRIMARY_CHECK = "/usr/local/lib/bouwsteen/check-pgroute66-primary"
PGROUTE66_STANDBY_CHECK = "/usr/local/lib/bouwsteen/check-pgroute66-standby"
# An external check gets min(inter, timeout connect) to exit (HAProxy's src/extcheck.c), here
# min(2s, 3s); curl gives up before HAProxy's SIGTERM, so a slow pgroute66 is a failed check.
PGROUTE66_CURL_TIMEOUT = "1.5"
# pgroute66 has no health route; a host name it does not know answers 404 "invalid" at once,
# without a database query. Not a valid inventory host name, so never one of its hosts.
PGROUTE66_LIVENESS_NAME = "_bouwsteen_router_check"
DETECTOR_SOURCE = Path(__file__).parents[2] / "programs" / "primary_detector.py"


class RoutingSpecError(BouwsteenError, ValueError):
    pass


@dataclass(frozen=True)
class RoutingSecrets:
    vrrp_password: str  # VRRP PASS authentication: at most 8 characters
    monitor_user: str
    monitor_password: str
    # TLS on: the cluster's CA bundle, which the detector verifies the database hosts against.
    ca_bundle_pem: str | None = None

    def check(self, *, detector: bool = True) -> None:
        """`detector`: the project's detector runs (it logs in as the monitor user; pgroute66 has its own)."""
        # keepalived keeps 8 bytes of auth_pass: count bytes, allow ASCII letters and digits only.
        if not self.vrrp_password or len(self.vrrp_password.encode()) > 8 or not (
                self.vrrp_password.isascii() and self.vrrp_password.isalnum()):
            raise RoutingSpecError("routing credentials: vrrp_password must be 1-8 letters or digits (VRRP PASS)")
        if detector and not self.monitor_password:
            raise RoutingSpecError("database credentials: monitor_password is needed by the primary detector")


def render_haproxy(inv: Inventory, router: HostSpec, rw_port: int) -> str:
    """`rw_port`: the port on each database host that leads to the primary (the HA driver's)."""
    routing = inv.cluster.routing
    assert routing is not None
    admin = " ".join(str(n) for n in inv.cluster.admin_networks) or "127.0.0.1/32"
    # pgroute66's check scripts: external checks must be allowed, and HAProxy must be allowed
    # to fork at run time at all (without it fork() fails: RLIMIT_NPROC is 0 after start-up).
    forks = ("external-check", "insecure-fork-wanted") if routing.uses_pgroute66 else ()
    lines = haproxy.preamble("Managed by bouwsteen routing_rollout; validated with `haproxy -c` before every reload.",
                             extra_global=forks)
    lines += [
        "frontend postgres_rw",
        f"    bind :{routing.rw_port}",
        "    default_backend postgres_rw",
        "",
        "frontend postgres_ro",
        f"    bind :{routing.ro_port}",
        "    default_backend postgres_ro",
        "",
    ]
    if routing.uses_pgroute66:
        lines += _pgroute66_backends(inv, rw_port)
    else:
        lines += _detector_backends(inv, rw_port)
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


# A switchover's old primary closes connections on its port for a moment before the check marks
# it down; HAProxy's retries to it wait a second each (a client hung 2 s on the lab). rw has one
# server that counts: fail at once, and the client's next attempt finds the new primary.
RW_NO_RETRIES = "    retries 0"


def _detector_backends(inv: Inventory, rw_port: int) -> list[str]:
    routing = inv.cluster.routing
    assert routing is not None
    db = inv.db_hosts
    group = inv.cluster.name
    detector = routing.detector_port
    lines = ["backend postgres_rw", RW_NO_RETRIES]
    # The detector decides for every HA manager: stolon-proxy keeps its port open with no master
    # (it closes each connection), so a TCP check there would stay UP while nothing can write.
    lines += [
        "    option httpchk",
        f"    http-check send meth GET uri-lf /v1/primary/%[srv_name]?group={group}",
        "    http-check expect status 200",
        # Split brain: the detector answers 503 for every server, so rw goes nowhere. One 200 is
        # enough to route (rise 1): the detector only says it when its scan saw exactly one primary,
        # and a second check would add half a second to every failover's write gap. downinter 250ms:
        # the new primary is routed sooner; the detector answers every check within its cache_ms
        # from one scan, so faster checks add requests, not scans of the database hosts.
        f"    default-server inter 1s fastinter 500ms downinter 250ms fall 2 rise 1 on-marked-down shutdown-sessions "
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
    return lines


def _pgroute66_backends(inv: Inventory, rw_port: int) -> list[str]:
    """pgroute66's own check style: one external check per server and interval, a script that
    asks pgroute66 and compares its answer with HAPROXY_SERVER_NAME (or _ADDR). HAProxy forks and
    execs the script (/bin/sh); the shell forks once more for curl (see the scripts)."""
    db = inv.db_hosts
    # inter 2s, not the detector's 1s: every check forks sh and curl, every pgroute66 request
    # queries all hosts of the group one after another, and an external check may run for
    # min(inter, timeout connect) before HAProxy kills it (PGROUTE66_CURL_TIMEOUT stays below).
    lines = [
        "backend postgres_rw",
        RW_NO_RETRIES,
        "    option external-check",
        f"    external-check command {PGROUTE66_PRIMARY_CHECK}",
        # One pass routes rw (rise 1): pgroute66's /v1/primary names a server only when it saw
        # exactly one primary (404 none, 409 split brain), as the project's detector does. DOWN
        # servers are asked every second so the new primary is found soon after a failover.
        "    default-server inter 2s downinter 1s fall 2 rise 1 on-marked-down shutdown-sessions check maxconn 1000",
    ]
    lines += [f"    server {h.name} {h.address}:{rw_port}" for h in db]
    lines += [
        "",
        "backend postgres_ro",
        "    balance leastconn",
        "    option external-check",
        f"    external-check command {PGROUTE66_STANDBY_CHECK}",
        "    default-server inter 2s fall 2 rise 2 on-marked-down shutdown-sessions check maxconn 1000",
    ]
    lines += [f"    server {h.name} {h.address}:{inv.cluster.postgres.port}" for h in db]
    return lines


def render_keepalived(inv: Inventory, router: HostSpec, secrets: RoutingSecrets) -> str:
    routing = inv.cluster.routing
    assert routing is not None
    routers = inv.with_role(Role.router)
    # Only the order decides who holds the VIP, but the height is speed: a stopping holder sends
    # priority 0, and a backup takes over after its skew time, (256 - priority) / 256 s. At 240
    # that is 62 ms; at 90 it was 0.65 s of every router failover's write gap.
    priority = 250 - 10 * [r.name for r in routers].index(router.name)
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
            **({"sslmode": "verify-full", "sslrootcert": pki.HOST_CA} if inv.cluster.tls.enabled else {}),
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
        # The heartbeat's age also catches a standby whose WAL receiver stopped (its byte lag
        # stays 0); pgroute66's availability default. The table is made by ensure_roles.
        "max_standby_staleness_seconds": 10,
    }
    return "# Managed by bouwsteen routing_rollout.\n" + yaml.safe_dump(document, sort_keys=False)


def _pgroute66_get(spec: Pgroute66Spec, path: str, *, fail: bool = True,
                   timeout: str = PGROUTE66_CURL_TIMEOUT) -> str:
    """The curl command line of a check script. Absolute paths: HAProxy runs checks with PATH=""."""
    flags = "-sf" if fail else "-s"
    tls = f" --cacert {spec.ca_file}" if spec.ca_file else ""
    return f"/usr/bin/curl {flags} -m {timeout}{tls} '{spec.url}{path}'"


def _pgroute66_spec(inv: Inventory) -> Pgroute66Spec:
    routing = inv.cluster.routing
    assert routing is not None and routing.uses_pgroute66
    return routing.pgroute66_settings


def _pgroute66_server(spec: Pgroute66Spec) -> str:
    # HAProxy's environment for external checks; pgroute66's hosts: keys must equal it.
    return "$HAPROXY_SERVER_NAME" if spec.server_key == "name" else "$HAPROXY_SERVER_ADDR"


def _pgroute66_group(spec: Pgroute66Spec) -> str:
    # No group: no ?group= at all. An empty ?group= is not pgroute66's "all" but an undefined
    # group (gin's DefaultQuery only defaults a missing key): no hosts, every server DOWN.
    return f"?group={spec.group}" if spec.group else ""


def render_pgroute66_primary_check(inv: Inventory) -> str:
    spec = _pgroute66_spec(inv)
    return f"""#!/bin/sh
# HAProxy external check of backend postgres_rw, pgroute66's own check style: passes when
# pgroute66 names this server as the one primary. GET /v1/primary answers 200 "<name>" (a JSON
# string) for exactly one primary, 404 "" for none, 409 "" for two or more: split brain sends rw
# nowhere. HAProxy runs this as its own user, environment cleared. Per check: HAProxy forks and
# execs this shell, the shell forks once and that child execs curl. Written by bouwsteen routing_rollout.
answer=$({_pgroute66_get(spec, "/v1/primary" + _pgroute66_group(spec))}) || exit 1
[ "$answer" = "\\"{_pgroute66_server(spec)}\\"" ]
"""


def render_pgroute66_standby_check(inv: Inventory) -> str:
    spec = _pgroute66_spec(inv)
    return f"""#!/bin/sh
# HAProxy external check of backend postgres_ro, pgroute66's own check style: passes when
# pgroute66 lists this server among the standbys. GET /v1/standbys answers 200 with a JSON array of
# names (null when there is none). The name is matched with its quotes, so db1 does not pass on
# "db10". HAProxy runs this as its own user, environment cleared. Per check: HAProxy forks and
# execs this shell, the shell forks once and that child execs curl. Written by bouwsteen routing_rollout.
answer=$({_pgroute66_get(spec, "/v1/standbys" + _pgroute66_group(spec))}) || exit 1
case "$answer" in
    *"\\"{_pgroute66_server(spec)}\\""*) exit 0 ;;
esac
exit 1
"""


def render_router_check(inv: Inventory) -> str:
    routing = inv.cluster.routing
    assert routing is not None
    if routing.uses_pgroute66:
        spec = routing.pgroute66_settings
        return f"""#!/bin/sh
# keepalived track script: the router is fit to hold the VIP when HAProxy runs and pgroute66
# answers. pgroute66 has no health route; for a host name it does not know, /v1/<name>/status
# answers 404 "invalid" at once, without a database query. Written by bouwsteen routing_rollout.
/usr/bin/killall -0 haproxy 2>/dev/null || exit 1
answer=$({_pgroute66_get(spec, f"/v1/{PGROUTE66_LIVENESS_NAME}/status", fail=False, timeout="1")}) || exit 1
[ "$answer" = '"invalid"' ]
"""
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


def _uses_pgroute66(inv: Inventory | None) -> bool:
    return inv is not None and inv.cluster.routing is not None and inv.cluster.routing.uses_pgroute66


def router_files(inv: Inventory, router: HostSpec, secrets: RoutingSecrets, rw_port: int) -> list[ManagedFile]:
    pgroute66 = _uses_pgroute66(inv)
    secrets.check(detector=not pgroute66)
    if pgroute66:
        # The site's pgroute66 (package, config, unit, credentials) stays the site's; only the
        # check scripts that ask it are ours. They come first: HAProxy's config names them.
        detector = [
            ManagedFile(PGROUTE66_PRIMARY_CHECK, render_pgroute66_primary_check(inv), owner="root", mode=0o755),
            ManagedFile(PGROUTE66_STANDBY_CHECK, render_pgroute66_standby_check(inv), owner="root", mode=0o755),
        ]
    else:
        detector = [
            ManagedFile(DETECTOR_BIN, DETECTOR_SOURCE.read_text(), owner="root", mode=0o755),
            ManagedFile(DETECTOR_CFG, render_detector_config(inv, secrets), owner=DETECTOR_USER, mode=0o600,
                        secret=True),
            ManagedFile(f"/etc/systemd/system/{DETECTOR_UNIT}", DETECTOR_UNIT_TEXT, owner="root", mode=0o644),
        ]
    if inv.cluster.tls.enabled:
        if not secrets.ca_bundle_pem:
            raise RoutingSpecError("cluster.tls.enabled, but the cluster's CA is not registered")
        detector = [ManagedFile(pki.HOST_CA, secrets.ca_bundle_pem, owner="root", mode=0o644), *detector]
    return detector + [
        ManagedFile(HAPROXY_CFG, render_haproxy(inv, router, rw_port), owner="root", mode=0o644),
        ManagedFile(ROUTER_CHECK, render_router_check(inv), owner="root", mode=0o755),
        ManagedFile(KEEPALIVED_CFG, render_keepalived(inv, router, secrets), owner="root", mode=0o600, secret=True),
    ]


def router_units(inv: Inventory | None = None) -> list[Unit]:
    """The routers' units; the detector's only with the project's detector (also when `inv` is left out)."""
    tls = (pki.HOST_CA,) if inv is not None and inv.cluster.tls.enabled else ()
    units = [] if _uses_pgroute66(inv) else [
        Unit(DETECTOR_UNIT, restart_on=(DETECTOR_BIN, DETECTOR_CFG, f"/etc/systemd/system/{DETECTOR_UNIT}", *tls)),
    ]
    # External check scripts are exec'd afresh on every check: changing one needs no reload.
    return units + [
        # HAProxy reloads seamlessly (master-worker, sockets handed over); the unit checks the config first.
        Unit(HAPROXY_UNIT, reload_on=(HAPROXY_CFG,), package="haproxy"),
        Unit("keepalived.service", reload_on=(KEEPALIVED_CFG, ROUTER_CHECK), package="keepalived"),
    ]
