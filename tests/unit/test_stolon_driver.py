"""The stolon driver on recorded-shape output (tests/unit/fixtures/stolon): no stolon, no network."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from blocks.inventory import Inventory, parse_inventory
from tasks.adapters.commands import Command, CommandResult, ManagedFile
from tasks.adapters.ha.base import (
    ClusterView,
    DbSecrets,
    HaSettings,
    HaSpecError,
    HaStatusError,
    Member,
)
from tasks.adapters.ha.stolon import (
    STOLON_MANAGED_PG_PARAMETERS,
    STOLONCTL,
    StolonDriver,
    merge_patch,
    parse_go_duration,
    parse_status_text,
)
from tasks.adapters.pki import ClusterCA
from tasks.desired import ClusterSecrets, db_files

FIXTURES = Path(__file__).parent / "fixtures" / "stolon"
SU_PASSWORD = "su-S3cret!with spaces inside"
REPL_PASSWORD = "repl-An0ther#secret"
SECRETS = DbSecrets(
    superuser="postgres", superuser_password=SU_PASSWORD,
    replication_user="replicator", replication_password=REPL_PASSWORD,
)
ARCHIVE_PARAMETERS = {"archive_mode": "on", "archive_command": "/opt/wal-g/scripts/archive.sh %p"}
NIL_CLUSTER_DATA = CommandResult(stdout="", stderr="nil cluster data: <nil>\n", exit_code=1)

driver = StolonDriver()


def make_inventory(cluster_spec: dict[str, Any] | None = None, **cluster: Any) -> Inventory:
    return parse_inventory({
        "cluster": {
            "name": "pg-prod",
            "network": "10.0.0.0/24",
            "ha_manager": "stolon",
            "admin_networks": ["10.0.9.0/24"],
            "postgres": {"version": 15, "parameters": {"max_connections": "200", "archive_mode": "off"}},
            "stolon": {"cluster_spec": cluster_spec or {}},
            **cluster,
        },
        "hosts": [
            {"name": "db-1", "address": "10.0.0.11", "roles": ["db", "etcd"]},
            {"name": "db-2", "address": "10.0.0.12", "roles": ["db", "etcd"]},
            {"name": "db-3", "address": "10.0.0.13", "roles": ["db", "etcd"]},
            {"name": "router-1", "address": "10.0.0.21", "roles": ["router"]},
        ],
    })


INV = make_inventory()


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def ok(name: str) -> CommandResult:
    return CommandResult(stdout=fixture(name))


def view_of(status: str, clusterdata: str) -> ClusterView:
    return driver.parse_status(INV, [ok(status), ok(clusterdata)])


def files_by_path(inv: Inventory = INV, host: str = "db-2") -> dict[str, ManagedFile]:
    return {f.path: f for f in driver.host_files(inv, inv.host(host), SECRETS, ARCHIVE_PARAMETERS)}


def env_values(content: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in content.splitlines() if line and not line.startswith("#"))


# ---------------------------------------------------------------- parse_status


def test_healthy_cluster_maps_keepers_to_inventory_hosts() -> None:
    view = view_of("status_healthy.json", "clusterdata_healthy.json")

    assert view.initialized
    assert view.leader == "db-1"
    assert [m.name for m in view.members] == ["db-1", "db-2", "db-3"]
    assert view.handles["master_keeper_uid"] == "db_1"
    assert view.handles["master_db_uid"] == "5a363897"
    assert view.handles["phase"] == "normal"
    assert view.handles["leader_sentinel_uid"] == "bfe3a503"
    assert view.member("db-1") == Member(
        name="db-1", address="10.0.0.11", role="primary", healthy=True, state="master", timeline=2, lag_bytes=0
    )
    assert view.member("db-2") == Member(
        name="db-2", address="10.0.0.12", role="replica", healthy=True, state="standby", timeline=2, lag_bytes=0
    )
    lagging = view.member("db-3")
    assert lagging is not None and lagging.lag_bytes == 117440720 - 100663424


def test_standby_the_master_reports_as_synchronous_is_marked_promotable() -> None:
    # With synchronousReplication on, the master db's status lists its synchronous standbys by db uid.
    data = json.loads(fixture("clusterdata_healthy.json"))
    data["dbs"]["5a363897"]["status"]["synchronousStandbys"] = ["0c2f1e4d"]
    view = driver.parse_status(INV, [ok("status_healthy.json"), CommandResult(stdout=json.dumps(data))])
    assert [m.name for m in view.replicas if m.synchronous] == ["db-2"]
    assert not view.member("db-1").synchronous
    assert not any(m.synchronous for m in view_of("status_healthy.json", "clusterdata_healthy.json").members)


def test_status_json_is_tab_indented_like_go() -> None:
    # Guards the fixture: the driver must cope with MarshalIndent's tabs, not just compact JSON.
    assert "\n\t\"sentinels\"" in fixture("status_healthy.json")


def test_no_master_keeper_means_no_leader() -> None:
    view = view_of("status_no_master.json", "clusterdata_no_master.json")

    assert view.initialized
    assert view.leader is None
    assert view.primaries == []
    assert view.handles["master_keeper_uid"] == ""
    old_master = view.member("db-1")
    assert old_master is not None and not old_master.healthy
    assert "keeper unhealthy" in old_master.state
    assert {m.name for m in view.replicas} == {"db-2", "db-3"}


def test_keeper_without_db_and_unknown_address() -> None:
    view = view_of("status_new_keeper.json", "clusterdata_new_keeper.json")

    # db-4 is not in the inventory: the uid stays as its name so flows can see a stranger.
    assert [m.name for m in view.members] == ["db-1", "db-2", "db-3", "db_4"]
    newcomer = view.member("db_4")
    assert newcomer is not None
    assert newcomer.role == "unknown"
    assert newcomer.address == ""
    assert not newcomer.healthy
    assert "no db assigned" in newcomer.state

    lagging = view.member("db-3")
    assert lagging is not None
    assert lagging.address == "10.0.0.13"  # "(unknown)" in status: taken from the inventory
    assert lagging.role == "replica" and not lagging.healthy
    assert "converging" in lagging.state and "postgres unhealthy" in lagging.state
    assert lagging.lag_bytes is None and lagging.timeline is None


def test_never_initialised_cluster() -> None:
    view = driver.parse_status(INV, [ok("status_error.json"), NIL_CLUSTER_DATA])
    assert view == ClusterView(initialized=False)


def test_never_initialised_seen_by_text_mode_status() -> None:
    status_failed = CommandResult(stdout="", stderr="nil cluster data: <nil>\n", exit_code=1)
    assert not driver.parse_status(INV, [status_failed, NIL_CLUSTER_DATA]).initialized


STORE_DOWN = CommandResult(
    stdout="", stderr="cannot get cluster data: context deadline exceeded\n", exit_code=1
)


@pytest.mark.parametrize(
    ("status", "clusterdata", "message"),
    [
        pytest.param(ok("status_error.json"), STORE_DOWN, "printed {}", id="empty-object-store-down"),
        pytest.param(ok("status_error.json"), ok("clusterdata_healthy.json"), "printed {}", id="empty-object-but-clusterdata"),
        pytest.param(ok("status_healthy.json"), NIL_CLUSTER_DATA, "nil cluster data", id="clusterdata-nil-but-status-ok"),
        pytest.param(CommandResult("", "cannot create store: bad endpoint\n", 1), ok("clusterdata_healthy.json"),
                     "exited 1: cannot create store", id="status-exit-1"),
        pytest.param(CommandResult("WARN something\n{"), ok("clusterdata_healthy.json"), "not JSON", id="status-garbage"),
        pytest.param(CommandResult('{"keepers": []}'), ok("clusterdata_healthy.json"), "no cluster section", id="status-missing-cluster"),
        pytest.param(CommandResult("[]"), ok("clusterdata_healthy.json"), "expected an object", id="status-list"),
        pytest.param(ok("status_healthy.json"), CommandResult("{not json"), "clusterdata read`: not JSON", id="clusterdata-garbage"),
        pytest.param(ok("status_healthy.json"),
                     CommandResult(fixture("clusterdata_healthy.json").replace('"formatVersion":1', '"formatVersion":2')),
                     "formatVersion 2", id="clusterdata-format-version"),
        pytest.param(ok("status_after_failover.json"), ok("clusterdata_healthy.json"),
                     "failover may be in progress", id="status-and-clusterdata-disagree"),
        pytest.param(ok("status_healthy.json"),
                     CommandResult(fixture("clusterdata_healthy.json").replace('"master":"5a363897"', '"master":"deadbeef"')),
                     "master db 'deadbeef' is not among the dbs", id="master-db-missing"),
    ],
)
def test_untrustworthy_status_raises(status: CommandResult, clusterdata: CommandResult, message: str) -> None:
    with pytest.raises(HaStatusError) as raised:
        driver.parse_status(INV, [status, clusterdata])
    assert message in str(raised.value)


def test_parse_status_needs_both_results() -> None:
    with pytest.raises(HaStatusError, match="got 1"):
        driver.parse_status(INV, [ok("status_healthy.json")])


# ---------------------------------------------------------------- status text (fallback)


def test_parse_status_text() -> None:
    parsed = parse_status_text(fixture("status_healthy.txt"))

    assert parsed["cluster"]["master_keeper_uid"] == "db_1"
    assert [s["uid"] for s in parsed["sentinels"]] == ["bfe3a503", "c41d7e02"]
    assert parsed["sentinels"][0]["leader"] is True
    assert [p["uid"] for p in parsed["proxies"]] == ["26803fc5", "8c4da45d"]
    assert parsed["keepers"][0] == {
        "uid": "db_1", "healthy": True, "listen_address": "10.0.0.11:5432",
        "pg_healthy": True, "pg_wanted_generation": 5, "pg_current_generation": 5,
    }
    assert parsed["keepers"][2]["listen_address"] == "(no db assigned)"


@pytest.mark.parametrize(
    ("cluster_info", "master"),
    [
        ("=== Cluster Info ===\n\nMaster Keeper: (none)\n", ""),
        ("=== Cluster Info ===\n\nMaster: keeper_0\n", "keeper_0"),  # before v0.14
        ("No cluster available\n", ""),
    ],
)
def test_parse_status_text_master_variants(cluster_info: str, master: str) -> None:
    text = "=== Keepers ===\n\nNo keepers available\n\n" + cluster_info
    parsed = parse_status_text(text)
    assert parsed["cluster"]["master_keeper_uid"] == master
    assert parsed["keepers"] == []


def test_parse_status_text_rejects_other_output() -> None:
    with pytest.raises(HaStatusError, match="Keepers"):
        parse_status_text("Error: unknown command \"stauts\" for \"stolonctl\"\n")


# ---------------------------------------------------------------- files


def test_keeper_env_file() -> None:
    env = env_values(files_by_path()["/etc/sysconfig/stolon-stkeeper-pg-prod"].content)

    assert env == {
        "STKEEPER_CLUSTER_NAME": "pg-prod",
        "STKEEPER_STORE_BACKEND": "etcdv3",
        "STKEEPER_STORE_ENDPOINTS": "http://10.0.0.11:2379,http://10.0.0.12:2379,http://10.0.0.13:2379",
        "STKEEPER_STORE_PREFIX": "stolon/cluster",
        "STKEEPER_UID": "db_2",
        "STKEEPER_DATA_DIR": "/var/lib/stolon/pg-prod",
        "STKEEPER_PG_LISTEN_ADDRESS": "10.0.0.12",
        "STKEEPER_PG_PORT": "5432",
        "STKEEPER_PG_BIN_PATH": "/usr/lib/postgresql/15/bin",
        "STKEEPER_PG_SU_USERNAME": "postgres",
        "STKEEPER_PG_SU_PASSWORDFILE": "/etc/stolon/pg-prod/pg-su-password",
        "STKEEPER_PG_REPL_USERNAME": "replicator",
        "STKEEPER_PG_REPL_PASSWORDFILE": "/etc/stolon/pg-prod/pg-repl-password",
    }


def test_sentinel_and_proxy_env_files() -> None:
    files = files_by_path()
    sentinel = env_values(files["/etc/sysconfig/stolon-stsentinel-pg-prod"].content)
    proxy = env_values(files["/etc/sysconfig/stolon-stproxy-pg-prod"].content)

    assert sentinel["STSENTINEL_CLUSTER_NAME"] == "pg-prod"
    assert sentinel["STSENTINEL_STORE_BACKEND"] == "etcdv3"
    assert "STSENTINEL_INITIAL_CLUSTER_SPEC" not in sentinel  # only the flow initialises
    assert proxy["STPROXY_LISTEN_ADDRESS"] == "0.0.0.0"
    assert proxy["STPROXY_PORT"] == "25432"
    assert proxy["STPROXY_STORE_ENDPOINTS"] == sentinel["STSENTINEL_STORE_ENDPOINTS"]


def test_custom_data_directory_is_the_keeper_data_dir() -> None:
    inv = make_inventory(postgres={"version": 16, "data_directory": "/srv/pg"})
    env = env_values(files_by_path(inv)["/etc/sysconfig/stolon-stkeeper-pg-prod"].content)
    assert env["STKEEPER_DATA_DIR"] == "/srv/pg"
    assert driver.pgdata(inv) == "/srv/pg/postgres"


def test_password_files_are_secret() -> None:
    files = files_by_path()
    for path, password in [
        ("/etc/stolon/pg-prod/pg-su-password", SU_PASSWORD),
        ("/etc/stolon/pg-prod/pg-repl-password", REPL_PASSWORD),
    ]:
        secret = files[path]
        assert secret.secret and secret.mode == 0o600
        assert secret.owner == "postgres"
        assert secret.content.strip() == password


def test_password_files_hold_the_bare_password_without_a_newline() -> None:
    # The keeper reads the file as is and strips a trailing CR/LF with a warning on every start
    # (cmd/keeper/cmd/keeper.go: readPasswordFromFile, then strings.TrimRight(pw, "\r\n")).
    files = files_by_path()
    assert files["/etc/stolon/pg-prod/pg-su-password"].content == SU_PASSWORD
    assert files["/etc/stolon/pg-prod/pg-repl-password"].content == REPL_PASSWORD


def test_no_password_outside_secret_files_or_in_commands() -> None:
    files = driver.host_files(INV, INV.host("db-1"), SECRETS, ARCHIVE_PARAMETERS)
    view = view_of("status_healthy.json", "clusterdata_healthy.json")
    commands: list[Command] = [
        *driver.bootstrap_commands(INV, SECRETS, ARCHIVE_PARAMETERS),
        *driver.status_commands(INV),
        *driver.switchover_commands(INV, view, "db-2"),
        *driver.failover_commands(INV, view, "db-2"),
        *driver.settings_commands(INV, HaSettings(synchronous_replication=True, postgres_parameters={"work_mem": "8MB"})),
        *driver.spec_update_commands(INV, ARCHIVE_PARAMETERS),
    ]
    public_text = [f.content for f in files if not f.secret]
    public_text += [c.render(sudo=True) for c in commands]
    public_text += [f"{k}={v}" for c in commands for k, v in c.env]
    for password in (SU_PASSWORD, REPL_PASSWORD):
        assert not any(password in text for text in public_text)


def test_units() -> None:
    files = files_by_path()
    keeper = files["/etc/systemd/system/stolon-keeper-pg-prod.service"].content
    for line in [
        "EnvironmentFile=/etc/sysconfig/stolon-stkeeper-pg-prod",
        "User=postgres",
        "ExecStart=/usr/local/bin/stolon-keeper",
        "Restart=always",
        "KillMode=mixed",
        "ExecStartPre=+/usr/bin/install -d -o postgres -g postgres -m 0700 /var/lib/stolon/pg-prod",
    ]:
        assert line in keeper.splitlines()
    sentinel = files["/etc/systemd/system/stolon-sentinel-pg-prod.service"].content
    proxy = files["/etc/systemd/system/stolon-proxy-pg-prod.service"].content
    assert "ExecStart=/usr/local/bin/stolon-sentinel" in sentinel
    assert "EnvironmentFile=/etc/sysconfig/stolon-stproxy-pg-prod" in proxy


def test_host_units_restart_on_their_inputs() -> None:
    units = {u.name: u for u in driver.host_units(INV, INV.host("db-1"))}
    assert list(units) == ["stolon-keeper-pg-prod.service", "stolon-sentinel-pg-prod.service", "stolon-proxy-pg-prod.service"]
    keeper = units["stolon-keeper-pg-prod.service"]
    assert "/etc/sysconfig/stolon-stkeeper-pg-prod" in keeper.restart_on
    assert "/etc/stolon/pg-prod/pg-su-password" in keeper.restart_on
    assert "/etc/sysconfig/stolon-stproxy-pg-prod" in units["stolon-proxy-pg-prod.service"].restart_on
    rendered = set(files_by_path())
    for unit in units.values():
        assert set(unit.restart_on) <= rendered
        assert driver.cluster_spec_path(INV) not in unit.restart_on


def test_cluster_spec_file() -> None:
    inv = make_inventory(
        {"failInterval": "30s", "pgParameters": {"work_mem": "64MB"}, "newConfig": {"dataChecksums": True}},
        postgres={"version": 15, "synchronous_replication": True, "parameters": {"max_connections": "200", "archive_mode": "off"}},
    )
    spec = json.loads(files_by_path(inv)["/etc/stolon/pg-prod/cluster-spec.json"].content)

    assert spec["initMode"] == "new"
    assert spec["synchronousReplication"] is True
    assert spec["usePgrewind"] is True and spec["automaticPgRestart"] is True
    assert spec["defaultSUReplAccessMode"] == "strict"
    assert spec["failInterval"] == "30s"
    assert spec["newConfig"] == {"dataChecksums": True}
    # Archive settings from the backup driver win over the inventory's; overrides merge in.
    assert spec["pgParameters"] == {"max_connections": "200", **ARCHIVE_PARAMETERS, "work_mem": "64MB"}
    assert "host replication all 10.0.0.11/32 md5" in spec["pgHBA"]
    assert "host all all 10.0.0.13/32 md5" in spec["pgHBA"]
    assert "host all all 10.0.0.21/32 md5" in spec["pgHBA"]  # router
    assert "host all all 10.0.9.0/24 md5" in spec["pgHBA"]  # admin network
    assert not any("0.0.0.0/0" in line for line in spec["pgHBA"])


def test_null_override_drops_a_default() -> None:
    spec = driver.cluster_spec(make_inventory({"pgHBA": None}), {})
    assert "pgHBA" not in spec


@pytest.mark.parametrize(
    ("secrets", "field"),
    [
        (DbSecrets("postgres", "", "replicator", "x"), "secrets.superuser_password: empty"),
        (DbSecrets("postgres", " padded", "replicator", "x"), "secrets.superuser_password: starts or ends with whitespace"),
        (DbSecrets("postgres", "a", "replicator", "x\ny"), "secrets.replication_password: contains a line break"),
        (DbSecrets("postgres", "a", "postgres", "b"), "secrets.replication_user"),
    ],
)
def test_unusable_secrets(secrets: DbSecrets, field: str) -> None:
    with pytest.raises(HaSpecError) as raised:
        driver.host_files(INV, INV.host("db-1"), secrets, {})
    assert field in str(raised.value)
    assert " padded" not in str(raised.value)


# ---------------------------------------------------------------- validate


@pytest.mark.parametrize(
    "cluster_spec",
    [
        {},
        {"failInterval": "30s", "sleepInterval": "2500ms", "deadKeeperRemovalInterval": "1h30m", "syncTimeout": "0"},
        {"pgParameters": {"work_mem": "64MB"}, "newConfig": {"dataChecksums": True, "locale": "C.UTF-8"}},
        {"initMode": "existing", "existingConfig": {"keeperUID": "db_2"}},
        {"initMode": "pitr", "pitrConfig": {"dataRestoreCommand": "wal-g backup-fetch %d LATEST",
                                            "archiveRecoverySettings": {"restoreCommand": "wal-g wal-fetch %f %p"}}},
        {"minSynchronousStandbys": 1, "maxSynchronousStandbys": 2, "maxStandbyLag": 16777216},
        {"additionalMasterReplicationSlots": ["debezium"], "pgHBA": None, "proxyTimeout": "20s", "proxyCheckInterval": "10s"},
    ],
)
def test_valid_cluster_specs(cluster_spec: dict[str, Any]) -> None:
    driver.validate(make_inventory(cluster_spec))


P = "cluster.stolon.cluster_spec"


@pytest.mark.parametrize(
    ("cluster_spec", "message"),
    [
        ({"failIntervall": "20s"}, f"{P}.failIntervall: unknown stolon cluster spec field (did you mean failInterval?)"),
        ({"standbySettings": {}}, f"{P}.standbySettings: unknown stolon cluster spec field (did you mean standbyConfig.standbySettings?)"),
        ({"pitrConfig": {"dataRestoreCmd": "x"}}, f"{P}.pitrConfig.dataRestoreCmd: unknown stolon cluster spec field"),
        ({"failInterval": 20}, f"{P}.failInterval: must be a Go duration string"),
        ({"failInterval": "20 seconds"}, f"{P}.failInterval: '20 seconds' is not a Go duration"),
        ({"sleepInterval": "-5s"}, f"{P}.sleepInterval: must not be negative"),
        ({"usePgrewind": "yes"}, f"{P}.usePgrewind: must be true or false"),
        ({"maxStandbys": True}, f"{P}.maxStandbys: must be an integer"),
        ({"maxStandbys": 70000}, f"{P}.maxStandbys: must be between 0 and 65535"),
        ({"pgParameters": {"max_connections": 200}}, f"{P}.pgParameters.max_connections: must be a string"),
        ({"pgParameters": ["work_mem=1MB"]}, f"{P}.pgParameters: must be a map"),
        ({"pgParameters": {"port": "6543"}}, f"{P}.pgParameters.port: managed by the stolon keeper"),
        ({"pgHBA": "host all all 0.0.0.0/0 md5"}, f"{P}.pgHBA: must be a list of strings"),
        ({"proxyCheckInterval": "20s"}, f"{P}.proxyCheckInterval: proxyCheckInterval (20s) must be less than proxyTimeout (15s)"),
        ({"proxyTimeout": "5s"}, f"{P}.proxyTimeout: proxyCheckInterval (5s) must be less than proxyTimeout (5s)"),
        ({"minSynchronousStandbys": 0}, f"{P}.minSynchronousStandbys: must be at least 1"),
        ({"minSynchronousStandbys": 2}, f"{P}.maxSynchronousStandbys: (1) must be at least minSynchronousStandbys (2)"),
        ({"initMode": "clone"}, f"{P}.initMode: must be one of new, existing, pitr"),
        ({"initMode": None}, f"{P}.initMode: required"),
        ({"defaultSUReplAccessMode": "none"}, f"{P}.defaultSUReplAccessMode: must be one of all, strict"),
        ({"initMode": "existing"}, f"{P}.existingConfig.keeperUID: required when initMode is existing"),
        ({"initMode": "existing", "existingConfig": {"keeperUID": "db-2"}}, f"{P}.existingConfig.keeperUID: 'db-2' is not the keeper uid"),
        ({"initMode": "pitr", "pitrConfig": {}}, f"{P}.pitrConfig.dataRestoreCommand: required when initMode is pitr"),
        ({"role": "standby"}, f"{P}.role: a standby cluster cannot use initMode new"),
        ({"initMode": "pitr", "role": "standby", "pitrConfig": {"dataRestoreCommand": "x"}}, f"{P}.standbyConfig: required"),
        ({"synchronousReplication": True}, f"{P}.synchronousReplication: True contradicts cluster.postgres.synchronous_replication"),
        ({"additionalMasterReplicationSlots": ["stolon_x"]}, f"{P}.additionalMasterReplicationSlots[0]: 'stolon_x' uses stolon's reserved prefix"),
        ({"additionalMasterReplicationSlots": ["Bad-Slot"]}, f"{P}.additionalMasterReplicationSlots[0]: 'Bad-Slot' is not a valid slot name"),
        ({"newConfig": "C.UTF-8"}, f"{P}.newConfig: must be an object"),
    ],
)
def test_invalid_cluster_spec_names_the_field(cluster_spec: dict[str, Any], message: str) -> None:
    with pytest.raises(HaSpecError) as raised:
        driver.validate(make_inventory(cluster_spec))
    assert message in str(raised.value)


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(HaSpecError) as raised:
        driver.validate(make_inventory({"failIntervall": "20s", "usePgrewind": 1}))
    assert len(str(raised.value).splitlines()) == 2


def test_proxy_port_clash() -> None:
    inv = make_inventory(stolon={"proxy_port": 5432})
    with pytest.raises(HaSpecError, match=r"cluster\.stolon\.proxy_port: clashes with cluster\.postgres\.port"):
        driver.validate(inv)


def test_data_directory_must_fit_unit_files() -> None:
    inv = make_inventory(postgres={"version": 15, "data_directory": "/srv/my data"})
    with pytest.raises(HaSpecError, match=r"cluster\.postgres\.data_directory: '/srv/my data'"):
        driver.validate(inv)


def test_files_are_not_rendered_from_an_invalid_spec() -> None:
    with pytest.raises(HaSpecError):
        driver.host_files(make_inventory({"failIntervall": "20s"}), INV.host("db-1"), SECRETS, {})


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("20s", 20), ("5m", 300), ("48h", 172800), ("1h30m", 5400), ("2500ms", 2.5), ("1.5s", 1.5), ("0", 0), ("-5s", -5)],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "20", "5 m", "1d", "s", "20S", "1h 30m"])
def test_not_go_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_go_duration(text)


def test_merge_patch() -> None:
    base = {"a": 1, "m": {"x": "1", "y": "2"}, "l": [1, 2]}
    assert merge_patch(base, {"m": {"y": None, "z": "3"}, "l": [3], "a": None}) == {"m": {"x": "1", "z": "3"}, "l": [3]}
    assert base == {"a": 1, "m": {"x": "1", "y": "2"}, "l": [1, 2]}


# ---------------------------------------------------------------- commands


def test_etcd_prefix() -> None:
    assert driver.etcd_prefix(INV) == "stolon/cluster/pg-prod"
    assert driver.etcd_prefix(make_inventory(stolon={"store_prefix": "/stolon/"})) == "/stolon/pg-prod"


def test_packages() -> None:
    assert driver.packages(INV) == ["postgresql-15", "stolon"]


ROOT_FLAGS = (
    "--cluster-name pg-prod --store-backend etcdv3 "
    "--store-endpoints http://10.0.0.11:2379,http://10.0.0.12:2379,http://10.0.0.13:2379 --store-prefix stolon/cluster"
)


def test_status_commands() -> None:
    status, clusterdata = driver.status_commands(INV)
    assert status.render().startswith("timeout -k 5 30 /usr/local/bin/stolonctl ")
    assert status.render().endswith(f"{ROOT_FLAGS} status --format json")
    assert clusterdata.render().endswith(f"{ROOT_FLAGS} clusterdata read")
    assert status.user is None and status.env == ()


def test_bootstrap_command() -> None:
    (bootstrap,) = driver.bootstrap_commands(INV, SECRETS, ARCHIVE_PARAMETERS)
    rendered = bootstrap.render()
    assert rendered.startswith("timeout -k 5 120 bash --norc -euo pipefail -c ")
    assert 'init -y -f "$spec"' in rendered
    assert "/etc/stolon/pg-prod/cluster-spec.json" in bootstrap.argv
    assert str(bootstrap) == "stolonctl init -y -f /etc/stolon/pg-prod/cluster-spec.json (cluster pg-prod)"


FAKE_STOLONCTL = """#!/bin/sh
echo "$*" >> "$STOLONCTL_LOG"
case "$*" in
  *"clusterdata read"*) printf '%s\\n' "$FAKE_CLUSTERDATA_ERR" >&2; exit "$FAKE_CLUSTERDATA_EXIT" ;;
  *"init -y -f"*) exit 0 ;;
