"""Certificates from the cluster's CA: who gets which, issued so that a rerun changes nothing.

The site's PKI (ChainSmith in the building block, the lab's CA here) hands each cluster an issuing
CA (certificate + key, an encrypted block). Every certificate a cluster needs is a pure function of
that CA, the identity (subject and names), the issuing period and the generation:

- the leaf key is derived from an HMAC of the CA key over the identity, period and generation,
  and signed with deterministic ECDSA (RFC 6979), so the same inputs give the same bytes: a host
  that already has its certificate for this period is left alone, with no state kept anywhere;
- a period lasts `lifetime - renew_within` days, so a certificate of the current period always
  has at least `renew_within` days left; when the next period starts, every run wants the next one;
- bumping the generation (a forced rotation, a suspected key leak) gives new keys at once.

Anyone holding the CA key can issue any certificate already, so deriving leaves from it gives
them nothing more; TLS 1.3's ephemeral key exchange keeps recorded traffic closed even then.
No I/O here: callers install the files.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
from dataclasses import dataclass
from functools import lru_cache

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tasks.errors import BouwsteenError

# Every issuing period is counted from here (a fixed date, so all controllers agree).
EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
# The order of the P-256 group: a derived private scalar must lie in [1, n-1].
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


class CertificateError(BouwsteenError, ValueError):
    """The CA material is unusable, or a certificate cannot be issued as asked."""


@dataclass(frozen=True)
class Identity:
    """Who a certificate is for. A client's common name is the PostgreSQL role it logs in as."""

    common_name: str
    dns_names: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()
    server: bool = True  # False: a client certificate only (no SAN needed)

    def key_material(self) -> bytes:
        return "\n".join([self.common_name, ",".join(self.dns_names), ",".join(self.addresses),
                          "server" if self.server else "client"]).encode()


@dataclass(frozen=True)
class Period:
    index: int
    not_before: dt.datetime
    not_after: dt.datetime


@dataclass(frozen=True)
class Issued:
    certificate_pem: str
    private_key_pem: str
    not_after: dt.datetime


@dataclass(frozen=True)
class CertificateFacts:
    """What a certificate says about itself: enough for a pre-flight or an expiry report."""

    subject: str
    issuer: str
    not_after: dt.datetime
    fingerprint: str  # sha256 of the DER, hex

    def days_left(self, now: dt.datetime) -> float:
        return (self.not_after - now).total_seconds() / 86400


