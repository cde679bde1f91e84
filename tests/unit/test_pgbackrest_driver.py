"""tasks/adapters/backup/pgbackrest.py: config, commands and `pgbackrest info` parsing; no binary, no network."""

from __future__ import annotations

import json
import shlex
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from blocks.inventory import Inventory, parse_inventory
from tasks.adapters.backup.base import (
    BackupInfo,
    BackupInputError,
    BackupOutputError,
    StoreSecrets,
)
from tasks.adapters.backup.pgbackrest import CA_PATH, CONFIG_PATH, PgBackRestDriver
from tasks.adapters.commands import CommandResult

ACCESS_KEY = "AKIABOUWSTEEN0001"
SECRET_KEY = "s3cr3t/Key+with=chars"
CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIBfakeCA\n-----END CERTIFICATE-----\n"
SECRETS = StoreSecrets(access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY, ca_certificate=CA_PEM)
UTC = timezone.utc

driver = PgBackRestDriver()


def make_inventory(endpoint: str = "https://backup1.example:9000", **cluster: Any) -> Inventory:
    base: dict[str, Any] = {
        "name": "lab",
        "network": "10.0.0.0/24",
        "object_store": {"host": "backup1", "endpoint": endpoint, "bucket": "bouwsteen"},
    }
    base.update(cluster)
    return parse_inventory({
        "cluster": base,
        "hosts": [
            {"name": "pg1", "address": "10.0.0.11", "roles": ["db"]},
            {"name": "pg2", "address": "10.0.0.12", "roles": ["db"]},
            {"name": "pg3", "address": "10.0.0.13", "roles": ["db"]},
            {"name": "backup1", "address": "10.0.0.20", "roles": ["backup"]},
        ],
    })


INV = make_inventory()


def parse_conf(text: str) -> dict[str, dict[str, str]]:
    """pgbackrest.conf as {section: {key: value}}, refusing duplicate keys."""
    sections: dict[str, dict[str, str]] = {}
    current = None
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        assert current is not None, line
        assert key not in current, f"duplicate {key}"
        current[key] = value
    return sections


# ------------------------------------------------------------------------------ render_config


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("repo1-type", "s3"),
        ("repo1-path", "/lab/pg15"),
        ("repo1-s3-bucket", "bouwsteen"),
        ("repo1-s3-endpoint", "backup1.example"),
        ("repo1-storage-port", "9000"),
        ("repo1-s3-region", "us-east-1"),
        ("repo1-s3-uri-style", "path"),
        ("repo1-s3-key", ACCESS_KEY),
        ("repo1-s3-key-secret", SECRET_KEY),
        ("repo1-storage-ca-file", CA_PATH),
        ("repo1-retention-full", "7"),
        ("repo1-retention-full-type", "count"),
        ("repo1-bundle", "y"),
        ("spool-path", "/var/spool/pgbackrest"),
        ("io-timeout", "10"),
        ("start-fast", "y"),
    ],
)
def test_render_config_global(key: str, value: str) -> None:
    assert parse_conf(driver.render_config(INV, SECRETS))["global"][key] == value


def test_render_config_stanza_section() -> None:
    conf = parse_conf(driver.render_config(INV, SECRETS))
    assert set(conf) == {"global", "lab"}
    assert conf["lab"] == {
        "pg1-path": "/var/lib/postgresql/15/main",
        "pg1-port": "5432",
        "pg1-socket-path": "/var/run/postgresql",
    }


def test_ca_path() -> None:
    assert CA_PATH == "/etc/pgbackrest/object-store-ca.crt"


@pytest.mark.parametrize(
    ("endpoint", "host", "port"),
    [
        ("https://backup1.example:9000", "backup1.example", "9000"),
        ("https://backup1.example:9000/", "backup1.example", "9000"),
        ("https://s3.example", "s3.example", "443"),
        ("https://s3.example/", "s3.example", "443"),
    ],
)
def test_render_config_endpoint(endpoint: str, host: str, port: str) -> None:
    conf = parse_conf(driver.render_config(make_inventory(endpoint), SECRETS))["global"]
    assert (conf["repo1-s3-endpoint"], conf["repo1-storage-port"]) == (host, port)


