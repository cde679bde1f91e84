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
        )
        RoutingCredentials(vrrp_password=SecretStr(secrets["vrrp_password"]))


def test_secret_fields_stay_secret_for_prefect() -> None:
    """Validators must not hide a field from Prefect's secret handling (encrypted, masked)."""
    assert DatabaseCredentials.model_json_schema()["secret_fields"] == [
        "superuser_password", "replication_password", "application_password", "monitor_password", "rest_api_password",
        "job_password"]
    assert ObjectStoreCredentials.model_json_schema()["secret_fields"] == [
        "secret_access_key", "admin_secret_access_key", "server_private_key", "repository_cipher_pass"]
    assert SshCredentials.model_json_schema()["secret_fields"] == ["private_key"]
    assert RoutingCredentials.model_json_schema()["secret_fields"] == ["vrrp_password"]
