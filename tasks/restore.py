"""Restore drill steps: fetch a backup onto the restore host, recover it in isolation, prove it."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

from tasks.adapters.commands import Command, chain, cmd, script
from tasks.adapters.ha.base import HaStatusError
from tasks.adapters.postgres import Postgres
from tasks.adapters.remote import RemoteError
from tasks.context import ClusterContext, context_for
from tasks.desired import backup_driver, ha_driver
from tasks.errors import NotYet, PreflightRefused
from tasks.ha import require_primary
from tasks.hosts import install_missing
from tasks.planning.backup import parse_target
from tasks.runtime import once, say, step, wait_for, with_progress

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



def start_and_await_promotion(bin_dir: str, data_dir: str, timeout: float, socket_dir: str, port: int, log: str,
                              *, options: str = "", what: str) -> Command:
    """Start PostgreSQL on a restored data directory and wait, on the host itself, until recovery
    reached its target and promoted: polling from the controller would add a round trip (and the
    psql wrapper's start-up) to every look, and the ready time is what the drill reports.
    `options`: postgres command-line settings for this start only (never a secret: /proc is public)."""
    return script(
        '"$1/pg_ctl" -D "$2" -l "$6" -o "$7" -w -t "$3" start >/dev/null\n'
        'deadline=$((SECONDS + $3))\n'
        'until [ "$("$1/psql" -XAtq -h "$4" -p "$5" -d postgres -c "select pg_is_in_recovery()" 2>/dev/null)" = f ]; do\n'
        '  "$1/pg_ctl" -D "$2" status >/dev/null || { echo "PostgreSQL stopped during recovery; see $6" >&2; exit 3; }\n'
        '  [ "$SECONDS" -lt "$deadline" ] || { echo "still in recovery after $3 s" >&2; exit 4; }\n'
        '  sleep 0.1\n'
        'done',
        args=[bin_dir, data_dir, str(int(timeout)), socket_dir, str(port), log, options],
        user="postgres", timeout=2 * timeout + 60, description=f"start {what} and wait for promotion")


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


def switched_and_archived(pg: Postgres, *, timeout: float) -> str:
    """Switch the primary's WAL segment and wait until the archiver has it: the segment's name."""
    segment = pg.scalar("select pg_walfile_name(pg_switch_wal())")

    def archived() -> bool:
        last = pg.scalar("select last_archived_wal from pg_stat_archiver")
        # Compared without the timeline: after a promotion the archiver reports the new one's.
        if not last or last[8:] < segment[8:]:
            raise NotYet(f"last archived {last}, waiting for {segment}")
        return True

    wait_for(f"WAL segment {segment} archived", archived, timeout=timeout, interval=0.5)
    return segment


def restore_request(ctx: ClusterContext, target: str, backup: str | None, now: datetime) -> datetime | None:
    """The target as a moment (None: the end of the archive), the named backup checked, the
    object store configured; PreflightRefused naming the field before anything is read."""
    try:
        target_time = parse_target(target, now)
        if backup is not None:
            backup_driver(ctx.inventory).validate_backup_name(backup)
    except ValueError as exc:
        raise PreflightRefused(f"{exc}") from None
    if ctx.inventory.cluster.object_store is None or ctx.store_block is None:
        raise PreflightRefused(f"cluster {ctx.name} has no object store configured, so no backup to restore")
    return target_time


@step
def ensure_marker_row(cluster: str) -> Marker:
    """A marker row on the primary, archived, so the drill can prove it reached the end of the WAL."""
    ctx = context_for(cluster)
    primary = require_primary(ctx, "to write the drill's marker row on")
    with Postgres(ctx.superuser_endpoint(primary)) as pg:
        ensure_marker_table(pg)
        marker_id, written_at = pg.query_one(
            "insert into bouwsteen.restore_marker (note) values ('restore drill') returning id, written_at::text")
        switched_and_archived(pg, timeout=120)
    say(f"Marker {marker_id} written on {primary.name} at {written_at}; its WAL segment is archived.")
    return Marker(marker_id, written_at)


def _disk_progress(ctx: ClusterContext, host: str, path: str, total: int | None):
    """A restore's progress as the bytes in its target directory against the backup's size (the
    tools report none of their own while restoring), asked over a connection of its own."""
    def poll() -> tuple[int, int] | None:
        if not total:
            return None
        with ctx.remote(host) as remote:
            found = remote.run(script('du -sb -- "$1" 2>/dev/null | cut -f1', args=[path], timeout=30,
                                      description=f"bytes in {path}"), check=False).stdout.split()
        return (int(found[0]), total) if found and found[0].isdigit() else None

    return poll


@once
def ensure_backup_restored(cluster: str, backup: str, target: str | None, size_bytes: int | None = None) -> Fetched:
    """Fetch the backup into an empty data directory and configure recovery (never retried)."""
    ctx = context_for(cluster)
    inv = ctx.inventory
    host = restore_host(ctx)
    data_dir = inv.cluster.postgres.data_dir
    target_time = datetime.fromisoformat(target) if target else None
    settings = "".join(f"{k} = '{v}'\n" for k, v in ISOLATION.items())
    # One round trip: empty the directory, fetch and configure recovery, then isolate the copy.
    # The include is appended last, so it wins over whatever the backed-up configuration says.
    driver = backup_driver(inv)
    fetch = chain(
        # A copy an earlier drill kept (replace_kept) stays for a delta restore where the tool does
        # those; else the directory is emptied.
        script('pg_ctl="$2/pg_ctl"; if [ -f "$1/postmaster.pid" ]; then runuser -u postgres -- "$pg_ctl" -D "$1" -m immediate stop || true; fi; '
               'if [ "$3" = delta ] && [ -s "$1/PG_VERSION" ]; then exit 0; fi; '
               'rm -rf -- "$1"; install -d -o postgres -g postgres -m 0700 "$1"',
               args=[data_dir, inv.cluster.postgres.bin_dir, "delta" if driver.restores_by_delta else "empty"],
               description=f"stop the kept copy, or empty {data_dir}"),
        *driver.restore_commands(inv, data_dir, backup, target_time),
        script('install -o postgres -g postgres -m 0600 /dev/null "$1/conf.d-drill.conf"; printf %s "$2" > "$1/conf.d-drill.conf"; '
               'grep -q "^include_if_exists .conf.d-drill.conf" "$1/postgresql.auto.conf" 2>/dev/null || '
               'echo "include_if_exists \'conf.d-drill.conf\'" >> "$1/postgresql.auto.conf"; du -sb "$1" | cut -f1',
               args=[data_dir, settings], user="postgres", description="isolate the drill copy"),
        description=f"fetch backup {backup} into {data_dir} and isolate it",
    )
    with ctx.remote(host) as remote:
        result = with_progress(f"restore of {backup} onto {host.name}", lambda: remote.run(fetch),
                               _disk_progress(ctx, host.name, data_dir, size_bytes))
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
        waited = remote.run(start_and_await_promotion(inv.cluster.postgres.bin_dir, data_dir, timeout, SOCKET_DIR,
                                                      DRILL_PORT, f"{data_dir}/drill.log", what="the drill copy"))
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
def is_source_marked(cluster: str, create: bool = True) -> SourceMarkers:
    """Does the primary carry drill marker rows? They are what the restored copy must match.
    `create=False`: only read (a pre-flight), finding none where the table is not there yet."""
    ctx = context_for(cluster)
    primary = require_primary(ctx, "to read the drill's marker rows from")
    with Postgres(ctx.superuser_endpoint(primary)) as pg:
        if create:
            ensure_marker_table(pg)
        elif not pg.scalar("select to_regclass('bouwsteen.restore_marker') is not null"):
            return SourceMarkers([])
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


# ----------------------------------------------------------------------------- restore_cluster: in place

# Recovery settings the backup tool wrote into postgresql.auto.conf for the restore. Left there,
# they would outlive it: Patroni writes its own recovery configuration, and a later standby start
# with a stale recovery_target would stop replaying at a moment long past.
RESTORE_ONLY_SETTINGS = ("restore_command", "recovery_target", "recovery_target_time", "recovery_target_action",
                         "recovery_target_timeline", "recovery_target_lsn", "recovery_target_xid",
                         "recovery_target_name", "recovery_target_inclusive", "archive_mode")
# The restored primary recovers before any HA manager runs: reachable over its socket only, and
# committing without waiting for a synchronous standby that is not there yet.
RECOVERY_ONLY_OPTIONS = "-c listen_addresses= -c synchronous_standby_names="


@dataclass(frozen=True)
class RestoreSite:
    """is_cluster_restorable's answer: where the restore lands and what the primary's disk allows;
    restorable when nothing refuses it."""

    ok: bool = field(init=False)
    members: tuple[str, ...]
    primary: str  # the HA manager's primary, else the first member that answered
    primary_running: bool
    free_bytes: int  # on the filesystem of the primary's data directory
    data_bytes: int  # the primary's data directory now
    refusals: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "ok", not self.refusals)

    def __bool__(self) -> bool:
        return self.ok


def aside_path(data_dir: str, stamp: str) -> str:
    return f"{data_dir.rstrip('/')}.pre-restore-{stamp}"


@step
def is_cluster_restorable(cluster: str) -> RestoreSite:
    """Read-only: every member answers (a member left out would come back with its old history),
    who the primary is, the room beside its data directory, and no earlier restore's kept copy."""
    from tasks.ha import read_view

    ctx = context_for(cluster)
    inv = ctx.inventory
    driver = ha_driver(inv)
    data_dir = driver.pgdata(inv)
    members = [h.name for h in inv.db_hosts]
    refusals, answering = [], []
    for name in members:
        try:
            with ctx.remote(name) as remote:
                remote.run(cmd("true", timeout=20))
            answering.append(name)
        except RemoteError as exc:
            refusals.append(f"{name}: does not answer ({str(exc).splitlines()[0]}); every member takes part in a "
                            "restore: replace_member or remove_member it first")
    leader = None
    try:
        leader = read_view(ctx).leader
    except HaStatusError:
        pass  # a cluster that cannot report its state is what a restore may be for
    primary = leader if leader in answering else (answering[0] if answering else members[0])
    free = used = 0
    if primary in answering:
        with ctx.remote(primary) as remote:
            found = remote.run(script(
                'parent=$(dirname -- "$1"); df -B1 --output=avail -- "$parent" | tail -1; '
                'if [ -d "$1" ]; then du -sb -- "$1" | cut -f1; else echo 0; fi; '
                'ls -d -- "$1".pre-restore-* 2>/dev/null || true',
                args=[data_dir], timeout=600, description=f"room beside {data_dir}")).stdout.split()
        free, used, leftovers = int(found[0]), int(found[1]), found[2:]
        for path in leftovers:
            refusals.append(f"{primary}: {path} is kept from an earlier restore; inspect it and remove it first")
    say(f"Members {', '.join(members)}; primary {primary} ({'running' if leader else 'no primary running'}); "
        f"{free / 2**30:.1f} GiB free beside {data_dir} ({used / 2**30:.2f} GiB)."
        + (f" Refused: {'; '.join(refusals)}" if refusals else ""))
    return RestoreSite(tuple(members), primary, leader is not None, free, used, tuple(refusals))


@dataclass(frozen=True)
class CloneTarget:
    """is_clone_target_ready's answer: the target cluster's members, whether it is built (its HA
    manager reports a primary) and whether a database is there to lose."""

    ok: bool = field(init=False)
    members: tuple[str, ...]
    primary: str  # the HA manager's primary, else the first member
    built: bool
    holds_data: bool
    refusals: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "ok", not self.refusals)

    def __bool__(self) -> bool:
        return self.ok