@pytest.mark.parametrize(
    ("cluster", "repo_path", "data_dir", "port"),
    [
        ({}, "/lab/pg15", "/var/lib/postgresql/15/main", "5432"),
        ({"postgres": {"version": 16, "port": 5433}}, "/lab/pg16", "/var/lib/postgresql/16/main", "5433"),
        ({"name": "prod-2", "postgres": {"data_directory": "/srv/pg"}}, "/prod-2/pg15", "/srv/pg", "5432"),
    ],
)
def test_render_config_repo_path_per_cluster_and_version(cluster: dict, repo_path: str, data_dir: str, port: str) -> None:
    inv = make_inventory(**cluster)
    conf = parse_conf(driver.render_config(inv, SECRETS))
    assert conf["global"]["repo1-path"] == repo_path == driver.repo_path(inv)
    assert conf[inv.cluster.name]["pg1-path"] == data_dir
    assert conf[inv.cluster.name]["pg1-port"] == port


@pytest.mark.parametrize(("cipher", "expected"), [(None, None), ("", None), ("c1pher-Pass", "c1pher-Pass")])
def test_render_config_cipher(cipher: str | None, expected: str | None) -> None:
    secrets = StoreSecrets(ACCESS_KEY, SECRET_KEY, CA_PEM, cipher_pass=cipher)
    conf = parse_conf(driver.render_config(INV, secrets))["global"]
    if expected is None:
        assert "repo1-cipher-type" not in conf and "repo1-cipher-pass" not in conf
    else:
        assert conf["repo1-cipher-type"] == "aes-256-cbc"
        assert conf["repo1-cipher-pass"] == expected


def test_render_config_retention_from_inventory() -> None:
    conf = parse_conf(driver.render_config(make_inventory(backup_retention_full=3), SECRETS))["global"]
    assert conf["repo1-retention-full"] == "3"


def test_render_config_without_object_store() -> None:
    inv = parse_inventory({
        "cluster": {"name": "lab", "network": "10.0.0.0/24"},
        "hosts": [{"name": f"pg{i}", "address": f"10.0.0.1{i}", "roles": ["db"]} for i in (1, 2, 3)],
    })
    with pytest.raises(BackupInputError, match="cluster.object_store: not set"):
        driver.render_config(inv, SECRETS)


def test_host_files() -> None:
    ca, conf = driver.host_files(INV, INV.host("pg1"), SECRETS)
    assert (ca.path, ca.content, ca.owner, ca.mode, ca.secret) == (CA_PATH, CA_PEM, "root", 0o644, False)
    assert (conf.path, conf.owner, conf.group, conf.mode, conf.secret) == (CONFIG_PATH, "postgres", "postgres", 0o600, True)
    assert conf.content == driver.render_config(INV, SECRETS)
    assert SECRET_KEY in conf.content


def test_archive_parameters() -> None:
    assert driver.archive_parameters(INV) == {
        "archive_mode": "on",
        # bounded: a hung object store must not hang archiving (PostgreSQL keeps the segment and retries)
        "archive_command": "/usr/bin/timeout 15 pgbackrest --stanza=lab archive-push %p",
        "archive_timeout": "60",
    }


def test_init_repository_commands() -> None:
    (c,) = driver.init_repository_commands(INV)
    assert c.argv == ("pgbackrest", "--stanza=lab", "stanza-create")
    assert c.user == "postgres"


# ------------------------------------------------------------------------------ backup_command


