"""Runbook steps for the backup server, base backups and restore drills."""

from __future__ import annotations

from dataclasses import dataclass, field

from botocore.exceptions import BotoCoreError, ClientError

from tasks.adapters import peer_ssh
from tasks.adapters.backup.base import ArchiveCheck, BackupInfo, BackupKind
from tasks.adapters.minio_admin import (
    AdminEndpoint,
    ClusterGrant,
    MinioCredentials,
    ensure_cluster_access,
)
from tasks.adapters.objectstore_server import server_for
from tasks.adapters.s3 import (
    ObjectStore,
    ObjectStoreError,
    ObjectStoreUnavailable,
    S3Endpoint,
)
from tasks.context import ClusterContext, context_for
from tasks.errors import NotYet
from tasks.planning.backup import good_backups
from tasks.runtime import once, say, step, wait_for, with_progress


def store_endpoint(ctx: ClusterContext, *, admin: bool = False) -> S3Endpoint:
    store = ctx.inventory.cluster.object_store
    block = ctx.store_block
    if store is None or block is None:
        raise LookupError(f"cluster {ctx.name} has no object store configured")
    host = ctx.inventory.host(store.host)
    # The controller reaches the store by address; the certificate carries it as an IP SAN.
    return S3Endpoint(
        url=f"https://{host.address}:{store.endpoint_port}",
        access_key_id=block.admin_access_key_id if admin else block.access_key_id,
        secret_access_key=(block.admin_secret_access_key if admin else block.secret_access_key).get_secret_value(),
        ca_pem=block.ca_certificate,
        region=store.region,
    )


def cluster_prefix(ctx: ClusterContext) -> str:
    return f"{ctx.name}/"


@dataclass(frozen=True)
class BackupSource:
    """is_backup_source_found's answer (no host to back up from raises BackupPlanError)."""

    ok: bool
    source: str  # where the backup runs: a streaming standby, else the primary
    primary: str

    def __bool__(self) -> bool:
        return self.ok


@dataclass(frozen=True)
class Backups:
    """is_backup_present's answer: every backup in the repository, oldest first; `ok` when a
    good one (no checksum error) is among them, the only kind a drill restores."""

    ok: bool = field(init=False)  # a good backup is present
    backups: tuple[BackupInfo, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "ok", bool(good_backups(self.backups)))

    def __bool__(self) -> bool:
        return self.ok


@dataclass(frozen=True)
class RoundTrip:
    """is_object_store_working's answer (a failed put, get or delete raises)."""

    ok: bool
    seconds: float  # put, get, compare and delete of one test object

    def __bool__(self) -> bool:
        return self.ok


@step
def ensure_object_store_prepared(cluster: str) -> str:
    """Service account and data directory (the path the site's file-level backup picks up)."""
    ctx = context_for(cluster)
    store = ctx.inventory.cluster.object_store
    assert store is not None
    with ctx.remote(store.host) as remote:
        for command in server_for(store.server).prepare_commands(ctx.inventory):
            remote.run(command)
    return say(f"{store.host}: service account and {store.data_path} in place.")


@step(retries=0)
def wait_until_object_store_answers(cluster: str, timeout: float = 60) -> str:
    ctx = context_for(cluster)

    def answers() -> bool:
        with ObjectStore(store_endpoint(ctx, admin=True), timeout=3) as s3:
            s3.client.list_buckets()
            return True

    wait_for("object store answering over TLS", lambda: _swallow(answers), timeout=timeout)
    return say("The object store answers over TLS with a certificate from the site CA.")


def _swallow(fn):
    try:
        return fn()
    except (ObjectStoreUnavailable, ObjectStoreError, BotoCoreError, ClientError) as exc:
        raise NotYet(str(exc)[:200]) from None


