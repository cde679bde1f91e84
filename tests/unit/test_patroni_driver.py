"""tasks/adapters/ha/patroni.py: rendered config, status parsing on recorded patronictl output, settings."""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from blocks.inventory import Inventory, parse_inventory
from tasks.adapters.commands import CommandResult
from tasks.adapters.ha.base import (
    ClusterView,
    DbSecrets,
    HaSettings,
    HaSpecError,
    HaStatusError,
    Member,
)
from tasks.adapters.ha.patroni import CONFIG_PATH, PatroniDriver
from tasks.adapters.haproxy import HAPROXY_CFG

SECRETS = DbSecrets(
    superuser="postgres",
    superuser_password="S3cret-su",
    replication_user="replicator",
    replication_password="S3cret-repl",
    rest_api_password="S3cret-rest",
)
ADMIN_NETWORKS = ["172.29.66.0/28", "10.20.0.0/16"]
ARCHIVE = {
    "archive_mode": "on",
    "archive_command": "pgbackrest --stanza=lab archive-push %p",
    "archive_timeout": "60",
}

driver = PatroniDriver()


def make_inventory(**cluster: Any) -> Inventory:
    base: dict[str, Any] = {
        "name": "lab",
        "network": "172.29.66.0/24",
        "routing": {"vip": "172.29.66.100"},
        "admin_networks": ADMIN_NETWORKS,
        "object_store": {"host": "backup1", "endpoint": "https://backup1.bouwsteen.lab:9000", "bucket": "bouwsteen"},
    }
    base.update(cluster)
    return parse_inventory({
        "cluster": base,
        "hosts": [
            {"name": "pg1", "address": "172.29.66.11", "roles": ["db"]},
            {"name": "pg2", "address": "172.29.66.12", "roles": ["db"]},
            {"name": "pg3", "address": "172.29.66.13", "roles": ["db"]},
            {"name": "pg4", "address": "172.29.66.14", "roles": []},
            {"name": "backup1", "address": "172.29.66.21", "roles": ["backup"]},
            {"name": "router1", "address": "172.29.66.31", "roles": ["router"]},
            {"name": "router2", "address": "172.29.66.32", "roles": ["router"]},
            {"name": "restore1", "address": "172.29.66.41", "roles": ["restore"]},
        ],
    })


INV = make_inventory()


def rendered(host: str = "pg2", secrets: DbSecrets = SECRETS, inv: Inventory = INV, extra: dict | None = None) -> dict:
    text = driver.render_config(inv, inv.host(host), secrets, ARCHIVE if extra is None else extra)
    assert text.startswith("# Managed by bouwsteen")
    return yaml.safe_load(text)


# ------------------------------------------------------------------------------ render_config


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (("scope",), "lab"),
        (("name",), "pg2"),
        (("namespace",), "/bouwsteen/patroni/"),
        (("etcd3", "hosts"), ["172.29.66.11:2379", "172.29.66.12:2379", "172.29.66.13:2379"]),
        (("etcd3", "protocol"), "http"),
        (("restapi", "listen"), "172.29.66.12:8008"),
        (("restapi", "connect_address"), "172.29.66.12:8008"),
        (("restapi", "authentication"), {"username": "patroni", "password": "S3cret-rest"}),
        (("ctl",), {"insecure": False}),
        (("postgresql", "listen"), "172.29.66.12,127.0.0.1:5432"),
        (("postgresql", "connect_address"), "172.29.66.12:5432"),
        (("postgresql", "data_dir"), "/var/lib/postgresql/15/main"),
        (("postgresql", "bin_dir"), "/usr/lib/postgresql/15/bin"),
        (("postgresql", "use_unix_socket"), True),
        (("postgresql", "use_unix_socket_repl"), False),
        (("postgresql", "authentication", "superuser"), {"username": "postgres", "password": "S3cret-su"}),
        (("postgresql", "authentication", "replication"), {"username": "replicator", "password": "S3cret-repl"}),
        (("bootstrap", "dcs", "ttl"), 20),
        (("bootstrap", "dcs", "loop_wait"), 2),
        (("bootstrap", "dcs", "retry_timeout"), 5),
        (("bootstrap", "dcs", "synchronous_mode"), False),
        (("bootstrap", "dcs", "postgresql", "parameters", "archive_command"), "pgbackrest --stanza=lab archive-push %p"),
        (("bootstrap", "dcs", "postgresql", "parameters", "wal_level"), "replica"),
        (("bootstrap", "dcs", "postgresql", "parameters", "password_encryption"), "scram-sha-256"),
        (("bootstrap", "dcs", "postgresql", "use_pg_rewind"), True),
    ],
    ids=lambda v: ".".join(v) if isinstance(v, tuple) else None,
)
def test_render_config_values(path: tuple[str, ...], expected: Any) -> None:
    node: Any = rendered()
    for key in path:
        node = node[key]
    assert node == expected