@pytest.mark.parametrize(
    ("source", "primary", "argv"),
    [
        ("pg1", "pg1", ("pgbackrest", "--stanza=lab", "--annotation=source_host=pg1", "--type=full", "backup")),
        ("pg2", "pg1", (
            "pgbackrest", "--stanza=lab", "--backup-standby", "--pg1-host=10.0.0.11", "--pg1-host-user=postgres",
            "--pg1-path=/var/lib/postgresql/15/main", "--pg1-port=5432", "--pg2-path=/var/lib/postgresql/15/main",
            "--pg2-port=5432", "--pg2-socket-path=/var/run/postgresql", "--annotation=source_host=pg2",
            "--type=full", "backup",
        )),
        ("pg1", "pg3", (
            "pgbackrest", "--stanza=lab", "--backup-standby", "--pg1-host=10.0.0.13", "--pg1-host-user=postgres",
            "--pg1-path=/var/lib/postgresql/15/main", "--pg1-port=5432", "--pg2-path=/var/lib/postgresql/15/main",
            "--pg2-port=5432", "--pg2-socket-path=/var/run/postgresql", "--annotation=source_host=pg1",
            "--type=full", "backup",
        )),
    ],
    ids=["on-primary", "standby-pg2", "standby-pg1-primary-pg3"],
)
def test_backup_command(source: str, primary: str, argv: tuple[str, ...]) -> None:
    c = driver.backup_command(INV, INV.host(source), INV.host(primary))
    assert c.argv == argv
    assert c.user == "postgres"
    assert c.timeout == 6 * 3600
    is_standby = source != primary
    assert ("--backup-standby" in c.argv) is is_standby
    assert any(a.startswith("--pg2-path=") for a in c.argv) is is_standby


@pytest.mark.parametrize(("ssh", "host_port", "wanted"), [
    ({}, None, None),
    ({"port": 2222}, None, "--pg1-host-port=2222"),
    ({"port": 2222}, 2200, "--pg1-host-port=2200"),  # the primary's own port wins
    ({}, 22, None),
], ids=["default", "inventory-port", "host-port", "host-22"])
def test_a_standby_reaches_the_primary_on_its_ssh_port(ssh: dict, host_port: int | None, wanted: str | None) -> None:
    # postgres's known_hosts names a host on another port as [address]:port; pgBackRest must connect there.
    document = make_inventory().model_dump(mode="json")
    document["ssh"] = {**document["ssh"], **ssh}
    document["hosts"][0]["ssh_port"] = host_port
    inv = parse_inventory(document)
    argv = driver.backup_command(inv, inv.host("pg2"), inv.host("pg1")).argv
    assert [a for a in argv if a.startswith("--pg1-host-port")] == ([wanted] if wanted else [])


def test_list_command() -> None:
    c = driver.list_command(INV)
    assert c.argv == ("pgbackrest", "--stanza=lab", "--output=json", "info")
    assert shlex.split(c.render()) == ["timeout", "-k", "5", "120", "runuser", "-u", "postgres", "--", *c.argv]


# ------------------------------------------------------------------------------ parse_list

FULL = {
    "archive": {"start": "000000010000000000000004", "stop": "000000010000000000000004"},
    "backrest": {"format": 5, "version": "2.45"},
    "database": {"id": 1, "repo-key": 1},
    "error": False,
    "info": {"delta": 31563421, "repository": {"delta": 4013245, "size": 4013245}, "size": 31563421},
    "label": "20261127-010000F",
    "link": None,
    "lsn": {"start": "0/4000028", "stop": "0/4000138"},
    "prior": None,
    "reference": None,
    "tablespace": None,
    "timestamp": {"start": 1795741200, "stop": 1795741265},
    "type": "full",
    "annotation": {"source_host": "pg2"},
}
INCR = {
    "archive": {"start": "000000010000000000000009", "stop": "000000010000000000000009"},
    "backrest": {"format": 5, "version": "2.45"},
    "database": {"id": 1, "repo-key": 1},
    "error": True,
    "info": {"delta": 1048576, "repository": {"delta": 131072, "size": 4100000}, "size": 31600000},
    "label": "20261127-010000F_20261128-010000I",
    "link": None,
    "lsn": {"start": "0/9000028", "stop": "0/9000100"},
    "prior": "20261127-010000F",
    "reference": ["20261127-010000F"],
    "tablespace": None,
    "timestamp": {"start": 1795827600, "stop": 1795827642},
    "type": "incr",
}


