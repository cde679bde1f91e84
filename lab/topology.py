"""The lab's default topology: eleven hosts on one isolated bridge (two clusters and their servers)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from lab.image import LOGIN_USER

# A private range not used by this machine; nothing outside the lab routes to or from it.
SUBNET = ipaddress.IPv4Network("172.29.66.0/24")
CONTROLLER_ADDRESS = ipaddress.IPv4Address("172.29.66.1")
VIP = ipaddress.IPv4Address("172.29.66.100")
BRIDGE = "bwlab0"
DOMAIN = "bouwsteen.lab"
CLUSTER_NAME = "lab"
# A second cluster on hosts of its own, the target of clone_cluster ("refresh acceptance from
# production"): its own inventory, etcd, credentials and bucket prefix; the backup server is shared.
CLONE_CLUSTER_NAME = "acc"


@dataclass(frozen=True)
class LabHost:
    name: str
    address: ipaddress.IPv4Address
    roles: tuple[str, ...] = field(default_factory=tuple)
    # The flows log in as this non-root user (passwordless sudo) instead of root; the flows' key
    # is then not a root key on this host (the lab's own tooling keeps a root key of its own).
    ssh_user: str | None = None
    cluster: str = CLUSTER_NAME  # whose inventory lists the host (the backup server: every cluster's)

    @property
    def netns(self) -> str:
        return f"bwlab-{self.name}"

    @property
    def veth(self) -> str:
        # Interface names are limited to 15 bytes.
        return f"bwl-{self.name}"[:15]

    @property
    def fqdn(self) -> str:
        return f"{self.name}.{DOMAIN}"


DEFAULT_HOSTS: tuple[LabHost, ...] = (
    LabHost("pg1", ipaddress.IPv4Address("172.29.66.11"), ("db",)),
    LabHost("pg2", ipaddress.IPv4Address("172.29.66.12"), ("db",)),
    # A database host, so every cluster runbook goes through a non-root login at least once.
    LabHost("pg3", ipaddress.IPv4Address("172.29.66.13"), ("db",), ssh_user=LOGIN_USER),
    LabHost("pg4", ipaddress.IPv4Address("172.29.66.14"), ()),
    LabHost("backup1", ipaddress.IPv4Address("172.29.66.21"), ("backup",)),
    LabHost("router1", ipaddress.IPv4Address("172.29.66.31"), ("router",)),
    LabHost("router2", ipaddress.IPv4Address("172.29.66.32"), ("router",)),
    LabHost("restore1", ipaddress.IPv4Address("172.29.66.41"), ("restore",)),
    LabHost("acc1", ipaddress.IPv4Address("172.29.66.51"), ("db",), cluster=CLONE_CLUSTER_NAME),
    LabHost("acc2", ipaddress.IPv4Address("172.29.66.52"), ("db",), cluster=CLONE_CLUSTER_NAME),
    LabHost("acc3", ipaddress.IPv4Address("172.29.66.53"), ("db",), cluster=CLONE_CLUSTER_NAME),
)
CLUSTERS = (CLUSTER_NAME, CLONE_CLUSTER_NAME)
SHARED_ROLES = ("backup",)  # a host with only these roles serves every lab cluster


def cluster_hosts(cluster: str, hosts: tuple[LabHost, ...] = DEFAULT_HOSTS) -> list[LabHost]:
    """The hosts `cluster`'s inventory lists: its own, and the shared backup server."""
    return [h for h in hosts if h.cluster == cluster or (h.roles and set(h.roles) <= set(SHARED_ROLES))]


def host_by_name(name: str) -> LabHost:
    for host in DEFAULT_HOSTS:
        if host.name == name:
            return host
    known = ", ".join(h.name for h in DEFAULT_HOSTS)
    raise KeyError(f"no lab host named {name!r}; the lab has {known}")


def etc_hosts() -> str:
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines += [f"{h.address}\t{h.fqdn} {h.name}" for h in DEFAULT_HOSTS]
    return "\n".join(lines) + "\n"
