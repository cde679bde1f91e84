"""Runbook steps for the routing cluster: HAProxy + keepalived + the primary detector on the routers."""

from __future__ import annotations

from dataclasses import dataclass

from blocks.inventory import Role
from tasks.adapters.commands import ManagedFile, cmd, script
from tasks.adapters.postgres import Postgres
from tasks.adapters.remote import RemoteError
from tasks.adapters.routing.config import DETECTOR_USER, HAPROXY_CFG, ROUTER_CHECK
from tasks.context import ClusterContext, context_for
from tasks.errors import NotYet
from tasks.hosts import desired_layers
from tasks.runtime import say, step, wait_for


def routers(ctx: ClusterContext):
    return ctx.inventory.with_role(Role.router)


@step
def ensure_router_prepared(cluster: str, host: str) -> str:
    """Service account of the detector; HAProxy's runtime dir."""
    ctx = context_for(cluster)
    with ctx.remote(host) as remote:
        remote.run(script(
            'id -u "$1" >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin "$1"; '
            'install -d -o root -g root -m 0755 /usr/local/lib/bouwsteen /etc/bouwsteen',
            args=[DETECTOR_USER], description=f"ensure user {DETECTOR_USER}"))
    return say(f"{host}: detector account and directories in place.")


@step
def is_haproxy_config_valid(cluster: str, host: str) -> bool:
    """`haproxy -c` on the rendered file before it replaces the live one (never reload a bad config):
    True, else the RemoteError carries haproxy's complaint."""
    ctx = context_for(cluster)
    layer = desired_layers(ctx)[host]["router"]
    wanted = next(f for f in layer.files if f.path == HAPROXY_CFG)
    candidate = ManagedFile(HAPROXY_CFG + ".candidate", wanted.content, owner="root", mode=0o644)
    with ctx.remote(host) as remote:
        remote.ensure_file(candidate)
        try:
            remote.run(cmd("haproxy", "-c", "-q", "-f", candidate.path, timeout=30))
        finally:
            remote.remove_file(candidate.path)
    say(f"{host}: the rendered HAProxy configuration passes `haproxy -c`.")
    return True


def _stats(remote, port: int) -> list[dict]:
    out = remote.run(cmd("curl", "-sf", "-m", "3", f"http://127.0.0.1:{port}/stats;csv", timeout=10,
                         description="haproxy stats (csv)")).stdout
    lines = [line for line in out.splitlines() if line and not line.startswith("# ")]
    header = out.splitlines()[0].lstrip("# ").split(",") if out else []
    return [dict(zip(header, line.split(","))) for line in lines]


@step(retries=0)
def wait_until_router_routes(cluster: str, host: str, timeout: float = 60) -> str:
    """The router is fit to hold the VIP (its keepalived check: HAProxy runs and the detector, or
    pgroute66, answers) and HAProxy on it has exactly one rw server UP."""
    ctx = context_for(cluster)
    routing = ctx.inventory.cluster.routing
    assert routing is not None

    with ctx.remote(host) as remote:
        def ready() -> str:
            fit = remote.run(cmd(ROUTER_CHECK, timeout=10, ok_codes=range(0, 256)))
            if fit.exit_code != 0:
                raise NotYet(f"{ROUTER_CHECK} exits {fit.exit_code}: the primary detector does not answer yet")
            rows = _stats(remote, routing.stats_port)
            up = [r["svname"] for r in rows if r.get("pxname") == "postgres_rw" and r.get("status") == "UP"
                  and r.get("svname") not in ("FRONTEND", "BACKEND")]
            if len(up) != 1:
                raise NotYet(f"rw servers UP: {up}")
            return up[0]

        primary = wait_for(f"{host} routing rw to exactly one server", ready, timeout=timeout, interval=0.5)
    return say(f"{host}: fit to hold the VIP; HAProxy sends rw to {primary} only.")


def vip_holders(ctx: ClusterContext) -> list[str]:
    routing = ctx.inventory.cluster.routing
    assert routing is not None
    holders = []
    for router in routers(ctx):
        try:
            with ctx.remote(router) as remote:
                out = remote.run(cmd("ip", "-4", "-o", "addr", "show", "dev", routing.interface, timeout=10)).stdout
        except RemoteError:  # an unreachable router holds nothing we can see
            continue
        if f" {routing.vip}/" in out:
            holders.append(router.name)
    return holders


@step(retries=0)
def wait_until_vip_held(cluster: str, timeout: float = 30, not_on: str | None = None) -> str:
    ctx = context_for(cluster)

    def one_holder() -> str:
        holders = vip_holders(ctx)
        if len(holders) != 1 or holders[0] == not_on:
            raise NotYet(f"VIP held by {holders}")
        return holders[0]

    holder = wait_for("the VIP held by exactly one router", one_holder, timeout=timeout, interval=0.5)
    say(f"The VIP {ctx.inventory.cluster.routing.vip} is on {holder}.")
    return holder


def through_vip(ctx: ClusterContext, port: int) -> tuple[bool, str]:
    """(in_recovery, server address) of whatever the VIP port leads to, as the application user."""
    routing = ctx.inventory.cluster.routing
    assert routing is not None
    endpoint = ctx.application_endpoint(str(routing.vip), port)
    with Postgres(endpoint, statement_timeout_ms=3000) as pg:
        return pg.serving()


@dataclass(frozen=True)
class Routes:
    """is_routing_correct's answer (routing that stays wrong past the deadline raises)."""

    ok: bool  # rw reaches the primary and ro a standby
    rw: str  # the database host the VIP's rw port reaches
    ro: str

    def __bool__(self) -> bool:
        return self.ok


@step(retries=0)
def is_routing_correct(cluster: str, timeout: float = 30) -> Routes:
    """Through the VIP: :rw reaches the primary, :ro reaches a standby."""
    ctx = context_for(cluster)
    routing = ctx.inventory.cluster.routing
    assert routing is not None
    names = {str(h.address): h.name for h in ctx.inventory.db_hosts}

    def check() -> Routes:
        rw_recovery, rw_addr = through_vip(ctx, routing.rw_port)
        ro_recovery, ro_addr = through_vip(ctx, routing.ro_port)
        if rw_recovery or not ro_recovery:
            raise NotYet(f"rw in recovery={rw_recovery} ({rw_addr}), ro in recovery={ro_recovery} ({ro_addr})")
        return Routes(ok=True, rw=names.get(rw_addr, rw_addr), ro=names.get(ro_addr, ro_addr))

    result = wait_for("rw to the primary and ro to a standby through the VIP", check, timeout=timeout, interval=0.5)
    say(f"Through the VIP: :{routing.rw_port} reaches the primary {result.rw}, "
        f":{routing.ro_port} a standby ({result.ro}).")
    return result