def info_output(backups: list[dict], code: int = 0, message: str = "ok") -> str:
    return json.dumps([{
        "archive": [{"database": {"id": 1, "repo-key": 1}, "id": "15-1", "max": "000000010000000000000009",
                     "min": "000000010000000000000001"}] if backups else [],
        "backup": backups,
        "cipher": "none",
        "db": [{"id": 1, "repo-key": 1, "system-id": 7301234567890123456, "version": "15"}],
        "name": "lab",
        "repo": [{"cipher": "none", "key": 1, "status": {"code": code, "message": message}}],
        "status": {"code": code, "lock": {"backup": {"held": False}}, "message": message},
    }], indent=2)


def test_parse_list_realistic_sample() -> None:
    # newest first in the input: the parser sorts oldest first
    backups = driver.parse_list(CommandResult(stdout=info_output([INCR, FULL])))
    assert backups == [
        BackupInfo(
            name="20261127-010000F",
            kind="full",
            start_time=datetime(2026, 11, 27, 1, 0, 0, tzinfo=UTC),
            finish_time=datetime(2026, 11, 27, 1, 1, 5, tzinfo=UTC),
            start_lsn="0/4000028",
            finish_lsn="0/4000138",
            start_wal="000000010000000000000004",
            stop_wal="000000010000000000000004",
            database_bytes=31563421,
            stored_bytes=4013245,
            source_host="pg2",
            error=False,
        ),
        BackupInfo(
            name="20261127-010000F_20261128-010000I",
            kind="incr",
            start_time=datetime(2026, 11, 28, 1, 0, 0, tzinfo=UTC),
            finish_time=datetime(2026, 11, 28, 1, 0, 42, tzinfo=UTC),
            start_lsn="0/9000028",
            finish_lsn="0/9000100",
            start_wal="000000010000000000000009",
            stop_wal="000000010000000000000009",
            database_bytes=31600000,
            stored_bytes=131072,
            source_host=None,
            error=True,
        ),
    ]
    assert backups[0].duration_seconds == 65.0


@pytest.mark.parametrize(("type_", "kind"), [("full", "full"), ("diff", "diff"), ("incr", "incr")])
def test_parse_list_kinds(type_: str, kind: str) -> None:
    (backup,) = driver.parse_list(CommandResult(stdout=info_output([{**FULL, "type": type_}])))
    assert backup.kind == kind


def test_parse_list_no_valid_backups() -> None:
    assert driver.parse_list(CommandResult(stdout=info_output([], code=2, message="no valid backups"))) == []


@pytest.mark.parametrize(
    ("result", "message"),
    [
        (CommandResult(stdout="not json"), "pgbackrest info printed no JSON"),
        (CommandResult(stdout=""), "pgbackrest info printed no JSON"),
        (CommandResult(stdout="[]"), "pgbackrest info: expected a list with one stanza"),
        (CommandResult(stdout="{}"), "pgbackrest info: expected a list with one stanza"),
        (CommandResult(stdout="null"), "pgbackrest info: expected a list with one stanza"),
        (CommandResult(stdout="", stderr="ERROR: [037]: info command requires option: stanza", exit_code=37),
         "pgbackrest info failed (37): ERROR: [037]: info command requires option: stanza"),
        (CommandResult(stdout=info_output([], code=1, message="missing stanza path")),
         "pgbackrest info: stanza status 1: missing stanza path"),
        (CommandResult(stdout=info_output([FULL], code=99, message="other")), "pgbackrest info: stanza status 99: other"),
        (CommandResult(stdout=info_output([{k: v for k, v in FULL.items() if k != "timestamp"}])),
         "pgbackrest info: backup entry without 'timestamp'"),
        (CommandResult(stdout=info_output([{k: v for k, v in FULL.items() if k != "label"}])),
         "pgbackrest info: backup entry without 'label'"),
        (CommandResult(stdout=info_output([{**FULL, "timestamp": {"start": "yesterday", "stop": 1}}])),
         "pgbackrest info: backup entry without"),
    ],
    ids=["text", "empty", "empty-list", "object", "null", "exit-37", "status-1", "status-99", "no-timestamp",
         "no-label", "bad-timestamp"],
)
def test_parse_list_garbage(result: CommandResult, message: str) -> None:
    with pytest.raises(BackupOutputError) as info:
        driver.parse_list(result)
    assert str(info.value).startswith(message)


