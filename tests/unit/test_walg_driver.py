"""WalgDriver on recorded WAL-G output shapes (walg.md); no wal-g binary, no network."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from blocks.inventory import Inventory, parse_inventory
from tasks.adapters.backup.base import BackupInputError, BackupOutputError, StoreSecrets
from tasks.adapters.backup.walg import WalgDriver
from tasks.adapters.commands import Command, CommandResult
from tasks.adapters.ha.base import DbSecrets
from tasks.adapters.ha.pgdata import pgdata
from tasks.adapters.ha.stolon import StolonDriver

FIXTURES = Path(__file__).parent / "fixtures" / "walg"
SECRET_KEY = "s3cr3t-Key/with+chars=="
ACCESS_KEY = "AKIAWALGTEST0001"
CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIBfakeCA\n-----END CERTIFICATE-----"
SECRETS = StoreSecrets(access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY, ca_certificate=CA_PEM)
CONFIG = "/etc/wal-g/bouw.json"
PGPASS = "/etc/wal-g/bouw.pgpass"
SU_PASSWORD = "Su:pw\\with-escapes"
DB_SECRETS = DbSecrets(superuser="stolon_su", superuser_password=SU_PASSWORD, replication_user="repluser",
                       replication_password="Repl-pw")
WALG = ["/usr/local/bin/wal-g-pg", "--config", CONFIG]

driver = WalgDriver()


def make_inventory(**cluster: Any) -> Inventory:
    base: dict[str, Any] = {
        "name": "bouw",
        "network": "10.0.0.0/24",
        "backup_tool": "walg",
        "postgres": {"version": 15, "port": 5432},
        "object_store": {"host": "backup1", "endpoint": "https://backup1.example:9000/", "bucket": "pg-backups"},
    }
    base.update(cluster)
    return parse_inventory({
        "cluster": base,
        "hosts": [
            {"name": "db1", "address": "10.0.0.11", "roles": ["db"]},
            {"name": "db2", "address": "10.0.0.12", "roles": ["db"]},
            {"name": "db3", "address": "10.0.0.13", "roles": ["db"]},
            {"name": "backup1", "address": "10.0.0.20", "roles": ["backup"]},
            {"name": "drill1", "address": "10.0.0.30", "roles": ["restore"]},
        ],
    })


INV = make_inventory()


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def all_commands(inv: Inventory) -> list[Command]:
    db1, db2 = inv.host("db1"), inv.host("db2")
    return [
        *driver.init_repository_commands(inv),
        driver.backup_command(inv, db2, db1),
        driver.list_command(inv),
        *driver.retention_commands(inv, 3),
        driver.retention_dry_run_command(inv, 3),
        *driver.restore_commands(inv, "/srv/restore/data", None, None),
        *driver.restore_commands(
            inv, "/srv/restore/data", "base_000000010000000000000004", datetime(2026, 5, 1, 21, 0, tzinfo=timezone.utc)
        ),
        driver.verify_archive_command(inv, db_secrets=DB_SECRETS),
    ]


# ---------------------------------------------------------------------- backup-list


def test_parse_list_v3_detail() -> None:
    backups = driver.parse_list(CommandResult(stdout=fixture("backup_list_detail_v3.json")))
    assert [b.name for b in backups] == [
        "base_000000010000000000000004",
        "base_000000010000000100000060_D_000000010000000000000004",
        "base_000000020000000100000072",
    ]
    first, delta, last = backups
    assert first.kind == "full" and delta.kind == "delta" and last.kind == "full"
    assert first.start_time == datetime(2026, 5, 1, 20, 0, 5, 654321, tzinfo=timezone.utc)
    assert first.finish_time == datetime(2026, 5, 1, 20, 0, 40, 987655, tzinfo=timezone.utc)
    assert first.start_lsn == "0/4000028" and first.finish_lsn == "0/4000158"
    assert delta.start_lsn == "1/60000028" and delta.finish_lsn == "1/60000160"
    assert first.start_wal == "000000010000000000000004" and first.stop_wal is None
    assert first.database_bytes == 23456789 and first.stored_bytes == 4567890
    assert first.source_host == "db2"  # user_data wins over the OS host name
    assert delta.source_host == "db3.example"  # no user_data: metadata hostname
    assert last.start_time == datetime(2026, 5, 3, 20, 0, 3, tzinfo=timezone.utc)
    assert last.duration_seconds == 116
    assert all(b.start_time.tzinfo is not None and b.finish_time.tzinfo is not None for b in backups)
    assert not any(b.error for b in backups)


# Upstream's JSON fields: internal.BackupTime (storage_name since v3) + postgres.ExtendedMetadataDto
# (wal-g/wal-g internal/backup_time.go, internal/databases/postgres/backup_sentinel_dto.go).
BACKUP_TIME_FIELDS_V2 = {"backup_name", "time", "wal_file_name"}
BACKUP_TIME_FIELDS_V3 = BACKUP_TIME_FIELDS_V2 | {"storage_name"}
EXTENDED_METADATA_FIELDS = {"start_time", "finish_time", "date_fmt", "hostname", "data_dir", "pg_version", "start_lsn",
                            "finish_lsn", "is_permanent", "system_identifier", "uncompressed_size", "compressed_size"}
OPTIONAL_FIELDS = {"user_data"}  # omitempty


@pytest.mark.parametrize(
    ("name", "backup_time_fields"),
    [("backup_list_detail_v3.json", BACKUP_TIME_FIELDS_V3), ("backup_list_detail_v2.json", BACKUP_TIME_FIELDS_V2)],
)
def test_backup_list_fixtures_have_upstream_fields(name: str, backup_time_fields: set[str]) -> None:
    text = fixture(name)
    required = backup_time_fields | EXTENDED_METADATA_FIELDS
    for item in json.loads(text):
        # No "timeline": neither struct has one.
        assert required <= set(item) <= required | OPTIONAL_FIELDS, sorted(set(item) ^ required)
        for key in ("start_time", "finish_time"):
            # utility.TimeNowCrossPlatformUTC: UTC, ceiled to microseconds.
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z", item[key]), item[key]
    # Without --pretty WAL-G prints the list as one compact line.
    assert text.count("\n") == 1 and text.endswith("]\n")


def test_parse_list_accepts_offsets_and_nanoseconds() -> None:
    # Not what WAL-G writes for start/finish, but valid RFC 3339 from Go: read, not rejected.
    item = json.loads(fixture("backup_list_detail_v3.json"))[2]
    item.update(start_time="2026-05-03T22:00:03+02:00", finish_time="2026-05-03T20:01:59.123456789Z")
    (info,) = driver.parse_list(CommandResult(stdout=json.dumps([item])))
    assert info.start_time == datetime(2026, 5, 3, 20, 0, 3, tzinfo=timezone.utc)
    assert info.finish_time == datetime(2026, 5, 3, 20, 1, 59, 123456, tzinfo=timezone.utc)


def test_parse_list_v2_without_storage_name() -> None:
    backups = driver.parse_list(CommandResult(stdout=fixture("backup_list_detail_v2.json")))
    assert [(b.name, b.kind, b.start_lsn, b.source_host) for b in backups] == [
        ("base_000000010000000000000002", "full", "0/2000028", "pg-old-1"),
        # user_data that is not an object (a plain string) falls back to the hostname.
        ("base_000000010000000000000009", "full", "0/9000028", "pg-old-2"),
    ]


def test_parse_list_sorts_oldest_first() -> None:
    data = json.loads(fixture("backup_list_detail_v3.json"))
    shuffled = json.dumps([data[2], data[0], data[1]])
    names = [b.name for b in driver.parse_list(CommandResult(stdout=shuffled))]
    assert names == [item["backup_name"] for item in data]


@pytest.mark.parametrize("stdout", ["[]", "[]\n", "  [ ]  \n"])
def test_parse_list_empty(stdout: str) -> None:
    assert driver.parse_list(CommandResult(stdout=stdout, stderr="INFO: No backups found\n")) == []


def test_parse_list_tolerates_log_line_before_json() -> None:
    stdout = "INFO: 2026/05/04 08:00:00.1 List backups from storages: [default]\n" + fixture("backup_list_detail_v2.json")
    assert len(driver.parse_list(CommandResult(stdout=stdout))) == 2


def test_parse_list_zero_start_time_falls_back_to_sentinel_time() -> None:
    item = json.loads(fixture("backup_list_detail_v2.json"))[0]
    item.update(start_time="0001-01-01T00:00:00Z", finish_time="0001-01-01T00:00:00Z", start_lsn=0, finish_lsn=0)
    (info,) = driver.parse_list(CommandResult(stdout=json.dumps([item])))
    assert info.start_time == info.finish_time == datetime(2024, 1, 10, 20, 0, 31, 500000, tzinfo=timezone.utc)
    assert info.start_lsn is None and info.finish_lsn is None


def _v2_item(**changes: Any) -> str:
    item = json.loads(fixture("backup_list_detail_v2.json"))[0]
    for key, value in changes.items():
        if value is ...:
            del item[key]
        else:
            item[key] = value
    return json.dumps([item])


@pytest.mark.parametrize(
    ("result", "message"),
    [
        (CommandResult(stdout=""), "empty output"),
        (CommandResult(stdout="garbage <html>"), "not JSON"),
        (CommandResult(stdout='[{"backup_name": "base_'), "not valid JSON"),
        (CommandResult(stdout='{"backup_name": "x"}'), "expected a JSON list"),
        (CommandResult(stdout="[1]"), "element 0: expected a JSON object"),
        # Plain `--json` (no --detail) has no start/finish time.
        (CommandResult(stdout='[{"backup_name": "base_000000010000000000000002", "time": "2024-01-10T20:00:31Z",'
                              ' "wal_file_name": "000000010000000000000002"}]'), "was --detail passed"),
        (CommandResult(stdout=_v2_item(start_time=...)), "missing start_time"),
        (CommandResult(stdout=_v2_item(backup_name="")), "backup_name is not a name"),
        (CommandResult(stdout=_v2_item(start_lsn="0/2000028")), "start_lsn is not an LSN number"),
        (CommandResult(stdout=_v2_item(finish_time="2024-01-10 20:00:30")), "no time zone"),
        (CommandResult(stdout=_v2_item(finish_time="yesterday")), "not an ISO 8601 timestamp"),
        (CommandResult(stdout=_v2_item(compressed_size=-1)), "compressed_size is not a byte count"),
        # Text output (no --json).
        (CommandResult(stdout="backup_name modified wal_file_name storage_name\n"
                              "base_000000010000000000000002 2024-01-10T20:00:31Z 000000010000000000000002 default\n"),
         "not JSON"),
        (CommandResult(stdout="", stderr="ERROR: 2026/05/04 08:00:00.1 failed to list s3 folder: AccessDenied",
                       exit_code=1), "AccessDenied"),
    ],
)
def test_parse_list_rejects_bad_output(result: CommandResult, message: str) -> None:
    with pytest.raises(BackupOutputError, match=message):
        driver.parse_list(result)


# ---------------------------------------------------------------------- wal-verify


@pytest.mark.parametrize(
    ("name", "status", "missing", "detail_parts"),
    [
        ("wal_verify_ok.json", "OK", (), ["integrity OK", "timeline OK (cluster timeline 2, highest in storage 2)"]),
        ("wal_verify_warning.json", "WARNING", (),
         ["integrity WARNING (1 MISSING_DELAYED range(s), 1 MISSING_UPLOADING range(s))", "timeline OK"]),
        ("wal_verify_failure_lost.json", "FAILURE",
         ("00000003000000000000002B", "000000030000000000000030..000000030000000000000033"),
         ["integrity FAILURE", "2 MISSING_LOST", "lost: 00000003000000000000002B, 0000000300000000000000"]),
        ("wal_verify_timeline_failure.json", "FAILURE", (),
         ["integrity OK", "timeline FAILURE (cluster timeline 4, highest in storage 5)"]),
    ],
)
def test_parse_verify_exit_zero_is_not_ok(name: str, status: str, missing: tuple[str, ...], detail_parts: list[str]) -> None:
    # wal-verify exits 0 whatever it found; every case here is exit 0.
    check = driver.parse_verify(CommandResult(stdout=fixture(name), exit_code=0))
    assert check.status == status
    assert check.ok is (status == "OK")
    assert check.missing_segments == missing
    for part in detail_parts:
        assert part in check.detail


def test_parse_verify_worst_status_wins() -> None:
    data = json.loads(fixture("wal_verify_warning.json"))
    data["timeline"]["status"] = "FAILURE"
    assert driver.parse_verify(CommandResult(stdout=json.dumps(data))).status == "FAILURE"
    data["timeline"]["status"] = "OK"
    assert driver.parse_verify(CommandResult(stdout=json.dumps(data))).status == "WARNING"


def test_parse_verify_null_details() -> None:
    # An empty scan marshals as null in Go.
    stdout = '{"integrity": {"status": "OK", "details": null}, "timeline": {"status": "OK", "details": null}}'
    check = driver.parse_verify(CommandResult(stdout=stdout))
    assert check.ok and check.missing_segments == ()


@pytest.mark.parametrize(
    ("result", "message"),
    [
        (CommandResult(stdout=""), "empty output"),
        (CommandResult(stdout="[wal-verify] integrity check status: OK\n[wal-verify] timeline check status: OK\n"),
         "JSON"),
        (CommandResult(stdout="[]"), "expected a JSON object"),
        (CommandResult(stdout='{"integrity": {"status": "OK", "details": []}}'), "no timeline check"),
        (CommandResult(stdout='{"integrity": {"status": "GOOD"}, "timeline": {"status": "OK"}}'), "integrity.status"),
        (CommandResult(stdout='{"integrity": {"status": "OK", "details": {}}, "timeline": {"status": "OK"}}'),
         "not a list"),
        (CommandResult(stdout='{"integrity": {"status": "FAILURE", "details": [{"status": "GONE", '
                              '"start_segment": "a", "end_segment": "b"}]}, "timeline": {"status": "OK"}}'),
         "unknown segment status"),
        (CommandResult(stdout='{"integrity": {"status": "FAILURE", "details": [{"status": "MISSING_LOST"}]},'
                              ' "timeline": {"status": "OK"}}'), "start_segment/end_segment missing"),
        (CommandResult(stdout="", stderr="ERROR: 2026/05/04 08:00:00.1 connect: no such file or directory",
                       exit_code=1), "exit 1"),
    ],
)
def test_parse_verify_rejects_bad_output(result: CommandResult, message: str) -> None:
    with pytest.raises(BackupOutputError, match=message):
        driver.parse_verify(result)


# ---------------------------------------------------------------------- backup-push


@pytest.mark.parametrize(
    ("stderr", "name"),
    [
        (fixture("backup_push.stderr"), "base_000000020000000100000072"),
        (fixture("backup_push_delta.stderr"), "base_000000020000000100000090_D_000000020000000100000072"),
    ],
)
def test_parse_backup_push(stderr: str, name: str) -> None:
    assert driver.parse_backup_push(CommandResult(stdout="", stderr=stderr)) == name


def test_backup_push_fixtures_use_v3_wording() -> None:
    # v3 local push (backup_push_handler.go): "Started backup with name X at LSN …" first, and the
    # closing line names the storage; v2's "Starting part N ..." lost to "Starting part N of backup X ...".
    for name in ("backup_push.stderr", "backup_push_delta.stderr"):
        lines = fixture(name).splitlines()
        assert re.search(r"Wrote backup with name base_\S+ to storage default$", lines[-1]), name
        assert any(" Started backup with name base_" in line for line in lines), name
    assert "Starting part 1 of backup base_000000020000000100000072 ..." in fixture("backup_push.stderr")


@pytest.mark.parametrize(
    "last_line",
    [
        "INFO: 2026/05/03 20:01:59.8 Wrote backup with name base_000000020000000100000072 to storage default",
        # A remote (BASE_BACKUP) push and v2 end without the storage.
        "INFO: 2026/05/03 20:01:59.8 Wrote backup with name base_000000020000000100000072",
    ],
)
def test_parse_backup_push_both_endings(last_line: str) -> None:
    stderr = ("INFO: 2026/05/03 20:00:03.1 Started backup with name base_000000020000000100000070 at LSN 1/70000028\n"
              + last_line + "\n")
    assert driver.parse_backup_push(CommandResult(stdout="", stderr=stderr)) == "base_000000020000000100000072"


@pytest.mark.parametrize(
    ("result", "message"),
    [
        (CommandResult(stdout="", stderr="INFO: Calling pg_start_backup()\n"), "did not log"),
        (CommandResult(stdout="", stderr=""), r"\(no output\)"),
        (CommandResult(stdout="", stderr="ERROR: 2026/05/03 20:00:03.1 Connect: password authentication failed",
                       exit_code=1), "password authentication failed"),
    ],
)
def test_parse_backup_push_errors(result: CommandResult, message: str) -> None:
    with pytest.raises(BackupOutputError, match=message):
        driver.parse_backup_push(result)


# ---------------------------------------------------------------------- delete dry run


@pytest.mark.parametrize("name", ["delete_retain_dry_run_v3.0.9.stderr", "delete_retain_dry_run_v3.0.8.stderr"])
def test_parse_delete_dry_run(name: str) -> None:
    # v3.0.9 reworded the per-object line ("Object marked for deletion: … storage=…"); before it
    # read "\twill be deleted: …, from storage: …". Both must give the same plan.
    plan = driver.parse_delete_dry_run(CommandResult(stdout="", stderr=fixture(name)))
    assert plan.backups == (
        "base_000000010000000000000004",
        "base_000000010000000100000060_D_000000010000000000000004",
    )
    assert plan.wal_objects == 3 and plan.objects == 8


def test_parse_delete_dry_run_v3_0_9_nothing_to_delete() -> None:
    stderr = ("INFO: 2026/09/04 21:00:01.9 Start delete\n"
              "INFO: 2026/09/04 21:00:01.9 Evaluating objects for deletion...\n"
              "INFO: 2026/09/04 21:00:01.9 No objects matched the deletion criteria.\n")
    plan = driver.parse_delete_dry_run(CommandResult(stdout="", stderr=stderr))
    assert (plan.backups, plan.wal_objects, plan.objects) == ((), 0, 0)


def test_parse_delete_dry_run_count_must_match_the_lines() -> None:
    # v3.0.9's closing count catches object lines this parser did not recognise.
    lines = fixture("delete_retain_dry_run_v3.0.9.stderr").splitlines()
    del lines[6]
    with pytest.raises(BackupOutputError, match="says 8 object.*listed 7"):
        driver.parse_delete_dry_run(CommandResult(stdout="", stderr="\n".join(lines)))


@pytest.mark.parametrize(
    "line",
    [
        "INFO: 2026/09/04 21:00:01.9 Object marked for deletion: wal_005/000000010000000000000003.lz4",
        "INFO: 2026/09/04 21:00:01.9 \twill be deleted: wal_005/0000000100000000000003 .lz4, from storage: default",
    ],
)
def test_parse_delete_dry_run_refuses_unknown_object_lines(line: str) -> None:
    with pytest.raises(BackupOutputError, match="unrecognised object line"):
        driver.parse_delete_dry_run(CommandResult(stdout="", stderr=line + "\n"))


def test_parse_delete_dry_run_ignores_debug_key_lists() -> None:
    # WALG_LOG_LEVEL=DEVEL adds "… keys will be deleted: [...]" lines: not objects of the plan.
    stderr = ("DEBUG: 2026/09/04 21:00:01.9 Backup keys will be deleted: "
              "[basebackups_005/base_000000010000000000000002]\n"
              "INFO: 2026/09/04 21:00:01.9 No objects matched the deletion criteria.\n")
    assert driver.parse_delete_dry_run(CommandResult(stdout="", stderr=stderr)).objects == 0


def test_parse_delete_dry_run_nothing_and_v2_lines() -> None:
    assert driver.parse_delete_dry_run(CommandResult(stdout="", stderr="INFO: Start delete\n")).objects == 0
    v2 = "INFO: 2022/08/01 10:00:00.1 \twill be deleted: basebackups_005/base_000000010000000000000002/metadata.json\n"
    assert driver.parse_delete_dry_run(CommandResult(stdout="", stderr=v2)).backups == ("base_000000010000000000000002",)
    with pytest.raises(BackupOutputError):
        driver.parse_delete_dry_run(CommandResult(stdout="", stderr="ERROR: boom", exit_code=1))


# ---------------------------------------------------------------------- rendering


def test_host_files_config_is_secret_and_complete() -> None:
    config_file, ca_file = driver.host_files(INV, INV.host("db1"), SECRETS)
    assert config_file.path == CONFIG
    assert (config_file.owner, config_file.owner_group, config_file.mode, config_file.secret) == (
        "postgres", "postgres", 0o600, True)
    assert json.loads(config_file.content) == {
        "WALG_S3_PREFIX": "s3://pg-backups/bouw/pg15",
        "AWS_ENDPOINT": "https://backup1.example:9000",
        "AWS_S3_FORCE_PATH_STYLE": "true",
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "WALG_S3_CA_CERT_FILE": "/etc/wal-g/bouw-ca.crt",
        "WALG_COMPRESSION_METHOD": "lz4",
        "WALG_UPLOAD_CONCURRENCY": "2",
        "WALG_DELTA_MAX_STEPS": "7",
        "WALG_PREVENT_WAL_OVERWRITE": "true",
        "PGHOST": "/var/run/postgresql",
        "PGPORT": "5432",
        "PGDATABASE": "postgres",
        "PGUSER": "postgres",
    }
    assert ca_file.path == "/etc/wal-g/bouw-ca.crt"
    assert (ca_file.mode, ca_file.secret) == (0o644, False)
    assert ca_file.content == CA_PEM + "\n"
    assert SECRET_KEY not in ca_file.content and ACCESS_KEY not in ca_file.content


def test_prefix_per_major_version() -> None:
    inv16 = make_inventory(postgres={"version": 16, "port": 5433})
    assert driver.s3_prefix(inv16) == "s3://pg-backups/bouw/pg16"
    assert json.loads(driver.host_files(inv16, inv16.host("db1"), SECRETS)[0].content)["PGPORT"] == "5433"


def test_no_secret_in_commands_or_parameters() -> None:
    rendered = [c.render() for c in all_commands(INV)] + [c.render(sudo=True) for c in all_commands(INV)]
    rendered += list(driver.archive_parameters(INV).values())
    for text in rendered:
        assert SECRET_KEY not in text and ACCESS_KEY not in text
    for command in all_commands(INV):
        # Credentials only ever come from the config and password files; the archive check names
        # its login (a user name and the passfile's path) in the environment.
        assert {k for k, _ in command.env} <= {"PGUSER", "PGPASSFILE"}
        assert command.user == "postgres"
        assert command.argv[0] in ("/usr/local/bin/wal-g-pg", "bash")


def test_archive_parameters() -> None:
    params = driver.archive_parameters(INV)
    assert params == {
        "archive_mode": "on",
        "archive_command": "/usr/bin/timeout 600 /usr/local/bin/wal-g-pg --config /etc/wal-g/bouw.json wal-push %p",
        "archive_timeout": "60",
    }


def test_init_repository_is_a_write_probe() -> None:
    (probe,) = driver.init_repository_commands(INV)
    assert list(probe.argv) == [*WALG, "st", "check", "write"]


def test_backup_command() -> None:
    command = driver.backup_command(INV, INV.host("db2"), INV.host("db1"))
    assert list(command.argv) == [
        *WALG, "backup-push", "--full", "--add-user-data", '{"source_host": "db2"}', "/var/lib/postgresql/15/main"]
    assert command.timeout >= 3 * 3600
    rendered = command.render()
    assert rendered.startswith("timeout -k 5 21600 runuser -u postgres -- /usr/local/bin/wal-g-pg --config")
    assert shlex.split(rendered)[-2] == '{"source_host": "db2"}'


def test_stolon_layout() -> None:
    inv = make_inventory(ha_manager="stolon", postgres={"version": 15, "data_directory": "/var/lib/pgsql/15/data"})
    command = driver.backup_command(inv, inv.host("db3"), inv.host("db1"))
    assert command.argv[-1] == "/var/lib/pgsql/15/data/postgres"
    config_file = driver.host_files(inv, inv.host("db1"), SECRETS, db_secrets=DB_SECRETS)[0]
    assert json.loads(config_file.content)["PGHOST"] == "/tmp"


# ---------------------------------------------------------------------- one data directory


@pytest.mark.parametrize(
    ("postgres", "expected"),
    [
        ({"version": 15}, "/var/lib/stolon/bouw/postgres"),
        ({"version": 15, "data_directory": "/srv/stolon/bouw"}, "/srv/stolon/bouw/postgres"),
    ],
    ids=["data_directory-unset", "data_directory-set"],
)
def test_backup_push_dir_is_the_stolon_keepers_pgdata(postgres: dict[str, Any], expected: str) -> None:
    # backup-push refuses a directory other than the server's data_directory, so WAL-G must back
    # up exactly where the stolon keeper runs PostgreSQL.
    inv = make_inventory(ha_manager="stolon", postgres=postgres)
    command = driver.backup_command(inv, inv.host("db2"), inv.host("db1"))
    assert command.argv[-1] == StolonDriver().pgdata(inv) == pgdata(inv) == expected


@pytest.mark.parametrize(
    ("postgres", "expected"),
    [({"version": 16}, "/var/lib/postgresql/16/main"), ({"data_directory": "/srv/pg/data"}, "/srv/pg/data")],
)
def test_backup_push_dir_under_patroni(postgres: dict[str, Any], expected: str) -> None:
    inv = make_inventory(ha_manager="patroni", postgres=postgres)
    assert driver.backup_command(inv, inv.host("db2"), inv.host("db1")).argv[-1] == pgdata(inv) == expected


# ---------------------------------------------------------------------- logging in to PostgreSQL


def _pgpass_entries(text: str) -> list[list[str]]:
    """A pgpass file as libpq documents it: host:port:database:user:password, `\\` escapes `:` and `\\`."""
    entries = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        fields, current, escaped = [], "", False
        for char in line:
            if escaped:
                current, escaped = current + char, False
            elif char == "\\":
                escaped = True
            elif char == ":":
                fields.append(current)
                current = ""
            else:
                current += char
        entries.append([*fields, current])
    return entries


STOLON = make_inventory(ha_manager="stolon")


def test_stolon_login_is_the_superuser_with_a_0600_password_file() -> None:
    # stolon's keeper pg_hba admits the socket only as `local postgres <superuser> md5`, and its
    # initdb -U <superuser> means there may be no role postgres at all.
    files = driver.host_files(STOLON, STOLON.host("db1"), SECRETS, db_secrets=DB_SECRETS)
    by_path = {f.path: f for f in files}
    assert set(by_path) == {CONFIG, "/etc/wal-g/bouw-ca.crt", PGPASS}
    config = json.loads(by_path[CONFIG].content)
    assert {k: config[k] for k in ("PGHOST", "PGPORT", "PGDATABASE", "PGUSER", "PGPASSFILE")} == {
        "PGHOST": "/tmp", "PGPORT": "5432", "PGDATABASE": "postgres", "PGUSER": "stolon_su", "PGPASSFILE": PGPASS}
    assert "PGPASSWORD" not in config  # WAL-G would export it into its environment
    pgpass = by_path[PGPASS]
    assert (pgpass.owner, pgpass.owner_group, pgpass.mode, pgpass.secret) == ("postgres", "postgres", 0o600, True)
    # Any host (pgx matches a socket as "localhost", libpq as its directory), the cluster's port.
    assert _pgpass_entries(pgpass.content) == [["*", "5432", "postgres", "stolon_su", SU_PASSWORD]]


def test_stolon_login_password_only_in_the_password_file() -> None:
    files = driver.host_files(STOLON, STOLON.host("db1"), SECRETS, db_secrets=DB_SECRETS)
    # "with-escapes" is in the password whichever way it is escaped.
    assert [f.path for f in files if "with-escapes" in f.content] == [PGPASS]
    rendered = [c.render(sudo=True) for c in all_commands(STOLON)] + list(driver.archive_parameters(STOLON).values())
    rendered += [json.dumps(c.env) for c in all_commands(STOLON)]
    for text in rendered:
        assert "with-escapes" not in text
    assert "with-escapes" not in repr(driver.local_login(STOLON, DB_SECRETS))


def _split_pgpass_line(line: str, unescape_first: tuple[str, str]) -> list[str]:
    """Split one pgpass line the way WAL-G's pgx does: swap the two escapes for placeholders in the
    given order (pgx v3.6.0 in WAL-G <= v3.0.5: `\\:` first; pgx v5 / pgpassfile: `\\\\` first),
    split on ':', then put the characters back."""
    placeholders = {"\\\\": "\r", "\\:": "\n"}
    for escape in unescape_first:
        line = line.replace(escape, placeholders[escape])
    return [part.replace("\r", "\\").replace("\n", ":") for part in line.split(":")]


@pytest.mark.parametrize("order", [("\\:", "\\\\"), ("\\\\", "\\:")], ids=["pgx-v3.6.0", "pgx-v5"])
@pytest.mark.parametrize("password", ["a\\:b", "ends-with\\", "\\\\:", "p:q:r", "plain"])
def test_pgpass_line_reads_back_in_both_pgx_versions(order: tuple[str, str], password: str) -> None:
    secrets = DbSecrets(**{**DB_SECRETS.__dict__, "superuser_password": password})
    pgpass = next(f for f in driver.host_files(STOLON, STOLON.host("db1"), SECRETS, db_secrets=secrets)
                  if f.path == PGPASS)
    (line,) = [raw.strip() for raw in pgpass.content.splitlines() if not raw.startswith("#")]
    assert _split_pgpass_line(line, order) == ["*", "5432", "postgres", "stolon_su", password]


def test_stolon_login_follows_the_configured_port() -> None:
    inv = make_inventory(ha_manager="stolon", postgres={"version": 15, "port": 5433})
    files = driver.host_files(inv, inv.host("db1"), SECRETS, db_secrets=DB_SECRETS)
    pgpass = next(f for f in files if f.path == PGPASS)
    assert _pgpass_entries(pgpass.content)[0][:4] == ["*", "5433", "postgres", "stolon_su"]


def test_stolon_database_host_without_db_secrets_is_refused() -> None:
    with pytest.raises(BackupInputError, match="db1: .*needs the database credentials.*backup-push and wal-verify"):
        driver.host_files(STOLON, STOLON.host("db1"), SECRETS)


def test_a_cipher_pass_is_refused_rather_than_ignored() -> None:
    with pytest.raises(BackupInputError, match="pgbackrest_cipher_pass is set"):
        driver.host_files(STOLON, STOLON.host("db1"), dataclasses.replace(SECRETS, cipher_pass="x" * 20), db_secrets=DB_SECRETS)


def test_stolon_restore_host_needs_no_login() -> None:
    # A restore host only fetches (backup-fetch, wal-fetch): no connection, no password there.
    files = driver.host_files(STOLON, STOLON.host("drill1"), SECRETS)
    assert [f.path for f in files] == [CONFIG, "/etc/wal-g/bouw-ca.crt"]


def test_patroni_login_stays_peer_without_a_password() -> None:
    # PatroniDriver.pg_hba: `local all postgres peer` is the only socket line.
    files = driver.host_files(INV, INV.host("db1"), SECRETS, db_secrets=DB_SECRETS)
    assert [f.path for f in files] == [CONFIG, "/etc/wal-g/bouw-ca.crt"]
    config = json.loads(files[0].content)
    assert config["PGUSER"] == "postgres" and "PGPASSFILE" not in config
    assert not any("with-escapes" in f.content for f in files)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"superuser_password": ""}, "superuser_password: empty"),
        ({"superuser_password": "two\nlines"}, "superuser_password: contains a line break"),
        ({"superuser_password": " padded "}, "superuser_password: starts or ends with whitespace"),
        ({"superuser": ""}, "db_secrets.superuser: "),
        ({"superuser": "a:b"}, "db_secrets.superuser: "),
        ({"superuser": "back\\slash"}, "db_secrets.superuser: "),
    ],
)
def test_stolon_login_secrets_are_checked(changes: dict[str, str], field: str) -> None:
    bad = DbSecrets(**{**DB_SECRETS.__dict__, **changes})
    with pytest.raises(BackupInputError, match=re.escape(field)) as info:
        driver.host_files(STOLON, STOLON.host("db1"), SECRETS, db_secrets=bad)
    for value in changes.values():
        if value.strip():
            assert value not in str(info.value)


def test_list_and_verify_commands() -> None:
    assert list(driver.list_command(INV).argv) == [*WALG, "backup-list", "--detail", "--json"]
    verify = driver.verify_archive_command(INV)
    # A WAL switch first, archived within the wait, then wal-verify with the driver's binary and config.
    assert "pg_switch_wal()" in verify.argv[5] and "pg_stat_archiver" in verify.argv[5]
    assert verify.argv[5].rstrip().endswith('wal-verify integrity timeline --json')
    assert list(verify.argv[7:]) == ["/var/run/postgresql", "5432", "60", WALG[0], CONFIG]
    assert dict(verify.env) == {"PGUSER": "postgres"} and verify.ok_codes == (0,)


def test_the_archive_check_logs_in_as_stolons_superuser() -> None:
    verify = driver.verify_archive_command(STOLON, db_secrets=DB_SECRETS)
    assert dict(verify.env) == {"PGUSER": "stolon_su", "PGPASSFILE": PGPASS}
    assert verify.argv[7] == "/tmp"
    with pytest.raises(BackupInputError, match="needs the database credentials"):
        driver.verify_archive_command(STOLON)


def test_a_switched_segment_that_is_not_archived_is_a_failed_archive() -> None:
    check = driver.parse_verify(CommandResult(stdout="", stderr="segment 000000010000000000000007 not archived within 60 s",
                                               exit_code=4))
    assert (check.status, check.ok) == ("FAILURE", False) and "not archived" in check.detail


def test_retention_commands() -> None:
    (delete,) = driver.retention_commands(INV, 7)
    assert list(delete.argv) == [*WALG, "delete", "retain", "FULL", "7", "--confirm"]
    dry = driver.retention_dry_run_command(INV, 7)
    assert list(dry.argv) == [*WALG, "delete", "retain", "FULL", "7"]


@pytest.mark.parametrize("keep", [0, -1, True, 2.5, "3"])
def test_retention_rejects_bad_count(keep: Any) -> None:
    with pytest.raises(BackupInputError, match="keep_full"):
        driver.retention_commands(INV, keep)
    with pytest.raises(BackupInputError, match="keep_full"):
        driver.retention_dry_run_command(INV, keep)


def test_missing_object_store() -> None:
    inv = make_inventory(object_store=None)
    with pytest.raises(BackupInputError, match="cluster.object_store"):
        driver.host_files(inv, inv.host("db1"), SECRETS)
    with pytest.raises(BackupInputError, match="cluster.object_store"):
        driver.archive_parameters(inv)


# ---------------------------------------------------------------------- restore


def _settings(command: Command) -> list[str]:
    # script() argv: bash --norc -euo pipefail -c <text> bouwsteen <target_dir> <settings...>
    assert list(command.argv[:4]) == ["bash", "--norc", "-euo", "pipefail"]
    return list(command.argv[8:])


def test_only_a_restore_in_place_archives() -> None:
    _, drill = driver.restore_commands(INV, "/srv/restore/data", None, None)
    _, in_place = driver.restore_commands(INV, "/srv/restore/data", None, None, archive=True)
    assert "archive_mode = 'off'" in _settings(drill)
    assert not any(s.startswith("archive_mode") for s in _settings(in_place))


def test_restore_latest_to_end_of_archive() -> None:
    fetch, configure = driver.restore_commands(INV, "/srv/restore/data", None, None)
    assert list(fetch.argv) == [*WALG, "backup-fetch", "/srv/restore/data", "LATEST"]
    assert fetch.timeout >= 3 * 3600
    assert configure.argv[7] == "/srv/restore/data"
    settings = _settings(configure)
    assert (
        "restore_command = '/usr/local/bin/wal-g-pg --config /etc/wal-g/bouw.json wal-fetch \"%f\" \"%p\"'"
        in settings
    )
    assert "archive_mode = 'off'" in settings
    assert "recovery_target_timeline = 'latest'" in settings
    assert not any(s.startswith("recovery_target_time ") for s in settings)
    assert "recovery.signal" in configure.argv[5]


def test_restore_to_time() -> None:
    target = datetime(2026, 5, 1, 23, 30, tzinfo=timezone(timedelta(hours=2)))
    fetch, configure = driver.restore_commands(INV, "/srv/restore/data", "base_000000010000000000000004", target)
    assert fetch.argv[-1] == "base_000000010000000000000004"
    settings = _settings(configure)
    assert "recovery_target_time = '2026-05-01 21:30:00+00:00'" in settings
    assert "recovery_target_action = 'promote'" in settings
    assert not any(s.startswith("recovery_target_timeline") for s in settings)


@pytest.mark.parametrize(
    "name",
    ["latest", "base_1", "base_000000010000000000000004; rm -rf /", "base_00000001000000000000000g",
     "base_000000010000000000000004_D_", "../base_000000010000000000000004", ""],
)
def test_restore_rejects_bad_backup_name(name: str) -> None:
    with pytest.raises(BackupInputError) as info:
        driver.restore_commands(INV, "/srv/restore/data", name, None)
    assert repr(name) in str(info.value)


@pytest.mark.parametrize("target_dir", ["relative/dir", "/", "/srv/a\nb"])
def test_restore_rejects_bad_target_dir(target_dir: str) -> None:
    with pytest.raises(BackupInputError, match="absolute path"):
        driver.restore_commands(INV, target_dir, None, None)


def test_restore_rejects_naive_target_time() -> None:
    with pytest.raises(BackupInputError, match="no time zone"):
        driver.restore_commands(INV, "/srv/restore/data", None, datetime(2026, 5, 1, 21, 0))


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("LATEST", True),
        ("base_000000010000000000000004", True),
        ("base_000000020000000100000090_D_000000020000000100000072", True),
        ("base_000000010000000000000004_D_", False),
        ("base_00000001000000000000004", False),  # 23 hex digits
        ("base_000000010000000000000004x", False),
        ("20260501-200000F", False),  # a pgBackRest label
        ("base_000000010000000000000004\n", False),
    ],
)
def test_validate_backup_name(name: str, ok: bool) -> None:
    if ok:
        driver.validate_backup_name(name)
    else:
        with pytest.raises(BackupInputError, match="not a WAL-G backup name"):
            driver.validate_backup_name(name)


def _fake_data_dir(path: Path) -> Path:
    path.mkdir()
    (path / "PG_VERSION").write_text("15\n")
    return path


def test_restore_script_writes_recovery_settings(tmp_path: Path) -> None:
    data = _fake_data_dir(tmp_path / "data")
    # stolon's data directories link postgresql.auto.conf to /dev/null; a standby backup may carry standby.signal.
    (data / "postgresql.auto.conf").symlink_to("/dev/null")
    (data / "standby.signal").write_text("")
    data.chmod(0o755)
    target = datetime(2026, 5, 1, 21, 0, tzinfo=timezone.utc)
    _, configure = driver.restore_commands(INV, str(data), None, target)
    # Run the exact argv the SSH adapter would run, minus timeout/runuser.
    subprocess.run(list(configure.argv), check=True, capture_output=True, timeout=30)
    auto = data / "postgresql.auto.conf"
    assert not auto.is_symlink()
    text = auto.read_text()
    assert "restore_command = '/usr/local/bin/wal-g-pg --config /etc/wal-g/bouw.json wal-fetch \"%f\" \"%p\"'\n" in text
    assert "archive_mode = 'off'\n" in text
    assert "recovery_target_time = '2026-05-01 21:00:00+00:00'\n" in text
    assert (data / "recovery.signal").exists()
    assert not (data / "standby.signal").exists()
    assert data.stat().st_mode & 0o777 == 0o700


def test_restore_script_is_repeatable_and_keeps_existing_settings(tmp_path: Path) -> None:
    data = _fake_data_dir(tmp_path / "data")
    (data / "postgresql.auto.conf").write_text("shared_buffers = '256MB'\n")
    _, configure = driver.restore_commands(INV, str(data), None, None)
    for _ in range(2):
        subprocess.run(list(configure.argv), check=True, capture_output=True, timeout=30)
    text = (data / "postgresql.auto.conf").read_text()
    assert text.startswith("shared_buffers = '256MB'\n")
    assert text.count("recovery_target_timeline = 'latest'") == 2  # last one wins in PostgreSQL


def test_restore_script_refuses_dir_without_backup(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    _, configure = driver.restore_commands(INV, str(tmp_path / "empty"), None, None)
    done = subprocess.run(list(configure.argv), capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "no PG_VERSION" in done.stderr
    assert not (tmp_path / "empty" / "recovery.signal").exists()


def test_driver_metadata() -> None:
    assert driver.name == "walg"
    assert driver.packages(INV) == ["wal-g-pg"]


# ---------------------------------------------------------------------- stolon's pitr init (restore_cluster)

FETCH = "/usr/bin/timeout 21600 /usr/local/bin/wal-g-pg --config /etc/wal-g/bouw.json backup-fetch"
WAL_FETCH = '/usr/local/bin/wal-g-pg --config /etc/wal-g/bouw.json wal-fetch "%f" "%p"'


@pytest.mark.parametrize(
    ("backup", "data"),
    [
        (None, f'{FETCH} "%d" LATEST'),
        ("base_000000010000000000000004", f'{FETCH} "%d" base_000000010000000000000004'),
        ("base_000000020000000100000090_D_000000020000000100000072",
         f'{FETCH} "%d" base_000000020000000100000090_D_000000020000000100000072'),
    ],
    ids=["latest", "full", "delta"],
)
def test_ha_restore_commands(backup: str | None, data: str) -> None:
    inv = make_inventory(ha_manager="stolon")
    assert driver.ha_restore_commands(inv, backup) == (data, WAL_FETCH)


def test_ha_restore_fetches_wal_as_restore_commands_does() -> None:
    _, configure = driver.restore_commands(INV, "/srv/restore/data", None, None)
    assert f"restore_command = '{driver.ha_restore_commands(INV, None)[1]}'" in _settings(configure)


def test_ha_restore_commands_carry_no_secret() -> None:
    for text in driver.ha_restore_commands(make_inventory(ha_manager="stolon"), None):
        assert SECRET_KEY not in text and ACCESS_KEY not in text
        assert "AWS_" not in text and "--config /etc/wal-g/bouw.json" in text


@pytest.mark.parametrize(
    "name",
    ["latest", "", "base_1", "base_000000010000000000000004; rm -rf /", "base_000000010000000000000004 %d",
     "20260501-200000F"],
)
def test_ha_restore_commands_refuse_bad_backup_names(name: str) -> None:
    with pytest.raises(BackupInputError) as info:
        driver.ha_restore_commands(INV, name)
    assert str(info.value).startswith(f"backup: {name!r} is not a WAL-G backup name")


def test_ha_restore_commands_need_the_object_store() -> None:
    inv = make_inventory(object_store=None)
    with pytest.raises(BackupInputError, match="cluster.object_store"):
        driver.ha_restore_commands(inv, None)


@pytest.mark.parametrize("ha_manager", ["stolon", "patroni"])
def test_wal_overwrite_is_prevented_on_every_database_host(ha_manager: str) -> None:
    # A cluster restored in place archives its new timeline into the same prefix: WAL under a
    # name already there but with other contents must fail, not replace the old history.
    inv = make_inventory(ha_manager=ha_manager)
    config = json.loads(driver.host_files(inv, inv.host("db1"), SECRETS, db_secrets=DB_SECRETS)[0].content)
    assert config["WALG_PREVENT_WAL_OVERWRITE"] == "true"


def test_a_delta_backup_and_its_upload_concurrency() -> None:
    delta = driver.backup_command(INV, INV.host("db2"), INV.host("db1"), "incr", 4)
    assert "--full" not in delta.argv and dict(delta.env) == {"WALG_UPLOAD_CONCURRENCY": "4"}
    assert "delta" in delta.description
    full = driver.backup_command(INV, INV.host("db2"), INV.host("db1"))
    assert "--full" in full.argv and not full.env
