"""Restore drill steps: fetch a backup onto the restore host, recover it in isolation, prove it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime

from tasks.adapters.commands import chain, cmd, script
from tasks.adapters.postgres import Postgres
from tasks.context import ClusterContext, context_for
from tasks.desired import backup_driver
from tasks.errors import NotYet
from tasks.ha import require_primary
from tasks.hosts import install_missing
from tasks.runtime import once, say, step, wait_for

DRILL_PORT = 5432
SOCKET_DIR = "/var/run/postgresql"
# Settings that keep a restored copy away from the cluster: no archiving into the cluster's
# bucket, no replication, reachable on the restore host itself only.
ISOLATION = {
    "listen_addresses": "localhost",
    "port": str(DRILL_PORT),
    "archive_mode": "off",
    "archive_command": "",
    "primary_conninfo": "",
    "primary_slot_name": "",
    "synchronous_standby_names": "",
    "hot_standby": "on",
    "unix_socket_directories": SOCKET_DIR,
    # The copy brings the cluster's ssl settings, but not the host's certificates (the restore host
    # has none, and the copy is reached over its socket and localhost only).
    "ssl": "off",
}


def restore_host(ctx: ClusterContext):
    from blocks.inventory import Role

    hosts = ctx.inventory.with_role(Role.restore)
    if not hosts:
        raise LookupError(f"cluster {ctx.name} has no host with role 'restore'")
    return hosts[0]


def psql(sql: str, *, db: str = "postgres", timeout: float = 600):
    return cmd("psql", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-F", "\t", "-h", SOCKET_DIR,
               "-p", DRILL_PORT, "-d", db, "-c", sql, user="postgres", timeout=timeout,
               description=f"psql -d {db} -c {sql.strip().splitlines()[0][:60]}")


def rows(result) -> list[list[str]]:
    return [line.split("\t") for line in result.stdout.splitlines() if line]



@dataclass(frozen=True)
class RestoreHost:
    """is_restore_host_free's answer: free when nothing refuses it (a kept copy may be replaced)."""

    ok: bool = field(init=False)  # no refusals
    host: str
    refusals: tuple[str, ...]
    previous: bool  # an earlier drill's copy is there (running or its data left)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ok", not self.refusals)

    def __bool__(self) -> bool:
        return self.ok


@dataclass(frozen=True)
class Marker:
    id: int
    written_at: str


@dataclass(frozen=True)
class Fetched:
    seconds: float  # the fetch command's own time on the restore host
    bytes: int


@dataclass(frozen=True)
class Recovered:
    seconds: float
    last_replayed_commit: str | None
    size: str


@dataclass(frozen=True)
class CopyCheck:
    """is_restored_copy_sound's answer (a copy that is not sound raises: pg_dump or amcheck failed)."""

    ok: bool
    seconds: float
    databases: tuple[str, ...]
    indexes_checked: int
    restored_markers: list[list[str]]

    def __bool__(self) -> bool:
        return self.ok


@dataclass(frozen=True)
class SourceMarkers:
    """is_source_marked's answer: the drill's marker rows on the source, [id, written_at] as text."""

    ok: bool = field(init=False)  # at least one marker row
    rows: list[list[str]]

    def __post_init__(self) -> None:
        object.__setattr__(self, "ok", bool(self.rows))

    def __bool__(self) -> bool:
        return self.ok


@step
def is_restore_host_free(cluster: str, replace_kept: bool = False) -> RestoreHost:
    """The restore host must be no cluster member, and no earlier drill may still be running there."""
    ctx = context_for(cluster)
    host = restore_host(ctx)
    refusals = []
    if host.name in {h.name for h in ctx.inventory.db_hosts} or host.name in {h.name for h in ctx.inventory.etcd_members}:
        refusals.append(f"{host.name}: is a member of cluster {cluster}; restore drills never run on cluster hosts")
    data_dir = ctx.inventory.cluster.postgres.data_dir
    with ctx.remote(host) as remote:
        marker = remote.read_file("/etc/bouwsteen/cluster.json")
        if marker:
            refusals.append(f"{host.name}: carries the marker of a cluster ({marker.strip()}); refusing to restore over it")
        running = remote.run(cmd("pg_isready", "-q", "-h", SOCKET_DIR, "-p", DRILL_PORT, timeout=10,
                                 ok_codes=range(0, 256))).exit_code == 0
        leftover = remote.run(script('[ -d "$1" ] && [ -n "$(ls -A "$1")" ] && echo yes || echo no', args=[data_dir],
                                     description="earlier drill data?")).stdout.strip() == "yes"
    if (running or leftover) and not replace_kept:
        refusals.append(f"{host.name}: an earlier drill is still there ({'running' if running else 'data left'} in "
                        f"{data_dir}); inspect it, then pass replace_kept=True")
    say(f"{host.name} is free for a restore drill." if not refusals else "; ".join(refusals))
    return RestoreHost(host.name, tuple(refusals), running or leftover)


