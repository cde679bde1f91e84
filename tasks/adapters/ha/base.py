"""The HA driver interface. A driver renders files and commands and parses their output; it
never does I/O itself, so the flows run the same code path whichever driver they drive, and a
driver with no binaries on this machine (stolon) is tested on recorded output.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from blocks.inventory import HostSpec, Inventory
from tasks.adapters.commands import Command, CommandResult, ManagedFile, Unit
from tasks.errors import BouwsteenError


class HaStatusError(BouwsteenError):
    """The HA manager's status could not be read or makes no sense (never treat as 'no primary')."""


class HaSpecError(BouwsteenError, ValueError):
    """A configuration value the HA manager would reject; the message names the field."""


@dataclass(frozen=True)
class DbSecrets:
    superuser: str
    superuser_password: str
    replication_user: str
    replication_password: str
    # Patroni's REST API write endpoints (switchover, restart) need it; stolon has no REST API.
    rest_api_password: str | None = None
    # The only roles a router may log in as (role names, not secrets): clients through HAProxy,
    # and the primary detector's probes.
    application_user: str = "app"
    monitor_user: str = "pgroute66"


@dataclass(frozen=True)
class Member:
    name: str  # inventory host name
    address: str
    role: Literal["primary", "replica", "unknown"]
    healthy: bool
    state: str = ""  # the HA manager's own word for it ("running", "streaming", "healthy", ...)
    timeline: int | None = None
    lag_bytes: int | None = None
    # The HA manager has recorded this standby as synchronous, so it may promote it without
    # losing a commit. pg_stat_replication says 'sync' a moment before the record is written.
    synchronous: bool = False
    # The HA manager's own flag that PostgreSQL runs with a value it must restart to take: beside
    # pg_settings.pending_restart, Patroni counts the parameters it passes on the postmaster's
    # command line (max_connections, ...), which pg_settings never marks.
    pending_restart: bool = False
    # Marked so that the HA manager neither promotes it nor chooses it as synchronous while it is
    # down for maintenance (Patroni's nofailover and nosync tags).
    drained: bool = False


@dataclass(frozen=True)
class ClusterView:
    initialized: bool
    members: tuple[Member, ...] = ()
    leader: str | None = None  # inventory host name of the primary, as the HA manager sees it
    # Driver-specific handles flows never interpret (e.g. stolon's master keeper uid).
    handles: dict[str, str] = field(default_factory=dict)

    @property
    def primaries(self) -> list[Member]:
        return [m for m in self.members if m.role == "primary"]

    @property
    def replicas(self) -> list[Member]:
        return [m for m in self.members if m.role == "replica"]

    def member(self, name: str) -> Member | None:
        return next((m for m in self.members if m.name == name), None)


@dataclass(frozen=True)
class HaSettings:
    """Cluster-wide settings changed at run time (not per host files)."""

    synchronous_replication: bool | None = None
    postgres_parameters: dict[str, str] = field(default_factory=dict)


