"""After the whole suite: no secret in Prefect logs or artifacts, none readable on the hosts; the
Prefect server's own secrets outside its database."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sqlite3
import stat
import subprocess
import time
from pathlib import Path

import pytest
from labtools import lab_ssh

# The scans mean something only once every runbook has written its files and logs.
pytestmark = pytest.mark.usefixtures("backed_up", "routed")

HOSTS = ["pg1", "pg2", "pg3", "pg4", "backup1", "router1", "router2", "restore1"]


def secret_values(lab) -> list[str]:
    values = json.loads((lab.paths.lab / "secrets.json").read_text())
    private_key = lab.paths.ssh_key.read_text().strip().splitlines()
    # The cluster CA's key issues every certificate (and derives every leaf key): a secret too.
    ca_key = (lab.paths.lab / "pki" / "ca.key").read_text().strip().splitlines()
    # The keys' base64 body lines are secrets too; one line is enough to recognise a leak.
    return [v for v in values.values() if isinstance(v, str) and len(v) >= 6] + [private_key[1], ca_key[1]]


def paged(read, page: int = 200):
    """The server caps every filter call at 200 rows."""
    offset = 0
    while True:
        rows = read(limit=page, offset=offset)
        yield from rows
        if len(rows) < page:
            return
        offset += len(rows)


def test_no_secret_in_prefect_logs_or_artifacts(lab, registered):
    from prefect.client.orchestration import get_client

    secrets = secret_values(lab) + _prefect_server_secrets()
    leaks = []
    with get_client(sync_client=True) as client:
        offset = 0
        while True:
            logs = client.read_logs(limit=200, offset=offset)
            if not logs:
                break
            for entry in logs:
                leaks += [f"log {entry.id}" for s in secrets if s in entry.message]
            offset += len(logs)
        for artifact in paged(client.read_artifacts):
            text = json.dumps(artifact.data, default=str) + (artifact.description or "")
            leaks += [f"artifact {artifact.key}" for s in secrets if s in text]
        for run in paged(client.read_flow_runs):
            text = json.dumps(run.parameters, default=str)
            leaks += [f"flow run parameters {run.name}" for s in secrets if s in text]
    assert offset > 100, "expected the suite's logs on the server"
    assert leaks == [], leaks


def _put_root_only(lab, host: str, path: str, text: str) -> None:
    """Over stdin to a root-only file: a secret pattern list never goes onto a command line."""
    from lab.topology import host_by_name

    subprocess.run(lab.ssh_argv(host_by_name(host)) + [f"umask 077; cat > {path}"], input=text, text=True,
                   check=True, timeout=60)


def test_no_secret_in_a_file_readable_by_other_users_or_in_a_command_line(lab, registered):
    secrets = secret_values(lab)
    patterns = "\n".join(secrets) + "\n"
    for host in HOSTS:
        _put_root_only(lab, host, "/root/.secret-scan", patterns)
        try:
            found = lab_ssh(lab, host, (
                "find / -xdev \\( -path /proc -o -path /sys -o -path /dev -o -path /run/user \\) -prune -o -type f "
                "\\( -perm -o=r -o \\( -perm -g=r ! -group root ! -group postgres ! -group etcd ! -group haproxy "
                "! -group bouwsteen-s3 ! -group bouwsteen-detector \\) \\) -size -20M -print0 2>/dev/null "
                "| xargs -0 -r grep -l -F -f /root/.secret-scan 2>/dev/null || true"), check=False).stdout
            cmdlines = lab_ssh(lab, host, "cat /proc/[0-9]*/cmdline 2>/dev/null | grep -a -z -c -F -f /root/.secret-scan "
                                          "|| true", check=False).stdout
        finally:
            lab_ssh(lab, host, "rm -f /root/.secret-scan", check=False)
        assert found.strip() == "", f"{host}: secret in files readable by other users: {found}"
        # The scan's own grep holds the pattern file name, not the values; expect no match.
        assert cmdlines.strip() in ("0", ""), f"{host}: a secret appears in a process command line"


# Samples every process's arguments (NUL-separated: one grep "line" per argument) until told to
# stop, and at most WATCH_SECONDS in any case. Only counts and command names leave the host.
CMDLINE_WATCH = r"""
end=$(( $(date +%s) + $1 ))
samples=0
while [ ! -e /root/.cmdline-watch.stop ] && [ "$(date +%s)" -lt "$end" ]; do
  # One grep per sample over every process: -l names the cmdline files that hold a secret.
  for f in $(grep -a -z -l -F -f /root/.secret-scan /proc/[0-9]*/cmdline 2>/dev/null); do
    tr '\0' '\n' < "$f" 2>/dev/null | head -1 >> /root/.cmdline-hits
  done
  samples=$((samples + 1))
  echo "$samples" > /root/.cmdline-samples
  sleep 0.2
