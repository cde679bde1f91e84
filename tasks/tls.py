"""Certificates in use on the cluster's hosts: how long each has left (check_hosts alarms)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from tasks.adapters import pki
from tasks.context import context_for
from tasks.errors import VerifyFailed
from tasks.runtime import say, step


@dataclass(frozen=True)
class CertificateRow:
    host: str
    path: str
    subject: str
    issuer: str
    not_after: str
    days_left: float | None  # None: the file is missing

    def row(self) -> dict:
        return {"host": self.host, "path": self.path, "subject": self.subject, "issuer": self.issuer,
                "not after": self.not_after,
                "days left": "not installed" if self.days_left is None else f"{self.days_left:.1f}"}


@dataclass(frozen=True)
class CertificateCheck:
    """is_certificate_far_from_expiry's answer: ok when no installed certificate is within the alarm.
    A missing file is reported, not alarmed: on a host not built yet there is nothing to expire
    (build_cluster installs them)."""

    host: str
    alarm_within_days: int
    rows: tuple[CertificateRow, ...] = ()
    ok: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ok", not self.failing)

    @property
    def failing(self) -> tuple[CertificateRow, ...]:
        return tuple(r for r in self.rows if r.days_left is not None and r.days_left < self.alarm_within_days)

    def __bool__(self) -> bool:
        return self.ok


def certificate_rows(host: str, path: str, pem: str | None, now: dt.datetime) -> list[CertificateRow]:
    if pem is None:
        return [CertificateRow(host, path, "", "", "", None)]
    return [CertificateRow(host, path, f.subject, f.issuer, f.not_after.isoformat(timespec="minutes"), f.days_left(now))
            for f in pki.bundle_facts(pem)]


@step
def is_certificate_far_from_expiry(cluster: str, host: str) -> CertificateCheck:
    """Every certificate file the host should have, read (public files only) and dated."""
    ctx = context_for(cluster)
    inv = ctx.inventory
    tls = inv.cluster.tls
    spec = inv.host(host)
    if not tls.enabled:
        return CertificateCheck(host, tls.alarm_within_days)
    secrets = ctx.db_secrets
    paths = pki.installed_paths(inv, spec, (secrets.superuser, secrets.replication_user))
    now = dt.datetime.now(dt.UTC)
    rows: list[CertificateRow] = []
    with ctx.remote(spec) as remote:
        for path in paths:
            rows += certificate_rows(host, path, remote.read_file(path, missing_ok=True), now)
    check = CertificateCheck(host, tls.alarm_within_days, tuple(rows))
    if check.ok:
        installed = [r.days_left for r in rows if r.days_left is not None]
        missing = len(rows) - len(installed)
        say(f"{host}: {len(installed)} certificates, " + (f"the nearest expiry in {min(installed):.0f} days" if installed
                                                          else "none installed yet")
            + (f"; {missing} not installed yet." if missing and installed else "."))
    else:
        say(f"{host}: " + "; ".join(f"{r.path} expires in {r.days_left:.1f} days" for r in check.failing)
            + f" (alarm below {tls.alarm_within_days} days).", warning=True)
    return check


# ---------------------------------------------------------------------------------------------
# Rotation: what is installed against what the cluster's CA issues now.


@dataclass(frozen=True)
class CertificateFile:
    host: str
    path: str
    wanted_fingerprint: str
    wanted_not_after: str
    installed_fingerprint: str | None = None  # None: not installed
    installed_not_after: str | None = None
    installed_days_left: float | None = None

    @property
    def action(self) -> str:
        if self.installed_fingerprint is None:
            return "install"
        return "keep" if self.installed_fingerprint == self.wanted_fingerprint else "renew"


@dataclass(frozen=True)
class HostCertificates:
    """is_certificate_current's answer: ok when every certificate file is already the one wanted."""

    host: str
    files: tuple[CertificateFile, ...] = ()
    ok: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ok", all(f.action == "keep" for f in self.files))

    def __bool__(self) -> bool:
        return self.ok


