"""blocks/prefect_blocks.py credential blocks: strings that reach pg_hba, configs and commands are
validated when a block is built or loaded; the error names the field, never a secret's value."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from blocks.prefect_blocks import (
    DatabaseCredentials,
    ObjectStoreCredentials,
    RoutingCredentials,
    SshCredentials,
)

PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
KEY = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"


def db(**over: Any) -> DatabaseCredentials:
    fields: dict[str, Any] = dict(superuser_password=SecretStr("s3cr3t-A_b"), replication_password=SecretStr("r"),
                                  application_password=SecretStr("a"))
    return DatabaseCredentials(**{**fields, **over})


def store(**over: Any) -> ObjectStoreCredentials:
    fields: dict[str, Any] = dict(
        access_key_id="lab0123456789ab", secret_access_key=SecretStr("x" * 32),
        admin_access_key_id="admin0123456789ab", admin_secret_access_key=SecretStr("y" * 32),
        ca_certificate=PEM, server_certificate=PEM, server_private_key=SecretStr(KEY),
    )
    return ObjectStoreCredentials(**{**fields, **over})


def ssh(**over: Any) -> SshCredentials:
    fields: dict[str, Any] = dict(private_key=SecretStr(KEY), known_hosts="pg1,10.0.0.11 ssh-ed25519 AAAA\n")
    return SshCredentials(**{**fields, **over})


ATTACKS = [
    ("superuser-pg-hba", lambda: db(superuser="postgres 0.0.0.0/0 trust\nhost all"), "superuser",
     "String should match pattern"),
    ("superuser-quote", lambda: db(superuser='x" superuser'), "superuser", "String should match pattern"),
    ("superuser-uppercase", lambda: db(superuser="Postgres"), "superuser", "String should match pattern"),
    ("replication-user-space", lambda: db(replication_user="rep all"), "replication_user", "String should match"),
    ("application-user-newline", lambda: db(application_user="app\n"), "application_user", "String should match"),
    ("monitor-user-long", lambda: db(monitor_user="m" * 64), "monitor_user", "String should match pattern"),
    ("superuser-password-newline", lambda: db(superuser_password=SecretStr("pw\nhost all all 0.0.0.0/0 trust")),
     "superuser_password", "holds a newline or another control character"),
    ("superuser-password-empty", lambda: db(superuser_password=SecretStr("")), "superuser_password", "is empty"),
    ("monitor-password-nul", lambda: db(monitor_password=SecretStr("a\x00b")), "monitor_password", "control"),
    ("rest-password-newline", lambda: db(rest_api_password=SecretStr("a\nb")), "rest_api_password", "newline"),
    ("access-key-newline", lambda: store(access_key_id="lab1\nrepo1-s3-key=x"), "access_key_id",
     "String should match pattern"),
    ("admin-key-space", lambda: store(admin_access_key_id="admin key"), "admin_access_key_id", "String should match"),
    ("secret-key-newline", lambda: store(secret_access_key=SecretStr("k\nrepo1-storage-verify-tls=n")),
     "secret_access_key", "newline"),
    ("cipher-pass-newline", lambda: store(repository_cipher_pass=SecretStr("c\nx=y")), "repository_cipher_pass",
     "newline"),
    ("restore-key-newline", lambda: store(restore_access_key_id="re\nx", restore_secret_access_key=SecretStr("s" * 9)),
     "restore_access_key_id", "String should match pattern"),
    ("restore-secret-newline", lambda: store(restore_access_key_id="restore01",
                                             restore_secret_access_key=SecretStr("s\nrepo1-s3-key=x")),
     "restore_secret_access_key", "newline"),
    ("ca-not-pem", lambda: store(ca_certificate="hello"), "ca_certificate", "is not PEM"),
    ("cert-escape", lambda: store(server_certificate=PEM + "\x1b[2J"), "server_certificate", "control character"),
    ("server-key-control", lambda: store(server_private_key=SecretStr(KEY + "\x07")), "server_private_key",
     "control character"),
    ("vrrp-too-long", lambda: RoutingCredentials(vrrp_password=SecretStr("123456789")), "vrrp_password",
     "1-8 letters or digits"),
    ("vrrp-newline", lambda: RoutingCredentials(vrrp_password=SecretStr("ab\ncd")), "vrrp_password", "1-8 letters"),
    ("ssh-user-option", lambda: ssh(user="-oProxyCommand=sh"), "user", "String should match pattern"),
    ("ssh-known-hosts-control", lambda: ssh(known_hosts="pg1 ssh-ed25519 AAAA\x00"), "known_hosts",
     "control character"),
    ("ssh-private-key-control", lambda: ssh(private_key=SecretStr(KEY + "\x1b")), "private_key", "control"),
]


@pytest.mark.parametrize(("build", "field", "reason"), [a[1:] for a in ATTACKS], ids=[a[0] for a in ATTACKS])
def test_attack_refused_naming_the_field(build, field: str, reason: str) -> None:
    with pytest.raises(ValidationError) as info:
        build()
    errors = info.value.errors()
    assert [e["loc"] for e in errors] == [(field,)]
    assert reason in errors[0]["msg"]


@pytest.mark.parametrize("secret", ["pw\nhost all all 0.0.0.0/0 trust", "k\nrepo1-storage-verify-tls=n"])
def test_refusal_never_echoes_a_secret(secret: str) -> None:
    with pytest.raises(ValidationError) as info:
        db(superuser_password=SecretStr(secret))
    assert secret not in str(info.value) and secret.split("\n")[1] not in str(info.value)


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: db(), id="defaults"),
        pytest.param(lambda: db(superuser="_admin", replication_user="repl_1", application_user="app",
                                monitor_user="m" * 63), id="role-names"),
        pytest.param(lambda: db(superuser_password=SecretStr("p@ss w0rd!'\"$%&")), id="password-printable"),
        pytest.param(lambda: store(), id="store"),
        pytest.param(lambda: store(ca_certificate=PEM.replace("\n", "\r\n")), id="pem-crlf"),
        pytest.param(lambda: RoutingCredentials(vrrp_password=SecretStr("a1B2c3D4")), id="vrrp"),
        pytest.param(lambda: ssh(user="deploy"), id="ssh"),
    ],
)
def test_valid_credentials_are_accepted(build) -> None:
    build()


def test_lab_secrets_still_build_every_block(tmp_path: Path) -> None:
    """The secrets `bouwsteen lab up` writes (lab/manager.py write_secrets), as blocks/register.py builds them."""
    from lab.manager import Lab
    from lab.paths import LabPaths

    paths = LabPaths(tmp_path)
    paths.lab.mkdir(parents=True)
    lab = Lab(paths=paths)
    for _ in range(20):  # fresh random values each time
        lab.secrets_path().unlink(missing_ok=True)
        secrets = lab.write_secrets()
        assert secrets == json.loads(lab.secrets_path().read_text())
        ssh(user=lab.inventory_document()["ssh"]["user"])
        DatabaseCredentials(
            superuser_password=SecretStr(secrets["superuser_password"]),
            replication_password=SecretStr(secrets["replication_password"]),
            application_password=SecretStr(secrets["application_password"]),
            monitor_password=SecretStr(secrets["monitor_password"]),
            rest_api_password=SecretStr(secrets["rest_api_password"]),
        )
        store(
            access_key_id=secrets["s3_access_key_id"],
            secret_access_key=SecretStr(secrets["s3_secret_access_key"]),
            admin_access_key_id=secrets["s3_admin_access_key_id"],
            admin_secret_access_key=SecretStr(secrets["s3_admin_secret_access_key"]),
            repository_cipher_pass=SecretStr(secrets["pgbackrest_cipher_pass"]),
            restore_access_key_id=secrets["s3_restore_access_key_id"],
            restore_secret_access_key=SecretStr(secrets["s3_restore_secret_access_key"]),
        )
        RoutingCredentials(vrrp_password=SecretStr(secrets["vrrp_password"]))


def test_secret_fields_stay_secret_for_prefect() -> None:
    """Validators must not hide a field from Prefect's secret handling (encrypted, masked)."""
    assert DatabaseCredentials.model_json_schema()["secret_fields"] == [
        "superuser_password", "replication_password", "application_password", "monitor_password", "rest_api_password",
        "job_password"]
    assert ObjectStoreCredentials.model_json_schema()["secret_fields"] == [
        "secret_access_key", "admin_secret_access_key", "server_private_key", "repository_cipher_pass",
        "restore_secret_access_key"]
    assert SshCredentials.model_json_schema()["secret_fields"] == ["private_key"]
    assert RoutingCredentials.model_json_schema()["secret_fields"] == ["vrrp_password"]