done
"""
WATCH_SECONDS = 1200


@contextlib.contextmanager
def _watching_command_lines(lab, hosts: list[str]):
    """While the block runs, every host's process arguments are searched for the secrets; yields a
    dict that, after the block, maps host -> (samples taken, command names that held a secret)."""
    patterns = "\n".join(secret_values(lab)) + "\n"
    for host in hosts:
        _put_root_only(lab, host, "/root/.secret-scan", patterns)
        _put_root_only(lab, host, "/root/.cmdline-watch.sh", CMDLINE_WATCH)
        lab_ssh(lab, host, "rm -f /root/.cmdline-watch.stop /root/.cmdline-hits /root/.cmdline-samples; "
                           f"setsid nohup bash /root/.cmdline-watch.sh {WATCH_SECONDS} >/dev/null 2>&1 < /dev/null &")
    seen: dict[str, tuple[int, list[str]]] = {}
    try:
        yield seen
    finally:
        for host in hosts:
            lab_ssh(lab, host, "touch /root/.cmdline-watch.stop", check=False)
        for host in hosts:
            # The watcher notices the stop file within one sample; a deadline, not a guess.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if lab_ssh(lab, host, "pgrep -f '^bash /root/.cmdline-watch.sh' >/dev/null", check=False).returncode:
                    break
                time.sleep(0.5)
            out = lab_ssh(lab, host, "cat /root/.cmdline-samples 2>/dev/null; echo ---; "
                                     "sort -u /root/.cmdline-hits 2>/dev/null", check=False).stdout
            samples, _, hits = out.partition("---\n")
            seen[host] = (int(samples.strip() or 0), hits.split())
            lab_ssh(lab, host, "rm -f /root/.secret-scan /root/.cmdline-watch.sh /root/.cmdline-watch.stop "
                               "/root/.cmdline-hits /root/.cmdline-samples", check=False)


def test_no_secret_on_a_command_line_during_a_backup_and_an_object_store_rollout(lab, registered):
    from flows.backup_server import backup_server_rollout
    from flows.basebackup import scheduled_basebackup
    from tasks.adapters.objectstore_server import server_for
    from tasks.context import context_for

    store = context_for("lab", fresh=True).inventory.cluster.object_store
    # Without its credentials file the rollout must write the keys again and restart the server:
    # the rollout's secret-bearing part runs, not a no-op.
    etc = getattr(server_for(store.server), "etc", None)
    hosts = ["pg1", "pg2", "pg3", store.host, "restore1"]
    with _watching_command_lines(lab, hosts) as seen:
        if etc:
            lab_ssh(lab, store.host, f"rm -f {etc}/credentials.env")
        rollout = backup_server_rollout(cluster="lab", return_state=True)
        backup = scheduled_basebackup(cluster="lab", force=True, return_state=True)
    assert rollout.is_completed(), rollout.message
    assert backup.is_completed(), backup.message
    for host, (samples, holders) in seen.items():
        assert samples >= 5, f"{host}: the watcher took only {samples} samples"
        assert holders == [], f"{host}: a secret on the command line of {holders}"


def _prefect_server_secrets() -> list[str]:
    from deployments.server import prefect_home

    auth = prefect_home() / "auth"
    return [(auth / "admin-auth").read_text().strip().partition(":")[2],
            (auth / "ticket-auth").read_text().strip().partition(":")[2],
            (auth / "encryption.key").read_text().strip()]


def _secret_file_digests(lab) -> dict[str, str]:
    """sha256 -> host:path of every small file under /etc and postgres's home that holds a secret."""
    patterns = "\n".join(secret_values(lab)) + "\n"
    digests = {}
    for host in HOSTS:
        _put_root_only(lab, host, "/root/.secret-scan", patterns)
        try:
            out = lab_ssh(lab, host, (
                "find /etc /var/lib/postgresql -maxdepth 3 -type f -size -1024k -print0 2>/dev/null "
                "| xargs -0 -r grep -l -F -f /root/.secret-scan 2>/dev/null | xargs -r -d '\\n' sha256sum || true"),
                check=False).stdout
        finally:
            lab_ssh(lab, host, "rm -f /root/.secret-scan", check=False)
        for line in out.splitlines():
            digest, _, path = line.partition("  ")
            digests[digest] = f"{host}:{path}"
    return digests


