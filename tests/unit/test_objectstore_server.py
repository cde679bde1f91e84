"""tasks/adapters/objectstore_server.py: rclone serve s3 and MinIO rendering, credential checks."""

from __future__ import annotations

import shlex
from dataclasses import replace
from typing import Any

import pytest

from blocks.inventory import Inventory, parse_inventory
from tasks.adapters.objectstore_server import (
    MinioServer,
    ObjectStoreSpecError,
    RcloneS3Server,
    ServerSecrets,
    server_for,
)

SECRETS = ServerSecrets(
    admin_access_key_id="ADMINKEY01",
    admin_secret_access_key="adm1n/Secret+key=",
    cluster_access_key_id="LABCLUSTER",
    cluster_secret_access_key="cl~ster.Secret_2-",
    certificate_pem="-----BEGIN CERTIFICATE-----\nCERTBODY\n-----END CERTIFICATE-----\n",
    private_key_pem="-----BEGIN PRIVATE KEY-----\nKEYBODY\n-----END PRIVATE KEY-----\n",
)
SECRET_VALUES = [SECRETS.admin_secret_access_key, SECRETS.cluster_secret_access_key, "KEYBODY"]


def make_inventory(**store: Any) -> Inventory:
    object_store = {"host": "backup1", "endpoint": "https://backup1.bouwsteen.lab:9000", "bucket": "bouwsteen",
                    "server": "rclone"}
    object_store.update(store)
    return parse_inventory({
        "cluster": {"name": "lab", "network": "10.0.0.0/24", "object_store": object_store},
        "hosts": [
            {"name": "pg1", "address": "10.0.0.11", "roles": ["db"]},
            {"name": "pg2", "address": "10.0.0.12", "roles": ["db"]},
            {"name": "pg3", "address": "10.0.0.13", "roles": ["db"]},
            {"name": "backup1", "address": "10.0.0.21", "roles": ["backup"]},
        ],
    })


INV = make_inventory()
RCLONE = RcloneS3Server()
MINIO = MinioServer()


def by_path(files: list) -> dict:
    return {f.path: f for f in files}


# ----------------------------------------------------------------------------- rclone


def test_rclone_file_set() -> None:
    files = by_path(RCLONE.host_files(INV, SECRETS))
    assert list(files) == [
        "/etc/bouwsteen-s3/credentials.env",
        "/etc/bouwsteen-s3/tls.crt",
        "/etc/bouwsteen-s3/tls.key",
        "/etc/systemd/system/bouwsteen-s3.service",
    ]
    assert {p for p, f in files.items() if f.secret} == {"/etc/bouwsteen-s3/credentials.env",
                                                        "/etc/bouwsteen-s3/tls.key"}


def test_rclone_credentials_env_is_single_quoted_csv_of_both_keys() -> None:
    f = by_path(RCLONE.host_files(INV, SECRETS))["/etc/bouwsteen-s3/credentials.env"]
    assert f.content == ("RCLONE_AUTH_KEY='\"ADMINKEY01,adm1n/Secret+key=\","
                         "\"LABCLUSTER,cl~ster.Secret_2-\"'\n")
    assert (f.owner, f.mode, f.secret) == ("root", 0o600, True)
    # Parsed like a shell (systemd's EnvironmentFile quoting agrees here), the value is rclone's CSV.
    name, value = shlex.split(f.content)[0].split("=", 1)
    assert name == "RCLONE_AUTH_KEY"
    assert value == '"ADMINKEY01,adm1n/Secret+key=","LABCLUSTER,cl~ster.Secret_2-"'


def test_rclone_tls_files() -> None:
    files = by_path(RCLONE.host_files(INV, SECRETS))
    key = files["/etc/bouwsteen-s3/tls.key"]
    assert (key.content, key.owner, key.mode, key.secret) == (SECRETS.private_key_pem, "bouwsteen-s3", 0o600, True)
    crt = files["/etc/bouwsteen-s3/tls.crt"]
    assert (crt.content, crt.owner, crt.mode, crt.secret) == (SECRETS.certificate_pem, "root", 0o644, False)


@pytest.mark.parametrize(
    ("store", "addr", "data_path"),
    [
        ({}, "10.0.0.21:9000", "/srv/s3"),
        ({"endpoint": "https://s3.bouwsteen.lab:9443", "data_path": "/data/objects"}, "10.0.0.21:9443", "/data/objects"),
        ({"endpoint": "https://s3.bouwsteen.lab"}, "10.0.0.21:443", "/srv/s3"),
    ],
)
def test_rclone_unit_binds_backup_host(store: dict, addr: str, data_path: str) -> None:
    inv = make_inventory(**store)
    unit = by_path(RCLONE.host_files(inv, SECRETS))["/etc/systemd/system/bouwsteen-s3.service"]
    assert (unit.owner, unit.mode, unit.secret) == ("root", 0o644, False)
    lines = unit.content.splitlines()
    assert "EnvironmentFile=/etc/bouwsteen-s3/credentials.env" in lines
    assert "User=bouwsteen-s3" in lines
    exec_start = unit.content.split("ExecStart=", 1)[1].split("\nRestart=", 1)[0]
    assert exec_start.startswith(f"/usr/local/bin/rclone serve s3 {data_path} --addr {addr} ")
    assert "--cert /etc/bouwsteen-s3/tls.crt --key /etc/bouwsteen-s3/tls.key" in exec_start
    assert "--auth-key" not in exec_start