@pytest.mark.parametrize(("over", "reason"), [
    ({"restore_access_key_id": "restore01"}, "give both or neither"),
    ({"restore_secret_access_key": SecretStr("s" * 24)}, "give both or neither"),
    ({"restore_access_key_id": "lab0123456789ab", "restore_secret_access_key": SecretStr("s" * 24)}, "a key of its own"),
    ({"restore_access_key_id": "admin0123456789ab", "restore_secret_access_key": SecretStr("s" * 24)},
     "a key of its own"),
], ids=["key-only", "secret-only", "the-clusters", "the-admins"])
def test_the_restore_key_is_optional_but_whole_and_its_own(over: dict, reason: str) -> None:
    with pytest.raises(ValidationError, match=reason):
        store(**over)
    assert store().restore_access_key_id is None
    assert store(restore_access_key_id="restore01", restore_secret_access_key=SecretStr("s" * 24)).restore_access_key_id


@pytest.mark.parametrize("restore", [False, True], ids=["cluster-key", "restore-key"])
def test_the_restore_host_reads_with_the_restore_key_when_there_is_one(restore: bool) -> None:
    from blocks.inventory import parse_inventory
    from tasks.adapters.backup.pgbackrest import PgBackRestDriver
    from tasks.adapters.remote import Masker, SshAuth
    from tasks.context import ClusterContext

    inv = parse_inventory({
        "cluster": {"name": "lab", "network": "10.0.0.0/24", "object_store": {
            "host": "backup1", "endpoint": "https://backup1.lab:9000", "bucket": "bouwsteen", "server": "minio"}},
        "hosts": [{"name": f"pg{i}", "address": f"10.0.0.1{i}", "roles": ["db"]} for i in (1, 2, 3)]
        + [{"name": "backup1", "address": "10.0.0.21", "roles": ["backup"]},
           {"name": "restore1", "address": "10.0.0.41", "roles": ["restore"]}],
    })
    block = store(**({"restore_access_key_id": "restore0123", "restore_secret_access_key": SecretStr("r" * 32)}
                     if restore else {}))
    ctx = ClusterContext(inventory=inv, ssh_user="root", ssh_auth=SshAuth("", ""), db_blocks=None, store_block=block,
                         masker=Masker())
    config = next(f for f in PgBackRestDriver().host_files(inv, inv.host("restore1"), ctx.restore_store_secrets)
                  if f.path.endswith("pgbackrest.conf")).content
    key, secret = ("restore0123", "r" * 32) if restore else ("lab0123456789ab", "x" * 32)
    assert f"repo1-s3-key={key}\n" in config and f"repo1-s3-key-secret={secret}\n" in config
    # The database hosts keep the cluster's own key (they archive and back up).
    assert ctx.store_secrets.access_key_id == "lab0123456789ab"
    assert ctx.server_secrets.has_restore_key is restore
