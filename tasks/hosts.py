"""Runbook steps on one host: probe it, install its packages, write its files, run its units.

Each step opens its own connections (tasks get plain values), checks before it acts, and ends
with one sentence of outcome. Decisions come from the pure planners in `tasks.planning`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from blocks.inventory import HostSpec
from tasks.adapters import pki
from tasks.adapters.commands import cmd, script
from tasks.adapters.ha.pgdata import pgdata
from tasks.adapters.packages import refresh_command
from tasks.adapters.probe import HostSnapshot, parse_probe, probe_command
from tasks.adapters.remote import RemoteError, RemoteHost, RemoteUnreachable
from tasks.context import ClusterContext, context_for
from tasks.desired import ClusterSecrets, all_desired, ha_driver, stack_packages
from tasks.errors import PreflightRefused
from tasks.planning.build import DesiredHost, plan_host, release_problem
from tasks.runtime import say, step


def cluster_secrets(ctx: ClusterContext) -> ClusterSecrets:
    store = ctx.store_secrets if ctx.store_block is not None else None
    return ClusterSecrets(db=ctx.db_secrets, store=store, server=ctx.server_secrets, routing=ctx.routing_secrets,
                          ca=ctx.cluster_ca)


def desired_layers(ctx: ClusterContext) -> dict[str, dict[str, DesiredHost]]:
    return all_desired(ctx.inventory, cluster_secrets(ctx))


def _probe_args(ctx: ClusterContext, layers) -> dict:
    inv = ctx.inventory
    return {
        "files": [f.path for layer in layers for f in layer.files],
        "units": [u.name for layer in layers for u in layer.units],
        "packages": [p for layer in layers for p in layer.packages],
        "data_dir": pgdata(inv),
        "ports": sorted({p for layer in layers for p in layer.ports}),
        "tools": sorted({f.tool for layer in layers for f in layer.release_floors}),
    }


def snapshot(ctx: ClusterContext, host: HostSpec, layers) -> HostSnapshot:
    with ctx.remote(host) as remote:
        return parse_probe(host.name, remote.run(probe_command(**_probe_args(ctx, layers))))


@dataclass(frozen=True)
class HostProbe:
    """is_host_ready's answer (a host that cannot be probed raises): what the plan compares against."""

    ok: bool  # the host answered the probe
    snapshot: HostSnapshot

    def __bool__(self) -> bool:
        return self.ok


@step(retries=2)
def is_host_ready(cluster: str, host: str, inventory: dict | None = None) -> HostProbe:
    """Read-only: probe the host for everything the plan compares against."""
    ctx = context_for(cluster, inventory=inventory)
    spec = ctx.inventory.host(host)
    wanted = list(desired_layers(ctx).get(host, {}).values())
    snap = snapshot(ctx, spec, wanted)
    say(f"{host}: {snap.os_pretty}, data directory {'empty' if snap.data_dir.is_empty else 'in use'}, "
        f"member of {snap.marker_cluster or 'no cluster'}.")
    return HostProbe(ok=True, snapshot=snap)


@dataclass(frozen=True)
class HostFacts:
    """is_host_reachable's answer and the facts it collected; the flow's row for a host it could
    not reach says ok=False and why."""

    host: str
    address: str
    ok: bool  # reachable over SSH with a verified host key
    ssh_user: str = ""  # who the SSH session logs in as (`id -un` without sudo)
    sudo: bool = False  # commands needing root run through `sudo -n` (a plain login user)
    hostname: str = ""
    os: str = ""
    systemd: str = ""
    disk_free_gib: float | None = None
    memory_available_mib: int | None = None
    packages: str = ""
    error: str = ""

    def __bool__(self) -> bool:
        return self.ok

    def row(self) -> dict:
        """The artifact's and the flow result's row: `ok` is the column `reachable`."""
        return {("reachable" if key == "ok" else key): value for key, value in asdict(self).items()}