@pytest.mark.parametrize("server", [RCLONE], ids=["rclone"])
def test_no_secret_in_public_files(server: RcloneS3Server) -> None:
    files = server.host_files(INV, SECRETS)
    for f in files:
        if f.secret:
            continue
        for value in SECRET_VALUES:
            assert value not in f.content, f"{f.path} holds a secret"
    assert any(SECRETS.admin_secret_access_key in f.content for f in files if f.secret)


def test_rclone_units_restart_on_every_file() -> None:
    units = RCLONE.units(INV)
    assert [u.name for u in units] == ["bouwsteen-s3.service"]
    assert units[0].restart_on == (
        "/etc/bouwsteen-s3/credentials.env",
        "/etc/bouwsteen-s3/tls.crt",
        "/etc/bouwsteen-s3/tls.key",
        "/etc/systemd/system/bouwsteen-s3.service",
    )
    assert units[0].reload_on == ()


def test_rclone_packages_and_prepare() -> None:
    assert RCLONE.packages() == []
    (command,) = RCLONE.prepare_commands(make_inventory(data_path="/data/s3"))
    assert command.argv[-2:] == ("bouwsteen-s3", "/data/s3")


# ----------------------------------------------------------------------------- ServerSecrets.check

FIELDS = ["admin_access_key_id", "admin_secret_access_key", "cluster_access_key_id", "cluster_secret_access_key"]


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("bad", ["", "has,comma", 'quo"te', "sp ace", "a'b", "dollar$", "user@host", "co:lon",
                                 "new\nline", "back\\slash", "pct%"])
def test_server_secrets_refused(field: str, bad: str) -> None:
    secrets = replace(SECRETS, **{field: bad})
    with pytest.raises(ObjectStoreSpecError) as info:
        secrets.check()
    assert str(info.value) == (f"object store credentials: {field} is empty or has characters "
                               "outside [A-Za-z0-9_.~+/=-]")
    if bad:
        assert bad not in str(info.value)
    for server in (RCLONE, MINIO):
        with pytest.raises(ObjectStoreSpecError):
            server.host_files(INV, secrets)


@pytest.mark.parametrize("good", ["A", "abc_DEF.123~+/=-", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"])
def test_server_secrets_accepted(good: str) -> None:
    for field in FIELDS:
        replace(SECRETS, **{field: good}).check()


@pytest.mark.parametrize("field", FIELDS)
def test_server_secrets_trailing_newline_refused(field: str) -> None:
    with pytest.raises(ObjectStoreSpecError):
        replace(SECRETS, **{field: "abc\n"}).check()


# ----------------------------------------------------------------------------- MinIO


def test_minio_default_file() -> None:
    inv = make_inventory(server="minio")
    files = by_path(MINIO.host_files(inv, SECRETS))
    env = files["/etc/default/minio"]
    assert env.content == (
        "MINIO_VOLUMES=/srv/s3\n"
        'MINIO_OPTS="--address :9000 --certs-dir /home/minio-user/.minio/certs"\n'
        "MINIO_ROOT_USER=ADMINKEY01\n"
        "MINIO_ROOT_PASSWORD=adm1n/Secret+key=\n"
    )
    assert (env.owner, env.owner_group, env.mode, env.secret) == ("root", "root", 0o600, True)
    key = files["/home/minio-user/.minio/certs/private.key"]
    assert (key.owner, key.mode, key.secret) == ("minio-user", 0o600, True)
    assert files["/home/minio-user/.minio/certs/public.crt"].secret is False
    for f in files.values():
        if not f.secret:
            for value in SECRET_VALUES:
                assert value not in f.content


def test_minio_units_packages() -> None:
    inv = make_inventory(server="minio")
    units = MINIO.units(inv)
    assert [(u.name, u.restart_on) for u in units] == [("minio.service", ("/etc/default/minio",))]
    assert MINIO.packages() == ["minio", "mcli"]


def test_minio_cluster_user_command_reads_secret_from_file() -> None:
    inv = make_inventory(server="minio")
    (command,) = MINIO.cluster_user_commands(inv, "LABCLUSTER")
    assert command.argv[-2:] == ("LABCLUSTER", "/etc/bouwsteen-s3/cluster-lab.secret")
    assert SECRETS.cluster_secret_access_key not in " ".join(command.argv)


@pytest.mark.parametrize(("kind", "cls"), [("rclone", RcloneS3Server), ("minio", MinioServer)])
def test_server_for(kind: str, cls: type) -> None:
    assert type(server_for(kind)) is cls


def test_server_for_unknown() -> None:
    with pytest.raises(KeyError):
        server_for("ceph")
