"""What every HAProxy this project renders shares (routers, and the database hosts' port to the
primary under Patroni): Debian's file path and unit, the global and defaults sections. Pure."""

from __future__ import annotations

HAPROXY_CFG = "/etc/haproxy/haproxy.cfg"
HAPROXY_UNIT = "haproxy.service"


def preamble(header: str, *, extra_global: tuple[str, ...] = ()) -> list[str]:
    """The global and defaults sections, TCP mode: PostgreSQL's protocol is relayed, never parsed."""
    return [
        f"# {header}",
        "global",
        "    log /dev/log local0",
        "    maxconn 4096",
        "    user haproxy",
        "    group haproxy",
        # expose-fd listeners: a reload hands the listening sockets over, no connection is refused.
        "    stats socket /run/haproxy/admin.sock mode 660 level admin expose-fd listeners",
        *(f"    {line}" for line in extra_global),
        "",
        "defaults",
        "    mode tcp",
        "    log global",
        "    option tcplog",
        "    option dontlognull",
        "    timeout connect 3s",
        # A database session may sit idle between a pool's uses; half an hour covers the usual ones.
        "    timeout client 30m",
        "    timeout server 30m",
        "    timeout check 2s",
        "    retries 2",
        "",
    ]