@step(retries=0)
def is_host_answering(cluster: str, host: str) -> bool:
    """One SSH attempt (host key verified) at a host said to be gone: does it answer at all? Not
    answering is the expected answer here, not a failure to retry."""
    ctx = context_for(cluster)
    try:
        with ctx.remote(host) as remote:
            remote.run(cmd("true", timeout=10))
    except RemoteUnreachable as exc:
        say(f"{host} does not answer over SSH ({str(exc).splitlines()[0][:160]}).")
        return False
    say(f"{host} answers over SSH.")
    return True


@step(retries=2)
def is_host_reachable(cluster: str, host: str) -> HostFacts:
    """Connect over SSH (host key verified) and collect the facts a DBA checks first."""
    ctx = context_for(cluster)
    spec = ctx.inventory.host(host)
    with ctx.remote(spec) as remote:
        login = remote.run(cmd("id", "-un", timeout=10), as_login_user=True).stdout.strip()
        hostname, effective = (remote.run(script("hostname; id -un", timeout=10, description="hostname and root"))
                               .stdout.split() + ["", ""])[:2]
        if effective != "root":
            raise RemoteError(host, "id -un", 0, reason=f"commands run as {effective or 'nobody'}, not root; "
                              f"{login} needs sudo to root")
        os_name = remote.run(
            script('. /etc/os-release && echo "$PRETTY_NAME"', timeout=10, description="read /etc/os-release")
        ).stdout.strip()
        systemd = remote.run(
            cmd("systemctl", "is-system-running", timeout=10, ok_codes=range(0, 256))
        ).stdout.strip()
        disk = remote.run(cmd("df", "--output=avail", "-B1", "/", timeout=10)).stdout.split()[-1]
        memory = remote.run(
            script("awk '/MemAvailable/ {print int($2/1024)}' /proc/meminfo", timeout=10, description="read meminfo")
        ).stdout.strip()
        packages = remote.run(
            cmd("dpkg-query", "-W", "-f=${Package}=${Version};", *stack_packages(ctx.inventory), timeout=20,
                ok_codes=(0, 1))
        ).stdout.strip()
    facts = HostFacts(
        host=host, address=str(spec.address), ok=True, ssh_user=login, sudo=login != "root", hostname=hostname,
        os=os_name, systemd=systemd,
        disk_free_gib=round(int(disk) / 2**30, 1), memory_available_mib=int(memory or 0),
        packages=" ".join(p for p in packages.split(";") if p and not p.endswith("=")),
    )
    via = f"{login} with sudo" if facts.sudo else login
    say(f"{host} answers as {hostname!r} (logged in as {via}): {os_name}, systemd {systemd}, "
        f"{facts.disk_free_gib} GiB free.")
    return facts


def install_missing(remote: RemoteHost, packages: list[str]) -> list[str]:
    """apt-installs what of `packages` is not installed yet; returns what it installed. Every host
    role's packages go through here (the package lists fresh, then no recommends)."""
    result = remote.run(cmd("dpkg-query", "-W", "-f=${Package} ${db:Status-Abbrev}\n", *packages,
                            timeout=30, ok_codes=(0, 1)))
    installed = {line.split()[0] for line in result.stdout.splitlines() if line.split()[1:2] == ["ii"]}
    missing = [p for p in packages if p not in installed]
    if missing:
        remote.run(refresh_command())
        remote.run(cmd("apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing,
                       timeout=1800, env={"DEBIAN_FRONTEND": "noninteractive"}))
    return missing