@step
def is_clone_target_ready(cluster: str) -> CloneTarget:
    """Read-only: every member of the clone's target answers, and is it built, does it hold data."""
    from tasks.ha import read_view

    ctx = context_for(cluster)
    inv = ctx.inventory
    data_dir = ha_driver(inv).pgdata(inv)
    members = [h.name for h in inv.db_hosts]
    refusals, holding_data = [], []
    for name in members:
        try:
            with ctx.remote(name) as remote:
                found = remote.run(script('[ -s "$1/PG_VERSION" ] && echo data || echo none', args=[data_dir],
                                          timeout=20, description=f"a database in {data_dir}?")).stdout.strip()
            if found == "data":
                holding_data.append(name)
        except RemoteError as exc:
            refusals.append(f"{name}: does not answer ({str(exc).splitlines()[0]}); every member of the clone takes part")
    try:
        leader = read_view(ctx).leader
    except HaStatusError:
        leader = None  # not built yet, or its HA manager down: build_cluster comes first
    say(f"{cluster}: members {', '.join(members)}; "
        + (f"built, primary {leader}" if leader else "not built (no primary)")
        + (f"; a database on {', '.join(holding_data)}" if holding_data else "; no database yet")
        + (f". Refused: {'; '.join(refusals)}" if refusals else "."))
    return CloneTarget(tuple(members), leader or members[0], leader is not None, bool(holding_data), tuple(refusals))


