"""How a client connects to a cluster: the VIP when there is a routing cluster, the port to the
primary on every database host, and the client-side failover of libpq and JDBC over the database
hosts themselves. Published by the runbooks that change who serves the cluster."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect.artifacts import create_markdown_artifact

from blocks.inventory import Inventory
from bouwsteen.home import bouwsteen_home
from tasks.adapters.ha.registry import ha_driver
from tasks.adapters.postgres import PgEndpoint
from tasks.context import ClusterContext, context_for
from tasks.runtime import say, step

# A dead host costs a multi-host client this long before it tries the next one (libpq's default
# is to wait for the operating system's TCP timeout, minutes when the host is gone).
CONNECT_TIMEOUT_SECONDS = 3


@dataclass(frozen=True)
class Endpoint:
    purpose: str
    host: str  # the host name, as the inventory knows it
    address: str
    port: int


@dataclass(frozen=True)
class ClientConnections:
    """No password anywhere: clients take theirs from their own secret store or ~/.pgpass."""

    cluster: str
    user: str
    dbname: str
    postgres_port: int
    database_hosts: tuple[tuple[str, str], ...]  # (name, address), inventory order
    primary_port: int  # on every database host: leads to the primary (stolon-proxy / HAProxy)
    vip_rw: Endpoint | None = None
    vip_ro: Endpoint | None = None
    # TLS on: clients verify the server (verify-full) against the cluster's CA bundle, kept here.
    rootcert: str | None = None

    @classmethod
    def of(cls, inv: Inventory, user: str, rootcert: str | None = None) -> "ClientConnections":
        routing = inv.cluster.routing
        vip = {}
        if routing is not None:
            vip = {"vip_rw": Endpoint("read-write through the VIP", "vip", str(routing.vip), routing.rw_port),
                   "vip_ro": Endpoint("read-only through the VIP", "vip", str(routing.vip), routing.ro_port)}
        return cls(
            cluster=inv.cluster.name, user=user, dbname=inv.cluster.postgres.application_database,
            postgres_port=inv.cluster.postgres.port,
            database_hosts=tuple((h.name, str(h.address)) for h in inv.db_hosts),
            primary_port=ha_driver(inv).rw_port(inv), rootcert=rootcert, **vip,
        )

    @property
    def primary_port_endpoints(self) -> list[Endpoint]:
        return [Endpoint("read-write on any database host", name, address, self.primary_port)
                for name, address in self.database_hosts]

    def _hosts(self) -> str:
        return ",".join(f"{address}:{self.postgres_port}" for _, address in self.database_hosts)

    def libpq_uri(self, target_session_attrs: str) -> str:
        """Client-side failover: libpq tries the hosts in order until one has the session kind asked for."""
        tls = f"&sslmode=verify-full&sslrootcert={self.rootcert}" if self.rootcert else ""
        return (f"postgresql://{self.user}@{self._hosts()}/{self.dbname}"
                f"?target_session_attrs={target_session_attrs}&connect_timeout={CONNECT_TIMEOUT_SECONDS}{tls}")

    @property
    def rw_uri(self) -> str:
        return self.libpq_uri("read-write")

    @property
    def ro_uri(self) -> str:
        return self.libpq_uri("prefer-standby")

    @property
    def jdbc_url(self) -> str:
        return (f"jdbc:postgresql://{self._hosts()}/{self.dbname}"
                f"?targetServerType=primary&connectTimeout={CONNECT_TIMEOUT_SECONDS}{self._jdbc_tls}")

    @property
    def _jdbc_tls(self) -> str:
        return f"&sslmode=verify-full&sslrootcert={self.rootcert}" if self.rootcert else ""

    @property
    def jdbc_ro_url(self) -> str:
        return (f"jdbc:postgresql://{self._hosts()}/{self.dbname}"
                f"?targetServerType=preferSecondary&loadBalanceHosts=true&connectTimeout={CONNECT_TIMEOUT_SECONDS}"
                f"{self._jdbc_tls}")

    def pg_service_conf(self) -> str:
        """Sections a client names with `service=<cluster>` (PGSERVICEFILE or ~/.pg_service.conf)."""
        addresses = ",".join(address for _, address in self.database_hosts)
        common = [f"port={self.postgres_port}", f"dbname={self.dbname}", f"user={self.user}",
                  f"connect_timeout={CONNECT_TIMEOUT_SECONDS}"]
        if self.rootcert:
            common += ["sslmode=verify-full", f"sslrootcert={self.rootcert}"]
        sections = [
            [f"[{self.cluster}]", f"host={addresses}", *common, "target_session_attrs=read-write"],
            [f"[{self.cluster}-ro]", f"host={addresses}", *common, "target_session_attrs=prefer-standby"],
        ]
        for suffix, endpoint in (("vip", self.vip_rw), ("vip-ro", self.vip_ro)):
            if endpoint is not None:
                sections.append([f"[{self.cluster}-{suffix}]", f"host={endpoint.address}", f"port={endpoint.port}",
                                 *common[1:]])
        header = [f"# Managed by bouwsteen: how clients connect to {self.cluster}. No passwords here."]
        return "\n\n".join("\n".join(section) for section in [header, *sections]) + "\n"

    def rows(self) -> list[dict[str, str]]:
        endpoints = [e for e in (self.vip_rw, self.vip_ro) if e is not None] + self.primary_port_endpoints
        rows = [{"how": e.purpose, "connect to": f"{e.address}:{e.port}", "host": e.host} for e in endpoints]
        rows += [
            {"how": "libpq, read-write (client-side failover)", "connect to": self.rw_uri, "host": "every db host"},
            {"how": "libpq, reads (a standby if there is one)", "connect to": self.ro_uri, "host": "every db host"},
            {"how": "JDBC, primary", "connect to": self.jdbc_url, "host": "every db host"},
            {"how": "JDBC, reads", "connect to": self.jdbc_ro_url, "host": "every db host"},
        ]
        return rows

    def markdown(self, service_file: Path) -> str:
        table = ["| how | connect to | host |", "|---|---|---|"]
        table += [f"| {r['how']} | `{r['connect to']}` | {r['host']} |" for r in self.rows()]
        return "\n".join([
            f"# How clients connect to {self.cluster}",
            "",
            f"User `{self.user}`, database `{self.dbname}`; the password is not in this report.",
            "",
            *table,
            "",
            f"`pg_service.conf` (written to `{service_file}`):",
            "",
            "```ini",
            self.pg_service_conf().rstrip("\n"),
            "```",
        ])


def primary_port_endpoint(ctx: ClusterContext, host: str) -> PgEndpoint:
    """The application user on one database host's port to the primary."""
    spec = ctx.inventory.host(host)
    return ctx.application_endpoint(str(spec.address), ha_driver(ctx.inventory).rw_port(ctx.inventory), name=host)


