"""stolon's in-place restore (restore_cluster): the keeper stopped alone, and `stolonctl init -y`
with initMode pitr, its program run here against a fake stolonctl. No stolon, no network."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from blocks.inventory import Inventory, parse_inventory
from tasks.adapters.backup.base import StoreSecrets
from tasks.adapters.backup.pgbackrest import PgBackRestDriver
from tasks.adapters.backup.walg import WalgDriver
from tasks.adapters.commands import Command
from tasks.adapters.ha.base import DbSecrets, HaSpecError
from tasks.adapters.ha.stolon import (
    CLUSTER_SPEC_SCHEMA,
    INIT_TIMEOUT,
    STOLONCTL,
    StolonDriver,
    _check_against_schema,
)

SU_PASSWORD = "su-S3cret!with spaces inside"
REPL_PASSWORD = "repl-An0ther#secret"
SECRETS = DbSecrets(superuser="postgres", superuser_password=SU_PASSWORD,
                    replication_user="replicator", replication_password=REPL_PASSWORD)
SECRET_KEY = "s3cr3t-Key/with+chars=="
ACCESS_KEY = "AKIAWALGTEST0001"
STORE = StoreSecrets(access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY, ca_certificate="-----BEGIN CERT-----\n")
ARCHIVE_PARAMETERS = {"archive_mode": "on", "archive_command": "/opt/wal-g/scripts/archive.sh %p"}
DATA = '/usr/local/bin/wal-g-pg --config /etc/wal-g/pg-prod.json backup-fetch "%d" LATEST'
WAL = '/usr/local/bin/wal-g-pg --config /etc/wal-g/pg-prod.json wal-fetch "%f" "%p"'
SPEC_PATH = "/etc/stolon/pg-prod/cluster-spec.json"
ROOT_FLAGS = [
    "--cluster-name", "pg-prod", "--store-backend", "etcdv3",
    "--store-endpoints", "http://10.0.0.11:2379,http://10.0.0.12:2379,http://10.0.0.13:2379",
    "--store-prefix", "stolon/cluster",
]

driver = StolonDriver()


def make_inventory(cluster_spec: dict[str, Any] | None = None, **cluster: Any) -> Inventory:
    return parse_inventory({
        "cluster": {
            "name": "pg-prod",
            "network": "10.0.0.0/24",
            "ha_manager": "stolon",
            "backup_tool": "walg",
            "admin_networks": ["10.0.9.0/24"],
            "postgres": {"version": 15, "parameters": {"max_connections": "200"}},
            "object_store": {"host": "backup1", "endpoint": "https://backup1.example:9000/", "bucket": "pg-backups"},
            "stolon": {"cluster_spec": cluster_spec or {}},
            **cluster,
        },
        "hosts": [
            {"name": "db-1", "address": "10.0.0.11", "roles": ["db", "etcd"]},
            {"name": "db-2", "address": "10.0.0.12", "roles": ["db", "etcd"]},
            {"name": "db-3", "address": "10.0.0.13", "roles": ["db", "etcd"]},
            {"name": "backup1", "address": "10.0.0.20", "roles": ["backup"]},
        ],
    })


INV = make_inventory()

# The fake records its argv as JSON, so the spec argument comes back as one element.
FAKE_STOLONCTL = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["STOLONCTL_LOG"], "w") as log:
    json.dump(sys.argv[1:], log)
"""


