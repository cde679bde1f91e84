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

MINIO_INV = make_inventory(server="minio")


def test_minio_file_set() -> None:
    files = by_path(MINIO.host_files(MINIO_INV, SECRETS))
    # No mc alias file (root credentials in a URL) and no copy of the cluster's secret on the host:
    # the cluster's user is created from the controller through the admin API.
    assert list(files) == ["/etc/default/minio", "/etc/minio/certs/public.crt", "/etc/minio/certs/private.key"]
    assert {p for p, f in files.items() if f.secret} == {"/etc/default/minio", "/etc/minio/certs/private.key"}


def test_minio_default_file() -> None:
    files = by_path(MINIO.host_files(MINIO_INV, SECRETS))
    env = files["/etc/default/minio"]
    assert env.content == (
        "MINIO_VOLUMES=/srv/s3\n"
        'MINIO_OPTS="--address 10.0.0.21:9000 --certs-dir /etc/minio/certs"\n'
        "MINIO_ROOT_USER=ADMINKEY01\n"
        "MINIO_ROOT_PASSWORD=adm1n/Secret+key=\n"
        "MINIO_BROWSER=off\n"
    )
    assert (env.owner, env.owner_group, env.mode, env.secret) == ("root", "root", 0o600, True)
    # systemd's EnvironmentFile and a shell read it alike here.
    assert dict(line.split("=", 1) for line in shlex.split(env.content)) == {
        "MINIO_VOLUMES": "/srv/s3",
        "MINIO_OPTS": "--address 10.0.0.21:9000 --certs-dir /etc/minio/certs",
        "MINIO_ROOT_USER": "ADMINKEY01",
        "MINIO_ROOT_PASSWORD": "adm1n/Secret+key=",
        "MINIO_BROWSER": "off",
    }


@pytest.mark.parametrize(("store", "address"), [
    ({}, "10.0.0.21:9000"),
    ({"endpoint": "https://s3.bouwsteen.lab:9443"}, "10.0.0.21:9443"),
    ({"endpoint": "https://s3.bouwsteen.lab"}, "10.0.0.21:443"),
])
def test_minio_listens_on_backup_host_address(store: dict, address: str) -> None:
    env = by_path(MINIO.host_files(make_inventory(server="minio", **store), SECRETS))["/etc/default/minio"]
    assert f'MINIO_OPTS="--address {address} --certs-dir /etc/minio/certs"' in env.content.splitlines()


def test_minio_certificate_files() -> None:
    files = by_path(MINIO.host_files(MINIO_INV, SECRETS))
    key = files["/etc/minio/certs/private.key"]
    assert (key.content, key.owner, key.mode, key.secret) == (SECRETS.private_key_pem, "minio-user", 0o600, True)
    crt = files["/etc/minio/certs/public.crt"]
    assert (crt.content, crt.owner, crt.mode, crt.secret) == (SECRETS.certificate_pem, "minio-user", 0o644, False)
    # Not under the service user's home: that is the data path, which the site's file backup copies.
    assert not any(p.startswith(("/srv/s3", "/home/")) for p in files)


def test_minio_needs_no_localhost_certificate() -> None:
    """mcli on the host needed `localhost` in the certificate and the CA in its own folder; gone."""
    for f in MINIO.host_files(MINIO_INV, SECRETS):
        assert "localhost" not in f.content and "127.0.0.1" not in f.content
        assert not f.path.endswith("/mc.env") and "/CAs/" not in f.path and ".mcli" not in f.path


def test_minio_no_secret_in_public_files_and_no_cluster_secret_on_host() -> None:
    files = MINIO.host_files(MINIO_INV, SECRETS)
    for f in files:
        if not f.secret:
            for value in SECRET_VALUES:
                assert value not in f.content, f"{f.path} holds a secret"
    # The cluster's secret has no business on the backup host at all.
    assert not any(SECRETS.cluster_secret_access_key in f.content for f in files)


def test_minio_no_shell_user_management() -> None:
    """The old `mcli admin user add … || true` line is gone; nothing on the host handles secrets."""
    assert not hasattr(MINIO, "cluster_user_commands")
    for command in MINIO.prepare_commands(MINIO_INV):
        text = " ".join(command.argv)
        assert "|| true" not in text and "mcli" not in text
        for value in (*SECRET_VALUES, SECRETS.cluster_access_key_id, SECRETS.admin_access_key_id):
            assert value not in text


def test_minio_units_packages() -> None:
    units = MINIO.units(MINIO_INV)
    assert [(u.name, u.restart_on) for u in units] == [("minio.service", ("/etc/default/minio",))]
    assert MINIO.packages() == ["minio"]  # users and policies go through the admin API, no mcli


def test_per_cluster_users() -> None:
    assert MINIO.per_cluster_users is True
    assert RCLONE.per_cluster_users is False


# ----------------------------------------------------------------------------- validate_credentials


@pytest.mark.parametrize(("field", "value", "message"), [
    ("admin_access_key_id", "ab", "admin_access_key_id must be at least 3 characters for MinIO"),
    ("cluster_access_key_id", "cd", "cluster_access_key_id must be at least 3 characters for MinIO"),
    ("admin_secret_access_key", "Sec-r3t", "admin_secret_access_key must be at least 8 characters for MinIO"),
    ("cluster_secret_access_key", "Sh0rt+/", "cluster_secret_access_key must be at least 8 characters for MinIO"),
    ("cluster_access_key_id", "LAB=CLUSTER", "cluster_access_key_id must not contain '=' or ','"),
])
def test_minio_credential_rules(field: str, value: str, message: str) -> None:
    secrets = replace(SECRETS, **{field: value})
    with pytest.raises(ObjectStoreSpecError) as info:
        MINIO.validate_credentials(secrets)
    assert str(info.value).startswith(f"object store credentials: {message}")
    assert value not in str(info.value)
    with pytest.raises(ObjectStoreSpecError):
        MINIO.host_files(MINIO_INV, secrets)  # rendering refuses too (pre-flight goes through it)
    RCLONE.validate_credentials(secrets)  # rclone has no such rules


