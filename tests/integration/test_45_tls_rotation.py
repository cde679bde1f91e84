"""rotate_certificates and check_hosts' expiry alarm (issue 15), on the routed lab."""

from __future__ import annotations

import datetime as dt
import subprocess
import time

from labtools import lab_ssh

from lab.topology import VIP

REPLICATOR_CRT = "/var/lib/postgresql/tls/replicator.crt"


def _short_lived_copy(lab, pem: str, days: float) -> str:
    """The same subject and key, signed by the lab CA, expiring in `days`: valid, but near its end."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    ca = lab.ca
    ca_key = serialization.load_pem_private_key(ca.key_path.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_path.read_bytes())
    cert = x509.load_pem_x509_certificate(pem.encode())
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(cert.subject).issuer_name(ca_cert.subject)
               .public_key(cert.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=days)))
    for extension in cert.extensions:
        builder = builder.add_extension(extension.value, critical=extension.critical)
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def test_check_hosts_alarms_on_a_certificate_near_its_end_and_rotation_replaces_it(lab, routed):
    from flows.check_hosts import check_hosts
    from flows.rotate_certificates import rotate_certificates
    from lab.topology import host_by_name

    original = lab_ssh(lab, "pg2", f"cat {REPLICATOR_CRT}").stdout
    short = _short_lived_copy(lab, original, days=3)
    subprocess.run(lab.ssh_argv(host_by_name("pg2")) + [f"cat > {REPLICATOR_CRT}"], input=short, text=True,
                   check=True, timeout=60)
    try:
        state = check_hosts(cluster="lab", return_state=True)
        assert state.is_failed(), "check_hosts passed with a certificate 3 days from its end"
        assert f"pg2:{REPLICATOR_CRT}" in state.message and "days left" in state.message, state.message

        plan = rotate_certificates(cluster="lab", dry_run=True)
        assert plan["plan"] == [{"host": "pg2", "plan": f"renew {REPLICATOR_CRT}"}], plan
        assert lab_ssh(lab, "pg2", f"cat {REPLICATOR_CRT}").stdout == short, "a dry run changed the file"

        done = rotate_certificates(cluster="lab")
        assert done["replaced"] == 1 and done["plan"] == plan["plan"], done
    finally:
        # Whatever happened, pg2 gets its own certificate back.
        subprocess.run(lab.ssh_argv(host_by_name("pg2")) + [f"cat > {REPLICATOR_CRT}"], input=original, text=True,
                       check=True, timeout=60)
    assert check_hosts(cluster="lab", return_state=True).is_completed()


def test_rotating_every_certificate_keeps_every_write_and_the_primary(lab, routed):
    from flows.rotate_certificates import rotate_certificates
    from flows.switchover import switchover
    from lab.avprobe import AvailabilityProbe
    from tasks.context import context_for
    from tasks.ha import primary_of

    ctx = context_for("lab", fresh=True)
    generation = ctx.inventory.cluster.tls.generation
    primary = primary_of(ctx).name
    probe = AvailabilityProbe(ctx.application_endpoint(str(VIP), 5432), max_seconds=400).start()
    time.sleep(2)
    state = rotate_certificates(cluster="lab", force=True, return_state=True)
    time.sleep(2)
    report = probe.stop()
    assert state.is_completed(), state.message
    result = state.result()
    # New keys: every database host's server and three client certificates, every etcd member's
    # own (the CA stays).
    inv = ctx.inventory
    assert result["hosts"] == len(inv.db_hosts), result
    assert result["replaced"] == 4 * len(inv.db_hosts) + len(inv.etcd_members), result
    assert probe.missing_acknowledged() == []
    rotation_gap = report.longest_gap()
    ctx = context_for("lab", fresh=True)
    assert ctx.inventory.cluster.tls.generation == generation + 1
    assert primary_of(ctx).name == primary, "the rotation moved the primary"

    # The yardstick: one switchover, measured the same way.
    probe = AvailabilityProbe(ctx.application_endpoint(str(VIP), 5432), max_seconds=180).start()
    time.sleep(2)
    moved = switchover(cluster="lab", return_state=True)
    time.sleep(2)
    switchover_report = probe.stop()
    assert moved.is_completed(), moved.message
    assert probe.missing_acknowledged() == []
    switchover_gap = switchover_report.longest_gap()
    print(f"write gap: rotation of every certificate {rotation_gap:.2f}s, one switchover {switchover_gap:.2f}s")
    assert rotation_gap <= max(switchover_gap, 1.0), (rotation_gap, switchover_gap)

    again = rotate_certificates(cluster="lab")
    assert again["changed"] is False and again["plan"] == [], again


def _issuers(lab, host: str, *paths: str) -> list[str]:
    script = "; ".join(f"openssl crl2pkcs7 -nocrl -certfile {p} | openssl pkcs7 -print_certs -noout | grep '^subject'"
                       if p.endswith("ca.crt") else f"openssl x509 -noout -issuer -in {p}" for p in paths)
    return lab_ssh(lab, host, script).stdout.split("\n")[:-1]


def test_a_ca_roll_over_takes_three_runs_and_keeps_every_write(lab, routed, tmp_path):
    """Forward to a new CA (trust it, issue from it), then back (issue from the old one, retire
    the new one): the lab ends on its own CA for the tests after this one, and the four runs cover
    each step of a roll-over once, in both of its kinds of run (bundles only, pairs only)."""
    from pydantic import SecretStr

    from blocks.inventory import Role
    from blocks.prefect_blocks import CertificateAuthority
    from flows.check_hosts import check_hosts
    from flows.rotate_certificates import rotate_certificates
    from lab.avprobe import AvailabilityProbe
    from lab.pki import LabCA
    from tasks.adapters import pki
    from tasks.context import context_for
    from tasks.tls import TRUST_BUNDLES

    original = CertificateAuthority.load("lab")
    old_cert, old_key = original.certificate, original.private_key.get_secret_value()
    new = LabCA(tmp_path / "new-ca", common_name="bouwsteen lab CA 2")
    new.ensure()
    new_cert, new_key = new.certificate_pem, new.key_path.read_text()
    inv = context_for("lab", fresh=True).inventory
    bundles = len(inv.db_hosts) + len(inv.etcd_members) + len(inv.with_role(Role.router))
    pairs = 4 * len(inv.db_hosts) + len(inv.etcd_members)

    def run_with(certificate: str, key: str, also_trusted: str, **kwargs):
        CertificateAuthority(certificate=certificate, private_key=SecretStr(key),
                             also_trusted=also_trusted).save("lab", overwrite=True)
        return rotate_certificates(cluster="lab", return_state=True, **kwargs)

    def paths(result: dict) -> set[str]:
        return {row["plan"].split(" ", 1)[1] for row in result["plan"]}

    before = _issuers(lab, "pg1", pki.PG_SERVER_CERT)
    try:
        # In one run it cannot work (the controller's own pairs would come from a CA nobody trusts):
        # refused before anything changes, naming the steps.
        refused = run_with(new_cert, new_key, old_cert, dry_run=True)
        assert refused.is_failed() and "three runs" in refused.message, refused.message
        assert _issuers(lab, "pg1", pki.PG_SERVER_CERT) == before

        # 1. Trust the new CA beside the old: the bundles, nothing else.
        one = run_with(old_cert, old_key, new_cert)
        assert one.is_completed(), one.message
        assert paths(one.result()) <= set(TRUST_BUNDLES) and one.result()["replaced"] == bundles, one.result()
        assert sorted(_issuers(lab, inv.etcd_members[0].name, pki.ETCD_CA)) == sorted(
            ["subject=CN = bouwsteen lab CA", "subject=CN = bouwsteen lab CA 2"])

        # 2. The new CA issues, under the writer through the VIP: every pair, no bundle.
        probe = AvailabilityProbe(context_for("lab", fresh=True).application_endpoint(str(VIP), 5432),
                                  max_seconds=400).start()
        time.sleep(2)
        two = run_with(new_cert, new_key, old_cert)
        time.sleep(2)
        probe.stop()
        assert two.is_completed(), two.message
        assert not paths(two.result()) & set(TRUST_BUNDLES) and two.result()["replaced"] == pairs, two.result()
        assert probe.missing_acknowledged() == []
        etcd_host = inv.etcd_members[0].name
        assert set(_issuers(lab, "pg1", pki.PG_SERVER_CERT) + _issuers(lab, etcd_host, pki.ETCD_MEMBER_CERT)) == {
            "issuer=CN = bouwsteen lab CA 2"}
        assert check_hosts(cluster="lab", return_state=True).is_completed()
        assert rotate_certificates(cluster="lab")["changed"] is False, "a rerun of step 2 changed something"
    finally:
        # Back: the old CA issues again (step 2 the other way), then the new one is retired (step 3).
        back = run_with(old_cert, old_key, new_cert)
        retired = run_with(old_cert, old_key, "")
    assert back.is_completed(), back.message
    assert retired.is_completed(), retired.message
    assert paths(retired.result()) <= set(TRUST_BUNDLES) and retired.result()["replaced"] == bundles, retired.result()
    assert _issuers(lab, "pg1", pki.PG_SERVER_CERT, pki.PG_CA) == [
        "issuer=CN = bouwsteen lab CA", "subject=CN = bouwsteen lab CA"]
    assert check_hosts(cluster="lab", return_state=True).is_completed()