# ------------------------------------------------------------------------------ retention


@pytest.mark.parametrize("keep", [0, -1, 1.5, "3", None])
def test_retention_rejects(keep: Any) -> None:
    with pytest.raises(BackupInputError, match="keep_full: must be an integer ≥ 1"):
        driver.retention_commands(INV, keep)


@pytest.mark.parametrize("keep", [1, 3, 30])
def test_retention_command(keep: int) -> None:
    (c,) = driver.retention_commands(INV, keep)
    assert c.argv == ("pgbackrest", "--stanza=lab", f"--repo1-retention-full={keep}", "expire")
    assert c.user == "postgres"


# ------------------------------------------------------------------------------ restore

TARGET = "/var/lib/postgresql/restore"
CET = timezone(timedelta(hours=1))


@pytest.mark.parametrize(
    ("backup", "target_time", "tail"),
    [
        (None, None, ["--type=default"]),
        ("20261127-010000F", None, ["--set=20261127-010000F", "--type=default"]),
        (None, datetime(2026, 11, 27, 10, 30, 15, tzinfo=UTC),
         ["--type=time", "--target=2026-11-27 10:30:15.000000+00", "--target-action=promote"]),
        ("20261127-010000F", datetime(2026, 11, 27, 10, 30, 15, 250000, tzinfo=CET),
         ["--set=20261127-010000F", "--type=time", "--target=2026-11-27 09:30:15.250000+00",
          "--target-action=promote"]),
        ("20261127-010000F_20261128-010000I", datetime(2026, 11, 28, 0, 30, tzinfo=CET),
         ["--set=20261127-010000F_20261128-010000I", "--type=time", "--target=2026-11-27 23:30:00.000000+00",
          "--target-action=promote"]),
    ],
    ids=["latest", "named", "time-utc", "time-cet", "time-crosses-midnight"],
)
def test_restore_commands(backup: str | None, target_time: datetime | None, tail: list[str]) -> None:
    (c,) = driver.restore_commands(INV, TARGET, backup, target_time)
    assert list(c.argv) == ["pgbackrest", "--stanza=lab", f"--pg1-path={TARGET}", "--archive-mode=off", *tail, "restore"]
    assert c.user == "postgres"
    line = c.render()
    assert "--archive-mode=off" in line
    if target_time is not None:
        # the space inside the target stays inside one quoted argument
        assert f"'{tail[-2]}'" in line
        assert shlex.split(line).count(tail[-2]) == 1


@pytest.mark.parametrize(("archive", "mode"), [(False, "--archive-mode=off"), (True, "--archive-mode=preserve")],
                         ids=["drill", "in-place"])
def test_only_a_restore_in_place_archives(archive: bool, mode: str) -> None:
    (c,) = driver.restore_commands(INV, TARGET, None, None, archive=archive)
    assert [a for a in c.argv if a.startswith("--archive-mode")] == [mode]


def test_restore_naive_datetime_refused() -> None:
    with pytest.raises(BackupInputError, match="target_time: needs a time zone"):
        driver.restore_commands(INV, TARGET, None, datetime(2026, 11, 27, 10, 30))


@pytest.mark.parametrize(
    ("target_dir", "backup", "message"),
    [
        ("restore", None, "target_dir: must be absolute"),
        ("/restore", "latest", "backup: 'latest' is not a pgBackRest backup label"),
        ("/restore", "", "backup: '' is not a pgBackRest backup label"),
    ],
)
def test_restore_bad_inputs(target_dir: str, backup: str | None, message: str) -> None:
    with pytest.raises(BackupInputError, match=message):
        driver.restore_commands(INV, target_dir, backup, None)


# ------------------------------------------------------------------------------ verify


@pytest.mark.parametrize(
    ("result", "status", "detail"),
    [
        (CommandResult(stdout=""), "OK", "pgbackrest check and verify: WAL archived, backups and WAL ranges intact"),
        (CommandResult(stdout="", stderr="ERROR: [082]: WAL segment 000000010000000000000009 was not archived\n",
                       exit_code=82),
         "FAILURE", "pgbackrest check failed (82): ERROR: [082]: WAL segment 000000010000000000000009 was not archived"),
        (CommandResult(stdout="ERROR: on stdout", exit_code=1), "FAILURE", "pgbackrest check failed (1): ERROR: on stdout"),
    ],
)
def test_parse_verify(result: CommandResult, status: str, detail: str) -> None:
    check = driver.parse_verify(result)
    assert (check.status, check.detail, check.ok) == (status, detail, status == "OK")