def test_namespace_is_under_the_etcd_prefix() -> None:
    config = rendered()
    assert config["namespace"].startswith(INV.cluster.etcd.prefix + "/")
    # Patroni keeps its keys at <namespace><scope>/: exactly the prefix the driver reports.
    assert config["namespace"] + config["scope"] + "/" == driver.etcd_prefix(INV) == "/bouwsteen/patroni/lab/"


def test_custom_etcd_prefix_and_ports() -> None:
    inv = make_inventory(etcd={"prefix": "/pg/prod", "client_port": 12379}, postgres={"port": 6432},
                         patroni={"rest_port": 18008})
    config = rendered("pg1", inv=inv)
    assert config["namespace"] == "/pg/prod/patroni/"
    assert config["etcd3"]["hosts"] == ["172.29.66.11:12379", "172.29.66.12:12379", "172.29.66.13:12379"]
    assert config["postgresql"]["listen"] == "172.29.66.11,127.0.0.1:6432"
    assert config["restapi"]["listen"] == "172.29.66.11:18008"


@pytest.mark.parametrize("host", ["pg1", "pg2", "pg3"])
def test_listen_includes_host_address(host: str) -> None:
    config = rendered(host)
    address = str(INV.host(host).address)
    assert address in config["postgresql"]["listen"].split(":")[0].split(",")
    assert "0.0.0.0" not in config["postgresql"]["listen"]
    assert "*" not in config["postgresql"]["listen"]


def hba_lines(config: dict | None = None) -> list[str]:
    return (config or rendered())["postgresql"]["pg_hba"]


def test_pg_hba_only_cluster_hosts_and_admin_networks() -> None:
    # 127.0.0.1: Patroni's own replication connection to its local PostgreSQL.
    allowed = {f"{h.address}/32" for h in INV.hosts} | set(ADMIN_NETWORKS) | {"127.0.0.1/32"}
    lines = hba_lines()
    assert lines, "no pg_hba lines"
    for line in lines:
        fields = line.split()
        if fields[0] == "local":
            assert fields[-1] == "peer", line
            continue
        assert fields[0] == "host", line
        assert fields[3] in allowed, line
        assert ipaddress.IPv4Network(fields[3]).num_addresses <= 2 ** 16
        assert fields[4] == "scram-sha-256", line
    text = "\n".join(lines)
    for forbidden in ("0.0.0.0/0", "trust", "md5", "password", "::/0", " all all "):
        assert forbidden not in text, forbidden


@pytest.mark.parametrize(
    ("line", "present"),
    [
        ("local all postgres peer", True),
        ("local replication postgres peer", True),
        ("host replication replicator 127.0.0.1/32 scram-sha-256", True),
        ("host replication replicator 172.29.66.11/32 scram-sha-256", True),
        ("host replication replicator 172.29.66.13/32 scram-sha-256", True),
        ("host all postgres 172.29.66.12/32 scram-sha-256", True),
        ("host app all 172.29.66.13/32 scram-sha-256", True),
        ("host all postgres 172.29.66.41/32 scram-sha-256", True),  # restore host
        ("host app app 172.29.66.31/32 scram-sha-256", True),  # router: the application's clients
        ("host postgres pgroute66 172.29.66.32/32 scram-sha-256", True),  # router: the detector's probes
        ("host app all 172.29.66.31/32 scram-sha-256", False),  # no other role through a router
        ("host postgres all 172.29.66.32/32 scram-sha-256", False),
        ("host all postgres 10.20.0.0/16 scram-sha-256", True),  # admin network
        ("host app all 172.29.66.0/28 scram-sha-256", True),
        ("host replication replicator 172.29.66.31/32 scram-sha-256", False),  # routers never replicate
        ("host all postgres 172.29.66.31/32 scram-sha-256", False),  # routers are not superuser
        ("host replication replicator 172.29.66.14/32 scram-sha-256", False),  # pg4 is not a db host yet
    ],
)
def test_pg_hba_lines(line: str, present: bool) -> None:
    assert (line in hba_lines()) is present


def test_pg_hba_no_address_of_backup_host() -> None:
    assert not any("172.29.66.21" in line for line in hba_lines())


def test_pg_hba_follows_with_db_host() -> None:
    inv = INV.with_db_host("pg4")
    lines = driver.pg_hba(inv, SECRETS)
    assert "host replication replicator 172.29.66.14/32 scram-sha-256" in lines