@step
def ensure_archive_current(cluster: str) -> str:
    """The running primary's current WAL segment switched and archived, so a target just before
    now is in the archive (recovery can only stop where archived WAL reaches)."""
    from tasks.ha import read_view

    ctx = context_for(cluster)
    leader = read_view(ctx).leader
    if leader is None:
        return say("No primary is running: the archive ends where the last primary left it.")
    with Postgres(ctx.superuser_endpoint(ctx.inventory.host(leader))) as pg:
        segment = switched_and_archived(pg, timeout=300)
    return say(f"{leader}: WAL up to segment {segment} is archived.")


def _stop_units(ctx, host: str) -> list[str]:
    inv = ctx.inventory
    units = ha_driver(inv).restore_stopped_units(inv, inv.host(host))
    with ctx.remote(host) as remote:
        for unit in reversed(units):
            remote.run(cmd("systemctl", "stop", unit, timeout=300))
    return units


@step
def ensure_members_stopped(cluster: str, primary: str) -> str:
    """The HA manager stopped on every member, the standbys (together) before the primary: a
    standby still running when the primary stops would be promoted by its HA manager."""
    ctx = context_for(cluster)
    standbys = [h.name for h in ctx.inventory.db_hosts if h.name != primary]
    with ThreadPoolExecutor(max_workers=max(len(standbys), 1)) as pool:
        units = [u for us in pool.map(lambda host: _stop_units(ctx, host), standbys) for u in us]
    units += _stop_units(ctx, primary)
    return say(f"Stopped {', '.join(sorted(set(units)))} on {', '.join([*standbys, primary])} (the primary last).")


