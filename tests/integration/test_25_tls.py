"""PostgreSQL speaks TLS only (issue 15): certificates from the cluster's CA, hostssl lines only,
certificates for the superuser and replication, verify-full for every client."""

from __future__ import annotations

import datetime as dt

import psycopg
import pytest
from labtools import lab_ssh

DB = ["pg1", "pg2", "pg3"]


def _psql(lab, host: str, sql: str) -> str:
    return lab_ssh(lab, host, f"runuser -u postgres -- psql -XAtq -h /var/run/postgresql -c \"{sql}\"").stdout.strip()


def _app(ctx):
    return ctx.db_blocks.application_user, ctx.db_blocks.application_password.get_secret_value()


def test_every_member_has_ssl_on_and_hostssl_lines_only(lab, cluster):
    for host in DB:
        assert _psql(lab, host, "show ssl") == "on", host
        kinds = set(_psql(lab, host, "select distinct type from pg_hba_file_rules").split())
        assert kinds == {"local", "hostssl"}, f"{host}: {kinds}"
        strong = _psql(lab, host, "select distinct auth_method from pg_hba_file_rules where type = 'hostssl' "
                                  "and (user_name && array['postgres', 'replicator'] or 'replication' = any(database))")
        assert strong.split() == ["cert"], f"{host}: superuser/replication lines use {strong!r}"


def test_replication_runs_over_tls_with_the_replication_certificate(lab, cluster):
    from tasks.context import context_for

    members = {str(h.address) for h in context_for("lab", fresh=True).inventory.db_hosts}
    primary = next(h for h in DB if _psql(lab, h, "select not pg_is_in_recovery()") == "t")
    rows = [row for row in _psql(lab, primary, "select r.usename, s.ssl, s.client_dn, r.client_addr "
                                               "from pg_stat_replication r join pg_stat_ssl s using (pid)").splitlines()
            if row.split("|")[3] in members]  # a standby the inventory no longer lists is not ours to judge
    assert len(rows) >= 2, rows
    assert all(row.split("|")[1] == "t" and row.split("|")[2] == "/CN=replicator" for row in rows), rows


def test_plaintext_is_refused_and_verify_full_is_what_the_flows_use(lab, cluster):
    from tasks.context import context_for

    ctx = context_for("lab", fresh=True)
    user, password = _app(ctx)
    for host in DB:
        address = str(ctx.inventory.host(host).address)
        with pytest.raises(psycopg.OperationalError, match="no encryption"):
            psycopg.connect(host=address, port=5432, user=user, password=password, dbname="app", sslmode="disable",
                            connect_timeout=5).close()
        tls = ctx.client_tls()
        with psycopg.connect(host=address, port=5432, user=user, password=password, dbname="app",
                             connect_timeout=5, **tls.libpq()) as conn:
            assert conn.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()").fetchone() == (True,)


def test_a_client_of_another_ca_is_refused_both_ways(lab, cluster, tmp_path):
    from lab.pki import LabCA
    from tasks.adapters.pki import ClusterCA, Identity, period_at
    from tasks.context import context_for

    ctx = context_for("lab", fresh=True)
    user, password = _app(ctx)
    address = str(ctx.inventory.host("pg1").address)
    stranger = LabCA(tmp_path / "stranger")
    stranger.ensure()
    # The client does not trust the server: the server's certificate is not of the stranger CA.
    # (The stranger has the lab CA's name, so OpenSSL reports the bad signature rather than an unknown issuer.)
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed|signature failure"):
        psycopg.connect(host=address, port=5432, user=user, password=password, dbname="app", sslmode="verify-full",
                        sslrootcert=str(stranger.cert_path), connect_timeout=5).close()
    # The server does not trust the client: a superuser certificate from the stranger CA.
    forged = ClusterCA(stranger.certificate_pem, stranger.key_path.read_text()).issue(
        Identity("postgres", server=False),
        period_at(dt.datetime.now(dt.timezone.utc), lifetime_days=365, renew_within_days=30))
    cert, key = tmp_path / "forged.crt", tmp_path / "forged.key"
    cert.write_text(forged.certificate_pem)
    key.write_text(forged.private_key_pem)
    key.chmod(0o600)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(host=address, port=5432, user="postgres", dbname="postgres", connect_timeout=5,
                        sslcert=str(cert), sslkey=str(key), **{**ctx.client_tls().libpq()}).close()
    # Nor does the superuser's password open a TCP login: only its certificate does.
    with pytest.raises(psycopg.OperationalError, match="certificate"):
        psycopg.connect(host=address, port=5432, user="postgres", dbname="postgres", connect_timeout=5,
                        password=ctx.db_secrets.superuser_password, **ctx.client_tls().libpq()).close()


def test_etcd_refuses_plaintext_and_clients_without_a_certificate_of_the_ca(lab, cluster, tmp_path):
    import requests

    from lab.pki import LabCA
    from tasks.adapters import pki
    from tasks.context import context_for

    ctx = context_for("lab", fresh=True)
    address = str(ctx.inventory.host("pg1").address)
    port = ctx.inventory.cluster.etcd.client_port
    tls = ctx.client_tls(pki.ETCD_CLIENT)
    session = requests.Session()
    session.trust_env = False  # no proxy, no CA bundle from the environment
    url = f"https://{address}:{port}/v3/cluster/member/list"
    # Plain HTTP on the client port gets no answer from etcd.
    try:
        plain = session.post(f"http://{address}:{port}/v3/cluster/member/list", json={}, timeout=5)
        assert plain.status_code == 400 and "members" not in plain.text, plain.text
    except requests.ConnectionError:
        pass
    # TLS without a client certificate, or with one of another CA: refused in the handshake.
    with pytest.raises(requests.exceptions.ConnectionError):  # TLS 1.3: the refusal may come as a reset
        session.post(url, json={}, timeout=5, verify=tls.rootcert)
    stranger = LabCA(tmp_path / "stranger")
    stranger.ensure()
    forged = stranger.issue_server("etcd-client", ["etcd-client"], [])
    cert, key = tmp_path / "forged.crt", tmp_path / "forged.key"
    cert.write_text(forged.certificate_pem)
    key.write_text(forged.private_key_pem)
    with pytest.raises(requests.exceptions.ConnectionError):  # TLS 1.3: the refusal may come as a reset
        session.post(url, json={}, timeout=5, verify=tls.rootcert, cert=(str(cert), str(key)))
    # With the cluster's etcd client pair it answers.
    ok = session.post(url, json={}, timeout=5, verify=tls.rootcert, cert=(tls.cert, tls.key))
    assert ok.status_code == 200 and "members" in ok.json()
