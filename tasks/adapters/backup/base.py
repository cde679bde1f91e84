"""The backup driver interface: files, commands and output parsers, no I/O.

pgBackRest (lab) and WAL-G (production) implement it; flows run the same code path for both.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from blocks.inventory import HostSpec, Inventory
from tasks.adapters.commands import Command, CommandResult, ManagedFile
from tasks.adapters.ha.base import DbSecrets
from tasks.errors import BouwsteenError


class BackupOutputError(BouwsteenError):
    """A backup tool's output could not be parsed; never read as 'no backups' or 'archive OK'."""


class BackupInputError(BouwsteenError, ValueError):
    """A backup name, target or setting the tool would reject; the message names it."""


@dataclass(frozen=True)
class StoreSecrets:
    access_key_id: str
    secret_access_key: str
    ca_certificate: str  # PEM of the CA that signed the object store's certificate
    # pgBackRest repository encryption; None = unencrypted repository.
    cipher_pass: str | None = None


# What scheduled_basebackup asks a driver for; BackupInfo.kind reports what the tool made.
BackupKind = Literal["full", "incr"]
BACKUP_KINDS: tuple[BackupKind, ...] = ("full", "incr")


@dataclass(frozen=True)
class BackupInfo:
    name: str
    kind: Literal["full", "diff", "incr", "delta"]
    start_time: datetime
    finish_time: datetime
    start_lsn: str | None = None
    finish_lsn: str | None = None
    start_wal: str | None = None
    stop_wal: str | None = None
    database_bytes: int | None = None  # size of the database as backed up
    stored_bytes: int | None = None  # size in the repository (compressed)
    source_host: str | None = None
    # pgBackRest flags backups with page checksum errors; WAL-G has no such flag.
    error: bool = False

    @property
    def duration_seconds(self) -> float:
        return (self.finish_time - self.start_time).total_seconds()


@dataclass(frozen=True)
class ArchiveCheck:
    """is_archive_intact's answer: `ok` (the archive is intact) follows from the tool's status."""

    ok: bool = field(init=False)  # status == "OK"; a WARNING is not intact
    status: Literal["OK", "WARNING", "FAILURE"]
    detail: str
    missing_segments: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "ok", self.status == "OK")

    def __bool__(self) -> bool:
        return self.ok