@pytest.mark.parametrize(
    "password",
    ["S3cret-su", "p@ss: #word", "'quoted'", '"dq"', "yes", "null", "123", "- dash", "a\\b", "ünï €"],
)
def test_passwords_survive_yaml(password: str) -> None:
    secrets = DbSecrets("postgres", password, "replicator", password + "-r", password + "-api")
    config = rendered(secrets=secrets)
    assert config["postgresql"]["authentication"]["superuser"]["password"] == password
    assert config["postgresql"]["authentication"]["replication"]["password"] == password + "-r"
    assert config["restapi"]["authentication"]["password"] == password + "-api"


def test_no_rest_api_password_no_authentication() -> None:
    secrets = DbSecrets("postgres", "S3cret-su", "replicator", "S3cret-repl")
    config = rendered(secrets=secrets)
    assert "authentication" not in config["restapi"]
    assert "ctl" not in config


def test_synchronous_replication_goes_to_dcs() -> None:
    assert rendered(inv=make_inventory(postgres={"synchronous_replication": True}))["bootstrap"]["dcs"]["synchronous_mode"] is True


def test_host_files_config_is_secret() -> None:
    files = driver.host_files(INV, INV.host("pg1"), SECRETS, ARCHIVE)
    assert [f.path for f in files] == [CONFIG_PATH, HAPROXY_CFG]
    f = files[0]
    assert (f.path, f.owner, f.group, f.mode, f.secret) == (CONFIG_PATH, "postgres", "postgres", 0o600, True)
    assert f.content == driver.render_config(INV, INV.host("pg1"), SECRETS, ARCHIVE)
    assert "S3cret-su" in f.content and "S3cret-repl" in f.content and "S3cret-rest" in f.content


def test_host_units_reload_on_config() -> None:
    patroni, proxy = driver.host_units(INV, INV.host("pg1"))
    assert patroni.name == "patroni.service"
    assert patroni.reload_on == (CONFIG_PATH,)
    assert patroni.restart_on == ()
    # A changed HAProxy file is reloaded, never restarted: clients on the port stay connected.
    assert (proxy.name, proxy.reload_on, proxy.restart_on) == ("haproxy.service", (HAPROXY_CFG,), ())


def test_packages() -> None:
    assert driver.packages(INV) == ["postgresql-15", "postgresql-contrib", "patroni", "haproxy"]


PG1_PRIMARY_PROXY = """\
# Managed by bouwsteen (build_cluster / add_standby): port 25432 leads to the primary. Local edits are overwritten.
global
    log /dev/log local0
    maxconn 4096
    user haproxy
    group haproxy
    stats socket /run/haproxy/admin.sock mode 660 level admin expose-fd listeners

defaults
    mode tcp
    log global
    option tcplog
    option dontlognull
    timeout connect 3s
    timeout client 30m
    timeout server 30m
    timeout check 2s
    retries 2

frontend primary
    bind 172.29.66.11:25432
    bind 127.0.0.1:25432
    tcp-request connection reject unless { nbsrv(primary) eq 1 } { nbsrv(out_of_recovery) le 1 }
    default_backend primary

backend primary
    retries 0
    option httpchk
    http-check send meth GET uri /primary
    http-check expect status 200
    http-check expect rstring '"role": *"primary"'
    http-check expect rstring '"state": *"running"'
    default-server inter 500ms fastinter 500ms downinter 500ms fall 2 rise 1 observe layer4 error-limit 1 on-error fail-check on-marked-down shutdown-sessions check port 8008 maxconn 1000
    server pg1 172.29.66.11:5432 downinter 200ms
    server pg2 172.29.66.12:5432
    server pg3 172.29.66.13:5432

backend out_of_recovery
    option httpchk
    http-check send meth GET uri /health
    http-check expect rstring '"role": *"primary"'
    default-server inter 1s fall 1 rise 1 check port 8008
    server pg1 172.29.66.11:5432
    server pg2 172.29.66.12:5432
    server pg3 172.29.66.13:5432
"""


def test_primary_proxy_file_is_haproxy_checking_patroni() -> None:
    (proxy,) = [f for f in driver.host_files(INV, INV.host("pg1"), SECRETS, ARCHIVE) if f.path == HAPROXY_CFG]
    assert (proxy.owner, proxy.mode, proxy.secret) == ("root", 0o644, False)
    assert proxy.content == PG1_PRIMARY_PROXY
    # Every host's file differs only in what it binds and which server it asks more often while
    # down: itself, the one its port waits for after a switchover to it.
    pg2 = driver.render_primary_proxy(INV, INV.host("pg2"))
    assert pg2 == (PG1_PRIMARY_PROXY.replace("bind 172.29.66.11:25432", "bind 172.29.66.12:25432")
                   .replace("172.29.66.11:5432 downinter 200ms", "172.29.66.11:5432")
                   .replace("server pg2 172.29.66.12:5432\n    server pg3", "server pg2 172.29.66.12:5432 downinter 200ms\n    server pg3", 1))


