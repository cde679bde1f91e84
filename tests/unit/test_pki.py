"""tasks/adapters/pki.py, tasks/adapters/client_tls.py, tasks/tls.py and the TLS settings (issue 15):
certificates as a pure function of CA, identity, period and generation; the periods as a table; the
CAs the cluster refuses; where each host keeps which file; the controller's own files; the expiry
report; the inventory's windows and `blocks register`'s refusals. No network, no lab."""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prefect.blocks.core import Block

from blocks import register
from blocks.inventory import Inventory, InventoryError, parse_inventory
from lab.pki import LabCA
from tasks.adapters import pki
from tasks.adapters.client_tls import ClientTls, controller_tls_files
from tasks.adapters.commands import ManagedFile
from tasks.adapters.ha.base import DbSecrets
from tasks.adapters.pki import (
    EPOCH,
    CertificateError,
    ClusterCA,
    Identity,
    Period,
    bundle_facts,
    client_pair,
    current_period,
    etcd_member_files,
    facts,
    installed_paths,
    period_at,
    postgres_tls_files,
    server_identity,
)
from tasks.adapters.routing.config import RoutingSecrets
from tasks.desired import ClusterSecrets, all_desired
from tasks.tls import (
    CertificateCheck,
    CertificateFile,
    CertificateRow,
    HostCertificates,
    certificate_rows,
    needs_new_generation,
    untrusted_issuer,
)

UTC = dt.timezone.utc
DAY = dt.timedelta(days=1)
# Inside period 1 of the default windows (365 - 30 = 335 days a period): far from both of its ends.
NOW = EPOCH + 400 * DAY
PERIOD = period_at(NOW, lifetime_days=365, renew_within_days=30)
SERVER = Identity("pg1", ("pg1", "localhost"), ("10.0.0.11", "127.0.0.1"))
CLIENT = Identity("postgres", server=False)

DB = {"pg1": "10.0.0.11", "pg2": "10.0.0.12", "pg3": "10.0.0.13"}
SECRETS = DbSecrets(superuser="postgres", superuser_password="su", replication_user="replicator",
                    replication_password="repl")
ROLES = (SECRETS.superuser, SECRETS.replication_user, pki.ETCD_CLIENT)  # what tasks/desired.py installs


def make_inventory(*, tls: dict[str, Any] | None = None, routing: bool = True, etcd_hosts: bool = False) -> Inventory:
    hosts = [{"name": n, "address": a, "roles": ["db"]} for n, a in DB.items()]
    hosts += [{"name": "router1", "address": "10.0.0.31", "roles": ["router"]},
              {"name": "router2", "address": "10.0.0.32", "roles": ["router"]},
              {"name": "restore1", "address": "10.0.0.41", "roles": ["restore"]},
              {"name": "spare1", "address": "10.0.0.42", "roles": []}]
    if etcd_hosts:
        hosts += [{"name": f"etcd{i}", "address": f"10.0.0.{50 + i}", "roles": ["etcd"]} for i in (1, 2, 3)]
    cluster: dict[str, Any] = {"name": "lab", "network": "10.0.0.0/24", "tls": {"enabled": True, **(tls or {})}}
    if routing:
        cluster["routing"] = {"vip": "10.0.0.100"}
    return parse_inventory({"cluster": cluster, "hosts": hosts})


INV = make_inventory()


# ------------------------------------------------------------------------------ CAs for the tests