def _persisted_results(home: Path):
    """Every persisted task and flow result (Prefect's local result storage), decoded to bytes."""
    for path in sorted((home / "storage").glob("*")):
        raw = path.read_bytes()
        try:
            record = json.loads(raw)
            payload = record["result"] if isinstance(record, dict) and "result" in record else raw
        except ValueError:
            payload = raw
        try:
            yield path, raw + base64.b64decode(payload, validate=False)
        except (ValueError, TypeError):
            yield path, raw


def test_no_secret_nor_a_digest_of_a_secret_file_in_persisted_results(lab, registered, prefect_server):
    from deployments.server import prefect_home

    home = prefect_home()
    secrets = [s.encode() for s in secret_values(lab) + _prefect_server_secrets()]
    digests = _secret_file_digests(lab)
    assert digests, "expected secret-bearing files on the hosts (pgpass, pgBackRest, Patroni)"
    checked, leaks = 0, []
    for path, data in _persisted_results(home):
        checked += 1
        leaks += [f"{path.name}: a secret" for s in secrets if s in data]
        leaks += [f"{path.name}: the digest of {where}" for d, where in digests.items() if d.encode() in data]
    assert checked > 50, f"expected the suite's persisted results in {home / 'storage'}"
    assert leaks == [], leaks
    # The results, the database and the logs are root's alone.
    assert stat.S_IMODE(home.stat().st_mode) == 0o700, oct(home.stat().st_mode)


def test_no_secret_bearing_endpoint_answers_without_the_admin_credential(registered, prefect_server):
    import httpx

    from deployments.tickets import ticket_auth

    server = os.environ["PREFECT_API_URL"]
    proxy = os.environ["BOUWSTEEN_TICKET_URL"]
    admin = tuple(os.environ["PREFECT_API_AUTH_STRING"].split(":", 1))
    ticket = tuple(ticket_auth().split(":", 1))
    blocks = httpx.post(f"{server}/block_documents/filter", json={}, auth=admin, timeout=30).json()
    assert blocks, "expected the lab's blocks on the server"
    secret_bearing = [("POST", "/block_documents/filter", {"include_secrets": True}),
                      ("POST", "/block_documents/filter", {}),
                      ("POST", "/block_documents/count", {}),
                      ("POST", "/block_schemas/filter", {}),
                      ("POST", "/variables/filter", {}),
                      ("GET", "/admin/settings", None),
                      ("POST", "/logs/filter", {}),
                      ("POST", "/events/filter", {}),
                      ("POST", "/automations/filter", {}),
                      ("POST", "/work_pools/filter", {})]
    for block in blocks:
        slug, name = block["block_type"]["slug"], block["name"]
        secret_bearing += [("GET", f"/block_documents/{block['id']}?include_secrets=true", None),
                           ("GET", f"/block_types/slug/{slug}/block_documents/name/{name}?include_secrets=true", None),
                           ("GET", f"/block_types/slug/{slug}/block_documents?include_secrets=true", None),
                           ("PATCH", f"/block_documents/{block['id']}", {"data": {}, "merge_existing_data": True})]
    answered = []
    for method, path, body in secret_bearing:
        for base, auth, refused in ((server, None, 401), (server, ticket, 401), (proxy, None, 401),
                                    (proxy, ticket, 403), (proxy, admin, 401)):
            response = httpx.request(method, f"{base}{path}", json=body, auth=auth, timeout=30)
            if response.status_code != refused:
                answered.append(f"{method} {base}{path} as {auth[0] if auth else 'nobody'}: {response.status_code}")
    assert answered == [], answered
    # With the admin credential the server answers, and still never shows its own secrets.
    settings = httpx.get(f"{server}/admin/settings", auth=admin, timeout=30)
    assert settings.status_code == 200
    assert not any(s in settings.text for s in _prefect_server_secrets())