esac
exit 9
"""


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize(
    ("clusterdata_exit", "clusterdata_err", "pg_version_exists", "init_mode", "exit_code", "initialised"),
    [
        pytest.param(1, "nil cluster data: <nil>", False, "new", 0, True, id="uninitialised"),
        pytest.param(0, "", False, "new", 3, False, id="clusterdata-exists"),
        pytest.param(1, "cannot get cluster data: context deadline exceeded", False, "new", 1, False, id="store-down"),
        pytest.param(1, "nil cluster data: <nil>", True, "new", 3, False, id="old-pgdata-on-host"),
        pytest.param(1, "nil cluster data: <nil>", True, "existing", 0, True, id="existing-uses-old-pgdata"),
    ],
)
def test_bootstrap_script_guards(
    tmp_path: Path, clusterdata_exit: int, clusterdata_err: str, pg_version_exists: bool,
    init_mode: str, exit_code: int, initialised: bool,
) -> None:
    spec = {"initMode": init_mode, **({"existingConfig": {"keeperUID": "db_1"}} if init_mode == "existing" else {})}
    (bootstrap,) = driver.bootstrap_commands(make_inventory(spec), SECRETS, {})
    fake = tmp_path / "stolonctl"
    fake.write_text(FAKE_STOLONCTL)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    pgdata = tmp_path / "data" / "postgres"
    pgdata.mkdir(parents=True)
    if pg_version_exists:
        (pgdata / "PG_VERSION").write_text("15\n")
    argv = [str(fake) if a == STOLONCTL else str(pgdata) if a == driver.pgdata(INV) else a for a in bootstrap.argv]
    log = tmp_path / "calls"
    env = {**os.environ, "STOLONCTL_LOG": str(log), "FAKE_CLUSTERDATA_EXIT": str(clusterdata_exit),
           "FAKE_CLUSTERDATA_ERR": clusterdata_err}

    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)

    assert done.returncode == exit_code, done.stderr
    calls = log.read_text() if log.exists() else ""
    assert ("init -y -f /etc/stolon/pg-prod/cluster-spec.json" in calls) == initialised
    assert ROOT_FLAGS in calls or not calls


def test_switchover_fails_the_master_keeper() -> None:
    view = view_of("status_healthy.json", "clusterdata_healthy.json")
    (failkeeper,) = driver.switchover_commands(INV, view, "db-3")
    assert failkeeper.render().startswith("timeout -k 5 30 ")
    assert failkeeper.render().endswith(f"{ROOT_FLAGS} failkeeper db_1")


@pytest.mark.parametrize(
    ("candidate", "error", "message"),
    [
        ("db-1", HaSpecError, "already the primary"),
        ("db-9", HaSpecError, "not a member"),
    ],
)
def test_switchover_rejects_bad_candidates(candidate: str, error: type[Exception], message: str) -> None:
    view = view_of("status_healthy.json", "clusterdata_healthy.json")
    with pytest.raises(error, match=message):
        driver.switchover_commands(INV, view, candidate)


@pytest.mark.parametrize(
    "view",
    [
        ClusterView(initialized=False),
        view_of("status_no_master.json", "clusterdata_no_master.json"),
    ],
)
def test_switchover_needs_a_master(view: ClusterView) -> None:
    with pytest.raises(HaStatusError):
        driver.switchover_commands(INV, view, "db-2")


def test_failover() -> None:
    healthy = view_of("status_healthy.json", "clusterdata_healthy.json")
    (failkeeper,) = driver.failover_commands(INV, healthy, "db-2")
    assert failkeeper.argv[-2:] == ("failkeeper", "db_1")

    no_master = view_of("status_no_master.json", "clusterdata_no_master.json")
    assert driver.failover_commands(INV, no_master, "db-2") == []
    # The master keeper is no longer registered: the sentinel fails over on its own.
    gone = ClusterView(initialized=True, members=healthy.members[1:], leader="db-1", handles=healthy.handles)
    assert driver.failover_commands(INV, gone, "db-2") == []


def test_settings_commands_patch() -> None:
    settings = HaSettings(synchronous_replication=True, postgres_parameters={"work_mem": "8MB"})
    (update,) = driver.settings_commands(INV, settings)
    assert update.argv[-3:-1] == ("update", "--patch")
    assert json.loads(update.argv[-1]) == {"synchronousReplication": True, "pgParameters": {"work_mem": "8MB"}}
    assert "timeout" in update.render()


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (HaSettings(), None),
        (HaSettings(synchronous_replication=False), {"synchronousReplication": False}),
        (HaSettings(postgres_parameters={"archive_mode": "on"}), {"pgParameters": {"archive_mode": "on"}}),
    ],
)
def test_settings_commands_table(settings: HaSettings, expected: dict[str, Any] | None) -> None:
    commands = driver.settings_commands(INV, settings)
    assert [json.loads(c.argv[-1]) for c in commands] == ([expected] if expected else [])


def test_settings_refuse_stolon_managed_parameters() -> None:
    with pytest.raises(HaSpecError, match=r"settings\.postgres_parameters\.max_wal_senders"):
        driver.settings_commands(INV, HaSettings(postgres_parameters={"max_wal_senders": "20"}))


# ---------------------------------------------------------------- keeper-managed parameters

# stolon's managedPGParameters, cmd/keeper/cmd/keeper.go (v0.17.0 and master; the pgvillage fork
# has the same list). recovery_target_timeline is listed twice upstream.
UPSTREAM_MANAGED_PG_PARAMETERS = {
    "unix_socket_directories", "wal_keep_segments", "wal_keep_size", "hot_standby", "listen_addresses", "port",
    "max_replication_slots", "max_wal_senders", "wal_log_hints", "synchronous_standby_names",
    "primary_conninfo", "primary_slot_name", "recovery_min_apply_delay", "restore_command",
    "recovery_target_timeline", "recovery_target", "recovery_target_lsn", "recovery_target_name",
    "recovery_target_time", "recovery_target_xid", "recovery_target_action",
}
MANAGED_EXAMPLES = [
    "wal_keep_size", "wal_keep_segments", "primary_conninfo", "primary_slot_name", "recovery_min_apply_delay",
    "restore_command", "recovery_target", "recovery_target_time", "recovery_target_lsn", "recovery_target_name",
    "recovery_target_xid", "recovery_target_timeline", "recovery_target_action",
    "listen_addresses", "port", "unix_socket_directories", "hot_standby", "max_replication_slots",
    "synchronous_standby_names", "wal_log_hints",
]


def test_managed_parameters_are_exactly_the_keepers_list() -> None:
    assert STOLON_MANAGED_PG_PARAMETERS == UPSTREAM_MANAGED_PG_PARAMETERS


@pytest.mark.parametrize("name", MANAGED_EXAMPLES)
def test_inventory_postgres_parameters_refuse_keeper_managed(name: str) -> None:
    inv = make_inventory(postgres={"version": 15, "parameters": {"max_connections": "200", name: "x"}})
    with pytest.raises(HaSpecError) as raised:
        driver.validate(inv)
    assert f"cluster.postgres.parameters.{name}: managed by the stolon keeper" in str(raised.value)
    # Every way into the spec refuses it: the spec file, init and the running-spec patch.
    for render in (
        lambda: driver.cluster_spec(inv, {}),
        lambda: driver.host_files(inv, inv.host("db-1"), SECRETS, {}),
        lambda: driver.bootstrap_commands(inv, SECRETS, {}),
        lambda: driver.spec_update_commands(inv, {}),
    ):
        with pytest.raises(HaSpecError, match=rf"cluster\.postgres\.parameters\.{name}: managed"):
            render()


@pytest.mark.parametrize("name", MANAGED_EXAMPLES)
def test_cluster_spec_pg_parameters_refuse_keeper_managed(name: str) -> None:
    with pytest.raises(HaSpecError) as raised:
        driver.validate(make_inventory({"pgParameters": {name: "x"}}))
    assert f"{P}.pgParameters.{name}: managed by the stolon keeper" in str(raised.value)


@pytest.mark.parametrize("name", MANAGED_EXAMPLES)
def test_settings_refuse_every_keeper_managed_parameter(name: str) -> None:
    with pytest.raises(HaSpecError) as raised:
        driver.settings_commands(INV, HaSettings(postgres_parameters={name: "x"}))
    assert f"settings.postgres_parameters.{name}: managed by the stolon keeper" in str(raised.value)


def test_backup_driver_parameters_refuse_keeper_managed() -> None:
    extra = {**ARCHIVE_PARAMETERS, "restore_command": "/opt/wal-g/scripts/archive_restore.sh %f %p"}
    with pytest.raises(HaSpecError, match=r"archive_parameters\.restore_command: managed by the stolon keeper"):
        driver.cluster_spec(INV, extra)
    with pytest.raises(HaSpecError, match=r"archive_parameters\.restore_command"):
        driver.host_files(INV, INV.host("db-1"), SECRETS, extra)


def test_managed_refusal_says_where_the_value_comes_from() -> None:
    with pytest.raises(HaSpecError) as raised:
        driver.validate(make_inventory(postgres={"version": 15, "parameters": {"restore_command": "x", "port": "6543"}}))
    message = str(raised.value)
    assert "archiveRecoverySettings.restoreCommand" in message
    assert "cluster.postgres.port" in message
    assert len(message.splitlines()) == 2


def test_managed_names_compare_case_insensitively() -> None:
    # PostgreSQL reads `Port` as `port`; the keeper would write both, in random map order.
    with pytest.raises(HaSpecError, match=r"cluster\.postgres\.parameters\.Port: managed"):
        driver.validate(make_inventory(postgres={"version": 15, "parameters": {"Port": "6543"}}))


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"wal_level": "LOGICAL"}, "cluster.postgres.parameters.wal_level: the stolon keeper writes wal_level = replica"),
        ({"wal_level": "minimal"}, "cluster.postgres.parameters.wal_level: the stolon keeper writes wal_level = replica"),
        ({"WAL_LEVEL": "logical"}, "cluster.postgres.parameters.WAL_LEVEL: the stolon keeper writes wal_level = replica"),
    ],
)
def test_wal_level_the_keeper_would_replace(parameters: dict[str, str], message: str) -> None:
    with pytest.raises(HaSpecError) as raised:
        driver.validate(make_inventory(postgres={"version": 15, "parameters": parameters}))
    assert message in str(raised.value)


@pytest.mark.parametrize(
    ("postgres_parameters", "cluster_spec"),
    [
        # The keeper keeps exactly "logical"; "replica" is what it writes anyway.
        ({"wal_level": "logical"}, {}),
        ({"wal_level": "replica", "archive_mode": "on", "max_connections": "300"}, {}),
        # A null removes an inherited parameter; it sets nothing.
        ({}, {"pgParameters": {"port": None, "work_mem": "8MB"}}),
        # What the driver sets itself goes through other spec fields, not pgParameters.
        ({}, {"usePgrewind": True, "synchronousReplication": False, "maxStandbys": 5, "additionalWalSenders": 2}),
    ],
)
def test_parameters_the_keeper_does_not_manage_pass(postgres_parameters: dict[str, str], cluster_spec: dict[str, Any]) -> None:
    inv = make_inventory(cluster_spec, postgres={"version": 15, "parameters": postgres_parameters})
    spec = driver.cluster_spec(inv, ARCHIVE_PARAMETERS)
    assert not set(map(str.lower, spec["pgParameters"])) & STOLON_MANAGED_PG_PARAMETERS
    (update,) = driver.spec_update_commands(inv, ARCHIVE_PARAMETERS)
    assert update.argv[-3:-1] == ("update", "--patch")


def test_spec_update_leaves_init_only_fields_out() -> None:
    (update,) = driver.spec_update_commands(INV, ARCHIVE_PARAMETERS)
    patch = json.loads(update.argv[-1])
    assert "initMode" not in patch and "role" not in patch
    assert patch["pgParameters"]["archive_command"] == ARCHIVE_PARAMETERS["archive_command"]
    assert "host all all 10.0.0.21/32 md5" in patch["pgHBA"]


def test_show_config_and_drift() -> None:
    command = driver.show_config_command(INV)
    assert command.render().endswith(f"{ROOT_FLAGS} spec")
    running = driver.parse_config(CommandResult(stdout=json.dumps({
        "initMode": "new", "synchronousReplication": False,
        "pgParameters": {"max_connections": "200", "archive_mode": "true", "archive_command": "/bin/true"},
    })))
    inv = make_inventory(postgres={"version": 15, "synchronous_replication": True, "parameters": {"max_connections": "200"}})

    drift = driver.settings_drift(inv, running, ARCHIVE_PARAMETERS)

    # archive_mode "true" == "on"; archive_command differs; synchronous replication is off.
    assert drift == HaSettings(synchronous_replication=True,
                               postgres_parameters={"archive_command": ARCHIVE_PARAMETERS["archive_command"]})
    assert driver.settings_drift(inv, {**running, "synchronousReplication": True,
                                       "pgParameters": {"max_connections": "200", **ARCHIVE_PARAMETERS}},
                                 ARCHIVE_PARAMETERS) == HaSettings()


def running_spec() -> dict[str, Any]:
    return driver.parse_config(ok("spec_running.json"))


def test_spec_update_replaces_pgHBA_whole_and_merges_pgParameters() -> None:
    # `stolonctl update --patch` is strategicpatch.StrategicMergePatch against ClusterSpec, whose
    # fields carry no patchStrategy tags: lists are replaced, maps merged, null deletes a key;
    # for this struct that is what merge_patch (RFC 7386) does.
    (update,) = driver.spec_update_commands(INV, ARCHIVE_PARAMETERS)
    patched = merge_patch(running_spec(), json.loads(update.argv[-1]))

    wanted = driver.cluster_spec(INV, ARCHIVE_PARAMETERS)
    # db-4 (10.0.0.14) left the inventory: its lines go, because the patch holds the whole list.
    assert patched["pgHBA"] == wanted["pgHBA"]
    assert not any("10.0.0.14" in line for line in patched["pgHBA"])
    # Maps merge: parameters stolon merged back at init, and later patches, stay.
    assert patched["pgParameters"]["shared_buffers"] == "128MB"
    assert patched["pgParameters"]["log_min_duration_statement"] == "1s"
    assert {k: patched["pgParameters"][k] for k in wanted["pgParameters"]} == wanted["pgParameters"]
    assert patched["initMode"] == "new"


def test_spec_update_passes_explicit_nulls_on() -> None:
    # A null in cluster.stolon.cluster_spec leaves the field out of the rendered spec; only a
    # null in the patch removes it from a running cluster (a map entry or a whole field).
    inv = make_inventory({"pgParameters": {"log_min_duration_statement": None}, "pgHBA": None})
    (update,) = driver.spec_update_commands(inv, ARCHIVE_PARAMETERS)
    patch = json.loads(update.argv[-1])
    assert patch["pgHBA"] is None
    assert patch["pgParameters"]["log_min_duration_statement"] is None
    patched = merge_patch(running_spec(), patch)
    assert "pgHBA" not in patched
    assert "log_min_duration_statement" not in patched["pgParameters"]
    assert patched["pgParameters"]["max_connections"] == "200"


def test_drift_against_the_printed_running_spec() -> None:
    running = running_spec()
    # In line: the printed spec omits unset fields (synchronousReplication false is printed).
    assert driver.settings_drift(INV, running, ARCHIVE_PARAMETERS) == HaSettings()
    # stolon stores and prints values verbatim: a change of case in a command is a change.
    upper = {**ARCHIVE_PARAMETERS, "archive_command": "/opt/WAL-G/scripts/archive.sh %p"}
    assert driver.settings_drift(INV, running, upper) == HaSettings(
        postgres_parameters={"archive_command": "/opt/WAL-G/scripts/archive.sh %p"}
    )
    # Boolean spellings PostgreSQL reads alike are no change, in any case.
    assert driver.settings_drift(INV, running, {**ARCHIVE_PARAMETERS, "archive_mode": "ON"}) == HaSettings()
    # A spec printed without synchronousReplication means stolon's default, false.
    del running["synchronousReplication"]
    inv = make_inventory(postgres={"version": 15, "synchronous_replication": True, "parameters": {"max_connections": "200"}})
    assert driver.settings_drift(inv, running, ARCHIVE_PARAMETERS) == HaSettings(synchronous_replication=True)


@pytest.mark.parametrize(
    "result",
    [CommandResult("{}\n"), CommandResult("", "nil cluster data: <nil>\n", 1), CommandResult("not json")],
)
def test_parse_config_rejects_non_specs(result: CommandResult) -> None:
    with pytest.raises(HaStatusError, match="stolonctl spec"):
        driver.parse_config(result)


def test_reinit_is_upstreams_broken_keeper_recipe() -> None:
    """stop, removekeeper, data gone, start: the sentinel gives the keeper a new db to resync."""
    view = view_of("status_healthy.json", "clusterdata_healthy.json")
    (reinit,) = driver.reinit_commands(INV, view, "db-1")
    keeper, data, *removekeeper = reinit.argv[-(len(driver.stolonctl_argv(INV, "removekeeper", "db_1")) + 2):]
    assert keeper == driver.unit_name(INV, "keeper")
    assert data == driver.keeper_data_dir(INV)
    assert removekeeper == driver.stolonctl_argv(INV, "removekeeper", "db_1")
    text = reinit.argv[reinit.argv.index("bouwsteen") - 1]
    assert text.index("systemctl stop") < text.index('"$@"') < text.index("rm -rf") < text.index("systemctl start")
    assert '"$data/postgres" "$data/dbstate"' in text, "the keeper's own state (its uid) must stay"


def test_removed_member_is_removekeeper_and_its_slot_is_the_masters_job() -> None:
    (remove,) = driver.member_removed_commands(INV, "db-2")
    assert list(remove.argv) == driver.stolonctl_argv(INV, "removekeeper", "db_2")
    assert driver.member_slot(INV, "db-2") is None
    assert driver.member_data_paths(INV) == [driver.keeper_data_dir(INV)]


# ---------------------------------------------------------------- TLS (issue 15)
# What the pgvillage fork's keeper does with it (cmd/keeper/cmd/keeper.go, v0.18.0 to v0.19.5):
# --pg-{su,repl}-connection-type and --pg-{su,repl}-auth-method shape its own pg_hba lines, `cert`
# becomes `peer` on the socket, and no flag names a client certificate (libpq's environment does).

TLS_INV = make_inventory(tls={"enabled": True})
KEEPER_ENV = "/etc/sysconfig/stolon-stkeeper-pg-prod"
KEEPER_UNIT = "/etc/systemd/system/stolon-keeper-pg-prod.service"
TLS_NAMES = ["ssl", "ssl_cert_file", "ssl_key_file", "ssl_ca_file", "ssl_min_protocol_version"]

HBA_TLS_OFF = [
    "host replication all 10.0.0.11/32 md5",
    "host replication all 10.0.0.12/32 md5",
    "host replication all 10.0.0.13/32 md5",
    "host all all 10.0.0.11/32 md5",
    "host all all 10.0.0.12/32 md5",
    "host all all 10.0.0.13/32 md5",
    "host all all 10.0.0.21/32 md5",
    "host all all 10.0.9.0/24 md5",
]
HBA_TLS_ON = [
    "hostssl replication all 10.0.0.11/32 cert",
    "hostssl replication all 10.0.0.12/32 cert",
    "hostssl replication all 10.0.0.13/32 cert",
    "hostssl all postgres 10.0.0.11/32 cert",
    "hostssl all all 10.0.0.11/32 scram-sha-256",
    "hostssl all postgres 10.0.0.12/32 cert",
    "hostssl all all 10.0.0.12/32 scram-sha-256",
    "hostssl all postgres 10.0.0.13/32 cert",
    "hostssl all all 10.0.0.13/32 scram-sha-256",
    "hostssl all postgres 10.0.0.21/32 cert",  # router
    "hostssl all all 10.0.0.21/32 scram-sha-256",
    "hostssl all postgres 10.0.9.0/24 cert",  # admin network
    "hostssl all all 10.0.9.0/24 scram-sha-256",
]
TLS_PARAMETERS = {
    "ssl": "on",
    "ssl_cert_file": "/var/lib/postgresql/tls/server.crt",
    "ssl_key_file": "/var/lib/postgresql/tls/server.key",
    "ssl_ca_file": "/var/lib/postgresql/tls/ca.crt",
    "ssl_min_protocol_version": "TLSv1.2",
}
TLS_KEEPER_ENV = {
    "STKEEPER_PG_SU_CONNECTION_TYPE": "hostssl",
    "STKEEPER_PG_REPL_CONNECTION_TYPE": "hostssl",
    "STKEEPER_PG_SU_AUTH_METHOD": "cert",
    "STKEEPER_PG_REPL_AUTH_METHOD": "cert",
    "STKEEPER_PG_REPL_SSL_MODE": "verify-full",
    # One client identity for all the keeper's connections, and `peer` on its socket: the superuser.
    "STKEEPER_PG_REPL_USERNAME": "postgres",
    "STKEEPER_PG_REPL_PASSWORDFILE": "/etc/stolon/pg-prod/pg-su-password",
    # etcd over TLS (store_tls tables below).
    "STKEEPER_STORE_ENDPOINTS": "https://10.0.0.11:2379,https://10.0.0.12:2379,https://10.0.0.13:2379",
    "STKEEPER_STORE_CERT_FILE": "/var/lib/postgresql/tls/etcd-client.crt",
    "STKEEPER_STORE_KEY": "/var/lib/postgresql/tls/etcd-client.key",
    "STKEEPER_STORE_CA_FILE": "/var/lib/postgresql/tls/ca.crt",
}
TLS_UNIT_LINES = [
    "Environment=PGSSLCERT=/var/lib/postgresql/tls/postgres.crt",
    "Environment=PGSSLKEY=/var/lib/postgresql/tls/postgres.key",
    "Environment=PGSSLROOTCERT=/var/lib/postgresql/tls/ca.crt",
    "ExecReload=-/usr/lib/postgresql/15/bin/pg_ctl reload -D /var/lib/stolon/pg-prod/postgres",
]
TLS_FILES = ("/var/lib/postgresql/tls/ca.crt", "/var/lib/postgresql/tls/server.crt", "/var/lib/postgresql/tls/server.key")
# What stolon's store client loads once at start: the etcd client pair and the CA.
STORE_TLS_FILES = ("/var/lib/postgresql/tls/etcd-client.crt", "/var/lib/postgresql/tls/etcd-client.key",
                   "/var/lib/postgresql/tls/ca.crt")


@pytest.mark.parametrize(("inv", "expected"), [(INV, HBA_TLS_OFF), (TLS_INV, HBA_TLS_ON)], ids=["tls off", "tls on"])
def test_pg_hba_lines(inv: Inventory, expected: list[str]) -> None:
    assert driver.cluster_spec(inv, {})["pgHBA"] == expected
    (update,) = driver.spec_update_commands(inv, ARCHIVE_PARAMETERS)
    assert json.loads(update.argv[-1])["pgHBA"] == expected


def test_tls_pg_hba_is_hostssl_only_and_the_superuser_never_uses_a_password() -> None:
    lines = [line.split() for line in driver.cluster_spec(TLS_INV, {})["pgHBA"]]
    assert {words[0] for words in lines} == {"hostssl"}
    for kind, database, user, _address, method in lines:
        if database == "replication" or user == "postgres":
            assert method == "cert"
        else:
            assert method == "scram-sha-256"


@pytest.mark.parametrize(("inv", "tls"), [(INV, False), (TLS_INV, True)], ids=["tls off", "tls on"])
def test_tls_parameters_reach_every_way_into_the_spec(inv: Inventory, tls: bool) -> None:
    expected = TLS_PARAMETERS if tls else {}
    spec = json.loads(files_by_path(inv)["/etc/stolon/pg-prod/cluster-spec.json"].content)
    (update,) = driver.spec_update_commands(inv, ARCHIVE_PARAMETERS)
    for parameters in (spec["pgParameters"], json.loads(update.argv[-1])["pgParameters"]):
        assert {k: v for k, v in parameters.items() if k.startswith("ssl")} == expected
        assert parameters["archive_command"] == ARCHIVE_PARAMETERS["archive_command"]


def test_turning_tls_on_drifts_to_the_tls_parameters_and_applies_them() -> None:
    running = driver.parse_config(ok("spec_running.json"))
    drift = driver.settings_drift(TLS_INV, running, ARCHIVE_PARAMETERS)
    assert {k: v for k, v in drift.postgres_parameters.items() if k.startswith("ssl")} == TLS_PARAMETERS
    (patch,) = driver.settings_commands(TLS_INV, drift)
    assert json.loads(patch.argv[-1])["pgParameters"]["ssl_cert_file"] == TLS_PARAMETERS["ssl_cert_file"]


@pytest.mark.parametrize(("inv", "expected"), [(INV, {}), (TLS_INV, TLS_KEEPER_ENV)], ids=["tls off", "tls on"])
def test_tls_keeper_flags(inv: Inventory, expected: dict[str, str]) -> None:
    env = env_values(files_by_path(inv)[KEEPER_ENV].content)
    off = env_values(files_by_path(INV)[KEEPER_ENV].content)
    assert env == {**off, **expected}


@pytest.mark.parametrize(("inv", "expected"), [(INV, []), (TLS_INV, TLS_UNIT_LINES)], ids=["tls off", "tls on"])
def test_tls_keeper_unit(inv: Inventory, expected: list[str]) -> None:
    lines = files_by_path(inv)[KEEPER_UNIT].content.splitlines()
    off = files_by_path(INV)[KEEPER_UNIT].content.splitlines()
    assert [line for line in lines if line not in off] == expected
    assert set(off) <= set(lines)
    assert not any(line.startswith(("Environment=PGSSL", "ExecReload=")) for line in off)


@pytest.mark.parametrize(("inv", "reload_on"), [(INV, ()), (TLS_INV, TLS_FILES)], ids=["tls off", "tls on"])
def test_tls_keeper_reloads_on_the_certificate_files(inv: Inventory, reload_on: tuple[str, ...]) -> None:
    units = {u.name: u for u in driver.host_units(inv, inv.host("db-1"))}
    assert set(units["stolon-keeper-pg-prod.service"].reload_on) == set(reload_on)
    # A reload that only restarts the keeper would not be one: the restart inputs are unchanged,
    # but for the store client's files (it loads them once, at start).
    store_tls = STORE_TLS_FILES if inv.cluster.tls.enabled else ()
    assert units["stolon-keeper-pg-prod.service"].restart_on == (
        *driver.host_units(INV, INV.host("db-1"))[0].restart_on, *store_tls)
    assert all(u.reload_on == () for name, u in units.items() if name != "stolon-keeper-pg-prod.service")


@pytest.mark.parametrize(("inv", "needs"), [(INV, True), (TLS_INV, False)], ids=["tls off", "tls on"])
def test_socket_login_follows_the_keepers_local_line(inv: Inventory, needs: bool) -> None:
    assert driver.socket_needs_password(inv) is needs


TLS_REFUSALS = [
    *[({"pgParameters": {name: "x"}}, {}, f"{P}.pgParameters.{name}: set by bouwsteen while cluster.tls.enabled")
      for name in TLS_NAMES],
    ({"pgParameters": {"SSL": "off"}}, {}, f"{P}.pgParameters.SSL: set by bouwsteen"),
    ({"pgParameters": {"ssl": None}}, {}, f"{P}.pgParameters.ssl: set by bouwsteen"),
    ({"pgParameters": None}, {}, f"{P}.pgParameters: null would drop the TLS parameters"),
    ({"pgHBA": ["hostssl all all 10.0.8.0/24 scram-sha-256", "host all all 10.0.7.0/24 md5"]}, {},
     f"{P}.pgHBA[1]: a 'host' entry while cluster.tls.enabled is true"),
    ({"pgHBA": ["hostnossl all all 10.0.7.0/24 md5"]}, {}, f"{P}.pgHBA[0]: a 'hostnossl' entry"),
    ({}, {"ssl_ca_file": "/etc/other-ca.crt"}, "cluster.postgres.parameters.ssl_ca_file: set by bouwsteen"),
]


@pytest.mark.parametrize(("cluster_spec", "parameters", "message"), TLS_REFUSALS)
def test_tls_overrides_are_refused_naming_the_field(cluster_spec: dict[str, Any], parameters: dict[str, str],
                                                    message: str) -> None:
    tls_on = make_inventory(cluster_spec, tls={"enabled": True},
                            postgres={"version": 15, "parameters": {"max_connections": "200", **parameters}})
    with pytest.raises(HaSpecError) as raised:
        driver.validate(tls_on)
    assert message in str(raised.value)
    for render in (
        lambda: driver.host_files(tls_on, tls_on.host("db-1"), SECRETS, ARCHIVE_PARAMETERS),
        lambda: driver.spec_update_commands(tls_on, ARCHIVE_PARAMETERS),
    ):
        with pytest.raises(HaSpecError):
            render()
    # With TLS off they are the user's own settings, as before.
    driver.validate(make_inventory(cluster_spec, postgres={"version": 15, "parameters": {"max_connections": "200",
                                                                                         **parameters}}))


@pytest.mark.parametrize(
    ("settings", "refused"),
    [
        (HaSettings(postgres_parameters={"ssl": "off"}), "settings.postgres_parameters.ssl: 'off'"),
        (HaSettings(postgres_parameters={"ssl_key_file": "/tmp/k"}), "settings.postgres_parameters.ssl_key_file"),
        (HaSettings(postgres_parameters={"ssl": "true", "ssl_ca_file": TLS_PARAMETERS["ssl_ca_file"]}), None),
    ],
)
def test_tls_settings_cannot_undo_tls(settings: HaSettings, refused: str | None) -> None:
    if refused is None:
        assert driver.settings_commands(TLS_INV, settings)
    else:
        with pytest.raises(HaSpecError, match=refused):
            driver.settings_commands(TLS_INV, settings)
    assert driver.settings_commands(INV, settings)  # TLS off: the user's own settings


def test_tls_archive_parameters_cannot_carry_tls_settings() -> None:
    with pytest.raises(HaSpecError, match=r"archive_parameters\.ssl: set by bouwsteen"):
        driver.cluster_spec(TLS_INV, {**ARCHIVE_PARAMETERS, "ssl": "off"})


@pytest.mark.parametrize(("inv", "refused"), [(INV, False), (TLS_INV, True)], ids=["tls off", "tls on"])
def test_tls_needs_the_superuser_to_be_the_os_user(inv: Inventory, refused: bool) -> None:
    other = DbSecrets(superuser="dba", superuser_password=SU_PASSWORD,
                      replication_user="replicator", replication_password=REPL_PASSWORD)
    renders = (lambda: driver.host_files(inv, inv.host("db-1"), other, ARCHIVE_PARAMETERS),
               lambda: driver.bootstrap_commands(inv, other, ARCHIVE_PARAMETERS))
    for render in renders:
        if refused:
            with pytest.raises(HaSpecError, match=r"secrets\.superuser: must be 'postgres' while cluster\.tls\.enabled"):
                render()
        else:
            assert render()


def _test_ca() -> ClusterCA:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pg-prod test CA")])
    now = dt.datetime.now(dt.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return ClusterCA(certificate.public_bytes(serialization.Encoding.PEM).decode(),
                     key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()).decode())


# ---------------------------------------------------------------- etcd over TLS
# stolon's common flags (cmd/common.go, v0.17.0, master and the pgvillage fork): --store-endpoints
# (an https:// scheme turns TLS on), --store-cert-file, --store-key (no -file), --store-ca-file; the
# env form is <PREFIX>_<FLAG upper-cased, '-' -> '_'> (internal/flagutil/env.go).

HTTP_ENDPOINTS = "http://10.0.0.11:2379,http://10.0.0.12:2379,http://10.0.0.13:2379"
HTTPS_ENDPOINTS = "https://10.0.0.11:2379,https://10.0.0.12:2379,https://10.0.0.13:2379"
STORE_TLS_ENV = {
    "STORE_CERT_FILE": "/var/lib/postgresql/tls/etcd-client.crt",
    "STORE_KEY": "/var/lib/postgresql/tls/etcd-client.key",
    "STORE_CA_FILE": "/var/lib/postgresql/tls/ca.crt",
}
STORE_TLS_ARGV = (
    "--store-cert-file", "/var/lib/postgresql/tls/etcd-client.crt",
    "--store-key", "/var/lib/postgresql/tls/etcd-client.key",
    "--store-ca-file", "/var/lib/postgresql/tls/ca.crt",
)
ENV_FILES = [
    ("STKEEPER", "/etc/sysconfig/stolon-stkeeper-pg-prod"),
    ("STSENTINEL", "/etc/sysconfig/stolon-stsentinel-pg-prod"),
    ("STPROXY", "/etc/sysconfig/stolon-stproxy-pg-prod"),
]
UNITS = ["stolon-keeper-pg-prod.service", "stolon-sentinel-pg-prod.service", "stolon-proxy-pg-prod.service"]


def every_stolonctl_command(inv: Inventory) -> dict[str, Command]:
    """Every stolonctl command the driver returns, by what it does."""
    view = view_of("status_healthy.json", "clusterdata_healthy.json")
    status, clusterdata = driver.status_commands(inv)
    (bootstrap,) = driver.bootstrap_commands(inv, SECRETS, ARCHIVE_PARAMETERS)
    (switchover,) = driver.switchover_commands(inv, view, "db-2")
    (failover,) = driver.failover_commands(inv, view, "db-2")
    (settings,) = driver.settings_commands(inv, HaSettings(postgres_parameters={"work_mem": "8MB"}))
    (spec_update,) = driver.spec_update_commands(inv, ARCHIVE_PARAMETERS)
    (membership,) = driver.membership_commands(inv, ARCHIVE_PARAMETERS)
    return {
        "status": status, "clusterdata read": clusterdata, "init": bootstrap, "failkeeper (switchover)": switchover,
        "failkeeper (failover)": failover, "update (settings)": settings, "update (spec)": spec_update,
        "update (membership)": membership, "spec": driver.show_config_command(inv),
    }


def stolonctl_root_flags(command: Command) -> tuple[str, ...]:
    """The root flags of a stolonctl command: what follows the binary up to the subcommand."""
    argv = command.argv[command.argv.index(STOLONCTL) + 1:]
    # init's script gets the bare root flags as its last arguments.
    end = next((i for i in range(0, len(argv), 2) if not argv[i].startswith("--")), len(argv))
    return argv[:end]


@pytest.mark.parametrize(("prefix", "path"), ENV_FILES, ids=[p for p, _ in ENV_FILES])
@pytest.mark.parametrize(("inv", "endpoints", "tls_env"), [(INV, HTTP_ENDPOINTS, {}), (TLS_INV, HTTPS_ENDPOINTS, STORE_TLS_ENV)],
                         ids=["tls off", "tls on"])
def test_store_tls_in_every_env_file(inv: Inventory, endpoints: str, tls_env: dict[str, str], prefix: str,
                                     path: str) -> None:
    env = env_values(files_by_path(inv)[path].content)
    assert env[f"{prefix}_STORE_ENDPOINTS"] == endpoints
    assert {k: v for k, v in env.items() if k.startswith(f"{prefix}_STORE_") and k.endswith(("_FILE", "_KEY"))} == {
        f"{prefix}_{name}": value for name, value in tls_env.items()}
    if prefix != "STKEEPER":  # the keeper's other TLS flags: test_tls_keeper_flags
        off = env_values(files_by_path(INV)[path].content)
        assert env == {**off, f"{prefix}_STORE_ENDPOINTS": endpoints, **{f"{prefix}_{k}": v for k, v in tls_env.items()}}


def test_store_tls_off_leaves_the_env_files_as_they_were() -> None:
    for _, path in ENV_FILES:
        assert "STORE_CERT_FILE" not in files_by_path(INV)[path].content
        assert "https://" not in files_by_path(INV)[path].content


@pytest.mark.parametrize("what", list(every_stolonctl_command(INV)))
@pytest.mark.parametrize(("inv", "endpoints", "tls_argv"), [(INV, HTTP_ENDPOINTS, ()), (TLS_INV, HTTPS_ENDPOINTS, STORE_TLS_ARGV)],
                         ids=["tls off", "tls on"])
def test_store_tls_in_every_stolonctl_command(inv: Inventory, endpoints: str, tls_argv: tuple[str, ...],
                                              what: str) -> None:
    command = every_stolonctl_command(inv)[what]
    # stolonctl takes only root flags from its environment: the command line carries them all.
    assert stolonctl_root_flags(command) == (
        "--cluster-name", "pg-prod", "--store-backend", "etcdv3", "--store-endpoints", endpoints,
        "--store-prefix", "stolon/cluster", *tls_argv,
    )
    assert command.env == ()
    # Run as the session's root, which can read the postgres-owned 0600 key.
    assert command.user is None
    # Otherwise the command is the TLS-off one (a spec patch with TLS on also carries the ssl
    # parameters and hostssl lines: tested above, so the patch document is left out here).
    off = every_stolonctl_command(INV)[what]
    patch = slice(None, -1) if what in ("update (spec)", "update (membership)") else slice(None)
    stripped = [a.replace("https://", "http://") for a in command.argv if a not in STORE_TLS_ARGV]
    assert stripped[patch] == list(off.argv)[patch]


def test_store_tls_off_commands_keep_their_root_flags() -> None:
    for command in every_stolonctl_command(INV).values():
        assert ROOT_FLAGS in command.render()
        assert "--store-cert-file" not in command.argv and "--store-key" not in command.argv


def test_store_tls_init_script_passes_the_flags_to_both_stolonctl_calls() -> None:
    # The script runs `"$@" clusterdata read` and `exec "$@" init ...`: both take the flags from its args.
    (bootstrap,) = driver.bootstrap_commands(TLS_INV, SECRETS, ARCHIVE_PARAMETERS)
    script_text = bootstrap.argv[bootstrap.argv.index("-c") + 1]
    assert script_text.count('"$@"') == 2
    assert bootstrap.argv[-len(STORE_TLS_ARGV):] == STORE_TLS_ARGV


@pytest.mark.parametrize("unit", UNITS)
@pytest.mark.parametrize(("inv", "store_tls"), [(INV, ()), (TLS_INV, STORE_TLS_FILES)], ids=["tls off", "tls on"])
def test_store_tls_units_restart_on_the_etcd_client_pair_and_ca(inv: Inventory, store_tls: tuple[str, ...],
                                                                 unit: str) -> None:
    units = {u.name: u for u in driver.host_units(inv, inv.host("db-1"))}
    off = {u.name: u for u in driver.host_units(INV, INV.host("db-1"))}
    # Loaded once when the store client is made: a restart, never only a reload.
    assert units[unit].restart_on == (*off[unit].restart_on, *store_tls)
    expected_reload = TLS_FILES if inv.cluster.tls.enabled and unit.startswith("stolon-keeper") else ()
    assert set(units[unit].reload_on) == set(expected_reload)


def test_store_tls_files_are_installed_and_readable_by_every_component() -> None:
    """The units run as postgres; the pair the flags name is on every database host, postgres's."""
    for name in ("db-1", "db-2", "db-3"):
        host = TLS_INV.host(name)
        files = {f.path: f for f in db_files(TLS_INV, host, ClusterSecrets(db=SECRETS, store=None, ca=_test_ca()))}
        for unit in driver.host_units(TLS_INV, host):
            assert set(unit.restart_on + unit.reload_on) <= set(files), unit.name
        for path in STORE_TLS_FILES:
            assert files[path].owner == "postgres"
        assert files["/var/lib/postgresql/tls/etcd-client.key"].mode == 0o600
        for component in ("keeper", "sentinel", "proxy"):
            assert "User=postgres" in files[driver.unit_path(TLS_INV, component)].content.splitlines()