@step
def ensure_data_kept_aside(cluster: str, host: str, aside: str) -> str:
    """The primary's data directory renamed to `aside` (same filesystem: nothing copied); a rerun
    finds it there and leaves it."""
    ctx = context_for(cluster)
    data_dir = ha_driver(ctx.inventory).pgdata(ctx.inventory)
    with ctx.remote(host) as remote:
        moved = remote.run(script(
            'if [ -e "$2" ]; then echo kept; elif [ -d "$1" ]; then mv -T -- "$1" "$2" && echo moved; else echo none; fi',
            args=[data_dir, aside], timeout=60, description=f"keep {data_dir} aside")).stdout.strip()
    if moved == "none":
        return say(f"{host}: no {data_dir} to keep aside.")
    return say(f"{host}: {data_dir} kept aside as {aside} until the restored cluster is verified.")


@step
def ensure_ha_state_forgotten(cluster: str) -> str:
    """The HA manager's state in etcd gone (Patroni: leader, members, the initialize key with the
    old system's history, the dynamic configuration), so it starts afresh from the restored data
    and writes its dynamic configuration again from the inventory's."""
    ctx = context_for(cluster)
    prefix = ha_driver(ctx.inventory).etcd_prefix(ctx.inventory)
    deleted = ctx.etcd().delete_prefix(prefix)
    return say(f"etcd: {deleted} key(s) under {prefix} deleted." if deleted else f"etcd: nothing under {prefix}.")


@once
def ensure_primary_restored(cluster: str, host: str, backup: str, target: str | None,
                            timeout: float = 3600, size_bytes: int | None = None) -> Fetched:
    """Restore `backup` onto the primary's data directory, recover to `target` and promote, with
    no HA manager running; then leave it cleanly shut down for the HA manager to start. Never
    retried: a second try would wipe what the first restored."""
    ctx = context_for(cluster)
    inv = ctx.inventory
    target_time = datetime.fromisoformat(target) if target else None
    fetch = backup_driver(inv).restore_commands(inv, ha_driver(inv).pgdata(inv), backup, target_time, archive=True)
    return _restored_and_settled(ctx, host, backup, target, fetch, timeout=timeout, size_bytes=size_bytes)