# Certificates only (public): keys are never read back, and HAProxy's check PEM holds one.
def _is_certificate(path: str) -> bool:
    return path.endswith(".crt")


TRUST_BUNDLES = (pki.PG_CA, pki.ETCD_CA, pki.HOST_CA)


@step
def is_certificate_current(cluster: str, host: str, inventory: dict | None = None) -> HostCertificates:
    """Every certificate file of the host's layers: the installed one against the one wanted now
    (`inventory`: a what-if, e.g. the next generation)."""
    from tasks.hosts import desired_layers

    ctx = context_for(cluster, inventory=inventory)
    wanted = {f.path: f.content for kinds in [desired_layers(ctx).get(host, {})] for layer in kinds.values()
              for f in layer.files if _is_certificate(f.path)}
    now = dt.datetime.now(dt.UTC)
    files = []
    with ctx.remote(host) as remote:
        for path, content in wanted.items():
            want = pki.bundle_facts(content)
            installed_pem = remote.read_file(path, missing_ok=True)
            have = pki.bundle_facts(installed_pem) if installed_pem else []
            files.append(CertificateFile(
                host, path, ",".join(f.fingerprint for f in want), want[0].not_after.isoformat(timespec="minutes"),
                ",".join(f.fingerprint for f in have) if have else None,
                have[0].not_after.isoformat(timespec="minutes") if have else None,
                min(f.days_left(now) for f in have) if have else None,
            ))
    answer = HostCertificates(host, tuple(files))
    changing = [f for f in files if f.action != "keep"]
    say(f"{host}: all {len(files)} certificates are the ones wanted." if answer.ok else
        f"{host}: {len(changing)} of {len(files)} certificates to replace: "
        + ", ".join(f"{f.path} ({f.action})" for f in changing) + ".")
    return answer


def needs_new_generation(hosts: list[HostCertificates], *, force: bool, within_days: float) -> str | None:
    """Why every key must be replaced (a new generation), or None. Certificates of the current
    issuing period are renewed without it; one that already is the wanted one but expires within
    `within_days` can only be replaced by new keys."""
    if force:
        return "force: every key and certificate is replaced"
    short = [f for h in hosts for f in h.files
             if f.action == "keep" and f.installed_days_left is not None and f.installed_days_left < within_days
             and f.path not in TRUST_BUNDLES]
    if short:
        return (f"{len(short)} certificates expire within {within_days:g} days and are already the current "
                f"period's: {', '.join(f'{f.host}:{f.path}' for f in short[:4])}")
    return None


def untrusted_issuer(hosts: list[HostCertificates], issuing_fingerprint: str) -> str | None:
    """Why the CA that issues now cannot be rolled out by this run, or None: an installed trust
    bundle without it. The controller's own client pairs come from the issuing CA at once, and a
    service that does not trust it yet refuses them (the etcd lock first); so a new CA is trusted
    beside the old one by a run of its own before it issues."""
    lacking = [f"{h.host}:{f.path}" for h in hosts for f in h.files
               if f.path in TRUST_BUNDLES and f.installed_fingerprint is not None
               and issuing_fingerprint not in f.installed_fingerprint.split(",")]
    if not lacking:
        return None
    return (f"the issuing CA (sha256 {issuing_fingerprint[:16]}…) is not trusted yet by {', '.join(lacking[:4])}"
            + (f" and {len(lacking) - 4} more" if len(lacking) > 4 else "")
            + ": a CA roll-over takes three runs. 1. Keep the old CA in the block's certificate/private_key, "
            "put the new CA's certificate in also_trusted, run rotate_certificates (every host trusts both). "
            "2. Put the new CA in certificate/private_key and the old one in also_trusted, run it (new "
            "certificates). 3. Empty also_trusted, run it (the old CA is no longer trusted)")