class BackupDriver(ABC):
    name: str
    # pgBackRest backs a standby up by asking the primary over SSH (as postgres) to start/stop it.
    needs_peer_ssh: bool = False
    # restore_commands into a directory that holds an earlier copy of the cluster keeps the files
    # whose checksums match (pgBackRest's delta): a repeated drill copies only what changed.
    # WAL-G's backup-fetch wants an empty directory.
    restores_by_delta: bool = False

    @abstractmethod
    def packages(self, inv: Inventory) -> list[str]:
        """OS packages a database or restore host needs for this backup tool."""

    @abstractmethod
    def host_files(self, inv: Inventory, host: HostSpec, secrets: StoreSecrets, *,
                   db_secrets: DbSecrets | None = None) -> list[ManagedFile]:
        """Config, env and wrapper files on a database or restore host (secrets in 0600/0640 files).
        `db_secrets`: on a database host, the login the tool needs where the HA manager asks for a
        password on the local socket (stolon); a restore host fetches only and gets none."""

    @abstractmethod
    def archive_parameters(self, inv: Inventory) -> dict[str, str]:
        """PostgreSQL parameters that turn WAL archiving on (handed to the HA driver)."""

    @abstractmethod
    def init_repository_commands(self, inv: Inventory) -> list[Command]:
        """Idempotent repository setup, run on the primary once archiving is configured."""

    @abstractmethod
    def backup_command(self, inv: Inventory, source: HostSpec, primary: HostSpec,
                       kind: BackupKind = "full", processes: int | None = None) -> Command:
        """A base backup, run on `source` (a streaming standby, or the primary itself): "full", or
        "incr", only what changed since the last backup (pgBackRest incremental with block
        incremental; WAL-G a delta). Restoring one replays its chain back to its full.
        `processes`: parallel copy streams (pgBackRest process-max, WAL-G upload concurrency);
        None keeps the configuration's."""

    @abstractmethod
    def list_command(self, inv: Inventory) -> Command:
        ...

    def progress_command(self, inv: Inventory) -> Command | None:
        """Read-only, on the host running backup_command: how far the running backup has got;
        None where the tool reports no progress of its own (WAL-G)."""
        return None

    def parse_progress(self, result: CommandResult) -> tuple[int, int] | None:
        """(bytes done, bytes in all) from progress_command's answer; None when no backup runs."""
        return None

    @abstractmethod
    def release_command(self) -> Command:
        """The installed tool's own release, on any host (exit 127: the tool is not there)."""

    @abstractmethod
    def parse_release(self, result: CommandResult) -> str | None:
        """"2.55.1" from release_command's answer; None where the tool is not installed."""

    @abstractmethod
    def parse_list(self, result: CommandResult) -> list[BackupInfo]:
        """Backups oldest first. Raise BackupOutputError on output that is not a backup list."""

    @abstractmethod
    def retention_commands(self, inv: Inventory, keep_full: int) -> list[Command]:
        """Delete full backups beyond the newest `keep_full` (and the WAL only they need)."""

    @abstractmethod
    def restore_commands(
        self,
        inv: Inventory,
        target_dir: str,
        backup: str | None,
        target_time: datetime | None,
        *,
        archive: bool = False,
    ) -> list[Command]:
        """Fetch a backup into `target_dir` (empty, owned by postgres) and configure recovery to
        `target_time` (None = end of the archive), promoting when reached. `archive=False` (a
        drill): the restored instance never archives into the cluster's bucket. True (the cluster
        restored in place): it archives its new timeline, as the cluster's primary does."""

    def ha_restore_commands(self, inv: Inventory, backup: str | None) -> tuple[str, str]:
        """For an HA manager that restores itself (stolon's pitr): (the command that fetches
        `backup` (None: the newest) into `%d`, the data directory; the restore_command that
        fetches WAL segment `%f` to `%p`). One line each, run by the HA manager as postgres."""
        raise NotImplementedError(f"{type(self).__name__} has no restore commands for an HA manager")

    @abstractmethod
    def clone_source_files(self, source: Inventory, secrets: StoreSecrets) -> list[ManagedFile]:
        """On a clone's restoring host: read access to `source`'s repository (`secrets`: the
        source's restore key), in files of their own beside the clone's own configuration."""

    @abstractmethod
    def clone_restore_commands(self, source: Inventory, target_dir: str, backup: str | None,
                               target_time: datetime | None) -> list[Command]:
        """Fetch `source`'s backup into `target_dir` and recover from `source`'s archive through
        clone_source_files; the copy never archives (into the source least of all) until the
        clone's HA manager starts it with the clone's own archive_command."""

    @abstractmethod
    def retire_repository_commands(self, inv: Inventory) -> list[Command]:
        """Before a clone replaces the cluster's data: its repository emptied (backups and WAL of the
        data being replaced). A clone's new timeline has the number an earlier clone's had, and both
        tools refuse to archive a segment over another of that name; init_repository_commands starts
        the repository afresh afterwards. Run on a member with the cluster's HA units stopped."""

    @abstractmethod
    def verify_archive_command(self, inv: Inventory, *, db_secrets: DbSecrets | None = None) -> Command:
        """Proves archiving works now (a WAL switch whose segment reaches the repository) and checks
        the archive's continuity; run on the primary. `db_secrets`: the login where the HA manager
        asks the socket for a password."""

    @abstractmethod
    def parse_verify(self, result: CommandResult) -> ArchiveCheck:
        ...

    def validate_backup_name(self, name: str) -> None:
        """Raise BackupInputError when `name` cannot be a backup of this tool."""