def test_primary_proxy_follows_inventory_ports() -> None:
    inv = make_inventory(patroni={"rest_port": 8118, "proxy_port": 6543}, postgres={"port": 6432})
    text = driver.render_primary_proxy(inv, inv.host("pg1"))
    assert "    bind 127.0.0.1:6543" in text.splitlines()
    assert text.count("check port 8118") == 2
    assert "    server pg3 172.29.66.13:6432" in text.splitlines()
    assert driver.rw_port(inv) == 6543
    assert driver.listeners(inv) == {8118: {"patroni", "python3"}, 6543: {"haproxy"}}


# ------------------------------------------------------------------------------ parse_status

REAL_LIST = [
    {"Cluster": "lab", "Member": "pg1", "Host": "172.29.66.11", "Role": "Leader", "State": "running", "TL": 1},
    {"Cluster": "lab", "Member": "pg2", "Host": "172.29.66.12", "Role": "Replica", "State": "streaming", "TL": 1,
     "Lag in MB": 0},
    {"Cluster": "lab", "Member": "pg3", "Host": "172.29.66.13", "Role": "Sync Standby", "State": "streaming", "TL": 1,
     "Lag in MB": 0},
]


def status(stdout: Any, exit_code: int = 0, stderr: str = "") -> ClusterView:
    text = stdout if isinstance(stdout, str) else json.dumps(stdout)
    return driver.parse_status(INV, [CommandResult(stdout=text, stderr=stderr, exit_code=exit_code)])


def test_status_command() -> None:
    (c,) = driver.status_commands(INV)
    assert c.argv == ("patronictl", "-c", CONFIG_PATH, "list", "-f", "json")
    assert c.user == "postgres" and c.timeout == 20


def test_parse_status_healthy_three_members() -> None:
    view = status(REAL_LIST)
    assert view == ClusterView(
        initialized=True,
        members=(
            Member("pg1", "172.29.66.11", "primary", True, "running", 1, 0),
            Member("pg2", "172.29.66.12", "replica", True, "streaming", 1, 0),
            Member("pg3", "172.29.66.13", "replica", True, "streaming (sync)", 1, 0, synchronous=True),
        ),
        leader="pg1",
    )
    assert [m.name for m in view.primaries] == ["pg1"]
    assert [m.name for m in view.replicas] == ["pg2", "pg3"]


def test_parse_status_empty_list_not_initialized() -> None:
    assert status([]) == ClusterView(initialized=False, members=(), leader=None)


def test_parse_status_members_sorted_by_name() -> None:
    view = status(list(reversed(REAL_LIST)))
    assert [m.name for m in view.members] == ["pg1", "pg2", "pg3"]


def row(**changes: Any) -> dict:
    return {**REAL_LIST[1], **changes}


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"Lag in MB": 1.5}, Member("pg2", "172.29.66.12", "replica", True, "streaming", 1, 1572864)),
        ({"Lag in MB": 16}, Member("pg2", "172.29.66.12", "replica", True, "streaming", 1, 16777216)),
        ({"Lag in MB": "unknown"}, Member("pg2", "172.29.66.12", "replica", True, "streaming", 1, None)),
        ({"State": "running"}, Member("pg2", "172.29.66.12", "replica", True, "running", 1, 0)),
        ({"State": "stopped", "TL": None}, Member("pg2", "172.29.66.12", "replica", False, "stopped", None, 0)),
        ({"State": "starting"}, Member("pg2", "172.29.66.12", "replica", False, "starting", 1, 0)),
        ({"Role": "Quorum Standby"}, Member("pg2", "172.29.66.12", "replica", True, "streaming", 1, 0)),
        ({"Role": "Standby Leader", "State": "running"},
         Member("pg2", "172.29.66.12", "primary", True, "running", 1, 0)),
        ({"Role": "Uninitialized", "State": "running"},
         Member("pg2", "172.29.66.12", "unknown", False, "running", 1, 0)),
        ({"Host": "172.29.66.12:5432"}, Member("pg2", "172.29.66.12", "replica", True, "streaming", 1, 0)),
        # patronictl list adds the column once any member is pending: '*' or ''.
        ({"Pending restart": "*"},
         Member("pg2", "172.29.66.12", "replica", True, "streaming", 1, 0, pending_restart=True)),
        ({"Pending restart": ""}, Member("pg2", "172.29.66.12", "replica", True, "streaming", 1, 0)),
        # The column lists only tags set to something: rolling_upgrade's drain sets both.
        ({"Tags": {"nofailover": True, "nosync": True}},
         Member("pg2", "172.29.66.12", "replica", True, "streaming", 1, 0, drained=True)),
        ({"Tags": {"nosync": True}}, Member("pg2", "172.29.66.12", "replica", True, "streaming", 1, 0)),
        ({"Tags": ""}, Member("pg2", "172.29.66.12", "replica", True, "streaming", 1, 0)),
    ],
    ids=["lag-1.5MB", "lag-16MB", "lag-unknown", "replica-running", "stopped", "starting", "quorum", "standby-leader",
         "unknown-role", "host-with-port", "pending-restart", "not-pending", "drained", "nosync-only", "no-tags"],
)
def test_parse_status_member_variants(changes: dict, expected: Member) -> None:
    view = status([REAL_LIST[0], row(**changes), REAL_LIST[2]])
    assert view.member("pg2") == expected