@step
def ensure_object_store_access(cluster: str) -> bool:
    """The cluster's own object-store user, limited to its bucket prefix, and the restore host's
    user, which only reads it, where the server has per-cluster users (MinIO, through its admin
    API over verified TLS); True when something changed."""
    ctx = context_for(cluster)
    store, block = ctx.inventory.cluster.object_store, ctx.store_block
    if store is None or block is None:
        raise LookupError(f"cluster {ctx.name} has no object store configured")
    restore_key = block.restore_access_key_id is not None and block.restore_secret_access_key is not None
    if not server_for(store.server).per_cluster_users:
        say(f"{store.server}: every registered key may use every bucket; no per-cluster user to manage"
            + ("; the restore host's key is a key of its own but not read-only (the server has no per-key "
               "permissions)." if restore_key else "."), warning=restore_key)
        return False
    host = ctx.inventory.host(store.host)
    endpoint = AdminEndpoint(address=f"{host.address}:{store.endpoint_port}", ca_pem=block.ca_certificate,
                             region=store.region)
    admin = MinioCredentials(block.admin_access_key_id, block.admin_secret_access_key.get_secret_value())
    outcomes = [ensure_cluster_access(
        endpoint, admin=admin,
        cluster=MinioCredentials(block.access_key_id, block.secret_access_key.get_secret_value()),
        grant=ClusterGrant(cluster=ctx.name, bucket=store.bucket, prefix=cluster_prefix(ctx)),
    )]
    if restore_key:
        outcomes.append(ensure_cluster_access(
            endpoint, admin=admin,
            cluster=MinioCredentials(block.restore_access_key_id, block.restore_secret_access_key.get_secret_value()),
            grant=ClusterGrant(cluster=ctx.name, bucket=store.bucket, prefix=cluster_prefix(ctx), read_only=True),
            other_users=(block.access_key_id,),
        ))
    say(" ".join(outcome.sentence for outcome in outcomes))
    return any(outcome.changed for outcome in outcomes)


@step
def ensure_bucket_and_prefix(cluster: str) -> list[str]:
    """The bucket (admin key) and the cluster's prefix (with the cluster's own key, proving it works)."""
    ctx = context_for(cluster)
    store = ctx.inventory.cluster.object_store
    assert store is not None
    created = []
    with ObjectStore(store_endpoint(ctx, admin=True)) as admin:
        if admin.ensure_bucket(store.bucket):
            created.append(f"bucket {store.bucket}")
    with ObjectStore(store_endpoint(ctx)) as own:
        marker = f"{cluster_prefix(ctx)}.bouwsteen-prefix"
        if not own.exists(store.bucket, marker):
            own.put(store.bucket, marker, f"prefix of cluster {cluster}\n".encode())
            created.append(f"prefix {cluster_prefix(ctx)}")
    say(f"Created {', '.join(created)}." if created else f"Bucket {store.bucket} and prefix {cluster_prefix(ctx)} already exist.")
    return created


@step
def is_object_store_working(cluster: str) -> RoundTrip:
    """Can the cluster's own key put, get and delete an object under its prefix?"""
    ctx = context_for(cluster)
    store = ctx.inventory.cluster.object_store
    assert store is not None
    with ObjectStore(store_endpoint(ctx)) as own:
        seconds = own.round_trip(store.bucket, cluster_prefix(ctx))
    say(f"Put, get and delete of a test object under {cluster_prefix(ctx)} worked in {seconds:.2f}s.")
    return RoundTrip(ok=True, seconds=seconds)


# ------------------------------------------------------------------------------ base backups


PEER_SSH_DIR = "/var/lib/postgresql/.ssh"
# Kept under its old name: the client settings are part of the peers' files (tasks/adapters/peer_ssh.py).
peer_ssh_config = peer_ssh.ssh_config


def backup_peers(ctx: ClusterContext) -> list[peer_ssh.Peer]:
    """The database hosts as pgBackRest's SSH reaches them: by address, on the hosts' SSH port."""
    return [peer_ssh.Peer(h.name, str(h.address), h.ssh_port or ctx.inventory.ssh.port) for h in ctx.inventory.db_hosts]


