"""pgBackRest as the backup driver: the one the lab runs, against S3 over TLS."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone

from blocks.inventory import HostSpec, Inventory
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

CONFIG_PATH = "/etc/pgbackrest/pgbackrest.conf"
CA_PATH = "/etc/pgbackrest/object-store-ca.crt"
SPOOL = "/var/spool/pgbackrest"
NAME_PATTERN = re.compile(r"^\d{8}-\d{6}F(_\d{8}-\d{6}[DI])?$")
_KIND = {"full": "full", "diff": "diff", "incr": "incr"}


def _processes(processes: int) -> int:
    if isinstance(processes, bool) or not isinstance(processes, int) or not 1 <= processes <= 64:
        raise BackupInputError(f"processes: must be an integer from 1 to 64, got {processes!r}")
    return processes


def pgbackrest(inv: Inventory, *args: str, timeout: float = 300) -> Command:
    return cmd("pgbackrest", f"--stanza={inv.cluster.name}", *args, timeout=timeout, user="postgres")


class PgBackRestDriver(BackupDriver):
    name = "pgbackrest"
    needs_peer_ssh = True
    restores_by_delta = True  # delta=y in the configuration

    def packages(self, inv: Inventory) -> list[str]:
        return ["pgbackrest"]

    def repo_path(self, inv: Inventory) -> str:
        # One repository per cluster and major version, like WAL-G's prefix rule.
        return f"/{inv.cluster.name}/pg{inv.cluster.postgres.version}"

    def render_config(self, inv: Inventory, secrets: StoreSecrets, *, ca_path: str = CA_PATH) -> str:
        store = inv.cluster.object_store
        if store is None:
            raise BackupInputError("cluster.object_store: not set; pgBackRest needs the S3 endpoint")
        pg = inv.cluster.postgres
        lines = [
            "# Managed by bouwsteen; local edits are overwritten.",
            "[global]",
            "repo1-type=s3",
            f"repo1-path={self.repo_path(inv)}",
            f"repo1-s3-bucket={store.bucket}",
            f"repo1-s3-endpoint={store.endpoint_host}",
            f"repo1-storage-port={store.endpoint_port}",
            f"repo1-s3-region={store.region}",
            "repo1-s3-uri-style=path",
            f"repo1-s3-key={secrets.access_key_id}",
            f"repo1-s3-key-secret={secrets.secret_access_key}",
            f"repo1-storage-ca-file={ca_path}",
            f"repo1-retention-full={inv.cluster.backup_retention_full}",
            "repo1-retention-full-type=count",
            # Small files (most of a cluster's 1,000+) go into bundles: one object-store request per
            # bundle instead of one per file; restores fetch fewer objects too.
            "repo1-bundle=y",
            # Block incremental (2.46+, needs bundling): an incremental stores the changed blocks of
            # a changed file, not the whole file again, so a night's backup follows the change.
            "repo1-block=y",
        ]
        if secrets.cipher_pass:
            lines += ["repo1-cipher-type=aes-256-cbc", f"repo1-cipher-pass={secrets.cipher_pass}"]
        lines += [
            # Fail within seconds when the object store is down (the default waits for minutes,
            # and Patroni runs archive_command synchronously before recovering a crashed primary).
            "io-timeout=10",
            "process-max=2",
            # zstd level 1 over lz4: a 1 GiB cluster's largest file (one process) copies in ~1.2 s
            # instead of ~1.7 s here, and the repository holds ~2.5× less (lab, pgBackRest 2.55.1).
            "compress-type=zst",
            "compress-level=1",
            "start-fast=y",
            "delta=y",
            "log-level-console=warn",
            "log-level-file=detail",
            f"spool-path={SPOOL}",
            "",
            f"[{inv.cluster.name}]",
            f"pg1-path={pgdata(inv)}",
            f"pg1-port={pg.port}",
            "pg1-socket-path=/var/run/postgresql",
            "",
        ]
        return "\n".join(lines)

    def host_files(self, inv: Inventory, host: HostSpec, secrets: StoreSecrets, *,
                   db_secrets: DbSecrets | None = None) -> list[ManagedFile]:
        # pgBackRest logs in over the socket as postgres (peer); it needs no database password.
        return [
            ManagedFile(CA_PATH, secrets.ca_certificate, owner="root", mode=0o644),
            ManagedFile(CONFIG_PATH, self.render_config(inv, secrets), owner="postgres", group="postgres",
                        mode=0o600, secret=True),
        ]

    def archive_parameters(self, inv: Inventory) -> dict[str, str]:
        return {
            "archive_mode": "on",
            # The timeout bounds a hung object store; PostgreSQL keeps the segment and retries. It
            # is short because a primary cut off from the network runs the archiver's last round at
            # shutdown: with 60 s the HA manager's demotion took two minutes, with 15 s it takes
            # well under one (a segment still needs ≥ 1.1 MB/s to the object store).
            "archive_command": f"/usr/bin/timeout 15 pgbackrest --stanza={inv.cluster.name} archive-push %p",
            "archive_timeout": "60",
        }

    def init_repository_commands(self, inv: Inventory) -> list[Command]:
        # stanza-create is idempotent: it succeeds when the stanza exists and matches this cluster.
        return [pgbackrest(inv, "stanza-create", timeout=120)]

    def backup_command(self, inv: Inventory, source: HostSpec, primary: HostSpec,
                       kind: BackupKind = "full", processes: int | None = None) -> Command:
        pg = inv.cluster.postgres
        if kind not in BACKUP_KINDS:
            raise BackupInputError(f"kind: {kind!r} is not one of {', '.join(BACKUP_KINDS)}")
        # The annotation records where the backup was taken; `info` shows it back.
        annotation = f"--annotation=source_host={source.name}"
        parallel = [f"--process-max={_processes(processes)}"] if processes is not None else []
        if source.name == primary.name:
            return pgbackrest(inv, annotation, *parallel, f"--type={kind}", "backup", timeout=6 * 3600)
        # From a standby: pgBackRest reads the files from the local standby (pg2) and only asks the
        # primary (pg1, over SSH as postgres) to start and stop the backup, on the port the
        # hosts' sshd listens on (postgres's known_hosts names the host on that port).
        ssh_port = primary.ssh_port or inv.ssh.port
        return pgbackrest(
            inv,
            "--backup-standby",
            f"--pg1-host={primary.address}",
            "--pg1-host-user=postgres",
            *([f"--pg1-host-port={ssh_port}"] if ssh_port != 22 else []),
            f"--pg1-path={pgdata(inv)}",
            f"--pg1-port={pg.port}",
            f"--pg2-path={pgdata(inv)}",
            f"--pg2-port={pg.port}",
            "--pg2-socket-path=/var/run/postgresql",
            annotation,
            *parallel,
            f"--type={kind}",
            "backup",
            timeout=6 * 3600,
        )

    def progress_command(self, inv: Inventory) -> Command | None:
        # The running backup's lock shows in `info` (2.55.1 in the lab; `--detail-level=progress`,
        # which would skip the rest, came later).
        return pgbackrest(inv, "--output=json", "info", timeout=30)

    def parse_progress(self, result: CommandResult) -> tuple[int, int] | None:
        # The running backup's lock carries its size and the part done (`size`, `size-cplt`).
        try:
            lock = json.loads(result.stdout)[0]["status"]["lock"]["backup"]
            if lock.get("held") and lock.get("size"):
                return int(lock.get("size-cplt") or 0), int(lock["size"])
        except (ValueError, LookupError, TypeError, AttributeError):
            pass
        return None

    def release_command(self) -> Command:
        return cmd("pgbackrest", "version", timeout=30, ok_codes=(0, 127), description="pgbackrest version")

    def parse_release(self, result: CommandResult) -> str | None:
        # "pgBackRest 2.55.1"; hosts and the repository must agree on it (the protocol refuses a mix).
        match = re.fullmatch(r"pgBackRest (\S+)", result.stdout.strip()) if result.exit_code == 0 else None
        return match.group(1) if match else None

    def list_command(self, inv: Inventory) -> Command:
        return pgbackrest(inv, "--output=json", "info", timeout=120)

    def parse_list(self, result: CommandResult) -> list[BackupInfo]:
        if result.exit_code != 0:
            raise BackupOutputError(f"pgbackrest info failed ({result.exit_code}): {result.stderr.strip()[-300:]}")
        try:
            stanzas = json.loads(result.stdout)
        except json.JSONDecodeError as exc:
            raise BackupOutputError(f"pgbackrest info printed no JSON: {exc}") from None
        if not isinstance(stanzas, list) or not stanzas:
            raise BackupOutputError("pgbackrest info: expected a list with one stanza")
        stanza = stanzas[0]
        status = stanza.get("status", {})
        # code 2 = "no valid backups": an empty list, not an error.
        if status.get("code") not in (0, 2):
            raise BackupOutputError(f"pgbackrest info: stanza status {status.get('code')}: {status.get('message')}")
        backups = []
        for item in stanza.get("backup", []):
            try:
                timestamp = item["timestamp"]
                archive = item.get("archive") or {}
                info = item.get("info") or {}
                lsn = item.get("lsn") or {}
                repo = info.get("repository") or {}
                backups.append(
                    BackupInfo(
                        name=item["label"],
                        kind=_KIND.get(item["type"], "full"),
                        start_time=datetime.fromtimestamp(timestamp["start"], tz=timezone.utc),
                        finish_time=datetime.fromtimestamp(timestamp["stop"], tz=timezone.utc),
                        start_lsn=lsn.get("start"),
                        finish_lsn=lsn.get("stop"),
                        start_wal=archive.get("start"),
                        stop_wal=archive.get("stop"),
                        database_bytes=info.get("size"),
                        stored_bytes=repo.get("delta") or repo.get("size"),
                        source_host=(item.get("annotation") or {}).get("source_host"),
                        error=bool(item.get("error", False)),
                    )
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise BackupOutputError(f"pgbackrest info: backup entry without {exc}") from None
        return sorted(backups, key=lambda b: b.start_time)

    def retention_commands(self, inv: Inventory, keep_full: int) -> list[Command]:
        if isinstance(keep_full, bool) or not isinstance(keep_full, int) or keep_full < 1:
            raise BackupInputError(f"keep_full: must be an integer ≥ 1, got {keep_full!r}")
        return [pgbackrest(inv, f"--repo1-retention-full={keep_full}", "expire", timeout=1800)]

    def restore_commands(self, inv: Inventory, target_dir: str, backup: str | None, target_time: datetime | None,
                         *, archive: bool = False) -> list[Command]:
        if backup is not None:
            self.validate_backup_name(backup)
        if not target_dir.startswith("/"):
            raise BackupInputError(f"target_dir: must be absolute, got {target_dir!r}")
        # preserve (the default) keeps the backed-up archive_mode: the cluster's own, which archives.
        args = [f"--pg1-path={target_dir}", "--archive-mode=preserve" if archive else "--archive-mode=off"]
        if backup:
            args.append(f"--set={backup}")
        if target_time is not None:
            if target_time.tzinfo is None:
                raise BackupInputError("target_time: needs a time zone")
            args += [
                "--type=time",
                f"--target={target_time.astimezone(timezone.utc).strftime('%Y-%m-%d %H:%M:%S.%f+00')}",
                "--target-action=promote",
            ]
        else:
            args += ["--type=default"]
        return [pgbackrest(inv, *args, "restore", timeout=6 * 3600)]

    def ha_restore_commands(self, inv: Inventory, backup: str | None) -> tuple[str, str]:
        """stolon's pitrConfig: the keeper runs the restore into `%d` with `/bin/sh -c` and its
        PostgreSQL the archive-get, both as postgres, with the credentials in pgbackrest.conf."""
        if backup is not None:
            self.validate_backup_name(backup)
        # --type=none: pgBackRest writes no recovery settings and no recovery.signal (and comments
        # out old recovery targets in postgresql.auto.conf); the keeper writes its own. Its warning
        # against `none` (no new timeline) does not apply: the keeper recovers from the archive and
        # promotes. No --archive-mode=off: this is the cluster itself, which must archive again.
        data = (f"/usr/bin/timeout {6 * 3600} pgbackrest --stanza={inv.cluster.name} --pg1-path=\"%d\""
                + (f" --set={backup}" if backup is not None else "") + " --type=none restore")
        # No `timeout` wrapper: its exit 124 would read as "no such segment" and end recovery early.
        return data, f"pgbackrest --stanza={inv.cluster.name} archive-get %f \"%p\""

    def clone_config_path(self, source: Inventory) -> str:
        return f"/etc/pgbackrest/clone-source-{source.cluster.name}.conf"

    def clone_source_files(self, source: Inventory, secrets: StoreSecrets) -> list[ManagedFile]:
        ca = f"/etc/pgbackrest/clone-source-{source.cluster.name}-ca.crt"
        return [
            ManagedFile(ca, secrets.ca_certificate, owner="root", mode=0o644),
            ManagedFile(self.clone_config_path(source), self.render_config(source, secrets, ca_path=ca),
                        owner="postgres", group="postgres", mode=0o600, secret=True),
        ]

    def clone_restore_commands(self, source: Inventory, target_dir: str, backup: str | None,
                               target_time: datetime | None) -> list[Command]:
        config = f"--config={self.clone_config_path(source)}"
        [restore] = self.restore_commands(source, target_dir, backup, target_time, archive=False)
        # The recovery's archive-get must read the source's repository too: pgBackRest would
        # otherwise write a restore_command with the host's default configuration, the clone's.
        fetch_wal = f'pgbackrest {config} --stanza={source.cluster.name} archive-get %f "%p"'
        argv = [restore.argv[0], config, *restore.argv[1:-1], f"--recovery-option=restore_command={fetch_wal}",
                restore.argv[-1]]
        return [cmd(*argv, timeout=restore.timeout, user="postgres",
                    description=f"pgbackrest: restore {source.cluster.name}'s backup {backup or '(latest)'} into {target_dir}")]

    def retire_repository_commands(self, inv: Inventory) -> list[Command]:
        # stanza-delete wants the stanza stopped first; --force: PostgreSQL's state is not asked
        # (it is down, or not yet there). A stanza that is not there is deleted without complaint.
        return [script('pgbackrest --stanza="$1" stop && pgbackrest --stanza="$1" --force stanza-delete; '
                       'rc=$?; pgbackrest --stanza="$1" start; exit $rc',
                       args=[inv.cluster.name], user="postgres", timeout=1800,
                       description=f"pgbackrest: delete stanza {inv.cluster.name} (its backups and WAL)")]

    def verify_archive_command(self, inv: Inventory, *, db_secrets: DbSecrets | None = None) -> Command:
        # `check` forces a WAL switch and waits until that segment is in the repository (archiving
        # works now); `verify` walks the repository: every backup's files and the WAL ranges they need.
        return script(
            'pgbackrest --stanza="$1" check && pgbackrest --stanza="$1" --log-level-console=warn verify',
            args=[inv.cluster.name], user="postgres", timeout=1800, description="pgbackrest check && verify",
        )

    def parse_verify(self, result: CommandResult) -> ArchiveCheck:
        if result.exit_code == 0:
            return ArchiveCheck(status="OK", detail="pgbackrest check and verify: WAL archived, backups and WAL ranges intact")
        tail = (result.stderr or result.stdout).strip()[-500:]
        return ArchiveCheck(status="FAILURE", detail=f"pgbackrest check failed ({result.exit_code}): {tail}")

    def validate_backup_name(self, name: str) -> None:
        if not NAME_PATTERN.fullmatch(name):
            raise BackupInputError(
                f"backup: {name!r} is not a pgBackRest backup label (like 20261127-010000F)"
            )