def test_tls_keeper_points_at_files_its_layer_writes() -> None:
    """As test_driver_parity's unit check, with TLS on: what the keeper reloads on and what its
    environment names are files the database host's layer installs."""
    host = TLS_INV.host("db-2")
    files = {f.path: f for f in db_files(TLS_INV, host, ClusterSecrets(db=SECRETS, store=None, ca=_test_ca()))}
    keeper = {u.name: u for u in driver.host_units(TLS_INV, host)}["stolon-keeper-pg-prod.service"]
    assert set(keeper.restart_on + keeper.reload_on) <= set(files)
    named = [line.split("=", 2)[2] for line in files[KEEPER_UNIT].content.splitlines()
             if line.startswith("Environment=PGSSL")]
    assert len(named) == 3 and set(named) <= set(files)
    assert files["/var/lib/postgresql/tls/postgres.key"].mode == 0o600  # libpq refuses a readable key


def test_restart_is_the_keepers_unit_restarted() -> None:
    (restart,) = driver.restart_commands(INV, "db-2")
    assert restart.argv == ("systemctl", "restart", driver.unit_name(INV, "keeper"))
    assert restart.timeout >= 60


def test_managed_parameters_name_the_keepers_own_and_the_spec_values() -> None:
    managed = driver.managed_parameters(INV, {"archive_mode": "on"})
    assert managed["archive_mode"] == "on"
    # The keeper's own: no value may be given at all.
    assert managed["listen_addresses"] is None and managed["max_wal_senders"] is None
    assert "work_mem" not in managed