def test_parse_status_two_leaders_no_leader() -> None:
    view = status([REAL_LIST[0], row(Role="Leader", State="running"), REAL_LIST[2]])
    assert view.leader is None
    assert [m.name for m in view.primaries] == ["pg1", "pg2"]
    assert view.initialized


def test_parse_status_no_leader() -> None:
    view = status([REAL_LIST[1], REAL_LIST[2]])
    assert view.leader is None and view.initialized


@pytest.mark.parametrize(
    ("results", "message"),
    [
        ([CommandResult(stdout=json.dumps([*REAL_LIST, {**REAL_LIST[1], "Member": "pg9", "Host": "172.29.66.19"}]))],
         "patronictl list: member 'pg9' is not in the inventory of lab"),
        ([CommandResult(stdout="+ Cluster: lab ----+\n| Member | Host |\n")], "patronictl list printed no JSON"),
        ([CommandResult(stdout="{not json")], "patronictl list printed no JSON"),
        ([CommandResult(stdout="", stderr="Error: Can not find suitable configuration of distributed configuration store",
                        exit_code=1)],
         "patronictl list failed (1): Error: Can not find suitable configuration of distributed configuration store"),
        ([CommandResult(stdout=json.dumps(REAL_LIST), exit_code=2)], "patronictl list failed (2)"),
        ([], "patronictl list: no output"),
        ([CommandResult(stdout="")], "patronictl list: expected a JSON list of members"),
        ([CommandResult(stdout='{"members": []}')], "patronictl list: expected a JSON list of members"),
        ([CommandResult(stdout=json.dumps([{"Member": "pg1", "State": "running"}]))],
         "patronictl list: member without 'Role'"),
        ([CommandResult(stdout='["pg1"]')], "patronictl list: member without"),
    ],
    ids=["foreign-member", "table-not-json", "broken-json", "exit-1", "exit-2", "no-results", "empty-stdout", "object",
         "missing-role", "row-not-object"],
)
def test_parse_status_errors(results: list[CommandResult], message: str) -> None:
    with pytest.raises(HaStatusError) as info:
        driver.parse_status(INV, results)
    assert str(info.value).startswith(message)


# ------------------------------------------------------------------------------ role changes


def test_switchover_commands() -> None:
    view = status(REAL_LIST)
    (c,) = driver.switchover_commands(INV, view, "pg2")
    assert c.argv == ("patronictl", "-c", CONFIG_PATH, "switchover", "--leader", "pg1", "--candidate", "pg2",
                      "--force", "lab")
    assert c.user == "postgres" and c.timeout == 90
    line = c.render()
    assert "--leader pg1 --candidate pg2 --force" in line
    assert line.startswith("timeout -k 5 90 runuser -u postgres -- patronictl -c /etc/patroni/config.yml switchover")


def test_switchover_without_leader_refused() -> None:
    view = status([REAL_LIST[1], REAL_LIST[2]])
    with pytest.raises(HaStatusError, match="switchover needs a leader"):
        driver.switchover_commands(INV, view, "pg2")


def test_failover_and_reinit_commands() -> None:
    view = status([REAL_LIST[1], REAL_LIST[2]])
    (failover,) = driver.failover_commands(INV, view, "pg3")
    assert failover.argv[3:] == ("failover", "--candidate", "pg3", "--force", "lab")
    (rejoin,) = driver.reinit_commands(INV, view, "pg1")
    assert rejoin.argv[3:] == ("reinit", "--force", "--wait", "lab", "pg1")
    assert rejoin.timeout == 600