@step
def ensure_restore_host_configured(cluster: str) -> str:
    """Packages and the backup tool's configuration on the restore host (read access to the
    repository: with the restore key where one is registered, read-only on MinIO)."""
    ctx = context_for(cluster)
    inv = ctx.inventory
    host = restore_host(ctx)
    driver = backup_driver(inv)
    changed = []
    with ctx.remote(host) as remote:
        changed += install_missing(remote, [inv.cluster.postgres.package, *driver.packages(inv)])
        for spec in driver.host_files(inv, host, ctx.restore_store_secrets):
            if remote.ensure_file(spec):
                changed.append(spec.path)
    return say(f"{host.name}: {', '.join(changed)} set up." if changed else f"{host.name}: already set up for drills.")


@step
def ensure_marker_row(cluster: str) -> Marker:
    """A marker row on the primary, archived, so the drill can prove it reached the end of the WAL."""
    ctx = context_for(cluster)
    primary = require_primary(ctx, "to write the drill's marker row on")
    with Postgres(ctx.superuser_endpoint(primary)) as pg:
        ensure_marker_table(pg)
        marker_id, written_at = pg.query_one(
            "insert into bouwsteen.restore_marker (note) values ('restore drill') returning id, written_at::text")
        segment = pg.scalar("select pg_walfile_name(pg_switch_wal())")

        def archived() -> bool:
            last = pg.scalar("select last_archived_wal from pg_stat_archiver")
            if not last or last[8:] < segment[8:]:
                raise NotYet(f"last archived {last}, waiting for {segment}")
            return True

        wait_for(f"WAL segment {segment} archived", archived, timeout=120, interval=0.5)
    say(f"Marker {marker_id} written on {primary.name} at {written_at}; its WAL segment is archived.")
    return Marker(marker_id, written_at)


@once
def ensure_backup_restored(cluster: str, backup: str, target: str | None) -> Fetched:
    """Fetch the backup into an empty data directory and configure recovery (never retried)."""
    ctx = context_for(cluster)
    inv = ctx.inventory
    host = restore_host(ctx)
    data_dir = inv.cluster.postgres.data_dir
    target_time = datetime.fromisoformat(target) if target else None
    settings = "".join(f"{k} = '{v}'\n" for k, v in ISOLATION.items())
    # One round trip: empty the directory, fetch and configure recovery, then isolate the copy.
    # The include is appended last, so it wins over whatever the backed-up configuration says.
    fetch = chain(
        script('pg_ctl="$2/pg_ctl"; if [ -f "$1/postmaster.pid" ]; then runuser -u postgres -- "$pg_ctl" -D "$1" -m immediate stop || true; fi; '
               'rm -rf -- "$1"; install -d -o postgres -g postgres -m 0700 "$1"',
               args=[data_dir, inv.cluster.postgres.bin_dir], description=f"empty {data_dir}"),
        *backup_driver(inv).restore_commands(inv, data_dir, backup, target_time),
        script('install -o postgres -g postgres -m 0600 /dev/null "$1/conf.d-drill.conf"; printf %s "$2" > "$1/conf.d-drill.conf"; '
               'grep -q "^include_if_exists .conf.d-drill.conf" "$1/postgresql.auto.conf" 2>/dev/null || '
               'echo "include_if_exists \'conf.d-drill.conf\'" >> "$1/postgresql.auto.conf"; du -sb "$1" | cut -f1',
               args=[data_dir, settings], user="postgres", description="isolate the drill copy"),
        description=f"fetch backup {backup} into {data_dir} and isolate it",
    )
    with ctx.remote(host) as remote:
        result = remote.run(fetch)
    size = int(result.stdout.split()[-1])
    # The command's own time: the SSH connection set-up is not part of fetching a backup.
    seconds = result.seconds
    say(f"Backup {backup} fetched onto {host.name} in {seconds:.1f}s ({size / 2**20:.0f} MiB).")
    return Fetched(seconds, size)