def period_at(now: dt.datetime, *, lifetime_days: int, renew_within_days: int) -> Period:
    if not 0 < renew_within_days < lifetime_days:
        raise CertificateError(f"renew_within_days ({renew_within_days}) must be between 0 and lifetime_days "
                               f"({lifetime_days})")
    length = dt.timedelta(days=lifetime_days - renew_within_days)
    index = int((now - EPOCH) // length)
    start = EPOCH + index * length
    # An hour of slack before the start: a host whose clock is a little behind still accepts it.
    return Period(index=index, not_before=start - dt.timedelta(hours=1), not_after=start + dt.timedelta(days=lifetime_days))


class ClusterCA:
    """The cluster's issuing CA. `also_trusted_pem`: CAs still trusted beside it (a roll-over)."""

    def __init__(self, certificate_pem: str, private_key_pem: str, also_trusted_pem: str = ""):
        try:
            self.certificate = x509.load_pem_x509_certificate(certificate_pem.encode())
            key = serialization.load_pem_private_key(private_key_pem.encode(), password=None)
        except ValueError as exc:
            raise CertificateError(f"the cluster CA's certificate or key is not valid PEM: {exc}") from None
        except TypeError:  # an encrypted key: there is no passphrase to give
            raise CertificateError("the cluster CA's key is encrypted; it must be unencrypted PEM") from None
        # P-256 or P-384 only: the key derivation below reads the private value as 48 bytes.
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in ("secp256r1", "secp384r1"):
            raise CertificateError("the cluster CA's key must be an EC key (P-256 or P-384)")
        if key.public_key().public_numbers() != self.certificate.public_key().public_numbers():
            raise CertificateError("the cluster CA's key does not belong to its certificate")
        try:
            constraints = self.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise CertificateError("the cluster CA's certificate is not a CA certificate (basicConstraints CA:TRUE)")
        self._key = key
        self.certificate_pem = self.certificate.public_bytes(serialization.Encoding.PEM).decode()
        self.also_trusted_pem = also_trusted_pem.strip()
        if self.also_trusted_pem:
            try:
                x509.load_pem_x509_certificates(self.also_trusted_pem.encode())
            except ValueError as exc:
                raise CertificateError(f"the CAs trusted beside the cluster CA are not PEM certificates: {exc}") from None
        self._secret = hashlib.sha256(key.private_numbers().private_value.to_bytes(48, "big")).digest()

    @property
    def trust_bundle_pem(self) -> str:
        """What every client and server trusts: this CA and any still trusted beside it, each once,
        in fingerprint order. The order does not follow which one issues: a roll-over's second
        step (the new CA issues, the old one is trusted beside it) leaves every bundle as it is,
        so no service reloads for it."""
        certificates = [self.certificate, *(x509.load_pem_x509_certificates(self.also_trusted_pem.encode())
                                           if self.also_trusted_pem else [])]
        unique = {c.fingerprint(hashes.SHA256()): c for c in certificates}
        return "".join(unique[f].public_bytes(serialization.Encoding.PEM).decode() for f in sorted(unique))

    @property
    def fingerprint(self) -> str:
        return self.certificate.fingerprint(hashes.SHA256()).hex()

    @staticmethod
    def _material(identity: Identity, period: Period, generation: int) -> bytes:
        # The period's bounds, not just its index: with other windows (a changed lifetime) the
        # same index is another period, and its certificate must not reuse the serial.
        return identity.key_material() + (f"\n{period.index}\n{period.not_before.isoformat()}"
                                          f"\n{period.not_after.isoformat()}\n{generation}").encode()

    def _derive_key(self, identity: Identity, period: Period, generation: int) -> ec.EllipticCurvePrivateKey:
        material = self._material(identity, period, generation)
        counter = 0
        while True:
            digest = hmac.new(self._secret, material + counter.to_bytes(4, "big"), hashlib.sha512).digest()
            scalar = int.from_bytes(digest, "big") % _P256_ORDER
            if scalar:
                return ec.derive_private_key(scalar, ec.SECP256R1())
            counter += 1

    def issue(self, identity: Identity, period: Period, generation: int = 0) -> Issued:
        return _issue_cached(self, identity, period, generation)

    def _issue(self, identity: Identity, period: Period, generation: int) -> Issued:
        key = self._derive_key(identity, period, generation)
        not_after = min(period.not_after, self.certificate.not_valid_after_utc)
        # Over the end date too: a CA re-issued with the same key but another end gives other certificates.
        serial = int.from_bytes(hmac.new(self._secret, b"serial\n" + self._material(identity, period, generation)
                                         + f"\n{not_after.isoformat()}".encode(), hashlib.sha256).digest()[:16],
                                "big") >> 1 or 1
        if not_after <= period.not_before:
            raise CertificateError(f"the cluster CA expires on {self.certificate.not_valid_after_utc:%Y-%m-%d}, "
                                   f"before the issuing period that starts on {period.not_before:%Y-%m-%d}: "
                                   "the site's PKI must hand out a new CA")
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.common_name)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(period.not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, True, False, True, False, False, False, False), critical=True)
        )
        if identity.server:
            names: list[x509.GeneralName] = [x509.DNSName(n) for n in identity.dns_names]
            names += [x509.IPAddress(ipaddress.ip_address(a)) for a in identity.addresses]
            if not names:
                raise CertificateError(f"{identity.common_name}: a server certificate needs a name or an address")
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
            usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        else:
            usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        cert = builder.sign(self._key, hashes.SHA256(), ecdsa_deterministic=True)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
        return Issued(cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem, not_after)


@lru_cache(maxsize=512)
def _issue_cached(ca: ClusterCA, identity: Identity, period: Period, generation: int) -> Issued:
    # Deterministic, so caching changes nothing but the cost: a flow renders each host's files
    # several times (plan, act, verify).
    return ca._issue(identity, period, generation)


def facts(certificate_pem: str) -> CertificateFacts:
    try:
        cert = x509.load_pem_x509_certificate(certificate_pem.encode())
    except ValueError as exc:
        raise CertificateError(f"not a PEM certificate: {exc}") from None
    return CertificateFacts(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        not_after=cert.not_valid_after_utc,
        fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
    )


# ---------------------------------------------------------------------------------------------
# Where a database host keeps its certificates. One folder, postgres's own: PostgreSQL reads the
# server pair, and the OS user postgres (Patroni or the keeper, pg_rewind, pg_basebackup) presents
# a role's client pair when it connects to a peer.

PG_TLS_DIR = "/var/lib/postgresql/tls"
PG_CA = f"{PG_TLS_DIR}/ca.crt"
PG_SERVER_CERT = f"{PG_TLS_DIR}/server.crt"
PG_SERVER_KEY = f"{PG_TLS_DIR}/server.key"
# Routers and restore hosts trust the same CA; their clients (the detector) read it here.
HOST_CA = "/etc/bouwsteen/tls/ca.crt"


def pg_client_pair(role: str) -> tuple[str, str]:
    return f"{PG_TLS_DIR}/{role}.crt", f"{PG_TLS_DIR}/{role}.key"


def server_identity(inv, host) -> Identity:
    """A database host's server certificate. Besides its own name and address it names every
    address a client may reach it through: each database host's proxy port (it relays to whichever
    member is primary), the routers' VIP, and loopback (Patroni's own replication check)."""
    names = [host.name, "localhost"]
    addresses = [str(host.address), "127.0.0.1"]
    for peer in inv.db_hosts:
        names.append(peer.name)
        addresses.append(str(peer.address))
    if inv.cluster.routing is not None:
        addresses.append(str(inv.cluster.routing.vip))
    return Identity(host.name, tuple(dict.fromkeys(names)), tuple(dict.fromkeys(addresses)))