@pytest.mark.parametrize(("field", "value"), [
    ("admin_access_key_id", "abc"),
    ("cluster_access_key_id", "xyz"),
    ("admin_secret_access_key", "12345678"),
    ("cluster_secret_access_key", "abcdefgh"),
    ("admin_access_key_id", "ADMIN=KEY"),  # MinIO's reserved characters concern users, not the root user
    ("cluster_access_key_id", "a" * 64),  # no maximum is enforced
])
def test_minio_credential_rules_accept_boundaries(field: str, value: str) -> None:
    MINIO.validate_credentials(replace(SECRETS, **{field: value}))


@pytest.mark.parametrize("server", [RCLONE, MINIO], ids=["rclone", "minio"])
def test_same_access_key_twice_refused(server) -> None:
    secrets = replace(SECRETS, cluster_access_key_id=SECRETS.admin_access_key_id)
    with pytest.raises(ObjectStoreSpecError) as info:
        server.validate_credentials(secrets)
    assert str(info.value) == ("object store credentials: cluster_access_key_id must differ from "
                               "admin_access_key_id")
    assert SECRETS.admin_access_key_id not in str(info.value)


@pytest.mark.parametrize("server", [RCLONE, MINIO], ids=["rclone", "minio"])
@pytest.mark.parametrize("field", FIELDS)
def test_validate_credentials_includes_character_check(server, field: str) -> None:
    with pytest.raises(ObjectStoreSpecError) as info:
        server.validate_credentials(replace(SECRETS, **{field: "bad value,"}))
    assert field in str(info.value) and "bad value" not in str(info.value)


@pytest.mark.parametrize("server", [RCLONE, MINIO], ids=["rclone", "minio"])
def test_validate_credentials_accepts_the_lab_shape(server) -> None:
    # lab/manager.py: "lab"/"admin" + 12 hex digits, token_urlsafe(24) secrets.
    server.validate_credentials(ServerSecrets("admin0123456789ab", "Zq3-_x" * 5 + "ab", "lab0123456789ab",
                                              "Yp4_-w" * 5 + "cd", "", ""))


@pytest.mark.parametrize(("kind", "cls"), [("rclone", RcloneS3Server), ("minio", MinioServer)])
def test_server_for(kind: str, cls: type) -> None:
    assert type(server_for(kind)) is cls


def test_server_for_unknown() -> None:
    with pytest.raises(KeyError):
        server_for("ceph")


# ----------------------------------------------------------------------------- the restore host's key

WITH_RESTORE = replace(SECRETS, restore_access_key_id="RESTOREKEY", restore_secret_access_key="rest0re/Secret+k")


def test_rclone_serves_the_restore_key_too_but_cannot_make_it_read_only() -> None:
    env = by_path(RCLONE.host_files(INV, WITH_RESTORE))["/etc/bouwsteen-s3/credentials.env"].content
    assert env == ("RCLONE_AUTH_KEY='\"ADMINKEY01,adm1n/Secret+key=\",\"LABCLUSTER,cl~ster.Secret_2-\","
                   "\"RESTOREKEY,rest0re/Secret+k\"'\n")
    assert RCLONE.per_cluster_users is False and MINIO.per_cluster_users is True
    # MinIO's restore user is made through its admin API, never in a file on the backup host.
    assert "RESTOREKEY" not in "".join(f.content for f in MINIO.host_files(INV, WITH_RESTORE))


@pytest.mark.parametrize("server", [RCLONE, MINIO], ids=["rclone", "minio"])
@pytest.mark.parametrize(("restore_key", "field"), [
    ("ADMINKEY01", "restore_access_key_id must differ"),
    ("LABCLUSTER", "restore_access_key_id must differ"),
    ("bad key", "restore_access_key_id is empty or has characters"),
], ids=["admin", "cluster", "characters"])
def test_the_restore_key_is_a_key_of_its_own(server, restore_key: str, field: str) -> None:
    with pytest.raises(ObjectStoreSpecError, match=field):
        server.validate_credentials(replace(WITH_RESTORE, restore_access_key_id=restore_key))


@pytest.mark.parametrize("server", [RCLONE, MINIO], ids=["rclone", "minio"])
def test_a_restore_key_without_its_secret_is_refused(server) -> None:
    with pytest.raises(ObjectStoreSpecError, match="give both"):
        server.validate_credentials(replace(SECRETS, restore_access_key_id="RESTOREKEY"))


@pytest.mark.parametrize(("change", "reason"), [
    ({"restore_access_key_id": "re"}, "restore_access_key_id must be at least 3"),
    ({"restore_secret_access_key": "short"}, "restore_secret_access_key must be at least 8"),
    ({"restore_access_key_id": "RESTORE=KEY"}, "restore_access_key_id must not contain"),
], ids=["key-short", "secret-short", "reserved-char"])
def test_minio_rules_for_the_restore_user(change: dict, reason: str) -> None:
    with pytest.raises(ObjectStoreSpecError, match=reason):
        MINIO.validate_credentials(replace(WITH_RESTORE, **change))
