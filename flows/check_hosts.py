"""check_hosts: can we reach every host of a cluster, and what is on it? Read-only."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from tasks.adapters.commands import cmd, script
from tasks.context import context_for
from tasks.desired import stack_packages
from tasks.errors import BouwsteenError, VerifyFailed
from tasks.runtime import say, step


@dataclass
class HostFacts:
    host: str
    address: str
    reachable: bool
    hostname: str = ""
    os: str = ""
    systemd: str = ""
    disk_free_gib: float | None = None
    memory_available_mib: int | None = None
    packages: str = ""
    error: str = ""


@step(retries=2)
def is_host_reachable(cluster: str, host: str) -> dict:
    """Connect over SSH (host key verified) and collect the facts a DBA checks first."""
    ctx = context_for(cluster)
    spec = ctx.inventory.host(host)
    with ctx.remote(spec) as remote:
        hostname = remote.run(cmd("hostname", timeout=10)).stdout.strip()
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
        host=host, address=str(spec.address), reachable=True, hostname=hostname, os=os_name, systemd=systemd,
        disk_free_gib=round(int(disk) / 2**30, 1), memory_available_mib=int(memory or 0),
        packages=" ".join(p for p in packages.split(";") if p and not p.endswith("=")),
    )
    say(f"{host} answers as {hostname!r}: {os_name}, systemd {systemd}, {facts.disk_free_gib} GiB free.")
    return asdict(facts)


@flow(name="check_hosts", persist_result=True)
def check_hosts(cluster: str = "lab") -> list[dict]:
    """1. Pre-flight: load the inventory. 2. Act: reach every host in parallel. 3. Report."""
    logger = get_run_logger()
    ctx = context_for(cluster, fresh=True)
    hosts = [h.name for h in ctx.inventory.hosts]
    logger.info("1. Pre-flight: %d hosts in cluster %s: %s.", len(hosts), cluster, ", ".join(hosts))

    logger.info("2. Reaching every host over SSH, in parallel.")
    futures = {name: is_host_reachable.submit(cluster, name) for name in hosts}
    rows: list[dict] = []
    unreachable: list[str] = []
    for name, future in futures.items():
        state = future.wait() or future.state
        if future.state.is_completed():
            rows.append(future.result())
            continue
        try:
            future.result()
        except BouwsteenError as exc:  # one line per host, the whole reason
            reason = ctx.masker(str(exc)).splitlines()[0]
        else:
            reason = str(state)
        logger.error("%s is unreachable: %s", name, reason)
        unreachable.append(name)
        spec = ctx.inventory.host(name)
        rows.append(asdict(HostFacts(host=name, address=str(spec.address), reachable=False, error=reason)))

    create_table_artifact(
        key=f"check-hosts-{cluster}",
        table=rows,
        description=f"check_hosts for cluster {cluster}: {len(rows) - len(unreachable)}/{len(rows)} hosts reachable",
    )
    if unreachable:
        raise VerifyFailed(f"{len(unreachable)} host(s) unreachable: {', '.join(unreachable)}")
    logger.info("3. Done: all %d hosts answered.", len(rows))
    return rows