def test_postgres_auth_is_scram_and_hba_is_scoped(lab, registered):
    hba = lab_ssh(lab, "pg1", "runuser -u postgres -- psql -XAt -h /var/run/postgresql "
                              "-c \"select type, database, user_name, address, netmask, auth_method from pg_hba_file_rules\"").stdout
    routers = {"172.29.66.31", "172.29.66.32"}
    for line in hba.splitlines():
        kind, _db, users, address, netmask, method = (line.split("|") + [""] * 6)[:6]
        if kind == "local":
            assert method == "peer", line
        else:
            assert kind == "hostssl", f"TLS is on in the lab: {line}"
            # Certificates for the superuser and replication, SCRAM passwords for everyone else.
            strong = users == "{postgres}" or users == "{replicator}"
            assert method == ("cert" if strong else "scram-sha-256"), line
            assert netmask == "255.255.255.255", f"not scoped to a single address: {line}"
            if address in routers:
                # Through a router only the application's clients and the detector log in.
                assert users in ("{app}", "{pgroute66}"), line
    passwords = lab_ssh(lab, "pg1", "runuser -u postgres -- psql -XAt -h /var/run/postgresql "
                                    "-c \"select rolname, left(rolpassword, 14) from pg_authid where rolpassword is not null\"").stdout
    for line in passwords.splitlines():
        assert line.split("|")[1] == "SCRAM-SHA-256$", line


def test_object_store_only_speaks_tls(lab, registered):
    plain = subprocess.run(["curl", "-s", "-m", "3", "-o", "/dev/null", "-w", "%{http_code}", "http://172.29.66.21:9000/"],
                           check=False, capture_output=True, text=True).stdout
    assert plain in ("000", "400"), f"plain HTTP answered {plain}"
    untrusted = subprocess.run(["curl", "-s", "-m", "3", "https://172.29.66.21:9000/"], check=False,
                               capture_output=True).returncode
    assert untrusted != 0, "TLS must not verify without the lab CA"


def test_backup_peers_take_each_others_keys_restricted_and_from_their_address_only(lab, registered):
    import re

    from tasks.context import context_for

    inventory = context_for("lab", fresh=True).inventory
    peers = {h.name: str(h.address) for h in inventory.db_hosts}
    entry = re.compile(r'restrict,from="([0-9.]+)" ssh-ed25519 [A-Za-z0-9+/=]+ postgres@([a-z0-9-]+)')
    for host in peers:
        text = lab_ssh(lab, host, "cat /var/lib/postgresql/.ssh/authorized_keys").stdout
        lines = [line for line in text.splitlines() if line and not line.startswith("#")]
        found = {}
        for line in lines:
            match = entry.fullmatch(line)
            assert match, f"{host}: authorized_keys line without restrict/from=: {line}"
            found[match.group(2)] = match.group(1)
        # Every other database host, each from its own address; never the host itself.
        assert {n: a for n, a in peers.items() if n != host}.items() <= found.items(), (host, found)
        assert host not in found and all(str(inventory.host(n).address) == a for n, a in found.items()), found
        # known_hosts lists every peer's key under its address (what pgBackRest connects to).
        for name, address in peers.items():
            lookup = lab_ssh(lab, host, f"ssh-keygen -F {address} -f /var/lib/postgresql/.ssh/known_hosts", check=False)
            assert lookup.returncode == 0, f"{host}: no host key for {name} ({address}) in postgres's known_hosts"


def test_the_flows_log_in_to_pg3_as_the_non_root_user_only(lab, registered):
    # After the whole suite: every runbook reached pg3, always as bouwsteen, never as root with the flows' key.
    fingerprint = subprocess.run(["ssh-keygen", "-l", "-f", f"{lab.paths.ssh_key}.pub"], capture_output=True,
                                 text=True, check=True).stdout.split()[1]
    accepted = lab_ssh(lab, "pg3", "journalctl -u ssh --no-pager -o cat | grep 'Accepted publickey' || true").stdout
    lines = accepted.splitlines()
    assert any(line.startswith("Accepted publickey for bouwsteen ") and fingerprint in line for line in lines), \
        "no login of the flows as bouwsteen on pg3"
    assert not any(line.startswith("Accepted publickey for root ") and fingerprint in line for line in lines), \
        "the flows' key logged in to pg3 as root"
    sudo = lab_ssh(lab, "pg3", "journalctl --no-pager -o cat _COMM=sudo | grep -c 'USER=root' || true").stdout
    assert int(sudo.strip() or 0) > 0, "no command went through sudo on pg3"


