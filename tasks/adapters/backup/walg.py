"""The WAL-G backup driver (production): renders WAL-G's config, builds its commands, parses its output.

Contract: /work/shared/reference/walg.md. PgVillage installs WAL-G as `/usr/local/bin/wal-g-pg`;
this driver keeps its settings in one JSON file per cluster, `/etc/wal-g/<cluster>.json`, passed
with `--config` on every call, so secrets never appear in argv, the environment or `SHOW
archive_command`. Nothing here does I/O.

backup-push and wal-verify log in to the local PostgreSQL through its socket (wal-push and
wal-fetch never do). How depends on the HA manager's pg_hba:

- stolon: the keeper's generated pg_hba admits the socket only as `local postgres <superuser> md5`
  (keeper generateHBA; `--pg-su-auth-method` defaults to md5) and runs initdb with `-U <superuser>`,
  so there may be no `postgres` role at all. WAL-G logs in as the configured superuser with the
  password from a 0600 pgpass file named by PGPASSFILE (WAL-G exports its config file's settings
  to its own environment; pgx reads PGPASSFILE: v3.6.0 in WAL-G <= v3.0.5, v5 from v3.0.6). Only
  the file's path is in the config and the environment, never the password.
- Patroni: PatroniDriver.pg_hba admits the socket as `local all postgres peer`; WAL-G runs as the
  OS user postgres and logs in as `postgres` without a password.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from blocks.inventory import HostSpec, Inventory, ObjectStoreSpec, Role
from tasks.adapters.backup.base import (
    BACKUP_KINDS,
    ArchiveCheck,
    BackupDriver,
    BackupInfo,
    BackupInputError,
    BackupKind,
    BackupOutputError,
    StoreSecrets,
)
from tasks.adapters.commands import Command, CommandResult, ManagedFile, cmd, script
from tasks.adapters.ha.base import DbSecrets
from tasks.adapters.ha.pgdata import pgdata
from tasks.adapters.ha.registry import ha_driver

BINARY = "/usr/local/bin/wal-g-pg"
CONFIG_DIR = "/etc/wal-g"
PACKAGE = "wal-g-pg"
OS_USER = "postgres"
# The database WAL-G connects to (PGDATABASE); stolon's hba admits the superuser's socket login only there.
LOGIN_DATABASE = "postgres"

# A full base backup of a large database over a modest link; Command caps timeouts at 24 h.
BACKUP_TIMEOUT = 6 * 3600.0
FETCH_TIMEOUT = 6 * 3600.0
DELTA_MAX_STEPS = 7
# `backup-list --detail` downloads one metadata object per backup.
LIST_TIMEOUT = 300.0
RETENTION_TIMEOUT = 3600.0
# wal-verify lists the whole WAL folder back to the oldest backup.
VERIFY_TIMEOUT = 900.0
# How long the archive check waits for the segment its WAL switch closed, and its exit code then.
ARCHIVE_WAIT_S = 60.0
ARCHIVE_WAIT_EXIT = 4
# Bounds one archive_command run: a hung upload must fail (PostgreSQL retries), not stall archiving.
ARCHIVE_PUSH_TIMEOUT = 600

# The names WAL-G gives backups: base_<start WAL>[_D_<WAL of the backup it is a delta of>].
_BACKUP_NAME_IN_TEXT = r"base_[0-9A-F]{24}(?:_D_[0-9A-F]{24})?"
_BACKUP_NAME = re.compile(_BACKUP_NAME_IN_TEXT)
# v3: "Wrote backup with name base_… to storage default" (local push), without the suffix for a
# remote (BASE_BACKUP) push and in v2.
_WROTE_BACKUP = re.compile(rf"Wrote backup with name ({_BACKUP_NAME_IN_TEXT})")
# `delete` without --confirm logs one INFO line per object it would delete (WAL-G's
# DeleteObjectsWhere), in one of three wordings:
#   v3.0.9+        "INFO: <date> <time> Object marked for deletion: <object> storage=<storage>"
#   v3.0.0-v3.0.8  "INFO: <date> <time> \twill be deleted: <object>, from storage: <storage>"
#   v2             "INFO: <date> <time> \twill be deleted: <object>"
# The message must follow the log prefix directly: DEVEL logging adds lines such as "DEBUG: …
# Backup keys will be deleted: [...]" that are not objects.
_LOG_PREFIX = r"^(?:INFO: \S+ \S+\s+)?"
_MARKED_FOR_DELETION = re.compile(_LOG_PREFIX + r"Object marked for deletion: (\S+) storage=\S*$")
_WILL_BE_DELETED = re.compile(_LOG_PREFIX + r"will be deleted: (\S+?)(?:, from storage: \S*)?$")
# Any line that announces an object, recognised or not: one that does not parse is a new wording.
_ANNOUNCES_DELETION = re.compile(_LOG_PREFIX + r"(?:Object marked for deletion:|will be deleted:)")
# v3.0.9+ closes a dry run with the number of objects it listed.
_DRY_RUN_COUNT = re.compile(r"Dry run: objects would be deleted count=(\d+)")
_DELETED_BACKUP_OBJECT = re.compile(rf"^basebackups_005/({_BACKUP_NAME_IN_TEXT})(?:_backup_stop_sentinel\.json$|/)")

_STATUS_RANK = {"OK": 0, "WARNING": 1, "FAILURE": 2}
_SEGMENT_STATUSES = {"FOUND", "MISSING_DELAYED", "MISSING_UPLOADING", "MISSING_LOST"}


@dataclass(frozen=True)
class LocalLogin:
    """How WAL-G logs in to the local PostgreSQL (PGUSER, and PGPASSFILE when a password is asked)."""

    user: str
    password: str | None = field(default=None, repr=False)
    passfile: str | None = None
    # stolon asks for a password but no db_secrets were given.
    password_missing: bool = False


@dataclass(frozen=True)
class DeletePlan:
    """What a `delete` run without `--confirm` reported it would remove."""

    backups: tuple[str, ...]  # backup names, in the order WAL-G listed them
    wal_objects: int  # objects under wal_005/ (segments, .history, .partial)
    objects: int  # every object it would delete


class WalgDriver(BackupDriver):
    name = "walg"
    binary = BINARY

    # ------------------------------------------------------------------ layout

    def config_path(self, inv: Inventory) -> str:
        return f"{CONFIG_DIR}/{inv.cluster.name}.json"

    def ca_path(self, inv: Inventory) -> str:
        return f"{CONFIG_DIR}/{inv.cluster.name}-ca.crt"

    def s3_prefix(self, inv: Inventory) -> str:
        # One prefix per cluster *and* major version: WAL-G orders backups by timeline + segment
        # from the name, so after pg_upgrade (a new cluster, timeline 1 again) `delete retain`
        # in a shared prefix would delete the new backups instead of the old ones.
        store = _store(inv)
        return f"s3://{store.bucket}/{inv.cluster.name}/pg{inv.cluster.postgres.version}"

    def pgpass_path(self, inv: Inventory) -> str:
        return f"{CONFIG_DIR}/{inv.cluster.name}.pgpass"

    def socket_dir(self, inv: Inventory) -> str:
        return ha_driver(inv).socket_dir(inv)

    def _walg(self, inv: Inventory, *args: str | int) -> tuple[str, ...]:
        return (self.binary, "--config", self.config_path(inv), *(str(a) for a in args))

    def local_login(self, inv: Inventory, db_secrets: DbSecrets | None) -> LocalLogin:
        """How backup-push and wal-verify log in through the socket (see the module docstring)."""
        if not ha_driver(inv).socket_needs_password(inv):
            # Peer authentication as postgres (Patroni): a password would not even be asked for.
            return LocalLogin(user=OS_USER)
        if db_secrets is None:
            return LocalLogin(user=OS_USER, password_missing=True)
        _check_login(db_secrets)
        return LocalLogin(user=db_secrets.superuser, password=db_secrets.superuser_password,
                          passfile=self.pgpass_path(inv))

    def config(self, inv: Inventory, secrets: StoreSecrets, login: LocalLogin | None = None) -> dict[str, str]:
        """The settings WAL-G reads from the config file (all strings: viper's most portable form)."""
        store = _store(inv)
        login = login or LocalLogin(user=OS_USER)
        passfile = {"PGPASSFILE": login.passfile} if login.passfile else {}
        return {
            "WALG_S3_PREFIX": self.s3_prefix(inv),
            "AWS_ENDPOINT": store.endpoint.rstrip("/"),
            # MinIO serves buckets by path, not by virtual host name.
            "AWS_S3_FORCE_PATH_STYLE": "true",
            "AWS_REGION": store.region,
            "AWS_ACCESS_KEY_ID": secrets.access_key_id,
            "AWS_SECRET_ACCESS_KEY": secrets.secret_access_key,
            "WALG_S3_CA_CERT_FILE": self.ca_path(inv),
            "WALG_COMPRESSION_METHOD": "lz4",
            # PgVillage's value: a backup from a standby must not starve the database host's I/O.
            "WALG_UPLOAD_CONCURRENCY": "2",
            # The building block's value: a delta chain of at most 7 before WAL-G makes a full.
            "WALG_DELTA_MAX_STEPS": str(DELTA_MAX_STEPS),
            # A second writer with different WAL under the same name (split brain, a restored copy
            # archiving by mistake) fails loudly instead of replacing the cluster's history.
            "WALG_PREVENT_WAL_OVERWRITE": "true",
            # File values are exported to the process, so pgx, WAL-G's PostgreSQL client (backup-push,
            # wal-verify), reads these as libpq would.
            "PGHOST": self.socket_dir(inv),
            "PGPORT": str(inv.cluster.postgres.port),
            "PGDATABASE": LOGIN_DATABASE,
            "PGUSER": login.user,
            # A path, not the password: WAL-G exports every setting into its environment.
            **passfile,
        }

    # ------------------------------------------------------------------ BackupDriver

    def packages(self, inv: Inventory) -> list[str]:
        # Not in the distribution: the site's repository carries PgVillage's build (with the patch
        # for restoring stolon delta backups), installed as /usr/local/bin/wal-g-pg.
        return [PACKAGE]

    def host_files(
        self, inv: Inventory, host: HostSpec, secrets: StoreSecrets, *, db_secrets: DbSecrets | None = None
    ) -> list[ManagedFile]:
        """`db_secrets` gives backup-push and wal-verify the superuser's login under stolon. A
        database host of a stolon cluster needs it; a restore host (fetch only) does not."""
        if secrets.cipher_pass:
            # pgBackRest's repository encryption; WAL-G's (libsodium/PGP keys) is not part of this
            # building block, and a cipher pass that changes nothing would be a silent lie.
            raise BackupInputError("object store credentials: pgbackrest_cipher_pass is set, but WAL-G's repository "
                                   "encryption is not configured by this building block; remove it for a WAL-G cluster")
        login = self.local_login(inv, db_secrets)
        if login.password_missing and host.has(Role.db):
            raise BackupInputError(
                f"{host.name}: WAL-G of stolon cluster {inv.cluster.name!r} needs the database credentials: stolon "
                "admits the socket only as the superuser with a password (backup-push and wal-verify log in)")
        config = json.dumps(self.config(inv, secrets, login), indent=2, sort_keys=True) + "\n"
        ca = secrets.ca_certificate if secrets.ca_certificate.endswith("\n") else secrets.ca_certificate + "\n"
        files = [
            # Holds the S3 secret key; only postgres reads it (archive_command and every wal-g call run as postgres).
            ManagedFile(self.config_path(inv), config, owner=OS_USER, group=OS_USER, mode=0o600, secret=True),
            ManagedFile(self.ca_path(inv), ca, owner="root", group="root", mode=0o644),
        ]
        if login.passfile is not None and login.password is not None:
            # libpq ignores a group/world-readable pgpass file, pgx does not even check: the 0600 is ours to keep.
            files.append(ManagedFile(
                login.passfile, _pgpass(inv.cluster.postgres.port, login.user, login.password),
                owner=OS_USER, group=OS_USER, mode=0o600, secret=True,
            ))
        return files

    def archive_parameters(self, inv: Inventory) -> dict[str, str]:
        _store(inv)
        # These are parameter values (stolon pgParameters / Patroni parameters), not shell: %p must
        # reach PostgreSQL unchanged. Only the config path is in here, never a secret (SHOW shows it).
        command = " ".join(
            ["/usr/bin/timeout", str(ARCHIVE_PUSH_TIMEOUT), *self._walg(inv, "wal-push", "%p")]
        )
        return {"archive_mode": "on", "archive_command": command, "archive_timeout": "60"}

    def init_repository_commands(self, inv: Inventory) -> list[Command]:
        # WAL-G has no stanza to create: the prefix comes into being with the first upload. A write
        # probe (puts and deletes one random object) proves credentials, CA and bucket before the
        # first archive_command depends on them; repeating it changes nothing.
        return [
            cmd(*self._walg(inv, "st", "check", "write"), user=OS_USER, timeout=120,
                description=f"wal-g: check write access to {self.s3_prefix(inv)}"),
        ]

    def backup_command(self, inv: Inventory, source: HostSpec, primary: HostSpec,
                       kind: BackupKind = "full", processes: int | None = None) -> Command:
        # WAL-G backs up the local instance through its socket (a standby works as is), so
        # `primary` is not needed. The source host is recorded as user data because `hostname`
        # in the metadata is the OS name, which need not be the inventory name.
        if kind not in BACKUP_KINDS:
            raise BackupInputError(f"kind: {kind!r} is not one of {', '.join(BACKUP_KINDS)}")
        user_data = json.dumps({"source_host": source.name}, sort_keys=True)
        # Without --full WAL-G makes a delta on the newest backup (WALG_DELTA_MAX_STEPS in the
        # config bounds the chain; past it WAL-G makes a full by itself).
        full = ["--full"] if kind == "full" else []
        if processes is not None and (isinstance(processes, bool) or not isinstance(processes, int)
                                      or not 1 <= processes <= 64):
            raise BackupInputError(f"processes: must be an integer from 1 to 64, got {processes!r}")
        return cmd(
            # The directory must be the server's data_directory: backup-push refuses any other.
            *self._walg(inv, "backup-push", *full, "--add-user-data", user_data, pgdata(inv)),
            user=OS_USER, timeout=BACKUP_TIMEOUT,
            # The environment wins over the config file's value in WAL-G (viper), for this run only.
            env={"WALG_UPLOAD_CONCURRENCY": str(processes)} if processes is not None else None,
            description=f"wal-g: {'full' if full else 'delta'} backup of {source.name}",
        )

    def parse_backup_push(self, result: CommandResult) -> str:
        """The name of the backup `backup_command` wrote (WAL-G logs it on stderr)."""
        if result.exit_code != 0:
            raise BackupOutputError(f"wal-g backup-push failed (exit {result.exit_code}): {_tail(result)}")
        found = _WROTE_BACKUP.findall(result.stderr) or _WROTE_BACKUP.findall(result.stdout)
        if not found:
            raise BackupOutputError(
                "wal-g backup-push exited 0 but did not log 'Wrote backup with name base_…': " + _tail(result)
            )
        return found[-1]

    def release_command(self) -> Command:
        return cmd(BINARY, "--version", timeout=30, ok_codes=(0, 127), description="wal-g --version")

    def parse_release(self, result: CommandResult) -> str | None:
        # "wal-g version v3.0.5<TAB>revision<TAB>build date<TAB>PostgreSQL" (walg.md).
        first = result.stdout.strip().split("\t")[0].split() if result.exit_code == 0 else []
        return first[-1].removeprefix("v") if first else None

    def list_command(self, inv: Inventory) -> Command:
        return cmd(*self._walg(inv, "backup-list", "--detail", "--json"), user=OS_USER, timeout=LIST_TIMEOUT,
                   description="wal-g: list backups")

    def parse_list(self, result: CommandResult) -> list[BackupInfo]:
        if result.exit_code != 0:
            raise BackupOutputError(f"wal-g backup-list failed (exit {result.exit_code}): {_tail(result)}")
        data = _load_json(result.stdout, "wal-g backup-list --detail --json")
        if not isinstance(data, list):
            raise BackupOutputError(
                f"wal-g backup-list --detail --json: expected a JSON list, got {type(data).__name__}"
            )
        backups = [_backup_info(index, item) for index, item in enumerate(data)]
        # WAL-G already lists oldest first; sorting again keeps that true for builds that order by mtime.
        return sorted(backups, key=lambda b: (b.start_time, b.name))

    def retention_commands(self, inv: Inventory, keep_full: int) -> list[Command]:
        _check_keep_full(keep_full)
        # FULL: keep N full backups with their deltas (plain `retain N` fails when the Nth is a delta).
        return [
            cmd(*self._walg(inv, "delete", "retain", "FULL", keep_full, "--confirm"), user=OS_USER,
                timeout=RETENTION_TIMEOUT, description=f"wal-g: keep the newest {keep_full} full backup(s)"),
        ]

    def retention_dry_run_command(self, inv: Inventory, keep_full: int) -> Command:
        """The same deletion without `--confirm`: WAL-G only logs what would go (see parse_delete_dry_run)."""
        _check_keep_full(keep_full)
        return cmd(*self._walg(inv, "delete", "retain", "FULL", keep_full), user=OS_USER, timeout=RETENTION_TIMEOUT,
                   description=f"wal-g: what keeping {keep_full} full backup(s) would delete")

    def parse_delete_dry_run(self, result: CommandResult) -> DeletePlan:
        if result.exit_code != 0:
            raise BackupOutputError(f"wal-g delete (dry run) failed (exit {result.exit_code}): {_tail(result)}")
        objects: list[str] = []
        counts: list[int] = []
        for raw_line in (result.stderr + "\n" + result.stdout).splitlines():
            line = raw_line.strip()
            match = _MARKED_FOR_DELETION.match(line) or _WILL_BE_DELETED.match(line)
            if match:
                objects.append(match.group(1))
            elif _ANNOUNCES_DELETION.match(line):
                raise BackupOutputError(f"wal-g delete (dry run): unrecognised object line {line[:200]!r}")
            count = _DRY_RUN_COUNT.search(line)
            if count:
                counts.append(int(count.group(1)))
        if counts and counts[-1] != len(objects):
            raise BackupOutputError(
                f"wal-g delete (dry run) says {counts[-1]} object(s) would be deleted but listed {len(objects)}"
            )
        backups: list[str] = []
        for path in objects:
            match = _DELETED_BACKUP_OBJECT.match(path)
            if match and match.group(1) not in backups:
                backups.append(match.group(1))
        wal = sum(1 for path in objects if path.startswith("wal_005/"))
        return DeletePlan(backups=tuple(backups), wal_objects=wal, objects=len(objects))

    def restore_commands(
        self,
        inv: Inventory,
        target_dir: str,
        backup: str | None,
        target_time: datetime | None,
        *,
        archive: bool = False,
    ) -> list[Command]:
        _store(inv)
        if not target_dir.startswith("/") or "\n" in target_dir or target_dir.rstrip("/") == "":
            raise BackupInputError(f"restore target directory must be an absolute path other than /: {target_dir!r}")
        name = "LATEST" if backup is None else backup
        self.validate_backup_name(name)
        settings = [
            "# bouwsteen restore (WAL-G): replay from the cluster's archive"
            + ("." if archive else "; never archive into it."),
            # No `timeout` wrapper here: its exit 124 would read as "segment not archived" and end
            # recovery early at the wrong point; wal-fetch's own 74 is the real "not there".
            _pg_setting("restore_command", " ".join(self._walg(inv, "wal-fetch", '"%f"', '"%p"'))),
        ]
        if not archive:
            # A restored copy that archived would push a new timeline into the cluster's prefix.
            settings.append(_pg_setting("archive_mode", "off"))
        if target_time is not None:
            settings += [
                _pg_setting("recovery_target_time", _pg_timestamp(target_time)),
                _pg_setting("recovery_target_action", "promote"),
            ]
        else:
            settings.append(_pg_setting("recovery_target_timeline", "latest"))
        configure = script(
            _CONFIGURE_RECOVERY,
            args=[target_dir, *settings],
            user=OS_USER,
            timeout=60,
            description=f"configure recovery in {target_dir}"
            + (f" to {_pg_timestamp(target_time)}" if target_time else " to the end of the archive"),
        )
        return [
            cmd(*self._walg(inv, "backup-fetch", target_dir, name), user=OS_USER, timeout=FETCH_TIMEOUT,
                description=f"wal-g: fetch backup {name} into {target_dir}"),
            configure,
        ]

    def ha_restore_commands(self, inv: Inventory, backup: str | None) -> tuple[str, str]:
        """stolon's pitrConfig: the keeper runs the fetch into `%d` with `/bin/sh -c` and its
        PostgreSQL the wal-fetch, both as postgres, reading the credentials from the config file
        as every other wal-g call does."""
        _store(inv)
        name = "LATEST" if backup is None else backup
        try:
            self.validate_backup_name(name)
        except BackupInputError as exc:
            raise BackupInputError(f"backup: {exc}") from None
        # The keeper waits for a fetch without a limit; after a failed one it empties the
        # directory and tries again.
        data = " ".join(["/usr/bin/timeout", f"{FETCH_TIMEOUT:g}", *self._walg(inv, "backup-fetch", '"%d"', name)])
        # No `timeout` wrapper, as in restore_commands: its exit 124 would end recovery early.
        wal = " ".join(self._walg(inv, "wal-fetch", '"%f"', '"%p"'))
        return data, wal

    def clone_source_files(self, source: Inventory, secrets: StoreSecrets) -> list[ManagedFile]:
        # The files are named after the cluster, so the source's sit beside the clone's own. Fetch
        # only: no database login, so the host is given as a restore host would be.
        reader = HostSpec(name="clone-source", address=source.hosts[0].address, roles=[])
        return self.host_files(source, reader, secrets)

    def clone_restore_commands(self, source: Inventory, target_dir: str, backup: str | None,
                               target_time: datetime | None) -> list[Command]:
        return self.restore_commands(source, target_dir, backup, target_time, archive=False)

    def retire_repository_commands(self, inv: Inventory) -> list[Command]:
        # `delete everything FORCE` also takes backups that permanent marks would keep.
        return [cmd(*self._walg(inv, "delete", "everything", "FORCE", "--confirm"), user=OS_USER, timeout=1800,
                    description=f"wal-g: delete everything under {self.s3_prefix(inv)}")]

    def verify_archive_command(self, inv: Inventory, *, db_secrets: DbSecrets | None = None) -> Command:
        """wal-verify only reads the repository: on an idle primary whose archive_command broke it
        would still say OK. So first a WAL switch, and a wait until PostgreSQL reports that segment
        archived (as pgBackRest's `check` does); then wal-verify, which exits 0 whatever it finds."""
        login = self.local_login(inv, db_secrets)
        if login.password_missing:
            raise BackupInputError(f"cluster {inv.cluster.name}: the archive check logs in as the superuser under "
                                   "stolon and needs the database credentials")
        env = {"PGUSER": login.user, **({"PGPASSFILE": login.passfile} if login.passfile else {})}
        return script(
            'psql=(psql -XAtq -h "$1" -p "$2" -d postgres)\n'
            'segment=$("${psql[@]}" -c "select pg_walfile_name(pg_switch_wal())") || exit 3\n'
            'deadline=$((SECONDS + $3))\n'
            'until [ "$("${psql[@]}" -c "select coalesce(substr(last_archived_wal, 9), \'\') >= substr(\'$segment\', 9) '
            'from pg_stat_archiver")" = t ]; do\n'
            '  [ "$SECONDS" -lt "$deadline" ] || { echo "segment $segment not archived within $3 s" >&2; exit %d; }\n'
            '  sleep 0.5\n'
            'done\n'
            'exec "$4" --config "$5" wal-verify integrity timeline --json' % ARCHIVE_WAIT_EXIT,
            args=[self.socket_dir(inv), str(inv.cluster.postgres.port), str(int(ARCHIVE_WAIT_S)), self.binary,
                  self.config_path(inv)],
            env=env, user=OS_USER, timeout=VERIFY_TIMEOUT + ARCHIVE_WAIT_S,
            description="wal-g: a WAL switch archived, then verify WAL archive integrity and timeline",
        )

    def parse_verify(self, result: CommandResult) -> ArchiveCheck:
        if result.exit_code == ARCHIVE_WAIT_EXIT:
            # archive_command does not get the segment out: an answer about the archive, not a failed check.
            return ArchiveCheck(status="FAILURE", detail=_tail(result) or "the switched WAL segment was not archived")
        if result.exit_code != 0:
            raise BackupOutputError(f"wal-g wal-verify failed (exit {result.exit_code}): {_tail(result)}")
        data = _load_json(result.stdout, "wal-g wal-verify --json")
        if not isinstance(data, dict):
            raise BackupOutputError(f"wal-g wal-verify --json: expected a JSON object, got {type(data).__name__}")
        integrity = _check_section(data, "integrity")
        timeline = _check_section(data, "timeline")

        segments = integrity.get("details")
        if segments is None:  # WAL-G marshals an empty scan as null
            segments = []
        if not isinstance(segments, list):
            raise BackupOutputError("wal-g wal-verify: integrity.details is not a list")
        lost: list[str] = []
        gaps: dict[str, int] = {}
        for index, row in enumerate(segments):
            status, start, end = _segment_row(index, row)
            if status == "FOUND":
                continue
            gaps[status] = gaps.get(status, 0) + 1
            if status == "MISSING_LOST":
                lost.append(start if start == end else f"{start}..{end}")

        status = max(integrity["status"], timeline["status"], key=_STATUS_RANK.__getitem__)
        parts = [f"integrity {integrity['status']}"]
        if gaps:
            parts[0] += " (" + ", ".join(f"{count} {kind} range(s)" for kind, count in sorted(gaps.items())) + ")"
        if lost:
            parts.append("lost: " + ", ".join(lost))
        parts.append(f"timeline {timeline['status']}" + _timeline_detail(timeline.get("details")))
        return ArchiveCheck(status=status, detail="; ".join(parts), missing_segments=tuple(lost))

    def validate_backup_name(self, name: str) -> None:
        if name == "LATEST" or _BACKUP_NAME.fullmatch(name):
            return
        raise BackupInputError(
            f"{name!r} is not a WAL-G backup name (expected LATEST or base_<24 hex>[_D_<24 hex>], "
            "e.g. base_000000010000000000000004)"
        )


# ---------------------------------------------------------------------- recovery script

# $1 = data directory, $2.. = postgresql.auto.conf lines. Values arrive as arguments, so nothing
# in them (quotes, %f/%p) is ever interpreted by this shell.
_CONFIGURE_RECOVERY = r"""
dir=$1; shift
if [ ! -f "$dir/PG_VERSION" ]; then
    echo "$dir: no PG_VERSION; backup-fetch did not leave a data directory here" >&2
    exit 1
fi
conf="$dir/postgresql.auto.conf"
# stolon links postgresql.auto.conf to /dev/null: settings written through the link would vanish.
if [ -L "$conf" ]; then rm -f -- "$conf"; fi
# Appended: the last occurrence of a setting wins, so a rerun ends in the same configuration.
printf '%s\n' "$@" >> "$conf"
# A backup taken on a standby may carry standby.signal, which outranks recovery.signal and would
# never promote.
rm -f -- "$dir/standby.signal"
: > "$dir/recovery.signal"
# PostgreSQL refuses to start on a group/world-accessible data directory.
chmod 0700 "$dir"
"""


# ---------------------------------------------------------------------- helpers


def _store(inv: Inventory) -> ObjectStoreSpec:
    if inv.cluster.object_store is None:
        raise BackupInputError(f"cluster.object_store: cluster {inv.cluster.name!r} has none; WAL-G needs one")
    return inv.cluster.object_store


# Characters a pgpass field cannot carry (the file is line based; pgx trims each line) and, for
# the user name, the separator and escape characters that pgx v3.6.0 unescapes in the wrong order.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _check_login(db_secrets: DbSecrets) -> None:
    # Messages name the field, never the value.
    user, password = db_secrets.superuser, db_secrets.superuser_password
    if not user or _CONTROL.search(user) or user != user.strip() or ":" in user or "\\" in user:
        raise BackupInputError(
            "db_secrets.superuser: must be a non-empty role name without whitespace at the ends, control "
            "characters, ':' or '\\' (WAL-G reads it from a pgpass file)"
        )
    if not password:
        raise BackupInputError("db_secrets.superuser_password: empty; stolon's socket login needs a password")
    if _CONTROL.search(password):
        raise BackupInputError("db_secrets.superuser_password: contains a line break or control character, "
                               "which a pgpass file cannot hold")
    if password != password.strip():
        raise BackupInputError("db_secrets.superuser_password: starts or ends with whitespace, which WAL-G's "
                               "pgpass reader strips")


def _pgpass(port: int, user: str, password: str) -> str:
    """One pgpass line for the local socket: pgx matches a socket as host `localhost`, libpq as the
    socket directory; `*` covers both. `\\` and `:` in the password are escaped."""
    escaped = password.replace("\\", "\\\\").replace(":", "\\:")
    return (
        "# Managed by bouwsteen: the superuser login of WAL-G's backup-push and wal-verify (PGPASSFILE).\n"
        f"*:{port}:{LOGIN_DATABASE}:{user}:{escaped}\n"
    )


def _check_keep_full(keep_full: int) -> None:
    if isinstance(keep_full, bool) or not isinstance(keep_full, int) or keep_full < 1:
        raise BackupInputError(f"keep_full must be an integer >= 1 (WAL-G would delete every backup), got {keep_full!r}")


def _tail(result: CommandResult, lines: int = 5) -> str:
    text = (result.stderr.strip() or result.stdout.strip())
    return " | ".join(text.splitlines()[-lines:]) or "(no output)"


def _load_json(text: str, what: str) -> Any:
    stripped = text.strip()
    if not stripped:
        raise BackupOutputError(f"{what}: empty output (expected JSON)")
    try:
        return json.loads(stripped)
    except json.JSONDecodeError:
        pass
    # Some wrappers let a log line reach stdout before the document; start at the first one that
    # opens a JSON value, and still require the rest to parse completely.
    lines = stripped.splitlines()
    for index, line in enumerate(lines):
        if line.lstrip().startswith(("[", "{")):
            try:
                return json.loads("\n".join(lines[index:]))
            except json.JSONDecodeError as exc:
                raise BackupOutputError(f"{what}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    raise BackupOutputError(f"{what}: not JSON: {stripped.splitlines()[0][:200]!r}")


def _lsn(value: Any, field: str, where: str) -> str | None:
    """WAL-G prints LSNs as JSON numbers; PostgreSQL writes them as two 32-bit hex halves."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value >= 1 << 64:
        raise BackupOutputError(f"{where}: {field} is not an LSN number: {value!r}")
    if value == 0:  # what WAL-G prints when the metadata has no LSN
        return None
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def _time(value: Any, field: str, where: str) -> datetime:
    if not isinstance(value, str):
        raise BackupOutputError(f"{where}: {field} is not a timestamp string: {value!r}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise BackupOutputError(f"{where}: {field} is not an ISO 8601 timestamp: {value!r}") from None
    if parsed.tzinfo is None:
        raise BackupOutputError(f"{where}: {field} has no time zone: {value!r}")
    return parsed


def _size(value: Any, field: str, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BackupOutputError(f"{where}: {field} is not a byte count: {value!r}")
    return value


def _backup_info(index: int, item: Any) -> BackupInfo:
    where = f"wal-g backup-list element {index}"
    if not isinstance(item, dict):
        raise BackupOutputError(f"{where}: expected a JSON object, got {type(item).__name__}")
    missing = [key for key in ("backup_name", "start_time", "finish_time") if key not in item]
    if missing:
        hint = " (was --detail passed?)" if "backup_name" in item else ""
        raise BackupOutputError(f"{where}: missing {', '.join(missing)}{hint}")
    name = item["backup_name"]
    if not isinstance(name, str) or not name:
        raise BackupOutputError(f"{where}: backup_name is not a name: {name!r}")
    where = f"wal-g backup-list {name}"
    start = _time(item["start_time"], "start_time", where)
    finish = _time(item["finish_time"], "finish_time", where)
    if start.year == 1 and "time" in item:
        # Go's zero time: the backup has no extended metadata (very old WAL-G); the sentinel's
        # storage mtime is the best remaining clue to when it finished.
        start = finish = _time(item["time"], "time", where)

    user_data = item.get("user_data")
    source = user_data.get("source_host") if isinstance(user_data, dict) else None
    if not isinstance(source, str) or not source:
        hostname = item.get("hostname")
        source = hostname if isinstance(hostname, str) and hostname else None
    wal = item.get("wal_file_name")
    return BackupInfo(
        name=name,
        kind="delta" if "_D_" in name else "full",
        start_time=start,
        finish_time=finish,
        start_lsn=_lsn(item.get("start_lsn"), "start_lsn", where),
        finish_lsn=_lsn(item.get("finish_lsn"), "finish_lsn", where),
        start_wal=wal if isinstance(wal, str) and wal else None,
        database_bytes=_size(item.get("uncompressed_size"), "uncompressed_size", where),
        stored_bytes=_size(item.get("compressed_size"), "compressed_size", where),
        source_host=source,
    )


def _check_section(data: dict[str, Any], key: str) -> dict[str, Any]:
    section = data.get(key)
    if not isinstance(section, dict):
        raise BackupOutputError(f"wal-g wal-verify: no {key} check in the output (was it requested?)")
    status = section.get("status")
    if status not in _STATUS_RANK:
        raise BackupOutputError(f"wal-g wal-verify: {key}.status is {status!r}, not OK/WARNING/FAILURE")
    return section


def _segment_row(index: int, row: Any) -> tuple[str, str, str]:
    where = f"wal-g wal-verify integrity.details[{index}]"
    if not isinstance(row, dict):
        raise BackupOutputError(f"{where}: expected a JSON object")
    status, start, end = row.get("status"), row.get("start_segment"), row.get("end_segment")
    if status not in _SEGMENT_STATUSES:
        raise BackupOutputError(f"{where}: unknown segment status {status!r}")
    if not isinstance(start, str) or not isinstance(end, str) or not start or not end:
        raise BackupOutputError(f"{where}: start_segment/end_segment missing")
    return status, start, end


def _timeline_detail(details: Any) -> str:
    if not isinstance(details, dict):
        return ""
    current = details.get("current_timeline_id")
    highest = details.get("highest_storage_timeline_id")
    if current is None and highest is None:
        return ""
    return f" (cluster timeline {current}, highest in storage {highest})"


def _pg_setting(name: str, value: str) -> str:
    """One postgresql.conf line; single quotes inside the value are doubled, as PostgreSQL expects."""
    return f"{name} = '" + value.replace("'", "''") + "'"


def _pg_timestamp(value: datetime) -> str:
    if value.tzinfo is None or value.utcoffset() is None:
        raise BackupInputError(
            f"recovery target time {value.isoformat()} has no time zone; PostgreSQL would read it in the server's"
        )
    return value.astimezone(timezone.utc).isoformat(sep=" ")