def current_period(inv, now: dt.datetime | None = None) -> Period:
    tls = inv.cluster.tls
    return period_at(now or dt.datetime.now(dt.UTC), lifetime_days=tls.lifetime_days,
                     renew_within_days=tls.renew_within_days)


def postgres_tls_files(inv, host, ca: ClusterCA, client_roles: tuple[str, ...], now: dt.datetime | None = None):
    """The CA bundle, the server pair and a client pair per role (its common name is the role)."""
    from tasks.adapters.commands import ManagedFile

    period, generation = current_period(inv, now), inv.cluster.tls.generation
    server = ca.issue(server_identity(inv, host), period, generation)
    files = [
        ManagedFile(PG_CA, ca.trust_bundle_pem, owner="postgres", mode=0o644),
        ManagedFile(PG_SERVER_KEY, server.private_key_pem, owner="postgres", mode=0o600, secret=True),
        ManagedFile(PG_SERVER_CERT, server.certificate_pem, owner="postgres", mode=0o644),
    ]
    for role in client_roles:
        issued = ca.issue(Identity(role, server=False), period, generation)
        crt, key = pg_client_pair(role)
        files += [ManagedFile(key, issued.private_key_pem, owner="postgres", mode=0o600, secret=True),
                  ManagedFile(crt, issued.certificate_pem, owner="postgres", mode=0o644)]
    return files


def client_pair(inv, ca: ClusterCA, role: str, now: dt.datetime | None = None) -> Issued:
    """A role's client certificate for the controller (the superuser's, for the flows)."""
    return ca.issue(Identity(role, server=False), current_period(inv, now), inv.cluster.tls.generation)


def tls_paths() -> tuple[str, ...]:
    """Every PostgreSQL TLS file whose change needs PostgreSQL to reload (new server pair or CA)."""
    return (PG_CA, PG_SERVER_CERT, PG_SERVER_KEY)


def bundle_facts(pem: str) -> list[CertificateFacts]:
    """Facts of every certificate in a PEM file (a CA bundle holds several during a roll-over)."""
    try:
        certificates = x509.load_pem_x509_certificates(pem.encode())
    except ValueError as exc:
        raise CertificateError(f"not a PEM certificate bundle: {exc}") from None
    return [facts(c.public_bytes(serialization.Encoding.PEM).decode()) for c in certificates]


def installed_paths(inv, host, client_roles: tuple[str, ...]) -> tuple[str, ...]:
    """The certificate files (not keys) a host of this cluster should have with TLS on. A
    database host also has the etcd client pair, an etcd member its member pair."""
    from blocks.inventory import Role

    paths: list[str] = []
    if host.name in {h.name for h in inv.db_hosts}:
        paths += [PG_CA, PG_SERVER_CERT, *(pg_client_pair(role)[0] for role in (*client_roles, ETCD_CLIENT))]
    if host.name in {h.name for h in inv.etcd_members}:
        paths += [ETCD_CA, ETCD_MEMBER_CERT]
    if inv.cluster.routing is not None and host.name in {h.name for h in inv.with_role(Role.router)}:
        paths.append(HOST_CA)
    return tuple(dict.fromkeys(paths))


# ---------------------------------------------------------------------------------------------
# etcd: every member serves clients and peers with one pair (server and client use), and asks
# every client and peer for a certificate of the cluster's CA. Its clients on a database host
# (Patroni, the leader-away callback, both as postgres) present the etcd client pair.

ETCD_TLS_DIR = "/etc/bouwsteen/tls/etcd"
ETCD_CA = f"{ETCD_TLS_DIR}/ca.crt"
ETCD_MEMBER_CERT = f"{ETCD_TLS_DIR}/member.crt"
ETCD_MEMBER_KEY = f"{ETCD_TLS_DIR}/member.key"
ETCD_CLIENT = "etcd-client"  # common name of every etcd client's certificate


def etcd_member_identity(host) -> Identity:
    return Identity(host.name, (host.name, "localhost"), (str(host.address), "127.0.0.1"))


def etcd_member_files(inv, host, ca: ClusterCA, now: dt.datetime | None = None):
    from tasks.adapters.commands import ManagedFile

    issued = ca.issue(etcd_member_identity(host), current_period(inv, now), inv.cluster.tls.generation)
    return [
        ManagedFile(ETCD_CA, ca.trust_bundle_pem, owner="root", mode=0o644),
        ManagedFile(ETCD_MEMBER_KEY, issued.private_key_pem, owner="etcd", mode=0o600, secret=True),
        ManagedFile(ETCD_MEMBER_CERT, issued.certificate_pem, owner="etcd", mode=0o644),
    ]


def etcd_member_paths() -> tuple[str, ...]:
    return (ETCD_CA, ETCD_MEMBER_CERT, ETCD_MEMBER_KEY)


def etcd_client_tls_args() -> list[str]:
    """etcdctl's flags for a database host's etcd client pair (read as root or postgres)."""
    crt, key = pg_client_pair(ETCD_CLIENT)
    return [f"--cacert={PG_CA}", f"--cert={crt}", f"--key={key}"]