@step
def ensure_backup_peer_trust(cluster: str) -> str:
    """pgBackRest takes a standby's backup by asking the primary (over SSH, as postgres) to start
    and stop it. Each database host gets a postgres key; the other peers accept it from that
    host's address only, for a command and nothing else (`restrict`), and host keys are the
    verified ones from the SSH block (hashed known_hosts entries included)."""
    from tasks.adapters.commands import ManagedFile, script

    ctx = context_for(cluster)
    peers = backup_peers(ctx)
    # Refused before any host is touched when a peer's host key is missing.
    known = peer_ssh.known_hosts(ctx.ssh_auth.known_hosts, peers)
    keys = {}
    for peer in peers:
        with ctx.remote(peer.name) as remote:
            keys[peer.name] = peer_ssh.public_key(peer.name, remote.run(script(
                f'k={PEER_SSH_DIR}/id_ed25519; install -d -o postgres -g postgres -m 0700 "$(dirname "$k")"; '
                '[ -f "$k" ] || runuser -u postgres -- ssh-keygen -q -t ed25519 -N "" -C "postgres@$(hostname)" -f "$k"; '
                'cat "$k.pub"', description="ensure postgres SSH key")).stdout)
    config = peer_ssh.ssh_config([p.address for p in peers])
    changed = []
    for peer in peers:
        with ctx.remote(peer.name) as remote:
            for spec in (
                ManagedFile(f"{PEER_SSH_DIR}/authorized_keys", peer_ssh.authorized_keys(keys, peers, for_host=peer.name),
                            owner="postgres", mode=0o600),
                ManagedFile(f"{PEER_SSH_DIR}/known_hosts", known, owner="postgres", mode=0o644),
                ManagedFile(f"{PEER_SSH_DIR}/config", config, owner="postgres", mode=0o600),
            ):
                if remote.ensure_file(spec):
                    changed.append(f"{peer.name}:{spec.path}")
    return say(f"Updated {', '.join(changed)}." if changed else "postgres SSH trust between database hosts already in place.")


def _run_on_primary(ctx: ClusterContext, commands, *, check: bool = True):
    from tasks.ha import require_primary

    primary = require_primary(ctx, "to run the backup tool on")
    with ctx.remote(primary) as remote:
        return primary.name, [remote.run(c, check=check) for c in commands]


@step
def is_object_store_reachable(cluster: str) -> bool:
    ctx = context_for(cluster)
    try:
        # An object under the cluster's own prefix: a per-cluster policy may refuse a bucket HEAD.
        with ObjectStore(store_endpoint(ctx), timeout=3) as s3:
            s3.exists(ctx.inventory.cluster.object_store.bucket, f"{cluster_prefix(ctx)}.bouwsteen-prefix")
    except (ObjectStoreUnavailable, ObjectStoreError, LookupError) as exc:
        say(f"The object store does not answer ({str(exc)[:160]}); WAL stays on the primary until it does.")
        return False
    say("The object store answers.")
    return True


@step
def ensure_backup_repository(cluster: str) -> str:
    """The backup tool's repository for this cluster (pgBackRest stanza); idempotent."""
    from tasks.desired import backup_driver

    ctx = context_for(cluster)
    driver = backup_driver(ctx.inventory)
    primary, _ = _run_on_primary(ctx, driver.init_repository_commands(ctx.inventory))
    return say(f"Backup repository for {cluster} is ready (checked from {primary}).")


@once
def ensure_repository_retired(cluster: str, host: str) -> str:
    """Before clone_cluster replaces the cluster's data: its own repository emptied on `host` (a
    member, HA units stopped), so the clone's timeline can be archived there. Never retried."""
    from tasks.desired import backup_driver

    ctx = context_for(cluster)
    with ctx.remote(host) as remote:
        for command in backup_driver(ctx.inventory).retire_repository_commands(ctx.inventory):
            remote.run(command)
    return say(f"{cluster}'s own backup repository emptied (from {host}); it starts afresh with the clone.")


@step
def is_archiving_own(cluster: str) -> bool:
    """The primary's archive_command is the cluster's own (after a clone: not the source's, which a
    restored copy carries in its files); VerifyFailed otherwise."""
    from tasks.adapters.postgres import Postgres
    from tasks.desired import backup_driver
    from tasks.errors import VerifyFailed
    from tasks.ha import require_primary

    ctx = context_for(cluster)
    primary = require_primary(ctx, "to read archive_command on")
    wanted = backup_driver(ctx.inventory).archive_parameters(ctx.inventory)["archive_command"]
    with Postgres(ctx.superuser_endpoint(primary)) as pg:
        running = pg.scalar("show archive_command")
    if running != wanted:
        raise VerifyFailed(f"{primary.name}: archive_command is {running!r}, not {cluster}'s own {wanted!r}")
    say(f"{primary.name} archives into {cluster}'s own repository.")
    return True