@pytest.mark.parametrize(("member", "slot"), [("pg4", "pg4"), ("db-4", "db_4"), ("Node.A", "node_a")])
def test_removed_member_slot_follows_patronis_naming(member: str, slot: str) -> None:
    assert driver.member_removed_commands(INV, member) == []
    assert driver.member_slot(INV, member) == slot
    assert driver.member_data_paths(INV) == [driver.pgdata(INV)]


@pytest.mark.parametrize(("current", "restored"), [({}, "null"), ({"member_slots_ttl": "30min"}, "30min"),
                                                   ({"member_slots_ttl": 600}, "600")])
def test_slot_retention_goes_to_zero_and_back(current: dict, restored: str) -> None:
    (off,), (back,) = driver.slot_retention_commands(INV, current)
    assert off.argv[3:] == ("edit-config", "--force", "--quiet", "-s", "member_slots_ttl=0", "lab")
    assert back.argv[3:] == ("edit-config", "--force", "--quiet", "-s", f"member_slots_ttl={restored}", "lab")


def test_slot_retention_refuses_a_setting_it_cannot_put_back() -> None:
    with pytest.raises(HaStatusError, match="member_slots_ttl"):
        driver.slot_retention_commands(INV, {"member_slots_ttl": "1h; rm -rf /"})


# ------------------------------------------------------------------------------ settings

# `patronictl show-config lab` on the lab after build_cluster (pgBackRest archiving on).
SHOW_CONFIG = (Path(__file__).parent / "fixtures" / "patroni" / "show_config.yml").read_text()


def current(**parameter_changes: Any) -> dict:
    data = driver.parse_config(CommandResult(stdout=SHOW_CONFIG))
    params = data["postgresql"]["parameters"]
    for key, value in parameter_changes.items():
        if value is None:
            params.pop(key, None)
        else:
            params[key] = value
    return data


def with_top(data: dict, **top: Any) -> dict:
    return {**data, **top}


DRIFT = [
    ("identical", INV, current(), ARCHIVE, HaSettings(None, {})),
    ("yaml-bools-normalized", INV, current(hot_standby=True, wal_log_hints=True, archive_mode=True), ARCHIVE,
     HaSettings(None, {})),
    ("case-and-space-insensitive", INV, current(wal_level=" Replica "), ARCHIVE, HaSettings(None, {})),
    ("one-parameter-differs", INV, current(max_wal_senders=5), ARCHIVE, HaSettings(None, {"max_wal_senders": "10"})),
    ("bool-off-vs-on", INV, current(wal_log_hints=False), ARCHIVE, HaSettings(None, {"wal_log_hints": "on"})),
    ("extra-current-parameter-ignored", INV, current(work_mem="4MB"), ARCHIVE, HaSettings(None, {})),
    ("inventory-adds-parameter", make_inventory(postgres={"parameters": {"work_mem": "64MB"}}), current(), ARCHIVE,
     HaSettings(None, {"work_mem": "64MB"})),
    ("inventory-overrides-base", make_inventory(postgres={"parameters": {"max_wal_senders": "20"}}), current(), ARCHIVE,
     HaSettings(None, {"max_wal_senders": "20"})),
    ("archiving-not-yet-on", INV, current(archive_command=None, archive_mode=None, archive_timeout=None), ARCHIVE,
     HaSettings(None, ARCHIVE)),
    ("sync-flip-on", make_inventory(postgres={"synchronous_replication": True}), current(), ARCHIVE,
     HaSettings(True, {})),
    ("sync-flip-off", INV, with_top(current(), synchronous_mode=True), ARCHIVE, HaSettings(False, {})),
    ("sync-missing-means-off", INV, {k: v for k, v in current().items() if k != "synchronous_mode"}, ARCHIVE,
     HaSettings(None, {})),
    ("sync-and-parameter", make_inventory(postgres={"synchronous_replication": True}), current(max_wal_senders=5),
     ARCHIVE, HaSettings(True, {"max_wal_senders": "10"})),
]


@pytest.mark.parametrize(("inv", "cur", "extra", "expected"), [c[1:] for c in DRIFT], ids=[c[0] for c in DRIFT])
def test_settings_drift(inv: Inventory, cur: dict, extra: dict, expected: HaSettings) -> None:
    assert driver.settings_drift(inv, cur, extra) == expected


def test_settings_drift_empty_dcs_wants_everything() -> None:
    drift = driver.settings_drift(INV, {}, ARCHIVE)
    assert drift.synchronous_replication is None
    assert drift.postgres_parameters == driver.dynamic_configuration(INV, ARCHIVE)["postgresql"]["parameters"]
    assert len(drift.postgres_parameters) == 13