@dataclass(frozen=True)
class RotationPlan:
    """rotate_certificates' plan: the certificate files to install, trust bundles first."""

    files: tuple[CertificateFile, ...] = ()
    new_generation: int | None = None
    generation_reason: str | None = None
    refusals: tuple[str, ...] = ()

    @property
    def changing(self) -> tuple[CertificateFile, ...]:
        return tuple(f for f in self.files if f.action != "keep")

    @property
    def trust_changes(self) -> tuple[CertificateFile, ...]:
        return tuple(f for f in self.changing if f.path in TRUST_BUNDLES)

    @property
    def is_noop(self) -> bool:
        return not self.refusals and not self.changing

    @property
    def noop_summary(self) -> str:
        return f"Every one of the {len(self.files)} certificates is the one wanted; nothing to rotate."

    def rows(self) -> list[dict]:
        return [{"host": f.host, "plan": f"{f.action} {f.path}"} for f in self.changing]

    def table(self) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
        header = ("host", "certificate", "action", "installed until", "new until")
        ordered = sorted(self.changing, key=lambda f: (f.path not in TRUST_BUNDLES, f.host, f.path))
        return header, [(f.host, f.path, f.action, f.installed_not_after or "-", f.wanted_not_after) for f in ordered]

    def remarks(self) -> list[str]:
        notes = []
        if self.new_generation is not None:
            notes.append(f"New keys everywhere: generation {self.new_generation} ({self.generation_reason}); the "
                         "inventory block is written back with it.")
        if self.trust_changes:
            notes.append("The CA bundles are installed on every host (and services reloaded) before any certificate "
                         "from a new CA: a roll-over never leaves a peer that does not trust the other.")
        notes.append("Hosts one at a time. PostgreSQL and Patroni reload (no restart); stolon's components restart "
                     "for a new etcd client pair (they read it once); etcd members restart one at a time, quorum and "
                     "leader kept; HAProxy reloads seamlessly.")
        return notes


@step
def ensure_certificates_presented(cluster: str, host: str) -> str:
    """Every TLS service of the host presents the certificate installed for it (reloads took)."""
    from tasks.adapters.tls_probe import presented_fingerprint
    from tasks.desired import ha_driver

    ctx = context_for(cluster)
    inv = ctx.inventory
    spec = inv.host(host)
    address = str(spec.address)
    tls = ctx.client_tls(pki.ETCD_CLIENT)  # any client pair of the cluster's CA will do
    assert tls is not None
    services: list[tuple[str, int, bool, str]] = []
    if host in {h.name for h in inv.db_hosts}:
        services.append(("PostgreSQL", inv.cluster.postgres.port, True, pki.PG_SERVER_CERT))
        if ha_driver(inv).name == "patroni":
            services.append(("Patroni REST API", inv.cluster.patroni.rest_port, False, pki.PG_SERVER_CERT))
    if host in {h.name for h in inv.etcd_members}:
        services.append(("etcd", inv.cluster.etcd.client_port, False, pki.ETCD_MEMBER_CERT))
    if not services:
        return say(f"{host}: no TLS service of the cluster's own to check.")
    def stale(remote) -> list[str]:
        wrong = []
        for name, port, postgres, path in services:
            installed = pki.facts(remote.read_file(path, missing_ok=False) or "").fingerprint
            if presented_fingerprint(address, port, tls, postgres=postgres) != installed:
                wrong.append(f"{name} on :{port} still presents another certificate than {path}")
        return wrong

    repaired = ""
    with ctx.remote(host) as remote:
        wrong = stale(remote)
        reload = ha_driver(inv).tls_reloaded_commands(inv, spec) if host in {h.name for h in inv.db_hosts} else []
        if wrong and reload:
            # A reload that came with a config change can leave Patroni's REST API on its old pair.
            for command in reload:
                remote.run(command)
            repaired, wrong = f" ({'; '.join(wrong)}: reloaded until it did)", stale(remote)
    if wrong:
        raise VerifyFailed(f"{host}: " + "; ".join(wrong))
    return say(f"{host}: {', '.join(n for n, *_ in services)} present their installed certificates, verified "
               f"against the cluster's CA{repaired}.")
