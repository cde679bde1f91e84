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