@pytest.mark.parametrize(
    ("result", "message"),
    [
        (CommandResult(stdout="", stderr="etcd down", exit_code=1), "patronictl show-config failed: etcd down"),
        (CommandResult(stdout="- a\n- b\n"), "patronictl show-config: not a mapping"),
    ],
)
def test_parse_config_errors(result: CommandResult, message: str) -> None:
    with pytest.raises(HaStatusError, match=message):
        driver.parse_config(result)


def test_parse_config_empty_is_empty_mapping() -> None:
    assert driver.parse_config(CommandResult(stdout="")) == {}


@pytest.mark.parametrize(
    ("settings", "tail"),
    [
        (HaSettings(), None),
        (HaSettings(synchronous_replication=True), ["-s", "synchronous_mode=true"]),
        (HaSettings(synchronous_replication=False), ["-s", "synchronous_mode=false"]),
        (HaSettings(postgres_parameters={"work_mem": "64MB", "max_connections": "200"}),
         ["-p", 'max_connections="200"', "-p", 'work_mem="64MB"']),
        (HaSettings(True, {"archive_command": "pgbackrest --stanza=lab archive-push %p"}),
         ["-s", "synchronous_mode=true", "-p", 'archive_command="pgbackrest --stanza=lab archive-push %p"']),
        # YAML would read these unquoted as a Boolean, a list and a directive.
        (HaSettings(postgres_parameters={"jit": "on", "search_path": "[a, b]", "log_line_prefix": "%m [%p] "}),
         ["-p", 'jit="on"', "-p", 'log_line_prefix="%m [%p] "', "-p", 'search_path="[a, b]"']),
    ],
    ids=["nothing", "sync-on", "sync-off", "params-sorted", "both-with-spaces", "yaml-lookalikes"],
)
def test_settings_commands(settings: HaSettings, tail: list[str] | None) -> None:
    commands = driver.settings_commands(INV, settings)
    if tail is None:
        assert commands == []
        return
    (c,) = commands
    assert list(c.argv) == ["patronictl", "-c", CONFIG_PATH, "edit-config", "--force", "--quiet", *tail, "lab"]
    assert c.user == "postgres"
    assert shlex.split(c.render())[8:] == list(c.argv)
    # What patronictl's apply_config_changes stores: each value read as YAML, the very text.
    pairs = [c.argv[i + 1] for i, a in enumerate(c.argv) if a == "-p"]
    assert {k: yaml.safe_load(v) for k, _, v in (p.partition("=") for p in pairs)} == settings.postgres_parameters


def test_drift_round_trips_into_settings_commands() -> None:
    drift = driver.settings_drift(make_inventory(postgres={"synchronous_replication": True}), current(max_wal_senders=5),
                                  ARCHIVE)
    (c,) = driver.settings_commands(INV, drift)
    assert c.argv[6:] == ("-s", "synchronous_mode=true", "-p", 'max_wal_senders="10"', "lab")


# ------------------------------------------------------------------------------ validate


@pytest.mark.parametrize("reserved", ["port", "listen_addresses", "data_directory", "hba_file", "primary_conninfo"])
def test_validate_refuses_reserved_parameters(reserved: str) -> None:
    inv = make_inventory(postgres={"parameters": {reserved: "x"}})
    with pytest.raises(HaSpecError) as info:
        driver.validate(inv)
    assert str(info.value) == f"cluster.postgres.parameters.{reserved}: managed by Patroni from the inventory; remove it"


@pytest.mark.parametrize(
    ("postgres", "error"),
    [
        ({}, None),
        ({"parameters": {"work_mem": "64MB", "max_connections": "200"}}, None),
        ({"parameters": {"synchronous_commit": "off"}}, None),
        ({"parameters": {"synchronous_commit": "on"}, "synchronous_replication": True}, None),
        ({"parameters": {"synchronous_commit": "off"}, "synchronous_replication": True},
         "cluster.postgres.parameters.synchronous_commit: 'off' defeats synchronous_replication"),
    ],
)
def test_validate_other_parameters(postgres: dict, error: str | None) -> None:
    inv = make_inventory(postgres=postgres)
    if error is None:
        assert driver.validate(inv) is None
    else:
        with pytest.raises(HaSpecError) as info:
            driver.validate(inv)
        assert str(info.value) == error


# ------------------------------------------------------------------------------ change_settings