@once
def ensure_clone_restored(cluster: str, source: str, host: str, backup: str, target: str | None,
                          post_clone_sql: list[str], timeout: float = 3600, size_bytes: int | None = None) -> Fetched:
    """`source`'s backup restored onto `cluster`'s `host` with the source's restore key, recovered
    to `target` with archiving off; then, while only the socket reaches it, the clone's own
    superuser and replication logins and the post-clone SQL; then shut down cleanly for the HA
    manager. The source's key leaves the host again whatever happens. Never retried."""
    from tasks.db_roles import clone_login_sql

    ctx, source_ctx = context_for(cluster), context_for(source)
    inv, source_inv = ctx.inventory, source_ctx.inventory
    driver = backup_driver(inv)
    source_files = driver.clone_source_files(source_inv, source_ctx.restore_store_secrets)
    target_time = datetime.fromisoformat(target) if target else None
    fetch = driver.clone_restore_commands(source_inv, ha_driver(inv).pgdata(inv), backup, target_time)
    secrets = ctx.db_secrets
    sql = [("postgres", clone_login_sql(secrets.superuser, secrets.superuser_password,
                                         secrets.replication_user, secrets.replication_password)),
           *((source_inv.cluster.postgres.application_database, text) for text in post_clone_sql)]
    try:
        with ctx.remote(host) as remote:
            for spec in source_files:
                remote.ensure_file(spec)
        return _restored_and_settled(ctx, host, backup, target, fetch, timeout=timeout, sql=sql,
                                     what=f"{source}'s backup {backup}", size_bytes=size_bytes)
    finally:
        with ctx.remote(host) as remote:
            remote.run(cmd("rm", "-f", "--", *(f.path for f in source_files), timeout=60))


# Where a clone's SQL waits for psql: postgres's home, 0600, removed right after.
CLONE_SQL_PATH = "/var/lib/postgresql/.bouwsteen-clone.sql"


def _restored_and_settled(ctx: ClusterContext, host: str, backup: str, target: str | None, fetch: list[Command], *,
                          timeout: float, sql: list[tuple[str, str]] | None = None, what: str | None = None,
                          size_bytes: int | None = None) -> Fetched:
    """Fetch into an emptied data directory, recover and promote with only the socket open, run
    `sql` ((database, text) each, one transaction each), reset the restore's own settings and
    shut down cleanly for the HA manager."""
    from tasks.adapters.commands import ManagedFile

    inv = ctx.inventory
    ha = ha_driver(inv)
    data_dir = ha.pgdata(inv)
    bin_dir = inv.cluster.postgres.bin_dir
    socket_dir = ha.socket_dir(inv)
    port = inv.cluster.postgres.port
    fetch_all = chain(
        script('rm -rf -- "$1"; install -d -o postgres -g postgres -m 0700 "$1"', args=[data_dir],
               description=f"empty {data_dir}"),
        *fetch,
        description=f"fetch backup {backup} into {data_dir}",
    )
    reset = [f"alter system reset {name}" for name in RESTORE_ONLY_SETTINGS]
    settle = script(
        'for sql in "${@:5}"; do "$1/psql" -XAtq -v ON_ERROR_STOP=1 -h "$3" -p "$4" -d postgres -c "$sql" || exit 1; done\n'
        '"$1/psql" -XAtq -h "$3" -p "$4" -d postgres -c checkpoint\n'
        '"$1/pg_ctl" -D "$2" -m fast -w -t 600 stop >/dev/null',
        args=[bin_dir, data_dir, socket_dir, str(port), *reset], user="postgres", timeout=900,
        description="drop the restore's recovery settings, shut the restored primary down cleanly")
    with ctx.remote(host) as remote:
        fetched = with_progress(f"restore of {what or backup} onto {host}", lambda: remote.run(fetch_all),
                                _disk_progress(ctx, host, data_dir, size_bytes))
        recovered = remote.run(start_and_await_promotion(
            bin_dir, data_dir, timeout, socket_dir, port, f"{data_dir.rstrip('/')}.restore.log",
            options=RECOVERY_ONLY_OPTIONS, what=f"{host}'s restored copy"))
        for database, text in sql or []:
            # A file, not -c: the clone's login SQL holds password verifiers, which no command line may.
            remote.ensure_file(ManagedFile(CLONE_SQL_PATH, text, owner="postgres", group="postgres", mode=0o600,
                                           secret=True))
            try:
                remote.run(cmd(f"{bin_dir}/psql", "-XAtq", "-v", "ON_ERROR_STOP=1", "--single-transaction",
                               "-h", socket_dir, "-p", port, "-d", database, "-f", CLONE_SQL_PATH,
                               user="postgres", timeout=1800, description=f"psql -d {database} -f (clone SQL)"))
            finally:
                remote.run(cmd("rm", "-f", "--", CLONE_SQL_PATH, timeout=60))
        remote.run(settle)
        if ha.cached_state_files:
            remote.run(cmd("rm", "-f", "--", *(f"{data_dir.rstrip('/')}/{name}" for name in ha.cached_state_files),
                           timeout=60, description="drop the backed-up cluster's cached HA state"))
        size = int(remote.run(script('du -sb -- "$1" | cut -f1', args=[data_dir], timeout=600)).stdout.split()[0])
    say(f"{host}: {what or f'backup {backup}'} restored in {fetched.seconds:.1f}s and recovered to "
        f"{target or 'the end of the archive'} in {recovered.seconds:.1f}s ({size / 2**20:.0f} MiB)"
        + (f"; {len(sql)} SQL file(s) run on it before anyone could connect" if sql else "")
        + "; shut down cleanly for the HA manager.")
    return Fetched(fetched.seconds + recovered.seconds, size)