@step
def ensure_packages(cluster: str, host: str, packages: list[str]) -> str:
    """Install missing OS packages with apt (on lab hosts they are already there)."""
    ctx = context_for(cluster)
    with ctx.remote(host) as remote:
        missing = install_missing(remote, packages)
    if not missing:
        return say(f"{host}: all {len(packages)} packages present; nothing installed.")
    # Pre-flight could only check releases already installed; what apt just chose is checked here
    # with the same host probe, before any configuration is written or a service started.
    layers = list(desired_layers(ctx).get(host, {}).values())
    floors = [floor for layer in layers for floor in layer.release_floors]
    tools = snapshot(ctx, ctx.inventory.host(host), layers).tools if floors else {}
    problems = [problem for floor in floors if (problem := release_problem(host, floor, tools.get(floor.tool)))]
    if problems:
        raise PreflightRefused(*problems, nothing="configured")
    return say(f"{host}: installed {', '.join(missing)}.")


def _layer(ctx: ClusterContext, host: str, kind: str) -> DesiredHost:
    layers = desired_layers(ctx).get(host, {})
    if kind not in layers:
        raise ValueError(f"{host} has no {kind} layer in cluster {ctx.name} (roles: "
                         f"{', '.join(r.value for r in ctx.inventory.host(host).roles) or 'none'})")
    return layers[kind]


@step
def ensure_files(cluster: str, host: str, kind: str, only: list[str] | None = None) -> list[str]:
    """Write the layer's files that differ (content, owner or mode); returns the changed paths.
    `only`: just these paths of the layer (a CA bundle trusted everywhere before anything else)."""
    ctx = context_for(cluster)
    layer = _layer(ctx, host, kind)
    changed = []
    files = [f for f in layer.files if only is None or f.path in only]
    with ctx.remote(host) as remote:
        for spec in files:
            if remote.ensure_file(spec):
                changed.append(spec.path)
    if changed:
        say(f"{host}: wrote {', '.join(changed)}.")
    else:
        say(f"{host}: all {len(files)} {kind} files{' asked for' if only is not None else ''} already as wanted; "
            "none rewritten.")
    return changed


@step
def ensure_units(cluster: str, host: str, kind: str, changed: list[str], *, restart_changed: bool = True,
                 no_block: bool = False, already_started: list[str] | None = None) -> list[str]:
    """Start what is not running; restart or reload what reads a changed file. Nothing else.

    Returns the units it started, so a caller that restarts one host at a time can skip them.
    `no_block` lets members of a new etcd cluster start together (each waits for the others).
    """
    ctx = context_for(cluster)
    layer = _layer(ctx, host, kind)
    actions, started = [], []
    skip = set(already_started or [])
    with ctx.remote(host) as remote:
        if any(path.startswith("/etc/systemd/") for path in changed):
            remote.run(cmd("systemctl", "daemon-reload", timeout=60))
            actions.append("reloaded systemd")
        snap = parse_probe(host, remote.run(probe_command(**_probe_args(ctx, [layer]))))
        plan = plan_host(layer, snap)
        for unit in layer.units:
            if unit.name in skip:
                continue
            if unit.name in plan.start:
                extra = ["--no-block"] if no_block else []
                remote.run(cmd("systemctl", "enable", "--now", *extra, unit.name, timeout=120))
                actions.append(f"started {unit.name}")
                started.append(unit.name)
            elif restart_changed and set(changed) & set(unit.restart_on):
                remote.run(cmd("systemctl", "restart", unit.name, timeout=120))
                actions.append(f"restarted {unit.name}")
            elif restart_changed and set(changed) & set(unit.reload_on):
                remote.run(cmd("systemctl", "reload", unit.name, timeout=60))
                actions.append(f"reloaded {unit.name}")
        # Only after a reload: a service this run started has just read its certificate (and a
        # signal to a starting one could end it).
        reloaded = any(a.startswith("reloaded ") for a in actions)
        if kind == "db" and reloaded and set(changed) & set(pki.tls_paths()):
            for command in ha_driver(ctx.inventory).tls_reloaded_commands(ctx.inventory, ctx.inventory.host(host)):
                remote.run(command)
                actions.append(command.description)
    say(f"{host}: {', '.join(actions)}." if actions else f"{host}: {kind} services already running; none touched.")
    return started