@pytest.mark.parametrize(("printed", "status", "ok"), [
    ("Success: restart on member pg2", 0, True),
    # patronictl exits 0 on these too: the API's answer is in the text only.
    ("Failed: restart for member pg2, status code=503, (restart failed)", 0, False),
    ("Failed: another restart is already scheduled on member pg2", 0, False),
    ("Error: 'Can not find member pg9'", 1, False),
], ids=["success", "failed", "scheduled", "unknown-member"])
def test_restart_counts_only_patronictls_success_line(printed: str, status: int, ok: bool) -> None:
    import subprocess

    (c,) = driver.restart_commands(INV, "pg2")
    assert c.user == "postgres"
    assert list(c.argv[c.argv.index("bouwsteen") + 1:]) == ["patronictl", "-c", CONFIG_PATH, "restart", "--force",
                                                           "lab", "pg2"]
    script_text = c.argv[c.argv.index("bouwsteen") - 1]
    fake = ["bash", "-c", f"printf '%s\\n' {shlex.quote(printed)}; exit {status}"]
    done = subprocess.run(["bash", "-c", script_text, "bouwsteen", *fake], capture_output=True, text=True, timeout=10)
    assert (done.returncode == 0) is ok
    assert printed in done.stdout


@pytest.mark.parametrize(("paused", "printed", "status", "ok"), [
    (True, "'pause' request sent, waiting until it is recognized by all nodes\nSuccess: cluster management is paused",
     0, True),
    (False, "Success: cluster management is resumed", 0, True),
    # --wait ran out: patronictl still exits 0.
    (True, "pg2 members didn't recognized pause state after 10 seconds", 0, False),
    (True, "Failed: pause cluster management status code=503, (no)", 0, False),
    (True, "Error: Cluster is already paused", 1, False),
    (False, "Success: cluster management is paused", 0, False),  # the other word is no success
], ids=["paused", "resumed", "wait-ran-out", "failed", "already", "wrong-word"])
def test_maintenance_counts_only_patronictls_success_line(paused: bool, printed: str, status: int, ok: bool) -> None:
    import subprocess

    (c,) = driver.maintenance_commands(INV, paused)
    assert c.user == "postgres"
    assert list(c.argv[c.argv.index("bouwsteen") + 1:]) == ["patronictl", "-c", CONFIG_PATH,
                                                           "pause" if paused else "resume", "--wait", "lab"]
    script_text = c.argv[c.argv.index("bouwsteen") - 1]
    fake = ["bash", "-c", f"printf '%s\\n' {shlex.quote(printed)}; exit {status}"]
    done = subprocess.run(["bash", "-c", script_text, "bouwsteen", *fake], capture_output=True, text=True, timeout=10)
    assert (done.returncode == 0) is ok


@pytest.mark.parametrize(("config", "paused"), [
    ({}, False), ({"pause": None}, False), ({"pause": True}, True), ({"pause": "on"}, True),
    ({"pause": "yes"}, True), ({"pause": False}, False), ({"pause": "off"}, False), ({"pause": "maybe"}, False),
])
def test_paused_as_patroni_reads_its_setting(config: dict, paused: bool) -> None:
    assert driver.is_paused(config) is paused


def test_managed_parameters_are_what_bouwsteen_and_patroni_set() -> None:
    managed = driver.managed_parameters(make_inventory(postgres={"parameters": {"Work_Mem": "16MB"}}), ARCHIVE)
    assert managed["work_mem"] == "16MB" and managed["wal_level"] == "replica"
    assert managed["port"] is None and managed["primary_conninfo"] is None
    assert "statement_timeout" not in managed
    assert "synchronous_standby_names" not in managed
    sync = driver.managed_parameters(make_inventory(postgres={"synchronous_replication": True}), ARCHIVE)
    assert sync["synchronous_standby_names"] is None


# ------------------------------------------------------------------------------ drain (rolling_upgrade)

def _as_sed_would(text: str, value: str) -> str:
    # The two substitutions drain_commands' script makes, line by line.
    text = re.sub(r"(?m)^  nofailover: .*$", f"  nofailover: {value}", text)
    return re.sub(r"(?m)^  nosync: .*$", f"  nosync: {value}", text)


def test_drain_edits_only_the_two_tag_lines_of_the_rendered_file() -> None:
    text = driver.render_config(INV, INV.host("pg2"), SECRETS, ARCHIVE)
    drained = _as_sed_would(text, "true")
    changed = [(a, b) for a, b in zip(text.splitlines(), drained.splitlines()) if a != b]
    assert changed == [("  nofailover: false", "  nofailover: true"), ("  nosync: false", "  nosync: true")]
    assert yaml.safe_load(drained)["tags"] == {"nofailover": True, "noloadbalance": False, "clonefrom": False,
                                               "nosync": True}
    # Counted in again, the file is the rendered one byte for byte: build_cluster sees no drift.
    assert _as_sed_would(drained, "false") == text
    (command,) = driver.drain_commands(INV, INV.host("pg2"), True)
    assert list(command.argv[-2:]) == ["/etc/patroni/config.yml", "true"]