def _restore_configured(lab) -> str:
    from tasks.restore import ensure_restore_host_configured

    ensure_restore_host_configured.fn("lab")  # idempotent: as the drill leaves it
    return lab_ssh(lab, "restore1", "cat /etc/pgbackrest/pgbackrest.conf").stdout


def test_the_restore_host_reads_with_a_key_of_its_own(lab, registered):
    values = json.loads((lab.paths.lab / "secrets.json").read_text())
    config = _restore_configured(lab)
    assert f"repo1-s3-key={values['s3_restore_access_key_id']}\n" in config
    assert f"repo1-s3-key={values['s3_access_key_id']}\n" not in config
    for db_host in ("pg1", "pg2", "pg3"):  # the database hosts keep the cluster's key (they archive)
        db_config = lab_ssh(lab, db_host, "cat /etc/pgbackrest/pgbackrest.conf").stdout
        assert f"repo1-s3-key={values['s3_access_key_id']}\n" in db_config


def test_the_restore_hosts_key_cannot_write(lab, registered):
    from tasks.adapters.objectstore_server import server_for
    from tasks.adapters.s3 import ObjectStore, ObjectStoreError, S3Endpoint
    from tasks.context import context_for

    ctx = context_for("lab", fresh=True)
    store = ctx.inventory.cluster.object_store
    if not server_for(store.server).per_cluster_users:
        pytest.skip(f"{store.server}: no per-key permissions, so the restore key is not read-only here (README)")
    _restore_configured(lab)
    block = ctx.store_block
    endpoint = S3Endpoint(
        url=f"https://{ctx.inventory.host(store.host).address}:{store.endpoint_port}",
        access_key_id=block.restore_access_key_id,
        secret_access_key=block.restore_secret_access_key.get_secret_value(),
        ca_pem=block.ca_certificate, region=store.region,
    )
    with ObjectStore(endpoint) as restore_key:
        assert restore_key.exists(store.bucket, "lab/.bouwsteen-prefix")  # it reads
        with pytest.raises(ObjectStoreError, match="AccessDenied"):
            restore_key.put(store.bucket, "lab/.restore-key-write-probe", b"must not be written\n")
        with pytest.raises(ObjectStoreError, match="AccessDenied"):
            restore_key.delete(store.bucket, "lab/.bouwsteen-prefix")


def test_the_servers_own_secrets_are_private_files_outside_its_database(prefect_server):
    from deployments.server import prefect_home

    home = prefect_home()
    auth, proxy = home / "auth", home / "ticket-proxy"
    assert stat.S_IMODE(auth.stat().st_mode) == stat.S_IMODE(proxy.stat().st_mode) == 0o700
    for path in (auth / "admin-auth", auth / "ticket-auth", auth / "encryption.key", proxy / "nginx.conf",
                 proxy / "ticket_gate.js"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    # Prefect keeps no key of its own in the database (PREFECT_SERVER_ENCRYPTION_KEY is set).
    with sqlite3.connect(home / "prefect.db") as db:
        assert db.execute("select count(*) from configuration where key = 'ENCRYPTION_KEY'").fetchone() == (0,)
    values = {name: (auth / name).read_text().strip() for name in ("admin-auth", "ticket-auth", "encryption.key")}
    passwords = [values["admin-auth"].partition(":")[2], values["ticket-auth"].partition(":")[2],
                 values["encryption.key"]]
    # The ticket password is nowhere on disk but its own file: the proxy holds a salted hash.
    for path in proxy.glob("*"):
        if path.is_file():
            assert passwords[1] not in path.read_text(errors="replace"), path
    # None of them on a command line of the controller (server, proxy, worker, flow runs, lab).
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().decode(errors="replace")
        except OSError:
            continue
        assert not any(p in text for p in passwords), f"a server secret on the command line of {cmdline.parent.name}"