@once
def wait_until_recovered(cluster: str, timeout: float = 1800) -> Recovered:
    """Start PostgreSQL on the copy and wait until recovery reached its target and promoted."""
    ctx = context_for(cluster)
    inv = ctx.inventory
    host = restore_host(ctx)
    data_dir = inv.cluster.postgres.data_dir
    with ctx.remote(host) as remote:
        # Start and wait on the host itself: polling from here would add a round trip (and the
        # psql wrapper's start-up) to every look, and the ready time is what the drill reports.
        waited = remote.run(script(
            '"$1/pg_ctl" -D "$2" -l "$2/drill.log" -w -t "$3" start >/dev/null\n'
            'deadline=$((SECONDS + $3))\n'
            'until [ "$("$1/psql" -XAtq -h "$4" -p "$5" -d postgres -c "select pg_is_in_recovery()" 2>/dev/null)" = f ]; do\n'
            '  "$1/pg_ctl" -D "$2" status >/dev/null || { echo "PostgreSQL stopped during recovery; see $2/drill.log" >&2; exit 3; }\n'
            '  [ "$SECONDS" -lt "$deadline" ] || { echo "still in recovery after $3 s" >&2; exit 4; }\n'
            '  sleep 0.1\n'
            'done',
            args=[inv.cluster.postgres.bin_dir, data_dir, str(int(timeout)), SOCKET_DIR, str(DRILL_PORT)],
            user="postgres", timeout=2 * timeout + 60, description="start the drill copy and wait for promotion"))
        seconds = waited.seconds
        info = rows(remote.run(psql(
            "select coalesce(pg_last_xact_replay_timestamp()::text, ''), "
            "(select timeline_id from pg_control_checkpoint()), pg_size_pretty(sum(pg_database_size(oid))) "
            "from pg_database")))[0]
    say(f"{host.name}: recovery finished in {seconds:.1f}s; last replayed commit {info[0] or 'none'}.")
    return Recovered(seconds, info[0] or None, info[2])


@step(retries=0)
def is_restored_copy_sound(cluster: str) -> CopyCheck:
    """Every table readable (pg_dump), B-tree indexes intact (amcheck), marker rows as the source had them."""
    ctx = context_for(cluster)
    inv = ctx.inventory
    host = restore_host(ctx)
    started = time.monotonic()
    with ctx.remote(host) as remote:
        databases = [r[0] for r in rows(remote.run(psql(
            "select datname from pg_database where datallowconn order by 1")))]
        indexes = 0
        for db in databases:
            remote.run(cmd(f"{inv.cluster.postgres.bin_dir}/pg_dump", "-h", SOCKET_DIR, "-p", DRILL_PORT, "-d", db,
                           "-f", "/dev/null", user="postgres", timeout=7200))
            remote.run(psql("create extension if not exists amcheck", db=db))
            checked = rows(remote.run(psql(
                "select count(bt_index_check(c.oid)) from pg_index i join pg_class c on c.oid = i.indexrelid "
                "join pg_am a on a.oid = c.relam where a.amname = 'btree' and c.relpersistence <> 't' "
                "and i.indisvalid and i.indisready", db=db, timeout=7200)))
            indexes += int(checked[0][0])
        exists = rows(remote.run(psql("select to_regclass('bouwsteen.restore_marker') is not null")))[0][0] == "t"
        restored = rows(remote.run(psql(
            "select id::text, written_at::text from bouwsteen.restore_marker order by id"))) if exists else []
    seconds = time.monotonic() - started
    say(f"Read every table of {len(databases)} database(s) and checked {indexes} B-tree indexes in {seconds:.1f}s.")
    return CopyCheck(ok=True, seconds=seconds, databases=tuple(databases), indexes_checked=indexes,
                     restored_markers=restored)


@step
def is_source_marked(cluster: str) -> SourceMarkers:
    """Does the primary carry drill marker rows? They are what the restored copy must match."""
    ctx = context_for(cluster)
    primary = require_primary(ctx, "to read the drill's marker rows from")
    with Postgres(ctx.superuser_endpoint(primary)) as pg:
        ensure_marker_table(pg)
        found = pg.query("select id::text, written_at::text from bouwsteen.restore_marker order by id")
    return SourceMarkers([list(r) for r in found])


def ensure_marker_table(pg: Postgres) -> None:
    pg.query("create schema if not exists bouwsteen")
    pg.query("create table if not exists bouwsteen.restore_marker (id bigserial primary key, "
             "written_at timestamptz not null default clock_timestamp(), note text)")


@step
def ensure_drill_torn_down(cluster: str) -> str:
    ctx = context_for(cluster)
    inv = ctx.inventory
    host = restore_host(ctx)
    with ctx.remote(host) as remote:
        remote.run(script(
            'if [ -f "$1/postmaster.pid" ]; then runuser -u postgres -- "$2/pg_ctl" -D "$1" -m fast -w stop; fi; rm -rf -- "$1"',
            args=[inv.cluster.postgres.data_dir, inv.cluster.postgres.bin_dir], timeout=120,
            description="stop and remove the drill copy"))
    return say(f"{host.name}: drill copy stopped and removed.")