# ------------------------------------------------------------------------------ backup names


@pytest.mark.parametrize(
    "name",
    ["20261127-010000F", "20261127-010000F_20261128-010000I", "20261127-010000F_20261128-010000D"],
)
def test_validate_backup_name_accepts(name: str) -> None:
    assert driver.validate_backup_name(name) is None


@pytest.mark.parametrize(
    "name",
    [
        "",
        "latest",
        "20261127-010000",
        "20261127-010000I",
        "20261127-010000D",
        "20261127-010000F_",
        "20261127-010000F_20261128-010000F",
        "20261127-010000F_20261128-010000I_20261129-010000I",
        "2026112-010000F",
        "20261127-01000F",
        "x20261127-010000F",
        "20261127-010000Fx",
        "20261127-010000F\n",
        " 20261127-010000F",
        "20261127-010000f",
        "20261127_010000F",
        "20261127-010000F; rm -rf /",
        "base_000000010000000000000004",
    ],
)
def test_validate_backup_name_rejects(name: str) -> None:
    with pytest.raises(BackupInputError) as info:
        driver.validate_backup_name(name)
    assert str(info.value) == f"backup: {name!r} is not a pgBackRest backup label (like 20261127-010000F)"


# ------------------------------------------------------------------------------ stolon's pitr init (restore_cluster)


@pytest.mark.parametrize(
    ("backup", "data"),
    [
        (None, '/usr/bin/timeout 21600 pgbackrest --stanza=lab --pg1-path="%d" --type=none restore'),
        ("20261127-010000F",
         '/usr/bin/timeout 21600 pgbackrest --stanza=lab --pg1-path="%d" --set=20261127-010000F --type=none restore'),
        ("20261127-010000F_20261128-010000I",
         '/usr/bin/timeout 21600 pgbackrest --stanza=lab --pg1-path="%d" --set=20261127-010000F_20261128-010000I '
         "--type=none restore"),
    ],
    ids=["latest", "full", "incr"],
)
def test_ha_restore_commands(backup: str | None, data: str) -> None:
    assert driver.ha_restore_commands(INV, backup) == (data, 'pgbackrest --stanza=lab archive-get %f "%p"')


def test_ha_restore_leaves_recovery_and_archiving_to_the_ha_manager() -> None:
    data, _ = driver.ha_restore_commands(INV, None)
    # No recovery settings of its own (the keeper writes them), and the restored cluster archives.
    assert "--type=none" in data
    assert "--archive-mode" not in data and "--target" not in data


def test_ha_restore_commands_carry_no_secret() -> None:
    for text in driver.ha_restore_commands(INV, "20261127-010000F"):
        assert SECRET_KEY not in text and ACCESS_KEY not in text and "repo1-s3-key" not in text


@pytest.mark.parametrize("name", ["", "latest", "LATEST", "base_000000010000000000000004", "20261127-010000F %d"])
def test_ha_restore_commands_refuse_bad_backup_names(name: str) -> None:
    with pytest.raises(BackupInputError) as info:
        driver.ha_restore_commands(INV, name)
    assert str(info.value).startswith(f"backup: {name!r} is not a pgBackRest backup label")


# ----------------------------------------------------------------------------- clone_cluster

RESTORE_KEY = StoreSecrets(access_key_id="RESTOREKEY0001", secret_access_key="read/only+key", ca_certificate=CA_PEM,
                           cipher_pass="source-cipher")