def run_init(tmp_path: Path, command: Command, spec_text: str | None) -> tuple[subprocess.CompletedProcess, list[str] | None]:
    """Runs the command's program as the host would, with this python3, the spec file written
    where host_files put it (here: under tmp_path) and the fake in place of stolonctl."""
    fake = tmp_path / "stolonctl"
    fake.write_text(FAKE_STOLONCTL)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    spec = tmp_path / "cluster-spec.json"
    if spec_text is not None:
        spec.write_text(spec_text)
    log = tmp_path / "argv.json"
    swap = {"python3": sys.executable, SPEC_PATH: str(spec), STOLONCTL: str(fake)}
    argv = [swap.get(a, a) for a in command.argv]
    done = subprocess.run(argv, env={"STOLONCTL_LOG": str(log), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=30)
    return done, (json.loads(log.read_text()) if log.exists() else None)


def spec_file(inv: Inventory) -> str:
    files = {f.path: f for f in driver.host_files(inv, inv.host("db-1"), SECRETS, ARCHIVE_PARAMETERS)}
    return files[SPEC_PATH].content


# ---------------------------------------------------------------- units


def test_stolon_restores_the_cluster_itself() -> None:
    assert driver.restores_itself is True


@pytest.mark.parametrize("host", ["db-1", "db-2", "db-3"])
def test_only_the_keeper_is_stopped(host: str) -> None:
    units = driver.restore_stopped_units(INV, INV.host(host))
    assert units == ["stolon-keeper-pg-prod.service"]
    assert set(units) <= {u.name for u in driver.host_units(INV, INV.host(host))}


# ---------------------------------------------------------------- the command


def test_pitr_init_command_shape() -> None:
    (init,) = driver.pitr_init_commands(INV, DATA, WAL, None)
    assert init.timeout == INIT_TIMEOUT
    assert init.user is None and init.env == ()
    assert list(init.argv[:2]) == ["python3", "-c"]
    assert init.argv[3] == SPEC_PATH
    assert list(init.argv[5:]) == [STOLONCTL, *ROOT_FLAGS]
    assert init.render().startswith("timeout -k 5 120 python3 -c ")
    assert str(init) == (f"stolonctl init -y (cluster pg-prod: {SPEC_PATH} with initMode pitr, "
                         "to the end of the archive)")


def test_pitr_init_over_tls_passes_the_store_flags() -> None:
    inv = make_inventory(tls={"enabled": True})
    (init,) = driver.pitr_init_commands(inv, DATA, WAL, None)
    stolonctl = list(init.argv[5:])
    assert stolonctl == driver.stolonctl_argv(inv)
    assert "--store-cert-file" in stolonctl and "--store-ca-file" in stolonctl
    assert all(url.startswith("https://") for url in stolonctl[stolonctl.index("--store-endpoints") + 1].split(","))


CET = timezone(timedelta(hours=1))


@pytest.mark.parametrize(
    ("target_time", "recovery_target_settings"),
    [
        (None, None),
        (datetime(2026, 5, 1, 21, 30, tzinfo=timezone.utc), {"recoveryTargetTime": "2026-05-01 21:30:00+00:00"}),
        (datetime(2026, 5, 1, 22, 30, 0, 250000, tzinfo=CET), {"recoveryTargetTime": "2026-05-01 21:30:00.250000+00:00"}),
        (datetime(2026, 5, 2, 0, 15, tzinfo=CET), {"recoveryTargetTime": "2026-05-01 23:15:00+00:00"}),
    ],
    ids=["end-of-archive", "utc", "cet-with-microseconds", "cet-crosses-midnight"],
)
def test_pitr_document(target_time: datetime | None, recovery_target_settings: dict[str, str] | None) -> None:
    (init,) = driver.pitr_init_commands(INV, DATA, WAL, target_time)
    document = json.loads(init.argv[4])
    pitr = {"dataRestoreCommand": DATA, "archiveRecoverySettings": {"restoreCommand": WAL}}
    if recovery_target_settings is not None:
        pitr["recoveryTargetSettings"] = recovery_target_settings
    assert document == {"initMode": "pitr", "pitrConfig": pitr}
    # The field names are stolon's (the schema mirrors internal/cluster/cluster.go).
    problems: list[str] = []
    _check_against_schema(document, CLUSTER_SPEC_SCHEMA, "pitr", problems)
    assert problems == []


# ---------------------------------------------------------------- the program, run


@pytest.mark.parametrize(
    ("target_time", "target"),
    [(None, None), (datetime(2026, 5, 1, 23, 30, tzinfo=timezone(timedelta(hours=2))), "2026-05-01 21:30:00+00:00")],
    ids=["end-of-archive", "to-a-time"],
)
def test_init_gets_the_rendered_spec_with_pitr(tmp_path: Path, target_time: datetime | None, target: str | None) -> None:
    (init,) = driver.pitr_init_commands(INV, DATA, WAL, target_time)
    done, argv = run_init(tmp_path, init, spec_file(INV))

    assert done.returncode == 0, done.stderr
    assert argv is not None
    assert argv[:-3] == ROOT_FLAGS
    assert argv[-3:-1] == ["init", "-y"]
    spec = json.loads(argv[-1])
    rendered = driver.cluster_spec(INV, ARCHIVE_PARAMETERS)
    assert spec["initMode"] == "pitr"
    assert spec["pitrConfig"]["dataRestoreCommand"] == DATA
    assert spec["pitrConfig"]["archiveRecoverySettings"] == {"restoreCommand": WAL}
    assert spec["pitrConfig"].get("recoveryTargetSettings", {}).get("recoveryTargetTime") == target
    # Everything else as bootstrap_commands initialises it: the archive settings above all.
    assert {k: v for k, v in spec.items() if k not in ("initMode", "pitrConfig")} == {
        k: v for k, v in rendered.items() if k != "initMode"}
    assert spec["pgParameters"]["archive_command"] == ARCHIVE_PARAMETERS["archive_command"]
    problems: list[str] = []
    _check_against_schema(spec, CLUSTER_SPEC_SCHEMA, "spec", problems)
    assert problems == []


def test_an_inventory_pitr_config_does_not_reach_the_restore(tmp_path: Path) -> None:
    inv = make_inventory({"pitrConfig": {"dataRestoreCommand": "old %d",
                                         "recoveryTargetSettings": {"recoveryTargetTime": "2020-01-01 00:00:00+00"}}})
    (init,) = driver.pitr_init_commands(inv, DATA, WAL, None)
    done, argv = run_init(tmp_path, init, spec_file(inv))
    assert done.returncode == 0, done.stderr
    assert argv is not None
    assert json.loads(argv[-1])["pitrConfig"] == {"dataRestoreCommand": DATA,
                                                  "archiveRecoverySettings": {"restoreCommand": WAL}}


@pytest.mark.parametrize(("spec_text", "error"), [(None, "FileNotFoundError"), ("{not json", "JSONDecodeError")],
                         ids=["no-spec-file", "broken-spec-file"])
def test_no_init_without_a_readable_spec(tmp_path: Path, spec_text: str | None, error: str) -> None:
    (init,) = driver.pitr_init_commands(INV, DATA, WAL, None)
    done, argv = run_init(tmp_path, init, spec_text)
    assert done.returncode != 0
    assert error in done.stderr
    assert argv is None


# ---------------------------------------------------------------- secrets and inputs


@pytest.mark.parametrize("backup_driver", [WalgDriver(), PgBackRestDriver()], ids=["walg", "pgbackrest"])
def test_backup_drivers_commands_are_accepted_and_carry_no_secret(backup_driver: Any) -> None:
    data, wal = backup_driver.ha_restore_commands(INV, None)
    (init,) = driver.pitr_init_commands(INV, data, wal, datetime(2026, 5, 1, 21, 30, tzinfo=timezone.utc))
    rendered = init.render(sudo=True)
    for secret in (SU_PASSWORD, REPL_PASSWORD, SECRET_KEY, ACCESS_KEY):
        assert secret not in rendered
    # Neither do the files the spec comes from, other than the secret ones.
    walg_files = WalgDriver().host_files(INV, INV.host("db-1"), STORE, db_secrets=SECRETS)
    stolon_files = driver.host_files(INV, INV.host("db-1"), SECRETS, WalgDriver().archive_parameters(INV))
    public = [f.content for f in (*walg_files, *stolon_files) if not f.secret]
    assert not any(secret in text for text in public for secret in (SU_PASSWORD, REPL_PASSWORD, SECRET_KEY))


@pytest.mark.parametrize(
    ("data", "wal", "target_time", "message"),
    [
        ("", WAL, None, "data_restore_command: must be one non-empty line"),
        ("fetch %d\nrm -rf /", WAL, None, "data_restore_command: must be one non-empty line"),
        ("wal-g backup-fetch /var/lib/x LATEST", WAL, None, "data_restore_command: has no %d"),
        (DATA, "", None, "wal_restore_command: must be one non-empty line"),
        (DATA, 'wal-fetch "%f"\r"%p"', None, "wal_restore_command: must be one non-empty line"),
        (DATA, 'wal-g wal-fetch "%f"', None, "wal_restore_command: needs %f and %p"),
        (DATA, "wal-g wal-fetch '%f' '%p'", None, "wal_restore_command: holds a single quote"),
        (DATA, WAL, datetime(2026, 5, 1, 21, 30), "target_time: has no time zone"),
    ],
    ids=["data-empty", "data-two-lines", "data-no-%d", "wal-empty", "wal-cr", "wal-no-%p", "wal-single-quote",
         "naive-target"],
)
def test_bad_pitr_inputs_name_the_argument(data: str, wal: str, target_time: datetime | None, message: str) -> None:
    with pytest.raises(HaSpecError, match=message):
        driver.pitr_init_commands(INV, data, wal, target_time)


def test_all_input_problems_at_once() -> None:
    with pytest.raises(HaSpecError) as info:
        driver.pitr_init_commands(INV, "", "", datetime(2026, 5, 1))
    assert [line.split(":")[0] for line in str(info.value).splitlines()] == [
        "data_restore_command", "wal_restore_command", "target_time"]


def test_an_invalid_inventory_is_refused_before_any_init() -> None:
    with pytest.raises(HaSpecError, match="cluster.stolon.cluster_spec.initMode"):
        driver.pitr_init_commands(make_inventory({"initMode": "clone"}), DATA, WAL, None)