class HaDriver(ABC):
    name: str
    # The HA manager promotes the standby a role change names. False: it elects one itself (stolon's
    # sentinel after `failkeeper`), so a runbook waits for any new primary, not the one it planned.
    targets_candidate: bool = True
    # Who restores the cluster in place (restore_cluster). False: bouwsteen, onto the primary's
    # data directory, and the HA manager then starts afresh from it (Patroni, once its state in
    # etcd is gone). True: the HA manager itself, from the backup tool's commands (stolon's
    # `initMode: pitr`), with `pitr_init_commands`.
    restores_itself: bool = False
    # The HA manager can be told to stop acting on its own (no automatic failover, no restarts of
    # a stopped PostgreSQL) while people work on the hosts: Patroni's pause. stolon has none: its
    # sentinel fails over a master whose keeper is unhealthy for failInterval, always.
    has_maintenance_mode: bool = False
    # The HA manager can be told at run time to leave one member out of promotion and of the
    # synchronous role (drain_commands).
    can_drain: bool = False
    # Files in the data directory where the HA manager keeps a copy of its cluster-wide state. A
    # restored copy carries the backed-up cluster's (a clone: another cluster's, archive_command
    # and all), so they go before the HA manager starts afresh from the inventory's.
    cached_state_files: tuple[str, ...] = ()

    @abstractmethod
    def packages(self, inv: Inventory) -> list[str]:
        """OS packages a database host needs for this HA manager."""

    def release_floors(self) -> list[tuple[str, str, str]]:
        """(tool, oldest safe release, why): releases below it have a known unsafe failover bug."""
        return []

    @abstractmethod
    def validate(self, inv: Inventory) -> None:
        """Raise HaSpecError naming the field when the inventory asks for something invalid."""

    @abstractmethod
    def etcd_prefix(self, inv: Inventory) -> str:
        """The etcd key prefix where this cluster's HA state lives."""

    @abstractmethod
    def host_files(
        self, inv: Inventory, host: HostSpec, secrets: DbSecrets, extra_parameters: dict[str, str]
    ) -> list[ManagedFile]:
        """Config, env and unit files for one database host. `extra_parameters` carries the
        backup driver's archive settings (the hook where archiving is configured)."""

    def tls_reloaded_commands(self, inv: Inventory, host: HostSpec) -> list[Command]:
        """Run on a database host after its units were reloaded for a new certificate: what makes
        sure every service of the HA manager presents it (empty: the reload is enough)."""
        return []

    def tls_files(self, inv: Inventory, host: HostSpec, ca) -> list[ManagedFile]:
        """With TLS on, the HA manager's own certificate files beside PostgreSQL's (pki's layout)."""
        return []

    @abstractmethod
    def host_units(self, inv: Inventory, host: HostSpec) -> list[Unit]:
        """systemd units to enable and keep running on a database host, in start order."""

    @abstractmethod
    def listeners(self, inv: Inventory) -> dict[int, frozenset[str]]:
        """Ports this HA manager listens on beside PostgreSQL's, with the process names `ss`
        shows for them: a host where someone else holds such a port is refused."""

    @abstractmethod
    def socket_dir(self, inv: Inventory) -> str:
        """Where PostgreSQL's Unix socket is on a database host under this HA manager."""

    @abstractmethod
    def socket_needs_password(self, inv: Inventory) -> bool:
        """Whether a local tool (a backup tool) logging in over the socket as the superuser must
        give a password: the HA manager writes pg_hba, so it decides."""

    @abstractmethod
    def pgdata(self, inv: Inventory) -> str:
        """The directory PostgreSQL runs on, on every database host (`pgdata.pgdata` asks this)."""

    @abstractmethod
    def rw_port(self, inv: Inventory) -> int:
        """The port on each database host that the routers' rw backend connects to (the primary
        detector decides which host is up)."""

    @abstractmethod
    def config_paths(self, inv: Inventory) -> list[str]:
        """Files whose presence on a host shows this HA manager was configured there (a host
        that has them may hold the cluster's state, even before the cluster answers)."""

    @abstractmethod
    def bootstrap_commands(self, inv: Inventory, secrets: DbSecrets, extra_parameters: dict[str, str]) -> list[Command]:
        """Run once on one database host to initialise the cluster (empty when the HA manager
        bootstraps itself). Only called when `parse_status` said the cluster is not initialised."""

    @abstractmethod
    def status_commands(self, inv: Inventory) -> list[Command]:
        """Commands run on one database host whose results `parse_status` reads, in order."""

    @abstractmethod
    def parse_status(self, inv: Inventory, results: list[CommandResult]) -> ClusterView:
        """Raise HaStatusError when the output is not a trustworthy status."""

    @abstractmethod
    def switchover_commands(self, inv: Inventory, view: ClusterView, candidate: str) -> list[Command]:
        """Planned role change to `candidate` (a replica host name)."""

    @abstractmethod
    def failover_commands(self, inv: Inventory, view: ClusterView, candidate: str) -> list[Command]:
        """Promote `candidate` when the primary is gone."""

    @abstractmethod
    def settings_commands(self, inv: Inventory, settings: HaSettings) -> list[Command]:
        """Apply cluster-wide settings through the HA manager (never by editing postgresql.conf)."""

    @abstractmethod
    def show_config_command(self, inv: Inventory) -> Command:
        """Run on a member: prints the cluster-wide settings the HA manager holds."""

    @abstractmethod
    def parse_config(self, result: CommandResult) -> dict:
        """The settings `show_config_command` printed; HaStatusError when it failed."""

    @abstractmethod
    def settings_drift(self, inv: Inventory, current: dict, extra_parameters: dict[str, str]) -> HaSettings:
        """What `settings_commands` must change so the HA manager's settings match the inventory
        (empty: nothing to do)."""

    @abstractmethod
    def membership_commands(self, inv: Inventory, extra_parameters: dict[str, str]) -> list[Command]:
        """Run on a member after the inventory's database hosts changed (a standby added or
        removed), so the HA manager admits exactly them. Empty where the per-host files already
        say it all (they are rewritten by the same runbook)."""

    @abstractmethod
    def reinit_commands(self, inv: Inventory, view: ClusterView, host: str) -> list[Command]:
        """Run on `host`, a standby (a former primary that pg_rewind could not bring back, too):
        wipe its data directory and clone it again from the primary through the HA manager."""

    @abstractmethod
    def member_removed_commands(self, inv: Inventory, host: str) -> list[Command]:
        """Run on the primary once `host`'s units are stopped: the HA manager forgets it."""

    def member_data_paths(self, inv: Inventory) -> list[str]:
        """What `remove_member(wipe=True)` deletes: everything that would make the host come back
        as its old self when it is added again."""
        return [self.pgdata(inv)]

    def member_slot(self, inv: Inventory, host: str) -> str | None:
        """The physical replication slot the primary keeps for `host` that the HA manager may
        retain after the member left (None: the HA manager drops it with the member)."""
        return None

    def slot_retention_commands(self, inv: Inventory, current: dict) -> tuple[list[Command], list[Command]]:
        """Run on the primary around the wait for a left member's slot to go, given the HA
        manager's settings (`parse_config`): commands that stop retaining slots of absent members,
        and the commands that restore the setting as it was."""
        return [], []

    @abstractmethod
    def restart_commands(self, inv: Inventory, host: str) -> list[Command]:
        """Run on `host`, a standby: PostgreSQL restarted through the HA manager, so it does not
        count the member as failed, and returns once PostgreSQL runs again (or fails)."""

    @abstractmethod
    def managed_parameters(self, inv: Inventory, extra_parameters: dict[str, str]) -> dict[str, str | None]:
        """PostgreSQL parameters (names in lower case) that the building block sets itself, with
        the value it sets (from the inventory, bouwsteen's defaults, archiving, TLS); None where
        the HA manager owns the parameter outright and no value may be given. change_settings
        refuses to set one of them to anything else: the next build_cluster would put it back."""

    def drain_commands(self, inv: Inventory, host: HostSpec, drained: bool) -> list[Command]:
        """Run on `host`, a standby: the HA manager told to leave it out of promotion and of the
        synchronous role (`drained`), or to count it in again. Only where `can_drain`; the caller
        waits until the status (`Member.drained`) shows it."""
        raise HaSpecError(f"{self.name} cannot drain a member at run time")

    def maintenance_commands(self, inv: Inventory, paused: bool) -> list[Command]:
        """Run on a database host: the HA manager's maintenance mode switched on (`paused`) or off,
        returning once every member has taken it (or failing). Only where `has_maintenance_mode`."""
        raise HaSpecError(f"{self.name} has no maintenance mode: automatic failover cannot be paused")

    def is_paused(self, config: dict) -> bool:
        """Whether the HA manager's settings (`parse_config`) say maintenance mode is on."""
        return False

    def restore_stopped_units(self, inv: Inventory, host: HostSpec) -> list[str]:
        """Units restore_cluster stops on every member before the restore, in start order (it
        stops them in reverse and starts them in this order afterwards). PostgreSQL stops with them."""
        return [u.name for u in self.host_units(inv, host)]

    def pitr_init_commands(self, inv: Inventory, data_restore_command: str, wal_restore_command: str,
                           target_time: datetime | None) -> list[Command]:
        """Where `restores_itself`: run on one member while the members' `restore_stopped_units`
        are stopped: the HA manager starts the cluster afresh from the backup
        (`data_restore_command`, `%d` standing for the data directory), replaying WAL with
        `wal_restore_command` (`%f`, `%p`) to `target_time` (None: the end of the archive)."""
        raise NotImplementedError(f"{self.name} does not restore the cluster itself")