def test_a_clone_reads_the_source_with_a_config_of_its_own() -> None:
    ca, config = driver.clone_source_files(INV, RESTORE_KEY)
    assert config.path == "/etc/pgbackrest/clone-source-lab.conf" != CONFIG_PATH
    assert ca.path == "/etc/pgbackrest/clone-source-lab-ca.crt" != CA_PATH and not ca.secret
    assert config.secret and config.mode == 0o600 and config.owner == "postgres"
    conf = parse_conf(config.content)
    assert conf["global"]["repo1-path"] == "/lab/pg15"  # the source's repository, not the clone's
    assert conf["global"]["repo1-s3-key"] == "RESTOREKEY0001"
    assert conf["global"]["repo1-storage-ca-file"] == ca.path
    assert conf["global"]["repo1-cipher-pass"] == "source-cipher"
    assert "lab" in conf


def test_a_clone_restores_with_archiving_off_and_fetches_wal_from_the_source() -> None:
    when = datetime(2026, 11, 27, 10, 30, tzinfo=UTC)
    (c,) = driver.clone_restore_commands(INV, "/var/lib/postgresql/15/main", "20261127-010000F", when)
    argv = list(c.argv)
    assert argv[:3] == ["pgbackrest", "--config=/etc/pgbackrest/clone-source-lab.conf", "--stanza=lab"]
    assert argv[-1] == "restore" and "--archive-mode=off" in argv and "--set=20261127-010000F" in argv
    assert ('--recovery-option=restore_command=pgbackrest --config=/etc/pgbackrest/clone-source-lab.conf '
            '--stanza=lab archive-get %f "%p"') in argv
    assert c.user == "postgres" and "read/only+key" not in c.render()


def test_retiring_the_repository_deletes_the_stanza_and_starts_it_again() -> None:
    (c,) = driver.retire_repository_commands(INV)
    line = c.render()
    assert "stop" in line and "--force stanza-delete" in line and "start" in line and c.user == "postgres"


# ----------------------------------------------------------------------------- incrementals, parallel copy


@pytest.mark.parametrize(("kind", "processes", "tail"), [
    ("full", None, ["--type=full", "backup"]),
    ("incr", None, ["--type=incr", "backup"]),
    ("incr", 4, ["--process-max=4", "--type=incr", "backup"]),
])
def test_backup_command_kind_and_processes(kind, processes, tail) -> None:
    for source in ("pg1", "pg2"):
        argv = list(driver.backup_command(INV, INV.host(source), INV.host("pg1"), kind, processes).argv)
        assert argv[-len(tail):] == tail, argv


@pytest.mark.parametrize(("kind", "processes", "message"), [
    ("diff", None, "kind: 'diff' is not one of full, incr"),
    ("full", 0, "processes: must be an integer from 1 to 64"),
    ("full", True, "processes: must be an integer from 1 to 64"),
])
def test_backup_command_refuses_what_it_cannot_render(kind, processes, message) -> None:
    with pytest.raises(BackupInputError, match=message):
        driver.backup_command(INV, INV.host("pg2"), INV.host("pg1"), kind, processes)


def test_block_incremental_is_on_with_bundling() -> None:
    conf = parse_conf(driver.render_config(INV, SECRETS))["global"]
    assert conf["repo1-block"] == "y" and conf["repo1-bundle"] == "y"  # block incremental needs bundles


def _info(status: dict) -> CommandResult:
    return CommandResult(exit_code=0, stdout=json.dumps([{"name": "lab", "status": status}]), stderr="", seconds=0.1)


@pytest.mark.parametrize(("status", "progress"), [
    ({"code": 0, "lock": {"backup": {"held": True, "size": 1000, "size-cplt": 250}}}, (250, 1000)),
    ({"code": 0, "lock": {"backup": {"held": True, "size": 1000}}}, (0, 1000)),  # not started copying yet
    ({"code": 0, "lock": {"backup": {"held": False}}}, None),
    ({"code": 0, "lock": {"backup": {"held": True}}}, None),  # size not known yet
    ({"code": 2}, None),
])
def test_progress_of_a_running_backup(status, progress) -> None:
    assert driver.progress_command(INV).argv[-2:] == ("--output=json", "info")
    assert driver.parse_progress(_info(status)) == progress


def test_progress_of_unreadable_output_is_none() -> None:
    assert driver.parse_progress(CommandResult(exit_code=1, stdout="not json", stderr="", seconds=0.1)) is None