@once
def ensure_ha_restored_cluster(cluster: str, host: str, backup: str, target: str | None) -> str:
    """Where the HA manager restores the cluster itself (stolon's pitr): its init from the
    backup, run on `host` while the members' HA units are stopped. Never retried."""
    ctx = context_for(cluster)
    inv = ctx.inventory
    data_restore, wal_restore = backup_driver(inv).ha_restore_commands(inv, backup)
    commands = ha_driver(inv).pitr_init_commands(
        inv, data_restore, wal_restore, datetime.fromisoformat(target) if target else None)
    with ctx.remote(host) as remote:
        for command in commands:
            remote.run(command)
    return say(f"{ha_driver(inv).name} initialises {cluster} from backup {backup} to {target or 'the end of the archive'}.")


def _start_units(ctx, host: str, *, wipe: bool) -> None:
    inv = ctx.inventory
    driver = ha_driver(inv)
    with ctx.remote(host) as remote:
        if wipe:
            remote.run(cmd("rm", "-rf", "--", driver.pgdata(inv), timeout=600))
        for unit in driver.restore_stopped_units(inv, inv.host(host)):
            remote.run(cmd("systemctl", "start", unit, timeout=300))


@step
def ensure_members_started(cluster: str, hosts: list[str]) -> str:
    """The HA units started again on `hosts`, in start order."""
    ctx = context_for(cluster)
    for host in hosts:
        _start_units(ctx, host, wipe=False)
    return say(f"{ha_driver(ctx.inventory).name} started on {', '.join(hosts)}.")


@once
def ensure_standbys_cloned_afresh(cluster: str, hosts: list[str]) -> str:
    """The standbys' data directories removed and their HA units started, so the HA manager
    clones them from the restored primary: their data belongs to the history the restore
    abandoned. Never retried: a second try would wipe a clone under way."""
    ctx = context_for(cluster)
    with ThreadPoolExecutor(max_workers=max(len(hosts), 1)) as pool:
        list(pool.map(lambda host: _start_units(ctx, host, wipe=True), hosts))
    return say(f"{', '.join(hosts) or 'no standby'}: data directories emptied; "
               f"{ha_driver(ctx.inventory).name} clones them from the restored primary.")


@step
def ensure_kept_copy_removed(cluster: str, host: str, aside: str) -> str:
    """Once the restored cluster is verified, the copy kept aside goes (its history stays in the
    archive, on the old timeline)."""
    ctx = context_for(cluster)
    with ctx.remote(host) as remote:
        remote.run(script('case "$1" in *.pre-restore-*) rm -rf -- "$1";; *) exit 2;; esac', args=[aside],
                          timeout=1800, description=f"remove {aside}"))
    return say(f"{host}: {aside} removed.")