@step
def is_backup_present(cluster: str) -> Backups:
    """Is a good backup in the repository? Read-only; the answer lists every backup, oldest first."""
    from tasks.desired import backup_driver

    ctx = context_for(cluster)
    driver = backup_driver(ctx.inventory)
    _, results = _run_on_primary(ctx, [driver.list_command(ctx.inventory)], check=False)
    backups = driver.parse_list(results[0])
    say(f"{len(backups)} backup(s) in the repository; newest: {backups[-1].name if backups else 'none'}.")
    return Backups(tuple(backups))


@step
def is_backup_source_found(cluster: str, max_lag_bytes: int = 16 * 1024 * 1024) -> BackupSource:
    """Pick where the backup runs: the least-lagging streaming standby, else the primary."""
    from tasks.ha import replication_rows
    from tasks.planning.backup import SourceCandidate, choose_source

    ctx = context_for(cluster)
    primary, rows = replication_rows(ctx)
    candidates = [
        SourceCandidate(
            host=r["host"], role="primary" if r["host"] == primary else "replica",
            streaming=str(r["state"]).startswith("streaming"), lag_bytes=r["lag_bytes"],
        )
        for r in rows
    ]
    chosen = choose_source(candidates, max_lag_bytes)
    say(f"Backup source: {chosen.host} ({'streaming standby' if chosen.role == 'replica' else 'the primary: no healthy standby'}).")
    return BackupSource(ok=True, source=chosen.host, primary=primary)


def _backup_progress(ctx: ClusterContext, host: str, driver):
    """How far the backup running on `host` has got, asked over a connection of its own."""
    def poll() -> tuple[int, int] | None:
        command = driver.progress_command(ctx.inventory)
        if command is None:
            return None
        with ctx.remote(host) as remote:
            return driver.parse_progress(remote.run(command, check=False))

    return poll


@once
def ensure_base_backup(cluster: str, source: str, primary: str, kind: BackupKind = "full") -> float:
    """Run one base backup on `source`, full or incremental (never retried: the next schedule is
    the retry)."""
    from tasks.adapters.commands import cmd
    from tasks.desired import backup_driver
    from tasks.planning.backup import copy_processes

    ctx = context_for(cluster)
    inv = ctx.inventory
    driver = backup_driver(inv)
    with ctx.remote(source) as remote:
        cores = int(remote.run(cmd("nproc", timeout=10)).stdout.strip() or 1)
        processes = copy_processes(cores, on_primary=source == primary)
        command = driver.backup_command(inv, inv.host(source), inv.host(primary), kind, processes)
        result = with_progress(f"{kind} backup of {cluster} on {source}", lambda: remote.run(command),
                               _backup_progress(ctx, source, driver))
    # The backup's own time: the controller's SSH connection set-up is not part of it.
    seconds = result.seconds
    say(f"{'Full' if kind == 'full' else 'Incremental'} base backup taken on {source} in {seconds:.1f}s "
        f"({processes} parallel copy stream(s) for its {cores} core(s)).")
    return seconds


@step
def ensure_retention(cluster: str, keep_full: int) -> str:
    from tasks.desired import backup_driver

    ctx = context_for(cluster)
    driver = backup_driver(ctx.inventory)
    _run_on_primary(ctx, driver.retention_commands(ctx.inventory, keep_full))
    return say(f"Retention applied: at most {keep_full} full backup(s) kept, older WAL expired.")


@step(retries=1)
def is_archive_intact(cluster: str) -> ArchiveCheck:
    """WAL archiving works now and the archive is continuous (never trusts an exit code alone)."""
    from tasks.desired import backup_driver

    ctx = context_for(cluster)
    driver = backup_driver(ctx.inventory)
    _, results = _run_on_primary(ctx, [driver.verify_archive_command(ctx.inventory, db_secrets=ctx.db_secrets)], check=False)
    check = driver.parse_verify(results[0])
    say(f"WAL archive check: {check.status}: {check.detail[:200]}")
    return check


def ensure_backup_hook(cluster: str) -> None:
    """Where build_cluster and add_standby hand over to the backup driver: peer trust for backups
    from a standby, and the repository once the object store answers (WAL waits on the primary
    until then; archive_command was set with the cluster's parameters)."""
    from tasks.desired import backup_driver

    ctx = context_for(cluster)
    if ctx.inventory.cluster.object_store is None or ctx.store_block is None:
        return
    if backup_driver(ctx.inventory).needs_peer_ssh:
        ensure_backup_peer_trust(cluster)
    if is_object_store_reachable(cluster):
        ensure_backup_repository(cluster)