def multi_host_endpoint(ctx: ClusterContext, target_session_attrs: str = "read-write") -> PgEndpoint:
    """The application user as a multi-host libpq client (the report's URI) connects."""
    inv = ctx.inventory
    return ctx.application_endpoint(",".join(str(h.address) for h in inv.db_hosts), inv.cluster.postgres.port,
                                    name="multi-host", target_session_attrs=target_session_attrs)


def service_file(cluster: str) -> Path:
    return bouwsteen_home() / "clients" / cluster / "pg_service.conf"


@step
def ensure_client_connection_report(cluster: str) -> ClientConnections:
    """The cluster's client connection facts as an artifact, and as a pg_service.conf on the controller."""
    ctx = context_for(cluster)
    user = ctx.db_secrets.application_user
    tls = ctx.client_tls()
    facts = ClientConnections.of(ctx.inventory, user, rootcert=tls.rootcert if tls else None)
    path = service_file(cluster)
    text = facts.pg_service_conf()
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    create_markdown_artifact(key=f"client-connections-{cluster}", markdown=facts.markdown(path),
                             description=f"How clients connect to {cluster}")
    say(f"Clients of {cluster}: rw on port {facts.primary_port} of every database host"
        + (f" or {facts.vip_rw.address}:{facts.vip_rw.port}" if facts.vip_rw else "")
        + f"; {path} has the pg_service.conf sections.")
    return facts