def key_pem(key: Any, password: bytes | None = None) -> str:
    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption).decode()


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def self_signed(key: Any, *, ca: bool | None = True, not_after: dt.datetime = EPOCH + 3650 * DAY,
                cn: str = "test CA") -> x509.Certificate:
    """`ca` None: no basicConstraints at all."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(EPOCH - 30 * DAY).not_valid_after(not_after))
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
    return builder.sign(key, hashes.SHA256())


def make_ca(curve: ec.EllipticCurve | None = None, **kwargs: Any) -> ClusterCA:
    key = ec.generate_private_key(curve or ec.SECP256R1())
    return ClusterCA(cert_pem(self_signed(key, **kwargs)), key_pem(key))


@pytest.fixture(scope="module")
def lab_ca(tmp_path_factory: pytest.TempPathFactory) -> LabCA:
    ca = LabCA(tmp_path_factory.mktemp("pki"))
    ca.ensure()
    return ca


@pytest.fixture(scope="module")
def ca(lab_ca: LabCA) -> ClusterCA:
    return ClusterCA(lab_ca.certificate_pem, lab_ca.key_path.read_text())


def load(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())


def private_scalar(key_pem_text: str) -> int:
    key = serialization.load_pem_private_key(key_pem_text.encode(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key.private_numbers().private_value


def key_matches(issued: pki.Issued) -> bool:
    key = serialization.load_pem_private_key(issued.private_key_pem.encode(), password=None)
    return key.public_key().public_numbers() == load(issued.certificate_pem).public_key().public_numbers()


def eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def common_name(cert: x509.Certificate) -> str:
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def sans(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName), [str(a) for a in san.get_values_for_type(x509.IPAddress)]


# ------------------------------------------------------------------------------ determinism


def test_same_inputs_give_the_same_bytes(lab_ca: LabCA, ca: ClusterCA) -> None:
    first = ca.issue(SERVER, PERIOD, 3)
    assert ca.issue(SERVER, PERIOD, 3) == first
    # Not the cache's doing: issued afresh, and by another object holding the same CA.
    assert ca._issue(SERVER, PERIOD, 3) == first
    other = ClusterCA(lab_ca.certificate_pem, lab_ca.key_path.read_text())
    assert other is not ca and other.issue(SERVER, PERIOD, 3) == first
    # The same period reached from another instant inside it is the same period.
    later = period_at(PERIOD.not_before + 300 * DAY, lifetime_days=365, renew_within_days=30)
    assert later == PERIOD and ca._issue(SERVER, later, 3) == first


CHANGES = {
    "generation": (SERVER, PERIOD, 1),
    "next period": (SERVER, period_at(PERIOD.not_after, lifetime_days=365, renew_within_days=30), 0),
    "previous period": (SERVER, period_at(NOW - 335 * DAY, lifetime_days=365, renew_within_days=30), 0),
    "other window, same index": (SERVER, period_at(EPOCH + 50 * DAY, lifetime_days=60, renew_within_days=10), 0),
    "common name": (dataclasses.replace(SERVER, common_name="pg2"), PERIOD, 0),
    "a DNS name": (dataclasses.replace(SERVER, dns_names=("pg1", "localhost", "pg9")), PERIOD, 0),
    "an address": (dataclasses.replace(SERVER, addresses=("10.0.0.12", "127.0.0.1")), PERIOD, 0),
    "client, not server": (dataclasses.replace(SERVER, server=False), PERIOD, 0),
}


@pytest.mark.parametrize(("identity", "period", "generation"), CHANGES.values(), ids=CHANGES.keys())
def test_any_other_input_gives_another_key(ca: ClusterCA, identity: Identity, period: Period, generation: int) -> None:
    base = ca.issue(SERVER, PERIOD, 0)
    changed = ca.issue(identity, period, generation)
    assert private_scalar(changed.private_key_pem) != private_scalar(base.private_key_pem)
    assert changed.certificate_pem != base.certificate_pem
    assert load(changed.certificate_pem).serial_number != load(base.certificate_pem).serial_number


def test_another_ca_gives_another_key(ca: ClusterCA) -> None:
    assert private_scalar(make_ca().issue(SERVER, PERIOD).private_key_pem) != \
        private_scalar(ca.issue(SERVER, PERIOD).private_key_pem)


def test_a_server_certificate(ca: ClusterCA) -> None:
    issued = ca.issue(SERVER, PERIOD, 0)
    cert = load(issued.certificate_pem)
    cert.verify_directly_issued_by(ca.certificate)
    assert key_matches(issued)
    assert common_name(cert) == "pg1" and cert.issuer == ca.certificate.subject
    assert sans(cert) == (["pg1", "localhost"], ["10.0.0.11", "127.0.0.1"])
    assert eku(cert) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign and not usage.crl_sign
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey) and cert.public_key().curve.name == "secp256r1"
    assert cert.not_valid_before_utc == PERIOD.not_before and cert.not_valid_after_utc == PERIOD.not_after
    assert issued.not_after == PERIOD.not_after
    assert 0 < cert.serial_number < 2 ** 159  # positive, at most 20 octets


def test_a_client_certificate_names_its_role_only(ca: ClusterCA) -> None:
    issued = ca.issue(CLIENT, PERIOD, 0)
    cert = load(issued.certificate_pem)
    cert.verify_directly_issued_by(ca.certificate)
    assert key_matches(issued)
    assert common_name(cert) == "postgres"
    assert eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_a_server_certificate_needs_a_name(ca: ClusterCA) -> None:
    with pytest.raises(CertificateError, match="pg1: a server certificate needs a name or an address"):
        ca.issue(Identity("pg1"), PERIOD)


def test_a_p384_ca_issues_p256_leaves() -> None:
    ca = make_ca(ec.SECP384R1())
    issued = ca.issue(SERVER, PERIOD)
    load(issued.certificate_pem).verify_directly_issued_by(ca.certificate)
    assert key_matches(issued) and ca.issue(SERVER, PERIOD) == ca._issue(SERVER, PERIOD, 0)


def test_never_valid_past_the_ca() -> None:
    ca_end = PERIOD.not_before + 100 * DAY
    ca = make_ca(not_after=ca_end)
    issued = ca.issue(SERVER, PERIOD)
    assert PERIOD.not_after > ca_end
    assert issued.not_after == ca_end == load(issued.certificate_pem).not_valid_after_utc
    load(issued.certificate_pem).verify_directly_issued_by(ca.certificate)


def test_a_ca_that_ends_before_the_period_is_refused() -> None:
    ca = make_ca(not_after=PERIOD.not_before - DAY)
    with pytest.raises(CertificateError, match="the cluster CA expires on .* before the issuing period"):
        ca.issue(SERVER, PERIOD)


# ------------------------------------------------------------------------------ periods


LENGTH = 335 * DAY  # lifetime 365 - renew_within 30
SECOND = dt.timedelta(seconds=1)


@pytest.mark.parametrize(
    ("now", "lifetime", "renew", "index"),
    [
        (EPOCH, 365, 30, 0),
        (EPOCH + SECOND, 365, 30, 0),
        (EPOCH + LENGTH - SECOND, 365, 30, 0),
        (EPOCH + LENGTH, 365, 30, 1),
        (EPOCH + LENGTH + SECOND, 365, 30, 1),
        (EPOCH + 2 * LENGTH - dt.timedelta(microseconds=1), 365, 30, 1),
        (EPOCH + 2 * LENGTH, 365, 30, 2),
        (EPOCH + 10 * LENGTH + 12 * dt.timedelta(hours=1), 365, 30, 10),
        (EPOCH - SECOND, 365, 30, -1),  # a controller clock before the epoch still counts
        (EPOCH + 60 * DAY - SECOND, 90, 30, 0),
        (EPOCH + 60 * DAY, 90, 30, 1),
        (EPOCH + 6 * DAY - SECOND, 7, 1, 0),
        (EPOCH + 6 * DAY, 7, 1, 1),
        (EPOCH + 825 * DAY, 825, 365, 1),
        (EPOCH + 460 * DAY - SECOND, 825, 365, 0),
        (dt.datetime(2026, 12, 2, 0, 0, tzinfo=UTC), 365, 30, 1),  # EPOCH + 335 days on the calendar
        (dt.datetime(2026, 12, 1, 23, 59, 59, tzinfo=UTC), 365, 30, 0),
        (dt.datetime(2026, 12, 2, 1, 0, tzinfo=dt.timezone(dt.timedelta(hours=2))), 365, 30, 0),  # 23:00 UTC
    ],
)
def test_period_at(now: dt.datetime, lifetime: int, renew: int, index: int) -> None:
    period = period_at(now, lifetime_days=lifetime, renew_within_days=renew)
    start = EPOCH + index * (lifetime - renew) * DAY
    assert period == Period(index, start - dt.timedelta(hours=1), start + lifetime * DAY)
    assert period.not_before <= now < period.not_after
    # The point of the periods: a certificate of the current one has renew_within days left at least.
    assert period.not_after - now > renew * DAY


@pytest.mark.parametrize(("lifetime", "renew"), [(365, 30), (90, 30), (7, 1), (825, 365), (31, 30)])
def test_a_current_certificate_always_has_renew_within_left(ca: ClusterCA, lifetime: int, renew: int) -> None:
    length = (lifetime - renew) * DAY
    instants = [EPOCH + k * length + offset for k in range(1, 4)
                for offset in (-SECOND, dt.timedelta(0), SECOND, length / 2)]
    for now in instants:
        period = period_at(now, lifetime_days=lifetime, renew_within_days=renew)
        cert = load(ca.issue(SERVER, period).certificate_pem)
        assert cert.not_valid_before_utc <= now
        assert cert.not_valid_after_utc - now >= renew * DAY, now


def test_current_period_follows_the_inventory() -> None:
    inv = make_inventory(tls={"lifetime_days": 90, "renew_within_days": 30, "alarm_within_days": 10})
    assert current_period(inv, NOW) == period_at(NOW, lifetime_days=90, renew_within_days=30)
    assert current_period(inv).not_before <= dt.datetime.now(UTC) < current_period(inv).not_after


@pytest.mark.parametrize(("lifetime", "renew"), [(30, 30), (30, 31), (365, 0), (365, -1), (0, 0)])
def test_bad_windows(lifetime: int, renew: int) -> None:
    with pytest.raises(CertificateError, match=rf"renew_within_days \({renew}\) must be between 0 and lifetime_days"):
        period_at(NOW, lifetime_days=lifetime, renew_within_days=renew)


# ------------------------------------------------------------------------------ CAs refused


def _p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _refusal(case: str) -> tuple[str, str, str]:
    """(certificate, key, also_trusted) for one way of getting the CA wrong."""
    key = _p256()
    good = cert_pem(self_signed(key))
    if case == "certificate not PEM":
        return "not a certificate", key_pem(key), ""
    if case == "key not PEM":
        return good, "not a key", ""
    if case == "empty key":
        return good, "", ""
    if case == "a DER certificate":
        return self_signed(key).public_bytes(serialization.Encoding.DER).decode("latin-1"), key_pem(key), ""
    if case == "another CA's key":
        return good, key_pem(_p256()), ""
    if case == "a leaf as CA":
        leaf = make_ca().issue(SERVER, PERIOD)
        return leaf.certificate_pem, leaf.private_key_pem, ""
    if case == "CA:FALSE":
        return cert_pem(self_signed(key, ca=False)), key_pem(key), ""
    if case == "no basicConstraints":
        return cert_pem(self_signed(key, ca=None)), key_pem(key), ""
    if case == "RSA CA":
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return cert_pem(self_signed(rsa_key)), key_pem(rsa_key), ""
    if case == "RSA key, EC certificate":
        return good, key_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)), ""
    if case == "P-521":
        big = ec.generate_private_key(ec.SECP521R1())
        return cert_pem(self_signed(big)), key_pem(big), ""
    if case == "secp256k1":
        koblitz = ec.generate_private_key(ec.SECP256K1())
        return cert_pem(self_signed(koblitz)), key_pem(koblitz), ""
    if case == "encrypted key":
        return good, key_pem(key, b"passphrase"), ""
    if case == "also_trusted not PEM":
        return good, key_pem(key), "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----"
    raise AssertionError(case)


REFUSALS = {
    "certificate not PEM": "not valid PEM",
    "key not PEM": "not valid PEM",
    "empty key": "not valid PEM",
    "a DER certificate": "not valid PEM",
    "another CA's key": "key does not belong to its certificate",
    "a leaf as CA": r"not a CA certificate \(basicConstraints CA:TRUE\)",
    "CA:FALSE": "not a CA certificate",
    "no basicConstraints": "not a CA certificate",
    "RSA CA": r"must be an EC key \(P-256 or P-384\)",
    "RSA key, EC certificate": "must be an EC key",
    "P-521": r"must be an EC key \(P-256 or P-384\)",
    "secp256k1": r"must be an EC key \(P-256 or P-384\)",
    "encrypted key": "key is encrypted",
    "also_trusted not PEM": "trusted beside the cluster CA are not PEM certificates",
}


@pytest.mark.parametrize(("case", "message"), REFUSALS.items(), ids=REFUSALS.keys())
def test_cluster_ca_refuses(case: str, message: str) -> None:
    certificate, key, also_trusted = _refusal(case)
    with pytest.raises(CertificateError, match=message) as info:
        ClusterCA(certificate, key, also_trusted)
    assert isinstance(info.value, ValueError)  # what the inventory and block validation catch


def _ca_pems(cn: str) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    return cert_pem(self_signed(key, cn=cn)), key_pem(key)


def test_trust_bundle_during_a_roll_over(ca: ClusterCA, lab_ca: LabCA) -> None:
    old = make_ca(cn="old CA")
    rolled = ClusterCA(lab_ca.certificate_pem, lab_ca.key_path.read_text(), "\n" + old.certificate_pem + "\n\n")
    assert ca.trust_bundle_pem == ca.certificate_pem
    assert sorted(f.subject for f in bundle_facts(rolled.trust_bundle_pem)) == ["CN=bouwsteen lab CA", "CN=old CA"]
    # Issuing does not depend on what else is trusted.
    assert rolled.issue(SERVER, PERIOD) == ca.issue(SERVER, PERIOD)


def test_a_roll_over_changes_the_bundle_in_its_first_and_last_step_only() -> None:
    old_cert, old_key = _ca_pems("old CA")
    new_cert, new_key = _ca_pems("new CA")
    steps = [ClusterCA(old_cert, old_key), ClusterCA(old_cert, old_key, new_cert),
             ClusterCA(new_cert, new_key, old_cert), ClusterCA(new_cert, new_key)]
    bundles = [step.trust_bundle_pem for step in steps]
    assert [sorted(f.subject for f in bundle_facts(b)) for b in bundles] == [
        ["CN=old CA"], ["CN=new CA", "CN=old CA"], ["CN=new CA", "CN=old CA"], ["CN=new CA"]]
    assert bundles[1] == bundles[2], "swapping which CA issues rewrote the bundles"
    # Trusting a CA twice (it issues and is in also_trusted) puts it in the bundle once.
    assert ClusterCA(new_cert, new_key, old_cert + new_cert).trust_bundle_pem == bundles[2]
    assert steps[2].fingerprint == facts(new_cert).fingerprint


def test_facts(ca: ClusterCA) -> None:
    issued = ca.issue(SERVER, PERIOD)
    cert = load(issued.certificate_pem)
    found = facts(issued.certificate_pem)
    assert found.subject == "CN=pg1" and found.issuer == "CN=bouwsteen lab CA"
    assert found.not_after == PERIOD.not_after
    assert found.fingerprint == cert.fingerprint(hashes.SHA256()).hex()
    assert found.days_left(PERIOD.not_after - 10 * DAY) == pytest.approx(10.0)
    assert found.days_left(PERIOD.not_after + 12 * dt.timedelta(hours=1)) == pytest.approx(-0.5)
    assert bundle_facts(issued.certificate_pem) == [found]


@pytest.mark.parametrize("text", ["", "not pem", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"])
def test_facts_of_no_certificate(text: str) -> None:
    with pytest.raises(CertificateError, match="not a PEM certificate"):
        facts(text)
    with pytest.raises(CertificateError, match="not a PEM certificate bundle"):
        bundle_facts(text)


# ------------------------------------------------------------------------------ host layout


def by_path(files: list[ManagedFile]) -> dict[str, ManagedFile]:
    paths = [f.path for f in files]
    assert len(paths) == len(set(paths)), "a file is listed twice"
    return {f.path: f for f in files}


def test_postgres_tls_files(ca: ClusterCA) -> None:
    files = postgres_tls_files(INV, INV.host("pg2"), ca, ROLES, NOW)
    d = "/var/lib/postgresql/tls"
    assert [f.path for f in files] == [
        f"{d}/ca.crt", f"{d}/server.key", f"{d}/server.crt",
        f"{d}/postgres.key", f"{d}/postgres.crt", f"{d}/replicator.key", f"{d}/replicator.crt",
        f"{d}/etcd-client.key", f"{d}/etcd-client.crt",
    ]
    for f in files:
        assert f.owner == "postgres"
        if f.path.endswith(".key"):
            assert (f.mode, f.secret) == (0o600, True)
            assert "PRIVATE KEY" in f.content
        else:
            assert (f.mode, f.secret) == (0o644, False)
            assert "PRIVATE" not in f.content
    files_at = by_path(files)
    assert files_at[pki.PG_CA].content == ca.trust_bundle_pem
    server = load(files_at[pki.PG_SERVER_CERT].content)
    server.verify_directly_issued_by(ca.certificate)
    assert common_name(server) == "pg2"
    assert key_matches(pki.Issued(files_at[pki.PG_SERVER_CERT].content, files_at[pki.PG_SERVER_KEY].content,
                                  server.not_valid_after_utc))
    for role in ROLES:
        crt, key = pki.pg_client_pair(role)
        cert = load(files_at[crt].content)
        cert.verify_directly_issued_by(ca.certificate)
        assert common_name(cert) == role and eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        # The controller's pair for a role is the very one the hosts hold.
        assert client_pair(INV, ca, role, NOW) == pki.Issued(files_at[crt].content, files_at[key].content,
                                                             cert.not_valid_after_utc)


def test_postgres_tls_files_change_with_the_period_and_the_generation_only(ca: ClusterCA) -> None:
    host = INV.host("pg1")
    now = postgres_tls_files(INV, host, ca, ROLES, NOW)
    assert postgres_tls_files(INV, host, ca, ROLES, PERIOD.not_before + 2 * dt.timedelta(hours=1)) == now
    assert postgres_tls_files(INV, host, ca, ROLES, PERIOD.not_before + 335 * DAY - SECOND) == now
    for changed in (postgres_tls_files(INV, host, ca, ROLES, PERIOD.not_before + 336 * DAY),
                    postgres_tls_files(make_inventory(tls={"generation": 1}), host, ca, ROLES, NOW)):
        assert changed[0] == now[0]  # the CA bundle stays
        assert all(new.content != old.content for new, old in zip(changed[1:], now[1:]))


@pytest.mark.parametrize(
    ("inv", "host", "dns", "addresses"),
    [
        (INV, "pg2", ["pg2", "localhost", "pg1", "pg3"],
         ["10.0.0.12", "127.0.0.1", "10.0.0.11", "10.0.0.13", "10.0.0.100"]),
        (INV, "pg1", ["pg1", "localhost", "pg2", "pg3"],
         ["10.0.0.11", "127.0.0.1", "10.0.0.12", "10.0.0.13", "10.0.0.100"]),
        (make_inventory(routing=False), "pg3", ["pg3", "localhost", "pg1", "pg2"],
         ["10.0.0.13", "127.0.0.1", "10.0.0.11", "10.0.0.12"]),
    ],
    ids=["pg2 with VIP", "pg1 with VIP", "pg3 without routing"],
)
def test_server_identity(ca: ClusterCA, inv: Inventory, host: str, dns: list[str], addresses: list[str]) -> None:
    identity = server_identity(inv, inv.host(host))
    assert identity == Identity(host, tuple(dns), tuple(addresses))
    cert = load(by_path(postgres_tls_files(inv, inv.host(host), ca, (), NOW))[pki.PG_SERVER_CERT].content)
    assert sans(cert) == (dns, addresses)


@pytest.mark.parametrize("host", ["pg1", "etcd2"])
def test_etcd_member_files(ca: ClusterCA, host: str) -> None:
    inv = make_inventory(etcd_hosts=True) if host.startswith("etcd") else INV
    spec = inv.host(host)
    files = etcd_member_files(inv, spec, ca, NOW)
    d = "/etc/bouwsteen/tls/etcd"
    assert [(f.path, f.owner, f.mode, f.secret) for f in files] == [
        (f"{d}/ca.crt", "root", 0o644, False),
        (f"{d}/member.key", "etcd", 0o600, True),
        (f"{d}/member.crt", "etcd", 0o644, False),
    ]
    assert files[0].content == ca.trust_bundle_pem
    cert = load(files[2].content)
    cert.verify_directly_issued_by(ca.certificate)
    assert common_name(cert) == host
    assert sans(cert) == ([host, "localhost"], [str(spec.address), "127.0.0.1"])
    assert eku(cert) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]  # peers are clients too
    assert key_matches(pki.Issued(files[2].content, files[1].content, cert.not_valid_after_utc))
    assert set(pki.etcd_member_paths()) == {f.path for f in files}


PG = ("/var/lib/postgresql/tls/ca.crt", "/var/lib/postgresql/tls/server.crt", "/var/lib/postgresql/tls/postgres.crt",
      "/var/lib/postgresql/tls/replicator.crt", "/var/lib/postgresql/tls/etcd-client.crt")
ETCD = ("/etc/bouwsteen/tls/etcd/ca.crt", "/etc/bouwsteen/tls/etcd/member.crt")
HOST = ("/etc/bouwsteen/tls/ca.crt",)


@pytest.mark.parametrize(
    ("etcd_hosts", "host", "expected"),
    [
        (False, "pg1", PG + ETCD),  # the database hosts run etcd too
        (True, "pg1", PG),
        (True, "etcd1", ETCD),
        (False, "router1", HOST),
        (False, "restore1", ()),
        (False, "spare1", ()),
    ],
)
def test_installed_paths(etcd_hosts: bool, host: str, expected: tuple[str, ...]) -> None:
    inv = make_inventory(etcd_hosts=etcd_hosts)
    # The roles tasks/tls.py asks about: the etcd client pair is every database host's anyway.
    assert installed_paths(inv, inv.host(host), (SECRETS.superuser, SECRETS.replication_user)) == expected


@pytest.mark.parametrize("etcd_hosts", [False, True], ids=["etcd on the db hosts", "etcd hosts"])
def test_installed_paths_are_the_certificates_the_layers_install(ca: ClusterCA, etcd_hosts: bool) -> None:
    """check_hosts dates what build_cluster installs: every certificate, and nothing else."""
    inv = make_inventory(etcd_hosts=etcd_hosts)
    secrets = ClusterSecrets(db=SECRETS, store=None, ca=ca, routing=RoutingSecrets(
        vrrp_password="Vq7rXz2k", monitor_user="pgroute66", monitor_password="m", ca_bundle_pem=ca.trust_bundle_pem))
    layers = all_desired(inv, secrets)
    for host in inv.hosts:
        # A secret file is never read back to be dated (HAProxy's check PEM holds its key).
        installed = {f.path for layer in layers.get(host.name, {}).values() for f in layer.files
                     if "-----BEGIN CERTIFICATE-----" in f.content and not f.secret}
        assert set(installed_paths(inv, host, (SECRETS.superuser, SECRETS.replication_user))) == installed, host.name


# ------------------------------------------------------------------------------ the controller's files


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BOUWSTEEN_HOME", str(tmp_path))
    return tmp_path


def mode(path: Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def age(paths: list[Path]) -> None:
    """Back-date the files: a rewrite within the same clock tick would otherwise go unseen."""
    for path in paths:
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))


def test_controller_files_for_a_role(home: Path, ca: ClusterCA) -> None:
    tls = controller_tls_files(INV, ca, "postgres")
    directory = home / "tls" / "lab"
    assert tls == ClientTls(rootcert=str(directory / "ca.crt"), cert=str(directory / "postgres.crt"),
                            key=str(directory / "postgres.key"))
    assert mode(directory) == 0o700
    assert sorted(p.name for p in directory.iterdir()) == ["ca.crt", "postgres.crt", "postgres.key"]
    assert all(mode(p) == 0o600 for p in directory.iterdir())
    assert Path(tls.rootcert).read_text() == ca.trust_bundle_pem
    issued = client_pair(INV, ca, "postgres")
    assert Path(tls.cert).read_text() == issued.certificate_pem and Path(tls.key).read_text() == issued.private_key_pem
    assert tls.libpq() == {"sslmode": "verify-full", "sslrootcert": str(directory / "ca.crt"),
                           "sslcert": str(directory / "postgres.crt"), "sslkey": str(directory / "postgres.key")}


def test_controller_files_without_a_role(home: Path, ca: ClusterCA) -> None:
    tls = controller_tls_files(INV, ca, None)
    assert tls.cert is None and tls.key is None
    assert [p.name for p in (home / "tls" / "lab").iterdir()] == ["ca.crt"]
    assert tls.libpq() == {"sslmode": "verify-full", "sslrootcert": str(home / "tls" / "lab" / "ca.crt")}


def test_controller_files_are_not_rewritten_when_unchanged(home: Path, ca: ClusterCA) -> None:
    controller_tls_files(INV, ca, "postgres")
    files = sorted((home / "tls" / "lab").iterdir())
    age(files)
    before = {p.name: (os.stat(p).st_mtime_ns, os.stat(p).st_ino) for p in files}
    controller_tls_files(INV, ca, "postgres")
    controller_tls_files(INV, ca, None)
    assert {p.name: (os.stat(p).st_mtime_ns, os.stat(p).st_ino) for p in files} == before


def test_controller_files_follow_the_generation(home: Path, ca: ClusterCA) -> None:
    first = controller_tls_files(INV, ca, "postgres")
    old = {name: Path(getattr(first, name)).read_text() for name in ("rootcert", "cert", "key")}
    age(sorted((home / "tls" / "lab").iterdir()))
    ca_mtime = os.stat(first.rootcert).st_mtime_ns
    second = controller_tls_files(make_inventory(tls={"generation": 1}), ca, "postgres")
    assert second == first  # the same paths
    assert Path(second.cert).read_text() != old["cert"] and Path(second.key).read_text() != old["key"]
    assert Path(second.key).read_text() == client_pair(make_inventory(tls={"generation": 1}), ca, "postgres").private_key_pem
    assert os.stat(first.rootcert).st_mtime_ns == ca_mtime  # the CA did not change
    assert all(mode(getattr(second, name)) == 0o600 for name in ("rootcert", "cert", "key"))
    assert sorted(p.name for p in (home / "tls" / "lab").iterdir()) == ["ca.crt", "postgres.crt", "postgres.key"]


def test_controller_files_repair_loose_modes(home: Path, ca: ClusterCA) -> None:
    directory = home / "tls" / "lab"
    directory.mkdir(parents=True, mode=0o755)
    os.chmod(directory, 0o755)
    (directory / "postgres.key").write_text("stale")
    os.chmod(directory / "postgres.key", 0o644)
    tls = controller_tls_files(INV, ca, "postgres")
    assert mode(directory) == 0o700
    assert mode(tls.key) == 0o600 and Path(tls.key).read_text() == client_pair(INV, ca, "postgres").private_key_pem
    # Right content but a loose mode: replaced by a 0600 file too.
    os.chmod(tls.cert, 0o644)
    controller_tls_files(INV, ca, "postgres")
    assert mode(tls.cert) == 0o600


def test_controller_files_per_cluster(home: Path, ca: ClusterCA) -> None:
    other = parse_inventory({**tls_inventory({"enabled": True}), "cluster": {
        "name": "lab2", "network": "10.0.0.0/24", "tls": {"enabled": True}}})
    assert Path(controller_tls_files(other, ca, None).rootcert).parent == home / "tls" / "lab2"
    assert Path(controller_tls_files(INV, ca, None).rootcert).parent == home / "tls" / "lab"


# ------------------------------------------------------------------------------ expiry report (check_hosts)


def test_certificate_rows(ca: ClusterCA) -> None:
    issued = ca.issue(SERVER, PERIOD)
    now = PERIOD.not_after - 20 * DAY
    (row,) = certificate_rows("pg1", pki.PG_SERVER_CERT, issued.certificate_pem, now)
    assert row == CertificateRow("pg1", pki.PG_SERVER_CERT, "CN=pg1", "CN=bouwsteen lab CA",
                                 PERIOD.not_after.isoformat(timespec="minutes"), pytest.approx(20.0))
    assert row.row() == {"host": "pg1", "path": pki.PG_SERVER_CERT, "subject": "CN=pg1",
                         "issuer": "CN=bouwsteen lab CA", "not after": "2027-12-02T00:00+00:00", "days left": "20.0"}
    (missing,) = certificate_rows("pg1", pki.PG_CA, None, now)
    assert missing.days_left is None and missing.row()["days left"] == "not installed"
    old = make_ca(cn="old CA", not_after=now + 5 * DAY)
    rows = certificate_rows("pg1", pki.PG_CA, ca.certificate_pem + old.certificate_pem, now)
    assert [(r.subject, round(r.days_left, 1)) for r in rows] == [
        ("CN=bouwsteen lab CA", round(facts(ca.certificate_pem).days_left(now), 1)), ("CN=old CA", 5.0)]


@pytest.mark.parametrize(
    ("days_left", "alarm", "ok"),
    [
        ((90.0, 40.0), 21, True),
        ((21.0,), 21, True),  # exactly at the alarm: not yet below it
        ((20.99,), 21, False),
        ((90.0, 20.0), 21, False),
        ((-1.0,), 21, False),  # expired
        ((None,), 21, True),  # not installed yet: reported, not alarmed
        ((None, 3.0), 21, False),
        ((), 21, True),
    ],
)
def test_certificate_check(days_left: tuple[float | None, ...], alarm: int, ok: bool) -> None:
    rows = tuple(CertificateRow("pg1", f"/p{i}", "", "", "", d) for i, d in enumerate(days_left))
    check = CertificateCheck("pg1", alarm, rows)
    assert check.ok is ok and bool(check) is ok
    assert [r.days_left for r in check.failing] == [d for d in days_left if d is not None and d < alarm]


# ------------------------------------------------------------------------------ inventory and registration


def tls_inventory(tls: dict[str, Any]) -> dict[str, Any]:
    return {"cluster": {"name": "lab", "network": "10.0.0.0/24", "tls": tls},
            "hosts": [{"name": n, "address": a, "roles": ["db"]} for n, a in DB.items()]}


@pytest.mark.parametrize(
    ("tls", "message"),
    [
        ({"lifetime_days": 30, "renew_within_days": 30},
         r"cluster\.tls: .*renew_within_days \(30\) must be less than lifetime_days \(30\)"),
        ({"lifetime_days": 60, "renew_within_days": 90, "alarm_within_days": 10},
         r"renew_within_days \(90\) must be less than lifetime_days \(60\)"),
        ({"renew_within_days": 10}, r"cluster\.tls: .*alarm_within_days \(21\) must not exceed renew_within_days \(10\)"),
        ({"alarm_within_days": 31}, r"alarm_within_days \(31\) must not exceed renew_within_days \(30\)"),
        ({"lifetime_days": 6}, r"cluster\.tls\.lifetime_days: "),
        ({"lifetime_days": 826}, r"cluster\.tls\.lifetime_days: "),
        ({"renew_within_days": 0}, r"cluster\.tls\.renew_within_days: "),
        ({"alarm_within_days": 0}, r"cluster\.tls\.alarm_within_days: "),
        ({"generation": -1}, r"cluster\.tls\.generation: "),
        ({"enabled": "maybe"}, r"cluster\.tls\.enabled: "),
        ({"lifetime": 90}, r"cluster\.tls\.lifetime: "),
    ],
)
def test_tls_spec_errors_name_the_field(tls: dict[str, Any], message: str) -> None:
    with pytest.raises(InventoryError, match=message):
        parse_inventory(tls_inventory(tls), "site-a.yml")


@pytest.mark.parametrize("tls", [
    {},
    {"enabled": True},
    {"lifetime_days": 7, "renew_within_days": 6, "alarm_within_days": 6},
    {"lifetime_days": 825, "renew_within_days": 365, "alarm_within_days": 1, "generation": 10_000},
])
def test_tls_spec_accepts(tls: dict[str, Any]) -> None:
    spec = parse_inventory(tls_inventory(tls)).cluster.tls
    # Whatever the inventory accepts, the issuing periods accept.
    period_at(NOW, lifetime_days=spec.lifetime_days, renew_within_days=spec.renew_within_days)


@pytest.fixture
def cluster_files(tmp_path: Path, lab_ca: LabCA, monkeypatch: pytest.MonkeyPatch):
    """The files `blocks register` reads, and a Prefect that must not be reached unless told."""
    saved: list[tuple[str, str]] = []

    def no_server(*_: Any, **__: Any) -> None:
        raise AssertionError("nothing may reach the Prefect server before every file is checked")

    monkeypatch.setattr(register, "register_block_types", no_server)
    monkeypatch.setattr(Block, "save", no_server)
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(yaml.safe_dump(tls_inventory({"enabled": True})))
    (tmp_path / "id_ed25519").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nx\n-----END OPENSSH PRIVATE KEY-----\n")
    (tmp_path / "known_hosts").write_text("")
    # job_password given: no look-up of the block that would otherwise hold it.
    (tmp_path / "secrets.json").write_text(json.dumps({
        "superuser_password": "su", "replication_password": "repl", "application_password": "app",
        "job_password": "job"}))

    def files(**changes: Any) -> register.ClusterFiles:
        base = register.ClusterFiles(inventory=inventory, ssh_key=tmp_path / "id_ed25519",
                                     known_hosts=tmp_path / "known_hosts", secrets=tmp_path / "secrets.json",
                                     ca_certificate=lab_ca.cert_path, ca_private_key=lab_ca.key_path)
        return dataclasses.replace(base, **changes)

    def allow_saving() -> None:
        monkeypatch.setattr(register, "register_block_types", lambda: None)
        monkeypatch.setattr(Block, "save", lambda self, name, overwrite=False: saved.append((type(self).__name__, name)))

    return register, files, allow_saving, saved


def test_register_refuses_tls_without_the_ca_key(cluster_files) -> None:
    register, files, _, _ = cluster_files
    for missing in ({"ca_private_key": None}, {"ca_certificate": None}):
        with pytest.raises(ValueError, match="cluster.tls.enabled needs the cluster's issuing CA"):
            register.register_cluster(files(**missing))


@pytest.mark.parametrize("case", ["another CA's key", "a leaf as CA", "RSA CA", "P-521", "encrypted key"])
def test_register_refuses_a_bad_ca_before_saving_anything(cluster_files, tmp_path: Path, case: str) -> None:
    register, files, _, _ = cluster_files
    certificate, key, _ = _refusal(case)
    (tmp_path / "bad.crt").write_text(certificate)
    (tmp_path / "bad.key").write_text(key)
    with pytest.raises(CertificateError, match=REFUSALS[case]):
        register.register_cluster(files(ca_certificate=tmp_path / "bad.crt", ca_private_key=tmp_path / "bad.key"))


def test_register_saves_a_good_ca(cluster_files) -> None:
    register, files, allow_saving, saved = cluster_files
    allow_saving()
    register.register_cluster(files())
    assert ("CertificateAuthority", "lab") in saved
    assert [name for _, name in saved] == ["lab"] * len(saved)


def test_register_without_tls_needs_no_ca(cluster_files, tmp_path: Path) -> None:
    register, files, allow_saving, saved = cluster_files
    allow_saving()
    (tmp_path / "inventory.yaml").write_text(yaml.safe_dump(tls_inventory({"enabled": False})))
    register.register_cluster(files(ca_private_key=None))
    assert "CertificateAuthority" not in {kind for kind, _ in saved}


def test_ip_sans_are_addresses(ca: ClusterCA) -> None:
    # A SAN that is an address must be an IP entry (libpq's verify-full compares it as one).
    cert = load(ca.issue(SERVER, PERIOD).certificate_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.11"),
                                                        ipaddress.ip_address("127.0.0.1")]


# ---------------------------------------------------------------------------------------------
# rotate_certificates' decisions over what is installed.

def _host(name: str, *files: tuple[str, str | None, float | None], wanted: str = "w") -> HostCertificates:
    """files: (path, installed fingerprints or None, days left)."""
    return HostCertificates(name, tuple(CertificateFile(name, path, wanted, "2027-01-01T00:00", installed,
                                                        installed and "2027-01-01T00:00", days)
                                        for path, installed, days in files))


UNTRUSTED = {
    "bundles hold the issuer": ([_host("pg1", (pki.PG_CA, "old,new", 300.0), (pki.PG_SERVER_CERT, "x", 300.0))],
                                None),
    "nothing installed yet": ([_host("pg1", (pki.PG_CA, None, None))], None),
    "a pair's fingerprint is not a bundle": ([_host("pg1", (pki.PG_SERVER_CERT, "old", 300.0))], None),
    "one host lacks it": ([_host("pg1", (pki.PG_CA, "new", 300.0)), _host("etcd1", (pki.ETCD_CA, "old", 300.0))],
                          "etcd1:" + pki.ETCD_CA),
    "a router lacks it": ([_host("router1", (pki.HOST_CA, "old", 300.0))], "router1:" + pki.HOST_CA),
    "a prefix of another fingerprint is not it": ([_host("pg1", (pki.PG_CA, "newer", 300.0))], "pg1:" + pki.PG_CA),
}


@pytest.mark.parametrize(("hosts", "lacking"), UNTRUSTED.values(), ids=UNTRUSTED.keys())
def test_untrusted_issuer(hosts: list[HostCertificates], lacking: str | None) -> None:
    reason = untrusted_issuer(hosts, "new")
    if lacking is None:
        assert reason is None
    else:
        assert reason is not None and lacking in reason and "three runs" in reason and "also_trusted" in reason


GENERATION = {
    "all current and far": (False, [(pki.PG_SERVER_CERT, "w", 300.0)], None),
    "force": (True, [(pki.PG_SERVER_CERT, "w", 300.0)], "force"),
    "current but short": (False, [(pki.PG_SERVER_CERT, "w", 10.0)], "expire within 30 days"),
    "short but being renewed anyway": (False, [(pki.PG_SERVER_CERT, "old", 10.0)], None),
    "a short CA bundle is the CA's business": (False, [(pki.PG_CA, "w", 10.0)], None),
    "not installed": (False, [(pki.PG_SERVER_CERT, None, None)], None),
}


@pytest.mark.parametrize(("force", "files", "reason"), GENERATION.values(), ids=GENERATION.keys())
def test_needs_new_generation(force: bool, files: list, reason: str | None) -> None:
    answer = needs_new_generation([_host("pg1", *files)], force=force, within_days=30)
    assert (answer is None) if reason is None else (answer is not None and reason in answer)
